"""Image type by magic bytes, and width and height from the header: PNG, JPEG and WebP only."""

from __future__ import annotations

import struct
from typing import BinaryIO

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
SNIFF_BYTES = 12


def sniff(head: bytes) -> str | None:
    """The content type the first bytes announce, or None when they are not PNG, JPEG or WebP."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def dimensions(handle: BinaryIO, content_type: str) -> tuple[int, int] | None:
    """(width, height) from the header of an image of the given type, or None if the header is broken."""
    handle.seek(0)
    try:
        if content_type == "image/png":
            return _png(handle)
        if content_type == "image/jpeg":
            return _jpeg(handle)
        if content_type == "image/webp":
            return _webp(handle)
    except (struct.error, ValueError):
        return None
    return None


def _png(handle: BinaryIO) -> tuple[int, int] | None:
    head = handle.read(24)
    if head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(handle: BinaryIO) -> tuple[int, int] | None:
    handle.seek(2)
    while True:
        byte = handle.read(1)
        if not byte:
            return None
        if byte != b"\xff":
            continue
        marker = handle.read(1)
        while marker == b"\xff":
            marker = handle.read(1)
        if not marker:
            return None
        code = marker[0]
        if code in (0xD8, 0x01) or 0xD0 <= code <= 0xD7:
            continue  # markers without a length
        if code == 0xD9:
            return None
        (length,) = struct.unpack(">H", handle.read(2))
        if code in _SOF:
            height, width = struct.unpack(">xHH", handle.read(5))
            return width, height
        handle.seek(length - 2, 1)


def _webp(handle: BinaryIO) -> tuple[int, int] | None:
    head = handle.read(30)
    chunk = head[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return width, height
    return None
