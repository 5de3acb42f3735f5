"""Usage and budgets (issue 21): what each tenant spent, grouped three ways, and a key's budget that refuses
a create past it with a 402 — on SQLite, on PostgreSQL, and in a burst split across two replicas.

Prices come from a RECEIVER_PRICES file: the sandbox at 0.04 USD an image, so tasks run locally and
cost what a paid provider's would.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver.store.rules import period_start
from tests.conftest import database_settings
from tests.harness import ALICE
from tests.harness import Receiver

ADMIN = "admin-key-0123456789abcdef0123456789"
PRICE = 0.04
SANDBOX = {"provider": "sandbox", "prompt": "a lighthouse at dusk"}


@pytest.fixture(params=["sqlite", "postgres"])
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return database_settings(request, request.param)


@pytest.fixture
def prices(tmp_path: Path) -> Callable[[dict[str, Any]], str]:
    def write(table: dict[str, Any]) -> str:
        path = tmp_path / f"prices-{len(list(tmp_path.glob('prices-*')))}.json"
        path.write_text(json.dumps(table))
        return str(path)

    return write


def priced(prices: Callable[[dict[str, Any]], str]) -> str:
    return prices({"sandbox": {"sandbox": {"per_image": PRICE}}})


def client(receiver: Receiver, key: str) -> httpx.Client:
    return httpx.Client(base_url=receiver.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def new_key(receiver: Receiver, **fields: Any) -> dict[str, Any]:
    with client(receiver, ADMIN) as admin:
        answer = admin.post("/v1/admin/keys", json={"tenant": "acme", **fields})
    assert answer.status_code == 201, answer.text
    created: dict[str, Any] = answer.json()
    return created


def usage(receiver: Receiver, key: str, path: str = "/v1/usage", **query: str) -> dict[str, Any]:
    with client(receiver, key) as app:
        answer = app.get(path, params=query)
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


def spend_metric(receiver: Receiver, tenant: str) -> float:
    """receiver_spend_usd_total for the tenant's sandbox tasks, as /metrics shows it (0 before any)."""
    text = receiver.anon.get("/metrics").text
    found = re.search(
        rf'^receiver_spend_usd_total{{provider="sandbox",tenant="{tenant}"}} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else 0.0


def test_usage_grouped_by_provider_model_and_day(
    start_receiver: Callable[..., Receiver], prices: Callable[[dict[str, Any]], str]
) -> None:
    receiver = start_receiver(RECEIVER_ADMIN_KEY=ADMIN, RECEIVER_PRICES=priced(prices))
    spent_before = {tenant: spend_metric(receiver, tenant) for tenant in ("alice", "acme")}
    ids = [receiver.submit(provider="sandbox", prompt="a lighthouse at dusk")["id"] for _ in range(2)]
    secret = new_key(receiver)["key"]
    with client(receiver, secret) as acme:
        ids.append(acme.post("/v1/tasks", json=SANDBOX).json()["id"])
    for task_id in ids[:2]:
        assert receiver.wait(task_id)["status"] == "succeeded"
    for task_id in ids[2:]:
        assert receiver.wait(task_id, client=client(receiver, secret))["status"] == "succeeded"
    today = datetime.now(UTC).strftime("%Y-%m-%d")

    # Each task counted once when it ended, in the process that ended it (the registry is this process's).
    for tenant, count in (("alice", 2), ("acme", 1)):
        assert spend_metric(receiver, tenant) - spent_before[tenant] == pytest.approx(count * PRICE)
    mine = usage(receiver, ALICE)
    assert (mine["tasks"], mine["usd"], mine["groups"]) == (2, 2 * PRICE, [])
    assert mine["from"] == datetime.now(UTC).strftime("%Y-%m-01T00:00:00.000Z")
    for group_by, name in (("provider", "sandbox"), ("model", "sandbox"), ("day", today)):
        grouped = usage(receiver, ALICE, group_by=group_by)
        assert grouped["groups"] == [{"group": name, "tasks": 2, "usd": 2 * PRICE}], group_by
    assert usage(receiver, secret)["tasks"] == 1  # acme's own, not alice's
    assert usage(receiver, ALICE, **{"from": "2999-01-01", "to": "2999-02-01"})["tasks"] == 0
    assert usage(receiver, ALICE, **{"from": today, "to": f"{today}T23:59:59.999+00:00"})["tasks"] == 2

    everyone = usage(receiver, ADMIN, "/v1/admin/usage", group_by="tenant")
    assert (everyone["tasks"], everyone["usd"]) == (3, round(3 * PRICE, 6))
    assert {g["group"]: (g["tasks"], g["usd"]) for g in everyone["groups"]} == {
        "acme": (1, PRICE),
        "alice": (2, 2 * PRICE),
    }
    assert usage(receiver, ADMIN, "/v1/admin/usage", tenant="acme", group_by="day")["groups"] == [
        {"group": today, "tasks": 1, "usd": PRICE}
    ]
    for query, field in (
        ({"from": "yesterday"}, "from"),
        ({"to": "2026-13-01"}, "to"),
        ({"from": "2026-05-02", "to": "2026-05-01"}, "to"),
        ({"group_by": "tenant"}, "group_by"),  # the admin API's only
        ({"group_by": "week"}, "group_by"),
        ({"from": "0001-01-01T00:00:00+14:00"}, "from"),
    ):
        answer = receiver.alice.get("/v1/usage", params=query)
        assert answer.status_code == 422 and field in answer.json()["error"]["fields"], (query, answer.text)
    assert receiver.alice.get("/v1/admin/usage").status_code == 401


def test_a_budget_refuses_the_create_that_would_pass_it(
    start_receiver: Callable[..., Receiver], prices: Callable[[dict[str, Any]], str]
) -> None:
    receiver = start_receiver(RECEIVER_ADMIN_KEY=ADMIN, RECEIVER_PRICES=priced(prices))
    key = new_key(receiver, budget_usd=0.1, budget_period="month")
    with client(receiver, key["key"]) as app, client(receiver, ADMIN) as admin:
        assert [app.post("/v1/tasks", json=SANDBOX).status_code for _ in range(2)] == [202, 202]
        refused = app.post("/v1/tasks", json=SANDBOX)
        assert refused.status_code == 402, refused.text
        error = refused.json()["error"]
        assert error["code"] == "budget_exceeded" and error["remaining_usd"] == pytest.approx(0.02)
        assert len(app.get("/v1/tasks").json()["items"]) == 2  # nothing recorded, nothing submitted
        # A refused create with an Idempotency-Key recorded nothing: once the budget allows, the same key
        # makes the task, and a repeat of it is that task, not a new cost.
        first = app.post("/v1/tasks", json=SANDBOX, headers={"Idempotency-Key": "k1"})
        assert first.status_code == 402
        # A bigger budget takes it at once; the other keys and RECEIVER_API_KEYS have none.
        admin.patch(f"/v1/admin/keys/{key['id']}", json={"budget_usd": 0.2})
        again = app.post("/v1/tasks", json=SANDBOX, headers={"Idempotency-Key": "k1"})
        assert again.status_code == 202
        assert app.post("/v1/tasks", json=SANDBOX, headers={"Idempotency-Key": "k1"}).status_code == 200
        assert usage(receiver, key["key"])["usd"] == pytest.approx(3 * PRICE)
        assert receiver.alice.post("/v1/tasks", json=SANDBOX).status_code == 202


def test_a_model_without_a_price_counts_only_against_a_spent_budget(
    start_receiver: Callable[..., Receiver], prices: Callable[[dict[str, Any]], str]
) -> None:
    receiver = start_receiver(RECEIVER_ADMIN_KEY=ADMIN, RECEIVER_PRICES=prices({"sandbox": {}}))
    some = new_key(receiver, budget_usd=0.1)
    none = new_key(receiver, budget_usd=0)
    with client(receiver, some["key"]) as app:
        assert [app.post("/v1/tasks", json=SANDBOX).status_code for _ in range(4)] == [202] * 4
    with client(receiver, none["key"]) as app:
        refused = app.post("/v1/tasks", json=SANDBOX)
    assert refused.status_code == 402 and refused.json()["error"]["remaining_usd"] == 0


@pytest.mark.parametrize("database_env", ["postgres"], indirect=True)
def test_a_burst_on_two_replicas_overshoots_by_at_most_one_task(
    start_receiver: Callable[..., Receiver], prices: Callable[[dict[str, Any]], str]
) -> None:
    """Creates of one key arrive at both replicas at once; tasks stay running (the sandbox takes a
    minute), so every accepted one counts by its estimate while the rest are decided."""
    env = {"RECEIVER_ADMIN_KEY": ADMIN, "RECEIVER_PRICES": priced(prices), "RECEIVER_SANDBOX_DELAY": "60"}
    replicas = [start_receiver("one", **env), start_receiver("two", **env)]
    budget = 0.5
    key = new_key(replicas[0], budget_usd=budget)
    clients = [client(replica, key["key"]) for replica in replicas]
    burst = 24

    def create(n: int) -> int:
        return clients[n % 2].post("/v1/tasks", json={**SANDBOX, "prompt": f"burst {n}"}).status_code

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=12) as pool:
        codes = list(pool.map(create, range(burst)))
    took = time.monotonic() - started
    for each in clients:
        each.close()
    accepted, refused = codes.count(202), codes.count(402)
    spend = usage(replicas[1], ADMIN, "/v1/admin/usage", tenant="acme")["usd"]
    print(
        f"budget {budget:.2f} USD at {PRICE:.2f} a task; burst of {burst} creates over 2 replicas in"
        f" {took:.2f} s: accepted {accepted}, refused {refused} (402), spend {spend:.2f} USD,"
        f" overshoot {max(0.0, spend - budget):.2f} USD"
    )
    assert accepted + refused == burst, codes
    assert spend <= budget + PRICE + 1e-9
    assert accepted == int(budget / PRICE + 1e-9)  # every price is known: not even one task over


def test_budget_periods_are_calendar_days_and_months_in_utc() -> None:
    now = datetime(2026, 5, 17, 13, 45, 12, tzinfo=UTC).timestamp()
    assert period_start("day", now) == datetime(2026, 5, 17, tzinfo=UTC).timestamp()
    assert period_start("month", now) == datetime(2026, 5, 1, tzinfo=UTC).timestamp()
    assert period_start(None, now) == 0.0
