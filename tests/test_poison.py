"""Poison: a callback or a stored row that cannot be kept must never stop the worker.

Over real HTTP, on SQLite and on PostgreSQL: a lone surrogate or a 2,000-level nesting in a callback is a
400 that changes nothing; text from outside is stored clean; and a row made bad in the database itself
(as an older version, or a hand, could have left it) is parked with an event and a metric while every
other tenant's work goes on, also after a restart.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import pytest

from receiver.store.rules import MAX_FAILURES
from tests.conftest import database_settings
from tests.fakes.apimart import ApimartFake
from tests.harness import Receiver

POISONED = "tsk_00000000000000000000dead"  # a task made bad in the database (its request is not JSON)


@pytest.fixture(params=["sqlite", "postgres"])
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Every test here runs on both backends."""
    return database_settings(request, request.param)


@pytest.fixture
def apimart(start_fake: Callable[..., Any]) -> ApimartFake:
    fake: ApimartFake = start_fake(ApimartFake)
    return fake


@pytest.fixture
def start(apimart: ApimartFake, start_receiver: Callable[..., Receiver]) -> Callable[[], Receiver]:
    """Start (or, once the last one is stopped, start again) the receiver on the test's one database."""
    return lambda: start_receiver(**apimart.receiver_env())


def sql(receiver: Receiver, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run one statement on the receiver's database from outside it (`?` placeholders); its rows."""
    url = receiver.settings.database_url
    if url is None:
        conn = sqlite3.connect(receiver.settings.data_dir / "receiver.db", timeout=30)
        try:
            with conn:
                return list(conn.execute(statement, args).fetchall())
        finally:
            conn.close()
    import asyncpg

    count = iter(range(1, statement.count("?") + 1))
    numbered = re.sub(r"\?", lambda _: f"${next(count)}", statement)

    async def run() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(url)
        try:
            return [tuple(row) for row in await conn.fetch(numbered, *args)]
        finally:
            await conn.close()

    return asyncio.run(run())


def wait_until(predicate: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def metric(receiver: Receiver, name: str, **labels: str) -> float:
    """A sample of /metrics, 0 when absent."""
    spelled = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    wanted = f"{name}{{{spelled}}} " if labels else f"{name} "
    for line in receiver.anon.get("/metrics").text.splitlines():
        if line.startswith(wanted):
            return float(line.split()[-1])
    return 0.0


def other_tenant_completes(receiver: Receiver) -> None:
    """Bob's ordinary task (the built-in sandbox) runs to its end: the worker serves everyone."""
    task = receiver.submit(receiver.bob, provider="sandbox", prompt="a quiet harbour")
    done = receiver.wait(str(task["id"]), client=receiver.bob)
    assert done["status"] == "succeeded", done


def test_a_lone_surrogate_callback_is_a_400_and_every_tenant_goes_on(
    apimart: ApimartFake, start: Callable[[], Receiver]
) -> None:
    receiver = start()
    task_id, provider_id = receiver.submitted(apimart)
    for body in (
        b'{"status":"\\ud800"}',  # escaped
        b'{"status":"\xed\xa0\x80"}',  # raw (an encoded surrogate is not UTF-8)
        b'{"id":"' + provider_id.encode() + b'","status":"failed","error":{"message":"\\udc00"}}',
        b'{"status":"processing","progress":NaN}',
        b'{"status":"\xff"}',
    ):
        answer = apimart.deliver(provider_id, body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["code"] == "malformed"
    seen = receiver.alice.get(f"/v1/tasks/{task_id}").json()
    assert seen["status"] == "submitted" and seen["error"] is None
    [*_, refused] = receiver.events(task_id)
    assert refused["summary"].startswith("unreadable body") and refused["change"] is None
    other_tenant_completes(receiver)

    receiver.stop()
    moved, receiver = receiver.url, start()
    other_tenant_completes(receiver)
    # The task itself was never hurt: its real result still finishes it (at the service's new port).
    apimart.webhooks[provider_id] = apimart.webhooks[provider_id].replace(moved, receiver.url)
    assert apimart.complete(provider_id, [apimart.host("fine.png")]).status_code == 200  # type: ignore[union-attr]
    assert receiver.wait(task_id)["status"] == "succeeded"


def test_a_callback_nested_2000_levels_is_a_400(apimart: ApimartFake, start: Callable[[], Receiver]) -> None:
    receiver = start()
    task_id, provider_id = receiver.submitted(apimart)
    for levels in (2000, 33):
        body = b'{"status":"processing","x":' + b"[" * levels + b"]" * levels + b"}"
        answer = apimart.deliver(provider_id, body)
        assert answer.status_code == 400, answer.text
        assert "nested deeper than 32 levels" in answer.json()["error"]["message"]
    within = b'{"status":"processing","x":' + b"[" * 31 + b"]" * 31 + b"}"
    assert apimart.deliver(provider_id, within).status_code == 200
    assert receiver.alice.get(f"/v1/tasks/{task_id}").json()["status"] == "submitted"
    other_tenant_completes(receiver)


def test_a_provider_answer_holding_a_lone_surrogate_is_a_malformed_answer(
    apimart: ApimartFake, start_receiver: Callable[..., Receiver]
) -> None:
    """A status answer is read by the same reader as a callback: one it refuses is a passing fault
    (recorded, asked again later), never a crash of the job or a stored surrogate."""
    receiver = start_receiver(**apimart.receiver_env(), RECEIVER_RECONCILE_AFTER="0.2")
    task_id, provider_id = receiver.submitted(apimart)
    path = f"/v1/tasks/{provider_id}"
    answer = b'{"code":200,"data":{"id":"' + provider_id.encode() + b'","status":"\\ud800"}}'
    for _ in range(2):
        apimart.script(path, 200, answer)

    def refused() -> list[dict[str, Any]]:
        return [
            item for item in receiver.events(task_id) if item["summary"].startswith("status query failed")
        ]

    wait_until(lambda: len(refused()) >= 2)
    assert all("not a JSON object" in item["summary"] for item in refused())
    assert receiver.alice.get(f"/v1/tasks/{task_id}").json()["status"] == "submitted"
    assert apimart.complete(provider_id, [apimart.host("ok.png")]).status_code == 200  # type: ignore[union-attr]
    assert receiver.wait(task_id)["status"] == "succeeded"
    other_tenant_completes(receiver)


def test_text_from_outside_is_stored_as_a_database_can_keep_it(
    apimart: ApimartFake, start: Callable[[], Receiver]
) -> None:
    """NUL is valid JSON but PostgreSQL cannot keep it in text: it is cleaned where news is recorded."""
    receiver = start()
    task_id, provider_id = receiver.submitted(apimart)
    body = {"id": provider_id, "status": "failed", "error": {"message": "no\u0000 way", "code": "x\u0000"}}
    assert apimart.deliver(provider_id, json.dumps(body).encode()).status_code == 200
    done = receiver.wait(task_id)
    assert done["status"] == "failed", done
    assert done["error"]["message"] == "no\ufffd way"
    assert done["error"]["provider_code"] == "x\ufffd"
    other_tenant_completes(receiver)


def test_a_stored_error_holding_a_lone_surrogate_does_not_break_lookups(
    apimart: ApimartFake, start: Callable[[], Receiver]
) -> None:
    """An error kept by an older version, its JSON escaping a lone surrogate: still rendered (cleaned)."""
    receiver = start()
    task_id, provider_id = receiver.submitted(apimart)
    assert apimart.fail(provider_id, False, "no").status_code == 200  # type: ignore[union-attr]
    assert receiver.wait(task_id)["status"] == "failed"
    old = r'{"code":"generation_failed","message":"bad \udc00 text","provider_code":"\ud800"}'
    attempts = (
        r'[{"provider":"kie","model":"flux-kontext-pro","provider_task_id":"\udbff","at":1.5,'
        r'"error":{"code":"provider_unavailable","message":"\udfff","provider_code":null}}]'
    )
    sql(receiver, "UPDATE tasks SET error=?, attempts=? WHERE id=?", old, attempts, task_id)
    for path in (f"/v1/tasks/{task_id}", "/v1/tasks", "/v1/tasks?status=failed"):
        answer = receiver.alice.get(path)
        assert answer.status_code == 200, (path, answer.text)
    task = receiver.alice.get(f"/v1/tasks/{task_id}").json()
    assert task["error"]["message"] == "bad \ufffd text"
    assert task["error"]["provider_code"] == "\ufffd"
    assert task["attempts"][0]["error"]["message"] == "\ufffd"


def test_a_poisoned_inbox_row_is_parked_while_the_rest_goes_on(
    apimart: ApimartFake, start: Callable[[], Receiver]
) -> None:
    receiver = start()
    task_id, provider_id = receiver.submitted(apimart)
    now = time.time()
    # Rows as an older version (or a hand) could have left them, ahead of the task's real result:
    # news that is not JSON, news of a shape no version wrote, and (SQLite keeps whatever bytes it is
    # given) a text that is not UTF-8 at all. And one that an older version did write, with a lone
    # surrogate escaped in its JSON: that one is applied, cleaned.
    bad = ["{not json", '{"state":"pending"}']
    insert = "INSERT INTO inbox (task_id, received_at, outcome, urgent) VALUES (?, ?, ?, 0)"
    for outcome in bad:
        sql(receiver, insert, task_id, now, outcome)
    if receiver.settings.database_url is None:
        sql(receiver, insert.replace("?, 0)", "CAST(X'7B22EDA080' AS TEXT), 0)"), task_id, now)
        bad.append("not UTF-8")
    older: dict[str, Any] = {"state": "pending", "provider_task_id": None, "image_urls": [], "error": None}
    escaped = json.dumps({**older, "detail": "status \ud800", "provider": "apimart", "ask_now": False})
    sql(receiver, insert, task_id, now, escaped)
    assert apimart.complete(provider_id, [apimart.host("after.png")]).status_code == 200  # type: ignore[union-attr]

    assert receiver.wait(task_id)["status"] == "succeeded"
    other_tenant_completes(receiver)
    wait_until(lambda: metric(receiver, "receiver_parked_rows", kind="callback") == len(bad))
    assert sql(receiver, "SELECT COUNT(*) FROM inbox") == [(0,)]
    assert sql(receiver, "SELECT source, failures FROM parked") == [("inbox", MAX_FAILURES)] * len(bad)
    events = receiver.events(task_id)
    parked = [item for item in events if item["kind"] == "parked"]
    assert len(parked) == len(bad), events
    assert all(f"failed {MAX_FAILURES} times and was set aside" in item["summary"] for item in parked)
    assert any(item["summary"] == "status \ufffd" for item in events), events
    assert metric(receiver, "receiver_jobs_parked_total", kind="callback") >= len(bad)

    receiver.stop()
    receiver = start()
    other_tenant_completes(receiver)
    assert metric(receiver, "receiver_parked_rows", kind="callback") == len(bad)
    assert len([item for item in receiver.events(task_id) if item["kind"] == "parked"]) == len(bad)


def test_a_job_that_keeps_failing_is_parked_while_the_rest_goes_on(
    apimart: ApimartFake, start: Callable[[], Receiver]
) -> None:
    receiver = start()
    now = time.time()
    # A task whose request cannot be read (its submit job fails each time it runs), due now.
    sql(
        receiver,
        "INSERT INTO tasks (id, tenant, provider, model, prompt, request, status, created_at, updated_at)"
        " VALUES (?, 'alice', 'sandbox', 'flux-kontext-pro', 'x', '{not json', 'queued', ?, ?)",
        POISONED,
        now,
        now,
    )
    job = "INSERT INTO jobs (kind, task_id, arg, due_at) VALUES (?, {}, 0, ?)"
    sql(receiver, job.format("?"), "submit", POISONED, now)
    kinds = {"submit": 1}
    if receiver.settings.database_url is None:
        # A job whose task id cannot even be decoded: the claim itself fails on it.
        sql(receiver, job.format("CAST(X'EDA080' AS TEXT)"), "reconcile", now)
        kinds["reconcile"] = 1
    other_tenant_completes(receiver)
    wait_until(lambda: all(metric(receiver, "receiver_parked_rows", kind=k) == n for k, n in kinds.items()))
    assert sql(receiver, "SELECT COUNT(*) FROM jobs WHERE task_id=?", POISONED) == [(0,)]
    [parked] = [item for item in receiver.events(POISONED) if item["kind"] == "parked"]
    assert parked["summary"].startswith(f"the submit job failed {MAX_FAILURES} times and was set aside")
    assert "JSONDecodeError" in parked["summary"]

    receiver.stop()
    receiver = start()
    other_tenant_completes(receiver)
    for kind, count in kinds.items():
        assert metric(receiver, "receiver_parked_rows", kind=kind) == count
    assert receiver.alice.get(f"/v1/tasks/{POISONED}").json()["status"] == "queued"
