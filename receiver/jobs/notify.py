"""The `notify` job: one signed delivery attempt of a task's end to its `notify_url` (receiver.notify
does the POST), then delivered, stopped by a 410, given up, or due again at the next step of
RECEIVER_NOTIFY_SCHEDULE (±10 %, or the app's longer `Retry-After`)."""

from __future__ import annotations

import logging

from receiver import metrics
from receiver.config import Settings
from receiver.jobs import Backoff
from receiver.jobs import Done
from receiver.jobs import Entry
from receiver.jobs import Outcome
from receiver.jobs import Retry
from receiver.logs import event
from receiver.logs import url_host
from receiver.notify import Attempt
from receiver.notify import Notifier
from receiver.notify import message_id
from receiver.schema import NOTIFICATION_TYPES
from receiver.schema import Notification
from receiver.schema import encode
from receiver.store import Job
from receiver.store import Store
from receiver.tasks import iso
from receiver.tasks import render_task
from receiver.tokens import Tokens

log = logging.getLogger("receiver.notify")
JITTER = 0.1  # each wait is the schedule's step ±10 %, so many apps failing at once do not retry in step


class Notify:
    def __init__(self, settings: Settings, store: Store, tokens: Tokens, notifier: Notifier) -> None:
        self.store = store
        self.tokens = tokens
        self.notifier = notifier
        schedule = settings.notify_schedule
        self.backoff = Backoff(delays=schedule, jitter=(1 - JITTER, 1 + JITTER), tries=len(schedule))

    async def __call__(self, job: Job) -> Outcome:
        row = await self.store.task_view(job.task_id)
        if row is None or not row.notify_url or not row.status.terminal:
            return Done()
        task = render_task(row, await self.store.image_rows(job.task_id), self.tokens)
        kind = NOTIFICATION_TYPES[row.status]
        body = encode(Notification(type=kind, timestamp=iso(row.completed_at or row.updated_at), data=task))
        in_flight = metrics.NOTIFICATIONS_IN_FLIGHT.labels(row.tenant)
        in_flight.inc()
        try:
            attempt = await self.notifier.post(row.notify_url, message_id(job.task_id), body)
        finally:
            in_flight.dec()
        result, outcome = self.judge(job, attempt)
        metrics.NOTIFICATIONS.labels(result).inc()
        event(
            log,
            f"notification {result.replace('_', ' ')}",
            level=logging.INFO if result == "delivered" else logging.WARNING,
            task_id=job.task_id,
            attempt=job.attempts,
            status=attempt.status,
            host=url_host(row.notify_url),
        )
        return outcome

    def judge(self, job: Job, attempt: Attempt) -> tuple[str, Outcome]:
        """What the attempt came to (for the metric and the log line), and the job's outcome."""
        number = f"attempt {job.attempts}"
        said = attempt.problem or f"HTTP {attempt.status}"
        if attempt.elapsed_ms is not None:
            said += f" ({attempt.elapsed_ms} ms)"
        if attempt.status is not None and 200 <= attempt.status < 300:
            return "delivered", self._done(f"{number}: delivered, {said}", attempt)
        if attempt.status == 410:
            return "gone", self._done(f"{number}: {said}; the app said Gone, no more attempts", attempt)
        if self.backoff.spent(job.attempts):
            return "gave_up", self._done(f"{number}: {said}; gave up, that was the last attempt", attempt)
        retry_in = self.backoff.delay(job.attempts, attempt.retry_after)
        summary = f"{number}: {said}; next attempt in {retry_in:.{2 if retry_in < 10 else 0}f} s"
        return "retry", Retry(retry_in, summary[:500], Entry("notify", summary, attempt.answer))

    @staticmethod
    def _done(summary: str, attempt: Attempt) -> Done:
        return Done(Entry("notify", summary, attempt.answer))
