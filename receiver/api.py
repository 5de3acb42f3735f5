"""/v1 for apps: tasks, images, uploads, events. Bearer keys name tenants; a tenant sees only its own."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import replace
from typing import Any
from typing import TypeVar
from urllib.parse import parse_qsl
from urllib.parse import urlsplit

import msgspec
import msgspec.inspect
from starlette.requests import ClientDisconnect
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.responses import RedirectResponse
from starlette.responses import Response
from starlette.responses import StreamingResponse

from receiver import metrics
from receiver.admin import usage_answer
from receiver.config import Settings
from receiver.downloads import check_url
from receiver.downloads import url_problem
from receiver.keys import SCOPE_KEY
from receiver.logs import event
from receiver.media import Media
from receiver.media import MediaError
from receiver.media import MediaMissing
from receiver.media import one_chunk
from receiver.models import MAX_FALLBACKS
from receiver.models import OPTIONAL_FIELDS
from receiver.models import TaskRequest
from receiver.offer import offered
from receiver.prices import PriceTable
from receiver.prices import estimate_usd
from receiver.providers import REGISTRY
from receiver.providers import Provider
from receiver.providers.base import SHARED_MODELS
from receiver.routes import url_path
from receiver.schema import AUTO
from receiver.schema import IMAGE_TYPES
from receiver.schema import MAX_SEED
from receiver.schema import TASK_ID_PATTERN
from receiver.schema import CreateHeaders
from receiver.schema import EventPage
from receiver.schema import EventsQuery
from receiver.schema import ImageType
from receiver.schema import ListQuery
from receiver.schema import ModelResponse
from receiver.schema import ProviderList
from receiver.schema import TaskCreate
from receiver.schema import TaskPage
from receiver.schema import Upload
from receiver.schema import UsageQuery
from receiver.schema import WaitQuery
from receiver.schema import check
from receiver.schema import decode_cursor
from receiver.schema import encode_cursor
from receiver.store import IdempotencyConflict
from receiver.store import NewTask
from receiver.store import Store
from receiver.store import TaskView
from receiver.store.records import BudgetExceeded
from receiver.store.records import KeyRecord
from receiver.tasks import UPLOAD_PREFIX
from receiver.tasks import image_path
from receiver.tasks import iso
from receiver.tasks import render_event
from receiver.tasks import render_task
from receiver.tasks import upload_type
from receiver.tokens import Tokens
from receiver.uploads import NAME
from receiver.uploads import UploadError
from receiver.uploads import data_uri_dimensions
from receiver.uploads import decode_data_uri
from receiver.uploads import keep_upload
from receiver.uploads import upload_dimensions
from receiver.web import MEDIA_HEADERS
from receiver.web import ApiError
from receiver.web import body_too_slow
from receiver.web import client_gone
from receiver.web import error_response
from receiver.web import json_object
from receiver.web import read_capped

log = logging.getLogger("receiver.api")
MAX_METADATA = 16 * 1024  # bytes of compact JSON, as stored
MAX_OPTIONS = 16 * 1024
MAX_IMAGE_INDEX = 64  # no provider returns more images than this for one task
SHUTDOWN_RETRY_AFTER = 1  # seconds: by then a load balancer sends the retry to another replica
PRESIGN_SECONDS = 300  # a redirect's presigned URL: long enough to start the download, no longer
MOST_IMAGES = max(provider.max_images for provider in REGISTRY.values())
TASK_ID = re.compile(TASK_ID_PATTERN)
# What the bytes are is read from the bytes themselves; the header only has to claim one of these.
UPLOAD_TYPES = (*IMAGE_TYPES, "application/octet-stream")
# The optional fields that reach the provider as `params` (model, images and options go their own way).
PARAMS = tuple(name for name in OPTIONAL_FIELDS if name not in ("model", "images", "options"))
# Where our uploads' links start (under RECEIVER_PUBLIC_URL): such an input image is ours, not fetched.
UPLOADS = url_path("get_upload", name="-").removesuffix("-")


def fallback_chain(fallback: list[str] | None, request: TaskRequest, prices: PriceTable) -> dict[str, Any]:
    """What a hop needs, fixed at creation: the chain, and for each fallback provider the model it
    will use (the app's, or that provider's default), its own per-task state (e.g. apicore's webhook
    secret), kept with the task like the first provider's, and what the task should cost there."""
    if not fallback:
        return {}
    chain = {}
    for name in fallback:
        provider = REGISTRY[name]
        model = request.model or provider.model_for(bool(request.images))
        estimate = estimate_usd(prices, name, model, request)
        chain[name] = {"model": model, "state": provider.new_state(), "estimate_usd": estimate}
    return {"fallback": list(fallback), "chain": chain}


@dataclass(frozen=True)
class Route:
    """Where `auto` sends a task: the create body with its provider and fallback chain filled in, whether
    the first is a probe after its cooldown, and the choice in words for the task's first event."""

    body: Mapping[str, Any]
    probe: bool
    summary: str


class Api:
    def __init__(self, settings: Settings, store: Store, tokens: Tokens, media: Media) -> None:
        self.settings = settings
        self.media = media
        self.store = store
        self.tokens = tokens
        self.draining = False  # set at SIGTERM: new work is refused, open long-polls answer at once
        self._keys = {
            hashlib.sha256(key.encode()).digest(): tenant for key, tenant in settings.api_keys.items()
        }
        self._waits: dict[str, int] = {}  # tenant -> ?wait long-polls open in this process
        self.offered = offered(settings)  # settings are fixed for the process: built once

    # -- auth ------------------------------------------------------------------------------------

    def tenant(self, request: Request, *, required: bool = True) -> str | None:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() == "bearer" and key:
            # A dict lookup on the key's digest: no timing difference tells a near-miss from a far one.
            tenant = self._keys.get(hashlib.sha256(key.strip().encode()).digest())
            if tenant is not None:
                return tenant
            # A database key, found before this handler ran (receiver.keys.ResolveKeys).
            found = self.key_of(request)
            if found is not None:
                return found.tenant
        if required:
            raise ApiError(401, "unauthorized", "a valid 'Authorization: Bearer <key>' header is required")
        return None

    @staticmethod
    def key_of(request: Request) -> KeyRecord | None:
        """The request's database key, unless it is disabled (then it is no key at all)."""
        found = request.scope.get(SCOPE_KEY)
        return found if isinstance(found, KeyRecord) and not found.disabled else None

    async def _take_rate(self, key: KeyRecord | None) -> None:
        """A create counts against its key's rate on every replica; past it, a 429 says when to retry."""
        if key is None or key.rate_per_minute is None:
            return
        wait = await self.store.take_rate(key.id, key.rate_per_minute)
        if wait > 0:
            raise ApiError(
                429,
                "rate_limited",
                f"this key may create {key.rate_per_minute} tasks a minute; try again in a moment",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )

    async def usage(self, request: Request) -> Response:
        """The calling tenant's tasks and spend."""
        tenant = self.tenant(request)
        assert tenant is not None
        query, errors = check(request.query_params, UsageQuery, strict=False)
        return await usage_answer(self.store, query, errors, tenant)

    # -- tasks -----------------------------------------------------------------------------------

    async def create_task(self, request: Request) -> Response:
        tenant = self.tenant(request)
        assert tenant is not None
        headers, errors = check(request.headers, CreateHeaders)
        if headers is None:
            raise ApiError(422, "invalid", "the request has invalid headers", errors)
        idempotency_key = headers.idempotency_key
        raw = await read_capped(request, body_cap(self.settings.max_image_bytes), self.settings.body_timeout)
        if self.draining:  # checked once the body is in: a create whose body arrives after SIGTERM
            return _shutting_down()
        key = self.key_of(request)
        await self._take_rate(key)
        body = json_object(raw)
        # Input sizes matter only to a provider that must be told the ratio (apimart's FLUX 2).
        sizes = await self._image_sizes(body.get("images")) if body.get("aspect_ratio") is None else ()
        route = await self._route(body, sizes) if body.get("provider") == AUTO else None
        chosen = route.body if route else body  # `auto`: the provider and fallback chain it picked
        task_request, provider = self._validate(chosen, sizes)
        await self._check_urls(task_request)
        request_hash = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        images = [await self._keep_image(index, value) for index, value in enumerate(task_request.images)]
        model = task_request.model or provider.model_for(bool(task_request.images))
        new = NewTask(
            id=f"tsk_{secrets.token_hex(12)}",
            tenant=tenant,
            provider=provider.name,
            model=model,
            prompt=task_request.prompt,
            request={
                "images": images,
                "image_sizes": list(task_request.image_sizes),
                "params": dict(task_request.params),
                "options": dict(task_request.options),
                **fallback_chain(chosen.get("fallback"), task_request, self.settings.prices),
            },
            provider_state=provider.new_state(),
            metadata=task_request.metadata,
            notify_url=task_request.notify_url,
            idempotency_key=idempotency_key,
            request_hash=request_hash,
            key=key,
            estimate_usd=estimate_usd(self.settings.prices, provider.name, model, task_request),
            probe=route.probe if route else False,
            routing=route.summary if route else "",
        )
        try:
            row, created = await self.store.create_task(new)
        except IdempotencyConflict:
            raise ApiError(
                409, "idempotency_conflict", "this Idempotency-Key was used with another body"
            ) from None
        except BudgetExceeded as exc:
            raise ApiError(
                402,
                "budget_exceeded",
                "this task would take the key past its budget; nothing was submitted",
                remaining_usd=exc.remaining_usd,
            ) from None
        if created:
            event(log, "task created", task_id=row.id, provider=row.provider, tenant=tenant)
        # A task just created has no result images yet; a repeat shows the first task as it is now.
        results = await self.store.image_rows(row.id) if not created else []
        rendered = render_task(row, results, self.tokens)
        return ModelResponse(
            rendered,
            status_code=202 if created else 200,
            headers={"Location": url_path("get_task", id=row.id)},
        )

    async def _image_sizes(self, images: Any) -> tuple[tuple[int, int] | None, ...]:
        """The (width, height) of each input image we can read without fetching anything: a data URI's
        from its first bytes, one of our own uploads (a valid signed link) from the media store."""
        if not isinstance(images, list) or len(images) > MOST_IMAGES:
            return ()
        own = self.settings.public_url + UPLOADS
        sizes: list[tuple[int, int] | None] = []
        for value in images:
            size = None
            if isinstance(value, str) and value[:5].lower() == "data:":
                size = data_uri_dimensions(value)
            elif isinstance(value, str) and value.startswith(own):
                link = urlsplit(value)
                name = link.path.rsplit("/", 1)[-1]
                query = dict(parse_qsl(link.query))
                if NAME.match(name) and self.tokens.link_valid(
                    url_path("get_upload", name=name), query.get("expires"), query.get("signature")
                ):
                    size = await upload_dimensions(self.media, name)
            sizes.append(size)
        return tuple(sizes)

    def _validate(
        self, body: Mapping[str, Any], image_sizes: tuple[tuple[int, int] | None, ...] = ()
    ) -> tuple[TaskRequest, Provider]:
        create, errors = check(body, TaskCreate)
        provider: Provider | None = None
        if create is not None:
            provider = REGISTRY[create.provider.value]
            if provider.key_variable and not self.settings.provider(provider.name).api_key:
                errors["provider"] = f"{provider.name} is not configured: set {provider.key_variable}"
            if create.seed is not None and create.seed > MAX_SEED:
                errors["seed"] = f"must be between 0 and {MAX_SEED}"
            if create.options is not None and _json_size(create.options) > MAX_OPTIONS:
                errors["options"] = f"at most {MAX_OPTIONS} bytes of JSON"
            if create.metadata is not None and _json_size(create.metadata) > MAX_METADATA:
                errors["metadata"] = f"at most {MAX_METADATA} bytes of JSON"
            images = create.images or []
            if len(images) > MOST_IMAGES:
                errors["images"] = f"at most {MOST_IMAGES} images"
                images = []
            for index, item in enumerate(images):
                problem = None if item.lower().startswith("data:") else url_problem(item)
                if problem:
                    errors[f"images[{index}]"] = (
                        "must be an http(s) URL or a data:image/…;base64 URI"
                        if problem.startswith("must be")
                        else problem
                    )
            problem = url_problem(create.notify_url) if create.notify_url is not None else None
            if problem:
                errors["notify_url"] = problem
        if create is not None and provider is not None and "provider" not in errors:
            draft = TaskRequest(
                provider.name,
                "",
                create.model,
                tuple(create.images or ()),
                _params(create),
                create.options or {},
                None,
                {},
            )
            for name, problem in provider.problems(draft).items():
                errors.setdefault(name, problem)
        if errors:
            raise ApiError(422, "invalid", "the request has invalid fields", errors)
        assert create is not None and provider is not None
        params = _params(create)
        task_request = TaskRequest(
            provider=provider.name,
            prompt=create.prompt,
            model=create.model,
            images=tuple(create.images or ()),
            params=params,
            options=create.options or {},
            notify_url=create.notify_url,
            metadata=create.metadata or {},
            image_sizes=image_sizes,
        )
        errors = provider.validate(task_request)
        errors.update(self._fallback_problems(body.get("fallback"), task_request))
        if errors:
            raise ApiError(422, "invalid", "the request has values the provider cannot take", errors)
        return task_request, provider

    async def _route(self, body: Mapping[str, Any], sizes: tuple[tuple[int, int] | None, ...]) -> Route:
        """`"provider": "auto"`: the configured providers that sell the shared model and pass the same
        checks an explicit choice gets, cheapest first by this request's estimate (unknown prices
        last), those in cooldown after all the others; the first takes the task, the rest become its
        fallback chain."""
        if body.get("fallback") is not None:
            raise ApiError(
                422,
                "invalid",
                "the request has invalid fields",
                {"fallback": "not with provider auto: the chain is the other providers that can take it"},
            )
        model = body.get("model")
        if model not in SHARED_MODELS:
            raise ApiError(
                422,
                "invalid",
                "the request has invalid fields",
                {"model": f"provider auto needs a shared model: one of {', '.join(SHARED_MODELS)}"},
            )
        health = await self.store.provider_health()
        now = self.store.clock()
        ranked: list[tuple[bool, bool, float, str]] = []
        refused: dict[str, str] = {}
        for info in self.offered.items:
            name = str(info.name)
            try:
                request, _ = self._validate({**body, "provider": name}, sizes)
            except ApiError as exc:
                refused[name] = "; ".join(f"{key}: {value}" for key, value in (exc.fields or {}).items())
                continue
            estimate = estimate_usd(self.settings.prices, name, model, request)
            cooling = name in health and health[name].cooldown_until > now
            ranked.append((cooling, estimate is None, estimate or 0.0, name))
        if not ranked:
            said = "; ".join(f"{name} ({why})" for name, why in sorted(refused.items()))
            raise ApiError(
                422,
                "no_provider",
                f"no configured provider can honour this request with {model}"
                + (f": {said}" if said else ""),
                {"provider": "no configured provider sells this model and can honour the request"},
            )
        ranked.sort()
        chain = [name for *_, name in ranked][: 1 + MAX_FALLBACKS]
        first = health.get(chain[0])
        probe = first is not None and first.consecutive_failures >= self.settings.cooldown_failures
        shown = ", ".join(
            f"{name} ({'no known price' if unknown else f'${usd:g}'}{', in cooldown' if cooling else ''})"
            for cooling, unknown, usd, name in ranked
        )
        summary = f"auto: {shown}" + (f"; {chain[0]} is the probe after its cooldown" if probe else "")
        rest = chain[1:] or None
        return Route({**body, "provider": chain[0], "fallback": rest}, probe, summary)

    def _fallback_problems(self, fallback: Any, request: TaskRequest) -> dict[str, str]:
        """The whole chain is checked up front: each fallback provider must exist, be configured, not
        repeat one before it, and honour this very request (the same checks the first one gets)."""
        if fallback is None:
            return {}
        if not isinstance(fallback, list):
            return {"fallback": "must be a list of provider names"}
        if len(fallback) > MAX_FALLBACKS:
            return {"fallback": f"at most {MAX_FALLBACKS} providers"}
        errors: dict[str, str] = {}
        seen = {request.provider}
        for index, name in enumerate(fallback):
            field = f"fallback[{index}]"
            provider = REGISTRY.get(name) if isinstance(name, str) else None
            if provider is None:
                errors[field] = f"unknown provider; one of {', '.join(sorted(REGISTRY))}"
            elif name in seen:
                errors[field] = f"{name} is already in the chain"
            elif provider.key_variable and not self.settings.provider(name).api_key:
                errors[field] = f"{name} is not configured: set {provider.key_variable}"
            else:
                refusals = provider.refusals(replace(request, provider=name))
                if refusals:
                    said = "; ".join(f"{key}: {value}" for key, value in refusals.items())
                    errors[field] = f"{name} cannot honour this request ({said})"
            if isinstance(name, str):
                seen.add(name)
        return errors

    async def _check_urls(self, task_request: TaskRequest) -> None:
        errors: dict[str, str] = {}
        allow = self.settings.allow_private_urls
        own = self.settings.public_url + UPLOADS
        for index, url in enumerate(task_request.images):
            if url.startswith(("http://", "https://")) and not url.startswith(own):
                problem = await check_url(url, allow)
                if problem:
                    errors[f"images[{index}]"] = problem
        if task_request.notify_url:
            problem = await check_url(task_request.notify_url, allow)
            if problem:
                errors["notify_url"] = problem
        if errors:
            raise ApiError(422, "invalid", "a URL in the request is not allowed", errors)

    async def _keep_image(self, index: int, value: str) -> str:
        """A data URI is stored now and referenced as an upload; a URL is kept as given."""
        if not value.lower().startswith("data:"):
            return value
        try:
            data = decode_data_uri(value)
            name, _, _ = await keep_upload(self.media, one_chunk(data), self.settings.max_image_bytes)
        except MediaError:
            raise _media_unavailable() from None
        except UploadError as exc:
            raise ApiError(
                422, "invalid", "an image is not usable", {f"images[{index}]": exc.message}
            ) from None
        return UPLOAD_PREFIX + name

    async def get_task(self, request: Request) -> Response:
        tenant = self.tenant(request)
        task_id = request.path_params["id"]
        query, errors = check(request.query_params, WaitQuery, strict=False)
        row = await self._owned(task_id, tenant)
        if query is None:
            raise ApiError(422, "invalid", "the query has invalid parameters", errors)
        headers = None
        if query.wait is not None and not row.status.terminal:
            assert tenant is not None
            if self.draining:
                return _shutting_down()
            if self._wait_taken(tenant):
                try:
                    loop_deadline = _now() + query.wait
                    while (
                        not row.status.terminal and not self.draining and (left := loop_deadline - _now()) > 0
                    ):
                        await self.store.wait_for_change(task_id, left)
                        row = await self._owned(task_id, tenant)
                finally:
                    self._wait_given_back(tenant)
            else:
                # The task as it stands, at once; the connection is closed so that it is not kept idle
                # either: a tenant's polls must leave connections for every other request.
                metrics.WAITS_CAPPED.labels(tenant).inc()
                headers = {"X-Receiver-Wait": "capped", "Connection": "close"}
        rendered = render_task(row, await self.store.image_rows(task_id), self.tokens)
        return ModelResponse(rendered, headers=headers)

    def _wait_taken(self, tenant: str) -> bool:
        """Count one more open ?wait of `tenant`, unless the tenant's (RECEIVER_MAX_WAITS_PER_TENANT)
        or every tenant's (half of RECEIVER_MAX_CONNECTIONS) open waits are at their cap."""
        held = self._waits.get(tenant, 0)
        everyone = self.settings.max_waits
        if held >= self.settings.max_waits_per_tenant or (
            everyone is not None and sum(self._waits.values()) >= everyone
        ):
            return False
        self._waits[tenant] = held + 1
        metrics.WAITS_OPEN.labels(tenant).set(held + 1)
        return True

    def _wait_given_back(self, tenant: str) -> None:
        held = self._waits.pop(tenant) - 1
        if held:
            self._waits[tenant] = held
        metrics.WAITS_OPEN.labels(tenant).set(held)

    async def _owned(self, task_id: str, tenant: str | None) -> TaskView:
        row = await self.store.task_view(task_id, tenant) if TASK_ID.match(task_id) else None
        if row is None:
            raise ApiError(404, "not_found", "no such task")
        return row

    async def list_tasks(self, request: Request) -> Response:
        tenant = self.tenant(request)
        assert tenant is not None
        query, before = _page_query(request, ListQuery)
        limit = query.limit
        status = query.status.value if query.status is not None else None
        provider = query.provider.value if query.provider is not None else None
        rows = await self.store.tasks(
            tenant, status=status, provider=provider, limit=limit + 1, before_seq=before
        )
        page = rows[:limit]
        images = await self.store.images_of([row.id for row in page])
        next_cursor = encode_cursor(ListQuery.CURSOR, page[-1].seq) if len(rows) > limit else None
        return ModelResponse(
            TaskPage(
                items=[render_task(row, images[row.id], self.tokens) for row in page],
                next_cursor=next_cursor,
            )
        )

    async def task_events(self, request: Request) -> Response:
        tenant = self.tenant(request)
        row = await self._owned(request.path_params["id"], tenant)
        query, after = _page_query(request, EventsQuery)
        limit = query.limit
        events = await self.store.events(row.id, after=after or 0, limit=limit + 1)
        page = events[:limit]
        next_cursor = encode_cursor(EventsQuery.CURSOR, page[-1].id) if len(events) > limit else None
        items = [render_event(event) for event in page]
        return ModelResponse(EventPage(items=items, next_cursor=next_cursor))

    async def task_image(self, request: Request) -> Response:
        task_id = request.path_params["id"]
        index = request.path_params["index"]
        signed = self.tokens.link_valid(
            image_path(task_id, index),
            request.query_params.get("expires"),
            request.query_params.get("signature"),
        )
        tenant = None if signed else self.tenant(request)
        row = await self._owned(task_id, tenant)
        image = await self.store.image(row.id, index) if index < MAX_IMAGE_INDEX else None
        if image is None or image.path is None or image.content_type is None:
            raise ApiError(404, "not_found", "no such image (yet)")
        etag = f'"{image.sha256}"'
        return await self._serve(request, image.path, image.content_type, etag)

    async def _serve(self, request: Request, key: str, content_type: str, etag: str) -> Response:
        """A stored object: a file from the media directory (with ranges, as before there was a bucket);
        from a bucket streamed with its length, or with RECEIVER_MEDIA_REDIRECT a 302 to a presigned URL."""
        headers = {
            "ETag": etag,
            "Cache-Control": "private, max-age=86400, immutable",
            **MEDIA_HEADERS,
        }
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        path = self.media.local_path(key)
        if path is not None:
            if not path.is_file():
                raise ApiError(404, "not_found", "no such image")
            return FileResponse(path, media_type=content_type, headers=headers)
        try:
            if self.settings.media_redirect:
                url = await self.media.presign(key, PRESIGN_SECONDS)
                if url is not None:
                    return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})
            stored = await self.media.open(key)
        except MediaMissing:
            raise ApiError(404, "not_found", "no such image") from None
        except MediaError:
            raise _media_unavailable() from None
        headers["Content-Length"] = str(stored.size)
        return StreamingResponse(stored.chunks, media_type=content_type, headers=headers)

    # -- providers -------------------------------------------------------------------------------

    async def list_providers(self, request: Request) -> Response:
        self.tenant(request)
        health = await self.store.provider_health()
        now = self.store.clock()
        items = [
            msgspec.structs.replace(info, cooldown_until=iso(health[info.name].cooldown_until))
            if info.name in health and health[info.name].cooldown_until > now
            else info
            for info in self.offered.items
        ]
        return ModelResponse(ProviderList(items=items))

    # -- uploads ---------------------------------------------------------------------------------

    async def create_upload(self, request: Request) -> Response:
        self.tenant(request)
        content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type not in UPLOAD_TYPES:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"send the raw image with Content-Type: {', '.join(UPLOAD_TYPES)}",
            )
        cap = self.settings.max_image_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > cap:
            raise ApiError(413, "too_large", f"the image is over RECEIVER_MAX_IMAGE_BYTES ({cap} bytes)")
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                name, kind, size = await keep_upload(self.media, request.stream(), cap)
        except ClientDisconnect:
            raise client_gone(request) from None
        except TimeoutError:
            raise body_too_slow(self.settings.body_timeout) from None
        except MediaError:
            raise _media_unavailable() from None
        except UploadError as exc:
            raise ApiError(
                exc.status, "unsupported_media_type" if exc.status == 415 else "too_large", exc.message
            ) from None
        upload = Upload(
            url=self.tokens.signed_link(url_path("get_upload", name=name)),
            sha256=name.split(".")[0],
            content_type=ImageType(kind),
            size=size,
        )
        return ModelResponse(upload, status_code=201)

    async def get_upload(self, request: Request) -> Response:
        name = request.path_params["name"]
        valid = self.tokens.link_valid(
            url_path("get_upload", name=name),
            request.query_params.get("expires"),
            request.query_params.get("signature"),
        )
        if not valid:
            raise ApiError(401, "unauthorized", "this link is not signed, or has expired")
        if not NAME.match(name):
            raise ApiError(404, "not_found", "no such upload")
        return await self._serve(request, f"uploads/{name}", upload_type(name), f'"{name.split(".")[0]}"')


def _media_unavailable() -> ApiError:
    return ApiError(503, "media_unavailable", "the media store cannot be reached right now; try again")


def _shutting_down() -> Response:
    """New work while the service drains: another replica, or this one once restarted, takes it."""
    return error_response(
        503,
        "shutting_down",
        "the service is shutting down; try again in a moment",
        headers={"Retry-After": str(SHUTDOWN_RETRY_AFTER)},
    )


Paged = TypeVar("Paged", ListQuery, EventsQuery)


def _page_query(request: Request, model: type[Paged]) -> tuple[Paged, int | None]:
    """A list's query parsed by its Struct (filters, `limit` in its range), and where its `cursor`
    says the page starts (None: from the first); a bad parameter is a 422 naming it."""
    query, errors = check(request.query_params, model, strict=False)
    position = None
    if query is not None and query.cursor is not None:
        position = decode_cursor(model.CURSOR, query.cursor)
        if position is None:
            errors["cursor"] = "not a cursor this service gave"
    if "limit" in errors:  # one wording for any bad limit, with the bounds the Struct declares
        errors["limit"] = _whole_number_range(model, "limit")
    if query is None or errors:
        raise ApiError(422, "invalid", "the query has invalid parameters", errors)
    return query, position


@functools.cache
def _whole_number_range(model: type[msgspec.Struct], name: str) -> str:
    info = msgspec.inspect.type_info(model)
    assert isinstance(info, msgspec.inspect.StructType)
    [kind] = [field.type for field in info.fields if field.name == name]
    assert isinstance(kind, msgspec.inspect.IntType)
    return f"a whole number from {kind.ge} to {kind.le}"


def _now() -> float:
    return time.monotonic()


def body_cap(max_image_bytes: int) -> int:
    """The largest create body: one RECEIVER_MAX_IMAGE_BYTES image inline as a data URI, plus room for
    every other field at its own cap (a 10,000-character prompt escaped, metadata, options, URLs).
    More or larger inline images go through POST /v1/uploads."""
    return max_image_bytes * 4 // 3 + 256 * 1024


def _json_size(value: Any) -> int:
    """Bytes of `value` as stored: compact JSON, non-ASCII escaped."""
    return len(json.dumps(value, separators=(",", ":")))


def _params(create: TaskCreate) -> dict[str, Any]:
    """The optional provider parameters the request gave."""
    return {name: getattr(create, name) for name in PARAMS if getattr(create, name) is not None}
