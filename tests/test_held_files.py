"""Files of the media directory are opened before their answer starts: a sweep or a delete removing one
meanwhile cannot cut the answer short, a file already gone is a 404, and one byte range is a 206."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from receiver.web import single_range
from tests.harness import Receiver


@pytest.mark.parametrize(
    ("header", "span"),
    [
        (None, None),
        ("bytes=0-7", (0, 7)),
        ("bytes=5-", (5, 99)),
        ("bytes=90-500", (90, 99)),
        ("bytes=-10", (90, 99)),
        ("bytes=-500", (0, 99)),
        ("bytes=100-", False),
        ("bytes=-0", False),
        ("bytes=7-3", None),  # not a valid range: answered whole
        ("bytes=0-1,5-6", None),  # several ranges: answered whole, as RFC 9110 allows
        ("items=0-1", None),
        ("bytes=-", None),
    ],
)
def test_one_range_is_read_as_a_file_server_reads_it(header: str | None, span: object) -> None:
    assert single_range(header, 100) == span


def upload(receiver: Receiver, body: bytes) -> dict[str, str]:
    answer = receiver.alice.post("/v1/uploads", content=body, headers={"Content-Type": "image/png"})
    assert answer.status_code == 201, answer.text
    result: dict[str, str] = answer.json()
    return result


def test_a_file_deleted_while_it_is_served_is_served_whole(
    start_receiver: Callable[..., Receiver], tmp_path: Path
) -> None:
    receiver = start_receiver()
    body = b"\x89PNG\r\n\x1a\n" + os.urandom(6 * 1024 * 1024)  # far more than the sockets' buffers
    stored = upload(receiver, body)
    path = tmp_path / "data" / "media" / "uploads" / f"{stored['sha256']}.png"
    with receiver.anon.stream("GET", stored["url"]) as answer:
        assert answer.status_code == 200
        pieces = answer.iter_bytes()
        first = next(pieces)
        path.unlink()  # a retention sweep or a delete, while the answer is on its way
        rest = b"".join(pieces)
    assert hashlib.sha256(first + rest).hexdigest() == hashlib.sha256(body).hexdigest()
    assert receiver.anon.get(stored["url"]).status_code == 404  # gone now: a 404, not a broken answer


def test_ranges_of_a_stored_file(start_receiver: Callable[..., Receiver]) -> None:
    receiver = start_receiver()
    body = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    url = upload(receiver, body)["url"]
    part = receiver.anon.get(url, headers={"Range": "bytes=8-15"})
    assert part.status_code == 206
    assert part.content == body[8:16]
    assert part.headers["content-range"] == f"bytes 8-15/{len(body)}"
    tail = receiver.anon.get(url, headers={"Range": "bytes=-4"})
    assert (tail.status_code, tail.content) == (206, body[-4:])
    whole = receiver.anon.get(url, headers={"Range": "bytes=0-1,4-5"})
    assert (whole.status_code, whole.content) == (200, body)
    beyond = receiver.anon.get(url, headers={"Range": f"bytes={len(body)}-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(body)}"
