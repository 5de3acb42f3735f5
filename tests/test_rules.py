"""The store's rules called directly: no HTTP server, no sleeping, time moved by an injected clock.

Each test runs on a real SQLite file (`unit`: fast) and on a throwaway PostgreSQL database (`pg`), the
same rules over both backends."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from receiver.models import ErrorCode
from receiver.models import Outcome
from receiver.models import Status
from receiver.models import Submission
from receiver.models import TaskError
from receiver.store.base import Backend
from receiver.store.base import Timings
from receiver.store.base import Tx
from receiver.store.postgres import PostgresBackend
from receiver.store.records import IdempotencyConflict
from receiver.store.records import NewTask
from receiver.store.rules import MAX_FAILURES
from receiver.store.rules import Store
from receiver.store.sqlite import SqliteBackend
from tests.pg import Cluster

LEASE = 60.0
TIMINGS = Timings(300.0, 3600.0, LEASE)


class FakeClock:
    """Time that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


MakeBackend = Callable[[FakeClock], Backend]


@pytest.fixture(
    params=[pytest.param("sqlite", marks=pytest.mark.unit), pytest.param("postgres", marks=pytest.mark.pg)]
)
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> MakeBackend:
    if request.param == "sqlite":
        return lambda clock: SqliteBackend(tmp_path / "receiver.db", clock)
    cluster: Cluster = request.getfixturevalue("pg_cluster")
    url = cluster.database()
    return lambda clock: PostgresBackend(url, clock)


def run(make_backend: MakeBackend, body: Callable[[Store, FakeClock], Awaitable[None]]) -> None:
    """Open a store on the backend, run `body` against it, close it."""

    async def main() -> None:
        clock = FakeClock()
        store = Store(make_backend(clock), TIMINGS)
        await store.open()
        try:
            await body(store, clock)
        finally:
            await store.close()

    asyncio.run(main())


def new_task(task_id: str, *, tenant: str = "alice", key: str | None = None, body: str = "h1") -> NewTask:
    return NewTask(
        id=task_id,
        tenant=tenant,
        provider="kie",
        model="flux-kontext-pro",
        prompt="a donut",
        request={"images": [], "params": {}, "options": {}},
        provider_state={},
        metadata={},
        notify_url=None,
        idempotency_key=key,
        request_hash=body,
    )


async def jobs_of(store: Store, task_id: str) -> list[tuple[str, int, int]]:
    rows = await store.fetch(
        "SELECT kind, arg, running FROM jobs WHERE task_id=:id ORDER BY kind, arg", {"id": task_id}
    )
    return [(row["kind"], int(row["arg"]), int(row["running"])) for row in rows]


async def status_of(store: Store, task_id: str) -> Status:
    task = await store.task_row(task_id)
    assert task is not None
    return task.status


def succeeded(*urls: str) -> Outcome:
    return Outcome.succeeded("p1", urls)


def test_state_moves_only_forward(make_backend: MakeBackend) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        await store.create_task(new_task("tsk_a"))
        assert await store.apply_outcome("tsk_a", succeeded("https://img.example/0.png"), "callback") == (
            "queued→downloading"
        )
        # The success again, from a poll with another link: recorded; no second image, no second fetch.
        assert await store.apply_outcome("tsk_a", succeeded("https://img.example/other.png"), "poll") == ""
        images = await store.images("tsk_a")
        assert [(image.idx, image.source_url) for image in images] == [(0, "https://img.example/0.png")]
        assert [job for job in await jobs_of(store, "tsk_a") if job[0] == "download"] == [("download", 0, 0)]
        failed = Outcome.failed("p1", TaskError(ErrorCode.GENERATION_FAILED, "gave up"))
        assert await store.apply_outcome("tsk_a", failed, "callback") == "downloading→failed"
        # Once ended, neither news of success nor of failure moves it again.
        assert await store.apply_outcome("tsk_a", succeeded("https://img.example/0.png"), "callback") == ""
        assert await store.apply_outcome("tsk_a", failed, "poll") == ""
        task = await store.task_view("tsk_a")
        assert task is not None and task.status is Status.FAILED
        assert task.error is not None and task.error["code"] == "generation_failed"
        assert await jobs_of(store, "tsk_a") == []
        summaries = [event.summary for event in await store.events("tsk_a")]
        assert sum("duplicate or late" in summary for summary in summaries) == 3

    run(make_backend, body)


def test_a_stored_image_is_kept_once_and_the_last_one_ends_the_task(make_backend: MakeBackend) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        await store.create_task(new_task("tsk_i"))
        await store.apply_outcome("tsk_i", succeeded("https://img.example/0.png"), "callback")
        claimed = await store.claim_due({"download": 4})
        [job] = claimed.jobs
        kept = functools.partial(
            store.record_image, path="tsk_i/0.png", content_type="image/png", size=3, sha256="ab"
        )
        assert await kept(job, width=1, height=1) is True
        assert await kept(job, width=1, height=1) is False  # a second download of it keeps nothing
        task = await store.task_view("tsk_i")
        assert task is not None and task.status is Status.SUCCEEDED and task.completed_at == clock.now
        assert await jobs_of(store, "tsk_i") == []  # an ended task keeps no work (no notify_url)

    run(make_backend, body)


def test_recorded_callbacks_are_applied_in_order_and_duplicates_change_nothing(
    make_backend: MakeBackend,
) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        await store.create_task(new_task("tsk_c"))
        for _ in range(2):
            await store.record_callback("tsk_c", Outcome.pending("p1", "still working"))
        for _ in range(2):
            await store.record_callback("tsk_c", succeeded("https://img.example/0.png"))
        claimed = await store.claim_due({})
        assert claimed.applied == [
            ("tsk_c", "kie", "pending"),
            ("tsk_c", "kie", "pending"),
            ("tsk_c", "kie", "changed"),
            ("tsk_c", "kie", "duplicate"),
        ]
        assert await store.fetch("SELECT id FROM inbox") == []
        assert [job for job in await jobs_of(store, "tsk_c") if job[0] == "download"] == [("download", 0, 0)]
        # The same pending news twice is one event; the change and the duplicate each get theirs.
        kinds = [(event.kind, event.change) for event in await store.events("tsk_c")]
        assert kinds == [
            ("created", "→queued"),
            ("callback", None),
            ("callback", "queued→downloading"),
            ("callback", None),
        ]

    run(make_backend, body)


def test_a_callback_for_a_task_not_there_is_taken_from_the_inbox(make_backend: MakeBackend) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        await store.record_callback("tsk_gone", succeeded("https://img.example/0.png"))
        claimed = await store.claim_due({})
        assert claimed.applied == [] and not claimed.more_news
        assert await store.fetch("SELECT id FROM inbox") == []

    run(make_backend, body)


def test_jobs_are_leased_until_released_or_expired(make_backend: MakeBackend) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        await store.create_task(new_task("tsk_j"))
        slots = {"submit": 4, "deadline": 4}
        [job] = (await store.claim_due(slots)).jobs
        assert (job.kind, job.task_id, job.attempts) == ("submit", "tsk_j", 1)
        assert (await store.claim_due(slots)).jobs == []  # leased: nobody else takes it
        await store.settle_job(job, None, requeue=True)  # pacing said not yet: back in its place, uncounted
        [again] = (await store.claim_due(slots)).jobs
        assert (again.id, again.attempts) == (job.id, 1)
        clock.now += LEASE - 1
        await store.extend_leases([again])  # a heartbeat: the lease now runs to now + LEASE
        clock.now += LEASE - 1
        assert (await store.claim_due(slots)).jobs == []
        clock.now += 2  # the lease ran out: its process is taken for dead
        [taken_over] = (await store.claim_due(slots)).jobs
        assert (taken_over.id, taken_over.attempts) == (job.id, 2)
        await store.retry_job(taken_over, 30.0, "provider_unavailable: 503")
        claimed = await store.claim_due(slots)
        assert claimed.jobs == [] and claimed.next_due == clock.now + 30.0
        clock.now += 30.0
        [retried] = (await store.claim_due(slots)).jobs
        await store.record_submission(retried, Submission(provider_task_id="p1"), provider="kie")
        assert await status_of(store, "tsk_j") is Status.SUBMITTED
        assert await jobs_of(store, "tsk_j") == [("deadline", 0, 0), ("reconcile", 0, 0)]

    run(make_backend, body)


def test_a_callback_that_cannot_be_applied_is_parked_and_the_rest_go_on(make_backend: MakeBackend) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        await store.create_task(new_task("tsk_bad"))
        await store.create_task(new_task("tsk_good"))

        async def bad_row(tx: Tx) -> None:
            await tx.run(
                "INSERT INTO inbox (task_id, received_at, outcome) VALUES (:task, :now, 'not json')",
                {"task": "tsk_bad", "now": tx.now},
            )

        await store.write(bad_row)
        await store.record_callback("tsk_good", succeeded("https://img.example/0.png"))
        turns = []
        for _ in range(MAX_FAILURES):
            claimed = await store.claim_due({})
            turns.append((claimed.applied, claimed.more_news))
        assert turns[0] == ([("tsk_good", "kie", "changed")], True)
        assert turns[1:] == [([], True)] * (MAX_FAILURES - 2) + [([], False)]
        assert await store.parked_counts() == {"callback": 1}
        assert await store.fetch("SELECT id FROM inbox") == []
        parked = [event for event in await store.events("tsk_bad") if event.kind == "parked"]
        assert len(parked) == 1 and f"failed {MAX_FAILURES} times" in parked[0].summary
        assert await status_of(store, "tsk_bad") is Status.QUEUED
        assert await status_of(store, "tsk_good") is Status.DOWNLOADING

    run(make_backend, body)


def test_idempotency_keys_are_per_tenant_and_bound_to_the_body(make_backend: MakeBackend) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        first, created = await store.create_task(new_task("tsk_1", key="k"))
        assert first.id == "tsk_1"
        assert created
        again, created = await store.create_task(new_task("tsk_2", key="k"))
        assert (again.id, created) == ("tsk_1", False)
        with pytest.raises(IdempotencyConflict):
            await store.create_task(new_task("tsk_3", key="k", body="h2"))
        other, created = await store.create_task(new_task("tsk_4", tenant="bob", key="k"))
        assert (other.id, created) == ("tsk_4", True)
        assert await store.task_row("tsk_2") is None and await store.task_row("tsk_3") is None
        assert await store.task_view("tsk_1", tenant="bob") is None  # another tenant's task is not found
        assert [job for job in await jobs_of(store, "tsk_1") if job[0] == "submit"] == [("submit", 0, 0)]

    run(make_backend, body)


def test_a_failed_savepoint_undoes_its_rows_and_its_notes(make_backend: MakeBackend) -> None:
    async def body(store: Store, clock: FakeClock) -> None:
        await store.create_task(new_task("tsk_s"))
        noted: dict[str, Any] = {}

        async def op(tx: Tx) -> None:
            await tx.run("UPDATE tasks SET prompt='kept' WHERE id='tsk_s'")
            tx.changed.add("tsk_s")
            with pytest.raises(RuntimeError):
                async with tx.savepoint():
                    await tx.run("UPDATE tasks SET prompt='undone' WHERE id='tsk_s'")
                    tx.changed.add("tsk_other")
                    tx.jobs_added = True
                    tx.parked.append("submit")
                    raise RuntimeError("this part fails")
            noted.update(changed=set(tx.changed), jobs_added=tx.jobs_added, parked=list(tx.parked))

        await store.write(op)
        assert noted == {"changed": {"tsk_s"}, "jobs_added": False, "parked": []}
        task = await store.task("tsk_s")
        assert task is not None and task.prompt == "kept"

    run(make_backend, body)


@pytest.mark.unit
def test_the_only_worker_frees_the_leases_of_a_dead_one(tmp_path: Path) -> None:
    """With SQLite one process runs jobs: the one that takes the role frees every job still leased."""

    async def main() -> None:
        first = Store(SqliteBackend(tmp_path / "receiver.db"), TIMINGS)
        await first.open()
        await first.create_task(new_task("tsk_w"))
        [job] = (await first.claim_due({"submit": 1})).jobs
        await first.close()  # as if it died holding the lease
        second = Store(SqliteBackend(tmp_path / "receiver.db"), TIMINGS)
        await second.open()
        try:
            assert await jobs_of(second, "tsk_w") == [("deadline", 0, 0), ("submit", 0, 1)]
            await second.claim_worker()
            assert await jobs_of(second, "tsk_w") == [("deadline", 0, 0), ("submit", 0, 0)]
            assert [claimed.id for claimed in (await second.claim_due({"submit": 1})).jobs] == [job.id]
        finally:
            await second.close()

    asyncio.run(main())


@pytest.mark.unit
def test_the_rules_import_no_backend() -> None:
    """The seam: the rules and the protocol import no backend (a backend imports them); no backend
    is a Store, so none can override a rule."""
    import ast

    import receiver.store.base
    import receiver.store.rules

    for module in (receiver.store.rules, receiver.store.base):
        assert module.__file__ is not None
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        imported |= {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        store_modules = {name for name in imported if name and name.startswith("receiver.store.")}
        assert store_modules <= {"receiver.store.base", "receiver.store.records"}, module.__name__
    assert not issubclass(SqliteBackend, Store) and not issubclass(PostgresBackend, Store)
    assert Store.__subclasses__() == []
