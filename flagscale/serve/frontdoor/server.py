"""Serving the front door with uvicorn (httptools and uvloop where installed), with a graceful stop.

SIGTERM or SIGINT starts the drain (FrontDoor.drain: new requests get 503, in-flight ones run up to the
drain timeout, streams still open then end with an SSE error event); only then does uvicorn close the
listener and the connections. A second SIGINT forces the exit.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import signal
import sys
import time

import uvicorn

log = logging.getLogger(__name__)


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app) -> None:
        super().__init__(config)
        self.door = app
        self.loop: asyncio.AbstractEventLoop | None = None
        self.drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Not remembered in _captured_signals: uvicorn would re-raise it after the shutdown, and a drained
        # stop is a clean exit (status 0), not death by SIGTERM.
        if self.drain_task is not None or self.loop is None or not hasattr(self.door, "drain"):
            if sig == signal.SIGINT and self.should_exit:
                self.force_exit = True
            self.should_exit = True
            return
        self.loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self.drain_task is None:
            print(f"{time.strftime('%H:%M:%S')} stopping: draining in-flight requests", file=sys.stderr, flush=True)
            self.drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            await self.door.drain()
            print(f"{time.strftime('%H:%M:%S')} drained", file=sys.stderr, flush=True)
        finally:
            self.should_exit = True


def config(app, host: str, port: int, log_level: str = "warning", max_message: int = 16 << 20) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop" if _have("uvloop") else "asyncio",
        http="httptools" if _have("httptools") else "h11",
        ws="websockets-sansio" if _have("websockets") else "auto",
        lifespan="on",
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=5,  # after the drain: what is still open then is cut
        ws_max_size=max_message,
        backlog=2048,
    )


async def serve(app, host: str, port: int, log_level: str = "warning") -> None:
    settings = getattr(app, "settings", None)
    limit = getattr(settings, "max_body_bytes", 16 << 20)
    await _Server(config(app, host, port, log_level, limit), app).serve()


def run(app, host: str, port: int, log_level: str = "warning") -> None:
    """Serve until stopped, on uvloop when installed."""
    if _have("uvloop"):
        import uvloop

        uvloop.run(serve(app, host, port, log_level))
    else:
        asyncio.run(serve(app, host, port, log_level))
