"""receiver.client, sync and async, against the served receiver with the sandbox provider; and
verify_notification against real notifications and the Standard Webhooks reference library."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import Callable
from datetime import UTC
from datetime import datetime
from pathlib import Path

import pytest
from standardwebhooks import Webhook

from receiver.client import ApiError
from receiver.client import AsyncClient
from receiver.client import Client
from receiver.client import NotificationError
from receiver.client import ReceiverError
from receiver.client import ServiceUnreachable
from receiver.client import Task
from receiver.client import WaitTimeout
from receiver.client import verify_notification
from tests.fakes.common import png
from tests.harness import ALICE
from tests.harness import BOB
from tests.harness import Receiver
from tests.harness import free_port
from tests.test_notify import SECRET
from tests.test_notify import AppHook
from tests.test_notify import hook  # noqa: F401 - the fixture, shared
from tests.test_notify import new_secret


@pytest.fixture
def receiver(start_receiver: Callable[..., Receiver]) -> Receiver:
    return start_receiver(RECEIVER_NOTIFY_SECRET=SECRET)


def test_create_with_an_upload_wait_and_download(receiver: Receiver, tmp_path: Path) -> None:
    picture = tmp_path / "kitchen.png"
    picture.write_bytes(png(48, 32))
    seen: list[tuple[str, float]] = []
    with Client(receiver.url, ALICE) as client:

        def order() -> Task:
            return client.create(
                "sandbox",
                "put a donut next to the flour",
                images=[picture],
                idempotency_key="order-1",
                aspect_ratio="16:9",
                seed=7,
                metadata={"order": 1},
            )

        task = order()
        assert task["status"] == "queued" and task["metadata"] == {"order": 1}
        done = client.wait(task["id"], timeout=30, on_progress=lambda t, s: seen.append((t["status"], s)))
        assert done["status"] == "succeeded", done
        assert seen[-1][0] == "succeeded" and [s for _, s in seen] == sorted(s for _, s in seen)
        # The upload reached the service as the bytes of the local file.
        [stored] = list((receiver.settings.media_dir / "uploads").iterdir())
        assert stored.read_bytes() == picture.read_bytes()

        paths = client.download_images(done, tmp_path / "out")
        assert [p.name for p in paths] == [f"{task['id']}-0.png"]
        assert hashlib.sha256(paths[0].read_bytes()).hexdigest() == done["images"][0]["sha256"]
        # An ended task answers a wait at once, with the same task. Signed links carry their expiry
        # (whole seconds from now), so two reads may differ in the links alone: compare the rest.
        first, waited = client.get(task["id"]), client.get(task["id"], wait=5)
        assert without_links(first) == without_links(waited) and waited["status"] == "succeeded"

        # Idempotency: the same key and body give the same task; another body is a 409.
        again = order()
        assert again["id"] == task["id"]
        with pytest.raises(ApiError) as conflict:
            client.create("sandbox", "another prompt", idempotency_key="order-1")
        assert conflict.value.status == 409

        kinds = [event["kind"] for event in client.events(task["id"])]
        assert kinds[:2] == ["created", "submit"] and "download" in " ".join(kinds)


def test_list_tasks_iterates_every_page(receiver: Receiver) -> None:
    with Client(receiver.url, ALICE) as client:
        made = [client.create("sandbox", f"picture {n}")["id"] for n in range(5)]
        newest_first = list(reversed(made))
        assert [t["id"] for t in client.list_tasks(page_size=2)] == newest_first
        assert [t["id"] for t in client.list_tasks(limit=3, page_size=2)] == newest_first[:3]
        page = client.list_page(limit=2)
        assert [t["id"] for t in page["items"]] == newest_first[:2] and page["next_cursor"]
        assert list(client.list_tasks(provider="kie")) == []
    with Client(receiver.url, BOB) as other:  # a tenant sees only its own tasks
        assert list(other.list_tasks()) == []


def test_failures_are_typed(receiver: Receiver, tmp_path: Path) -> None:
    with Client(receiver.url, ALICE) as client:
        with pytest.raises(ApiError) as invalid:
            client.create("sandbox", "x", output_format="jpeg")
        assert invalid.value.status == 422
        assert "output_format" in invalid.value.fields
        assert "output_format: the sandbox makes png only" in str(invalid.value)
        with pytest.raises(ApiError) as missing:
            client.get("tsk_000000000000000000000000")
        assert (missing.value.status, missing.value.code) == (404, "not_found")
        text = tmp_path / "notes.txt"
        text.write_text("not a picture")
        with pytest.raises(ReceiverError, match="not a PNG, JPEG or WebP image"):
            client.create("sandbox", "x", images=[text])
        with pytest.raises(ReceiverError, match="No such file"):
            client.upload(tmp_path / "absent.png")

        silent = client.create("sandbox", "never called back", options={"outcome": "no_callback"})
        with pytest.raises(WaitTimeout) as late:
            client.wait(silent, timeout=0.3)
        assert late.value.task["id"] == silent["id"]
        assert late.value.task["status"] in ("queued", "submitted")

        failed = client.wait(client.create("sandbox", "x", options={"outcome": "generation_failed"}))
        assert failed["status"] == "failed"
        assert failed["error"] is not None and failed["error"]["code"] == "generation_failed"

    with Client(receiver.url, "not-a-key-of-this-service") as stranger, pytest.raises(ApiError) as refused:
        stranger.get("tsk_000000000000000000000000")
    assert refused.value.status == 401
    with Client(f"http://127.0.0.1:{free_port()}", ALICE) as nowhere, pytest.raises(ServiceUnreachable):
        nowhere.list_page()
    with pytest.raises(ReceiverError, match="must be an http"):
        Client("localhost:8000", ALICE)
    with pytest.raises(ReceiverError, match="API key"):
        Client(receiver.url, " ")


def test_a_url_ending_in_v1_is_the_same_service(receiver: Receiver) -> None:
    with Client(receiver.url + "/v1/", ALICE) as client:
        assert client.url == receiver.url
        assert client.get(client.create("sandbox", "x")["id"])["provider"] == "sandbox"
    # Any other path that is not the receiver says so, instead of a bare "Not Found".
    with Client(receiver.url + "/elsewhere", ALICE) as client, pytest.raises(ApiError) as wrong:
        client.list_page()
    assert wrong.value.status == 404 and "no such route (is the URL the receiver's root?)" in str(wrong.value)


def test_the_async_client_does_the_same(receiver: Receiver, tmp_path: Path) -> None:
    picture = tmp_path / "in.png"
    picture.write_bytes(png(16, 16))

    async def scenario() -> tuple[Task, list[str], list[Path], list[str]]:
        async with AsyncClient(receiver.url, ALICE) as client:
            task = await client.create("sandbox", "a boat", images=[str(picture)], idempotency_key="b-1")
            assert (await client.create("sandbox", "a boat", images=[str(picture)], idempotency_key="b-1"))[
                "id"
            ] == task["id"]
            statuses: list[str] = []
            done = await client.wait(task, timeout=30, on_progress=lambda t, s: statuses.append(t["status"]))
            paths = await client.download_images(done, tmp_path / "async")
            listed = [t["id"] async for t in client.list_tasks(page_size=1)]
            with pytest.raises(ApiError) as missing:
                await client.events("tsk_000000000000000000000000")
            assert missing.value.status == 404
            assert (await client.events(task["id"]))[0]["kind"] == "created"
            return done, statuses, paths, listed

    done, statuses, paths, listed = asyncio.run(scenario())
    assert done["status"] == "succeeded" and statuses[-1] == "succeeded"
    assert hashlib.sha256(paths[0].read_bytes()).hexdigest() == done["images"][0]["sha256"]
    assert listed == [done["id"]]


def test_verify_notification_accepts_what_the_receiver_sends(
    receiver: Receiver,
    hook: Callable[..., AppHook],  # noqa: F811
) -> None:
    app = hook()
    with Client(receiver.url, ALICE) as client:
        task = client.create("sandbox", "tell me", notify_url=app.url)
        client.wait(task)
    [delivery] = app.wait_for(1)
    payload = verify_notification(delivery.headers, delivery.body, SECRET)
    assert payload["type"] == "task.succeeded" and payload["data"]["id"] == task["id"]
    assert payload == Webhook(SECRET).verify(delivery.body, delivery.headers)  # the reference agrees
    assert verify_notification(delivery.headers, delivery.body.decode(), [new_secret(), SECRET]) == payload

    with pytest.raises(NotificationError, match="signature"):
        verify_notification(delivery.headers, delivery.body.replace(b"tell me", b"tell us"), SECRET)
    with pytest.raises(NotificationError, match="signature"):
        verify_notification(delivery.headers, delivery.body, new_secret())
    with pytest.raises(NotificationError, match="too far"):
        verify_notification(delivery.headers, delivery.body, SECRET, now=time.time() + 3600)
    headers = {**delivery.headers, "webhook-signature": "v1,not-base64!"}
    with pytest.raises(NotificationError, match="signature"):
        verify_notification(headers, delivery.body, SECRET)
    without = {k: v for k, v in delivery.headers.items() if k != "webhook-id"}
    with pytest.raises(NotificationError, match="required"):
        verify_notification(without, delivery.body, SECRET)


def test_verify_notification_matches_the_reference_library_on_its_own_signatures() -> None:
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    body = json.dumps({"type": "task.failed", "data": {"id": "tsk_1"}}).encode()
    now = int(time.time())
    signature = Webhook(secret).sign("msg_1", datetime.fromtimestamp(now, UTC), body.decode())
    headers = {"Webhook-Id": "msg_1", "Webhook-Timestamp": str(now), "Webhook-Signature": signature}
    assert verify_notification(headers, body, secret)["type"] == "task.failed"
    rotated = {**headers, "Webhook-Signature": f"v1,{base64.b64encode(b'x' * 32).decode()} {signature}"}
    assert verify_notification(rotated, body, secret)["data"] == {"id": "tsk_1"}
    with pytest.raises(NotificationError):
        verify_notification({**headers, "Webhook-Signature": signature.replace("v1,", "v2,")}, body, secret)


def without_links(task: Task) -> dict[str, object]:
    return {**task, "images": [{**image, "url": None} for image in task["images"]]}
