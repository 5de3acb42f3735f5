"""Removing an ended task for good: its rows first (one transaction), then its images' bytes.

The one way a task is removed, whoever asks (`DELETE /v1/tasks/{id}`, a retention sweep). Rows go
first so that nothing can serve an image whose bytes are being deleted; bytes the media store could not
delete (a bucket refusing) are logged and left behind, never served again (no row names them).
"""

from __future__ import annotations

import logging

from receiver.logs import event
from receiver.media import Media
from receiver.media import MediaError
from receiver.store import Store

log = logging.getLogger("receiver.store")


async def remove_task(store: Store, media: Media, task_id: str, tenant: str | None = None) -> bool:
    """Remove the ended task `task_id` (of `tenant`, if given) with its events, jobs and images, bytes
    too. False if there is no such task; raises TaskActive if it has not ended."""
    keys = await store.delete_task(task_id, tenant)
    if keys is None:
        return False
    left = 0
    for key in keys:
        try:
            await media.delete(key)
        except MediaError as exc:
            left += 1
            event(log, "image bytes not deleted", level=logging.WARNING, task_id=task_id, reason=str(exc))
    event(log, "task deleted", task_id=task_id, images=len(keys), left=left or None)
    return True
