"""Prometheus metrics, in one registry per process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import Histogram
from prometheus_client import generate_latest

REGISTRY = CollectorRegistry()

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
OLDEST_DUE = Gauge(
    "receiver_oldest_due_job_seconds",
    "How long the oldest due job of each kind has waited",
    ["kind"],
    registry=REGISTRY,
)
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
NOTIFICATIONS = Counter(
    "receiver_notifications_total", "Notification attempts by result", ["result"], registry=REGISTRY
)


def callback_seen(provider: str, result: str, seconds: float) -> None:
    CALLBACKS.labels(provider, result).inc()
    CALLBACK_SECONDS.labels(provider).observe(seconds)


def render() -> bytes:
    data: bytes = generate_latest(REGISTRY)
    return data
