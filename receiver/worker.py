"""The worker: the loop that claims due rows from the `jobs` table and runs them with their handlers.

A job is a row; retries are data (attempts, due_at), not control flow. The loop wakes when a job is
added or the next one falls due, claims as many as each kind has free slots, hands each to its handler
(receiver.jobs) and records what it came to; it keeps the leases of running jobs alive and drains at
shutdown. A crash leaves rows behind, and the next start runs them again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from collections.abc import Callable

from receiver import metrics
from receiver.config import Settings
from receiver.jobs import SYSTEM_CLOCK
from receiver.jobs import Clock
from receiver.jobs import record
from receiver.jobs import retry_backoff
from receiver.jobs.kinds import Jobs
from receiver.jobs.paced import PaceKeeper
from receiver.jobs.submit import build_pacer as build_pacer  # where tests and tools look for it
from receiver.logs import event
from receiver.store import Claimed
from receiver.store import Job
from receiver.store import Store
from receiver.store import StoreUnavailable
from receiver.store.rules import WORKER_LOOKS_EVERY

log = logging.getLogger("receiver.worker")
INBOX_SLICE = 256  # callbacks applied per worker turn
BUSY_INBOX_SLICE = 32  # … while callbacks are arriving, so no callback's commit waits behind a long one
BUSY_PAUSE = 0.02  # seconds between worker turns while callbacks are arriving
DATABASE_RETRY = 1.0  # seconds between claims while the database cannot be reached


def _short(jobs: list[Job], slots: dict[str, int]) -> set[str]:
    """The kinds a claim could not take every due job of: no slot left, or as many taken as slots."""
    taken: dict[str, int] = {}
    for job in jobs:
        taken[job.kind] = taken.get(job.kind, 0) + 1
    return {kind for kind, free in slots.items() if free <= 0 or taken.get(kind, 0) >= free}


def _filled(jobs: list[Job], slots: dict[str, int]) -> bool:
    """Whether a claim took as many jobs of some kind as it had slots for (then more may be due; a
    kind that got fewer had no more due, and the next claim waits for a job to be added or end)."""
    taken: dict[str, int] = {}
    for job in jobs:
        taken[job.kind] = taken.get(job.kind, 0) + 1
    return any(n >= slots.get(kind, 0) for kind, n in taken.items())


class Worker:
    def __init__(self, settings: Settings, store: Store, jobs: Jobs, clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.handlers = jobs.kinds
        self.fetcher = jobs.fetcher
        self.pace = PaceKeeper(jobs.pacer, store, clock)
        self._per_tenant = {
            kind: k.per_tenant for kind, k in self.handlers.items() if k.per_tenant is not None
        }
        self._running: dict[str, set[asyncio.Task[None]]] = {kind: set() for kind in self.handlers}
        self._waiting_for_slots: set[str] = set(self.handlers)  # kinds whose due jobs wait for a slot
        self._held: dict[int, Job] = {}  # claimed and running here: their leases are kept alive
        self._crashed = retry_backoff(settings)  # for jobs the database or a bug interrupted
        # Set by the app: whether callbacks are arriving right now (then everything else waits a little).
        self.callbacks_busy: Callable[[], bool] = lambda: False
        self._stopping = False

    async def run(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(), name="receiver-lease-heartbeat")
        try:
            await self._standing_jobs()
            while not self._stopping:
                await self.turn()
        finally:
            heartbeat.cancel()

    async def _standing_jobs(self) -> None:
        """Put in the row of each standing job (the retention sweep) unless one is there already: every
        replica does, the row is one, and whoever claims it sweeps."""
        for kind, declared in self.handlers.items():
            while declared.standing is not None and not self._stopping:
                try:
                    await self.store.ensure_job(kind, declared.standing)
                    break
                except Exception as exc:  # the database is away: the claims wait for it the same way
                    reason = str(exc)[:200]
                    event(log, "cannot add a standing job", level=logging.WARNING, kind=kind, reason=reason)
                    await asyncio.sleep(DATABASE_RETRY)

    async def _heartbeat(self) -> None:
        """Extend the leases of the jobs running here, so only a dead or hung process loses them."""
        while True:
            await asyncio.sleep(self.settings.job_lease / 3)
            try:
                await self.store.extend_leases(list(self._held.values()))
            except Exception as exc:  # the database is away: the next beat tries again
                event(log, "lease heartbeat failed", level=logging.WARNING, reason=str(exc)[:200])

    async def turn(self) -> None:
        """One claim, and the wait for the next: until a job is due, a window opens, or (through
        jobs_changed) a job is added or finishes. Due jobs waiting for a slot wait for the latter."""
        self.store.jobs_changed.clear()
        paced_out = self.pace.blocked()
        busy = self.callbacks_busy()
        slots = {kind: k.slots - len(self._running[kind]) for kind, k in self.handlers.items()}
        if busy:  # callbacks first: while they pour in, one download at a time and the inbox in slices
            slots["download"] = min(slots["download"], 1 - len(self._running["download"]))
        if slots["submit"] > 0:
            await self.pace.send_probes(self._start)
            slots["submit"] = self.handlers["submit"].slots - len(self._running["submit"])
        try:
            claimed = await self.store.claim_due(
                slots,
                paced_out,
                self.pace.pacer.counted_providers(),
                BUSY_INBOX_SLICE if busy else INBOX_SLICE,
                self.pace.pacer.rate_windows(),
                self._per_tenant,
            )
        except Exception as exc:  # the database is away: jobs wait in it, try again shortly
            event(log, "cannot claim jobs", level=logging.WARNING, reason=str(exc)[:200])
            await asyncio.sleep(DATABASE_RETRY)
            return
        self._take(claimed)
        self._waiting_for_slots = _short(claimed.jobs, slots)
        if claimed.more_news or _filled(claimed.jobs, slots):
            if busy:
                await asyncio.sleep(BUSY_PAUSE)  # leave the loop (and the writer) to the callbacks
            return  # claim again at once: more may be due, or slots may have freed meanwhile
        now = self.clock.time()
        due = claimed.next_due
        longest = WORKER_LOOKS_EVERY
        wait = longest if due is None or due <= now else min(longest, due - now)
        opens = self.pace.next_change()
        try:  # asyncio.timeout: wait_for (3.11) can swallow the cancellation that stops the worker
            async with asyncio.timeout(wait if opens is None else min(wait, opens)):
                await self.store.jobs_changed.wait()
        except TimeoutError:
            pass

    def _take(self, claimed: Claimed) -> None:
        """What a claim brought: the pace of every process, the callbacks it applied, jobs to start."""
        self.pace.observe(claimed)
        for task_id, provider, result in claimed.applied:
            metrics.CALLBACKS_APPLIED.labels(provider, result).inc()
            level = logging.DEBUG if result == "changed" else logging.INFO
            event(log, "callback applied", level=level, task_id=task_id, provider=provider, result=result)
        for job in claimed.jobs:
            self._start(job)

    def _start(self, job: Job) -> asyncio.Task[None]:
        task = asyncio.create_task(self._run_job(job), name=f"job-{job.kind}-{job.id}")
        self._running[job.kind].add(task)
        self._held[job.id] = job
        task.add_done_callback(lambda done: self._job_done(job, done))
        return task

    def _job_done(self, job: Job, task: asyncio.Task[None]) -> None:
        self._running[job.kind].discard(task)
        self._held.pop(job.id, None)
        # A slot freed: look again only if due jobs of its kind may be waiting for one (the last claim
        # was short of slots, or tenants' caps or pacing held some back); else the next job added wakes
        # the worker. An empty turn costs a transaction of several statements.
        if job.kind in self._waiting_for_slots or job.kind in self._per_tenant or job.kind == "submit":
            self.store.jobs_changed.set()

    async def _run_job(self, job: Job) -> None:
        recording: Awaitable[object]
        try:
            await record(self.store, job, await self.handlers[job.kind].handler(job))
            return
        except asyncio.CancelledError:
            raise
        except StoreUnavailable as exc:  # the database is away: not the job's fault, it runs again
            event(log, "job interrupted", level=logging.WARNING, kind=job.kind, reason=str(exc)[:200])
            recording = self.store.retry_job(job, self._crashed.delay(job.attempts), str(exc))
        except Exception as exc:  # a bug, or a row it cannot read: never a loop (see Store.job_failed)
            log.exception("job %s %s for task %s failed", job.kind, job.id, job.task_id)
            reason = f"{type(exc).__name__}: {exc}"
            recording = self.store.job_failed(job, self._crashed.delay(job.attempts), reason)
        try:
            await recording
        except Exception:  # the database is away too: the job's lease runs out and it runs again
            log.warning("job %s %s left to its lease: cannot record the failure", job.kind, job.id)

    def running(self) -> int:
        return sum(len(tasks) for tasks in self._running.values())

    async def stop(self, grace: float) -> int:
        """Stop claiming; give running jobs `grace` seconds, then cancel the rest, which the next start
        runs again (their rows stay). Returns how many were cut short."""
        self._stopping = True
        self.store.jobs_changed.set()
        running = [task for tasks in self._running.values() for task in tasks]
        pending: set[asyncio.Task[None]] = set()
        if running:
            _, pending = await asyncio.wait(running, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.fetcher.close()  # after the downloads: none is left waiting on the child
        return len(pending)
