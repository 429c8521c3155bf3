"""Serving an ASGI app with uvicorn on a socket we bind ourselves.

Binding first means the URL (port 0: any free port) is known before the server runs, so a
caller can register it elsewhere (a redirect URI, a sandbox issuer) and then serve in the
foreground (the CLI) or in a daemon thread for the length of a `with` block (tests).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType

import uvicorn
from starlette.types import ASGIApp

START_TIMEOUT_S = 10


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), ready for uvicorn."""
    # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets whose proto is
    # TCP, and without it Nagle holds each response body ~40 ms behind its headers.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class BackgroundServer:
    """One uvicorn server for `app` on a socket bound at construction.

    Use it as a context manager to serve from a daemon thread until the block ends, or
    call `run_forever()` to serve in the foreground until interrupted. No access log: a
    request line can carry secrets (an OAuth callback's code).
    """

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0) -> None:
        self._socket = bind(host, port)
        self.port: int = self._socket.getsockname()[1]
        self.url = f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"
        # asgi3 explicitly: uvicorn's auto-detection would call a class instance's
        # __call__ with the wrong signature if it guessed asgi2.
        config = uvicorn.Config(
            app, interface="asgi3", log_level="warning", lifespan="off", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def run_forever(self) -> None:
        """Serve in the calling thread (Ctrl-C stops it when that is the main thread)."""
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._socket.close()

    def __enter__(self) -> BackgroundServer:
        self._thread = threading.Thread(target=self.run_forever, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                msg = f"the server on {self.url} did not start"
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


def serve_app(
    app: ASGIApp, host: str, port: int, announce: Callable[[str], None] | None = None
) -> None:
    """Serve `app` in the foreground until interrupted; `announce` gets the URL once bound."""
    server = BackgroundServer(app, host, port)
    if announce is not None:
        announce(server.url)
    server.run_forever()
