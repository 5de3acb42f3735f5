"""apicore `/v1/images/generations` with Black Forest Labs' FLUX Kontext fields (providers.md §4.1 to §4.3).

apicore relays BFL. Its answer to a submit is either the image links at once (OpenAI style, §4.1) or BFL's
asynchronous `{id, polling_url}` (§4.2), after which a webhook arrives in one of the two BFL shapes seen in
the wild (§4.3). Both are read by the same status rules, which reconcile shares.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping
from typing import Any

import httpx

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
from receiver.providers.base import mentions_moderation
from receiver.providers.base import raise_for_http_status
from receiver.providers.base import response_json
from receiver.providers.base import same_origin
from receiver.providers.base import text
from receiver.variables import Flag
from receiver.variables import Plain
from receiver.variables import ProviderVariables
from receiver.variables import Url
from receiver.variables import Variable

ASPECT_RATIOS = ("21:9", "16:9", "4:3", "1:1", "3:4", "9:16", "9:21")
OUTPUT_FORMATS = ("jpeg", "png")
MAX_SAFETY_TOLERANCE = 6
SIGNATURE_HEADER = "x-bfl-signature"
REQUIRE_SIGNATURE = Variable(
    "APICORE_REQUIRE_SIGNATURE",
    Flag(),
    False,
    "`1` refuses every apicore callback without a valid `X-BFL-Signature`",
)
VARIABLES = ProviderVariables(
    key=Variable(
        "APICORE_API_KEY",
        Plain(),
        help="[apicore](providers/apicore.md): your key, sent as `Authorization: Bearer …`",
        secret=True,
    ),
    base_url=Variable(
        "APICORE_BASE_URL",
        Url(),
        "https://api.apicore.ai",
        "where apicore's API lives; also the only host reconcile sends the key to",
    ),
    extra=(REQUIRE_SIGNATURE,),
)
# Our request fields whose BFL names are the same.
BFL_FIELDS = ("seed", "aspect_ratio", "output_format", "prompt_upsampling", "safety_tolerance")
TAKES = Takes(
    frozenset({"model", "images", *BFL_FIELDS, "num_images", "options"}),
    aspect_ratios=ASPECT_RATIOS,
    output_formats=OUTPUT_FORMATS,
    safety_tolerance=Span(0, MAX_SAFETY_TOLERANCE),
    who="apicore",
)
SUCCESS_STATUSES = frozenset({"ready", "success", "succeeded"})
FAILURE_STATUSES = frozenset({"error", "failed", "failure"})
# "Task not found" is pending on purpose: BFL's regional routing can answer it for a task that was just
# accepted, and a wrong verdict would end a task that may still succeed; the task deadline ends a task
# that is truly gone.
PENDING_STATUSES = frozenset({"pending", "processing", "queued", "running", "task not found"})


def bfl_message(body: Mapping[str, Any]) -> str:
    """BFL's reason for a failure: `error`, else `details` (a string, or an object in ResultResponse)."""
    for key in ("error", "details"):
        value = body.get(key)
        if isinstance(value, Mapping):
            message = text(value.get("message")) or json.dumps(value, separators=(", ", ": "))
        else:
            message = text(value)
        if message:
            return message
    return ""


def bfl_outcome(body: Mapping[str, Any]) -> Outcome:
    """The status rules of §4.3, for both webhook shapes (`id`/`Ready` and `task_id`/`SUCCESS`) and for
    get_result's ResultResponse. Raises MalformedCallback when the body has no status to read."""
    status = body.get("status")
    if not isinstance(status, str) or not status.strip():
        raise MalformedCallback("no status in the body")
    task_id = text(body.get("id") or body.get("task_id")) or None
    folded = status.strip().lower()
    detail = f"status {status}"
    if folded in SUCCESS_STATUSES:
        sample = mapping(body.get("result")).get("sample")
        samples = sample if isinstance(sample, list) else [sample]
        urls = tuple(url for url in samples if isinstance(url, str) and url)
        return Outcome.succeeded(task_id, urls, detail)
    if "moderated" in folded:
        error = TaskError(ErrorCode.CONTENT_MODERATED, bfl_message(body) or f"apicore: {status}", status)
        return Outcome.failed(task_id, error, detail)
    if folded in FAILURE_STATUSES:
        # BFL's `Error` also carries content-policy refusals, told apart only by the reason given.
        message = bfl_message(body) or f"apicore: {status}"
        kind = ErrorCode.CONTENT_MODERATED if mentions_moderation(message) else ErrorCode.GENERATION_FAILED
        return Outcome.failed(task_id, TaskError(kind, message, status), detail)
    if folded in PENDING_STATUSES:
        return Outcome.pending(task_id, detail)
    # A status this module does not know changes nothing; reconcile and the deadline still apply.
    return Outcome.pending(task_id, f"{detail} (not a status we know; treated as pending)")


def answer_message(response: httpx.Response) -> str:
    """The reason in an error answer: FastAPI's `detail` (a string or a list of field errors), a
    one-api relay's `error.message`, or the start of the body."""
    try:
        body = json_object(response.content)
    except MalformedCallback:
        return response.text[:200] or "no message"
    detail = body.get("detail")
    if isinstance(detail, list):
        parts = []
        for item in detail:
            entry = mapping(item)
            where = ".".join(text(part) for part in entry.get("loc", []) if part != "body")
            message = text(entry.get("msg")) or text(item)
            parts.append(f"{where}: {message}" if where else message)
        if parts:
            return "; ".join(parts)
    elif detail:
        return text(detail)
    error = body.get("error")
    return text(mapping(error).get("message")) or text(error) or text(body.get("message")) or "no message"


def verify_bfl_signature(headers: Mapping[str, str], raw: bytes, secret: str | None, required: bool) -> None:
    """`X-BFL-Signature: sha256=<hex HMAC-SHA256(webhook_secret, raw body)>`: checked whenever present,
    refused when missing only if required. Without a secret to check with, a signature fails closed."""
    signature = headers.get(SIGNATURE_HEADER)
    if signature is None:
        if required:
            raise CallbackRejected(f"missing X-BFL-Signature ({REQUIRE_SIGNATURE.name}=1)")
        return
    if not secret:
        raise CallbackRejected("this task has no webhook secret to check X-BFL-Signature with")
    scheme, _, given = signature.strip().partition("=")
    if scheme.lower() != "sha256" or not given:
        raise CallbackRejected("X-BFL-Signature is not sha256=<hex>")
    expected = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), given.strip().lower().encode()):
        raise CallbackRejected("X-BFL-Signature does not match")


class Apicore(Provider):
    name = "apicore"
    variables = VARIABLES
    models = KONTEXT_MODELS
    default_model = "flux-kontext-pro"
    fields = TAKES.fields
    max_images = 1
    inline_images = True  # input_image takes a data URI, so uploads go inline
    early_download = True  # BFL delivery links die 10 minutes after the image is ready
    synchronous = True  # its usual answer is the images themselves, after the whole generation
    # BFL's limits per key (providers.md §4.2): 24 active tasks, 6 of them FLUX Kontext Max. apicore
    # relays to BFL, so the same numbers are the safe default; APICORE_MAX_CONCURRENT overrides.
    max_concurrent = 24
    max_concurrent_by_model = {"flux-kontext-max": 6}

    def takes(self, model: str) -> Takes:
        return TAKES

    def new_state(self) -> dict[str, str]:
        # Sent with the submit so BFL can sign its webhook; kept with the task, never shown.
        return {"webhook_secret": secrets.token_urlsafe(32)}

    def build_submit(self, task: TaskSpec, ctx: Context) -> httpx.Request:
        body: dict[str, Any] = {**task.options, "model": task.model, "prompt": task.prompt}
        body.update({name: task.params[name] for name in BFL_FIELDS if name in task.params})
        if task.images:
            body["input_image"] = task.images[0]
        body["webhook_url"] = ctx.callback_url
        if task.state.get("webhook_secret"):
            body["webhook_secret"] = task.state["webhook_secret"]
        return bearer_request(
            "POST", f"{ctx.settings.base_url}/v1/images/generations", ctx.settings.api_key, json=body
        )

    def parse_submit(self, response: httpx.Response) -> Submission:
        raise_for_http_status(response, answer_message(response), synchronous=True)
        body = response_json(response)
        data = body.get("data")
        if isinstance(data, list):
            urls = tuple(text(mapping(item).get("url")) for item in data if mapping(item).get("url"))
            detail = f"synchronous answer with {len(urls)} image link(s)"
            return Submission(provider_task_id=None, outcome=Outcome.succeeded(None, urls, detail))
        task_id = text(body.get("id"))
        if not task_id:
            if body.get("error") or body.get("detail"):
                raise ProviderRejected(answer_message(response))
            raise ProviderRejected("apicore answered with neither image links nor a task id")
        state = {"id": task_id}
        if isinstance(body.get("polling_url"), str) and body["polling_url"]:
            state["polling_url"] = body["polling_url"]
        try:
            outcome: Outcome | None = bfl_outcome(body)
        except MalformedCallback:
            outcome = None  # AsyncResponse carries no status
        if outcome is not None and outcome.state == "pending":
            outcome = None
        return Submission(provider_task_id=task_id, state=state, outcome=outcome)

    def verify_callback(
        self, headers: Mapping[str, str], raw: bytes, task: TaskSpec, ctx: Context, now: float
    ) -> None:
        required = ctx.settings.extra.get(REQUIRE_SIGNATURE.name) == "1"
        verify_bfl_signature(headers, raw, task.state.get("webhook_secret"), required)

    def parse_callback(self, raw: bytes) -> Outcome:
        return bfl_outcome(json_object(raw))

    def build_status(self, task: TaskSpec, ctx: Context) -> httpx.Request | None:
        task_id = task.provider_task_id or task.state.get("id")
        if not task_id:
            return None  # a synchronous answer: nothing to ask about
        key = ctx.settings.api_key
        polling_url = task.state.get("polling_url", "")
        # The query carries our key, so a polling_url elsewhere than the configured host is not followed.
        if polling_url and same_origin(polling_url, ctx.settings.base_url):
            return bearer_request("GET", polling_url, key)
        return bearer_request("GET", f"{ctx.settings.base_url}/v1/get_result", key, params={"id": task_id})

    def parse_status(self, response: httpx.Response) -> Outcome:
        raise_for_http_status(response, answer_message(response))
        try:
            return bfl_outcome(response_json(response))
        except MalformedCallback as exc:
            raise ProviderUnavailable(f"get_result answer unreadable: {exc}") from None
