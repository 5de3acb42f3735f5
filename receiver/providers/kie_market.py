"""kie.ai Market unified jobs API with the FLUX 2 models (providers.md §2), signed like kie (§2.5).

The Market API shares kie's envelope (body-level `code`, `data.taskId`) and its account-wide HMAC, so
submit answers, task ids and signatures go through kie.py's helpers. What differs is the job shape:
the request nests its fields under `input`, and callbacks and recordInfo report a `state` with the
result links in `resultJson`, a JSON *string*.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import httpx

from receiver.models import ErrorCode
from receiver.models import MalformedCallback
from receiver.models import Outcome
from receiver.models import ProviderUnavailable
from receiver.models import TaskError
from receiver.models import TaskRequest
from receiver.models import TaskSpec
from receiver.providers.base import FLUX2_MODELS
from receiver.providers.base import Context
from receiver.providers.base import Provider
from receiver.providers.base import Takes
from receiver.providers.base import bearer_request
from receiver.providers.base import json_object
from receiver.providers.base import mapping
from receiver.providers.base import mentions_moderation
from receiver.providers.base import present
from receiver.providers.base import text
from receiver.providers.kie import VARIABLES
from receiver.providers.kie import kie_code
from receiver.providers.kie import kie_status_body
from receiver.providers.kie import kie_status_request
from receiver.providers.kie import kie_task_id
from receiver.providers.kie import parse_kie_submit
from receiver.providers.kie import verify_kie_hmac

ASPECT_RATIOS = ("1:1", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3")
MATCH_INPUT = "auto"  # sized like the input images: a text-to-image job refuses it
RESOLUTIONS = ("1K", "2K")
# No seed, output_format, safety_tolerance or prompt_upsampling in the Market schema (§2.1).
TAKES = Takes(
    frozenset({"model", "images", "aspect_ratio", "resolution", "num_images", "options"}),
    aspect_ratios=ASPECT_RATIOS,
    edit_ratios=(MATCH_INPUT,),
    resolutions=RESOLUTIONS,
    who="kie-market",
)
PROMPT_LENGTH = (3, 5000)
# Market model ids are `<family>/<variant>`; this provider sends FLUX 2 jobs only.
FLUX2_MODEL = re.compile(r"^flux-2/[a-z0-9][a-z0-9.-]*$")
MARKET_KINDS = ("text-to-image", "image-to-image")
# Fields this module spells from the request itself; options may not set them behind its back.
SPELLED_INPUT = frozenset({"input_urls", "prompt"})


def market_failure_code(message: str) -> ErrorCode:
    """content_moderated only when the message says a content check stopped it, else
    generation_failed (so a fallback provider gets its turn). kie publishes no list of Market
    failCodes, and "400" is its generic failure on other Market models (providers.md, "Third look"):
    unlike the Kontext API's flagged "400" (kie.failure_code), a code is not evidence of moderation."""
    return ErrorCode.CONTENT_MODERATED if mentions_moderation(message) else ErrorCode.GENERATION_FAILED


def result_urls(value: Any) -> tuple[str, ...]:
    """The links in `resultJson`, in order: a JSON string holding {"resultUrls": [...]}.

    Empty or absent means no links (Outcome.succeeded turns that into a failure); anything else that
    is not that shape raises MalformedCallback.
    """
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        parsed: Mapping[str, Any] = json_object(value)
    elif isinstance(value, Mapping):
        parsed = value  # already decoded: not what kie documents, but its meaning is plain
    else:
        raise MalformedCallback("resultJson is neither a JSON string nor an object")
    urls = parsed.get("resultUrls")
    if urls is None:
        return ()
    # Real answers carry `null` entries for images that did not come out: skipped, order kept.
    if not isinstance(urls, list) or not all(url is None or isinstance(url, str) for url in urls):
        raise MalformedCallback("resultJson.resultUrls is not a list of strings")
    return tuple(url for url in urls if url and present(url))


def job_outcome(data: Mapping[str, Any], task_id: str | None, top_code: str, top_msg: str) -> Outcome:
    """What a job record says, the same for a callback and for recordInfo.

    A top-level code other than 200 is a failure whatever `state` says (the Seedream-style callback
    reports 400/500/501 without failCode); `failCode`/`failMsg`, when present, are the better detail.
    """
    state = text(data.get("state"))  # waiting, queuing, generating, success, fail (§2.3)
    detail = f"code {top_code}, state {state or '-'}"
    if top_code == "200" and state == "success":
        return Outcome.succeeded(task_id, result_urls(data.get("resultJson")), detail)
    if top_code == "200" and state != "fail":
        return Outcome.pending(task_id, detail)
    provider_code = present(data.get("failCode")) or (top_code if top_code != "200" else "")
    message = present(data.get("failMsg")) or top_msg or "kie reported a failed job"
    error = TaskError(market_failure_code(message), message, provider_code or None)
    return Outcome.failed(task_id, error, detail)


class KieMarket(Provider):
    name = "kie-market"
    variables = VARIABLES  # kie's own: one account
    models = FLUX2_MODELS
    native_models = tuple(f"flux-2/{tier}-{kind}" for tier in ("pro", "flex") for kind in MARKET_KINDS)
    default_model = "flux-2/pro-image-to-image"
    accepts_any_model = True  # other FLUX 2 Market ids by id; validate() keeps them to flux-2/…
    native_hint = "another FLUX 2 Market id (flux-2/<variant>)"
    fields = TAKES.fields
    max_images = 8
    pace_group = "kie"  # one kie account, one limit for both APIs (§1.5); the group's limits are kie's

    def model_for(self, has_images: bool) -> str:
        # The v1 default (pro image-to-image) when images are given, its text-to-image twin otherwise.
        return self.native_model("flux-2-pro", has_images)

    def native_model(self, model: str, has_images: bool) -> str:
        if model in FLUX2_MODELS:
            tier = model.removeprefix("flux-2-")
            return f"flux-2/{tier}-{MARKET_KINDS[1] if has_images else MARKET_KINDS[0]}"
        return model

    def image_range(self, model: str) -> tuple[int, int]:
        # An image-to-image job needs 1 to 8 input_urls (§2.1); a text-to-image job takes none.
        if model.endswith(MARKET_KINDS[0]):
            return 0, 0
        if model.endswith(MARKET_KINDS[1]):
            return 1, self.max_images
        return 0, self.max_images

    def takes(self, model: str) -> Takes:
        return TAKES

    def validate(self, request: TaskRequest) -> dict[str, str]:
        errors = super().validate(request)
        shortest, longest = PROMPT_LENGTH
        if not shortest <= len(request.prompt) <= longest:
            errors["prompt"] = f"kie-market takes {shortest} to {longest} characters"
        model = request.model
        if model is not None and model not in FLUX2_MODELS and not FLUX2_MODEL.match(model):
            errors["model"] = f"kie-market sells {self.sells()}"
        clashing = sorted(SPELLED_INPUT & set(request.options))
        if clashing:
            errors["options"] = f"{', '.join(clashing)} come from the request's prompt and images"
        return errors

    def build_submit(self, task: TaskSpec, ctx: Context) -> httpx.Request:
        # aspect_ratio and resolution are required by the schema: the request's value, else an
        # option's, else the documented default.
        job_input: dict[str, Any] = {"aspect_ratio": "1:1", "resolution": "1K", **task.options}
        for field in ("aspect_ratio", "resolution"):
            if field in task.params:
                job_input[field] = task.params[field]
        if task.images:
            job_input["input_urls"] = list(task.images)
        job_input["prompt"] = task.prompt
        model = self.native_model(task.model, bool(task.images))
        return bearer_request(
            "POST",
            f"{ctx.settings.base_url}/api/v1/jobs/createTask",
            ctx.settings.api_key,
            json={"model": model, "callBackUrl": ctx.callback_url, "input": job_input},
        )

    # kie's submit answer and callback signature are the same for both of its APIs.
    parse_submit = staticmethod(parse_kie_submit)
    verify_callback = staticmethod(verify_kie_hmac)

    def parse_callback(self, raw: bytes) -> Outcome:
        body = json_object(raw)
        if "code" not in body:
            raise MalformedCallback("no code in the callback")
        data = body.get("data")
        if data is not None and not isinstance(data, Mapping):
            raise MalformedCallback("data in the callback is not an object")
        code = kie_code(body["code"])
        top_code = text(body["code"]) if code is None else str(code)
        return job_outcome(mapping(data), kie_task_id(body), top_code, present(body.get("msg")))

    def build_status(self, task: TaskSpec, ctx: Context) -> httpx.Request | None:
        return kie_status_request(task, ctx, "/api/v1/jobs/recordInfo")

    def parse_status(self, response: httpx.Response) -> Outcome:
        body = kie_status_body(response, "recordInfo")
        try:
            # The answer's code is the query's (200 here); the job's own fate is in `state`.
            return job_outcome(mapping(body.get("data")), kie_task_id(body), "200", "")
        except MalformedCallback as exc:
            raise ProviderUnavailable(f"recordInfo answer unreadable: {exc}") from None
