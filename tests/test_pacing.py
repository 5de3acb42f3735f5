"""Pacing: a burst never trips a provider's limits; tasks wait in `queued`, in order."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from receiver.pacing import Limits
from receiver.pacing import Pacer
from receiver.store.rules import PACE_SENDS_READ
from tests.fakes.kie import GENERATE
from tests.fakes.kie import KEY
from tests.fakes.kie import KieFake
from tests.harness import Receiver


def test_a_rate_window() -> None:
    pacer = Pacer({"kie": "kie", "kie-market": "kie"}, {"kie": Limits(per_window=3, window=10.0)})
    for _ in range(3):
        assert pacer.try_acquire("kie", "m", {}, now=100.0)
        pacer.release("kie", "m")
    assert not pacer.try_acquire("kie-market", "m", {}, now=101.0)  # the group shares one account
    assert pacer.blocked({}, now=101.0) == {"kie", "kie-market"}
    assert pacer.next_change(now=101.0) == 9.0
    assert pacer.try_acquire("kie-market", "m", {}, now=110.5)


def test_concurrency_overall_and_per_model() -> None:
    pacer = Pacer(
        {"apicore": "apicore"}, {"apicore": Limits(max_concurrent=24, max_concurrent_by_model={"max": 6})}
    )
    assert pacer.try_acquire("apicore", "max", {("apicore", "max"): 5, ("apicore", "pro"): 10})
    assert not pacer.try_acquire(
        "apicore", "max", {("apicore", "max"): 5, ("apicore", "pro"): 10}
    )  # 5 + 1 sending
    assert pacer.try_acquire("apicore", "pro", {("apicore", "max"): 5, ("apicore", "pro"): 10})
    pacer.release("apicore", "max")
    pacer.release("apicore", "pro")
    assert not pacer.try_acquire("apicore", "pro", {("apicore", "max"): 6, ("apicore", "pro"): 18})
    assert pacer.needs_counts()


def test_a_hold_after_a_429() -> None:
    pacer = Pacer({"fal": "fal"}, {})
    assert not pacer.needs_counts()
    pacer.hold("fal", 5.0, now=10.0)
    assert not pacer.try_acquire("fal", "m", {}, now=12.0)
    assert pacer.next_change(now=12.0) == 3.0
    assert pacer.try_acquire("fal", "m", {}, now=15.5)


def test_after_a_hold_one_probe_goes_alone_and_a_second_429_holds_again() -> None:
    pacer = Pacer({"kie": "kie", "kie-market": "kie"}, {})
    assert pacer.try_acquire("kie", "m", {}, now=0.0)  # two in flight when the 429 comes
    assert pacer.try_acquire("kie", "m", {}, now=0.0)
    pacer.hold("kie", 5.0, now=1.0)
    pacer.release("kie", "m")
    assert pacer.blocked({}, now=2.0) == {"kie", "kie-market"}
    assert pacer.probes_due(now=6.0) == []  # one is still being sent
    pacer.release("kie", "m")
    assert pacer.probes_due(now=2.0) == []  # still held
    assert pacer.probes_due(now=6.0) == ["kie"]
    assert pacer.blocked({}, now=6.0) == {"kie", "kie-market"}  # ordinary claims leave it alone
    assert pacer.try_acquire("kie-market", "m", {}, now=6.0)  # the probe
    assert not pacer.try_acquire("kie", "m", {}, now=6.0)  # alone
    assert pacer.probes_due(now=6.0) == []
    pacer.hold("kie", 1.0, now=6.5)  # the probe got a 429 too
    pacer.release("kie-market", "m")
    assert pacer.probes_due(now=7.0) == []
    assert pacer.probes_due(now=7.6) == ["kie"]
    assert pacer.try_acquire("kie", "m", {}, now=7.6)
    pacer.release("kie", "m")  # answered without a 429: open again
    assert pacer.blocked({}, now=7.7) == set()
    assert pacer.try_acquire("kie", "m", {}, now=7.7)
    assert pacer.try_acquire("kie", "m", {}, now=7.7)
    pacer.hold("kie", 1.0, now=8.0)
    pacer.release("kie", "m")
    pacer.release("kie", "m")
    pacer.no_probe_needed("kie")  # nothing was waiting
    assert pacer.blocked({}, now=9.5) == set()


def test_the_database_view_of_other_processes() -> None:
    """`observe` brings in what other worker processes recorded: their sends count in the window, a
    hold one of them met holds this one back and makes it probe; its own hold is not counted twice."""
    pacer = Pacer({"kie": "kie", "kie-market": "kie"}, {"kie": Limits(per_window=2, window=10.0)})
    pacer.observe("kie", 0.0, 0, [1000.0, 1001.0], wall=1002.0, now=2.0)  # wall 1000 = monotonic 0
    assert not pacer.try_acquire("kie", "m", {}, now=2.0)  # two sent elsewhere in the window
    assert pacer.next_change(now=2.0) == 8.0
    pacer.observe("kie", 1015.0, 1, [], wall=1012.0, now=12.0)  # another process met a 429
    assert pacer.blocked({}, now=12.0) == {"kie", "kie-market"}
    assert pacer.probes_due(now=14.0) == [] and pacer.probes_due(now=15.5) == ["kie"]
    assert pacer.try_acquire("kie", "m", {}, now=15.5) and pacer.probing("kie")
    pacer.hold("kie", 2.0, now=16.0, shared=2)  # the probe met one here: the database counts 2
    pacer.observe("kie", 1018.0, 2, [1015.5], wall=1016.0, now=16.0)
    assert not pacer.release("kie", "m")  # answered with a 429: probe again, once
    assert pacer.probes_due(now=18.5) == ["kie"]
    assert pacer.try_acquire("kie", "m", {}, now=18.5)
    assert pacer.release("kie", "m")  # answered: open again for every process
    fresh = Pacer({"fal": "fal"}, {})
    fresh.observe("fal", 500.0, 3, [], wall=1000.0, now=0.0)  # holds long over when it started
    assert fresh.probes_due(now=0.0) == [] and fresh.blocked({}, now=0.0) == set()


def test_sends_counted_beyond_those_read_free_the_window_no_sooner_than_they_really_do() -> None:
    """The database gives the oldest sends' times and counts the rest (each turn reading every send
    would cost as much as the window holds): those counted are taken as sent at the newest time."""
    pacer = Pacer({"kie": "kie"}, {"kie": Limits(per_window=5, window=10.0)})
    pacer.observe("kie", 0.0, 0, [1000.0, 1001.0], wall=1006.0, now=6.0, count=5, newest=1005.0)
    assert not pacer.try_acquire("kie", "m", {}, now=6.0)  # five in the window, two of them known
    assert pacer.next_change(now=6.0) == 4.0  # the oldest frees a slot first
    assert pacer.try_acquire("kie", "m", {}, now=10.5)
    assert not pacer.try_acquire("kie", "m", {}, now=10.6)
    assert pacer.try_acquire("kie", "m", {}, now=11.5)
    assert not pacer.try_acquire("kie", "m", {}, now=14.9)  # the three counted: sent at 5 at the latest
    assert pacer.try_acquire("kie", "m", {}, now=15.1)


def worker_went_past(receiver: Receiver) -> None:
    """A barrier instead of a pause: an unpaced sandbox task, created after the held-back ones, run to
    its end. The worker claims due jobs oldest first, so by then its turns have passed over the older,
    held-back submits (and sent any the pacing wrongly let go) at least once."""
    task = receiver.submit(provider="sandbox", prompt="past the held-back ones")
    assert receiver.wait(task["id"])["status"] == "succeeded"


def test_a_window_holding_more_sends_than_a_turn_reads(
    kie: KieFake, start_receiver: Callable[..., Receiver]
) -> None:
    """Past PACE_SENDS_READ sends in the window the worker reads the oldest ones' times and counts the
    rest: the cap holds all the same, and the tasks past it wait in order."""
    cap = PACE_SENDS_READ + 8
    receiver = start_receiver(KIE_API_KEY=KEY, KIE_BASE_URL=kie.url, KIE_MAX_PER_MINUTE=cap)
    ids = [receiver.submit(provider="kie", prompt=f"w{i}")["id"] for i in range(cap + 4)]
    kie.wait_for(lambda: len(kie.calls(GENERATE)) >= cap)
    worker_went_past(receiver)
    assert len(kie.calls(GENERATE)) == cap
    queued = [i for i in ids if receiver.alice.get(f"/v1/tasks/{i}").json()["status"] == "queued"]
    assert queued == ids[cap:]


def test_unpaced_providers_are_never_blocked() -> None:
    pacer = Pacer({"apimart": "apimart"}, {})
    assert all(pacer.try_acquire("apimart", "m", {}) for _ in range(1000))


def test_a_concurrency_cap_keeps_tasks_queued_in_order(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver(SANDBOX_MAX_CONCURRENT=1)
    ids = [
        receiver.submit(provider="sandbox", prompt=f"t{i}", options={"delay": 0.4})["id"] for i in range(5)
    ]
    sent, left = [], []  # event ids (one sequence for all tasks): when each was sent, when it left
    for task_id in ids:
        assert receiver.wait(task_id)["status"] == "succeeded"
        events = receiver.events(task_id)
        sent += [e["id"] for e in events if e["change"] == "queued→submitted"]
        left += [e["id"] for e in events if (e["change"] or "").startswith("submitted→")]
    assert sent == sorted(sent) and len(sent) == 5  # in the order they came
    assert all(sent[i + 1] > left[i] for i in range(4))  # one at a time: each after the one before left


def test_kie_takes_twenty_per_ten_seconds(kie: KieFake, kie_receiver: Receiver) -> None:
    ids = [kie_receiver.submit(provider="kie", prompt=f"b{i}")["id"] for i in range(24)]
    kie.wait_for(lambda: len(kie.calls(GENERATE)) >= 20)
    worker_went_past(kie_receiver)
    assert len(kie.calls(GENERATE)) == 20
    queued = [i for i in ids if kie_receiver.alice.get(f"/v1/tasks/{i}").json()["status"] == "queued"]
    assert queued == ids[20:]


@pytest.mark.parametrize("refusals", [1, 3])
def test_a_429_holds_back_the_whole_provider(
    kie: KieFake, start_receiver: Callable[..., Receiver], refusals: int
) -> None:
    """The task a 429 refused keeps its place: when the hold ends it goes alone, first, however the
    tasks created meanwhile were timed; only its acceptance lets the others go."""
    receiver = start_receiver(KIE_API_KEY=KEY, KIE_BASE_URL=kie.url)
    for _ in range(refusals):
        kie.script(GENERATE, 429, {"code": 429, "msg": "slow down"})
    # Retry-After comes as a header; the fake's scripted answers are JSON, so use kie's body code 429
    # with the worker's backoff.
    first = receiver.submit(provider="kie", prompt="first")
    kie.wait_for(lambda: len(kie.calls(GENERATE)) == 1)
    others = [receiver.submit(provider="kie", prompt=f"o{i}")["id"] for i in range(3)]
    for task_id in [first["id"], *others]:
        assert receiver.wait_status(task_id, "submitted")["status"] == "submitted"
    prompts = [c.json()["prompt"] for c in kie.calls(GENERATE)]
    assert prompts[: refusals + 1] == ["first"] * (refusals + 1)  # refused, refused…, then accepted
    assert sorted(prompts[refusals + 1 :]) == ["o0", "o1", "o2"]


def test_documented_defaults_and_overrides(tmp_path: object) -> None:
    from pathlib import Path

    from receiver.config import load_settings
    from receiver.worker import build_pacer

    base = {"RECEIVER_DATA_DIR": str(Path(str(tmp_path)) / "d")}
    pacer = build_pacer(load_settings(base))
    assert set(pacer.providers_of("kie")) == {"kie", "kie-market"}
    full = {("apicore", "flux-kontext-pro"): 24}
    assert not pacer.try_acquire("apicore", "flux-kontext-pro", full)
    assert not pacer.try_acquire("apicore", "flux-kontext-max", {("apicore", "flux-kontext-max"): 6})
    assert pacer.try_acquire("apimart", "x", {})  # no documented limit: not paced
    pacer = build_pacer(
        load_settings({**base, "APICORE_MAX_CONCURRENT": "30", "APIMART_MAX_PER_MINUTE": "1"})
    )
    assert pacer.try_acquire("apicore", "flux-kontext-pro", full)
    assert pacer.try_acquire("apimart", "x", {})
    assert not pacer.try_acquire("apimart", "x", {})
