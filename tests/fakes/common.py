"""What every provider fake shares: a request log, scripted answers, and a host for result images."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from typing import Any
from typing import Self

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.responses import Response
from starlette.responses import StreamingResponse
from starlette.routing import Route

from receiver.sandbox_service import encode_png
from tests.harness import Served


def png(width: int = 64, height: int = 48, shade: int = 90) -> bytes:
    raw = b"".join(b"\x00" + bytes((shade, 200 - shade % 200, 30)) * width for _ in range(height))
    return encode_png(width, height, raw)


def big_png(size: int) -> bytes:
    """`size` bytes that start as a 4000 x 3000 PNG (signature and IHDR), then filler."""
    head = png(4000, 3000)[:33]
    return head + bytes(size - len(head))


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class HostedFile:
    body: bytes
    content_type: str = "image/png"
    failures: deque[int] = field(default_factory=deque)  # HTTP statuses to answer first, one per fetch
    fetches: int = 0
    chunk_delay: float = 0.0
    redirect: str | None = None  # answer every fetch with a 302 to this Location
    cut_after: int | None = None  # send only this many bytes of the body, then close the connection
    gate: threading.Event | None = None  # when given, the body stops after its first chunk until it is set


class FakeProvider:
    """A fake provider server. Subclasses add the provider's routes; answers are scripted per path."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.scripted: dict[str, deque[tuple[int, Any]]] = {}
        self.files: dict[str, HostedFile] = {}
        self.lock = threading.Lock()
        self.served = Served(self.app())
        self.url = self.served.url

    # -- subclass API ----------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return []

    def app(self) -> Any:
        from starlette.applications import Starlette

        return Starlette(routes=[*self.routes(), Route("/files/{name}", self._file, methods=["GET"])])

    async def record(self, request: Request) -> Recorded:
        body = await request.body()
        recorded = Recorded(
            request.method,
            request.url.path,
            dict(request.query_params),
            {k.lower(): v for k, v in request.headers.items()},
            body,
        )
        with self.lock:
            self.requests.append(recorded)
        return recorded

    def script(self, path: str, status: int, body: Any) -> None:
        """The next request to `path` gets this answer instead of the default."""
        with self.lock:
            self.scripted.setdefault(path, deque()).append((status, body))

    def scripted_answer(self, path: str) -> Response | None:
        with self.lock:
            queue = self.scripted.get(path)
            if not queue:
                return None
            status, body = queue.popleft()
        if isinstance(body, bytes):
            return Response(body, status_code=status)
        return JSONResponse(body, status_code=status)

    def calls(self, path: str) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    # -- result images ---------------------------------------------------------------------------

    def host(self, name: str, body: bytes | None = None, **kwargs: Any) -> str:
        self.files[name] = HostedFile(body if body is not None else png(), **kwargs)
        return f"{self.url}/files/{name}"

    async def _file(self, request: Request) -> Response:
        await self.record(request)
        hosted = self.files.get(request.path_params["name"])
        if hosted is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        hosted.fetches += 1
        if hosted.redirect is not None:
            return Response(status_code=302, headers={"Location": hosted.redirect})
        if hosted.failures:
            return Response(b"try later", status_code=hosted.failures.popleft())
        if hosted.cut_after is not None:  # the whole length declared, less sent: the server hangs up
            length = {"Content-Length": str(len(hosted.body))}
            return StreamingResponse(self._slow(hosted), media_type=hosted.content_type, headers=length)
        if hosted.chunk_delay or hosted.gate is not None:
            return StreamingResponse(self._slow(hosted), media_type=hosted.content_type)
        return Response(hosted.body, media_type=hosted.content_type)

    async def _slow(self, hosted: HostedFile) -> Any:
        step = 64 * 1024
        body = hosted.body[: hosted.cut_after]
        for start in range(0, len(body), step):
            yield body[start : start + step]
            if hosted.gate is not None:
                await asyncio.get_running_loop().run_in_executor(None, hosted.gate.wait, 30)
            await asyncio.sleep(hosted.chunk_delay)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Self:
        self.served.start()
        return self

    def stop(self) -> None:
        self.served.stop()


def post_callback(url: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    """Deliver a callback the way a provider does: one POST of JSON bytes (or raw bytes as given)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        url, content=content, headers={"Content-Type": "application/json", **(headers or {})}, timeout=10
    )


class ProviderFake(FakeProvider):
    """The interface the shared end-to-end suite (tests/test_providers_e2e.py) drives every fake through.

    A fake accepts submits like the real provider, remembers the callback URL it was given and the
    state reconcile will read, and sends callbacks exactly as the provider would (signed, if it signs).
    """

    name: str = ""  # the receiver's provider name
    signs: bool = False  # whether the provider signs callbacks (then forged_headers must refuse)
    text_to_image: bool = True  # False when the provider needs an input image
    submit_path: str = ""

    def __init__(self) -> None:
        self.hold: threading.Event | None = None  # when set, submits answer only once it is released
        super().__init__()

    def receiver_env(self) -> dict[str, str]:
        """The variables that configure the receiver for this fake."""
        raise NotImplementedError

    def task_body(self, image_url: str | None) -> dict[str, Any]:
        """Extra fields of a create request (model, images …) for this provider."""
        return {"images": [image_url]} if image_url else {}

    def provider_task_id(self) -> str:
        """The provider's id for the most recent submit (waits for one to arrive)."""
        raise NotImplementedError

    def complete(self, task_id: str, urls: list[str], deliver: bool = True) -> httpx.Response | None:
        """Finish the provider task with these result links; send the callback if `deliver`."""
        raise NotImplementedError

    def fail(
        self, task_id: str, moderated: bool, message: str, deliver: bool = True
    ) -> httpx.Response | None:
        """Fail the provider task (moderation or generation failure); send the callback if `deliver`."""
        raise NotImplementedError

    def deliver(self, task_id: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
        """POST raw bytes to the task's callback URL; signed like the provider unless headers are given."""
        raise NotImplementedError

    def forged_headers(self, task_id: str, body: bytes) -> dict[str, str]:
        """Headers with a wrong signature (only used when `signs`)."""
        raise NotImplementedError

    def malformed_body(self, task_id: str) -> bytes:
        """A body that passes the provider's signature check (if any) but is not its callback JSON."""
        raise NotImplementedError

    async def held(self) -> None:
        hold = self.hold
        if hold is not None:
            await asyncio.get_running_loop().run_in_executor(None, hold.wait, 10)

    def wait_for(self, predicate: Callable[[], bool], seconds: float = 5) -> None:
        deadline = time.monotonic() + seconds
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError("the fake never saw what the test waited for")
            time.sleep(0.01)
