"""Images an app hands us (raw uploads and data URIs), kept by content hash under uploads/ of the media."""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import AsyncIterable

from receiver import imageinfo
from receiver.intake import HEAD_BYTES
from receiver.intake import ImageRefused
from receiver.intake import store_image
from receiver.media import Media
from receiver.media import MediaError

NAME = re.compile(r"^[0-9a-f]{64}\.(png|jpg|webp)$")
DATA_URI = re.compile(r"^data:(image/[a-z0-9.+-]+)?(;[^,]*)?;base64,", re.IGNORECASE)


class UploadError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


async def keep_upload(media: Media, chunks: AsyncIterable[bytes], max_bytes: int) -> tuple[str, str, int]:
    """Keep an image streamed in; returns (name, content type, size). Raises UploadError (413 or 415),
    MediaError when the store fails."""
    try:
        stored = await store_image(media, None, chunks, max_bytes, folder="uploads")
    except ImageRefused as exc:
        if exc.kind == "too_large":
            raise UploadError(
                f"the image is over RECEIVER_MAX_IMAGE_BYTES ({max_bytes} bytes)", 413
            ) from None
        raise UploadError("the body is not a PNG, JPEG or WebP image", 415) from None
    return stored.key.rsplit("/", 1)[-1], stored.content_type, stored.size


def decode_data_uri(value: str) -> bytes:
    match = DATA_URI.match(value)
    if match is None:
        raise UploadError("a data URI must look like data:image/png;base64,…", 422)
    try:
        return base64.b64decode(value[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise UploadError("the data URI's base64 does not decode", 422) from None


def head_dimensions(head: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's first bytes, or None when they do not say."""
    kind = imageinfo.sniff(head[: imageinfo.SNIFF_BYTES])
    return imageinfo.dimensions(io.BytesIO(head), kind) if kind else None


def data_uri_dimensions(value: str) -> tuple[int, int] | None:
    """The size of the image in a data URI, read from the start of its base64 alone."""
    match = DATA_URI.match(value)
    if match is None:
        return None
    encoded = value[match.end() : match.end() + HEAD_BYTES // 3 * 4]
    try:
        return head_dimensions(base64.b64decode(encoded[: len(encoded) // 4 * 4]))
    except (binascii.Error, ValueError):
        return None


async def upload_dimensions(media: Media, name: str) -> tuple[int, int] | None:
    """The size of an image kept under uploads/, read from its first bytes; None if it is not there."""
    try:
        stored = await media.open(f"uploads/{name}")
    except MediaError:
        return None
    head = bytearray()
    try:
        async for chunk in stored.chunks:
            head += chunk
            if len(head) >= HEAD_BYTES:
                break
    except MediaError:
        return None
    finally:
        aclose = getattr(stored.chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    return head_dimensions(bytes(head))
