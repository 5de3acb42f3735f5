"""Scaling out: PostgreSQL shared by several processes, leases, roles, and the SQLite one-worker rule.

Every process here is a real `python -m receiver serve`; PostgreSQL is a real throwaway cluster
(tests/pg.py). Nothing waits on a clock: each step waits for a state it can observe.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import httpx

from receiver.store.base import Timings
from receiver.store.postgres import MIGRATIONS
from receiver.store.postgres import PostgresBackend
from receiver.store.rules import Store
from tests.fakes.common import png
from tests.fakes.kie import GENERATE
from tests.fakes.kie import KEY
from tests.fakes.kie import KieFake
from tests.harness import ALICE
from tests.harness import Receiver
from tests.harness import ReceiverProcess
from tests.harness import free_port
from tests.harness import make_env
from tests.pg import Cluster
from tests.test_restart import client_for
from tests.test_restart import start_a_slow_download
from tests.test_restart import wait_until


def test_replicas_that_start_together_migrate_once(pg_env: dict[str, str]) -> None:
    url = pg_env["RECEIVER_DATABASE_URL"]

    async def start_four() -> list[int]:
        stores = [Store(PostgresBackend(url), Timings(1.0, 60.0)) for _ in range(4)]
        await asyncio.gather(*(store.open() for store in stores))
        for store in stores:
            await store.close()
        conn = await asyncpg.connect(url)
        try:
            return [row["version"] for row in await conn.fetch("SELECT version FROM receiver_schema")]
        finally:
            await conn.close()

    assert asyncio.run(start_four()) == list(range(1, len(MIGRATIONS) + 1))


def test_a_killed_worker_loses_its_download_after_the_lease(
    kie: KieFake, tmp_path: Path, pg_env: dict[str, str]
) -> None:
    """kill -9 mid-download; another process takes the job over once the lease runs out."""
    env = {"KIE_API_KEY": KEY, "KIE_BASE_URL": kie.url, "RECEIVER_JOB_LEASE": "2", **pg_env}
    first = ReceiverProcess(tmp_path / "data", env).start()
    task, image, _ = start_a_slow_download(kie, first, tmp_path / "data" / "media")
    first.kill()
    killed_at = time.monotonic()
    assert kie.files["slow.png"].fetches == 1
    kie.files["slow.png"].chunk_delay = 0.0

    second = ReceiverProcess(tmp_path / "data", env).start()
    with client_for(second) as client:
        done = client.get(f"/v1/tasks/{task['id']}", params={"wait": 30}).json()
        took = time.monotonic() - killed_at
        assert done["status"] == "succeeded", done
        assert client.get(f"/v1/tasks/{task['id']}/images/0").content == image
        stored = [
            e for e in client.get(f"/v1/tasks/{task['id']}/events").json()["items"] if e["kind"] == "download"
        ]
    assert kie.files["slow.png"].fetches == 2  # the dead process's try, then the takeover
    assert len(stored) == 1
    print(f"lease 2 s: the killed worker's download was taken over and stored {took:.2f} s after kill -9")
    second.terminate()


def test_api_and_worker_roles_as_separate_processes(
    kie: KieFake, tmp_path: Path, pg_env: dict[str, str]
) -> None:
    """--role api answers apps and callbacks, --role worker runs the jobs; a ?wait on the API process
    wakes when the worker process stores the image (LISTEN/NOTIFY across processes)."""
    env = {"KIE_API_KEY": KEY, "KIE_BASE_URL": kie.url, **pg_env}
    api = ReceiverProcess(tmp_path / "data", env, role="api").start()
    worker = ReceiverProcess(
        tmp_path / "data", {**env, "RECEIVER_PUBLIC_URL": api.url}, role="worker"
    ).start()
    try:
        assert (
            httpx.get(f"{worker.url}/v1/tasks", headers={"Authorization": f"Bearer {ALICE}"}).status_code
            == 404
        )
        assert httpx.get(f"{worker.url}/readyz").status_code == 200
        image = png(40, 30)
        url = kie.host("split.png", image)
        with client_for(api) as client:
            task = client.post("/v1/tasks", json={"provider": "kie", "prompt": "split"}).json()
            wait_until(lambda: client.get(f"/v1/tasks/{task['id']}").json()["status"] == "submitted")
            assert kie.callback_urls[kie.last_task_id()].startswith(
                api.url
            )  # the worker hands out the API's address
            assert kie.succeed(kie.last_task_id(), url).status_code == 200
            done = client.get(f"/v1/tasks/{task['id']}", params={"wait": 30}).json()
            assert done["status"] == "succeeded", done
            assert client.get(f"/v1/tasks/{task['id']}/images/0").content == image
    finally:
        api.terminate()
        worker.terminate()


def test_sqlite_refuses_a_second_worker_on_one_data_dir(tmp_path: Path) -> None:
    api_port = free_port()
    public = {"RECEIVER_PUBLIC_URL": f"http://127.0.0.1:{api_port}"}  # callbacks go to the API process
    first = ReceiverProcess(tmp_path / "data", public, role="worker").start()
    try:
        env = {**os.environ, **make_env(tmp_path / "data", "http://127.0.0.1:1")}
        for role in ("worker", "all"):
            result = subprocess.run(
                [sys.executable, "-m", "receiver", "serve", "--port", "1", "--role", role],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert result.returncode == 2
            [line] = result.stderr.strip().splitlines()
            assert line.startswith(
                f"receiver: another worker (pid {first.process.pid if first.process else ''})"
            )
            assert "--role api" in line
        # An API process beside it is welcome: it shares the data dir and runs no jobs.
        api = ReceiverProcess(tmp_path / "data", {}, port=api_port, role="api").start()
        with client_for(api) as client:
            task = client.post("/v1/tasks", json={"provider": "sandbox", "prompt": "beside"}).json()
            # The task is moved by the worker process; the API process's long-poll must see those
            # commits and answer when the task ends, not when its 60 s wait runs out: the client gives
            # up sooner than that (on a bound for the whole task, not a timing assumption).
            answer = client.get(f"/v1/tasks/{task['id']}", params={"wait": 60}, timeout=50)
            assert answer.json()["status"] == "succeeded"
        api.terminate()
    finally:
        first.terminate()


def test_readiness_follows_the_database(
    pg_env: dict[str, str], pg_cluster: Cluster, start_receiver: Callable[..., Receiver]
) -> None:
    """/readyz is 200 while PostgreSQL takes writes, 503 once the database is gone; the process lives on
    and answers calls that need the database with 503 database_unavailable."""
    receiver = start_receiver(**pg_env)
    assert receiver.anon.get("/readyz").status_code == 200
    name = pg_env["RECEIVER_DATABASE_URL"].rsplit("/", 1)[1]
    pg_cluster.drop(name)
    answer = receiver.anon.get("/readyz")
    assert answer.status_code == 503
    assert "the database is not writable" in answer.json()["problems"]
    assert receiver.anon.get("/healthz").status_code == 200
    lookup = receiver.alice.get("/v1/tasks")  # an answer that says so, never a 500
    assert lookup.status_code == 503
    assert lookup.json()["error"]["code"] == "database_unavailable"
    created = receiver.alice.post("/v1/tasks", json={"provider": "sandbox", "prompt": "later"})
    assert created.status_code == 503


def test_pacing_counts_across_replicas(kie: KieFake, tmp_path: Path, pg_env: dict[str, str]) -> None:
    """KIE_MAX_CONCURRENT=2 holds for two replicas together, not for each of them."""
    env = {"KIE_API_KEY": KEY, "KIE_BASE_URL": kie.url, "KIE_MAX_CONCURRENT": "2", **pg_env}
    replicas = [ReceiverProcess(tmp_path / "data", env).start() for _ in range(2)]

    def sent() -> list[str]:
        return [call.json()["prompt"] for call in kie.calls(GENERATE)]

    try:
        with client_for(replicas[0]) as client:
            for n in range(5):
                client.post("/v1/tasks", json={"provider": "kie", "prompt": f"p{n}"})
        wait_until(lambda: len(kie.callback_urls) == 2)
        time.sleep(1.0)  # both workers have had many turns: neither may send a third
        assert len(sent()) == 2, sent()
        assert kie.succeed(sorted(kie.callback_urls)[0], kie.host("p.png")).status_code == 200
        wait_until(lambda: len(sent()) == 3)  # one slot freed: exactly one more goes
        time.sleep(1.0)
        assert len(sent()) == 3, sent()
    finally:
        for replica in replicas:
            replica.terminate()


def test_the_per_minute_rate_counts_across_replicas(
    kie: KieFake, tmp_path: Path, pg_env: dict[str, str]
) -> None:
    """KIE_MAX_PER_MINUTE=3 holds for two worker processes together: the sends are counted in the
    database, not in each process."""
    env = {"KIE_API_KEY": KEY, "KIE_BASE_URL": kie.url, "KIE_MAX_PER_MINUTE": "3", **pg_env}
    replicas = [ReceiverProcess(tmp_path / "data", env).start() for _ in range(2)]
    try:
        with client_for(replicas[0]) as first, client_for(replicas[1]) as second:
            ids = [
                (first if n % 2 else second)
                .post("/v1/tasks", json={"provider": "kie", "prompt": f"r{n}"})
                .json()["id"]
                for n in range(6)
            ]
            wait_until(lambda: len(kie.calls(GENERATE)) >= 3)
            time.sleep(1.0)  # both workers have had many turns: neither may send a fourth this minute
            assert len(kie.calls(GENERATE)) == 3
            statuses = [first.get(f"/v1/tasks/{task_id}").json()["status"] for task_id in ids]
            assert statuses.count("queued") == 3, statuses
    finally:
        for replica in replicas:
            replica.terminate()


def test_a_429_met_by_one_replica_holds_the_other_back(
    kie: KieFake, tmp_path: Path, pg_env: dict[str, str]
) -> None:
    """The hold after a 429 is kept in the database: tasks created while it lasts wait in every process,
    and the refused task goes first, alone, when it ends, whichever process sends it."""
    env = {"KIE_API_KEY": KEY, "KIE_BASE_URL": kie.url, "RECEIVER_RETRY_BASE": "2", **pg_env}
    replicas = [ReceiverProcess(tmp_path / "data", env).start() for _ in range(2)]
    kie.script(GENERATE, 429, {"code": 429, "msg": "slow down"})

    def sent() -> list[str]:
        return [call.json()["prompt"] for call in kie.calls(GENERATE)]

    try:
        with client_for(replicas[0]) as first, client_for(replicas[1]) as second:
            refused = first.post("/v1/tasks", json={"provider": "kie", "prompt": "first"}).json()["id"]

            def held() -> bool:  # the 429 was met and recorded (the hold is written before this event)
                events = first.get(f"/v1/tasks/{refused}/events").json()["items"]
                return any(e["kind"] == "submit" for e in events)

            wait_until(held)
            others = [
                client.post("/v1/tasks", json={"provider": "kie", "prompt": f"o{n}"}).json()["id"]
                for n, client in enumerate([second, first, second])
            ]
            for task_id in [refused, *others]:
                wait_until(lambda t=task_id: second.get(f"/v1/tasks/{t}").json()["status"] == "submitted", 30)
            assert sent()[:2] == ["first", "first"], sent()  # refused, then accepted, before any other
            assert sorted(sent()[2:]) == ["o0", "o1", "o2"]
    finally:
        for replica in replicas:
            replica.terminate()


def test_a_live_worker_keeps_its_long_job(kie: KieFake, tmp_path: Path, pg_env: dict[str, str]) -> None:
    """A download that outlasts the lease stays with its living worker (heartbeats renew the lease):
    the other replica never takes it, and the image is fetched once."""
    env = {"KIE_API_KEY": KEY, "KIE_BASE_URL": kie.url, "RECEIVER_JOB_LEASE": "1", **pg_env}
    replicas = [ReceiverProcess(tmp_path / "data", env).start() for _ in range(2)]
    try:
        image = png(120, 80) + bytes(1024 * 1024)
        url = kie.host("long.png", image, chunk_delay=0.25)  # 17 chunks: about four leases long
        with client_for(replicas[0]) as client:
            task = client.post("/v1/tasks", json={"provider": "kie", "prompt": "long"}).json()
            wait_until(lambda: client.get(f"/v1/tasks/{task['id']}").json()["status"] == "submitted")
            assert kie.succeed(kie.last_task_id(), url).status_code == 200
            done = client.get(f"/v1/tasks/{task['id']}", params={"wait": 30}).json()
        assert done["status"] == "succeeded", done
        assert kie.files["long.png"].fetches == 1
    finally:
        for replica in replicas:
            replica.terminate()
