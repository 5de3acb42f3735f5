"""apimart's FLUX Kontext API (providers.md §3): `/v1/images/generations`, a `webhook` it appends
"/callback" to, and `/v1/tasks/{id}` for reconcile.

apimart does not sign its callbacks: the signed token in our callback path is the only protection, so
`verify_callback` is the default no-op. Our callback route also answers at `.../{token}/callback`.
"""

from __future__ import annotations

from collections.abc import Mapping
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
from receiver.providers.base import SHARED_MODELS
from receiver.providers.base import Context
from receiver.providers.base import Provider
from receiver.providers.base import bearer_request
from receiver.providers.base import json_object
from receiver.providers.base import mapping
from receiver.providers.base import mentions_moderation
from receiver.providers.base import raise_for_http_status
from receiver.providers.base import text

# apimart's page lists match_input_image, auto, 1:1, 4:3, 3:4, 16:9, 9:16 and then "…"; the rest are the
# FLUX Kontext ratios (3:7 to 7:3) that apimart-style relays list beside them.
ASPECT_RATIOS = ("21:9", "16:9", "3:2", "4:3", "1:1", "3:4", "2:3", "9:16", "9:21")
MATCH_INPUT = ("match_input_image", "auto")
# Ours (and BFL's) spell it jpeg, apimart's `response_format` spells it jpg.
RESPONSE_FORMATS = {"png": "png", "jpeg": "jpg", "jpg": "jpg"}
SAFETY_TOLERANCE = range(0, 7)


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
        return Outcome.succeeded(task_id, result_urls(task), detail)
    if status in ("failed", "cancelled"):
        return Outcome.failed(task_id, failure(task, status), detail)
    # pending, submitted, processing, in_progress and anything new: not an end yet.
    return Outcome.pending(task_id, detail)


class Apimart(Provider):
    name = "apimart"
    key_variable = "APIMART_API_KEY"
    # FLUX 2 ids as listed by apimart's GET /v1/models in a real probe (README, apimart).
    models = SHARED_MODELS
    default_model = "flux-kontext-pro"
    # apimart's generations endpoint has no seed, resolution or image count.
    fields = frozenset(OPTIONAL_FIELDS) - {"seed", "resolution", "num_images"}
    max_images = 1

    def validate(self, request: TaskRequest) -> dict[str, str]:
        errors: dict[str, str] = {}
        params = request.params
        ratio = params.get("aspect_ratio")
        if ratio is not None and ratio not in (*ASPECT_RATIOS, *MATCH_INPUT):
            errors["aspect_ratio"] = f"apimart takes one of {', '.join((*ASPECT_RATIOS, *MATCH_INPUT))}"
        elif ratio in MATCH_INPUT and not request.images:
            errors["aspect_ratio"] = f"{ratio} matches the input image, and there is none"
        if "output_format" in params and params["output_format"] not in RESPONSE_FORMATS:
            errors["output_format"] = "apimart takes png or jpeg"
        if "safety_tolerance" in params and params["safety_tolerance"] not in SAFETY_TOLERANCE:
            errors["safety_tolerance"] = "apimart takes 0 to 6"
        return errors

    def build_submit(self, task: TaskSpec, ctx: Context) -> httpx.Request:
        # English error messages unless the app asks otherwise: they reach our users and our
        # moderation check reads them.
        body: dict[str, Any] = {"language": "en", **task.options, "model": task.model, "prompt": task.prompt}
        if task.images:
            body["image_urls"] = [task.images[0]]
        params = task.params
        if "aspect_ratio" in params:
            body["size"] = params["aspect_ratio"]
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
