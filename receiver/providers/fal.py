"""fal.ai queue API, FLUX.1 Kontext [pro|max] (providers.md §5), with Ed25519-signed webhooks (§5.3)."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import math
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from receiver.models import OPTIONAL_FIELDS
from receiver.models import CallbackRejected
from receiver.models import ErrorCode
from receiver.models import MalformedCallback
from receiver.models import Outcome
from receiver.models import ProviderRejected
from receiver.models import Submission
from receiver.models import TaskError
from receiver.models import TaskRequest
from receiver.models import TaskSpec
from receiver.providers.base import FLUX2_MODELS
from receiver.providers.base import KONTEXT_MODELS
from receiver.providers.base import Context
from receiver.providers.base import Provider
from receiver.providers.base import Span
from receiver.providers.base import Takes
from receiver.providers.base import json_object
from receiver.providers.base import mapping
from receiver.providers.base import raise_for_http_status
from receiver.providers.base import response_json
from receiver.providers.base import same_origin
from receiver.providers.base import text
from receiver.variables import Plain
from receiver.variables import ProviderSettings
from receiver.variables import ProviderVariables
from receiver.variables import Url
from receiver.variables import Variable

# Shared model names → (text-to-image endpoint, editing endpoint). Kontext edits take one `image_url`;
# FLUX 2 edits take `image_urls`, a list (fal's FLUX 2 model pages).
MODEL_ENDPOINTS = {
    "flux-kontext-pro": ("fal-ai/flux-pro/kontext/text-to-image", "fal-ai/flux-pro/kontext"),
    "flux-kontext-max": ("fal-ai/flux-pro/kontext/max/text-to-image", "fal-ai/flux-pro/kontext/max"),
    "flux-2-pro": ("fal-ai/flux-2-pro", "fal-ai/flux-2-pro/edit"),
    "flux-2-flex": ("fal-ai/flux-2-flex", "fal-ai/flux-2-flex/edit"),
}
# Endpoints whose input images go in `image_urls` (a list) rather than `image_url`.
LIST_IMAGE_ENDPOINTS = re.compile(r".*/(multi|edit)$")
# FLUX 2 takes up to 8 reference images at BFL (Flux2Inputs: input_image … input_image_8); fal's limit
# is not published, so the same 8 is assumed.
FLUX2_MAX_IMAGES = 8
# A fal endpoint id is owner/alias[/path…]; it becomes part of the URL our key is sent to, so only
# plain path segments are taken (no dot-segments, no query, no percent-escapes).
ENDPOINT_ID = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)+")
ASPECT_RATIOS = ("21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21")
# FLUX 2 on fal has no aspect_ratio: its size is `image_size`, a named size or {width, height}
# (providers.md, "Third look"). A ratio with a named size gets it; the others an explicit size.
NAMED_SIZES = {
    "1:1": "square_hd",
    "4:3": "landscape_4_3",
    "3:4": "portrait_4_3",
    "16:9": "landscape_16_9",
    "9:16": "portrait_16_9",
}
MATCH_INPUT = "auto"  # the edit endpoints' own default: the size follows the input images
ONE_MEGAPIXEL = 1024 * 1024
SIDE_STEP = 16
# FLUX 2 endpoints (shared names and their fal ids) → the shared name whose rules they follow.
FLUX2_ENDPOINTS = {endpoint: model for model in FLUX2_MODELS for endpoint in (model, *MODEL_ENDPOINTS[model])}
KONTEXT_TAKES = Takes(
    frozenset(OPTIONAL_FIELDS) - {"resolution"},
    aspect_ratios=ASPECT_RATIOS,
    output_formats=("jpeg", "png"),
    safety_tolerance=Span(1, 6),
    num_images=Span(1, 4),
    options={"guidance_scale": Span(1, 20, whole=False)},
    refused_options={"sync_mode": "the receiver needs fal's queue and webhook; sync_mode is not taken"},
    who="fal",
)
# Kontext fields FLUX 2 on fal does not have: passed as options they would be dropped without a word.
NOT_FLUX2_OPTIONS = {
    "aspect_ratio": "fal's FLUX 2 has no aspect_ratio: give the request's aspect_ratio (sent as image_size)",
    "num_images": "fal's FLUX 2 makes one image per request",
    "enhance_prompt": "fal's FLUX 2 has no enhance_prompt",
}
# flex only: its sampler's knobs (fal's flux-2-flex page), refused on pro rather than ignored there.
FLEX_OPTIONS = {"guidance_scale": Span(1.5, 10, whole=False), "num_inference_steps": Span(2, 50)}
FLUX2_PRO_TAKES = Takes(
    frozenset(OPTIONAL_FIELDS) - {"resolution", "prompt_upsampling"},
    aspect_ratios=ASPECT_RATIOS,
    edit_ratios=(MATCH_INPUT,),
    output_formats=("jpeg", "png"),
    safety_tolerance=Span(1, 5),
    refused_options={
        **KONTEXT_TAKES.refused_options,
        **{name: f"fal's flux-2-pro does not take {name} (flux-2-flex does)" for name in FLEX_OPTIONS},
        **NOT_FLUX2_OPTIONS,
    },
    who="fal's flux-2-pro",
)
FLUX2_TAKES = {
    "flux-2-pro": FLUX2_PRO_TAKES,
    # flex expands prompts itself (enable_prompt_expansion): the shared prompt_upsampling sets it.
    "flux-2-flex": replace(
        FLUX2_PRO_TAKES,
        fields=FLUX2_PRO_TAKES.fields | {"prompt_upsampling"},
        options=FLEX_OPTIONS,
        refused_options={**KONTEXT_TAKES.refused_options, **NOT_FLUX2_OPTIONS},
        who="fal's flux-2-flex",
    ),
}
# The shared field each FLUX 2 and Kontext endpoint spells its own way.
PROMPT_UPSAMPLING = {"flux-2-flex": "enable_prompt_expansion"}
KONTEXT_PROMPT_UPSAMPLING = "enhance_prompt"
SIGNATURE_TOLERANCE = 300
JWKS_URL = Variable(
    "FAL_JWKS_URL",
    Url(),
    "https://rest.fal.ai/.well-known/jwks.json",
    "the public keys fal signs webhooks with",
)
VARIABLES = ProviderVariables(
    key=Variable(
        "FAL_KEY",
        Plain(),
        help="[fal](providers/fal.md): your key (`key_id:key_secret`), sent as `Authorization: Key …`",
        secret=True,
    ),
    base_url=Variable(
        "FAL_QUEUE_URL",
        Url(),
        "https://queue.fal.run",
        "fal's queue; also the only origin reconcile sends the key to",
    ),
    extra=(JWKS_URL,),
)
SIGNATURE_HEADERS = (
    "x-fal-webhook-request-id",
    "x-fal-webhook-user-id",
    "x-fal-webhook-timestamp",
    "x-fal-webhook-signature",
)
PENDING_STATUSES = frozenset({"IN_QUEUE", "IN_PROGRESS"})
MODERATION_TYPES = frozenset({"content_policy_violation"})
# A result fetch answered with one of these is a passing fault of the fetch, not the request's failure.
TRANSIENT_FETCH = frozenset({408, 425, 429})


def fal_endpoint(model: str, has_image: bool) -> str:
    """A shared model name maps to its text-to-image or editing endpoint; a fal endpoint id is used as
    given."""
    pair = MODEL_ENDPOINTS.get(model)
    if pair is None:
        return model
    return pair[1] if has_image else pair[0]


def image_size(ratio: str) -> str | dict[str, int]:
    """fal's FLUX 2 `image_size` for a ratio we take: its named size, else {width, height} at that
    ratio near one megapixel, sides multiples of 16 (the ratios we take come out exact)."""
    if ratio in NAMED_SIZES or ratio == MATCH_INPUT:
        return NAMED_SIZES.get(ratio, MATCH_INPUT)
    across, down = (int(part) for part in ratio.split(":"))
    width = math.sqrt(ONE_MEGAPIXEL * across / down)
    height = width * down / across
    return {"width": _step(width), "height": _step(height)}


def _step(side: float) -> int:
    return max(SIDE_STEP, round(side / SIDE_STEP) * SIDE_STEP)


def is_endpoint_id(model: str) -> bool:
    return (
        len(model) <= 200
        and ENDPOINT_ID.fullmatch(model) is not None
        and all(segment.strip(".") for segment in model.split("/"))
    )


def trusted_url(url: Any, trusted: str | httpx.URL) -> str | None:
    """`url` from an answer if it is on the origin we trust with our key, else None."""
    return url if isinstance(url, str) and same_origin(url, trusted) else None


def queue_urls(queue: str, endpoint: str, request_id: str) -> tuple[str, str]:
    """The status and result URLs fal documents: they use only {owner}/{alias}, not the subpath."""
    owner_alias = "/".join(endpoint.split("/")[:2])
    result = f"{queue}/{owner_alias}/requests/{request_id}"
    return f"{result}/status", result


def detail_messages(detail: Any) -> list[str]:
    """fal's `detail`: a string, or a list of {loc, msg, type, ctx?} objects (FastAPI style)."""
    if isinstance(detail, str):
        return [detail] if detail else []
    messages: list[str] = []
    if isinstance(detail, list):
        for item in detail:
            entry = mapping(item)
            message = text(entry.get("msg")) or text(entry.get("type")) or (text(item) if item else "")
            location = entry.get("loc")
            if isinstance(location, list):
                where = ".".join(text(part) for part in location if part != "body")
                message = f"{where}: {message}" if where else message
            if message:
                messages.append(message)
    return messages


def detail_types(detail: Any) -> list[str]:
    if not isinstance(detail, list):
        return []
    return [text(mapping(item).get("type")) for item in detail if mapping(item).get("type")]


def fal_error(messages: list[str], types: list[str], fallback: str) -> TaskError:
    """A failure fal reported: content_moderated when its machine-readable type says a content checker
    flagged it (fal errors doc: `type` is the one field meant for conditional logic)."""
    moderated = any(kind in MODERATION_TYPES for kind in types)
    code = ErrorCode.CONTENT_MODERATED if moderated else ErrorCode.GENERATION_FAILED
    return TaskError(code, "; ".join(messages) or fallback, types[0] if types else None)


def result_outcome(request_id: str | None, payload: Mapping[str, Any], detail: str) -> Outcome:
    """The model's output JSON: every image link, in order, except the ones fal's safety checker flagged
    (`has_nsfw_concepts[i]` true: fal sends a black image in their place). All flagged is
    content_moderated, not a success with black images."""
    images = payload.get("images")
    flags = payload.get("has_nsfw_concepts")
    flagged = flags if isinstance(flags, list) else []
    urls: list[str] = []
    for index, image in enumerate(images if isinstance(images, list) else []):
        url = text(mapping(image).get("url"))
        if url and not (index < len(flagged) and flagged[index] is True):
            urls.append(url)
    if any(flag is True for flag in flagged):
        detail = f"{detail}, has_nsfw_concepts {flagged}"
        if not urls:
            message = "fal's safety checker flagged the result (has_nsfw_concepts); it sent a black image"
            error = TaskError(ErrorCode.CONTENT_MODERATED, message, "has_nsfw_concepts")
            return Outcome.failed(request_id, error, detail)
    return Outcome.succeeded(request_id, tuple(urls), detail)


@functools.lru_cache(maxsize=32)
def ed25519_key(x: str) -> Ed25519PublicKey | None:
    """A JWK's `x` (unpadded base64url of the 32-byte public key) as a key, or None if it is not one."""
    try:
        raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error):
        return None


def jwks_keys(key_set: Any) -> list[Ed25519PublicKey]:
    keys: list[Ed25519PublicKey] = []
    entries = mapping(key_set).get("keys")
    for entry in entries if isinstance(entries, list) else []:
        jwk = mapping(entry)
        if jwk.get("kty") not in (None, "OKP") or jwk.get("crv") not in (None, "Ed25519"):
            continue
        x = jwk.get("x")
        key = ed25519_key(x) if isinstance(x, str) else None
        if key is not None:
            keys.append(key)
    return keys


def verify_fal_signature(headers: Mapping[str, str], raw: bytes, key_set: Any, now: float) -> str:
    """§5.3: Ed25519 over `request_id\\nuser_id\\ntimestamp\\nsha256hex(raw body)`, header values used
    verbatim, accepted if any key of the JWKS verifies. Returns the signed request id."""
    values = [headers.get(name, "") for name in SIGNATURE_HEADERS]
    missing = [name for name, value in zip(SIGNATURE_HEADERS, values, strict=True) if not value]
    if missing:
        raise CallbackRejected(f"missing {', '.join(missing)}")
    request_id, user_id, timestamp, signature_hex = values
    if not (timestamp.isascii() and timestamp.isdigit()):
        raise CallbackRejected("X-Fal-Webhook-Timestamp is not a number")
    if abs(now - int(timestamp)) > SIGNATURE_TOLERANCE:
        raise CallbackRejected("X-Fal-Webhook-Timestamp is outside the accepted window")
    try:
        signature = bytes.fromhex(signature_hex)
    except ValueError:
        raise CallbackRejected("X-Fal-Webhook-Signature is not hex") from None
    if len(signature) != 64:
        raise CallbackRejected("X-Fal-Webhook-Signature is not 64 bytes")
    keys = jwks_keys(key_set)
    if not keys:
        raise CallbackRejected("no fal public key to verify with (the JWKS could not be fetched)")
    message = f"{request_id}\n{user_id}\n{timestamp}\n{hashlib.sha256(raw).hexdigest()}".encode()
    for key in keys:
        try:
            key.verify(signature, message)
        except InvalidSignature:
            continue
        return request_id
    raise CallbackRejected("X-Fal-Webhook-Signature does not verify with any fal key")


class Fal(Provider):
    name = "fal"
    variables = VARIABLES
    models = tuple(MODEL_ENDPOINTS)
    default_model = "flux-kontext-pro"
    accepts_any_model = True  # a full fal endpoint id, checked in validate
    native_hint = "a fal endpoint id such as fal-ai/flux-pro/kontext/max/multi"
    fields = KONTEXT_TAKES.fields | FLUX2_TAKES["flux-2-flex"].fields
    max_images = FLUX2_MAX_IMAGES
    inline_images = True  # fal takes data URIs in image_url: no need for it to reach our uploads

    def native_model(self, model: str, has_images: bool) -> str:
        return fal_endpoint(model, has_images)

    def image_range(self, model: str) -> tuple[int, int]:
        if model in KONTEXT_MODELS:
            return 0, 1
        if model in MODEL_ENDPOINTS or LIST_IMAGE_ENDPOINTS.fullmatch(model):
            return 0, FLUX2_MAX_IMAGES
        return 0, 1  # another endpoint id: one image_url

    def takes(self, model: str) -> Takes:
        """FLUX 2 (by shared name or fal id) has its own table; Kontext and other endpoint ids keep
        fal's Kontext fields."""
        flux2 = FLUX2_ENDPOINTS.get(model)
        return FLUX2_TAKES[flux2] if flux2 else KONTEXT_TAKES

    def validate(self, request: TaskRequest) -> dict[str, str]:
        errors = super().validate(request)
        model = request.model
        if model is not None and model not in MODEL_ENDPOINTS and not is_endpoint_id(model):
            errors["model"] = f"fal sells {self.sells()}"
        flux2 = FLUX2_ENDPOINTS.get(self.request_model(request))
        if flux2 and "image_size" in request.options and "aspect_ratio" in request.params:
            errors["options.image_size"] = "give aspect_ratio or options.image_size, not both"
        return errors

    def build_submit(self, task: TaskSpec, ctx: Context) -> httpx.Request:
        body: dict[str, Any] = {key: value for key, value in task.options.items() if key != "sync_mode"}
        body["prompt"] = task.prompt
        params = task.params
        flux2 = FLUX2_ENDPOINTS.get(task.model)
        for field in ("output_format", "seed"):
            if field in params:
                body[field] = params[field]
        if "safety_tolerance" in params:
            body["safety_tolerance"] = str(params["safety_tolerance"])  # fal's enum is "1".."6" ("5")
        if flux2 is None:
            # Kontext (and other endpoint ids): fal's own aspect_ratio, num_images and enhance_prompt.
            for field in ("aspect_ratio", "num_images"):
                if field in params:
                    body[field] = params[field]
            if "prompt_upsampling" in params:
                body[KONTEXT_PROMPT_UPSAMPLING] = params["prompt_upsampling"]
        else:
            # FLUX 2 makes one image and sizes it by image_size: an edit naming no ratio keeps fal's
            # `auto` (sized like its inputs); a text-to-image naming none gets the square megapixel a
            # shared request means everywhere, not fal's landscape_4_3 default.
            # A size given natively (options.image_size, e.g. 2048 x 2048) stands.
            default = MATCH_INPUT if task.images else "1:1"
            body.setdefault("image_size", image_size(params.get("aspect_ratio", default)))
            spelled = PROMPT_UPSAMPLING.get(flux2)  # validate refused it where there is none
            if spelled and "prompt_upsampling" in params:
                body[spelled] = params["prompt_upsampling"]
        endpoint = fal_endpoint(task.model, bool(task.images))
        if task.images:
            if LIST_IMAGE_ENDPOINTS.fullmatch(endpoint):
                body["image_urls"] = list(task.images)
            else:
                body["image_url"] = task.images[0]
        return httpx.Request(
            "POST",
            f"{ctx.settings.base_url}/{endpoint}",
            params={"fal_webhook": ctx.callback_url},
            headers={"Authorization": f"Key {ctx.settings.api_key}"},
            json=body,
        )

    def parse_submit(self, response: httpx.Response) -> Submission:
        raise_for_http_status(response, self._error_text(response))
        body = response_json(response)
        # request_id, not gateway_request_id: the latter names the last retry, the former the queue entry.
        request_id = text(body.get("request_id"))
        if not request_id:
            raise ProviderRejected("fal accepted the task but sent no request_id")
        # Reconcile sends our key to these URLs, so only ones on the queue's own origin are kept.
        state = {
            name: body[name]
            for name in ("status_url", "response_url")
            if trusted_url(body.get(name), response.request.url)
        }
        return Submission(provider_task_id=request_id, state=state)

    def key_set_url(self, settings: ProviderSettings) -> str | None:
        return settings.extra.get(JWKS_URL.name)

    def verify_callback(
        self, headers: Mapping[str, str], raw: bytes, task: TaskSpec, ctx: Context, now: float
    ) -> None:
        signed_id = verify_fal_signature(headers, raw, ctx.keys, now)
        # The signature covers the body's hash, not its meaning: the request id it names must be the
        # signed one (a body that is not JSON is left to parse_callback, a 400).
        try:
            body_id = json_object(raw).get("request_id")
        except MalformedCallback:
            return
        if body_id is not None and not hmac.compare_digest(text(body_id).encode(), signed_id.encode()):
            raise CallbackRejected("X-Fal-Webhook-Request-Id is not the body's request_id")
        if task.provider_task_id and signed_id != task.provider_task_id:
            raise CallbackRejected("the signed request id is not this task's")

    def parse_callback(self, raw: bytes) -> Outcome:
        body = json_object(raw)
        request_id = text(body.get("request_id"))
        if not request_id:
            raise MalformedCallback("no request_id in the callback")
        status = body.get("status")
        payload = body.get("payload")
        if status == "OK":
            if payload is None:
                # The request succeeded but its output could not ride in the webhook: it waits in the
                # queue's result endpoint, which reconcile reads (fal webhooks doc, payload_error).
                reason = text(body.get("payload_error")) or "no payload_error given"
                said = f"status OK, payload null ({reason[:200]}): the result is fetched from the queue"
                return Outcome.pending(request_id, said, ask_now=True)
            if not isinstance(payload, Mapping):
                raise MalformedCallback("payload is not an object")
            return result_outcome(request_id, payload, "status OK")
        if status == "ERROR":
            detail = mapping(payload).get("detail")
            messages = [text(body.get("error"))] if body.get("error") else []
            messages += detail_messages(detail)
            error = fal_error(messages, detail_types(detail), "fal reported an error")
            return Outcome.failed(request_id, error, f"status ERROR: {text(body.get('error'))}")
        raise MalformedCallback(f"unknown status {status!r}")

    def build_status(self, task: TaskSpec, ctx: Context) -> httpx.Request | None:
        return self._queue_request("GET", task, ctx, "status_url")

    def build_cancel(self, task: TaskSpec, ctx: Context) -> httpx.Request | None:
        """fal's queue cancel: `PUT {queue}/{owner}/{alias}/requests/{id}/cancel` (providers.md §5.5),
        the request's own URL (its response_url) plus /cancel, as fal's cancel_url is."""
        return self._queue_request("PUT", task, ctx, "response_url", "/cancel")

    @staticmethod
    def _queue_request(
        method: str, task: TaskSpec, ctx: Context, kept: str, suffix: str = ""
    ) -> httpx.Request | None:
        """A request to one of the task's queue URLs: the one the submit answer gave (`kept`, if on the
        queue's origin) or the one fal documents, built; None before fal has given the task an id."""
        if not task.provider_task_id:
            return None
        queue = ctx.settings.base_url
        url = trusted_url(task.state.get(kept), queue)
        if url is None:
            endpoint = fal_endpoint(task.model, bool(task.images))
            status_url, response_url = queue_urls(queue, endpoint, task.provider_task_id)
            url = status_url if kept == "status_url" else response_url
        headers = {"Authorization": f"Key {ctx.settings.api_key}"}
        return httpx.Request(method, f"{url.rstrip('/')}{suffix}" if suffix else url, headers=headers)

    def parse_cancel(self, response: httpx.Response) -> str:
        """202 `CANCELLATION_REQUESTED`; 400 `ALREADY_COMPLETED` and 404 `NOT_FOUND` are final answers
        too (nothing is left to stop); a 429 or 5xx is asked again."""
        if response.status_code not in (400, 404):
            raise_for_http_status(response, self._error_text(response))
        try:
            said = text(json_object(response.content).get("status"))
        except MalformedCallback:
            said = ""
        return f"fal answered {response.status_code} {said[:100] or '(no status)'}"

    def parse_status(self, response: httpx.Response) -> Outcome | httpx.Request:
        asked = response.request.url
        if asked.path.rstrip("/").endswith("/status"):
            return self._read_status(response)
        return self._read_result(response)

    # -- reconcile, step by step ---------------------------------------------------------------------

    @staticmethod
    def _error_text(response: httpx.Response) -> str:
        try:
            body = json_object(response.content)
        except MalformedCallback:
            return response.text[:200]
        return "; ".join(detail_messages(body.get("detail"))) or response.text[:200]

    @staticmethod
    def _request_id(url: httpx.URL) -> str | None:
        segments = url.path.rstrip("/").split("/")
        if "requests" in segments[:-1]:
            return segments[segments.index("requests") + 1]
        return None

    def _read_status(self, response: httpx.Response) -> Outcome | httpx.Request:
        raise_for_http_status(response, self._error_text(response))
        body = response_json(response)
        request_id = text(body.get("request_id")) or self._request_id(response.request.url)
        status = text(body.get("status"))
        if status in PENDING_STATUSES:
            position = body.get("queue_position")
            return Outcome.pending(request_id, status if position is None else f"{status} at {position}")
        if status != "COMPLETED":
            return Outcome.pending(request_id, f"unknown status {status!r}")
        # COMPLETED only says the request ended; its error fields or its result say how.
        if body.get("error") or body.get("error_type"):
            kind = text(body.get("error_type"))
            error = fal_error(
                [text(body.get("error")) or kind], [kind] if kind else [], "fal reported an error"
            )
            return Outcome.failed(request_id, error, f"COMPLETED with error {kind or 'untyped'}")
        asked = response.request.url
        result_url = trusted_url(body.get("response_url"), asked)
        if result_url is None:
            result_url = str(asked.copy_with(query=None)).rstrip("/").removesuffix("/status")
        return httpx.Request(
            "GET", result_url, headers={"Authorization": response.request.headers.get("authorization", "")}
        )

    def _read_result(self, response: httpx.Response) -> Outcome:
        request_id = self._request_id(response.request.url)
        status = response.status_code
        if status >= 400:
            try:
                detail = json_object(response.content).get("detail")
            except MalformedCallback:
                detail = None
            if detail is None or status in TRANSIENT_FETCH:
                raise_for_http_status(response, self._error_text(response))
            error = fal_error(detail_messages(detail), detail_types(detail), f"fal answered HTTP {status}")
            return Outcome.failed(request_id, error, f"result HTTP {status}")
        return result_outcome(request_id, response_json(response), "COMPLETED, result fetched")
