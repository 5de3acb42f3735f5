"""A kie.ai fake speaking providers.md §1 (Flux Kontext) and §2.5 (HMAC-signed callbacks).

KieFamilyFake holds what kie's two APIs share; tests/fakes/kie_market.py builds the Market fake on it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
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

GENERATE = "/api/v1/flux/kontext/generate"
RECORD_INFO = "/api/v1/flux/kontext/record-info"
KEY = "kie-test-key"
HMAC_KEY = "kie-hmac-secret"


def kie_signature(key: str, task_id: str, timestamp: int | None = None) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(key.encode(), f"{task_id}.{ts}".encode(), hashlib.sha256).digest()
    return {"X-Webhook-Timestamp": ts, "X-Webhook-Signature": base64.b64encode(digest).decode()}


class KieFamilyFake(ProviderFake):
    """What kie's APIs share: Bearer auth, body-level codes, a submit that remembers callBackUrl, a
    status query by taskId and HMAC-signed callbacks. Subclasses give the paths and the job shapes."""

    signs = True
    status_path = ""

    def __init__(self, hmac_key: str | None = HMAC_KEY, real_world: bool = False) -> None:
        self.hmac_key = hmac_key
        # Spell answers the way real integrations saw them rather than as documented: `code` as a
        # string, absent record-info fields as the string "null", times as strings (providers.md,
        # "Evidence from real integrations").
        self.real_world = real_world
        self.ids = itertools.count(1)
        self.callback_urls: dict[str, str] = {}  # kie task id -> our callBackUrl
        self.records: dict[str, dict[str, Any]] = {}  # kie task id -> record-info data
        super().__init__()

    def receiver_env(self) -> dict[str, str]:
        env = {"KIE_API_KEY": KEY, "KIE_BASE_URL": self.url}
        if self.hmac_key:
            env["KIE_WEBHOOK_HMAC_KEY"] = self.hmac_key
        return env

    def routes(self) -> list[Route]:
        return [
            Route(self.submit_path, self.generate, methods=["POST"]),
            Route(self.status_path, self.record_info, methods=["GET"]),
        ]

    async def generate(self, request: Request) -> Response:
        recorded = await self.record(request)
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"code": 401, "msg": "You do not have access permissions"})
        scripted = self.scripted_answer(self.submit_path)
        if scripted is not None:
            return scripted
        refused = self.refusal(recorded.json())
        if refused is not None:
            return JSONResponse({"code": 422, "msg": refused})
        task_id = self.new_task_id()
        self.records[task_id] = self.new_record(task_id, recorded.json())
        self.callback_urls[task_id] = recorded.json()["callBackUrl"]
        await self.held()
        code = "200" if self.real_world else 200
        return JSONResponse({"code": code, "msg": "success", "data": {"taskId": task_id}})

    async def record_info(self, request: Request) -> Response:
        await self.record(request)
        scripted = self.scripted_answer(self.status_path)
        if scripted is not None:
            return scripted
        task_id = request.query_params.get("taskId", "")
        data = self.records.get(task_id)
        if data is None:
            return JSONResponse({"code": 404, "msg": "task not found"})
        return JSONResponse({"code": 200, "msg": "success", "data": self.status_data(data)})

    def new_task_id(self) -> str:
        raise NotImplementedError

    def refusal(self, submitted: Any) -> str | None:
        """Why kie would refuse this submit body (its `msg` with code 422), or None."""
        return None

    def new_record(self, task_id: str, submitted: Any) -> dict[str, Any]:
        """The job as the status query will show it, right after the submit."""
        raise NotImplementedError

    def status_data(self, record: dict[str, Any]) -> dict[str, Any]:
        return record

    # -- what kie sends ----------------------------------------------------------------------------

    def last_task_id(self) -> str:
        return sorted(self.callback_urls)[-1]

    def provider_task_id(self) -> str:
        self.wait_for(lambda: bool(self.callback_urls))
        return self.last_task_id()

    def signature_headers(
        self, task_id: str, timestamp: int | None = None, key: str | None = None
    ) -> dict[str, str]:
        key = key or self.hmac_key
        assert key is not None
        return kie_signature(key, task_id, timestamp)

    def send(self, task_id: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
        """POST `body` to the callback URL kie was given for `task_id`, signed when an HMAC key is set."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.deliver(task_id, raw, headers)

    def deliver(self, task_id: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        signed = self.signature_headers(task_id) if self.hmac_key and headers is None else {}
        return post_callback(self.callback_urls[task_id], body, {**signed, **(headers or {})})

    def forged_headers(self, task_id: str, body: bytes) -> dict[str, str]:
        return self.signature_headers(task_id, key="not-the-key")

    def malformed_body(self, task_id: str) -> bytes:
        return json.dumps({"data": {"taskId": task_id}}).encode()  # signable, but no code


class KieFake(KieFamilyFake):
    name = "kie"
    submit_path = GENERATE
    status_path = RECORD_INFO

    def new_task_id(self) -> str:
        return f"task{next(self.ids):05d}"

    def new_record(self, task_id: str, submitted: Any) -> dict[str, Any]:
        return {"taskId": task_id, "successFlag": 0, "response": None, "errorCode": None, "errorMessage": ""}

    def status_data(self, record: dict[str, Any]) -> dict[str, Any]:
        data = {**record, "paramJson": "{}", "createTime": 1710000000000, "completeTime": None}
        if self.real_world:
            data.update(createTime="2026-01-06 08:16:51", completeTime="2026-01-06 08:17:04")
            data.update({key: "null" for key in ("errorCode", "errorMessage") if not data.get(key)})
            if data.get("response"):
                data["response"] = {**data["response"], "originImageUrl": "null"}
        return data

    def success_body(self, task_id: str, url: str) -> dict[str, Any]:
        return {
            "code": "200" if self.real_world else 200,
            "msg": "BFL image generated successfully.",
            "data": {"taskId": task_id, "info": {"originImageUrl": url + "?origin", "resultImageUrl": url}},
        }

    @staticmethod
    def failure_body(task_id: str, code: int, msg: str) -> dict[str, Any]:
        return {
            "code": code,
            "msg": msg,
            "data": {"taskId": task_id, "info": {"originImageUrl": "", "resultImageUrl": ""}},
        }

    def succeed(self, task_id: str, url: str) -> httpx.Response:
        response = self.complete(task_id, [url])
        assert response is not None
        return response

    def complete(self, task_id: str, urls: list[str], deliver: bool = True) -> httpx.Response | None:
        self.records[task_id].update(
            successFlag=1, response={"originImageUrl": urls[0], "resultImageUrl": urls[0]}
        )
        return self.send(task_id, self.success_body(task_id, urls[0])) if deliver else None

    def fail(
        self, task_id: str, moderated: bool, message: str, deliver: bool = True
    ) -> httpx.Response | None:
        self.records[task_id].update(successFlag=3, errorCode=400 if moderated else 501, errorMessage=message)
        return (
            self.send(task_id, self.failure_body(task_id, 400 if moderated else 501, message))
            if deliver
            else None
        )
