"""Prometheus metrics, in one registry per process: ours, the HTTP requests by route template, and the
process, Python and garbage-collector collectors of prometheus_client."""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable
from collections.abc import Mapping

from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import GCCollector
from prometheus_client import Histogram
from prometheus_client import Info
from prometheus_client import PlatformCollector
from prometheus_client import ProcessCollector
from prometheus_client import disable_created_metrics
from prometheus_client import generate_latest
from starlette.types import ASGIApp
from starlette.types import Message
from starlette.types import Receive
from starlette.types import Scope
from starlette.types import Send

from receiver import __version__

# A `_created` series per counter and histogram doubles the scrape for a timestamp nobody graphs.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_*: memory, CPU seconds, open file descriptors, start time
PlatformCollector(registry=REGISTRY)  # python_info
GCCollector(registry=REGISTRY)  # python_gc_*
BUILD = Info("receiver_build", "The running receiver's version and Python", registry=REGISTRY)
BUILD.info({"version": __version__, "python": platform.python_version()})

HTTP_REQUESTS = Counter(
    "receiver_http_requests_total",
    "HTTP requests answered, by method, route template and status",
    ["method", "route", "status"],
    registry=REGISTRY,
)
HTTP_SECONDS = Histogram(
    "receiver_http_request_seconds",
    "Time to answer an HTTP request (until its last byte is handed to the server), by method and route",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Tenants are the operator's own (RECEIVER_API_KEYS and the admin API's keys), providers a fixed few:
# the label pairs stay as few as the tenants times the providers.
SPEND = Counter(
    "receiver_spend_usd",
    "USD spent by tasks that ended with a cost, by tenant and provider",
    ["tenant", "provider"],
    registry=REGISTRY,
)
FALLBACKS = Counter(
    "receiver_fallbacks_total",
    "Tasks moved to their next fallback provider, by the provider left, the one taken and why",
    ["from_provider", "to_provider", "reason"],
    registry=REGISTRY,
)
CALLBACKS = Counter(
    "receiver_callbacks_total",
    "Callbacks received, by provider and result",
    ["provider", "result"],
    registry=REGISTRY,
)
CALLBACK_SECONDS = Histogram(
    "receiver_callback_seconds",
    "Time to answer a callback",
    ["provider"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
CALLBACKS_APPLIED = Counter(
    "receiver_callbacks_applied_total",
    "Verified callbacks applied after their answer, by provider and effect (changed, duplicate, pending)",
    ["provider", "result"],
    registry=REGISTRY,
)
TASKS = Gauge("receiver_tasks", "Tasks by provider and status", ["provider", "status"], registry=REGISTRY)
JOBS_DUE = Gauge("receiver_jobs_due", "Jobs due now, by kind", ["kind"], registry=REGISTRY)
JOBS_PARKED = Counter(
    "receiver_jobs_parked_total",
    "Recorded callbacks (kind callback) and jobs set aside by this process after failing again and again",
    ["kind"],
    registry=REGISTRY,
)
PARKED = Gauge(
    "receiver_parked_rows",
    "Rows set aside in the database (the parked table), by kind: callback, or the job's kind",
    ["kind"],
    registry=REGISTRY,
)
OLDEST_DUE = Gauge(
    "receiver_oldest_due_job_seconds",
    "How long the oldest due job of each kind has waited",
    ["kind"],
    registry=REGISTRY,
)
PROVIDER_COOLDOWN = Gauge(
    "receiver_provider_cooldown",
    "1 while `auto` routing skips the provider (failures in a row), else 0; every configured provider",
    ["provider"],
    registry=REGISTRY,
)
LONG_POLLS = Gauge("receiver_long_polls", "`?wait` long-polls open now in this process", registry=REGISTRY)
DOWNLOADS = Counter(
    "receiver_downloads_total",
    "Image downloads by result (stored, or the failure's reason)",
    ["result"],
    registry=REGISTRY,
)
DOWNLOAD_BYTES = Counter("receiver_download_bytes_total", "Bytes of images stored", registry=REGISTRY)
DOWNLOAD_SECONDS = Histogram(
    "receiver_download_seconds",
    "Time to fetch and store one image",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
PROVIDER_REQUESTS = Counter(
    "receiver_provider_requests_total",
    "Requests to providers by provider, endpoint and HTTP status",
    ["provider", "endpoint", "status"],
    registry=REGISTRY,
)
PROVIDER_SECONDS = Histogram(
    "receiver_provider_request_seconds",
    "Time a request to a provider took (until its answer was read, or it failed), by provider and endpoint",
    ["provider", "endpoint"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
    registry=REGISTRY,
)
TASK_SECONDS = Histogram(
    "receiver_task_seconds",
    "Time from a task's creation to its end, by the provider that ended it and its outcome",
    ["provider", "outcome"],
    buckets=(1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0),
    registry=REGISTRY,
)
TASKS_ENDED = Counter(
    "receiver_tasks_ended_total",
    "Tasks ended, by provider, status and error code (`none` for a success)",
    ["provider", "status", "error"],
    registry=REGISTRY,
)
NOTIFICATIONS = Counter(
    "receiver_notifications_total", "Notification attempts by result", ["result"], registry=REGISTRY
)
# Tenants are the operator's own list (RECEIVER_API_KEYS), so a tenant label stays a short one.
NOTIFICATIONS_IN_FLIGHT = Gauge(
    "receiver_notifications_in_flight",
    "Notification deliveries under way in this process, by tenant",
    ["tenant"],
    registry=REGISTRY,
)
WAITS_OPEN = Gauge(
    "receiver_waits_open",
    "?wait long-polls held open in this process, by tenant",
    ["tenant"],
    registry=REGISTRY,
)
WAITS_CAPPED = Counter(
    "receiver_waits_capped_total",
    "?wait long-polls answered at once because the tenant's (or every tenant's) open waits were at their cap",
    ["tenant"],
    registry=REGISTRY,
)


def callback_seen(provider: str, result: str, seconds: float) -> None:
    CALLBACKS.labels(provider, result).inc()
    CALLBACK_SECONDS.labels(provider).observe(seconds)


def task_ended(provider: str, status: str, error: str | None, seconds: float) -> None:
    """Once per task, in the process whose transaction ended it (so once across replicas too)."""
    TASK_SECONDS.labels(provider, status).observe(seconds)
    TASKS_ENDED.labels(provider, status, error or "none").inc()


def show_state(
    tasks: Mapping[tuple[str, str], int],
    jobs_due: Mapping[str, tuple[int, float]],
    providers: Iterable[str],
    statuses: Iterable[str],
    kinds: Iterable[str],
    errors: Iterable[str],
    now: float,
) -> None:
    """The gauges read at scrape time. Every provider offered, status and job kind has its series,
    0 when there is nothing, so an alert on it sees a 0 rather than no data (which fires nothing)."""
    statuses, errors = list(statuses), list(errors)
    TASKS.clear()
    for provider in providers:
        for status in statuses:
            TASKS.labels(provider, status).set(0)
        # Counters at 0 until the first end, so `increase()` sees the first one too.
        TASKS_ENDED.labels(provider, "succeeded", "none")
        for error in errors:
            TASKS_ENDED.labels(provider, "failed", error)
    for (provider, status), count in tasks.items():
        TASKS.labels(provider, status).set(count)
    JOBS_DUE.clear()
    OLDEST_DUE.clear()
    for kind in kinds:
        JOBS_DUE.labels(kind).set(0)
        OLDEST_DUE.labels(kind).set(0)
    for kind, (count, oldest) in jobs_due.items():
        JOBS_DUE.labels(kind).set(count)
        OLDEST_DUE.labels(kind).set(max(0.0, now - oldest))


def show_cooldowns(providers: Iterable[str], cooling: Iterable[str]) -> None:
    cooling = set(cooling)
    for provider in providers:
        PROVIDER_COOLDOWN.labels(provider).set(1 if provider in cooling else 0)


def render() -> bytes:
    data: bytes = generate_latest(REGISTRY)
    return data


def route_template(scope: Scope) -> str:
    """The matched route's path with its parameters as `{name}` (never an id or a token), or
    `unmatched` when no route took the request (so odd paths cannot grow the label set)."""
    if "endpoint" not in scope:
        return "unmatched"
    params = {str(value): name for name, value in scope.get("path_params", {}).items()}
    segments = str(scope["path"]).split("/")
    return "/".join(f"{{{params[part]}}}" if part in params else part for part in segments)


class HttpMetrics:
    """ASGI middleware: counts every HTTP request by method, route template and status, and times it.

    It sits inside Starlette's error middleware, so an unhandled exception (answered 500 out there)
    is counted here as a 500 on its way out.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:  # an exception before the answer began leaves status at 500, as the client will see
            method = scope["method"] if scope["method"] in METHODS else "other"
            route = route_template(scope)
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_SECONDS.labels(method, route).observe(time.perf_counter() - started)
