"""The outside client's transport (receiver/transport.py) against real servers on the loopback.

Every server here is on 127.0.0.0/8, which the real guard refuses as a whole, so these tests narrow
"public" to 127.0.0.2: a server there plays the internet, a server on 127.0.0.1 an internal host.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp
from starlette.types import Receive
from starlette.types import Scope
from starlette.types import Send

from receiver.downloads import AddressRefused
from receiver.transport import AiohttpTransport
from receiver.transport import GuardedResolver
from tests.harness import Served

BODY = os.urandom(3 * 1024 * 1024 + 17)  # several reads' worth, an odd size


def only_127_0_0_2(address: str) -> bool:
    return address == "127.0.0.2"


def origin_form(app: ASGIApp) -> ASGIApp:
    """Route a proxy's absolute-form request (`GET http://host/path`) by its path.

    httptools hands uvicorn the path alone, h11 the whole target: without this the test's verdict
    would depend on which HTTP parser happens to be installed.
    """

    async def routed(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/"):
            scope = {**scope, "path": urlsplit(scope["path"]).path or "/"}
        await app(scope, receive, send)

    return routed


class Host:
    """A real server that counts its requests; answers by path."""

    def __init__(self, address: str) -> None:
        self.hits: list[str] = []
        self.target = ""  # where /redirect points
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, 0))
        app = Starlette(routes=[Route("/{path:path}", self.answer, methods=["GET", "POST"])])
        self.served = Served(origin_form(app), sock)
        self.url = self.served.url.replace("127.0.0.1", address)

    async def answer(self, request: Request) -> Response:
        self.hits.append(request.url.path)
        if request.url.path == "/redirect":
            return RedirectResponse(self.target, status_code=302)
        if request.url.path == "/echo":
            return Response(await request.body(), headers={"X-Seen-Host": request.headers["host"]})
        return Response(BODY, media_type="application/octet-stream")


def running(address: str) -> Iterator[Host]:
    host = Host(address)
    host.served.start()
    yield host
    host.served.stop()


@pytest.fixture
def internet() -> Iterator[Host]:
    yield from running("127.0.0.2")


@pytest.fixture
def internal() -> Iterator[Host]:
    yield from running("127.0.0.1")


async def fetch(url: str, method: str = "GET", content: bytes | None = None) -> httpx.Response:
    transport = AiohttpTransport(guard=True, public=only_127_0_0_2)
    async with httpx.AsyncClient(transport=transport, follow_redirects=True, trust_env=False) as client:
        response = await client.request(method, url, content=content)
        await response.aread()
        return response


def test_a_public_host_streams_whole_through_the_guard(internet: Host) -> None:
    response = asyncio.run(fetch(f"{internet.url}/image"))
    assert response.status_code == 200
    assert hashlib.sha256(response.content).digest() == hashlib.sha256(BODY).digest()
    assert response.headers["content-length"] == str(len(BODY))


def test_a_request_body_reaches_the_host(internet: Host) -> None:
    response = asyncio.run(fetch(f"{internet.url}/echo", "POST", b'{"type": "task.succeeded"}'))
    assert response.content == b'{"type": "task.succeeded"}'
    assert response.headers["x-seen-host"] == internet.url.removeprefix("http://")


def test_an_internal_address_is_refused_before_any_connection(internal: Host) -> None:
    with pytest.raises(AddressRefused, match=r"non-public address 127\.0\.0\.1"):
        asyncio.run(fetch(f"{internal.url}/image"))
    assert internal.hits == []


def test_a_host_name_that_resolves_to_an_internal_address_is_refused(internal: Host) -> None:
    with pytest.raises(AddressRefused, match="localhost resolves to the non-public address"):
        asyncio.run(fetch(internal.url.replace("127.0.0.1", "localhost") + "/image"))
    assert internal.hits == []


def test_a_redirect_to_an_internal_address_is_refused(internet: Host, internal: Host) -> None:
    internet.target = f"{internal.url}/secret"
    with pytest.raises(AddressRefused, match=r"non-public address 127\.0\.0\.1"):
        asyncio.run(fetch(f"{internet.url}/redirect"))
    assert internet.hits == ["/redirect"]
    assert internal.hits == []  # the hop after the redirect never connected


def test_a_redirect_between_public_addresses_is_followed(internet: Host) -> None:
    internet.target = f"{internet.url}/image"
    response = asyncio.run(fetch(f"{internet.url}/redirect"))
    assert response.status_code == 200
    assert len(response.content) == len(BODY)
    assert internet.hits == ["/redirect", "/image"]


def test_connection_refused_is_an_httpx_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.2", 0))
        port = sock.getsockname()[1]  # bound, never listening: the connection is refused
        with pytest.raises(httpx.ConnectError):
            asyncio.run(fetch(f"http://127.0.0.2:{port}/image"))


def test_the_proxy_from_the_environment_is_used(
    internet: Host, internal: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The proxy is the operator's own setting: trusted even on an internal address, while the
    # target host is still checked (a public one here).
    monkeypatch.setenv("HTTP_PROXY", internal.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    response = asyncio.run(fetch(f"{internet.url}/via-proxy"))
    assert response.status_code == 200
    assert internal.hits == ["/via-proxy"]  # the proxy got the request (in absolute form)
    assert internet.hits == []


def test_the_resolver_itself_returns_only_checked_addresses() -> None:
    # aiohttp connects only to what the resolver returns: the second check, at connection time.
    resolver = GuardedResolver(frozenset(), only_127_0_0_2)
    assert [r["host"] for r in asyncio.run(resolver.resolve("127.0.0.2", 80))] == ["127.0.0.2"]
    with pytest.raises(AddressRefused):
        asyncio.run(resolver.resolve("localhost", 80))
    trusting = GuardedResolver(frozenset({"localhost"}), only_127_0_0_2)  # a proxy named by the operator
    assert "127.0.0.1" in [r["host"] for r in asyncio.run(trusting.resolve("localhost", 80))]


def test_the_peer_is_checked_again_after_connecting(internet: Host) -> None:
    # An address judged public when looked up, but not by the time the answer comes (as when a name
    # is re-pointed between the check and the connection): the answer is refused, not used.
    verdicts = iter([True])

    async def run() -> None:
        transport = AiohttpTransport(guard=True, public=lambda address: next(verdicts, False))
        async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
            await client.get(f"{internet.url}/image")

    with pytest.raises(AddressRefused, match=r"connected to the non-public address 127\.0\.0\.2"):
        asyncio.run(run())
