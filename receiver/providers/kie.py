"""kie.ai Flux Kontext API (providers.md §1) and the account-wide HMAC kie signs callbacks with (§2.5)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import httpx

from receiver.models import OPTIONAL_FIELDS
from receiver.models import CallbackRejected
from receiver.models import ErrorCode
from receiver.models import MalformedCallback
from receiver.models import Outcome
from receiver.models import ProviderRejected
from receiver.models import ProviderUnavailable
from receiver.models import Submission
from receiver.models import TaskError
from receiver.models import TaskSpec
from receiver.providers.base import KONTEXT_MODELS
from receiver.providers.base import Context
from receiver.providers.base import Provider
from receiver.providers.base import Span
from receiver.providers.base import Takes
from receiver.providers.base import bearer_request
from receiver.providers.base import json_object
from receiver.providers.base import mapping
from receiver.providers.base import present
from receiver.providers.base import raise_for_http_status
from receiver.providers.base import response_json
from receiver.providers.base import text
from receiver.variables import Plain
from receiver.variables import ProviderVariables
from receiver.variables import Url
from receiver.variables import Variable

ASPECT_RATIOS = ("21:9", "16:9", "4:3", "1:1", "3:4", "9:16")
TAKES = Takes(
    frozenset(OPTIONAL_FIELDS) - {"seed", "resolution"},
    aspect_ratios=ASPECT_RATIOS,
    output_formats=("jpeg", "png"),
    safety_tolerance=Span(0, 6),
    edit_safety_tolerance=Span(0, 2),
    who="kie",
)
SIGNATURE_TOLERANCE = 300
HMAC_KEY = Variable(
    "KIE_WEBHOOK_HMAC_KEY",
    Plain(),
    help="the `webhookHmacKey` from kie.ai/settings; when set, every kie callback must carry kie's"
    " `X-Webhook-Signature`",
    secret=True,
)
# One kie account serves both of its APIs (kie and kie-market): one set of variables.
VARIABLES = ProviderVariables(
    key=Variable(
        "KIE_API_KEY",
        Plain(),
        help="[kie](providers/kie.md) and [kie-market](providers/kie-market.md): your kie.ai key, sent"
        " as `Authorization: Bearer …`",
        secret=True,
    ),
    base_url=Variable(
        "KIE_BASE_URL", Url(), "https://api.kie.ai", "where kie's API lives (a proxy or a test double)"
    ),
    extra=(HMAC_KEY,),
)
# kie answers HTTP 200 and puts the real status in the body's `code` (§1.2).
TRANSIENT_CODES = frozenset({408, 429, 455, 500, 502, 503, 504})


def kie_task_id(body: Mapping[str, Any]) -> str | None:
    """kie spells the id three ways across its pages: data.taskId, data.task_id, a top-level taskId."""
    data = body.get("data")
    if isinstance(data, Mapping):
        for key in ("taskId", "task_id"):
            if data.get(key):
                return str(data[key])
    for key in ("taskId", "task_id"):
        if body.get(key):
            return str(body[key])
    return None


def kie_code(value: Any) -> int | None:
    """kie's numeric codes, which some of its answers spell as strings ("200", "1")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value.strip())
    return None


def check_kie_code(body: Mapping[str, Any]) -> None:
    """Turn a body-level error code into the shared exceptions; code 200 passes."""
    code = kie_code(body.get("code"))
    if code == 200:
        return
    message = present(body.get("msg")) or "no message"
    if code is not None and code in TRANSIENT_CODES:
        raise ProviderUnavailable(f"kie code {code}: {message}", rate_limited=code == 429)
    raise ProviderRejected(message, text(body.get("code")) or None)


def parse_kie_submit(response: httpx.Response) -> Submission:
    raise_for_http_status(response, response.text[:200])
    body = response_json(response)
    check_kie_code(body)
    task_id = kie_task_id(body)
    if not task_id:
        raise ProviderRejected("kie accepted the task but sent no taskId")
    return Submission(provider_task_id=task_id)


def verify_kie_hmac(headers: Mapping[str, str], raw: bytes, task: TaskSpec, ctx: Context, now: float) -> None:
    """X-Webhook-Signature = base64(HMAC-SHA256(key, taskId + "." + timestamp))."""
    key = ctx.settings.extra.get(HMAC_KEY.name)
    if not key:
        return
    timestamp = headers.get("x-webhook-timestamp", "").strip()
    signature = headers.get("x-webhook-signature", "").strip()
    if not timestamp or not signature:
        raise CallbackRejected("missing X-Webhook-Signature or X-Webhook-Timestamp")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise CallbackRejected("X-Webhook-Timestamp is not a number") from None
    if abs(now - sent_at) > SIGNATURE_TOLERANCE:
        raise CallbackRejected("X-Webhook-Timestamp is outside the accepted window")
    try:
        signed_id = kie_task_id(json_object(raw))
    except MalformedCallback:
        signed_id = None
    if not signed_id:
        raise CallbackRejected("the body names no task id for the signature to cover")
    if task.provider_task_id and signed_id != task.provider_task_id:
        raise CallbackRejected("the signed task id is not this task's")
    digest = hmac.new(key.encode(), f"{signed_id}.{timestamp}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(base64.b64encode(digest), signature.encode()):
        raise CallbackRejected("X-Webhook-Signature does not match")


def kie_status_request(task: TaskSpec, ctx: Context, path: str) -> httpx.Request | None:
    """kie's status queries, both APIs: GET {base}{path}?taskId=…, Bearer; nothing to ask before an id."""
    if not task.provider_task_id:
        return None
    return bearer_request(
        "GET",
        f"{ctx.settings.base_url}{path}",
        ctx.settings.api_key,
        params={"taskId": task.provider_task_id},
    )


def kie_status_body(response: httpx.Response, query: str) -> dict[str, Any]:
    """A status answer's body. A body-level refusal there (e.g. 404 for a task not yet indexed) says
    nothing about the task, so it is worth asking again, not the task's end."""
    raise_for_http_status(response, response.text[:200])
    body = response_json(response)
    try:
        check_kie_code(body)
    except ProviderRejected as exc:
        raise ProviderUnavailable(f"{query} refused: {exc.message}") from None
    return body


def failure_code(code: Any) -> ErrorCode:
    return ErrorCode.CONTENT_MODERATED if text(code) == "400" else ErrorCode.GENERATION_FAILED


class Kie(Provider):
    name = "kie"
    variables = VARIABLES
    models = KONTEXT_MODELS
    default_model = "flux-kontext-pro"
    # kie's Kontext API has no seed and no resolution; num_images is accepted as 1 (validate).
    fields = TAKES.fields
    max_images = 1
    pace_group = "kie"
    rate_limit = (20, 10.0)  # providers.md §1.5: 20 new generation requests per 10 s per account

    def takes(self, model: str) -> Takes:
        return TAKES

    def build_submit(self, task: TaskSpec, ctx: Context) -> httpx.Request:
        body: dict[str, Any] = {**task.options, "prompt": task.prompt, "model": task.model}
        spelled = {
            "aspect_ratio": "aspectRatio",
            "output_format": "outputFormat",
            "prompt_upsampling": "promptUpsampling",
            "safety_tolerance": "safetyTolerance",
        }
        for ours, theirs in spelled.items():
            if ours in task.params:
                body[theirs] = task.params[ours]
        if task.images:
            body["inputImage"] = task.images[0]
        body["callBackUrl"] = ctx.callback_url
        url = f"{ctx.settings.base_url}/api/v1/flux/kontext/generate"
        return bearer_request("POST", url, ctx.settings.api_key, json=body)

    def parse_submit(self, response: httpx.Response) -> Submission:
        return parse_kie_submit(response)

    def verify_callback(
        self, headers: Mapping[str, str], raw: bytes, task: TaskSpec, ctx: Context, now: float
    ) -> None:
        verify_kie_hmac(headers, raw, task, ctx, now)

    def parse_callback(self, raw: bytes) -> Outcome:
        body = json_object(raw)
        if "code" not in body:
            raise MalformedCallback("no code in the callback")
        code = kie_code(body.get("code"))
        task_id = kie_task_id(body)
        data = mapping(body.get("data"))
        info = mapping(data.get("info"))
        message = present(body.get("msg"))
        if code == 200:
            url = present(info.get("resultImageUrl"))
            return Outcome.succeeded(task_id, (url,) if url else (), detail=f"code 200: {message}")
        spelled = text(body.get("code"))
        error = TaskError(failure_code(spelled), message or "kie reported a failure", spelled)
        return Outcome.failed(task_id, error, detail=f"code {spelled}: {message}")

    def build_status(self, task: TaskSpec, ctx: Context) -> httpx.Request | None:
        return kie_status_request(task, ctx, "/api/v1/flux/kontext/record-info")

    def parse_status(self, response: httpx.Response) -> Outcome:
        body = kie_status_body(response, "record-info")
        data = mapping(body.get("data"))
        task_id = kie_task_id(body)
        # Real answers spell absent fields as the string "null" and times and flags as strings.
        flag = kie_code(data.get("successFlag"))
        detail = f"successFlag {flag}"
        if flag == 1:
            result = mapping(data.get("response"))
            url = present(result.get("resultImageUrl"))
            return Outcome.succeeded(task_id, (url,) if url else (), detail)
        if flag in (2, 3):
            message = present(data.get("errorMessage")) or (
                "kie could not create the task" if flag == 2 else "kie could not generate the image"
            )
            error_code = present(data.get("errorCode"))
            code = ErrorCode.PROVIDER_REJECTED if flag == 2 else failure_code(error_code)
            return Outcome.failed(task_id, TaskError(code, message, error_code or None), detail)
        return Outcome.pending(task_id, detail)
