"""The `sweep` job: retention. RECEIVER_RETAIN_TASKS after a task ended, the task goes whole (row,
events, images and their bytes); RECEIVER_RETAIN_IMAGES after, its images' bytes go and their entries
stay, marked expired; uploads go RECEIVER_RETAIN_IMAGES after they were written, unless a task that
has not ended still uses them.

One standing job row (no task of its own), so the jobs' lease makes one process sweep at a time
however many replicas run; it comes back every RECEIVER_SWEEP_INTERVAL. It works in batches of BATCH
tasks, each in a short transaction of its own and with its bytes deleted between two of them, so a
backlog of a million tasks neither holds a lock for long nor fills memory. Nothing of a task that has
not ended is touched: the store's searches ask for ended tasks, and so does its delete.
"""

from __future__ import annotations

import asyncio
import logging

from receiver import metrics
from receiver.config import Settings
from receiver.jobs import SYSTEM_CLOCK
from receiver.jobs import Clock
from receiver.jobs import Outcome
from receiver.jobs import Retry
from receiver.logs import event
from receiver.media import Media
from receiver.media import MediaError
from receiver.media import delete_media
from receiver.media import delete_tasks
from receiver.store import Job
from receiver.store import Store

log = logging.getLogger("receiver.worker")
BATCH = 500  # tasks per transaction
# Seconds between two batches: room for every other writer. SQLite's busy handler looks again only
# every 100 ms once it has waited a while, so a writer in another process (an API replica) that found
# the database locked would otherwise find the next batch holding it each time it looked (measured:
# 1.7 s waits without the pause; see scripts/bench_sweep.py).
BATCH_PAUSE = 0.15
SWEEP_TASK = "-retention"  # the standing job's task id: no task has it (ids start tsk_)
UPLOADS = "uploads"  # the media folder uploads are kept in


class Sweep:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        media: Media,
        clock: Clock = SYSTEM_CLOCK,
        pause: float = BATCH_PAUSE,
    ) -> None:
        self.settings = settings
        self.store = store
        self.media = media
        self.clock = clock
        self.pause = pause  # between two batches (0 in unit tests, which never sleep)

    async def __call__(self, job: Job) -> Outcome:
        now = self.clock.time()
        retain_tasks, retain_images = self.settings.retain_tasks, self.settings.retain_images
        counts = {"tasks": 0, "images": 0, "uploads": 0}
        try:
            if retain_tasks is not None:
                counts["tasks"] = await self.tasks(now - retain_tasks)
            if retain_images is not None:
                counts["images"] = await self.images(now - retain_images)
                counts["uploads"] = await self.uploads(now - retain_images)
        except MediaError as exc:  # the store is away: what is done stays done, the rest waits
            event(log, "retention sweep interrupted", level=logging.WARNING, reason=str(exc)[:200])
            return Retry(self.settings.sweep_interval, f"media store: {exc}")
        finally:
            for what, count in counts.items():
                metrics.RETENTION_DELETED.labels(what).inc(count)
        metrics.RETENTION_LAST_SWEEP.set(self.clock.time())
        if any(counts.values()):
            event(log, "retention sweep", **counts)
        return Retry(self.settings.sweep_interval, "next sweep")

    async def tasks(self, before: float) -> int:
        """Remove the tasks that ended before `before`, a batch at a time; how many."""
        removed = 0
        while ids := await self.store.ended_before(before, BATCH):
            gone = await delete_tasks(self.store, self.media, ids)
            removed += len(gone)
            if len(ids) < BATCH or not gone:
                break
            await asyncio.sleep(self.pause)
        return removed

    async def images(self, before: float) -> int:
        """Delete the bytes of the images of tasks that ended before `before`; how many images."""
        deleted = 0
        while True:
            ids, keys = await self.store.expire_images(before, BATCH)
            if not ids:
                return deleted
            deleted += await delete_media(self.media, keys)
            await self.store.images_gone(ids)
            if len(ids) < BATCH:
                return deleted
            await asyncio.sleep(self.pause)

    async def uploads(self, before: float) -> int:
        """Delete the uploads written before `before` that no unfinished task uses; how many."""
        deleted = 0
        async for batch in self.media.older(UPLOADS, before):
            if not batch:
                continue
            # Read after the listing: a task made since with an upload named in it keeps that upload.
            in_use = await self.store.uploads_in_use()
            stale = [key for key in batch if key.rsplit("/", 1)[-1] not in in_use]
            deleted += await delete_media(self.media, stale)
        return deleted
