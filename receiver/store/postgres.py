"""The PostgreSQL backend: a connection pool, row locks, and LISTEN/NOTIFY wake-ups across replicas.

The driver is asyncpg: it is written for asyncio (no thread hand-off per query), speaks PostgreSQL's
binary protocol (fast, typed values), has a pool built in, and receives NOTIFY messages on a plain
connection, which is what wakes a `?wait` long-poll on one replica when another one ends the task.

Every write is its own transaction on a pooled connection (PostgreSQL commits concurrent transactions
side by side; SQLite's group commit is not needed). The rules lock a task row before they change it
(`SELECT … FOR UPDATE`), so two replicas never both move a task from the same state; claims take due
jobs with `FOR UPDATE SKIP LOCKED`, so replicas never wait on or take each other's jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Sequence
from typing import Any
from typing import TypeVar
from typing import Union

import asyncpg

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
from receiver.store.rules import StoreUnavailable
from receiver.store.schema import spelled_for

log = logging.getLogger("receiver.store")
T = TypeVar("T")
Connection = Union[asyncpg.Connection, "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"]
CHANNEL = "receiver"
MIGRATION_LOCK = 0x7265636569766572  # "receiver": the advisory lock replicas take to migrate one at a time
SWEEP = 2.0  # a long-poll looks at its task at least this often, should a NOTIFY be lost
RETRIES = 5  # a transaction chosen as a deadlock victim runs again this many times
POOL_SIZE = 10  # connections per process: a replica rarely has more transactions open at once
READY_TIMEOUT = 5.0  # seconds /readyz waits for a write to commit
DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
# The database is away (down, restarting, dropped, unreachable), as opposed to a statement that failed.
UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InvalidCatalogNameError,
    asyncpg.AdminShutdownError,
)
KEYS_CHANGED = "k"  # the notice's first part when a key changed (else "1" or "0": jobs were added or not)
NOTIFY_CHUNK = 7000  # bytes of task ids per NOTIFY payload (the limit is 8000)


IDENTITY = "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
POSTGRES = Dialect(
    name="postgres",
    # 64-bit integers and double floats, as SQLite's; keys the database numbers and never reuses.
    types={
        "key": IDENTITY,
        "serial": IDENTITY,
        "int": "BIGINT",
        "real": "DOUBLE PRECISION",
        "without_rowid": "",
    },
    lock=" FOR UPDATE",
    skip_locked=" FOR UPDATE SKIP LOCKED",
    day_number="FLOOR({column} / 86400)::bigint",  # a cast alone would round
)
MIGRATIONS = spelled_for(POSTGRES)

_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=512)
def positional(sql: str) -> tuple[str, tuple[str, ...]]:
    """`:name` parameters as PostgreSQL's `$n`, and the names in their order (a name used twice is one $n)."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _NAMED.sub(number, sql), tuple(names)


def _args(sql: str, params: Params | None) -> tuple[str, list[Any]]:
    text, names = positional(sql)
    values = params or {}
    return text, [values[name] for name in names]


def _count(status: str) -> int:
    """Rows changed, from a command tag such as 'UPDATE 3' or 'INSERT 0 1'."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class PgTx(Tx):
    def __init__(self, conn: Connection, now: float) -> None:
        super().__init__(now, POSTGRES)
        self.conn = conn

    async def one(self, sql: str, params: Params | None = None) -> Row | None:
        text, args = _args(sql, params)
        row = await self.conn.fetchrow(text, *args)
        return None if row is None else dict(row)

    async def all(self, sql: str, params: Params | None = None) -> list[Row]:
        text, args = _args(sql, params)
        return [dict(row) for row in await self.conn.fetch(text, *args)]

    async def run(self, sql: str, params: Params | None = None) -> int:
        text, args = _args(sql, params)
        return _count(await self.conn.execute(text, *args))

    async def many(self, sql: str, rows: Sequence[Params]) -> None:
        if rows:
            text, names = positional(sql)
            await self.conn.executemany(text, [[row[name] for name in names] for row in rows])

    def about_database(self, exc: BaseException) -> bool:
        return isinstance(exc, (*UNREACHABLE, asyncpg.DeadlockDetectedError, asyncpg.SerializationError))


class SingleStatementTx(PgTx):
    """A write of one statement, sent outside any transaction block: PostgreSQL commits it alone, so
    it costs one round trip instead of BEGIN, the statement and COMMIT. A second statement would not
    be atomic with the first, so it is refused."""

    def __init__(self, conn: Connection, now: float) -> None:
        super().__init__(conn, now)
        self.sent = False

    def _once(self) -> None:
        if self.sent:
            raise RuntimeError("a single-statement write ran a second statement")
        self.sent = True

    async def one(self, sql: str, params: Params | None = None) -> Row | None:
        self._once()
        return await super().one(sql, params)

    async def all(self, sql: str, params: Params | None = None) -> list[Row]:
        self._once()
        return await super().all(sql, params)

    async def run(self, sql: str, params: Params | None = None) -> int:
        self._once()
        return await super().run(sql, params)

    async def many(self, sql: str, rows: Sequence[Params]) -> None:
        self._once()
        await super().many(sql, rows)


async def _reset(conn: Connection) -> None:
    """What the pool does to a connection handed back, beyond rolling back a transaction left open
    (asyncpg does that first): nothing. Its default also unlistens, closes cursors, drops advisory
    locks and resets settings, one more round trip per use for things no pooled connection here does
    (the listener and the migration have connections of their own)."""


async def migrate(conn: asyncpg.Connection) -> int:
    """Apply the migrations this database has not seen, one replica at a time; returns the version."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS receiver_schema (version INTEGER NOT NULL)")
        version = await conn.fetchval("SELECT MAX(version) FROM receiver_schema") or 0
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            async with conn.transaction():
                await conn.execute(script)
                await conn.execute("INSERT INTO receiver_schema (version) VALUES ($1)", number)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return len(MIGRATIONS)


async def unusable_because(url: str, timeout: float = 10.0) -> str | None:
    """Why the database at `url` cannot be used now, in one line (never the URL: it may hold a
    password); None when a connection opens. `serve` asks before it starts anything."""
    try:
        conn = await asyncpg.connect(url, timeout=timeout)
    except (*UNREACHABLE, asyncpg.PostgresError) as exc:
        return str(exc) or type(exc).__name__
    await conn.close()
    return None


class PostgresBackend(Backend):
    dialect = POSTGRES

    def __init__(self, url: str, clock: Clock = system_clock) -> None:
        super().__init__(clock)
        self.url = url
        self.pool_size = POOL_SIZE
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._relisten: asyncio.Task[None] | None = None
        self._closing = False

    async def open(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.pool_size, reset=_reset)
        await self._listen()

    async def close(self) -> None:
        self._closing = True
        if self._relisten is not None:
            self._relisten.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._relisten
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
        if self._pool is not None:
            await self._pool.close()

    async def claim_worker(self) -> bool:
        """Any number of workers share a PostgreSQL database: leases keep their jobs apart."""
        return False

    async def writable(self) -> bool:
        try:
            # txid_current() fails on a read-only server (a standby): readiness means writes commit.
            await asyncio.wait_for(self.write(lambda tx: tx.one("SELECT txid_current() AS x")), READY_TIMEOUT)
        except (TimeoutError, StoreUnavailable, *DATABASE_ERRORS):
            return False
        return True

    # -- wake-ups --------------------------------------------------------------------------------

    async def _listen(self) -> None:
        self._listener = await asyncpg.connect(self.url)
        await self._listener.add_listener(CHANNEL, self._heard)
        self._listener.add_termination_listener(self._lost)

    def _heard(self, conn: object, pid: int, channel: str, payload: object) -> None:
        jobs, _, ids = str(payload).partition("|")
        if jobs == KEYS_CHANGED:
            self.wakeups.announce((), False, keys_changed=True)
            return
        self.wakeups.announce([task_id for task_id in ids.split(",") if task_id], jobs == "1")

    def _lost(self, conn: object) -> None:
        if not self._closing and (self._relisten is None or self._relisten.done()):
            self._relisten = asyncio.get_running_loop().create_task(self._listen_again())

    async def _listen_again(self) -> None:
        """The listening connection dropped (database restart): reconnect, waking everyone meanwhile."""
        delay = 0.5
        while not self._closing:
            # Whatever changed meanwhile (tasks, jobs, keys), look again.
            self.wakeups.announce(self.wakeups.everyone(), True, keys_changed=True)
            try:
                await self._listen()
                log.info("listening for changes again")
                return
            except DATABASE_ERRORS as exc:
                log.warning("cannot listen for changes yet: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def wait_for_change(self, task_id: str, timeout: float) -> None:
        # A NOTIFY lost with a dropped connection must not hold a long-poll for its whole wait.
        await self.wakeups.wait(task_id, min(timeout, SWEEP))

    # -- transactions ----------------------------------------------------------------------------

    async def write(self, op: Op[T]) -> T:
        try:
            return await self._write(op)
        except UNREACHABLE as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _write(self, op: Op[T]) -> T:
        assert self._pool is not None
        for attempt in range(1, RETRIES + 1):
            async with self._pool.acquire() as conn:
                try:
                    async with conn.transaction():
                        tx = PgTx(conn, self.clock())
                        value = await op(tx)
                        await _notify(conn, tx)
                except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                    if attempt == RETRIES:
                        raise
                    continue
            self.committed(tx)  # its task ends logged, its fallback moves counted: now they are true
            self.wakeups.announce(tx.changed, tx.jobs_added)
            return value
        raise AssertionError("unreachable")

    async def keep(self, row: InboxRow, insert: InsertInbox) -> None:
        """A verified callback kept in one round trip: its INSERT commits alone, and the inbox's
        trigger (schema.py) wakes every replica's worker when it does."""
        assert self._pool is not None
        try:
            async with self._pool.acquire() as conn:
                tx = SingleStatementTx(conn, self.clock())
                await insert(tx, [row])
        except UNREACHABLE as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        self.committed(tx)
        self.wakeups.announce(tx.changed, tx.jobs_added)

    async def fetch(self, sql: str, params: Params | None = None) -> list[Row]:
        assert self._pool is not None
        text, args = _args(sql, params)
        try:
            return [dict(row) for row in await self._pool.fetch(text, *args)]
        except UNREACHABLE as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc


async def _notify(conn: Connection, tx: Tx) -> None:
    """Tell every replica what this transaction changed; PostgreSQL delivers it on commit."""
    if tx.keys_changed:  # a key changed or went: every replica drops the keys it has cached
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{KEYS_CHANGED}|")
    if not tx.changed and not tx.jobs_added:
        return
    flag = "1" if tx.jobs_added else "0"
    chunks: list[list[str]] = [[]]
    size = 0
    for task_id in sorted(tx.changed):
        if size + len(task_id) > NOTIFY_CHUNK:
            chunks.append([])
            size = 0
        chunks[-1].append(task_id)
        size += len(task_id) + 1
    for chunk in chunks:
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{flag}|{','.join(chunk)}")
