"""The store: typed records out, one transaction per state change in, on SQLite or PostgreSQL.

records.py   what leaves the store (TaskView, TaskRecord, ImageRecord, EventRecord, Job, …)
base.py      what the rules are written against (Tx: one/all/run, a clock) and what a backend gives
             them (Backend: transactions, reads, wake-ups; Dialect: the words that differ)
rules.py     every read and state change, written once (Store, which composes a backend)
schema.py    the migrations, written once with the dialects' differences declared
sqlite.py    the embedded default: a writer thread with group commit
postgres.py  replicas: a pool, row locks, LISTEN/NOTIFY wake-ups
"""

from __future__ import annotations

from receiver.config import Settings
from receiver.store.base import Timings
from receiver.store.records import Claimed
from receiver.store.records import DownloadTarget
from receiver.store.records import EventRecord
from receiver.store.records import IdempotencyConflict
from receiver.store.records import ImageRecord
from receiver.store.records import Job
from receiver.store.records import NewTask
from receiver.store.records import TaskRecord
from receiver.store.records import TaskView
from receiver.store.rules import RoleTaken
from receiver.store.rules import Store
from receiver.store.rules import StoreUnavailable
from receiver.store.rules import timed_out

__all__ = [
    "Claimed",
    "DownloadTarget",
    "EventRecord",
    "IdempotencyConflict",
    "ImageRecord",
    "Job",
    "NewTask",
    "RoleTaken",
    "Store",
    "StoreUnavailable",
    "TaskRecord",
    "TaskView",
    "make_store",
    "timed_out",
]


def make_store(settings: Settings) -> Store:
    """The backend the settings name: PostgreSQL with RECEIVER_DATABASE_URL, else SQLite in the data dir."""
    timings = Timings(
        settings.reconcile_after,
        settings.task_deadline,
        settings.job_lease,
        settings.cooldown_failures,
        settings.cooldown_seconds,
    )
    if settings.database_url is not None:
        from receiver.store.postgres import PostgresBackend

        return Store(PostgresBackend(settings.database_url), timings)
    from receiver.store.sqlite import SqliteBackend

    return Store(SqliteBackend(settings.db_path), timings)
