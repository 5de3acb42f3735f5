"""apimart: the translator against the exact payloads of providers.md §3, then end to end against the
apimart fake (tests/fakes/apimart.py) with the receiver served for real."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from receiver.config import ProviderSettings
from receiver.models import MalformedCallback
from receiver.models import ProviderRejected
from receiver.models import ProviderUnavailable
from receiver.models import TaskRequest
from receiver.models import TaskSpec
from receiver.providers import REGISTRY
from receiver.providers.apimart import Apimart
from receiver.providers.base import Context
from tests.fakes.apimart import GENERATIONS
from tests.fakes.apimart import KEY
from tests.fakes.apimart import TASKS
from tests.fakes.apimart import ApimartFake
from tests.fakes.apimart import callback_target
from tests.fakes.apimart import error_envelope
from tests.fakes.common import png
from tests.harness import Receiver

BASE = "https://api.apimart.ai"
CALLBACK = "https://receiver.example/callbacks/apimart/tok.en"
PROVIDER = Apimart()

# providers.md §3.2
SUBMITTED = {"code": 200, "data": [{"status": "submitted", "task_id": "task_01KF..."}]}
# providers.md §3.3, the webhook page's (bare) example
COMPLETED_CALLBACK = {
    "id": "task_01KV7FXR8BEYS1BWHJCT3JMCJ5",
    "status": "completed",
    "progress": 100,
    "created": 1781589029,
    "completed": 1781589058,
    "actual_time": 29,
    "cost": 0.006,
    "credits_cost": 0.06,
    "result": {"images": [{"url": ["https://.../result.png"], "expires_at": 1781675458}]},
}
# providers.md §3.3, CN page failure
CN_FAILURE = {
    "id": "task_xxx",
    "status": "failed",
    "progress": 100,
    "created": 1781589029,
    "completed": 1781589058,
    "error": {"message": "失败原因...", "code": ""},
}
# providers.md §3.4
STATUS_ANSWER = {
    "code": 200,
    "data": {
        "id": "task_01K8SGYNNNVBQTXNR4MM964S7K",
        "status": "completed",
        "progress": 100,
        "cost": 0.006,
        "credits_cost": 0.06,
        "result": {"images": [{"url": ["https://.../x.png"], "expires_at": 1761724535}]},
        "created": 1761638135,
        "completed": 1761638150,
        "estimated_time": 20,
        "actual_time": 15,
    },
}
# providers.md §3.5, the real probe
INVALID_KEY = {
    "error": {
        "code": "",
        "message": "invalid API key (request id: ...)",
        "param": "",
        "type": "apimart_error",
    }
}


def context(callback_url: str = CALLBACK) -> Context:
    return Context(ProviderSettings(api_key="k-123", base_url=BASE), callback_url=callback_url)


def spec(
    images: tuple[str, ...] = (), provider_task_id: str | None = None, options: Any = None, **params: Any
) -> TaskSpec:
    return TaskSpec(
        id="tsk_1",
        model="flux-kontext-pro",
        prompt="a lighthouse",
        images=images,
        params=params,
        options=options or {},
        provider_task_id=provider_task_id,
        state={},
    )


def request(images: tuple[str, ...] = (), **params: Any) -> TaskRequest:
    return TaskRequest("apimart", "p", None, images, params, {}, None, {})


def answer(status: int, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Response(status, content=content, headers=headers)


def callback(body: Any) -> Any:
    return PROVIDER.parse_callback(json.dumps(body, ensure_ascii=False).encode())


# -- the translator ------------------------------------------------------------------------------


def test_it_is_registered_under_its_name_and_key() -> None:
    assert isinstance(REGISTRY["apimart"], Apimart)
    assert PROVIDER.key_variable == "APIMART_API_KEY"
    assert PROVIDER.default_model == "flux-kontext-pro"
    assert PROVIDER.models == ("flux-kontext-pro", "flux-kontext-max", "flux-2-pro", "flux-2-flex")
    assert not PROVIDER.inline_images  # data URIs go over as signed links


def test_submit_spells_every_field_and_sends_our_callback_url_as_the_webhook() -> None:
    built = PROVIDER.build_submit(
        spec(
            images=("https://in.example/a.png",),
            aspect_ratio="21:9",
            output_format="jpeg",
            safety_tolerance=5,
            prompt_upsampling=True,
            options={"webhook": "https://evil.example", "model": "other", "language": "zh", "extra": 1},
        ),
        context(),
    )
    assert built.method == "POST"
    assert str(built.url) == f"{BASE}/v1/images/generations"
    assert built.headers["authorization"] == "Bearer k-123"
    assert json.loads(built.content) == {
        "language": "zh",
        "extra": 1,
        "model": "flux-kontext-pro",
        "prompt": "a lighthouse",
        "image_urls": ["https://in.example/a.png"],
        "size": "21:9",
        "response_format": "jpg",
        "safety_tolerance": 5,
        "prompt_upsampling": True,
        "webhook": CALLBACK,
    }


def test_submit_leaves_out_what_was_not_asked() -> None:
    body = json.loads(PROVIDER.build_submit(spec(output_format="png"), context()).content)
    assert body == {
        "language": "en",
        "model": "flux-kontext-pro",
        "prompt": "a lighthouse",
        "response_format": "png",
        "webhook": CALLBACK,
    }
    with_image = spec(images=("https://in.example/a.png",), aspect_ratio="match_input_image")
    body = json.loads(PROVIDER.build_submit(with_image, context()).content)
    assert body["size"] == "match_input_image"


def test_the_submit_answer_gives_the_task_id() -> None:
    assert PROVIDER.parse_submit(answer(200, SUBMITTED)).provider_task_id == "task_01KF..."
    with pytest.raises(ProviderRejected, match="no task_id"):
        PROVIDER.parse_submit(answer(200, {"code": 200, "data": []}))
    with pytest.raises(ProviderRejected, match="invalid API key"):
        PROVIDER.parse_submit(answer(200, INVALID_KEY))  # an error envelope even under a 200


@pytest.mark.parametrize("status", [400, 401, 402, 403])
def test_submit_refusals_carry_apimart_message(status: int) -> None:
    with pytest.raises(ProviderRejected) as refused:
        PROVIDER.parse_submit(answer(status, INVALID_KEY))
    assert refused.value.message == "invalid API key (request id: ...)"
    assert refused.value.provider_code == str(status)  # its error.code is empty
    with pytest.raises(ProviderRejected) as refused:
        PROVIDER.parse_submit(answer(status, error_envelope("insufficient balance", "insufficient_quota")))
    assert (refused.value.message, refused.value.provider_code) == (
        "insufficient balance",
        "insufficient_quota",
    )


def test_submit_retries_rate_limits_and_server_faults() -> None:
    with pytest.raises(ProviderUnavailable) as busy:
        PROVIDER.parse_submit(answer(429, error_envelope("rate limited"), {"Retry-After": "7"}))
    assert busy.value.retry_after == 7.0
    assert "rate limited" in busy.value.message
    for status, body in ((500, error_envelope("boom")), (502, b"<html>bad gateway</html>")):
        with pytest.raises(ProviderUnavailable):
            PROVIDER.parse_submit(answer(status, body))
    with pytest.raises(ProviderUnavailable):
        PROVIDER.parse_submit(answer(200, b"not json"))


def test_the_bare_completed_callback() -> None:
    outcome = callback(COMPLETED_CALLBACK)
    assert outcome.state == "succeeded"
    assert outcome.provider_task_id == "task_01KV7FXR8BEYS1BWHJCT3JMCJ5"
    assert outcome.image_urls == ("https://.../result.png",)


def test_the_wrapped_completed_callback() -> None:
    outcome = callback({"code": 200, "data": COMPLETED_CALLBACK})
    assert outcome.state == "succeeded"
    assert outcome.provider_task_id == "task_01KV7FXR8BEYS1BWHJCT3JMCJ5"
    assert outcome.image_urls == ("https://.../result.png",)


def test_every_url_of_every_image_in_order() -> None:
    images = [{"url": ["https://a/1.png", "https://a/2.png"]}, {"url": ["https://a/3.png"]}]
    outcome = callback({**COMPLETED_CALLBACK, "result": {"images": images}})
    assert outcome.image_urls == ("https://a/1.png", "https://a/2.png", "https://a/3.png")
    # Completed with no link at all is a failure, not a success with nothing in it.
    empty = callback({**COMPLETED_CALLBACK, "result": {"images": []}})
    assert empty.state == "failed" and empty.error is not None
    assert empty.error.code == "generation_failed"


def test_the_cn_failure_callback() -> None:
    outcome = callback(CN_FAILURE)
    assert outcome.state == "failed"
    assert outcome.provider_task_id == "task_xxx"
    assert outcome.error is not None
    assert outcome.error.as_json() == {
        "code": "generation_failed",
        "message": "失败原因...",
        "provider_code": None,
    }


def test_the_en_failure_variant() -> None:
    error = {"message": "Image generation failed", "type": "task_failed", "param": "", "code": "task_failed"}
    outcome = callback({**CN_FAILURE, "error": error})
    assert outcome.error is not None
    assert outcome.error.as_json() == {
        "code": "generation_failed",
        "message": "Image generation failed",
        "provider_code": "task_failed",
    }


@pytest.mark.parametrize(
    "error",
    [
        {"message": "Content Moderated", "code": "", "type": "task_failed"},
        {"message": "no", "code": "content_policy_violation", "type": "task_failed"},
        {"message": "Your prompt was flagged as violating our content policy", "code": ""},
        {"message": "内容审核未通过", "code": ""},
    ],
)
def test_failures_that_say_moderation_are_content_moderated(error: dict[str, str]) -> None:
    outcome = callback({**CN_FAILURE, "error": error})
    assert outcome.error is not None
    assert outcome.error.code == "content_moderated"
    assert outcome.error.message == error["message"]


def test_cancelled_is_a_failure_that_says_so() -> None:
    outcome = callback({"id": "task_c", "status": "cancelled"})
    assert outcome.state == "failed" and outcome.error is not None
    assert outcome.error.code == "generation_failed"
    assert "cancelled" in outcome.error.message


@pytest.mark.parametrize("status", ["pending", "processing", "submitted", "in_progress", "dreaming"])
def test_unfinished_states_are_pending(status: str) -> None:
    outcome = callback({"id": "task_p", "status": status, "progress": 30})
    assert (outcome.state, outcome.provider_task_id) == ("pending", "task_p")


def test_the_task_id_fallbacks() -> None:
    assert callback({"task_id": "task_t", "status": "pending"}).provider_task_id == "task_t"
    wrapped = {"code": 200, "data": {"task_id": "task_w", "status": "pending"}}
    assert callback(wrapped).provider_task_id == "task_w"


@pytest.mark.parametrize(
    "raw", [b"not json", b"[]", b'{"id": "task_x"}', b'{"code": 200, "data": {"id": "x"}}']
)
def test_unreadable_callbacks(raw: bytes) -> None:
    with pytest.raises(MalformedCallback):
        PROVIDER.parse_callback(raw)


def test_verify_callback_checks_nothing_because_apimart_signs_nothing() -> None:
    PROVIDER.verify_callback({}, json.dumps(COMPLETED_CALLBACK).encode(), spec(), context(), time.time())


def test_the_status_query() -> None:
    assert PROVIDER.build_status(spec(), context()) is None
    built = PROVIDER.build_status(spec(provider_task_id="task_01K8"), context())
    assert built is not None
    assert built.method == "GET"
    assert str(built.url) == f"{BASE}/v1/tasks/task_01K8?language=en"
    assert built.headers["authorization"] == "Bearer k-123"


def test_the_status_answer() -> None:
    outcome = PROVIDER.parse_status(answer(200, STATUS_ANSWER))
    assert outcome.state == "succeeded"
    assert outcome.provider_task_id == "task_01K8SGYNNNVBQTXNR4MM964S7K"
    assert outcome.image_urls == ("https://.../x.png",)
    failed = {"code": 200, "data": {**CN_FAILURE, "error": {"code": "x", "message": "m", "type": "t"}}}
    outcome = PROVIDER.parse_status(answer(200, failed))
    assert outcome.error is not None and outcome.error.as_json()["provider_code"] == "x"


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (404, error_envelope("task not found", "task_not_found")),
        (401, INVALID_KEY),
        (503, b"down"),
        (200, {"code": 500, "msg": "busy"}),
        (200, {"code": 200, "data": None}),
    ],
)
def test_status_answers_that_say_nothing_about_the_task_are_retried(status: int, body: Any) -> None:
    with pytest.raises(ProviderUnavailable):
        PROVIDER.parse_status(answer(status, body))


def test_validate() -> None:
    assert PROVIDER.validate(request(aspect_ratio="9:21", output_format="jpg", safety_tolerance=0)) == {}
    assert PROVIDER.validate(request(("https://x/a.png",), aspect_ratio="auto", safety_tolerance=6)) == {}
    errors = PROVIDER.validate(request(aspect_ratio="5:1", output_format="webp", safety_tolerance=7))
    assert set(errors) == {"aspect_ratio", "output_format", "safety_tolerance"}
    assert "0 to 6" in errors["safety_tolerance"]
    assert "16:9" in errors["aspect_ratio"]
    assert set(PROVIDER.validate(request(safety_tolerance=-1))) == {"safety_tolerance"}
    assert "input image" in PROVIDER.validate(request(aspect_ratio="match_input_image"))["aspect_ratio"]


def test_the_fake_normalises_a_trailing_slash_like_apimart() -> None:
    assert callback_target("https://r.example/cb/tok") == "https://r.example/cb/tok/callback"
    assert callback_target("https://r.example/cb/tok/") == "https://r.example/cb/tok/callback"


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture
def apimart(start_fake: Callable[..., ApimartFake]) -> ApimartFake:
    return start_fake(ApimartFake)


@pytest.fixture
def receiver(apimart: ApimartFake, start_receiver: Callable[..., Receiver]) -> Receiver:
    return start_receiver(**apimart.receiver_env())


def test_requests_apimart_cannot_honour_are_422(receiver: Receiver) -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"images": ["https://a.example/1.png", "https://a.example/2.png"]}, "images", "0 to 1"),
        ({"aspect_ratio": "5:1"}, "aspect_ratio", "apimart takes"),
        ({"safety_tolerance": 7}, "safety_tolerance", "0 to 6"),
        ({"seed": 7}, "seed", "does not take"),
        ({"num_images": 2}, "num_images", "does not take"),
        ({"model": "flux-2-max"}, "model", "flux-kontext-pro, flux-kontext-max, flux-2-pro, flux-2-flex"),
    ]
    for extra, field, says in cases:
        answer = receiver.alice.post("/v1/tasks", json={"provider": "apimart", "prompt": "p", **extra})
        assert answer.status_code == 422, (extra, answer.text)
        assert says in answer.json()["error"]["fields"][field], answer.text


def test_submit_and_a_bare_callback_at_webhook_slash_callback(
    apimart: ApimartFake, receiver: Receiver
) -> None:
    image = png(60, 30)
    task_id, apimart_id = receiver.submitted(
        apimart,
        model="flux-kontext-max",
        aspect_ratio="4:3",
        output_format="jpeg",
        safety_tolerance=3,
        prompt_upsampling=True,
        options={"webhook": "https://elsewhere.example", "language": "ko"},
    )
    sent = apimart.calls(GENERATIONS)[0]
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    body = sent.json()
    assert body["webhook"] == receiver.callback_url("apimart", task_id)  # unchanged: no /callback of ours
    assert {k: body[k] for k in ("model", "size", "response_format", "safety_tolerance", "language")} == {
        "model": "flux-kontext-max",
        "size": "4:3",
        "response_format": "jpg",
        "safety_tolerance": 3,
        "language": "ko",
    }
    assert body["prompt_upsampling"] is True
    assert "image_urls" not in body

    delivered = apimart.complete(apimart_id, [apimart.host("out.png", image)])
    assert delivered is not None and delivered.status_code == 200
    assert delivered.request.url.path.endswith("/callback")
    done = receiver.wait(task_id)
    assert done["status"] == "succeeded", done
    assert done["provider_task_id"] == apimart_id
    [stored] = done["images"]
    assert stored["sha256"] == hashlib.sha256(image).hexdigest()
    [event] = [e for e in receiver.events(task_id) if e["kind"] == "callback"]
    assert event["verified"] and event["change"]


def test_a_wrapped_callback(start_receiver: Callable[..., Receiver]) -> None:
    apimart = ApimartFake(wrapped=True).start()
    try:
        receiver = start_receiver(**apimart.receiver_env())
        task_id, apimart_id = receiver.submitted(apimart)
        assert apimart.callback_body(apimart_id)["data"]["id"] == apimart_id
        answer = apimart.complete(apimart_id, [apimart.host("w.png")])
        assert answer is not None and answer.status_code == 200
        assert receiver.wait(task_id)["status"] == "succeeded"
        second, second_id = receiver.submitted(apimart)
        apimart.fail(second_id, False, "wrapped failure")
        done = receiver.wait(second)
        assert done["error"] == {
            "code": "generation_failed",
            "message": "wrapped failure",
            "provider_code": "task_failed",
        }
    finally:
        apimart.stop()


def test_many_urls_in_one_callback_are_stored_in_order(apimart: ApimartFake, receiver: Receiver) -> None:
    pictures = [png(10 + i, 10, shade=20 * i) for i in range(3)]
    links = [apimart.host(f"m{i}.png", picture) for i, picture in enumerate(pictures)]
    task_id, apimart_id = receiver.submitted(apimart)
    apimart.complete_images(apimart_id, [[links[0], links[1]], [links[2]]])
    done = receiver.wait(task_id)
    assert done["status"] == "succeeded", done
    assert [image["index"] for image in done["images"]] == [0, 1, 2]
    assert [image["source_url"] for image in done["images"]] == links
    assert [image["width"] for image in done["images"]] == [10, 11, 12]
    assert [httpx.get(image["url"]).content for image in done["images"]] == pictures


def test_a_data_uri_goes_over_as_one_signed_link(apimart: ApimartFake, receiver: Receiver) -> None:
    picture = png(16, 16, shade=5)
    data_uri = "data:image/png;base64," + base64.b64encode(picture).decode()
    task_id, apimart_id = receiver.submitted(apimart, images=[data_uri], aspect_ratio="match_input_image")
    body = apimart.calls(GENERATIONS)[-1].json()
    [link] = body["image_urls"]
    assert link.startswith(f"{receiver.url}/uploads/")
    assert httpx.get(link).content == picture
    assert body["size"] == "match_input_image"
    apimart.complete(apimart_id, [apimart.host("e.png")])
    assert receiver.wait(task_id)["status"] == "succeeded"


def test_an_error_envelope_on_submit_is_provider_rejected(apimart: ApimartFake, receiver: Receiver) -> None:
    apimart.script(GENERATIONS, 402, error_envelope("insufficient account balance", "insufficient_quota"))
    task = receiver.submit(provider="apimart", prompt="p")
    done = receiver.wait(str(task["id"]))
    assert done["error"] == {
        "code": "provider_rejected",
        "message": "insufficient account balance",
        "provider_code": "insufficient_quota",
    }
    assert len(apimart.calls(GENERATIONS)) == 1  # a refusal is not retried


def test_a_wrong_key_is_refused_with_apimart_message(
    apimart: ApimartFake, start_receiver: Callable[..., Receiver]
) -> None:
    receiver = start_receiver(APIMART_API_KEY="wrong", APIMART_BASE_URL=apimart.url)
    done = receiver.wait(str(receiver.submit(provider="apimart", prompt="p")["id"]))
    assert done["error"] == {
        "code": "provider_rejected",
        "message": "invalid API key (request id: fake)",
        "provider_code": "401",
    }


def test_a_429_is_retried(apimart: ApimartFake, receiver: Receiver) -> None:
    apimart.script(GENERATIONS, 429, error_envelope("too many requests", "rate_limit"))
    apimart.script(GENERATIONS, 500, error_envelope("upstream error"))
    task_id, apimart_id = receiver.submitted(apimart)
    assert receiver.alice.get(f"/v1/tasks/{task_id}").json()["provider_task_id"] == apimart_id
    assert len(apimart.calls(GENERATIONS)) == 3
    apimart.complete(apimart_id, [apimart.host("r.png")])
    assert receiver.wait(task_id)["status"] == "succeeded"


def test_reconcile_asks_the_task_endpoint_in_english(
    apimart: ApimartFake, start_receiver: Callable[..., Receiver]
) -> None:
    receiver = start_receiver(**apimart.receiver_env(), RECEIVER_RECONCILE_AFTER=0.2)
    task_id, apimart_id = receiver.submitted(apimart)
    apimart.wait_for(lambda: bool(apimart.calls(TASKS + apimart_id)))
    assert apimart.calls(TASKS + apimart_id)[0].query == {"language": "en"}
    apimart.cancel(apimart_id)
    done = receiver.wait(task_id)
    assert done["status"] == "failed"
    assert done["error"]["code"] == "generation_failed"
    assert "cancelled" in done["error"]["message"]
    polls = [e for e in receiver.events(task_id) if e["kind"] == "poll"]
    assert polls[0]["summary"].startswith("status submitted")
