"""The seam every provider fills: a pure translator between our tasks and its wire format.

A provider module does no I/O. It spells requests as `httpx.Request` objects, reads `httpx.Response`
objects and raw callback bytes, and answers in the shared vocabulary of `receiver.models`. The shell
sends, stores and retries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import ClassVar

import httpx

from receiver.models import MalformedCallback
from receiver.models import Outcome
from receiver.models import ProviderRejected
from receiver.models import ProviderUnavailable
from receiver.models import Submission
from receiver.models import TaskRequest
from receiver.models import TaskSpec
from receiver.untrusted import UnreadableJson
from receiver.untrusted import read_object
from receiver.variables import ProviderSettings
from receiver.variables import ProviderVariables


@dataclass(frozen=True)
class Context:
    """What the shell hands a provider: its settings, our callback URL and, if it asked, its key set."""

    settings: ProviderSettings
    callback_url: str = ""
    keys: Any = None


# One model vocabulary (CONTRACT.md, "Models, fallback and limits"): each name means the same model on
# every provider that sells it; each provider maps it to its own id, text-to-image or editing by whether
# images are given.
KONTEXT_MODELS = ("flux-kontext-pro", "flux-kontext-max")
FLUX2_MODELS = ("flux-2-pro", "flux-2-flex")
SHARED_MODELS = (*KONTEXT_MODELS, *FLUX2_MODELS)


@dataclass(frozen=True)
class Span:
    """A numeric range a field or an option takes, both ends included."""

    low: float
    high: float
    whole: bool = True  # only whole numbers

    def holds(self, value: Any) -> bool:
        kinds = int if self.whole else int | float
        return isinstance(value, kinds) and not isinstance(value, bool) and self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.low:g} to {self.high:g}"

    def as_json(self) -> dict[str, Any]:
        return {"min": self.low, "max": self.high, "whole": self.whole}


@dataclass(frozen=True)
class Takes:
    """What one model takes at one provider: the table `validate` checks a request against and
    GET /v1/providers shows, so what is documented is what is enforced. Empty means "not limited here"
    (the field may still be refused by `fields`, or checked by the provider's own rules)."""

    fields: frozenset[str]
    aspect_ratios: tuple[str, ...] = ()
    edit_ratios: tuple[str, ...] = ()  # values that mean "like the input image": only with images
    resolutions: tuple[str, ...] = ()
    output_formats: tuple[str, ...] = ()
    safety_tolerance: Span | None = None
    edit_safety_tolerance: Span | None = None  # when it differs with input images
    num_images: Span = Span(1, 1)
    options: Mapping[str, Span] = field(default_factory=dict)  # native options with checked values
    refused_options: Mapping[str, str] = field(default_factory=dict)  # native options refused, and why
    who: str = ""  # who takes it, in error messages: the provider's name unless the model differs

    def as_json(self) -> dict[str, Any]:
        safety = self.safety_tolerance
        return {
            "fields": sorted(self.fields),
            "aspect_ratios": list(self.aspect_ratios) or None,
            "edit_aspect_ratios": list(self.edit_ratios),
            "resolutions": list(self.resolutions) or None,
            "output_formats": list(self.output_formats) or None,
            "safety_tolerance": safety.as_json() if safety and "safety_tolerance" in self.fields else None,
            "edit_safety_tolerance": self.edit_safety_tolerance.as_json()
            if self.edit_safety_tolerance
            else None,
            "num_images": self.num_images.as_json(),
            "options": {name: span.as_json() for name, span in self.options.items()},
        }


def value_problems(takes: Takes, request: TaskRequest) -> dict[str, str]:
    """The request's values that `takes` does not list, each named with what is taken instead."""
    who = takes.who or "this provider"
    errors: dict[str, str] = {}
    params = request.params
    ratio = params.get("aspect_ratio")
    if ratio is not None and takes.aspect_ratios and ratio not in (*takes.aspect_ratios, *takes.edit_ratios):
        listed = ", ".join((*takes.aspect_ratios, *takes.edit_ratios))
        errors["aspect_ratio"] = f"{who} takes one of {listed}"
    elif ratio in takes.edit_ratios and not request.images:
        errors["aspect_ratio"] = (
            f"{ratio} follows the input image, and there is none: {who} takes one of "
            + (", ".join(takes.aspect_ratios))
        )
    for name, values in (("resolution", takes.resolutions), ("output_format", takes.output_formats)):
        if name in params and values and params[name] not in values:
            said = f"makes {values[0]} only" if len(values) == 1 else f"takes {' or '.join(values)}"
            errors[name] = f"{who} {said}"
    safety = takes.edit_safety_tolerance if request.images and takes.edit_safety_tolerance else None
    safety = safety or takes.safety_tolerance
    if "safety_tolerance" in params and safety is not None and not safety.holds(params["safety_tolerance"]):
        editing = " when editing" if request.images and takes.edit_safety_tolerance else ""
        errors["safety_tolerance"] = f"{who} takes {safety}{editing}"
    count = takes.num_images
    if not count.holds(params.get("num_images", 1)):
        many = "one image" if count.high == 1 else f"{count} images"
        errors["num_images"] = f"{who} makes {many} per task"
    for name, why in takes.refused_options.items():
        if name in request.options:
            errors[f"options.{name}"] = why
    for name, span in takes.options.items():
        if name in request.options and not span.holds(request.options[name]):
            kind = "a whole number" if span.whole else "a number"
            errors[f"options.{name}"] = f"{who} takes {kind} from {span}"
    return errors


class Provider:
    """Defaults for every provider; a provider module overrides what its API spells differently."""

    name: ClassVar[str]
    # Its environment variables, declared once (receiver/variables.py): receiver/config.py reads them,
    # the docs and `receiver config` list them.
    variables: ClassVar[ProviderVariables] = ProviderVariables()
    models: ClassVar[tuple[str, ...]] = ()  # the shared names it sells (SHARED_MODELS), or its own
    native_models: ClassVar[tuple[str, ...]] = ()  # its own ids, also taken as given
    default_model: ClassVar[str] = ""
    accepts_any_model: ClassVar[bool] = False  # other native ids too, checked by validate()
    native_hint: ClassVar[str] = ""  # how those other ids look, for listings and error messages
    fields: ClassVar[frozenset[str]] = frozenset()  # optional request fields it honours
    max_images: ClassVar[int] = 1
    # Images one task can make when it gives no num_images (apimart answers several URLs for one task;
    # fal and the sandbox take num_images up to 4): a callback naming more is refused.
    max_outputs: ClassVar[int] = 4
    min_images: ClassVar[int] = 0
    inline_images: ClassVar[bool] = False  # True: data URIs are sent inline, not as signed links
    early_download: ClassVar[bool] = False  # True: its result links die fast, fetch them before others
    # True: the submit answer may carry the result itself, so the whole generation happens inside that
    # one call; the shell gives it RECEIVER_SYNC_TIMEOUT instead of RECEIVER_HTTP_TIMEOUT.
    synchronous: ClassVar[bool] = False
    # Pacing defaults from the provider's documented limits; <NAME>_MAX_* variables override them.
    pace_group: ClassVar[str | None] = None  # providers sharing one account's limits share a group
    rate_limit: ClassVar[tuple[int, float] | None] = None  # (new tasks, per seconds)
    max_concurrent: ClassVar[int | None] = None
    max_concurrent_by_model: ClassVar[Mapping[str, int]] = {}

    @property
    def key_variable(self) -> str | None:
        """The variable that must be set to offer it (None: always offered)."""
        return self.variables.key.name if self.variables.key else None

    def takes(self, model: str) -> Takes:
        """What `model` takes here (a shared name or a native id): fields and their values."""
        return Takes(self.fields, who=self.name)

    def request_model(self, request: TaskRequest) -> str:
        return request.model or self.model_for(bool(request.images))

    def validate(self, request: TaskRequest) -> dict[str, str]:
        """Field errors for values this provider cannot take; the shell already checked types."""
        return value_problems(self.takes(self.request_model(request)), request)

    # -- models and inputs ---------------------------------------------------------------------------

    def model_for(self, has_images: bool) -> str:
        """The model a request without one gets."""
        return self.default_model

    def native_model(self, model: str, has_images: bool) -> str:
        """The provider's own id for `model`: a shared name translated (text-to-image or editing by
        `has_images`), a native id as given."""
        return model

    def image_range(self, model: str) -> tuple[int, int]:
        """How many input images `model` takes here."""
        return self.min_images, self.max_images

    def sells(self) -> str:
        """What it sells, for listings and for the 422 that names `model`."""
        listed = ", ".join((*self.models, *self.native_models))
        return f"{listed} or {self.native_hint}" if self.native_hint else listed

    def problems(self, request: TaskRequest) -> dict[str, str]:
        """The shape checks every provider shares: fields it does not take, a model it does not sell,
        an image count out of range. `validate` checks the values after these pass."""
        model = self.request_model(request)
        takes = self.takes(model)
        who = takes.who or self.name
        errors = {name: f"{who} does not take this field" for name in sorted(request.given() - takes.fields)}
        if model not in (*self.models, *self.native_models) and not self.accepts_any_model:
            errors["model"] = f"{self.name} sells {self.sells()}"
        elif "images" not in errors:
            least, most = self.image_range(model)
            if not least <= len(request.images) <= most:
                errors["images"] = f"{self.name} takes {least} to {most} images with {model}"
        return errors

    def refusals(self, request: TaskRequest) -> dict[str, str]:
        """Every reason this provider cannot honour `request`, the same checks the chosen provider gets;
        a fallback chain is validated whole with it before anything is sent."""
        return self.problems(request) or self.validate(request)

    def new_state(self) -> dict[str, str]:
        """Per-task values generated once at creation and kept secret (e.g. a webhook secret)."""
        return {}

    def build_submit(self, task: TaskSpec, ctx: Context) -> httpx.Request:
        raise NotImplementedError  # every provider defines it

    def parse_submit(self, response: httpx.Response) -> Submission:
        raise NotImplementedError  # every provider defines it

    def key_set_url(self, settings: ProviderSettings) -> str | None:
        """A URL of public keys the shell fetches and caches for `verify_callback`, if any."""
        return None

    def verify_callback(
        self, headers: Mapping[str, str], raw: bytes, task: TaskSpec, ctx: Context, now: float
    ) -> None:
        """Raise CallbackRejected unless the provider's own signature (if it has one) verifies."""

    def parse_callback(self, raw: bytes) -> Outcome:
        raise NotImplementedError  # every provider defines it

    def build_status(self, task: TaskSpec, ctx: Context) -> httpx.Request | None:
        """The status query reconcile sends, or None when there is nothing to ask yet."""
        return None

    def build_cancel(self, task: TaskSpec, ctx: Context) -> httpx.Request | None:
        """The request that asks the provider to stop a task it holds, or None where it offers no way
        (the task is then left to run there, unheeded)."""
        return None

    def parse_cancel(self, response: httpx.Response) -> str:
        """What the provider said to a cancel, in a few words for the task's events (raising
        ProviderUnavailable for an answer worth asking again)."""
        raise NotImplementedError  # every provider with build_cancel defines it

    def parse_status(self, response: httpx.Response) -> Outcome | httpx.Request:
        """What a status answer says, or the next request to send (e.g. fetch the result once it is
        complete). `response.request` tells which of its requests this answers."""
        raise NotImplementedError  # every provider with build_status defines it


def json_object(raw: bytes | str) -> dict[str, Any]:
    """A provider's JSON object (a callback body or an answer), read by the one reader of JSON from
    outside (receiver.untrusted): whatever could not be stored (a lone surrogate, NaN, nesting past
    32 levels, bytes that are not UTF-8) is MalformedCallback, as is anything but an object."""
    try:
        return read_object(raw)
    except UnreadableJson as exc:
        where = f" (in {exc.field})" if exc.field else ""
        raise MalformedCallback(f"body is not JSON we can take: {exc.message}{where}") from None


def response_json(response: httpx.Response) -> dict[str, Any]:
    """A provider answer's JSON object; anything else from a 2xx is treated as a passing fault."""
    try:
        return json_object(response.content)
    except MalformedCallback as exc:
        raise ProviderUnavailable(f"HTTP {response.status_code}, {exc}") from None


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


# Answers from the door, not from the work: rate limited, or a gateway that could not reach the backend.
NEVER_STARTED = frozenset({429, 502, 503, 504})


def raise_for_http_status(response: httpx.Response, message: str, *, synchronous: bool = False) -> None:
    """The HTTP-level rule shared by every provider: 408/429/5xx retry, other 4xx reject for good.

    A `synchronous` provider runs the generation inside the submit call, so a 408 or a 5xx other than
    NEVER_STARTED may come after the work (and the bill): it is reported as `maybe_ran`, never retried."""
    status = response.status_code
    if status < 400:
        return
    if status in (408, 425, 429) or status >= 500:
        limited = status == 429
        maybe_ran = synchronous and status not in NEVER_STARTED
        raise ProviderUnavailable(
            f"HTTP {status}: {message}", retry_after(response), rate_limited=limited, maybe_ran=maybe_ran
        )
    raise ProviderRejected(f"HTTP {status}: {message}", str(status))


def mapping(value: Any) -> Mapping[str, Any]:
    """`value` if it is a JSON object, else an empty one: providers omit or null their nested objects."""
    return value if isinstance(value, Mapping) else {}


MAX_CHARGE_USD = 1000.0  # a reported charge above this for one image task is not a charge we believe


def charge_usd(value: Any) -> float | None:
    """A charge a provider reports, in USD: a finite number from 0 to MAX_CHARGE_USD, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 <= value <= MAX_CHARGE_USD else None  # NaN fails both comparisons


def text(value: Any) -> str:
    return "" if value is None else str(value)


def present(value: Any) -> str:
    """`text(value)`, except that the string "null" (kie writes absent fields that way) is nothing."""
    spelled = text(value)
    return "" if spelled.strip().lower() == "null" else spelled


# Words with which a failure message says a content checker stopped the task, where the provider gives
# no machine-readable reason (kie-market's failMsg, apimart's error object, BFL's `Error` with a reason):
# English, and Chinese for apimart's language=zh messages.
MODERATION_WORDS = (
    "moderat",
    "content polic",
    "content_polic",
    "nsfw",
    "safety system",
    "safety filter",
    "flagged",
    "sensitive",
    "审核",
    "违规",
    "敏感",
)


def mentions_moderation(message: str) -> bool:
    lowered = message.lower()
    return any(word in lowered for word in MODERATION_WORDS)


def same_origin(url: str, base: str | httpx.URL) -> bool:
    """Whether `url` has the scheme, host and port of `base`: a provider-supplied URL we would send our
    API key to must stay on the operator's configured host. A `base` already parsed is not parsed again
    (a submit's URL carries our whole callback URL in its query: parsing it again costs more than
    the check itself)."""
    try:
        given = httpx.URL(url)
        trusted = base if isinstance(base, httpx.URL) else httpx.URL(base)
    except (httpx.InvalidURL, TypeError):
        return False
    default_ports = {"http": 80, "https": 443}
    given_origin = (given.scheme, given.host, given.port or default_ports.get(given.scheme))
    trusted_origin = (trusted.scheme, trusted.host, trusted.port or default_ports.get(trusted.scheme))
    return bool(given.host) and given_origin == trusted_origin


def bearer_request(method: str, url: str, api_key: str | None, **kwargs: Any) -> httpx.Request:
    """A request to a provider that takes `Authorization: Bearer <key>` (kie, apimart, apicore)."""
    return httpx.Request(method, url, headers={"Authorization": f"Bearer {api_key}"}, **kwargs)


__all__ = [
    "FLUX2_MODELS",
    "KONTEXT_MODELS",
    "SHARED_MODELS",
    "Context",
    "Provider",
    "ProviderRejected",
    "ProviderUnavailable",
    "Span",
    "Takes",
    "bearer_request",
    "charge_usd",
    "json_object",
    "mapping",
    "mentions_moderation",
    "present",
    "raise_for_http_status",
    "response_json",
    "retry_after",
    "same_origin",
    "text",
    "value_problems",
]
