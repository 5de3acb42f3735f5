"""Every shell and Python example in README.md runs as shown, in order, against the served receiver.

The receiver runs as a real process (`python -m receiver serve`, what scripts/serve starts) with
RECEIVER_ALLOW_PRIVATE_URLS=1, as the README's notification example asks. Each ```sh block runs in
bash (`set -eu`), each ```python block in the virtualenv's Python, all in one scratch directory.
RECEIVER_API_KEY, RECEIVER_NOTIFY_SECRET and RECEIVER_METRICS_TOKEN are set as for the service (so the
README's `export RECEIVER_API_KEY=dev_...` lines, whose value a reader pastes, are left out), and the
README's ports 8000 and 9000 are mapped to free ones. A Python block whose first line is
`# NAME.py: …` is a file the README asks to save. A block right after a
`<!-- not run by tests/test_readme.py: … -->` line is skipped (starting the service itself, Docker).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.harness import ALICE
from tests.harness import ReceiverProcess
from tests.harness import free_port
from tests.test_notify import SECRET

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
API_ERROR = re.compile(r'\{"error":\s*\{"code"')


@dataclass
class Example:
    line: int
    language: str
    code: str


def examples() -> list[Example]:
    text = README.read_text()
    found = []
    for match in FENCE.finditer(text):
        language, code = match.group(1), match.group(2)
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if language in ("sh", "python") and not before.startswith("<!-- not run by tests/test_readme.py"):
            found.append(Example(text.count("\n", 0, match.start()) + 1, language, code))
    return found


def test_the_examples_are_found() -> None:
    found = examples()
    assert len([e for e in found if e.language == "sh"]) >= 5
    assert any("receiver.client import" in e.code for e in found if e.language == "python")
    assert any(e.code.startswith("# hook.py") for e in found)
    # Nothing a reader cannot run: no placeholder names or ids in what runs (comments aside).
    for example in found:
        runs = re.sub(r"#.*", "", example.code)
        for placeholder in (".example", "tsk_…", "<id>", "<next_cursor>", "…"):
            assert placeholder not in runs, (example.line, placeholder)


def test_every_example_runs_as_shown(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    secrets = {"RECEIVER_NOTIFY_SECRET": SECRET, "RECEIVER_METRICS_TOKEN": "metrics-token-0123456789"}
    service = ReceiverProcess(work / "data", secrets).start()
    hook_port = free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RECEIVER_API_KEY": ALICE,
        **secrets,
    }
    env["RECEIVER_URL"] = service.url  # the command line's default, http://127.0.0.1:8000, mapped too
    sessions: list[int] = []
    try:
        for number, example in enumerate(examples()):
            code = re.sub(r"\b8000\b", str(service.port), example.code)
            code = re.sub(r"\b9000\b", str(hook_port), code)
            code = re.sub(r"^export RECEIVER_API_KEY=.*\n", "", code, flags=re.M)
            saved = re.match(r"# (\S+\.py)\b", code)
            if saved:
                (work / saved.group(1)).write_text(code)
                continue
            out, err = work / f"example-{number}.out", work / f"example-{number}.err"
            if example.language == "sh":
                command = ["bash", "-c", "set -eu\n" + code]
            else:
                command = [sys.executable, "-c", code]
            with open(out, "w") as stdout, open(err, "w") as stderr:
                # Files, not pipes: a background process the example starts (the hook) keeps them open.
                process = subprocess.Popen(
                    command, cwd=work, env=env, stdout=stdout, stderr=stderr, start_new_session=True
                )
                sessions.append(process.pid)
                status = process.wait(timeout=180)
            shown = f"README.md line {example.line}:\n{out.read_text()}\n{err.read_text()}"
            assert status == 0, shown
            assert "Traceback" not in err.read_text(), shown
            assert not API_ERROR.search(out.read_text()), shown
        # What the examples made: the downloads, the uploads' input, and a verified notification.
        assert (work / "kitchen.png").read_bytes().startswith(b"\x89PNG")
        assert len(list((work / "images").glob("tsk_*-0.png"))) >= 3
        deadline = time.monotonic() + 30
        while "task.succeeded tsk_" not in _read(work / "hook.log"):
            assert time.monotonic() < deadline, _read(work / "hook.log")
            time.sleep(0.05)
    finally:
        for session in sessions:
            try:
                os.killpg(session, signal.SIGTERM)
            except ProcessLookupError:
                pass
        service.terminate()


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
