"""The suite's tiers (tests/conftest.py): a `unit` test starts and waits for nothing, and the tiers
cover the suite."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.unit  # said here: binding a socket would otherwise put it in e2e
def test_a_unit_test_cannot_bind_a_socket(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("unit") is not None
    with socket.socket() as sock, pytest.raises(AssertionError, match="e2e tier"):
        sock.bind(("127.0.0.1", 0))


@pytest.mark.unit
def test_a_unit_test_cannot_wait_on_wall_time() -> None:
    with pytest.raises(AssertionError, match="e2e tier"):
        time.sleep(0.01)
    asyncio.run(asyncio.sleep(0))  # yielding to the loop is not waiting
    with pytest.raises(AssertionError, match="e2e tier"):
        asyncio.run(asyncio.sleep(0.01))


def tiers_of_every_test() -> dict[str, set[str]]:
    """One collection of the whole suite: each test's tiers, as the conftest assigned them."""
    report = ["-p", "tests.tier_report", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-s", *report],
        cwd=ROOT,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    found: dict[str, set[str]] = {}
    for line in done.stdout.splitlines():
        if line.startswith("TIERS "):
            name, _, tiers = line.removeprefix("TIERS ").rpartition(" ")  # a test's id may hold spaces
            found[name] = set(filter(None, tiers.strip().split(",")))
    return found


@pytest.mark.e2e
@pytest.mark.slow  # collects the whole suite
def test_every_test_has_a_tier_and_servers_stay_out_of_unit() -> None:
    tiers = tiers_of_every_test()
    everything = set(tiers)
    unit = {name for name, marks in tiers.items() if "unit" in marks}
    served = {name for name, marks in tiers.items() if marks & {"e2e", "pg", "s3", "browser"}}
    assert unit and served
    assert unit | served == everything
    assert not unit & served
    # One of each kind, as a tier should see it.
    assert "tests/test_tiers.py::test_a_unit_test_cannot_bind_a_socket" in unit
    assert any(name.startswith("tests/test_api.py::") for name in served)
    assert any(name.startswith("tests/test_console.py::test_console_submits") for name in served)
    browser = {name for name, marks in tiers.items() if "browser" in marks}
    assert browser <= served
    assert any(name.startswith("tests/test_console.py::") for name in browser)
    assert not any(name.startswith("tests/test_api.py::") for name in browser)
