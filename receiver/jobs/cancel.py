"""The `cancel` job: ask the provider to stop a task the app cancelled after it was handed over.

Where the provider offers no cancel, the task is left to run there unheeded (its late news is recorded
and changes nothing). A cancel the provider could not take now (429, 5xx, no answer) is asked again a
few times with the default backoff; any other answer is final and recorded as the task's event.
"""

from __future__ import annotations

import logging

import httpx

from receiver.config import Settings
from receiver.jobs import Done
from receiver.jobs import Entry
from receiver.jobs import Outcome
from receiver.jobs import Retry
from receiver.jobs import retry_backoff
from receiver.jobs.calls import ProviderCalls
from receiver.logs import event
from receiver.models import ProviderRejected
from receiver.models import ProviderUnavailable
from receiver.models import Status
from receiver.providers import REGISTRY
from receiver.store import Job
from receiver.store import Store
from receiver.tasks import task_spec

log = logging.getLogger("receiver.worker")
CANCEL_TRIES = 5


class Cancel:
    def __init__(self, settings: Settings, store: Store, calls: ProviderCalls) -> None:
        self.store = store
        self.calls = calls
        self.backoff = retry_backoff(settings, tries=CANCEL_TRIES)

    async def __call__(self, job: Job) -> Outcome:
        row = await self.store.task_row(job.task_id)
        if row is None or row.status != Status.CANCELLED:
            return Done()
        provider = REGISTRY[row.provider]
        request = provider.build_cancel(task_spec(row), self.calls.context(row))
        if request is None:
            note = f"{provider.name} offers no cancel: the task is left to run there, its results unheeded"
            return Done(Entry("cancel", note))
        try:
            response = await self.calls.call(provider.name, "cancel", request)
            said = provider.parse_cancel(response)
        except (ProviderUnavailable, httpx.HTTPError) as exc:
            message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
            if self.backoff.spent(job.attempts):
                return Done(Entry("cancel", f"{provider.name} did not take the cancel: {message}"[:500]))
            delay = self.backoff.delay(job.attempts, getattr(exc, "retry_after", None))
            return Retry(delay, message, Entry("cancel", f"cancel at {provider.name} failed: {message}"))
        except ProviderRejected as exc:
            return Done(Entry("cancel", f"{provider.name} refused the cancel: {exc.message}"[:500]))
        event(log, "cancel sent", task_id=job.task_id, provider=provider.name, answer=said)
        return Done(Entry("cancel", f"cancel sent to {provider.name}: {said}"))
