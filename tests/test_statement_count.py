"""How many SQL statements a task costs, end to end, and how many a callback's answer waits on.

The receiver is served for real (uvicorn in this process), on a real SQLite file or a real PostgreSQL,
with the kie (HMAC) and fal (Ed25519) fakes serving real images and an app receiving the notifications.
Statements are counted where the driver executes them, so the product code runs unchanged: SQLite's
trace callback on each of the backend's connections (every statement, BEGIN, SAVEPOINT and COMMIT
included), asyncpg's query logger on each pooled connection (every query it sends: one round trip
each, a transaction's BEGIN and COMMIT included).

The ceilings are what the store reaches today: a change that adds statements to the hot path fails
here and has to say why (or take them out again).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from receiver.app import create_app
from tests.fakes.common import png
from tests.fakes.fal import FalFake
from tests.fakes.kie import KieFake
from tests.harness import Receiver
from tests.harness import Served
from tests.test_notify import AppHook

# Per task, create → submit → callback → download → notify, and per callback answer.
# The task ceilings leave ~10 % for the worker's turns, whose number depends on how wake-ups fall.
TASK_CEILING = {"sqlite": 118, "postgres": 135}
ACK_CEILING = {"sqlite": 4, "postgres": 2}
TASKS = 4  # counted, half kie and half fal, after one of each to warm up


class Statements:
    """Every statement one process's store sends, in order, from any thread, while counting is on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sql: list[str] = []
        self.on = False

    def __call__(self, sql: str) -> None:
        if self.on:
            with self.lock:
                self.sql.append(" ".join(sql.split())[:120])

    def start(self) -> None:
        with self.lock:
            self.sql = []
        self.on = True

    def stop(self) -> list[str]:
        self.on = False
        with self.lock:
            return list(self.sql)


class Database:
    """The backend under test: how to count its statements, and a look at its state from outside."""

    def __init__(self, kind: str, env: dict[str, str], data: Path) -> None:
        self.kind = kind
        self.env = env
        self.data = data
        self.pools: dict[int, Statements] = {}  # PostgreSQL: each pool's statements, by id(pool)

    def watch(self, app: Any, served: Served) -> Statements:
        """What a served app's connections send from now on."""
        backend = app.state.store.backend
        if self.kind == "postgres":
            return self.pools[id(backend._pool)]  # counted from the pool's first connection
        statements = Statements()
        backend._writer.set_trace_callback(statements)
        backend._point.set_trace_callback(statements)
        reader = backend._reader
        served.call(lambda: reader.set_trace_callback(statements))
        return statements

    def scalar(self, sql: str) -> int:
        """One number, read from outside the receiver (not counted)."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.data / "receiver.db") as conn:
                return int(conn.execute(sql).fetchone()[0])

        async def look() -> int:
            conn = await asyncpg.connect(self.env["RECEIVER_DATABASE_URL"])
            try:
                return int(await conn.fetchval(sql))
            finally:
                await conn.close()

        return asyncio.run(look())

    def settled(self, tasks: int) -> bool:
        """`tasks` tasks ended, nothing left in the inbox or the jobs."""
        ended = self.scalar("SELECT COUNT(*) FROM tasks WHERE status IN ('succeeded', 'failed')")
        return (
            ended >= tasks
            and self.scalar("SELECT (SELECT COUNT(*) FROM jobs) + (SELECT COUNT(*) FROM inbox)") == 0
        )

    def submitted(self) -> bool:
        """No task is waiting to be submitted."""
        return self.scalar("SELECT COUNT(*) FROM tasks WHERE status = 'queued'") == 0


@pytest.fixture(params=["sqlite", "postgres"])
def database(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Database]:
    if request.param == "sqlite":
        yield Database("sqlite", {}, tmp_path / "data")
        return
    env: dict[str, str] = request.getfixturevalue("pg_env")
    database = Database("postgres", env, tmp_path / "data")
    create_pool = asyncpg.create_pool

    def counted_pool(*args: Any, **kwargs: Any) -> Any:
        # Every pooled connection logs the queries it sends (asyncpg's own query logger).
        statements = Statements()

        async def init(conn: asyncpg.Connection) -> None:
            conn.add_query_logger(lambda query: statements(query.query))

        pool = create_pool(*args, init=init, **kwargs)
        database.pools[id(pool)] = statements
        return pool

    monkeypatch.setattr(asyncpg, "create_pool", counted_pool)
    yield database


def wait_until(check: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not {what} after {seconds} s"
        time.sleep(0.02)


def submitted(fake: Any, count: int) -> str:
    """The provider's id of the `count`th task submitted to `fake`, once it is."""
    ids: Callable[[], list[str]] = (
        (lambda: sorted(fake.callback_urls)) if isinstance(fake, KieFake) else (lambda: list(fake.order))
    )
    wait_until(lambda: len(ids()) >= count, "submitted")
    return ids()[count - 1]


def run_tasks(
    receiver: Receiver, fakes: list[Any], app: AppHook, database: Database, first: int, count: int
) -> None:
    """`count` tasks, alternating the fakes, each created, submitted, called back, downloaded and
    notified; returns once every one ended and nothing is left to do."""
    for n in range(first, first + count):
        fake = fakes[n % len(fakes)]
        task = receiver.submit(provider=fake.name, prompt=f"a lighthouse {n}", notify_url=app.url)
        provider_id = submitted(fake, n // len(fakes) + 1)
        url = fake.host(f"image-{n}.png", png(64, 48, shade=n % 200))
        answer = fake.complete(provider_id, [url])
        assert answer is not None and answer.status_code == 200, answer
        app.wait_for(n + 1)
        assert task["id"]
    wait_until(lambda: database.settled(first + count), "settled")


def test_statements_per_task_and_per_callback_answer(
    database: Database, start_fake: Callable[..., Any]
) -> None:
    kie = start_fake(KieFake)
    fal = start_fake(FalFake)
    app = AppHook()
    app.served.start()
    env = {**kie.receiver_env(), **fal.receiver_env(), **database.env}
    receiver = Receiver(database.data, env).start()
    api: Served | None = None
    try:
        statements = database.watch(receiver.app, receiver.served)
        run_tasks(receiver, [kie, fal], app, database, 0, 2)  # warm-up: key sets, prepared statements

        statements.start()
        run_tasks(receiver, [kie, fal], app, database, 2, TASKS)
        per_task = statements.stop()

        # The answer to a callback, alone: an API-only process on the same data answers it, so the
        # worker's statements (which follow in the other process) are not counted with it.
        api_app = create_app(receiver.settings, role="api")
        api = Served(api_app).start()
        statements = database.watch(api_app, api)
        acks: list[list[str]] = []
        for n in range(TASKS + 2, TASKS + 2 + 2 * 2):
            fake = [kie, fal][n % 2]
            receiver.submit(provider=fake.name, prompt=f"a kite {n}", notify_url=app.url)
            provider_id = submitted(fake, n // 2 + 1)
            wait_until(lambda: database.submitted(), "recorded as submitted")
            if isinstance(fake, KieFake):
                fake.callback_urls[provider_id] = fake.callback_urls[provider_id].replace(
                    receiver.url, api.url
                )
            else:
                queued = fake.queue[provider_id]
                queued.webhook = queued.webhook.replace(receiver.url, api.url)
            url = fake.host(f"image-{n}.png", png(64, 48, shade=n))
            statements.start()
            answer = fake.complete(provider_id, [url])
            acks.append(statements.stop())
            assert answer is not None and answer.status_code == 200, answer.text
        wait_until(lambda: database.settled(TASKS + 2 + 4), "settled")
    finally:
        if api is not None:
            api.stop()
        receiver.stop()
        app.served.stop()
    count = len(per_task) / TASKS
    print(f"{database.kind}: {count:.1f} statements per task", *per_task, sep="\n  ")
    print(f"{database.kind}: per callback answer", *acks, sep="\n  ")
    assert count <= TASK_CEILING[database.kind], "\n".join(per_task)
    assert max(len(ack) for ack in acks) <= ACK_CEILING[database.kind], acks
