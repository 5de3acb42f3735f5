"""/callbacks/{provider}/{token}: capped raw body → token → provider signature → parse → inbox → 2xx.

Nothing that can wait happens before the answer: the task is read by primary key, the provider checks
the signature and reads the body (pure work), and the verified news is kept as one inbox row, committed
together with the other callbacks of the moment. The worker applies it right after (state change, image
rows, download jobs, the event) in the same order the callbacks came.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any
from typing import Literal

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive
from starlette.types import Scope
from starlette.types import Send

from receiver import metrics
from receiver.config import ProviderSettings
from receiver.config import Settings
from receiver.logs import event
from receiver.models import CallbackRejected
from receiver.models import MalformedCallback
from receiver.models import Outcome
from receiver.models import TaskSpec
from receiver.providers import REGISTRY
from receiver.providers import Context
from receiver.providers import Provider
from receiver.store import Store
from receiver.store import TaskRecord
from receiver.tasks import task_spec
from receiver.tokens import Tokens
from receiver.untrusted import read_json
from receiver.web import ApiError
from receiver.web import error_response
from receiver.web import read_capped

log = logging.getLogger("receiver.callbacks")
BURST = 8  # callbacks in flight at once from which the worker steps back and lets them go first
KEY_SET_TTL = 24 * 3600.0
MAX_KEY_SET_BYTES = 256 * 1024
# The answer to every callback taken (kept or late): bytes encoded once, not JSON rendered per request.
ACK = b'{"code":200,"msg":"success"}'


def ack() -> Response:
    return Response(ACK, media_type="application/json")


class KeySets:
    """Public key sets (e.g. a JWKS) providers verify with: cached a day, fetched again when no key
    verifies, at most once a minute. When none can be had, callbacks fail closed."""

    def __init__(self, client: httpx.AsyncClient, refresh_interval: float = 60.0) -> None:
        self._client = client
        self._refresh_interval = refresh_interval
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
            tried = self._tried.get(url)
            if tried is not None and now - tried < self._refresh_interval:
                return cached[1] if cached else None
            self._tried[url] = now
            try:
                response = await self._client.get(url)
                response.raise_for_status()
                if len(response.content) > MAX_KEY_SET_BYTES:
                    raise ValueError("key set too large")
                keys = read_json(response.content)
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("could not fetch the key set at %s: %s", url, type(exc).__name__)
                return cached[1] if cached else None
            self._cache[url] = (now, keys)
            return keys


Standing = Literal["current", "late", "refused"]


def token_standing(row: TaskRecord, route: str, hop: int | None) -> Standing:
    """What a verified token posted to `route` may do for the task: "current" (its news counts),
    "late" (the provider and hop the task has left: recorded, changes nothing) or "refused".

    A token names the provider and the hop it was issued for, so it counts only at that provider's
    route while the task is still at that hop. A token from before tokens named them (`hop` None) is
    good only while the task is still with its first provider: once the task has moved, it cannot tell
    the provider now responsible from one it left, so it is refused and a task that was submitted with
    one after a fallback is finished by reconcile's status queries instead."""
    current = len(row.attempts)
    if hop is None:
        if route == row.provider and current == 0:
            return "current"
        return "late" if any(attempt.get("provider") == route for attempt in row.attempts) else "refused"
    if hop == current:
        return "current" if route == row.provider else "refused"
    if hop < current and row.attempts[hop].get("provider") == route:
        return "late"
    return "refused"


class Callbacks:
    def __init__(self, settings: Settings, store: Store, tokens: Tokens, key_sets: KeySets) -> None:
        self.settings = settings
        self.store = store
        self.tokens = tokens
        self.key_sets = key_sets
        self._answering = 0

    def busy(self) -> bool:
        """Whether a burst of callbacks is on: many verified ones being answered at once, not a steady
        trickle. Only callbacks past their token and signature count, so connections that drip a body
        (or carry no valid token) cannot make downloads step back."""
        return self._answering >= BURST

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The callback routes' ASGI app: Starlette's per-route wrappers (a second exception layer
        and a closure per request) cost a callback more than they give it; the app-level error
        handlers still answer whatever is raised before the response starts."""
        response = await self.receive(Request(scope, receive))
        await response(scope, receive, send)

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
        seconds = time.perf_counter() - started
        metrics.callback_seen(label, result, seconds)
        event(
            log,
            f"callback {result}",
            level=logging.INFO if result == "accepted" else logging.WARNING,
            task_id=getattr(request.state, "task_id", None),
            provider=label,
            ms=round(seconds * 1000, 2),
        )
        return response

    async def _receive(self, request: Request, provider_name: str) -> tuple[Response, str]:
        raw = await read_capped(request, self.settings.max_callback_bytes, self.settings.body_timeout)
        claim = self.tokens.callback_of(provider_name, request.path_params["token"])
        provider = REGISTRY.get(provider_name)
        if claim is None or provider is None:
            raise ApiError(401, "bad_token", "the callback token is not valid")
        task_id = claim.task_id
        request.state.task_id = task_id
        row = await self.store.task_row(task_id)
        if row is None:
            raise ApiError(404, "not_found", "no such task")
        standing = token_standing(row, provider_name, claim.hop)
        if standing == "refused":
            raise ApiError(401, "bad_token", "the callback token is not valid for this provider")
        if standing == "late":
            # A provider the task has left (fallback) reports late: recorded, changes nothing, and
            # answered 2xx so it stops retrying.
            summary = f"late callback from {provider_name} (the task moved to {row.provider}): ignored"
            await self.store.add_refusal(task_id, "callback", False, summary)
            return ack(), "late"
        spec = task_spec(row)
        settings = self.settings.provider(provider_name)
        headers = {key.lower(): value for key, value in request.headers.items()}
        try:
            await self._verify(provider, headers, raw, spec, settings)
        except CallbackRejected as exc:
            await self.store.add_refusal(task_id, "callback", False, f"signature refused: {exc}")
            raise ApiError(401, "bad_signature", str(exc)) from None
        self._answering += 1
        try:
            return await self._accept(task_id, row, provider, spec, raw)
        finally:
            self._answering -= 1

    async def _accept(
        self, task_id: str, row: TaskRecord, provider: Provider, spec: TaskSpec, raw: bytes
    ) -> tuple[Response, str]:
        """A verified callback: parsed, checked against the task, kept."""
        try:
            outcome = provider.parse_callback(raw)
        except MalformedCallback as exc:
            await self.store.add_refusal(task_id, "callback", True, f"unreadable body: {exc}")
            raise ApiError(400, "malformed", str(exc)) from None
        if outcome.state != "pending" and not outcome.provider_task_id:
            # Nothing to hold against the task's own provider id, so the wrong-task check below
            # cannot run: the news is not taken as it came, the provider's status endpoint is asked
            # at once (one status query, by reconcile) and its answer is what counts.
            said = outcome.detail or outcome.state
            said = f"{said}, naming no provider task: the provider is asked"
            outcome = Outcome.pending(None, said, ask_now=True)
        known = row.provider_task_id
        if outcome.provider_task_id and known and outcome.provider_task_id != known:
            await self.store.add_refusal(
                task_id, "callback", True, f"names provider task {outcome.provider_task_id}, not {known}"
            )
            raise ApiError(400, "wrong_task", "the callback is about another provider task")
        most = spec.params.get("num_images") or provider.max_outputs
        if len(outcome.image_urls) > most:
            await self.store.add_refusal(
                task_id,
                "callback",
                True,
                f"names {len(outcome.image_urls)} images, the task has at most {most}",
            )
            raise ApiError(400, "too_many_images", f"the task can have at most {most} images")
        outcome = replace(outcome, provider=provider.name)  # stale if the task moves on before it applies
        await self.store.record_callback(task_id, outcome, urgent=provider.early_download)
        return ack(), "accepted"

    async def _verify(
        self,
        provider: Provider,
        headers: dict[str, str],
        raw: bytes,
        spec: TaskSpec,
        settings: ProviderSettings,
    ) -> None:
        url = provider.key_set_url(settings)
        keys = await self.key_sets.get(url) if url else None
        try:
            provider.verify_callback(headers, raw, spec, Context(settings, keys=keys), time.time())
        except CallbackRejected:
            if not url:
                raise
            # Keys rotate: fetch the set again (at most once a minute) and try once more.
            fresh = await self.key_sets.get(url, refresh=True)
            if fresh is None or fresh == keys:
                raise
            provider.verify_callback(headers, raw, spec, Context(settings, keys=fresh), time.time())
