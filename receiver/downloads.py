"""Safe fetching of URLs that come from outside: an address guard, a size cap, real images only,
streamed into the media store.

The guard sits in the connection layer (receiver/transport.py), so it sees the address actually
connected to, for the first request and for every redirect: every address a host resolves to must be
public, and the connection goes to an address that was checked (TLS still verifies the host name).
"""

from __future__ import annotations

import ipaddress
import socket
import zlib
from collections.abc import AsyncIterator
from collections.abc import Callable
from urllib.parse import urlsplit

import anyio
import httpx

from receiver.intake import ImageRefused
from receiver.intake import StoredImage
from receiver.intake import store_image
from receiver.media import Media
from receiver.media import MediaError


class AddressRefused(Exception):
    """A URL that leads to a loopback, private, link-local or otherwise non-public address."""


class DownloadError(Exception):
    def __init__(self, reason: str, *, permanent: bool, kind: str = "network") -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.kind = kind  # a short label for metrics: http_404, too_large, not_image, refused, timeout …


# IPv6 ranges whose low 32 bits are an IPv4 address a gateway or the host itself may reach:
# NAT64 (64:ff9b::/96 and the local-use 64:ff9b:1::/48), IPv4-compatible (::/96, deprecated),
# and SIIT's IPv4-translated ::ffff:0:0:0/96. The embedded address is the one that is judged.
EMBEDS_IPV4 = tuple(
    ipaddress.IPv6Network(net) for net in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96")
)
SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")  # deprecated, yet still routed inside some networks


def is_public(address: str) -> bool:
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in SITE_LOCAL:
            return False
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif any(ip in net for net in EMBEDS_IPV4):
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.is_global and not ip.is_multicast


async def resolve_public(host: str, port: int, public: Callable[[str], bool] = is_public) -> list[str]:
    """Every address `host` resolves to, or AddressRefused if any of them is not `public`."""
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise AddressRefused(f"{host} does not resolve ({exc.strerror or exc})") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        if not public(address):
            raise AddressRefused(f"{host} resolves to the non-public address {address}")
    return addresses


MAX_URL = 8192  # characters in a URL from outside (request fields, result links)
MAX_HOST = 253  # characters in a DNS name


def url_problem(url: str) -> str | None:
    """Why `url` is not a usable http(s) URL (syntax only, no lookup), or None when it is one."""
    if len(url) > MAX_URL:
        return f"a URL of at most {MAX_URL} characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "not a valid URL (its host or port cannot be read)"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http or https URL"
    if len(parts.hostname) > MAX_HOST:
        return f"a host name of at most {MAX_HOST} characters"
    if port == 0:
        return "not a valid URL (port 0)"
    return None


async def check_url(url: str, allow_private: bool) -> str | None:
    """Why `url` may not be fetched or posted to, or None when it may."""
    problem = url_problem(url)
    if problem or allow_private:
        return problem
    parts = urlsplit(url)
    assert parts.hostname is not None
    try:
        await resolve_public(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except AddressRefused as exc:
        return str(exc)
    return None


TRANSIENT_STATUSES = frozenset({408, 425, 429})
# Asked of every image host: PNG, JPEG and WebP are compressed already (gzip takes 0.8 % off a sandbox
# PNG, 0-3 % off a JPEG), so compression would only cost CPU here. A host may send it anyway.
ACCEPT = {"Accept-Encoding": "identity"}
# The Content-Encodings a body is read in; anything else is refused.
CODINGS = ("gzip", "x-gzip", "deflate")
PIECE = 1024 * 1024  # decompressed bytes at a time: what one compressed piece may cost in memory


def _broken(coding: str) -> DownloadError:
    return DownloadError(f"the image host sent a broken {coding} body", permanent=True, kind="encoding")


def content_coding(response: httpx.Response) -> str | None:
    """The body's one compression (gzip or deflate), None for none; DownloadError for any other."""
    codings = [
        value.strip().lower()
        for value in response.headers.get_list("content-encoding", split_commas=True)
        if value.strip().lower() not in ("", "identity")
    ]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in CODINGS:
        return codings[0]
    raise DownloadError(
        f"the image host sent a body in an encoding this service does not read ({', '.join(codings)})",
        permanent=True,
        kind="encoding",
    )


async def inflated(raw: AsyncIterator[bytes], coding: str) -> AsyncIterator[bytes]:
    """`raw` decompressed, at most PIECE bytes at a time, so the size cap counts a body that inflates to
    gigabytes (a compression bomb) piece by piece and stops it, instead of it being inflated whole first
    (as httpx's own decoders do with each piece read)."""
    inflater = None if coding == "deflate" else zlib.decompressobj(zlib.MAX_WBITS | 16)
    head = b""
    async for chunk in raw:
        if inflater is None:
            # deflate is zlib-wrapped (RFC 9110), but some servers send it raw: the first two bytes tell.
            head += chunk
            if len(head) < 2:
                continue
            wrapped = head[0] & 0x0F == 8 and int.from_bytes(head[:2], "big") % 31 == 0
            inflater = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
            chunk = head
        data = chunk
        while not inflater.eof:
            try:
                piece = inflater.decompress(data, PIECE)
            except zlib.error:
                raise _broken(coding) from None
            if piece:
                yield piece
            data = inflater.unconsumed_tail
            if not data and len(piece) < PIECE:
                break  # all of this chunk taken in and given out (a full piece may have more behind it)
    if inflater is None or not inflater.eof:
        raise _broken(coding)


async def fetch_image(
    client: httpx.AsyncClient, url: str, media: Media, stem: str, max_bytes: int
) -> StoredImage:
    """Stream `url` into the media store at `stem`.<ext>; it appears there only once every check passed."""
    problem = url_problem(url)
    if problem:
        raise DownloadError(f"the image link: {problem}", permanent=True, kind="bad_url")
    try:
        async with client.stream("GET", url, headers=ACCEPT) as response:
            status = response.status_code
            if status in TRANSIENT_STATUSES or status >= 500:
                raise DownloadError(
                    f"HTTP {status} from the image host", permanent=False, kind=f"http_{status}"
                )
            if status >= 300:
                raise DownloadError(
                    f"HTTP {status} from the image host", permanent=True, kind=f"http_{status}"
                )
            coding = content_coding(response)
            declared = response.headers.get("content-length")
            if (
                coding is None
                and declared is not None
                and declared.isascii()
                and declared.isdigit()
                and int(declared) > max_bytes
            ):
                raise DownloadError(
                    f"the image is {declared} bytes, over the {max_bytes}-byte cap",
                    permanent=True,
                    kind="too_large",
                )
            # As they arrive: no re-chunking copies. A compressed body is counted as it inflates.
            chunks = response.aiter_raw() if coding is None else inflated(response.aiter_raw(), coding)
            return await store_image(media, stem, chunks, max_bytes)
    except ImageRefused as exc:
        reason = "the link did not give a PNG, JPEG or WebP image" if exc.kind == "not_image" else exc.reason
        raise DownloadError(reason, permanent=True, kind=exc.kind) from None
    except MediaError as exc:
        raise DownloadError(f"storing the image failed: {exc}", permanent=False, kind="media") from None
    except AddressRefused as exc:
        raise DownloadError(f"refused: {exc}", permanent=True, kind="refused") from None
    except httpx.TooManyRedirects:
        raise DownloadError("too many redirects", permanent=True, kind="redirects") from None
    except (httpx.UnsupportedProtocol, httpx.InvalidURL, httpx.RemoteProtocolError) as exc:
        # A redirect off http(s) (file://, gopher://) or to a URL that cannot be read: asking again
        # gives the same answer. (A RemoteProtocolError before any redirect is a broken answer.)
        if isinstance(exc, httpx.RemoteProtocolError) and "location" not in str(exc).lower():
            raise DownloadError(f"{type(exc).__name__}: {exc}", permanent=False, kind="network") from None
        raise DownloadError(f"refused: {exc}", permanent=True, kind="refused") from None
    except (httpx.TransportError, httpx.StreamError) as exc:
        kind = "timeout" if isinstance(exc, httpx.TimeoutException) else "network"
        raise DownloadError(
            f"{type(exc).__name__}: {exc or 'network error'}", permanent=False, kind=kind
        ) from None
