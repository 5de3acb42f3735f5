"""Downloads a hostile image host cannot stretch: an overall time limit per attempt, a task that ends takes
its download with it (the slot given back at once), and a compressed body counted as it inflates.

Over real HTTP: the receiver served for real, the kie fake as the provider, and an image host
(tests/fakes/image_host.py) that trickles a byte at a time or sends a compression bomb.
"""

from __future__ import annotations

import gzip
import time
import tracemalloc
import zlib
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver.config import ConfigError
from receiver.config import load_settings
from tests.conftest import database_settings
from tests.fakes.common import png
from tests.fakes.image_host import ImageHost
from tests.fakes.image_host import bomb
from tests.fakes.kie import KEY
from tests.fakes.kie import KieFake
from tests.harness import ALICE
from tests.harness import Receiver
from tests.harness import ReceiverProcess
from tests.test_downloads import _peak_rss_kib

CAP = 4 * 1024 * 1024  # RECEIVER_MAX_IMAGE_BYTES in the compression tests
INFLATED = 256 * 1024 * 1024  # what a bomb inflates to: 64 x the cap, from about 256 KiB on the wire


@pytest.fixture
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """SQLite, unless a test asks for PostgreSQL too (parametrized indirectly)."""
    return database_settings(request, getattr(request, "param", "sqlite"))


@pytest.fixture
def image_host() -> Iterator[ImageHost]:
    host = ImageHost().start()
    yield host
    host.stop()


def poll(client: httpx.Client, task_id: str, done: Callable[[dict[str, Any]], bool], seconds: float) -> Any:
    """The task once `done(task)`, by bounded polling (a long-poll cannot wait for a middle state)."""
    deadline = time.monotonic() + seconds
    while True:
        task = client.get(f"/v1/tasks/{task_id}").json()
        if done(task):
            return task
        assert time.monotonic() < deadline, task
        time.sleep(0.05)


def finished_at(client: httpx.Client, kie: KieFake, url: str) -> str:
    """Create a kie task as `client`'s tenant, and once it is submitted, have kie finish it with `url`."""
    response = client.post("/v1/tasks", json={"provider": "kie", "prompt": "a lighthouse at dusk"})
    assert response.status_code == 202, response.text
    task_id = str(response.json()["id"])
    poll(client, task_id, lambda task: task["status"] != "queued", 60)
    assert kie.succeed(kie.last_task_id(), url).status_code == 200
    return task_id


def ended(client: httpx.Client, task_id: str) -> Any:
    return poll(client, task_id, lambda task: task["status"] in ("succeeded", "failed"), 60)


@pytest.fixture
def start_kie(kie: KieFake, start_receiver: Callable[..., Receiver]) -> Callable[..., Receiver]:
    """Start a receiver with the kie fake as its provider; keyword arguments become variables."""

    def start(**env: Any) -> Receiver:
        return start_receiver(KIE_API_KEY=KEY, KIE_BASE_URL=kie.url, **env)

    return start


# -- a task that ends cancels its download ---------------------------------------------------------


@pytest.mark.parametrize(
    ("database_env", "process"),
    [("sqlite", "1"), ("sqlite", "0"), ("postgres", "1")],
    ids=["sqlite-child", "sqlite-in-process", "postgres-child"],
    indirect=["database_env"],
)
def test_trickling_downloads_give_their_slots_back_when_their_tasks_time_out(
    kie: KieFake, image_host: ImageHost, start_kie: Callable[..., Receiver], process: str
) -> None:
    # The deadline ends the trickling tasks (the download limit stays at 300 s).
    receiver = start_kie(
        RECEIVER_DOWNLOAD_PROCESS=process, RECEIVER_DOWNLOAD_CONCURRENCY=4, RECEIVER_TASK_DEADLINE=10
    )
    # One tenant's four results trickle a byte at a time, within every read timeout, forever.
    trickling = [finished_at(receiver.alice, kie, image_host.trickle(f"t{n}.png")) for n in range(4)]
    image_host.wait_until(lambda: image_host.trickling == 4)  # every download slot is held
    for task_id in trickling:
        ended = receiver.wait(task_id, 60)
        assert ended["status"] == "failed"
        assert ended["error"]["code"] == "timed_out"
    # Each download was cancelled with its task: the host sees every connection closed.
    image_host.wait_until(lambda: image_host.trickling == 0)
    # The next tenant's normal task downloads at once, well inside its own deadline.
    normal = finished_at(receiver.bob, kie, image_host.host("fine.png", png(40, 30)))
    done = receiver.wait(normal, 60, client=receiver.bob)
    assert done["status"] == "succeeded", done
    assert done["images"][0]["size"] == len(png(40, 30))
    assert image_host.fetches["/files/fine.png"] == 1


def test_a_task_ended_by_news_while_downloading_closes_its_download_at_once(
    kie: KieFake, image_host: ImageHost, start_kie: Callable[..., Receiver]
) -> None:
    """Not only the deadline: whatever ends the task (here the provider's late failure) ends the
    download, long before RECEIVER_DOWNLOAD_TIMEOUT (300 s) or the task deadline (an hour)."""
    receiver = start_kie()
    task_id = finished_at(receiver.alice, kie, image_host.trickle("late.png"))
    image_host.wait_until(lambda: image_host.trickling == 1)
    answer = kie.fail(kie.last_task_id(), moderated=False, message="the node went away")
    assert answer is not None and answer.status_code == 200
    done = receiver.wait(task_id, 30)
    assert (done["status"], done["error"]["code"]) == ("failed", "generation_failed")
    image_host.wait_until(lambda: image_host.trickling == 0, 30)
    assert receiver.alice.get(f"/v1/tasks/{task_id}").json()["images"] == []


# -- RECEIVER_DOWNLOAD_TIMEOUT ----------------------------------------------------------------------


@pytest.mark.parametrize("process", ["1", "0"], ids=["child", "in-process"])
def test_a_trickling_download_is_cut_at_the_download_timeout_and_retried_on_the_schedule(
    kie: KieFake, image_host: ImageHost, start_kie: Callable[..., Receiver], process: str
) -> None:
    # One retry after the first try's timeout, then download_failed. The timeout is 4 s, not 1: on a
    # machine whose cores are busy a 1 s bound also cut the warm-up image below, which is whole at once.
    receiver = start_kie(
        RECEIVER_DOWNLOAD_PROCESS=process, RECEIVER_DOWNLOAD_TIMEOUT=4, RECEIVER_DOWNLOAD_RETRY_DELAYS="0.05"
    )
    # A first image, so each try of the next one has the download child (in that mode) started already.
    warm = receiver.wait(finished_at(receiver.alice, kie, image_host.host("warm.png", png())), 60)
    assert warm["status"] == "succeeded"
    task_id = finished_at(receiver.alice, kie, image_host.trickle("slow.png"))
    done = receiver.wait(task_id, 60)
    assert done["status"] == "failed"
    assert done["error"] == {
        "code": "download_failed",
        "message": "image 0: no whole image within 4 s (RECEIVER_DOWNLOAD_TIMEOUT) after 2 tries",
        "provider_code": None,
    }
    tries = [e["summary"] for e in receiver.events(task_id) if e["kind"] == "download"]
    assert tries[0] == "image 0 try 1 failed: no whole image within 4 s (RECEIVER_DOWNLOAD_TIMEOUT)"
    # Two tries; on a machine kept busy the niced download child may not even reach the host within a
    # try's four seconds. Either way every connection made was closed when its time was up.
    assert image_host.fetches["/trickle/slow.png"] in (1, 2)
    image_host.wait_until(lambda: image_host.trickling == 0)


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "0", "-5"])
def test_the_download_timeout_is_checked_at_start(tmp_path: Path, value: str) -> None:
    env = {"RECEIVER_DATA_DIR": str(tmp_path), "RECEIVER_DOWNLOAD_TIMEOUT": value}
    with pytest.raises(ConfigError, match="RECEIVER_DOWNLOAD_TIMEOUT"):
        load_settings(env)
    assert load_settings({"RECEIVER_DATA_DIR": str(tmp_path)}).download_timeout == 300.0
    assert load_settings({**env, "RECEIVER_DOWNLOAD_TIMEOUT": "2.5"}).download_timeout == 2.5


# -- compressed bodies ----------------------------------------------------------------------------


def test_a_gzip_bomb_fails_at_the_cap_and_the_memory_of_service_and_child_stays_flat(
    kie: KieFake, image_host: ImageHost, tmp_path: Path
) -> None:
    env = {
        "KIE_API_KEY": KEY,
        "KIE_BASE_URL": kie.url,
        "RECEIVER_MAX_IMAGE_BYTES": str(CAP),
        "RECEIVER_DOWNLOAD_PROCESS": "1",
    }
    process = ReceiverProcess(tmp_path / "data", env).start()
    assert process.process is not None
    client = httpx.Client(base_url=process.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)
    try:
        client.get("/v1/tasks")  # warm up
        warm = ended(client, finished_at(client, kie, image_host.host("warm.png", png())))
        assert warm["status"] == "succeeded"  # the download child runs: the baseline includes it
        before = _peak_rss_kib(process.process.pid)
        url = image_host.host("bomb.png", bomb("gzip", png()[:33], INFLATED), "gzip")
        done = ended(client, finished_at(client, kie, url))
        after = _peak_rss_kib(process.process.pid)
        assert done["status"] == "failed"
        assert done["error"]["message"] == f"image 0: the image is over the {CAP}-byte cap"
        assert image_host.fetches["/files/bomb.png"] == 1  # refused for good, not retried
        growth_mib = sum(after[pid] - before.get(pid, 0) for pid in after) / 1024
        assert growth_mib < 40, f"peak RSS grew {growth_mib:.1f} MiB"
        assert image_host.accept_encodings[-1] == "identity"  # compression was not asked for
    finally:
        client.close()
        process.kill()


@pytest.mark.parametrize("coding", ["gzip", "deflate", "raw-deflate"])
def test_a_compression_bomb_on_the_workers_own_loop_is_inflated_a_piece_at_a_time(
    kie: KieFake, image_host: ImageHost, start_kie: Callable[..., Receiver], coding: str
) -> None:
    receiver = start_kie(RECEIVER_MAX_IMAGE_BYTES=CAP, RECEIVER_DOWNLOAD_PROCESS="0")
    url = image_host.host("bomb.png", bomb(coding, png()[:33], INFLATED), coding.removeprefix("raw-"))
    tracemalloc.start()  # this process serves the receiver: its downloads' allocations are traced
    try:
        done = receiver.wait(finished_at(receiver.alice, kie, url), 60)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert done["status"] == "failed"
    assert done["error"]["message"] == f"image 0: the image is over the {CAP}-byte cap"
    assert peak < 24 * 1024 * 1024, f"{peak / 2**20:.1f} MiB allocated at the peak"


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate", "raw-deflate"])
def test_an_image_sent_compressed_is_stored_as_the_image(
    kie: KieFake, image_host: ImageHost, kie_receiver: Receiver, coding: str
) -> None:
    image = png(300, 200)
    if coding == "raw-deflate":
        packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = packer.compress(image) + packer.flush()
    else:
        body = gzip.compress(image) if "gzip" in coding else zlib.compress(image)
    url = image_host.host("squeezed.png", body, coding.removeprefix("raw-"))
    done = kie_receiver.wait(finished_at(kie_receiver.alice, kie, url))
    assert done["status"] == "succeeded", done
    stored = kie_receiver.alice.get(f"/v1/tasks/{done['id']}/images/0")
    assert stored.content == image
    assert done["images"][0]["size"] == len(image)


@pytest.mark.parametrize(
    ("encoding", "body", "message"),
    [
        ("br", b"\x1b\x00", "sent a body in an encoding this service does not read (br)"),
        ("gzip, gzip", b"", "sent a body in an encoding this service does not read (gzip, gzip)"),
        ("gzip", png(), "sent a broken gzip body"),
        ("gzip", gzip.compress(png())[:-12], "sent a broken gzip body"),
    ],
    ids=["brotli", "twice", "not-gzip", "cut-short"],
)
def test_a_body_in_an_unknown_or_broken_encoding_fails_the_download_with_a_reason(
    kie: KieFake, image_host: ImageHost, kie_receiver: Receiver, encoding: str, body: bytes, message: str
) -> None:
    url = image_host.host("odd.png", body, encoding)
    done = kie_receiver.wait(finished_at(kie_receiver.alice, kie, url))
    assert done["status"] == "failed"
    assert done["error"]["code"] == "download_failed"
    assert done["error"]["message"] == f"image 0: the image host {message}"
    assert image_host.fetches["/files/odd.png"] == 1  # asking again gives the same body: no retry
