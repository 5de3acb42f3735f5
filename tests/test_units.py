"""Small pure pieces: image headers, the status order, tokens and links, the schema migrations."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import sqlite3
import struct
import time
from pathlib import Path

import pytest
from itsdangerous import Signer

from receiver import imageinfo
from receiver.models import MalformedCallback
from receiver.models import Status
from receiver.providers.base import json_object
from receiver.store.base import Wakeups
from receiver.store.sqlite import MIGRATIONS
from receiver.store.sqlite import migrate
from receiver.tokens import CallbackClaim
from receiver.tokens import Tokens
from tests.fakes.common import png


def jpeg(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    exif = b"\xff\xe1" + struct.pack(">H", 2 + 3000) + bytes(3000)  # a long segment before the frame
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + exif + sof + b"\xff\xd9"


def webp(kind: bytes, width: int, height: int) -> bytes:
    if kind == b"VP8X":
        payload = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    elif kind == b"VP8L":
        bits = (width - 1) | ((height - 1) << 14)
        payload = b"\x2f" + bits.to_bytes(4, "little")
    else:
        payload = b"\x00\x00\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height)
    chunk = kind + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


@pytest.mark.parametrize(
    ("data", "content_type", "size"),
    [
        (png(123, 45), "image/png", (123, 45)),
        (jpeg(640, 480), "image/jpeg", (640, 480)),
        (webp(b"VP8X", 1000, 700), "image/webp", (1000, 700)),
        (webp(b"VP8L", 300, 200), "image/webp", (300, 200)),
        (webp(b"VP8 ", 64, 32), "image/webp", (64, 32)),
    ],
)
def test_image_headers(data: bytes, content_type: str, size: tuple[int, int]) -> None:
    assert imageinfo.sniff(data[:12]) == content_type
    assert imageinfo.dimensions(io.BytesIO(data), content_type) == size


@pytest.mark.parametrize(
    "data", [b"GIF89a......", b"<html></html>", b"\x89PNG", b"", b"RIFF\x00\x00\x00\x00WAVE"]
)
def test_not_images(data: bytes) -> None:
    assert imageinfo.sniff(data[:12]) is None


def test_a_broken_header_has_no_dimensions() -> None:
    assert imageinfo.dimensions(io.BytesIO(b"\xff\xd8\xff\xe0\x00"), "image/jpeg") is None
    assert imageinfo.dimensions(io.BytesIO(b"\x89PNG\r\n\x1a\n" + bytes(8)), "image/png") is None


def test_status_moves_forward_only() -> None:
    assert Status.QUEUED.may_become(Status.SUBMITTED)
    assert Status.QUEUED.may_become(Status.DOWNLOADING)  # an early callback
    assert Status.SUBMITTED.may_become(Status.FAILED)
    assert not Status.DOWNLOADING.may_become(Status.SUBMITTED)
    assert not Status.SUBMITTED.may_become(Status.SUBMITTED)
    for ended in (Status.SUCCEEDED, Status.FAILED):
        assert not any(ended.may_become(other) for other in Status)


def test_tokens_and_links() -> None:
    tokens = Tokens("k" * 40, "https://r.example", 60)
    other = Tokens("j" * 40, "https://r.example", 60)
    token = tokens.callback_token("kie", "tsk_1", 0)
    claim = CallbackClaim("tsk_1", 0)
    assert tokens.callback_of("kie", token) == claim
    assert tokens.callback_of("kie", token) == claim  # from the cache
    assert other.callback_of("kie", token) is None
    assert tokens.callback_of("apimart", token) is None  # bound to the provider it was given to
    assert tokens.callback_of("kie", token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert tokens.callback_of("kie", "tsk_1") is None
    # Cached by its exact text only: a near twin of a cached token is checked, and refused.
    for twin in (token + "=", token + "==", " " + token, token.upper(), "tsk_2" + token[5:], token[:-1], ""):
        assert tokens.callback_of("kie", twin) is None, twin
    assert tokens.callback_of("kie", token.replace(".", "é", 1)) is None
    # The one-HMAC check agrees with itsdangerous on every token it issues.
    for task_id in ("tsk_1", "a.b", "x" * 64):
        issued = tokens.callback_token("fal", task_id, 2)
        signer = Signer("k" * 40, salt="receiver.callback.fal", digest_method=hashlib.sha256)
        assert signer.unsign(issued) == f"{task_id}.2".encode()
        assert tokens.callback_of("fal", issued) == CallbackClaim(task_id, 2)
        # A token from before tokens were bound names the task alone, on any route.
        legacy = Signer("k" * 40, salt="receiver.callback", digest_method=hashlib.sha256).sign(task_id)
        assert tokens.callback_of("apimart", legacy.decode()) == CallbackClaim(task_id, None)
    link = tokens.signed_link("/v1/tasks/tsk_1/images/0")
    query = dict(part.split("=") for part in link.split("?")[1].split("&"))
    assert tokens.link_valid("/v1/tasks/tsk_1/images/0", query["expires"], query["signature"])
    assert not tokens.link_valid("/v1/tasks/tsk_2/images/0", query["expires"], query["signature"])
    assert not tokens.link_valid(
        "/v1/tasks/tsk_1/images/0", str(int(query["expires"]) + 1), query["signature"]
    )
    expired = tokens.signed_link("/x", ttl=-5)
    query = dict(part.split("=") for part in expired.split("?")[1].split("&"))
    assert int(query["expires"]) < time.time()
    assert not tokens.link_valid("/x", query["expires"], query["signature"])
    # A callback token never doubles as a link signature, nor the other way round.
    assert not tokens.link_valid("tsk_1", query["expires"], token.split(".")[-1])


def test_migrations_apply_once(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    assert migrate(conn) == len(MIGRATIONS)
    assert migrate(conn) == len(MIGRATIONS)
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"tasks", "images", "events", "jobs"} <= tables
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


def test_callback_bodies_read_as_json_our_databases_can_keep() -> None:
    """Provider bodies go through the one reader of outside JSON: what the json module reads and a
    database or encoder can keep is read alike; a lone surrogate, NaN or a number out of range is not."""
    bodies = [
        b'{"a": [1, 2.5, "x", null, true], "b": {"c": 123456789012345678901234567890}}',
        b'{"a": 1, "a": 2}',  # the last one wins in both
        b'{"a": "\\ud83d\\ude00 \\u0000"}',  # a surrogate pair, and NUL (cleaned where it is stored)
    ]
    for raw in bodies:
        assert json_object(raw) == json.loads(raw), raw
    assert json_object(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}  # a byte order mark is skipped
    refused = (b"", b"[1]", b'{"a": 1', b"\xff", b'"x"', b'{"a": "\\ud800"}', b'{"a": "\xed\xa0\x80"}')
    for bad in (*refused, b'{"a": NaN}', b'{"a": 1e400}', b"[" * 2000 + b"]" * 2000):
        with pytest.raises(MalformedCallback):
            json_object(bad)


def test_a_change_waiter_cancelled_as_its_task_changes_is_cancelled() -> None:
    """A download's watcher is cancelled the moment its fetch ends, often as the task changes (another
    image stored): the cancellation must win, or the download waits on its watcher for good."""

    async def main() -> None:
        wakeups = Wakeups()
        waiter = asyncio.ensure_future(wakeups.wait("tsk_1", 60))
        await asyncio.sleep(0)  # it waits now
        wakeups.announce(["tsk_1"], False)  # the task changes …
        waiter.cancel()  # … and, in the same turn of the loop, the watcher is stopped
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert wakeups.everyone() == []

    asyncio.run(main())
