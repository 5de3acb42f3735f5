"""The app-facing API over real HTTP: validation, tenants, idempotency, waiting, paging, images, uploads."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from receiver.openapi import openapi_document
from tests.fakes.common import png
from tests.harness import Receiver


@pytest.fixture
def receiver(start_receiver: Callable[..., Receiver]) -> Receiver:
    return start_receiver()


def error_fields(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error"}
    assert {"code", "message", "fields"} <= set(body["error"])
    fields: dict[str, str] = body["error"]["fields"]
    return fields


def test_every_v1_call_needs_a_key(receiver: Receiver) -> None:
    for method, path in [
        ("GET", "/v1/tasks"),
        ("POST", "/v1/tasks"),
        ("GET", "/v1/tasks/tsk_x"),
        ("POST", "/v1/uploads"),
        ("GET", "/v1/tasks/tsk_x/events"),
    ]:
        for headers in (
            {},
            {"Authorization": "Bearer nope-not-a-key-at-all"},
            {"Authorization": "Basic abc"},
        ):
            answer = receiver.anon.request(method, path, headers=headers)
            assert answer.status_code == 401, (method, path, headers)
            assert answer.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, {"provider", "prompt"}),
        ({"provider": "nope", "prompt": "x"}, {"provider"}),
        ({"provider": "kie", "prompt": "x"}, {"provider"}),
        ({"provider": "sandbox", "prompt": ""}, {"prompt"}),
        ({"provider": "sandbox", "prompt": "x" * 10_001}, {"prompt"}),
        ({"provider": "sandbox", "prompt": "x", "seed": "7"}, {"seed"}),
        ({"provider": "sandbox", "prompt": "x", "seed": True}, {"seed"}),
        ({"provider": "sandbox", "prompt": "x", "seed": -1}, {"seed"}),
        ({"provider": "sandbox", "prompt": "x", "prompt_upsampling": True}, {"prompt_upsampling"}),
        ({"provider": "sandbox", "prompt": "x", "resolution": "2K"}, {"resolution"}),
        ({"provider": "sandbox", "prompt": "x", "aspect_ratio": "wide"}, {"aspect_ratio"}),
        ({"provider": "sandbox", "prompt": "x", "num_images": 9}, {"num_images"}),
        ({"provider": "sandbox", "prompt": "x", "model": "flux-kontext-pro"}, {"model"}),
        ({"provider": "sandbox", "prompt": "x", "images": ["ftp://a/b.png"]}, {"images[0]"}),
        (
            {"provider": "sandbox", "prompt": "x", "images": ["https://a/1.png", "https://a/2.png"]},
            {"images"},
        ),
        ({"provider": "sandbox", "prompt": "x", "images": "https://a/1.png"}, {"images"}),
        ({"provider": "sandbox", "prompt": "x", "images": ["data:image/png;base64,!!!"]}, {"images[0]"}),
        ({"provider": "sandbox", "prompt": "x", "images": ["data:image/png;base64,aGVsbG8="]}, {"images[0]"}),
        ({"provider": "sandbox", "prompt": "x", "metadata": {"big": "x" * 17_000}}, {"metadata"}),
        ({"provider": "sandbox", "prompt": "x", "metadata": [1]}, {"metadata"}),
        ({"provider": "sandbox", "prompt": "x", "notify_url": "mailto:me@example.com"}, {"notify_url"}),
        ({"provider": "sandbox", "prompt": "x", "options": {"outcome": "explode"}}, {"options"}),
        ({"provider": "sandbox", "prompt": "x", "colour": "red"}, {"colour"}),
    ],
)
def test_validation_names_each_bad_field_and_changes_nothing(
    receiver: Receiver, body: dict[str, Any], fields: set[str]
) -> None:
    answer = receiver.alice.post("/v1/tasks", json=body)
    assert answer.status_code == 422, answer.text
    named = error_fields(answer)
    assert set(named) == fields, named
    assert receiver.alice.get("/v1/tasks").json()["items"] == []


def test_unconfigured_provider_names_its_variable(receiver: Receiver) -> None:
    answer = receiver.alice.post("/v1/tasks", json={"provider": "kie", "prompt": "x"})
    assert "KIE_API_KEY" in error_fields(answer)["provider"]


def test_bodies_that_are_not_json_objects(receiver: Receiver) -> None:
    for raw in (b"not json", b"[1, 2]", b"\xff\xfe"):
        answer = receiver.alice.post("/v1/tasks", content=raw)
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "invalid_json"


def test_private_urls_are_refused_unless_allowed(start_receiver: Callable[..., Receiver]) -> None:
    strict = start_receiver("strict", RECEIVER_ALLOW_PRIVATE_URLS=0)
    for url in (
        "http://127.0.0.1:9/x.png",
        "http://10.0.0.8/x.png",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/x.png",
        "http://localhost/x.png",
    ):
        answer = strict.alice.post("/v1/tasks", json={"provider": "sandbox", "prompt": "x", "images": [url]})
        assert answer.status_code == 422, url
        assert "non-public" in error_fields(answer)["images[0]"]
        answer = strict.alice.post(
            "/v1/tasks", json={"provider": "sandbox", "prompt": "x", "notify_url": url}
        )
        assert "non-public" in error_fields(answer)["notify_url"]


def test_tenants_see_only_their_own_tasks(receiver: Receiver) -> None:
    task = receiver.submit(provider="sandbox", prompt="mine")
    done = receiver.wait(task["id"])
    assert done["status"] == "succeeded"
    for path in (
        f"/v1/tasks/{task['id']}",
        f"/v1/tasks/{task['id']}/events",
        f"/v1/tasks/{task['id']}/images/0",
    ):
        answer = receiver.bob.get(path)
        assert answer.status_code == 404, path
        assert answer.json()["error"]["code"] == "not_found"
    assert receiver.bob.get("/v1/tasks").json()["items"] == []
    assert receiver.alice.get(f"/v1/tasks/{task['id']}/images/0").status_code == 200


def test_idempotency_key_per_tenant(receiver: Receiver) -> None:
    body = {"provider": "sandbox", "prompt": "once", "seed": 3}
    first = receiver.alice.post("/v1/tasks", json=body, headers={"Idempotency-Key": "k1"})
    again = receiver.alice.post("/v1/tasks", json=body, headers={"Idempotency-Key": "k1"})
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = receiver.alice.post("/v1/tasks", json={**body, "seed": 4}, headers={"Idempotency-Key": "k1"})
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_conflict"
    bobs = receiver.bob.post("/v1/tasks", json=body, headers={"Idempotency-Key": "k1"})
    assert bobs.status_code == 202
    assert bobs.json()["id"] != first.json()["id"]
    assert len(receiver.alice.get("/v1/tasks").json()["items"]) == 1


def test_wait_returns_when_the_task_ends_or_the_time_is_up(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver(RECEIVER_SANDBOX_DELAY=0.5)
    task = receiver.submit(provider="sandbox", prompt="wait for me")
    started = time.monotonic()
    done = receiver.alice.get(f"/v1/tasks/{task['id']}", params={"wait": 20}).json()
    assert done["status"] == "succeeded"
    assert time.monotonic() - started < 10
    slow = receiver.submit(provider="sandbox", prompt="slow", options={"delay": 30})
    started = time.monotonic()
    pending = receiver.alice.get(f"/v1/tasks/{slow['id']}", params={"wait": 0.5}).json()
    assert pending["status"] == "submitted"
    assert 0.4 < time.monotonic() - started < 5
    for bad in ("61", "-1", "soon"):
        answer = receiver.alice.get(f"/v1/tasks/{slow['id']}", params={"wait": bad})
        assert answer.status_code == 422
        assert "wait" in error_fields(answer)


def test_pagination_and_filters(receiver: Receiver) -> None:
    ids = [receiver.submit(provider="sandbox", prompt=f"p{i}")["id"] for i in range(5)]
    failing = receiver.submit(provider="sandbox", prompt="bad", options={"outcome": "generation_failed"})
    for task_id in [*ids, failing["id"]]:
        receiver.wait(task_id)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = receiver.alice.get("/v1/tasks", params=params).json()
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [failing["id"], *reversed(ids)]  # newest first, each once
    failed = receiver.alice.get("/v1/tasks", params={"status": "failed"}).json()["items"]
    assert [t["id"] for t in failed] == [failing["id"]]
    assert len(receiver.alice.get("/v1/tasks", params={"provider": "sandbox"}).json()["items"]) == 6
    assert receiver.alice.get("/v1/tasks", params={"provider": "kie"}).json()["items"] == []
    for params in (
        {"status": "done"},
        {"status": ""},
        {"provider": "x"},
        {"provider": ""},
        {"limit": 0},
        {"limit": 201},
        {"limit": "ten"},
        {"cursor": "zzz"},
        {"cursor": ""},
    ):
        answer = receiver.alice.get("/v1/tasks", params=params)
        assert answer.status_code == 422
        assert set(error_fields(answer)) == set(params)


@pytest.fixture
def media_receiver(start_receiver: Callable[..., Receiver], media_env: dict[str, str]) -> Receiver:
    """The receiver on each media store (the data dir, a bucket), for the tests of images and uploads."""
    return start_receiver(**media_env)


def test_images_by_key_and_by_signed_link(media_receiver: Receiver) -> None:
    receiver = media_receiver
    done = receiver.wait(receiver.submit(provider="sandbox", prompt="pic", aspect_ratio="9:16")["id"])
    [image] = done["images"]
    assert (image["width"], image["height"]) == (432, 768)
    by_link = httpx.get(image["url"])
    assert by_link.status_code == 200
    assert by_link.headers["content-type"] == "image/png"
    assert by_link.headers["content-length"] == str(image["size"])
    assert by_link.headers["etag"] == f'"{image["sha256"]}"'
    tampered = image["url"].replace("signature=", "signature=x")
    assert httpx.get(tampered).status_code == 401
    expired = image["url"].split("?")[0] + "?expires=1&signature=abc"
    assert httpx.get(expired).status_code == 401
    path = f"/v1/tasks/{done['id']}/images/0"
    assert receiver.alice.get(path).content == by_link.content
    assert receiver.alice.get(path, headers={"If-None-Match": by_link.headers["etag"]}).status_code == 304
    assert receiver.alice.get(f"/v1/tasks/{done['id']}/images/1").status_code == 404


def test_uploads(media_receiver: Receiver) -> None:
    receiver = media_receiver
    picture = png(30, 20)
    answer = receiver.alice.post("/v1/uploads", content=picture, headers={"Content-Type": "image/png"})
    assert answer.status_code == 201
    upload = answer.json()
    assert httpx.get(upload["url"]).content == picture
    assert (
        receiver.alice.post(
            "/v1/uploads", content=b"GIF89a....", headers={"Content-Type": "image/gif"}
        ).status_code
        == 415
    )
    assert (
        receiver.alice.post(
            "/v1/uploads", content=picture, headers={"Content-Type": "text/plain"}
        ).status_code
        == 415
    )
    # Raw bytes as such are taken too; what they are is read from the bytes, never from the header.
    raw = {"Content-Type": "application/octet-stream"}
    assert (
        receiver.alice.post("/v1/uploads", content=picture, headers=raw).json()["content_type"] == "image/png"
    )
    assert receiver.alice.post("/v1/uploads", content=b"GIF89a....", headers=raw).status_code == 415
    task = receiver.submit(provider="sandbox", prompt="edit", images=[upload["url"]])
    assert receiver.wait(task["id"])["status"] == "succeeded"
    data_uri = "data:image/png;base64," + base64.b64encode(picture).decode()
    assert receiver.wait(receiver.submit(provider="sandbox", prompt="e", images=[data_uri])["id"])[
        "status"
    ] == ("succeeded")


def test_upload_over_the_cap(start_receiver: Callable[..., Receiver], media_env: dict[str, str]) -> None:
    receiver = start_receiver(RECEIVER_MAX_IMAGE_BYTES=4096, **media_env)
    big = png(400, 400, shade=3) + b"\x00" * 8000
    answer = receiver.alice.post("/v1/uploads", content=big, headers={"Content-Type": "image/png"})
    assert answer.status_code == 413


def test_health_readiness_metrics(receiver: Receiver) -> None:
    assert receiver.anon.get("/healthz").json() == {"status": "ok"}
    ready = {"status": "ready", "checks": {"database": "ok", "media": "ok"}}
    assert receiver.anon.get("/readyz").json() == ready
    receiver.wait(receiver.submit(provider="sandbox", prompt="m")["id"])
    text = receiver.anon.get("/metrics").text
    assert 'receiver_tasks{provider="sandbox",status="succeeded"} 1.0' in text
    assert 'receiver_callbacks_total{provider="sandbox",result="accepted"}' in text


def test_unknown_routes_answer_json(receiver: Receiver) -> None:
    answer = receiver.anon.get("/nothing/here")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"
    assert receiver.anon.delete("/v1/tasks").status_code == 405


def test_openapi_documents_every_public_route_and_no_internal_one(receiver: Receiver) -> None:
    document = receiver.anon.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    described = {(path, method.upper()) for path, item in document["paths"].items() for method in item}
    public: set[tuple[str, str]] = set()
    internal: set[tuple[str, str]] = set()
    for route in receiver.app.routes:
        assert isinstance(route, Route)
        path = route.path.replace("{index:int}", "{index}")
        for method in route.methods or ():
            if method != "HEAD":
                (public if route.include_in_schema else internal).add((path, method))
    assert described == public
    # Providers, the sandbox, the console (with / and its icon) and Prometheus are not part of the API
    # apps build on.
    assert internal and all(
        path in ("/", "/favicon.ico") or path.startswith(("/callbacks/", "/sandbox/", "/ui", "/metrics"))
        for path, _ in internal
    )
    assert not any(path.startswith(("/callbacks/", "/sandbox/", "/ui", "/metrics")) for path, _ in public)
    assert openapi_document("http://x")["servers"] == [{"url": "http://x"}]


def test_a_405_says_what_is_allowed_and_a_401_how_to_authenticate(receiver: Receiver) -> None:
    refused = receiver.alice.delete("/v1/tasks")
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET, HEAD, POST"  # both routes at the path, not one of them
    assert refused.json()["error"]["code"] == "method_not_allowed"
    assert receiver.alice.put("/v1/uploads").headers["allow"] == "POST"
    for path in ("/callbacks/kie/x", "/callbacks/apimart/x/callback"):  # plain ASGI routes: same answers
        refused = receiver.anon.get(path)
        assert (refused.status_code, refused.headers["allow"]) == (405, "POST")
        assert refused.json()["error"]["code"] == "method_not_allowed"
    unauthorized = receiver.anon.get("/v1/tasks")
    assert unauthorized.status_code == 401
    assert unauthorized.headers["www-authenticate"] == "Bearer"


def test_idempotency_key_and_wait_rules_are_the_documented_ones(receiver: Receiver) -> None:
    body = {"provider": "sandbox", "prompt": "x"}
    for key in ("", "k" * 256):
        answer = receiver.alice.post("/v1/tasks", json=body, headers={"Idempotency-Key": key})
        assert answer.status_code == 422
        assert set(error_fields(answer)) == {"Idempotency-Key"}
    assert (
        receiver.alice.post("/v1/tasks", json=body, headers={"Idempotency-Key": "k" * 255}).status_code == 202
    )
    task_id = receiver.alice.get("/v1/tasks").json()["items"][0]["id"]
    for wait in ("soon", "61", "-1", ""):
        answer = receiver.alice.get(f"/v1/tasks/{task_id}", params={"wait": wait})
        assert answer.status_code == 422, wait
        assert set(error_fields(answer)) == {"wait"}


def test_the_sandbox_endpoint_refuses_what_is_not_its_own(receiver: Receiver) -> None:
    key = receiver.settings.provider("sandbox").api_key
    auth = {"Authorization": f"Bearer {key}"}
    own = receiver.callback_url("sandbox", "tsk_" + "0" * 24)
    url = "/sandbox/v1/generate"
    assert receiver.anon.post(url, json={"callback_url": own}).status_code == 401
    assert receiver.anon.post(url, content=b"{not json", headers=auth).status_code == 400
    assert receiver.anon.post(url, json={"callback_url": own, "seed": "x"}, headers=auth).status_code == 400
    assert receiver.anon.post(url, json=["a list"], headers=auth).status_code == 400
    foreign = {"callback_url": "http://127.0.0.1:9/callbacks/x"}
    assert receiver.anon.post(url, json=foreign, headers=auth).status_code == 422
    assert (
        receiver.anon.post(url, json={"callback_url": own, "num_images": 9}, headers=auth).status_code == 422
    )
    assert receiver.anon.post(url, json={"callback_url": own, "delay": 601}, headers=auth).status_code == 422
    big = b'{"prompt": "' + b"x" * (65 * 1024) + b'"}'
    assert receiver.anon.post(url, content=big, headers=auth).status_code == 413
    answer = receiver.anon.post(url, json={"callback_url": own, "outcome": "no_callback"}, headers=auth)
    assert answer.status_code == 200
    assert answer.json()["id"].startswith("sbx_")
