"""An apicore fake speaking providers.md §4: BFL's fields on /v1/images/generations, answered either
synchronously (OpenAI-style image links) or asynchronously ({id, polling_url}, then a webhook signed with
`X-BFL-Signature` in one of the two BFL shapes of §4.3), and BFL's /v1/get_result for reconcile."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import time
from typing import Any
from typing import Literal

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.common import ProviderFake
from tests.fakes.common import post_callback

GENERATIONS = "/v1/images/generations"
GET_RESULT = "/v1/get_result"
KEY = "apicore-test-key"
# What each BFL webhook shape of §4.3 calls things: (id field, success, failure, moderated, pending).
SHAPES = {
    "id": ("id", "Ready", "Error", "Content Moderated", "Pending"),
    "task_id": ("task_id", "SUCCESS", "FAILED", "GENERATED CONTENT MODERATED", "processing"),
}
Shape = Literal["id", "task_id"]


def bfl_signature(secret: str, body: bytes) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {"X-BFL-Signature": f"sha256={digest}"}


class ApicoreFake(ProviderFake):
    name = "apicore"
    signs = True
    submit_path = GENERATIONS

    def __init__(
        self,
        synchronous: bool = False,
        shape: Shape = "id",
        signing: bool = True,
        webhook_answer: bool = False,
    ) -> None:
        self.synchronous = synchronous  # answer the submit with the image links themselves
        self.shape = shape  # which BFL webhook shape the callbacks take
        self.signs = signing
        self.webhook_answer = webhook_answer  # answer AsyncWebhookResponse {id, status, webhook_url}
        self.polling_origin: str | None = None  # where polling_url points (default: this server)
        self.sync_urls: list[str] = []  # the links a synchronous answer gives (default: one fresh image)
        self.ids = itertools.count(1)
        self.webhooks: dict[str, tuple[str, str]] = {}  # task id -> (webhook_url, webhook_secret)
        self.records: dict[str, dict[str, Any]] = {}  # task id -> ResultResponse
        super().__init__()

    def receiver_env(self) -> dict[str, str]:
        return {
            "APICORE_API_KEY": KEY,
            "APICORE_BASE_URL": self.url,
            "APICORE_REQUIRE_SIGNATURE": "1" if self.signs else "0",
        }

    def routes(self) -> list[Route]:
        return [
            Route(GENERATIONS, self.generations, methods=["POST"]),
            Route(GET_RESULT, self.get_result, methods=["GET"]),
        ]

    async def generations(self, request: Request) -> Response:
        recorded = await self.record(request)
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"detail": "Not authenticated"}, status_code=401)
        scripted = self.scripted_answer(GENERATIONS)
        if scripted is not None:
            return scripted
        body = recorded.json()
        if self.synchronous:
            urls = self.sync_urls or [self.host(f"sync-{time.monotonic_ns()}.png")]
            await self.held()
            return JSONResponse({"created": int(time.time()), "data": [{"url": url} for url in urls]})
        task_id = f"bfl-{next(self.ids):05d}"
        self.records[task_id] = {
            "id": task_id,
            "status": "Pending",
            "result": None,
            "progress": 0.1,
            "details": None,
            "preview": None,
        }
        self.webhooks[task_id] = (body["webhook_url"], body.get("webhook_secret", ""))
        await self.held()
        if self.webhook_answer:
            return JSONResponse(
                {"id": task_id, "status": "Pending", "webhook_url": body["webhook_url"], "cost": 4.0}
            )
        origin = self.polling_origin or self.url
        return JSONResponse(
            {
                "id": task_id,
                "polling_url": f"{origin}{GET_RESULT}?id={task_id}",
                "cost": 4.0,
                "input_mp": 1.05 if body.get("input_image") else 0.0,
                "output_mp": 1.05,
            }
        )

    async def get_result(self, request: Request) -> Response:
        await self.record(request)
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"detail": "Not authenticated"}, status_code=401)
        scripted = self.scripted_answer(GET_RESULT)
        if scripted is not None:
            return scripted
        task_id = request.query_params.get("id", "")
        return JSONResponse(self.records.get(task_id, {"id": task_id, "status": "Task not found"}))

    # -- what apicore sends ------------------------------------------------------------------------

    def provider_task_id(self) -> str:
        self.wait_for(lambda: bool(self.webhooks))
        return sorted(self.webhooks)[-1]

    def webhook_secret(self, task_id: str) -> str:
        return self.webhooks[task_id][1]

    def callback_body(self, task_id: str, status: str, **fields: Any) -> dict[str, Any]:
        """A webhook in this fake's BFL shape; `status` is one of success, failure, moderated, pending."""
        id_field, success, failure, moderated, pending = SHAPES[self.shape]
        spelled = {"success": success, "failure": failure, "moderated": moderated, "pending": pending}
        body: dict[str, Any] = {id_field: task_id, "status": spelled[status], **fields}
        if self.shape == "id":
            body["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return body

    def send(self, task_id: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.deliver(task_id, raw, headers)

    def deliver(self, task_id: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        url, secret = self.webhooks[task_id]
        signed = bfl_signature(secret, body) if self.signs and headers is None else {}
        return post_callback(url, body, {**signed, **(headers or {})})

    def forged_headers(self, task_id: str, body: bytes) -> dict[str, str]:
        return bfl_signature("not-the-webhook-secret-of-this-task", body)

    def malformed_body(self, task_id: str) -> bytes:
        return json.dumps({"hello": task_id}).encode()  # signable, but no status

    def complete(self, task_id: str, urls: list[str], deliver: bool = True) -> httpx.Response | None:
        result = {
            "sample": urls[0],
            "prompt": "a lighthouse at dusk",
            "seed": 42,
            "start_time": 1718000000.1,
            "end_time": 1718000008.2,
            "duration": 8.1,
        }
        self.records[task_id].update(status="Ready", result=result, progress=None)
        return self.send(task_id, self.callback_body(task_id, "success", result=result)) if deliver else None

    def fail(
        self, task_id: str, moderated: bool, message: str, deliver: bool = True
    ) -> httpx.Response | None:
        status = "Content Moderated" if moderated else "Error"
        self.records[task_id].update(status=status, details={"message": message}, progress=None)
        kind = "moderated" if moderated else "failure"
        return self.send(task_id, self.callback_body(task_id, kind, error=message)) if deliver else None
