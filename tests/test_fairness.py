"""One tenant cannot shut out another: its ?wait long-polls are capped and leave connections for every
other request, its hanging notify URLs leave notification slots to the other tenants, and the sandbox
draws its pictures off the event loop that answers callbacks. Each over real HTTP, on a served receiver."""

from __future__ import annotations

import asyncio
import re
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver.cli import http_limits
from receiver.config import ConfigError
from receiver.config import load_settings
from receiver.sandbox_service import render_png
from tests.conftest import database_settings
from tests.harness import ALICE
from tests.harness import Receiver
from tests.harness import served_receiver
from tests.test_notify import SECRET
from tests.test_notify import AppHook
from tests.test_notify import hook  # noqa: F401 - the fixture, used by name

WAIT = "X-Receiver-Wait"


def metric(receiver: Receiver, name: str, tenant: str) -> float | None:
    """The value of `name{tenant="…"}` in the receiver's /metrics, None when it is not there."""
    text = receiver.anon.get("/metrics").text
    found = re.search(rf'^{name}\{{tenant="{tenant}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else None


def until(predicate: Callable[[], bool], what: str, seconds: float = 30) -> None:
    """Bounded polling of state: fails the test, saying what never happened, if it does not come."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=16) as executor:
        yield executor


def long_poll(url: str, task_id: str, seconds: int = 60) -> httpx.Response:
    """One ?wait on a connection of its own (each long-poll holds one), closed once answered."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=120) as client:
        return client.get(f"/v1/tasks/{task_id}", params={"wait": seconds})


def test_a_tenants_waits_past_its_cap_answer_at_once_and_leave_connections_for_others(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    # A small connection budget, applied as `receiver serve` applies it (uvicorn's limit_concurrency):
    # before the cap, 10 long-polls of one tenant made every other request a 503.
    receiver = Receiver(
        tmp_path / "data", {"RECEIVER_MAX_CONNECTIONS": "10", "RECEIVER_MAX_WAITS_PER_TENANT": "3"}
    )
    for name, value in http_limits(receiver.settings).items():
        setattr(receiver.served.server.config, name, value)
    receiver.start()
    held: list[Future[httpx.Response]] = []
    try:
        # Tasks that stay running: the sandbox answers them ten minutes from now.
        slow: dict[str, Any] = {"provider": "sandbox", "prompt": "a slow fox", "options": {"delay": 600}}
        task_id = str(receiver.submit(**slow)["id"])
        bobs = str(receiver.submit(receiver.bob, **slow)["id"])
        capped_before = metric(receiver, "receiver_waits_capped_total", "alice") or 0.0

        held = [pool.submit(long_poll, receiver.url, task_id) for _ in range(3)]
        until(
            lambda: metric(receiver, "receiver_waits_open", "alice") == 3,
            "alice's first three long-polls are not all held open",
        )
        # Twice the connection budget in more long-polls, one after another: each answers at once.
        for _ in range(20):
            answer = long_poll(receiver.url, task_id)
            assert answer.status_code == 200, answer.text
            assert answer.headers[WAIT] == "capped"
            assert answer.headers["connection"] == "close"
            assert answer.json()["id"] == task_id and answer.json()["status"] != "succeeded"
        assert not any(future.done() for future in held), "the long-polls within the cap are still held"
        assert metric(receiver, "receiver_waits_open", "alice") == 3
        assert metric(receiver, "receiver_waits_capped_total", "alice") == capped_before + 20

        # Meanwhile everyone else is answered: health checks, another tenant's lookups and long-polls.
        assert receiver.anon.get("/healthz").status_code == 200
        assert receiver.bob.get(f"/v1/tasks/{bobs}").status_code == 200
        assert receiver.bob.get("/v1/tasks").status_code == 200
        answer = receiver.bob.get(f"/v1/tasks/{bobs}", params={"wait": 0.2})
        assert answer.status_code == 200 and WAIT not in answer.headers
        assert receiver.alice.get(f"/v1/tasks/{task_id}").status_code == 200  # a lookup without ?wait
    finally:
        receiver.stop()
        for future in held:
            future.exception()  # answered or cut off by the stop; either way, over


def test_the_fairness_settings_are_checked_at_start(tmp_path: Path) -> None:
    def problem(**env: str) -> str:
        with pytest.raises(ConfigError) as caught:
            load_settings({"RECEIVER_DATA_DIR": str(tmp_path), **env})
        return str(caught.value)

    assert "RECEIVER_MAX_WAITS_PER_TENANT" in problem(RECEIVER_MAX_WAITS_PER_TENANT="0")
    assert "RECEIVER_MAX_WAITS_PER_TENANT" in problem(RECEIVER_MAX_WAITS_PER_TENANT="many")
    # Waits may hold half of the connections at most: the rest is for everything else.
    assert "half of RECEIVER_MAX_CONNECTIONS" in problem(
        RECEIVER_MAX_CONNECTIONS="100", RECEIVER_MAX_WAITS_PER_TENANT="51"
    )
    assert "RECEIVER_NOTIFY_CONCURRENCY_PER_TENANT" in problem(RECEIVER_NOTIFY_CONCURRENCY_PER_TENANT="0")
    assert "RECEIVER_NOTIFY_CONCURRENCY_PER_TENANT" in problem(RECEIVER_NOTIFY_CONCURRENCY_PER_TENANT="16")

    settings = load_settings({"RECEIVER_DATA_DIR": str(tmp_path)})
    assert (settings.max_waits_per_tenant, settings.max_waits, settings.notify_per_tenant) == (50, 500, 4)
    # A small connection budget brings the default down with it, rather than refusing to start.
    settings = load_settings({"RECEIVER_DATA_DIR": str(tmp_path), "RECEIVER_MAX_CONNECTIONS": "40"})
    assert (settings.max_waits_per_tenant, settings.max_waits) == (20, 20)


class HangingHost:
    """A notify URL's host that takes each request and never answers; it sees a client that gives up."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.changed = threading.Condition()
        self.opened = 0  # requests received (their head read)
        self.closed = 0  # … whose client has hung up since
        self.most = 0  # the most held open at once
        self._writers: set[asyncio.StreamWriter] = set()
        self.url = ""

    def start(self) -> HangingHost:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._take, "127.0.0.1", 0), self.loop
        ).result(10)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/hooks/hang"
        return self

    @property
    def open(self) -> int:
        return self.opened - self.closed

    async def _take(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        with self.changed:
            self.opened += 1
            self.most = max(self.most, self.open)
            self.changed.notify_all()
        try:
            while await reader.read(65536):  # the body, then nothing until the client hangs up
                pass
        except ConnectionError:
            pass
        finally:
            with self.changed:
                self.closed += 1
                self.changed.notify_all()
            writer.close()

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            for writer in list(self._writers):
                writer.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture
def hanging() -> Iterator[HangingHost]:
    host = HangingHost().start()
    yield host
    host.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The notification claim is SQL: both backends (this overrides conftest's SQLite-only fixture)."""
    return database_settings(request, request.param)


def test_a_tenants_hanging_notify_urls_do_not_delay_another_tenants_notification(
    start_receiver: Callable[..., Receiver],
    hook: Callable[..., AppHook],  # noqa: F811 - the fixture imported above
    hanging: HangingHost,
) -> None:
    # A's hosts hang far longer than this test runs; B's app answers at once.
    receiver = start_receiver(
        RECEIVER_NOTIFY_SECRET=SECRET,
        RECEIVER_NOTIFY_TIMEOUT="300",
        RECEIVER_NOTIFY_CONCURRENCY_PER_TENANT="2",
    )
    bobs_app = hook()
    # More of A's tasks than the worker ever had notification slots (8 before this was fair).
    small: dict[str, Any] = {"provider": "sandbox", "prompt": "a hanging fox", "aspect_ratio": "4:1"}
    alices = [str(receiver.submit(**small, notify_url=hanging.url)["id"]) for _ in range(10)]
    for task_id in alices:
        assert receiver.wait(task_id, 60)["status"] == "succeeded"
    with hanging.changed:
        assert hanging.changed.wait_for(lambda: hanging.opened >= 2, 30), "A's notifications never left"

    bobs = receiver.submit(receiver.bob, **small, notify_url=bobs_app.url)
    assert receiver.wait(str(bobs["id"]), 60, client=receiver.bob)["status"] == "succeeded"
    delivered = bobs_app.wait_for(1, seconds=60)
    assert delivered[0].verify()["data"]["id"] == bobs["id"]

    # B was served while every request to A's host was still held open, A holding its share only.
    with hanging.changed:
        assert hanging.closed == 0, "one of A's notifications gave up before B's came"
        assert hanging.opened == hanging.most == 2, (hanging.opened, hanging.most)
    assert metric(receiver, "receiver_notifications_in_flight", "alice") == 2
    assert [e for e in receiver.events(alices[0]) if e["kind"] == "notify"] == []  # none ended yet


def test_the_sandbox_draws_its_pictures_off_the_event_loop(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    """Every picture the sandbox draws is drawn in a thread other than the one running the event loop
    (the one that answers callbacks), seen by sampling every thread's stack while drawings go on."""
    with served_receiver(tmp_path / "data") as receiver:
        drawn_in = sample_drawings(receiver, pool)
    assert drawn_in, "no drawing was ever caught under way"
    loop_thread = receiver.served.thread.ident
    assert loop_thread not in drawn_in, f"drawn on the event loop's thread ({drawn_in[loop_thread]} samples)"


def sample_drawings(receiver: Receiver, pool: ThreadPoolExecutor) -> dict[int, int]:
    """Threads caught drawing (and how often) while the sandbox makes 12 pictures."""
    drawing = render_png.__code__
    seen: dict[int, int] = {}  # thread -> samples caught drawing
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for thread, frame in sys._current_frames().items():
                walked: Any = frame
                while walked is not None:
                    if walked.f_code is drawing:
                        seen[thread] = seen.get(thread, 0) + 1
                        break
                    walked = walked.f_back
            # Often enough to catch a drawing, seldom enough to leave the GIL to the service.
            time.sleep(0.002)

    sampler = pool.submit(sample)
    try:
        # 4 pictures of 768x768 a task: seconds of drawing in all, so the sampler sees it under way.
        tasks = [
            receiver.submit(provider="sandbox", prompt=f"a fox {n}", num_images=4, seed=n) for n in range(3)
        ]
        for task in tasks:
            # A bound, not a timing: the sampler shares the service's process, so a busy machine is slow.
            assert receiver.wait(str(task["id"]), 600)["status"] == "succeeded"
    finally:
        done.set()
        sampler.result()
    return seen
