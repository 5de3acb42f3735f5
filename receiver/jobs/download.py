"""The `download` job: fetch one result image into our media, while its task still wants it.

Transient failures wait for the next step of RECEIVER_DOWNLOAD_RETRY_DELAYS; past its last step, or on a
permanent failure, the task fails with `download_failed`. Our own media store failing (a full disk, a
bucket refusing writes) is not the image's fault: it is retried at the last step, each try an event of
kind `storage_unavailable`, until the store takes the image or the task's deadline ends it.
"""

from __future__ import annotations

import asyncio
import logging

from receiver import metrics
from receiver.config import Settings
from receiver.downloads import DownloadError
from receiver.fetcher import Fetcher
from receiver.intake import StoredImage
from receiver.jobs import Backoff
from receiver.jobs import Clock
from receiver.jobs import Done
from receiver.jobs import Entry
from receiver.jobs import Fail
from receiver.jobs import Outcome
from receiver.jobs import Retry
from receiver.logs import event
from receiver.logs import url_host
from receiver.models import ErrorCode
from receiver.models import Status
from receiver.models import TaskError
from receiver.store import DownloadTarget
from receiver.store import Job
from receiver.store import Store

log = logging.getLogger("receiver.worker")
# Seconds between looks at whether a running download is still wanted, besides the look each change of
# its task prompts (this process's own changes, and every replica's under PostgreSQL): the bound on how
# long a task ended by another process (an SQLite `--role api`, a lost NOTIFY) keeps its download slot.
WANTED_CHECK = 5.0


def wanted(target: DownloadTarget | None, url: str) -> bool:
    """Whether the task still wants this image from this link: it is downloading and the image is not
    stored yet (a task that ended, whatever ended it, or moved on wants nothing more from the link)."""
    return (
        target is not None
        and target.status == Status.DOWNLOADING
        and target.image.path is None
        and target.image.source_url == url
    )


class Download:
    def __init__(
        self, settings: Settings, store: Store, fetcher: Fetcher, clock: Clock, media_kind: str = "directory"
    ) -> None:
        self.settings = settings
        self.media_kind = media_kind  # the `store` label of receiver_media_write_errors_total
        self.store = store
        self.fetcher = fetcher
        self.clock = clock
        delays = settings.download_retry_delays
        self.backoff = Backoff(delays=delays, base=1.0, factor=1.0, tries=len(delays))
        # Links under our own public URL (the built-in provider's results) are the operator's origin,
        # trusted as given like the provider base URLs; every other link goes through the address guard.
        self.own_links = f"{settings.public_url}/"

    async def __call__(self, job: Job) -> Outcome:
        target = await self.store.download_target(job.task_id, job.arg)
        if target is None or not wanted(target, target.image.source_url):
            return Done()  # already stored, or the task ended
        url = target.image.source_url
        started = self.clock.monotonic()
        try:
            stored = await self._fetch_while_wanted(job, url)
        except DownloadError as exc:
            return self._failed(job, url, exc)
        if stored is None:
            metrics.DOWNLOADS.labels("cancelled").inc()
            event(log, "download cancelled: the task no longer wants it", task_id=job.task_id, image=job.arg)
            return Done()
        seconds = self.clock.monotonic() - started
        metrics.DOWNLOADS.labels("stored").inc()
        metrics.DOWNLOAD_BYTES.inc(stored.size)
        metrics.DOWNLOAD_SECONDS.observe(seconds)
        event(
            log,
            "image stored",
            task_id=job.task_id,
            image=job.arg,
            bytes=stored.size,
            host=url_host(url),
            seconds=round(seconds, 3),
        )
        await self.store.record_image(
            job,
            path=stored.key,
            content_type=stored.content_type,
            size=stored.size,
            sha256=stored.sha256,
            width=stored.width,
            height=stored.height,
        )
        return Done(recorded=True)

    def _failed(self, job: Job, url: str, exc: DownloadError) -> Outcome:
        metrics.DOWNLOADS.labels(exc.kind).inc()
        fields = {"task_id": job.task_id, "image": job.arg, "host": url_host(url), "reason": exc.kind}
        # Our own media store being down is not the image's fault: such a download keeps trying at
        # the last delay until the bucket is back or the task's deadline ends it.
        ours = exc.kind == "media"
        if exc.permanent or (self.backoff.spent(job.attempts) and not ours):
            tries = "" if exc.permanent else f" after {job.attempts} tries"
            event(log, "download failed, giving up", level=logging.WARNING, **fields)
            return Fail(TaskError(ErrorCode.DOWNLOAD_FAILED, f"image {job.arg}: {exc.reason}{tries}"))
        event(log, "download failed, will retry", level=logging.WARNING, attempt=job.attempts, **fields)
        if ours:
            # Its own event kind, so an app or an operator tells a full disk or a refusing bucket (the
            # task waits, up to its deadline) from an image host's trouble.
            metrics.MEDIA_WRITE_ERRORS.labels(self.media_kind).inc()
            entry = Entry(
                "storage_unavailable", f"image {job.arg} try {job.attempts}: {exc.reason}; will retry"
            )
        else:
            entry = Entry("download", f"image {job.arg} try {job.attempts} failed: {exc.reason}")
        return Retry(self.backoff.delay(job.attempts), exc.reason, entry)

    async def _fetch_while_wanted(self, job: Job, url: str) -> StoredImage | None:
        """The image, or None once the task no longer wants it: then the fetch is cancelled at once (in the
        download child too) and the slot is free. RECEIVER_DOWNLOAD_TIMEOUT bounds the attempt in all, so
        a host that trickles a byte at a time, within every read timeout, cannot hold a slot for longer."""
        limit = self.settings.download_timeout
        fetch = asyncio.ensure_future(
            self.fetcher.fetch(
                url,
                f"{job.task_id}/{job.arg}",
                self.settings.max_image_bytes,
                trusted=url.startswith(self.own_links),
            )
        )
        unwanted = asyncio.ensure_future(self._until_unwanted(job, url))
        try:
            await asyncio.wait((fetch, unwanted), timeout=limit, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for running in (fetch, unwanted):
                running.cancel()
            await asyncio.gather(fetch, unwanted, return_exceptions=True)
        if fetch.done() and not fetch.cancelled():
            return fetch.result()
        if unwanted.done() and not unwanted.cancelled():
            return None
        raise DownloadError(
            f"no whole image within {limit:g} s (RECEIVER_DOWNLOAD_TIMEOUT)", permanent=False, kind="timeout"
        )

    async def _until_unwanted(self, job: Job, url: str) -> None:
        """Return once the task no longer wants the image from `url`: looked at whenever the task changes,
        and every WANTED_CHECK seconds."""
        while True:
            await self.store.wait_for_change(job.task_id, WANTED_CHECK)
            try:
                target = await self.store.download_target(job.task_id, job.arg)
            except Exception as exc:  # the database is away: the download goes on, the next look tries again
                event(log, "cannot check a running download", level=logging.WARNING, reason=str(exc)[:200])
                continue
            if not wanted(target, url):
                return
