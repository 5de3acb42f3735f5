"""The sandbox provider's far side, served by this app under /sandbox: it makes a real PNG locally and
calls our own callback URL over HTTP, so the whole path runs with no key and no network. Its tasks and
pictures live in the media store under sandbox/, so any replica can answer for them."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.responses import Response
from starlette.responses import StreamingResponse
from starlette.routing import Route

from receiver.media import Media
from receiver.media import MediaError
from receiver.media import MediaMissing
from receiver.media import one_chunk
from receiver.providers.sandbox import parse_ratio
from receiver.untrusted import read_object
from receiver.web import MEDIA_HEADERS
from receiver.web import read_capped

log = logging.getLogger("receiver.sandbox")
ID = re.compile(r"^sbx_[0-9a-f]{24}$")
FILE = re.compile(r"^sbx_[0-9a-f]{24}-[0-3]\.png$")
LONG_SIDE = 768
MAX_REQUEST = 64 * 1024
CALLBACK_TIMEOUT = 10.0
# Drawing a picture takes tens of milliseconds of CPU: never on the event loop that answers callbacks.
# Two threads at most, so a burst of sandbox tasks queues its drawings instead of taking every core.
DRAWING = ThreadPoolExecutor(max_workers=2, thread_name_prefix="receiver-sandbox")


def render_png(prompt: str, seed: int, index: int, width: int, height: int) -> bytes:
    """A deterministic gradient picture: the same prompt, seed and index always give the same bytes."""
    key = hashlib.sha256(f"{prompt}\x00{seed}\x00{index}".encode()).digest()
    red, green, blue, step = key[0], key[1], key[2], 1 + key[3] % 3
    row = bytearray()
    for x in range(width):
        shade = x * 255 // max(1, width - 1)
        row += bytes(((red + shade) % 256, (green + shade // 2) % 256, (blue + 255 - shade) % 256))
    base = bytes(row)
    raw = bytearray()
    for y in range(height):
        shift = (y * step) % 256
        table = bytes(range(shift, 256)) + bytes(range(shift))  # each byte value moved up by `shift`
        raw += b"\x00" + base.translate(table)
    return encode_png(width, height, bytes(raw))


def encode_png(width: int, height: int, raw: bytes) -> bytes:
    """A PNG of 8-bit RGB rows, each already prefixed with its filter byte."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def image_size(aspect_ratio: str) -> tuple[int, int]:
    ratio = parse_ratio(aspect_ratio) or (1, 1)
    if ratio[0] >= ratio[1]:
        return LONG_SIDE, max(16, LONG_SIDE * ratio[1] // ratio[0])
    return max(16, LONG_SIDE * ratio[0] // ratio[1]), LONG_SIDE


class SandboxService:
    def __init__(
        self, media: Media, public_url: str, api_key: str, default_delay: float, client: httpx.AsyncClient
    ) -> None:
        """`client` posts the callbacks: one made per callback would load the CA bundle each time
        (~0.1 s of CPU on the event loop)."""
        self.media = media
        self.client = client
        self.public_url = public_url
        self.api_key = api_key
        self.default_delay = default_delay
        self._running: set[asyncio.Task[None]] = set()

    def routes(self) -> list[Route]:
        return [
            Route("/sandbox/v1/generate", self.generate, methods=["POST"], include_in_schema=False),
            Route("/sandbox/v1/tasks/{id}", self.status, methods=["GET"], include_in_schema=False),
            Route("/sandbox/files/{name}", self.file, methods=["GET"], include_in_schema=False),
        ]

    async def close(self) -> None:
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)

    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
        return hmac.compare_digest(given, self.api_key.encode())

    async def generate(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"error": "bad sandbox key"}, status_code=401)
        try:
            body = read_object(await read_capped(request, MAX_REQUEST))
            callback_url = str(body.get("callback_url") or "")
            delay = body.get("delay")
            job: dict[str, Any] = {
                "prompt": str(body.get("prompt", "")),
                "seed": int(body.get("seed") or 0),
                "aspect_ratio": str(body.get("aspect_ratio") or "1:1"),
                "num_images": int(body.get("num_images") or 1),
                "outcome": str(body.get("outcome") or "succeeded"),
                "ready_at": time.time() + (self.default_delay if delay is None else float(delay)),
            }
        except (ValueError, TypeError, AttributeError):
            return JSONResponse({"error": "not a sandbox request"}, status_code=400)
        # Only our own callback URLs: the sandbox must never post anywhere else.
        if not callback_url.startswith(f"{self.public_url}/callbacks/"):
            return JSONResponse({"error": "callback_url must be this service's own"}, status_code=422)
        if not 1 <= job["num_images"] <= 4 or not 0 <= job["ready_at"] - time.time() <= 600:
            return JSONResponse({"error": "num_images is 1 to 4, delay 0 to 600 s"}, status_code=422)
        task_id = f"sbx_{secrets.token_hex(12)}"
        job.update(id=task_id, callback_url=callback_url)
        try:
            await self._save(task_id, job)
        except MediaError:
            return _unavailable()
        task = asyncio.create_task(self._finish_later(job))
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return JSONResponse({"id": task_id})

    async def status(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"error": "bad sandbox key"}, status_code=401)
        task_id = request.path_params["id"]
        try:
            job = await self._load(task_id) if ID.match(task_id) else None
            if job is None:
                return JSONResponse({"error": "no such task"}, status_code=404)
            return JSONResponse(await self._result(job))
        except MediaError:
            return _unavailable()

    async def file(self, request: Request) -> Response:
        name = request.path_params["name"]
        if not FILE.match(name):
            return JSONResponse({"error": "no such file"}, status_code=404)
        try:
            stored = await self.media.open(f"sandbox/{name}")
        except MediaMissing:
            return JSONResponse({"error": "no such file"}, status_code=404)
        except MediaError:
            return _unavailable()
        headers = {**MEDIA_HEADERS, "Content-Length": str(stored.size)}
        return StreamingResponse(stored.chunks, media_type="image/png", headers=headers)

    async def _finish_later(self, job: dict[str, Any]) -> None:
        await asyncio.sleep(max(0.0, job["ready_at"] - time.time()))
        if job["outcome"] == "no_callback":
            return
        try:
            # ready=True: the loop's timers may fire up to a clock tick early, and a callback that said
            # "still running" a hair before ready_at would never be followed by the final one.
            payload = json.dumps(await self._result(job, ready=True)).encode()
        except MediaError as exc:
            log.warning("sandbox callback skipped, the status query will tell: %s", exc)
            return
        for attempt in range(3):
            try:
                response = await self.client.post(
                    job["callback_url"],
                    content=payload,
                    headers={"Content-Type": "application/json"},
                    timeout=CALLBACK_TIMEOUT,
                )
                if response.status_code < 500:
                    return
            except httpx.HTTPError as exc:
                log.warning("sandbox callback failed: %s", type(exc).__name__)
            await asyncio.sleep(0.5 * (attempt + 1))

    async def _result(self, job: dict[str, Any], *, ready: bool = False) -> dict[str, Any]:
        """The task as the sandbox reports it; images are made on first need, so a restart loses nothing."""
        if not ready and time.time() < job["ready_at"]:
            return {"id": job["id"], "status": "running"}
        if job["outcome"] in ("generation_failed", "content_moderated"):
            message = (
                "the sandbox was asked to fail this task"
                if job["outcome"] == "generation_failed"
                else ("the sandbox was asked to moderate this task")
            )
            return {
                "id": job["id"],
                "status": "failed",
                "error": {"code": job["outcome"], "message": message},
            }
        urls = []
        width, height = image_size(job["aspect_ratio"])
        for index in range(job["num_images"]):
            name = f"{job['id']}-{index}.png"
            if not await self.media.exists(f"sandbox/{name}"):
                picture = await asyncio.get_running_loop().run_in_executor(
                    DRAWING, render_png, job["prompt"], job["seed"], index, width, height
                )
                await self.media.put(f"sandbox/{name}", one_chunk(picture))
            urls.append(f"{self.public_url}/sandbox/files/{name}")
        return {"id": job["id"], "status": "succeeded", "images": urls}

    async def _save(self, task_id: str, job: dict[str, Any]) -> None:
        await self.media.put(f"sandbox/{task_id}.json", one_chunk(json.dumps(job).encode()))

    async def _load(self, task_id: str) -> dict[str, Any] | None:
        try:
            loaded: dict[str, Any] = json.loads(await self.media.read(f"sandbox/{task_id}.json"))
        except MediaMissing:
            return None
        return loaded


def _unavailable() -> Response:
    return JSONResponse({"error": "the media store is unavailable"}, status_code=503)
