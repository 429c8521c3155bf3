"""Serving the sandbox: in a background thread for tests, in the foreground for the CLI.

A `SandboxHost` is one uvicorn server whose sandbox can be swapped, because stopping
uvicorn takes ~0.2 s: a test suite keeps one host for the session and mounts a fresh
`Sandbox` (own clock, counters, knobs and grants) per test, still over real HTTP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType

from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from loop_sync.sandbox.app import Sandbox, SandboxConfig
from loop_sync.serving import BackgroundServer


class _LostResponseFilter(logging.Filter):
    """Drops uvicorn's traceback for responses the sandbox loses on purpose, and for
    requests whose client went away before the sandbox read them (a killed process): Loop
    simply never acts on those, which is no error of the sandbox's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.exc_info
            and isinstance(record.exc_info[1], ConnectionAbortedError | ClientDisconnect)
        )


class SandboxHost:
    """A loopback HTTP server for whichever sandbox is mounted on it."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = BackgroundServer(self._app, host, port)
        self.url = self._server.url
        self.sandbox: Sandbox | None = None
        logging.getLogger("uvicorn.error").addFilter(_LostResponseFilter())

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
        self._server.run_forever()

    def __enter__(self) -> SandboxHost:
        self._server.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.__exit__(exc_type, exc, traceback)


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
