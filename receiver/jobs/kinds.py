"""What the worker runs, wired once: each job kind (how many at once, how many of one tenant's, its
handler), the pacer the submits share and the fetcher the downloads use."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from receiver.config import Settings
from receiver.fetcher import Fetcher
from receiver.fetcher import open_fetcher
from receiver.jobs import SYSTEM_CLOCK
from receiver.jobs import Clock
from receiver.jobs import Handler
from receiver.jobs.calls import ProviderCalls
from receiver.jobs.cancel import Cancel
from receiver.jobs.deadline import Deadline
from receiver.jobs.download import Download
from receiver.jobs.notify import Notify
from receiver.jobs.reconcile import Reconcile
from receiver.jobs.submit import Submit
from receiver.jobs.submit import build_pacer
from receiver.jobs.sweep import SWEEP_TASK
from receiver.jobs.sweep import Sweep
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
    # A standing job: one row of its own (no task), put in at the worker's start, that reschedules
    # itself for good (the retention sweep); its lease keeps it to one process at a time.
    standing: str | None = None


@dataclass(frozen=True)
class Jobs:
    kinds: dict[str, Kind]
    pacer: Pacer
    fetcher: Fetcher  # closed by the worker once its downloads are over


def wire_jobs(
    settings: Settings,
    store: Store,
    tokens: Tokens,
    provider_http: httpx.AsyncClient,
    outside_http: httpx.AsyncClient,
    media: Media,
    clock: Clock = SYSTEM_CLOCK,
) -> Jobs:
    pacer = build_pacer(settings)
    # Downloads run in a child process (RECEIVER_DOWNLOAD_PROCESS); their results are recorded here.
    fetcher = open_fetcher(settings, provider_http, outside_http, media)
    calls = ProviderCalls(settings, tokens, provider_http, clock)
    notifier = Notifier(settings, outside_http, clock)
    kinds = {
        "submit": Kind(8, Submit(settings, store, tokens, media, calls, pacer, clock)),
        "download": Kind(
            settings.download_concurrency, Download(settings, store, fetcher, clock, media.kind)
        ),
        "reconcile": Kind(4, Reconcile(settings, store, calls)),
        "deadline": Kind(4, Deadline(store)),
        "cancel": Kind(2, Cancel(settings, store, calls)),
        "notify": Kind(
            settings.notify_slots, Notify(settings, store, tokens, notifier), settings.notify_per_tenant
        ),
    }
    if settings.retain_images is not None or settings.retain_tasks is not None:
        kinds["sweep"] = Kind(1, Sweep(settings, store, media, clock), standing=SWEEP_TASK)
    return Jobs(kinds, pacer, fetcher)
