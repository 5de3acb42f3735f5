"""The vocabulary shared by the shell and the providers: statuses, errors, outcomes."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from enum import StrEnum
from typing import Any
from typing import Literal

from receiver.untrusted import storable


class Status(StrEnum):
    QUEUED = "queued"
    SUBMITTED = "submitted"
    DOWNLOADING = "downloading"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def rank(self) -> int:
        return _RANK[self]

    @property
    def terminal(self) -> bool:
        return self in (Status.SUCCEEDED, Status.FAILED)

    def may_become(self, new: Status) -> bool:
        """State moves forward only; an ended task never changes again."""
        return not self.terminal and new.rank > self.rank


_RANK = {
    Status.QUEUED: 0,
    Status.SUBMITTED: 1,
    Status.DOWNLOADING: 2,
    Status.SUCCEEDED: 3,
    Status.FAILED: 3,
}


class ErrorCode(StrEnum):
    PROVIDER_REJECTED = "provider_rejected"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    GENERATION_FAILED = "generation_failed"
    CONTENT_MODERATED = "content_moderated"
    DOWNLOAD_FAILED = "download_failed"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True)
class TaskError:
    code: ErrorCode
    message: str
    provider_code: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"code": str(self.code), "message": self.message, "provider_code": self.provider_code}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskError:
        return cls(ErrorCode(data["code"]), data["message"], data.get("provider_code"))

    def storable(self) -> TaskError:
        """This error with its text from outside as a database can keep it (see receiver.untrusted)."""
        code = None if self.provider_code is None else storable(self.provider_code)
        return TaskError(self.code, storable(self.message), code)


# provider_code of a submit whose outcome is unknown (it may have run and been billed): such a task is
# never sent again, to this provider or to a fallback.
OUTCOME_UNKNOWN = "outcome_unknown"
# Refusals that are not the request's fault, by provider_code (HTTP status or kie's body code): the
# account, not the request, is the problem, so another provider may take the task (CONTRACT.md).
ACCOUNT_REFUSALS = {
    "401": "bad_key",
    "403": "bad_key",
    "402": "no_credits",
    "433": "no_credits",  # kie: a sub-key's usage limit
    "455": "maintenance",  # kie
    "505": "maintenance",  # kie: the feature is switched off
}
MAX_FALLBACKS = 4


def fallback_reason(error: TaskError) -> str | None:
    """Why a task with this error may move to its next fallback provider, or None when it must end:
    refusals of the account (no credits, bad key, maintenance), a provider unavailable after its
    retries, and generation failures move on; moderation, request errors, downloads, the deadline and
    a submit that may have run end the task."""
    if error.code is ErrorCode.GENERATION_FAILED:
        return "generation_failed"
    if error.code is ErrorCode.PROVIDER_UNAVAILABLE:
        return None if error.provider_code == OUTCOME_UNKNOWN else "unavailable"
    if error.code is ErrorCode.PROVIDER_REJECTED:
        return ACCOUNT_REFUSALS.get(error.provider_code or "")
    return None


@dataclass(frozen=True)
class Outcome:
    """What a callback or a status answer says about a task, in the provider's terms normalised.

    `pending` changes nothing; `succeeded` carries the result links in order; `failed` carries the error.
    """

    state: Literal["pending", "succeeded", "failed"]
    provider_task_id: str | None = None
    image_urls: tuple[str, ...] = ()
    error: TaskError | None = None
    detail: str = ""
    # Which provider said it (set by the shell where news arrives): news from a provider the task has
    # since left is recorded and changes nothing.
    provider: str = ""
    # pending only: the news is that the result is ready to be fetched from the provider's status
    # endpoint (e.g. fal's payload_error), so reconcile should ask now rather than when it falls due.
    ask_now: bool = False
    # What the provider says it charged for the task, in USD, where it says so (e.g. apimart's `cost`).
    charge_usd: float | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "state": self.state,
                "provider_task_id": self.provider_task_id,
                "image_urls": list(self.image_urls),
                "error": self.error.as_json() if self.error else None,
                "detail": self.detail,
                "provider": self.provider,
                "ask_now": self.ask_now,
                "charge_usd": self.charge_usd,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Outcome:
        data = json.loads(text)
        error = data["error"]
        return cls(
            state=data["state"],
            provider_task_id=data["provider_task_id"],
            image_urls=tuple(data["image_urls"]),
            error=TaskError.from_json(error) if error else None,
            detail=data["detail"],
            provider=data.get("provider", ""),
            ask_now=bool(data.get("ask_now", False)),
            charge_usd=data.get("charge_usd"),
        )

    @classmethod
    def pending(cls, provider_task_id: str | None, detail: str = "", *, ask_now: bool = False) -> Outcome:
        return cls("pending", provider_task_id, detail=detail, ask_now=ask_now)

    @classmethod
    def succeeded(cls, provider_task_id: str | None, urls: tuple[str, ...], detail: str = "") -> Outcome:
        if not urls:
            return cls.failed(
                provider_task_id,
                TaskError(ErrorCode.GENERATION_FAILED, "the provider reported success but sent no image"),
                detail,
            )
        return cls("succeeded", provider_task_id, image_urls=urls, detail=detail)

    @classmethod
    def failed(cls, provider_task_id: str | None, error: TaskError, detail: str = "") -> Outcome:
        return cls("failed", provider_task_id, error=error, detail=detail)

    def storable(self) -> Outcome:
        """This news with its text from outside as a database can keep it (see receiver.untrusted)."""
        return replace(
            self,
            provider_task_id=None if self.provider_task_id is None else storable(self.provider_task_id),
            image_urls=tuple(storable(url) for url in self.image_urls),
            error=None if self.error is None else self.error.storable(),
            detail=storable(self.detail),
        )


@dataclass(frozen=True)
class Submission:
    """A provider's answer to a submit: its task id, what to keep for later, or the result itself."""

    provider_task_id: str | None
    state: Mapping[str, str] = field(default_factory=dict)
    outcome: Outcome | None = None
    note: str = ""  # what the submit event says, when it is not a plain acceptance


class ProviderRejected(Exception):
    """The provider refused the request for good (auth, credits, validation)."""

    def __init__(self, message: str, provider_code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.provider_code = provider_code


class ProviderUnavailable(Exception):
    """A failure worth retrying later (network, 429, 5xx, maintenance)."""

    def __init__(
        self,
        message: str,
        retry_after: float | None = None,
        *,
        rate_limited: bool = False,
        maybe_ran: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.rate_limited = rate_limited  # a 429: the whole provider is held back, not just this task
        # The request reached the provider and may have run (and been billed): never blindly sent again.
        self.maybe_ran = maybe_ran


class CallbackRejected(Exception):
    """A callback whose signature is missing, stale or wrong: answered 401, changes nothing."""


class MalformedCallback(Exception):
    """A verified callback whose body is not the provider's JSON: answered 400, changes nothing."""


# Optional request fields a provider may honour; the shell rejects the others with a 422.
OPTIONAL_FIELDS = (
    "model",
    "images",
    "aspect_ratio",
    "output_format",
    "seed",
    "safety_tolerance",
    "prompt_upsampling",
    "resolution",
    "num_images",
    "options",
)


@dataclass(frozen=True)
class TaskRequest:
    """A create request after type checks; `params` holds only the optional fields that were given."""

    provider: str
    prompt: str
    model: str | None
    images: tuple[str, ...]
    params: Mapping[str, Any]
    options: Mapping[str, Any]
    notify_url: str | None
    metadata: Mapping[str, Any]
    # (width, height) of each input image where the shell could read it (a data URI, our own upload),
    # else None: a provider whose output does not follow its input may need the input's ratio.
    image_sizes: tuple[tuple[int, int] | None, ...] = ()

    def given(self) -> set[str]:
        """The optional fields this request sets (what a provider must be able to honour)."""
        named = {"model": self.model is not None, "images": bool(self.images), "options": bool(self.options)}
        return {name for name, set_ in named.items() if set_} | set(self.params)


@dataclass(frozen=True)
class TaskSpec:
    """What a provider sees of a task when it spells a request."""

    id: str
    model: str
    prompt: str
    images: tuple[str, ...]  # URLs, or data URIs for providers that take images inline
    params: Mapping[str, Any]
    options: Mapping[str, Any]
    provider_task_id: str | None
    state: Mapping[str, str]
    image_sizes: tuple[tuple[int, int] | None, ...] = ()  # as in TaskRequest
