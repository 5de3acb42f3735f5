"""`scripts/bench --backend both` in a tiny configuration, so it cannot rot.

The figures are a benchmark's and are not checked; what is checked is what the script claims to have
done on both backends: every callback answered with a 2xx, every task called back succeeded with each
image fetched once, and every notification came (the burst's and the end-to-end tasks').
"""

from __future__ import annotations

import re

from tests.test_bench_scale import bench_table


def test_bench_backends_measures_both_backends_and_everything_ends_correct() -> None:
    # The default stack: the test extras do not install uvloop and httptools (the `fast` extra).
    tiny = [
        "--stack",
        "default",
        "--quick",
        "--rounds",
        "1",
        "--seconds",
        "1",
        "--rate-seconds",
        "1",
        "--burst",
        "400",
    ]
    _, table = bench_table("bench_backends.py", [*tiny, "--drain", "20", "--tasks", "10"])
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
