"""Notifications to the app: Standard Webhooks signing and the durable `notify` job that delivers them.

A task that ends with a `notify_url` gets a `notify` job in the same transaction (store/rules.py,
_finish), so a restart loses nothing. Each attempt is one POST, signed afresh, never redirected, over in
`notify_timeout` seconds; it is recorded as a task event with the first 2 KB of the app's answer. At most
RECEIVER_NOTIFY_CONCURRENCY_PER_TENANT of one tenant's are delivered at once (the worker's claim keeps to
it), so one tenant's hanging hosts leave the other slots to the other tenants. A 2xx
ends the job, a 410 stops it for good, anything else waits for the next step of the schedule (or the
app's longer Retry-After) until the schedule runs out.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import httpx

from receiver import metrics
from receiver.config import Settings
from receiver.downloads import AddressRefused
from receiver.downloads import check_url
from receiver.logs import event
from receiver.logs import url_host
from receiver.models import Status
from receiver.schema import Notification
from receiver.schema import encode
from receiver.store import Job
from receiver.store import Store
from receiver.tasks import iso
from receiver.tasks import render_task
from receiver.tokens import Tokens
from receiver.webhooks import WebhookSigner

log = logging.getLogger("receiver.notify")
ANSWER_EXCERPT = 2048
JITTER = 0.1  # each wait is the schedule's step ±10 %, so many apps failing at once do not retry in step
MAX_RETRY_AFTER = 86_400.0  # an app may ask for a pause, not for the notification to be parked for ever
# A host that does not even accept the connection is given up on sooner than one that is slow to answer.
CONNECT_TIMEOUT = 3.0


def message_id(task_id: str) -> str:
    """The same for every attempt at one task's notification, so the app can drop repeats."""
    return f"msg_{task_id}"


def retry_after(value: str | None, now: float) -> float | None:
    """Seconds the app asked us to wait: `Retry-After` as delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return min(max(0.0, when.timestamp() - now), MAX_RETRY_AFTER)


@dataclass(frozen=True)
class Attempt:
    """What one POST came to; `status` None when no HTTP answer came at all."""

    status: int | None
    elapsed_ms: int | None  # None when the address guard refused before anything was sent
    answer: str | None
    retry_after: float | None
    problem: str | None = None


class Notifier:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        tokens: Tokens,
        client: httpx.AsyncClient,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.tokens = tokens
        self.client = client
        self.clock = clock
        self.signer = WebhookSigner(settings.notify_secrets)

    async def deliver(self, job: Job) -> None:
        """The `notify` job: one attempt, then done, stopped, given up, or due again later."""
        row = await self.store.task_view(job.task_id)
        if row is None or not row.notify_url or not row.status.terminal:
            await self.store.finish_job(job)
            return
        task = render_task(row, await self.store.image_rows(job.task_id), self.tokens)
        kind: Literal["task.succeeded", "task.failed"] = (
            "task.succeeded" if row.status == Status.SUCCEEDED else "task.failed"
        )
        body = encode(Notification(type=kind, timestamp=iso(row.completed_at or row.updated_at), data=task))
        in_flight = metrics.NOTIFICATIONS_IN_FLIGHT.labels(row.tenant)
        in_flight.inc()
        try:
            attempt = await self.post(row.notify_url, message_id(job.task_id), body)
        finally:
            in_flight.dec()

        number = f"attempt {job.attempts}"
        outcome = attempt.problem or f"HTTP {attempt.status}"
        if attempt.elapsed_ms is not None:
            outcome += f" ({attempt.elapsed_ms} ms)"
        if attempt.status is not None and 200 <= attempt.status < 300:
            result, summary, retry_in = "delivered", f"{number}: delivered, {outcome}", None
        elif attempt.status == 410:
            result, summary, retry_in = (
                "gone",
                f"{number}: {outcome}; the app said Gone, no more attempts",
                None,
            )
        elif job.attempts > len(self.settings.notify_schedule):
            result, summary, retry_in = (
                "gave_up",
                f"{number}: {outcome}; gave up, that was the last attempt",
                None,
            )
        else:
            result = "retry"
            step = self.settings.notify_schedule[job.attempts - 1]
            retry_in = step * random.uniform(1 - JITTER, 1 + JITTER)
            if attempt.retry_after is not None and attempt.retry_after > retry_in:
                retry_in = attempt.retry_after
            summary = f"{number}: {outcome}; next attempt in {retry_in:.{2 if retry_in < 10 else 0}f} s"
        await self.store.record_notify_attempt(job, summary, attempt.answer, retry_in)
        metrics.NOTIFICATIONS.labels(result).inc()
        level = logging.INFO if result == "delivered" else logging.WARNING
        event(
            log,
            f"notification {result.replace('_', ' ')}",
            level=level,
            task_id=job.task_id,
            attempt=job.attempts,
            status=attempt.status,
            host=url_host(row.notify_url),
        )

    async def post(self, url: str, message: str, body: bytes) -> Attempt:
        """One signed POST: the address guard first, no redirects, `notify_timeout` for all of it."""
        problem = await check_url(url, self.settings.allow_private_urls)
        if problem:
            return Attempt(None, None, None, None, f"refused: {problem}")
        # Only 2 KB of the answer is read: asking for it uncompressed means nothing inflates past that.
        headers = {**self.signer.headers(message, int(self.clock()), body), "accept-encoding": "identity"}
        started = time.monotonic()
        timeout = self.settings.notify_timeout
        try:
            async with asyncio.timeout(timeout):
                request = self.client.build_request(
                    "POST",
                    url,
                    content=body,
                    headers=headers,
                    timeout=httpx.Timeout(timeout, connect=min(CONNECT_TIMEOUT, timeout)),
                )
                response = await self.client.send(request, stream=True, follow_redirects=False)
                try:
                    answer = await _excerpt(response)
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.TimeoutException):
            problem = f"no answer within {self.settings.notify_timeout:g} s"
        except AddressRefused as exc:
            problem = f"refused: {exc}"
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc or 'network error'}"
        elapsed_ms = round((time.monotonic() - started) * 1000)
        if problem:
            return Attempt(None, elapsed_ms, None, None, problem)
        wait = retry_after(response.headers.get("retry-after"), self.clock())
        return Attempt(response.status_code, elapsed_ms, answer, wait)


async def _excerpt(response: httpx.Response) -> str:
    """The first 2 KB of the answer, read no further than that."""
    head = bytearray()
    async for chunk in response.aiter_bytes():
        head += chunk
        if len(head) >= ANSWER_EXCERPT:
            break
    return bytes(head[:ANSWER_EXCERPT]).decode("utf-8", errors="replace")
