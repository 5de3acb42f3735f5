"""The `reconcile` job: ask the provider's status endpoint about a task whose callback has not come.

Its news takes the same path as a callback's (`Store.apply_outcome`); while the task is pending the next
question waits twice as long as the last, from RECEIVER_RECONCILE_INTERVAL up to MAX_RECONCILE_INTERVAL.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import httpx

from receiver.config import Settings
from receiver.jobs import Backoff
from receiver.jobs import Done
from receiver.jobs import Entry
from receiver.jobs import Outcome
from receiver.jobs import Retry
from receiver.jobs.calls import ProviderCalls
from receiver.logs import event
from receiver.models import Outcome as News
from receiver.models import ProviderRejected
from receiver.models import ProviderUnavailable
from receiver.models import Status
from receiver.providers import REGISTRY
from receiver.providers import Provider
from receiver.store import Job
from receiver.store import Store
from receiver.tasks import task_spec

log = logging.getLogger("receiver.worker")
MAX_RECONCILE_INTERVAL = 600.0
MAX_STATUS_HOPS = 3


class Reconcile:
    def __init__(self, settings: Settings, store: Store, calls: ProviderCalls) -> None:
        self.store = store
        self.calls = calls
        self.backoff = Backoff(base=settings.reconcile_interval, factor=2.0, cap=MAX_RECONCILE_INTERVAL)

    async def __call__(self, job: Job) -> Outcome:
        row = await self.store.task_row(job.task_id)
        if row is None or row.status != Status.SUBMITTED:
            return Done()
        provider = REGISTRY[row.provider]
        interval = self.backoff.delay(job.attempts)
        request = provider.build_status(task_spec(row), self.calls.context(row))
        if request is None:
            return Retry(interval, "nothing to ask yet")
        try:
            news = await self._ask(provider, request)
        except (ProviderUnavailable, ProviderRejected, httpx.HTTPError) as exc:
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            event(
                log,
                "status query failed",
                level=logging.WARNING,
                task_id=job.task_id,
                provider=provider.name,
                reason=message[:200],
            )
            delay = self.backoff.delay(job.attempts, getattr(exc, "retry_after", None))
            return Retry(delay, message, Entry("poll", f"status query failed: {message}"))
        news = replace(news, provider=provider.name)  # stale if the task moved on meanwhile
        change = await self.store.apply_outcome(job.task_id, news, "poll", urgent=provider.early_download)
        event(
            log,
            "status polled",
            task_id=job.task_id,
            provider=provider.name,
            state=news.state,
            change=change or None,
        )
        return Retry(interval, "still pending") if news.state == "pending" else Done()

    async def _ask(self, provider: Provider, request: httpx.Request) -> News:
        """The provider's answer, following its status query through up to MAX_STATUS_HOPS requests."""
        answer: News | httpx.Request = request
        for _ in range(MAX_STATUS_HOPS):
            if not isinstance(answer, httpx.Request):
                break
            response = await self.calls.call(provider.name, "status", answer)
            answer = provider.parse_status(response)
        if isinstance(answer, httpx.Request):
            raise ProviderUnavailable(f"the status query did not settle in {MAX_STATUS_HOPS} requests")
        return answer
