"""What a restart costs an app that is waiting: `.venv/bin/python scripts/bench_restart.py [--runs N]`.

An app waits on a task with the client library's `wait()` (and, beside it, a bare `?wait=60` long-poll)
while the service is stopped with SIGTERM and started again on the same data dir and port, as a
one-machine deployment restarts. Printed per run, in milliseconds from the SIGTERM:

- `answered`: the bare long-poll's 200 with the task as it stood;
- `exited`: the old process has exited (its exit status must be 0);
- `ready`: the new process answers `/readyz`;
- `reattached`: the client's `wait()` has its next long-poll open on the new process;
- `ended`: after the task is cancelled on the new process, `wait()` returns it, with no error raised
  on the way; beside it the reference, the same cancel-to-return time on a server that was not restarted.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from receiver.client import Client

KEY = "bench-key-0123456789abcdef"
NEVER = {"provider": "sandbox", "prompt": "never done", "options": {"outcome": "no_callback", "delay": 600}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def until(predicate: Any, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"never happened: {what}")
        time.sleep(0.005)


class Service:
    def __init__(self, data: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.env = {
            **os.environ,
            "RECEIVER_DATA_DIR": str(data),
            "RECEIVER_PUBLIC_URL": self.url,
            "RECEIVER_API_KEYS": f"app:{KEY}",
            "RECEIVER_SHUTDOWN_GRACE": "30",
            "RECEIVER_LOG_LEVEL": "WARNING",
        }
        self.log = data.parent / "receiver.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "receiver", "serve", "--port", str(self.port)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def long_polls(self) -> float:
        try:
            text = httpx.get(f"{self.url}/metrics", timeout=2).text
        except httpx.HTTPError:
            return -1.0
        for line in text.splitlines():
            if line.startswith("receiver_long_polls "):
                return float(line.split()[1])
        return 0.0


class Waiter(threading.Thread):
    """The app: `Client.wait()` on the task; when it returned and what it raised, if anything."""

    def __init__(self, url: str, task_id: str) -> None:
        super().__init__(daemon=True)
        self.url, self.task_id = url, task_id
        self.returned_at = 0.0
        self.task: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with Client(self.url, KEY) as client:
                self.task = dict(client.wait(self.task_id, timeout=600))
        except BaseException as exc:
            self.error = exc
        self.returned_at = time.monotonic()


class BarePoll(threading.Thread):
    def __init__(self, url: str, task_id: str) -> None:
        super().__init__(daemon=True)
        self.url, self.task_id = url, task_id
        self.at = 0.0
        self.status = 0

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        try:
            answer = httpx.get(
                f"{self.url}/v1/tasks/{self.task_id}", params={"wait": 60}, headers=headers, timeout=90
            )
            self.status = answer.status_code
        except httpx.HTTPError:
            self.status = -1
        self.at = time.monotonic()


def waiting_task(service: Service) -> str:
    headers = {"Authorization": f"Bearer {KEY}"}
    task = httpx.post(f"{service.url}/v1/tasks", json=NEVER, headers=headers, timeout=30).json()
    until(
        lambda: (
            httpx.get(f"{service.url}/v1/tasks/{task['id']}", headers=headers).json()["status"] == "submitted"
        ),
        "the task was submitted",
    )
    return str(task["id"])


def cancel_and_time(service: Service, waiter: Waiter) -> float:
    headers = {"Authorization": f"Bearer {KEY}"}
    at = time.monotonic()
    answer = httpx.post(f"{service.url}/v1/tasks/{waiter.task_id}/cancel", headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    waiter.join(60)
    if waiter.error is not None or waiter.task is None or waiter.task["status"] != "cancelled":
        raise SystemExit(f"wait() did not return the cancelled task: {waiter.error!r} {waiter.task}")
    return (waiter.returned_at - at) * 1000


def one_run(root: Path) -> dict[str, float]:
    service = Service(root / "data", free_port())
    service.start()
    until(service.ready, "the service is ready")
    # The reference: wait() returning a task cancelled on a server that is not restarted.
    reference = Waiter(service.url, waiting_task(service))
    reference.start()
    until(lambda: service.long_polls() == 1, "the reference wait is open")
    reference_ms = cancel_and_time(service, reference)

    task_id = waiting_task(service)
    waiter, bare = Waiter(service.url, task_id), BarePoll(service.url, task_id)
    waiter.start()
    bare.start()
    until(lambda: service.long_polls() == 2, "both long-polls are open")
    assert service.process is not None
    old = service.process
    sigterm = time.monotonic()
    old.terminate()
    status = old.wait(60)
    exited = time.monotonic()
    if status != 0:
        raise SystemExit(f"the old process exited {status}")
    bare.join(60)
    if bare.status != 200:
        raise SystemExit(f"the open long-poll was answered {bare.status}")
    service.start()
    until(service.ready, "the new process is ready")
    ready = time.monotonic()
    until(lambda: service.long_polls() == 1, "wait() has a long-poll open on the new process")
    reattached = time.monotonic()
    ended_ms = cancel_and_time(service, waiter)
    assert service.process is not None
    service.process.terminate()
    service.process.wait(60)
    log = service.log.read_text()
    if "Traceback" in log or "ERROR" in log:
        raise SystemExit(f"the log has an error:\n{log[-3000:]}")

    def ms(at: float) -> float:
        return (at - sigterm) * 1000

    return {
        "answered": ms(bare.at),
        "exited": ms(exited),
        "ready": ms(ready),
        "reattached": ms(reattached),
        "ended": ended_ms,
        "reference": reference_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = []
    for number in range(args.runs):
        with tempfile.TemporaryDirectory() as root:
            runs.append(one_run(Path(root)))
        print(f"run {number + 1}: " + ", ".join(f"{k} {v:.0f} ms" for k, v in runs[-1].items()), flush=True)
    print("median: " + ", ".join(f"{k} {statistics.median(r[k] for r in runs):.0f} ms" for k in runs[0]))


if __name__ == "__main__":
    main()
