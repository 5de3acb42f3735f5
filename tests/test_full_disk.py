"""A media store that cannot take a write: a real full disk (a small tmpfs, filled up) and a bucket that
refuses writes (moto behind S3's own SlowDown / AccessDenied answers). The download is retried as
transient with `storage_unavailable` events and the task waits; /readyz answers 503 naming the store;
uploads answer 503 `storage_unavailable`; once the store takes writes again the next try stores the
whole image. Nothing half-written is ever served or left behind."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.common import big_png
from tests.fakes.common import png
from tests.fakes.kie import KEY
from tests.fakes.kie import KieFake
from tests.harness import Receiver
from tests.s3 import MotoS3

KiB = 1024
DISK = "4m"  # the tmpfs under the media directory


def _mounter() -> list[str] | None:
    """How this process mounts a tmpfs: as root itself, else through passwordless sudo; None if neither."""
    if os.geteuid() == 0:
        return []
    sudo = shutil.which("sudo")
    if sudo and subprocess.run([sudo, "-n", "true"], capture_output=True, check=False).returncode == 0:
        return [sudo, "-n"]
    return None


@pytest.fixture
def small_media(tmp_path: Path) -> Iterator[Path]:
    """`tmp_path/data/media` on a tmpfs of DISK: a real file system that fills up (ENOSPC). The database
    stays on the ordinary disk beside it, as on a deployment with a volume of its own for media."""
    media = tmp_path / "data" / "media"
    media.mkdir(parents=True)
    prefix = _mounter()
    if prefix is None:
        pytest.skip("mounting a small tmpfs needs root or passwordless sudo (CI runs as root)")
    mounted = subprocess.run(
        [*prefix, "mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0700", "tmpfs", str(media)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield media
    finally:
        subprocess.run([*prefix, "umount", "-l", str(media)], check=False)


def fill(media: Path) -> Path:
    """Fill the file system under `media` to the last byte; the filler file."""
    filler = media / "filler"
    block = b"\xff" * (64 * KiB)
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    while True:  # the last partial block, byte by byte in halves
        try:
            with open(filler, "ab", buffering=0) as handle:
                handle.write(b"\xff" * 512)
        except OSError:
            break
    return filler


def write_errors(receiver: Receiver, store: str) -> float:
    text = receiver.anon.get("/metrics").text
    found = re.search(rf'^receiver_media_write_errors_total{{store="{store}"}} (\S+)$', text, re.MULTILINE)
    assert found is not None, "the metric is missing"
    return float(found.group(1))


def readiness(receiver: Receiver, status: int) -> dict[str, Any]:
    """/readyz's answer once it is `status` (its media probe is cached for a few seconds)."""
    deadline = time.monotonic() + 30
    while True:
        answer = receiver.anon.get("/readyz")
        if answer.status_code == status:
            body: dict[str, Any] = answer.json()
            return body
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.2)


def storage_events(receiver: Receiver, task_id: str, at_least: int) -> list[dict[str, Any]]:
    """The task's `storage_unavailable` events once there are `at_least` of them."""
    deadline = time.monotonic() + 60
    while True:
        found = [e for e in receiver.events(task_id) if e["kind"] == "storage_unavailable"]
        if len(found) >= at_least:
            return found
        assert time.monotonic() < deadline, receiver.events(task_id)
        time.sleep(0.05)


def leftovers(media: Path) -> list[Path]:
    """Temp files (a write that did not finish) anywhere in the media directory."""
    return [path for path in media.rglob(".*") if path.is_file() and ".ready." not in path.name]


def test_a_full_disk_keeps_the_download_waiting_and_readyz_names_it(
    small_media: Path, kie: KieFake, start_receiver: Callable[..., Receiver]
) -> None:
    receiver = start_receiver(
        KIE_API_KEY=KEY,
        KIE_BASE_URL=kie.url,
        RECEIVER_DOWNLOAD_PROCESS="1",  # the write happens in the download child
        RECEIVER_DOWNLOAD_RETRY_DELAYS="0.05,0.1",
    )
    assert readiness(receiver, 200)["checks"] == {"database": "ok", "media": "ok"}
    filler = fill(small_media)
    ready = readiness(receiver, 503)
    assert ready["status"] == "unavailable"
    assert ready["checks"]["database"] == "ok"
    assert ready["checks"]["media"] == f"media directory {small_media}: no space left on device"
    assert ready["problems"] == [ready["checks"]["media"]]

    upload = receiver.alice.post("/v1/uploads", content=png(), headers={"Content-Type": "image/png"})
    assert upload.status_code == 503, upload.text
    assert upload.json()["error"]["code"] == "storage_unavailable"

    body = big_png(1024 * KiB)  # bigger than the room made below: its write fails half way
    task_id, kie_id = receiver.submitted(kie)
    assert kie.succeed(kie_id, kie.host("full.png", body)).status_code == 200
    image = small_media / task_id / "0.png"
    # More tries than the retry schedule has steps: the image's host did nothing wrong, the task waits.
    events = storage_events(receiver, task_id, 4)
    assert "no space left on device" in events[0]["summary"]
    assert str(small_media) in events[0]["summary"]
    task = receiver.alice.get(f"/v1/tasks/{task_id}").json()
    assert task["status"] == "downloading", task
    assert task["images"] == [] or all(entry.get("size") is None for entry in task["images"]), task
    assert not image.exists()
    assert receiver.alice.get(f"/v1/tasks/{task_id}/images/0").status_code == 404
    assert write_errors(receiver, "directory") >= 4

    # Room for part of the image only: each try writes some of it, fails, and removes what it wrote.
    with open(filler, "r+b") as handle:
        handle.truncate(filler.stat().st_size - 256 * KiB)
    seen = len(storage_events(receiver, task_id, 1))
    storage_events(receiver, task_id, seen + 3)
    assert not image.exists()
    assert receiver.alice.get(f"/v1/tasks/{task_id}").json()["status"] == "downloading"

    filler.unlink()  # space again: the next try stores the whole image
    task = receiver.wait(task_id, 60)
    assert task["status"] == "succeeded", task
    [stored] = task["images"]
    assert stored["size"] == len(body)
    assert stored["sha256"] == hashlib.sha256(body).hexdigest()
    served = receiver.anon.get(stored["url"])
    assert served.status_code == 200
    assert served.content == body
    assert image.read_bytes() == body
    assert leftovers(small_media) == []
    assert readiness(receiver, 200)["checks"]["media"] == "ok"
    upload = receiver.alice.post("/v1/uploads", content=png(), headers={"Content-Type": "image/png"})
    assert upload.status_code == 201, upload.text


def test_a_disk_that_stays_full_fails_the_task_only_at_its_deadline(
    small_media: Path, kie: KieFake, start_receiver: Callable[..., Receiver]
) -> None:
    deadline = 6.0
    receiver = start_receiver(
        KIE_API_KEY=KEY,
        KIE_BASE_URL=kie.url,
        RECEIVER_DOWNLOAD_PROCESS="0",  # the write happens on the worker's own loop
        RECEIVER_DOWNLOAD_RETRY_DELAYS="0.05",  # spent after one try: the store's trouble does not count
        RECEIVER_TASK_DEADLINE=str(deadline),
    )
    fill(small_media)
    task_id, kie_id = receiver.submitted(kie)
    assert kie.succeed(kie_id, kie.host("never.png", png())).status_code == 200
    storage_events(receiver, task_id, 1)
    task = receiver.wait(task_id, 60)
    assert task["status"] == "failed", task
    assert task["error"]["code"] == "timed_out"
    # Ended by the deadline, not before it: every try until then was retried.
    lived = datetime.fromisoformat(task["completed_at"]) - datetime.fromisoformat(task["created_at"])
    assert lived.total_seconds() >= deadline, task
    message = task["error"]["message"]
    assert "RECEIVER_TASK_DEADLINE" in message
    assert f"media directory {small_media}: no space left on device" in message
    assert leftovers(small_media) == []


@pytest.mark.parametrize("refusal", ["SlowDown", "AccessDenied"])
def test_a_bucket_refusing_writes_keeps_the_download_waiting_and_readyz_names_it(
    refusal: str, s3: MotoS3, kie: KieFake, start_receiver: Callable[..., Receiver]
) -> None:
    bucket = s3.new_bucket()
    receiver = start_receiver(
        KIE_API_KEY=KEY,
        KIE_BASE_URL=kie.url,
        RECEIVER_DOWNLOAD_RETRY_DELAYS="0.05,0.1",
        **s3.env(bucket, "m"),
    )
    readiness(receiver, 200)
    s3.refuse_writes(refusal)
    try:
        ready = readiness(receiver, 503)
        said = {"SlowDown": "HTTP 503 SlowDown", "AccessDenied": "HTTP 403 AccessDenied"}[refusal]
        assert ready["checks"]["media"].startswith(
            f"media bucket s3://{bucket}/m: the write was refused: {said}"
        )
        assert "secret" not in ready["checks"]["media"].lower()
        upload = receiver.alice.post("/v1/uploads", content=png(), headers={"Content-Type": "image/png"})
        assert upload.status_code == 503, upload.text
        assert upload.json()["error"]["code"] == "storage_unavailable"

        body = png(200, 100)
        task_id, kie_id = receiver.submitted(kie)
        assert kie.succeed(kie_id, kie.host("refused.png", body)).status_code == 200
        events = storage_events(receiver, task_id, 4)
        assert said in events[0]["summary"]
        assert receiver.alice.get(f"/v1/tasks/{task_id}").json()["status"] == "downloading"
        assert s3.keys(bucket, f"m/{task_id}/") == {}
        assert write_errors(receiver, "bucket") >= 4
    finally:
        s3.refuse_writes(None)
    task = receiver.wait(task_id, 60)
    assert task["status"] == "succeeded", task
    assert s3.keys(bucket, f"m/{task_id}/") == {f"m/{task_id}/0.png": len(body)}
    assert receiver.anon.get(task["images"][0]["url"]).content == body
    assert s3.open_uploads(bucket) == []
    assert readiness(receiver, 200)["checks"]["media"] == "ok"
