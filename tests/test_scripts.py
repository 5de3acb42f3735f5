"""Scripts and packaging: scripts/_venv.sh installs when the venv is new or pyproject.toml changed and
not otherwise; the lock file, the Dockerfile and the distribution metadata hold what they promise.

For _venv.sh the venv's python is a stand-in that records how it was called (no network, no real
install): what is tested is the script's decision, which is all it adds to pip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k != "RECEIVER_VENV"}


def project(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the project's pyproject.toml and scripts, and a venv whose python logs its arguments."""
    work = tmp_path / "project"
    (work / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", work / "pyproject.toml")
    shutil.copy(ROOT / "scripts" / "_venv.sh", work / "scripts" / "_venv.sh")
    python = work / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    calls = tmp_path / "calls"
    python.write_text(f'#!/bin/sh\necho "$*" >>{calls}\n')
    python.chmod(0o755)
    return work, calls


def ensure(work: Path, extras: str = "") -> str:
    done = subprocess.run(
        ["bash", "-c", f'source scripts/_venv.sh && ensure_venv "{extras}"'],
        cwd=work,
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stderr


def installs(calls: Path) -> list[str]:
    return (
        [line for line in calls.read_text().splitlines() if "pip install" in line] if calls.exists() else []
    )


def test_installs_only_when_needed(tmp_path: Path) -> None:
    work, calls = project(tmp_path)
    assert "installing receiver" in ensure(work)
    assert installs(calls) == ["-m pip install -q --disable-pip-version-check -e ."]
    assert ensure(work) == ""  # the second start installs nothing and says nothing
    assert len(installs(calls)) == 1

    ensure(work, "test")  # more extras than were installed: install again
    assert installs(calls)[-1].endswith("-e .[test]")
    ensure(work)  # a test install serves `serve` as well
    ensure(work, "test")
    assert len(installs(calls)) == 2

    with open(work / "pyproject.toml", "a") as handle:
        handle.write("\n# a change\n")
    ensure(work)
    assert len(installs(calls)) == 3


def test_a_failed_install_says_so_and_is_tried_again(tmp_path: Path) -> None:
    work, calls = project(tmp_path)
    python = work / ".venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$*" >>{calls}\necho "ERROR: no such package" >&2\nexit 1\n')
    failed = subprocess.run(
        ["bash", "-c", "source scripts/_venv.sh && ensure_venv"],
        cwd=work,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 2
    assert "ERROR: no such package" in failed.stderr and "installing into" in failed.stderr
    assert not (work / ".venv" / ".receiver-installed").exists()


def names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower().replace("_", "-") for line in requirements}


def test_the_lock_pins_every_runtime_dependency_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = names([*project["dependencies"], *project["optional-dependencies"]["fast"]])
    lock = (ROOT / "requirements.lock").read_text()
    entries = re.findall(
        r"^([a-z0-9][a-z0-9._-]*)==(\S+)(?: ;[^\\\n]*)? \\\n((?:    --hash=sha256:[0-9a-f]{64}.*\n)+)",
        lock,
        re.M,
    )
    pinned = {name for name, _, _ in entries}
    assert wanted <= pinned, wanted - pinned
    # Every requirement line of the file is one of those hashed entries.
    assert len(entries) == len(re.findall(r"^[a-z0-9]", lock, re.M))


def test_the_image_is_pinned_and_installs_from_the_lock_only() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    [image] = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.M)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", image), image
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]
    assert "--require-hashes --only-binary=:all: -r requirements.lock -d /wheels" in dockerfile
    assert "--no-index --find-links=/wheels --require-hashes -r /tmp/requirements.lock" in dockerfile
    # The wheels reach the runtime stage only as a mount of the RUN that installs them: no layer keeps them.
    assert "COPY --from=build" not in dockerfile
    assert "--mount=type=bind,from=build,source=/wheels,target=/wheels" in dockerfile


def test_the_distribution_metadata() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    assert project["name"] == "flux-receiver"  # `receiver` on PyPI is someone else's
    assert project["scripts"] == {"receiver": "receiver.cli:main"}
    assert "version" not in project and project["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "receiver.__version__"}
    assert pyproject["build-system"]["requires"] == ["setuptools>=77"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert {"Homepage", "Repository", "Issues"} <= set(project["urls"])
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]  # the expression says it
