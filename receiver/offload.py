"""Blocking work on a stream's chunks (sha256, file writes) in a thread, one step behind the loop.

The event loop hands a chunk to a thread and goes back to reading the next one from the network, so
the read of one chunk, its hash and its write overlap on more than one core (hashlib and file writes
release the GIL for large buffers). Each `Behind` has at most one call in flight: its calls run in
order, and what it holds in memory is the one chunk being worked on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

# The chunk threads, apart from the loop's default executor (DNS lookups must not queue behind writes).
EXECUTOR = ThreadPoolExecutor(max_workers=8, thread_name_prefix="receiver-chunks")
# A smaller chunk is worked on the loop: a hand-off costs ~60 us of CPU, sha256 of 64 KiB ~40 us. So
# a typical image (a few pieces) costs no more than before, and a large download's 1 MiB pieces overlap.
THREAD_FROM = 256 * 1024


class Behind:
    """Calls on chunks, each once the previous one has returned: in a thread, or here when small."""

    def __init__(self) -> None:
        self._running: asyncio.Future[object] | None = None

    async def run(self, call: Callable[[bytes], object], chunk: bytes) -> None:
        """Start `call(chunk)` in a thread and return (or call it here, when small); first waits for
        (and raises what came out of) the previous call."""
        await self.wait()
        if len(chunk) < THREAD_FROM:
            call(chunk)
            return
        self._running = asyncio.get_running_loop().run_in_executor(EXECUTOR, call, chunk)

    async def wait(self) -> None:
        """Wait for the call in flight and raise what it raised. A cancellation meanwhile is raised only
        once the call has returned, so nothing the call uses (an open file) is closed under it."""
        running, self._running = self._running, None
        if running is None:
            return
        interrupted: asyncio.CancelledError | None = None
        while not running.done():
            try:
                await asyncio.wait((running,))  # unlike a plain await, a cancellation leaves it running
            except asyncio.CancelledError as exc:
                interrupted = exc
        error = running.exception()
        if interrupted is not None:
            raise interrupted
        if error is not None:
            raise error
