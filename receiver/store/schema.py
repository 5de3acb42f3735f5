"""The schema, as migrations in the order they came, written once in SQLite's dialect.

SQLite runs them as they are; the PostgreSQL backend translates the few type names that differ
(postgres.py, `postgres_dialect`). A migration the dialects spell differently beyond type names (JSON
functions, to fill a new column from old ones) is a `Spelled` with each dialect's text. A change to the
schema is a new entry at the end, never an edit.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Spelled:
    """A migration in each dialect's own words (statements separated by `;`)."""

    sqlite: str
    postgres: str


MIGRATIONS: tuple[str | Spelled, ...] = (
    """
    CREATE TABLE tasks (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        tenant TEXT NOT NULL,
        provider TEXT NOT NULL,
        model TEXT NOT NULL,
        prompt TEXT NOT NULL,
        request TEXT NOT NULL,
        provider_state TEXT NOT NULL DEFAULT '{}',
        status TEXT NOT NULL,
        provider_task_id TEXT,
        error TEXT,
        metadata TEXT NOT NULL DEFAULT '{}',
        notify_url TEXT,
        idempotency_key TEXT,
        request_hash TEXT,
        image_count INTEGER,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        submitted_at REAL,
        completed_at REAL,
        UNIQUE (tenant, idempotency_key)
    );
    CREATE INDEX tasks_by_tenant ON tasks (tenant, seq DESC);
    CREATE INDEX tasks_by_status ON tasks (tenant, status, seq DESC);
    CREATE INDEX tasks_by_provider ON tasks (tenant, provider, seq DESC);
    CREATE TABLE images (
        task_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        source_url TEXT NOT NULL,
        path TEXT,
        content_type TEXT,
        size INTEGER,
        sha256 TEXT,
        width INTEGER,
        height INTEGER,
        stored_at REAL,
        PRIMARY KEY (task_id, idx)
    ) WITHOUT ROWID;
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        task_id TEXT NOT NULL,
        at REAL NOT NULL,
        kind TEXT NOT NULL,
        verified INTEGER NOT NULL,
        summary TEXT NOT NULL,
        change TEXT
    );
    CREATE INDEX events_by_task ON events (task_id, id);
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        task_id TEXT NOT NULL,
        arg INTEGER NOT NULL DEFAULT 0,
        due_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        running INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        UNIQUE (kind, task_id, arg)
    );
    CREATE INDEX jobs_by_due ON jobs (running, due_at);
    """,
    # What an event brought back beyond its summary, e.g. the first 2 KB of an app's notify answer.
    "ALTER TABLE events ADD COLUMN detail TEXT",
    # Pacing counts the tasks each provider has in flight (status 'submitted').
    "CREATE INDEX tasks_in_flight ON tasks (status, provider, model)",
    # Ending a task deletes its jobs, and claims look for one kind's due jobs: both must not scan a
    # jobs table that holds thousands of pending downloads during a burst.
    """
    CREATE INDEX jobs_by_task ON jobs (task_id);
    CREATE INDEX jobs_by_kind_due ON jobs (kind, running, due_at)
    """,
    # Verified callbacks, kept before they are answered and applied right after (see record_callback).
    """
    CREATE TABLE inbox (
        id INTEGER PRIMARY KEY,
        task_id TEXT NOT NULL,
        received_at REAL NOT NULL,
        outcome TEXT NOT NULL,
        urgent INTEGER NOT NULL DEFAULT 0
    )
    """,
    # Fallback: each provider the task left, with the error that made it leave (JSON list).
    "ALTER TABLE tasks ADD COLUMN attempts TEXT NOT NULL DEFAULT '[]'",
    # Refused callbacks in a row are one event: how many came (NULL for every other event).
    "ALTER TABLE events ADD COLUMN repeats INTEGER",
    # Jobs are leased, not just marked: a claim holds until `lease_until`, then any worker may take it.
    "ALTER TABLE jobs ADD COLUMN lease_until REAL",
    # Which process holds a claimed job: pacing counts the submits other processes are sending.
    "ALTER TABLE jobs ADD COLUMN owner TEXT",
    # Pacing shared by every worker process: each pace group's 429 hold (and how many holds came), and
    # the times submits were sent, for the per-window rate (pruned as it goes).
    """
    CREATE TABLE pace_holds (
        grp TEXT PRIMARY KEY,
        held_until REAL NOT NULL DEFAULT 0,
        holds INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE pace_sends (
        id INTEGER PRIMARY KEY,
        grp TEXT NOT NULL,
        at REAL NOT NULL
    );
    CREATE INDEX pace_sends_by_group ON pace_sends (grp, at)
    """,
    # Lookups and lists show the providers still ahead of a task without reading its request (which
    # may be large): the fallback chain gets its own small column, filled for the tasks already there.
    Spelled(
        sqlite="ALTER TABLE tasks ADD COLUMN fallback TEXT NOT NULL DEFAULT '[]';"
        " UPDATE tasks SET fallback=json_extract(request, '$.fallback')"
        " WHERE json_type(request, '$.fallback')='array'",
        # PostgreSQL's JSON refuses the escapes of NUL and of lone surrogates, which older requests may
        # hold in strings (options): each becomes an escaped space first, so that every row parses.
        postgres="ALTER TABLE tasks ADD COLUMN fallback TEXT NOT NULL DEFAULT '[]';"
        " UPDATE tasks SET fallback=(clean::json -> 'fallback')::text FROM ("
        r"  SELECT id AS old_id, regexp_replace(request, '\\u(0000|[dD][89a-fA-F][0-9a-fA-F]{2})',"
        r"   '\\u0020', 'g') AS clean"
        """ FROM tasks WHERE request LIKE '%"fallback":[%') AS old"""
        " WHERE tasks.id=old.old_id AND json_typeof(clean::json -> 'fallback')='array'",
    ),
    # No stored row may stop the worker: an inbox or job row that fails to apply or to be claimed is
    # counted, and past a few failures (rules.py, MAX_FAILURES) set aside here with what went wrong.
    """
    ALTER TABLE inbox ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE parked (
        id INTEGER PRIMARY KEY,
        source TEXT NOT NULL,
        kind TEXT NOT NULL,
        task_id TEXT,
        body TEXT,
        failures INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        parked_at REAL NOT NULL DEFAULT 0
    )
    """,
)
