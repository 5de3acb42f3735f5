"""A clean shutdown: SIGTERM answers open long-polls at once, refuses new work with 503, exits 0."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import database_settings
from tests.harness import ALICE
from tests.harness import Receiver
from tests.harness import ReceiverProcess

GRACE = 30.0  # long, so an answer that came "at once" cannot be an answer that waited out the grace
SLOW = {"RECEIVER_SHUTDOWN_GRACE": str(GRACE)}
NEVER: dict[str, Any] = {
    "provider": "sandbox",
    "prompt": "never done",
    "options": {"outcome": "no_callback", "delay": 600},
}


def until(predicate: Callable[[], bool], what: str, seconds: float = 30) -> None:
    """Bounded polling of state: a wait on a fact, never on a duration."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.02)


def long_polls(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("receiver_long_polls "):
            return float(line.split()[1])
    return 0.0


@pytest.fixture(params=["sqlite", "postgres"])
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The drain runs on both backends (a PostgreSQL long-poll also wakes on NOTIFY)."""
    return database_settings(request, request.param)


class LongPoll(threading.Thread):
    """`GET /v1/tasks/{id}?wait=60` in a thread of its own; its answer kept."""

    def __init__(self, url: str, task_id: str) -> None:
        super().__init__(daemon=True)
        self.url, self.task_id = url, task_id
        self.response: httpx.Response | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {ALICE}"}
        try:
            self.response = httpx.get(
                f"{self.url}/v1/tasks/{self.task_id}", params={"wait": 60}, headers=headers, timeout=90
            )
        except httpx.HTTPError as exc:
            self.error = exc


def test_sigterm_answers_an_open_wait_with_the_task_and_exits_0(
    tmp_path: Path, database_env: dict[str, str]
) -> None:
    process = ReceiverProcess(tmp_path / "data", {**SLOW, **database_env}).start()
    assert process.process is not None
    with httpx.Client(base_url=process.url, headers={"Authorization": f"Bearer {ALICE}"}) as client:
        task = client.post("/v1/tasks", json=NEVER).json()
        until(lambda: client.get(f"/v1/tasks/{task['id']}").json()["status"] == "submitted", "submitted")
        poll = LongPoll(process.url, task["id"])
        poll.start()
        until(lambda: long_polls(client) == 1, "the long-poll is open in the service")

    process.process.terminate()
    poll.join(GRACE - 5)  # answered at once, not when the grace ran out (nor cut off with a 500 then)
    assert poll.error is None, poll.error
    assert poll.response is not None, "the long-poll was not answered within the grace"
    assert poll.response.status_code == 200, poll.response.text
    assert poll.response.json()["id"] == task["id"]
    assert poll.response.json()["status"] == "submitted"  # the task as it stands
    assert process.process.wait(GRACE + 10) == 0
    log = process.log.read_text()
    assert "Traceback" not in log
    assert "ERROR" not in log
    assert "shutting down" in log and "stopped" in log


def test_while_draining_new_work_is_refused_and_open_waits_answered(
    start_receiver: Callable[..., Receiver],
) -> None:
    # The app's drain is what the signal starts; here it is started directly, so the service still
    # listens and what it answers new work while it drains can be asked for.
    receiver = start_receiver(**SLOW)
    task = receiver.submit(**NEVER)
    receiver.wait_status(task["id"], "submitted")
    poll = LongPoll(receiver.url, task["id"])
    poll.start()
    until(lambda: long_polls(receiver.anon) == 1, "the long-poll is open in the service")

    drain: Callable[[], Any] = receiver.app.state.drain
    assert receiver.served.loop is not None
    receiver.served.loop.call_soon_threadsafe(drain)

    poll.join(GRACE - 5)
    assert poll.response is not None and poll.response.status_code == 200
    assert poll.response.json()["status"] == "submitted"

    created = receiver.alice.post("/v1/tasks", json={"provider": "sandbox", "prompt": "too late"})
    assert created.status_code == 503, created.text
    assert created.json()["error"]["code"] == "shutting_down"
    assert created.headers["Retry-After"].isdigit()

    waited = receiver.alice.get(f"/v1/tasks/{task['id']}", params={"wait": 30})
    assert waited.status_code == 503, waited.text
    assert waited.json()["error"]["code"] == "shutting_down"
    assert "Retry-After" in waited.headers

    # A plain lookup is no new work: still answered.
    looked = receiver.alice.get(f"/v1/tasks/{task['id']}")
    assert looked.status_code == 200 and looked.json()["status"] == "submitted"
    listed = receiver.alice.get("/v1/tasks").json()["items"]
    assert [item["id"] for item in listed] == [task["id"]]  # the refused create made nothing


def test_a_create_whose_body_arrives_after_sigterm_gets_503(tmp_path: Path) -> None:
    process = ReceiverProcess(tmp_path / "data", SLOW).start()
    assert process.process is not None
    body = json.dumps(NEVER).encode()
    head = (
        "POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {ALICE}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", process.port), timeout=30) as conn:
        conn.sendall(head.encode())
        # `100 Continue` comes when the handler asks for the body: the request is being served.
        assert conn.recv(1024).startswith(b"HTTP/1.1 100")
        process.process.terminate()
        until(lambda: "shutting down" in process.log.read_text(), "the drain began")
        conn.sendall(body)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 503"), answer
    headers, _, payload = rest.partition(b"\r\n\r\n")
    assert b"retry-after: 1" in headers.lower()
    assert json.loads(payload)["error"]["code"] == "shutting_down"
    assert process.process.wait(GRACE + 10) == 0
    assert "Traceback" not in process.log.read_text()
