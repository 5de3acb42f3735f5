"""The media interface, the same promises from both stores: a directory and a bucket (moto's server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from collections.abc import Awaitable
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest

from receiver.media import LocalMedia
from receiver.media import Media
from receiver.media import MediaMissing
from receiver.media import S3Media
from receiver.media import one_chunk
from tests.s3 import MotoS3

T = TypeVar("T")
MiB = 1024 * 1024


def run(step: Callable[[], Awaitable[T]]) -> T:
    async def wrapped() -> T:
        return await step()

    return asyncio.run(wrapped())


@pytest.fixture(params=["dir", "s3"])
def media(request: pytest.FixtureRequest, tmp_path: Path) -> Media:
    if request.param == "dir":
        return LocalMedia(tmp_path / "media")
    s3: MotoS3 = request.getfixturevalue("s3")
    env = s3.env(s3.new_bucket(), "pre/fix")
    return S3Media(env["RECEIVER_MEDIA_URL"], env)


async def pieces(count: int, size: int, fail_after: int | None = None) -> AsyncIterator[bytes]:
    for index in range(count):
        if index == fail_after:
            raise RuntimeError("refused midway")
        yield bytes([index % 256]) * size


def test_put_open_read_rename_delete(media: Media) -> None:
    async def steps() -> None:
        await media.put("a/small.png", one_chunk(b"tiny"))
        await media.put("a/large.png", pieces(3, 3 * MiB))  # 9 MiB: the multipart path in a bucket
        assert await media.read("a/small.png") == b"tiny"
        stored = await media.open("a/large.png")
        assert stored.size == 9 * MiB
        assert b"".join([chunk async for chunk in stored.chunks]) == b"".join(
            [chunk async for chunk in pieces(3, 3 * MiB)]
        )
        await media.rename("a/small.png", "b/moved.png")
        assert not await media.exists("a/small.png")
        assert await media.read("b/moved.png") == b"tiny"
        await media.delete("b/moved.png")
        await media.delete("b/moved.png")  # gone already: no error
        with pytest.raises(MediaMissing):
            await media.open("b/moved.png")
        with pytest.raises(MediaMissing):
            await media.read("never/there.png")
        assert await media.ready() is None

    run(steps)


def test_a_stream_that_fails_stores_nothing(media: Media) -> None:
    async def steps() -> None:
        for count, fail_after in ((2, 1), (4, 3)):  # within one part, and after a part went up
            with pytest.raises(RuntimeError, match="refused midway"):
                await media.put("c/refused.png", pieces(count, 3 * MiB, fail_after))
            assert not await media.exists("c/refused.png")
        # An object already there stays as it was when a second write of it fails.
        await media.put("c/kept.png", one_chunk(b"first"))
        with pytest.raises(RuntimeError):
            await media.put("c/kept.png", pieces(4, 3 * MiB, 3))
        assert await media.read("c/kept.png") == b"first"

    run(steps)


def test_keys_stay_inside_the_store(media: Media) -> None:
    for key in ("../outside.png", "/etc/passwd", "a//b.png", "a/./b.png"):
        with pytest.raises(ValueError, match="not a media key"):
            run(partial(media.put, key, one_chunk(b"x")))


def test_a_directory_leaves_no_temp_file(tmp_path: Path) -> None:
    media = LocalMedia(tmp_path / "media")
    with pytest.raises(RuntimeError):
        run(lambda: media.put("d/x.png", pieces(3, 1024, 2)))
    assert list((tmp_path / "media").rglob("*")) == [tmp_path / "media" / "d"]
