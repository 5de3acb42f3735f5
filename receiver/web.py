"""Small pieces every HTTP handler shares: JSON errors and capped body reads."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, fields: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = dict(fields or {})


def error_response(
    status: int, code: str, message: str, fields: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message, "fields": dict(fields or {})}}, status_code=status
    )


async def read_capped(request: Request, cap: int) -> bytes:
    """The whole body, refused (413) as soon as it passes `cap` bytes; never buffered past the cap."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "bad_request", "Content-Length is not a number")
        if int(declared) > cap:
            raise ApiError(413, "too_large", f"the body is over {cap} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise ApiError(413, "too_large", f"the body is over {cap} bytes")
    return bytes(body)
