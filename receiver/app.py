"""create_app(settings): routes, error handlers, and the lifespan that opens the store and runs the worker."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.responses import Response
from starlette.routing import Match
from starlette.routing import Route

from receiver import metrics
from receiver.api import Api
from receiver.callbacks import Callbacks
from receiver.callbacks import KeySets
from receiver.config import Settings
from receiver.console import console_routes
from receiver.jobs.kinds import wire_jobs
from receiver.logs import event
from receiver.media import open_media
from receiver.models import ErrorCode
from receiver.models import Status
from receiver.openapi import openapi_document
from receiver.providers import REGISTRY
from receiver.sandbox_service import SandboxService
from receiver.schema import Health
from receiver.schema import ModelResponse
from receiver.schema import Readiness
from receiver.schema import encode
from receiver.store import StoreUnavailable
from receiver.store import make_store
from receiver.tokens import Tokens
from receiver.transport import outside_client
from receiver.transport import provider_client
from receiver.web import ApiError
from receiver.web import error_response
from receiver.worker import Worker

log = logging.getLogger("receiver")


def create_app(settings: Settings, *, role: str = "all") -> Starlette:
    """`role`: "api" serves HTTP only, "worker" runs the jobs (and answers health checks), "all" both."""
    run_worker = role in ("all", "worker")
    tokens = Tokens(settings.secret_key, settings.public_url, settings.link_ttl)
    store = make_store(settings)
    media = open_media(settings.media_url, settings.data_dir, settings.aws)
    api = Api(settings, store, tokens, media)
    # Provider endpoints and our own sandbox are the operator's settings: trusted as given.
    provider_http = provider_client(timeout=settings.http_timeout)
    outside_http = outside_client(allow_private=settings.allow_private_urls, timeout=settings.http_timeout)
    key_sets = KeySets(provider_http, settings.key_set_refresh)
    callbacks = Callbacks(settings, store, tokens, key_sets)
    sandbox_settings = settings.provider("sandbox")
    sandbox = SandboxService(
        media,
        settings.public_url,
        sandbox_settings.api_key or "",
        settings.sandbox_delay,
        provider_http,
    )
    worker = Worker(settings, store, wire_jobs(settings, store, tokens, provider_http, outside_http, media))
    worker.callbacks_busy = callbacks.busy

    async def healthz(request: Request) -> Response:
        return ModelResponse(Health("ok"))

    async def readyz(request: Request) -> Response:
        problems = []
        if not await store.writable():
            problems.append("the database is not writable")
        media_problem = await media.ready()
        if media_problem:
            problems.append(media_problem)
        if problems:
            return ModelResponse(Readiness("unavailable", problems), status_code=503)
        return ModelResponse(Readiness("ready"))

    metrics_digest = (
        hashlib.sha256(settings.metrics_token.encode()).digest() if settings.metrics_token else None
    )

    async def metrics_endpoint(request: Request) -> Response:
        if metrics_digest is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            offered = hashlib.sha256(given.strip().encode()).digest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(offered, metrics_digest):
                raise ApiError(
                    401, "unauthorized", "/metrics wants 'Authorization: Bearer <RECEIVER_METRICS_TOKEN>'"
                )
        metrics.show_state(
            await store.task_counts(),
            await store.jobs_due(),
            providers=[name for name in REGISTRY if settings.provider(name).api_key],
            statuses=list(Status),
            kinds=list(worker.handlers),
            errors=list(ErrorCode),
            now=time.time(),
        )
        metrics.LONG_POLLS.set(store.waiting())
        metrics.PARKED.clear()
        for kind, count in (await store.parked_counts()).items():
            metrics.PARKED.labels(kind).set(count)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    document = encode(openapi_document(settings.public_url))

    async def openapi(request: Request) -> Response:
        return Response(document, media_type="application/json")

    service_routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False),  # for Prometheus
    ]
    api_routes = [
        # For providers, not for apps: out of the public OpenAPI document. First, so the busiest path
        # is matched without trying every other route's pattern before it (no other path overlaps).
        Route("/callbacks/{provider}/{token}", callbacks, methods=["POST"], include_in_schema=False),
        Route("/callbacks/{provider}/{token}/callback", callbacks, methods=["POST"], include_in_schema=False),
        Route("/v1/tasks", api.create_task, methods=["POST"]),
        Route("/v1/tasks", api.list_tasks, methods=["GET"]),
        Route("/v1/tasks/{id}", api.get_task, methods=["GET"]),
        Route("/v1/tasks/{id}/events", api.task_events, methods=["GET"]),
        Route("/v1/tasks/{id}/images/{index:int}", api.task_image, methods=["GET"]),
        Route("/v1/uploads", api.create_upload, methods=["POST"]),
        Route("/uploads/{name}", api.get_upload, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        *sandbox.routes(),
        *console_routes(settings, api.tenant),
    ]
    # A worker alone answers only the health checks and /metrics; the API lives in the other roles.
    routes = service_routes if role == "worker" else [*api_routes, *service_routes]

    stopping: asyncio.Task[int] | None = None

    def drain() -> None:
        """The first step of a shutdown, taken at the signal (`receiver serve` calls it before uvicorn
        waits for open connections): new work is refused with a 503, every open `?wait` answers with its
        task as it stands, and the worker stops claiming while its running jobs get the grace."""
        nonlocal stopping
        if stopping is not None:
            return
        api.draining = True
        store.wake_all()
        event(log, "shutting down", running_jobs=worker.running(), grace=settings.shutdown_grace)
        stopping = asyncio.get_running_loop().create_task(
            worker.stop(grace=settings.shutdown_grace), name="receiver-worker-stop"
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.open()
        removed = await media.clean_partial()
        if removed:
            log.info("removed %d partial downloads left by an earlier process", removed)
        runner = None
        if run_worker:
            await store.claim_worker()
            runner = asyncio.create_task(worker.run(), name="receiver-worker")
        event(
            log,
            "started",
            role=role,
            public_url=settings.public_url,
            data_dir=str(settings.data_dir),
            media=media.description,
        )
        try:
            yield
        finally:
            drain()  # already taken at the signal under `receiver serve`; here for every other host
            assert stopping is not None
            left = await stopping
            if runner is not None:
                runner.cancel()
                with contextlib.suppress(BaseException):
                    await runner
            await sandbox.close()
            await provider_http.aclose()
            await outside_http.aclose()
            await store.close()
            event(log, "stopped", jobs_left_for_next_start=left)

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.code, exc.message, exc.fields)

    async def store_unavailable(request: Request, exc: Exception) -> Response:
        # A provider retries a callback answered 503; an app retries its call. Nothing was changed.
        event(
            log, "database unavailable", level=logging.WARNING, path=request.url.path, reason=str(exc)[:200]
        )
        return error_response(
            503, "database_unavailable", "the database cannot be reached right now; try again"
        )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            other = slash_twin(request)
            if other is not None:
                return RedirectResponse(other, status_code=307)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)

    def allowed_methods(request: Request) -> list[str]:
        """Every method some route serves at this path (Starlette's own Allow names one route's only)."""
        methods: set[str] = set()
        for route in routes:
            if route.matches(request.scope)[0] is not Match.NONE and isinstance(route, Route):
                methods |= route.methods or set()
        return sorted(methods)

    def slash_twin(request: Request) -> str | None:
        """`/path/` ↔ `/path` when that one is served: under RECEIVER_PUBLIC_URL, never the Host header."""
        path = request.url.path
        if path == "/":
            return None
        twin = path.rstrip("/") if path.endswith("/") else path + "/"
        scope = {**request.scope, "path": twin}
        if not any(route.matches(scope)[0] != Match.NONE for route in app.router.routes):
            return None
        query = request.url.query
        return f"{settings.public_url}{quote(twin)}" + (f"?{query}" if query else "")

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            StoreUnavailable: store_unavailable,
        },
        middleware=[Middleware(metrics.HttpMetrics)],
    )
    # Starlette's own slash redirect builds its Location from the Host header; ours (above) does not.
    app.router.redirect_slashes = False
    app.state.store = store
    app.state.callbacks = callbacks
    app.state.settings = settings
    app.state.media = media
    app.state.drain = drain
    return app
