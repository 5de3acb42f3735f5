"""What leaves the store: typed, frozen records, whatever database they were read from."""

from __future__ import annotations

import json
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Self

from receiver.models import Status
from receiver.models import TaskError
from receiver.untrusted import storable_json


class IdempotencyConflict(Exception):
    """The same Idempotency-Key came again with another body."""


JSON_COLUMNS = frozenset(("request", "provider_state", "metadata", "attempts", "fallback"))


@dataclass(frozen=True)
class TaskView:
    """A task as lookups, lists, events and notifications show it: the columns they return (and the
    tenant and notify URL they act on), never the request (it may be large) nor provider state (it
    may hold per-task secrets). `TASK_VIEW` names these columns for every read that renders a task."""

    seq: int
    id: str
    tenant: str
    provider: str
    model: str
    prompt: str
    status: Status
    provider_task_id: str | None
    error: Mapping[str, Any] | None
    metadata: Mapping[str, Any]
    attempts: Sequence[Mapping[str, Any]]  # each provider the task left (fallback), with its error
    fallback: Sequence[str]  # the whole fallback chain, as created (the providers ahead: less attempts)
    notify_url: str | None
    created_at: float
    updated_at: float
    completed_at: float | None
    estimate_usd: float | None  # what it should cost, by the price table, at create (receiver/prices.py)
    cost_usd: float | None  # what it cost, once ended; None before, or when no price is known
    cost_source: str | None  # "price" (the price table) or "provider" (the provider's own report)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Self:
        values = {name: row[name] for name in cls.__dataclass_fields__}
        for name in JSON_COLUMNS.intersection(values):
            values[name] = json.loads(values[name])
        values["error"] = json.loads(values["error"]) if values["error"] else None
        # Errors come from outside: one kept by an older version may hold what no encoder can write.
        values["error"] = storable_json(values["error"])
        if "attempts" in values:
            values["attempts"] = storable_json(values["attempts"])
        values["status"] = Status(values["status"])
        return cls(**values)


TASK_VIEW = ", ".join(TaskView.__dataclass_fields__)


@dataclass(frozen=True)
class TaskRecord(TaskView):
    """The whole task row: what the worker needs to spell a provider request, and callbacks to check one."""

    request: Mapping[str, Any]
    provider_state: Mapping[str, str]
    idempotency_key: str | None
    request_hash: str | None
    image_count: int | None
    submitted_at: float | None


# What a state change reads of the task it changes: the whole row but the request (a fallback hop
# reads the chain it needs from the request by itself).
TASK_STATE = ", ".join(name for name in TaskRecord.__dataclass_fields__ if name != "request")


@dataclass(frozen=True)
class ImageRecord:
    task_id: str
    idx: int
    source_url: str
    path: str | None  # None until the image is stored
    content_type: str | None
    size: int | None
    sha256: str | None
    width: int | None
    height: int | None
    stored_at: float | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ImageRecord:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class DownloadTarget:
    """An image row with its task's status: the download job's first question, in one read."""

    image: ImageRecord
    status: Status


@dataclass(frozen=True)
class EventRecord:
    id: int
    task_id: str
    at: float
    kind: str
    verified: bool
    summary: str
    change: str | None
    detail: str | None
    repeats: int | None  # refused callbacks in a row are one event that counts them

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> EventRecord:
        values = {name: row[name] for name in cls.__dataclass_fields__}
        return cls(**{**values, "verified": bool(values["verified"])})


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    task_id: str
    arg: int
    attempts: int

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        return cls(int(row["id"]), row["kind"], row["task_id"], int(row["arg"]), int(row["attempts"]))


@dataclass(frozen=True)
class Claimed:
    """One turn of the worker: the jobs it now holds, and what it needs to plan the next turn."""

    jobs: list[Job]
    next_due: float | None
    in_flight: dict[tuple[str, str], int]
    applied: list[tuple[str, str, str]]  # (task, provider, changed|duplicate|pending|ignored) per inbox row
    more_news: bool  # claim again at once: the inbox holds more, or a row failed and is to be tried again
    paces: dict[str, Pace] = field(default_factory=dict)  # pace group -> its shared state


@dataclass(frozen=True)
class Pace:
    """A pace group as every worker process sees it (wall-clock times)."""

    held_until: float
    holds: int  # 429 holds so far: a higher count than last seen is a hold another process met
    sends: list[float]  # when the oldest submits in the group's window were sent, oldest first
    count: int = 0  # submits in the window in all: `sends` and as many more, each no later than `newest`
    newest: float = 0.0


@dataclass(frozen=True)
class Ended:
    """A task that reached succeeded or failed, for its one log line once the change is committed."""

    task_id: str
    provider: str
    status: Status
    error: TaskError | None
    seconds: float  # from creation to the end
    tenant: str = ""
    cost_usd: float | None = None  # what it cost, once known (receiver_spend_usd_total)


@dataclass(frozen=True)
class NewTask:
    id: str
    tenant: str
    provider: str
    model: str
    prompt: str
    request: Mapping[str, Any]
    provider_state: Mapping[str, str]
    metadata: Mapping[str, Any]
    notify_url: str | None
    idempotency_key: str | None
    request_hash: str
    estimate_usd: float | None = None  # by the price table; None: no price known
    # `auto` routing sent it to a provider whose cooldown has run out: it is the probe that decides
    # (its creation takes the probe, so other tasks keep away until it has ended or timed out).
    probe: bool = False
    routing: str = ""  # how `auto` chose, for the task's first event
    # The database key that creates the task (None for a RECEIVER_API_KEYS key): its budget is checked in
    # the same transaction as the insert, and `estimate_usd` is what counts.
    key: KeyRecord | None = None


@dataclass(frozen=True)
class Health:
    """A provider's health for `auto` routing, shared by every replica: failures in a row, and the end of
    its cooldown (0: none)."""

    provider: str
    consecutive_failures: int
    cooldown_until: float


@dataclass(frozen=True)
class KeyRecord:
    """A key kept in the database (the admin API), without its hash."""

    id: str
    tenant: str
    name: str
    budget_usd: float | None
    budget_period: str | None  # "day", "month" (calendar, UTC) or None: a lifetime budget
    rate_per_minute: int | None
    disabled: bool
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> KeyRecord:
        values = {name: row[name] for name in cls.__dataclass_fields__}
        values["disabled"] = bool(values["disabled"])
        values["budget_usd"] = None if values["budget_usd"] is None else float(values["budget_usd"])
        values["rate_per_minute"] = (
            None if values["rate_per_minute"] is None else int(values["rate_per_minute"])
        )
        return cls(**values)


KEY_COLUMNS = ", ".join(KeyRecord.__dataclass_fields__)


class BudgetExceeded(Exception):
    """A create would take its key past its budget: nothing was recorded."""

    def __init__(self, remaining_usd: float) -> None:
        super().__init__(f"{remaining_usd:.4f} USD left")
        self.remaining_usd = remaining_usd
