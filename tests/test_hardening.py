"""Hostile input over real HTTP (issue 11): every bad value a 4xx JSON error naming it, nothing stored."""

from __future__ import annotations

import base64
import logging
import socket
import time
from collections.abc import Callable
from collections.abc import Iterator

import httpx
import pytest

from tests.fakes.common import png
from tests.harness import Receiver


@pytest.fixture
def receiver(start_receiver: Callable[..., Receiver]) -> Receiver:
    return start_receiver()


def nested(levels: int) -> str:
    return '{"a":' * (levels - 1) + "{}" + "}" * (levels - 1)


SANDBOX = b'{"provider":"sandbox","prompt":"x",'


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (SANDBOX + b'"metadata":{"a":NaN}}', "metadata"),
        (SANDBOX + b'"metadata":{"a":[1,-Infinity]}}', "metadata"),
        (SANDBOX + b'"options":{"a":Infinity}}', "options"),
        (SANDBOX + b'"options":{"a":1e999}}', "options"),
        (SANDBOX + b'"metadata":' + nested(33).encode() + b"}", "metadata"),
        (SANDBOX + b'"options":' + nested(40).encode() + b"}", "options"),
        (SANDBOX + b'"options":' + nested(5000).encode() + b"}", "options"),
        (b'{"provider":"sandbox","prompt":"a \\ud800 b"}', "prompt"),
        (SANDBOX + b'"metadata":{"\\udc00":1}}', "metadata"),
        (SANDBOX + b'"metadata":{"a":"\\udbff"}}', "metadata"),
        (SANDBOX + b'"\\ud800":1}', "\\ud800"),
        (SANDBOX + b'"options":{"big":"' + b"x" * 17_000 + b'"}}', "options"),
        (SANDBOX + b'"images":["https://example.com/' + b"x" * 9000 + b'"]}', "images[0]"),
        (SANDBOX + b'"notify_url":"https://example.com/' + b"x" * 9000 + b'"}', "notify_url"),
        (SANDBOX + b'"images":["http://[::1"]}', "images[0]"),
        (SANDBOX + b'"images":["http://example.com:99999/a.png"]}', "images[0]"),
        (SANDBOX + b'"notify_url":"http://[::1"}', "notify_url"),
        (SANDBOX + b'"notify_url":"http://example.com:99999/"}', "notify_url"),
        (SANDBOX + b'"images":[' + b",".join([b'"https://a/b.png"'] * 5000) + b"]}", "images"),
    ],
    ids=lambda value: value[-60:].decode(errors="replace") if isinstance(value, bytes) else str(value),
)
def test_values_json_cannot_carry_are_422_naming_the_field(
    receiver: Receiver, raw: bytes, field: str
) -> None:
    answer = receiver.alice.post("/v1/tasks", content=raw, headers={"Content-Type": "application/json"})
    assert answer.status_code == 422, answer.text
    fields = answer.json()["error"]["fields"]
    assert list(fields) == [field], fields
    assert receiver.alice.get("/v1/tasks").json()["items"] == []


def test_bad_urls_are_refused_while_private_urls_are_refused_too(
    start_receiver: Callable[..., Receiver],
) -> None:
    receiver = start_receiver(RECEIVER_ALLOW_PRIVATE_URLS="0")
    for url in ("http://[::1", "http://example.com:99999/", "http://[::1]:0x50/"):
        answer = receiver.alice.post(
            "/v1/tasks", json={"provider": "sandbox", "prompt": "x", "notify_url": url}
        )
        assert answer.status_code == 422, (url, answer.text)
        assert list(answer.json()["error"]["fields"]) == ["notify_url"]
    assert receiver.alice.get("/v1/tasks").json()["items"] == []


def test_many_unknown_fields_are_named_briefly(receiver: Receiver) -> None:
    body = {"provider": "sandbox", "prompt": "x", **{f"f{i}": i for i in range(5000)}}
    answer = receiver.alice.post("/v1/tasks", json=body)
    assert answer.status_code == 422
    assert len(answer.json()["error"]["fields"]) <= 21


def cursor_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=²", "limit"),
        ("limit=" + "9" * 5000, "limit"),
        ("limit=-1", "limit"),
        ("cursor=" + cursor_of("seq:²"), "cursor"),
        ("cursor=" + cursor_of("seq:" + "9" * 30), "cursor"),
        ("cursor=" + cursor_of("seq:" + "9" * 5000), "cursor"),
        ("cursor=%F0%9F%92%A9", "cursor"),
        ("status=%F0%9F%92%A9", "status"),
    ],
    ids=lambda value: value[:40],
)
def test_malformed_list_queries_are_422(receiver: Receiver, query: str, field: str) -> None:
    answer = receiver.alice.get(f"/v1/tasks?{query}")
    assert answer.status_code == 422, answer.text
    assert list(answer.json()["error"]["fields"]) == [field]


def test_malformed_wait_index_and_link_are_4xx(receiver: Receiver) -> None:
    task = receiver.submit(provider="sandbox", prompt="x")
    done = receiver.wait(task["id"])
    assert done["status"] == "succeeded"
    for wait in ("nan", "inf", "-1", "²", "1e400"):
        answer = receiver.alice.get(f"/v1/tasks/{task['id']}?wait={wait}")
        assert answer.status_code == 422, (wait, answer.text)
        assert list(answer.json()["error"]["fields"]) == ["wait"]
    for index in (2**63, 2**64, 10**30, 10**400):
        answer = receiver.alice.get(f"/v1/tasks/{task['id']}/images/{index}")
        assert answer.status_code == 404, (index, answer.text)
        assert answer.json()["error"]["code"] == "not_found"
    for expires in ("²", "9" * 5000, "1" + "0" * 30):
        answer = receiver.anon.get(
            f"/v1/tasks/{task['id']}/images/0", params={"expires": expires, "signature": "x"}
        )
        assert answer.status_code == 401, (expires, answer.text)
        answer = receiver.anon.get(
            "/uploads/" + "0" * 64 + ".png", params={"expires": expires, "signature": "x"}
        )
        assert answer.status_code == 401, (expires, answer.text)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def log_records() -> Iterator[Records]:
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("receiver", "uvicorn.error", "uvicorn")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield handler
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("path", ["/v1/tasks", "/v1/uploads", "/callbacks/sandbox/abc"])
def test_a_client_leaving_mid_body_is_not_an_error(
    receiver: Receiver, log_records: Records, path: str
) -> None:
    key = receiver.alice.headers["authorization"]
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {key}"
        "\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", receiver.served.port)) as sock:
        sock.sendall(head.encode() + b'{"provider": "sandbox"')
    deadline = time.monotonic() + 10
    while not any("went away" in record.getMessage() for record in log_records.records):
        assert time.monotonic() < deadline, [record.getMessage() for record in log_records.records]
        time.sleep(0.02)
    assert receiver.anon.get("/healthz").status_code == 200
    errors = [record for record in log_records.records if record.levelno >= logging.ERROR]
    assert errors == []


def test_only_the_canonical_token_and_signature_verify(receiver: Receiver) -> None:
    task = receiver.wait(receiver.submit(provider="sandbox", prompt="x")["id"])
    link = httpx.URL(task["images"][0]["url"])
    assert receiver.anon.get(link).status_code == 200
    for tail in ("=", "==", "%3D"):
        padded = str(link) + tail
        assert receiver.anon.get(padded).status_code == 401, tail
    upload = receiver.alice.post("/v1/uploads", content=png(8, 8), headers={"Content-Type": "image/png"})
    url = upload.json()["url"]
    assert receiver.anon.get(url).status_code == 200
    assert receiver.anon.get(url + "=").status_code == 401
    token_url = receiver.callback_url("sandbox", task["id"])
    body = {"id": "sbx_x", "status": "succeeded", "images": []}
    for tail in ("=", "=="):
        answer = receiver.anon.post(token_url + tail, json=body)
        assert answer.status_code == 401, (tail, answer.text)
        assert answer.json()["error"]["code"] == "bad_token"
