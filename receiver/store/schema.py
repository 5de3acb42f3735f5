"""The schema, as migrations in the order they came, written once for both dialects.

Where the dialects name a column type differently, a migration names it by a field the dialect
declares (base.py, `Dialect.types`): `$key` an integer primary key the database numbers, `$serial` one
that is never reused, `$int` a 64-bit integer, `$real` a double float, `$without_rowid` SQLite's
table option. A migration the dialects spell differently beyond that (JSON functions, to fill a new
column from old ones) is a `Spelled` with each dialect's text. A change to the schema is a new entry at
the end, never an edit: a database knows how many of them it has run.
"""

from __future__ import annotations

from dataclasses import dataclass
from string import Template

from receiver.store.base import Dialect


@dataclass(frozen=True)
class Spelled:
    """A migration in each dialect's own words (statements separated by `;`)."""

    sqlite: str
    postgres: str


MIGRATIONS: tuple[str | Spelled, ...] = (
    """
    CREATE TABLE tasks (
        seq $serial,
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
        image_count $int,
        created_at $real NOT NULL,
        updated_at $real NOT NULL,
        submitted_at $real,
        completed_at $real,
        UNIQUE (tenant, idempotency_key)
    );
    CREATE INDEX tasks_by_tenant ON tasks (tenant, seq DESC);
    CREATE INDEX tasks_by_status ON tasks (tenant, status, seq DESC);
    CREATE INDEX tasks_by_provider ON tasks (tenant, provider, seq DESC);
    CREATE TABLE images (
        task_id TEXT NOT NULL,
        idx $int NOT NULL,
        source_url TEXT NOT NULL,
        path TEXT,
        content_type TEXT,
        size $int,
        sha256 TEXT,
        width $int,
        height $int,
        stored_at $real,
        PRIMARY KEY (task_id, idx)
    )$without_rowid;
    CREATE TABLE events (
        id $key,
        task_id TEXT NOT NULL,
        at $real NOT NULL,
        kind TEXT NOT NULL,
        verified $int NOT NULL,
        summary TEXT NOT NULL,
        change TEXT
    );
    CREATE INDEX events_by_task ON events (task_id, id);
    CREATE TABLE jobs (
        id $key,
        kind TEXT NOT NULL,
        task_id TEXT NOT NULL,
        arg $int NOT NULL DEFAULT 0,
        due_at $real NOT NULL,
        attempts $int NOT NULL DEFAULT 0,
        running $int NOT NULL DEFAULT 0,
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
        id $key,
        task_id TEXT NOT NULL,
        received_at $real NOT NULL,
        outcome TEXT NOT NULL,
        urgent $int NOT NULL DEFAULT 0
    )
    """,
    # Fallback: each provider the task left, with the error that made it leave (JSON list).
    "ALTER TABLE tasks ADD COLUMN attempts TEXT NOT NULL DEFAULT '[]'",
    # Refused callbacks in a row are one event: how many came (NULL for every other event).
    "ALTER TABLE events ADD COLUMN repeats $int",
    # Jobs are leased, not just marked: a claim holds until `lease_until`, then any worker may take it.
    "ALTER TABLE jobs ADD COLUMN lease_until $real",
    # Which process holds a claimed job: pacing counts the submits other processes are sending.
    "ALTER TABLE jobs ADD COLUMN owner TEXT",
    # Pacing shared by every worker process: each pace group's 429 hold (and how many holds came), and
    # the times submits were sent, for the per-window rate (pruned as it goes).
    """
    CREATE TABLE pace_holds (
        grp TEXT PRIMARY KEY,
        held_until $real NOT NULL DEFAULT 0,
        holds $int NOT NULL DEFAULT 0
    );
    CREATE TABLE pace_sends (
        id $key,
        grp TEXT NOT NULL,
        at $real NOT NULL
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
    ALTER TABLE inbox ADD COLUMN failures $int NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN failures $int NOT NULL DEFAULT 0;
    CREATE TABLE parked (
        id $key,
        source TEXT NOT NULL,
        kind TEXT NOT NULL,
        task_id TEXT,
        body TEXT,
        failures $int NOT NULL DEFAULT 0,
        error TEXT,
        parked_at $real NOT NULL DEFAULT 0
    )
    """,
    # Retention (jobs/sweep.py): an image whose bytes were deleted keeps its entry, marked expired; a
    # task whose images are done with is marked, so the sweep's search walks only the tasks still to
    # do. Both searches go by when the task ended, through an index that holds ended tasks only.
    """
    ALTER TABLE images ADD COLUMN expired $int NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN images_expired $int NOT NULL DEFAULT 0;
    CREATE INDEX tasks_by_completed ON tasks (completed_at, id) WHERE completed_at IS NOT NULL;
    CREATE INDEX tasks_images_to_expire ON tasks (completed_at, id)
        WHERE completed_at IS NOT NULL AND images_expired=0
    """,
    # What a task costs (receiver/prices.py): its estimate at create, and once it ended what it cost
    # (USD) and whether that came from the price table or the provider's own report. Each provider's
    # health for `auto` routing: failures in a row and the cooldown they started, shared by replicas.
    """
    ALTER TABLE tasks ADD COLUMN estimate_usd $real;
    ALTER TABLE tasks ADD COLUMN cost_usd $real;
    ALTER TABLE tasks ADD COLUMN cost_source TEXT;
    CREATE TABLE provider_health (
        provider TEXT PRIMARY KEY,
        consecutive_failures $int NOT NULL DEFAULT 0,
        cooldown_until $real NOT NULL DEFAULT 0
    )
    """,
    # Keys kept in the database (the admin API): only the secret's SHA-256 is kept, looked up by it.
    # `key_rates` is each key's create count in its current minute, shared by every replica; a task
    # records the key that created it, for its budget.
    """
    CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        hash TEXT NOT NULL UNIQUE,
        budget_usd $real,
        budget_period TEXT,
        rate_per_minute $int,
        disabled $int NOT NULL DEFAULT 0,
        created_at $real NOT NULL,
        updated_at $real NOT NULL
    );
    CREATE TABLE key_rates (
        key_id TEXT PRIMARY KEY,
        window_start $real NOT NULL,
        used $int NOT NULL
    );
    ALTER TABLE tasks ADD COLUMN key_id TEXT;
    CREATE INDEX tasks_by_key ON tasks (key_id, created_at);
    CREATE INDEX tasks_by_tenant_time ON tasks (tenant, created_at)
    """,
    # PostgreSQL: a kept callback wakes every replica's worker from the database itself, so keeping
    # one is a single INSERT that commits alone (postgres.py, `keep`): one round trip, not five.
    # The NOTIFY is sent on commit, once per statement, in the form postgres.py listens for.
    Spelled(
        sqlite="",
        postgres="CREATE FUNCTION receiver_inbox_kept() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN PERFORM pg_notify('receiver', '1|'); RETURN NULL; END $$;"
        " CREATE TRIGGER inbox_kept AFTER INSERT ON inbox"
        " FOR EACH STATEMENT EXECUTE FUNCTION receiver_inbox_kept()",
    ),
)


def spelled_for(dialect: Dialect) -> tuple[str, ...]:
    """The migrations as `dialect` runs them."""
    return tuple(
        Template(step).substitute(dialect.types) if isinstance(step, str) else getattr(step, dialect.name)
        for step in MIGRATIONS
    )
