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
from starlette.routing import BaseRoute
from starlette.routing import Match
from starlette.routing import Route

from receiver import metrics
from receiver.admin import Admin
from receiver.api import Api
from receiver.callbacks import Callbacks
from receiver.callbacks import KeySets
from receiver.config import Settings
from receiver.console import console_routes
from receiver.jobs.kinds import wire_jobs
from receiver.keys import KeyCache
from receiver.keys import ResolveKeys
from receiver.logs import event
from receiver.media import open_media
from receiver.models import ErrorCode
from receiver.models import Status
from receiver.openapi import openapi_document
from receiver.providers import REGISTRY
from receiver.routes import routes as table_routes
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


class Service:
    """One process's parts (store, media, API, callbacks, sandbox, worker) and the endpoints that are
    about the process itself: health, readiness, metrics, the OpenAPI document, and its lifespan."""

    def __init__(self, settings: Settings, role: str) -> None:
        self.settings = settings
        self.role = role
        self.tokens = Tokens(settings.secret_key, settings.public_url, settings.link_ttl)
        self.store = make_store(settings)
        self.media = open_media(settings.media_url, settings.data_dir, settings.aws)
        self.api = Api(settings, self.store, self.tokens, self.media)
        self.admin = Admin(settings, self.store)
        self.keys = KeyCache(self.store)
        # Provider endpoints and our own sandbox are the operator's settings: trusted as given.
        self.provider_http = provider_client(timeout=settings.http_timeout)
        self.outside_http = outside_client(
            allow_private=settings.allow_private_urls, timeout=settings.http_timeout
        )
        self.callbacks = Callbacks(
            settings, self.store, self.tokens, KeySets(self.provider_http, settings.key_set_refresh)
        )
        self.sandbox = SandboxService(
            self.media,
            settings.public_url,
            settings.provider("sandbox").api_key or "",
            settings.sandbox_delay,
            self.provider_http,
        )
        jobs = wire_jobs(settings, self.store, self.tokens, self.provider_http, self.outside_http, self.media)
        self.worker = Worker(settings, self.store, jobs)
        self.worker.callbacks_busy = self.callbacks.busy
        self.metrics_digest = (
            hashlib.sha256(settings.metrics_token.encode()).digest() if settings.metrics_token else None
        )
        self.routes = self._routes()
        self.document = encode(openapi_document(settings.public_url, self.routes))
        self.stopping: asyncio.Task[int] | None = None

    def _routes(self) -> list[BaseRoute]:
        api = self.api
        # What answers each endpoint of the route table (receiver/routes.py), by the endpoint's name.
        handlers = {
            "callback": self.callbacks,
            "callback_suffixed": self.callbacks,
            "create_task": api.create_task,
            "list_tasks": api.list_tasks,
            "get_task": api.get_task,
            "task_events": api.task_events,
            "task_image": api.task_image,
            "create_upload": api.create_upload,
            "get_upload": api.get_upload,
            "list_providers": api.list_providers,
            "usage": api.usage,
            "create_key": self.admin.create_key,
            "list_keys": self.admin.list_keys,
            "change_key": self.admin.change_key,
            "delete_key": self.admin.delete_key,
            "admin_usage": self.admin.usage,
            "healthz": self.healthz,
            "readyz": self.readyz,
            "openapi": self.openapi,
            "metrics": self.metrics,
        }
        # A worker alone answers only the health checks and /metrics; the API lives in the other roles.
        if self.role == "worker":
            return [*table_routes(handlers, every_role_only=True)]
        return [*table_routes(handlers), *self.sandbox.routes(), *console_routes(self.settings)]

    async def healthz(self, request: Request) -> Response:
        return ModelResponse(Health("ok"))

    async def readyz(self, request: Request) -> Response:
        problems = []
        if not await self.store.writable():
            problems.append("the database is not writable")
        media_problem = await self.media.ready()
        if media_problem:
            problems.append(media_problem)
        if problems:
            return ModelResponse(Readiness("unavailable", problems), status_code=503)
        return ModelResponse(Readiness("ready"))

    async def metrics(self, request: Request) -> Response:
        if self.metrics_digest is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            offered = hashlib.sha256(given.strip().encode()).digest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(offered, self.metrics_digest):
                raise ApiError(
                    401, "unauthorized", "/metrics wants 'Authorization: Bearer <RECEIVER_METRICS_TOKEN>'"
                )
        store = self.store
        configured = [name for name in REGISTRY if self.settings.provider(name).api_key]
        health, now = await store.provider_health(), store.clock()
        metrics.show_cooldowns(configured, [name for name, row in health.items() if row.cooldown_until > now])
        metrics.show_state(
            await store.task_counts(),
            await store.jobs_due(),
            providers=configured,
            statuses=list(Status),
            kinds=list(self.worker.handlers),
            errors=list(ErrorCode),
            now=time.time(),
        )
        metrics.LONG_POLLS.set(store.waiting())
        metrics.PARKED.clear()
        for kind, count in (await store.parked_counts()).items():
            metrics.PARKED.labels(kind).set(count)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi(self, request: Request) -> Response:
        return Response(self.document, media_type="application/json")

    def drain(self) -> None:
        """The first step of a shutdown, taken at the signal (`receiver serve` calls it before uvicorn
        waits for open connections): new work is refused with a 503, every open `?wait` answers with its
        task as it stands, and the worker stops claiming while its running jobs get the grace."""
        if self.stopping is not None:
            return
        self.api.draining = True
        self.store.wake_all()
        grace = self.settings.shutdown_grace
        event(log, "shutting down", running_jobs=self.worker.running(), grace=grace)
        self.stopping = asyncio.get_running_loop().create_task(
            self.worker.stop(grace=grace), name="receiver-worker-stop"
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        store, media = self.store, self.media
        await store.open()
        removed = await media.clean_partial()
        if removed:
            log.info("removed %d partial downloads left by an earlier process", removed)
        runner = None
        if self.role in ("all", "worker"):
            await store.claim_worker()
            runner = asyncio.create_task(self.worker.run(), name="receiver-worker")
        settings = self.settings
        event(
            log,
            "started",
            role=self.role,
            public_url=settings.public_url,
            data_dir=str(settings.data_dir),
            media=media.description,
        )
        try:
            yield
        finally:
            self.drain()  # already taken at the signal under `receiver serve`; here for every other host
            assert self.stopping is not None
            left = await self.stopping
            if runner is not None:
                runner.cancel()
                with contextlib.suppress(BaseException):
                    await runner
            await self.sandbox.close()
            await self.provider_http.aclose()
            await self.outside_http.aclose()
            await store.close()
            event(log, "stopped", jobs_left_for_next_start=left)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.fields, **exc.more)


async def store_unavailable(request: Request, exc: Exception) -> Response:
    # A provider retries a callback answered 503; an app retries its call. Nothing was changed.
    event(log, "database unavailable", level=logging.WARNING, path=request.url.path, reason=str(exc)[:200])
    return error_response(503, "database_unavailable", "the database cannot be reached right now; try again")


class HttpErrors:
    """Starlette's 404 and 405 as our JSON errors: a 404 whose path is served with or without its
    trailing slash redirects there (under RECEIVER_PUBLIC_URL, never the Host header), and a 405 names
    every method the path takes."""

    def __init__(self, routes: list[BaseRoute], public_url: str) -> None:
        self.routes = routes
        self.public_url = public_url

    async def __call__(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            other = self.slash_twin(request)
            if other is not None:
                return RedirectResponse(other, status_code=307)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(self.allowed_methods(request))
        return error_response(exc.status_code, code, str(exc.detail), headers=headers)

    def allowed_methods(self, request: Request) -> list[str]:
        """Every method some route serves at this path (Starlette's own Allow names one route's only)."""
        methods: set[str] = set()
        for route in self.routes:
            if route.matches(request.scope)[0] is not Match.NONE and isinstance(route, Route):
                methods |= route.methods or set()
        return sorted(methods)

    def slash_twin(self, request: Request) -> str | None:
        """`/path/` ↔ `/path` when that one is served."""
        path = request.url.path
        if path == "/":
            return None
        twin = path.rstrip("/") if path.endswith("/") else path + "/"
        scope = {**request.scope, "path": twin}
        if not any(route.matches(scope)[0] != Match.NONE for route in self.routes):
            return None
        query = request.url.query
        return f"{self.public_url}{quote(twin)}" + (f"?{query}" if query else "")


def create_app(settings: Settings, *, role: str = "all") -> Starlette:
    """`role`: "api" serves HTTP only, "worker" runs the jobs (and answers health checks), "all" both."""
    service = Service(settings, role)
    app = Starlette(
        routes=service.routes,
        lifespan=service.lifespan,
        exception_handlers={
            ApiError: api_error,
            HTTPException: HttpErrors(service.routes, settings.public_url),
            StoreUnavailable: store_unavailable,
        },
        middleware=[Middleware(metrics.HttpMetrics), Middleware(ResolveKeys, keys=service.keys)],
    )
    # Starlette's own slash redirect builds its Location from the Host header; ours (above) does not.
    app.router.redirect_slashes = False
    app.state.store = service.store
    app.state.callbacks = service.callbacks
    app.state.settings = settings
    app.state.media = service.media
    app.state.drain = service.drain
    return app
