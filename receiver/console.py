"""The browser console at /ui: one static page, its stylesheet and script, its icon (also at /favicon.ico,
where browsers look for it), and `/` sending a browser to it. Its form is built from GET /v1/providers
(receiver/offer.py, served by the API).

The page holds no data of its own: the script asks the /v1 API with the key the user typed, so the
console sees exactly what the key's tenant sees. It is served with a strict Content-Security-Policy
(no inline script, nothing from elsewhere), so text from tasks can never run as code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.responses import Response
from starlette.routing import Route

from receiver.config import Settings
from receiver.web import ApiError

STATIC_DIR = Path(__file__).parent / "static"
PAGE = "console.html"
ASSETS: Mapping[str, str] = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "favicon.ico": "image/vnd.microsoft.icon",
}
ICON = "favicon.ico"


def security_headers(public_url: str) -> dict[str, str]:
    """Headers for every console response. Images come from signed links under RECEIVER_PUBLIC_URL,
    which may be another origin than the one the browser used to open the page."""
    parts = urlsplit(public_url)
    public_origin = f"{parts.scheme}://{parts.netloc}"
    policy = "; ".join(
        (
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            f"img-src 'self' {public_origin}",
            "connect-src 'self'",
            "form-action 'self'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        )
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
    }


class _Asset:
    """A static file read once at start: it ships inside the package and never changes while serving."""

    def __init__(self, path: Path, media_type: str) -> None:
        self.body = path.read_bytes()
        self.media_type = media_type
        self.etag = f'"{hashlib.sha256(self.body).hexdigest()[:32]}"'


def console_routes(settings: Settings) -> list[Route]:
    """The console's routes: static files only; the page asks the /v1 API with the key the user typed."""
    headers = security_headers(settings.public_url)
    page = _Asset(STATIC_DIR / PAGE, "text/html; charset=utf-8")
    assets = {name: _Asset(STATIC_DIR / name, media_type) for name, media_type in ASSETS.items()}

    def respond(request: Request, asset: _Asset, cache: str) -> Response:
        response_headers = {**headers, "ETag": asset.etag, "Cache-Control": cache}
        if asset.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=response_headers)
        return Response(asset.body, media_type=asset.media_type, headers=response_headers)

    async def console_page(request: Request) -> Response:
        return respond(request, page, "no-cache")

    async def console_asset(request: Request) -> Response:
        asset = assets.get(request.path_params["name"])
        if asset is None:
            raise ApiError(404, "not_found", "no such console file")
        # Revalidated on each load (cheap with the ETag), so an upgrade never mixes old and new files.
        return respond(request, asset, "no-cache")

    async def icon(request: Request) -> Response:
        return respond(request, assets[ICON], "public, max-age=86400")

    async def root(request: Request) -> Response:
        # Relative, so it stays under whatever path prefix a proxy serves this service at.
        return RedirectResponse("ui", status_code=307)

    return [
        Route("/", root, methods=["GET"], include_in_schema=False),
        Route("/favicon.ico", icon, methods=["GET"], include_in_schema=False),
        Route("/ui", console_page, methods=["GET"], include_in_schema=False),
        Route("/ui/static/{name}", console_asset, methods=["GET"], include_in_schema=False),
    ]
