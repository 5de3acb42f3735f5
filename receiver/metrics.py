"""Prometheus metrics, in one registry per process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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


def callback_seen(provider: str, result: str, seconds: float) -> None:
    CALLBACKS.labels(provider, result).inc()
    CALLBACK_SECONDS.labels(provider).observe(seconds)


def render() -> bytes:
    data: bytes = generate_latest(REGISTRY)
    return data
