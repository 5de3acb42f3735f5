"""The job kinds the worker runs: for each, how many at once, how many of one tenant's, and its handler."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from receiver.config import Settings
from receiver.fetcher import Fetcher
from receiver.jobs import Clock
from receiver.jobs import Handler
from receiver.jobs.calls import ProviderCalls
from receiver.jobs.deadline import deadline
from receiver.jobs.download import Download
from receiver.jobs.notify import Notify
from receiver.jobs.reconcile import Reconcile
from receiver.jobs.submit import Submit
from receiver.media import Media
from receiver.notify import Notifier
from receiver.pacing import Pacer
from receiver.store import Store
from receiver.tokens import Tokens


@dataclass(frozen=True)
class Kind:
    slots: int
    handler: Handler
    # With it, no more than this many of one tenant's at once, so one tenant's slow jobs leave the
    # other slots to the other tenants.
    per_tenant: int | None = None


def job_kinds(
    settings: Settings,
    store: Store,
    tokens: Tokens,
    provider_http: httpx.AsyncClient,
    outside_http: httpx.AsyncClient,
    media: Media,
    fetcher: Fetcher,
    pacer: Pacer,
    clock: Clock,
) -> dict[str, Kind]:
    calls = ProviderCalls(settings, tokens, provider_http, clock)
    notifier = Notifier(settings, outside_http, clock)
    return {
        "submit": Kind(8, Submit(settings, store, tokens, media, calls, pacer, clock)),
        "download": Kind(settings.download_concurrency, Download(settings, store, fetcher, clock)),
        "reconcile": Kind(4, Reconcile(settings, store, calls)),
        "deadline": Kind(4, deadline),
        "notify": Kind(
            settings.notify_slots, Notify(settings, store, tokens, notifier), settings.notify_per_tenant
        ),
    }
