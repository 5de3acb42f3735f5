"""The concurrency cap against a count of tasks in flight that is already old when it is used.

A submit job reads the database's count of tasks in flight (tasks `submitted`, and other processes'
submits being sent), then asks the pacer, which adds this process's own submits being sent. Another
submit of this process may end in between: its task committed as `submitted` after the count was read,
its slot released before the pacer is asked. Counted nowhere, it let a third submit through a cap of 2
(`test_scale_out.py::test_pacing_counts_across_replicas`, seen once on a loaded machine). These replay
that interleaving step by step."""

from __future__ import annotations

from receiver.pacing import Limits
from receiver.pacing import Pacer


def capped(limits: Limits) -> Pacer:
    return Pacer({"kie": "kie", "kie-market": "kie"}, {"kie": limits})


def test_a_submit_that_ends_while_the_count_is_read_still_counts() -> None:
    pacer = capped(Limits(max_concurrent=2))
    assert pacer.try_acquire("kie", "pro", {})  # first submit, being sent
    assert pacer.try_acquire("kie", "pro", {})  # second submit, being sent
    mark = pacer.mark("kie")  # a third submit job: the mark, then the database's count...
    count: dict[tuple[str, str], int] = {}  # ...read before the first submit's answer is committed
    pacer.release("kie", "pro")  # the first submit's task is committed `submitted`; its slot is free
    assert not pacer.try_acquire("kie", "pro", count, since=mark)  # 1 submitted + 1 sending: full
    # Read again (as the next turn does), the count has it: still full, and no slot was taken.
    assert not pacer.try_acquire("kie", "pro", {("kie", "pro"): 1}, since=pacer.mark("kie"))
    pacer.release("kie", "pro")  # the second one's task goes `submitted` too
    assert not pacer.try_acquire("kie", "pro", {("kie", "pro"): 2}, since=pacer.mark("kie"))
    # The first task finishes: one slot, for exactly one more.
    fresh = pacer.mark("kie")
    assert pacer.try_acquire("kie-market", "pro", {("kie", "pro"): 1}, since=fresh)
    assert not pacer.try_acquire("kie", "pro", {("kie", "pro"): 1}, since=fresh)


def test_the_per_model_cap_counts_a_submit_that_ended_meanwhile() -> None:
    pacer = capped(Limits(max_concurrent_by_model={"max": 1}))
    assert pacer.try_acquire("kie", "max", {})
    mark = pacer.mark("kie")
    pacer.release("kie", "max")
    assert not pacer.try_acquire("kie", "max", {}, since=mark)
    assert pacer.try_acquire("kie", "pro", {}, since=mark)  # another model is not capped


def test_submits_ended_before_the_mark_are_left_to_the_count() -> None:
    pacer = capped(Limits(max_concurrent=2))
    assert pacer.try_acquire("kie", "pro", {})
    pacer.release("kie", "pro")  # ended and committed before the next count is read
    mark = pacer.mark("kie")
    assert pacer.try_acquire("kie", "pro", {("kie", "pro"): 1}, since=mark)  # 1 + 1: room for it
