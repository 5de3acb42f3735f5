"""An image host that misbehaves on purpose, served by uvicorn on 127.0.0.1: it trickles a body a byte at a
time for as long as the client stays, or sends a body with the Content-Encoding it is told to.

A plain ASGI app rather than a Starlette one: a trickle has to notice the client hanging up
(`http.disconnect`) while it is between two bytes, so the test can see the connection given back.
"""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any
from typing import Self

from tests.fakes.common import png
from tests.harness import Served

TRICKLE_EVERY = 0.2  # seconds between two bytes: far inside any read timeout


def bomb(coding: str, head: bytes, inflated: int) -> bytes:
    """`head` then zeros up to `inflated` bytes, compressed as `coding` (gzip, deflate) — about a
    thousandth of `inflated` — without ever holding the inflated bytes whole."""
    wbits = {"gzip": zlib.MAX_WBITS | 16, "deflate": zlib.MAX_WBITS, "raw-deflate": -zlib.MAX_WBITS}[coding]
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    out = [packer.compress(head)]
    zeros = bytes(1024 * 1024)
    left = inflated - len(head)
    while left > 0:
        out.append(packer.compress(zeros[: min(left, len(zeros))]))
        left -= len(zeros)
    out.append(packer.flush())
    return b"".join(out)


@dataclass
class Hosted:
    body: bytes
    headers: list[tuple[bytes, bytes]]


class ImageHost:
    def __init__(self) -> None:
        self.files: dict[str, Hosted] = {}
        self.fetches: Counter[str] = Counter()  # path -> requests
        self.accept_encodings: list[str] = []  # each request's Accept-Encoding ("" when absent)
        self.trickling = 0  # trickles whose client is still connected
        self.lock = threading.Lock()
        self.served = Served(self)
        self.url = self.served.url

    def trickle(self, name: str) -> str:
        """A link whose body starts as a PNG and then comes a byte every TRICKLE_EVERY s, never ending."""
        return f"{self.url}/trickle/{name}"

    def host(self, name: str, body: bytes, encoding: str | None = None) -> str:
        headers = [(b"content-type", b"image/png"), (b"content-length", str(len(body)).encode())]
        if encoding is not None:
            headers.append((b"content-encoding", encoding.encode()))
        self.files[name] = Hosted(body, headers)
        return f"{self.url}/files/{name}"

    def wait_until(self, predicate: Any, seconds: float = 60) -> None:
        """Bounded polling of the host's state (never a bet on how fast something happens)."""
        deadline = time.monotonic() + seconds
        while not predicate():
            assert time.monotonic() < deadline, "the image host never saw what the test waited for"
            time.sleep(0.02)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path: str = scope["path"]
        headers = dict(scope["headers"])
        with self.lock:
            self.fetches[path] += 1
            self.accept_encodings.append(headers.get(b"accept-encoding", b"").decode())
        kind, _, name = path.strip("/").partition("/")
        if kind == "trickle":
            await self._trickle(receive, send)
            return
        hosted = self.files.get(name) if kind == "files" else None
        if hosted is None:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": hosted.headers})
        await send({"type": "http.response.body", "body": hosted.body})

    async def _trickle(self, receive: Any, send: Any) -> None:
        async def body() -> None:
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"image/png")]}
            )
            await send({"type": "http.response.body", "body": png()[:33], "more_body": True})
            while True:
                await asyncio.sleep(TRICKLE_EVERY)
                await send({"type": "http.response.body", "body": b"\0", "more_body": True})

        with self.lock:
            self.trickling += 1
        sending = asyncio.ensure_future(body())
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        finally:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            with self.lock:
                self.trickling -= 1

    def start(self) -> Self:
        self.served.start()
        return self

    def stop(self) -> None:
        self.served.stop()
