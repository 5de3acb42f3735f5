"""Image bytes on their way into the media store, for downloads and uploads alike.

The checks run while the bytes stream (the size cap, the magic bytes, sha256, width and height from the
header), so nothing is ever held whole in memory, and the store makes the object visible only once the
stream has ended without one of them failing.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import AsyncIterable
from collections.abc import AsyncIterator
from dataclasses import dataclass

from receiver import imageinfo
from receiver.media import Media
from receiver.media import temp_key
from receiver.offload import Behind

# Width and height are read from the first bytes kept here: a JPEG's frame header follows its
# metadata segments (EXIF, ICC, XMP), each at most 64 KiB; this covers the usual stack of them.
HEAD_BYTES = 512 * 1024


class ImageRefused(Exception):
    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # too_large or not_image


@dataclass(frozen=True)
class StoredImage:
    key: str
    content_type: str
    size: int
    sha256: str
    width: int | None
    height: int | None


def _not_image() -> ImageRefused:
    return ImageRefused("the bytes are not a PNG, JPEG or WebP image", "not_image")


class _Checked:
    """The stream as it passes: counted against the cap, hashed (in a thread, one chunk behind), its
    head kept for the dimensions."""

    def __init__(self, source: AsyncIterator[bytes], peeked: list[bytes], max_bytes: int) -> None:
        self.source = source
        self.peeked = peeked
        self.max_bytes = max_bytes
        self.size = 0
        self.digest = hashlib.sha256()
        self.head = bytearray()
        self.hashing = Behind()

    async def _take(self, chunk: bytes) -> bytes:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise ImageRefused(f"the image is over the {self.max_bytes}-byte cap", "too_large")
        await self.hashing.run(self.digest.update, chunk)
        if len(self.head) < HEAD_BYTES:
            self.head += chunk[: HEAD_BYTES - len(self.head)]
        return chunk

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            for chunk in self.peeked:
                yield await self._take(chunk)
            async for chunk in self.source:
                yield await self._take(chunk)
        finally:
            await self.hashing.wait()

    async def sha256(self) -> str:
        """The digest of every chunk taken, once the last one is hashed."""
        await self.hashing.wait()
        return self.digest.hexdigest()


async def store_image(
    media: Media, stem: str | None, chunks: AsyncIterable[bytes], max_bytes: int, folder: str = ""
) -> StoredImage:
    """Check and store an image at `stem`.<ext>, or, with no stem, at `folder`/<sha256>.<ext>.

    Raises ImageRefused (and stores nothing) for bytes over `max_bytes` or not PNG, JPEG or WebP;
    MediaError when the store fails; whatever `chunks` raises, likewise storing nothing.
    """
    source = aiter(chunks)
    peeked: list[bytes] = []
    head = b""
    async for chunk in source:  # the extension is part of the key: learn the type first
        peeked.append(chunk)
        head += chunk[: imageinfo.SNIFF_BYTES]
        if len(head) >= imageinfo.SNIFF_BYTES:
            break
    content_type = imageinfo.sniff(head)
    if content_type is None:
        raise _not_image()
    extension = imageinfo.EXTENSIONS[content_type]
    checked = _Checked(source, peeked, max_bytes)
    key = f"{stem}.{extension}" if stem is not None else temp_key(folder)
    await media.put(key, checked.chunks())
    sha256 = await checked.sha256()
    if stem is None:
        final = f"{folder}/{sha256}.{extension}"
        if await media.exists(final):
            await media.delete(key)  # the same image again: keep the copy already there
        else:
            await media.rename(key, final)
        key = final
    dimensions = imageinfo.dimensions(io.BytesIO(checked.head), content_type)
    width, height = dimensions if dimensions else (None, None)
    return StoredImage(key, content_type, checked.size, sha256, width, height)
