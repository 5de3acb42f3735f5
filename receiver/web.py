"""Small pieces every HTTP handler shares: JSON errors, capped body reads, limits on JSON values."""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
from starlette.requests import ClientDisconnect
from starlette.requests import Request
from starlette.responses import Response
from starlette.responses import StreamingResponse

from receiver.logs import event
from receiver.schema import ErrorBody
from receiver.schema import ErrorDetail
from receiver.schema import ModelResponse
from receiver.untrusted import UnreadableJson
from receiver.untrusted import printable
from receiver.untrusted import read_json

log = logging.getLogger("receiver.web")
BODY_TIMEOUT = 30.0  # seconds a request body may take to arrive, whole (RECEIVER_BODY_TIMEOUT)
# A whole number as a query parameter or signed-link expiry: ASCII digits only (str.isdigit() also
# takes '²'), few enough that int() never meets Python's digit limit and SQLite's 64-bit range holds.
SMALL_NUMBER = re.compile(r"[0-9]{1,18}")


# Stored images and uploads are someone else's bytes: never sniffed into HTML, never run as a page.
MEDIA_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Disposition": "inline",
    "Content-Security-Policy": "default-src 'none'; sandbox",
}


Fields = Mapping[str, str] | None  # each offending field and what is wrong with it


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, fields: Mapping[str, str] | None = None, **more: Any
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = dict(fields or {})
        self.more = more  # the rest of error_response's arguments: headers, remaining_usd


def error_response(
    status: int,
    code: str,
    message: str,
    fields: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    remaining_usd: float | None = None,
) -> Response:
    """The one error shape. A 401 names the scheme that would have worked (RFC 9110 asks for it)."""
    headers = dict(headers or {})
    if status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    named = {printable(name): printable(problem) for name, problem in (fields or {}).items()}
    detail = ErrorDetail(code, message, named, remaining_usd)
    return ModelResponse(ErrorBody(detail), status_code=status, headers=headers)


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object: a 400 when it is not JSON (or not an object), a 422
    naming the field when a value inside cannot be kept (receiver.untrusted)."""
    try:
        body = read_json(raw)
    except UnreadableJson as exc:
        if exc.field is None:
            raise ApiError(400, "invalid_json", exc.message) from None
        raise ApiError(422, "invalid", "the request has invalid fields", {exc.field: exc.message}) from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return body


def small_number(text: str | None) -> int | None:
    """A query parameter as a non-negative int, or None when it is not plainly one."""
    if text is None or not SMALL_NUMBER.fullmatch(text):
        return None
    return int(text)


async def read_capped(request: Request, cap: int, timeout: float = BODY_TIMEOUT) -> bytes:
    """The whole body, refused (413) as soon as it passes `cap` bytes (never buffered past the cap),
    or (408) when it has not all come within `timeout` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > cap:
            raise ApiError(413, "too_large", f"the body is over {cap} bytes")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > cap:
                    raise ApiError(413, "too_large", f"the body is over {cap} bytes")
    except ClientDisconnect:
        raise client_gone(request) from None
    except TimeoutError:
        raise body_too_slow(timeout) from None
    return bytes(body)


def body_too_slow(timeout: float) -> ApiError:
    return ApiError(408, "body_timeout", f"the body did not arrive within {timeout:g} seconds")


def client_gone(request: Request) -> ApiError:
    """A client that disconnected mid-body: nobody is left to answer and it is no fault of ours, so an
    INFO line and an error whose answer goes nowhere, never a traceback."""
    event(log, "client went away mid-body", method=request.method)
    return ApiError(400, "client_disconnected", "the client went away before its body ended")


FILE_CHUNK = 64 * 1024  # bytes read from a media file at a time
RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def single_range(header: str | None, size: int) -> tuple[int, int] | bool | None:
    """The byte span `(first, last)` a Range header asks of `size` bytes; None for the whole (no header,
    or one we answer whole as RFC 9110 allows: several ranges, another unit); False when unsatisfiable."""
    match = RANGE.match(header.strip()) if header else None
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # the last N bytes
        length = int(last)
        return (max(0, size - length), size - 1) if length and size else False
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or (last != "" and int(last) < start):
        return False if start >= size else None
    return start, end


async def held_file(
    path: Path, content_type: str, headers: dict[str, str], range_header: str | None
) -> Response | None:
    """A file of the media directory, opened before the answer starts, so a retention sweep or a delete
    that removes it meanwhile cannot cut the answer short (an open file stays readable); None when it is
    gone already. One byte range is answered with 206, as a file server would."""
    try:
        handle = await anyio.open_file(path, "rb")
    except (FileNotFoundError, IsADirectoryError):
        return None
    size = os.fstat(handle.wrapped.fileno()).st_size
    span = single_range(range_header, size)
    headers = {**headers, "Accept-Ranges": "bytes"}
    if span is False:
        await handle.aclose()
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    start, end = span if isinstance(span, tuple) else (0, size - 1)
    if isinstance(span, tuple):
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)

    async def body() -> AsyncIterator[bytes]:
        async with handle:
            await handle.seek(start)
            left = end - start + 1
            while left > 0 and (chunk := await handle.read(min(FILE_CHUNK, left))):
                left -= len(chunk)
                yield chunk

    status = 206 if isinstance(span, tuple) else 200
    return StreamingResponse(body(), status_code=status, media_type=content_type, headers=headers)
