"""The end-to-end suite every provider passes: the receiver served for real, each provider's fake
speaking its wire format over HTTP (tests/fakes)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver import metrics
from tests.conftest import database_settings
from tests.conftest import media_settings
from tests.fakes import FAKES
from tests.fakes.common import ProviderFake
from tests.fakes.common import png
from tests.harness import Receiver
from tests.harness import download_children


@pytest.fixture(scope="module", autouse=True)
def metrics_after_the_suite(artifacts: Path) -> Iterator[None]:
    """Keep what /metrics shows once the suite has run (metrics-after-e2e.txt in `artifacts`)."""
    yield
    (artifacts / "metrics-after-e2e.txt").write_bytes(metrics.render())


@pytest.fixture
def database_env(request: pytest.FixtureRequest, stack: str) -> dict[str, str]:
    """Every test here runs on SQLite with a media directory, and on PostgreSQL with a bucket."""
    return database_settings(request, stack.split("+")[0])


@pytest.fixture
def media_env(request: pytest.FixtureRequest, stack: str) -> dict[str, str]:
    return media_settings(request, stack.split("+")[1])


@pytest.fixture(params=FAKES, ids=lambda fake: fake.name)
def fake(request: pytest.FixtureRequest) -> Iterator[ProviderFake]:
    instance: ProviderFake = request.param().start()
    yield instance
    instance.stop()


@pytest.fixture
def receiver(
    fake: ProviderFake, start_receiver: Callable[..., Receiver], media_env: dict[str, str]
) -> Receiver:
    return start_receiver(**fake.receiver_env(), **media_env, RECEIVER_RECONCILE_AFTER=0.3)


def submit(receiver: Receiver, fake: ProviderFake, image: bool = False) -> tuple[str, str]:
    """Create a task; return (our id, the provider's id) once the provider has it."""
    source = fake.host(f"in-{time.monotonic_ns()}.png") if image or not fake.text_to_image else None
    task = receiver.submit(provider=fake.name, prompt="a lighthouse at dusk", **fake.task_body(source))
    return str(task["id"]), fake.provider_task_id()


def test_text_to_image_or_edit_succeeds(fake: ProviderFake, receiver: Receiver) -> None:
    image = png(72, 36)
    task_id, provider_id = submit(receiver, fake)
    receiver.wait_status(task_id, "submitted")
    answer = fake.complete(provider_id, [fake.host("out.png", image)])
    assert answer is not None and answer.status_code == 200, answer and answer.text
    done = receiver.wait(task_id)
    assert done["status"] == "succeeded", done
    assert done["provider_task_id"] == provider_id
    [stored] = done["images"]
    assert (stored["width"], stored["height"]) == (72, 36)
    assert stored["sha256"] == hashlib.sha256(image).hexdigest()
    assert httpx.get(stored["url"]).content == image
    # Downloaded by the download child (RECEIVER_DOWNLOAD_PROCESS=auto on two cores), on both stacks.
    assert receiver.settings.download_process
    assert len(download_children(os.getpid())) == 1


def test_editing_succeeds(fake: ProviderFake, receiver: Receiver) -> None:
    task_id, provider_id = submit(receiver, fake, image=True)
    fake.complete(provider_id, [fake.host("edit.png")])
    assert receiver.wait(task_id)["status"] == "succeeded"


@pytest.mark.parametrize(("moderated", "code"), [(True, "content_moderated"), (False, "generation_failed")])
def test_failures(fake: ProviderFake, receiver: Receiver, moderated: bool, code: str) -> None:
    task_id, provider_id = submit(receiver, fake)
    receiver.wait_status(task_id, "submitted")
    answer = fake.fail(provider_id, moderated, "the provider said no")
    assert answer is not None and answer.status_code == 200
    done = receiver.wait(task_id)
    assert done["status"] == "failed"
    assert done["error"]["code"] == code
    assert "the provider said no" in done["error"]["message"]


def test_concurrent_duplicates_fetch_once(fake: ProviderFake, receiver: Receiver) -> None:
    task_id, provider_id = submit(receiver, fake)
    receiver.wait_status(task_id, "submitted")
    url = fake.host("dup.png")
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: fake.complete(provider_id, [url]), range(5)))
    assert all(a is not None and a.status_code == 200 for a in answers)
    assert receiver.wait(task_id)["status"] == "succeeded"
    assert fake.files["dup.png"].fetches == 1


def test_early_callback(fake: ProviderFake, receiver: Receiver) -> None:
    fake.hold = threading.Event()
    source = None if fake.text_to_image else fake.host("early-in.png")
    task = receiver.submit(provider=fake.name, prompt="fast", **fake.task_body(source))
    provider_id = fake.provider_task_id()
    assert receiver.alice.get(f"/v1/tasks/{task['id']}").json()["status"] == "queued"
    answer = fake.complete(provider_id, [fake.host("early.png")])
    assert answer is not None and answer.status_code == 200
    fake.hold.set()
    done = receiver.wait(str(task["id"]))
    assert done["status"] == "succeeded"
    assert done["provider_task_id"] == provider_id


def test_lost_callback_recovered_by_reconcile(fake: ProviderFake, receiver: Receiver) -> None:
    task_id, provider_id = submit(receiver, fake)
    receiver.wait_status(task_id, "submitted")
    fake.complete(provider_id, [fake.host("lost.png")], deliver=False)
    done = receiver.wait(task_id)
    assert done["status"] == "succeeded"
    assert any(e["kind"] == "poll" and e["change"] for e in receiver.events(task_id))


def test_lost_failure_recovered_by_reconcile(fake: ProviderFake, receiver: Receiver) -> None:
    task_id, provider_id = submit(receiver, fake)
    receiver.wait_status(task_id, "submitted")
    fake.fail(provider_id, False, "quietly broken", deliver=False)
    done = receiver.wait(task_id)
    assert done["error"]["code"] == "generation_failed"


def test_bad_token(fake: ProviderFake, receiver: Receiver) -> None:
    task_id, _ = submit(receiver, fake)
    receiver.wait_status(task_id, "submitted")
    forged = receiver.callback_url(fake.name, task_id)[:-4] + "AAAA"
    answer = httpx.post(forged, content=b"{}")
    assert answer.status_code == 401
    assert receiver.alice.get(f"/v1/tasks/{task_id}").json()["status"] == "submitted"


def test_bad_and_missing_signatures(fake: ProviderFake, receiver: Receiver) -> None:
    if not fake.signs:
        pytest.skip(f"{fake.name} does not sign callbacks; the token is its protection")
    task_id, provider_id = submit(receiver, fake)
    receiver.wait_status(task_id, "submitted")
    url = fake.host("sig.png")
    # Capture a genuine body by completing without delivery, then deliver it with bad headers.
    body = _success_bytes(fake, provider_id, url)
    for headers in (fake.forged_headers(provider_id, body), {}):
        answer = fake.deliver(provider_id, body, headers=headers)
        assert answer.status_code == 401, answer.text
    # Reconcile may find the fake's completed record meanwhile; no refused callback changed anything.
    refused = [e for e in receiver.events(task_id) if e["kind"] == "callback"]
    # Refusals in a row are one event that counts them (a poll in between starts a new one).
    assert sum(e["repeats"] for e in refused) == 2, refused
    assert not any(e["verified"] or e["change"] for e in refused), refused


def test_malformed_verified_body(fake: ProviderFake, receiver: Receiver) -> None:
    task_id, provider_id = submit(receiver, fake)
    receiver.wait_status(task_id, "submitted")
    answer = fake.deliver(provider_id, fake.malformed_body(provider_id))
    assert answer.status_code == 400, answer.text
    assert receiver.alice.get(f"/v1/tasks/{task_id}").json()["status"] == "submitted"


def _success_bytes(fake: ProviderFake, provider_id: str, url: str) -> bytes:
    """The exact bytes the fake sends for a success callback (recorded by wrapping deliver)."""
    sent: list[bytes] = []
    original = fake.deliver

    def capture(task_id: str, body: bytes, headers: dict[str, str] | None = None) -> Any:
        sent.append(body)
        return httpx.Response(200)

    fake.deliver = capture  # type: ignore[method-assign]
    try:
        fake.complete(provider_id, [url])
    finally:
        fake.deliver = original  # type: ignore[method-assign]
    assert sent, "complete() must send through deliver()"
    return sent[0]
