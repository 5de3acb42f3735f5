"""The worker's side of pacing (receiver.pacing decides): what each claim tells the pacer, and probes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from receiver.jobs import Clock
from receiver.pacing import Pacer
from receiver.providers import REGISTRY
from receiver.store import Claimed
from receiver.store import Job
from receiver.store import Store


class PaceKeeper:
    def __init__(self, pacer: Pacer, store: Store, clock: Clock) -> None:
        self.pacer = pacer
        self.store = store
        self.clock = clock
        self._in_flight: dict[tuple[str, str], int] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}  # pace group -> its probe after a 429 hold

    def blocked(self) -> set[str]:
        """Providers whose submits the next claim leaves alone. Pacing decides from the counts of the
        previous turn; each submit checks again before it goes, so a stale count can only delay a task
        by one turn, never overrun a limit."""
        return self.pacer.blocked(self._in_flight, now=self.clock.monotonic())

    def observe(self, claimed: Claimed) -> None:
        """Every process's sends and holds, as the claim read them from the database."""
        self._in_flight = claimed.in_flight
        wall, now = self.clock.time(), self.clock.monotonic()
        for group, pace in claimed.paces.items():
            if group in self.pacer.groups():
                self.pacer.observe(
                    group,
                    pace.held_until,
                    pace.holds,
                    pace.sends,
                    wall,
                    now,
                    count=pace.count,
                    newest=pace.newest,
                )

    def next_change(self) -> float | None:
        return self.pacer.next_change(now=self.clock.monotonic())

    async def send_probes(self, start: Callable[[Job], asyncio.Task[None]]) -> None:
        """After a 429 hold, each held group's oldest waiting submit goes alone (see receiver.pacing):
        claimed in a turn of its own, since ordinary claims leave the held group's submits alone."""
        for group in self.pacer.probes_due(now=self.clock.monotonic()):
            if group in self._probes:
                continue
            members = set(self.pacer.providers_of(group))
            others = sorted(name for name in REGISTRY if name not in members)
            claimed = await self.store.claim_due({"submit": 1}, others, (), 0)
            if not claimed.jobs:
                self.pacer.no_probe_needed(group)
            for job in claimed.jobs:
                self._probes[group] = probe = start(job)
                probe.add_done_callback(lambda _, group=group: self._probes.pop(group, None))  # type: ignore[misc]
