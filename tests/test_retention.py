"""Retention (RECEIVER_RETAIN_IMAGES, RECEIVER_RETAIN_TASKS): the sweep, over real HTTP, on SQLite with a
media directory and on PostgreSQL with a bucket; and its rules called directly with an injected clock.

Durations are of seconds and the sweep runs every 0.2 s; the tests never bet on when it runs: they poll
the state they expect, within a generous bound, and check that what must stay is still there after."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from receiver import jobs
from receiver.config import ConfigError
from receiver.config import load_settings
from receiver.media import LocalMedia
from receiver.media import one_chunk
from receiver.models import Outcome
from receiver.store import timed_out
from receiver.store.base import Timings
from receiver.store.rules import Store
from receiver.store.sqlite import SqliteBackend
from tests.fakes.common import png
from tests.fakes.kie import KieFake
from tests.harness import Receiver
from tests.s3 import MotoS3
from tests.test_config import serve_once
from tests.test_config_checks import clean_env
from tests.test_console import browser_page as browser_page  # a chromium page, skipped without it
from tests.test_console import sign_in
from tests.test_providers_e2e import database_env as database_env  # both stacks, as the e2e suite
from tests.test_providers_e2e import media_env as media_env
from tests.test_rules import new_task

SWEEP = {"RECEIVER_SWEEP_INTERVAL": "0.2"}
BOUND = 60.0  # seconds a poll may take on a machine kept busy: far more than the seconds it needs


def poll(read: Callable[[], Any], done: Callable[[Any], bool], seconds: float = BOUND) -> Any:
    """`read()` again and again until `done` says yes; the test fails past `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        value = read()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"still {value!r} after {seconds} s"
        time.sleep(0.05)


def sandbox_task(receiver: Receiver) -> dict[str, Any]:
    task = receiver.submit(provider="sandbox", prompt="a lighthouse at dusk")
    ended = receiver.wait(str(task["id"]))
    assert ended["status"] == "succeeded", ended
    return ended


def stored_keys(receiver: Receiver, media_env: dict[str, str], s3: MotoS3 | None, prefix: str) -> list[str]:
    """The media keys under `prefix` in the receiver's media store (directory or bucket)."""
    if "RECEIVER_MEDIA_URL" in media_env:
        assert s3 is not None
        bucket, _, folder = media_env["RECEIVER_MEDIA_URL"].removeprefix("s3://").partition("/")
        return list(s3.keys(bucket, f"{folder}/{prefix}" if folder else prefix))
    root = receiver.settings.media_dir
    return [str(path.relative_to(root)) for path in root.glob(f"{prefix}*") if path.is_file()] + [
        str(path.relative_to(root)) for path in root.glob(f"{prefix}*/*") if path.is_file()
    ]


def metric(receiver: Receiver, line_start: str) -> float:
    for line in receiver.anon.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {line_start} in /metrics")


@pytest.fixture
def s3_or_none(request: pytest.FixtureRequest, stack: str) -> MotoS3 | None:
    return request.getfixturevalue("s3") if stack.endswith("s3") else None


def test_an_expired_image_keeps_its_entry_and_answers_410(
    start_receiver: Callable[..., Receiver], media_env: dict[str, str], s3_or_none: MotoS3 | None
) -> None:
    receiver = start_receiver(**media_env, **SWEEP, RECEIVER_RETAIN_IMAGES="1s")
    before = metric(receiver, 'receiver_retention_deleted_total{what="images"}')
    task = sandbox_task(receiver)
    task_id, entry = task["id"], task["images"][0]
    assert entry["expired"] is False and entry["url"]
    assert stored_keys(receiver, media_env, s3_or_none, task_id)  # the bytes are there
    expired = poll(
        lambda: receiver.alice.get(f"/v1/tasks/{task_id}").json(), lambda t: t["images"][0]["expired"]
    )

    image = expired["images"][0]
    assert image["url"] is None
    for field in ("index", "content_type", "size", "sha256", "width", "height"):
        assert image[field] == entry[field], field
    assert expired["status"] == "succeeded" and expired["completed_at"] == task["completed_at"]
    by_key = receiver.alice.get(f"/v1/tasks/{task_id}/images/0")
    assert by_key.status_code == 410 and by_key.json()["error"]["code"] == "image_expired"
    by_link = receiver.anon.get(entry["url"])  # the signed link it had: still valid, the bytes gone
    assert by_link.status_code == 410 and by_link.json()["error"]["code"] == "image_expired"
    assert stored_keys(receiver, media_env, s3_or_none, task_id) == []
    assert receiver.alice.get(f"/v1/tasks/{task_id}/events").status_code == 200  # the task itself stays
    listed = receiver.alice.get("/v1/tasks").json()["items"]
    assert [item["images"][0]["expired"] for item in listed if item["id"] == task_id] == [True]
    assert metric(receiver, 'receiver_retention_deleted_total{what="images"}') >= before + 1
    assert metric(receiver, "receiver_retention_last_sweep_timestamp_seconds") > 0


def test_a_task_past_its_retention_is_gone_and_a_running_one_stays(
    kie: KieFake,
    start_receiver: Callable[..., Receiver],
    media_env: dict[str, str],
    s3_or_none: MotoS3 | None,
) -> None:
    receiver = start_receiver(
        **media_env,
        **SWEEP,
        **kie.receiver_env(),
        RECEIVER_RETAIN_TASKS="1s",
    )
    # Made first: by the time the ended task below is swept, this one is older than the retention.
    running, _ = receiver.submitted(kie)
    ended = sandbox_task(receiver)["id"]
    poll(lambda: receiver.alice.get(f"/v1/tasks/{ended}").status_code, lambda status: status == 404)

    assert receiver.alice.get(f"/v1/tasks/{ended}/events").status_code == 404
    assert receiver.alice.get(f"/v1/tasks/{ended}/images/0").status_code == 404
    assert ended not in [item["id"] for item in receiver.alice.get("/v1/tasks").json()["items"]]
    assert stored_keys(receiver, media_env, s3_or_none, ended) == []
    still = receiver.alice.get(f"/v1/tasks/{running}")
    assert still.status_code == 200 and still.json()["status"] == "submitted"
    assert receiver.events(running)  # its history too
    assert metric(receiver, 'receiver_retention_deleted_total{what="tasks"}') >= 1


def test_uploads_expire_unless_a_running_task_uses_them(
    kie: KieFake, start_receiver: Callable[..., Receiver], media_env: dict[str, str]
) -> None:
    receiver = start_receiver(
        **media_env,
        **SWEEP,
        **kie.receiver_env(),
        RECEIVER_RETAIN_IMAGES="1s",
    )
    used, unused = (
        receiver.alice.post(
            "/v1/uploads", content=png(40 + n, 30), headers={"Content-Type": "image/png"}
        ).json()
        for n in range(2)
    )
    assert receiver.anon.get(used["url"]).status_code == 200
    task = receiver.submit(provider="kie", prompt="a lighthouse at dusk", images=[used["url"]])
    receiver.wait_status(task["id"], "submitted")
    poll(lambda: receiver.anon.get(unused["url"]).status_code, lambda status: status == 404)
    assert receiver.anon.get(used["url"]).status_code == 200  # the running task still hands it over


@pytest.mark.parametrize("stack", ["postgres+s3"])
def test_two_replicas_sweep_one_at_a_time(
    start_receiver: Callable[..., Receiver], media_env: dict[str, str], s3_or_none: MotoS3 | None
) -> None:
    """Two replicas on one database and bucket: one sweep row, leased by one at a time; every image is
    deleted once: the bucket is asked to delete each image's key once, and the deletions counted by the
    two together (one registry per process) are the images, not more.

    An image reads expired from the moment its sweep marks it, before that sweep has deleted its bytes
    and counted them; so the count is awaited, and read again after two more sweeps have ended, by
    when a second deletion of any of them (two sweeps at once, a batch run again) would be counted."""
    env = {**media_env, **SWEEP, "RECEIVER_RETAIN_IMAGES": "1s"}
    first = start_receiver("one", **env)
    second = start_receiver("two", **env)
    images = 'receiver_retention_deleted_total{what="images"}'
    before = metric(first, images)
    tasks = [sandbox_task(replica)["id"] for replica in (first, second, first, second)]

    def all_expired() -> bool:
        return all(
            second.alice.get(f"/v1/tasks/{task_id}").json()["images"][0]["expired"] for task_id in tasks
        )

    poll(all_expired, bool)
    poll(lambda: metric(first, images), lambda count: count >= before + len(tasks))
    last_sweep = "receiver_retention_last_sweep_timestamp_seconds"
    for _ in range(2):  # a sweep ends after this point, then another (each sets the time it ended)
        ended = metric(first, last_sweep)
        poll(lambda: metric(first, last_sweep), ended.__lt__)
    assert metric(first, images) == before + len(tasks)
    if s3_or_none is not None:
        bucket, _, folder = media_env["RECEIVER_MEDIA_URL"].removeprefix("s3://").partition("/")
        deleted = s3_or_none.deleted(bucket, folder)
        per_task = {task_id: [n for key, n in deleted.items() if task_id in key] for task_id in tasks}
        assert per_task == {task_id: [1] for task_id in tasks}, deleted
    rows = first.served.call(lambda: first.app.state.store.fetch("SELECT * FROM jobs WHERE kind='sweep'"))
    assert len(rows) == 1
    parked = first.served.call(lambda: first.app.state.store.parked_counts())
    assert parked == {}


@pytest.mark.parametrize("value", ["30", "1w", "1.5h", "0s", "-5m", "12 h", "99999999999d"])
@pytest.mark.parametrize("name", ["RECEIVER_RETAIN_IMAGES", "RECEIVER_RETAIN_TASKS"])
def test_a_bad_duration_stops_serve_with_one_line(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value})
    if value == "1w":  # once as a process: exit 2 and one line, no traceback
        result = serve_once({**clean_env(tmp_path), name: value})
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and "Traceback" not in result.stderr, lines


def test_durations_are_read_in_their_units() -> None:
    settings = load_settings({"RECEIVER_RETAIN_IMAGES": "90s", "RECEIVER_RETAIN_TASKS": "30d"})
    assert (settings.retain_images, settings.retain_tasks) == (90.0, 30 * 86400.0)
    assert load_settings({"RECEIVER_RETAIN_IMAGES": "15m"}).retain_images == 900.0
    assert load_settings({"RECEIVER_RETAIN_IMAGES": "12h"}).retain_images == 12 * 3600.0
    assert load_settings({}).retain_images is None


# -- the sweep's rules, directly, on a real SQLite file, with time moved by hand -------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_the_sweep_deletes_in_batches_and_never_an_unended_task(tmp_path: Path) -> None:
    asyncio.run(_sweep_in_batches(tmp_path))


async def _sweep_in_batches(tmp_path: Path) -> None:
    """More ended tasks than a batch holds, all gone after one sweep; a task still running, made
    before all of them, untouched (its row and its stored image)."""
    from receiver.jobs.sweep import BATCH
    from receiver.jobs.sweep import Sweep

    clock = Clock()
    store = Store(SqliteBackend(tmp_path / "receiver.db", clock), Timings(300.0, 3600.0))
    await store.open()
    media = LocalMedia(tmp_path / "media")
    try:
        running = await _task(store, media, "tsk_running", end=False)
        ended = [await _task(store, media, f"tsk_{n:05d}", end=True) for n in range(BATCH + 7)]
        clock.now += 100
        settings = load_settings({"RECEIVER_RETAIN_TASKS": "50s", "RECEIVER_RETAIN_IMAGES": "10s"})
        sweep = Sweep(settings, store, media, _WallClock(clock), pause=0)
        assert await sweep.tasks(clock.now - 50) == len(ended)
        assert await store.task(running) is not None
        assert (await store.images(running))[0].path is not None
        assert await media.exists(f"{running}/0.png")
        assert not any((tmp_path / "media").glob("tsk_0*/*"))
        assert (await store.fetch("SELECT COUNT(*) AS n FROM tasks"))[0]["n"] == 1
        assert (await store.fetch("SELECT COUNT(*) AS n FROM events WHERE task_id<>:id", {"id": running}))[0][
            "n"
        ] == 0
    finally:
        await store.close()


class _WallClock(jobs.Clock):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def time(self) -> float:
        return self.clock.now

    def monotonic(self) -> float:
        return self.clock.now


async def _task(store: Store, media: LocalMedia, task_id: str, *, end: bool) -> str:
    """A task with one image stored (in the media directory and its row); ended (timed out after its
    image came: the deadline's path) or still downloading."""
    await store.create_task(new_task(task_id))
    await store.apply_outcome(task_id, Outcome(state="succeeded", image_urls=("http://x/0.png",)), "poll")
    key = f"{task_id}/0.png"
    data = png(8, 8)
    await media.put(key, one_chunk(data))
    await store.write(
        lambda tx: tx.run(
            "UPDATE images SET path=:key, content_type='image/png', size=:size, sha256=:sha"
            " WHERE task_id=:id",
            {"key": key, "size": len(data), "sha": "0" * 64, "id": task_id},
        )
    )
    if end:
        await store.fail_task(task_id, timed_out(), "deadline")
    return task_id


@pytest.mark.parametrize("stack", ["sqlite+dir"])  # the page is the same on both; the API is tested on both
def test_the_console_shows_an_expired_image_as_expired(
    browser_page: tuple[Any, Receiver, list[str]], start_receiver: Callable[..., Receiver]
) -> None:
    """In a real browser: a labelled placeholder where the picture was, in the task and in the list,
    never a broken image, and no script error. (The page is the console's browser fixture; the
    receiver it shows is one of our own, with a retention.)"""
    page, _, problems = browser_page
    receiver = start_receiver("retained", **SWEEP, RECEIVER_RETAIN_IMAGES="1s")
    task_id = sandbox_task(receiver)["id"]
    poll(lambda: receiver.alice.get(f"/v1/tasks/{task_id}").json()["images"][0]["expired"], bool)
    sign_in(page, receiver)
    thumb = page.wait_for_selector(f"tr[data-task-id='{task_id}'] .thumb.expired")
    assert thumb.text_content() == "expired"
    page.goto(f"{receiver.url}/ui#/tasks/{task_id}")
    placeholder = page.wait_for_selector("#task-images figure.expired .expired-image")
    assert "Expired" in (placeholder.text_content() or "")
    assert page.query_selector_all("#task-images img") == []  # no picture to break
    assert "#0" in (page.text_content("#task-images figcaption") or "")  # its entry, kept
    assert problems == []
