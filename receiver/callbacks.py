"""/callbacks/{provider}/{token}: capped raw body → token → provider signature → parse → store → 2xx.

Nothing slow happens before the answer. After the size and token checks, one store operation reads the
task, has the provider verify and parse the body, and records the news (with the download jobs it calls
for) in the same transaction: one hand-off to the writer per callback, and no gap between what was
checked and what is applied. The worker does the rest.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from receiver import metrics
from receiver.config import ProviderSettings, Settings
from receiver.models import Outcome
from receiver.providers import REGISTRY, Context, Provider
from receiver.store import Store, Verdict
from receiver.tasks import task_spec
from receiver.tokens import Tokens
from receiver.web import ApiError, error_response, read_capped

log = logging.getLogger("receiver.callbacks")
# What a refused callback is answered: a bad token or signature is a 401, a verified but unreadable body
# a 400, a genuine token for a task we no longer have a 404.
REFUSALS = {
    "missing": (404, "not_found"),
    "bad_token": (401, "bad_token"),
    "bad_signature": (401, "bad_signature"),
    "malformed": (400, "malformed"),
    "wrong_task": (400, "wrong_task"),
}
KEY_SET_TTL = 24 * 3600.0
KEY_SET_REFRESH = 60.0
MAX_KEY_SET_BYTES = 256 * 1024


class KeySets:
    """Public key sets (e.g. a JWKS) providers verify with: cached a day, fetched again when no key
    verifies, at most once a minute. When none can be had, callbacks fail closed."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client
        self._cache: dict[str, tuple[float, Any]] = {}
        self._tried: dict[str, float] = {}
        self._lock = asyncio.Lock()

    async def get(self, url: str, *, refresh: bool = False) -> Any:
        now = time.monotonic()
        cached = self._cache.get(url)
        if cached and not refresh and now - cached[0] < KEY_SET_TTL:
            return cached[1]
        async with self._lock:
            cached = self._cache.get(url)
            if now - self._tried.get(url, -KEY_SET_REFRESH) < KEY_SET_REFRESH:
                return cached[1] if cached else None
            self._tried[url] = now
            try:
                response = await self._client.get(url)
                response.raise_for_status()
                if len(response.content) > MAX_KEY_SET_BYTES:
                    raise ValueError("key set too large")
                keys = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("could not fetch the key set at %s: %s", url, type(exc).__name__)
                return cached[1] if cached else None
            self._cache[url] = (now, keys)
            return keys


class Callbacks:
    def __init__(self, settings: Settings, store: Store, tokens: Tokens, key_sets: KeySets) -> None:
        self.settings = settings
        self.store = store
        self.tokens = tokens
        self.key_sets = key_sets

    async def receive(self, request: Request) -> Response:
        started = time.perf_counter()
        provider_name = request.path_params["provider"]
        result = "rejected"
        try:
            response, result = await self._receive(request, provider_name)
        except ApiError as exc:
            response = error_response(exc.status, exc.code, exc.message)
            result = f"rejected_{exc.code}"
        label = provider_name if provider_name in REGISTRY else "unknown"
        metrics.callback_seen(label, result, time.perf_counter() - started)
        return response

    async def _receive(self, request: Request, provider_name: str) -> tuple[Response, str]:
        raw = await read_capped(request, self.settings.max_callback_bytes)
        task_id = self.tokens.task_of(request.path_params["token"])
        provider = REGISTRY.get(provider_name)
        if task_id is None or provider is None:
            raise ApiError(401, "bad_token", "the callback token is not valid")
        settings = self.settings.provider(provider_name)
        headers = {key.lower(): value for key, value in request.headers.items()}
        key_url = provider.key_set_url(settings)
        keys = await self.key_sets.get(key_url) if key_url else None
        verdict = await self._judge(task_id, provider, settings, headers, raw, keys)
        if verdict.result == "bad_signature" and key_url:
            # Keys rotate: fetch the set again (at most once a minute) and judge once more.
            fresh = await self.key_sets.get(key_url, refresh=True)
            if fresh is not None and fresh != keys:
                verdict = await self._judge(task_id, provider, settings, headers, raw, fresh)
        if verdict.result in REFUSALS:
            status, code = REFUSALS[verdict.result]
            raise ApiError(status, code, verdict.message)
        return JSONResponse({"code": 200, "msg": "success"}), verdict.result

    async def _judge(
        self,
        task_id: str,
        provider: Provider,
        settings: ProviderSettings,
        headers: dict[str, str],
        raw: bytes,
        keys: Any,
    ) -> Verdict:
        def judge(row: sqlite3.Row) -> Outcome:
            """Pure: the provider's signature check, then its reading of the body."""
            spec = task_spec(row)
            provider.verify_callback(headers, raw, spec, Context(settings, keys=keys), time.time())
            return provider.parse_callback(raw)

        return await self.store.receive_callback(
            task_id, provider.name, judge, urgent=provider.early_download
        )
