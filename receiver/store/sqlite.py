"""The SQLite backend: one writer thread with group commit, reads beside it.

Writes funnel through one writer thread that owns the write connection. Operations that arrive while a
batch is committing form the next batch: one `BEGIN IMMEDIATE … COMMIT` (one fsync) for all of them,
each inside its own savepoint so one failing operation does not undo its neighbours (group commit).
Reads run beside it on an aiosqlite connection; WAL lets them see every committed batch at once.

The rules (`rules.py`) are coroutines so that they also run on an async driver; here every database
call returns at once, so the writer thread drives each one to its end without an event loop.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import Coroutine
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO
from typing import Any
from typing import TypeVar
from typing import cast

import aiosqlite

from receiver.store.base import Backend
from receiver.store.base import Clock
from receiver.store.base import Dialect
from receiver.store.base import InboxRow
from receiver.store.base import InsertInbox
from receiver.store.base import Op
from receiver.store.base import Params
from receiver.store.base import Row
from receiver.store.base import Tx
from receiver.store.base import system_clock
from receiver.store.rules import RoleTaken
from receiver.store.schema import spelled_for

T = TypeVar("T")
# Seconds between looks at the database for other processes' commits while a long-poll waits here.
WATCH_INTERVAL = 0.25
__all__ = ["MIGRATIONS", "SQLITE", "SqliteBackend", "migrate"]

SQLITE = Dialect(
    name="sqlite",
    types={
        "key": "INTEGER PRIMARY KEY",
        "serial": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "int": "INTEGER",
        "real": "REAL",
        "without_rowid": " WITHOUT ROWID",
    },
    unindexed="+",
)
MIGRATIONS = spelled_for(SQLITE)


# SQLite's own troubles (primary result codes): the file is locked, full, unreadable or out of memory.
TROUBLE = frozenset(
    (
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
    )
)


def _dict_row(cursor: sqlite3.Cursor, row: tuple[Any, ...]) -> Row:
    return {column[0]: value for column, value in zip(cursor.description, row, strict=True)}


class SqliteTx(Tx):
    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        super().__init__(now, SQLITE)
        self.conn = conn

    async def one(self, sql: str, params: Params | None = None) -> Row | None:
        row: Row | None = self.conn.execute(sql, params or {}).fetchone()
        return row

    async def all(self, sql: str, params: Params | None = None) -> list[Row]:
        return list(self.conn.execute(sql, params or {}).fetchall())

    async def run(self, sql: str, params: Params | None = None) -> int:
        return self.conn.execute(sql, params or {}).rowcount

    async def many(self, sql: str, rows: Sequence[Params]) -> None:
        self.conn.executemany(sql, rows)

    def about_database(self, exc: BaseException) -> bool:
        # A text column that cannot be decoded is an OperationalError too, but with no SQLite code.
        code = getattr(exc, "sqlite_errorcode", None)
        return isinstance(exc, sqlite3.OperationalError) and code is not None and code & 0xFF in TROUBLE


def drive(step: Coroutine[Any, Any, T]) -> T:
    """Run a rule to its end in this thread: with SQLite nothing it awaits ever suspends."""
    try:
        step.send(None)
    except StopIteration as done:
        value: T = done.value
        return value
    step.close()
    raise RuntimeError("a rule waited on something other than its SQLite transaction")


def _connect_writer(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = _dict_row
    conn.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL: a commit survives a killed process (the OS holds the WAL); FULL adds power-loss safety.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations this database has not seen; returns the schema version."""
    cursor = conn.cursor()
    cursor.row_factory = None  # a plain tuple, whatever the connection's row factory
    version = int(cursor.execute("PRAGMA user_version").fetchone()[0])
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


class SqliteBackend(Backend):
    dialect = SQLITE

    def __init__(self, path: Path, clock: Clock = system_clock) -> None:
        super().__init__(clock)
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="receiver-writer")
        self._writer: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._point: sqlite3.Connection | None = None
        self._worker_of: Path | None = None
        self._pending: list[tuple[Op[Any], asyncio.Future[Any]]] = []
        # Verified callbacks waiting for the next commit: one INSERT for all of them (group commit).
        self._inbox: list[tuple[InboxRow, asyncio.Future[None]]] = []
        self._insert_inbox: InsertInbox | None = None
        self._wake_writer = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._writer = await loop.run_in_executor(self._executor, _connect_writer, self.path)
        await loop.run_in_executor(self._executor, migrate, self._writer)
        self._point = sqlite3.connect(self.path, check_same_thread=False)
        self._point.row_factory = _dict_row
        self._point.execute("PRAGMA query_only=1")
        self._reader = await aiosqlite.connect(self.path)
        self._reader.row_factory = _dict_row  # type: ignore[assignment]  # any sqlite3 row factory works
        await self._reader.execute("PRAGMA busy_timeout=5000")
        self._writer_task = asyncio.create_task(self._write_loop(), name="receiver-store-writer")

    async def claim_worker(self) -> bool:
        lock_worker(self.path.parent)
        self._worker_of = self.path.parent
        return True  # this process alone runs jobs here

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
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
        if self._worker_of is not None:
            unlock_worker(self._worker_of)

    async def writable(self) -> bool:
        try:
            await self.write(lambda tx: tx.run("CREATE TEMP TABLE IF NOT EXISTS probe (x)"))
        except sqlite3.Error:
            return False
        return True

    # -- wake-ups from other processes ----------------------------------------------------------

    async def wait_for_change(self, task_id: str, timeout: float) -> None:
        """A process that runs no jobs (`--role api` beside the data dir's worker) sees its tasks
        change in another process's commits: while someone here waits, it watches for them."""
        if self._worker_of is None and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.create_task(self._watch_others(), name="receiver-store-watcher")
        await self.wakeups.wait(task_id, timeout)

    async def _watch_others(self) -> None:
        # PRAGMA data_version moves whenever another connection committed (the worker's process, or
        # this one's own writer): the waiters then read their task again and wait on if unchanged.
        # Once at the start, after the first look, too: a commit between a waiter's read of its task
        # and that first look would otherwise go unseen.
        assert self._point is not None
        wakeups = self.wakeups
        seen = self._point.execute("PRAGMA data_version").fetchone()
        wakeups.announce(wakeups.everyone(), False)
        while wakeups.task_waiters:
            await asyncio.sleep(WATCH_INTERVAL)
            now = self._point.execute("PRAGMA data_version").fetchone()
            if now != seen:
                seen = now
                wakeups.announce(wakeups.everyone(), False)

    # -- the writer ------------------------------------------------------------------------------

    async def write(self, op: Op[T]) -> T:
        """Run `op` inside a write transaction (shared with whatever else is waiting) and commit it."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append((op, future))
        self._wake_writer.set()
        return await future

    async def keep(self, row: InboxRow, insert: InsertInbox) -> None:
        """Keep a verified callback durably, inserted with every other callback of the moment in one
        statement and one commit."""
        self._insert_inbox = insert
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inbox.append((row, done))
        self._wake_writer.set()
        await done

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
            self.wakeups.announce(changed, jobs_added)

    def _commit_batch(
        self, ops: list[Op[Any]], inbox: list[InboxRow]
    ) -> tuple[list[tuple[bool, Any]], set[str], bool]:
        conn = self._writer
        assert conn is not None
        tx = SqliteTx(conn, self.clock())
        # One operation alone needs no savepoint: its failure may undo the whole transaction.
        alone = len(ops) == 1 and not inbox
        results: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            if inbox:
                assert self._insert_inbox is not None  # given with the rows
                drive(self._insert_inbox(tx, inbox))
            for op in ops:
                try:
                    value = drive(op(tx) if alone else _in_savepoint(tx, op))
                except Exception as exc:
                    if alone:
                        conn.rollback()
                        return [(False, exc)], set(), False
                    results.append((False, exc))
                else:
                    results.append((True, value))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.committed(tx)  # now it is true
        return results, tx.changed, tx.jobs_added

    # -- reads -----------------------------------------------------------------------------------

    async def fetch(self, sql: str, params: Params | None = None) -> list[Row]:
        assert self._reader is not None
        rows = await self._reader.execute_fetchall(sql, params or {})  # one hand-off, not three
        return cast(list[Row], list(rows))  # made by _dict_row

    async def point(self, sql: str, params: Params) -> list[Row]:
        """Read on the event loop itself: a point read takes microseconds, less than handing it to a
        thread and back (the callback path, lookups and the worker's jobs use it)."""
        assert self._point is not None
        return list(self._point.execute(sql, params).fetchall())


async def _in_savepoint(tx: Tx, op: Op[T]) -> T:
    """`op` as one of a batch: should it fail, only its own rows and notes are undone."""
    async with tx.savepoint():
        return await op(tx)


_worker_locks: dict[Path, IO[str]] = {}


def lock_worker(data_dir: Path) -> None:
    """Make this process the one worker of `data_dir`, or raise RoleTaken naming the one that is.

    An exclusive flock on data_dir/worker.lock, held while the process runs (the kernel drops it when
    the process dies, however it dies). Taking it again in the same process is a no-op."""
    if data_dir in _worker_locks:
        return
    handle = open(data_dir / "worker.lock", "a+")  # noqa: SIM115 - held until unlock_worker()
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise RoleTaken(
            f"another worker (pid {holder}) already runs on {data_dir}: with SQLite only one process may"
            " run jobs (start this one with --role api, or use PostgreSQL)"
        ) from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    _worker_locks[data_dir] = handle


def unlock_worker(data_dir: Path) -> None:
    handle = _worker_locks.pop(data_dir, None)
    if handle is not None:
        handle.close()  # closing the file releases the lock
