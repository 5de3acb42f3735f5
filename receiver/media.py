"""Where image bytes live: a local directory (the default) or an S3-compatible bucket.

Both backends take a stream and make it visible under its key in one step, only once the stream has
ended without an error: the local one writes a temp file and renames it; the bucket one uploads (in
parts, for large objects) and completes the upload only then, aborting it otherwise. A reader never
sees half an image under a key.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import AsyncIterable
from collections.abc import AsyncIterator
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Protocol
from urllib.parse import urlsplit

import anyio
import obstore
from obstore.exceptions import BaseError
from obstore.store import S3Store

from receiver.offload import Behind

if TYPE_CHECKING:
    from receiver.store import Store

CHUNK = 64 * 1024
PART_SIZE = 5 * 1024 * 1024  # S3's smallest part; an object up to this size goes up in one PUT
PARTS_IN_FLIGHT = 2  # parts uploading at once: what a download holds in memory stays near 2 parts
PARTIAL_AGE = 3600.0  # a temp left this long is a killed writer's, never one still being written
STORE_ERRORS = (BaseError, OSError)  # obstore maps a missing object to FileNotFoundError
LIST_BATCH = 500  # keys listed (and then deleted) at a time
DELETE_BATCH = 1000  # keys per delete request: S3's bulk delete takes up to 1000


class MediaError(Exception):
    """The media store failed: unreachable, refused, out of space. Transient from the caller's view."""


class MediaMissing(MediaError):
    """No object under that key."""


@dataclass(frozen=True)
class MediaObject:
    size: int
    chunks: AsyncIterator[bytes]


class Media(Protocol):
    """What the service needs from a media store. Keys are relative paths like `tsk_…/0.png`."""

    description: str

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> None:
        """Store the stream under `key`, visible only once `chunks` ends; an error in it stores nothing."""

    async def rename(self, source: str, dest: str) -> None: ...

    async def exists(self, key: str) -> bool: ...

    async def open(self, key: str) -> MediaObject:
        """The object's size and its bytes as a stream; MediaMissing when there is none."""

    async def read(self, key: str) -> bytes: ...

    async def delete(self, key: str) -> None: ...

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Delete every object named (a missing one is no error), in as few requests as the store allows."""

    def older(self, folder: str, before: float) -> AsyncIterator[list[str]]:
        """The keys under `folder/` last written before `before` (a Unix time), a batch at a time; temp
        names are left to `clean_partial`."""
        ...

    async def presign(self, key: str, seconds: int) -> str | None:
        """A URL that serves the object for `seconds` without our credentials, or None if there is none."""

    def local_path(self, key: str) -> Path | None:
        """The object's file when the store is a directory (served as a file: ranges, sendfile)."""

    async def ready(self) -> str | None:
        """Why the store cannot take writes now, or None when it can."""

    async def clean_partial(self) -> int:
        """Remove temp objects a killed writer left behind; how many."""


def temp_key(directory: str) -> str:
    """A name no reader asks for, beside its final place (a rename stays on one file system)."""
    return f"{directory}/.{_temp_tag()}"


def _temp_tag() -> str:
    # The writer's pid lets a restart on the same host tell a dead writer's temp from a live one's.
    return f"{os.getpid()}-{secrets.token_hex(6)}.part"


_TEMP_PID = re.compile(r"\.(\d+)-[0-9a-f]+\.part$")


def _writer_gone(name: str) -> bool:
    match = _TEMP_PID.search(name)
    if match is None:
        return True
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _checked_key(key: str) -> str:
    parts = key.split("/")
    if key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"not a media key: {key!r}")
    return key


class LocalMedia:
    """Files under one directory, readable by the service's user only (0700 folders, 0600 files)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = str(root)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        root.chmod(0o700)

    def _path(self, key: str) -> Path:
        return self.root / _checked_key(key)

    def _folder(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> None:
        path = self._path(key)
        temp = path.parent / f".{path.name}.{_temp_tag()}"
        try:
            self._folder(path)
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise MediaError(f"cannot write to the media directory: {exc.strerror}") from None
        writing = Behind()  # each write in a thread while the next chunk arrives
        try:
            with open(fd, "wb") as handle:  # noqa: ASYNC230 - written in a thread, closed once done
                try:
                    async for chunk in chunks:
                        await writing.run(handle.write, chunk)
                finally:
                    await writing.wait()
            os.replace(temp, path)
        except OSError as exc:
            _unlink(temp)
            raise MediaError(f"cannot write to the media directory: {exc.strerror}") from None
        except BaseException:
            _unlink(temp)
            raise

    async def rename(self, source: str, dest: str) -> None:
        try:
            self._folder(self._path(dest))
            os.replace(self._path(source), self._path(dest))
        except OSError as exc:
            raise MediaError(f"cannot rename in the media directory: {exc.strerror}") from None

    async def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    async def open(self, key: str) -> MediaObject:
        path = self._path(key)
        try:
            handle = await anyio.open_file(path, "rb")
        except FileNotFoundError:
            raise MediaMissing(key) from None
        except OSError as exc:
            raise MediaError(f"cannot read the media directory: {exc.strerror}") from None
        size = os.fstat(handle.wrapped.fileno()).st_size

        async def chunks() -> AsyncIterator[bytes]:
            async with handle:
                while chunk := await handle.read(CHUNK):
                    yield chunk

        return MediaObject(size, chunks())

    async def read(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise MediaMissing(key) from None
        except OSError as exc:
            raise MediaError(f"cannot read the media directory: {exc.strerror}") from None

    async def delete(self, key: str) -> None:
        _unlink(self._path(key))

    async def delete_many(self, keys: Sequence[str]) -> None:
        paths = [self._path(key) for key in keys]
        try:
            await anyio.to_thread.run_sync(_unlink_all, paths)
        except OSError as exc:
            raise MediaError(f"cannot delete in the media directory: {exc.strerror}") from None

    async def older(self, folder: str, before: float) -> AsyncIterator[list[str]]:
        found = await anyio.to_thread.run_sync(_files_older, self._path(folder), before)
        for start in range(0, len(found), LIST_BATCH):
            yield [f"{folder}/{name}" for name in found[start : start + LIST_BATCH]]

    async def presign(self, key: str, seconds: int) -> str | None:
        return None

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    async def ready(self) -> str | None:
        probe = self.root / f".ready.{secrets.token_hex(4)}"
        try:
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError:
            return "the media directory is not writable"
        return None

    async def clean_partial(self) -> int:
        removed = 0
        cutoff = time.time() - PARTIAL_AGE
        for part in self.root.rglob(".*.part"):
            try:
                if part.stat().st_mtime < cutoff or _writer_gone(part.name):
                    part.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _unlink_all(paths: Sequence[Path]) -> None:
    for path in paths:
        _unlink(path)


def _files_older(folder: Path, before: float) -> list[str]:
    """The names of the files in `folder` (not its temps) last written before `before`."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise MediaError(f"cannot list the media directory: {exc.strerror}") from None
    names = []
    for entry in entries:
        try:
            if not entry.name.startswith(".") and entry.is_file() and entry.stat().st_mtime < before:
                names.append(entry.name)
        except FileNotFoundError:
            pass
    return names


class S3Media:
    """An S3-compatible bucket (AWS S3, MinIO, R2 …) through obstore, under an optional key prefix."""

    def __init__(self, url: str, aws: Mapping[str, str]) -> None:
        parts = urlsplit(url)
        prefix = parts.path.strip("/")
        self.description = url
        endpoint = aws.get("AWS_ENDPOINT_URL") or None
        config: dict[str, str] = {"region": aws.get("AWS_REGION") or "us-east-1"}
        for variable, name in (
            ("AWS_ENDPOINT_URL", "endpoint"),
            ("AWS_ACCESS_KEY_ID", "access_key_id"),
            ("AWS_SECRET_ACCESS_KEY", "secret_access_key"),
            ("AWS_SESSION_TOKEN", "session_token"),
        ):
            if aws.get(variable):
                config[name] = aws[variable]
        self.store = S3Store(
            parts.netloc,
            prefix=prefix or None,
            config=config,  # type: ignore[arg-type]  # keys checked above; obstore types them one by one
            client_options={
                "allow_http": bool(endpoint and endpoint.startswith("http://")),
                "connect_timeout": timedelta(seconds=5),
                "timeout": timedelta(seconds=120),
            },
            retry_config={"max_retries": 3, "retry_timeout": timedelta(seconds=20)},
        )

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> None:
        key = _checked_key(key)
        stream = aiter(chunks)
        head: list[bytes] = []
        buffered = 0
        async for chunk in stream:
            head.append(chunk)
            buffered += len(chunk)
            if buffered > PART_SIZE:
                break
        try:
            if buffered <= PART_SIZE:  # the whole object in one PUT: three requests fewer
                await obstore.put_async(self.store, key, b"".join(head), use_multipart=False)
            else:
                # An error raised by `chunks` comes out of put_async as itself, after obstore has
                # aborted the multipart upload: no object appears, and no parts are left behind.
                await obstore.put_async(
                    self.store,
                    key,
                    _chain(head, stream),
                    chunk_size=PART_SIZE,
                    max_concurrency=PARTS_IN_FLIGHT,
                )
        except STORE_ERRORS as exc:
            raise MediaError(f"the bucket refused the write: {_reason(exc)}") from None

    async def rename(self, source: str, dest: str) -> None:
        try:
            await obstore.rename_async(self.store, source, _checked_key(dest))
        except STORE_ERRORS as exc:
            raise MediaError(f"the bucket refused a rename: {_reason(exc)}") from None

    async def exists(self, key: str) -> bool:
        try:
            await obstore.head_async(self.store, _checked_key(key))
        except FileNotFoundError:
            return False
        except STORE_ERRORS as exc:
            raise MediaError(f"the bucket did not answer: {_reason(exc)}") from None
        return True

    async def open(self, key: str) -> MediaObject:
        try:
            result = await obstore.get_async(self.store, _checked_key(key))
        except FileNotFoundError:
            raise MediaMissing(key) from None
        except STORE_ERRORS as exc:
            raise MediaError(f"the bucket did not answer: {_reason(exc)}") from None

        async def chunks() -> AsyncIterator[bytes]:
            async for chunk in result.stream(min_chunk_size=CHUNK):
                yield chunk

        return MediaObject(result.meta["size"], chunks())

    async def read(self, key: str) -> bytes:
        stored = await self.open(key)
        return b"".join([chunk async for chunk in stored.chunks])

    async def delete(self, key: str) -> None:
        try:
            await obstore.delete_async(self.store, _checked_key(key))
        except FileNotFoundError:
            pass
        except STORE_ERRORS as exc:
            raise MediaError(f"the bucket refused a delete: {_reason(exc)}") from None

    async def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        try:  # obstore sends S3's bulk delete, up to 1000 keys a request
            await obstore.delete_async(self.store, [_checked_key(key) for key in keys])
        except FileNotFoundError:
            pass
        except STORE_ERRORS as exc:
            raise MediaError(f"the bucket refused a delete: {_reason(exc)}") from None

    async def older(self, folder: str, before: float) -> AsyncIterator[list[str]]:
        try:
            async for batch in obstore.list(self.store, f"{_checked_key(folder)}/", chunk_size=LIST_BATCH):
                yield [
                    meta["path"]
                    for meta in batch
                    if not meta["path"].rsplit("/", 1)[-1].startswith(".")
                    and meta["last_modified"].timestamp() < before
                ]
        except STORE_ERRORS as exc:
            raise MediaError(f"the bucket did not list: {_reason(exc)}") from None

    async def presign(self, key: str, seconds: int) -> str | None:
        try:
            return await obstore.sign_async(self.store, "GET", _checked_key(key), timedelta(seconds=seconds))
        except STORE_ERRORS as exc:
            raise MediaError(f"cannot sign a link: {_reason(exc)}") from None

    def local_path(self, key: str) -> Path | None:
        return None

    async def ready(self) -> str | None:
        probe = f".ready/{secrets.token_hex(8)}"
        try:
            with anyio.fail_after(10):
                await self.put(probe, one_chunk(b"ok"))
                await self.delete(probe)
        except MediaError as exc:
            return f"the media bucket is not writable: {exc}"
        except TimeoutError:
            return "the media bucket did not answer within 10 s"
        return None

    async def clean_partial(self) -> int:
        # Only uploads are written under a temp name here; downloads go straight to their key.
        cutoff = time.time() - PARTIAL_AGE
        stale: list[str] = []
        try:
            async for batch in obstore.list(self.store, "uploads/"):
                for meta in batch:
                    name = meta["path"].rsplit("/", 1)[-1]
                    old = meta["last_modified"].timestamp() < cutoff
                    if name.startswith(".") and name.endswith(".part") and old:
                        stale.append(meta["path"])
            if stale:
                await obstore.delete_async(self.store, stale)
        except STORE_ERRORS:
            return 0  # the next start tries again; /readyz reports the outage
        return len(stale)


async def delete_media(media: Media, keys: Iterable[str | None]) -> int:
    """Delete the stored bytes under `keys` (None, an image never stored, is skipped), DELETE_BATCH at
    a time; how many keys were named. The one way a task's images leave the media store: the
    retention sweep and a task's deletion both come here."""
    batch: list[str] = []
    count = 0
    for key in keys:
        if key is None:
            continue
        batch.append(key)
        if len(batch) >= DELETE_BATCH:
            await media.delete_many(batch)
            count += len(batch)
            batch = []
    if batch:
        await media.delete_many(batch)
        count += len(batch)
    return count


async def delete_tasks(store: Store, media: Media, task_ids: Sequence[str]) -> list[str]:
    """Remove those of these tasks that have ended, whole: their images' bytes, then their rows
    (images, events, jobs) in one transaction; a task not ended is left as it is. Returns the ids
    removed. Should the process stop in between, the rows are still there and a second call finishes."""
    await delete_media(media, await store.media_keys(task_ids))
    return await store.delete_ended(task_ids)


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _chain(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    async for chunk in rest:
        yield chunk


def _reason(exc: Exception) -> str:
    # obstore's messages carry the request (with the bucket's URL) over several lines: keep the first.
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else 'no detail'}"


def open_media(media_url: str | None, data_dir: Path, aws: Mapping[str, str]) -> Media:
    """The store the settings name: the bucket of RECEIVER_MEDIA_URL, else `data_dir/media`."""
    if media_url:
        return S3Media(media_url, aws)
    return LocalMedia(data_dir / "media")
