"""kill -9 at awkward moments, then a restart: every task still ends correctly, nothing is fetched twice."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import httpx

from tests.fakes.common import png
from tests.fakes.kie import KEY
from tests.fakes.kie import KieFake
from tests.harness import ALICE
from tests.harness import ReceiverProcess


def client_for(process: ReceiverProcess) -> httpx.Client:
    return httpx.Client(base_url=process.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=30)


def wait_until(predicate: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def start_a_slow_download(
    kie: KieFake, process: ReceiverProcess, media: Path
) -> tuple[dict[str, Any], bytes, str]:
    """A task whose ~2 MiB image is served slowly, once its download is being written: (task, image, url)."""
    image = png(300, 200) + bytes(2 * 1024 * 1024)  # valid header, ~2 MiB, served slowly
    url = kie.host("slow.png", image, chunk_delay=0.02)
    with client_for(process) as client:
        task: dict[str, Any] = client.post("/v1/tasks", json={"provider": "kie", "prompt": "slow"}).json()
        wait_until(lambda: client.get(f"/v1/tasks/{task['id']}").json()["status"] == "submitted")
        assert kie.succeed(kie.last_task_id(), url).status_code == 200
        wait_until(lambda: list(media.rglob("*.part")))
    return task, image, url


def test_restart_in_the_middle_of_a_download(kie: KieFake, tmp_path: Path) -> None:
    env = {"KIE_API_KEY": KEY, "KIE_BASE_URL": kie.url}
    process = ReceiverProcess(tmp_path / "data", env).start()
    task, image, url = start_a_slow_download(kie, process, tmp_path / "data" / "media")
    process.kill()
    assert kie.files["slow.png"].fetches == 1

    kie.files["slow.png"].chunk_delay = 0.0
    process = ReceiverProcess(tmp_path / "data", env, port=process.port).start()
    with client_for(process) as client:
        done = client.get(f"/v1/tasks/{task['id']}", params={"wait": 20}).json()
        assert done["status"] == "succeeded"
        assert done["images"][0]["size"] == len(image)
        assert client.get(f"/v1/tasks/{task['id']}/images/0").content == image
    assert kie.files["slow.png"].fetches == 2
    assert not list((tmp_path / "data" / "media").rglob("*.part"))
    process.kill()

    # Once stored, an image is never fetched again, however often the process restarts.
    process = ReceiverProcess(tmp_path / "data", env, port=process.port).start()
    with client_for(process) as client:
        assert client.get(f"/v1/tasks/{task['id']}").json()["status"] == "succeeded"
        assert kie.send(kie.last_task_id(), kie.success_body(kie.last_task_id(), url)).status_code == 200
    time.sleep(0.3)
    assert kie.files["slow.png"].fetches == 2
    process.terminate()


def test_an_acknowledged_callback_survives_kill_9(kie: KieFake, tmp_path: Path) -> None:
    env = {"KIE_API_KEY": KEY, "KIE_BASE_URL": kie.url}
    process = ReceiverProcess(tmp_path / "data", env).start()
    with client_for(process) as client:
        tasks = [
            client.post("/v1/tasks", json={"provider": "kie", "prompt": f"t{i}"}).json() for i in range(20)
        ]
        wait_until(lambda: len(kie.callback_urls) == 20)
        wait_until(
            lambda: all(client.get(f"/v1/tasks/{t['id']}").json()["status"] == "submitted" for t in tasks)
        )
    url = kie.host("acked.png")
    kie.files["acked.png"].failures.extend([503] * 1000)  # keep every task in `downloading`
    for kie_id in sorted(kie.callback_urls):
        assert kie.send(kie_id, kie.success_body(kie_id, url)).status_code == 200
    process.kill()  # right after the last answer
    process = ReceiverProcess(tmp_path / "data", env, port=process.port).start()
    with client_for(process) as client:
        statuses = {client.get(f"/v1/tasks/{t['id']}").json()["status"] for t in tasks}
        assert statuses <= {"downloading", "failed"}  # every acknowledged callback was kept
        kie.files["acked.png"].failures.clear()
    process.terminate()


def test_kill_9_at_random_moments(tmp_path: Path) -> None:
    """Sandbox tasks through submit, callback and download while the process is killed again and again."""
    rng = random.Random(7)
    env = {"RECEIVER_RECONCILE_AFTER": "0.5", "RECEIVER_SANDBOX_DELAY": "0.2"}
    process = ReceiverProcess(tmp_path / "data", env).start()
    task_ids: list[str] = []
    for _ in range(4):
        with client_for(process) as client:
            for _ in range(5):
                answer = client.post(
                    "/v1/tasks",
                    json={
                        "provider": "sandbox",
                        "prompt": f"r{rng.random()}",
                        "num_images": rng.randint(1, 3),
                    },
                )
                task_ids.append(answer.json()["id"])
        time.sleep(rng.uniform(0.0, 0.4))
        process.kill()
        process = ReceiverProcess(tmp_path / "data", env, port=process.port).start()
    with client_for(process) as client:
        for task_id in task_ids:
            done = client.get(f"/v1/tasks/{task_id}", params={"wait": 30}).json()
            assert done["status"] == "succeeded", done
            assert [image["index"] for image in done["images"]] == list(range(len(done["images"])))
            assert len(done["images"]) >= 1
    assert not list((tmp_path / "data" / "media").rglob("*.part"))
    process.terminate()
