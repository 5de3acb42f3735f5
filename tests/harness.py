"""Real servers for tests: the receiver and provider fakes, each served by uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import httpx
import uvicorn
from starlette.types import ASGIApp

from receiver.app import create_app
from receiver.config import Settings
from receiver.config import prepare_settings

if TYPE_CHECKING:
    from tests.fakes.common import ProviderFake

ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef"
FAST = {
    "RECEIVER_API_KEYS": f"alice:{ALICE},bob:{BOB}",
    "RECEIVER_ALLOW_PRIVATE_URLS": "1",
    "RECEIVER_RETRY_BASE": "0.05",
    "RECEIVER_DOWNLOAD_RETRY_DELAYS": "0.05,0.05,0.05,0.1",
    "RECEIVER_RECONCILE_INTERVAL": "0.1",
    "RECEIVER_SANDBOX_DELAY": "0.05",
    "RECEIVER_HTTP_TIMEOUT": "5",
    "RECEIVER_SHUTDOWN_GRACE": "2",
}


def bound_socket() -> socket.socket:
    # IPPROTO_TCP, not 0, so asyncio sets TCP_NODELAY on accepted connections (see receiver.cli.listen).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with bound_socket() as sock:
        return int(sock.getsockname()[1])


class Served:
    """An ASGI app served by uvicorn in a thread of its own, with its own event loop."""

    def __init__(self, app: ASGIApp, sock: socket.socket | None = None) -> None:
        self.sock = sock or bound_socket()
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))

    def start(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop the server and its thread; a server still running after that fails the test loudly
        rather than keep working (a sweep, a worker) into the tests that come after it."""
        self.server.should_exit = True
        self.thread.join(timeout=15)
        if self.thread.is_alive():  # its graceful shutdown hangs: cut the open connections short
            self.server.force_exit = True
            self.thread.join(timeout=15)
        self.sock.close()
        if self.thread.is_alive():
            raise RuntimeError(f"the server on {self.url} did not stop within 30 s")

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run a coroutine function on the served app's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout=10)


def make_env(data_dir: Path, public_url: str, **extra: str) -> dict[str, str]:
    return {**FAST, "RECEIVER_DATA_DIR": str(data_dir), "RECEIVER_PUBLIC_URL": public_url, **extra}


class Receiver:
    """The receiver, served for real, with a client per tenant."""

    def __init__(self, data_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.sock = bound_socket()
        url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.env = make_env(data_dir, url, **dict(env or {}))
        self.settings: Settings = prepare_settings(self.env, port=int(self.sock.getsockname()[1]))
        self.app = create_app(self.settings)
        self.served = Served(self.app, self.sock)
        self.url = url
        self.alice = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
        self.bob = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {BOB}"}, timeout=30)
        self.anon = httpx.Client(base_url=url, timeout=30)

    def start(self) -> Receiver:
        self.served.start()
        return self

    def stop(self) -> None:
        for client in (self.alice, self.bob, self.anon):
            client.close()
        self.served.stop()

    def submit(self, client: httpx.Client | None = None, **body: Any) -> dict[str, Any]:
        response = (client or self.alice).post("/v1/tasks", json=body)
        assert response.status_code == 202, response.text
        task: dict[str, Any] = response.json()
        return task

    def wait(self, task_id: str, seconds: float = 20, client: httpx.Client | None = None) -> dict[str, Any]:
        """The task once it ends (the API's own long-poll), failing the test if it does not."""
        deadline = time.monotonic() + seconds
        while True:
            left = max(0.0, min(10.0, deadline - time.monotonic()))
            response = (client or self.alice).get(f"/v1/tasks/{task_id}", params={"wait": f"{left:.2f}"})
            assert response.status_code == 200, response.text
            task: dict[str, Any] = response.json()
            if task["status"] in ("succeeded", "failed") or time.monotonic() >= deadline:
                return task

    def wait_status(self, task_id: str, status: str, seconds: float = 10) -> dict[str, Any]:
        """Poll until the task reaches `status` (for non-terminal states the long-poll cannot wait for)."""
        deadline = time.monotonic() + seconds
        while True:
            task: dict[str, Any] = self.alice.get(f"/v1/tasks/{task_id}").json()
            if task["status"] == status or time.monotonic() > deadline:
                return task
            time.sleep(0.02)

    def submitted(self, fake: ProviderFake, **body: Any) -> tuple[str, str]:
        """Create a task for `fake`'s provider and wait until it is submitted: (our id, the provider's)."""
        task = self.submit(provider=fake.name, **{"prompt": "a lighthouse at dusk", **body})
        self.wait_status(str(task["id"]), "submitted")
        return str(task["id"]), fake.provider_task_id()

    def events(self, task_id: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.alice.get(f"/v1/tasks/{task_id}/events").json()["items"]
        return items

    def callback_url(self, provider: str, task_id: str) -> str:
        from receiver.tokens import Tokens

        tokens = Tokens(self.settings.secret_key, self.settings.public_url, self.settings.link_ttl)
        return tokens.callback_url(provider, task_id)


@contextmanager
def served_receiver(data_dir: Path, env: Mapping[str, str] | None = None) -> Iterator[Receiver]:
    receiver = Receiver(data_dir, env).start()
    try:
        yield receiver
    finally:
        receiver.stop()


class ReceiverProcess:
    """The receiver as a real process (`python -m receiver serve`), for kill -9 and SIGTERM tests."""

    def __init__(
        self, data_dir: Path, env: Mapping[str, str], port: int | None = None, role: str = "all"
    ) -> None:
        self.port = port or free_port()
        self.role = role
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **make_env(data_dir, self.url, **dict(env))}
        self.process: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"receiver-{self.port}.log"

    def start(self) -> ReceiverProcess:
        handle = open(self.log, "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "receiver", "serve", "--port", str(self.port), "--role", self.role],
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        # Generous: on a machine kept busy a cold start (imports, migrations) takes well over 20 s.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.process.kill()  # never left running behind a failed test
        self.process.wait(10)
        raise RuntimeError(f"the receiver did not start: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout)


def download_children(parent: int) -> list[int]:
    """The live download processes (`python -m receiver.fetcher`) whose parent is `parent`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            cmdline = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(ppid) == parent and state != "Z" and b"receiver.fetcher" in cmdline:
            found.append(int(entry.name))
    return found


def is_running(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie waiting to be reaped has)."""
    try:
        return (Path(f"/proc/{pid}/stat")).read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
