"""fal.ai (providers.md §5): the translator against the documented payloads, then end to end against the
fal fake (a real HTTP server that signs webhooks with Ed25519 and serves its JWKS)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from receiver.config import ProviderSettings
from receiver.models import CallbackRejected
from receiver.models import ErrorCode
from receiver.models import MalformedCallback
from receiver.models import ProviderRejected
from receiver.models import ProviderUnavailable
from receiver.models import TaskRequest
from receiver.models import TaskSpec
from receiver.providers import Context
from receiver.providers.fal import Fal
from tests.fakes.common import png
from tests.fakes.fal import BIG_SEED
from tests.fakes.fal import KEY
from tests.fakes.fal import FalFake
from tests.fakes.fal import QueuedRequest
from tests.fakes.fal import fal_signature
from tests.fakes.fal import public_jwk
from tests.fakes.fal import wire
from tests.harness import Receiver

QUEUE = "https://queue.fal.run"
JWKS = "https://rest.fal.ai/.well-known/jwks.json"
CALLBACK = "https://receiver.example/callbacks/fal/tok.en-_1"
REQUEST_ID = "80e732af-660e-45cd-bd63-580e4f2a94cc"
fal = Fal()

# §5.2, the real captured wire body, byte for byte (its ids are redacted in the source).
CAPTURED = (
    b'{"error": null, "gateway_request_id": "5057fca7-...", "payload": {"has_nsfw_concepts": [false], '
    b'"images": [{"content_type": "image/jpeg", "height": 1024, '
    b'"url": "https://v3.fal.media/files/lion/O853qAknYZGU8_2QCbJwd.jpeg", "width": 1024}], "prompt": "dog", '
    b'"seed": 17454220438242315174, "timings": {"inference": 2.107286686077714}}, '
    b'"request_id": "5057fca7-...", "status": "OK"}'
)


def context(callback_url: str = CALLBACK, keys: Any = None) -> Context:
    settings = ProviderSettings(api_key="key-id:secret", base_url=QUEUE, extra={"FAL_JWKS_URL": JWKS})
    return Context(settings, callback_url=callback_url, keys=keys)


def spec(
    model: str = "flux-kontext-pro",
    images: tuple[str, ...] = (),
    params: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    provider_task_id: str | None = None,
    state: dict[str, str] | None = None,
) -> TaskSpec:
    return TaskSpec(
        id="tsk_1",
        model=model,
        prompt="Put a donut next to the flour",
        images=images,
        params=params or {},
        options=options or {},
        provider_task_id=provider_task_id,
        state=state or {},
    )


def answer(
    status: int, body: Any, url: str = f"{QUEUE}/fal-ai/flux-pro/kontext", method: str = "POST"
) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Response(status, content=content, request=httpx.Request(method, url))


# -- submit (§5.1) -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "images", "endpoint"),
    [
        ("flux-kontext-pro", (), "fal-ai/flux-pro/kontext/text-to-image"),
        ("flux-kontext-pro", ("https://img.example/a.png",), "fal-ai/flux-pro/kontext"),
        ("flux-kontext-max", (), "fal-ai/flux-pro/kontext/max/text-to-image"),
        ("flux-kontext-max", ("https://img.example/a.png",), "fal-ai/flux-pro/kontext/max"),
        (
            "fal-ai/flux-pro/kontext/max/multi",
            ("https://img.example/a.png",),
            "fal-ai/flux-pro/kontext/max/multi",
        ),
    ],
)
def test_submit_goes_to_the_model_endpoint_with_the_webhook_in_the_query(
    model: str, images: tuple[str, ...], endpoint: str
) -> None:
    request = fal.build_submit(spec(model, images), context())
    assert request.method == "POST"
    parts = urlsplit(str(request.url))
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{QUEUE}/{endpoint}"
    assert parse_qs(parts.query) == {"fal_webhook": [CALLBACK]}
    assert "fal_webhook=https%3A%2F%2Freceiver.example%2Fcallbacks%2Ffal%2Ftok.en-_1" in str(request.url)
    assert request.headers["authorization"] == "Key key-id:secret"
    assert request.headers["content-type"] == "application/json"
    body = json.loads(request.content)
    if not images:
        assert "image_url" not in body and "image_urls" not in body
    elif endpoint.endswith("/multi"):
        assert body["image_urls"] == list(images)
    else:
        assert body["image_url"] == images[0]


def test_submit_body_spells_every_field_as_fal_does() -> None:
    data_uri = "data:image/png;base64," + base64.b64encode(png(4, 4)).decode()
    task = spec(
        "flux-kontext-max",
        (data_uri,),
        params={
            "aspect_ratio": "9:21",
            "output_format": "png",
            "seed": BIG_SEED,
            "safety_tolerance": 5,
            "num_images": 3,
        },
        options={"guidance_scale": 7.5, "enhance_prompt": True, "sync_mode": True},
    )
    body = json.loads(fal.build_submit(task, context()).content)
    assert body == {
        "prompt": "Put a donut next to the flour",
        "image_url": data_uri,  # fal takes data URIs inline
        "aspect_ratio": "9:21",
        "output_format": "png",
        "seed": BIG_SEED,
        "safety_tolerance": "5",  # fal's enum is a string
        "num_images": 3,
        "guidance_scale": 7.5,
        "enhance_prompt": True,
    }
    assert fal.inline_images is True


def test_parse_submit_keeps_the_queue_urls_on_the_queue_origin() -> None:
    documented = {
        "request_id": REQUEST_ID,
        "response_url": f"{QUEUE}/fal-ai/fast-sdxl/requests/{REQUEST_ID}",
        "status_url": f"{QUEUE}/fal-ai/fast-sdxl/requests/{REQUEST_ID}/status",
        "cancel_url": f"{QUEUE}/fal-ai/fast-sdxl/requests/{REQUEST_ID}/cancel",
    }
    submission = fal.parse_submit(answer(200, documented))
    assert submission.provider_task_id == REQUEST_ID
    assert submission.state == {
        "status_url": documented["status_url"],
        "response_url": documented["response_url"],
    }
    elsewhere = {
        **documented,
        "status_url": "https://evil.example/fal-ai/x/requests/1/status",
        "response_url": "http://queue.fal.run/fal-ai/x/requests/1",  # another scheme is another origin
    }
    assert fal.parse_submit(answer(200, elsewhere)).state == {}


def test_parse_submit_keys_on_request_id_not_gateway_request_id() -> None:
    body = {"request_id": "024ca5b1-45d3-4afd-883e-ad3abe2a1c4d", "gateway_request_id": "ffff-retried"}
    assert fal.parse_submit(answer(200, body)).provider_task_id == "024ca5b1-45d3-4afd-883e-ad3abe2a1c4d"


def test_parse_submit_errors() -> None:
    with pytest.raises(ProviderRejected) as rejected:
        fal.parse_submit(answer(401, {"detail": "No user found for Key ID and Secret"}))
    assert rejected.value.message == "HTTP 401: No user found for Key ID and Secret"
    assert rejected.value.provider_code == "401"
    detail = [{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}]
    with pytest.raises(ProviderRejected) as rejected:
        fal.parse_submit(answer(422, {"detail": detail}))
    assert rejected.value.message == "HTTP 422: prompt: field required"
    with pytest.raises(ProviderUnavailable):
        fal.parse_submit(answer(429, {"detail": "concurrency limit"}))
    with pytest.raises(ProviderUnavailable):
        fal.parse_submit(answer(503, b"<html>bad gateway</html>"))
    with pytest.raises(ProviderRejected):
        fal.parse_submit(answer(200, {"status": "IN_QUEUE"}))
    with pytest.raises(ProviderUnavailable):
        fal.parse_submit(answer(200, b"not json"))


# -- validation ----------------------------------------------------------------------------------------


def request(model: str | None = None, options: dict[str, Any] | None = None, **params: Any) -> TaskRequest:
    return TaskRequest("fal", "p", model, (), params, options or {}, None, {})


@pytest.mark.parametrize(
    ("task_request", "field"),
    [
        (request("flux-dev"), "model"),
        (request("fal-ai"), "model"),
        (request("fal-ai/../admin"), "model"),
        (request("fal-ai/flux pro"), "model"),
        (request("fal-ai/flux-pro/kontext?x=1"), "model"),
        (request("https://evil.example/fal-ai/flux-pro"), "model"),
        (request("fal-ai//flux-pro"), "model"),
        (request(aspect_ratio="5:4"), "aspect_ratio"),
        (request(output_format="webp"), "output_format"),
        (request(safety_tolerance=0), "safety_tolerance"),
        (request(safety_tolerance=7), "safety_tolerance"),
        (request(num_images=5), "num_images"),
        (request(options={"sync_mode": False}), "options.sync_mode"),
        (request(options={"guidance_scale": 0.5}), "options.guidance_scale"),
        (request(options={"guidance_scale": "high"}), "options.guidance_scale"),
        (request(options={"guidance_scale": True}), "options.guidance_scale"),
    ],
)
def test_validate_names_what_fal_cannot_take(task_request: TaskRequest, field: str) -> None:
    assert set(fal.validate(task_request)) == {field}


@pytest.mark.parametrize(
    "task_request",
    [
        request(),
        request(
            "flux-kontext-max", aspect_ratio="21:9", output_format="jpeg", safety_tolerance=6, num_images=4
        ),
        request("fal-ai/flux-pro/kontext/max/multi", options={"guidance_scale": 20}),
        request("fal-ai/flux-pro/v1.1-ultra", safety_tolerance=1, num_images=1),
    ],
)
def test_validate_accepts_what_fal_takes(task_request: TaskRequest) -> None:
    assert fal.validate(task_request) == {}


# -- webhook verification (§5.3) -----------------------------------------------------------------------


def key_set(*keys: Ed25519PrivateKey) -> dict[str, Any]:
    return {"keys": [public_jwk(key) for key in keys]}


def test_signature_verifies_with_any_key_of_the_set() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    body = wire({"request_id": REQUEST_ID, "status": "OK", "payload": None})
    headers = {k.lower(): v for k, v in fal_signature(key, REQUEST_ID, body).items()}
    foreign = {"kty": "RSA", "n": "abc", "e": "AQAB"}
    broken = {"kty": "OKP", "crv": "Ed25519", "x": "not*base64"}
    keys = {"keys": [foreign, broken, public_jwk(other), public_jwk(key)]}
    fal.verify_callback(headers, body, spec(provider_task_id=REQUEST_ID), context(keys=keys), time.time())
    fal.verify_callback(headers, body, spec(), context(keys=keys), time.time())  # early: id not known yet


def test_signature_refusals() -> None:
    key = Ed25519PrivateKey.generate()
    body = wire({"request_id": REQUEST_ID, "status": "OK", "payload": None})
    now = time.time()
    good = {k.lower(): v for k, v in fal_signature(key, REQUEST_ID, body, timestamp=int(now)).items()}
    keys = key_set(key)

    def refused(
        headers: dict[str, str], raw: bytes = body, keys: Any = keys, task: TaskSpec | None = None
    ) -> str:
        with pytest.raises(CallbackRejected) as error:
            fal.verify_callback(headers, raw, task or spec(), context(keys=keys), now)
        return str(error.value)

    for name in good:
        assert name in refused({k: v for k, v in good.items() if k != name})
        assert name in refused({**good, name: ""})
    assert "window" in refused(
        {k.lower(): v for k, v in fal_signature(key, REQUEST_ID, body, timestamp=int(now) - 301).items()}
    )
    assert "window" in refused(
        {k.lower(): v for k, v in fal_signature(key, REQUEST_ID, body, timestamp=int(now) + 301).items()}
    )
    assert "not a number" in refused({**good, "x-fal-webhook-timestamp": "1e9"})
    assert "hex" in refused({**good, "x-fal-webhook-signature": "zz" * 64})
    assert "64 bytes" in refused({**good, "x-fal-webhook-signature": good["x-fal-webhook-signature"][:-2]})
    assert "does not verify" in refused(good, raw=body + b" ")  # the body hash is signed
    assert "does not verify" in refused({**good, "x-fal-webhook-user-id": "someone-else"})
    assert "does not verify" in refused(good, keys=key_set(Ed25519PrivateKey.generate()))
    # No key set (the JWKS could not be fetched) or an empty one: fail closed.
    nothings: list[Any] = [None, {}, {"keys": []}, {"keys": "x"}, []]
    for nothing in nothings:
        assert "no fal public key" in refused(good, keys=nothing)
    # The header's request id must be the body's, and this task's.
    other_body = wire({"request_id": "someone-elses-request", "status": "OK", "payload": None})
    signed_other = {k.lower(): v for k, v in fal_signature(key, REQUEST_ID, other_body).items()}
    assert "request_id" in refused(signed_other, raw=other_body)
    assert "not this task's" in refused(good, task=spec(provider_task_id="another-request"))


def test_key_set_url_is_the_configured_jwks() -> None:
    assert fal.key_set_url(context().settings) == JWKS


# -- callbacks (§5.2) ----------------------------------------------------------------------------------


def test_the_real_captured_body_parses_with_its_huge_seed() -> None:
    outcome = fal.parse_callback(CAPTURED)
    assert outcome.state == "succeeded"
    assert outcome.provider_task_id == "5057fca7-..."
    assert outcome.image_urls == ("https://v3.fal.media/files/lion/O853qAknYZGU8_2QCbJwd.jpeg",)
    assert json.loads(CAPTURED)["payload"]["seed"] == 17454220438242315174  # exact, not a float


def test_success_keeps_every_image_in_order() -> None:
    urls = [f"https://v3.fal.media/files/{n}.png" for n in "abc"]
    outcome = fal.parse_callback(FalFake.envelope(REQUEST_ID, "OK", FalFake.output(urls)))
    assert outcome.image_urls == tuple(urls)


def test_error_callback_carries_error_and_detail() -> None:
    body = {
        "request_id": REQUEST_ID,
        "gateway_request_id": REQUEST_ID,
        "status": "ERROR",
        "error": "Invalid status code: 422",
        "payload": {
            "detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}]
        },
    }
    outcome = fal.parse_callback(json.dumps(body).encode())
    assert outcome.state == "failed" and outcome.error is not None
    assert outcome.error.code == ErrorCode.GENERATION_FAILED
    assert outcome.error.message == "Invalid status code: 422; prompt: field required"
    assert outcome.error.provider_code == "value_error.missing"
    body["payload"] = {"detail": "Internal server error"}
    error = fal.parse_callback(json.dumps(body).encode()).error
    assert error is not None and error.message == "Invalid status code: 422; Internal server error"
    body["payload"] = {
        "detail": [
            {
                "loc": ["body"],
                "msg": "The content was flagged by a content checker.",
                "type": "content_policy_violation",
            }
        ]
    }
    error = fal.parse_callback(json.dumps(body).encode()).error
    assert error is not None and error.code == ErrorCode.CONTENT_MODERATED
    assert error.message.endswith("The content was flagged by a content checker.")


def test_payload_error_asks_the_queue_for_the_result_at_once() -> None:
    message = (
        "Response payload is not JSON serializable. Either return a JSON serializable object or use the "
        "queue endpoint to retrieve the response."
    )
    body = {
        "request_id": REQUEST_ID,
        "gateway_request_id": REQUEST_ID,
        "status": "OK",
        "payload": None,
        "payload_error": message,
    }
    outcome = fal.parse_callback(json.dumps(body).encode())
    # fal's webhooks doc: the request succeeded; its result waits at the queue's result endpoint.
    assert (outcome.state, outcome.ask_now, outcome.provider_task_id) == ("pending", True, REQUEST_ID)
    assert "not JSON serializable" in outcome.detail


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"status": "OK", "payload": {"images": []}}',
        b'{"request_id": "r", "status": "MAYBE"}',
        b'{"request_id": "r"}',
        b'{"request_id": "r", "status": "OK", "payload": [1]}',
    ],
)
def test_malformed_callbacks(raw: bytes) -> None:
    with pytest.raises(MalformedCallback):
        fal.parse_callback(raw)


def test_success_without_images_is_a_failure() -> None:
    outcome = fal.parse_callback(FalFake.envelope(REQUEST_ID, "OK", {"images": [], "seed": 1}))
    assert outcome.state == "failed"


# -- reconcile (§5.5) ----------------------------------------------------------------------------------

STATUS_URL = f"{QUEUE}/fal-ai/flux-pro/requests/{REQUEST_ID}/status"
RESULT_URL = f"{QUEUE}/fal-ai/flux-pro/requests/{REQUEST_ID}"


def test_build_status_uses_the_kept_url_or_builds_owner_alias() -> None:
    assert fal.build_status(spec(), context()) is None
    kept = fal.build_status(
        spec(provider_task_id=REQUEST_ID, state={"status_url": STATUS_URL + "?logs=0"}), context()
    )
    assert kept is not None and str(kept.url) == STATUS_URL + "?logs=0"
    assert kept.headers["authorization"] == "Key key-id:secret"
    for state in ({}, {"status_url": "https://evil.example/fal-ai/flux-pro/requests/x/status"}):
        built = fal.build_status(
            spec("flux-kontext-max", provider_task_id=REQUEST_ID, state=state), context()
        )
        assert built is not None and str(built.url) == STATUS_URL  # owner/alias only, not /kontext/max
    custom = fal.build_status(spec("someone/app/sub", provider_task_id="r1"), context())
    assert custom is not None and str(custom.url) == f"{QUEUE}/someone/app/requests/r1/status"


def status_answer(body: Any, status: int = 200) -> httpx.Response:
    request = httpx.Request("GET", STATUS_URL, headers={"Authorization": "Key key-id:secret"})
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Response(status, content=content, request=request)


def test_status_in_queue_and_in_progress_are_pending() -> None:
    queued = {
        "status": "IN_QUEUE",
        "request_id": REQUEST_ID,
        "queue_position": 3,
        "response_url": RESULT_URL,
        "status_url": STATUS_URL,
    }
    outcome = fal.parse_status(status_answer(queued))
    assert not isinstance(outcome, httpx.Request)
    assert (outcome.state, outcome.provider_task_id, outcome.detail) == (
        "pending",
        REQUEST_ID,
        "IN_QUEUE at 3",
    )
    running = fal.parse_status(status_answer({"status": "IN_PROGRESS", "request_id": REQUEST_ID, "logs": []}))
    assert not isinstance(running, httpx.Request) and running.state == "pending"


def test_completed_is_not_success_by_itself_it_asks_for_the_result() -> None:
    completed = {
        "status": "COMPLETED",
        "request_id": REQUEST_ID,
        "response_url": RESULT_URL,
        "status_url": STATUS_URL,
        "logs": None,
        "metrics": {"inference_time": 2.1},
    }
    follow = fal.parse_status(status_answer(completed))
    assert isinstance(follow, httpx.Request)
    assert (follow.method, str(follow.url)) == ("GET", RESULT_URL)
    assert follow.headers["authorization"] == "Key key-id:secret"
    # A response_url off the queue's origin would get our key: the result URL is derived instead.
    follow = fal.parse_status(status_answer({**completed, "response_url": "https://evil.example/steal"}))
    assert isinstance(follow, httpx.Request) and str(follow.url) == RESULT_URL


def test_completed_with_an_error_is_a_failure() -> None:
    body = {
        "status": "COMPLETED",
        "request_id": REQUEST_ID,
        "error": "Request timed out",
        "error_type": "request_timeout",
    }
    outcome = fal.parse_status(status_answer(body))
    assert not isinstance(outcome, httpx.Request) and outcome.error is not None
    assert outcome.state == "failed"
    assert (outcome.error.code, outcome.error.message, outcome.error.provider_code) == (
        ErrorCode.GENERATION_FAILED,
        "Request timed out",
        "request_timeout",
    )


def test_status_query_errors_are_retried_later() -> None:
    with pytest.raises(ProviderRejected):
        fal.parse_status(status_answer({"detail": "Request not found"}, 404))
    with pytest.raises(ProviderUnavailable):
        fal.parse_status(status_answer(b"upstream", 502))


def result_answer(body: Any, status: int = 200) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Response(status, content=content, request=httpx.Request("GET", RESULT_URL))


def test_the_result_decides() -> None:
    urls = [f"https://v3b.fal.media/files/{n}.jpeg" for n in "xy"]
    outcome = fal.parse_status(result_answer(FalFake.output(urls)))
    assert not isinstance(outcome, httpx.Request)
    assert (outcome.state, outcome.provider_task_id, outcome.image_urls) == (
        "succeeded",
        REQUEST_ID,
        tuple(urls),
    )
    assert json.loads(json.dumps(FalFake.output(urls)))["seed"] == BIG_SEED

    flagged = [
        {
            "loc": ["body", "prompt"],
            "msg": "flagged",
            "type": "content_policy_violation",
            "url": "https://docs.fal.ai/errors#content_policy_violation",
        }
    ]
    for status, detail, code, message in [
        (422, flagged, ErrorCode.CONTENT_MODERATED, "prompt: flagged"),
        (500, "Internal server error", ErrorCode.GENERATION_FAILED, "Internal server error"),
        (
            504,
            [{"loc": ["body"], "msg": "timed out", "type": "generation_timeout"}],
            ErrorCode.GENERATION_FAILED,
            "timed out",
        ),
    ]:
        failed = fal.parse_status(result_answer({"detail": detail}, status))
        assert not isinstance(failed, httpx.Request) and failed.error is not None
        assert (failed.state, failed.error.code, failed.error.message) == ("failed", code, message)
    # A fetch that failed in passing is asked again later, not taken as the request's failure.
    with pytest.raises(ProviderUnavailable):
        fal.parse_status(result_answer({"detail": "rate limited"}, 429))
    with pytest.raises(ProviderUnavailable):
        fal.parse_status(result_answer(b"<html>bad gateway</html>", 502))


# -- end to end: the receiver and the fal fake over HTTP -------------------------------------------------


@pytest.fixture
def fake(start_fake: Callable[..., FalFake]) -> FalFake:
    return start_fake(FalFake)


@pytest.fixture
def receiver(fake: FalFake, start_receiver: Callable[..., Receiver]) -> Receiver:
    return start_receiver(**fake.receiver_env(), RECEIVER_RECONCILE_AFTER=0.2)


def test_models_map_to_endpoints_the_fake_sees(fake: FalFake, receiver: Receiver) -> None:
    source = fake.host("in.png")
    data_uri = "data:image/png;base64," + base64.b64encode(png(8, 8)).decode()
    cases: list[tuple[dict[str, Any], str, str | None]] = [
        ({}, "/fal-ai/flux-pro/kontext/text-to-image", None),
        ({"images": [source]}, "/fal-ai/flux-pro/kontext", source),
        ({"model": "flux-kontext-max"}, "/fal-ai/flux-pro/kontext/max/text-to-image", None),
        ({"model": "flux-kontext-max", "images": [data_uri]}, "/fal-ai/flux-pro/kontext/max", data_uri),
        (
            {"model": "fal-ai/flux-pro/kontext/max/multi", "images": [source]},
            "/fal-ai/flux-pro/kontext/max/multi",
            None,
        ),
    ]
    for body, path, image in cases:
        task_id, request_id = receiver.submitted(fake, safety_tolerance=2, seed=BIG_SEED, **body)
        sent = [r for r in fake.requests if r.method == "POST"][-1]
        assert sent.path == path
        assert sent.headers["authorization"] == f"Key {KEY}"
        assert sent.query["fal_webhook"] == receiver.callback_url("fal", task_id)
        assert sent.json()["safety_tolerance"] == "2"
        assert sent.json()["seed"] == BIG_SEED
        assert sent.json().get("image_url") == image
        assert fake.queue[request_id].endpoint == path.lstrip("/")
    assert sent.json()["image_urls"] == [source]
    # The status query goes to owner/alias only, as fal's own status_url says.
    fake.complete(request_id, [fake.host("multi.png")], deliver=False)
    assert receiver.wait(task_id)["status"] == "succeeded"
    assert fake.calls(f"/fal-ai/flux-pro/requests/{request_id}/status")
    assert fake.calls(f"/fal-ai/flux-pro/requests/{request_id}")


def test_requests_fal_cannot_take_are_a_422_naming_the_field(receiver: Receiver) -> None:
    values_fal_refuses = {
        "model": "fal-ai/../../admin",
        "aspect_ratio": "5:4",
        "safety_tolerance": 9,
        "num_images": 5,
        "options": {"sync_mode": True},
    }
    fields_fal_lacks = {"resolution": "2K"}  # prompt_upsampling is Kontext's enhance_prompt on fal
    # The shell names the fields fal does not have at all; fal's validate names the values it refuses.
    for extra, named in [
        ({**values_fal_refuses, **fields_fal_lacks}, set(fields_fal_lacks)),
        (values_fal_refuses, set(values_fal_refuses) - {"options"} | {"options.sync_mode"}),
    ]:
        response = receiver.alice.post("/v1/tasks", json={"provider": "fal", "prompt": "x", **extra})
        assert response.status_code == 422
        assert set(response.json()["error"]["fields"]) == named
    assert receiver.alice.get("/v1/tasks").json()["items"] == []  # nothing was created


def test_the_real_captured_body_with_a_fresh_signature(fake: FalFake, receiver: Receiver) -> None:
    task_id, request_id = receiver.submitted(fake)
    url = fake.host("O853qAknYZGU8_2QCbJwd.jpeg")
    body = CAPTURED.replace(b"5057fca7-...", request_id.encode()).replace(
        b"https://v3.fal.media/files/lion/O853qAknYZGU8_2QCbJwd.jpeg", url.encode()
    )
    assert b'"seed": 17454220438242315174' in body
    answer = fake.deliver(request_id, body)
    assert answer.status_code == 200, answer.text
    done = receiver.wait(task_id)
    assert done["status"] == "succeeded", done
    assert done["provider_task_id"] == request_id
    assert done["images"][0]["source_url"] == url


def test_key_rotation_is_accepted_after_a_refetch(
    fake: FalFake, start_receiver: Callable[..., Receiver]
) -> None:
    # The shell refetches at most once a minute; the setting shrinks that minute for the test.
    receiver = start_receiver(**fake.receiver_env(), RECEIVER_KEY_SET_REFRESH=0)
    first, first_id = receiver.submitted(fake)
    assert fake.complete(first_id, [fake.host("one.png")]).status_code == 200  # type: ignore[union-attr]
    assert receiver.wait(first)["status"] == "succeeded"
    assert len(fake.calls("/.well-known/jwks.json")) == 1

    fake.rotate()
    second, second_id = receiver.submitted(fake)
    answer = fake.complete(second_id, [fake.host("two.png")])
    assert answer is not None and answer.status_code == 200, answer and answer.text
    assert receiver.wait(second)["status"] == "succeeded"
    assert len(fake.calls("/.well-known/jwks.json")) == 2
    # The retired key no longer verifies anything.
    third, third_id = receiver.submitted(fake)
    body = fake.envelope(third_id, "OK", fake.output([fake.host("three.png")]))
    old = fal_signature(Ed25519PrivateKey.generate(), third_id, body)
    assert fake.deliver(third_id, body, old).status_code == 401
    assert receiver.alice.get(f"/v1/tasks/{third}").json()["status"] == "submitted"


def test_unreachable_jwks_fails_closed(fake: FalFake, receiver: Receiver) -> None:
    fake.jwks_down = True
    task_id, request_id = receiver.submitted(fake)
    answer = fake.complete(request_id, [fake.host("x.png")])
    assert answer is not None and answer.status_code == 401
    assert answer.json()["error"]["code"] == "bad_signature"
    # (Reconcile may meanwhile find the completed request on its own; the refused callback changed nothing.)
    refused = [e for e in receiver.events(task_id) if e["kind"] == "callback"]
    assert refused and not refused[0]["verified"] and "no fal public key" in refused[0]["summary"]
    assert not refused[0]["change"]
    assert fake.calls("/.well-known/jwks.json")


def test_signature_refusals_end_to_end(fake: FalFake, receiver: Receiver) -> None:
    task_id, request_id = receiver.submitted(fake)
    body = fake.envelope(request_id, "OK", fake.output([fake.host("s.png")]))
    good = fake.signed(request_id, body)
    other = fake.envelope("another-request", "OK", fake.output([fake.host("s.png")]))
    refusals: dict[str, tuple[bytes, dict[str, str]]] = {
        "stale": (body, fake.signed(request_id, body, timestamp=int(time.time()) - 301)),
        "header id is not the body's": (other, fake.signed(request_id, other)),
        "body tampered": (body.replace(b"s.png", b"t.png"), good),
        **{f"no {name}": (body, {k: v for k, v in good.items() if k != name}) for name in good},
    }
    for reason, (raw, headers) in refusals.items():
        answer = fake.deliver(request_id, raw, headers)
        assert answer.status_code == 401, reason
        assert answer.json()["error"]["code"] == "bad_signature", reason
    assert receiver.alice.get(f"/v1/tasks/{task_id}").json()["status"] == "submitted"
    assert fake.deliver(request_id, body, good).status_code == 200
    assert receiver.wait(task_id)["status"] == "succeeded"


def test_error_callback_with_payload_detail(fake: FalFake, receiver: Receiver) -> None:
    task_id, request_id = receiver.submitted(fake)
    detail = [
        {"loc": ["body", "image_url"], "msg": "Could not download the image", "type": "file_download_error"}
    ]
    body = fake.envelope(request_id, "ERROR", {"detail": detail}, error="Invalid status code: 422")
    assert fake.deliver(request_id, body).status_code == 200
    done = receiver.wait(task_id)
    assert done["error"] == {
        "code": "generation_failed",
        "message": "Invalid status code: 422; image_url: Could not download the image",
        "provider_code": "file_download_error",
    }


def test_payload_error_fetches_the_result_from_the_queue_at_once(
    start_fake: Callable[..., FalFake], start_receiver: Callable[..., Receiver]
) -> None:
    fake = start_fake(FalFake, webhook_answer=True)  # and no queue URLs in the submit answer
    # Reconcile would not run on its own for an hour: only the callback's news can make it ask now.
    receiver = start_receiver(**fake.receiver_env(), RECEIVER_RECONCILE_AFTER=3600)
    task_id, request_id = receiver.submitted(fake)
    assert (
        fake.complete_payload_error(request_id, [fake.host("p1.png"), fake.host("p2.png")]).status_code == 200
    )
    done = receiver.wait(task_id)
    assert done["status"] == "succeeded", done
    assert [image["source_url"] for image in done["images"]] == [
        f"{fake.url}/files/p1.png",
        f"{fake.url}/files/p2.png",
    ]
    # The queue URLs were built from the endpoint (owner/alias only), as fal documents them.
    assert fake.calls(f"/fal-ai/flux-pro/requests/{request_id}/status")
    assert fake.calls(f"/fal-ai/flux-pro/requests/{request_id}")


def test_flagged_images_are_not_stored(fake: FalFake, receiver: Receiver) -> None:
    task_id, request_id = receiver.submitted(fake, num_images=2)
    black, kept = fake.host("black.png"), fake.host("kept.png")
    assert fake.complete_flagged(request_id, [black, kept], [True, False]).status_code == 200
    done = receiver.wait(task_id)
    assert done["status"] == "succeeded"
    assert [image["source_url"] for image in done["images"]] == [kept]
    assert fake.files["black.png"].fetches == 0

    task_id, request_id = receiver.submitted(fake)
    assert fake.complete_flagged(request_id, [fake.host("all-black.png")], [True]).status_code == 200
    done = receiver.wait(task_id)
    assert done["error"]["code"] == "content_moderated"
    assert done["error"]["provider_code"] == "has_nsfw_concepts"
    assert done["images"] == []
    assert fake.files["all-black.png"].fetches == 0


def test_completed_with_error_found_by_reconcile(fake: FalFake, receiver: Receiver) -> None:
    task_id, request_id = receiver.submitted(fake)
    queued = fake.queue[request_id]
    queued.status = "COMPLETED"
    queued.status_extra = {"error": "Request timed out after 300s", "error_type": "request_timeout"}
    done = receiver.wait(task_id)
    assert done["error"] == {
        "code": "generation_failed",
        "message": "Request timed out after 300s",
        "provider_code": "request_timeout",
    }
    assert not fake.calls(f"/fal-ai/flux-pro/requests/{request_id}")  # no result fetched


def test_reconcile_follows_status_to_the_result(fake: FalFake, receiver: Receiver) -> None:
    task_id, request_id = receiver.submitted(fake)
    status_path = f"/fal-ai/flux-pro/requests/{request_id}/status"
    fake.wait_for(lambda: bool(fake.calls(status_path)))
    fake.queue[request_id].status = "IN_PROGRESS"
    fake.wait_for(lambda: len(fake.calls(status_path)) >= 2)
    urls = [fake.host("r0.png", png(10, 10)), fake.host("r1.png", png(12, 12))]
    fake.complete(request_id, urls, deliver=False)
    done = receiver.wait(task_id)
    assert done["status"] == "succeeded", done
    assert [image["source_url"] for image in done["images"]] == urls
    assert [(image["width"], image["height"]) for image in done["images"]] == [(10, 10), (12, 12)]
    polls = [e["summary"] for e in receiver.events(task_id) if e["kind"] == "poll"]
    assert any("IN_QUEUE" in summary for summary in polls)
    result = fake.calls(f"/fal-ai/flux-pro/requests/{request_id}")
    assert result and result[0].headers["authorization"] == f"Key {KEY}"


def test_queue_urls_off_the_queue_origin_are_not_followed(fake: FalFake, receiver: Receiver) -> None:
    fake.queue["abc-123"] = QueuedRequest("fal-ai/flux-pro/kontext/text-to-image", "", {})
    fake.script(
        "/fal-ai/flux-pro/kontext/text-to-image",
        200,
        {
            "request_id": "abc-123",
            "status_url": "https://evil.example/steal/status",
            "response_url": "https://evil.example/steal",
        },
    )
    task = receiver.submit(provider="fal", prompt="p")
    receiver.wait_status(str(task["id"]), "submitted")
    fake.complete("abc-123", [fake.host("safe.png")], deliver=False)
    assert receiver.wait(str(task["id"]))["status"] == "succeeded"
    assert fake.calls("/fal-ai/flux-pro/requests/abc-123/status")
