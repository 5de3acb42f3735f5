"""The `deadline` job: due RECEIVER_TASK_DEADLINE after a task was made; an unfinished task fails with
`timed_out` (the store ends it only if it has not ended already, by the same rule as any failure)."""

from __future__ import annotations

from receiver.jobs import Fail
from receiver.jobs import Outcome
from receiver.store import Job
from receiver.store import timed_out


async def deadline(job: Job) -> Outcome:
    return Fail(timed_out())
