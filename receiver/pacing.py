"""Pacing submissions to each provider's limits, so a burst does not trip them.

Each provider belongs to a pace group (kie and kie-market share one kie account). A group may have a
rate (N new tasks per window), a concurrency cap (tasks accepted and not yet finished, optionally per
model), and a hold after a 429 that still came (until its Retry-After). While a group cannot take
another task its submit jobs stay queued, in order; the worker does not claim them.

After a hold the group sends one task alone first, the oldest waiting (the one the 429 refused keeps its
place, so it is that one): the probe. Only once the probe is answered without another 429 do the
others follow. So a task held back by a 429 is never overtaken by tasks that came after it.

With several worker processes the database keeps what they share (store `pace_*`): each send is
taken there too (so the window counts every process's sends), a 429 holds the group in all of them
(`observe` brings another process's hold and sends into this pacer each turn), and a probe holds the
group for the others until it is answered.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field


@dataclass(frozen=True)
class Limits:
    per_window: int | None = None
    window: float = 60.0
    max_concurrent: int | None = None
    max_concurrent_by_model: Mapping[str, int] = field(default_factory=dict)

    @property
    def paced(self) -> bool:
        return bool(self.per_window or self.max_concurrent or self.max_concurrent_by_model)


@dataclass(frozen=True)
class Mark:
    """A pace group's count of ended submits at one moment, by model (see `Pacer.mark`)."""

    released: Mapping[str, int]


@dataclass
class _Group:
    limits: Limits
    sent: deque[float] = field(default_factory=deque)
    sending: dict[str, int] = field(default_factory=dict)  # model -> submits in flight right now
    released: dict[str, int] = field(default_factory=dict)  # model -> submits ended, ever (see `mark`)
    held_until: float = 0.0
    holds: int = 0  # 429s seen, to tell whether the probe's answer was another one
    probe: str = ""  # "" none, "needed" after a hold, "sent" while the probe is out
    probe_holds: int = 0
    shared_holds: int = 0  # the database's count of the group's holds when last seen
    observed: bool = False  # whether the database's view was taken once


class Pacer:
    def __init__(self, groups: Mapping[str, str], limits: Mapping[str, Limits]) -> None:
        """`groups` maps each provider to its group; `limits` maps each group to its limits."""
        self._group_of = dict(groups)
        self._groups = {name: _Group(limits.get(name, Limits())) for name in set(groups.values())}

    def providers_of(self, group: str) -> list[str]:
        return [provider for provider, name in self._group_of.items() if name == group]

    def groups(self) -> set[str]:
        return set(self._groups)

    def group_of(self, provider: str) -> str:
        return self._group_of[provider]

    def limits_of(self, group: str) -> Limits:
        return self._groups[group].limits

    def probing(self, group: str) -> bool:
        """Whether the submit just acquired for `group` is its probe (sent alone after a hold)."""
        return self._groups[group].probe == "sent"

    def rate_windows(self) -> dict[str, float]:
        """Each group with a per-window rate, and its window (whose sends the database is asked for)."""
        return {name: group.limits.window for name, group in self._groups.items() if group.limits.per_window}

    def observe(
        self,
        group: str,
        held_until: float,
        holds: int,
        sends: list[float],
        wall: float,
        now: float | None = None,
        count: int = 0,
        newest: float = 0.0,
    ) -> None:
        """Take the database's view of `group` (wall-clock times, read at `wall`): its hold, a hold
        another process met (then this one probes too), and every process's sends in the window: the
        oldest ones' times in `sends`, and (when `count` is more) the rest, taken as sent at `newest`,
        the latest they can have been, so they free the window no sooner than they really do."""
        now = time.monotonic() if now is None else now
        state = self._groups[group]
        offset = now - wall
        state.held_until = held_until + offset
        state.sent = deque(at + offset for at in sends)
        if count > len(sends):
            state.sent.extend([newest + offset] * (count - len(sends)))
        # A count above the last seen is a hold another process met; at start only a hold still on is.
        met = holds > state.shared_holds if state.observed else holds > 0 and held_until > wall
        state.observed = True
        if met:
            state.holds += 1
            if state.probe != "sent":
                state.probe = "needed"
        state.shared_holds = max(state.shared_holds, holds)

    def needs_counts(self) -> bool:
        """Whether any group caps concurrency (then the worker counts tasks in flight for it)."""
        return bool(self.counted_providers())

    def counted_providers(self) -> list[str]:
        """The providers whose tasks in flight must be counted: those of groups that cap concurrency."""
        return sorted(
            provider
            for provider, name in self._group_of.items()
            if self._groups[name].limits.max_concurrent or self._groups[name].limits.max_concurrent_by_model
        )

    def blocked(self, in_flight: Mapping[tuple[str, str], int], now: float | None = None) -> set[str]:
        """The providers that cannot take one more task now (for any model, in the simplest case)."""
        now = time.monotonic() if now is None else now
        blocked: set[str] = set()
        for name, group in self._groups.items():
            if group.probe or not self._open(group, name, None, in_flight, now):
                blocked.update(self.providers_of(name))
        return blocked

    def probes_due(self, now: float | None = None) -> list[str]:
        """Groups whose hold is over and whose probe is still to be sent: the worker claims their
        oldest submit alone (a turn of its own), since `blocked` keeps them out of ordinary claims."""
        now = time.monotonic() if now is None else now
        return sorted(
            name
            for name, group in self._groups.items()
            if group.probe == "needed" and group.held_until <= now and not any(group.sending.values())
        )

    def no_probe_needed(self, group: str) -> None:
        """Nothing of the group was waiting: there is nobody to probe with, the group is open again."""
        if self._groups[group].probe == "needed":
            self._groups[group].probe = ""

    def next_change(self, now: float | None = None) -> float | None:
        """Seconds until a rate window or a hold frees a slot, if one is closed."""
        now = time.monotonic() if now is None else now
        waits = []
        for group in self._groups.values():
            if group.held_until > now:
                waits.append(group.held_until - now)
            limits = group.limits
            if limits.per_window and len(group.sent) >= limits.per_window:
                waits.append(max(0.0, group.sent[0] + limits.window - now))
        return min(waits) if waits else None

    def mark(self, provider: str) -> Mark:
        """Taken just before the database's count of tasks in flight is read, and given back to
        `try_acquire` with that count.

        A submit of this process counts in `sending` until `release`, which comes only after its
        result (the task now `submitted`) is committed. A count read before that commit, used after the
        release, would miss the submit twice over: not yet in the count, no longer in `sending`. So the
        submits released since the mark are counted as still in flight: the count may have missed them."""
        return Mark(dict(self._groups[self._group_of[provider]].released))

    def try_acquire(
        self,
        provider: str,
        model: str,
        in_flight: Mapping[tuple[str, str], int],
        now: float | None = None,
        since: Mark | None = None,
    ) -> bool:
        """Take a slot for one submit of `model` to `provider`, if its group has one free. `in_flight` is
        the database's count, read after `since` was taken (see `mark`)."""
        now = time.monotonic() if now is None else now
        name = self._group_of[provider]
        group = self._groups[name]
        if not self._open(group, name, model, in_flight, now, since):
            return False
        if group.probe == "needed":
            group.probe, group.probe_holds = "sent", group.holds
        if group.limits.per_window:
            group.sent.append(now)
        group.sending[model] = group.sending.get(model, 0) + 1
        return True

    def release(self, provider: str, model: str) -> bool:
        """A submit finished (accepted or not): it no longer counts as being sent. True when it was the
        probe and no 429 came meanwhile: the group is open again."""
        group = self._groups[self._group_of[provider]]
        group.sending[model] = max(0, group.sending.get(model, 0) - 1)
        group.released[model] = group.released.get(model, 0) + 1
        if group.probe == "sent":  # the probe went alone, so this is its answer
            group.probe = "needed" if group.holds > group.probe_holds else ""
            return not group.probe
        return False

    def cancel(self, provider: str, model: str) -> None:
        """Give back a slot taken by `try_acquire` that was not used (another process got there first)."""
        group = self._groups[self._group_of[provider]]
        group.sending[model] = max(0, group.sending.get(model, 0) - 1)
        if group.probe == "sent":
            group.probe = "needed"

    def hold(self, provider: str, seconds: float, now: float | None = None, shared: int = 0) -> None:
        """A 429 came anyway: hold the whole group back for `seconds`. `shared` is the database's count
        of the group's holds with this one, so `observe` does not take it for another process's."""
        now = time.monotonic() if now is None else now
        group = self._groups[self._group_of[provider]]
        if shared:
            group.shared_holds, group.observed = max(group.shared_holds, shared), True
        group.held_until = max(group.held_until, now + seconds)
        group.holds += 1
        if group.probe != "sent":
            group.probe = "needed"

    def _open(
        self,
        group: _Group,
        name: str,
        model: str | None,
        in_flight: Mapping[tuple[str, str], int],
        now: float,
        since: Mark | None = None,
    ) -> bool:
        if group.held_until > now:
            return False
        if group.probe and any(group.sending.values()):
            return False  # probing: one at a time
        limits = group.limits
        if limits.per_window:
            while group.sent and group.sent[0] <= now - limits.window:
                group.sent.popleft()
            if len(group.sent) >= limits.per_window:
                return False
        if not (limits.max_concurrent or limits.max_concurrent_by_model):
            return True
        providers = self.providers_of(name)
        # This process's submits: those being sent, and those ended since the count was read.
        ours = dict(group.sending)
        if since is not None:
            for sent, ended in group.released.items():
                ours[sent] = ours.get(sent, 0) + ended - since.released.get(sent, 0)
        total = sum(n for (provider, _), n in in_flight.items() if provider in providers)
        total += sum(ours.values())
        if limits.max_concurrent and total >= limits.max_concurrent:
            return False
        if model is not None and model in limits.max_concurrent_by_model:
            of_model = sum(
                n for (provider, m), n in in_flight.items() if provider in providers and m == model
            )
            of_model += ours.get(model, 0)
            if of_model >= limits.max_concurrent_by_model[model]:
                return False
        return True
