"""The browser console at /ui: one static page, its stylesheet and script, its icon (also at /favicon.ico,
where browsers look for it), `/` sending a browser to it, and /v1/providers for its form.

The page holds no data of its own: the script asks the /v1 API with the key the user typed, so the
console sees exactly what the key's tenant sees. It is served with a strict Content-Security-Policy
(no inline script, nothing from elsewhere), so text from tasks can never run as code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.responses import RedirectResponse
from starlette.responses import Response
from starlette.routing import Route

from receiver.config import Settings
from receiver.providers import REGISTRY
from receiver.providers import Provider
from receiver.web import ApiError

STATIC_DIR = Path(__file__).parent / "static"
PAGE = "console.html"
ASSETS: Mapping[str, str] = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "favicon.ico": "image/vnd.microsoft.icon",
}
ICON = "favicon.ico"

Authenticate = Callable[[Request], str | None]


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


def provider_list(settings: Settings) -> list[dict[str, Any]]:
    """The providers this deployment offers: those whose key is set, and the sandbox (always set)."""
    offered = []
    for name in sorted(REGISTRY):
        provider = REGISTRY[name]
        if not settings.provider(name).api_key:
            continue
        offered.append(provider_entry(provider, settings))
    return offered


def provider_entry(provider: Provider, settings: Settings) -> dict[str, Any]:
    """One provider as apps and the console build their forms from it: what it sells, what each model
    takes, and the limits the receiver paces it by (a pace group's are its owner's, as in pacing)."""
    owner = REGISTRY.get(provider.pace_group or provider.name, provider)
    configured = settings.provider(owner.name)
    per_window, window = owner.rate_limit or (None, None)
    if configured.max_per_minute:
        per_window, window = configured.max_per_minute, 60.0
    models = {}
    for model in (*provider.models, *provider.native_models):
        least, most = provider.image_range(model)
        models[model] = {
            "min_images": least,
            "max_images": most,
            # The provider's own id for it, without and with input images (a native id is itself).
            "text_to_image": provider.native_model(model, False) if least == 0 else None,
            "edit": provider.native_model(model, True) if most > 0 else None,
        }
    return {
        "name": provider.name,
        "models": list(provider.models),
        "native_models": list(provider.native_models),
        "other_models": provider.native_hint or None,
        "default_model": provider.default_model,
        "accepts_any_model": provider.accepts_any_model,
        "model_inputs": models,
        "takes": {model: provider.takes(model).as_json() for model in models},
        "fields": sorted(provider.fields),
        "min_images": provider.min_images,
        "max_images": provider.max_images,
        "data_uris": "sent inline" if provider.inline_images else "sent as signed links",
        "synchronous": provider.synchronous,
        "limits": {
            "max_concurrent": configured.max_concurrent or owner.max_concurrent,
            "max_concurrent_by_model": dict(provider.max_concurrent_by_model),
            "new_tasks_per_window": per_window,
            "window_seconds": window,
            "shared_with": sorted(
                other.name
                for other in REGISTRY.values()
                if provider.pace_group and other.pace_group == provider.pace_group and other is not provider
            ),
        },
    }


class _Asset:
    """A static file read once at start: it ships inside the package and never changes while serving."""

    def __init__(self, path: Path, media_type: str) -> None:
        self.body = path.read_bytes()
        self.media_type = media_type
        self.etag = f'"{hashlib.sha256(self.body).hexdigest()[:32]}"'


def console_routes(settings: Settings, authenticate: Authenticate) -> list[Route]:
    """The console's routes. `authenticate(request)` raises the API's 401 unless a valid bearer key is
    sent (the API's own check, so the console and /v1/tasks agree on who is who)."""
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

    async def providers(request: Request) -> Response:
        authenticate(request)
        return JSONResponse({"items": provider_list(settings)})

    return [
        Route("/", root, methods=["GET"], include_in_schema=False),
        Route("/favicon.ico", icon, methods=["GET"], include_in_schema=False),
        Route("/ui", console_page, methods=["GET"], include_in_schema=False),
        Route("/ui/static/{name}", console_asset, methods=["GET"], include_in_schema=False),
        Route("/v1/providers", providers, methods=["GET"]),
    ]
