"""The command line finishing the job, against the served receiver: `download`, `providers`, --url and
--api-key, tab-separated whole lines for a pipe and a table with UTC times for a terminal, and a
suggestion for a mistyped command."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import subprocess
from pathlib import Path

import pytest

from tests.harness import ALICE
from tests.harness import BOB
from tests.harness import Receiver
from tests.test_cli import Run
from tests.test_cli import cli  # noqa: F401 - the fixture, shared
from tests.test_cli import one_line
from tests.test_cli import read_terminal
from tests.test_cli import receiver  # noqa: F401 - the fixture, shared
from tests.test_cli import run_cli

LONG_PROMPT = "a very long prompt about a lighthouse at dusk, with gulls, fog, a red boat and\ta tab in it"


def test_download_saves_the_images_of_an_existing_task(
    cli: Run,  # noqa: F811
    receiver: Receiver,  # noqa: F811
    tmp_path: Path,
) -> None:
    task = receiver.submit(provider="sandbox", prompt="two foxes", num_images=2)
    out = tmp_path / "saved"
    status, printed, err = cli("download", task["id"], "--out", str(out), "--wait", "30")
    assert status == 0, err
    done = receiver.alice.get(f"/v1/tasks/{task['id']}").json()
    paths = [Path(line) for line in printed.splitlines()]
    assert [p.name for p in paths] == [f"{task['id']}-0.png", f"{task['id']}-1.png"]
    for path, image in zip(paths, done["images"], strict=True):
        assert path.parent == out and hashlib.sha256(path.read_bytes()).hexdigest() == image["sha256"]

    failed = receiver.submit(provider="sandbox", prompt="x", options={"outcome": "generation_failed"})
    receiver.wait(failed["id"])
    status, printed, err = cli("download", failed["id"], "--out", str(tmp_path / "failed"))
    assert (status, printed) == (1, "")
    assert f"task {failed['id']} failed: generation_failed" in one_line(err)
    silent = receiver.submit(provider="sandbox", prompt="x", options={"outcome": "no_callback"})
    status, printed, err = cli("download", silent["id"], "--out", str(tmp_path / "late"), "--wait", "0.2")
    assert (status, printed) == (4, "")
    assert "is still" in one_line(err)
    status, _, err = cli("download", "tsk_000000000000000000000000", "--out", str(tmp_path))
    assert status == 2 and "no such task" in one_line(err)


def test_providers_lists_what_the_service_offers(cli: Run) -> None:  # noqa: F811
    status, out, err = cli("providers")
    assert status == 0, err
    [row] = [line.split("\t") for line in out.splitlines()]  # only the sandbox has its key set here
    assert row[:3] == ["sandbox", "sandbox", "0-1"] and "seed" in row[3]
    status, out, err = cli("providers", "--json")
    assert status == 0, err
    [sandbox] = [json.loads(line) for line in out.splitlines()]
    assert sandbox["name"] == "sandbox" and sandbox["default_model"] == "sandbox"


def test_url_and_api_key_flags_beside_the_environment(
    cli: Run,  # noqa: F811
    receiver: Receiver,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mine = receiver.submit(receiver.bob, provider="sandbox", prompt="bob's own")
    monkeypatch.delenv("RECEIVER_URL")
    monkeypatch.delenv("RECEIVER_API_KEY")
    for args in (
        ("--url", receiver.url, "--api-key", BOB, "tasks"),
        ("tasks", "--url", receiver.url, "--api-key", BOB),
        ("--url", receiver.url, "tasks", "--api-key", BOB),
    ):
        status, out, err = cli(*args)
        assert status == 0, (args, err)
        assert [line.split("\t")[0] for line in out.splitlines()] == [mine["id"]], args
    # The flags win over the environment.
    monkeypatch.setenv("RECEIVER_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("RECEIVER_API_KEY", ALICE)
    status, out, err = cli("get", mine["id"], "--url", receiver.url, "--api-key", BOB)
    assert status == 0, err
    assert json.loads(out)["id"] == mine["id"]
    status, _, err = cli("tasks", "--url", receiver.url, "--api-key", "not-a-key-of-this-service")
    assert status == 3 and "refused the API key (--api-key)" in one_line(err)
    status, _, err = cli("tasks", "--url", "localhost:8000")
    assert status == 2 and "--url must be an http(s) URL" in one_line(err)


def test_piped_lists_are_tab_separated_whole_and_headerless(
    cli: Run,  # noqa: F811
    receiver: Receiver,  # noqa: F811
) -> None:
    task = receiver.submit(provider="sandbox", prompt=LONG_PROMPT)
    receiver.wait(task["id"])
    status, out, err = cli("tasks")
    assert status == 0, err
    [row] = [line.split("\t") for line in out.splitlines()]
    created = receiver.alice.get(f"/v1/tasks/{task['id']}").json()["created_at"]
    assert row == [task["id"], "succeeded", "sandbox", "sandbox", "1", created, " ".join(LONG_PROMPT.split())]
    assert created.endswith("Z")  # the API's own time, which says UTC
    status, out, err = cli("events", task["id"])
    assert status == 0, err
    rows = [line.split("\t") for line in out.splitlines()]
    assert rows[0][1] == "created" and all(len(r) == 6 and r[0].endswith("Z") for r in rows)


def test_a_terminal_gets_a_table_with_utc_times(receiver: Receiver) -> None:  # noqa: F811
    receiver.submit(provider="sandbox", prompt=LONG_PROMPT)
    controller, terminal = pty.openpty()
    process = run_cli(receiver, "tasks", stdout=terminal, stderr=subprocess.PIPE)
    os.close(terminal)
    shown = read_terminal(controller)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err.decode()
    lines = shown.decode().splitlines()
    assert lines[0].split() == ["ID", "STATUS", "PROVIDER", "MODEL", "IMAGES", "CREATED", "PROMPT"]
    assert re.search(r"  \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC  ", lines[1]), lines[1]
    assert lines[1].endswith("…")  # a person gets the prompt cut to the column
    assert {line.index(line.split()[1]) for line in lines} == {lines[0].index("STATUS")}


def test_a_mistyped_command_gets_a_suggestion(cli: Run) -> None:  # noqa: F811
    status, out, err = cli("sumbit", "--provider", "sandbox", "--prompt", "x")
    assert (status, out) == (2, "")
    assert "unknown command 'sumbit' (did you mean 'submit'?)" in one_line(err)
    status, _, err = cli("--url", "http://127.0.0.1:1", "provders")
    assert status == 2 and "did you mean 'providers'?" in one_line(err)
    status, _, err = cli("xyzzy")
    assert status == 2 and "the commands are serve, submit, get, download" in one_line(err)
