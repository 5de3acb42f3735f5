"""Job handlers and the worker loop with time under the test's control.

The backoff policy and the handlers' outcomes (Done/Retry/Fail) are checked directly; then the real worker
runs on a real SQLite file with a clock the test moves, so a retry schedule of minutes is walked through
without waiting for it: each step is seen in the database, the clock is moved past it, the loop is woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Receive
from starlette.types import Scope
from starlette.types import Send

from receiver.config import Settings
from receiver.config import prepare_settings
from receiver.fetcher import InProcess
from receiver.jobs import Backoff
from receiver.jobs import Clock
from receiver.jobs import Done
from receiver.jobs import Entry
from receiver.jobs import Fail
from receiver.jobs import Retry
from receiver.jobs.deadline import Deadline
from receiver.jobs.download import Download
from receiver.jobs.kinds import wire_jobs
from receiver.jobs.notify import Notify
from receiver.media import open_media
from receiver.models import ErrorCode
from receiver.models import Outcome as News
from receiver.notify import Attempt
from receiver.notify import Notifier
from receiver.providers import REGISTRY
from receiver.store import Job
from receiver.store import NewTask
from receiver.store import Store
from receiver.store import make_store
from receiver.store import timed_out
from receiver.tokens import Tokens
from receiver.transport import outside_client
from receiver.transport import provider_client
from receiver.worker import Worker
from tests.fakes.common import png
from tests.fakes.kie import RECORD_INFO
from tests.fakes.kie import KieFake
from tests.harness import Served
from tests.harness import make_env

DELAYS = (60.0, 300.0, 900.0)  # minutes of backoff, walked through without waiting


class FakeClock(Clock):
    """Time that moves only when the test says so."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 1_000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


class Host:
    """Images over real HTTP: /ok/… a PNG, /gone/… a 404, anything else a 503 (a transient failure)."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.served = Served(self).start()
        self.url = self.served.url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = str(scope["path"])
        self.hits.append(path)
        status, body = (
            (200, png()) if path.startswith("/ok/") else (404, b"") if "gone" in path else (503, b"")
        )
        headers = [(b"content-type", b"image/png"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def host() -> Any:
    served = Host()
    yield served
    served.served.stop()


# -- the policy ----------------------------------------------------------------------------------------


def test_backoff_schedule_is_held_at_its_last_step_and_counts_tries() -> None:
    policy = Backoff(delays=DELAYS, tries=len(DELAYS))
    assert [policy.delay(n) for n in (1, 2, 3, 4, 9)] == [60.0, 300.0, 900.0, 900.0, 900.0]
    assert not policy.spent(3) and policy.spent(4)
    assert not Backoff().spent(10_000)  # no `tries`: never spent


def test_backoff_doubles_up_to_its_cap_and_retry_after_wins_when_longer() -> None:
    policy = Backoff(base=60.0, factor=2.0, cap=600.0)
    assert [policy.delay(n) for n in range(1, 7)] == [60.0, 120.0, 240.0, 480.0, 600.0, 600.0]
    assert policy.delay(1, retry_after=3600.0) == 3600.0  # the provider's longer pause, past the cap
    assert policy.delay(3, retry_after=5.0) == 240.0  # a shorter one does not hurry the schedule


def test_backoff_jitter_stays_within_its_bounds() -> None:
    policy = Backoff(delays=(100.0,), jitter=(0.9, 1.1))
    draws = {policy.delay(1) for _ in range(200)}
    assert all(90.0 <= d <= 110.0 for d in draws)
    assert len(draws) > 1  # it does vary


# -- handlers, called directly --------------------------------------------------------------------------


def test_deadline_fails_the_task_with_timed_out(tmp_path: Path) -> None:
    async def scenario(store: Store, settings: Settings, clock: FakeClock) -> None:
        assert await Deadline(store)(Job(1, "deadline", "tsk_x", 0, 1)) == Fail(timed_out())

    with_store(tmp_path, scenario)


def test_notify_judges_each_answer(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, RECEIVER_NOTIFY_SCHEDULE="5,300")
    tokens = Tokens(settings.secret_key, settings.public_url, settings.link_ttl)
    notifier = Notifier(settings, outside_client(allow_private=True, timeout=5), FakeClock())  # never sends
    notify = Notify(settings, make_store(settings), tokens, notifier)
    first, last = Job(1, "notify", "tsk_x", 0, 1), Job(1, "notify", "tsk_x", 0, 3)

    result, outcome = notify.judge(first, Attempt(204, 12, "", None))
    assert result == "delivered"
    assert outcome == Done(Entry("notify", "attempt 1: delivered, HTTP 204 (12 ms)", ""))
    assert notify.judge(first, Attempt(410, 3, "bye", None))[0] == "gone"
    result, outcome = notify.judge(last, Attempt(500, 3, "oops", None))
    assert result == "gave_up" and isinstance(outcome, Done) and outcome.entry is not None
    result, outcome = notify.judge(first, Attempt(503, 3, "later", 3600.0))
    assert result == "retry" and isinstance(outcome, Retry)
    assert outcome.delay == 3600.0  # the app's Retry-After, longer than the schedule's 5 s ± 10 %
    assert outcome.entry == Entry("notify", "attempt 1: HTTP 503 (3 ms); next attempt in 3600 s", "later")
    result, outcome = notify.judge(first, Attempt(None, 3, None, None, "ConnectError: refused"))
    assert isinstance(outcome, Retry) and 4.5 <= outcome.delay <= 5.5


def test_download_outcomes_retry_fail_and_done(tmp_path: Path, host: Host) -> None:
    async def scenario(store: Store, settings: Settings, clock: FakeClock) -> None:
        fetcher = fetcher_for(settings)
        download = Download(settings, store, fetcher, clock)
        outcomes = []
        try:
            for path in ("flaky/0.png", "gone/0.png", "ok/0.png"):
                task_id = await downloading(store, f"{host.url}/{path}")
                claimed = await store.claim_due({"download": 1})
                assert [job.task_id for job in claimed.jobs] == [task_id]
                outcomes.append(await download(claimed.jobs[0]))
        finally:
            await close(fetcher)
        retry, fail, done = outcomes
        assert isinstance(retry, Retry) and retry.delay == DELAYS[0] and not retry.requeue
        assert retry.entry is not None and retry.entry.summary.startswith("image 0 try 1 failed")
        assert isinstance(fail, Fail) and fail.error.code == ErrorCode.DOWNLOAD_FAILED
        assert done == Done(recorded=True)  # the image and the job's end went in the handler's own write

    with_store(tmp_path, scenario)


# -- the worker, on a clock the test moves ---------------------------------------------------------------


def test_download_retry_schedule_is_walked_by_moving_the_clock(tmp_path: Path, host: Host) -> None:
    """Three delays of 60, 300 and 900 s: each retry is due exactly one step later (in the store's own
    time), nothing runs before the clock reaches it, and the fourth failure ends the task."""

    async def scenario(store: Store, settings: Settings, clock: FakeClock) -> None:
        task_id = await downloading(store, f"{host.url}/flaky/0.png")
        async with running_worker(store, settings, clock):
            for attempt, delay in enumerate(DELAYS, start=1):
                due = await until(functools.partial(job_due, settings, task_id, "download", attempt))
                assert due == clock.time() + delay
                assert len(host.hits) == attempt  # nothing ran early: the clock has not moved
                clock.advance(delay)
                store.jobs_changed.set()
            task = await until(lambda: ended(store, task_id))
        assert task.error is not None and task.error["code"] == ErrorCode.DOWNLOAD_FAILED
        assert "after 4 tries" in task.error["message"]
        assert len(host.hits) == 4
        tries = [e.summary for e in await store.events(task_id) if e.kind == "download"]
        assert tries[:3] == [f"image 0 try {n} failed: HTTP 503 from the image host" for n in (1, 2, 3)]

    with_store(tmp_path, scenario)


def test_reconcile_interval_doubles_up_to_its_cap_by_moving_the_clock(tmp_path: Path, kie: KieFake) -> None:
    """A kie task whose callback never comes: asked RECEIVER_RECONCILE_AFTER (300 s) after kie took it,
    then 60, 120, 240, 480 and 600 s (the cap) apart while kie says it is still generating; the status
    endpoint is asked only when the clock has reached each step."""

    async def scenario(store: Store, settings: Settings, clock: FakeClock) -> None:
        task_id = await new_task(store, "kie")
        async with running_worker(store, settings, clock):
            due = await until(functools.partial(job_due, settings, task_id, "reconcile", 0))
            assert due == clock.time() + 300.0
            for attempt, interval in enumerate((60.0, 120.0, 240.0, 480.0, 600.0, 600.0), start=1):
                clock.advance(due - clock.time())
                store.jobs_changed.set()
                due = await until(functools.partial(job_due, settings, task_id, "reconcile", attempt))
                assert due == clock.time() + interval
                assert len(kie.calls(RECORD_INFO)) == attempt  # one question per step, none early
        task = await store.task(task_id)
        assert task is not None and task.status == "submitted"  # pending news changed nothing

    with_store(tmp_path, scenario, RECEIVER_RECONCILE_INTERVAL="60", **kie.receiver_env())


# -- helpers ----------------------------------------------------------------------------------------------


def settings_for(tmp_path: Path, **env: str) -> Settings:
    values = make_env(
        tmp_path / "data",
        "http://127.0.0.1:9",
        RECEIVER_DOWNLOAD_RETRY_DELAYS=",".join(f"{d:g}" for d in DELAYS),
        **env,
    )
    return prepare_settings(values, port=9)


def fetcher_for(settings: Settings) -> InProcess:
    return InProcess(
        provider_client(timeout=5),
        outside_client(allow_private=True, timeout=5),
        open_media(settings.media_url, settings.data_dir, settings.aws),
    )


async def close(fetcher: InProcess) -> None:
    await fetcher.provider_http.aclose()
    await fetcher.outside_http.aclose()


def with_store(
    tmp_path: Path, scenario: Callable[[Store, Settings, FakeClock], Awaitable[None]], **env: str
) -> None:
    """Run `scenario` with a real SQLite store whose transactions read the fake clock."""
    settings = settings_for(tmp_path, **env)
    clock = FakeClock()

    async def run() -> None:
        store = make_store(settings)
        store.backend.clock = clock.time
        await store.open()
        await store.claim_worker()
        try:
            await scenario(store, settings, clock)
        finally:
            await store.close()

    asyncio.run(run())


@contextlib.asynccontextmanager
async def running_worker(store: Store, settings: Settings, clock: FakeClock) -> AsyncIterator[Worker]:
    """The real worker on the test's store and clock, stopped (and its clients closed) after."""
    tokens = Tokens(settings.secret_key, settings.public_url, settings.link_ttl)
    media = open_media(settings.media_url, settings.data_dir, settings.aws)
    async with (
        provider_client(timeout=5) as provider_http,
        outside_client(allow_private=True, timeout=5) as outside_http,
    ):
        jobs = wire_jobs(settings, store, tokens, provider_http, outside_http, media, clock)
        worker = Worker(settings, store, jobs, clock)
        runner = asyncio.create_task(worker.run())
        try:
            yield worker
        finally:
            await worker.stop(grace=5)
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)


async def new_task(store: Store, provider: str, model: str = "flux-kontext-pro") -> str:
    """A queued task for `provider`, as the API records it (with its submit and deadline jobs)."""
    task_id = f"tsk_{secrets.token_hex(12)}"
    await store.create_task(
        NewTask(
            id=task_id,
            tenant="alice",
            provider=provider,
            model=model,
            prompt="a lighthouse at dusk",
            request={"images": [], "image_sizes": [], "params": {}, "options": {}},
            provider_state=REGISTRY[provider].new_state(),
            metadata={},
            notify_url=None,
            idempotency_key=None,
            request_hash=secrets.token_hex(8),
        )
    )
    return task_id


async def downloading(store: Store, url: str) -> str:
    """A task whose provider reported one image at `url`: it is downloading, its download job due (and no
    other job of it left to run)."""
    task_id = await new_task(store, "sandbox")
    await store.write(lambda tx: tx.run("DELETE FROM jobs WHERE task_id=:id", {"id": task_id}))
    await store.apply_outcome(task_id, News.succeeded("remote-1", (url,)), "callback")
    return task_id


def job_due(settings: Settings, task_id: str, kind: str, attempts: int) -> float | None:
    """When the task's `kind` job is due, once it has run `attempts` times and is waiting (else None)."""
    conn = sqlite3.connect(settings.db_path, timeout=30)
    try:
        row = conn.execute(
            "SELECT due_at FROM jobs WHERE task_id=? AND kind=? AND attempts=? AND running=0",
            (task_id, kind, attempts),
        ).fetchone()
    finally:
        conn.close()
    return None if row is None else float(row[0])


async def ended(store: Store, task_id: str) -> Any:
    task = await store.task(task_id)
    return task if task is not None and task.status.terminal else None


async def until(probe: Callable[[], Any], seconds: float = 60) -> Any:
    """Bounded polling of state (never a fixed sleep the test relies on): the first non-None answer."""
    deadline = time.monotonic() + seconds
    while True:
        answer = probe()
        if isinstance(answer, Awaitable):
            answer = await answer
        if answer is not None:
            return answer
        assert time.monotonic() < deadline, "the state did not come about"
        await asyncio.sleep(0.02)
