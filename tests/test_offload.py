"""Behind: chunk work in a thread, in order, one call in flight, and never abandoned mid-call."""

from __future__ import annotations

import asyncio
import threading

import pytest

from receiver.offload import THREAD_FROM
from receiver.offload import Behind

BIG = THREAD_FROM  # the smallest chunk handed to a thread


def test_calls_run_in_order_large_ones_off_the_loop_and_their_errors_come_out() -> None:
    seen: list[tuple[bytes, bool]] = []
    loop_thread = threading.get_ident()

    def call(chunk: bytes) -> None:
        if chunk.startswith(b"bad"):
            raise OSError(28, "No space left on device")
        seen.append((chunk[:8], threading.get_ident() != loop_thread))

    def chunk(index: int) -> bytes:
        return (b"%08d" % index).ljust(BIG if index % 3 else 100, b".")  # every third one small

    async def steps() -> None:
        behind = Behind()
        for index in range(50):
            await behind.run(call, chunk(index))
        await behind.wait()
        assert seen == [(b"%08d" % index, index % 3 != 0) for index in range(50)]
        await behind.run(call, b"bad".ljust(BIG))
        with pytest.raises(OSError, match="No space left"):
            await behind.run(call, chunk(50))  # the previous call's error, before this one starts
        await behind.wait()  # nothing in flight: returns at once
        assert seen[-1] == (b"00000049", True)
        with pytest.raises(OSError, match="No space left"):
            await behind.run(call, b"bad")  # a small one raises at once, here

    asyncio.run(steps())


def test_a_cancellation_waits_for_the_call_in_flight() -> None:
    """A cancelled download must not close its file under a write still running in the thread."""
    started = threading.Event()
    release = threading.Event()
    finished: list[bytes] = []

    def call(chunk: bytes) -> None:
        started.set()
        release.wait(30)
        finished.append(chunk)

    async def steps() -> None:
        behind = Behind()

        async def download() -> None:
            await behind.run(call, bytes(BIG))
            await behind.wait()

        task = asyncio.create_task(download())
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
        task.cancel()
        for _ in range(20):  # the loop turns; the call is held in its thread, so the task cannot end
            await asyncio.sleep(0)
        assert not task.done()
        task.cancel()  # cancelled again while waiting: still waits
        await asyncio.sleep(0)
        assert not task.done() and finished == []
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished == [bytes(BIG)]  # the call returned before the cancellation came out

    asyncio.run(steps())
