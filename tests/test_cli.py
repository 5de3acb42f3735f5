"""The `receiver` command line against a served receiver: output, files and exit codes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pty
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from receiver import __version__
from receiver.cli import main
from receiver.schema import TaskCreate
from tests.fakes.common import png
from tests.harness import ALICE
from tests.harness import Receiver
from tests.harness import free_port
from tests.test_notify import Answer
from tests.test_notify import AppHook
from tests.test_notify import hook  # noqa: F401 - the fixture, shared

Run = Callable[..., tuple[int, str, str]]
TASK_ID = re.compile(r"^tsk_[0-9a-f]{24}$")


@pytest.fixture
def receiver(start_receiver: Callable[..., Receiver]) -> Receiver:
    return start_receiver()


@pytest.fixture
def cli(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Run]:
    """Run `receiver ARGS…` against the served receiver; gives (exit status, stdout, stderr)."""
    monkeypatch.setenv("RECEIVER_URL", receiver.url)
    monkeypatch.setenv("RECEIVER_API_KEY", ALICE)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    yield run


def one_line(err: str) -> str:
    """The error output is exactly one line starting `receiver`, never a traceback."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("receiver"), err
    return lines[0]


def test_submit_waits_shows_progress_and_saves_the_images(
    cli: Run, receiver: Receiver, tmp_path: Path
) -> None:
    out_dir = tmp_path / "images"
    request = [
        *("--provider", "sandbox", "--prompt", "a red fox in the snow", "--aspect-ratio", "16:9"),
        *("--seed", "7", "--num-images", "2", "--output-format", "png", "--option", "delay=1"),
        *("--metadata", "order=42", "--metadata", "note=for the catalogue", "--idempotency-key", "fox-1"),
    ]
    status, out, err = cli("submit", *request, "--wait", "--out", str(out_dir))
    assert status == 0, err
    task_id = out.strip()
    assert TASK_ID.match(task_id), out
    progress = [line for line in err.splitlines() if line.startswith(task_id)]
    # The first state seen: on a busy machine the worker may have sent the task before the first look.
    assert re.match(rf"^{task_id}: (queued|submitted) \(\d+\.\d s\)$", progress[0]), err
    assert re.match(rf"^{task_id}: succeeded \(\d+\.\d s\)$", progress[-1]), err
    assert "submitted" in err  # the second the sandbox takes is long enough to be seen
    task = receiver.alice.get(f"/v1/tasks/{task_id}").json()
    assert task["metadata"] == {"order": 42, "note": "for the catalogue"}
    assert sorted(p.name for p in out_dir.iterdir()) == [f"{task_id}-0.png", f"{task_id}-1.png"]
    for image in task["images"]:
        path = out_dir / f"{task_id}-{image['index']}.png"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == image["sha256"]
        assert f"saved {path}" in err
    assert (image["width"], image["height"]) != (None, None)
    # The same idempotency key and body give the same task.
    again = cli("submit", *request)
    assert again[:2] == (0, f"{task_id}\n")


def test_submit_prints_json_and_returns_at_once_without_wait(cli: Run) -> None:
    status, out, err = cli("submit", "--provider", "sandbox", "--prompt", "a kite", "--json")
    assert status == 0, err
    task = json.loads(out)
    assert task["status"] == "queued" and task["provider"] == "sandbox"
    assert err == ""


def test_submit_uploads_local_images(cli: Run, receiver: Receiver, tmp_path: Path) -> None:
    picture = tmp_path / "input.png"
    picture.write_bytes(png(32, 32))
    status, out, err = cli(
        "submit", "--provider", "sandbox", "--prompt", "make it blue", "--image", str(picture)
    )
    assert status == 0, err
    [upload] = list((receiver.settings.media_dir / "uploads").iterdir())
    assert upload.read_bytes() == picture.read_bytes()
    assert upload.name.startswith(hashlib.sha256(picture.read_bytes()).hexdigest())
    assert receiver.wait(out.strip())["status"] == "succeeded"

    status, out, err = cli(
        "submit", "--provider", "sandbox", "--prompt", "x", "--image", str(tmp_path / "no.png")
    )
    assert status == 2
    assert "--image" in one_line(err) and "No such file" in err
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    status, out, err = cli("submit", "--provider", "sandbox", "--prompt", "x", "--image", str(text))
    assert status == 2
    assert "not a PNG, JPEG or WebP image" in one_line(err)


def test_a_failed_task_exits_1(cli: Run) -> None:
    status, out, err = cli(
        "submit",
        "--provider",
        "sandbox",
        "--prompt",
        "doomed",
        "--option",
        "outcome=generation_failed",
        "--wait",
    )
    assert status == 1
    task_id = out.strip()
    assert TASK_ID.match(task_id)
    assert f"receiver: task {task_id} failed: generation_failed: " in err
    assert "Traceback" not in err
    status, out, err = cli("get", task_id)
    assert status == 1
    assert json.loads(out)["error"]["code"] == "generation_failed"


def test_validation_errors_exit_2_naming_the_field(cli: Run) -> None:
    status, _, err = cli("submit", "--provider", "sandbox", "--prompt", "x", "--output-format", "jpeg")
    assert status == 2
    assert "output_format: the sandbox makes png only" in one_line(err)
    status, _, err = cli("submit", "--provider", "nowhere", "--prompt", "x", "--resolution", "1K")
    assert status == 2
    assert "provider: unknown provider" in one_line(err)
    status, _, err = cli(
        "submit", "--provider", "sandbox", "--prompt", "x", "--notify-url", "ftp://app.example/"
    )
    assert status == 2
    assert "notify_url: must be an http or https URL" in one_line(err)
    status, _, err = cli(
        "submit", "--provider", "sandbox", "--prompt", "x", "--fallback", "sandbox", "--fallback", "fal"
    )
    assert status == 2
    line = one_line(err)
    assert "fallback[0]: sandbox is already in the chain" in line
    assert "fallback[1]: fal is not configured: set FAL_KEY" in line
    # Usage errors are one line too.
    status, _, err = cli("submit", "--provider", "sandbox")
    assert status == 2
    assert "the following arguments are required: --prompt" in one_line(err)
    status, _, err = cli("submit", "--provider", "sandbox", "--prompt", "x", "--seed", "seven")
    assert status == 2
    assert "--seed" in one_line(err)
    status, _, err = cli("submit", "--provider", "sandbox", "--prompt", "x", "--option", "novalue")
    assert status == 2
    assert "expected KEY=VALUE" in one_line(err)
    status, _, err = cli()
    assert status == 2
    assert "submit" in err


def test_an_unreachable_service_and_a_refused_key_exit_3(cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECEIVER_API_KEY", "not-a-key-of-this-service")
    for args in (
        ("tasks",),
        ("get", "tsk_000000000000000000000000"),
        ("submit", "--provider", "sandbox", "--prompt", "x"),
    ):
        status, _, err = cli(*args)
        assert status == 3, args
        assert "refused the API key" in one_line(err)
    monkeypatch.delenv("RECEIVER_API_KEY")
    status, _, err = cli("tasks")
    assert status == 3
    assert "RECEIVER_API_KEY is not set" in one_line(err)
    monkeypatch.setenv("RECEIVER_API_KEY", ALICE)
    monkeypatch.setenv("RECEIVER_URL", f"http://127.0.0.1:{free_port()}")
    # A read and a create (each read is retried with backoff first, as in a rolling deploy: seconds).
    for args in (("tasks",), ("submit", "--provider", "sandbox", "--prompt", "x")):
        status, _, err = cli(*args)
        assert status == 3, args
        assert "cannot reach the service at http://127.0.0.1:" in one_line(err)
    monkeypatch.setenv("RECEIVER_URL", "localhost:8000")
    status, _, err = cli("tasks")
    assert status == 2
    assert "RECEIVER_URL must be an http(s) URL" in one_line(err)


def test_get_waits_and_exits_by_the_task_outcome(cli: Run, receiver: Receiver) -> None:
    task = receiver.submit(provider="sandbox", prompt="a boat")
    status, out, err = cli("get", task["id"], "--wait", "20")
    assert status == 0, err
    shown = json.loads(out)
    assert shown["id"] == task["id"] and shown["status"] == "succeeded"
    assert len(shown["images"]) == 1

    silent = receiver.submit(
        provider="sandbox", prompt="never called back", options={"outcome": "no_callback"}
    )
    status, out, err = cli("get", silent["id"])
    assert status == 0
    assert json.loads(out)["status"] in ("queued", "submitted")
    status, out, err = cli("get", silent["id"], "--wait", "0.3")
    assert status == 4
    assert f"task {silent['id']} is still" in one_line(err)
    status, out, err = cli(
        "submit",
        "--provider",
        "sandbox",
        "--prompt",
        "x",
        "--option",
        "outcome=no_callback",
        "--wait",
        "--timeout",
        "0.3",
    )
    assert status == 4
    assert TASK_ID.match(out.strip())

    status, _, err = cli("get", "tsk_000000000000000000000000")
    assert status == 2
    assert "no such task" in one_line(err)
    status, out, err = cli("get", "../../healthz")  # stays a task id, never another path
    assert (status, out) == (2, "")
    one_line(err)
    # Another tenant's task is not found either.
    bob = receiver.submit(receiver.bob, provider="sandbox", prompt="bob's")
    assert cli("get", bob["id"])[0] == 2


def test_tasks_lists_a_readable_table_with_filters(cli: Run, receiver: Receiver) -> None:
    made = [receiver.submit(provider="sandbox", prompt=f"picture number {n}")["id"] for n in range(3)]
    failed = receiver.submit(provider="sandbox", prompt="a failure", options={"outcome": "generation_failed"})
    for task_id in [*made, failed["id"]]:
        receiver.wait(task_id)
    status, out, err = cli("tasks")  # not a terminal: tab-separated, no header (the table: test_cli_more)
    assert status == 0, err
    rows = [line.split("\t") for line in out.splitlines()]
    assert [row[0] for row in rows] == [failed["id"], *reversed(made)]  # newest first
    assert rows[0][1:5] == ["failed", "sandbox", "sandbox", "0"]
    assert rows[1][1:5] == ["succeeded", "sandbox", "sandbox", "1"]
    assert rows[1][-1] == "picture number 2"

    status, out, _ = cli("tasks", "--status", "failed")
    assert [line.split("\t")[0] for line in out.splitlines()] == [failed["id"]]
    status, out, _ = cli("tasks", "--limit", "2", "--provider", "sandbox")
    assert len(out.splitlines()) == 2
    status, out, _ = cli("tasks", "--json", "--status", "succeeded")
    assert [json.loads(line)["id"] for line in out.splitlines()] == list(reversed(made))
    status, _, err = cli("tasks", "--status", "done")
    assert status == 2
    assert "status: one of queued" in one_line(err)
    status, _, err = cli("tasks", "--limit", "0")
    assert status == 2
    assert "--limit" in one_line(err)


def test_events_lists_what_happened_with_notify_answers(
    cli: Run,
    start_receiver: Callable[..., Receiver],
    hook: Callable[..., AppHook],  # noqa: F811
) -> None:
    app = hook(Answer(200, b"got it,\nthanks"))
    status, out, err = cli(
        "submit", "--provider", "sandbox", "--prompt", "tell me", "--notify-url", app.url, "--wait"
    )
    assert status == 0, err
    task_id = out.strip()
    app.wait_for(1)
    receiver_events: list[dict[str, Any]] = []
    for _ in range(200):
        status, out, err = cli("events", "--json", task_id)
        receiver_events = [json.loads(line) for line in out.splitlines()]
        if any(event["kind"] == "notify" for event in receiver_events):
            break
    assert status == 0, err
    assert [e["kind"] for e in receiver_events][:2] == ["created", "submit"]
    status, out, err = cli("events", task_id)  # not a terminal: tab-separated, the answer last
    assert status == 0, err
    rows = [line.split("\t") for line in out.splitlines()]
    assert "queued for sandbox (sandbox)" in rows[0][4] and rows[0][3] == "→queued"
    assert any(row[3].endswith("→succeeded") for row in rows)
    notify = next(row for row in rows if "attempt 1: delivered, HTTP 200" in row[4])
    assert notify[5] == "got it, thanks"
    status, _, err = cli("events", "tsk_000000000000000000000000")
    assert status == 2
    assert "no such task" in one_line(err)


def flag_of(field: str) -> str:
    return {"images": "--image", "options": "--option"}.get(field, "--" + field.replace("_", "-"))


def test_help_is_complete(cli: Run) -> None:
    status, out, _ = cli("--help")
    assert status == 0
    for command in ("serve", "submit", "get", "tasks", "events"):
        assert re.search(rf"^\s+{command}\s+\S", out, re.MULTILINE), command
    for needed in ("RECEIVER_URL", "RECEIVER_API_KEY", "exit status", "0  ", "1  ", "2  ", "3  ", "4  "):
        assert needed in out, needed

    status, out, _ = cli("submit", "--help")
    assert status == 0
    # A flag for every field the API takes, each with its help text.
    for field in sorted(TaskCreate.__struct_encode_fields__):
        assert re.search(rf"^\s+{re.escape(flag_of(field))}\b.*\S", out, re.MULTILINE), field
    for flag in ("--idempotency-key", "--wait", "--timeout", "--out", "--json", "--no-prompt-upsampling"):
        assert flag in out, flag
    assert "RECEIVER_API_KEY" in out

    expected = {
        "get": ("ID", "--wait"),
        "tasks": ("--status", "--provider", "--limit", "--json"),
        "events": ("ID", "--json"),
        "serve": ("--host", "--port"),
    }
    for command, flags in expected.items():
        status, out, _ = cli(command, "--help")
        assert status == 0, command
        assert out.startswith(f"usage: receiver {command}"), out
        for flag in flags:
            assert flag in out, (command, flag)


def test_serve_keeps_its_flags_and_refuses_bad_configuration(
    cli: Run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    status, _, err = cli("serve", "--port", "http")
    assert status == 2
    assert "not a port number" in one_line(err)
    status, _, err = cli("serve", "--port", "²")
    assert status == 2
    assert "not a port number" in one_line(err)
    monkeypatch.setenv("RECEIVER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("RECEIVER_NOTIFY_SCHEDULE", "soon")
    status, _, err = cli("serve", "--port", str(free_port()))
    assert status == 2
    assert "RECEIVER_NOTIFY_SCHEDULE" in one_line(err)


def run_cli(receiver: Receiver, *args: str, **streams: Any) -> subprocess.Popen[bytes]:
    """`python -m receiver ARGS…` as its own process, against the served receiver."""
    env = {**os.environ, "RECEIVER_URL": receiver.url, "RECEIVER_API_KEY": ALICE}
    return subprocess.Popen([sys.executable, "-m", "receiver", *args], env=env, **streams)


def test_a_closed_pipe_ends_quietly_with_0(receiver: Receiver) -> None:
    # `receiver tasks | head -1` once head has gone: the read end of stdout is closed before it writes.
    for n in range(3):
        receiver.submit(provider="sandbox", prompt=f"piped {n}")
    for args in (("tasks",), ("tasks", "--json")):
        read_end, write_end = os.pipe()
        os.close(read_end)
        process = run_cli(receiver, *args, stdout=write_end, stderr=subprocess.PIPE)
        os.close(write_end)
        _, err = process.communicate(timeout=60)
        assert (process.returncode, err) == (0, b""), err.decode()


def test_out_is_checked_before_anything_is_submitted(cli: Run, receiver: Receiver, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    status, out, err = cli(
        "submit", "--provider", "sandbox", "--prompt", "x", "--out", str(blocker / "images")
    )
    assert (status, out) == (2, "")
    assert f"--out {blocker / 'images'}: " in one_line(err)
    assert receiver.alice.get("/v1/tasks").json()["items"] == []  # nothing was paid for


def test_timeout_needs_wait_and_version_and_a_v1_url(
    cli: Run, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, out, err = cli("submit", "--provider", "sandbox", "--prompt", "x", "--timeout", "5")
    assert (status, out) == (2, "")
    assert "--timeout needs --wait" in one_line(err)
    assert receiver.alice.get("/v1/tasks").json()["items"] == []

    version = subprocess.run(
        [sys.executable, "-m", "receiver", "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout == f"receiver {__version__}\n"

    monkeypatch.setenv("RECEIVER_URL", receiver.url + "/v1")
    status, out, err = cli("submit", "--provider", "sandbox", "--prompt", "x")
    assert status == 0, err
    assert TASK_ID.match(out.strip())
    monkeypatch.setenv("RECEIVER_URL", receiver.url + "/api")
    status, out, err = cli("tasks")
    assert status == 2
    assert "no such route (is the URL the receiver's root?)" in one_line(err)


def read_terminal(controller: int) -> bytes:
    """All a process wrote to its pseudo-terminal, until it closed; the terminal is closed after."""
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    return shown


def test_a_terminal_sees_the_time_waited_between_changes(receiver: Receiver) -> None:
    controller, terminal = pty.openpty()
    process = run_cli(
        receiver,
        *("submit", "--provider", "sandbox", "--prompt", "slow", "--option", "delay=4", "--wait"),
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    shown = read_terminal(controller)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0, shown.decode()
    task_id = out.decode().strip()
    screen = shown.decode()
    assert re.search(r"\r  … submitted, \d+ s elapsed", screen), screen
    assert f"{task_id}: succeeded (" in screen
    assert "\x1b[K" in screen  # the ticking line is cleared before the next change is printed


def test_the_listening_socket_turns_nagle_off_for_every_connection() -> None:
    """asyncio sets TCP_NODELAY only on sockets whose proto says TCP: without it, each keep-alive
    answer waits out a delayed ACK (~40 ms)."""
    from receiver.cli import listen

    async def accepted_nodelay() -> int:
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = writer.get_extra_info("socket")
            seen.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        sock = listen("127.0.0.1", 0)
        server = await asyncio.start_server(accept, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            value = await asyncio.wait_for(seen, 30)
            writer.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0
