"""Downloads in a child process that writes no database, so the answering process keeps its core.

On SQLite a second database writer (`serve --role worker` beside `--role api`) makes both processes wait
on the write lock. The download child takes only the part of a download that costs CPU — the HTTP
parsing, sha256, the write to the media store — and answers with what it stored; the worker records it,
so every state change keeps its one path and the database its one writer.

The pipe: the worker writes requests to the child's stdin and reads answers from its stdout, each one a
frame (a 4-byte big-endian length, then a msgpack document). The first frame is the setup (the media
store, the address guard, the timeout): the bucket's keys travel there, never on the command line, which
`ps` shows to every user. Many downloads are in flight at once; each answer names its request.

Faults: the child dies → the downloads it held fail as transient (retried on the download schedule, the
image not yet stored), the next download starts a new child, and the dead one's temp files, tagged with
its pid, are removed as a killed process's are (receiver.media). The parent dies → the child reads EOF on
stdin, cancels its downloads (their temp files go with them) and exits. The child ignores SIGINT and
SIGTERM: a Ctrl-C, or a service manager signalling the whole group, reaches the parent, whose graceful
stop lets running downloads finish and then ends the child.

The child starts with the first download, not with the worker: a process that never downloads (and a
test that never does) does not pay its ~0.5 s of imports and ~50 MB.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import stat
import struct
import sys
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Protocol

import httpx
import msgspec

import receiver
from receiver.config import Settings
from receiver.downloads import DownloadError
from receiver.downloads import fetch_image
from receiver.intake import StoredImage
from receiver.logs import event
from receiver.media import Media

log = logging.getLogger("receiver.fetcher")
HEADER = struct.Struct(">I")
MAX_FRAME = 16 * 1024 * 1024  # a request holds a URL from a callback body (at most 1 MiB by default)
PACKAGE_ROOT = str(Path(receiver.__file__).resolve().parent.parent)
NICENESS = 10  # the child's, added to the service's own
EXIT_GRACE = 5.0  # seconds the child gets to end its downloads after stdin closes, before SIGKILL


class Setup(msgspec.Struct, tag=True):
    data_dir: str
    media_url: str | None
    aws: dict[str, str]
    allow_private_urls: bool
    http_timeout: float
    log_level: str
    log_format: str


class Fetch(msgspec.Struct, tag=True):
    id: int
    url: str
    stem: str
    max_bytes: int
    trusted: bool  # our own sandbox's link: the unguarded provider client, as in-process


class Cancel(msgspec.Struct, tag=True):
    id: int


class Stored(msgspec.Struct, tag=True):
    id: int
    image: StoredImage


class Failed(msgspec.Struct, tag=True):
    """fetch_image's DownloadError, field for field."""

    id: int
    reason: str
    permanent: bool
    kind: str


class Crashed(msgspec.Struct, tag=True):
    """Anything else fetch_image raised: a bug, handled by the worker as a bug in-process would be."""

    id: int
    error: str


Request = Setup | Fetch | Cancel
Reply = Stored | Failed | Crashed
ENCODER = msgspec.msgpack.Encoder()


def frame(message: Request | Reply) -> bytes:
    body = ENCODER.encode(message)
    return HEADER.pack(len(body)) + body


async def read_frame(stream: asyncio.StreamReader) -> bytes | None:
    """The next frame's body, or None at a clean end of the stream. Raises on a cut or oversized one."""
    try:
        head = await stream.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    (size,) = HEADER.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes")
    return await stream.readexactly(size)


class Fetcher(Protocol):
    async def fetch(self, url: str, stem: str, max_bytes: int, *, trusted: bool) -> StoredImage:
        """Stream `url` into the media store at `stem`.<ext> (receiver.downloads.fetch_image)."""

    async def close(self) -> None: ...


class InProcess:
    """RECEIVER_DOWNLOAD_PROCESS=0: downloads on the worker's own event loop."""

    def __init__(
        self, provider_http: httpx.AsyncClient, outside_http: httpx.AsyncClient, media: Media
    ) -> None:
        self.provider_http = provider_http
        self.outside_http = outside_http
        self.media = media

    async def fetch(self, url: str, stem: str, max_bytes: int, *, trusted: bool) -> StoredImage:
        client = self.provider_http if trusted else self.outside_http
        return await fetch_image(client, url, self.media, stem, max_bytes)

    async def close(self) -> None:
        return None


@dataclass(eq=False)
class _Child:
    process: asyncio.subprocess.Process
    waiting: dict[int, asyncio.Future[Reply]] = field(default_factory=dict)
    alive: bool = True
    reader: asyncio.Task[None] | None = None


def _gone(status: int | None) -> DownloadError:
    how = "stopped" if status is None else "was killed" if status < 0 else f"exited (status {status})"
    return DownloadError(f"the download process {how} during the download", permanent=False, kind="process")


class DownloadProcess:
    """The worker's side of the download child: starts it when needed, and again after it died."""

    def __init__(self, settings: Settings, media: Media) -> None:
        self.media = media
        self.setup = Setup(
            data_dir=str(settings.data_dir),
            media_url=settings.media_url,
            aws=dict(settings.aws),
            allow_private_urls=settings.allow_private_urls,
            http_timeout=settings.http_timeout,
            log_level=settings.log_level,
            log_format=settings.log_format,
        )
        self._child: _Child | None = None
        self._starting = asyncio.Lock()
        self._ids = itertools.count(1)
        self._closing = False
        self._cleaning: set[asyncio.Task[None]] = set()
        self._replies = msgspec.msgpack.Decoder(Reply)

    async def fetch(self, url: str, stem: str, max_bytes: int, *, trusted: bool) -> StoredImage:
        child = await self._running()
        ident = next(self._ids)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        if not child.alive:  # it died while this download waited for it to start
            raise _gone(child.process.returncode)
        child.waiting[ident] = future
        try:
            stdin = child.process.stdin
            assert stdin is not None
            stdin.write(frame(Fetch(ident, url, stem, max_bytes, trusted)))
            await stdin.drain()
            reply = await future
        except ConnectionError:  # the pipe broke: the child is gone (its reader fails the others)
            raise _gone(child.process.returncode) from None
        except asyncio.CancelledError:
            if child.alive and child.process.stdin is not None and not child.process.stdin.is_closing():
                child.process.stdin.write(frame(Cancel(ident)))  # its temp file goes with it
            raise
        finally:
            child.waiting.pop(ident, None)
        if isinstance(reply, Failed):
            raise DownloadError(reply.reason, permanent=reply.permanent, kind=reply.kind)
        if isinstance(reply, Crashed):
            raise RuntimeError(f"in the download process: {reply.error}")
        return reply.image

    async def _running(self) -> _Child:
        async with self._starting:
            if self._closing:
                raise DownloadError("the service is stopping", permanent=False, kind="process")
            if self._child is None or not self._child.alive:
                self._child = await self._start()
            return self._child

    async def _start(self) -> _Child:
        # -P and PYTHONPATH: the child imports this very `receiver`, whatever the working directory holds.
        paths = [PACKAGE_ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",
                "-m",
                "receiver.fetcher",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
            )
        except OSError as exc:
            raise DownloadError(
                f"cannot start the download process: {exc.strerror or exc}", permanent=False, kind="process"
            ) from None
        assert process.stdin is not None
        process.stdin.write(frame(self.setup))
        child = _Child(process)
        child.reader = asyncio.create_task(self._read(child), name=f"receiver-fetcher-{process.pid}")
        event(log, "download process started", pid=process.pid)
        return child

    async def _read(self, child: _Child) -> None:
        """Hand each answer to its download; when the stream ends, the child is over."""
        process = child.process
        assert process.stdout is not None
        broken = False
        try:
            while (body := await read_frame(process.stdout)) is not None:
                reply = self._replies.decode(body)
                future = child.waiting.get(reply.id)
                if future is not None and not future.done():
                    future.set_result(reply)
        except (asyncio.IncompleteReadError, ValueError, msgspec.DecodeError, ConnectionError):
            broken = True
        finally:
            child.alive = False
        if broken and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        try:
            status = await asyncio.wait_for(process.wait(), EXIT_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            status = await process.wait()
        for future in child.waiting.values():
            if not future.done():
                future.set_exception(_gone(status))
        if not self._closing:
            event(
                log,
                "download process stopped",
                level=logging.WARNING,
                pid=process.pid,
                status=status,
                downloads_lost=len(child.waiting),
            )
            # Its temp files carry its pid, now gone: orphans, removed as a killed process's are.
            cleaning = asyncio.create_task(self._clean(), name="receiver-fetcher-clean")
            self._cleaning.add(cleaning)
            cleaning.add_done_callback(self._cleaning.discard)

    async def _clean(self) -> None:
        try:
            removed = await self.media.clean_partial()
        except Exception as exc:  # the next start tries again
            event(log, "cannot remove partial downloads", level=logging.WARNING, reason=str(exc)[:200])
            return
        if removed:
            event(log, "removed partial downloads of the download process", removed=removed)

    async def close(self) -> None:
        """Stop starting children; end the running one (stdin EOF), killing it after EXIT_GRACE."""
        async with self._starting:
            self._closing = True
        child = self._child
        if child is not None and child.reader is not None:
            if child.process.stdin is not None:
                child.process.stdin.close()
            await child.reader
        for cleaning in list(self._cleaning):
            cleaning.cancel()
        await asyncio.gather(*self._cleaning, return_exceptions=True)


def open_fetcher(
    settings: Settings, provider_http: httpx.AsyncClient, outside_http: httpx.AsyncClient, media: Media
) -> Fetcher:
    """The download child when RECEIVER_DOWNLOAD_PROCESS says so, else the worker's own loop."""
    if settings.download_process:
        return DownloadProcess(settings, media)
    return InProcess(provider_http, outside_http, media)


# -- the child ---------------------------------------------------------------------------------------


async def _serve_parent(requests: asyncio.StreamReader, replies: asyncio.StreamWriter) -> None:
    from receiver import logs
    from receiver.media import open_media
    from receiver.transport import outside_client
    from receiver.transport import provider_client

    decoder = msgspec.msgpack.Decoder(Request)
    body = await read_frame(requests)
    if body is None:
        return
    setup = decoder.decode(body)
    if not isinstance(setup, Setup):
        raise SystemExit("receiver.fetcher: the first frame must be the setup")
    logs.configure(setup.log_level, setup.log_format)
    media = open_media(setup.media_url, Path(setup.data_dir), setup.aws)
    outside = outside_client(allow_private=setup.allow_private_urls, timeout=setup.http_timeout)
    provider = provider_client(timeout=setup.http_timeout)
    running: dict[int, asyncio.Task[None]] = {}

    async def answer(reply: Reply) -> None:
        replies.write(frame(reply))
        with contextlib.suppress(ConnectionError):  # the parent is gone: stdin's EOF ends us
            await replies.drain()

    async def download(request: Fetch) -> None:
        client = provider if request.trusted else outside
        reply: Reply
        try:
            stored = await fetch_image(client, request.url, media, request.stem, request.max_bytes)
        except DownloadError as exc:
            reply = Failed(request.id, exc.reason, exc.permanent, exc.kind)
        except Exception as exc:
            log.exception("download %s crashed", request.stem)
            reply = Crashed(request.id, f"{type(exc).__name__}: {exc}")
        else:
            reply = Stored(request.id, stored)
        finally:
            running.pop(request.id, None)
        await answer(reply)

    try:
        while (body := await read_frame(requests)) is not None:
            request = decoder.decode(body)
            if isinstance(request, Fetch):
                running[request.id] = asyncio.create_task(download(request))
            elif isinstance(request, Cancel) and request.id in running:
                running[request.id].cancel()
    finally:
        # EOF: the worker is stopping or died. Unfinished downloads end here; their temp files with them.
        for task in running.values():
            task.cancel()
        await asyncio.gather(*running.values(), return_exceptions=True)
        await outside.aclose()
        await provider.aclose()


async def _child_main(out_fd: int) -> None:
    loop = asyncio.get_running_loop()
    requests = asyncio.StreamReader(limit=MAX_FRAME)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(requests), os.fdopen(0, "rb", 0))
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(out_fd, "wb", 0)
    )
    replies = asyncio.StreamWriter(transport, protocol, None, loop)
    try:
        await _serve_parent(requests, replies)
    finally:
        transport.close()


def main() -> None:
    # Pipes, or the socket pairs uvloop makes for a child's stdio; never a file or a terminal.
    if not all(
        stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) for mode in (os.fstat(fd).st_mode for fd in (0, 1))
    ):
        raise SystemExit("receiver.fetcher: started by the worker only (its stdin and stdout are pipes)")
    # The parent decides when this process ends (stdin's EOF); signals meant for the service go to it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Answers first: when the cores are contended, the acks (in the parent) get them before downloads,
    # which are durable jobs and can wait, as the worker already holds them back while callbacks pour in.
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    # Frames only on the pipe: keep it on a private descriptor, and send stray prints to stderr.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    try:  # the `fast` extra's loop when installed, as `serve --loop auto` picks it
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        pass
    else:
        uvloop.install()
    asyncio.run(_child_main(out_fd))


if __name__ == "__main__":
    main()
