"""Images and uploads in an S3-compatible bucket (moto's server on loopback); the local directory's modes."""

from __future__ import annotations

import base64
import hashlib
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.fakes.apicore import ApicoreFake
from tests.fakes.common import big_png
from tests.fakes.common import png
from tests.fakes.kie import KEY
from tests.fakes.kie import KieFake
from tests.harness import Receiver
from tests.harness import free_port
from tests.s3 import MotoS3

MiB = 1024 * 1024


def _finish(receiver: Receiver, kie: KieFake, url: str) -> dict[str, Any]:
    task_id, kie_id = receiver.submitted(kie)
    assert kie.succeed(kie_id, url).status_code == 200
    return receiver.wait(task_id, 30)


def _kie_on_s3(
    start_receiver: Callable[..., Receiver], kie: KieFake, env: dict[str, str], **extra: Any
) -> Receiver:
    return start_receiver(KIE_API_KEY=KEY, KIE_BASE_URL=kie.url, **env, **extra)


def test_downloads_and_uploads_land_in_the_bucket(
    s3: MotoS3, kie: KieFake, start_receiver: Callable[..., Receiver], tmp_path: Path
) -> None:
    bucket = s3.new_bucket()
    receiver = _kie_on_s3(start_receiver, kie, s3.env(bucket, "prod/images"))
    small, large = png(320, 200), big_png(9 * MiB)  # one PUT, and a multipart upload
    for name, body in (("small.png", small), ("large.png", large)):
        task = _finish(receiver, kie, kie.host(name, body))
        assert task["status"] == "succeeded", task
        [image] = task["images"]
        key = f"prod/images/{task['id']}/0.png"
        assert s3.keys(bucket, f"prod/images/{task['id']}/") == {key: len(body)}
        assert s3.body(bucket, key) == body
        assert image["sha256"] == hashlib.sha256(body).hexdigest()
        assert image["size"] == len(body)
        assert (image["width"], image["height"]) == ((320, 200) if name == "small.png" else (4000, 3000))
        served = receiver.anon.get(image["url"])
        assert served.status_code == 200
        assert served.content == body
        assert served.headers["content-length"] == str(len(body))
        assert served.headers["etag"] == f'"{image["sha256"]}"'
        assert served.headers["content-type"] == "image/png"
    assert s3.open_uploads(bucket) == []
    assert not (tmp_path / "data" / "media" / task["id"]).exists()  # nothing went to the local directory

    picture = png(33, 21)
    uploaded = receiver.alice.post("/v1/uploads", content=picture, headers={"Content-Type": "image/png"})
    assert uploaded.status_code == 201, uploaded.text
    digest = hashlib.sha256(picture).hexdigest()
    assert uploaded.json()["sha256"] == digest
    assert uploaded.json()["size"] == len(picture)
    assert s3.keys(bucket, "prod/images/uploads/") == {f"prod/images/uploads/{digest}.png": len(picture)}
    assert receiver.anon.get(uploaded.json()["url"]).content == picture
    again = receiver.alice.post("/v1/uploads", content=picture, headers={"Content-Type": "image/png"})
    assert again.json()["sha256"] == digest
    assert list(s3.keys(bucket, "prod/images/uploads/")) == [f"prod/images/uploads/{digest}.png"]


def test_a_download_refused_midway_leaves_no_object(
    s3: MotoS3, kie: KieFake, start_receiver: Callable[..., Receiver]
) -> None:
    bucket = s3.new_bucket()
    receiver = _kie_on_s3(start_receiver, kie, s3.env(bucket), RECEIVER_MAX_IMAGE_BYTES=str(10 * MiB))
    over = kie.host("over.png", big_png(12 * MiB))
    kie.files["over.png"].chunk_delay = 0.000001  # streamed without Content-Length: refused past the cap
    text = kie.host("text.png", b"<html>" + bytes(2 * MiB))
    for url, reason in ((over, "cap"), (text, "PNG, JPEG or WebP")):
        task = _finish(receiver, kie, url)
        assert task["status"] == "failed", task
        assert task["error"]["code"] == "download_failed"
        assert reason in task["error"]["message"]
        assert s3.keys(bucket, f"{task['id']}/") == {}
    assert kie.files["over.png"].fetches == 1
    assert s3.open_uploads(bucket) == []  # the multipart upload begun past 5 MiB was aborted
    too_big = receiver.alice.post(
        "/v1/uploads", content=bytes(11 * MiB), headers={"Content-Type": "image/png"}
    )
    assert too_big.status_code == 413
    assert s3.keys(bucket) == {}


def test_redirect_mode_answers_302_to_a_presigned_url_that_serves_the_bytes(
    s3: MotoS3, kie: KieFake, start_receiver: Callable[..., Receiver]
) -> None:
    bucket = s3.new_bucket()
    receiver = _kie_on_s3(start_receiver, kie, s3.env(bucket, "p"), RECEIVER_MEDIA_REDIRECT="1")
    body = png(64, 64)
    task = _finish(receiver, kie, kie.host("r.png", body))
    assert task["status"] == "succeeded", task
    link = task["images"][0]["url"]
    answer = receiver.anon.get(link, follow_redirects=False)
    assert answer.status_code == 302
    location = answer.headers["location"]
    assert location.startswith(f"{s3.endpoint}/{bucket}/p/{task['id']}/0.png?")
    assert "X-Amz-Signature=" in location
    assert httpx.get(location, timeout=10).content == body
    # The same for the owner's bearer key, and a 404 for an image that is not there.
    assert receiver.alice.get(f"/v1/tasks/{task['id']}/images/0").status_code == 302
    assert receiver.alice.get(f"/v1/tasks/{task['id']}/images/1").status_code == 404


def test_readyz_fails_while_the_bucket_is_unreachable_and_downloads_wait_for_it(
    s3: MotoS3, kie: KieFake, start_receiver: Callable[..., Receiver]
) -> None:
    dead = s3.env(s3.new_bucket(), endpoint=f"http://127.0.0.1:{free_port()}")
    unreachable = start_receiver("dead", **dead)
    answer = unreachable.anon.get("/readyz")
    assert answer.status_code == 503
    assert any("media bucket" in problem for problem in answer.json()["problems"]), answer.text
    upload = unreachable.alice.post("/v1/uploads", content=png(), headers={"Content-Type": "image/png"})
    assert upload.status_code == 503
    assert upload.json()["error"]["code"] == "media_unavailable"

    # A bucket that is not there yet: the download keeps trying past its retry schedule (the image's
    # host did nothing wrong) until the bucket is there.
    bucket = s3.new_bucket(create=False)
    receiver = _kie_on_s3(start_receiver, kie, s3.env(bucket), RECEIVER_DOWNLOAD_RETRY_DELAYS="0.05,0.1")
    assert receiver.anon.get("/readyz").status_code == 503
    task_id, kie_id = receiver.submitted(kie)
    assert kie.succeed(kie_id, kie.host("later.png", png(10, 10))).status_code == 200

    def failures() -> int:
        return sum("storing the image failed" in (e["summary"] or "") for e in receiver.events(task_id))

    deadline = time.monotonic() + 20
    while failures() < 4:
        assert time.monotonic() < deadline, receiver.events(task_id)
        time.sleep(0.05)
    assert receiver.alice.get(f"/v1/tasks/{task_id}").json()["status"] == "downloading"
    s3.client.create_bucket(Bucket=bucket)
    task = receiver.wait(task_id, 30)
    assert task["status"] == "succeeded", task
    ready = time.monotonic() + 30  # /readyz probes the bucket at most every few seconds
    while receiver.anon.get("/readyz").status_code != 200:
        assert time.monotonic() < ready
        time.sleep(0.2)


def test_local_media_is_readable_by_the_service_user_only(
    kie: KieFake, start_receiver: Callable[..., Receiver], tmp_path: Path
) -> None:
    receiver = start_receiver(KIE_API_KEY=KEY, KIE_BASE_URL=kie.url)
    task = _finish(receiver, kie, kie.host("mode.png", png()))
    assert task["status"] == "succeeded", task
    upload = receiver.alice.post("/v1/uploads", content=png(5, 5), headers={"Content-Type": "image/png"})
    assert upload.status_code == 201
    part = receiver.anon.get(task["images"][0]["url"], headers={"Range": "bytes=0-7"})
    assert part.status_code == 206  # a file from the directory still answers ranges
    assert part.content == b"\x89PNG\r\n\x1a\n"
    media = tmp_path / "data" / "media"
    stored = [media / task["id"] / "0.png", media / "uploads" / f"{upload.json()['sha256']}.png"]
    for path in stored:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for folder in (media, media / task["id"], media / "uploads"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_the_sandbox_keeps_its_tasks_in_the_bucket_for_every_replica(
    s3: MotoS3, start_receiver: Callable[..., Receiver]
) -> None:
    bucket = s3.new_bucket()
    first = start_receiver("one", **s3.env(bucket))
    task = first.wait(first.submit(provider="sandbox", prompt="shared")["id"])
    assert task["status"] == "succeeded", task
    sandbox_id = task["provider_task_id"]
    assert set(s3.keys(bucket, "sandbox/")) == {f"sandbox/{sandbox_id}.json", f"sandbox/{sandbox_id}-0.png"}
    # Another replica on the same bucket serves the sandbox's picture, byte for byte.
    second = start_receiver("two", **s3.env(bucket))
    picture = second.anon.get(f"/sandbox/files/{sandbox_id}-0.png")
    assert picture.status_code == 200
    assert picture.content == s3.body(bucket, f"sandbox/{sandbox_id}-0.png")
    assert picture.content == first.anon.get(task["images"][0]["url"]).content


def test_an_upload_goes_inline_from_the_bucket(
    s3: MotoS3, start_fake: Callable[..., ApicoreFake], start_receiver: Callable[..., Receiver]
) -> None:
    apicore = start_fake(ApicoreFake)
    receiver = start_receiver(**apicore.receiver_env(), **s3.env(s3.new_bucket()))
    picture = png(20, 20, shade=10)
    data_uri = "data:image/png;base64," + base64.b64encode(picture).decode()
    receiver.submitted(apicore, images=[data_uri])
    assert (
        apicore.calls("/v1/images/generations")[0].json()["input_image"] == data_uri
    )  # read back from the bucket
