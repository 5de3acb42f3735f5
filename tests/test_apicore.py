"""apicore: the translator against the payloads of providers.md §4.1 to §4.3, then end to end against the
apicore fake (synchronous answers, both BFL webhook shapes, X-BFL-Signature, polling_url origins)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from receiver.config import ProviderSettings
from receiver.models import CallbackRejected
from receiver.models import ErrorCode
from receiver.models import MalformedCallback
from receiver.models import Outcome
from receiver.models import ProviderRejected
from receiver.models import ProviderUnavailable
from receiver.models import TaskRequest
from receiver.models import TaskSpec
from receiver.providers import REGISTRY
from receiver.providers.apicore import Apicore
from receiver.providers.base import Context
from tests.fakes.apicore import GENERATIONS
from tests.fakes.apicore import GET_RESULT
from tests.fakes.apicore import KEY
from tests.fakes.apicore import ApicoreFake
from tests.fakes.apicore import Shape
from tests.fakes.apicore import bfl_signature
from tests.fakes.common import png
from tests.fakes.common import post_callback
from tests.harness import Receiver

BASE = "https://api.apicore.ai"
CALLBACK = "https://receiver.example/callbacks/apicore/token123"
SECRET = "s" * 43
APICORE = Apicore()


def context(require: bool = False, base: str = BASE) -> Context:
    extra = {"APICORE_REQUIRE_SIGNATURE": "1" if require else "0"}
    return Context(ProviderSettings(api_key="the-key", base_url=base, extra=extra), callback_url=CALLBACK)


def spec(
    images: tuple[str, ...] = (),
    params: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    provider_task_id: str | None = None,
    state: dict[str, str] | None = None,
) -> TaskSpec:
    return TaskSpec(
        id="tsk_0",
        model="flux-kontext-max",
        prompt="Put a donut next to the flour",
        images=images,
        params=params or {},
        options=options or {},
        provider_task_id=provider_task_id,
        state={"webhook_secret": SECRET} if state is None else state,
    )


def request(**params: Any) -> TaskRequest:
    return TaskRequest("apicore", "p", None, (), params, {}, None, {})


def answer(status: int, body: Any) -> httpx.Response:
    return httpx.Response(status, json=body)


# -- the translator --------------------------------------------------------------------------------


def test_registered_with_its_settings() -> None:
    assert REGISTRY["apicore"].key_variable == "APICORE_API_KEY"
    assert APICORE.inline_images and APICORE.early_download
    assert "resolution" not in APICORE.fields  # the shell answers 422 for it


def test_validate_refuses_what_apicore_cannot_take() -> None:
    assert APICORE.validate(request(aspect_ratio="9:21", output_format="png", safety_tolerance=6)) == {}
    assert APICORE.validate(request(num_images=1, seed=3)) == {}
    errors = APICORE.validate(
        request(aspect_ratio="2:1", output_format="webp", safety_tolerance=7, num_images=2)
    )
    assert set(errors) == {"aspect_ratio", "output_format", "safety_tolerance", "num_images"}
    assert "21:9" in errors["aspect_ratio"] and "9:21" in errors["aspect_ratio"]
    assert APICORE.validate(request(safety_tolerance=-1)) == {"safety_tolerance": "apicore takes 0 to 6"}


def test_new_state_is_a_fresh_long_secret() -> None:
    first, second = APICORE.new_state(), APICORE.new_state()
    assert len(first["webhook_secret"]) >= 32
    assert first["webhook_secret"] != second["webhook_secret"]


def test_submit_spells_the_bfl_fields_of_section_4_1() -> None:
    params = {
        "seed": 7,
        "aspect_ratio": "21:9",
        "output_format": "png",
        "prompt_upsampling": True,
        "safety_tolerance": 4,
    }
    data_uri = "data:image/jpeg;base64,/9j/4AAQ"
    built = APICORE.build_submit(
        spec((data_uri,), params, options={"webhook_url": "https://evil.example", "extra": 1}), context()
    )
    assert (built.method, str(built.url)) == ("POST", f"{BASE}/v1/images/generations")
    assert built.headers["authorization"] == "Bearer the-key"
    assert json.loads(built.content) == {
        "model": "flux-kontext-max",
        "prompt": "Put a donut next to the flour",
        "input_image": data_uri,
        **params,
        "extra": 1,
        "webhook_url": CALLBACK,  # ours, whatever the options said
        "webhook_secret": SECRET,
    }
    plain = json.loads(APICORE.build_submit(spec(), context()).content)
    assert "input_image" not in plain and "seed" not in plain


def test_synchronous_answer_completes_at_once() -> None:
    body = {"created": 1234567890, "data": [{"url": "https://a.example/1.jpg"}, {"url": "https://a/2.jpg"}]}
    submission = APICORE.parse_submit(answer(200, body))
    assert submission.provider_task_id is None
    assert submission.outcome == Outcome.succeeded(
        None,
        ("https://a.example/1.jpg", "https://a/2.jpg"),
        submission.outcome.detail if submission.outcome else "",
    )
    empty = APICORE.parse_submit(answer(200, {"created": 1, "data": []})).outcome
    assert empty is not None and empty.state == "failed"


def test_async_answers_keep_the_id_and_polling_url() -> None:
    body = {
        "id": "abc",
        "polling_url": "https://api.us1.bfl.ai/v1/get_result?id=abc",
        "cost": 4.0,
        "input_mp": 0,
        "output_mp": 1.05,
    }
    submission = APICORE.parse_submit(answer(200, body))
    assert submission.provider_task_id == "abc"
    assert submission.state == {"id": "abc", "polling_url": body["polling_url"]}
    assert submission.outcome is None
    webhook = {"id": "abc", "status": "Pending", "webhook_url": CALLBACK, "cost": 4.0}
    submission = APICORE.parse_submit(answer(200, webhook))
    assert (submission.provider_task_id, submission.state, submission.outcome) == ("abc", {"id": "abc"}, None)
    refused = APICORE.parse_submit(answer(200, {"id": "abc", "status": "Request Moderated"})).outcome
    assert refused is not None and refused.error is not None
    assert refused.error.code == ErrorCode.CONTENT_MODERATED


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (400, {"detail": "Invalid input image"}, "HTTP 400: Invalid input image"),
        (401, {"detail": "Not authenticated"}, "HTTP 401: Not authenticated"),
        (402, {"detail": "Insufficient credits"}, "HTTP 402: Insufficient credits"),
        (
            422,
            {"detail": [{"loc": ["body", "aspect_ratio"], "msg": "invalid ratio", "type": "value_error"}]},
            "HTTP 422: aspect_ratio: invalid ratio",
        ),
        (
            403,
            {"error": {"message": "token quota exhausted", "type": "new_api_error"}},
            "HTTP 403: token quota",
        ),
    ],
)
def test_submit_refusals(status: int, body: Any, message: str) -> None:
    with pytest.raises(ProviderRejected) as caught:
        APICORE.parse_submit(answer(status, body))
    assert caught.value.message.startswith(message)
    assert caught.value.provider_code == str(status)


def test_submit_transient_failures_retry() -> None:
    for status in (429, 500, 502, 503):
        with pytest.raises(ProviderUnavailable):
            APICORE.parse_submit(httpx.Response(status, text="busy", headers={"Retry-After": "3"}))
    with pytest.raises(ProviderRejected):
        APICORE.parse_submit(answer(200, {"error": {"message": "model not available"}}))
    with pytest.raises(ProviderUnavailable):
        APICORE.parse_submit(httpx.Response(200, text="<html>gateway</html>"))


def outcome_of(body: dict[str, Any]) -> Outcome:
    return APICORE.parse_callback(json.dumps(body).encode())


def test_callback_shape_a_of_section_4_3() -> None:
    ready = {
        "id": "gen_abc123xyz",
        "status": "Ready",
        "result": {"sample": "https://delivery.bfl.ai/x.jpg", "prompt": "...", "seed": 12345},
        "timestamp": "2024-01-15T10:30:00Z",
    }
    outcome = outcome_of(ready)
    assert (outcome.state, outcome.provider_task_id) == ("succeeded", "gen_abc123xyz")
    assert outcome.image_urls == ("https://delivery.bfl.ai/x.jpg",)
    error = outcome_of(
        {"id": "gen_1", "status": "Error", "error": "boom", "timestamp": "2024-01-15T10:30:00Z"}
    )
    assert error.error is not None
    assert (error.state, error.error.code, error.error.message) == (
        "failed",
        ErrorCode.GENERATION_FAILED,
        "boom",
    )
    assert error.error.provider_code == "Error"


def test_callback_shape_b_of_section_4_3() -> None:
    success = {"task_id": "t-9", "status": "SUCCESS", "result": {"sample": "https://d/1.png", "prompt": "p"}}
    outcome = outcome_of(success)
    assert (outcome.state, outcome.provider_task_id, outcome.image_urls) == (
        "succeeded",
        "t-9",
        ("https://d/1.png",),
    )
    failed = outcome_of({"task_id": "t-9", "status": "FAILED", "error": "no GPU"})
    assert failed.error is not None and failed.error.code == ErrorCode.GENERATION_FAILED
    assert failed.error.message == "no GPU"


@pytest.mark.parametrize(
    "status", ["Content Moderated", "Request Moderated", "GENERATED CONTENT MODERATED", "moderated"]
)
def test_moderation_statuses(status: str) -> None:
    outcome = outcome_of({"id": "m", "status": status, "details": "flagged"})
    assert outcome.error is not None
    assert (outcome.error.code, outcome.error.message, outcome.error.provider_code) == (
        ErrorCode.CONTENT_MODERATED,
        "flagged",
        status,
    )
    bare = outcome_of({"id": "m", "status": status})
    assert bare.error is not None and status in bare.error.message


@pytest.mark.parametrize("status", ["Pending", "processing", "PENDING", "Task not found", "Warming up"])
def test_pending_statuses_change_nothing(status: str) -> None:
    outcome = outcome_of({"task_id": "p", "status": status, "progress": 0.4})
    assert (outcome.state, outcome.provider_task_id) == ("pending", "p")


def test_ready_without_a_sample_is_a_failure_and_bodies_without_status_are_malformed() -> None:
    empty = outcome_of({"id": "r", "status": "Ready", "result": None})
    assert empty.error is not None and empty.error.code == ErrorCode.GENERATION_FAILED
    for raw in (b"not json", b"[]", b'{"id": "x"}', b'{"id": "x", "status": ""}', b'{"status": 3}'):
        with pytest.raises(MalformedCallback):
            APICORE.parse_callback(raw)


def sign(raw: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"x-bfl-signature": f"sha256={hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()}"}


def test_signature_checked_whenever_present() -> None:
    raw = b'{"id": "a", "status": "Ready"}'
    for require in (False, True):
        APICORE.verify_callback(sign(raw), raw, spec(), context(require), 0.0)
        upper = {"x-bfl-signature": sign(raw)["x-bfl-signature"].upper().replace("SHA256=", "sha256=")}
        APICORE.verify_callback(upper, raw, spec(), context(require), 0.0)
        for headers in (
            sign(raw, "another-secret"),
            sign(raw + b" "),
            {"x-bfl-signature": ""},
            {"x-bfl-signature": "sha1=" + sign(raw)["x-bfl-signature"][7:]},
            {"x-bfl-signature": sign(raw)["x-bfl-signature"][7:]},
        ):
            with pytest.raises(CallbackRejected):
                APICORE.verify_callback(headers, raw, spec(), context(require), 0.0)


def test_signature_mandatory_only_when_required_and_fails_closed_without_a_secret() -> None:
    raw = b"{}"
    APICORE.verify_callback({}, raw, spec(), context(require=False), 0.0)
    with pytest.raises(CallbackRejected, match="missing"):
        APICORE.verify_callback({}, raw, spec(), context(require=True), 0.0)
    with pytest.raises(CallbackRejected, match="no webhook secret"):
        APICORE.verify_callback(sign(raw, ""), raw, spec(state={}), context(require=False), 0.0)
    with pytest.raises(CallbackRejected):
        APICORE.verify_callback({}, raw, spec(state={}), context(require=True), 0.0)


def test_status_query_uses_polling_url_only_on_our_origin() -> None:
    assert APICORE.build_status(spec(), context()) is None  # a synchronous task: nothing to ask
    own = f"{BASE}/v1/get_result?id=abc&region=eu"
    built = APICORE.build_status(
        spec(provider_task_id="abc", state={"id": "abc", "polling_url": own}), context()
    )
    assert built is not None and str(built.url) == own
    assert built.headers["authorization"] == "Bearer the-key"
    for foreign in (
        "https://api.us1.bfl.ai/v1/get_result?id=abc",
        "http://api.apicore.ai/v1/get_result?id=abc",
        "https://api.apicore.ai:8443/v1/get_result?id=abc",
        "https://api.apicore.ai.evil.example/v1/get_result?id=abc",
        "/v1/get_result?id=abc",
    ):
        state = {"id": "abc", "polling_url": foreign}
        built = APICORE.build_status(spec(provider_task_id="abc", state=state), context())
        assert built is not None and str(built.url) == f"{BASE}/v1/get_result?id=abc", foreign
    built = APICORE.build_status(spec(provider_task_id="a b&c"), context())
    assert built is not None and built.url.params["id"] == "a b&c"


def test_status_answer_of_section_4_2() -> None:
    body = {
        "id": "abc",
        "status": "Ready",
        "result": {
            "sample": "https://delivery-eu1.bfl.ai/...sig...",
            "prompt": "...",
            "seed": 42,
            "start_time": 1718000000.1,
            "end_time": 1718000008.2,
            "duration": 8.1,
        },
        "progress": None,
        "details": None,
        "preview": None,
    }
    outcome = APICORE.parse_status(answer(200, body))
    assert (outcome.state, outcome.image_urls) == ("succeeded", ("https://delivery-eu1.bfl.ai/...sig...",))
    moderated = APICORE.parse_status(
        answer(200, {"id": "abc", "status": "Content Moderated", "details": {"Moderation Reasons": ["x"]}})
    )
    assert moderated.error is not None and "Moderation Reasons" in moderated.error.message
    assert APICORE.parse_status(answer(200, {"id": "abc", "status": "Task not found"})).state == "pending"
    with pytest.raises(ProviderUnavailable):
        APICORE.parse_status(answer(200, {"id": "abc"}))
    with pytest.raises(ProviderUnavailable):
        APICORE.parse_status(httpx.Response(503, text="down"))


# -- end to end -----------------------------------------------------------------------------------


@pytest.fixture
def apicore(start_fake: Callable[..., ApicoreFake]) -> ApicoreFake:
    return start_fake(ApicoreFake)


@pytest.fixture
def receiver(apicore: ApicoreFake, start_receiver: Callable[..., Receiver]) -> Receiver:
    return start_receiver(**apicore.receiver_env())


def test_submit_body_and_a_signed_webhook(apicore: ApicoreFake, receiver: Receiver) -> None:
    picture = png(20, 20, shade=10)
    data_uri = "data:image/png;base64," + base64.b64encode(picture).decode()
    task_id, bfl_id = receiver.submitted(
        apicore,
        images=[data_uri],
        model="flux-kontext-max",
        seed=5,
        aspect_ratio="9:21",
        output_format="jpeg",
        prompt_upsampling=True,
        safety_tolerance=6,
    )
    sent = apicore.calls(GENERATIONS)[0]
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    body = sent.json()
    assert body["input_image"] == data_uri  # inline, not a link
    assert (body["model"], body["seed"], body["aspect_ratio"]) == ("flux-kontext-max", 5, "9:21")
    assert (body["output_format"], body["prompt_upsampling"], body["safety_tolerance"]) == ("jpeg", True, 6)
    assert body["webhook_url"].startswith(f"{receiver.url}/callbacks/apicore/")
    assert len(body["webhook_secret"]) >= 32
    image = png(30, 20)
    assert apicore.complete(bfl_id, [apicore.host("out.png", image)]).status_code == 200  # type: ignore[union-attr]
    done = receiver.wait(task_id)
    assert done["status"] == "succeeded" and done["provider_task_id"] == bfl_id
    assert done["images"][0]["sha256"] == hashlib.sha256(image).hexdigest()

    source = apicore.host("in.png")
    receiver.submitted(apicore, images=[source])
    assert apicore.calls(GENERATIONS)[-1].json()["input_image"] == source  # a URL goes as given


def test_synchronous_answer_completes_without_a_callback(start_receiver: Callable[..., Receiver]) -> None:
    fake = ApicoreFake(synchronous=True).start()
    try:
        receiver = start_receiver(**fake.receiver_env(), RECEIVER_RECONCILE_AFTER=0.1)
        first, second = png(10, 10), png(12, 8, shade=40)
        fake.sync_urls = [fake.host("s1.png", first), fake.host("s2.png", second)]
        task = receiver.submit(provider="apicore", prompt="now")
        done = receiver.wait(str(task["id"]))
        assert done["status"] == "succeeded", done
        assert done["provider_task_id"] is None
        assert [i["sha256"] for i in done["images"]] == [
            hashlib.sha256(b).hexdigest() for b in (first, second)
        ]
        assert [i["source_url"] for i in done["images"]] == fake.sync_urls
        time.sleep(0.3)  # several reconcile intervals: nothing must be asked
        assert fake.calls(GET_RESULT) == []
        kinds = {e["kind"] for e in receiver.events(str(task["id"]))}
        assert "callback" not in kinds and "poll" not in kinds
    finally:
        fake.stop()


@pytest.mark.parametrize("shape", ["id", "task_id"])
def test_both_webhook_shapes(shape: Shape, start_receiver: Callable[..., Receiver]) -> None:
    fake = ApicoreFake(shape=shape).start()
    try:
        receiver = start_receiver(**fake.receiver_env())
        task_id, bfl_id = receiver.submitted(fake)
        pending = fake.send(bfl_id, fake.callback_body(bfl_id, "pending", progress=0.5))
        assert pending.status_code == 200
        assert receiver.alice.get(f"/v1/tasks/{task_id}").json()["status"] == "submitted"
        fake.complete(bfl_id, [fake.host("shape.png")])
        assert receiver.wait(task_id)["status"] == "succeeded"

        task_id, bfl_id = receiver.submitted(fake)
        fake.send(bfl_id, fake.callback_body(bfl_id, "moderated", details="nsfw"))
        done = receiver.wait(task_id)
        assert done["error"]["code"] == "content_moderated"
        assert done["error"]["message"] == "nsfw"
        assert done["error"]["provider_code"] == (
            "Content Moderated" if shape == "id" else "GENERATED CONTENT MODERATED"
        )
    finally:
        fake.stop()


@pytest.mark.parametrize("required", [True, False])
def test_require_signature_setting(required: bool, start_receiver: Callable[..., Receiver]) -> None:
    fake = ApicoreFake(signing=False).start()
    try:
        env = {**fake.receiver_env(), "APICORE_REQUIRE_SIGNATURE": "1" if required else "0"}
        receiver = start_receiver(**env)
        task_id, bfl_id = receiver.submitted(fake)
        body = json.dumps(
            fake.callback_body(bfl_id, "success", result={"sample": fake.host("u.png")})
        ).encode()
        wrong = fake.deliver(bfl_id, body, headers=bfl_signature("guessed-secret", body))
        assert wrong.status_code == 401  # a signature that is present is always checked
        unsigned = fake.deliver(bfl_id, body)
        assert unsigned.status_code == (401 if required else 200), unsigned.text
        if required:
            assert receiver.alice.get(f"/v1/tasks/{task_id}").json()["status"] == "submitted"
            signed = fake.deliver(bfl_id, body, headers=bfl_signature(fake.webhook_secret(bfl_id), body))
            assert signed.status_code == 200
        assert receiver.wait(task_id)["status"] == "succeeded"
    finally:
        fake.stop()


def test_a_foreign_polling_url_is_not_used(
    apicore: ApicoreFake, start_receiver: Callable[..., Receiver]
) -> None:
    foreign = ApicoreFake().start()
    try:
        apicore.polling_origin = foreign.url
        receiver = start_receiver(**apicore.receiver_env(), RECEIVER_RECONCILE_AFTER=0.1)
        task_id, bfl_id = receiver.submitted(apicore)
        apicore.complete(bfl_id, [apicore.host("late.png")], deliver=False)
        assert receiver.wait(task_id)["status"] == "succeeded"
        assert apicore.calls(GET_RESULT)[0].query == {"id": bfl_id}
        assert foreign.requests == []  # our key never went there
    finally:
        foreign.stop()


def test_webhook_answer_without_polling_url_reconciles_by_id(start_receiver: Callable[..., Receiver]) -> None:
    fake = ApicoreFake(webhook_answer=True).start()
    try:
        receiver = start_receiver(**fake.receiver_env(), RECEIVER_RECONCILE_AFTER=0.1)
        task_id, bfl_id = receiver.submitted(fake)
        fake.fail(bfl_id, False, "ignored", deliver=False)
        done = receiver.wait(task_id)
        assert done["error"]["code"] == "generation_failed"
        assert done["error"]["message"] == "ignored"
        assert fake.calls(GET_RESULT)[0].query == {"id": bfl_id}
    finally:
        fake.stop()


def test_the_webhook_secret_is_never_shown(
    apicore: ApicoreFake, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    task_id, bfl_id = receiver.submitted(apicore)
    secret = apicore.webhook_secret(bfl_id)
    apicore.send(bfl_id, apicore.callback_body(bfl_id, "pending"))
    apicore.complete(bfl_id, [apicore.host("s.png")])
    receiver.wait(task_id)
    task = receiver.alice.get(f"/v1/tasks/{task_id}")
    events = receiver.alice.get(f"/v1/tasks/{task_id}/events")
    listing = receiver.alice.get("/v1/tasks")
    assert task.json()["status"] == "succeeded"
    assert {"created", "submit", "callback"} <= {e["kind"] for e in events.json()["items"]}
    assert task_id in listing.text
    shown = [task.text, events.text, listing.text]
    assert not any(secret in page for page in shown)
    assert caplog.records and secret not in caplog.text


def test_submit_refusals_and_retries(apicore: ApicoreFake, start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver(**apicore.receiver_env())
    detail = [{"loc": ["body", "prompt"], "msg": "prompt too long", "type": "value_error"}]
    apicore.script(GENERATIONS, 422, {"detail": detail})
    done = receiver.wait(str(receiver.submit(provider="apicore", prompt="p")["id"]))
    assert done["error"] == {
        "code": "provider_rejected",
        "message": "HTTP 422: prompt: prompt too long",
        "provider_code": "422",
    }
    apicore.script(GENERATIONS, 402, {"detail": "Insufficient credits"})
    done = receiver.wait(str(receiver.submit(provider="apicore", prompt="p")["id"]))
    assert (done["error"]["message"], done["error"]["provider_code"]) == (
        "HTTP 402: Insufficient credits",
        "402",
    )
    calls = len(apicore.calls(GENERATIONS))
    apicore.script(GENERATIONS, 429, {"detail": "too many active tasks"})
    apicore.script(GENERATIONS, 502, b"bad gateway")
    receiver.submitted(apicore)
    assert len(apicore.calls(GENERATIONS)) == calls + 3


def test_fields_apicore_cannot_take_are_422(apicore: ApicoreFake, receiver: Receiver) -> None:
    cases: dict[str, dict[str, Any]] = {
        "resolution": {"resolution": "1K"},
        "num_images": {"num_images": 2},
        "aspect_ratio": {"aspect_ratio": "2:1"},
        "safety_tolerance": {"safety_tolerance": 7},
        "images": {"images": ["https://a.example/1.png", "https://a.example/2.png"]},
        "model": {"model": "flux-2-pro"},
    }
    for field, extra in cases.items():
        response = receiver.alice.post("/v1/tasks", json={"provider": "apicore", "prompt": "p", **extra})
        assert response.status_code == 422, field
        assert field in response.json()["error"]["fields"], response.text
    assert apicore.calls(GENERATIONS) == []


def test_a_callback_for_another_bfl_task_is_refused(apicore: ApicoreFake, receiver: Receiver) -> None:
    task_id, bfl_id = receiver.submitted(apicore)
    body = json.dumps(
        {"id": "bfl-99999", "status": "Ready", "result": {"sample": apicore.host("w.png")}}
    ).encode()
    url = apicore.webhooks[bfl_id][0]
    assert post_callback(url, body, bfl_signature(apicore.webhook_secret(bfl_id), body)).status_code == 400
    assert receiver.alice.get(f"/v1/tasks/{task_id}").json()["status"] == "submitted"
