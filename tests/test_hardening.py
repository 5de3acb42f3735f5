"""Hostile input over real HTTP (issue 11): every bad value a 4xx JSON error naming it, nothing stored."""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import socket
import stat
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver.config import ConfigError
from receiver.config import load_settings
from receiver.config import prepare_settings
from tests.fakes.common import png
from tests.harness import ALICE
from tests.harness import Receiver
from tests.harness import ReceiverProcess


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
        sock.sendall(head.encode() + png(64, 64)[:200])  # a real image's start, then gone
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


def test_images_and_uploads_are_never_sniffed_or_run(receiver: Receiver) -> None:
    task = receiver.wait(receiver.submit(provider="sandbox", prompt="x")["id"])
    upload = receiver.alice.post("/v1/uploads", content=png(8, 8), headers={"Content-Type": "image/png"})
    for answer in (
        receiver.anon.get(task["images"][0]["url"]),
        receiver.alice.get(f"/v1/tasks/{task['id']}/images/0"),
        receiver.anon.get(upload.json()["url"]),
    ):
        assert answer.status_code == 200
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["content-disposition"] == "inline"
        assert answer.headers["content-security-policy"] == "default-src 'none'; sandbox"


def test_a_slash_redirect_points_at_the_public_url_only(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver(RECEIVER_PUBLIC_URL="https://receiver.example")
    answer = receiver.alice.get("/v1/tasks/?limit=2", headers={"Host": "evil.example"})
    assert answer.status_code == 307
    assert answer.headers["location"] == "https://receiver.example/v1/tasks?limit=2"
    answer = receiver.anon.get("/healthz/", headers={"Host": "evil.example", "X-Forwarded-Host": "evil"})
    assert answer.headers["location"] == "https://receiver.example/healthz"
    assert receiver.anon.get("/nothing/here/").status_code == 404


def test_metrics_want_their_token_when_one_is_set(start_receiver: Callable[..., Receiver]) -> None:
    token = "metrics-0123456789abcdef"
    receiver = start_receiver(RECEIVER_METRICS_TOKEN=token)
    for headers in ({}, {"Authorization": "Bearer nope-nope-nope-nope"}, {"Authorization": f"Basic {token}"}):
        answer = receiver.anon.get("/metrics", headers=headers)
        assert answer.status_code == 401, headers
        assert answer.json()["error"]["code"] == "unauthorized"
    assert receiver.alice.get("/metrics").status_code == 401  # an API key is not the metrics token
    answer = receiver.anon.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200
    assert "receiver_tasks" in answer.text or "receiver_callbacks_total" in answer.text


def test_the_starlette_floor_is_past_cve_2025_62727() -> None:
    import importlib.metadata
    import re
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    floors = [re.fullmatch(r"starlette>=([0-9.]+)", dep) for dep in project["dependencies"]]
    floor = next(match.group(1) for match in floors if match)

    def version(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"[0-9]+", text)[:3])

    assert version(floor) >= (0, 49, 1)  # the release that fixed FileResponse's Range parsing
    assert version(importlib.metadata.version("starlette")) >= version(floor)


def test_a_short_metrics_token_stops_the_start(tmp_path: Path) -> None:
    env = {"RECEIVER_DATA_DIR": str(tmp_path), "RECEIVER_METRICS_TOKEN": "short"}
    with pytest.raises(ConfigError, match="RECEIVER_METRICS_TOKEN"):
        load_settings(env)


def held_task(receiver: Receiver, **body: Any) -> str:
    """A sandbox task that is submitted and gets no callback of its own: the test sends them."""
    task = receiver.submit(provider="sandbox", prompt="x", options={"outcome": "no_callback"}, **body)
    assert receiver.wait_status(task["id"], "submitted")["status"] == "submitted"
    return str(task["id"])


@pytest.mark.parametrize(("num_images", "most"), [(None, 4), (2, 2), (1, 1)])
def test_a_callback_naming_more_images_than_the_task_can_have_changes_nothing(
    receiver: Receiver, num_images: int | None, most: int
) -> None:
    task_id = held_task(receiver, **({"num_images": num_images} if num_images else {}))
    url = receiver.callback_url("sandbox", task_id)
    provider_task_id = receiver.alice.get(f"/v1/tasks/{task_id}").json()["provider_task_id"]
    links = [f"{receiver.url}/nowhere/{index}.png" for index in range(most + 1)]
    for count in (most + 1, 300):
        body = {"id": provider_task_id, "status": "succeeded", "images": (links * 300)[:count]}
        answer = receiver.anon.post(url, json=body)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["code"] == "too_many_images"
    task = receiver.alice.get(f"/v1/tasks/{task_id}").json()
    assert task["status"] == "submitted"
    assert task["images"] == []


def wait_until(predicate: Callable[[], bool], what: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_dripping_callbacks_do_not_count_as_a_burst(receiver: Receiver) -> None:
    task_id = held_task(receiver)
    path = httpx.URL(receiver.callback_url("sandbox", task_id)).path
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    server = receiver.served.server
    socks = [socket.create_connection(("127.0.0.1", receiver.served.port)) for _ in range(12)]
    try:
        for sock in socks:
            sock.sendall(head.encode() + b'{"id": ')  # a valid token, a body that never ends
        # Other requests may come and go meanwhile (the sandbox's own); at least the 12 must be in.
        wait_until(lambda: len(server.server_state.tasks) >= 12, "the 12 requests are not in")

        async def busy() -> bool:
            return bool(receiver.app.state.callbacks.busy())

        assert receiver.served.call(busy) is False
    finally:
        for sock in socks:
            sock.close()


def test_a_body_that_does_not_arrive_in_time_is_a_408(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver(RECEIVER_BODY_TIMEOUT="0.3")
    key = receiver.alice.headers["authorization"]
    task_id = held_task(receiver)
    callback = httpx.URL(receiver.callback_url("sandbox", task_id)).path
    for path, kind in (("/v1/tasks", "application/json"), ("/v1/uploads", "image/png"), (callback, "x/y")):
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {key}\r\nContent-Type: {kind}\r\n"
            "Content-Length: 100000\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", receiver.served.port)) as sock:
            sock.sendall(head.encode() + png(64, 64)[:100])
            sock.settimeout(30)
            answer = ""
            while '"body_timeout"' not in answer and (chunk := sock.recv(65536)):
                answer += chunk.decode(errors="replace")
        assert answer.startswith("HTTP/1.1 408"), (path, answer)
        assert '"body_timeout"' in answer


def test_files_are_for_the_service_user_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    process = ReceiverProcess(data, {}).start()
    try:
        with httpx.Client(base_url=process.url, headers={"Authorization": f"Bearer {ALICE}"}) as client:
            task = client.post("/v1/tasks", json={"provider": "sandbox", "prompt": "x"}).json()
            deadline = time.monotonic() + 30
            while task["status"] != "succeeded" and time.monotonic() < deadline:
                task = client.get(f"/v1/tasks/{task['id']}", params={"wait": "5"}).json()
            assert task["status"] == "succeeded"
            headers = {"Content-Type": "image/png"}
            assert client.post("/v1/uploads", content=png(8, 8), headers=headers).status_code == 201
    finally:
        process.terminate()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    made = list(data.rglob("*"))
    assert any(path.suffix == ".png" for path in made) and (data / "receiver.db") in made
    for path in made:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, (path, oct(mode))


def test_an_existing_data_dir_is_closed_at_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "media").mkdir(parents=True, mode=0o755)
    (data / "receiver.db").write_bytes(b"")
    (data / "receiver.db").chmod(0o644)
    prepare_settings({"RECEIVER_DATA_DIR": str(data)})
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "media").stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "receiver.db").stat().st_mode) == 0o600


def test_serve_bounds_connections_and_idle_keep_alive(tmp_path: Path) -> None:
    env = {"RECEIVER_MAX_CONNECTIONS": "3", "RECEIVER_KEEP_ALIVE": "0.5", "RECEIVER_MAX_HEADER_BYTES": "2048"}
    process = ReceiverProcess(tmp_path / "data", env).start()
    port = int(httpx.URL(process.url).port or 0)
    try:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(30)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            while sock.recv(65536):  # the server closes the idle connection after RECEIVER_KEEP_ALIVE
                pass
        if importlib.util.find_spec("httptools") is None:  # the limit is h11's; httptools has its own
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.settimeout(30)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096)  # unfinished
                assert sock.recv(65536).startswith(b"HTTP/1.1 400")  # over RECEIVER_MAX_HEADER_BYTES
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        try:
            wait_until(
                lambda: httpx.get(f"{process.url}/healthz").status_code == 503, "a 4th connection is refused"
            )
        finally:
            for sock in idle:
                sock.close()
        wait_until(lambda: httpx.get(f"{process.url}/healthz").status_code == 200, "room again")
    finally:
        process.terminate()


def test_refused_callbacks_in_a_row_are_one_event(receiver: Receiver) -> None:
    task_id = held_task(receiver)
    url = receiver.callback_url("sandbox", task_id)
    before = receiver.events(task_id)
    many = {"id": "x", "status": "succeeded", "images": ["http://a/b.png"] * 50}
    for index in range(120):
        body = b"{not json" if index % 2 else json.dumps(many).encode()
        assert receiver.anon.post(url, content=body).status_code == 400
    events = receiver.alice.get(f"/v1/tasks/{task_id}/events", params={"limit": 500}).json()["items"]
    assert len(events) == len(before) + 1
    refused = events[-1]
    assert refused["kind"] == "callback" and refused["repeats"] == 120
    assert refused["summary"].startswith("unreadable body")  # the latest one's reason
    assert all(event["repeats"] == 1 for event in events[:-1])
    # A verified callback that changes the task is an event of its own; refusals after it start anew.
    provider_task_id = receiver.alice.get(f"/v1/tasks/{task_id}").json()["provider_task_id"]
    assert receiver.anon.post(url, json={"id": provider_task_id, "status": "running"}).status_code < 300
    wait_until(lambda: len(receiver.events(task_id)) == len(events) + 1, "the pending callback's event")
    assert receiver.anon.post(url, content=b"{not json").status_code == 400
    assert [event["repeats"] for event in receiver.events(task_id)[-3:]] == [120, 1, 1]


def test_events_come_a_page_at_a_time(receiver: Receiver) -> None:
    task = receiver.wait(receiver.submit(provider="sandbox", prompt="x")["id"])
    every = receiver.alice.get(f"/v1/tasks/{task['id']}/events").json()
    assert every["next_cursor"] is None and len(every["items"]) >= 4
    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = receiver.alice.get(f"/v1/tasks/{task['id']}/events", params=params).json()
        assert len(page["items"]) <= 2
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == every["items"]
    tasks_cursor = cursor_of("seq:1")
    for query, field in (("limit=0", "limit"), ("limit=501", "limit"), (f"cursor={tasks_cursor}", "cursor")):
        answer = receiver.alice.get(f"/v1/tasks/{task['id']}/events?{query}")
        assert answer.status_code == 422, query
        assert list(answer.json()["error"]["fields"]) == [field]
