"""Fallback between providers, over real HTTP against the fakes: a refusal that is not the request's
fault (no credits, bad key, maintenance, unavailable after retries) or a generation failure moves the
task to the next provider; moderation, request errors and a submit that may have run end it; a late
callback from a provider the task left changes nothing; the app is notified once, at the end."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.fakes.apicore import GENERATIONS
from tests.fakes.apicore import ApicoreFake
from tests.fakes.fal import FalFake
from tests.fakes.kie import GENERATE
from tests.fakes.kie import KieFake
from tests.harness import Receiver
from tests.test_notify import SHORT
from tests.test_notify import AppHook
from tests.test_notify import hook  # noqa: F401  (the fixture)
from tests.test_notify import quiet


@pytest.fixture
def chain(start_fake: Callable[..., Any]) -> tuple[KieFake, FalFake, ApicoreFake]:
    return start_fake(KieFake), start_fake(FalFake), start_fake(ApicoreFake, synchronous=True)


@pytest.fixture
def receiver(
    chain: tuple[KieFake, FalFake, ApicoreFake], start_receiver: Callable[..., Receiver]
) -> Receiver:
    env: dict[str, Any] = {**SHORT, "RECEIVER_SUBMIT_RETRIES": 1}
    for fake in chain:
        env.update(fake.receiver_env())
    return start_receiver(**env)


def test_no_credits_moves_the_task_and_the_app_hears_once(
    chain: tuple[KieFake, FalFake, ApicoreFake],
    receiver: Receiver,
    hook: Callable[..., AppHook],  # noqa: F811
) -> None:
    kie, fal, _ = chain
    app = hook()
    kie.script(GENERATE, 200, {"code": 402, "msg": "Insufficient credits"})
    task = receiver.submit(
        provider="kie", prompt="p", model="flux-kontext-max", fallback=["fal"], notify_url=app.url
    )
    assert task["fallback"] == ["fal"] and task["attempts"] == []
    request_id = fal.provider_task_id()
    moved = receiver.alice.get(f"/v1/tasks/{task['id']}").json()
    assert (moved["provider"], moved["model"], moved["fallback"]) == ("fal", "flux-kontext-max", [])
    assert fal.calls("/fal-ai/flux-pro/kontext/max/text-to-image")  # the same request, fal's spelling
    fal.complete(request_id, [fal.host("f.png")])
    done = receiver.wait(str(task["id"]))
    assert done["status"] == "succeeded" and done["provider"] == "fal"
    [attempt] = done["attempts"]
    assert attempt["provider"] == "kie" and attempt["model"] == "flux-kontext-max"
    assert attempt["error"] == {
        "code": "provider_rejected",
        "message": "Insufficient credits",
        "provider_code": "402",
    }
    hops = [e for e in receiver.events(str(task["id"])) if e["kind"] == "fallback"]
    assert len(hops) == 1 and "moved from kie to fal (no_credits)" in hops[0]["summary"]
    metrics = receiver.anon.get("/metrics").text
    assert (
        'receiver_fallbacks_total{from_provider="kie",reason="no_credits",to_provider="fal"} 1.0' in metrics
    )
    [delivery] = app.wait_for(1)
    assert delivery.verify()["type"] == "task.succeeded"
    quiet(app, 1)  # the hop itself notified nobody


def test_generation_failed_moves_on_and_a_late_callback_changes_nothing(
    chain: tuple[KieFake, FalFake, ApicoreFake], receiver: Receiver
) -> None:
    kie, fal, apicore = chain
    task = receiver.submit(provider="fal", prompt="p", fallback=["kie", "apicore"])
    request_id = fal.provider_task_id()
    receiver.wait_status(str(task["id"]), "submitted")
    failed = fal.fail(request_id, moderated=False, message="CUDA out of memory")
    assert failed is not None and failed.status_code == 200
    kie_id = kie.provider_task_id()
    # kie says no too (a generation failure), so the task goes on to apicore, which answers at once.
    receiver.wait_status(str(task["id"]), "submitted")
    failed = kie.fail(kie_id, moderated=False, message="Image generation task failed")
    assert failed is not None and failed.status_code == 200
    done = receiver.wait(str(task["id"]))
    assert done["status"] == "succeeded" and done["provider"] == "apicore", done
    assert [a["provider"] for a in done["attempts"]] == ["fal", "kie"]
    assert [a["error"]["code"] for a in done["attempts"]] == ["generation_failed", "generation_failed"]
    assert done["attempts"][0]["provider_task_id"] == request_id
    assert len(apicore.calls(GENERATIONS)) == 1
    # fal delivers its (duplicate) failure late, and then a success: both are recorded, neither counts.
    failed = fal.fail(request_id, moderated=False, message="again")
    assert failed is not None and failed.status_code == 200
    assert fal.complete(request_id, [fal.host("late.png")]) is not None
    after = receiver.alice.get(f"/v1/tasks/{task['id']}").json()
    assert (after["status"], after["provider"], len(after["images"])) == ("succeeded", "apicore", 1)
    late = [e for e in receiver.events(str(task["id"])) if "late callback from fal" in e["summary"]]
    assert sum(e["repeats"] for e in late) == 2 and not any(e["change"] for e in late)  # in a row: one
    assert fal.files["late.png"].fetches == 0


@pytest.mark.parametrize(
    ("moderated", "code"),
    [(True, "content_moderated"), (None, "provider_rejected")],
)
def test_moderation_and_request_errors_end_the_task(
    chain: tuple[KieFake, FalFake, ApicoreFake], receiver: Receiver, moderated: bool | None, code: str
) -> None:
    kie, fal, _ = chain
    if moderated is None:
        kie.script(GENERATE, 200, {"code": 422, "msg": "prompt is invalid"})
    task = receiver.submit(provider="kie", prompt="p", fallback=["fal"])
    if moderated:
        kie_id = kie.provider_task_id()
        receiver.wait_status(str(task["id"]), "submitted")
        kie.fail(kie_id, moderated=True, message="flagged")
    done = receiver.wait(str(task["id"]))
    assert done["error"]["code"] == code
    assert (done["provider"], done["attempts"], done["fallback"]) == ("kie", [], ["fal"])
    assert fal.order == []  # fal never saw it


def test_unavailable_after_retries_moves_on_but_a_submit_that_may_have_run_does_not(
    chain: tuple[KieFake, FalFake, ApicoreFake], receiver: Receiver
) -> None:
    kie, _, apicore = chain
    for _ in range(2):  # RECEIVER_SUBMIT_RETRIES=1: two tries, then provider_unavailable
        kie.script(GENERATE, 503, b"down")
    task = receiver.submit(provider="kie", prompt="p", fallback=["apicore"])
    done = receiver.wait(str(task["id"]))
    assert done["status"] == "succeeded" and done["provider"] == "apicore"
    assert done["attempts"][0]["error"]["code"] == "provider_unavailable"

    apicore.script(GENERATIONS, 500, {"detail": "internal error"})  # apicore may have run it
    task = receiver.submit(provider="apicore", prompt="p", fallback=["kie"])
    done = receiver.wait(str(task["id"]))
    assert done["error"]["provider_code"] == "outcome_unknown"
    assert done["provider"] == "apicore" and done["attempts"] == []
    assert len(kie.calls(GENERATE)) == 2  # only the two tries of the first task


def test_the_chain_is_validated_up_front(
    chain: tuple[KieFake, FalFake, ApicoreFake], receiver: Receiver
) -> None:
    image = chain[0].host("in.png")
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"fallback": ["nope"]}, "fallback[0]", "unknown provider"),
        ({"fallback": ["fal", "apimart"]}, "fallback[1]", "set APIMART_API_KEY"),
        ({"fallback": ["fal", "fal"]}, "fallback[1]", "already in the chain"),
        ({"fallback": ["kie"]}, "fallback[0]", "already in the chain"),
        ({"fallback": ["apicore"], "model": "flux-2-pro"}, "model", "kie sells"),
        ({"provider": "fal", "fallback": ["apicore"], "model": "flux-2-pro"}, "fallback[0]", "apicore sells"),
        ({"provider": "fal", "fallback": ["kie"], "seed": 7}, "fallback[0]", "seed: kie does not take"),
        (
            {"provider": "fal", "fallback": ["kie"], "images": [image, image], "model": "flux-2-pro"},
            "fallback[0]",
            "kie",
        ),
        ({"fallback": "fal"}, "fallback", "a list"),
        ({"fallback": ["fal", "apicore", "sandbox", "kie-market", "apimart"]}, "fallback", "at most 4"),
    ]
    for extra, field, says in cases:
        body = {"provider": "kie", "prompt": "a fine prompt", **extra}
        answer = receiver.alice.post("/v1/tasks", json=body)
        assert answer.status_code == 422, (extra, answer.text)
        fields = answer.json()["error"]["fields"]
        assert says in fields.get(field, ""), (extra, fields)
    assert chain[0].calls(GENERATE) == []


def test_a_failure_before_the_submit_answer_moves_on_and_the_late_answer_is_ignored(
    chain: tuple[KieFake, FalFake, ApicoreFake], start_receiver: Callable[..., Receiver]
) -> None:
    kie, fal, _ = chain
    # A long timeout: the move must not wait for kie's held submit to give up.
    receiver = start_receiver(**kie.receiver_env(), **fal.receiver_env(), RECEIVER_HTTP_TIMEOUT=60)
    kie.hold = threading.Event()  # kie takes the task but its answer to the submit is held back
    try:
        task = receiver.submit(provider="kie", prompt="p", fallback=["fal"])
        kie.wait_for(lambda: bool(kie.callback_urls))
        kie_id = kie.last_task_id()
        # kie's failure callback arrives before its submit answer (CONTRACT: it still counts).
        failed = kie.send(kie_id, kie.failure_body(kie_id, 501, "Image generation task failed"))
        assert failed.status_code == 200
        request_id = fal.provider_task_id()  # the task moved on without waiting for kie's answer
    finally:
        kie.hold.set()
    fal.complete(request_id, [fal.host("after.png")])
    done = receiver.wait(str(task["id"]))
    assert (done["status"], done["provider"], done["provider_task_id"]) == ("succeeded", "fal", request_id)
    assert [a["provider"] for a in done["attempts"]] == ["kie"]
    summaries = [e["summary"] for e in receiver.events(str(task["id"]))]
    assert any("kie's submit answer came after the task moved to fal" in s for s in summaries), summaries
    assert len(fal.order) == 1 and len(kie.calls(GENERATE)) == 1
