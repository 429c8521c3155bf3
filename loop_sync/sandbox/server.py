"""Serving the sandbox: in a background thread for tests, in the foreground for the CLI."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn

from loop_sync.sandbox.app import Sandbox, SandboxConfig


class _LostResponseFilter(logging.Filter):
    """Drops uvicorn's traceback for responses the sandbox loses on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ConnectionAbortedError))


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _server(sandbox: Sandbox, log_level: str) -> uvicorn.Server:
    logging.getLogger("uvicorn.error").addFilter(_LostResponseFilter())
    config = uvicorn.Config(sandbox.app, log_level=log_level, lifespan="off", access_log=False)
    return uvicorn.Server(config)


def _issuer(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@contextmanager
def running_sandbox(
    config: SandboxConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> Iterator[Sandbox]:
    """A live sandbox on loopback for the duration of the block (port 0: any free port)."""
    sock = _bind(host, port)
    sandbox = Sandbox(config or SandboxConfig(), _issuer(host, sock.getsockname()[1]))
    server = _server(sandbox, "warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            msg = "the sandbox did not start"
            raise RuntimeError(msg)
        time.sleep(0.01)
    try:
        yield sandbox
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def serve_forever(
    config: SandboxConfig, host: str, port: int, announce: Callable[[str], None]
) -> None:
    """Run the sandbox until interrupted; `announce` gets its URL once it is bound."""
    sock = _bind(host, port)
    sandbox = Sandbox(config, _issuer(host, sock.getsockname()[1]))
    announce(sandbox.issuer)
    _server(sandbox, "warning").run(sockets=[sock])
