"""Every shell and Python example in README.md and the docs runs as shown, in order, against the service.

Two reading sessions, each against its own served receiver (`python -m receiver serve`, what
scripts/serve starts, with no RECEIVER_API_KEYS so it makes and keeps its development key as for a
reader): README.md alone, and the documentation site's pages in the order of mkdocs.yml's nav (a
reader following Getting started onwards in one terminal). Each ```sh block runs in bash (`set -eu`)
and each ```python block in Python, all in one scratch directory that holds `data/` (the service's
data dir, as `./data` is for scripts/serve) and `.venv` (this test's virtualenv, as in a clone).

The interpreter is the one the text names: until a page's example runs `source .venv/bin/activate`,
neither `python` nor `receiver` of the virtualenv is on PATH; after it, every shell block runs with the
virtualenv active (the reader's terminal) and Python blocks run with `.venv/bin/python`. A Python
example before that line fails the test. The service's ports 8000 and 9000 (the hook) are mapped to
free ones. A Python block whose first line is `# NAME.py: …` is a file the text asks to save. A block
right after a `<!-- not run by tests/test_readme.py: … -->` line is skipped (starting the service
itself, Docker, installing).
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

import pytest

from tests.harness import ReceiverProcess
from tests.harness import free_port
from tests.test_notify import SECRET

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
API_ERROR = re.compile(r'\{"error":\s*\{"code"')
ACTIVATE = "source .venv/bin/activate"
VENV = Path(sys.prefix)


@dataclass
class Example:
    page: str
    line: int
    language: str
    code: str


def nav_pages() -> list[Path]:
    """The docs pages in the order of mkdocs.yml's nav, then any page the nav leaves out."""
    named = re.findall(r"^\s*-\s*(?:[^:\n]+:\s*)?(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    pages = [DOCS / name for name in named]
    return pages + sorted(set(DOCS.rglob("*.md")) - set(pages))


SESSIONS = {"README.md": [README], "docs": nav_pages()}


def examples(page: Path) -> list[Example]:
    text = page.read_text() if page.exists() else ""
    found = []
    for match in FENCE.finditer(text):
        language, code = match.group(1), match.group(2)
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if language in ("sh", "python") and not before.startswith("<!-- not run by tests/test_readme.py"):
            line = text.count("\n", 0, match.start()) + 1
            found.append(Example(str(page.relative_to(ROOT)), line, language, code))
    return found


def session_examples(session: str) -> list[Example]:
    return [example for page in SESSIONS[session] for example in examples(page)]


def test_the_examples_are_found() -> None:
    readme, docs = session_examples("README.md"), session_examples("docs")
    assert any("receiver.client import" in e.code for e in readme if e.language == "python")
    assert any(e.code.startswith("# hook.py") for e in docs)
    assert len([e for e in docs if e.language == "sh"]) >= 5
    for found in (readme, docs):
        # Each session activates the virtualenv before anything that needs it, as the text tells a reader.
        assert ACTIVATE in found[0].code, found[0]
    # Nothing a reader cannot run: no placeholder names or ids in what runs (comments aside).
    for example in readme + docs:
        runs = re.sub(r"#.*", "", example.code)
        for placeholder in (".example", "tsk_…", "<id>", "<next_cursor>", "…"):
            assert placeholder not in runs, (example.page, example.line, placeholder)


def test_examples_say_which_interpreter() -> None:
    # `python3` outside the virtualenv has none of the package: the text says `python` with the venv active.
    for example in session_examples("README.md") + session_examples("docs"):
        assert not re.search(r"\bpython3\b", example.code), (example.page, example.line)


@pytest.mark.parametrize("session", list(SESSIONS))
def test_every_example_runs_as_shown(session: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(VENV)
    secrets = {
        "RECEIVER_NOTIFY_SECRET": SECRET,
        "RECEIVER_METRICS_TOKEN": "metrics-token-0123456789",
        "RECEIVER_ADMIN_KEY": "admin-key-of-the-docs-0123456789abcdef",  # docs/keys.md, cli.md, client.md
    }
    service = ReceiverProcess(work / "data", {**secrets, "RECEIVER_API_KEYS": ""}).start()
    hook_port = free_port()
    outside = [entry for entry in os.environ["PATH"].split(os.pathsep) if Path(entry) != VENV / "bin"]
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    env.update(
        PATH=os.pathsep.join(outside),
        RECEIVER_API_KEY=(work / "data" / "dev_api_key").read_text().strip(),
        RECEIVER_URL=service.url,  # the command line's default, http://127.0.0.1:8000, mapped too
        **secrets,
    )
    sessions: list[int] = []
    activated = False
    try:
        for number, example in enumerate(session_examples(session)):
            code = re.sub(r"\b8000\b", str(service.port), example.code)
            code = re.sub(r"\b9000\b", str(hook_port), code)
            where = f"{example.page} line {example.line}"
            saved = re.match(r"# (\S+\.py)\b", code)
            if saved:
                (work / saved.group(1)).write_text(code)
                continue
            out, err = work / f"example-{number}.out", work / f"example-{number}.err"
            if example.language == "sh":
                command = ["bash", "-c", "set -eu\n" + (ACTIVATE + "\n" if activated else "") + code]
            else:
                assert activated, f"{where}: a Python example before the text activates the virtualenv"
                command = [str(work / ".venv" / "bin" / "python"), "-c", code]
            with open(out, "w") as stdout, open(err, "w") as stderr:
                # Files, not pipes: a background process the example starts (the hook) keeps them open.
                process = subprocess.Popen(
                    command, cwd=work, env=env, stdout=stdout, stderr=stderr, start_new_session=True
                )
                sessions.append(process.pid)
                status = process.wait(timeout=180)
            shown = f"{where}:\n{out.read_text()}\n{err.read_text()}"
            assert status == 0, shown
            assert "Traceback" not in err.read_text(), shown
            assert not API_ERROR.search(out.read_text()), shown
            activated = activated or ACTIVATE in code
        # What the examples made: the downloads, and for the docs the upload's input and a notification.
        assert len(list((work / "images").glob("tsk_*-0.png"))) >= 2
        if session == "docs":
            assert (work / "kitchen.png").read_bytes().startswith(b"\x89PNG")
            deadline = time.monotonic() + 30
            while "task.succeeded tsk_" not in _read(work / "hook.log"):
                assert time.monotonic() < deadline, _read(work / "hook.log")
                time.sleep(0.05)
    finally:
        for process_group in sessions:
            try:
                os.killpg(process_group, signal.SIGTERM)
            except ProcessLookupError:
                pass
        service.terminate()


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""
