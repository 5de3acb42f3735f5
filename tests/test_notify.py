"""Notifications to the app, end to end: a served receiver posts to a real HTTP server playing the app,
and every delivery is checked with the Standard Webhooks reference library, not with our own code."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from receiver.config import ConfigError
from receiver.config import load_settings
from receiver.notify import retry_after
from tests.harness import ALICE
from tests.harness import Receiver
from tests.harness import ReceiverProcess
from tests.harness import Served
from tests.harness import free_port

SECRET = "whsec_" + base64.b64encode(b"a notify secret of 32 bytes....!").decode()


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Answer:
    status: int = 200
    body: bytes = b"thanks"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Delivery:
    at: float
    path: str
    headers: dict[str, str]
    body: bytes

    def verify(self, secret: str = SECRET) -> Any:
        return Webhook(secret).verify(self.body, self.headers)


class AppHook:
    """The app's end of a notification: records each POST and answers as scripted, then `default`."""

    def __init__(self, *answers: Answer, default: Answer | None = None) -> None:
        self.answers = deque(answers)
        self.default = default or Answer()
        self.deliveries: list[Delivery] = []
        self.arrived = threading.Condition()
        self.served = Served(Starlette(routes=[Route("/{path:path}", self.receive, methods=["POST"])]))
        self.url = f"{self.served.url}/hooks/images"

    async def receive(self, request: Request) -> Response:
        body = await request.body()
        with self.arrived:
            self.deliveries.append(Delivery(time.monotonic(), request.url.path, dict(request.headers), body))
            answer = self.answers.popleft() if self.answers else self.default
            self.arrived.notify_all()
        if answer.delay:
            await asyncio.sleep(answer.delay)
        return Response(answer.body, status_code=answer.status, headers=answer.headers)

    def wait_for(self, count: int, seconds: float = 15) -> list[Delivery]:
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.deliveries) >= count, seconds)
            assert len(self.deliveries) >= count, f"{len(self.deliveries)} deliveries, wanted {count}"
            return list(self.deliveries)


@pytest.fixture
def hook() -> Iterator[Callable[..., AppHook]]:
    started: list[AppHook] = []

    def start(*answers: Answer, default: Answer | None = None) -> AppHook:
        app = AppHook(*answers, default=default)
        app.served.start()
        started.append(app)
        return app

    yield start
    for app in started:
        app.served.stop()


def notify_events(
    fetch: Callable[[], list[dict[str, Any]]], count: int, seconds: float = 15
) -> list[dict[str, Any]]:
    """The task's notify events once there are `count` of them."""
    deadline = time.monotonic() + seconds
    while True:
        events = [event for event in fetch() if event["kind"] == "notify"]
        if len(events) >= count or time.monotonic() > deadline:
            assert len(events) >= count, events
            return events
        time.sleep(0.02)


def ended_with_notify(receiver: Receiver, app: AppHook, **body: Any) -> dict[str, Any]:
    task = receiver.submit(provider="sandbox", prompt="a lighthouse at dusk", notify_url=app.url, **body)
    done = receiver.wait(str(task["id"]))
    assert done["status"] in ("succeeded", "failed"), done
    return done


def quiet(app: AppHook, count: int, seconds: float = 0.6) -> None:
    """No further delivery arrives (the schedule in these tests is 50 ms a step, so one would)."""
    time.sleep(seconds)
    assert len(app.deliveries) == count, [d.path for d in app.deliveries]


SHORT = {"RECEIVER_NOTIFY_SECRET": SECRET, "RECEIVER_NOTIFY_SCHEDULE": "0.05,0.05,0.05"}


def test_a_succeeded_task_is_delivered_signed_and_recorded(
    start_receiver: Callable[..., Receiver], hook: Callable[..., AppHook]
) -> None:
    receiver = start_receiver(**SHORT)
    app = hook(Answer(200, b'{"ok": true}'))
    done = ended_with_notify(receiver, app)
    assert done["status"] == "succeeded"
    [delivery] = app.wait_for(1)
    payload = delivery.verify()
    assert delivery.path == "/hooks/images"
    assert delivery.headers["content-type"] == "application/json"
    assert delivery.headers["webhook-id"] == f"msg_{done['id']}"
    assert abs(int(delivery.headers["webhook-timestamp"]) - time.time()) < 10
    assert delivery.headers["webhook-signature"].startswith("v1,")
    assert payload["type"] == "task.succeeded"
    assert payload["timestamp"] == done["completed_at"]
    sent = payload["data"]
    assert sent["id"] == done["id"] and sent["status"] == "succeeded"
    assert [image["sha256"] for image in sent["images"]] == [image["sha256"] for image in done["images"]]
    # The signed image link in the notification works without a key.
    assert httpx.get(sent["images"][0]["url"]).status_code == 200
    # A body changed in transit no longer verifies.
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(delivery.body.replace(b"succeeded", b"failed"), delivery.headers)

    [event] = notify_events(lambda: receiver.events(done["id"]), 1)
    assert event["summary"].startswith("attempt 1: delivered, HTTP 200 (")
    assert event["detail"] == '{"ok": true}'
    assert event["verified"] is True
    quiet(app, 1)


def test_a_failed_task_is_delivered_and_a_task_without_notify_url_is_not(
    start_receiver: Callable[..., Receiver], hook: Callable[..., AppHook]
) -> None:
    receiver = start_receiver(**SHORT)
    app = hook()
    done = ended_with_notify(receiver, app, options={"outcome": "generation_failed"})
    assert done["status"] == "failed"
    payload = app.wait_for(1)[0].verify()
    assert payload["type"] == "task.failed"
    assert payload["data"]["error"]["code"] == "generation_failed"
    assert payload["data"]["completed_at"] == done["completed_at"]

    plain = receiver.submit(provider="sandbox", prompt="no one is told")
    assert receiver.wait(str(plain["id"]))["status"] == "succeeded"
    assert [e for e in receiver.events(str(plain["id"])) if e["kind"] == "notify"] == []
    quiet(app, 1)


def test_failures_are_retried_with_the_same_id_and_each_attempt_is_recorded(
    start_receiver: Callable[..., Receiver], hook: Callable[..., AppHook]
) -> None:
    receiver = start_receiver(**SHORT)
    long_answer = b"x" * 5000
    app = hook(Answer(500, long_answer), Answer(503, b"busy"), Answer(204, b""))
    done = ended_with_notify(receiver, app)
    deliveries = app.wait_for(3)
    assert {d.headers["webhook-id"] for d in deliveries} == {f"msg_{done['id']}"}
    for delivery in deliveries:
        assert delivery.verify()["data"]["id"] == done["id"]
    events = notify_events(lambda: receiver.events(done["id"]), 3)
    assert events[0]["summary"].startswith("attempt 1: HTTP 500 (")
    assert "next attempt in 0.0" in events[0]["summary"]
    assert events[0]["detail"] == "x" * 2048  # the first 2 KB of the answer, no more
    assert events[1]["summary"].startswith("attempt 2: HTTP 503 (")
    assert events[1]["detail"] == "busy"
    assert events[2]["summary"].startswith("attempt 3: delivered, HTTP 204 (")
    quiet(app, 3)


def test_gives_up_after_the_last_scheduled_attempt(
    start_receiver: Callable[..., Receiver], hook: Callable[..., AppHook]
) -> None:
    receiver = start_receiver(RECEIVER_NOTIFY_SECRET=SECRET, RECEIVER_NOTIFY_SCHEDULE="0.05,0.05")
    app = hook(default=Answer(500, b"down"))
    done = ended_with_notify(receiver, app)
    app.wait_for(3)
    events = notify_events(lambda: receiver.events(done["id"]), 3)
    assert "gave up, that was the last attempt" in events[2]["summary"]
    assert all("gave up" not in event["summary"] for event in events[:2])
    quiet(app, 3)


def test_410_stops_for_good(start_receiver: Callable[..., Receiver], hook: Callable[..., AppHook]) -> None:
    receiver = start_receiver(**SHORT)
    app = hook(Answer(410, b"unsubscribed"))
    done = ended_with_notify(receiver, app)
    app.wait_for(1)
    [event] = notify_events(lambda: receiver.events(done["id"]), 1)
    assert event["summary"].startswith("attempt 1: HTTP 410 (")
    assert "the app said Gone, no more attempts" in event["summary"]
    assert event["detail"] == "unsubscribed"
    quiet(app, 1)


def test_a_longer_retry_after_wins_over_the_schedule(
    start_receiver: Callable[..., Receiver], hook: Callable[..., AppHook]
) -> None:
    receiver = start_receiver(**SHORT)
    app = hook(Answer(429, b"slow down", {"Retry-After": "1"}))
    done = ended_with_notify(receiver, app)
    first, second = app.wait_for(2)
    assert second.at - first.at >= 0.95
    events = notify_events(lambda: receiver.events(done["id"]), 2)
    assert "next attempt in 1.00 s" in events[0]["summary"]
    assert events[1]["summary"].startswith("attempt 2: delivered")


def test_a_shorter_retry_after_does_not_shorten_the_schedule(
    start_receiver: Callable[..., Receiver], hook: Callable[..., AppHook]
) -> None:
    receiver = start_receiver(RECEIVER_NOTIFY_SECRET=SECRET, RECEIVER_NOTIFY_SCHEDULE="1")
    app = hook(Answer(503, b"", {"Retry-After": "0"}))
    ended_with_notify(receiver, app)
    first, second = app.wait_for(2)
    assert second.at - first.at >= 0.85  # the 1 s step, less at most 10 % jitter


def test_redirects_are_not_followed(
    start_receiver: Callable[..., Receiver], hook: Callable[..., AppHook]
) -> None:
    receiver = start_receiver(**SHORT)
    app = hook()
    app.answers.append(Answer(307, b"", {"Location": f"{app.served.url}/elsewhere"}))
    done = ended_with_notify(receiver, app)
    deliveries = app.wait_for(2)
    assert [d.path for d in deliveries] == ["/hooks/images", "/hooks/images"]
    events = notify_events(lambda: receiver.events(done["id"]), 2)
    assert events[0]["summary"].startswith("attempt 1: HTTP 307 (")
    assert events[1]["summary"].startswith("attempt 2: delivered")
    quiet(app, 2)


def test_an_attempt_that_takes_too_long_is_cut_off_and_retried(
    start_receiver: Callable[..., Receiver], hook: Callable[..., AppHook]
) -> None:
    receiver = start_receiver(**SHORT, RECEIVER_NOTIFY_TIMEOUT="0.3")
    app = hook(Answer(200, b"too late", delay=1.5))
    done = ended_with_notify(receiver, app)
    app.wait_for(2)
    events = notify_events(lambda: receiver.events(done["id"]), 2)
    assert events[0]["summary"].startswith("attempt 1: no answer within 0.3 s (")
    took = int(events[0]["summary"].split(" (")[1].split(" ms)")[0])
    assert 250 <= took < 1500  # cut off at 0.3 s, long before the 1.5 s answer
    assert events[0]["detail"] is None
    assert events[1]["summary"].startswith("attempt 2: delivered")


def test_every_secret_signs_during_a_rotation(
    start_receiver: Callable[..., Receiver], hook: Callable[..., AppHook]
) -> None:
    old, new = new_secret(), new_secret()
    receiver = start_receiver(RECEIVER_NOTIFY_SECRET=f"{old} {new}")
    app = hook()
    done = ended_with_notify(receiver, app)
    [delivery] = app.wait_for(1)
    signatures = delivery.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2 and all(s.startswith("v1,") for s in signatures)
    # An app still on the old secret and one already on the new one both accept it; a stranger does not.
    assert delivery.verify(old)["data"]["id"] == done["id"]
    assert delivery.verify(new)["data"]["id"] == done["id"]
    with pytest.raises(WebhookVerificationError):
        delivery.verify(new_secret())


def test_a_private_notify_url_is_refused_at_submit(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver(RECEIVER_ALLOW_PRIVATE_URLS="0")
    for url in ("http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "http://[::1]/hook", "ftp://app.example/"):
        answer = receiver.alice.post(
            "/v1/tasks", json={"provider": "sandbox", "prompt": "a fox", "notify_url": url}
        )
        assert answer.status_code == 422, (url, answer.text)
        assert "notify_url" in answer.json()["error"]["fields"], url


def test_the_address_guard_runs_again_at_every_attempt(
    start_receiver: Callable[..., Receiver], hook: Callable[..., AppHook]
) -> None:
    # The first process allowed private URLs; the operator turns that off before the retry is due.
    first = start_receiver(RECEIVER_NOTIFY_SECRET=SECRET, RECEIVER_NOTIFY_SCHEDULE="1")
    app = hook(Answer(503, b"later"))
    done = ended_with_notify(first, app)
    notify_events(lambda: first.events(done["id"]), 1)
    first.stop()
    second = start_receiver(RECEIVER_NOTIFY_SECRET=SECRET, RECEIVER_ALLOW_PRIVATE_URLS="0")
    events = notify_events(lambda: second.events(done["id"]), 2)
    assert events[1]["summary"].startswith(
        "attempt 2: refused: 127.0.0.1 resolves to the non-public address 127.0.0.1"
    )
    assert len(app.deliveries) == 1


def test_a_pending_notification_survives_a_killed_process(
    tmp_path: Path, hook: Callable[..., AppHook]
) -> None:
    app = hook(Answer(503, b"restarting"))
    env = {"RECEIVER_NOTIFY_SECRET": SECRET, "RECEIVER_NOTIFY_SCHEDULE": "2"}
    port = free_port()
    first = ReceiverProcess(tmp_path / "data", env, port).start()
    second: ReceiverProcess | None = None
    client = httpx.Client(base_url=first.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
    try:
        task = client.post(
            "/v1/tasks", json={"provider": "sandbox", "prompt": "a kite", "notify_url": app.url}
        ).json()

        def events() -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = client.get(f"/v1/tasks/{task['id']}/events").json()["items"]
            return items

        notify_events(events, 1)
        first.kill()  # SIGKILL: the retry is due in about 2 s and lives only in the jobs table
        assert len(app.deliveries) == 1
        second = ReceiverProcess(tmp_path / "data", env, port).start()
        retry = app.wait_for(2)[1]
        assert retry.verify()["data"]["id"] == task["id"]
        assert retry.headers["webhook-id"] == app.deliveries[0].headers["webhook-id"]
        delivered = notify_events(events, 2)
        assert delivered[1]["summary"].startswith("attempt 2: delivered")
    finally:
        client.close()
        for process in (first, second):
            if process is not None and process.process is not None and process.process.poll() is None:
                process.terminate()


def test_notify_settings_are_checked(tmp_path: Path) -> None:
    base = {"RECEIVER_DATA_DIR": str(tmp_path)}
    settings = load_settings({**base, "RECEIVER_NOTIFY_SCHEDULE": "1,2.5", "RECEIVER_NOTIFY_SECRET": SECRET})
    assert settings.notify_schedule == (1.0, 2.5)
    assert settings.notify_secrets == (SECRET,)
    default = load_settings(base)
    assert sum(default.notify_schedule) * 0.9 >= 86_400  # at least a day, even with the jitter
    assert default.notify_secrets[0].startswith("whsec_")
    Webhook(default.notify_secrets[0])  # the generated secret is one the reference library takes
    with pytest.raises(ConfigError, match="RECEIVER_NOTIFY_SCHEDULE"):
        load_settings({**base, "RECEIVER_NOTIFY_SCHEDULE": "5,soon"})
    with pytest.raises(ConfigError, match="RECEIVER_NOTIFY_SECRET"):
        load_settings({**base, "RECEIVER_NOTIFY_SECRET": "whsec_***"})
    with pytest.raises(ConfigError, match="RECEIVER_NOTIFY_SECRET"):
        load_settings({**base, "RECEIVER_NOTIFY_SECRET": "plain-secret"})


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = 1_700_000_000.0
    assert retry_after("120", now) == 120.0
    assert retry_after(" 7 ", now) == 7.0
    assert retry_after(email.utils.formatdate(now + 90, usegmt=True), now) == 90.0
    assert retry_after(email.utils.formatdate(now - 90, usegmt=True), now) == 0.0
    assert retry_after("99999999", now) == 86_400.0  # a pause, not parking the notification for ever
    for nonsense in (None, "", "soon", "-5", "1.5e3", "²"):
        assert retry_after(nonsense, now) is None, nonsense
