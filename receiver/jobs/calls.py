"""Requests to providers from the jobs: capped answers, counted by provider, endpoint and answer."""

from __future__ import annotations

import httpx

from receiver import USER_AGENT
from receiver import metrics
from receiver.config import Settings
from receiver.jobs import Clock
from receiver.models import ProviderUnavailable
from receiver.providers import Context
from receiver.store import TaskRecord
from receiver.tokens import Tokens

MAX_PROVIDER_ANSWER = 4 * 1024 * 1024
CONNECT_TIMEOUT = 10.0


async def send_capped(client: httpx.AsyncClient, request: httpx.Request, cap: int) -> httpx.Response:
    """Send and read the answer, refusing to hold more than `cap` bytes of it."""
    response = await client.send(request, stream=True)
    try:
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > cap:
                raise ProviderUnavailable(f"the answer is over {cap} bytes", maybe_ran=True)
    finally:
        await response.aclose()
    return httpx.Response(
        response.status_code, headers=response.headers, content=bytes(body), request=request
    )


class ProviderCalls:
    def __init__(self, settings: Settings, tokens: Tokens, http: httpx.AsyncClient, clock: Clock) -> None:
        self.settings = settings
        self.tokens = tokens
        self.http = http
        self.clock = clock

    def context(self, row: TaskRecord) -> Context:
        # The callback URL names the provider and the hop it is for (see receiver.tokens).
        return Context(
            settings=self.settings.provider(row.provider),
            callback_url=self.tokens.callback_url(row.provider, row.id, len(row.attempts)),
        )

    async def call(self, provider: str, endpoint: str, request: httpx.Request) -> httpx.Response:
        """A request to a provider, counted by provider, endpoint and answer."""
        request.headers["User-Agent"] = USER_AGENT
        started = self.clock.monotonic()
        try:
            response = await send_capped(self.http, request, MAX_PROVIDER_ANSWER)
        except (httpx.HTTPError, ProviderUnavailable):
            metrics.PROVIDER_REQUESTS.labels(provider, endpoint, "error").inc()
            raise
        finally:
            metrics.PROVIDER_SECONDS.labels(provider, endpoint).observe(self.clock.monotonic() - started)
        metrics.PROVIDER_REQUESTS.labels(provider, endpoint, str(response.status_code)).inc()
        return response
