"""Cancel and delete, over real HTTP against the provider fakes, on SQLite with a media directory and on
PostgreSQL with a bucket: a cancelled task is never submitted (queued) or is cancelled at fal's queue
(submitted), its late callbacks change nothing, nothing more is downloaded, the app hears once; an ended
task is deleted with its images and their bytes; both are scoped to the tenant. Then the client and CLI."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from receiver.client import ApiError
from receiver.client import AsyncClient
from receiver.client import Client
from receiver.client import TaskCancelled
from receiver.config import ProviderSettings
from receiver.models import ProviderRejected
from receiver.models import ProviderUnavailable
from receiver.models import TaskSpec
from receiver.providers import Context
from receiver.providers.fal import Fal
from tests.fakes.fal import FalFake
from tests.fakes.kie import GENERATE
from tests.fakes.kie import KieFake
from tests.harness import ALICE
from tests.harness import Receiver
from tests.test_cli import Run
from tests.test_cli import cli  # noqa: F401  (the fixture: the CLI against `receiver`)
from tests.test_notify import SHORT
from tests.test_notify import Answer
from tests.test_notify import AppHook
from tests.test_notify import hook  # noqa: F401  (the fixture)
from tests.test_notify import notify_events
from tests.test_notify import quiet
from tests.test_providers_e2e import database_env  # noqa: F401  (the fixtures: both stacks)
from tests.test_providers_e2e import media_env  # noqa: F401

FAL_SUBMIT = "/fal-ai/flux-pro/kontext/text-to-image"
QUEUE = "https://queue.fal.run"
REQUEST_ID = "80e732af-660e-45cd-bd63-580e4f2a94cc"


@pytest.fixture
def fakes(start_fake: Callable[..., Any]) -> tuple[KieFake, FalFake]:
    return start_fake(KieFake), start_fake(FalFake)


@pytest.fixture
def receiver(
    fakes: tuple[KieFake, FalFake],
    start_receiver: Callable[..., Receiver],
    media_env: dict[str, str],  # noqa: F811
) -> Receiver:
    kie, fal = fakes
    # One kie task in flight at a time: a second one stays queued while the first is submitted.
    env: dict[str, Any] = {**SHORT, **kie.receiver_env(), **fal.receiver_env(), **media_env}
    return start_receiver(**env, KIE_MAX_CONCURRENT=1)


def cancel(receiver: Receiver, task_id: str) -> dict[str, Any]:
    response = receiver.alice.post(f"/v1/tasks/{task_id}/cancel")
    assert response.status_code == 200, response.text
    task: dict[str, Any] = response.json()
    assert (task["status"], task["error"]) == ("cancelled", None)
    assert task["completed_at"] is not None
    return task


def rows(receiver: Receiver, sql: str, task_id: str) -> list[dict[str, Any]]:
    """Rows the service's own store reads for one task (`:id`)."""
    store = receiver.app.state.store

    async def read() -> list[dict[str, Any]]:
        return [dict(row) for row in await store.fetch(sql, {"id": task_id})]

    found: list[dict[str, Any]] = receiver.served.call(read)
    return found


def events_until(receiver: Receiver, task_id: str, found: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The first event of the task that `found` accepts, polling (bounded) until it is there."""
    for _ in range(500):
        for item in receiver.events(task_id):
            if found(item):
                return item
        time.sleep(0.02)
    raise AssertionError(receiver.events(task_id))


def no_jobs(receiver: Receiver, task_id: str) -> None:
    """Wait (bounded) until the task has no job left: whatever its cancel started has run."""
    for _ in range(500):
        if not rows(receiver, "SELECT kind FROM jobs WHERE task_id=:id", task_id):
            return
        time.sleep(0.02)
    raise AssertionError(rows(receiver, "SELECT * FROM jobs WHERE task_id=:id", task_id))


def test_a_queued_task_is_never_submitted_and_its_pacing_slot_is_given_back(
    fakes: tuple[KieFake, FalFake], receiver: Receiver
) -> None:
    kie, _ = fakes
    first, first_id = receiver.submitted(kie)
    second = str(receiver.submit(provider="kie", prompt="the second")["id"])
    # The second waits for the one slot (KIE_MAX_CONCURRENT=1): its submit job is put back each turn.
    events_until(receiver, second, lambda e: e["kind"] == "created")
    assert receiver.alice.get(f"/v1/tasks/{second}").json()["status"] == "queued"
    cancel(receiver, second)
    no_jobs(receiver, second)
    # Cancelling the first (submitted, kie has no cancel) gives its slot back: a third goes out.
    cancel(receiver, first)
    third, _ = receiver.submitted(kie)
    assert len(kie.calls(GENERATE)) == 2  # the first and the third: the second never left
    assert rows(receiver, "SELECT status FROM tasks WHERE id=:id", second) == [{"status": "cancelled"}]
    assert receiver.alice.get(f"/v1/tasks/{second}").json()["cost"]["usd"] == 0  # never reached kie
    left = events_until(
        receiver, first, lambda e: e["kind"] == "cancel" and "offers no cancel" in e["summary"]
    )
    assert left["change"] is None
    # kie runs it anyway and calls back: recorded, ignored, nothing fetched.
    answer = kie.complete(first_id, [kie.host("late.png")])
    assert answer is not None and answer.status_code == 200
    late = events_until(receiver, first, lambda e: e["kind"] == "callback")
    assert late["change"] is None and "already cancelled" in late["summary"]
    after = receiver.alice.get(f"/v1/tasks/{first}").json()
    assert (after["status"], after["images"]) == ("cancelled", [])
    assert kie.files["late.png"].fetches == 0
    assert receiver.alice.get(f"/v1/tasks/{third}").json()["status"] == "submitted"


def test_a_submitted_fal_task_is_cancelled_at_the_queue_and_the_app_hears_once(
    fakes: tuple[KieFake, FalFake],
    receiver: Receiver,
    hook: Callable[..., AppHook],  # noqa: F811
) -> None:
    _, fal = fakes
    app = hook()
    task_id, request_id = receiver.submitted(fal, notify_url=app.url)
    cancel(receiver, task_id)
    sent = events_until(receiver, task_id, lambda e: e["kind"] == "cancel" and "cancel sent" in e["summary"])
    assert "202 CANCELLATION_REQUESTED" in sent["summary"]
    [put] = [r for r in fal.requests if r.method == "PUT"]
    assert put.path == f"/fal-ai/flux-pro/requests/{request_id}/cancel"
    assert put.headers["authorization"].startswith("Key ")
    assert fal.queue[request_id].status == "CANCELLED"
    # A success webhook after all (fal may finish what it had started): an event, no change, no fetch.
    answer = fal.complete(request_id, [fal.host("late.png")])
    assert answer is not None and answer.status_code == 200
    late = events_until(receiver, task_id, lambda e: e["kind"] == "callback")
    assert late["change"] is None
    done = receiver.alice.get(f"/v1/tasks/{task_id}").json()
    assert (done["status"], done["images"], done["error"]) == ("cancelled", [], None)
    # fal had it: it may bill it, so it counts at its price (a budget never under-counts it).
    assert done["cost"]["source"] == "price" and done["cost"]["usd"] > 0, done["cost"]
    [delivery] = app.wait_for(1)
    body = delivery.verify()
    assert body["type"] == "task.cancelled" and body["data"]["status"] == "cancelled"
    notify_events(lambda: receiver.events(task_id), 1)
    quiet(app, 1)
    assert fal.files["late.png"].fetches == 0


def test_a_cancel_while_the_submit_is_on_its_way_cancels_at_fal_once_it_answers(
    fakes: tuple[KieFake, FalFake], receiver: Receiver
) -> None:
    _, fal = fakes
    fal.hold = threading.Event()  # fal has the request but has not answered yet
    try:
        task_id = str(receiver.submit(provider="fal", prompt="a lighthouse at dusk")["id"])
        request_id = fal.provider_task_id()
        cancel(receiver, task_id)  # still queued here: the submit's answer has not come
    finally:
        fal.hold.set()
    sent = events_until(receiver, task_id, lambda e: e["kind"] == "cancel" and "cancel sent" in e["summary"])
    assert "202 CANCELLATION_REQUESTED" in sent["summary"]
    assert fal.queue[request_id].status == "CANCELLED"
    done = receiver.alice.get(f"/v1/tasks/{task_id}").json()
    assert (done["status"], done["provider_task_id"]) == ("cancelled", request_id)
    no_jobs(receiver, task_id)  # no reconcile left to ask fal about it


def test_a_running_download_is_stopped_by_a_cancel(
    fakes: tuple[KieFake, FalFake], receiver: Receiver
) -> None:
    _, fal = fakes
    gate = threading.Event()
    task_id, request_id = receiver.submitted(fal)
    url = fal.host("slow.png", gate=gate)
    try:
        fal.complete(request_id, [url])
        fal.wait_for(lambda: fal.files["slow.png"].fetches == 1, seconds=20)
        assert receiver.wait_status(task_id, "downloading")["status"] == "downloading"
        cancel(receiver, task_id)
        no_jobs(receiver, task_id)  # the download job ended while its body was still held back
    finally:
        gate.set()
    assert rows(receiver, "SELECT path FROM images WHERE task_id=:id", task_id) == [{"path": None}]
    assert receiver.alice.get(f"/v1/tasks/{task_id}").json()["status"] == "cancelled"


def test_a_fallback_chain_stops_at_a_cancel(fakes: tuple[KieFake, FalFake], receiver: Receiver) -> None:
    kie, fal = fakes
    task_id, kie_id = receiver.submitted(kie, fallback=["fal"])
    cancel(receiver, task_id)
    failed = kie.fail(kie_id, moderated=False, message="Image generation task failed")
    assert failed is not None and failed.status_code == 200
    events_until(receiver, task_id, lambda e: e["kind"] == "callback")
    done = receiver.alice.get(f"/v1/tasks/{task_id}").json()
    assert (done["status"], done["provider"], done["attempts"]) == ("cancelled", "kie", [])
    assert not fal.calls(FAL_SUBMIT)


def test_ended_tasks_answer_409_and_other_tenants_404(
    fakes: tuple[KieFake, FalFake], receiver: Receiver
) -> None:
    kie, _ = fakes
    done = receiver.wait(str(receiver.submit(provider="sandbox", prompt="p")["id"]))
    assert done["status"] == "succeeded"
    again = receiver.alice.post(f"/v1/tasks/{done['id']}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "task_ended"
    running, _ = receiver.submitted(kie)
    active = receiver.alice.delete(f"/v1/tasks/{running}")
    assert active.status_code == 409 and active.json()["error"]["code"] == "task_active"
    for task_id in (done["id"], running):
        assert receiver.bob.post(f"/v1/tasks/{task_id}/cancel").status_code == 404
        assert receiver.bob.delete(f"/v1/tasks/{task_id}").status_code == 404
    assert receiver.alice.get(f"/v1/tasks/{running}").json()["status"] == "submitted"  # bob changed nothing
    assert receiver.anon.post(f"/v1/tasks/{running}/cancel").status_code == 401
    for unknown in ("tsk_00000000000000000000000000", "not-an-id"):
        assert receiver.alice.post(f"/v1/tasks/{unknown}/cancel").status_code == 404
        assert receiver.alice.delete(f"/v1/tasks/{unknown}").status_code == 404
    listed = receiver.alice.get("/v1/tasks", params={"status": "cancelled"}).json()["items"]
    assert listed == []
    cancel(receiver, running)
    listed = receiver.alice.get("/v1/tasks", params={"status": "cancelled"}).json()["items"]
    assert [t["id"] for t in listed] == [running]


def test_delete_removes_the_task_its_images_their_bytes_and_a_pending_notification(
    receiver: Receiver,
    hook: Callable[..., AppHook],  # noqa: F811
) -> None:
    app = hook(default=Answer(503))  # the app is down: the notification stays due
    task = receiver.submit(provider="sandbox", prompt="p", notify_url=app.url)
    done = receiver.wait(str(task["id"]))
    assert done["status"] == "succeeded"
    [image] = done["images"]
    assert receiver.anon.get(image["url"]).status_code == 200
    [stored] = rows(receiver, "SELECT path FROM images WHERE task_id=:id", done["id"])
    media = receiver.app.state.media
    assert receiver.served.call(lambda: media.exists(stored["path"]))
    gone = receiver.alice.delete(f"/v1/tasks/{done['id']}")
    assert gone.status_code == 204 and gone.content == b""
    assert receiver.alice.get(f"/v1/tasks/{done['id']}").status_code == 404
    assert receiver.alice.get(f"/v1/tasks/{done['id']}/events").status_code == 404
    assert receiver.anon.get(image["url"]).status_code == 404
    assert not receiver.served.call(lambda: media.exists(stored["path"]))
    for table in ("images", "events", "jobs"):
        assert rows(receiver, f"SELECT * FROM {table} WHERE task_id=:id", done["id"]) == []
    assert receiver.alice.delete(f"/v1/tasks/{done['id']}").status_code == 404


# -- the client library and the CLI ---------------------------------------------------------------


def test_client_cancels_waits_and_deletes(fakes: tuple[KieFake, FalFake], receiver: Receiver) -> None:
    kie, _ = fakes
    with Client(receiver.url, ALICE) as client:
        task = client.create("kie", "a lighthouse at dusk")
        kie.provider_task_id()
        cancelled = client.cancel(task)
        assert cancelled["status"] == "cancelled"
        assert client.wait(task["id"], timeout=5)["status"] == "cancelled"  # an end: it returns at once
        with pytest.raises(ApiError) as ended:
            client.cancel(task["id"])
        assert (ended.value.status, ended.value.code) == (409, "task_ended")
        client.delete(task)
        with pytest.raises(ApiError) as missing:
            client.get(task["id"])
        assert missing.value.status == 404

    async def use_async() -> None:
        async with AsyncClient(receiver.url, ALICE) as client:
            task = await client.create("kie", "another")
            with pytest.raises(ApiError) as active:
                await client.delete(task)
            assert (active.value.status, active.value.code) == (409, "task_active")
            assert (await client.cancel(task["id"]))["status"] == "cancelled"
            await client.delete(task["id"])

    asyncio.run(use_async())


def test_generate_raises_a_clear_error_for_a_cancelled_task(
    fakes: tuple[KieFake, FalFake], receiver: Receiver, tmp_path: Any
) -> None:
    kie, _ = fakes
    canceller = threading.Thread(target=lambda: cancel(receiver, _created_kie_task(receiver, kie)))
    canceller.start()
    try:
        with Client(receiver.url, ALICE) as client, pytest.raises(TaskCancelled, match="was cancelled"):
            client.generate("kie", "a lighthouse at dusk", out=tmp_path, timeout=30)
    finally:
        canceller.join(30)


def _created_kie_task(receiver: Receiver, kie: KieFake) -> str:
    """The id of the task kie has just been sent (once it is submitted)."""
    kie.provider_task_id()
    [task] = receiver.alice.get("/v1/tasks").json()["items"]
    return str(task["id"])


def test_cli_cancel_and_delete(
    fakes: tuple[KieFake, FalFake],
    receiver: Receiver,
    cli: Run,  # noqa: F811
) -> None:
    kie, _ = fakes
    task_id, _ = receiver.submitted(kie)
    status, out, err = cli("delete", task_id)
    assert (status, out) == (2, "")
    assert err.strip() == "receiver: the task has not ended: cancel it first"
    status, out, _ = cli("cancel", task_id)
    assert status == 0 and '"status": "cancelled"' in out
    status, _, err = cli("cancel", task_id)
    assert status == 2 and err.strip() == "receiver: the task has already ended (cancelled)"
    status, out, _ = cli("get", task_id)
    assert status == 1  # a cancelled task is not a success
    status, _, _ = cli("delete", task_id)
    assert status == 0
    status, _, err = cli("delete", task_id)
    assert status == 2 and err.strip() == "receiver: no such task"
    assert len(err.strip().splitlines()) == 1


# -- fal's cancel, as the translator spells and reads it -------------------------------------------


def test_fal_cancel_is_a_put_to_the_request_url_with_the_key() -> None:
    settings = ProviderSettings(api_key="key-id:secret", base_url=QUEUE, extra={})
    ctx = Context(settings, callback_url="https://receiver.example/callbacks/fal/t")
    kept = f"{QUEUE}/fal-ai/flux-pro/requests/{REQUEST_ID}"
    spec = TaskSpec("tsk_1", "flux-kontext-pro", "p", (), {}, {}, REQUEST_ID, {"response_url": kept})
    request = Fal().build_cancel(spec, ctx)
    assert request is not None
    assert (request.method, str(request.url)) == ("PUT", f"{kept}/cancel")
    assert request.headers["Authorization"] == "Key key-id:secret"
    # A kept URL off the queue's origin is never trusted with the key: the documented one is built.
    elsewhere = TaskSpec(
        "tsk_1", "flux-kontext-pro", "p", (), {}, {}, REQUEST_ID, {"response_url": "https://evil.example/x"}
    )
    built = Fal().build_cancel(elsewhere, ctx)
    assert built is not None and str(built.url) == f"{kept}/cancel"
    assert Fal().build_cancel(TaskSpec("tsk_1", "flux-kontext-pro", "p", (), {}, {}, None, {}), ctx) is None


@pytest.mark.parametrize(
    ("status", "body", "said"),
    [
        (202, {"status": "CANCELLATION_REQUESTED"}, "fal answered 202 CANCELLATION_REQUESTED"),
        (400, {"status": "ALREADY_COMPLETED"}, "fal answered 400 ALREADY_COMPLETED"),
        (404, {"status": "NOT_FOUND"}, "fal answered 404 NOT_FOUND"),
        (200, "not json", "fal answered 200 (no status)"),
    ],
)
def test_fal_cancel_answers_that_are_final(status: int, body: Any, said: str) -> None:
    assert Fal().parse_cancel(_answer(status, body)) == said


def test_fal_cancel_answers_worth_asking_again_or_refused() -> None:
    with pytest.raises(ProviderUnavailable):
        Fal().parse_cancel(_answer(503, {"detail": "busy"}))
    with pytest.raises(ProviderRejected):
        Fal().parse_cancel(_answer(401, {"detail": "No user found for Key ID and Secret"}))


def _answer(status: int, body: Any) -> httpx.Response:
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    request = httpx.Request("PUT", f"{QUEUE}/fal-ai/flux-pro/requests/{REQUEST_ID}/cancel")
    return httpx.Response(status, content=content, request=request)
