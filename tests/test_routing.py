"""Cost per task and `"provider": "auto"` routing, over real HTTP against the fakes, on SQLite and on
PostgreSQL: the cost each ended task carries (the price table's, or the provider's own report), the
cheapest provider picked, one that cannot honour the request skipped, a failing cheap provider left
for the next and put in cooldown; and the cooldown's probe, on the rules with an injected clock."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from receiver.models import ErrorCode
from receiver.models import Outcome
from receiver.models import TaskError
from receiver.store.base import Timings
from receiver.store.rules import Store
from tests.conftest import database_settings
from tests.fakes.apimart import GENERATIONS
from tests.fakes.apimart import ApimartFake
from tests.fakes.fal import FalFake
from tests.fakes.kie import GENERATE
from tests.fakes.kie import KieFake
from tests.harness import Receiver
from tests.test_notify import SHORT
from tests.test_rules import FakeClock
from tests.test_rules import MakeBackend
from tests.test_rules import make_backend  # noqa: F401  (the fixture)
from tests.test_rules import new_task
from tests.test_rules import run

Fakes = tuple[ApimartFake, FalFake, KieFake]


@pytest.fixture(params=["sqlite", "postgres"])
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return database_settings(request, request.param)


@pytest.fixture
def fakes(start_fake: Callable[..., Any]) -> Fakes:
    return start_fake(ApimartFake), start_fake(FalFake), start_fake(KieFake)


def start(fakes: Fakes, start_receiver: Callable[..., Receiver], **extra: Any) -> Receiver:
    env: dict[str, Any] = {
        **SHORT,
        "RECEIVER_SUBMIT_RETRIES": 1,
        "RECEIVER_COOLDOWN_FAILURES": 2,
        "RECEIVER_COOLDOWN_SECONDS": 3600,
        **extra,
    }
    for fake in fakes:
        env.update(fake.receiver_env())
    return start_receiver(**env)


@pytest.fixture
def receiver(fakes: Fakes, start_receiver: Callable[..., Receiver]) -> Receiver:
    return start(fakes, start_receiver)


def providers(receiver: Receiver) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in receiver.alice.get("/v1/providers").json()["items"]}


def cooldown_metric(receiver: Receiver, provider: str) -> str:
    line = f'receiver_provider_cooldown{{provider="{provider}"}} '
    [value] = [
        row[len(line) :] for row in receiver.anon.get("/metrics").text.splitlines() if row.startswith(line)
    ]
    return value


def test_providers_show_their_prices_and_no_cooldown(receiver: Receiver) -> None:
    listed = providers(receiver)
    fal = listed["fal"]
    assert fal["prices"]["flux-kontext-max"]["per_image"] == 0.08
    assert fal["prices"]["flux-2-pro"]["first_megapixel"] == 0.03
    assert fal["prices"]["flux-2-pro"]["per_megapixel"] == 0.015
    assert fal["prices"]["flux-kontext-max"]["source"].startswith("https://")
    assert listed["apimart"]["prices"]["flux-kontext-pro"]["verified"] is False
    assert listed["kie"]["prices"] == {}  # no verified price: none assumed
    assert all(item["cooldown_until"] is None for item in listed.values())
    assert cooldown_metric(receiver, "apimart") == "0.0" and cooldown_metric(receiver, "kie") == "0.0"


def test_cost_from_the_price_table_from_the_provider_and_zero_when_refused(
    fakes: Fakes, receiver: Receiver
) -> None:
    apimart, fal, kie = fakes
    # fal: no charge reported, so the price table's
    task = receiver.submit(provider="fal", prompt="p", model="flux-kontext-max")
    assert task["cost"] is None
    request_id = fal.provider_task_id()
    receiver.wait_status(str(task["id"]), "submitted")
    assert receiver.alice.get(f"/v1/tasks/{task['id']}").json()["cost"] is None  # not before it ends
    fal.complete(request_id, [fal.host("f.png")])
    done = receiver.wait(str(task["id"]))
    assert done["status"] == "succeeded" and done["cost"] == {"usd": 0.08, "source": "price"}
    # apimart reports what it billed (its `cost`): that wins over the table's 0.032
    task = receiver.submit(provider="apimart", prompt="p", model="flux-kontext-pro")
    apimart_id = apimart.provider_task_id()
    receiver.wait_status(str(task["id"]), "submitted")
    apimart.complete(apimart_id, [apimart.host("a.png")])
    done = receiver.wait(str(task["id"]))
    assert done["status"] == "succeeded" and done["cost"] == {"usd": 0.006, "source": "provider"}
    # refused before it ran (no credits): 0, though kie has no known price
    kie.script(GENERATE, 200, {"code": 402, "msg": "Insufficient credits"})
    task = receiver.submit(provider="kie", prompt="p")
    done = receiver.wait(str(task["id"]))
    assert done["status"] == "failed" and done["cost"] == {"usd": 0.0, "source": "price"}


def test_auto_picks_the_cheapest_and_skips_one_that_cannot_honour_it(
    fakes: Fakes, receiver: Receiver
) -> None:
    task = receiver.submit(provider="auto", prompt="p", model="flux-kontext-pro")
    assert (task["provider"], task["fallback"]) == ("apimart", ["fal", "kie"])  # 0.032, 0.04, no price
    [created] = [e for e in receiver.events(str(task["id"])) if e["kind"] == "created"]
    assert "auto: apimart ($0.032), fal ($0.04), kie (no known price)" in created["summary"]
    # neither apimart nor kie takes a seed with Kontext: fal is the only one that can honour it
    task = receiver.submit(provider="auto", prompt="p", model="flux-kontext-pro", seed=7)
    assert (task["provider"], task["fallback"]) == ("fal", [])


def test_auto_refusals_name_the_field(receiver: Receiver) -> None:
    said = receiver.alice.post(
        "/v1/tasks",
        json={"provider": "auto", "prompt": "p", "model": "flux-kontext-pro", "fallback": ["fal"]},
    )
    assert said.status_code == 422 and "fallback" in said.json()["error"]["fields"]
    said = receiver.alice.post("/v1/tasks", json={"provider": "auto", "prompt": "p", "model": "fal-ai/x/y"})
    assert said.status_code == 422 and "shared model" in said.json()["error"]["fields"]["model"]
    said = receiver.alice.post("/v1/tasks", json={"provider": "auto", "prompt": "p"})
    assert said.status_code == 422 and "model" in said.json()["error"]["fields"]
    # flux-2-pro is sold by fal here (kie-market is not configured), and fal's FLUX 2 makes one image
    said = receiver.alice.post(
        "/v1/tasks", json={"provider": "auto", "prompt": "p", "model": "flux-2-pro", "num_images": 3}
    )
    error = said.json()["error"]
    assert said.status_code == 422 and error["code"] == "no_provider", error
    assert "no configured provider can honour" in error["message"] and "num_images" in error["message"]
    assert receiver.alice.get("/v1/tasks").json()["items"] == []  # nothing was created


def test_a_failing_cheap_provider_is_left_for_the_next_and_cools_down(
    fakes: Fakes, receiver: Receiver
) -> None:
    apimart, fal, _ = fakes
    apimart.script(GENERATIONS, 503, {"error": {"message": "upstream overloaded", "type": "apimart_error"}})
    apimart.script(GENERATIONS, 503, {"error": {"message": "upstream overloaded", "type": "apimart_error"}})
    task = receiver.submit(provider="auto", prompt="a lighthouse at dusk", model="flux-kontext-pro")
    assert task["provider"] == "apimart"
    request_id = fal.provider_task_id()  # after two 503s the task moved on to fal
    fal.complete(request_id, [fal.host("l.png")])
    done = receiver.wait(str(task["id"]))
    assert (done["status"], done["provider"]) == ("succeeded", "fal"), done
    assert [(a["provider"], a["error"]["code"]) for a in done["attempts"]] == [
        ("apimart", "provider_unavailable")
    ]
    assert done["cost"] == {"usd": 0.04, "source": "price"}  # what fal's run cost; apimart never ran it
    events = receiver.events(str(task["id"]))
    print("\nthe routing run's events:")  # for the closing note
    for item in events:
        print(f"  {item['kind']:<9} {item['change'] or '':<22} {item['summary']}")
    assert any(
        e["kind"] == "fallback" and "moved from apimart to fal (unavailable)" in e["summary"] for e in events
    )
    # Two failures in a row: apimart is in cooldown for auto routing, on /v1/providers and in the metric.
    listed = providers(receiver)
    assert listed["apimart"]["cooldown_until"] is not None and listed["fal"]["cooldown_until"] is None
    assert cooldown_metric(receiver, "apimart") == "1.0" and cooldown_metric(receiver, "fal") == "0.0"
    # The next auto task goes straight to fal; apimart comes last in its chain.
    before = len(apimart.calls(GENERATIONS))
    task = receiver.submit(provider="auto", prompt="p", model="flux-kontext-pro")
    assert (task["provider"], task["fallback"]) == ("fal", ["kie", "apimart"])
    [created] = [e for e in receiver.events(str(task["id"])) if e["kind"] == "created"]
    assert "apimart ($0.032, in cooldown)" in created["summary"]
    assert len(apimart.calls(GENERATIONS)) == before
    # An explicit choice of apimart is the app's to make: cooldown is for auto only.
    assert receiver.submit(provider="apimart", prompt="p")["provider"] == "apimart"


def test_a_429_hold_is_not_a_failure(fakes: Fakes, receiver: Receiver) -> None:
    apimart, _, _ = fakes
    for _ in range(3):
        apimart.script(GENERATIONS, 429, {"error": {"message": "slow down", "type": "apimart_error"}})
    task = receiver.submit(provider="auto", prompt="p", model="flux-kontext-pro")
    receiver.wait_status(str(task["id"]), "submitted", seconds=30)
    assert receiver.alice.get(f"/v1/tasks/{task['id']}").json()["provider"] == "apimart"
    assert len(apimart.calls(GENERATIONS)) == 4  # three 429s, then taken
    assert providers(receiver)["apimart"]["cooldown_until"] is None


def test_a_prices_file_changes_the_route(
    fakes: Fakes, start_receiver: Callable[..., Receiver], tmp_path: Path
) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(
        json.dumps({"kie": {"flux-kontext-pro": {"per_image": 0.01, "source": "our contract"}}})
    )
    receiver = start(fakes, start_receiver, RECEIVER_PRICES=str(prices))
    assert providers(receiver)["kie"]["prices"]["flux-kontext-pro"]["per_image"] == 0.01
    task = receiver.submit(provider="auto", prompt="p", model="flux-kontext-pro")
    assert (task["provider"], task["fallback"]) == ("kie", ["apimart", "fal"])


# -- the cooldown's rules, with time moved by hand -------------------------------------------------

COOLING = Timings(300.0, 3600.0, 60.0, cooldown_failures=2, cooldown_seconds=60.0)
UNAVAILABLE = TaskError(ErrorCode.PROVIDER_UNAVAILABLE, "HTTP 503: overloaded")


def test_cooldown_after_failures_in_a_row_then_a_probe_decides(make_backend: MakeBackend) -> None:  # noqa: F811
    async def body(store: Store, clock: FakeClock) -> None:
        store.timings = COOLING
        for name in ("tsk_1", "tsk_2"):
            await store.create_task(new_task(name))
            await store.fail_task(name, UNAVAILABLE, "submit", provider="kie")
        health = (await store.provider_health())["kie"]
        assert (health.consecutive_failures, health.cooldown_until) == (2, clock.now + 60)
        # After T, the first task routed there is the probe: the others keep away while it runs.
        clock.now += 61
        await store.create_task(replace(new_task("tsk_probe"), probe=True))
        assert (await store.provider_health())["kie"].cooldown_until == clock.now + 60
        # Its failure re-arms the cooldown from now.
        clock.now += 5
        await store.fail_task("tsk_probe", UNAVAILABLE, "submit", provider="kie")
        health = (await store.provider_health())["kie"]
        assert (health.consecutive_failures, health.cooldown_until) == (3, clock.now + 60)
        # The next probe succeeds: the run of failures and the cooldown are over.
        clock.now += 61
        await store.create_task(replace(new_task("tsk_probe2"), probe=True))
        await store.apply_outcome(
            "tsk_probe2", Outcome.succeeded("p1", ("https://img.example/0.png",)), "callback"
        )
        health = (await store.provider_health())["kie"]
        assert (health.consecutive_failures, health.cooldown_until) == (0, 0.0)

    run(make_backend, body)
