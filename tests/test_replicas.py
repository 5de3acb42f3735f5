"""Two `receiver serve` replicas on one PostgreSQL database behind a tiny round-robin proxy, as a load
balancer would put them; one is killed with kill -9 in the middle of its downloads."""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.common import png
from tests.fakes.kie import GENERATE
from tests.fakes.kie import KEY
from tests.fakes.kie import KieFake
from tests.harness import ALICE
from tests.harness import ReceiverProcess
from tests.harness import Served
from tests.harness import free_port
from tests.s3 import MotoS3
from tests.test_restart import wait_until

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class RoundRobin:
    """Each request to the next backend in turn; a backend that refuses the connection is skipped."""

    def __init__(self, backends: list[str]) -> None:
        self.backends = backends
        self.turn = itertools.cycle(range(len(backends)))
        self.lock = threading.Lock()
        self.callbacks: Counter[str] = Counter()  # backend -> callbacks it answered
        self.served = Served(Starlette(routes=[Route("/{path:path}", self.forward, methods=["GET", "POST"])]))
        self.url = self.served.url

    async def forward(self, request: Request) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        with self.lock:
            first = next(self.turn)
        order = [self.backends[(first + n) % len(self.backends)] for n in range(len(self.backends))]
        async with httpx.AsyncClient(timeout=60) as client:
            for backend in order:
                try:
                    answer = await client.request(
                        request.method,
                        f"{backend}{request.url.path}",
                        params=request.query_params,
                        headers=headers,
                        content=body,
                    )
                except httpx.ConnectError:
                    continue  # that replica is gone: the next one answers
                if request.url.path.startswith("/callbacks/"):
                    with self.lock:
                        self.callbacks[backend] += 1
                kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
                return Response(answer.content, status_code=answer.status_code, headers=kept)
        return Response(b"no replica answers", status_code=502)


def test_two_replicas_behind_a_proxy_survive_a_kill_9(
    kie: KieFake, tmp_path: Path, pg_env: dict[str, str], s3: MotoS3
) -> None:
    """Each replica has its own data dir; they share the database and the bucket, nothing else."""
    ports = [free_port(), free_port()]
    proxy = RoundRobin([f"http://127.0.0.1:{port}" for port in ports])
    proxy.served.start()
    env = {
        "KIE_API_KEY": KEY,
        "KIE_BASE_URL": kie.url,
        "RECEIVER_JOB_LEASE": "2",
        "RECEIVER_PUBLIC_URL": proxy.url,  # providers and apps reach the replicas through the proxy
        **pg_env,
        **s3.env(bucket := s3.new_bucket()),
    }
    first, second = (
        ReceiverProcess(tmp_path / name, env, port=port).start()
        for name, port in zip("ab", ports, strict=True)
    )
    assert first.process is not None
    client = httpx.Client(base_url=proxy.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60)
    try:
        count = 6
        tasks = [
            client.post("/v1/tasks", json={"provider": "kie", "prompt": f"r{n}"}).json() for n in range(count)
        ]
        wait_until(lambda: len(kie.callback_urls) == count, 20)
        wait_until(
            lambda: all(client.get(f"/v1/tasks/{t['id']}").json()["status"] == "submitted" for t in tasks), 20
        )
        images = {}
        for n, kie_id in enumerate(sorted(kie.callback_urls)):
            images[kie_id] = png(200 + n, 100) + bytes(1024 * 1024)
            url = kie.host(f"r{n}.png", images[kie_id], chunk_delay=0.2)  # ~3 s per download
            assert kie.succeed(kie_id, url).status_code == 200
        assert len(proxy.callbacks) == 2, proxy.callbacks  # the callbacks were spread over both

        # Once all six downloads are running, each replica holds at least two (a worker runs at most
        # four at once, RECEIVER_DOWNLOAD_CONCURRENCY): kill -9 the first in the middle of its share.
        wait_until(lambda: all(hosted.fetches == 1 for hosted in kie.files.values()), 20)
        first.kill()
        for hosted in kie.files.values():
            hosted.chunk_delay = 0.0

        # The survivor's ?wait answers for every task: its own, and those the dead one was downloading
        # (taken over once their lease ran out).
        with httpx.Client(
            base_url=second.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60
        ) as survivor:
            for task in tasks:
                done = survivor.get(f"/v1/tasks/{task['id']}", params={"wait": 30}).json()
                assert done["status"] == "succeeded", done
                [image] = done["images"]
                assert survivor.get(f"/v1/tasks/{task['id']}/images/0").content in images.values()
                events = survivor.get(f"/v1/tasks/{task['id']}/events").json()["items"]
                assert [e["summary"] for e in events if e["kind"] == "download"] == [
                    f"image 0 stored ({image['size']} bytes)"
                ]  # each image stored once
        assert len(kie.calls(GENERATE)) == count  # each task submitted once
        fetches = sum(hosted.fetches for hosted in kie.files.values())
        assert count < fetches <= 2 * count  # what the dead replica was fetching was fetched again
        assert len(s3.keys(bucket)) == count  # one object per image, nothing half-written
    finally:
        client.close()
        for process in (first, second):
            if process.process is not None and process.process.poll() is None:
                process.terminate()
        proxy.served.stop()
