"""A fal.ai fake speaking providers.md §5: the queue (submit with `?fal_webhook=`, status, result, cancel), a
JWKS, and webhooks signed with Ed25519 exactly as fal signs them (§5.3)."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.hazmat.primitives.serialization import PublicFormat
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.responses import Response
from starlette.routing import Route

from tests.fakes.common import ProviderFake
from tests.fakes.common import post_callback

KEY = "fal-test-key:secret"
USER_ID = "fal-user-1234"
JWKS_PATH = "/.well-known/jwks.json"
BIG_SEED = 17454220438242315174  # a real fal seed: more than 64 bits signed, as in §5.2's capture


def public_jwk(key: Ed25519PrivateKey) -> dict[str, str]:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": x[:8], "use": "sig", "alg": "EdDSA"}


def fal_signature(
    key: Ed25519PrivateKey, request_id: str, body: bytes, timestamp: int | None = None, user_id: str = USER_ID
) -> dict[str, str]:
    """The four headers fal sends: Ed25519 over request_id, user_id, timestamp and sha256hex(body)."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    message = f"{request_id}\n{user_id}\n{ts}\n{hashlib.sha256(body).hexdigest()}".encode()
    return {
        "X-Fal-Webhook-Request-Id": request_id,
        "X-Fal-Webhook-User-Id": user_id,
        "X-Fal-Webhook-Timestamp": ts,
        "X-Fal-Webhook-Signature": key.sign(message).hex(),
    }


def wire(body: dict[str, Any]) -> bytes:
    """fal's webhook bytes: Python json.dumps with sorted keys (the real capture in §5.2)."""
    return json.dumps(body, sort_keys=True).encode()


FLUX2_ENDPOINTS = ("fal-ai/flux-2-pro", "fal-ai/flux-2-flex")
IMAGE_SIZES = ("square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9")
# Fields of fal's FLUX 2 input schemas (its model pages); anything else fal ignores without a word.
FLUX2_FIELDS = frozenset(
    {
        "prompt",
        "image_size",
        "seed",
        "safety_tolerance",
        "enable_safety_checker",
        "output_format",
        "sync_mode",
    }
)
FLEX_FIELDS = frozenset({"guidance_scale", "num_inference_steps", "enable_prompt_expansion"})


def number_in(value: Any, low: float, high: float, whole: bool = False) -> bool:
    kinds = int if whole else int | float
    return isinstance(value, kinds) and not isinstance(value, bool) and low <= value <= high


def flux2_problems(endpoint: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """What fal's FLUX 2 schema would refuse in `body` (FastAPI-style `detail` items for its 422), and
    the fields it would silently ignore."""
    edit = endpoint.endswith("/edit")
    flex = endpoint.startswith("fal-ai/flux-2-flex")
    known = FLUX2_FIELDS | (FLEX_FIELDS if flex else frozenset()) | ({"image_urls"} if edit else frozenset())
    problems: list[tuple[str, str]] = []
    size = body.get("image_size")
    sizes = (*IMAGE_SIZES, "auto") if edit else IMAGE_SIZES
    if size is not None and not (
        size in sizes
        or (
            isinstance(size, dict)
            and set(size) == {"width", "height"}
            and all(number_in(size[side], 1, 14142, whole=True) for side in ("width", "height"))
        )
    ):
        problems.append(("image_size", f"Input should be one of {', '.join(sizes)} or an ImageSize"))
    if "safety_tolerance" in body and body["safety_tolerance"] not in ("1", "2", "3", "4", "5"):
        problems.append(("safety_tolerance", "Input should be '1', '2', '3', '4' or '5'"))
    if "output_format" in body and body["output_format"] not in ("jpeg", "png"):
        problems.append(("output_format", "Input should be 'jpeg' or 'png'"))
    if flex and "guidance_scale" in body and not number_in(body["guidance_scale"], 1.5, 10):
        problems.append(("guidance_scale", "Input should be between 1.5 and 10"))
    if flex and "num_inference_steps" in body and not number_in(body["num_inference_steps"], 2, 50, True):
        problems.append(("num_inference_steps", "Input should be between 2 and 50"))
    urls = body.get("image_urls")
    if edit and not (isinstance(urls, list) and urls and all(isinstance(url, str) for url in urls)):
        problems.append(("image_urls", "Field required: a list of image URLs"))
    detail = [{"loc": ["body", name], "msg": msg, "type": "value_error"} for name, msg in problems]
    return detail, sorted(set(body) - known)


@dataclass
class QueuedRequest:
    endpoint: str
    webhook: str
    body: dict[str, Any]
    status: str = "IN_QUEUE"
    result: tuple[int, Any] | None = None  # what the result endpoint answers once COMPLETED
    status_extra: dict[str, Any] = field(default_factory=dict)  # e.g. error/error_type on COMPLETED


class FalFake(ProviderFake):
    name = "fal"
    signs = True
    submit_path = "/fal-ai/flux-pro/kontext/text-to-image"

    def __init__(self, webhook_answer: bool = False) -> None:
        # fal's answer to a submit with fal_webhook, per its webhooks doc: only request_id and
        # gateway_request_id, no queue URLs (providers.md §5.1).
        self.webhook_answer = webhook_answer
        self.signing_key = Ed25519PrivateKey.generate()
        self.published: list[Ed25519PrivateKey] = [self.signing_key]  # keys the JWKS lists
        self.jwks_down = False
        self.queue: dict[str, QueuedRequest] = {}  # request_id -> the request
        self.order: list[str] = []
        self.ignored: list[str] = []  # fields of FLUX 2 bodies that fal would have dropped silently
        super().__init__()

    def receiver_env(self) -> dict[str, str]:
        return {"FAL_KEY": KEY, "FAL_QUEUE_URL": self.url, "FAL_JWKS_URL": self.url + JWKS_PATH}

    def routes(self) -> list[Route]:
        return [
            Route(JWKS_PATH, self.jwks, methods=["GET"]),
            Route("/{owner}/{alias}/requests/{request_id}/status", self.status, methods=["GET"]),
            Route("/{owner}/{alias}/requests/{request_id}/cancel", self.cancel, methods=["PUT"]),
            Route("/{owner}/{alias}/requests/{request_id}", self.result, methods=["GET"]),
            Route("/{endpoint:path}", self.submit, methods=["POST"]),
        ]

    # -- the queue ---------------------------------------------------------------------------------

    def urls(self, endpoint: str, request_id: str) -> dict[str, str]:
        owner_alias = "/".join(endpoint.split("/")[:2])  # fal drops the subpath (§5.1)
        base = f"{self.url}/{owner_alias}/requests/{request_id}"
        return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}

    def unauthorised(self, request: Request) -> Response | None:
        if request.headers.get("authorization") == f"Key {KEY}":
            return None
        return JSONResponse({"detail": "No user found for Key ID and Secret"}, status_code=401)

    async def submit(self, request: Request) -> Response:
        recorded = await self.record(request)
        refused = self.unauthorised(request)
        if refused is not None:
            return refused
        scripted = self.scripted_answer(recorded.path)
        if scripted is not None:
            return scripted
        request_id = str(uuid.uuid4())
        endpoint = request.path_params["endpoint"]
        if endpoint.startswith(FLUX2_ENDPOINTS):
            detail, ignored = flux2_problems(endpoint, recorded.json())
            self.ignored += ignored
            if detail:
                return JSONResponse({"detail": detail}, status_code=422)
        self.queue[request_id] = QueuedRequest(
            endpoint, recorded.query.get("fal_webhook", ""), recorded.json()
        )
        self.order.append(request_id)
        await self.held()
        if self.webhook_answer:
            return JSONResponse({"request_id": request_id, "gateway_request_id": request_id})
        return JSONResponse(
            {
                "status": "IN_QUEUE",
                "request_id": request_id,
                "queue_position": 0,
                **self.urls(endpoint, request_id),
            }
        )

    async def queued_or_answer(self, request: Request, missing: Any = None) -> QueuedRequest | Response:
        """The queued request a status, result or cancel URL names, or the answer that replaces it
        (`missing`: the body of its 404)."""
        await self.record(request)
        refused = self.unauthorised(request)
        scripted = refused or self.scripted_answer(request.url.path)
        if scripted is not None:
            return scripted
        queued = self.queue.get(request.path_params["request_id"])
        owner_alias = f"{request.path_params['owner']}/{request.path_params['alias']}"
        if queued is None or not queued.endpoint.startswith(owner_alias + "/"):
            return JSONResponse(missing or {"detail": "Request not found"}, status_code=404)
        return queued

    async def status(self, request: Request) -> Response:
        queued = await self.queued_or_answer(request)
        if isinstance(queued, Response):
            return queued
        request_id = request.path_params["request_id"]
        answer: dict[str, Any] = {
            "status": queued.status,
            "request_id": request_id,
            **self.urls(queued.endpoint, request_id),
        }
        if queued.status == "IN_QUEUE":
            answer["queue_position"] = 0
        if queued.status == "COMPLETED":
            answer.update(logs=None, metrics={"inference_time": 1.2}, **queued.status_extra)
        return JSONResponse(answer)

    async def cancel(self, request: Request) -> Response:
        """fal's queue cancel (its "Cancel a request" page): 202 CANCELLATION_REQUESTED for a request in
        the queue or in progress (it is then CANCELLED here, so the test can see it), 400
        ALREADY_COMPLETED once it is done, 404 NOT_FOUND for one it does not know."""
        queued = await self.queued_or_answer(request, {"status": "NOT_FOUND"})
        if isinstance(queued, Response):
            return queued
        if queued.status == "COMPLETED":
            return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
        queued.status = "CANCELLED"
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)

    async def result(self, request: Request) -> Response:
        queued = await self.queued_or_answer(request)
        if isinstance(queued, Response):
            return queued
        if queued.status != "COMPLETED" or queued.result is None:
            return JSONResponse({"detail": "Request is still in progress"}, status_code=400)
        status, body = queued.result
        headers = {"X-Fal-Retryable": "false"} if status >= 400 else {}
        return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)

    async def jwks(self, request: Request) -> Response:
        await self.record(request)
        if self.jwks_down:
            return JSONResponse({"detail": "unavailable"}, status_code=503)
        return JSONResponse({"keys": [public_jwk(key) for key in self.published]})

    def rotate(self, keep_old: bool = False) -> None:
        """Sign with a new key from now on; the JWKS lists it (and the old one if `keep_old`)."""
        self.signing_key = Ed25519PrivateKey.generate()
        self.published = [*self.published, self.signing_key] if keep_old else [self.signing_key]

    # -- what fal sends ----------------------------------------------------------------------------

    def provider_task_id(self) -> str:
        self.wait_for(lambda: bool(self.order))
        return self.order[-1]

    @staticmethod
    def output(urls: list[str]) -> dict[str, Any]:
        """The model's output JSON (§5.1), with a seed past 64 bits like the real capture."""
        return {
            "has_nsfw_concepts": [False] * len(urls),
            "images": [{"content_type": "image/png", "height": 48, "url": url, "width": 64} for url in urls],
            "prompt": "a lighthouse at dusk",
            "seed": BIG_SEED,
            "timings": {"inference": 2.107286686077714},
        }

    @staticmethod
    def envelope(request_id: str, status: str, payload: Any, **more: Any) -> bytes:
        return wire(
            {
                "error": None,
                "gateway_request_id": request_id,
                "payload": payload,
                "request_id": request_id,
                "status": status,
                **more,
            }
        )

    def signed(self, request_id: str, body: bytes, **kwargs: Any) -> dict[str, str]:
        return fal_signature(self.signing_key, request_id, body, **kwargs)

    def deliver(self, task_id: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        sent = self.signed(task_id, body) if headers is None else headers
        return post_callback(self.queue[task_id].webhook, body, sent)

    def forged_headers(self, task_id: str, body: bytes) -> dict[str, str]:
        return fal_signature(Ed25519PrivateKey.generate(), task_id, body)

    def malformed_body(self, task_id: str) -> bytes:
        return wire({"request_id": task_id, "gateway_request_id": task_id})  # signable, but no status

    def complete(self, task_id: str, urls: list[str], deliver: bool = True) -> httpx.Response | None:
        queued = self.queue[task_id]
        queued.status, queued.result = "COMPLETED", (200, self.output(urls))
        return self.deliver(task_id, self.envelope(task_id, "OK", self.output(urls))) if deliver else None

    def complete_flagged(self, task_id: str, urls: list[str], flags: list[bool]) -> httpx.Response:
        """Success as fal reports it when its safety checker flags images: `has_nsfw_concepts[i]` true
        and a black image in their place (gokayfem/ComfyUI-fal-API issue 4)."""
        output = {**self.output(urls), "has_nsfw_concepts": flags}
        queued = self.queue[task_id]
        queued.status, queued.result = "COMPLETED", (200, output)
        return self.deliver(task_id, self.envelope(task_id, "OK", output))

    def complete_payload_error(self, task_id: str, urls: list[str]) -> httpx.Response:
        """Success whose output could not ride in the webhook: `payload: null` and `payload_error`; the
        result waits at the queue's result endpoint (fal webhooks doc)."""
        queued = self.queue[task_id]
        queued.status, queued.result = "COMPLETED", (200, self.output(urls))
        error = (
            "Response payload is not JSON serializable. Either return a JSON serializable object or use "
            "the queue endpoint to retrieve the response."
        )
        return self.deliver(task_id, self.envelope(task_id, "OK", None, payload_error=error))

    def fail(
        self, task_id: str, moderated: bool, message: str, deliver: bool = True
    ) -> httpx.Response | None:
        """A model error: 422 with a typed `detail` list when a content checker flagged it, else a 500
        with a plain `detail` string (fal's errors doc shows both shapes)."""
        if moderated:
            status = 422
            detail: Any = [
                {
                    "loc": ["body", "prompt"],
                    "msg": message,
                    "type": "content_policy_violation",
                    "url": "https://docs.fal.ai/errors#content_policy_violation",
                }
            ]
        else:
            status, detail = 500, message
        queued = self.queue[task_id]
        queued.status, queued.result = "COMPLETED", (status, {"detail": detail})
        if not deliver:
            return None
        body = self.envelope(task_id, "ERROR", {"detail": detail}, error=f"Invalid status code: {status}")
        return self.deliver(task_id, body)
