"""The `deadline` job: due RECEIVER_TASK_DEADLINE after a task was made; an unfinished task fails with
`timed_out` (the store ends it only if it has not ended already, by the same rule as any failure). When
its downloads were still failing (a full media store, an image host that keeps answering 503), the
error says what their last try met."""

from __future__ import annotations

from dataclasses import replace

from receiver.jobs import Fail
from receiver.jobs import Outcome
from receiver.store import Job
from receiver.store import Store
from receiver.store import timed_out


class Deadline:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def __call__(self, job: Job) -> Outcome:
        error = timed_out()
        trouble = await self.store.download_trouble(job.task_id)
        if trouble:
            error = replace(error, message=f"{error.message}; its last download try: {trouble}")
        return Fail(error)
