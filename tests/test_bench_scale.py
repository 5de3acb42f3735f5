"""`scripts/bench --backend postgres` in a tiny configuration, so it cannot rot.

The figures are a benchmark's and are not checked; what is checked is what the script claims to have
done: every layout answered its callbacks and ended their tasks as succeeded, every end-to-end task was
notified, and after `kill -9` of a worker the downloads it held were stored by the other one (each
fetched again). The script itself waits only on observable state (bounded polling), never on a clock.
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
COLUMNS = ("SQLite, 1 replica", "SQLite, 2 replicas", "PostgreSQL, 1 replica", "PostgreSQL, 2 replicas")


def bench_table(script: str, args: list[str]) -> tuple[str, dict[str, list[str]]]:
    """Run a bench script (skipped without wrk or PostgreSQL); its output, and its table by row label."""
    if shutil.which("wrk") is None:
        pytest.skip("wrk not installed (apt-get install wrk)")
    if pg_bin() is None:
        pytest.skip(HOW_TO_GET)
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = {
        line.split("|")[1].strip(): line.split("|")[2:-1] for line in done.stdout.splitlines() if "|" in line
    }
    return done.stdout, table


def test_bench_backend_postgres_measures_every_layout_and_the_takeover() -> None:
    tiny = ["--seconds", "1", "--burst", "40", "--tasks", "4", "--takeover", "2", "--drain", "120"]
    stdout, table = bench_table("bench_scale.py", tiny)
    assert [cell.strip() for cell in table["measure"]] == list(COLUMNS)
    for cell in table["called back: succeeded / ended (non-2xx)"]:
        succeeded, ended, errors = map(int, re.fullmatch(r"\s*(\d+) / (\d+) \((\d+)\)\s*", cell).groups())  # type: ignore[union-attr]
        assert succeeded == ended > 0
        assert errors == 0
    for cell in table["end to end, tasks/s"]:
        assert "(4 notified)" in cell
    assert [cell.strip() for cell in table["images fetched twice"]] == ["0"] * 4
    took = re.search(
        r"holding (\d+) downloads; .* (\d+)/(\d+) tasks succeeded; images fetched twice: (\d+)", stdout
    )
    assert took, stdout
    held, succeeded, tasks, twice = map(int, took.groups())
    assert held >= 1
    assert succeeded == tasks == 2
    assert twice >= held  # each download the dead worker held was fetched again by the other
