"""Callback answers during a sandbox burst, beside a reference measured in the same run.

One receiver process (`python -m receiver serve`, SQLite, the sandbox). Callbacks are posted at a fixed
rate to running sandbox tasks (verified, recorded, answered 200) and each answer is timed:
  1. reference: the callbacks alone;
  2. burst: the same callbacks while a burst of sandbox tasks is drawn, called back and downloaded.
Prints p50, p99 and the slowest answer of each.

    .venv/bin/python scripts/bench_sandbox.py [--tasks 60] [--rate 20] [--seconds 8] [--checkout DIR]

`--checkout DIR` serves the receiver of another checkout (e.g. the code before a change) with this
venv, so a before and an after are measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from receiver.tokens import Tokens  # noqa: E402

SECRET = "bench-secret-" + "x" * 40
API_KEY = "bench-key-0123456789abcdef"
TARGETS = 32  # running tasks the measured callbacks go to


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def ready(client: httpx.AsyncClient, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if (await client.get("/healthz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError("the receiver did not come up")


async def create(client: httpx.AsyncClient, **body: Any) -> str:
    answer = await client.post("/v1/tasks", json={"provider": "sandbox", "prompt": "a bench fox", **body})
    answer.raise_for_status()
    return str(answer.json()["id"])


async def submitted(client: httpx.AsyncClient, task_id: str) -> str:
    """The sandbox's id for the task, once it was submitted (bounded polling)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        task = (await client.get(f"/v1/tasks/{task_id}")).json()
        if task["provider_task_id"]:
            return str(task["provider_task_id"])
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{task_id} was never submitted")


async def callbacks(
    client: httpx.AsyncClient, targets: list[tuple[str, str]], rate: float, seconds: float
) -> tuple[list[float], int]:
    """Callbacks ("still running") at `rate` a second for `seconds`: each answer's seconds, and failures."""
    latencies: list[float] = []
    failures = 0

    async def one(url: str, body: bytes) -> None:
        nonlocal failures
        started = time.perf_counter()
        try:
            answer = await client.post(url, content=body, headers={"Content-Type": "application/json"})
        except httpx.HTTPError:
            failures += 1
            return
        if answer.status_code == 200:
            latencies.append(time.perf_counter() - started)
        else:
            failures += 1

    sent: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    for n in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
        url, provider_id = targets[n % len(targets)]
        body = f'{{"id": "{provider_id}", "status": "running"}}'.encode()
        sent.append(asyncio.create_task(one(url, body)))
    await asyncio.gather(*sent)
    return latencies, failures


def summary(name: str, latencies: list[float], failures: int) -> str:
    ms = sorted(value * 1000 for value in latencies)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return f"| {name} | {len(ms)} | {failures} | {p50:.1f} | {p99:.1f} | {ms[-1]:.1f} |"


async def run(url: str, args: argparse.Namespace) -> None:
    tokens = Tokens(SECRET, url, 3600)
    limits = httpx.Limits(max_connections=200)
    async with (
        httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as api,
        httpx.AsyncClient(timeout=60, limits=limits) as poster,
    ):
        await ready(api)
        # Tasks the sandbox never calls back (so only our callbacks reach them), all submitted first.
        quiet = {"options": {"outcome": "no_callback", "delay": 600}}
        ids = [await create(api, **quiet) for _ in range(TARGETS)]
        targets = [(tokens.callback_url("sandbox", i), await submitted(api, i)) for i in ids]
        await callbacks(poster, targets, args.rate, 1.0)  # warm up: connections, caches

        reference = await callbacks(poster, targets, args.rate, args.seconds)
        # The burst's tasks are created and submitted before the window (creating them is not what is
        # measured); the sandbox finishes them all at once `--delay` s after its submit, in the window.
        later = {"options": {"delay": args.delay}}
        burst = await asyncio.gather(*(create(api, num_images=4, seed=n, **later) for n in range(args.tasks)))
        await asyncio.gather(*(submitted(api, task_id) for task_id in burst))
        measured = await callbacks(poster, targets, args.rate, args.seconds)
        left = [(await api.get(f"/v1/tasks/{task_id}")).json()["status"] for task_id in burst]

    done = left.count("succeeded")
    print(f"callbacks at {args.rate:g}/s for {args.seconds:g} s each; burst: {args.tasks} sandbox tasks")
    print("of 4 pictures of 768x768 each, finished by the sandbox in the measured window")
    print(f"({done} of {len(left)} tasks succeeded by its end)\n")
    print("| phase | answered | failed | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|")
    print(summary("reference: callbacks alone", *reference))
    print(summary("during the sandbox burst", *measured))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tasks", type=int, default=60, help="sandbox tasks in the burst (4 pictures each)")
    parser.add_argument("--rate", type=float, default=20, help="callbacks a second")
    parser.add_argument("--seconds", type=float, default=8, help="seconds of callbacks per phase")
    parser.add_argument(
        "--delay", type=float, default=3, help="seconds from a burst task's submit to its end"
    )
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the checkout whose receiver is served")
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="receiver-bench-sandbox-") as work:
        env = {
            **os.environ,
            "PYTHONPATH": str(args.checkout.resolve()),
            "RECEIVER_DATA_DIR": str(Path(work) / "data"),
            "RECEIVER_PUBLIC_URL": url,
            "RECEIVER_SECRET_KEY": SECRET,
            "RECEIVER_API_KEYS": f"bench:{API_KEY}",
            "RECEIVER_ALLOW_PRIVATE_URLS": "1",
            "RECEIVER_LOG_LEVEL": "WARNING",
        }
        command = [sys.executable, "-m", "receiver", "serve", "--port", str(port)]
        log = Path(work) / "receiver.log"
        with log.open("wb") as output:
            server = subprocess.Popen(command, env=env, cwd=work, stdout=output, stderr=output)
            try:
                asyncio.run(run(url, args))
            except BaseException:
                print(log.read_text(errors="replace")[-3000:], file=sys.stderr)  # why the receiver failed
                raise
            finally:
                server.terminate()  # downloads still under way are cut off: not measured
                server.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
