"""Serving the sandbox: in a background thread for tests, in the foreground for the CLI.

A `SandboxHost` is one uvicorn server whose sandbox can be swapped, because stopping
uvicorn takes ~0.2 s: a test suite keeps one host for the session and mounts a fresh
`Sandbox` (own clock, counters, knobs and grants) per test, still over real HTTP.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

import uvicorn
from starlette.types import Receive, Scope, Send

from loop_sync.sandbox.app import Sandbox, SandboxConfig

START_TIMEOUT_S = 10


class _LostResponseFilter(logging.Filter):
    """Drops uvicorn's traceback for responses the sandbox loses on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ConnectionAbortedError))


class SandboxHost:
    """A loopback HTTP server for whichever sandbox is mounted on it."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets whose proto is
        # TCP, and without it Nagle holds each response body ~40 ms behind its headers.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        bound = self._socket.getsockname()[1]
        self.url = f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}"
        self.sandbox: Sandbox | None = None
        logging.getLogger("uvicorn.error").addFilter(_LostResponseFilter())
        config = uvicorn.Config(
            self._app, interface="asgi3", log_level="warning", lifespan="off", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.sandbox is None:
            msg = "no sandbox is mounted on this host"
            raise RuntimeError(msg)
        await self.sandbox.app(scope, receive, send)

    def mount(self, config: SandboxConfig) -> Sandbox:
        """Serve a fresh sandbox from now on; returns it."""
        self.sandbox = Sandbox(config, self.url)
        return self.sandbox

    def run_forever(self) -> None:
        self._server.run(sockets=[self._socket])

    def __enter__(self) -> SandboxHost:
        self._thread = threading.Thread(target=self.run_forever, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                msg = f"the sandbox server on {self.url} did not start"
                raise RuntimeError(msg)
            time.sleep(0.01)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=START_TIMEOUT_S)
        self._socket.close()


@contextmanager
def running_sandbox(
    config: SandboxConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> Iterator[Sandbox]:
    """A live sandbox on loopback for the duration of the block (port 0: any free port)."""
    with SandboxHost(host, port) as server:
        yield server.mount(config or SandboxConfig())


def serve_forever(
    config: SandboxConfig, host: str, port: int, announce: Callable[[str], None]
) -> None:
    """Run the sandbox until interrupted; `announce` gets its URL once it is bound."""
    server = SandboxHost(host, port)
    server.mount(config)
    announce(server.url)
    server.run_forever()
