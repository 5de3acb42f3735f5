"""The built-in sandbox (served by `receiver.sandbox_service`), spoken to like any real provider.

Wire format, ours: POST {base}/sandbox/v1/generate {prompt, seed, aspect_ratio, num_images, image_url,
callback_url, outcome, delay} → {"id"}; the callback and GET {base}/sandbox/v1/tasks/{id} both carry
{"id", "status": "running"|"succeeded"|"failed", "images": [url…], "error": {"code", "message"}}.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import httpx

from receiver.models import ErrorCode
from receiver.models import MalformedCallback
from receiver.models import Outcome
from receiver.models import ProviderRejected
from receiver.models import Submission
from receiver.models import TaskError
from receiver.models import TaskRequest
from receiver.models import TaskSpec
from receiver.providers.base import Context
from receiver.providers.base import Provider
from receiver.providers.base import Span
from receiver.providers.base import Takes
from receiver.providers.base import bearer_request
from receiver.providers.base import json_object
from receiver.providers.base import mapping
from receiver.providers.base import raise_for_http_status
from receiver.providers.base import response_json
from receiver.providers.base import text

RATIO = re.compile(r"^(\d{1,2}):(\d{1,2})$")
OUTCOMES = ("succeeded", "generation_failed", "content_moderated", "no_callback")


def parse_ratio(value: str) -> tuple[int, int] | None:
    match = RATIO.match(value)
    if not match:
        return None
    width, height = int(match.group(1)), int(match.group(2))
    if width < 1 or height < 1 or not 0.25 <= width / height <= 4:
        return None
    return width, height


class Sandbox(Provider):
    name = "sandbox"
    models = ("sandbox",)
    default_model = "sandbox"
    fields = frozenset({"model", "images", "aspect_ratio", "output_format", "seed", "num_images", "options"})
    max_images = 1

    def takes(self, model: str) -> Takes:
        # Any W:H between 1:4 and 4:1 (checked in validate), so no list of ratios here.
        return Takes(self.fields, output_formats=("png",), num_images=Span(1, 4), who="the sandbox")

    def validate(self, request: TaskRequest) -> dict[str, str]:
        errors = super().validate(request)
        params = request.params
        if "aspect_ratio" in params and parse_ratio(params["aspect_ratio"]) is None:
            errors["aspect_ratio"] = "the sandbox takes W:H between 1:4 and 4:1, e.g. 16:9"
        outcome = request.options.get("outcome", "succeeded")
        if outcome not in OUTCOMES:
            errors["options"] = f"options.outcome must be one of {', '.join(OUTCOMES)}"
        delay = request.options.get("delay", 0)
        if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= 600:
            errors["options"] = "options.delay must be 0 to 600 seconds"
        return errors

    def build_submit(self, task: TaskSpec, ctx: Context) -> httpx.Request:
        body: dict[str, Any] = {
            "prompt": task.prompt,
            "seed": task.params.get("seed", 0),
            "aspect_ratio": task.params.get("aspect_ratio", "1:1"),
            "num_images": task.params.get("num_images", 1),
            "image_url": task.images[0] if task.images else None,
            "callback_url": ctx.callback_url,
            "outcome": task.options.get("outcome", "succeeded"),
            "delay": task.options.get("delay"),
        }
        url = f"{ctx.settings.base_url}/sandbox/v1/generate"
        return bearer_request("POST", url, ctx.settings.api_key, json=body)

    def parse_submit(self, response: httpx.Response) -> Submission:
        raise_for_http_status(response, response.text[:200])
        body = response_json(response)
        if not body.get("id"):
            raise ProviderRejected("the sandbox sent no id")
        return Submission(provider_task_id=str(body["id"]))

    def parse_callback(self, raw: bytes) -> Outcome:
        return self._outcome(json_object(raw))

    def build_status(self, task: TaskSpec, ctx: Context) -> httpx.Request | None:
        if not task.provider_task_id:
            return None
        url = f"{ctx.settings.base_url}/sandbox/v1/tasks/{quote(task.provider_task_id, safe='')}"
        return bearer_request("GET", url, ctx.settings.api_key)

    def parse_status(self, response: httpx.Response) -> Outcome:
        raise_for_http_status(response, response.text[:200])
        return self._outcome(response_json(response))

    def _outcome(self, body: dict[str, Any]) -> Outcome:
        task_id = text(body.get("id")) or None
        status = body.get("status")
        images = body.get("images")
        if status == "succeeded" and isinstance(images, list):
            return Outcome.succeeded(task_id, tuple(str(url) for url in images), "succeeded")
        if status == "failed":
            error = mapping(body.get("error"))
            code = (
                ErrorCode.CONTENT_MODERATED
                if error.get("code") == "content_moderated"
                else (ErrorCode.GENERATION_FAILED)
            )
            message = text(error.get("message")) or "the sandbox failed the task"
            return Outcome.failed(
                task_id, TaskError(code, message, text(error.get("code")) or None), "failed"
            )
        if status == "running":
            return Outcome.pending(task_id, "running")
        raise MalformedCallback(f"unknown sandbox status {status!r}")
