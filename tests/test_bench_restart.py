"""scripts/bench_restart.py runs, so the restart figures in the docs cannot rot: one run, every step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_restart_benchmark_runs_and_reports_every_step() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_restart.py"), "--runs", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    median = result.stdout.strip().splitlines()[-1]
    for step in ("answered", "exited", "ready", "reattached", "ended", "reference"):
        assert f"{step} " in median, median
