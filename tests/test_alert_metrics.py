"""The metrics an operator alerts on, read from a real service's /metrics, and the sample alert rules
(deploy/prometheus/alerts.yml) checked by promtool against exactly those metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import database_settings
from tests.harness import Receiver

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
NEEDS_PROMTOOL = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found (Debian: apt-get install prometheus; .ci/run installs it)"
)
JOB_KINDS = ("submit", "download", "reconcile", "deadline", "notify")


@pytest.fixture(params=["sqlite", "postgres"])
def database_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """Both backends: a task's end is observed where its transaction commits, on either."""
    return database_settings(request, request.param)


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the series `name{labels}` in a Prometheus text scrape, None when it is absent."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        found_name, _, rest = series.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if found_name == name and found == labels:
            return float(value)
    return None


def test_queue_and_task_series_read_0_rather_than_vanish(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver()
    scrape = receiver.anon.get("/metrics").text
    for kind in JOB_KINDS:
        assert sample(scrape, "receiver_jobs_due", kind=kind) == 0.0, kind
        assert sample(scrape, "receiver_oldest_due_job_seconds", kind=kind) == 0.0, kind
    for status in ("queued", "submitted", "downloading", "succeeded", "failed"):
        assert sample(scrape, "receiver_tasks", provider="sandbox", status=status) == 0.0, status
    assert sample(scrape, "receiver_tasks", provider="kie", status="queued") is None  # not offered here
    assert (
        sample(scrape, "receiver_tasks_ended_total", provider="sandbox", status="failed", error="timed_out")
        == 0
    )
    assert sample(scrape, "receiver_long_polls") == 0.0

    # After work came and went the series stay, back at 0 (before, a kind with nothing due vanished).
    task = receiver.submit(provider="sandbox", prompt="come and go")
    assert receiver.wait(task["id"])["status"] == "succeeded"
    scrape = receiver.anon.get("/metrics").text
    for kind in ("submit", "download"):
        assert sample(scrape, "receiver_jobs_due", kind=kind) == 0.0, kind
    assert sample(scrape, "receiver_tasks", provider="sandbox", status="succeeded") == 1.0
    assert sample(scrape, "receiver_tasks", provider="sandbox", status="failed") == 0.0


def test_each_task_end_is_timed_and_counted_once_by_outcome_and_error(
    start_receiver: Callable[..., Receiver],
) -> None:
    receiver = start_receiver()

    def ends(text: str, status: str, error: str) -> float:
        return (
            sample(text, "receiver_tasks_ended_total", provider="sandbox", status=status, error=error) or 0.0
        )

    def timed(text: str, outcome: str) -> tuple[float, float]:
        count = sample(text, "receiver_task_seconds_count", provider="sandbox", outcome=outcome) or 0.0
        total = sample(text, "receiver_task_seconds_sum", provider="sandbox", outcome=outcome) or 0.0
        return count, total

    def provider_calls(text: str) -> float:
        found = sample(text, "receiver_provider_request_seconds_count", provider="sandbox", endpoint="submit")
        return found or 0.0

    before = receiver.anon.get("/metrics").text
    started = time.monotonic()
    good = receiver.submit(provider="sandbox", prompt="a quiet bay", num_images=2)
    bad = receiver.submit(provider="sandbox", prompt="fail me", options={"outcome": "generation_failed"})
    done = receiver.wait(good["id"])
    assert done["status"] == "succeeded"
    failed = receiver.wait(bad["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "generation_failed"
    # A late duplicate of the success changes nothing and counts nothing.
    answer = receiver.anon.post(
        receiver.callback_url("sandbox", good["id"]),
        json={
            "id": done["provider_task_id"],
            "status": "succeeded",
            "images": ["http://127.0.0.1:9/late.png"],
        },
    )
    assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 20
    while not any("duplicate or late" in e["summary"] for e in receiver.events(good["id"])):
        assert time.monotonic() < deadline, "the late callback was never applied"
        time.sleep(0.02)
    elapsed = time.monotonic() - started
    after = receiver.anon.get("/metrics").text

    assert ends(after, "succeeded", "none") - ends(before, "succeeded", "none") == 1
    assert ends(after, "failed", "generation_failed") - ends(before, "failed", "generation_failed") == 1
    for outcome in ("succeeded", "failed"):
        count, total = timed(after, outcome)
        count_before, total_before = timed(before, outcome)
        assert count - count_before == 1, outcome
        assert 0 < total - total_before <= elapsed, outcome  # from creation to the end, within the test
    assert provider_calls(after) - provider_calls(before) == 2  # each submit to the provider, timed
    assert 'receiver_task_seconds_bucket{le="+Inf",outcome="succeeded",provider="sandbox"}' in after


def test_the_alert_rules_name_only_metrics_the_service_exports(
    start_receiver: Callable[..., Receiver],
) -> None:
    receiver = start_receiver()
    task = receiver.submit(provider="sandbox", prompt="for the names")
    assert receiver.wait(task["id"])["status"] == "succeeded"
    exported = {
        line.split()[2]
        for line in receiver.anon.get("/metrics").text.splitlines()
        if line.startswith("# TYPE")
    }
    rules = (RULES / "alerts.yml").read_text()
    named = set(re.findall(r"\b(receiver_[a-z_]+?)(?:_bucket|_count|_sum)?\{", rules))
    assert named, "the rules name no receiver metric"
    assert named <= exported, named - exported


@NEEDS_PROMTOOL
def test_promtool_accepts_the_alert_rules_and_their_tests() -> None:
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "rules", "alerts.yml"], cwd=RULES, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=RULES, capture_output=True, text=True, timeout=60
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
