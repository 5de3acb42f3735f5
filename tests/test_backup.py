"""`receiver backup` while the service runs, `receiver restore` into a new data dir, and the service
started there serving every task and image as before."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import served_receiver

ENV: dict[str, str] = {}


def run(command: str, file: Path, data_dir: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    env.update(RECEIVER_DATA_DIR=str(data_dir), **extra)
    return subprocess.run(
        [sys.executable, "-m", "receiver", command, str(file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_backup_taken_while_serving_restores_every_task_and_image(tmp_path: Path) -> None:
    source, restored, file = tmp_path / "data", tmp_path / "restored" / "data", tmp_path / "backup.tar.gz"
    originals: dict[str, dict[str, Any]] = {}
    pictures: dict[tuple[str, int], bytes] = {}
    with served_receiver(source, ENV) as receiver:
        for n in range(3):
            task = receiver.submit(provider="sandbox", prompt=f"a harbour, take {n}", num_images=2, seed=n)
            done = receiver.wait(task["id"])
            assert done["status"] == "succeeded" and len(done["images"]) == 2, done["error"]
            originals[done["id"]] = done
            for image in done["images"]:
                picture = receiver.alice.get(f"/v1/tasks/{done['id']}/images/{image['index']}").content
                assert hashlib.sha256(picture).hexdigest() == image["sha256"]
                pictures[(done["id"], image["index"])] = picture

        # The service goes on writing while the backup is taken.
        stop = threading.Event()

        def keep_creating() -> None:
            while not stop.is_set():
                receiver.submit(provider="sandbox", prompt="meanwhile")

        writer = threading.Thread(target=keep_creating, daemon=True)
        writer.start()
        try:
            result = run("backup", file, source)
        finally:
            stop.set()
            writer.join(30)
        assert result.returncode == 0, result.stderr
        assert "backup written" in result.stderr
    assert mode(file) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".backup")]  # no temp file left

    result = run("restore", file, restored)
    assert result.returncode == 0, result.stderr
    assert mode(restored) == 0o700
    for path in restored.rglob("*"):
        assert mode(path) == (0o700 if path.is_dir() else 0o600), path

    with served_receiver(restored, ENV) as receiver:
        for task_id, before in originals.items():
            after = receiver.alice.get(f"/v1/tasks/{task_id}").json()
            assert after["status"] == "succeeded"
            assert [i["sha256"] for i in after["images"]] == [i["sha256"] for i in before["images"]]
            for image in before["images"]:
                picture = receiver.alice.get(f"/v1/tasks/{task_id}/images/{image['index']}").content
                assert picture == pictures[(task_id, image["index"])]
                assert hashlib.sha256(picture).hexdigest() == image["sha256"]
                # The kept secret came along: a link signed before the backup still opens the image.
                link = httpx.URL(image["url"])  # its path and signature, on the new service's port
                assert receiver.anon.get(link.raw_path.decode()).content == picture
        listed = receiver.alice.get("/v1/tasks", params={"limit": 100}).json()["items"]
        assert set(originals) <= {task["id"] for task in listed}


def test_restore_refuses_a_data_dir_that_is_not_empty(tmp_path: Path) -> None:
    with served_receiver(tmp_path / "data", ENV):
        pass
    file = tmp_path / "backup.tar"
    assert run("backup", file, tmp_path / "data").returncode == 0
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "receiver.db").write_bytes(b"someone's data")
    result = run("restore", file, occupied)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not empty" in result.stderr, result.stderr
    assert (occupied / "receiver.db").read_bytes() == b"someone's data"  # left as it was
    assert sorted(p.name for p in occupied.iterdir()) == ["receiver.db"]


def test_restore_refuses_an_archive_that_is_no_backup(tmp_path: Path) -> None:
    file = tmp_path / "evil.tar"
    with tarfile.open(file, "w") as tar:
        data = b"owned"
        info = tarfile.TarInfo("../escaped")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    result = run("restore", file, tmp_path / "new")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not a receiver backup" in result.stderr, result.stderr
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("variable", "value", "tool"),
    [
        ("RECEIVER_DATABASE_URL", "postgresql://receiver@127.0.0.1:1/receiver", "pg_dump"),
        ("RECEIVER_MEDIA_URL", "s3://images", "versioning"),
    ],
)
@pytest.mark.parametrize("command", ["backup", "restore"])
def test_under_postgresql_or_s3_they_name_the_tools_for_the_job(
    tmp_path: Path, command: str, variable: str, value: str, tool: str
) -> None:
    file = tmp_path / "backup.tar"
    file.write_bytes(b"")
    result = run(command, file, tmp_path / "data", **{variable: value})
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and tool in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()
