"""The small protocol the domain rules are written against: a transaction and a clock.

A backend hands each operation a `Tx`: `one`, `all` and `run` take SQL with named parameters (`:name`)
and plain Python values, and return rows as dicts. The rules never see a connection, a cursor or a
driver's row type, so they run unchanged on every backend. Where the dialects differ in a way the rules
must spell (row locks), the transaction names the clause.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC
from abc import abstractmethod
from collections.abc import AsyncIterator
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from receiver.store.records import Ended

Row = dict[str, Any]
Params = Mapping[str, Any]
Clock = Callable[[], float]
system_clock: Clock = time.time


@dataclass(frozen=True)
class Timings:
    reconcile_after: float  # seconds after a submit before the first status query
    task_deadline: float  # seconds a task may take in all
    job_lease: float = 60.0  # seconds a claimed job stays with its process


class Tx(ABC):
    """An open write transaction, handed to one operation; it notes which tasks changed."""

    # Appended to a SELECT of rows this transaction goes on to change: PostgreSQL locks them (so two
    # replicas cannot both move a task from the same state); SQLite has one writer and needs nothing.
    lock: str = ""
    # Appended to the SELECT that picks jobs to claim: replicas skip rows another one is claiming.
    skip_locked: str = ""

    def __init__(self, now: float) -> None:
        self.now = now
        self.changed: set[str] = set()
        self.jobs_added = False
        self.ended: list[Ended] = []  # tasks this transaction ended, logged once it is committed
        self.hops: list[
            tuple[str, str, str]
        ] = []  # fallback moves (from, to, reason), counted once committed
        self.parked: list[str] = []  # kinds of the rows this transaction set aside, counted once committed

    def mark(self) -> tuple[set[str], bool, int, int, int]:
        """What this transaction has noted so far, to go back to should a part of it be undone."""
        return set(self.changed), self.jobs_added, len(self.ended), len(self.hops), len(self.parked)

    def undo(self, mark: tuple[set[str], bool, int, int, int]) -> None:
        """Forget what was noted since `mark` (its rows were rolled back)."""
        self.changed, self.jobs_added = mark[0], mark[1]
        del self.ended[mark[2] :]
        del self.hops[mark[3] :]
        del self.parked[mark[4] :]

    @contextlib.asynccontextmanager
    async def savepoint(self) -> AsyncIterator[None]:
        """A part of the transaction that may fail alone: on an exception, its rows and its notes are
        undone and the exception goes on; the rest of the transaction stands."""
        mark = self.mark()
        await self.run("SAVEPOINT part")
        try:
            yield
        except Exception:  # (a cancellation ends the whole transaction: nothing to keep)
            await self.run("ROLLBACK TO SAVEPOINT part")
            await self.run("RELEASE SAVEPOINT part")
            self.undo(mark)
            raise
        await self.run("RELEASE SAVEPOINT part")

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


def in_list(name: str, values: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    """`:name0,:name1,…` and its parameters, for an `IN (…)` of any length (never empty)."""
    params = {f"{name}{n}": value for n, value in enumerate(values)}
    return ",".join(f":{key}" for key in params) or "NULL", params
