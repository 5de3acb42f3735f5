"""`scripts/bench --backend both` in a tiny configuration, so it cannot rot.

The figures are a benchmark's and are not checked; what is checked is what the script claims to have
done on both backends: every callback answered with a 2xx, every task called back succeeded with each
image fetched once, and every notification came (the burst's and the end-to-end tasks').
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pg import HOW_TO_GET
from tests.pg import pg_bin

ROOT = Path(__file__).resolve().parent.parent


def test_bench_backends_measures_both_backends_and_everything_ends_correct() -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk not installed (apt-get install wrk)")
    if pg_bin() is None:
        pytest.skip(HOW_TO_GET)
    tiny = ["--quick", "--rounds", "1", "--seconds", "1", "--rate-seconds", "1", "--burst", "2000"]
    tiny += ["--drain", "20", "--tasks", "10"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_backends.py"), *tiny],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = {
        line.split("|")[1].strip(): line.split("|")[2:-1] for line in done.stdout.splitlines() if "|" in line
    }
    assert [cell.strip() for cell in table["measure"]] == [
        "SQLite + directory",
        "PostgreSQL + directory",
        "bare",
    ]
    for cell in table["correctness"][:2]:
        found = re.fullmatch(
            r"\s*([\d,]+)/([\d,]+) succeeded, every image fetched once, (\d+) notified, 0 non-2xx\s*", cell
        )
        assert found, cell
        succeeded, ended, notified = (int(group.replace(",", "")) for group in found.groups())
        assert succeeded == ended > 0
        assert notified == 20 + 10  # the drained burst's and the end-to-end tasks'
    assert "x bare" in table["callback capacity, 64 connections (median of 1)"][1]
