"""The domain rules, written once for every backend: forward-only moves, dedupe, the inbox, jobs, leases.

`Store` holds every read and every state change as SQL with named parameters against the `Tx` protocol,
and composes a `Backend` (base.py; `sqlite.py`, `postgres.py`) that supplies connections, transactions,
wake-ups and a dialect, nothing else: no backend can override a rule.
Each state change is one transaction: the task row, its events and its jobs move together or not at all.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import math
import os
import re
import secrets
import socket
from collections.abc import Awaitable
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC
from datetime import datetime
from typing import Any
from typing import TypeVar

from receiver import metrics
from receiver.logs import event
from receiver.models import OUTCOME_UNKNOWN
from receiver.models import ErrorCode
from receiver.models import Outcome
from receiver.models import Status
from receiver.models import Submission
from receiver.models import TaskError
from receiver.models import fallback_reason
from receiver.store.base import Backend
from receiver.store.base import Clock
from receiver.store.base import Op
from receiver.store.base import Params
from receiver.store.base import Row
from receiver.store.base import Timings
from receiver.store.base import Tx
from receiver.store.base import in_list
from receiver.store.records import KEY_COLUMNS
from receiver.store.records import TASK_STATE
from receiver.store.records import TASK_VIEW
from receiver.store.records import BudgetExceeded
from receiver.store.records import Claimed
from receiver.store.records import DownloadTarget
from receiver.store.records import Ended
from receiver.store.records import EventRecord
from receiver.store.records import Health
from receiver.store.records import IdempotencyConflict
from receiver.store.records import ImageRecord
from receiver.store.records import Job
from receiver.store.records import KeyRecord
from receiver.store.records import NewTask
from receiver.store.records import Pace
from receiver.store.records import TaskRecord
from receiver.store.records import TaskView
from receiver.untrusted import storable
from receiver.untrusted import storable_json

log = logging.getLogger("receiver.store")
T = TypeVar("T")
V = TypeVar("V", bound=TaskView)
URGENT_LEAD = 3600.0  # jobs are claimed oldest-due first: an urgent download is due an hour "ago"
MAX_LOGGED_MESSAGE = 300  # characters of a failed task's message in its log line
# Events of one kind that changed nothing, kept per task between two changes (see _news_event).
NEWS_WITHOUT_CHANGE = 50
PACE_SENDS_READ = 32  # sends per pace group whose times each worker turn reads (the rest are counted)
# Times one inbox or job row may fail to apply, to be claimed or to run before it is parked: set aside
# in the `parked` table with an event on its task, never tried again (a constant: a row that failed
# five times in a row will fail a sixth; what matters is that it cannot hold up the rest).
MAX_FAILURES = 5
# The reads by primary key, each spelled once whichever way it is run.
TASK_BY_ID = "SELECT * FROM tasks WHERE id=:id"
TASK_VIEW_BY_ID = f"SELECT {TASK_VIEW} FROM tasks WHERE id=:id"  # noqa: S608 - column names only
IMAGES_OF_TASK = "SELECT * FROM images WHERE task_id=:id ORDER BY idx"
ENDED = tuple(status.value for status in Status if status.terminal)
ACTIVE = tuple(status.value for status in Status if not status.terminal)
# An upload a task's request names (receiver.tasks.UPLOAD_PREFIX, or a link to it), as stored text.
UPLOAD_NAMED = re.compile(r"(?:upload:|/uploads/)([0-9a-f]{64}\.(?:png|jpg|webp))")
KEY_BY_ID = f"SELECT {KEY_COLUMNS} FROM api_keys WHERE id=:id"  # noqa: S608 - column names only
KEY_BY_DIGEST = f"SELECT {KEY_COLUMNS}, hash FROM api_keys WHERE hash=:hash"  # noqa: S608 - column names only
# What a task counts in usage and against its key's budget: its cost once it ended, its estimate while
# it runs (a model with no known price counts 0).
TASK_SPEND = "COALESCE(cost_usd, estimate_usd, 0)"
BUDGET_SLACK = 1e-9  # dollars: a sum of float prices that lands a hair over the budget still fits
KEY_CHANGEABLE = frozenset(("name", "budget_usd", "budget_period", "rate_per_minute", "disabled"))


# The longest a worker sleeps between looks at the jobs (worker.py), whatever wakes it sooner.
WORKER_LOOKS_EVERY = 1.0


class StoreUnavailable(Exception):
    """The database cannot be reached right now (a 503 for the caller; nothing was changed)."""


class RoleTaken(Exception):
    """This process may not become a worker here: the message says why, in one line."""


class Store:
    """Reads and state changes, composed with the backend that carries their SQL to a database."""

    def __init__(self, backend: Backend, timings: Timings) -> None:
        self.backend = backend
        self.timings = timings
        backend.committed = committed
        # This process, as the owner of the jobs it claims (host, pid and a nonce: pids are reused).
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

    @property
    def clock(self) -> Clock:
        return self.backend.clock

    @property
    def jobs_changed(self) -> asyncio.Event:
        """Set whenever a job may have become due (here or, where the backend tells, elsewhere)."""
        return self.backend.wakeups.jobs_changed

    # -- the backend's part ----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and bring the schema up to date."""
        await self.backend.open()

    async def close(self) -> None:
        await self.backend.close()

    async def writable(self) -> bool:
        """Whether a write can commit right now (for /readyz)."""
        return await self.backend.writable()

    async def write(self, op: Op[T]) -> T:
        """Run `op` inside a write transaction and commit it; announce what it changed."""
        return await self.backend.write(op)

    async def fetch(self, sql: str, params: Params | None = None) -> list[Row]:
        """A read outside any write transaction."""
        return await self.backend.fetch(sql, params)

    async def claim_worker(self) -> None:
        """Become this database's worker (or raise RoleTaken where only one worker may run). Where
        this process is now the only worker, every job still leased is a dead process's: free again."""
        if await self.backend.claim_worker():
            await self.write(_free_all_jobs)

    async def record_callback(self, task_id: str, outcome: Outcome, *, urgent: bool = False) -> None:
        """Keep a verified callback durably; the worker applies it right after.

        This is all a callback waits for before its answer: one row. Applying it (the state change,
        image rows, download jobs, the event) is the worker's next step, so a kill -9 after the answer
        loses nothing and the answer stays fast."""
        await self.backend.keep((task_id, outcome.to_json(), int(urgent)), insert_inbox)

    # -- wake-ups --------------------------------------------------------------------------------

    def wake_all(self) -> None:
        """Every open `wait_for_change` returns now (a shutdown answers its long-polls as they stand)."""
        wakeups = self.backend.wakeups
        wakeups.announce(wakeups.everyone(), False)

    def waiting(self) -> int:
        """How many `wait_for_change` calls (long-polls) are open in this process."""
        return sum(len(waiters) for waiters in self.backend.wakeups.task_waiters.values())

    async def wait_for_change(self, task_id: str, timeout: float) -> None:
        """Return when the task changes or `timeout` passes, whichever is first."""
        await self.backend.wait_for_change(task_id, timeout)

    # -- reads -----------------------------------------------------------------------------------

    async def task(self, task_id: str, tenant: str | None = None) -> TaskRecord | None:
        """The whole task, request included: for the worker, which spells provider requests from it."""
        return owned(TaskRecord, await self.fetch(TASK_BY_ID, {"id": task_id}), tenant)

    async def task_row(self, task_id: str, tenant: str | None = None) -> TaskRecord | None:
        """A whole task by primary key on the callback path and for the worker's jobs (a point read)."""
        return owned(TaskRecord, await self.backend.point(TASK_BY_ID, {"id": task_id}), tenant)

    async def task_view(self, task_id: str, tenant: str | None = None) -> TaskView | None:
        """A task as lookups, events and notifications show it: never its request (a point read)."""
        return owned(TaskView, await self.backend.point(TASK_VIEW_BY_ID, {"id": task_id}), tenant)

    async def images(self, task_id: str) -> list[ImageRecord]:
        return [ImageRecord.from_row(row) for row in await self.fetch(IMAGES_OF_TASK, {"id": task_id})]

    async def image_rows(self, task_id: str) -> list[ImageRecord]:
        """A task's images on the lookup path (a point read)."""
        rows = await self.backend.point(IMAGES_OF_TASK, {"id": task_id})
        return [ImageRecord.from_row(row) for row in rows]

    async def images_of(self, task_ids: Sequence[str]) -> dict[str, list[ImageRecord]]:
        found: dict[str, list[ImageRecord]] = {task_id: [] for task_id in task_ids}
        if task_ids:
            marks, params = in_list("t", task_ids)
            sql = f"SELECT * FROM images WHERE task_id IN ({marks}) ORDER BY task_id, idx"  # noqa: S608
            for row in await self.fetch(sql, params):
                found[row["task_id"]].append(ImageRecord.from_row(row))
        return found

    async def download_target(self, task_id: str, index: int) -> DownloadTarget | None:
        rows = await self.fetch(
            "SELECT i.*, t.status AS task_status FROM images i JOIN tasks t ON t.id=i.task_id"
            " WHERE i.task_id=:id AND i.idx=:idx",
            {"id": task_id, "idx": index},
        )
        if not rows:
            return None
        return DownloadTarget(ImageRecord.from_row(rows[0]), Status(rows[0]["task_status"]))

    async def download_trouble(self, task_id: str) -> str | None:
        """Why the task's downloads are still waiting, as their latest failed try said (a full media
        store, an image host answering 503 …); None when none of them failed."""
        rows = await self.fetch(
            "SELECT last_error FROM jobs WHERE task_id=:id AND kind='download' AND last_error IS NOT NULL"
            " AND last_error<>'' ORDER BY attempts DESC, id LIMIT 1",
            {"id": task_id},
        )
        return str(rows[0]["last_error"]) if rows else None

    async def image(self, task_id: str, index: int) -> ImageRecord | None:
        rows = await self.fetch(
            "SELECT * FROM images WHERE task_id=:id AND idx=:idx", {"id": task_id, "idx": index}
        )
        return ImageRecord.from_row(rows[0]) if rows else None

    async def tasks(
        self, tenant: str, *, status: str | None, provider: str | None, limit: int, before_seq: int | None
    ) -> list[TaskView]:
        """A page of the tenant's tasks, newest first, as lists show them (never their requests)."""
        clauses, params = ["tenant=:tenant"], {"tenant": tenant, "limit": limit}
        if status:
            clauses.append("status=:status")
            params["status"] = status
        if provider:
            clauses.append("provider=:provider")
            params["provider"] = provider
        if before_seq is not None:
            clauses.append("seq<:before")
            params["before"] = before_seq
        where = " AND ".join(clauses)
        sql = f"SELECT {TASK_VIEW} FROM tasks WHERE {where} ORDER BY seq DESC LIMIT :limit"  # noqa: S608
        return [TaskView.from_row(row) for row in await self.fetch(sql, params)]

    async def events(self, task_id: str, *, after: int = 0, limit: int = 1000) -> list[EventRecord]:
        """A task's events in order, from the one after event id `after`, at most `limit`."""
        rows = await self.fetch(
            "SELECT * FROM events WHERE task_id=:id AND id>:after ORDER BY id LIMIT :limit",
            {"id": task_id, "after": after, "limit": limit},
        )
        return [EventRecord.from_row(row) for row in rows]

    async def task_counts(self) -> dict[tuple[str, str], int]:
        rows = await self.fetch("SELECT provider, status, COUNT(*) AS n FROM tasks GROUP BY provider, status")
        return {(row["provider"], row["status"]): int(row["n"]) for row in rows}

    async def jobs_due(self) -> dict[str, tuple[int, float]]:
        """Per kind: how many jobs are due now, and when the oldest of them fell due."""
        rows = await self.fetch(
            "SELECT kind, COUNT(*) AS n, MIN(due_at) AS oldest FROM jobs WHERE due_at<=:now GROUP BY kind",
            {"now": self.clock()},
        )
        return {row["kind"]: (int(row["n"]), float(row["oldest"])) for row in rows}

    # -- retention: each step one bounded batch in a transaction of its own ------------------------

    async def expire_images(self, before: float, limit: int) -> tuple[list[str], list[str]]:
        """Up to `limit` ended tasks, the first to have ended before `before`, whose stored images are
        still there: their images are marked expired (a link to one answers 410 from now on) and their
        ids and media keys returned, for the bytes to be deleted and then `images_gone`."""

        async def op(tx: Tx) -> tuple[list[str], list[str]]:
            ended, params = in_list("s", ENDED)
            rows = await tx.all(
                "SELECT id FROM tasks WHERE completed_at IS NOT NULL AND images_expired=0"  # noqa: S608
                f" AND completed_at<:before AND status IN ({ended}) ORDER BY completed_at, id LIMIT :limit",
                {"before": before, "limit": limit, **params},
            )
            ids = [row["id"] for row in rows]
            if not ids:
                return [], []
            marks, of_tasks = in_list("t", ids)
            keys = await tx.all(
                f"SELECT path FROM images WHERE task_id IN ({marks}) AND path IS NOT NULL",  # noqa: S608
                of_tasks,
            )
            await tx.run(
                f"UPDATE images SET expired=1 WHERE task_id IN ({marks}) AND path IS NOT NULL",  # noqa: S608
                of_tasks,
            )
            return ids, [row["path"] for row in keys]

        return await self.write(op)

    async def images_gone(self, task_ids: Sequence[str]) -> None:
        """The bytes of these tasks' expired images are deleted: their entries lose the key, and the
        tasks leave the sweep's search."""
        marks, params = in_list("t", task_ids)

        async def op(tx: Tx) -> None:
            await tx.run(f"UPDATE images SET path=NULL WHERE task_id IN ({marks}) AND expired=1", params)  # noqa: S608
            await tx.run(f"UPDATE tasks SET images_expired=1 WHERE id IN ({marks})", params)  # noqa: S608

        await self.write(op)

    async def ended_before(self, before: float, limit: int) -> list[str]:
        """The ids of up to `limit` ended tasks, the first to have ended before `before`."""
        ended, params = in_list("s", ENDED)
        rows = await self.fetch(
            "SELECT id FROM tasks WHERE completed_at IS NOT NULL AND completed_at<:before"  # noqa: S608
            f" AND status IN ({ended}) ORDER BY completed_at, id LIMIT :limit",
            {"before": before, "limit": limit, **params},
        )
        return [row["id"] for row in rows]

    async def media_keys(self, task_ids: Sequence[str]) -> list[str]:
        """The media keys of the stored images of those of these tasks that have ended (for
        `receiver.media.delete_media`): a task still running keeps its bytes."""
        if not task_ids:
            return []
        marks, params = in_list("t", task_ids)
        ended, ended_params = in_list("s", ENDED)
        rows = await self.fetch(
            f"SELECT i.path FROM images i JOIN tasks t ON t.id=i.task_id WHERE t.id IN ({marks})"  # noqa: S608
            f" AND t.completed_at IS NOT NULL AND t.status IN ({ended}) AND i.path IS NOT NULL",
            {**params, **ended_params},
        )
        return [row["path"] for row in rows]

    async def delete_ended(self, task_ids: Sequence[str]) -> list[str]:
        """Remove those of these tasks that have ended, with their images, events and jobs, in one
        transaction; a task that has not ended is left whole. Returns the ids removed. Their media is
        the caller's to delete first (`media_keys`, `receiver.media.delete_media`)."""
        if not task_ids:
            return []
        marks, params = in_list("t", task_ids)
        ended, ended_params = in_list("s", ENDED)

        async def op(tx: Tx) -> list[str]:
            rows = await tx.all(
                f"SELECT id FROM tasks WHERE id IN ({marks}) AND completed_at IS NOT NULL"  # noqa: S608
                f" AND status IN ({ended}){tx.lock}",
                {**params, **ended_params},
            )
            gone = [row["id"] for row in rows]
            if gone:
                which, of_gone = in_list("g", gone)
                for table in ("events", "images", "jobs", "inbox"):
                    await tx.run(f"DELETE FROM {table} WHERE task_id IN ({which})", of_gone)  # noqa: S608
                await tx.run(f"DELETE FROM tasks WHERE id IN ({which})", of_gone)  # noqa: S608
                tx.changed.update(gone)  # a long-poll on one of them answers (a 404) at once
            return gone

        return await self.write(op)

    async def uploads_in_use(self) -> set[str]:
        """The names of the uploads that tasks not ended yet still hand to their provider: kept as
        `upload:<name>` (a data URI the service stored) or as a link to `/uploads/<name>`."""
        active, params = in_list("s", ACTIVE)
        rows = await self.fetch(
            f"SELECT request FROM tasks WHERE status IN ({active}) AND request LIKE '%upload%'",  # noqa: S608
            params,
        )
        return {name for row in rows for name in UPLOAD_NAMED.findall(row["request"])}

    # -- writes: tasks ---------------------------------------------------------------------------

    async def create_task(self, new: NewTask) -> tuple[TaskView, bool]:
        """Insert a queued task with its submit and deadline jobs; an idempotent repeat returns the first."""

        async def op(tx: Tx) -> tuple[TaskView, bool]:
            if new.idempotency_key is not None:
                existing = await tx.one(
                    f"SELECT {TASK_VIEW}, request_hash FROM tasks"  # noqa: S608 - column names only
                    " WHERE tenant=:tenant AND idempotency_key=:key",
                    {"tenant": new.tenant, "key": new.idempotency_key},
                )
                if existing is not None:
                    if existing["request_hash"] != new.request_hash:
                        raise IdempotencyConflict(new.idempotency_key)
                    return TaskView.from_row(existing), False
            if new.key is not None and new.key.budget_usd is not None:
                await _within_budget(tx, new.key.id, new.estimate_usd)
            await tx.run(
                "INSERT INTO tasks (id, tenant, provider, model, prompt, request, fallback, provider_state,"
                " status, metadata, notify_url, idempotency_key, request_hash, estimate_usd, created_at,"
                " updated_at, key_id) VALUES (:id, :tenant, :provider, :model, :prompt, :request, :fallback,"
                " :state, :status, :metadata, :notify_url, :key, :hash, :estimate, :now, :now, :key_id)",
                {
                    "key_id": new.key.id if new.key is not None else None,
                    "id": new.id,
                    "tenant": new.tenant,
                    "provider": new.provider,
                    "model": new.model,
                    "prompt": new.prompt,
                    "request": _dumps(new.request),
                    "fallback": _dumps(list(new.request.get("fallback") or [])),
                    "state": _dumps(new.provider_state),
                    "status": str(Status.QUEUED),
                    "metadata": _dumps(new.metadata),
                    "notify_url": new.notify_url,
                    "key": new.idempotency_key,
                    "hash": new.request_hash,
                    "estimate": new.estimate_usd,
                    "now": tx.now,
                },
            )
            if new.probe:
                await _take_probe(tx, new.provider, self.timings)
            await _add_job(tx, "submit", new.id, 0, tx.now)
            await _add_job(tx, "deadline", new.id, 0, tx.now + self.timings.task_deadline)
            summary = f"queued for {new.provider} ({new.model})" + (f"; {new.routing}" if new.routing else "")
            await _event(tx, new.id, "created", True, summary, "→queued")
            return TaskView.from_row(await _task(tx, new.id)), True

        return await self.write(op)

    async def record_submission(
        self,
        job: Job,
        submission: Submission,
        *,
        urgent: bool = False,
        provider: str = "",
        unanswered: bool = False,
    ) -> None:
        """The provider accepted the task: keep its id, start the reconcile clock, apply a sync result.
        `unanswered`: the submit got no clear answer (a timeout after sending), which counts against the
        provider's health though the task waits for its callback."""

        async def op(tx: Tx) -> None:
            task = await _task(tx, job.task_id)
            await _delete_job(tx, job.id)
            if provider:
                await _provider_health(tx, provider, not unanswered, self.timings)
            if provider and task["provider"] != provider:
                # The task moved to a fallback while this submit was in flight (a failure callback came
                # first): the late answer is recorded; the new provider has its own submit job.
                note = f"{provider}'s submit answer came after the task moved to {task['provider']}: ignored"
                await _event(tx, job.task_id, "submit", True, note, None)
                return
            if task["submitted_at"] is not None:
                return  # recorded already (by a process whose lease ran out): never twice
            state = {**json.loads(task["provider_state"]), **storable_json(submission.state)}
            ptid = None if submission.provider_task_id is None else storable(submission.provider_task_id)
            await tx.run(
                "UPDATE tasks SET provider_task_id=COALESCE(provider_task_id, :ptid), provider_state=:state,"
                " submitted_at=:now, updated_at=:now WHERE id=:id",
                {
                    "ptid": ptid,
                    "state": _dumps(state),
                    "now": tx.now,
                    "id": job.task_id,
                },
            )
            change = await _move(tx, task, Status.SUBMITTED)
            if task["status"] == Status.CANCELLED:
                # Cancelled while this submit was on its way: the provider is asked to stop it too.
                await _add_job(tx, "cancel", job.task_id, 0, tx.now)
            accepted = f"accepted by the provider as {ptid or '(no id)'}"
            summary = submission.note or accepted
            await _event(tx, job.task_id, "submit", True, summary, change)
            if submission.outcome is not None:
                outcome = replace(submission.outcome, provider=provider)
                await _apply(tx, job.task_id, outcome, "submit", True, urgent)
            elif change is not None or task["status"] == Status.SUBMITTED:  # submitted now (no re-read)
                await _add_job(tx, "reconcile", job.task_id, 0, tx.now + self.timings.reconcile_after)

        await self.write(op)

    async def apply_outcome(
        self, task_id: str, outcome: Outcome, kind: str, *, verified: bool = True, urgent: bool = False
    ) -> str:
        """The one path for news about a task, however it came (callback, poll, submit answer).

        `urgent` puts its downloads ahead of the queue (for providers whose links die within minutes)."""
        return await self.write(lambda tx: _apply(tx, task_id, outcome, kind, verified, urgent))

    async def fail_task(
        self, task_id: str, error: TaskError, kind: str, job_id: int | None = None, provider: str = ""
    ) -> str:
        """End a task with `error` (or move it to its next fallback, by the same rule as any failure).
        `provider`, when given, is the provider the failure is about: stale once the task has left it."""

        async def op(tx: Tx) -> str:
            if job_id is not None:
                await _delete_job(tx, job_id)
            if provider and error.code is ErrorCode.PROVIDER_UNAVAILABLE:
                await _provider_health(tx, provider, False, self.timings)
            outcome = Outcome.failed(None, error, error.message)
            return await _apply(tx, task_id, replace(outcome, provider=provider), kind, True)

        return await self.write(op)

    async def cancel_task(self, task_id: str, tenant: str | None) -> tuple[TaskView | None, bool]:
        """End the tenant's task as `cancelled` (the app's wish), by the same end as any other: its
        pending jobs dropped, its notification due. A task the provider holds gets a `cancel` job, which
        asks the provider to stop where it can. Returns the task as it now is (None: no such task of
        this tenant) and whether it was cancelled (False: it had ended already)."""

        async def op(tx: Tx) -> tuple[TaskView | None, bool]:
            task = await tx.one(f"SELECT {TASK_STATE} FROM tasks WHERE id=:id{tx.lock}", {"id": task_id})  # noqa: S608
            if task is None or (tenant is not None and task["tenant"] != tenant):
                return None, False
            was = Status(task["status"])
            change = await _finish(tx, task, Status.CANCELLED, None)
            if change is not None:
                await _event(tx, task_id, "cancel", True, f"cancelled by the app (it was {was})", change)
                if task["provider_task_id"] or task["submitted_at"] is not None:
                    await _add_job(tx, "cancel", task_id, 0, tx.now)
            row = await tx.one(TASK_VIEW_BY_ID, {"id": task_id})
            assert row is not None  # locked above: it is there
            return TaskView.from_row(row), change is not None

        return await self.write(op)

    async def add_refusal(self, task_id: str, kind: str, verified: bool, summary: str) -> None:
        """A refused callback. Refusals in a row are one event that counts them (its time and summary
        the latest), so a flood of bad callbacks cannot grow a task's events without bound."""

        async def op(tx: Tx) -> None:
            last = await tx.one(
                "SELECT id, repeats FROM events WHERE task_id=:id ORDER BY id DESC LIMIT 1", {"id": task_id}
            )
            if last is not None and last["repeats"] is not None:
                await tx.run(
                    "UPDATE events SET repeats=repeats+1, at=:now, kind=:kind, verified=:verified,"
                    " summary=:summary WHERE id=:event",
                    {
                        "now": tx.now,
                        "kind": kind,
                        "verified": int(verified),
                        "summary": storable(summary[:500]),
                        "event": last["id"],
                    },
                )
                tx.changed.add(task_id)
                return
            await _event(tx, task_id, kind, verified, summary, None, repeats=1)

        await self.write(op)

    async def record_image(
        self,
        job: Job,
        *,
        path: str,
        content_type: str,
        size: int,
        sha256: str,
        width: int | None,
        height: int | None,
    ) -> bool:
        """Keep a stored image; the last one in makes the task succeed. False if it was already stored."""

        async def op(tx: Tx) -> bool:
            task = await _task(tx, job.task_id)  # locked first, as every change of a task does
            await _delete_job(tx, job.id)
            stored = await tx.run(
                "UPDATE images SET path=:path, content_type=:type, size=:size, sha256=:sha256, width=:width,"
                " height=:height, stored_at=:now WHERE task_id=:id AND idx=:idx AND path IS NULL",
                {
                    "path": path,
                    "type": content_type,
                    "size": size,
                    "sha256": sha256,
                    "width": width,
                    "height": height,
                    "now": tx.now,
                    "id": job.task_id,
                    "idx": job.arg,
                },
            )
            if not stored:
                return False
            await _event(tx, job.task_id, "download", True, f"image {job.arg} stored ({size} bytes)", None)
            missing = await tx.one(
                "SELECT COUNT(*) AS n FROM images WHERE task_id=:id AND path IS NULL", {"id": job.task_id}
            )
            if missing is not None and missing["n"] == 0:
                change = await _finish(tx, task, Status.SUCCEEDED, None)
                if change:
                    await _event(tx, job.task_id, "status", True, "every image is stored", change)
            tx.changed.add(job.task_id)
            return True

        return await self.write(op)

    # -- writes: jobs ----------------------------------------------------------------------------

    async def claim_due(
        self,
        slots: Mapping[str, int],
        skip_submits_of: Iterable[str] = (),
        count_for: Sequence[str] = (),
        inbox_batch: int = 256,
        pace_windows: Mapping[str, float] | None = None,
        per_tenant: Mapping[str, int] | None = None,
    ) -> Claimed:
        """One turn of the worker in one operation: apply recorded callbacks, take back jobs whose lease
        ran out, lease due jobs (up to `slots[kind]`, oldest first, leaving alone the submit jobs of
        providers that pacing holds back), and tell when the next job falls due and (if asked) how many
        tasks each provider has in flight, and (with `pace_windows`, each rate-limited pace group's
        window) the pace groups' shared state. A kind in `per_tenant` is claimed fairly: no tenant ever
        has more than that many of its jobs running (in every process together), so the slots left go
        to the other tenants' jobs however many of the first one's are due before them."""
        skip = sorted(skip_submits_of)
        marks, skip_params = in_list("p", skip)
        held = ""
        if skip:
            held = (
                " AND NOT (kind='submit' AND EXISTS (SELECT 1 FROM tasks t WHERE t.id=jobs.task_id"  # noqa: S608
                f" AND t.provider IN ({marks})))"
            )

        async def op(tx: Tx) -> Claimed:
            applied, again = await _apply_inbox(tx, inbox_batch)
            await _release_expired(tx)

            def pick(only: str = "") -> str:
                """The ids of up to :free due jobs of :kind, oldest first (`only` narrows them further)."""
                return (
                    f"SELECT id FROM jobs WHERE running=0 AND kind=:kind AND due_at<=:now{held}{only}"  # noqa: S608
                    f" ORDER BY due_at, id LIMIT :free{tx.skip_locked}"
                )

            jobs: list[Job] = []
            # One look at which kinds have a job due, so a turn runs no claim that cannot find one
            # (only the kinds asked for are read: a row of another kind is never even decoded), and
            # when the next job falls due after them (the worker sleeps until then, or until woken).
            kinds, kind_params = in_list("k", sorted(slots))
            looked = await tx.all(
                f"SELECT DISTINCT kind, CAST(NULL AS {tx.dialect.types['real']}) AS due FROM jobs"  # noqa: S608
                f" WHERE running=0 AND due_at<=:now AND kind IN ({kinds}) UNION ALL"
                f" SELECT CAST(NULL AS TEXT), MIN(due_at) FROM jobs WHERE running=0 AND due_at>:now{held}",
                {"now": tx.now, **kind_params, **skip_params},
            )
            due_kinds = {row["kind"] for row in looked if row["kind"] is not None}
            later = [float(row["due"]) for row in looked if row["kind"] is None and row["due"] is not None]
            for kind, free in slots.items():
                if free > 0 and kind in due_kinds:
                    params = {
                        "kind": kind,
                        "now": tx.now,
                        "lease": tx.now + self.timings.job_lease,
                        "owner": self.owner,
                        "free": free,
                        **skip_params,
                    }
                    if per_tenant and kind in per_tenant:
                        taken, failed = await _claim_per_tenant(tx, kind, pick, params, per_tenant[kind])
                    else:
                        taken, failed = await _claim_jobs(tx, kind, pick(), params)
                    jobs += taken
                    again = again or failed
            in_flight = await _in_flight(tx, count_for, self.owner) if count_for else {}
            due_at = later[0] if later else None
            paces = await _paces(tx, pace_windows) if pace_windows is not None else {}
            return Claimed(jobs, due_at, in_flight, applied, again, paces)

        return await self.write(op)

    async def ensure_job(self, kind: str, task_id: str) -> None:
        """A job of `kind` for `task_id`, due now, unless there is one already (it keeps its turn)."""
        await self.write(lambda tx: _add_job(tx, kind, task_id, 0, tx.now))

    async def extend_leases(self, jobs: Sequence[Job]) -> None:
        """A heartbeat for jobs still running here: keep their leases from running out."""
        if not jobs:
            return
        marks, params = in_list("j", [job.id for job in jobs])

        async def op(tx: Tx) -> None:
            await tx.run(
                f"UPDATE jobs SET lease_until=:lease WHERE running=1 AND id IN ({marks})",  # noqa: S608
                {"lease": tx.now + self.timings.job_lease, **params},
            )

        await self.write(op)

    async def in_flight(self, providers: Sequence[str]) -> dict[tuple[str, str], int]:
        """Tasks accepted by their provider and not finished, by (provider, model).

        Counted in a write transaction, in order with the commits that accept tasks, so a pacing
        decision never misses a task that was accepted just before it."""
        return await self.write(lambda tx: _in_flight(tx, providers, self.owner))

    async def pace_acquire(
        self,
        job: Job,
        group: str,
        providers: Sequence[str],
        per_window: int | None,
        window: float,
        probe: float,
    ) -> bool:
        """Take a send for `job` if no process holds its pace group back and the window has room, and
        record it. The group's row is locked first, so acquires of all processes run one at a time.

        A probe (sent alone after a hold) must be the group's oldest submit, so the task a 429 refused
        goes first whichever process probes; it holds the group for `probe` seconds, until
        `pace_end_probe` or its end."""
        marks, params = in_list("p", providers)
        older = (
            "SELECT 1 AS x FROM jobs j JOIN tasks t ON t.id=j.task_id"  # noqa: S608 - placeholders only
            f" WHERE j.kind='submit' AND t.provider IN ({marks}) AND j.id<>:id"
            " AND (j.due_at<(SELECT due_at FROM jobs WHERE id=:id)"
            " OR (j.due_at=(SELECT due_at FROM jobs WHERE id=:id) AND j.id<:id)) LIMIT 1"
        )

        async def op(tx: Tx) -> bool:
            await tx.run(
                "INSERT INTO pace_holds (grp) VALUES (:g) ON CONFLICT (grp) DO NOTHING", {"g": group}
            )
            row = await tx.one(f"SELECT held_until FROM pace_holds WHERE grp=:g{tx.lock}", {"g": group})  # noqa: S608
            if row is None or float(row["held_until"]) > tx.now:
                return False
            if probe and await tx.one(older, {**params, "id": job.id}) is not None:
                return False
            if per_window:
                await tx.run(
                    "DELETE FROM pace_sends WHERE grp=:g AND at<=:old", {"g": group, "old": tx.now - window}
                )
                sent = await tx.one("SELECT COUNT(*) AS n FROM pace_sends WHERE grp=:g", {"g": group})
                if sent is not None and int(sent["n"]) >= per_window:
                    return False
                await tx.run(
                    "INSERT INTO pace_sends (grp, at) VALUES (:g, :now)", {"g": group, "now": tx.now}
                )
            if probe:
                await tx.run(
                    "UPDATE pace_holds SET held_until=:until WHERE grp=:g",
                    {"g": group, "until": tx.now + probe},
                )
            return True

        return await self.write(op)

    async def pace_hold(self, group: str, seconds: float, probe: bool = False) -> int:
        """A 429 came: hold the group back in every process; returns the group's count of holds. The
        longer of two holds wins, except over the hold a probe (the one that met this 429) put there."""

        async def op(tx: Tx) -> int:
            row = await tx.one(
                "INSERT INTO pace_holds (grp, held_until, holds) VALUES (:g, :until, 1)"
                " ON CONFLICT (grp) DO UPDATE SET holds=pace_holds.holds+1, held_until=CASE"
                " WHEN pace_holds.held_until>:until AND :keep=1 THEN pace_holds.held_until ELSE :until END"
                " RETURNING holds",
                {"g": group, "until": tx.now + seconds, "keep": 0 if probe else 1},
            )
            return int(row["holds"]) if row is not None else 0

        return await self.write(op)

    async def pace_end_probe(self, group: str) -> None:
        """The probe was answered without a 429: the group is open again for every process."""
        await self.write(
            lambda tx: tx.run(
                "UPDATE pace_holds SET held_until=:now WHERE grp=:g AND held_until>:now",
                {"g": group, "now": tx.now},
            )
        )

    async def retry_job(self, job: Job, delay: float, error: str) -> None:
        await self.write(lambda tx: _reschedule(tx, job, delay, error, self.owner))

    async def job_failed(self, job: Job, delay: float, error: str) -> bool:
        """A job that raised (a bug, or a row it cannot read): one more failure; the job is due again
        after `delay`, or parked once it has failed MAX_FAILURES times. True when it was parked."""

        async def op(tx: Tx) -> bool:
            if await _failed(tx, "jobs", job.id, job.kind, error, self.owner):
                return True
            await _reschedule(tx, job, delay, error, self.owner)
            return False

        return await self.write(op)

    async def provider_health(self) -> dict[str, Health]:
        """Each provider's health for `auto` routing, as every replica sees it."""
        rows = await self.fetch("SELECT provider, consecutive_failures, cooldown_until FROM provider_health")
        return {
            row["provider"]: Health(
                row["provider"], int(row["consecutive_failures"]), float(row["cooldown_until"])
            )
            for row in rows
        }

    async def parked_counts(self) -> dict[str, int]:
        """Rows set aside so far, by kind (`callback` for recorded callbacks, else the job's kind)."""
        rows = await self.fetch("SELECT kind, COUNT(*) AS n FROM parked GROUP BY kind")
        return {row["kind"]: int(row["n"]) for row in rows}

    async def settle_job(
        self,
        job: Job,
        retry_in: float | None,
        note: str = "",
        *,
        event: tuple[str, str] | None = None,
        detail: str | None = None,
        requeue: bool = False,
        provider_failed: str = "",
    ) -> None:
        """A job's outcome in one write (see receiver.jobs.record): an event on its task (`event`: kind and
        summary), then the job ended (`retry_in` None), due again in `retry_in` s with `note` as its last
        error, or with `requeue` put back untouched."""

        async def op(tx: Tx) -> None:
            if event is not None:
                # A task deleted while the job ran (its jobs and events with it) gets no event back.
                task = await tx.one(f"SELECT id FROM tasks WHERE id=:id{tx.lock}", {"id": job.task_id})  # noqa: S608
                if task is None:
                    return
                await _event(tx, job.task_id, event[0], True, event[1], None, detail)
            if provider_failed:
                await _provider_health(tx, provider_failed, False, self.timings)
            if requeue:  # pacing said not yet: back untouched, its place in the queue kept
                await tx.run(
                    "UPDATE jobs SET running=0, lease_until=NULL, attempts=attempts-1"
                    " WHERE id=:id AND owner=:owner",
                    {"id": job.id, "owner": self.owner},
                )
            elif retry_in is None:
                await _delete_job(tx, job.id)
            else:
                await _reschedule(tx, job, retry_in, note, self.owner)

        await self.write(op)

    # -- keys in the database, and their rates ----------------------------------------------------

    async def create_key(
        self,
        key_id: str,
        digest: str,
        tenant: str,
        name: str,
        budget_usd: float | None,
        budget_period: str | None,
        rate_per_minute: int | None,
    ) -> KeyRecord:
        """Keep a new key: its fields and the SHA-256 of its secret (hex), never the secret."""

        async def op(tx: Tx) -> KeyRecord:
            await tx.run(
                "INSERT INTO api_keys (id, tenant, name, hash, budget_usd, budget_period, rate_per_minute,"
                " disabled, created_at, updated_at)"
                " VALUES (:id, :tenant, :name, :hash, :budget, :period, :rate, 0, :now, :now)",
                {
                    "id": key_id,
                    "tenant": tenant,
                    "name": name,
                    "hash": digest,
                    "budget": budget_usd,
                    "period": budget_period,
                    "rate": rate_per_minute,
                    "now": tx.now,
                },
            )
            return await _key(tx, key_id)

        return await self.write(op)

    async def keys(self) -> list[KeyRecord]:
        """Every key in the database, oldest first."""
        rows = await self.fetch(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id")  # noqa: S608
        return [KeyRecord.from_row(row) for row in rows]

    async def key(self, key_id: str) -> KeyRecord | None:
        rows = await self.backend.point(KEY_BY_ID, {"id": key_id})
        return KeyRecord.from_row(rows[0]) if rows else None

    async def key_by_digest(self, digest: str) -> KeyRecord | None:
        """The key whose secret has this SHA-256 (hex). The index finds the row by the digest; the digest
        is compared again in constant time, so no answer depends on how near a wrong key came."""
        rows = await self.backend.point(KEY_BY_DIGEST, {"hash": digest})
        if not rows or not hmac.compare_digest(str(rows[0]["hash"]), digest):
            return None
        return KeyRecord.from_row(rows[0])

    async def change_key(self, key_id: str, changes: Mapping[str, Any]) -> KeyRecord | None:
        """Set the given fields (of KEY_CHANGEABLE) of a key; None when there is no such key. Every
        replica sees the change at once on PostgreSQL (a notice), within a second on SQLite."""

        async def op(tx: Tx) -> KeyRecord | None:
            sets = ", ".join(f"{name}=:{name}" for name in changes if name in KEY_CHANGEABLE)
            params = {name: value for name, value in changes.items() if name in KEY_CHANGEABLE}
            if "disabled" in params:
                params["disabled"] = int(bool(params["disabled"]))
            changed = await tx.run(
                f"UPDATE api_keys SET {sets + ', ' if sets else ''}updated_at=:now WHERE id=:id",  # noqa: S608
                {**params, "id": key_id, "now": tx.now},
            )
            tx.keys_changed = True
            return await _key(tx, key_id) if changed else None

        try:
            return await self.write(op)
        finally:
            self.backend.wakeups.announce((), False, keys_changed=True)  # this process's cache, at once

    async def delete_key(self, key_id: str) -> bool:
        """Revoke a key for good; False when there was no such key."""

        async def op(tx: Tx) -> bool:
            await tx.run("DELETE FROM key_rates WHERE key_id=:id", {"id": key_id})
            tx.keys_changed = True
            return await tx.run("DELETE FROM api_keys WHERE id=:id", {"id": key_id}) > 0

        try:
            return await self.write(op)
        finally:
            self.backend.wakeups.announce((), False, keys_changed=True)

    async def usage(
        self, tenant: str | None, since: float, until: float, group_by: str | None
    ) -> tuple[int, float, list[tuple[str, int, float]]]:
        """Tasks created in [since, until) by `tenant` (every tenant for None) and what they cost
        (TASK_SPEND), in all and per group: "provider", "model", "day" (UTC, YYYY-MM-DD) or "tenant"."""
        where = "created_at>=:since AND created_at<:until" + (" AND tenant=:tenant" if tenant else "")
        params = {"since": since, "until": until, "tenant": tenant}
        column = {
            "provider": "provider",
            "model": "model",
            "tenant": "tenant",
            "day": self.backend.dialect.day_number.format(column="created_at"),
        }.get(group_by or "")
        grouped = f" GROUP BY {column} ORDER BY {column}" if column else ""
        rows = await self.fetch(
            f"SELECT {column or 'NULL'} AS grp, COUNT(*) AS n, SUM({TASK_SPEND}) AS usd"  # noqa: S608 - no input
            f" FROM tasks WHERE {where}{grouped}",
            params,
        )
        groups = [
            (
                day_name(int(row["grp"])) if group_by == "day" else str(row["grp"]),
                int(row["n"]),
                float(row["usd"] or 0),
            )
            for row in rows
            if int(row["n"])
        ]
        return sum(n for _, n, _ in groups), sum(usd for _, _, usd in groups), groups if group_by else []

    async def take_rate(self, key_id: str, per_minute: int) -> float:
        """Count one create against the key's rate, in the key's row of `key_rates` shared by every
        replica (one statement: the row's lock orders concurrent counts). Windows are calendar minutes;
        returns 0 when this create is within `per_minute`, else the seconds until the next window."""

        async def op(tx: Tx) -> float:
            window = math.floor(tx.now / 60) * 60.0
            row = await tx.one(
                "INSERT INTO key_rates (key_id, window_start, used) VALUES (:id, :window, 1)"
                " ON CONFLICT (key_id) DO UPDATE SET used=CASE WHEN key_rates.window_start=:window"
                " THEN key_rates.used+1 ELSE 1 END, window_start=:window RETURNING used",
                {"id": key_id, "window": window},
            )
            used = int(row["used"]) if row is not None else 1
            return 0.0 if used <= per_minute else window + 60.0 - tx.now

        return await self.write(op)


def owned(kind: type[V], rows: Sequence[Row], tenant: str | None) -> V | None:
    """The task read by its id, if there is one and it is the tenant's (any tenant's for None)."""
    if not rows or (tenant is not None and rows[0]["tenant"] != tenant):
        return None
    return kind.from_row(rows[0])


# -- the rules of a state change, run inside a write transaction ------------------------------------


async def insert_inbox(tx: Tx, rows: Sequence[tuple[str, str, int]]) -> None:
    await tx.many(
        "INSERT INTO inbox (task_id, received_at, outcome, urgent) VALUES (:task, :now, :outcome, :urgent)",
        [
            {"task": task, "now": tx.now, "outcome": outcome, "urgent": urgent}
            for task, outcome, urgent in rows
        ],
    )
    tx.jobs_added = True


async def _apply_inbox(tx: Tx, limit: int) -> tuple[list[tuple[str, str, str]], bool]:
    """Apply the oldest recorded callbacks, in the order they came; returns what each changed, and
    whether to come back at once (more are waiting, or one failed and is to be tried again).

    The batch is applied in one piece. Should any row of it fail (it cannot be read, or its change
    cannot be written), the piece is undone and each row applied alone: the others go on, and the bad
    one is counted and, at MAX_FAILURES, parked. No stored callback can stop the worker."""
    pick = f"SELECT {{}} FROM inbox ORDER BY id LIMIT :limit{tx.skip_locked}"  # noqa: S608
    params = {"limit": limit + 1}

    # Read outside the piece's savepoint: an empty inbox (most turns) then costs this one statement.
    try:
        rows: list[Row] | None = await tx.all(pick.format("*"), params)
    except Exception as exc:
        if tx.about_database(exc):
            raise
        rows = None  # a row cannot be read: each is applied alone, below
    if rows == []:
        return [], False

    async def batch() -> tuple[list[tuple[str, str, str]], bool]:
        assert rows is not None
        done = [await _apply_news(tx, row) for row in rows[:limit]]
        return [result for result in done if result is not None], len(rows) > limit

    whole, failure = (None, None) if rows is None else await _alone(tx, batch)
    if whole is not None:
        return whole
    ids = [int(row["id"]) for row in await tx.all(pick.format("id"), params)]
    applied: list[tuple[str, str, str]] = []
    again = len(ids) > limit
    for row_id in ids[:limit]:
        result, failure = await _alone(tx, functools.partial(_apply_kept, tx, row_id))
        if failure is not None:
            again |= not await _failed(tx, "inbox", row_id, "callback", _reason(failure))
        elif result is not None:
            applied.append(result)
    return applied, again


async def _apply_kept(tx: Tx, row_id: int) -> tuple[str, str, str] | None:
    row = await tx.one("SELECT * FROM inbox WHERE id=:id", {"id": row_id})
    return None if row is None else await _apply_news(tx, row)


async def _apply_news(tx: Tx, row: Row) -> tuple[str, str, str] | None:
    """Apply one recorded callback and take it from the inbox: (task, provider, what it did)."""
    applied = None
    task = await tx.one(f"SELECT {TASK_STATE} FROM tasks WHERE id=:id{tx.lock}", {"id": row["task_id"]})  # noqa: S608
    if task is not None:
        outcome = Outcome.from_json(row["outcome"])
        known = task["provider_task_id"]
        if outcome.provider_task_id and known and outcome.provider_task_id != known:
            # Checked when it came too; this catches an id the submit answer set in between.
            note = f"names provider task {outcome.provider_task_id}, not {known}: ignored"
            await _news_event(tx, task["id"], "callback", True, note, None)
            applied = (task["id"], task["provider"], "ignored")
        else:
            change = await _apply(tx, task["id"], outcome, "callback", True, bool(row["urgent"]), task)
            result = "changed" if change else ("pending" if outcome.state == "pending" else "duplicate")
            applied = (task["id"], task["provider"], result)
    await tx.run("DELETE FROM inbox WHERE id=:id", {"id": row["id"]})
    return applied


async def _claim_jobs(tx: Tx, kind: str, pick: str, params: Params) -> tuple[list[Job], bool]:
    """Lease the due jobs of `kind` that `pick` (a SELECT of ids) finds; returns them, and whether a
    row failed to be claimed and is to be tried again. As with the inbox, the claim is one statement,
    and only when it fails are the rows claimed one by one, so a bad row is counted alone."""
    take = (
        "UPDATE jobs SET running=1, attempts=attempts+1, lease_until=:lease, owner=:owner"
        " WHERE id IN ({}) RETURNING id, kind, task_id, arg, attempts"
    )

    async def claim(which: str, extra: Params) -> list[Job]:
        rows = await tx.all(take.format(which), {**params, **extra})
        return sorted((Job.from_row(row) for row in rows), key=lambda job: job.id)

    whole, failure = await _alone(tx, lambda: claim(pick, {}))
    if whole is not None:
        return whole, False
    jobs: list[Job] = []
    again = False
    for row in await tx.all(pick, params):
        job_id = int(row["id"])
        one, failure = await _alone(tx, functools.partial(claim, ":id", {"id": job_id}))
        if failure is not None:
            again |= not await _failed(tx, "jobs", job_id, kind, _reason(failure))
        else:
            jobs += one or []
    return jobs, again


async def _alone(tx: Tx, step: Callable[[], Awaitable[T]]) -> tuple[T | None, Exception | None]:
    """Run `step` in a savepoint of its own: when it fails (other than for the database's own
    trouble, which ends the whole operation) it alone is undone, and its error returned."""
    try:
        async with tx.savepoint():
            return await step(), None
    except Exception as exc:
        if tx.about_database(exc):
            raise
        return None, exc


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


async def _failed(tx: Tx, table: str, row_id: int, kind: str, reason: str, owner: str | None = None) -> bool:
    """One more failure of an inbox or job row (of this `owner`'s, if given). At MAX_FAILURES the row
    is parked: copied as it is to `parked` (by the database: nothing of it is decoded here), taken
    out of its queue, and told on its task as an event. True when it was parked."""
    reason = storable(reason)[:500]
    mine = " AND owner=:owner" if owner is not None else ""
    row = await tx.one(
        f"UPDATE {table} SET failures=failures+1 WHERE id=:id{mine} RETURNING failures",  # noqa: S608
        {"id": row_id, "owner": owner},
    )
    if row is None or int(row["failures"]) < MAX_FAILURES:
        return False
    body = "outcome" if table == "inbox" else "CAST(arg AS TEXT)"
    parked = await tx.one(
        f"INSERT INTO parked (source, kind, task_id, body, failures) SELECT '{table}', '', task_id,"  # noqa: S608
        f" {body}, failures FROM {table} WHERE id=:id RETURNING id",
        {"id": row_id},
    )
    assert parked is not None  # the row was just counted
    await tx.run(
        "UPDATE parked SET kind=:kind, error=:error, parked_at=:now WHERE id=:id",
        {"kind": kind, "error": reason, "now": tx.now, "id": parked["id"]},
    )
    # The task by its own row: a task id in the parked row that cannot be decoded names no task.
    task = await tx.one(
        f"SELECT t.id FROM tasks t JOIN {table} r ON r.task_id=t.id WHERE r.id=:id",  # noqa: S608
        {"id": row_id},
    )
    await tx.run(f"DELETE FROM {table} WHERE id=:id", {"id": row_id})  # noqa: S608
    if task is not None:
        what = "a recorded callback" if table == "inbox" else f"the {kind} job"
        summary = f"{what} failed {MAX_FAILURES} times and was set aside (parked): {reason}"
        await _event(tx, task["id"], "parked", True, summary, None)
    tx.parked.append(kind)
    return True


async def _claim_per_tenant(
    tx: Tx, kind: str, pick: Callable[[str], str], params: Params, cap: int
) -> tuple[list[Job], bool]:
    """The claim of one kind run for one tenant at a time, the tenant with the oldest due job first,
    each taking no more than leaves it `cap` running; up to `params["free"]` in all. Returns the jobs,
    and whether a row failed to be claimed (as `_claim_jobs`)."""
    running = {
        row["tenant"]: int(row["n"])
        for row in await tx.all(
            "SELECT t.tenant, COUNT(*) AS n FROM jobs j JOIN tasks t ON t.id=j.task_id"
            " WHERE j.kind=:kind AND j.running=1 GROUP BY t.tenant",
            {"kind": kind},
        )
    }
    waiting = await tx.all(
        "SELECT t.tenant, MIN(j.due_at) AS first FROM jobs j JOIN tasks t ON t.id=j.task_id"
        " WHERE j.kind=:kind AND j.running=0 AND j.due_at<=:now GROUP BY t.tenant ORDER BY first, t.tenant",
        {"kind": kind, "now": params["now"]},
    )
    of_tenant = pick(" AND task_id IN (SELECT id FROM tasks WHERE tenant=:tenant)")
    jobs: list[Job] = []
    again = False
    for row in waiting:
        room = min(params["free"] - len(jobs), cap - running.get(row["tenant"], 0))
        if room > 0:
            taken, failed = await _claim_jobs(
                tx, kind, of_tenant, {**params, "free": room, "tenant": row["tenant"]}
            )
            jobs += taken
            again = again or failed
        if len(jobs) >= params["free"]:
            break
    return sorted(jobs, key=lambda job: job.id), again


async def _release_expired(tx: Tx) -> None:
    """Jobs whose lease ran out (their process died or hung) are claimable again."""
    released = await tx.run(
        "UPDATE jobs SET running=0, lease_until=NULL WHERE id IN ("  # noqa: S608
        f" SELECT id FROM jobs WHERE running=1 AND lease_until<:now{tx.skip_locked})",
        {"now": tx.now},
    )
    if released:
        tx.jobs_added = True


async def _in_flight(tx: Tx, providers: Sequence[str], owner: str) -> dict[tuple[str, str], int]:
    """Tasks accepted and unfinished, plus the submits other processes are sending right now (this
    process counts its own in the pacer), by (provider, model): pacing's count across replicas."""
    marks, params = in_list("p", providers)
    rows = await tx.all(
        "SELECT provider, model, COUNT(*) AS n FROM tasks"  # noqa: S608 - placeholders only
        f" WHERE status='submitted' AND provider IN ({marks}) GROUP BY provider, model"
        " UNION ALL SELECT t.provider, t.model, COUNT(*) AS n FROM jobs j JOIN tasks t ON t.id=j.task_id"
        f" WHERE j.kind='submit' AND j.running=1 AND j.owner<>:owner AND t.provider IN ({marks})"
        " GROUP BY t.provider, t.model",
        {**params, "owner": owner},
    )
    counts: dict[tuple[str, str], int] = {}
    for row in rows:
        key = (row["provider"], row["model"])
        counts[key] = counts.get(key, 0) + int(row["n"])
    return counts


async def _paces(tx: Tx, windows: Mapping[str, float]) -> dict[str, Pace]:
    """Every pace group's hold, and for each group in `windows` its sends within its window: counted
    all, the oldest PACE_SENDS_READ of them with their times (the ones that free the window first).
    Reading every send's time would make each worker turn cost as much as the window holds. One
    statement (a worker turn reads it every time): the holds' rows have no send time."""
    real = tx.dialect.types["real"]
    params: dict[str, Any] = {}
    sends = ""
    if windows:
        within = " OR ".join(f"(grp=:g{n} AND at>:old{n})" for n in range(len(windows)))
        params["read"] = PACE_SENDS_READ
        for n, (group, window) in enumerate(sorted(windows.items())):
            params[f"g{n}"], params[f"old{n}"] = group, tx.now - window
        sends = (
            f" UNION ALL SELECT grp, CAST(NULL AS {real}), CAST(NULL AS BIGINT), at, n, newest FROM"  # noqa: S608
            " (SELECT grp, at, COUNT(*) OVER (PARTITION BY grp) AS n,"
            " MAX(at) OVER (PARTITION BY grp) AS newest,"
            f" ROW_NUMBER() OVER (PARTITION BY grp ORDER BY at) AS k FROM pace_sends WHERE {within}) AS s"
            " WHERE k<=:read"
        )
    rows = await tx.all(
        f"SELECT grp, held_until, holds, CAST(NULL AS {real}) AS at, CAST(NULL AS BIGINT) AS n,"  # noqa: S608
        f" CAST(NULL AS {real}) AS newest FROM pace_holds{sends} ORDER BY grp, at",
        params,
    )
    paces = {
        row["grp"]: Pace(float(row["held_until"]), int(row["holds"]), []) for row in rows if row["at"] is None
    }
    for row in rows:
        pace = paces.get(row["grp"])
        if pace is not None and row["at"] is not None:
            pace.sends.append(float(row["at"]))
            paces[row["grp"]] = replace(pace, count=int(row["n"]), newest=float(row["newest"]))
    return paces


# -- provider health: the cooldown of `auto` routing ------------------------------------------------


async def _provider_health(tx: Tx, provider: str, ok: bool, timings: Timings) -> None:
    """A provider-side outcome of a call to `provider`, in the transaction that records it: a success
    ends its run of failures (and any cooldown); a failure (unavailable, a timeout, a 5xx; never a 429
    pacing hold or a refused request) adds to it, and from `cooldown_failures` in a row on each failure
    (re)starts a cooldown of `cooldown_seconds`."""
    if ok:
        await _provider_ok(tx, provider)
        return
    await tx.run(
        "INSERT INTO provider_health (provider, consecutive_failures, cooldown_until)"
        " VALUES (:provider, 1, 0) ON CONFLICT (provider) DO UPDATE"
        " SET consecutive_failures=provider_health.consecutive_failures + 1",
        {"provider": provider},
    )
    await tx.run(
        "UPDATE provider_health SET cooldown_until=:until"
        " WHERE provider=:provider AND consecutive_failures >= :n",
        {"provider": provider, "until": tx.now + timings.cooldown_seconds, "n": timings.cooldown_failures},
    )


async def _provider_ok(tx: Tx, provider: str) -> None:
    await tx.run(
        "UPDATE provider_health SET consecutive_failures=0, cooldown_until=0"
        " WHERE provider=:provider AND (consecutive_failures > 0 OR cooldown_until > 0)",
        {"provider": provider},
    )


async def _take_probe(tx: Tx, provider: str, timings: Timings) -> None:
    """A task routed to a provider whose cooldown ran out is its probe: the cooldown is set again for
    the probe's time, so other `auto` tasks keep away until the probe's success clears it (or its
    failure re-arms it, or, with no news, the time runs out and the next task probes)."""
    await tx.run(
        "UPDATE provider_health SET cooldown_until=:until"
        " WHERE provider=:provider AND consecutive_failures >= :n AND cooldown_until <= :now",
        {
            "provider": provider,
            "until": tx.now + timings.cooldown_seconds,
            "n": timings.cooldown_failures,
            "now": tx.now,
        },
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


async def _task(tx: Tx, task_id: str) -> Row:
    """The task row but its request, locked for the rest of the transaction where the backend locks rows."""
    row = await tx.one(f"SELECT {TASK_STATE} FROM tasks WHERE id=:id{tx.lock}", {"id": task_id})  # noqa: S608
    if row is None:
        raise LookupError(task_id)
    return row


async def _add_job(tx: Tx, kind: str, task_id: str, arg: int, due_at: float) -> None:
    await tx.run(
        "INSERT INTO jobs (kind, task_id, arg, due_at) VALUES (:kind, :task, :arg, :due)"
        " ON CONFLICT (kind, task_id, arg) DO NOTHING",
        {"kind": kind, "task": task_id, "arg": arg, "due": due_at},
    )
    # A job due later than a worker's longest sleep wakes nobody: every worker looks by then anyway.
    if due_at <= tx.now + WORKER_LOOKS_EVERY:
        tx.jobs_added = True


async def _drop_idle_jobs(tx: Tx, task_id: str, which: str) -> None:
    """Delete the task's jobs that `which` names and no process is running (found through the task_id
    index, not by scanning every idle job: the dialect keeps the planner off `running`'s index)."""
    idle = f"{tx.dialect.unindexed}running=0"
    await tx.run(f"DELETE FROM jobs WHERE task_id=:id AND {which} AND {idle}", {"id": task_id})  # noqa: S608


async def _free_all_jobs(tx: Tx) -> None:
    """Every lease is a dead process's (this one is the only worker now): each job is free again."""
    await tx.run("UPDATE jobs SET running=0, lease_until=NULL WHERE running=1")
    tx.jobs_added = True


async def _delete_job(tx: Tx, job_id: int) -> None:
    await tx.run("DELETE FROM jobs WHERE id=:id", {"id": job_id})


async def _reschedule(tx: Tx, job: Job, delay: float, error: str, owner: str) -> None:
    """Due again later, if the job is still ours: one whose lease ran out belongs to another process."""
    await tx.run(
        "UPDATE jobs SET running=0, lease_until=NULL, due_at=:due, last_error=:error"
        " WHERE id=:id AND owner=:owner",
        {"due": tx.now + delay, "error": storable(error), "id": job.id, "owner": owner},
    )
    tx.jobs_added = True


async def _event(
    tx: Tx,
    task_id: str,
    kind: str,
    verified: bool,
    summary: str,
    change: str | None,
    detail: str | None = None,
    *,
    repeats: int | None = None,
) -> None:
    await tx.run(
        "INSERT INTO events (task_id, at, kind, verified, summary, change, detail, repeats)"
        " VALUES (:task, :now, :kind, :verified, :summary, :change, :detail, :repeats)",
        {
            "task": task_id,
            "now": tx.now,
            "kind": kind,
            "verified": int(verified),
            "summary": storable(summary[:500]),
            "change": change,
            "detail": None if detail is None else storable(detail),
            "repeats": repeats,
        },
    )
    tx.changed.add(task_id)


async def _move(tx: Tx, task: Row, new: Status, also: Mapping[str, Any] | None = None) -> str | None:
    """Move a task forward, setting the columns in `also` with it (one UPDATE); returns 'old→new', or
    None when that would not be forward (and nothing is written)."""
    old = Status(task["status"])
    if not old.may_become(new):
        return None
    columns = "".join(f", {column}=:set_{column}" for column in also or {})
    await tx.run(
        f"UPDATE tasks SET status=:status, updated_at=:now{columns} WHERE id=:id",  # noqa: S608 - our names
        {
            "status": str(new),
            "now": tx.now,
            "id": task["id"],
            **{f"set_{k}": v for k, v in (also or {}).items()},
        },
    )
    tx.changed.add(task["id"])
    return f"{old}→{new}"


async def _fallback(tx: Tx, task: Row, error: TaskError) -> str | None:
    """The fallback rule, once for every way a failure arrives: a failure that is not the request's
    fault moves the task to the next provider of its chain with the same request, instead of ending it.
    The provider left is recorded in `attempts` with its error; the task is queued again (a new submit,
    the new provider's own state and default model), its deadline kept; no notification is due yet."""
    reason = fallback_reason(error)
    if reason is None or Status(task["status"]) not in (Status.QUEUED, Status.SUBMITTED):
        return None  # a task with results on the way (or ended) stays where it is
    attempts = json.loads(task["attempts"])
    remaining = json.loads(task["fallback"])[len(attempts) :]
    if not remaining:
        return None
    origin, target = task["provider"], remaining[0]
    attempts.append(
        {
            "provider": origin,
            "model": task["model"],
            "provider_task_id": task["provider_task_id"],
            "error": error.as_json(),
            "at": tx.now,
        }
    )
    request = await tx.one("SELECT request FROM tasks WHERE id=:id", {"id": task["id"]})
    assert request is not None  # the task row is locked: it is there
    chain = json.loads(request["request"]).get("chain") or {}
    await tx.run(
        "UPDATE tasks SET provider=:provider, model=:model, provider_state=:state, provider_task_id=NULL,"
        " submitted_at=NULL, image_count=NULL, status=:status, attempts=:attempts, updated_at=:now,"
        " estimate_usd=:estimate, cost_usd=NULL, cost_source=NULL WHERE id=:id",
        {
            "estimate": chain.get(target, {}).get("estimate_usd"),
            "provider": target,
            "model": chain.get(target, {}).get("model") or task["model"],
            "state": _dumps(chain.get(target, {}).get("state") or {}),
            "status": str(Status.QUEUED),
            "attempts": _dumps(attempts),
            "now": tx.now,
            "id": task["id"],
        },
    )
    await _drop_idle_jobs(tx, task["id"], "kind <> 'deadline'")
    # Its own submit job, numbered by the hop: a submit of the provider left may still be running, and
    # the worker drops any submit job whose number is not the task's current hop.
    await _add_job(tx, "submit", task["id"], len(attempts), tx.now)
    tx.changed.add(task["id"])
    tx.hops.append((origin, target, reason))
    summary = f"moved from {origin} to {target} ({reason}): {error.code}: {error.message}"
    await _event(tx, task["id"], "fallback", True, summary, f"{task['status']}→{Status.QUEUED}")
    return f"{origin}→{target}"


async def _finish(tx: Tx, task: Row, status: Status, error: TaskError | None) -> str | None:
    if status is Status.FAILED and error is not None:
        moved = await _fallback(tx, task, error)
        if moved is not None:
            return moved
    ended = {"completed_at": tx.now, "error": _dumps(error.as_json()) if error else None}
    change = await _move(tx, task, status, ended)
    if change is None:
        return None
    # Its cost: a charge the provider reported (recorded by _apply, maybe in this very transaction)
    # stays; otherwise the price table's word.
    usd = _cost(task, status, error)
    priced = await tx.one(
        "UPDATE tasks SET cost_usd=CASE WHEN cost_source='provider' THEN cost_usd ELSE :usd END,"
        " cost_source=CASE WHEN cost_source='provider' THEN cost_source ELSE :source END"
        " WHERE id=:id RETURNING cost_usd",
        {"usd": usd, "source": None if usd is None else "price", "id": task["id"]},
    )
    # An ended task needs no more work; only its notification (if any) is still to come.
    await _drop_idle_jobs(tx, task["id"], "kind <> 'notify'")
    if task["notify_url"]:
        await _add_job(tx, "notify", task["id"], 0, tx.now)
    # Every end of every task passes here (download, callback, poll, submit, deadline): its one log line.
    cost = None if priced is None or priced["cost_usd"] is None else float(priced["cost_usd"])
    seconds = tx.now - task["created_at"]
    tx.ended.append(Ended(task["id"], task["provider"], status, error, seconds, task["tenant"], cost))
    return change


def _cost(task: Row, status: Status, error: TaskError | None) -> float | None:
    """What an ended task cost by the price table (a charge the provider reported wins over it, see
    _apply): its estimate when the provider made (or may have made) the images — it succeeded, its
    results were on the way (a download failed), a submit got no answer, or it was cancelled after the
    provider accepted it; 0 when it failed (or was cancelled) before
    the provider ran it or the provider itself failed it (providers do not bill a failed generation)."""
    if status is Status.SUCCEEDED or task["status"] == Status.DOWNLOADING:
        return None if task["estimate_usd"] is None else float(task["estimate_usd"])
    unknown = error is not None and error.provider_code == OUTCOME_UNKNOWN
    # A task cancelled once its provider had it may well be billed there (kie runs it anyway; fal bills
    # a request already running): counted at its estimate, so a budget never under-counts it.
    cancelled_late = status is Status.CANCELLED and bool(task["submitted_at"])
    if (
        unknown
        or cancelled_late
        or (error is not None and error.code is ErrorCode.TIMED_OUT and task["submitted_at"])
    ):
        return None if task["estimate_usd"] is None else float(task["estimate_usd"])
    return 0.0


async def _apply(
    tx: Tx,
    task_id: str,
    outcome: Outcome,
    kind: str,
    verified: bool,
    urgent: bool = False,
    task: Row | None = None,
) -> str:
    """Record the news and make the forward-only change it calls for; returns what changed.

    Every piece of news passes here, so here its text from outside is made storable, once."""
    outcome = outcome.storable()
    task = task if task is not None else await _task(tx, task_id)
    if outcome.provider and outcome.provider != task["provider"]:
        # News from a provider the task has left (fallback): recorded, changes nothing.
        summary = (
            f"late news from {outcome.provider} (the task moved to {task['provider']}): {outcome.detail}"
        )
        await _news_event(tx, task_id, kind, verified, summary, None)
        return ""
    if outcome.provider_task_id and not task["provider_task_id"]:
        await tx.run(
            "UPDATE tasks SET provider_task_id=:ptid WHERE id=:id",
            {"ptid": outcome.provider_task_id, "id": task_id},
        )
    if outcome.charge_usd is not None and not Status(task["status"]).terminal:
        # The provider's own word on what it charged: the task's cost once it ends, whatever the table says.
        await tx.run(
            "UPDATE tasks SET cost_usd=:usd, cost_source='provider' WHERE id=:id",
            {"usd": outcome.charge_usd, "id": task_id},
        )
    change: str | None = None
    if outcome.state == "succeeded":
        await _provider_ok(tx, task["provider"])  # it made the images: healthy (a probe passed)
        change = await _move(tx, task, Status.DOWNLOADING, {"image_count": len(outcome.image_urls)})
        if change is not None:
            await tx.many(
                "INSERT INTO images (task_id, idx, source_url) VALUES (:task, :idx, :url)"
                " ON CONFLICT DO NOTHING",
                [{"task": task_id, "idx": index, "url": url} for index, url in enumerate(outcome.image_urls)],
            )
            due = tx.now - URGENT_LEAD if urgent else tx.now
            for index in range(len(outcome.image_urls)):
                await _add_job(tx, "download", task_id, index, due)
            await _drop_idle_jobs(tx, task_id, "kind='reconcile'")
    elif outcome.state == "failed":
        assert outcome.error is not None
        change = await _finish(tx, task, Status.FAILED, outcome.error)
    elif outcome.ask_now and task["status"] == Status.SUBMITTED:
        # The provider says the result waits at its status endpoint: reconcile fetches it at once.
        await tx.run(
            "UPDATE jobs SET due_at=:now WHERE task_id=:id AND kind='reconcile'"  # noqa: S608
            f" AND {tx.dialect.unindexed}running=0",
            {"now": tx.now, "id": task_id},
        )
        tx.jobs_added = True
    summary = outcome.detail or outcome.state
    if outcome.state != "pending" and change is None:
        summary = f"{summary} (duplicate or late: the task is already {task['status']})"
    await _news_event(tx, task_id, kind, verified, summary, change)
    return change or ""


async def _news_event(
    tx: Tx, task_id: str, kind: str, verified: bool, summary: str, change: str | None
) -> None:
    """The event for a piece of news. News that changed nothing and says what an event since the
    task's last change already said (a provider's retry, the same poll answer again, a flood of one
    callback) is that event again: it is not written twice. Nor is any past NEWS_WITHOUT_CHANGE
    of a kind since that change (a flood whose every body differs), so no run of callbacks or polls
    can grow a task's events without bound. News that changed something always gets its own event."""
    if change is None:
        since = await tx.one(
            "SELECT COUNT(*) AS n, MAX(CASE WHEN verified=:verified AND summary=:summary THEN 1 ELSE 0 END)"
            " AS seen FROM events WHERE task_id=:id AND change IS NULL AND kind=:kind AND id>COALESCE("
            "(SELECT MAX(id) FROM events WHERE task_id=:id AND change IS NOT NULL), 0)",
            {"id": task_id, "kind": kind, "verified": int(verified), "summary": summary[:500]},
        )
        if since is not None and (since["seen"] or int(since["n"]) >= NEWS_WITHOUT_CHANGE):
            return
    await _event(tx, task_id, kind, verified, summary, change)


def committed(tx: Tx) -> None:
    """What a transaction did, told once it is committed: each task's end, each fallback move."""
    for ended in tx.ended:
        log_ended(ended)
        error = str(ended.error.code) if ended.error else None
        metrics.task_ended(ended.provider, str(ended.status), error, ended.seconds)
        if ended.cost_usd:
            metrics.SPEND.labels(ended.tenant, ended.provider).inc(ended.cost_usd)
    for origin, target, reason in tx.hops:
        metrics.FALLBACKS.labels(origin, target, reason).inc()
    for kind in tx.parked:
        metrics.JOBS_PARKED.labels(kind).inc()
        event(log, "row parked", level=logging.WARNING, kind=kind, failures=MAX_FAILURES)


def log_ended(ended: Ended) -> None:
    """The one line for a task's end; called once its transaction has committed."""
    error = ended.error
    event(
        log,
        f"task {ended.status}",
        task_id=ended.task_id,
        provider=ended.provider,
        error=str(error.code) if error else None,
        provider_code=error.provider_code if error else None,
        # What the provider (or the download) said, as the task's error tells the app; bounded.
        reason=error.message[:MAX_LOGGED_MESSAGE] if error else None,
        seconds=round(ended.seconds, 3),
    )


def timed_out() -> TaskError:
    return TaskError(ErrorCode.TIMED_OUT, "the task did not finish before RECEIVER_TASK_DEADLINE")


async def _key(tx: Tx, key_id: str) -> KeyRecord:
    row = await tx.one(KEY_BY_ID, {"id": key_id})
    assert row is not None
    return KeyRecord.from_row(row)


def period_start(period: str | None, now: float) -> float:
    """Where a budget's period began: today or this month (calendar, UTC), or ever (None)."""
    if period is None:
        return 0.0
    day = datetime.fromtimestamp(now, UTC)
    first = day.replace(day=1) if period == "month" else day
    return datetime(first.year, first.month, first.day, tzinfo=UTC).timestamp()


def day_name(number: int) -> str:
    """Day `number` since the epoch, as YYYY-MM-DD."""
    return datetime.fromtimestamp(number * 86400, UTC).strftime("%Y-%m-%d")


async def _within_budget(tx: Tx, key_id: str, estimate: float | None) -> None:
    """Raise BudgetExceeded when a create costing `estimate` (None: not known) would take the key past
    its budget: the period's spend of ended tasks and the estimates of those still running.

    The key's row is locked first (PostgreSQL; SQLite's one writer already runs creates one at a time),
    so concurrent creates of one key on every replica check and insert in turn: each sees the ones before
    it, and a burst overshoots by no more than the one task whose price was not known."""
    key = await tx.one(
        f"SELECT budget_usd, budget_period FROM api_keys WHERE id=:id{tx.lock}",  # noqa: S608
        {"id": key_id},
    )
    if key is None or key["budget_usd"] is None:
        return
    since = period_start(key["budget_period"], tx.now)
    spent = await tx.one(
        f"SELECT SUM({TASK_SPEND}) AS usd FROM tasks WHERE key_id=:id AND created_at>=:since",  # noqa: S608
        {"id": key_id, "since": since},
    )
    left = float(key["budget_usd"]) - float((spent or {}).get("usd") or 0)
    if left <= 0 or (estimate is not None and estimate > left + BUDGET_SLACK):
        raise BudgetExceeded(max(0.0, round(left, 6)))
