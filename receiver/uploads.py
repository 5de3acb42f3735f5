"""Images an app hands us (raw uploads and data URIs), kept by content hash under media/uploads."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
from pathlib import Path

from receiver import imageinfo

NAME = re.compile(r"^[0-9a-f]{64}\.(png|jpg|webp)$")
DATA_URI = re.compile(r"^data:(image/[a-z0-9.+-]+)?(;[^,]*)?;base64,", re.IGNORECASE)


class UploadError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def store_bytes(uploads: Path, data: bytes, max_bytes: int) -> tuple[str, str]:
    """Keep an image; returns (name, content type). Raises UploadError (413 or 415)."""
    if len(data) > max_bytes:
        raise UploadError(f"the image is over RECEIVER_MAX_IMAGE_BYTES ({max_bytes} bytes)", 413)
    content_type = imageinfo.sniff(data[: imageinfo.SNIFF_BYTES])
    if content_type is None:
        raise UploadError("the body is not a PNG, JPEG or WebP image", 415)
    name = f"{hashlib.sha256(data).hexdigest()}.{imageinfo.EXTENSIONS[content_type]}"
    path = uploads / name
    if not path.exists():
        uploads.mkdir(parents=True, exist_ok=True)
        temp = uploads / f".{name}.{secrets.token_hex(4)}.part"
        temp.write_bytes(data)
        os.replace(temp, path)
    return name, content_type


def decode_data_uri(value: str) -> bytes:
    match = DATA_URI.match(value)
    if match is None:
        raise UploadError("a data URI must look like data:image/png;base64,…", 422)
    try:
        return base64.b64decode(value[match.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise UploadError("the data URI's base64 does not decode", 422) from None
