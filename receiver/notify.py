"""Notifications to the app: Standard Webhooks signing and delivery for the durable `notify` job.

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
from dataclasses import dataclass

import httpx

from receiver.config import Settings
from receiver.downloads import AddressRefused
from receiver.downloads import check_url
from receiver.jobs import SYSTEM_CLOCK
from receiver.jobs import Clock
from receiver.webhooks import WebhookSigner

log = logging.getLogger("receiver.notify")
ANSWER_EXCERPT = 2048
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
        client: httpx.AsyncClient,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.settings = settings
        self.client = client
        self.clock = clock
        self.signer = WebhookSigner(settings.notify_secrets)

    async def post(self, url: str, message: str, body: bytes) -> Attempt:
        """One signed POST: the address guard first, no redirects, `notify_timeout` for all of it."""
        problem = await check_url(url, self.settings.allow_private_urls)
        if problem:
            return Attempt(None, None, None, None, f"refused: {problem}")
        # Only 2 KB of the answer is read: asking for it uncompressed means nothing inflates past that.
        signed = self.signer.headers(message, int(self.clock.time()), body)
        headers = {**signed, "accept-encoding": "identity"}
        started = self.clock.monotonic()
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
        elapsed_ms = round((self.clock.monotonic() - started) * 1000)
        if problem:
            return Attempt(None, elapsed_ms, None, None, problem)
        wait = retry_after(response.headers.get("retry-after"), self.clock.time())
        return Attempt(response.status_code, elapsed_ms, answer, wait)


async def _excerpt(response: httpx.Response) -> str:
    """The first 2 KB of the answer, read no further than that."""
    head = bytearray()
    async for chunk in response.aiter_bytes():
        head += chunk
        if len(head) >= ANSWER_EXCERPT:
            break
    return bytes(head[:ANSWER_EXCERPT]).decode("utf-8", errors="replace")
