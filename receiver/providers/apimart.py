"""apimart's FLUX Kontext API (providers.md §3): `/v1/images/generations`, a `webhook` it appends
"/callback" to, and `/v1/tasks/{id}` for reconcile.

apimart does not sign its callbacks: the signed token in our callback path is the only protection, so
`verify_callback` is the default no-op. Our callback route also answers at `.../{token}/callback`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import quote

import httpx

from receiver.models import OPTIONAL_FIELDS
from receiver.models import ErrorCode
from receiver.models import MalformedCallback
from receiver.models import Outcome
from receiver.models import ProviderRejected
from receiver.models import ProviderUnavailable
from receiver.models import Submission
from receiver.models import TaskError
from receiver.models import TaskRequest
from receiver.models import TaskSpec
from receiver.providers.base import FLUX2_MODELS
from receiver.providers.base import SHARED_MODELS
from receiver.providers.base import Context
from receiver.providers.base import Provider
from receiver.providers.base import Span
from receiver.providers.base import Takes
from receiver.providers.base import bearer_request
from receiver.providers.base import charge_usd
from receiver.providers.base import json_object
from receiver.providers.base import mapping
from receiver.providers.base import mentions_moderation
from receiver.providers.base import raise_for_http_status
from receiver.providers.base import text
from receiver.variables import Plain
from receiver.variables import ProviderVariables
from receiver.variables import Url
from receiver.variables import Variable

# apimart's page lists match_input_image, auto, 1:1, 4:3, 3:4, 16:9, 9:16 and then "…"; the rest are the
# FLUX Kontext ratios (3:7 to 7:3) that apimart-style relays list beside them.
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "4:3", "1:1", "3:4", "2:3", "9:16", "9:21")
MATCH_INPUT = ("match_input_image", "auto")
# Ours (and BFL's) spell it jpeg, apimart's `response_format` spells it jpg.
RESPONSE_FORMATS = {"png": "png", "jpeg": "jpg", "jpg": "jpg"}
KONTEXT_TAKES = Takes(
    frozenset(OPTIONAL_FIELDS) - {"seed", "resolution", "num_images"},
    aspect_ratios=ASPECT_RATIOS,
    edit_ratios=MATCH_INPUT,
    output_formats=tuple(RESPONSE_FORMATS),
    safety_tolerance=Span(0, 6),
    who="apimart",
)
# apimart's FLUX 2 page: `size` only these seven (default 1:1, whatever the input image), `resolution`
# 1K or 2K (priced apart), up to 8 reference URLs; no seed, format, safety or upsampling fields.
FLUX2_RATIOS = ("1:1", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3")
FLUX2_TAKES = Takes(
    frozenset({"model", "images", "aspect_ratio", "resolution", "options"}),
    aspect_ratios=FLUX2_RATIOS,
    resolutions=("1K", "2K"),
    who="apimart's FLUX 2",
)
FLUX2_MAX_IMAGES = 8
# How far an input image's width/height may be from a ratio and still be that ratio (a 1080 x 1920
# frame is 9:16; a 1000 x 1333 scan is 3:4).
RATIO_TOLERANCE = 0.01
VARIABLES = ProviderVariables(
    key=Variable(
        "APIMART_API_KEY",
        Plain(),
        help="[apimart](providers/apimart.md): your key, sent as `Authorization: Bearer …`",
        secret=True,
    ),
    base_url=Variable("APIMART_BASE_URL", Url(), "https://api.apimart.ai", "where apimart's API lives"),
)


def ratio_of(size: tuple[int, int] | None) -> str | None:
    """The one of FLUX2_RATIOS an image of this (width, height) has, or None."""
    if not size or not size[0] or not size[1]:
        return None
    for ratio in FLUX2_RATIOS:
        across, down = (int(part) for part in ratio.split(":"))
        if abs(size[0] * down / (size[1] * across) - 1) <= RATIO_TOLERANCE:
            return ratio
    return None


def apimart_error(body: Mapping[str, Any]) -> Mapping[str, Any]:
    """The `error` object of apimart's one-api style envelope `{"error": {code, message, type}}`."""
    return mapping(body.get("error"))


def check_apimart_answer(response: httpx.Response) -> dict[str, Any]:
    """An answer's JSON object, after the shared HTTP rule; a refusal carries apimart's own message and
    code (its `error.code` is often empty, then the HTTP status stands in)."""
    try:
        body: dict[str, Any] | None = json_object(response.content)
    except MalformedCallback:
        body = None
    error = apimart_error(body or {})
    message = text(error.get("message")) or response.text[:200] or "no message"
    try:
        raise_for_http_status(response, message)
    except ProviderRejected:
        raise ProviderRejected(message, text(error.get("code")) or str(response.status_code)) from None
    if body is None:
        raise ProviderUnavailable(f"HTTP {response.status_code}, the answer is not a JSON object")
    if error:
        raise ProviderRejected(message, text(error.get("code")) or None)
    return body


def task_object(body: Mapping[str, Any]) -> Mapping[str, Any]:
    """The task object, whether it came bare (the webhook page's example) or wrapped in {code, data}."""
    if "status" not in body and isinstance(body.get("data"), Mapping):
        return mapping(body["data"])
    return body


def task_id_of(task: Mapping[str, Any]) -> str | None:
    for key in ("id", "task_id"):
        if task.get(key):
            return text(task[key])
    return None


def result_urls(task: Mapping[str, Any]) -> tuple[str, ...]:
    """Every link of every image, in order: `result.images[].url` is an array of strings."""
    urls: list[str] = []
    images = mapping(task.get("result")).get("images")
    for image in images if isinstance(images, list) else ():
        links = mapping(image).get("url")
        for link in links if isinstance(links, list) else [links]:
            if isinstance(link, str) and link:
                urls.append(link)
    return tuple(urls)


def failure(task: Mapping[str, Any], status: str) -> TaskError:
    error = apimart_error(task)
    code = text(error.get("code")) or text(error.get("type")) or None
    message = text(error.get("message"))
    if status == "cancelled":
        return TaskError(
            ErrorCode.GENERATION_FAILED,
            f"apimart cancelled the task{': ' + message if message else ''}",
            code,
        )
    # apimart's failure object has no moderation code of its own: its code, type or message say it.
    said = " ".join((text(error.get("code")), text(error.get("type")), message))
    kind = ErrorCode.CONTENT_MODERATED if mentions_moderation(said) else ErrorCode.GENERATION_FAILED
    return TaskError(kind, message or "apimart reported a failure", code)


def task_outcome(task: Mapping[str, Any]) -> Outcome:
    status = text(task.get("status")).lower()
    task_id = task_id_of(task)
    detail = f"status {status}"
    if status == "completed":
        # apimart reports what it billed for the task (`cost`, read as USD beside `credits_cost`).
        done = Outcome.succeeded(task_id, result_urls(task), detail)
        return replace(done, charge_usd=charge_usd(task.get("cost"))) if done.state == "succeeded" else done
    if status in ("failed", "cancelled"):
        return Outcome.failed(task_id, failure(task, status), detail)
    # pending, submitted, processing, in_progress and anything new: not an end yet.
    return Outcome.pending(task_id, detail)


class Apimart(Provider):
    name = "apimart"
    variables = VARIABLES
    # FLUX 2 ids as listed by apimart's GET /v1/models in a real probe (README, apimart).
    models = SHARED_MODELS
    default_model = "flux-kontext-pro"
    # Kontext has no seed, resolution or image count; FLUX 2 has its own table (FLUX2_TAKES).
    fields = KONTEXT_TAKES.fields | FLUX2_TAKES.fields
    max_images = FLUX2_MAX_IMAGES

    def takes(self, model: str) -> Takes:
        return FLUX2_TAKES if model in FLUX2_MODELS else KONTEXT_TAKES

    def image_range(self, model: str) -> tuple[int, int]:
        return (0, FLUX2_MAX_IMAGES) if model in FLUX2_MODELS else (0, 1)

    def validate(self, request: TaskRequest) -> dict[str, str]:
        errors = super().validate(request)
        model = self.request_model(request)
        named = "aspect_ratio" in request.params or "size" in request.options
        if model in FLUX2_MODELS and request.images and not named:
            # apimart's FLUX 2 makes 1:1 unless told, unlike its Kontext: an edit naming no ratio gets
            # its first image's own ratio, which must then be known and one apimart makes.
            size = request.image_sizes[0] if request.image_sizes else None
            takes = ", ".join(FLUX2_RATIOS)
            if size is None:
                errors["aspect_ratio"] = (
                    f"apimart's FLUX 2 does not follow the input image (it makes 1:1 unless told), and "
                    f"this image's size is not known here: name one of {takes}, or give the image as "
                    "an upload or a data URI so its own ratio is sent"
                )
            elif ratio_of(size) is None:
                errors["aspect_ratio"] = (
                    f"the input image is {size[0]}x{size[1]}, not a ratio apimart's FLUX 2 makes: "
                    f"name one of {takes}"
                )
        return errors

    def build_submit(self, task: TaskSpec, ctx: Context) -> httpx.Request:
        # English error messages unless the app asks otherwise: they reach our users and our
        # moderation check reads them.
        body: dict[str, Any] = {"language": "en", **task.options, "model": task.model, "prompt": task.prompt}
        params = task.params
        flux2 = task.model in FLUX2_MODELS
        if task.images:
            body["image_urls"] = list(task.images) if flux2 else [task.images[0]]
        if "aspect_ratio" in params:
            body["size"] = params["aspect_ratio"]
        elif flux2 and task.images and "size" not in body:  # an options.size stands
            ratio = ratio_of(task.image_sizes[0] if task.image_sizes else None)
            if ratio is not None:
                body["size"] = ratio
        if "resolution" in params:
            body["resolution"] = params["resolution"]
        if "output_format" in params:
            body["response_format"] = RESPONSE_FORMATS[params["output_format"]]
        for name in ("safety_tolerance", "prompt_upsampling"):
            if name in params:
                body[name] = params[name]
        # apimart POSTs to webhook + "/callback"; our callback route answers there too.
        body["webhook"] = ctx.callback_url
        url = f"{ctx.settings.base_url}/v1/images/generations"
        return bearer_request("POST", url, ctx.settings.api_key, json=body)

    def parse_submit(self, response: httpx.Response) -> Submission:
        body = check_apimart_answer(response)
        data = body.get("data")
        first = mapping(data[0]) if isinstance(data, list) and data else mapping(data)
        task_id = text(first.get("task_id"))
        if not task_id:
            raise ProviderRejected("apimart accepted the task but sent no task_id")
        return Submission(provider_task_id=task_id)

    def parse_callback(self, raw: bytes) -> Outcome:
        task = task_object(json_object(raw))
        if not text(task.get("status")):
            raise MalformedCallback("no status in the callback")
        return task_outcome(task)

    def build_status(self, task: TaskSpec, ctx: Context) -> httpx.Request | None:
        if not task.provider_task_id:
            return None
        url = f"{ctx.settings.base_url}/v1/tasks/{quote(task.provider_task_id, safe='')}"
        return bearer_request("GET", url, ctx.settings.api_key, params={"language": "en"})

    def parse_status(self, response: httpx.Response) -> Outcome:
        try:
            body = check_apimart_answer(response)
        except ProviderRejected as exc:
            # A refused status query (unknown task, key revoked) says nothing about the task itself.
            raise ProviderUnavailable(f"status query refused: {exc.message}") from None
        code = body.get("code")
        task = task_object(body)
        if (code is not None and code != 200) or not text(task.get("status")):
            raise ProviderUnavailable(f"status answer without a task (code {code})")
        return task_outcome(task)
