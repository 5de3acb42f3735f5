"""What the domain rules are written against, and what a backend gives them.

`Tx` is an open write transaction: `one`, `all` and `run` take SQL with named parameters (`:name`) and
plain Python values, and return rows as dicts; it notes which tasks changed, and a savepoint undoes
its notes with its rows. `Dialect` declares, once per database, the few words the dialects spell
differently (column types, row locks, a planner hint); nothing is translated by pattern. `Backend` is
what `Store` (rules.py) composes: connections, transactions, wake-ups and a dialect. The rules never see
a connection, a cursor or a driver's row type, so they run unchanged on every backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from abc import ABC
from abc import abstractmethod
from collections.abc import AsyncIterator
from collections.abc import Callable
from collections.abc import Coroutine
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from dataclasses import fields
from typing import Any
from typing import TypeVar

from receiver.store.records import Ended

T = TypeVar("T")
Row = dict[str, Any]
Params = Mapping[str, Any]
Clock = Callable[[], float]
system_clock: Clock = time.time
InboxRow = tuple[str, str, int]  # a verified callback as kept: task id, outcome JSON, urgent


@dataclass(frozen=True)
class Timings:
    reconcile_after: float  # seconds after a submit before the first status query
    task_deadline: float  # seconds a task may take in all
    job_lease: float = 60.0  # seconds a claimed job stays with its process
    cooldown_failures: int = 3  # provider-side failures in a row that start a provider's cooldown
    cooldown_seconds: float = 60.0  # how long `auto` routing skips a provider in cooldown


@dataclass(frozen=True)
class Dialect:
    """The words a database spells its own way, declared once; the schema (schema.py) and the rules
    name them, and each backend gives its own. What both dialects spell alike (`RETURNING`,
    `INSERT … ON CONFLICT … DO UPDATE`, window functions) is written plainly."""

    name: str  # which text of a `Spelled` migration this database runs
    types: Mapping[str, str]  # the schema's column types by the name it uses (`$key`, `$int`, …)
    # Appended to a SELECT of rows the transaction goes on to change: PostgreSQL locks them (so two
    # replicas cannot both move a task from the same state); SQLite has one writer and needs nothing.
    lock: str = ""
    # Appended to the SELECT that picks jobs to claim: replicas skip rows another one is claiming.
    skip_locked: str = ""
    # Put before a column to keep the planner off that column's index (SQLite's unary `+`): a delete
    # of a task's jobs stays on the task_id index instead of scanning every idle job.
    unindexed: str = ""
    # The whole day (since the epoch, UTC) of a time column, as an integer: usage grouped by day.
    day_number: str = "CAST({column} / 86400 AS INTEGER)"


@dataclass
class Notes:
    """What a transaction did besides its rows, told once it commits (wake-ups, logs, metrics).

    `Tx.savepoint` snapshots every field here and puts it back when that part is undone: a note added
    here is undone with its rows, with nothing else to remember."""

    changed: set[str] = field(default_factory=set)  # tasks changed: their long-polls wake
    jobs_added: bool = False  # a job became due: workers look again
    ended: list[Ended] = field(default_factory=list)  # tasks ended, each logged once
    hops: list[tuple[str, str, str]] = field(default_factory=list)  # fallback moves (from, to, reason)
    parked: list[str] = field(default_factory=list)  # kinds of the rows set aside, counted once
    keys_changed: bool = False  # a database key changed or went: every replica forgets what it cached


NOTE_FIELDS = tuple(note.name for note in fields(Notes))


class Tx(Notes, ABC):
    """An open write transaction, handed to one operation; it notes what it changed (`Notes`)."""

    def __init__(self, now: float, dialect: Dialect) -> None:
        self.now = now
        self.dialect = dialect
        Notes.__init__(self)
        self._depth = 0

    @property
    def lock(self) -> str:
        return self.dialect.lock

    @property
    def skip_locked(self) -> str:
        return self.dialect.skip_locked

    @contextlib.asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """A part of the transaction that may fail alone: on an exception, its rows and its notes are
        undone and the exception goes on; the rest of the transaction stands."""
        notes = {name: copy.copy(getattr(self, name)) for name in NOTE_FIELDS}
        self._depth += 1
        name = f"part{self._depth}"
        await self.run(f"SAVEPOINT {name}")
        try:
            yield
        except Exception:  # (a cancellation ends the whole transaction: nothing to keep)
            await self.run(f"ROLLBACK TO SAVEPOINT {name}")
            await self.run(f"RELEASE SAVEPOINT {name}")
            for note, value in notes.items():
                setattr(self, note, value)
            raise
        else:
            await self.run(f"RELEASE SAVEPOINT {name}")
        finally:
            self._depth -= 1

    def about_database(self, exc: BaseException) -> bool:
        """Whether `exc` is the database's trouble (away, deadlocked, full), not a row's: such an error
        ends the whole operation and counts against no row."""
        return False

    @abstractmethod
    async def one(self, sql: str, params: Params | None = None) -> Row | None: ...

    @abstractmethod
    async def all(self, sql: str, params: Params | None = None) -> list[Row]: ...

    @abstractmethod
    async def run(self, sql: str, params: Params | None = None) -> int:
        """Execute a statement; returns how many rows it changed."""

    @abstractmethod
    async def many(self, sql: str, rows: Sequence[Params]) -> None:
        """Execute one statement for each set of parameters."""


Op = Callable[[Tx], Coroutine[Any, Any, T]]
Committed = Callable[[Tx], None]
InsertInbox = Callable[[Tx, Sequence[InboxRow]], Coroutine[Any, Any, None]]


class Wakeups:
    """Who waits in this process for a task to change, and the signal that jobs were added."""

    def __init__(self) -> None:
        self.task_waiters: dict[str, set[asyncio.Event]] = {}
        self.jobs_changed = asyncio.Event()
        # Counts the key changes heard of (here, or from another replica where the backend tells):
        # a cache of keys (receiver/keys.py) drops what it read before the count moved.
        self.keys_version = 0

    def announce(self, changed: Iterable[str], jobs_added: bool, keys_changed: bool = False) -> None:
        if keys_changed:
            self.keys_version += 1
        for task_id in changed:
            for waiter in self.task_waiters.get(task_id, ()):
                waiter.set()
        if jobs_added:
            self.jobs_changed.set()

    def everyone(self) -> list[str]:
        return list(self.task_waiters)

    async def wait(self, task_id: str, timeout: float) -> None:
        """Return when the task changes or `timeout` passes, whichever is first."""
        event = asyncio.Event()
        self.task_waiters.setdefault(task_id, set()).add(event)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation that comes
            # as the event is set, and a waiter that is being cancelled (a download whose fetch just
            # ended stops its watcher) would then wait on for good.
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            pass
        finally:
            waiters = self.task_waiters.get(task_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self.task_waiters[task_id]


class Backend(ABC):
    """What the rules need of a database: transactions, reads, wake-ups across processes, a dialect.

    A backend runs each operation in a write transaction, calls `committed(tx)` once that transaction
    has committed (the rules' after-commit notes) and announces what it changed to `wakeups`."""

    dialect: Dialect

    def __init__(self, clock: Clock = system_clock) -> None:
        self.clock = clock
        self.wakeups = Wakeups()
        self.committed: Committed = lambda tx: None  # the rules' own, set by the Store that composes this

    @abstractmethod
    async def open(self) -> None:
        """Connect and bring the schema up to date."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def writable(self) -> bool:
        """Whether a write can commit right now (for /readyz)."""

    @abstractmethod
    async def write(self, op: Op[T]) -> T:
        """Run `op` inside a write transaction and commit it; announce what it changed."""

    @abstractmethod
    async def fetch(self, sql: str, params: Params | None = None) -> list[Row]:
        """A read outside any write transaction."""

    async def point(self, sql: str, params: Params) -> list[Row]:
        """A read of a few rows by primary key, on the callback and lookup paths (a backend may run it
        faster than `fetch`)."""
        return await self.fetch(sql, params)

    async def keep(self, row: InboxRow, insert: InsertInbox) -> None:
        """Keep a verified callback with `insert` in a write of its own (a backend may gather them)."""
        await self.write(lambda tx: insert(tx, [row]))

    @abstractmethod
    async def claim_worker(self) -> bool:
        """Become a worker of this database (or raise RoleTaken where only one worker may run); True
        when this process is now its only worker, so that any lease still held is a dead one's."""

    async def wait_for_change(self, task_id: str, timeout: float) -> None:
        """Return when the task changes (in any process) or `timeout` passes."""
        await self.wakeups.wait(task_id, timeout)


def in_list(name: str, values: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    """`:name0,:name1,…` and its parameters, for an `IN (…)` of any length (never empty)."""
    params = {f"{name}{n}": value for n, value in enumerate(values)}
    return ",".join(f":{key}" for key in params) or "NULL", params
