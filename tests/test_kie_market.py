"""kie.ai Market (FLUX 2): the translator against the payloads of providers.md §2, then end to end
against the Market fake over HTTP."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from receiver.config import ProviderSettings
from receiver.models import CallbackRejected
from receiver.models import ErrorCode
from receiver.models import MalformedCallback
from receiver.models import ProviderRejected
from receiver.models import ProviderUnavailable
from receiver.models import TaskError
from receiver.models import TaskRequest
from receiver.models import TaskSpec
from receiver.providers import REGISTRY
from receiver.providers import Context
from receiver.providers.kie_market import KieMarket
from tests.fakes.common import png
from tests.fakes.kie import HMAC_KEY
from tests.fakes.kie import KEY
from tests.fakes.kie import kie_signature
from tests.fakes.kie_market import CREATE_TASK
from tests.fakes.kie_market import RECORD_INFO
from tests.fakes.kie_market import KieMarketFake
from tests.harness import Receiver

MARKET = KieMarket()
BASE = "https://api.kie.ai"
CALLBACK = "https://receiver.example/callbacks/kie-market/token"
CTX = Context(ProviderSettings(api_key="secret-key", base_url=BASE), callback_url=CALLBACK)

# §2.4, verbatim from the Wan 3.0 page (the unified Market callback).
WAN_SUCCESS = rb"""{
  "code": 200,
  "msg": "Playground task completed successfully.",
  "data": {
    "taskId": "bd8f4b1a52048d0f17a38b49591abfa1",
    "model": "wan/3-0-video-prime",
    "state": "success",
    "param": "{\"input\":\"{\\\"duration\\\":5,...,\\\"nsfw_checker\\\":false}\",\"callBackUrl\":\"https://webhook.uutool.cn/09df5d64-...\",\"model\":\"wan/3-0-video-prime\"}",
    "resultJson": "{\"resultUrls\":[\"https://tempfile.aiquickdraw.com/wan30-video-prime-alibaba/1787567408129-b1fmz5um3co.mp4\"]}",
    "costTime": 89,
    "completeTime": 1787567409000,
    "createTime": 1787567320000,
    "updateTime": 1787567409000,
    "creditsConsumed": 61
  }
}"""
WAN_FAILURE = rb"""{
  "code": 501,
  "msg": "Playground task failed.",
  "data": {
    "taskId": "bd8f4b1a52048d0f17a38b49591abfa1",
    "model": "wan/3-0-video-prime",
    "state": "fail",
    "param": "{...same JSON string...}",
    "failCode": "400",
    "failMsg": "<error detail>",
    "costTime": 89,
    "creditsConsumed": 0
  }
}"""
# §2.3, verbatim: the recordInfo answer.
RECORD_SUCCESS = rb"""{
  "code": 200, "msg": "success",
  "data": {
    "taskId": "task_flux-2_1765174753676",
    "model": "flux-2/pro-image-to-image",
    "state": "success",
    "param": "{\"model\":\"flux-2/pro-image-to-image\",\"callBackUrl\":\"...\",\"input\":{...}}",
    "resultJson": "{\"resultUrls\":[\"https://.../x.png\"]}",
    "failCode": "",
    "failMsg": "",
    "costTime": 15000,
    "completeTime": 1698765432000,
    "createTime": 1698765400000,
    "updateTime": 1698765432000
  }
}"""


def spec(**overrides: Any) -> TaskSpec:
    values: dict[str, Any] = {
        "id": "tsk_1",
        "model": "flux-2/pro-image-to-image",
        "prompt": "make it winter",
        "images": ("https://img.example/a.png",),
        "params": {},
        "options": {},
        "provider_task_id": "task_flux-2_1765174753676",
        "state": {},
    }
    return TaskSpec(**{**values, **overrides})


def request(prompt: str = "make it winter", model: str | None = None, **params: Any) -> TaskRequest:
    options = params.pop("options", {})
    return TaskRequest("kie-market", prompt, model, ("https://img.example/a.png",), params, options, None, {})


def answer(body: bytes | dict[str, Any], status: int = 200) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Response(status, content=content, request=httpx.Request("GET", f"{BASE}{RECORD_INFO}"))


def callback(data: dict[str, Any], code: int = 200, msg: str = "") -> bytes:
    return json.dumps({"code": code, "msg": msg, "data": data}).encode()


# -- callbacks (§2.4) ------------------------------------------------------------------------------


def test_the_documented_success_callback() -> None:
    outcome = MARKET.parse_callback(WAN_SUCCESS)
    assert outcome.state == "succeeded"
    assert outcome.provider_task_id == "bd8f4b1a52048d0f17a38b49591abfa1"
    assert outcome.image_urls == (
        "https://tempfile.aiquickdraw.com/wan30-video-prime-alibaba/1787567408129-b1fmz5um3co.mp4",
    )


def test_the_documented_failure_callback_keeps_failcode_and_failmsg_but_is_no_moderation() -> None:
    # "400" is the Market's generic failure code, not a moderation verdict: only a message says that.
    outcome = MARKET.parse_callback(WAN_FAILURE)
    assert outcome.state == "failed"
    assert outcome.provider_task_id == "bd8f4b1a52048d0f17a38b49591abfa1"
    assert outcome.error == TaskError(ErrorCode.GENERATION_FAILED, "<error detail>", "400")


def test_a_failcode_500_is_a_generation_failure_unless_the_message_names_moderation() -> None:
    data = {"taskId": "t1", "state": "fail", "failCode": "500", "failMsg": "Internal Error"}
    outcome = MARKET.parse_callback(callback(data, 501, "Playground task failed."))
    assert outcome.error == TaskError(ErrorCode.GENERATION_FAILED, "Internal Error", "500")
    flagged = {**data, "failMsg": "Your prompt was flagged as violating content policies."}
    outcome = MARKET.parse_callback(callback(flagged, 501))
    assert outcome.error is not None and outcome.error.code is ErrorCode.CONTENT_MODERATED
    assert outcome.error.provider_code == "500"


@pytest.mark.parametrize(
    ("code", "expected"), [(400, ErrorCode.GENERATION_FAILED), (500, ErrorCode.GENERATION_FAILED)]
)
def test_the_seedream_style_failure_without_failcode_uses_the_top_level_code(
    code: int, expected: ErrorCode
) -> None:
    # The older Seedream schema: code 200/400/500/501, no failCode/failMsg, message in `msg`.
    raw = callback({"taskId": "t2", "model": "flux-2/pro-image-to-image", "state": "fail"}, code, "it broke")
    outcome = MARKET.parse_callback(raw)
    assert outcome.state == "failed"
    assert outcome.error == TaskError(expected, "it broke", str(code))


def test_any_non_200_code_fails_even_when_state_says_otherwise() -> None:
    outcome = MARKET.parse_callback(callback({"taskId": "t3", "state": "generating"}, 501))
    assert outcome.state == "failed"
    assert outcome.error == TaskError(ErrorCode.GENERATION_FAILED, "kie reported a failed job", "501")


def test_a_double_encoded_param_is_left_alone() -> None:
    param = json.dumps({"model": "flux-2/pro-image-to-image", "input": json.dumps({"prompt": "p"})})
    result = json.dumps({"resultUrls": ["https://cdn.example/1.png"]})
    raw = callback({"taskId": "t4", "state": "success", "param": param, "resultJson": result}, 200)
    outcome = MARKET.parse_callback(raw)
    assert outcome.state == "succeeded"
    assert outcome.image_urls == ("https://cdn.example/1.png",)


def test_every_result_url_is_kept_in_order() -> None:
    urls = [f"https://cdn.example/{n}.png" for n in (3, 1, 2)]
    raw = callback({"taskId": "t5", "state": "success", "resultJson": json.dumps({"resultUrls": urls})})
    assert MARKET.parse_callback(raw).image_urls == tuple(urls)


def test_the_task_id_spelling_of_the_hmac_page() -> None:
    raw = callback(
        {"task_id": "ee9c", "state": "success", "resultJson": '{"resultUrls":["https://c/x.png"]}'}
    )
    assert MARKET.parse_callback(raw).provider_task_id == "ee9c"


@pytest.mark.parametrize("state", ["waiting", "queuing", "generating", "something-new", None])
def test_a_state_that_is_not_final_is_pending(state: str | None) -> None:
    outcome = MARKET.parse_callback(callback({"taskId": "t6", "state": state}))
    assert outcome.state == "pending"
    assert outcome.provider_task_id == "t6"


def test_success_without_links_fails_the_task() -> None:
    for result in ("", None, "{}"):
        outcome = MARKET.parse_callback(callback({"taskId": "t7", "state": "success", "resultJson": result}))
        assert outcome.state == "failed"
        assert outcome.error is not None and outcome.error.code is ErrorCode.GENERATION_FAILED


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        json.dumps({"data": {"taskId": "t", "state": "success"}}).encode(),  # no code
        json.dumps({"code": 200, "data": "t"}).encode(),
        callback({"taskId": "t", "state": "success", "resultJson": "{not json"}),
        callback({"taskId": "t", "state": "success", "resultJson": "[1]"}),
        callback({"taskId": "t", "state": "success", "resultJson": '{"resultUrls": "https://c/x.png"}'}),
        callback({"taskId": "t", "state": "success", "resultJson": 7}),
    ],
)
def test_malformed_callbacks(raw: bytes) -> None:
    with pytest.raises(MalformedCallback):
        MARKET.parse_callback(raw)


# -- signature (§2.5) ------------------------------------------------------------------------------


def test_the_kie_hmac_covers_market_callbacks() -> None:
    ctx = Context(ProviderSettings("k", BASE, {"KIE_WEBHOOK_HMAC_KEY": HMAC_KEY}))
    task = spec(provider_task_id="ee9c")
    raw = callback({"task_id": "ee9c", "state": "success"})
    headers = {k.lower(): v for k, v in kie_signature(HMAC_KEY, "ee9c", 1769670760).items()}
    MARKET.verify_callback(headers, raw, task, ctx, 1769670760.0)
    forged = {k.lower(): v for k, v in kie_signature("other", "ee9c", 1769670760).items()}
    with pytest.raises(CallbackRejected):
        MARKET.verify_callback(forged, raw, task, ctx, 1769670760.0)
    with pytest.raises(CallbackRejected):
        MARKET.verify_callback({}, raw, task, ctx, 1769670760.0)


# -- submit (§2.1, §2.2) ---------------------------------------------------------------------------


def test_the_submit_is_a_market_job() -> None:
    task = spec(
        images=("https://img.example/a.png", "https://img.example/b.png"),
        params={"aspect_ratio": "3:2"},
        options={"nsfw_checker": True, "aspect_ratio": "auto", "resolution": "2K"},
    )
    sent = MARKET.build_submit(task, CTX)
    assert sent.method == "POST"
    assert str(sent.url) == f"{BASE}/api/v1/jobs/createTask"
    assert sent.headers["authorization"] == "Bearer secret-key"
    assert json.loads(sent.content) == {
        "model": "flux-2/pro-image-to-image",
        "callBackUrl": CALLBACK,
        "input": {
            "input_urls": ["https://img.example/a.png", "https://img.example/b.png"],
            "prompt": "make it winter",
            "aspect_ratio": "3:2",  # the request's field wins over the option
            "resolution": "2K",  # an option passes through
            "nsfw_checker": True,
        },
    }


def test_the_required_input_fields_get_their_documented_defaults() -> None:
    body = json.loads(MARKET.build_submit(spec(), CTX).content)
    assert body["input"]["aspect_ratio"] == "1:1"
    assert body["input"]["resolution"] == "1K"


def test_submit_answers() -> None:
    ok = answer(b'{"code": 200, "msg": "success", "data": {"taskId": "task_flux-2_1765174753676"}}')
    assert MARKET.parse_submit(ok).provider_task_id == "task_flux-2_1765174753676"
    with pytest.raises(ProviderRejected) as rejected:
        MARKET.parse_submit(answer({"code": 433, "msg": "Sub-key usage limit exceeded"}))
    assert rejected.value.provider_code == "433"
    with pytest.raises(ProviderUnavailable):
        MARKET.parse_submit(answer({"code": 455, "msg": "Service unavailable"}))


# -- reconcile (§2.3) ------------------------------------------------------------------------------


def test_the_status_query() -> None:
    sent = MARKET.build_status(spec(), CTX)
    assert sent is not None
    assert str(sent.url) == f"{BASE}/api/v1/jobs/recordInfo?taskId=task_flux-2_1765174753676"
    assert sent.headers["authorization"] == "Bearer secret-key"
    assert MARKET.build_status(spec(provider_task_id=None), CTX) is None


def test_the_documented_record() -> None:
    outcome = MARKET.parse_status(answer(RECORD_SUCCESS))
    assert outcome.state == "succeeded"
    assert outcome.provider_task_id == "task_flux-2_1765174753676"
    assert outcome.image_urls == ("https://.../x.png",)


def test_the_documented_failed_record() -> None:
    data = {"taskId": "t8", "state": "fail", "failCode": "422", "failMsg": "bad input", "resultJson": ""}
    outcome = MARKET.parse_status(answer({"code": 200, "msg": "success", "data": data}))
    assert outcome.error == TaskError(ErrorCode.GENERATION_FAILED, "bad input", "422")


@pytest.mark.parametrize("state", ["waiting", "queuing", "generating"])
def test_unfinished_records_are_pending(state: str) -> None:
    outcome = MARKET.parse_status(
        answer({"code": 200, "msg": "success", "data": {"taskId": "t", "state": state}})
    )
    assert outcome.state == "pending"


@pytest.mark.parametrize(
    "response",
    [
        answer({"code": 404, "msg": "task not found"}),
        answer(b"upstream down", status=502),
        answer({"code": 200, "data": {"taskId": "t", "state": "success", "resultJson": "{oops"}}),
    ],
)
def test_a_status_answer_that_says_nothing_is_retried(response: httpx.Response) -> None:
    with pytest.raises(ProviderUnavailable):
        MARKET.parse_status(response)


# -- validation ------------------------------------------------------------------------------------


def test_valid_requests_pass() -> None:
    assert MARKET.validate(request()) == {}
    assert MARKET.validate(request(model="flux-2/flex-image-to-image", aspect_ratio="auto")) == {}
    assert MARKET.validate(request(model="flux-2/max-image-to-image", resolution="2K", num_images=1)) == {}
    assert MARKET.validate(request(prompt="abc")) == {}
    assert MARKET.validate(request(prompt="x" * 5000)) == {}


@pytest.mark.parametrize(
    ("made", "field", "says"),
    [
        (request(prompt="ab"), "prompt", "3 to 5000"),
        (request(prompt="x" * 5001), "prompt", "3 to 5000"),
        (request(model="flux-kontext-pro"), "model", "flux-2/"),
        (request(model="flux-2/Pro image"), "model", "flux-2/"),
        (request(aspect_ratio="21:9"), "aspect_ratio", "3:2"),
        (request(resolution="4K"), "resolution", "1K or 2K"),
        (request(num_images=2), "num_images", "one image"),
        (request(options={"prompt": "other"}), "options", "prompt"),
    ],
)
def test_validation_names_the_field(made: TaskRequest, field: str, says: str) -> None:
    errors = MARKET.validate(made)
    assert list(errors) == [field]
    assert says in errors[field]


def test_the_registry_offers_it_under_the_kie_key() -> None:
    provider = REGISTRY["kie-market"]
    assert isinstance(provider, KieMarket)
    assert provider.key_variable == "KIE_API_KEY"
    assert (provider.min_images, provider.max_images) == (0, 8)
    # Image-to-image ids need 1 to 8 images, text-to-image ids none; shared names follow the images.
    assert provider.image_range("flux-2/flex-image-to-image") == (1, 8)
    assert provider.image_range("flux-2/pro-text-to-image") == (0, 0)
    assert provider.native_model("flux-2-flex", True) == "flux-2/flex-image-to-image"
    assert provider.native_model("flux-2-pro", False) == "flux-2/pro-text-to-image"
    assert provider.model_for(True) == "flux-2/pro-image-to-image"  # the v1 default, unchanged
    assert not provider.inline_images  # data URIs become signed links
    assert provider.pace_group == REGISTRY["kie"].name  # one kie account: one rate limit for both APIs


# -- end to end ------------------------------------------------------------------------------------


@pytest.fixture
def market(start_fake: Callable[..., KieMarketFake]) -> KieMarketFake:
    return start_fake(KieMarketFake)


@pytest.fixture
def market_receiver(market: KieMarketFake, start_receiver: Callable[..., Receiver]) -> Receiver:
    return start_receiver(**market.receiver_env(), RECEIVER_RECONCILE_AFTER=0.3)


def test_three_result_urls_are_stored_in_order(market: KieMarketFake, market_receiver: Receiver) -> None:
    pictures = [png(30 + n, 20, shade=40 * n) for n in range(3)]
    urls = [market.host(f"out{n}.png", picture) for n, picture in enumerate(pictures)]
    task = market_receiver.submit(
        provider="kie-market", prompt="three of them", images=[market.host("in.png")]
    )
    market_id = market.provider_task_id()
    market_receiver.wait_status(str(task["id"]), "submitted")
    sent = market.complete(market_id, urls)
    assert sent is not None and sent.status_code == 200
    assert sent.json() == {"code": 200, "msg": "success"}
    done = market_receiver.wait(str(task["id"]))
    assert done["status"] == "succeeded", done
    images = sorted(done["images"], key=lambda image: image["index"])
    assert [image["index"] for image in images] == [0, 1, 2]
    assert [image["source_url"] for image in images] == urls
    assert [image["sha256"] for image in images] == [hashlib.sha256(p).hexdigest() for p in pictures]
    assert [image["width"] for image in images] == [30, 31, 32]
    assert httpx.get(images[2]["url"]).content == pictures[2]


def test_the_job_on_the_wire(market: KieMarketFake, market_receiver: Receiver) -> None:
    picture = png(16, 16, shade=7)
    data_uri = "data:image/png;base64," + base64.b64encode(picture).decode()
    source = market.host("source.png")
    task = market_receiver.submit(
        provider="kie-market",
        prompt="a lighthouse in snow",
        images=[source, data_uri],
        aspect_ratio="16:9",
        resolution="2K",
        options={"nsfw_checker": True},
    )
    market_id = market.provider_task_id()
    [sent] = market.calls(CREATE_TASK)
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    body = sent.json()
    assert body["model"] == "flux-2/pro-image-to-image"
    assert body["callBackUrl"].startswith(f"{market_receiver.url}/callbacks/kie-market/")
    job_input = body["input"]
    assert job_input["prompt"] == "a lighthouse in snow"
    assert (job_input["aspect_ratio"], job_input["resolution"]) == ("16:9", "2K")
    assert job_input["nsfw_checker"] is True
    first, link = job_input["input_urls"]
    assert first == source
    assert link.startswith(f"{market_receiver.url}/uploads/")
    assert httpx.get(link).content == picture  # kie can fetch the data URI we turned into a link
    done = market_receiver.wait_status(str(task["id"]), "submitted")
    assert done["provider_task_id"] == market_id
    assert done["model"] == "flux-2/pro-image-to-image"


def test_fields_the_market_cannot_take_are_refused(market: KieMarketFake, market_receiver: Receiver) -> None:
    image = market.host("in.png")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"images": [image], "seed": 7}, "seed"),
        ({"images": [image], "output_format": "png"}, "output_format"),
        ({"images": [image], "safety_tolerance": 2}, "safety_tolerance"),
        ({"images": [image], "prompt_upsampling": True}, "prompt_upsampling"),
        ({"model": "flux-2/pro-image-to-image"}, "images"),
        ({"model": "flux-2/flex-text-to-image", "images": [image]}, "images"),
        ({"images": [image] * 9}, "images"),
        ({"images": [image], "prompt": "ab"}, "prompt"),
        ({"images": [image], "model": "flux-kontext-pro"}, "model"),
        ({"images": [image], "aspect_ratio": "21:9"}, "aspect_ratio"),
        ({"images": [image], "num_images": 4}, "num_images"),
    ]
    for extra, field in cases:
        body = {"provider": "kie-market", "prompt": "a fine prompt", **extra}
        refused = market_receiver.alice.post("/v1/tasks", json=body)
        assert refused.status_code == 422, (field, refused.text)
        assert field in refused.json()["error"]["fields"], (field, refused.text)
    model_error = market_receiver.alice.post(
        "/v1/tasks", json={"provider": "kie-market", "prompt": "p" * 9, "images": [image], "model": "x"}
    )
    assert "flux-2/" in model_error.json()["error"]["fields"]["model"]
    assert market.calls(CREATE_TASK) == []


def test_a_sub_key_limit_rejects_at_once(market: KieMarketFake, market_receiver: Receiver) -> None:
    market.script(CREATE_TASK, 200, {"code": 433, "msg": "Sub-key usage limit exceeded"})
    task = market_receiver.submit(provider="kie-market", prompt="p" * 5, images=[market.host("in.png")])
    done = market_receiver.wait(str(task["id"]))
    assert done["error"] == {
        "code": "provider_rejected",
        "message": "Sub-key usage limit exceeded",
        "provider_code": "433",
    }
    assert len(market.calls(CREATE_TASK)) == 1


def test_reconcile_reads_every_link_from_record_info(
    market: KieMarketFake, market_receiver: Receiver
) -> None:
    urls = [market.host("late-a.png", png(10, 10)), market.host("late-b.png", png(12, 10))]
    task = market_receiver.submit(provider="kie-market", prompt="no callback", images=[market.host("i.png")])
    market_id = market.provider_task_id()
    market_receiver.wait_status(str(task["id"]), "submitted")
    market.complete(market_id, urls, deliver=False)
    done = market_receiver.wait(str(task["id"]))
    assert done["status"] == "succeeded", done
    assert [image["source_url"] for image in sorted(done["images"], key=lambda i: i["index"])] == urls
    assert market.calls(RECORD_INFO)[-1].query == {"taskId": market_id}


def test_the_fake_echoes_param_double_encoded(market: KieMarketFake, market_receiver: Receiver) -> None:
    # The fake's callbacks must look like §2.4 for the suite to mean anything.
    market_receiver.submit(provider="kie-market", prompt="check the echo", images=[market.host("e.png")])
    market_id = market.provider_task_id()
    body = market.success_body(market_id, ["https://cdn.example/x.png"])
    param = json.loads(body["data"]["param"])
    assert json.loads(param["input"])["prompt"] == "check the echo"
    assert json.loads(body["data"]["resultJson"]) == {"resultUrls": ["https://cdn.example/x.png"]}
