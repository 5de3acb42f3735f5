"""The transport of every outbound client: httpx's interface over aiohttp's C-parsed HTTP/1.1.

httpx keeps what the code sees (redirects, timeouts, decoding, the `Response` API); aiohttp moves the
bytes. On a 50 MB download the pure-Python parser of httpx's default transport costs about 2.5x the
CPU of aiohttp's, and about 2.5x per 0.5 MB image too (scripts/bench, docs/benchmarks.md).

The address guard, when on, sits where the connection is made: aiohttp connects only to the addresses
its resolver returns, and our resolver returns a host's addresses only when every one of them is
public. httpx follows redirects by calling this transport again, so every hop is resolved and checked
afresh (no DNS cache), and a host written as an IP literal, which aiohttp never resolves, is checked
before the request is sent. Proxies come from the environment (HTTP_PROXY, HTTPS_PROXY, NO_PROXY) as
httpx would take them; a proxy is the operator's setting and trusted as given, while the target host
is still checked here. Trust roots: SSL_CERT_FILE when set, else certifi's bundle, as httpx does.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import urllib.request
from collections.abc import AsyncIterator
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import certifi
import httpx
from aiohttp.abc import AbstractResolver
from aiohttp.abc import ResolveResult

from receiver import USER_AGENT
from receiver.downloads import AddressRefused
from receiver.downloads import is_public
from receiver.downloads import resolve_public

KEEPALIVE_SECONDS = 5.0  # httpx's default keep-alive expiry
PROVIDER_CONNECT = 10.0  # seconds to connect to a provider's API (the read timeout is the operator's)
# A response body is read in pieces of up to 1 MiB: each piece is one hand-off to the hash and write
# threads (receiver/offload.py), which costs more than the work itself for a 64 KiB piece. aiohttp
# stops reading the socket once 2 x this is buffered, so a download holds a few MiB whatever its size.
CHUNK = 1024 * 1024


class GuardedResolver(AbstractResolver):
    """Resolves a host to its addresses only when every one of them is public (proxies excepted)."""

    def __init__(self, trusted_hosts: frozenset[str], public: Callable[[str], bool]) -> None:
        self.trusted_hosts = trusted_hosts
        self.public = public
        self._plain: aiohttp.ThreadedResolver | None = None  # made on the loop, when first needed

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host in self.trusted_hosts:
            self._plain = self._plain or aiohttp.ThreadedResolver()
            return await self._plain.resolve(host, port, family)
        addresses = await resolve_public(host, port, self.public)
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in addresses
        ]

    async def close(self) -> None:
        if self._plain is not None:
            await self._plain.close()


def proxy_hosts() -> frozenset[str]:
    """The hosts of the proxies the environment names (the operator's own settings)."""
    return frozenset(host for url in urllib.request.getproxies().values() if (host := urlsplit(url).hostname))


def _proxied(url: httpx.URL) -> bool:
    """Whether the environment sends `url` through a proxy (then the peer is the proxy)."""
    return url.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(url.host)


def ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or certifi.where())


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped():
            async for chunk in self._response.content.iter_chunked(CHUNK):
                yield chunk

    async def aclose(self) -> None:
        self._response.release()


class _mapped:
    """aiohttp's exceptions as the httpx ones the rest of the code handles."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, AddressRefused | httpx.HTTPError):
            return
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            raise httpx.ConnectTimeout(str(exc) or "connect timeout") from exc
        if isinstance(exc, asyncio.TimeoutError):
            raise httpx.ReadTimeout(str(exc) or "read timeout") from exc
        if isinstance(exc, aiohttp.ClientConnectorError):
            raise httpx.ConnectError(str(exc)) from exc
        if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
            raise httpx.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
        if isinstance(exc, aiohttp.ClientError | OSError):
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport over aiohttp; with `guard`, only public addresses are ever connected to.

    Also the provider client's (unguarded: provider base URLs are the operator's settings). Beside the
    parser, it spares the submit path httpcore's per-request `import sniffio` attempt, which walks
    sys.path when sniffio is not installed (9 % of the event loop in the end-to-end profile)."""

    def __init__(
        self, *, guard: bool, max_connections: int = 32, public: Callable[[str], bool] = is_public
    ) -> None:
        self.guard = guard
        self.public = public  # which addresses count as public (tests narrow it to stand in for the internet)
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._ssl = ssl_context()  # parsing the CA bundle takes tens of ms: at start, not in a callback

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.max_connections,
                ssl=self._ssl,
                keepalive_timeout=KEEPALIVE_SECONDS,
                use_dns_cache=not self.guard,  # guarded: every connection resolves (and checks) afresh
                resolver=GuardedResolver(proxy_hosts(), self.public) if self.guard else None,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # aiohttp's trust_env reads every proxy variable and ~/.netrc again on each request
                # (4 % of the loop in the end-to-end profile): on only where the environment names a proxy.
                trust_env=bool(urllib.request.getproxies()),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(),
                read_bufsize=CHUNK,
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https") or not url.host:
            raise httpx.UnsupportedProtocol(f"Request URL has an unsupported protocol '{url.scheme}://'.")
        if self.guard:
            await resolve_public(url.host, url.port or (443 if url.scheme == "https" else 80), self.public)
        timeouts = request.extensions.get("timeout", {})
        body = await request.aread()
        with _mapped():
            response = await self._open().request(
                request.method,
                str(url),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
                data=body or None,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    sock_connect=timeouts.get("connect"), sock_read=timeouts.get("read")
                ),
            )
        if self.guard and not _proxied(url):
            # The resolver only hands out checked addresses; the peer is checked once more anyway.
            peer = response.connection.transport if response.connection else None
            address = peer.get_extra_info("peername") if peer else None
            if address and not self.public(str(address[0])):
                response.close()
                raise AddressRefused(f"{url.host} connected to the non-public address {address[0]}")
        return httpx.Response(
            response.status,
            headers=list(response.raw_headers),
            stream=_Body(response),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def outside_client(*, allow_private: bool, timeout: float, max_connections: int = 32) -> httpx.AsyncClient:
    """An httpx client for URLs that come from outside; guarded unless private URLs are allowed."""
    return httpx.AsyncClient(
        transport=AiohttpTransport(guard=not allow_private, max_connections=max_connections),
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        follow_redirects=True,
        max_redirects=5,
        headers={"User-Agent": USER_AGENT},
        trust_env=False,  # the transport takes the proxies from the environment itself, guarded
    )


def provider_client(*, timeout: float, connect: float = PROVIDER_CONNECT) -> httpx.AsyncClient:
    """The client for provider APIs and key sets: the operator's own URLs, trusted as given."""
    return httpx.AsyncClient(
        transport=AiohttpTransport(guard=False, max_connections=100),
        timeout=httpx.Timeout(timeout, connect=connect),
        headers={"User-Agent": USER_AGENT},
        trust_env=False,  # the transport takes the proxies from the environment itself
    )
