"""The `submit` job: hand a queued task to its provider, within the provider's pace.

A submit that fails before reaching the provider is tried again with the default backoff (or the
provider's longer `Retry-After`); one that may have reached it is never sent again (see `maybe_ran`).
"""

from __future__ import annotations

import logging

import httpx

from receiver.config import Settings
from receiver.jobs import Clock
from receiver.jobs import Done
from receiver.jobs import Entry
from receiver.jobs import Fail
from receiver.jobs import Outcome
from receiver.jobs import Retry
from receiver.jobs import retry_backoff
from receiver.jobs.calls import CONNECT_TIMEOUT
from receiver.jobs.calls import ProviderCalls
from receiver.logs import event
from receiver.media import Media
from receiver.media import MediaError
from receiver.models import OUTCOME_UNKNOWN
from receiver.models import ErrorCode
from receiver.models import ProviderRejected
from receiver.models import ProviderUnavailable
from receiver.models import Status
from receiver.models import Submission
from receiver.models import TaskError
from receiver.pacing import Limits
from receiver.pacing import Pacer
from receiver.providers import REGISTRY
from receiver.providers import Provider
from receiver.store import Job
from receiver.store import Store
from receiver.store import TaskRecord
from receiver.tasks import task_spec
from receiver.tasks import uploads_of
from receiver.tokens import Tokens

log = logging.getLogger("receiver.worker")
# Failures after which the request surely never reached the provider: retried freely. Anything else
# that breaks after sending (read timeout, dropped connection, unreadable answer) may have run.
NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)


def maybe_ran(exc: Exception) -> bool:
    """Whether a failed submit may have reached the provider and run there (so it must not be resent)."""
    if isinstance(exc, ProviderUnavailable):
        return exc.maybe_ran
    return isinstance(exc, httpx.TransportError) and not isinstance(exc, NEVER_SENT)


def build_pacer(settings: Settings) -> Pacer:
    """Each provider's limits: its own documented defaults, overridden by <NAME>_MAX_* settings."""
    groups = {name: provider.pace_group or name for name, provider in REGISTRY.items()}
    limits: dict[str, Limits] = {}
    for group in set(groups.values()):
        owner = (
            REGISTRY[group]
            if group in REGISTRY
            else REGISTRY[next(p for p, g in groups.items() if g == group)]
        )
        configured = settings.provider(owner.name)
        per_window, window = owner.rate_limit or (None, 60.0)
        if configured.max_per_minute:
            per_window, window = configured.max_per_minute, 60.0
        limits[group] = Limits(
            per_window=per_window,
            window=window,
            max_concurrent=configured.max_concurrent or owner.max_concurrent,
            max_concurrent_by_model=owner.max_concurrent_by_model,
        )
    return Pacer(groups, limits)


class Submit:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        tokens: Tokens,
        media: Media,
        calls: ProviderCalls,
        pacer: Pacer,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.store = store
        self.tokens = tokens
        self.media = media
        self.calls = calls
        self.pacer = pacer
        self.clock = clock
        self.backoff = retry_backoff(settings, tries=settings.submit_retries)

    async def __call__(self, job: Job) -> Outcome:
        row = await self.store.task_row(job.task_id)
        if row is None or row.status != Status.QUEUED or job.arg != len(row.attempts):
            # A callback or the deadline got there first, or the task has moved to a fallback provider
            # since this job was made (each hop has its own submit job, numbered by the hop).
            return Done()
        provider = REGISTRY[row.provider]
        if not await self._acquire(job, row, provider):
            return Retry(0.0, "", requeue=True)  # its turn comes when the provider has room again
        try:
            return await self._send(job, row, provider)
        finally:
            if self.pacer.release(provider.name, row.model):
                await self.store.pace_end_probe(self.pacer.group_of(provider.name))

    async def _acquire(self, job: Job, row: TaskRecord, provider: Provider) -> bool:
        """A slot in this process's pacer, then the same again in the database, for every worker
        process at once (see receiver.pacing)."""
        counted = self.pacer.counted_providers()
        counts = await self.store.in_flight(counted) if provider.name in counted else {}
        if not self.pacer.try_acquire(provider.name, row.model, counts, now=self.clock.monotonic()):
            return False
        group = self.pacer.group_of(provider.name)
        limits = self.pacer.limits_of(group)
        probe = self._timeout(provider) + CONNECT_TIMEOUT if self.pacer.probing(group) else 0.0
        try:
            taken = await self.store.pace_acquire(
                job, group, self.pacer.providers_of(group), limits.per_window, limits.window, probe
            )
        except BaseException:
            self.pacer.cancel(provider.name, row.model)
            raise
        if not taken:
            self.pacer.cancel(provider.name, row.model)
        return taken

    def _timeout(self, provider: Provider) -> float:
        return self.settings.sync_timeout if provider.synchronous else self.settings.http_timeout

    async def _send(self, job: Job, row: TaskRecord, provider: Provider) -> Outcome:
        timeout = self._timeout(provider)
        try:
            inline = None
            if provider.inline_images:
                inline = {name: await self.media.read(f"uploads/{name}") for name in uploads_of(row)}
            spec = task_spec(row, self.tokens, inline)
            request = provider.build_submit(spec, self.calls.context(row))
            # A synchronous provider generates inside this call: it gets the long timeout.
            request.extensions["timeout"] = httpx.Timeout(timeout, connect=CONNECT_TIMEOUT).as_dict()
            response = await self.calls.call(provider.name, "submit", request)
            submission = provider.parse_submit(response)
        except ProviderRejected as exc:
            error = TaskError(ErrorCode.PROVIDER_REJECTED, exc.message, exc.provider_code)
            return Fail(error, provider.name)
        except (ProviderUnavailable, httpx.HTTPError, MediaError) as exc:
            return await self._failed(job, provider, exc, timeout)
        await self.store.record_submission(
            job, submission, urgent=provider.early_download, provider=provider.name
        )
        event(
            log,
            "task submitted",
            task_id=job.task_id,
            provider=provider.name,
            provider_task_id=submission.provider_task_id,
            synchronous=submission.outcome is not None,
        )
        return Done(recorded=True)

    async def _failed(self, job: Job, provider: Provider, exc: Exception, timeout: float) -> Outcome:
        message = exc.message if isinstance(exc, ProviderUnavailable) else f"{type(exc).__name__}: {exc}"
        if maybe_ran(exc):
            if isinstance(exc, httpx.TimeoutException):
                message = f"no answer within {timeout:g} s ({message})"
            return await self._outcome_unknown(job, provider, message)
        if self.backoff.spent(job.attempts):
            message = f"gave up after {job.attempts} tries: {message}"
            return Fail(TaskError(ErrorCode.PROVIDER_UNAVAILABLE, message), provider.name)
        after = exc.retry_after if isinstance(exc, ProviderUnavailable) else None
        delay = self.backoff.delay(job.attempts, after)
        limited = isinstance(exc, ProviderUnavailable) and exc.rate_limited
        if limited:
            # A 429 despite pacing: hold back every task of this provider, not only this one.
            group = self.pacer.group_of(provider.name)
            shared = await self.store.pace_hold(group, delay, self.pacer.probing(group))
            self.pacer.hold(provider.name, delay, now=self.clock.monotonic(), shared=shared)
        event(
            log,
            "submit failed, will retry",
            level=logging.WARNING,
            task_id=job.task_id,
            provider=provider.name,
            attempt=job.attempts,
            retry_in=round(delay, 2),
            reason=message[:200],
        )
        # A rate-limited one keeps its place in the queue and goes first (alone) when the hold ends.
        entry = Entry("submit", f"try {job.attempts} failed: {message}")
        # A 429 is the pacing's business (a hold), not a failure of the provider's health.
        return Retry(delay, message, entry, requeue=limited, provider_failed="" if limited else provider.name)

    async def _outcome_unknown(self, job: Job, provider: Provider, reason: str) -> Outcome:
        """The request reached the provider and no clear answer came back: it may be running (and
        billed), so it is never sent again. A provider that calls back names our task in its callback
        URL, so the task waits for that callback (or reconcile, or the deadline); a synchronous one has
        nothing to wait for or ask, so the task fails and says the provider may have run it."""
        event(
            log,
            "submit outcome unknown, not sent again",
            level=logging.WARNING,
            task_id=job.task_id,
            provider=provider.name,
            reason=reason[:200],
        )
        if provider.synchronous:
            message = (
                f"{reason}; {provider.name} may have run the task (and charged for it) without"
                " answering, so it is not sent again"
            )
            return Fail(TaskError(ErrorCode.PROVIDER_UNAVAILABLE, message, OUTCOME_UNKNOWN), provider.name)
        note = (
            f"outcome unknown: {reason}; the provider may have accepted the task, so it is not sent"
            " again: waiting for its callback (RECEIVER_TASK_DEADLINE ends the task otherwise)"
        )
        await self.store.record_submission(
            job, Submission(provider_task_id=None, note=note), provider=provider.name, unanswered=True
        )
        return Done(recorded=True)
