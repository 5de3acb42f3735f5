"""The HTTP API's shapes, defined once as msgspec Structs.

Validation (`check`), serialisation (`ModelResponse`, `encode`) and the OpenAPI document's schemas
(`receiver.openapi`) all come from these classes, so what the service takes and answers and what it
documents cannot drift apart. Rules a type cannot say (a provider's own limits, URLs that must resolve
to public addresses, byte caps) stay in code beside the call that applies them.
"""

from __future__ import annotations

import base64
import enum
import functools
import re
import types
from collections.abc import Callable
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated
from typing import Any
from typing import ClassVar
from typing import Literal
from typing import TypeVar
from typing import Union
from typing import get_args
from typing import get_origin

import msgspec
from msgspec import Meta
from msgspec import Struct
from starlette.responses import Response

from receiver.downloads import MAX_URL
from receiver.models import MAX_FALLBACKS
from receiver.models import ErrorCode
from receiver.models import Status

MAX_PROMPT = 10_000
MAX_SEED = 2**64 - 1
MAX_WAIT = 60.0
PAGE_LIMIT = 50
MAX_PAGE_LIMIT = 200
EVENTS_PAGE = 100
MAX_EVENTS_PAGE = 500
MAX_NAMED_UNKNOWN = 20  # unknown fields named in one answer; a body of thousands gets a short one
NOT_BLANK = r"\S"
_PATTERNS_MEAN = {NOT_BLANK: "must not be empty or only whitespace"}  # each pattern validated, in words


class ProviderName(StrEnum):
    """The providers this service knows; GET /v1/providers says which this deployment offers."""

    APICORE = "apicore"
    APIMART = "apimart"
    FAL = "fal"
    KIE = "kie"
    KIE_MARKET = "kie-market"
    SANDBOX = "sandbox"


# What a create may name: a provider, or `auto` (the cheapest healthy provider that sells the shared
# model and can honour the request, the others its fallback chain; docs/keys.md).
ProviderChoice = StrEnum(  # type: ignore[misc]
    "ProviderChoice", {**{member.name: member.value for member in ProviderName}, "AUTO": "auto"}
)
AUTO = "auto"


class ImageType(StrEnum):
    """The image formats taken as uploads and input images, and stored as results."""

    PNG = "image/png"
    JPEG = "image/jpeg"
    WEBP = "image/webp"


IMAGE_TYPES = tuple(kind.value for kind in ImageType)

Timestamp = Annotated[
    str, Meta(extra_json_schema={"format": "date-time"}, examples=["2026-05-01T12:00:00.000Z"])
]
TASK_ID_PATTERN = r"^tsk_[0-9a-f]{24}$"
TaskId = Annotated[str, Meta(pattern=TASK_ID_PATTERN, examples=["tsk_5f0c6a1e9b2d4c7a8e3f1b2c"])]
Prompt = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_PROMPT,
        pattern=NOT_BLANK,
        description="what to make or change; not only whitespace",
        examples=["Put a donut next to the flour"],
    ),
]
# URLs are checked by downloads.url_problem (scheme, host, port, length), whose wording the API answers
# with; the document states the same rule as a pattern and a length.
_URL_RULE = {"pattern": r"^https?://", "maxLength": MAX_URL}
ImageRef = Annotated[
    str,
    Meta(
        description="an http(s) URL (from POST /v1/uploads, or any public one) or a data:image/…;base64 URI",
        examples=["https://images.example.org/kitchen.png"],
        extra_json_schema={"pattern": r"^(https?://|[Dd][Aa][Tt][Aa]:)"},
    ),
]
HttpUrl = Annotated[str, Meta(extra_json_schema={"format": "uri", **_URL_RULE})]
Seed = Annotated[int, Meta(ge=0, extra_json_schema={"maximum": MAX_SEED})]
# Any JSON object; said outright, since generators read a bare "type": "object" as "no properties".
JsonObject = Annotated[dict[str, Any], Meta(extra_json_schema={"additionalProperties": True})]
IdempotencyKey = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=255,
        description="the same key and body again returns the same task (200); "
        "the same key with another body is a 409. Keys are per tenant.",
        examples=["order-4711-hero-image"],
    ),
]


# -- requests ------------------------------------------------------------------------------------


class TaskCreate(Struct, kw_only=True, forbid_unknown_fields=True):
    """A generation or editing request. Optional fields a provider cannot honour are a 422 naming them;
    GET /v1/providers says which each provider takes. `null` is the same as leaving a field out."""

    provider: Annotated[
        ProviderChoice,
        Meta(
            description="a provider, or `auto`: the cheapest configured provider that sells the (shared)"
            " model and can honour the request, not in cooldown; the others follow as its fallback chain"
        ),
    ]
    prompt: Prompt
    model: Annotated[str, Meta(min_length=1, examples=["flux-kontext-pro"])] | None = None
    images: list[ImageRef] | None = None
    aspect_ratio: Annotated[str, Meta(examples=["16:9"])] | None = None
    output_format: Annotated[str, Meta(examples=["png"])] | None = None
    seed: Seed | None = None
    safety_tolerance: int | None = None
    prompt_upsampling: bool | None = None
    resolution: Annotated[str, Meta(examples=["1K"])] | None = None
    num_images: Annotated[int, Meta(ge=1)] | None = None
    options: (
        Annotated[JsonObject, Meta(description="provider-native fields, passed through; at most 16 KiB")]
        | None
    ) = None
    notify_url: (
        Annotated[
            HttpUrl,
            Meta(description="POSTed a signed notification when the task ends (see webhooks)"),
        ]
        | None
    ) = None
    metadata: (
        Annotated[JsonObject, Meta(description="echoed back in the task; at most 16 KiB of JSON")] | None
    ) = None
    fallback: (
        Annotated[
            list[ProviderName],
            Meta(
                max_length=MAX_FALLBACKS,
                description="providers to move on to, in order, when the current one cannot do the task "
                "for a reason that is not the request's fault; each configured and able to honour it",
                examples=[["fal", "apimart"]],
            ),
        ]
        | None
    ) = None


class CreateHeaders(Struct, kw_only=True):
    idempotency_key: IdempotencyKey | None = msgspec.field(default=None, name="Idempotency-Key")


Cursor = Annotated[str, Meta(min_length=1, description="next_cursor of the page before")]


def encode_cursor(kind: str, position: int) -> str:
    """An opaque next_cursor: the position after which the next page starts, and what it counts."""
    return base64.urlsafe_b64encode(f"{kind}:{position}".encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str) -> int | None:
    """The position in a cursor this service gave for `kind`; None for anything else."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    number = text.removeprefix(f"{kind}:")
    if number == text or not number.isascii() or not number.isdigit() or len(number) > 18:
        return None
    return int(number)


class ListQuery(Struct, kw_only=True):
    """GET /v1/tasks's query. An empty value is refused like any other value outside the schema."""

    CURSOR: ClassVar[str] = "seq"  # a task's place in the list, newest first
    status: Status | None = None
    provider: ProviderName | None = None
    limit: Annotated[int, Meta(ge=1, le=MAX_PAGE_LIMIT)] = PAGE_LIMIT
    cursor: Cursor | None = None


class EventsQuery(Struct, kw_only=True):
    """GET /v1/tasks/{id}/events's query: oldest first, a page at a time."""

    CURSOR: ClassVar[str] = "evt"  # an event's id
    limit: Annotated[int, Meta(ge=1, le=MAX_EVENTS_PAGE)] = EVENTS_PAGE
    cursor: Cursor | None = None


class WaitQuery(Struct, kw_only=True):
    wait: (
        Annotated[
            float,
            Meta(ge=0, le=MAX_WAIT, description="seconds to hold the answer until the task ends"),
        ]
        | None
    ) = None


class LinkQuery(Struct, kw_only=True):
    """The query of a signed link, as `url` in an image or an upload carries it."""

    expires: int | None = None
    signature: str | None = None


# -- responses -----------------------------------------------------------------------------------


class ErrorDetail(Struct, omit_defaults=True):
    code: Annotated[str, Meta(examples=["invalid"])]
    message: str
    fields: Annotated[
        dict[str, str],
        Meta(description="each offending request field (or header, or query parameter) and what is wrong"),
    ]
    remaining_usd: (
        Annotated[float, Meta(description="with budget_exceeded: what is left of the key's budget, in USD")]
        | None
    ) = None


class ErrorBody(Struct):
    error: ErrorDetail


class Image(Struct):
    index: int
    url: Annotated[str, Meta(description="signed, expiring link to the stored bytes")]
    content_type: ImageType
    size: int
    sha256: str
    width: int | None
    height: int | None
    source_url: Annotated[str, Meta(description="the provider's link the image was fetched from")]


class TaskFailure(Struct):
    code: ErrorCode
    message: str
    provider_code: str | None


class Attempt(Struct):
    """A provider the task left for the next one in its fallback chain, with the error it ended with."""

    provider: ProviderName
    model: str
    provider_task_id: str | None
    error: TaskFailure
    at: Timestamp


class Cost(Struct):
    """What an ended task cost: the provider's own report of the charge where it gives one, else the
    price table's (docs: Keys, spend and routing)."""

    usd: Annotated[float, Meta(ge=0, examples=[0.04])]
    source: Annotated[
        Literal["price", "provider"], Meta(description="the price table, or the provider's report")
    ]


class Task(Struct):
    id: TaskId
    status: Status
    provider: ProviderName
    model: str
    prompt: str
    provider_task_id: Annotated[str | None, Meta(description="null where the provider gives none")]
    images: list[Image]
    error: TaskFailure | None
    fallback: Annotated[list[ProviderName], Meta(description="the providers still ahead, in order")]
    attempts: Annotated[list[Attempt], Meta(description="each provider tried before, in order")]
    metadata: JsonObject
    created_at: Timestamp
    updated_at: Timestamp
    completed_at: Annotated[Timestamp | None, Meta(description="set when the task ends, either way")]
    cost: Annotated[
        Cost | None,
        Meta(
            description="null until the task ends, and for a model with no known price; 0 for a task that"
            " failed before the provider ran it"
        ),
    ]


class TaskPage(Struct):
    items: list[Task]
    next_cursor: Annotated[str | None, Meta(description="pass as cursor for the next page; null at the end")]


class Event(Struct):
    id: int
    at: Timestamp
    kind: Annotated[str, Meta(examples=["created", "submit", "callback", "poll", "download", "notify"])]
    verified: bool
    summary: str
    change: Annotated[str | None, Meta(description="the status it moved the task to, if any")]
    detail: Annotated[
        str | None, Meta(description="what came back beyond the summary, e.g. the start of an app's answer")
    ]
    repeats: Annotated[int, Meta(ge=1, description="refused callbacks in a row are one event")]


class EventPage(Struct):
    items: list[Event]
    next_cursor: Annotated[str | None, Meta(description="pass as cursor for the next page; null at the end")]


class Upload(Struct):
    url: Annotated[str, Meta(description="signed link, for use in a task's images")]
    sha256: str
    content_type: ImageType
    size: int


class ModelInputs(Struct):
    min_images: int
    max_images: int
    text_to_image: Annotated[str | None, Meta(description="the provider's id used without images")]
    edit: Annotated[str | None, Meta(description="the provider's id used with images")]


class NumberRange(Struct):
    min: float
    max: float
    whole: Annotated[bool, Meta(description="only whole numbers")]


class ModelTakes(Struct):
    """What one model takes at this provider: the table each request is checked against. null: not
    limited to a list here (or, for safety_tolerance, not taken)."""

    fields: Annotated[list[str], Meta(description="the optional request fields this model honours")]
    aspect_ratios: list[str] | None
    edit_aspect_ratios: Annotated[
        list[str],
        Meta(description="further aspect_ratio values that follow the input image: only with images"),
    ]
    resolutions: list[str] | None
    output_formats: list[str] | None
    safety_tolerance: NumberRange | None
    edit_safety_tolerance: Annotated[
        NumberRange | None, Meta(description="the range with input images, where it differs")
    ]
    num_images: NumberRange
    options: Annotated[
        dict[str, NumberRange], Meta(description="provider-native options whose values are checked")
    ]


class ProviderLimits(Struct):
    """What the receiver paces the provider by: its documented defaults, or the <NAME>_MAX_* overrides."""

    max_concurrent: int | None
    max_concurrent_by_model: dict[str, int]
    new_tasks_per_window: int | None
    window_seconds: float | None
    shared_with: Annotated[list[str], Meta(description="providers paced together with it (one account)")]


class ModelPrice(Struct, omit_defaults=True):
    """One model's price at a provider, in USD (RECEIVER_PRICES, else the built-in table)."""

    source: Annotated[str | None, Meta(description="where the price was read")]
    taken: Annotated[str | None, Meta(description="when (YYYY-MM-DD)")]
    verified: Annotated[bool, Meta(description="false: from a secondary source, not the provider's own page")]
    per_image: float | None = None
    per_megapixel: Annotated[float | None, Meta(description="each megapixel of input and output")] = None
    first_megapixel: Annotated[float | None, Meta(description="the first megapixel, where it differs")] = None
    per_resolution: Annotated[dict[str, float] | None, Meta(description="by `resolution`")] = None


class ProviderInfo(Struct):
    name: ProviderName
    models: list[str]
    default_model: str
    accepts_any_model: Annotated[bool, Meta(description="other model ids are taken too")]
    fields: Annotated[list[str], Meta(description="the optional request fields it honours")]
    min_images: int
    max_images: int
    native_models: Annotated[list[str], Meta(description="the provider's own ids, also taken as given")]
    other_models: Annotated[
        str | None, Meta(description="how other native ids it takes look (accepts_any_model)")
    ]
    model_inputs: Annotated[
        dict[str, ModelInputs],
        Meta(description="per model: image count; the provider's id without and with images"),
    ]
    takes: Annotated[
        dict[str, ModelTakes],
        Meta(description="per model: the fields and values it takes, as requests are checked"),
    ]
    data_uris: Literal["sent inline", "sent as signed links"]
    synchronous: Annotated[bool, Meta(description="generates inside the submit call")]
    limits: ProviderLimits
    prices: Annotated[
        dict[str, ModelPrice], Meta(description="per model with a known price; a model not listed has none")
    ]
    cooldown_until: Annotated[
        Timestamp | None,
        Meta(description="while set, `auto` routing skips it (provider-side failures in a row)"),
    ]


class ProviderList(Struct):
    items: list[ProviderInfo]


class Health(Struct):
    status: Literal["ok"]


class Readiness(Struct, omit_defaults=True):
    status: Literal["ready", "unavailable"]
    problems: list[str] = []


class Notification(Struct):
    """POSTed to a task's notify_url when it ends, signed the Standard Webhooks way."""

    type: Literal["task.succeeded", "task.failed"]
    timestamp: Timestamp
    data: Task


# -- keys and usage (the admin API, /v1/usage) ---------------------------------------------------

TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
KEY_ID_PATTERN = r"^key_[0-9a-f]{16}$"
Tenant = Annotated[
    str,
    Meta(pattern=TENANT_PATTERN, description="letters, digits, `_`, `.`, `-`; 64 at most", examples=["acme"]),
]
KeyName = Annotated[str, Meta(max_length=200, description="what the key is for, for people")]
BudgetUsd = Annotated[float, Meta(ge=0, le=1e9, description="USD the key may spend in its period")]
BudgetPeriod = Literal["day", "month"]
RatePerMinute = Annotated[
    int, Meta(ge=1, le=1_000_000, description="creates per minute, on every replica together")
]


class KeyCreate(Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/admin/keys: a key for `tenant`; a budget without a period is a lifetime budget."""

    tenant: Tenant
    name: KeyName = ""
    budget_usd: BudgetUsd | None = None
    budget_period: BudgetPeriod | None = None
    rate_per_minute: RatePerMinute | None = None


class KeyChange(Struct, kw_only=True, forbid_unknown_fields=True):
    """PATCH /v1/admin/keys/{id}: the fields given change (null clears a budget, a period or a rate)."""

    name: KeyName | msgspec.UnsetType = msgspec.UNSET
    budget_usd: BudgetUsd | msgspec.UnsetType | None = msgspec.UNSET
    budget_period: BudgetPeriod | msgspec.UnsetType | None = msgspec.UNSET
    rate_per_minute: RatePerMinute | msgspec.UnsetType | None = msgspec.UNSET
    disabled: bool | msgspec.UnsetType = msgspec.UNSET


class ApiKey(Struct, kw_only=True):
    """A key kept in the database, as the admin API lists it: never its secret."""

    id: Annotated[str, Meta(pattern=KEY_ID_PATTERN, examples=["key_3f9a1c0b7d2e4f68"])]
    tenant: str
    name: str
    budget_usd: float | None
    budget_period: BudgetPeriod | None
    rate_per_minute: int | None
    disabled: bool
    created_at: Timestamp
    updated_at: Timestamp


class NewApiKey(ApiKey, kw_only=True):
    """A key just created: the only answer that carries its secret."""

    key: Annotated[str, Meta(description="the secret, shown this once (only its hash is kept)")]


class KeyList(Struct):
    keys: list[ApiKey]


UsageFrom = Annotated[str, Meta(description="start, inclusive (default: the first of this month, UTC)")]
UsageTo = Annotated[str, Meta(description="end, exclusive (default: now)")]


class UsageQuery(Struct, kw_only=True):
    """GET /v1/usage's query: tasks created in [from, to), RFC 3339 dates or times (UTC when no zone)."""

    from_: UsageFrom | None = msgspec.field(default=None, name="from")
    to: UsageTo | None = None
    group_by: Literal["provider", "model", "day"] | None = None


class AdminUsageQuery(Struct, kw_only=True):
    """GET /v1/admin/usage's query: /v1/usage's for one tenant, or for all (grouped by tenant, if asked)."""

    from_: UsageFrom | None = msgspec.field(default=None, name="from")
    to: UsageTo | None = None
    group_by: Literal["provider", "model", "day", "tenant"] | None = None
    tenant: Annotated[Tenant, Meta(description="one tenant's (default: every tenant's)")] | None = None


class UsageGroup(Struct):
    group: str
    tasks: int
    usd: float


class Usage(Struct):
    """Tasks created in [from, to) and what they cost; a task still running counts by its estimate."""

    from_: Timestamp = msgspec.field(name="from")
    to: Timestamp
    tasks: int
    usd: float
    groups: list[UsageGroup]


# -- validation and serialisation ----------------------------------------------------------------

_encoder = msgspec.json.Encoder()
_AT = re.compile(r" - at `\$(.*)`$")
S = TypeVar("S", bound=Struct)


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


class ModelResponse(Response):
    """JSON from a Struct (or plain data), encoded by msgspec."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return encode(content)


def _choices(kind: Any) -> list[str]:
    """The values an enum or Literal field (optional or not) allows; empty for other types."""
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return [str(member.value) for member in kind]
    if get_origin(kind) is Literal:
        return [str(value) for value in get_args(kind)]
    if get_origin(kind) is Annotated:
        return _choices(get_args(kind)[0])
    if get_origin(kind) in (Union, types.UnionType, list):
        return [value for part in get_args(kind) for value in _choices(part)]
    return []


@functools.cache
def _fields(model: type[Struct]) -> tuple[msgspec.structs.FieldInfo, ...]:
    """A Struct's fields, read once: msgspec resolves the annotations anew on every call."""
    return msgspec.structs.fields(model)


def check(data: Mapping[str, Any], model: type[S], *, strict: bool = True) -> tuple[S | None, dict[str, str]]:
    """`data` as a `model`, or every offending field named with what is wrong with it.

    Each field is checked on its own so that all of them are named at once (msgspec stops at the first);
    an error inside a field names the part (`images[1]`). `strict=False` is for query strings, whose
    values are all text (`limit=5` is a number).
    """
    fields = _fields(model)
    given = {field.encode_name: data[field.encode_name] for field in fields if field.encode_name in data}
    errors: dict[str, str] = {}
    if model.__struct_config__.forbid_unknown_fields and len(given) < len(data):
        unknown = [name for name in data if name not in given][:MAX_NAMED_UNKNOWN]
        errors.update({name: "unknown field" for name in unknown})
    else:
        try:  # the common case, a valid request, in one step
            return msgspec.convert(given, model, strict=strict), {}
        except msgspec.ValidationError:
            pass
    for field in fields:
        if field.encode_name not in given:
            if field.required:
                errors[field.encode_name] = "required"
            continue
        try:
            msgspec.convert(given[field.encode_name], field.type, strict=strict)
        except msgspec.ValidationError as exc:
            errors.update([_named(field, str(exc))])
    return None, errors


def _named(field: msgspec.structs.FieldInfo, message: str) -> tuple[str, str]:
    """msgspec's message about one field as (the field or the part of it at fault, what is wrong),
    in the API's words: "must be a whole number", "at most 4 items", "unknown provider; one of …"."""
    at = _AT.search(message)
    name = field.encode_name + (at.group(1) if at else "")
    message = message[: at.start()] if at else message
    choices = _choices(field.type)
    if choices and message.startswith("Invalid enum value"):
        unknown = "unknown provider; " if ProviderName.SANDBOX.value in choices else ""
        return name, f"{unknown}one of {', '.join(choices)}"
    for pattern, words in _MESSAGES:
        found = pattern.fullmatch(message)
        if found:
            message = words(found)
            break
    return name, message


_NOUNS = {
    "str": "a string",
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "array": "a list",
    "object": "an object",
}
_MESSAGES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (
        re.compile(r"Expected `(\w+)(?: \| null)?`, got `\w+`"),
        lambda m: f"must be {_NOUNS.get(m.group(1), m.group(1))}",
    ),
    (re.compile(r"Expected `str` of length >= 1"), lambda m: "must not be empty"),
    (re.compile(r"Expected `str` of length <= (\d+)"), lambda m: f"at most {m.group(1)} characters"),
    (re.compile(r"Expected `array` of length <= (\d+)"), lambda m: f"at most {m.group(1)} items"),
    (re.compile(r"Expected `(?:int|float)` >= (\S+)"), lambda m: f"must be at least {m.group(1)}"),
    (re.compile(r"Expected `(?:int|float)` <= (\S+)"), lambda m: f"must be at most {m.group(1)}"),
    (
        re.compile(r"Expected `str` matching regex '(.*)'"),
        lambda m: _PATTERNS_MEAN.get(m.group(1).replace("\\\\", "\\"), m.group(0)),
    ),
]
