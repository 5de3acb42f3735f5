"""uvicorn's server for `receiver serve`, with a shutdown that answers open long-polls at once."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with SIGTERM and SIGINT taken our way. uvicorn tells the app to stop only
    after every open connection has closed, so an open `?wait` long-poll would hold the shutdown for
    the whole grace and then be cut off with a 500; here the app's `drain` runs at the signal and
    answers it at once. And a clean stop exits 0, where uvicorn would raise the signal again."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], None]) -> None:
        super().__init__(config)
        self.drain = drain
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it may interrupt the loop anywhere, so the drain is handed to the loop.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for anything
            return
        self.should_exit = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.drain)
