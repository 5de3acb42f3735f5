"""One tenant cannot shut out another: its ?wait long-polls are capped and leave connections for every
other request. Over real HTTP, on a served receiver."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from receiver.cli import http_limits
from receiver.config import ConfigError
from receiver.config import load_settings
from tests.harness import ALICE
from tests.harness import Receiver

WAIT = "X-Receiver-Wait"


def metric(receiver: Receiver, name: str, tenant: str) -> float | None:
    """The value of `name{tenant="…"}` in the receiver's /metrics, None when it is not there."""
    text = receiver.anon.get("/metrics").text
    found = re.search(rf'^{name}\{{tenant="{tenant}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else None


def until(predicate: Callable[[], bool], what: str, seconds: float = 30) -> None:
    """Bounded polling of state: fails the test, saying what never happened, if it does not come."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=16) as executor:
        yield executor


def long_poll(url: str, task_id: str, seconds: int = 60) -> httpx.Response:
    """One ?wait on a connection of its own (each long-poll holds one), closed once answered."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=120) as client:
        return client.get(f"/v1/tasks/{task_id}", params={"wait": seconds})


def test_a_tenants_waits_past_its_cap_answer_at_once_and_leave_connections_for_others(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    # A small connection budget, applied as `receiver serve` applies it (uvicorn's limit_concurrency):
    # before the cap, 10 long-polls of one tenant made every other request a 503.
    receiver = Receiver(
        tmp_path / "data", {"RECEIVER_MAX_CONNECTIONS": "10", "RECEIVER_MAX_WAITS_PER_TENANT": "3"}
    )
    for name, value in http_limits(receiver.settings).items():
        setattr(receiver.served.server.config, name, value)
    receiver.start()
    held: list[Future[httpx.Response]] = []
    try:
        # Tasks that stay running: the sandbox answers them ten minutes from now.
        slow: dict[str, Any] = {"provider": "sandbox", "prompt": "a slow fox", "options": {"delay": 600}}
        task_id = str(receiver.submit(**slow)["id"])
        bobs = str(receiver.submit(receiver.bob, **slow)["id"])
        capped_before = metric(receiver, "receiver_waits_capped_total", "alice") or 0.0

        held = [pool.submit(long_poll, receiver.url, task_id) for _ in range(3)]
        until(
            lambda: metric(receiver, "receiver_waits_open", "alice") == 3,
            "alice's first three long-polls are not all held open",
        )
        # Twice the connection budget in more long-polls, one after another: each answers at once.
        for _ in range(20):
            answer = long_poll(receiver.url, task_id)
            assert answer.status_code == 200, answer.text
            assert answer.headers[WAIT] == "capped"
            assert answer.headers["connection"] == "close"
            assert answer.json()["id"] == task_id and answer.json()["status"] != "succeeded"
        assert not any(future.done() for future in held), "the long-polls within the cap are still held"
        assert metric(receiver, "receiver_waits_open", "alice") == 3
        assert metric(receiver, "receiver_waits_capped_total", "alice") == capped_before + 20

        # Meanwhile everyone else is answered: health checks, another tenant's lookups and long-polls.
        assert receiver.anon.get("/healthz").status_code == 200
        assert receiver.bob.get(f"/v1/tasks/{bobs}").status_code == 200
        assert receiver.bob.get("/v1/tasks").status_code == 200
        answer = receiver.bob.get(f"/v1/tasks/{bobs}", params={"wait": 0.2})
        assert answer.status_code == 200 and WAIT not in answer.headers
        assert receiver.alice.get(f"/v1/tasks/{task_id}").status_code == 200  # a lookup without ?wait
    finally:
        receiver.stop()
        for future in held:
            future.exception()  # answered or cut off by the stop; either way, over


def test_the_fairness_settings_are_checked_at_start(tmp_path: Path) -> None:
    def problem(**env: str) -> str:
        with pytest.raises(ConfigError) as caught:
            load_settings({"RECEIVER_DATA_DIR": str(tmp_path), **env})
        return str(caught.value)

    assert "RECEIVER_MAX_WAITS_PER_TENANT" in problem(RECEIVER_MAX_WAITS_PER_TENANT="0")
    assert "RECEIVER_MAX_WAITS_PER_TENANT" in problem(RECEIVER_MAX_WAITS_PER_TENANT="many")
    # Waits may hold half of the connections at most: the rest is for everything else.
    assert "half of RECEIVER_MAX_CONNECTIONS" in problem(
        RECEIVER_MAX_CONNECTIONS="100", RECEIVER_MAX_WAITS_PER_TENANT="51"
    )

    settings = load_settings({"RECEIVER_DATA_DIR": str(tmp_path)})
    assert (settings.max_waits_per_tenant, settings.max_waits) == (50, 500)
    # A small connection budget brings the default down with it, rather than refusing to start.
    settings = load_settings({"RECEIVER_DATA_DIR": str(tmp_path), "RECEIVER_MAX_CONNECTIONS": "40"})
    assert (settings.max_waits_per_tenant, settings.max_waits) == (20, 20)
