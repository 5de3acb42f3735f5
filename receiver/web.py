"""Small pieces every HTTP handler shares: JSON errors, capped body reads, limits on JSON values."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Mapping
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.requests import Request
from starlette.responses import Response

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
