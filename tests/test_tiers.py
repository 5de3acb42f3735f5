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


def collected(*args: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return {line for line in done.stdout.splitlines() if "::" in line}


@pytest.mark.e2e
@pytest.mark.slow  # collects the whole suite four times
def test_every_test_has_a_tier_and_servers_stay_out_of_unit() -> None:
    everything = collected()
    unit = collected("-m", "unit")
    served = collected("-m", "e2e or pg or s3 or browser")
    assert unit and served
    assert unit | served == everything
    assert not unit & served
    # One of each kind, as a tier should see it.
    assert "tests/test_tiers.py::test_a_unit_test_cannot_bind_a_socket" in unit
    assert any(name.startswith("tests/test_api.py::") for name in served)
    assert any(name.startswith("tests/test_console.py::test_console_submits") for name in served)
    browser = collected("-m", "browser")
    assert browser <= served
    assert any(name.startswith("tests/test_console.py::") for name in browser)
    assert not any(name.startswith("tests/test_api.py::") for name in browser)
