"""Downloads in the child process (receiver/fetcher.py): who writes the image, and what a kill -9 of the
child or of the service leaves behind. Every wait is on state: a fake image host holds its body after
the first chunk until the test opens its gate, and the temp file's name says which process writes it."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver.fetcher import NICENESS
from tests.fakes.common import png
from tests.fakes.kie import KEY
from tests.fakes.kie import KieFake
from tests.harness import ALICE
from tests.harness import Receiver
from tests.harness import ReceiverProcess
from tests.harness import download_children
from tests.harness import is_running

TEMP = re.compile(r"\.(\d+)-[0-9a-f]+\.part$")  # receiver.media's temp name: the writer's pid first


def writers(media: Path) -> set[int]:
    """The pids of the processes writing a temp file under `media` right now."""
    return {int(match.group(1)) for part in media.rglob(".*.part") if (match := TEMP.search(part.name))}


def niceness(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def wait_until(predicate: Callable[[], Any], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


IMAGE = png(300, 200) + bytes(512 * 1024)  # a valid header and several 64 KiB chunks


def held_download(kie: KieFake, client: httpx.Client, media: Path) -> tuple[str, threading.Event, int]:
    """A task whose image is being written, its host holding the rest: (task id, the gate, writer pid)."""
    gate = threading.Event()
    url = kie.host("held.png", IMAGE, gate=gate)
    task_id = str(client.post("/v1/tasks", json={"provider": "kie", "prompt": "p"}).json()["id"])
    wait_until(lambda: client.get(f"/v1/tasks/{task_id}").json()["status"] == "submitted")
    assert kie.succeed(kie.last_task_id(), url).status_code == 200
    wait_until(lambda: writers(media))
    [writer] = writers(media)
    return task_id, gate, writer


def test_a_child_process_downloads_and_is_replaced_after_kill_9(kie: KieFake, kie_receiver: Receiver) -> None:
    media = kie_receiver.settings.media_dir
    task_id, gate, first = held_download(kie, kie_receiver.alice, media)
    assert first != os.getpid()  # not the process that answers callbacks …
    assert download_children(os.getpid()) == [first]  # … but its download child,
    assert niceness(first) == min(19, niceness(os.getpid()) + NICENESS)  # which yields the cores to it

    os.kill(first, signal.SIGKILL)
    # Its download fails as transient and goes again, through a new child (held at the gate too).
    wait_until(lambda: kie.files["held.png"].fetches == 2 and writers(media) - {first})
    [second] = writers(media) - {first}
    assert download_children(os.getpid()) == [second]
    gate.set()

    done = kie_receiver.wait(task_id)
    assert done["status"] == "succeeded", done
    [image] = done["images"]
    assert image["sha256"] == hashlib.sha256(IMAGE).hexdigest()
    assert kie_receiver.alice.get(f"/v1/tasks/{task_id}/images/0").content == IMAGE
    assert kie.files["held.png"].fetches == 2  # the killed try and the one that stored it
    tries = [e["summary"] for e in kie_receiver.events(task_id) if e["kind"] == "download"]
    assert tries == [
        "image 0 try 1 failed: the download process was killed during the download",
        f"image 0 stored ({len(IMAGE)} bytes)",
    ]
    # The killed child's temp file is removed (its pid is gone); the image is there once.
    wait_until(lambda: not writers(media))
    assert [p.name for p in (media / task_id).iterdir()] == ["0.png"]


def test_download_process_0_downloads_in_the_serving_process(
    kie: KieFake, start_receiver: Callable[..., Receiver]
) -> None:
    receiver = start_receiver(KIE_API_KEY=KEY, KIE_BASE_URL=kie.url, RECEIVER_DOWNLOAD_PROCESS="0")
    task_id, gate, writer = held_download(kie, receiver.alice, receiver.settings.media_dir)
    assert writer == os.getpid()
    assert download_children(os.getpid()) == []
    gate.set()
    assert receiver.wait(task_id)["status"] == "succeeded"


def client_for(process: ReceiverProcess) -> httpx.Client:
    return httpx.Client(base_url=process.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)


def test_kill_9_of_the_service_ends_its_download_child(kie: KieFake, tmp_path: Path) -> None:
    env = {"KIE_API_KEY": KEY, "KIE_BASE_URL": kie.url}
    media = tmp_path / "data" / "media"
    process = ReceiverProcess(tmp_path / "data", env).start()
    assert process.process is not None
    with client_for(process) as client:
        task_id, gate, child = held_download(kie, client, media)
    assert child != process.process.pid
    assert download_children(process.process.pid) == [child]

    process.kill()
    wait_until(lambda: not is_running(child))  # stdin's EOF: the child ends its download and exits
    gate.set()

    process = ReceiverProcess(tmp_path / "data", env, port=process.port).start()
    with client_for(process) as client:
        done = client.get(f"/v1/tasks/{task_id}", params={"wait": 20}).json()
        assert done["status"] == "succeeded", done
        assert client.get(f"/v1/tasks/{task_id}/images/0").content == IMAGE
    assert kie.files["held.png"].fetches == 2
    assert not list(media.rglob("*.part"))
    process.terminate()


@pytest.mark.parametrize("grace", ["30", "0.2"], ids=["finishes", "cut-short"])
def test_sigterm_waits_for_the_childs_download_then_ends_the_child(
    kie: KieFake, tmp_path: Path, grace: str
) -> None:
    """A graceful stop gives running downloads the grace, as in-process; the child ends with the service."""
    env = {"KIE_API_KEY": KEY, "KIE_BASE_URL": kie.url, "RECEIVER_SHUTDOWN_GRACE": grace}
    media = tmp_path / "data" / "media"
    process = ReceiverProcess(tmp_path / "data", env).start()
    assert process.process is not None
    with client_for(process) as client:
        task_id, gate, child = held_download(kie, client, media)
    process.process.send_signal(signal.SIGTERM)

    def refused() -> bool:  # uvicorn stops listening first: from then on the service is stopping
        try:
            httpx.get(f"{process.url}/healthz", timeout=1)
        except httpx.ConnectError:
            return True
        return False

    wait_until(refused)
    if grace == "30":
        assert is_running(child)  # the stop waits for the download, which the child still holds
        gate.set()
    assert process.process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once done
    wait_until(lambda: not is_running(child))
    assert not list(media.rglob("*.part"))
    gate.set()

    process = ReceiverProcess(tmp_path / "data", env, port=process.port).start()
    with client_for(process) as client:
        done = client.get(f"/v1/tasks/{task_id}", params={"wait": 20}).json()
        assert done["status"] == "succeeded", done
    # Finished within the grace: fetched once. Cut short: fetched again by the next start.
    assert kie.files["held.png"].fetches == (1 if grace == "30" else 2)
    process.terminate()
