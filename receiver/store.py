"""Every SQL statement: schema, migrations, and one transaction per state change.

Writes funnel through one writer thread that owns the write connection. Operations that arrive while a
batch is committing form the next batch: one `BEGIN IMMEDIATE … COMMIT` (one fsync) for all of them,
each inside its own savepoint so one failing operation does not undo its neighbours (group commit).
Reads run beside it on an aiosqlite connection; WAL lets them see every committed batch at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from pathlib import Path
from typing import Any
from typing import TypeVar

import aiosqlite

from receiver import metrics
from receiver.logs import event
from receiver.models import ErrorCode
from receiver.models import Outcome
from receiver.models import Status
from receiver.models import Submission
from receiver.models import TaskError
from receiver.models import fallback_reason

log = logging.getLogger("receiver.store")
T = TypeVar("T")
URGENT_LEAD = 3600.0  # jobs are claimed oldest-due first: an urgent download is due an hour "ago"

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE tasks (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        provider TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt TEXT NOT NULL,
        request TEXT NOT NULL,
        provider_state TEXT NOT NULL DEFAULT '{}',
        status TEXT NOT NULL,
        provider_task_id TEXT,
        error TEXT,
        metadata TEXT NOT NULL DEFAULT '{}',
        notify_url TEXT,
        idempotency_key TEXT,
        request_hash TEXT,
        image_count INTEGER,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        submitted_at REAL,
        completed_at REAL,
        UNIQUE (tenant, idempotency_key)
    );
    CREATE INDEX tasks_by_tenant ON tasks (tenant, seq DESC);
    CREATE INDEX tasks_by_status ON tasks (tenant, status, seq DESC);
    CREATE INDEX tasks_by_provider ON tasks (tenant, provider, seq DESC);
    CREATE TABLE images (
        task_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        source_url TEXT NOT NULL,
        path TEXT,
        content_type TEXT,
        size INTEGER,
        sha256 TEXT,
        width INTEGER,
        height INTEGER,
        stored_at REAL,
        PRIMARY KEY (task_id, idx)
    ) WITHOUT ROWID;
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        task_id TEXT NOT NULL,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        verified INTEGER NOT NULL,
        summary TEXT NOT NULL,
        change TEXT
    );
    CREATE INDEX events_by_task ON events (task_id, id);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        task_id TEXT NOT NULL,
        arg INTEGER NOT NULL DEFAULT 0,
        due_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        running INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        UNIQUE (kind, task_id, arg)
    );
    CREATE INDEX jobs_by_due ON jobs (running, due_at);
    """,
    # What an event brought back beyond its summary, e.g. the first 2 KB of an app's notify answer.
    "ALTER TABLE events ADD COLUMN detail TEXT",
    # Pacing counts the tasks each provider has in flight (status 'submitted').
    "CREATE INDEX tasks_in_flight ON tasks (status, provider, model)",
    # Ending a task deletes its jobs, and claims look for one kind's due jobs: both must not scan a
    # jobs table that holds thousands of pending downloads during a burst.
    """
    CREATE INDEX jobs_by_task ON jobs (task_id);
    CREATE INDEX jobs_by_kind_due ON jobs (kind, running, due_at)
    """,
    # Verified callbacks, kept before they are answered and applied right after (see record_callback).
    """
    CREATE TABLE inbox (
        id INTEGER PRIMARY KEY,
        task_id TEXT NOT NULL,
        received_at REAL NOT NULL,
        outcome TEXT NOT NULL,
        urgent INTEGER NOT NULL DEFAULT 0
    )
    """,
    # Fallback: each provider the task left, with the error that made it leave (JSON list).
    "ALTER TABLE tasks ADD COLUMN attempts TEXT NOT NULL DEFAULT '[]'",
    # Refused callbacks in a row are one event: how many came (NULL for every other event).
    "ALTER TABLE events ADD COLUMN repeats INTEGER",
)


@dataclass(frozen=True)
class Claimed:
    jobs: list[Job]
    next_due: float | None
    in_flight: dict[tuple[str, str], int]
    applied: list[tuple[str, str, str]]  # (task, provider, changed|duplicate|pending|ignored) per inbox row
    more_news: bool  # the inbox still holds callbacks to apply


class IdempotencyConflict(Exception):
    """The same Idempotency-Key came again with another body."""


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    task_id: str
    arg: int
    attempts: int


@dataclass(frozen=True)
class Ended:
    """A task that reached succeeded or failed, for its one log line."""

    task_id: str
    provider: str
    status: Status
    error: TaskError | None
    seconds: float  # from creation to the end

    def log(self) -> None:
        error = self.error
        event(
            log,
            f"task {self.status}",
            task_id=self.task_id,
            provider=self.provider,
            error=str(error.code) if error else None,
            provider_code=error.provider_code if error else None,
            seconds=round(self.seconds, 3),
        )


@dataclass
class Tx:
    """An open write transaction, handed to one operation; it notes which tasks changed."""

    conn: sqlite3.Connection
    now: float
    changed: set[str] = field(default_factory=set)
    jobs_added: bool = False
    ended: list[Ended] = field(default_factory=list)  # tasks this transaction ended, logged once committed
    hops: list[tuple[str, str, str]] = field(default_factory=list)  # fallback moves: (from, to, reason)

    def one(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.conn.execute(sql, params).fetchone()
        return row

    def run(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> int:
        return self.conn.execute(sql, params).rowcount


@dataclass(frozen=True)
class NewTask:
    id: str
    tenant: str
    provider: str
    model: str
    prompt: str
    request: Mapping[str, Any]
    provider_state: Mapping[str, str]
    metadata: Mapping[str, Any]
    notify_url: str | None
    idempotency_key: str | None
    request_hash: str


def _connect_writer(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL: a commit survives a killed process (the OS holds the WAL); FULL adds power-loss safety.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations this database has not seen; returns the schema version."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in script.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={number}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return len(MIGRATIONS)


class Store:
    def __init__(self, path: Path, *, reconcile_after: float, task_deadline: float) -> None:
        self.path = path
        self.reconcile_after = reconcile_after
        self.task_deadline = task_deadline
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="receiver-writer")
        self._writer: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._point: sqlite3.Connection | None = None
        self._pending: list[tuple[Callable[[Tx], Any], asyncio.Future[Any]]] = []
        # Verified callbacks waiting for the next commit: one INSERT for all of them (group commit).
        self._inbox: list[tuple[tuple[str, str, int], asyncio.Future[None]]] = []
        self._wake_writer = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        self._task_waiters: dict[str, set[asyncio.Event]] = {}
        self.jobs_changed = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._writer = await loop.run_in_executor(self._executor, _connect_writer, self.path)
        await loop.run_in_executor(self._executor, migrate, self._writer)
        # A single process owns the database: jobs marked running by a process that died are free again.
        await loop.run_in_executor(self._executor, self._writer.execute, "UPDATE jobs SET running=0")
        self._point = sqlite3.connect(self.path, check_same_thread=False)
        self._point.row_factory = sqlite3.Row
        self._point.execute("PRAGMA query_only=1")
        self._reader = await aiosqlite.connect(self.path)
        self._reader.row_factory = aiosqlite.Row
        await self._reader.execute("PRAGMA busy_timeout=5000")
        self._writer_task = asyncio.create_task(self._write_loop(), name="receiver-store-writer")

    async def close(self) -> None:
        if self._writer_task is not None:
            while self._pending or self._inbox:  # noqa: ASYNC110 - a short drain at shutdown
                await asyncio.sleep(0.01)
            self._writer_task.cancel()
            try:
                await self._writer_task
            except asyncio.CancelledError:
                pass
        if self._reader is not None:
            await self._reader.close()
        if self._point is not None:
            self._point.close()
        if self._writer is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._writer.close)
        self._executor.shutdown(wait=True)

    async def writable(self) -> bool:
        try:
            await self.write(lambda tx: tx.run("CREATE TEMP TABLE IF NOT EXISTS probe (x)"))
        except sqlite3.Error:
            return False
        return True

    # -- the writer ------------------------------------------------------------------------------

    async def write(self, op: Callable[[Tx], T]) -> T:
        """Run `op` inside a write transaction (shared with whatever else is waiting) and commit it."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        self._wake_writer.set()
        return await future

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            batch, self._pending = self._pending, []
            inbox, self._inbox = self._inbox, []
            if not batch and not inbox:
                continue
            try:
                results, changed, jobs_added = await loop.run_in_executor(
                    self._executor, self._commit_batch, [op for op, _ in batch], [row for row, _ in inbox]
                )
            except Exception as exc:  # the commit itself failed: nothing in the batch happened
                for _, future in [*batch, *inbox]:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for _, done in inbox:
                if not done.done():
                    done.set_result(None)
            for (_, future), (ok, value) in zip(batch, results, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
            self._announce(changed, jobs_added)

    def _commit_batch(
        self, ops: list[Callable[[Tx], Any]], inbox: list[tuple[str, str, int]]
    ) -> tuple[list[tuple[bool, Any]], set[str], bool]:
        conn = self._writer
        assert conn is not None
        tx = Tx(conn=conn, now=time.time())
        results: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            if inbox:
                conn.executemany(
                    "INSERT INTO inbox (task_id, received_at, outcome, urgent) VALUES (?,?,?,?)",
                    [(task_id, tx.now, outcome, urgent) for task_id, outcome, urgent in inbox],
                )
                tx.jobs_added = True
            for op in ops:
                conn.execute("SAVEPOINT op")
                before_changed, before_jobs = set(tx.changed), tx.jobs_added
                before_ended, before_hops = len(tx.ended), len(tx.hops)
                try:
                    value = op(tx)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    tx.changed, tx.jobs_added = before_changed, before_jobs
                    del tx.ended[before_ended:]
                    del tx.hops[before_hops:]
                    results.append((False, exc))
                else:
                    conn.execute("RELEASE op")
                    results.append((True, value))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        for ended in tx.ended:  # committed: now it is true
            ended.log()
        for origin, target, reason in tx.hops:
            metrics.FALLBACKS.labels(origin, target, reason).inc()
        return results, tx.changed, tx.jobs_added

    def _announce(self, changed: Iterable[str], jobs_added: bool) -> None:
        for task_id in changed:
            for waiter in self._task_waiters.get(task_id, ()):
                waiter.set()
        if jobs_added:
            self.jobs_changed.set()

    async def wait_for_change(self, task_id: str, timeout: float) -> None:
        """Return when the task changes or `timeout` passes, whichever is first."""
        event = asyncio.Event()
        self._task_waiters.setdefault(task_id, set()).add(event)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            waiters = self._task_waiters.get(task_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._task_waiters[task_id]

    # -- reads -----------------------------------------------------------------------------------

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        assert self._reader is not None
        return list(await self._reader.execute_fetchall(sql, params))  # one hand-off, not three

    async def task(self, task_id: str, tenant: str | None = None) -> sqlite3.Row | None:
        if tenant is None:
            rows = await self._fetch("SELECT * FROM tasks WHERE id=?", (task_id,))
        else:
            rows = await self._fetch("SELECT * FROM tasks WHERE id=? AND tenant=?", (task_id, tenant))
        return rows[0] if rows else None

    async def images(self, task_id: str) -> list[sqlite3.Row]:
        return await self._fetch("SELECT * FROM images WHERE task_id=? ORDER BY idx", (task_id,))

    async def images_of(self, task_ids: Sequence[str]) -> dict[str, list[sqlite3.Row]]:
        found: dict[str, list[sqlite3.Row]] = {task_id: [] for task_id in task_ids}
        if task_ids:
            marks = ",".join("?" * len(task_ids))
            for row in await self._fetch(
                f"SELECT * FROM images WHERE task_id IN ({marks}) ORDER BY task_id, idx",  # noqa: S608
                list(task_ids),
            ):
                found[row["task_id"]].append(row)
        return found

    async def download_target(self, task_id: str, index: int) -> sqlite3.Row | None:
        """An image row with its task's status, in one read (the download job's first question)."""
        rows = await self._fetch(
            "SELECT i.*, t.status FROM images i JOIN tasks t ON t.id=i.task_id WHERE i.task_id=? AND i.idx=?",
            (task_id, index),
        )
        return rows[0] if rows else None

    async def image(self, task_id: str, index: int) -> sqlite3.Row | None:
        rows = await self._fetch("SELECT * FROM images WHERE task_id=? AND idx=?", (task_id, index))
        return rows[0] if rows else None

    async def tasks(
        self, tenant: str, *, status: str | None, provider: str | None, limit: int, before_seq: int | None
    ) -> list[sqlite3.Row]:
        clauses, params = ["tenant=?"], [tenant]
        if status:
            clauses.append("status=?")
            params.append(status)
        if provider:
            clauses.append("provider=?")
            params.append(provider)
        if before_seq is not None:
            clauses.append("seq<?")
            params.append(str(before_seq))
        sql = f"SELECT * FROM tasks WHERE {' AND '.join(clauses)} ORDER BY seq DESC LIMIT ?"  # noqa: S608
        return await self._fetch(sql, [*params, limit])

    async def events(self, task_id: str, *, after: int = 0, limit: int = 1000) -> list[sqlite3.Row]:
        """A task's events in order, from the one after event id `after`, at most `limit`."""
        return await self._fetch(
            "SELECT * FROM events WHERE task_id=? AND id>? ORDER BY id LIMIT ?", (task_id, after, limit)
        )

    async def task_counts(self) -> dict[tuple[str, str], int]:
        rows = await self._fetch(
            "SELECT provider, status, COUNT(*) AS n FROM tasks GROUP BY provider, status"
        )
        return {(row["provider"], row["status"]): row["n"] for row in rows}

    async def jobs_due(self) -> dict[str, tuple[int, float]]:
        """Per kind: how many jobs are due now, and when the oldest of them fell due."""
        rows = await self._fetch(
            "SELECT kind, COUNT(*) AS n, MIN(due_at) AS oldest FROM jobs WHERE due_at<=? GROUP BY kind",
            (time.time(),),
        )
        return {row["kind"]: (row["n"], row["oldest"]) for row in rows}

    # -- writes: tasks ---------------------------------------------------------------------------

    async def create_task(self, new: NewTask) -> tuple[sqlite3.Row, bool]:
        """Insert a queued task with its submit and deadline jobs; an idempotent repeat returns the first."""

        def op(tx: Tx) -> tuple[sqlite3.Row, bool]:
            if new.idempotency_key is not None:
                existing = tx.one(
                    "SELECT * FROM tasks WHERE tenant=? AND idempotency_key=?",
                    (new.tenant, new.idempotency_key),
                )
                if existing is not None:
                    if existing["request_hash"] != new.request_hash:
                        raise IdempotencyConflict(new.idempotency_key)
                    return existing, False
            tx.run(
                "INSERT INTO tasks (id, tenant, provider, model, prompt, request, provider_state, status,"
                " metadata, notify_url, idempotency_key, request_hash, created_at, updated_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    new.id,
                    new.tenant,
                    new.provider,
                    new.model,
                    new.prompt,
                    _dumps(new.request),
                    _dumps(new.provider_state),
                    Status.QUEUED,
                    _dumps(new.metadata),
                    new.notify_url,
                    new.idempotency_key,
                    new.request_hash,
                    tx.now,
                    tx.now,
                ),
            )
            _add_job(tx, "submit", new.id, 0, tx.now)
            _add_job(tx, "deadline", new.id, 0, tx.now + self.task_deadline)
            _event(tx, new.id, "created", True, f"queued for {new.provider} ({new.model})", "→queued")
            row = tx.one("SELECT * FROM tasks WHERE id=?", (new.id,))
            assert row is not None
            return row, True

        return await self.write(op)

    async def record_submission(
        self, job: Job, submission: Submission, *, urgent: bool = False, provider: str = ""
    ) -> None:
        """The provider accepted the task: keep its id, start the reconcile clock, apply a sync result."""

        def op(tx: Tx) -> None:
            task = _task(tx, job.task_id)
            if provider and task["provider"] != provider:
                # The task moved to a fallback while this submit was in flight (a failure callback came
                # first): the late answer is recorded; the new provider has its own submit job.
                _delete_job(tx, job.id)
                note = f"{provider}'s submit answer came after the task moved to {task['provider']}: ignored"
                _event(tx, job.task_id, "submit", True, note, None)
                return
            state = {**json.loads(task["provider_state"]), **submission.state}
            tx.run(
                "UPDATE tasks SET provider_task_id=COALESCE(provider_task_id, ?), provider_state=?,"
                " submitted_at=?, updated_at=? WHERE id=?",
                (submission.provider_task_id, _dumps(state), tx.now, tx.now, job.task_id),
            )
            _delete_job(tx, job.id)
            change = _move(tx, task, Status.SUBMITTED)
            _event(
                tx,
                job.task_id,
                "submit",
                True,
                submission.note or f"accepted by the provider as {submission.provider_task_id or '(no id)'}",
                change,
            )
            if submission.outcome is not None:
                _apply(
                    tx, job.task_id, replace(submission.outcome, provider=provider), "submit", True, urgent
                )
            elif _task(tx, job.task_id)["status"] == Status.SUBMITTED:
                _add_job(tx, "reconcile", job.task_id, 0, tx.now + self.reconcile_after)

        await self.write(op)

    async def apply_outcome(
        self, task_id: str, outcome: Outcome, kind: str, *, verified: bool = True, urgent: bool = False
    ) -> str:
        """The one path for news about a task, however it came (callback, poll, submit answer).

        `urgent` puts its downloads ahead of the queue (for providers whose links die within minutes)."""
        return await self.write(lambda tx: _apply(tx, task_id, outcome, kind, verified, urgent))

    def task_row(self, task_id: str, tenant: str | None = None) -> sqlite3.Row | None:
        """A task by primary key, read on the event loop itself: a point read takes microseconds,
        less than handing it to a thread and back (the callback and lookup paths use it)."""
        assert self._point is not None
        row: sqlite3.Row | None = self._point.execute("SELECT * FROM tasks WHERE id=?", (task_id,)).fetchone()
        if row is not None and tenant is not None and row["tenant"] != tenant:
            return None
        return row

    def image_rows(self, task_id: str) -> list[sqlite3.Row]:
        """A task's images by primary key, read on the event loop like task_row."""
        assert self._point is not None
        return list(self._point.execute("SELECT * FROM images WHERE task_id=? ORDER BY idx", (task_id,)))

    async def record_callback(self, task_id: str, outcome: Outcome, *, urgent: bool = False) -> None:
        """Keep a verified callback durably; the worker applies it right after.

        This is all a callback waits for before its answer: one row, inserted with every other callback
        of the moment in one statement and one commit. Applying it (the state change, image rows,
        download jobs, the event) is the worker's next step, so a kill -9 after the answer loses nothing
        and the answer stays fast."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox.append(((task_id, outcome.to_json(), int(urgent)), done))
        self._wake_writer.set()
        await done

    async def fail_task(
        self, task_id: str, error: TaskError, kind: str, job_id: int | None = None, provider: str = ""
    ) -> str:
        """End a task with `error` (or move it to its next fallback, by the same rule as any failure).
        `provider`, when given, is the provider the failure is about: stale once the task has left it."""

        def op(tx: Tx) -> str:
            if job_id is not None:
                _delete_job(tx, job_id)
            outcome = Outcome.failed(None, error, error.message)
            return _apply(tx, task_id, replace(outcome, provider=provider), kind, True)

        return await self.write(op)

    async def add_event(self, task_id: str, kind: str, verified: bool, summary: str) -> None:
        await self.write(lambda tx: _event(tx, task_id, kind, verified, summary, None))

    async def add_refusal(self, task_id: str, kind: str, verified: bool, summary: str) -> None:
        """A refused callback. Refusals in a row are one event that counts them (its time and summary
        the latest), so a flood of bad callbacks cannot grow a task's events without bound."""

        def op(tx: Tx) -> None:
            last = tx.one(
                "SELECT id, repeats FROM events WHERE task_id=? ORDER BY id DESC LIMIT 1", (task_id,)
            )
            if last is not None and last["repeats"] is not None:
                tx.run(
                    "UPDATE events SET repeats=repeats+1, at=?, kind=?, verified=?, summary=? WHERE id=?",
                    (tx.now, kind, int(verified), summary[:500], last["id"]),
                )
                tx.changed.add(task_id)
                return
            _event(tx, task_id, kind, verified, summary, None)
            tx.run("UPDATE events SET repeats=1 WHERE id=last_insert_rowid()")

        await self.write(op)

    async def record_notify_attempt(
        self, job: Job, summary: str, detail: str | None, retry_in: float | None
    ) -> None:
        """One delivery attempt and what follows it, together: a retry in `retry_in` s, or (None) no more."""

        def op(tx: Tx) -> None:
            _event(tx, job.task_id, "notify", True, summary, None, detail)
            if retry_in is None:
                _delete_job(tx, job.id)
            else:
                tx.run(
                    "UPDATE jobs SET running=0, due_at=?, last_error=? WHERE id=?",
                    (tx.now + retry_in, summary[:500], job.id),
                )
                tx.jobs_added = True

        await self.write(op)

    async def record_image(
        self,
        job: Job,
        *,
        path: str,
        content_type: str,
        size: int,
        sha256: str,
        width: int | None,
        height: int | None,
    ) -> bool:
        """Keep a stored image; the last one in makes the task succeed. False if it was already stored."""

        def op(tx: Tx) -> bool:
            _delete_job(tx, job.id)
            stored = tx.run(
                "UPDATE images SET path=?, content_type=?, size=?, sha256=?, width=?, height=?, stored_at=?"
                " WHERE task_id=? AND idx=? AND path IS NULL",
                (path, content_type, size, sha256, width, height, tx.now, job.task_id, job.arg),
            )
            if not stored:
                return False
            _event(tx, job.task_id, "download", True, f"image {job.arg} stored ({size} bytes)", None)
            missing = tx.one(
                "SELECT COUNT(*) AS n FROM images WHERE task_id=? AND path IS NULL", (job.task_id,)
            )
            if missing is not None and missing["n"] == 0:
                task = _task(tx, job.task_id)
                change = _finish(tx, task, Status.SUCCEEDED, None)
                if change:
                    _event(tx, job.task_id, "status", True, "every image is stored", change)
            tx.changed.add(job.task_id)
            return True

        return await self.write(op)

    # -- writes: jobs ----------------------------------------------------------------------------

    async def claim_due(
        self,
        slots: Mapping[str, int],
        skip_submits_of: Iterable[str] = (),
        count_for: Sequence[str] = (),
        inbox_batch: int = 256,
    ) -> Claimed:
        """One turn of the worker in one operation: mark due jobs running (up to `slots[kind]`, oldest
        first, leaving alone the submit jobs of providers that pacing holds back), and tell when the
        next job falls due and (if asked) how many tasks each provider has in flight."""
        skip = sorted(skip_submits_of)
        held = ""
        if skip:
            held = (
                " AND NOT (kind='submit' AND EXISTS (SELECT 1 FROM tasks t WHERE t.id=jobs.task_id"  # noqa: S608
                f" AND t.provider IN ({','.join('?' * len(skip))})))"
            )
        claim = (
            "UPDATE jobs SET running=1, attempts=attempts+1 WHERE id IN ("  # noqa: S608 - placeholders only
            f" SELECT id FROM jobs WHERE running=0 AND kind=? AND due_at<=?{held}"
            " ORDER BY due_at, id LIMIT ?) RETURNING id, kind, task_id, arg, attempts"
        )
        next_due = f"SELECT MIN(due_at) AS due FROM jobs WHERE running=0{held}"  # noqa: S608

        def op(tx: Tx) -> Claimed:
            applied, more_news = _apply_inbox(tx, inbox_batch)
            jobs: list[Job] = []
            for kind, free in slots.items():
                if free > 0:
                    rows = tx.conn.execute(claim, (kind, tx.now, *skip, free)).fetchall()
                    jobs += [Job(r["id"], r["kind"], r["task_id"], r["arg"], r["attempts"]) for r in rows]
            due = tx.conn.execute(next_due, skip).fetchone()["due"]
            in_flight = _in_flight(tx, count_for) if count_for else {}
            return Claimed(jobs, None if due is None else float(due), in_flight, applied, more_news)

        return await self.write(op)

    async def unclaim(self, job: Job) -> None:
        """Put a claimed job back untouched (pacing said not yet): its place in the queue is kept."""

        def op(tx: Tx) -> None:
            tx.run("UPDATE jobs SET running=0, attempts=attempts-1 WHERE id=?", (job.id,))

        await self.write(op)

    async def in_flight(self, providers: Sequence[str]) -> dict[tuple[str, str], int]:
        """Tasks accepted by their provider and not finished, by (provider, model).

        Run on the writer, in order with the commits that accept tasks, so a pacing decision never
        misses a task that was accepted just before it."""
        return await self.write(lambda tx: _in_flight(tx, providers))

    async def retry_job(self, job: Job, delay: float, error: str) -> None:
        def op(tx: Tx) -> None:
            tx.run(
                "UPDATE jobs SET running=0, due_at=?, last_error=? WHERE id=?",
                (tx.now + delay, error, job.id),
            )
            tx.jobs_added = True

        await self.write(op)

    async def finish_job(self, job: Job) -> None:
        await self.write(lambda tx: _delete_job(tx, job.id))


# -- the rules of a state change, run inside the writer's transaction ---------------------------------


def _apply_inbox(tx: Tx, limit: int) -> tuple[list[tuple[str, str, str]], bool]:
    """Apply the oldest recorded callbacks, in the order they came; returns what each changed."""
    rows = tx.conn.execute("SELECT * FROM inbox ORDER BY id LIMIT ?", (limit + 1,)).fetchall()
    applied: list[tuple[str, str, str]] = []
    for row in rows[:limit]:
        task = tx.one("SELECT * FROM tasks WHERE id=?", (row["task_id"],))
        if task is not None:
            outcome = Outcome.from_json(row["outcome"])
            known = task["provider_task_id"]
            if outcome.provider_task_id and known and outcome.provider_task_id != known:
                # Checked when it came too; this catches an id the submit answer set in between.
                note = f"names provider task {outcome.provider_task_id}, not {known}: ignored"
                _event(tx, task["id"], "callback", True, note, None)
                applied.append((task["id"], task["provider"], "ignored"))
            else:
                change = _apply(tx, task["id"], outcome, "callback", True, bool(row["urgent"]), task)
                result = "changed" if change else ("pending" if outcome.state == "pending" else "duplicate")
                applied.append((task["id"], task["provider"], result))
        tx.run("DELETE FROM inbox WHERE id=?", (row["id"],))
    return applied, len(rows) > limit


def _in_flight(tx: Tx, providers: Sequence[str]) -> dict[tuple[str, str], int]:
    marks = ",".join("?" * len(providers))
    rows = tx.conn.execute(
        "SELECT provider, model, COUNT(*) AS n FROM tasks"  # noqa: S608 - placeholders only
        f" WHERE status='submitted' AND provider IN ({marks}) GROUP BY provider, model",
        list(providers),
    ).fetchall()
    return {(row["provider"], row["model"]): row["n"] for row in rows}


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _task(tx: Tx, task_id: str) -> sqlite3.Row:
    row = tx.one("SELECT * FROM tasks WHERE id=?", (task_id,))
    if row is None:
        raise LookupError(task_id)
    return row


def _add_job(tx: Tx, kind: str, task_id: str, arg: int, due_at: float) -> None:
    tx.run(
        "INSERT INTO jobs (kind, task_id, arg, due_at) VALUES (?,?,?,?)"
        " ON CONFLICT (kind, task_id, arg) DO NOTHING",
        (kind, task_id, arg, due_at),
    )
    tx.jobs_added = True


def _delete_job(tx: Tx, job_id: int) -> None:
    tx.run("DELETE FROM jobs WHERE id=?", (job_id,))


def _event(
    tx: Tx,
    task_id: str,
    kind: str,
    verified: bool,
    summary: str,
    change: str | None,
    detail: str | None = None,
) -> None:
    tx.run(
        "INSERT INTO events (task_id, at, kind, verified, summary, change, detail) VALUES (?,?,?,?,?,?,?)",
        (task_id, tx.now, kind, int(verified), summary[:500], change, detail),
    )
    tx.changed.add(task_id)


def _move(tx: Tx, task: sqlite3.Row, new: Status) -> str | None:
    """Move a task forward; returns 'old→new', or None when that would not be forward."""
    old = Status(task["status"])
    if not old.may_become(new):
        return None
    tx.run("UPDATE tasks SET status=?, updated_at=? WHERE id=?", (new, tx.now, task["id"]))
    tx.changed.add(task["id"])
    return f"{old}→{new}"


def _fallback(tx: Tx, task: sqlite3.Row, error: TaskError) -> str | None:
    """The fallback rule, once for every way a failure arrives: a failure that is not the request's
    fault moves the task to the next provider of its chain with the same request, instead of ending it.
    The provider left is recorded in `attempts` with its error; the task is queued again (a new submit,
    the new provider's own state and default model), its deadline kept; no notification is due yet."""
    reason = fallback_reason(error)
    if reason is None or Status(task["status"]) not in (Status.QUEUED, Status.SUBMITTED):
        return None  # a task with results on the way (or ended) stays where it is
    request = json.loads(task["request"])
    attempts = json.loads(task["attempts"])
    remaining = (request.get("fallback") or [])[len(attempts) :]
    if not remaining:
        return None
    origin, target = task["provider"], remaining[0]
    attempts.append(
        {
            "provider": origin,
            "model": task["model"],
            "provider_task_id": task["provider_task_id"],
            "error": error.as_json(),
            "at": tx.now,
        }
    )
    chain = request.get("chain") or {}
    tx.run(
        "UPDATE tasks SET provider=?, model=?, provider_state=?, provider_task_id=NULL, submitted_at=NULL,"
        " image_count=NULL, status=?, attempts=?, updated_at=? WHERE id=?",
        (
            target,
            chain.get(target, {}).get("model") or task["model"],
            _dumps(chain.get(target, {}).get("state") or {}),
            Status.QUEUED,
            _dumps(attempts),
            tx.now,
            task["id"],
        ),
    )
    tx.run("DELETE FROM jobs WHERE task_id=? AND kind <> 'deadline' AND +running=0", (task["id"],))
    # Its own submit job, numbered by the hop: a submit of the provider left may still be running, and
    # the worker drops any submit job whose number is not the task's current hop.
    _add_job(tx, "submit", task["id"], len(attempts), tx.now)
    tx.changed.add(task["id"])
    tx.hops.append((origin, target, reason))
    summary = f"moved from {origin} to {target} ({reason}): {error.code}: {error.message}"
    _event(tx, task["id"], "fallback", True, summary, f"{task['status']}→{Status.QUEUED}")
    return f"{origin}→{target}"


def _finish(tx: Tx, task: sqlite3.Row, status: Status, error: TaskError | None) -> str | None:
    if status is Status.FAILED and error is not None:
        moved = _fallback(tx, task, error)
        if moved is not None:
            return moved
    change = _move(tx, task, status)
    if change is None:
        return None
    tx.run(
        "UPDATE tasks SET completed_at=?, error=? WHERE id=?",
        (tx.now, _dumps(error.as_json()) if error else None, task["id"]),
    )
    # An ended task needs no more work; only its notification (if any) is still to come.
    # `+running` keeps SQLite on the task_id index instead of scanning every idle job.
    tx.run("DELETE FROM jobs WHERE task_id=? AND kind <> 'notify' AND +running=0", (task["id"],))
    if task["notify_url"]:
        _add_job(tx, "notify", task["id"], 0, tx.now)
    # Every end of every task passes here (download, callback, poll, submit, deadline): its one log line.
    tx.ended.append(Ended(task["id"], task["provider"], status, error, tx.now - task["created_at"]))
    return change


def _apply(
    tx: Tx,
    task_id: str,
    outcome: Outcome,
    kind: str,
    verified: bool,
    urgent: bool = False,
    task: sqlite3.Row | None = None,
) -> str:
    """Record the news and make the forward-only change it calls for; returns what changed."""
    task = task if task is not None else _task(tx, task_id)
    if outcome.provider and outcome.provider != task["provider"]:
        # News from a provider the task has left (fallback): recorded, changes nothing.
        summary = (
            f"late news from {outcome.provider} (the task moved to {task['provider']}): {outcome.detail}"
        )
        _event(tx, task_id, kind, verified, summary, None)
        return ""
    if outcome.provider_task_id and not task["provider_task_id"]:
        tx.run("UPDATE tasks SET provider_task_id=? WHERE id=?", (outcome.provider_task_id, task_id))
    change: str | None = None
    if outcome.state == "succeeded":
        change = _move(tx, task, Status.DOWNLOADING)
        if change is not None:
            tx.run("UPDATE tasks SET image_count=? WHERE id=?", (len(outcome.image_urls), task_id))
            tx.conn.executemany(
                "INSERT INTO images (task_id, idx, source_url) VALUES (?,?,?) ON CONFLICT DO NOTHING",
                [(task_id, index, url) for index, url in enumerate(outcome.image_urls)],
            )
            due = tx.now - URGENT_LEAD if urgent else tx.now
            for index in range(len(outcome.image_urls)):
                _add_job(tx, "download", task_id, index, due)
            tx.run("DELETE FROM jobs WHERE task_id=? AND kind='reconcile' AND +running=0", (task_id,))
    elif outcome.state == "failed":
        assert outcome.error is not None
        change = _finish(tx, task, Status.FAILED, outcome.error)
    elif outcome.ask_now and task["status"] == Status.SUBMITTED:
        # The provider says the result waits at its status endpoint: reconcile fetches it at once.
        tx.run(
            "UPDATE jobs SET due_at=? WHERE task_id=? AND kind='reconcile' AND +running=0",
            (tx.now, task_id),
        )
        tx.jobs_added = True
    summary = outcome.detail or outcome.state
    if outcome.state != "pending" and change is None:
        summary = f"{summary} (duplicate or late: the task is already {task['status']})"
    _event(tx, task_id, kind, verified, summary, change)
    return change or ""


def timed_out() -> TaskError:
    return TaskError(ErrorCode.TIMED_OUT, "the task did not finish before RECEIVER_TASK_DEADLINE")
