"""Lookups read only what they return (issue 11, item 1): a task's request, which can be large, is read
by the worker that spells provider requests from it, never by a lookup, a list, events, an image or the
notification. Shown on both backends by taking the `request` column away under a served receiver:
everything the API and the notification show stays the same."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import threading
from collections.abc import Callable
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.store import postgres as postgres_store
from receiver.store import schema
from receiver.store import sqlite as sqlite_store
from tests.conftest import database_settings
from tests.fakes.common import png
from tests.fakes.kie import KieFake
from tests.harness import Receiver
from tests.harness import Served
from tests.pg import Cluster
from tests.test_notify import SHORT


@pytest.fixture(params=["sqlite", "postgres"])
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Both backends (this overrides conftest's SQLite-only fixture for this module)."""
    return database_settings(request, request.param)


class HeldHook:
    """The app's notify endpoint: holds its first delivery until released and refuses it, takes the rest."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.arrived = threading.Condition()
        self.bodies: list[bytes] = []
        self.served = Served(Starlette(routes=[Route("/hook", self.receive, methods=["POST"])]))
        self.url = f"{self.served.url}/hook"

    async def receive(self, request: Request) -> Response:
        body = await request.body()
        with self.arrived:
            self.bodies.append(body)
            first = len(self.bodies) == 1
            self.arrived.notify_all()
        if first:
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 30)
            return Response(status_code=503)
        return Response(status_code=200)

    def wait_for(self, count: int) -> list[bytes]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.bodies) >= count, 20)
            assert len(self.bodies) >= count, f"{len(self.bodies)} deliveries, wanted {count}"
            return list(self.bodies)


@pytest.fixture
def held_hook() -> Iterator[HeldHook]:
    hook = HeldHook()
    hook.served.start()
    yield hook
    hook.release.set()
    hook.served.stop()


def hide_request(receiver: Receiver) -> None:
    """Rename the tasks' `request` column, on whichever backend the receiver runs: a read of it now
    fails, and a row read whole no longer has it. On SQLite a read of the whole row fails too: a
    virtual column that cannot be computed is there, and SQLite computes it only when it is read."""
    statement = "ALTER TABLE tasks RENAME COLUMN request TO request_hidden"
    if receiver.settings.database_url is None:
        with sqlite3.connect(receiver.settings.db_path) as conn:
            conn.execute(statement)
            conn.execute(
                "ALTER TABLE tasks ADD COLUMN whole_row_read TEXT"
                " GENERATED ALWAYS AS (json('a read of every column')) VIRTUAL"
            )
        return

    async def rename(url: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(rename(receiver.settings.database_url))


def without_links(task: dict[str, Any]) -> dict[str, Any]:
    """A task less its signed image links, whose expiry is whole seconds from the moment of reading."""
    return {**task, "images": [{**image, "url": None} for image in task["images"]]}


def test_lookups_lists_events_images_and_the_notification_never_read_the_request(
    kie: KieFake,
    start_receiver: Callable[..., Receiver],
    held_hook: HeldHook,
) -> None:
    receiver = start_receiver(**SHORT, **kie.receiver_env())
    image = "data:image/png;base64," + base64.b64encode(png(320, 240)).decode()
    options = {"ballast": "x" * 15_000}  # a request near the options cap
    task = receiver.submit(
        provider="sandbox",
        prompt="a lighthouse at dusk",
        images=[image],
        options=options,
        fallback=["kie"],
        metadata={"order": 7},
        notify_url=held_hook.url,
    )
    held_hook.wait_for(1)  # the task has ended; its notification is held, to be refused
    done = receiver.alice.get(f"/v1/tasks/{task['id']}").json()
    assert (done["status"], done["fallback"], done["metadata"]) == ("succeeded", ["kie"], {"order": 7})
    events = receiver.alice.get(f"/v1/tasks/{task['id']}/events").json()

    hide_request(receiver)
    held_hook.release.set()  # refused: the notification is sent again, read after the column left
    notification = json.loads(held_hook.wait_for(2)[1])
    assert without_links(notification["data"]) == without_links(done)

    looked_up = receiver.alice.get(f"/v1/tasks/{task['id']}")
    waited = receiver.alice.get(f"/v1/tasks/{task['id']}", params={"wait": "1"})
    listed = receiver.alice.get("/v1/tasks", params={"limit": 1})
    filtered = receiver.alice.get("/v1/tasks", params={"status": "succeeded", "provider": "sandbox"})
    for response in (looked_up, waited, listed, filtered):
        assert response.status_code == 200, response.text
    assert without_links(looked_up.json()) == without_links(done)
    assert without_links(waited.json()) == without_links(done)
    assert [without_links(item) for item in listed.json()["items"]] == [without_links(done)]
    assert [item["id"] for item in filtered.json()["items"]] == [task["id"]]
    assert receiver.bob.get("/v1/tasks", params={"limit": 1}).json()["items"] == []
    assert receiver.bob.get(f"/v1/tasks/{task['id']}").status_code == 404
    again = receiver.alice.get(f"/v1/tasks/{task['id']}/events").json()
    assert again["items"][: len(events["items"])] == events["items"]
    served = receiver.anon.get(done["images"][0]["url"])
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"


def apply(migrations: tuple[str, ...], conn: sqlite3.Connection) -> None:
    for script in migrations:
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)


INSERT = (
    "INSERT INTO tasks (id, tenant, provider, model, prompt, request, status, created_at, updated_at)"
    " VALUES (:id, 'alice', 'kie', 'm', 'p', :request, 'queued', 0, 0)"
)
# The migration that adds and fills the fallback column (the first one spelled per dialect): the
# database is made as it was just before it, and brought up to date from there.
FALLBACK_MIGRATION = next(n for n, step in enumerate(schema.MIGRATIONS) if isinstance(step, schema.Spelled))
OLD_TASKS = {
    "tsk_chain": ('{"fallback":["fal","apicore"],"images":[],"options":{"a":"\\u0000"}}', ["fal", "apicore"]),
    "tsk_odd": (r'{"fallback":["kie"],"options":{"a":"\ud800 \\u0000 \\\udfff","b":"\udbff"}}', ["kie"]),
    "tsk_none": ('{"images":[],"options":{}}', []),
    "tsk_null": ('{"fallback":null,"images":[]}', []),
}


def test_the_fallback_column_is_filled_for_tasks_already_there_on_sqlite(tmp_path: Any) -> None:
    conn = sqlite3.connect(tmp_path / "old.db", isolation_level=None)
    before = sqlite_store.MIGRATIONS[:FALLBACK_MIGRATION]
    apply(before, conn)
    conn.execute(f"PRAGMA user_version={len(before)}")
    for task_id, (request, _) in OLD_TASKS.items():
        conn.execute(INSERT, {"id": task_id, "request": request})
    assert sqlite_store.migrate(conn) == len(schema.MIGRATIONS)
    filled = dict(conn.execute("SELECT id, fallback FROM tasks").fetchall())
    assert {task_id: json.loads(value) for task_id, value in filled.items()} == {
        task_id: chain for task_id, (_, chain) in OLD_TASKS.items()
    }


def test_the_fallback_column_is_filled_for_tasks_already_there_on_postgres(pg_cluster: Cluster) -> None:
    async def run(url: str) -> dict[str, Any]:
        conn = await asyncpg.connect(url)
        try:
            before = postgres_store.MIGRATIONS[:FALLBACK_MIGRATION]
            await conn.execute("CREATE TABLE receiver_schema (version INTEGER NOT NULL)")
            for number, script in enumerate(before, start=1):
                await conn.execute(script)
                await conn.execute("INSERT INTO receiver_schema (version) VALUES ($1)", number)
            for task_id, (request, _) in OLD_TASKS.items():
                text, names = postgres_store.positional(INSERT)
                await conn.execute(text, *[{"id": task_id, "request": request}[name] for name in names])
            assert await postgres_store.migrate(conn) == len(schema.MIGRATIONS)
            rows = await conn.fetch("SELECT id, fallback FROM tasks")
            return {row["id"]: json.loads(row["fallback"]) for row in rows}
        finally:
            await conn.close()

    filled = asyncio.run(run(pg_cluster.database()))
    assert filled == {task_id: chain for task_id, (_, chain) in OLD_TASKS.items()}
