"""Job handlers and what they come to: each returns `Done`, `Retry` or `Fail`; `record` writes it.

A handler (`submit.py`, `download.py`, `reconcile.py`, `deadline.py`, `notify.py`) does its job's work
and any state change that is the job's result (a submission, a stored image), and says how the job
ended. Retries are data: a `Retry` carries its delay, worked out from one `Backoff` policy per kind
(the only place a `Retry-After` is honoured), and `record` is the one place an outcome reaches the
store: the task's event and the job's end or next turn, in one write. The worker (receiver.worker) only
claims, keeps leases alive, dispatches to handlers and drains.

Time comes from a `Clock` passed in (real time by default), so a test can advance it instead of sleeping.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import replace

from receiver.config import Settings
from receiver.models import TaskError
from receiver.store import Job
from receiver.store import Store


class Clock:
    """Real time: wall time for what is stored and compared with the database, monotonic for durations
    and the pacer. A test passes a subclass whose time it moves by hand."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = Clock()


@dataclass(frozen=True)
class Entry:
    """An event for the task's history, written together with the job's outcome."""

    kind: str
    summary: str
    detail: str | None = None


@dataclass(frozen=True)
class Done:
    """The job is over. `recorded` when the handler's own write (a submission, a stored image) already
    removed the job together with its result; else `record` removes it, with `entry` if there is one."""

    entry: Entry | None = None
    recorded: bool = False


@dataclass(frozen=True)
class Retry:
    """Run the job again in `delay` seconds; `note` is kept on the job as its last error. With `requeue`
    the job is put back untouched instead (pacing said not yet): its place in the queue is kept and the
    claim does not count as an attempt."""

    delay: float
    note: str
    entry: Entry | None = None
    requeue: bool = False
    provider_failed: str = ""  # the provider whose failure it was (unavailable, 5xx): counts to its cooldown


@dataclass(frozen=True)
class Fail:
    """End the task with `error` (or move it to its next fallback, by the same rule as any failure).
    `provider`, when given, is the provider the failure is about: stale once the task has left it."""

    error: TaskError
    provider: str = ""


Outcome = Done | Retry | Fail
Handler = Callable[[Job], Awaitable[Outcome]]


@dataclass(frozen=True)
class Backoff:
    """When a job runs again after its `attempts`-th try: the `delays` schedule, held at its last step,
    or with no schedule `base * factor ** (attempts - 1)` up to `cap`; times a random factor drawn from
    `jitter` (so many jobs failing together do not retry in step); never sooner than a `Retry-After`.
    `tries`: the attempts after which a handler gives up (None: never)."""

    delays: tuple[float, ...] = ()
    base: float = 1.0
    factor: float = 2.0
    cap: float | None = None
    jitter: tuple[float, float] = (1.0, 1.0)
    tries: int | None = None

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        if self.delays:
            wait = self.delays[max(1, min(attempts, len(self.delays))) - 1]
        else:
            wait = self.base * self.factor ** max(0, attempts - 1)
        if self.cap is not None:
            wait = min(wait, self.cap)
        low, high = self.jitter
        if low != high:
            wait *= random.uniform(low, high)
        return max(wait, retry_after or 0.0)

    def spent(self, attempts: int) -> bool:
        """Whether `attempts` tries are all this policy allows."""
        return self.tries is not None and attempts > self.tries


def retry_backoff(settings: Settings, tries: int | None = None) -> Backoff:
    """The default policy (submits, and jobs the database or a bug interrupted): RECEIVER_RETRY_BASE
    doubling with each try, plus up to a quarter."""
    return replace(Backoff(base=settings.retry_base, jitter=(1.0, 1.25)), tries=tries)


async def record(store: Store, job: Job, outcome: Outcome) -> None:
    """The one place a job's outcome is written: its event, and its end or its next turn, in one write."""
    if isinstance(outcome, Fail):
        await store.fail_task(job.task_id, outcome.error, job.kind, job.id, provider=outcome.provider)
        return
    if isinstance(outcome, Done) and outcome.recorded:
        return
    entry = outcome.entry
    await store.settle_job(
        job,
        outcome.delay if isinstance(outcome, Retry) else None,
        outcome.note if isinstance(outcome, Retry) else "",
        event=None if entry is None else (entry.kind, entry.summary),
        detail=None if entry is None else entry.detail,
        requeue=isinstance(outcome, Retry) and outcome.requeue,
        provider_failed=outcome.provider_failed if isinstance(outcome, Retry) else "",
    )
