"""An apimart fake speaking providers.md §3: `/v1/images/generations`, `/v1/tasks/{id}`, one-api style
error envelopes, and unsigned callbacks POSTed to `<webhook> + "/callback"`."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.common import ProviderFake
from tests.fakes.common import post_callback

GENERATIONS = "/v1/images/generations"
TASKS = "/v1/tasks/"
KEY = "apimart-test-key"
LINK_LIFE = 24 * 3600


def error_envelope(message: str, code: str = "", kind: str = "apimart_error") -> dict[str, Any]:
    """apimart's error answer (§3.5), as its real probe showed it."""
    return {"error": {"code": code, "message": message, "param": "", "type": kind}}


def callback_target(webhook: str) -> str:
    """Where apimart POSTs: the webhook it was given plus "/callback", a trailing slash normalised."""
    return webhook.rstrip("/") + "/callback"


FLUX2_MODELS = ("flux-2-pro", "flux-2-flex")
FLUX2_SIZES = ("1:1", "4:3", "3:4", "16:9", "9:16", "3:2", "2:3")


def refusal(body: dict[str, Any]) -> str | None:
    """What apimart's generations endpoint would refuse in `body` (its model pages), or None."""
    urls = body.get("image_urls", [])
    if not isinstance(urls, list) or not all(isinstance(url, str) and url.startswith("http") for url in urls):
        return "image_urls must be a list of public URLs"
    if body.get("model") in FLUX2_MODELS:
        if "size" in body and body["size"] not in FLUX2_SIZES:
            return f"invalid size {body['size']!r} for {body['model']}"
        if "resolution" in body and str(body["resolution"]).upper() not in ("1K", "2K"):
            return f"invalid resolution {body['resolution']!r}"
        if len(urls) > 8:
            return "at most 8 reference images"
    elif len(urls) > 1:
        return "only 1 image supported"
    return None


class ApimartFake(ProviderFake):
    name = "apimart"
    signs = False
    submit_path = GENERATIONS

    def __init__(self, wrapped: bool = False) -> None:
        self.wrapped = wrapped  # send callbacks as {code, data} instead of the bare task object
        self.ids = itertools.count(1)
        self.webhooks: dict[str, str] = {}  # apimart task id -> the webhook we were given
        self.tasks: dict[str, dict[str, Any]] = {}  # apimart task id -> the task object
        super().__init__()

    def receiver_env(self) -> dict[str, str]:
        return {"APIMART_API_KEY": KEY, "APIMART_BASE_URL": self.url}

    def routes(self) -> list[Route]:
        return [
            Route(GENERATIONS, self.generate, methods=["POST"]),
            Route(TASKS + "{task_id}", self.task_status, methods=["GET"]),
        ]

    def authorised(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {KEY}"

    async def generate(self, request: Request) -> Response:
        recorded = await self.record(request)
        if not self.authorised(request):
            return JSONResponse(error_envelope("invalid API key (request id: fake)"), status_code=401)
        scripted = self.scripted_answer(GENERATIONS)
        if scripted is not None:
            return scripted
        refused = refusal(recorded.json())
        if refused is not None:
            return JSONResponse(error_envelope(refused, "invalid_request"), status_code=400)
        task_id = f"task_01FAKE{next(self.ids):020d}"
        self.tasks[task_id] = {
            "id": task_id,
            "status": "submitted",
            "progress": 0,
            "created": int(time.time()),
        }
        self.webhooks[task_id] = recorded.json().get("webhook", "")
        await self.held()
        return JSONResponse({"code": 200, "data": [{"status": "submitted", "task_id": task_id}]})

    async def task_status(self, request: Request) -> Response:
        await self.record(request)
        if not self.authorised(request):
            return JSONResponse(error_envelope("invalid API key (request id: fake)"), status_code=401)
        scripted = self.scripted_answer(request.url.path)
        if scripted is not None:
            return scripted
        task = self.tasks.get(request.path_params["task_id"])
        if task is None:
            return JSONResponse(error_envelope("task not found", "task_not_found"), status_code=404)
        return JSONResponse({"code": 200, "data": task})

    # -- what apimart sends ------------------------------------------------------------------------

    def provider_task_id(self) -> str:
        self.wait_for(lambda: bool(self.webhooks))
        return sorted(self.webhooks)[-1]

    def callback_body(self, task_id: str, wrapped: bool | None = None) -> dict[str, Any]:
        """The webhook payload: the task-status `data` object, bare by default (the doc's example)."""
        task = dict(self.tasks[task_id])
        return {"code": 200, "data": task} if (self.wrapped if wrapped is None else wrapped) else task

    def send(self, task_id: str, wrapped: bool | None = None) -> httpx.Response:
        return self.deliver(task_id, json.dumps(self.callback_body(task_id, wrapped)).encode())

    def deliver(self, task_id: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        return post_callback(callback_target(self.webhooks[task_id]), body, headers)

    def malformed_body(self, task_id: str) -> bytes:
        return json.dumps({"id": task_id, "progress": 100}).encode()  # no status

    def finish(self, task_id: str, **fields: Any) -> None:
        now = int(time.time())
        self.tasks[task_id].update(
            progress=100, completed=now, actual_time=now - self.tasks[task_id]["created"]
        )
        self.tasks[task_id].update(fields)

    def complete_images(
        self, task_id: str, images: list[list[str]], deliver: bool = True
    ) -> httpx.Response | None:
        """Complete with these images, each one's `url` array as given."""
        expires = int(time.time()) + LINK_LIFE
        result = {"images": [{"url": urls, "expires_at": expires} for urls in images]}
        self.finish(task_id, status="completed", cost=0.006, credits_cost=0.06, result=result)
        return self.send(task_id) if deliver else None

    def complete(self, task_id: str, urls: list[str], deliver: bool = True) -> httpx.Response | None:
        return self.complete_images(task_id, [[url] for url in urls], deliver)

    def fail(
        self, task_id: str, moderated: bool, message: str, deliver: bool = True
    ) -> httpx.Response | None:
        kind = "content_policy_violation" if moderated else "task_failed"
        self.finish(
            task_id, status="failed", error={"message": message, "type": kind, "param": "", "code": kind}
        )
        return self.send(task_id) if deliver else None

    def cancel(self, task_id: str) -> None:
        """apimart's webhook fires only on completed and failed: a cancelled task shows in status only."""
        self.finish(task_id, status="cancelled")
