"""Images an app hands us (raw uploads and data URIs), kept by content hash under uploads/ of the media."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import AsyncIterable

from receiver.intake import ImageRefused
from receiver.intake import store_image
from receiver.media import Media

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
