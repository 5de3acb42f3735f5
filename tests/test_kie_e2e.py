"""kie Flux Kontext end to end: the receiver served for real, talking to the kie fake over HTTP."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import database_settings
from tests.fakes.common import png
from tests.fakes.common import post_callback
from tests.fakes.kie import GENERATE
from tests.fakes.kie import KEY
from tests.fakes.kie import RECORD_INFO
from tests.fakes.kie import KieFake
from tests.harness import Receiver


@pytest.fixture(params=["sqlite", "postgres"])
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Every test here runs on both backends."""
    return database_settings(request, request.param)


def submitted(receiver: Receiver, kie: KieFake, **body: Any) -> tuple[dict[str, Any], str]:
    task = receiver.submit(provider="kie", prompt="a cat in a hat", **body)
    receiver.wait_status(str(task["id"]), "submitted")
    return task, kie.last_task_id()


def test_text_to_image_succeeds_and_the_image_is_served(kie: KieFake, kie_receiver: Receiver) -> None:
    image = png(80, 40)
    url = kie.host("result.png", image)
    task, kie_id = submitted(
        kie_receiver,
        kie,
        aspect_ratio="16:9",
        output_format="png",
        safety_tolerance=4,
        prompt_upsampling=True,
        options={"enableTranslation": False},
    )
    sent = kie.calls(GENERATE)[0]
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    body = sent.json()
    assert body["prompt"] == "a cat in a hat"
    assert body["model"] == "flux-kontext-pro"
    assert body["aspectRatio"] == "16:9"
    assert body["outputFormat"] == "png"
    assert body["safetyTolerance"] == 4
    assert body["promptUpsampling"] is True
    assert body["enableTranslation"] is False
    assert "inputImage" not in body
    assert body["callBackUrl"].startswith(f"{kie_receiver.url}/callbacks/kie/")

    answer = kie.succeed(kie_id, url)
    assert answer.status_code == 200
    assert answer.json() == {"code": 200, "msg": "success"}
    done = kie_receiver.wait(str(task["id"]))
    assert done["status"] == "succeeded", done
    assert done["provider_task_id"] == kie_id
    assert done["completed_at"] is not None
    [stored] = done["images"]
    assert stored["sha256"] == hashlib.sha256(image).hexdigest()
    assert (stored["width"], stored["height"], stored["size"]) == (80, 40, len(image))
    assert stored["content_type"] == "image/png"
    assert stored["source_url"] == url
    # The signed link works without a key; the bytes are the provider's.
    fetched = httpx.get(stored["url"])
    assert fetched.status_code == 200
    assert fetched.content == image
    assert fetched.headers["etag"] == f'"{stored["sha256"]}"'
    assert fetched.headers["content-length"] == str(len(image))


def test_editing_with_an_image_url_and_with_a_data_uri(kie: KieFake, kie_receiver: Receiver) -> None:
    source = kie.host("input.png")
    task, kie_id = submitted(kie_receiver, kie, images=[source], model="flux-kontext-max")
    body = kie.calls(GENERATE)[-1].json()
    assert body["inputImage"] == source
    assert body["model"] == "flux-kontext-max"
    kie.succeed(kie_id, kie.host("edited.png"))
    assert kie_receiver.wait(str(task["id"]))["status"] == "succeeded"

    picture = png(20, 20, shade=10)
    data_uri = "data:image/png;base64," + base64.b64encode(picture).decode()
    task, kie_id = submitted(kie_receiver, kie, images=[data_uri])
    link = kie.calls(GENERATE)[-1].json()["inputImage"]
    assert link.startswith(f"{kie_receiver.url}/uploads/")
    assert httpx.get(link).content == picture  # kie can fetch what we handed it
    assert httpx.get(link.split("?")[0]).status_code == 401  # but not without the signature
    kie.succeed(kie_id, kie.host("edited2.png"))
    assert kie_receiver.wait(str(task["id"]))["status"] == "succeeded"


def test_failure_callbacks_map_to_error_codes(kie: KieFake, kie_receiver: Receiver) -> None:
    cases = [
        (400, "Your prompt was flagged by Website as violating content policies.", "content_moderated"),
        (500, "Internal Error, Please try again later", "generation_failed"),
        (501, "Image generation task failed", "generation_failed"),
    ]
    for code, message, expected in cases:
        task, kie_id = submitted(kie_receiver, kie)
        answer = kie.send(kie_id, kie.failure_body(kie_id, code, message))
        assert answer.status_code == 200
        done = kie_receiver.wait(str(task["id"]))
        assert done["status"] == "failed"
        assert done["error"] == {"code": expected, "message": message, "provider_code": str(code)}
        assert done["completed_at"] is not None


def test_submit_rejections_fail_at_once(kie: KieFake, kie_receiver: Receiver) -> None:
    kie.script(GENERATE, 200, {"code": 402, "msg": "Credits insufficient"})
    task = kie_receiver.submit(provider="kie", prompt="p")
    done = kie_receiver.wait(str(task["id"]))
    assert done["error"] == {
        "code": "provider_rejected",
        "message": "Credits insufficient",
        "provider_code": "402",
    }
    kie.script(GENERATE, 401, {"code": 401, "msg": "You do not have access permissions"})
    done = kie_receiver.wait(str(kie_receiver.submit(provider="kie", prompt="p")["id"]))
    assert done["error"]["code"] == "provider_rejected"
    assert done["error"]["provider_code"] == "401"
    assert len(kie.calls(GENERATE)) == 2  # no retries for a refusal


def test_submit_retries_transient_failures_then_gives_up(
    kie: KieFake, start_receiver: Callable[..., Receiver]
) -> None:
    receiver = start_receiver(KIE_API_KEY=KEY, KIE_BASE_URL=kie.url, RECEIVER_SUBMIT_RETRIES=2)
    kie.script(GENERATE, 503, b"upstream down")
    kie.script(GENERATE, 200, {"code": 429, "msg": "rate limited"})
    task = receiver.submit(provider="kie", prompt="p")
    assert receiver.wait_status(str(task["id"]), "submitted")["status"] == "submitted"
    assert len(kie.calls(GENERATE)) == 3

    for _ in range(3):
        kie.script(GENERATE, 500, b"boom")
    done = receiver.wait(str(receiver.submit(provider="kie", prompt="p")["id"]))
    assert done["error"]["code"] == "provider_unavailable"
    assert "3 tries" in done["error"]["message"]
    assert len(kie.calls(GENERATE)) == 6


def test_five_concurrent_duplicate_callbacks_download_once(kie: KieFake, kie_receiver: Receiver) -> None:
    url = kie.host("dup.png")
    task, kie_id = submitted(kie_receiver, kie)
    body = kie.success_body(kie_id, url)
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: kie.send(kie_id, body), range(5)))
    assert [a.status_code for a in answers] == [200] * 5
    done = kie_receiver.wait(str(task["id"]))
    assert done["status"] == "succeeded"
    kie.send(kie_id, body)  # and once more, late
    # Then news of its own, applied after the late one (callbacks apply in the order they came): once
    # its event shows, every duplicate is in (on a busy machine that takes a while).
    kie.send(kie_id, kie.failure_body(kie_id, 501, "late marker"))
    deadline = time.monotonic() + 10
    events = kie_receiver.events(str(task["id"]))
    while not any("late marker" in e["summary"] for e in events):
        assert time.monotonic() < deadline, events
        time.sleep(0.02)
        events = kie_receiver.events(str(task["id"]))
    callbacks = [e for e in events if e["kind"] == "callback"]
    assert kie.files["dup.png"].fetches == 1
    assert sum(1 for e in callbacks if e["change"]) == 1
    # A duplicate that changes nothing is recorded once, not once per delivery.
    assert len(callbacks) <= 4, callbacks


def test_a_callback_before_the_submit_call_returns_still_counts(kie: KieFake, kie_receiver: Receiver) -> None:
    kie.hold = threading.Event()
    task = kie_receiver.submit(provider="kie", prompt="quick")
    deadline = time.monotonic() + 5
    while not kie.callback_urls and time.monotonic() < deadline:
        time.sleep(0.01)
    kie_id = kie.last_task_id()
    assert kie_receiver.alice.get(f"/v1/tasks/{task['id']}").json()["status"] == "queued"
    assert kie.send(kie_id, kie.success_body(kie_id, kie.host("early.png"))).status_code == 200
    kie.hold.set()
    done = kie_receiver.wait(str(task["id"]))
    assert done["status"] == "succeeded"
    assert done["provider_task_id"] == kie_id


def test_a_lost_callback_is_recovered_by_reconcile(
    kie: KieFake, start_receiver: Callable[..., Receiver]
) -> None:
    receiver = start_receiver(KIE_API_KEY=KEY, KIE_BASE_URL=kie.url, RECEIVER_RECONCILE_AFTER=0.2)
    task = receiver.submit(provider="kie", prompt="lost")
    receiver.wait_status(str(task["id"]), "submitted")
    kie_id = kie.last_task_id()
    deadline = time.monotonic() + 5
    while not kie.calls(RECORD_INFO) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert kie.calls(RECORD_INFO)[0].query == {"taskId": kie_id}
    url = kie.host("late.png")
    kie.records[kie_id].update(successFlag=1, response={"originImageUrl": url, "resultImageUrl": url})
    done = receiver.wait(str(task["id"]))
    assert done["status"] == "succeeded"
    polls = [e for e in receiver.events(str(task["id"])) if e["kind"] == "poll"]
    assert polls[0]["summary"].startswith("successFlag 0")
    assert polls[-1]["change"] == "submitted→downloading"


def test_reconcile_reads_every_success_flag(kie: KieFake, start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver(KIE_API_KEY=KEY, KIE_BASE_URL=kie.url, RECEIVER_RECONCILE_AFTER=0.1)
    expectations = {2: "provider_rejected", 3: "generation_failed"}
    for flag, code in expectations.items():
        task = receiver.submit(provider="kie", prompt="x")
        receiver.wait_status(str(task["id"]), "submitted")
        kie.records[kie.last_task_id()].update(successFlag=flag, errorCode=422, errorMessage=f"flag {flag}")
        done = receiver.wait(str(task["id"]))
        assert done["error"] == {"code": code, "message": f"flag {flag}", "provider_code": "422"}


def test_the_deadline_fails_a_silent_task(kie: KieFake, start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver(KIE_API_KEY=KEY, KIE_BASE_URL=kie.url, RECEIVER_TASK_DEADLINE=1)
    task = receiver.submit(provider="kie", prompt="never")
    done = receiver.wait(str(task["id"]), seconds=10)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "timed_out"
    kie_id = kie.last_task_id()
    # A callback after the deadline changes nothing.
    assert kie.send(kie_id, kie.success_body(kie_id, kie.host("x.png"))).status_code == 200
    assert receiver.alice.get(f"/v1/tasks/{task['id']}").json()["status"] == "failed"


def test_bad_tokens_are_refused(kie: KieFake, kie_receiver: Receiver) -> None:
    task, kie_id = submitted(kie_receiver, kie)
    good = kie.callback_urls[kie_id]
    body = kie.success_body(kie_id, kie.host("t.png"))
    tampered = good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB")
    # Another task id under this task's signature (never the same id: a random id may end in ffff).
    renamed = task["id"][:-4] + ("ffff" if not task["id"].endswith("ffff") else "0000")
    other = kie_receiver.callback_url("kie", "tsk_" + "0" * 24)
    for url in (
        tampered,
        good.replace(task["id"], renamed),
        f"{kie_receiver.url}/callbacks/kie/nonsense",
        good.replace("/kie/", "/sandbox/"),
    ):
        answer = post_callback(url, body)
        assert answer.status_code == 401, url
        assert answer.json()["error"]["code"] == "bad_token"
    assert post_callback(other, body).status_code == 404  # a genuine token for a task we do not have
    assert kie_receiver.alice.get(f"/v1/tasks/{task['id']}").json()["status"] == "submitted"


def test_oversized_and_malformed_bodies(kie: KieFake, kie_receiver: Receiver) -> None:
    task, kie_id = submitted(kie_receiver, kie)
    url = kie.callback_urls[kie_id]
    big = b"{" + b" " * (1024 * 1024 + 10) + b"}"
    assert httpx.post(url, content=big).status_code == 413

    def chunks() -> object:
        for _ in range(20):
            yield b" " * 65536

    answer = httpx.post(url, content=chunks())  # type: ignore[arg-type]
    assert answer.status_code == 413
    assert post_callback(url, b"this is not json").status_code == 400
    assert post_callback(url, {"hello": "world"}).status_code == 400
    assert kie_receiver.alice.get(f"/v1/tasks/{task['id']}").json()["status"] == "submitted"


def test_callback_for_another_provider_task_is_refused(kie: KieFake, kie_receiver: Receiver) -> None:
    task, kie_id = submitted(kie_receiver, kie)
    answer = kie.send(kie_id, kie.success_body("task99999", kie.host("w.png")))
    assert answer.status_code == 400
    assert kie_receiver.alice.get(f"/v1/tasks/{task['id']}").json()["status"] == "submitted"


def test_hmac_signatures_when_a_key_is_set(start_receiver: Callable[..., Receiver]) -> None:
    kie = KieFake().start()
    try:
        receiver = start_receiver(
            KIE_API_KEY=KEY, KIE_BASE_URL=kie.url, KIE_WEBHOOK_HMAC_KEY="kie-hmac-secret"
        )
        task, kie_id = submitted(receiver, kie)
        body = kie.success_body(kie_id, kie.host("h.png"))
        refusals = {
            "missing": {},
            "wrong key": kie.signature_headers(kie_id, key="another-key"),
            "stale": kie.signature_headers(kie_id, timestamp=int(time.time()) - 310),
            "future": kie.signature_headers(kie_id, timestamp=int(time.time()) + 310),
            "other task": kie.signature_headers("task77777"),
            "garbage": {"X-Webhook-Timestamp": "soon", "X-Webhook-Signature": "xyz"},
        }
        for name, headers in refusals.items():
            answer = kie.send(kie_id, body, headers=headers)
            assert answer.status_code == 401, name
            assert answer.json()["error"]["code"] == "bad_signature"
        assert receiver.alice.get(f"/v1/tasks/{task['id']}").json()["status"] == "submitted"
        unverified = [e for e in receiver.events(str(task["id"])) if not e["verified"]]
        assert sum(e["repeats"] for e in unverified) == len(refusals)  # refusals in a row: one event
        # The task id may come as data.task_id (the verification page's spelling).
        spelled = {
            "code": 200,
            "msg": "ok",
            "data": {"task_id": kie_id, "info": {"resultImageUrl": kie.host("h2.png")}},
        }
        assert kie.send(kie_id, spelled).status_code == 200
        assert receiver.wait(str(task["id"]))["status"] == "succeeded"
    finally:
        kie.stop()
