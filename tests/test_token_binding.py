"""Callback tokens bound to the provider and hop they were given for, callbacks that name no provider
task, and duplicate callbacks that must not grow a task's events — over real HTTP, against the fakes,
on both database backends."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from itsdangerous import Signer

from tests.conftest import database_settings
from tests.fakes.apimart import TASKS
from tests.fakes.apimart import ApimartFake
from tests.fakes.apimart import callback_target
from tests.fakes.kie import GENERATE
from tests.fakes.kie import KieFake
from tests.harness import Receiver


@pytest.fixture(params=["sqlite", "postgres"])
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Every test here runs on both backends."""
    return database_settings(request, request.param)


@pytest.fixture
def kie(start_fake: Callable[..., Any]) -> KieFake:
    fake: KieFake = start_fake(KieFake, hmac_key=None)  # unsigned: the token is all a callback carries
    return fake


@pytest.fixture
def apimart(start_fake: Callable[..., Any]) -> ApimartFake:
    fake: ApimartFake = start_fake(ApimartFake)
    return fake


@pytest.fixture
def receiver(kie: KieFake, apimart: ApimartFake, start_receiver: Callable[..., Receiver]) -> Receiver:
    return start_receiver(**kie.receiver_env(), **apimart.receiver_env())


def forged_success(apimart: ApimartFake, task_id: str | None, url: str) -> bytes:
    body: dict[str, Any] = {"status": "completed", "result": {"images": [{"url": [url]}]}}
    if task_id is not None:
        body["id"] = task_id
    return json.dumps(body).encode()


def moved_to_apimart(receiver: Receiver, kie: KieFake, apimart: ApimartFake) -> tuple[str, str, str]:
    """A task kie refused (no credits) and apimart took: (our id, kie's callback URL, apimart's id)."""
    kie.script(GENERATE, 200, {"code": 402, "msg": "Insufficient credits"})
    task = receiver.submit(provider="kie", prompt="p", fallback=["apimart"])
    task_id = str(task["id"])
    apimart_id = apimart.provider_task_id()
    moved = receiver.wait_status(task_id, "submitted")
    assert (moved["status"], moved["provider"]) == ("submitted", "apimart"), moved
    kie_url = str(kie.calls(GENERATE)[0].json()["callBackUrl"])
    return task_id, kie_url, apimart_id


def at_apimart(receiver: Receiver, apimart: ApimartFake) -> tuple[str, str, str]:
    """A task apimart accepted: (our id, apimart's, the URL apimart calls back)."""
    task = receiver.submit(provider="apimart", prompt="p")
    receiver.wait_status(str(task["id"]), "submitted")
    apimart_id = apimart.provider_task_id()
    return str(task["id"]), apimart_id, callback_target(apimart.webhooks[apimart_id])


def post_each(url: str, bodies: list[bytes]) -> None:
    """Deliver each body in turn, on one connection; every one must be answered 200."""
    with httpx.Client(timeout=30) as client:
        for body in bodies:
            answer = client.post(url, content=body, headers={"Content-Type": "application/json"})
            assert answer.status_code == 200, answer.text


def unchanged(receiver: Receiver, task_id: str) -> None:
    task = receiver.alice.get(f"/v1/tasks/{task_id}").json()
    assert (task["status"], task["provider"], task["images"]) == ("submitted", "apimart", []), task


def test_a_left_providers_token_is_refused_at_the_next_providers_route(
    receiver: Receiver, kie: KieFake, apimart: ApimartFake
) -> None:
    task_id, kie_url, apimart_id = moved_to_apimart(receiver, kie, apimart)
    forged = kie.host("forged.png")
    body = forged_success(apimart, apimart_id, forged)
    # kie's token on apimart's route (apimart appends /callback), with a success naming apimart's task.
    stolen = kie_url.replace("/callbacks/kie/", "/callbacks/apimart/")
    assert stolen != kie_url
    for url in (stolen, stolen + "/callback"):
        answer = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] == "bad_token"
    # A token of apimart's for a hop the task is not at (hop 0 was kie's) is refused as well.
    wrong_hop = receiver.callback_url("apimart", task_id)  # hop 0
    answer = httpx.post(callback_target(wrong_hop), content=body)
    assert answer.status_code == 401, answer.text
    # kie's token on kie's own route is a late callback: answered, recorded, changes nothing.
    late = httpx.post(kie_url, content=json.dumps(kie.success_body("kie-1", forged)).encode())
    assert late.status_code == 200, late.text
    unchanged(receiver, task_id)
    assert any("late callback from kie" in e["summary"] for e in receiver.events(task_id))
    # The task still finishes through apimart's own callback, with apimart's image.
    real = apimart.host("real.png")
    assert apimart.complete(apimart_id, [real]) is not None
    done = receiver.wait(task_id)
    assert done["status"] == "succeeded" and done["images"][0]["source_url"] == real, done
    assert kie.files["forged.png"].fetches == 0


def test_a_callback_naming_no_provider_task_is_confirmed_by_a_status_query(
    receiver: Receiver, apimart: ApimartFake
) -> None:
    task_id, apimart_id, url = at_apimart(receiver, apimart)
    forged = apimart.host("forged.png")
    # A success without an `id` (another task's result, say): answered, but not taken as it came.
    answer = httpx.post(url, content=forged_success(apimart, None, forged))
    assert answer.status_code == 200, answer.text
    status_path = TASKS + apimart_id
    apimart.wait_for(lambda: bool(apimart.calls(status_path)), 30)  # asked at once, not in 300 s
    events = wait_for_event(receiver, task_id, "naming no provider task")
    assert not any(e["change"] for e in events if "naming no provider task" in e["summary"])
    poll_seen = wait_for_event(receiver, task_id, "status submitted")
    assert any(e["kind"] == "poll" for e in poll_seen)
    unchanged_task = receiver.alice.get(f"/v1/tasks/{task_id}").json()
    assert (unchanged_task["status"], unchanged_task["images"]) == ("submitted", [])
    # When apimart's status says it is done, the same id-less callback is confirmed by the query.
    real = apimart.host("real.png")
    apimart.complete(apimart_id, [real], deliver=False)
    answer = httpx.post(url, content=forged_success(apimart, None, forged))
    assert answer.status_code == 200, answer.text
    done = receiver.wait(task_id)
    assert done["status"] == "succeeded" and done["images"][0]["source_url"] == real, done
    assert apimart.files["forged.png"].fetches == 0


def wait_for_event(receiver: Receiver, task_id: str, text: str, seconds: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + seconds
    while True:
        events = receiver.events(task_id)
        if any(text in e["summary"] for e in events) or time.monotonic() > deadline:
            assert any(text in e["summary"] for e in events), events
            return events
        time.sleep(0.05)


def legacy_token(receiver: Receiver, task_id: str) -> str:
    """A callback token as issued before tokens named their provider: the task alone."""
    signer = Signer(receiver.settings.secret_key, salt="receiver.callback", digest_method=hashlib.sha256)
    return signer.sign(task_id).decode()


def test_tokens_issued_before_the_upgrade_still_finish_their_task(
    receiver: Receiver, apimart: ApimartFake
) -> None:
    task_id, apimart_id, _ = at_apimart(receiver, apimart)
    real = apimart.host("real.png")
    apimart.complete(apimart_id, [real], deliver=False)
    url = f"{receiver.url}/callbacks/apimart/{legacy_token(receiver, task_id)}/callback"
    answer = httpx.post(url, content=json.dumps(apimart.callback_body(apimart_id)).encode())
    assert answer.status_code == 200, answer.text
    done = receiver.wait(task_id)
    assert done["status"] == "succeeded" and done["images"][0]["source_url"] == real


def test_an_old_token_is_refused_once_the_task_has_moved(
    receiver: Receiver, kie: KieFake, apimart: ApimartFake
) -> None:
    task_id, _, apimart_id = moved_to_apimart(receiver, kie, apimart)
    token = legacy_token(receiver, task_id)
    forged = kie.host("forged.png")
    answer = httpx.post(
        f"{receiver.url}/callbacks/apimart/{token}/callback",
        content=forged_success(apimart, apimart_id, forged),
    )
    assert answer.status_code == 401, answer.text
    late = httpx.post(
        f"{receiver.url}/callbacks/kie/{token}", content=json.dumps(kie.success_body("k", forged)).encode()
    )
    assert late.status_code == 200, late.text
    unchanged(receiver, task_id)
    assert kie.files["forged.png"].fetches == 0


def test_duplicate_callbacks_are_recorded_once(receiver: Receiver, apimart: ApimartFake) -> None:
    task_id, apimart_id, url = at_apimart(receiver, apimart)
    processing = json.dumps({"id": apimart_id, "status": "processing", "progress": 40}).encode()
    post_each(url, [processing] * 300)
    real = apimart.host("real.png")
    assert apimart.complete(apimart_id, [real]) is not None
    done = receiver.wait(task_id)  # callbacks apply in the order they came: every duplicate is in
    assert done["status"] == "succeeded" and done["images"][0]["source_url"] == real
    events = receiver.events(task_id)
    assert len([e for e in events if e["summary"] == "status processing"]) == 1, events
    assert len(events) < 12, events
    # A duplicate of the success changes nothing and adds nothing either, however often it comes.
    for _ in range(20):
        assert apimart.send(apimart_id).status_code == 200
    # One more callback with news of its own, after them: once it shows, every duplicate is applied.
    marker = json.dumps({"id": apimart_id, "status": "archived"}).encode()
    assert httpx.post(url, content=marker).status_code == 200
    settled = wait_for_event(receiver, task_id, "status archived")
    assert len([e for e in settled if "duplicate or late" in e["summary"]]) == 1, settled
    assert len(settled) == len(events) + 2, settled
    assert apimart.files["real.png"].fetches == 1


def test_a_flood_of_different_bodies_that_change_nothing_is_bounded(
    receiver: Receiver, apimart: ApimartFake
) -> None:
    task_id, apimart_id, url = at_apimart(receiver, apimart)
    # Each body says something else, none of it news.
    post_each(url, [json.dumps({"id": apimart_id, "status": f"processing-{n}"}).encode() for n in range(80)])
    real = apimart.host("real.png")
    assert apimart.complete(apimart_id, [real]) is not None
    done = receiver.wait(task_id)
    assert done["status"] == "succeeded" and done["images"][0]["source_url"] == real
    events = receiver.events(task_id)
    flood = [e for e in events if e["summary"].startswith("status processing-")]
    assert 1 <= len(flood) <= 50, len(flood)
    assert any(e["change"] for e in events if e["kind"] == "callback")  # the success still counted
