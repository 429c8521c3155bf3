"""Fixtures for the web app: one loopback server for the session, a fresh app per test.

The web server is bound before the sandbox is configured, because the sandbox's registered
redirect URI must be the app's real callback URL; each test then mounts a fresh app (on
its own database) on that server, as `sandbox_host` does for sandboxes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright
from sqlalchemy import Engine, RowMapping, Table, select
from starlette.types import ASGIApp, Receive, Scope, Send

from loop_sync.sandbox import Knobs, SandboxClient, SandboxConfig
from loop_sync.schema import grant_events, grants, oauth_sessions, tokens
from loop_sync.services import Services
from loop_sync.serving import BackgroundServer
from loop_sync.web import create_app

CLIENT_ID = "loop-sync-web-tests"
CLIENT_SECRET = "web-tests-client-secret-never-shown"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class WebHost:
    """A loopback server for whichever app is mounted on it."""

    def __init__(self) -> None:
        self.app: ASGIApp | None = None
        self.server = BackgroundServer(self._app)
        # localhost, not 127.0.0.1: the URL a developer registers with Loop.
        self.url = f"http://localhost:{self.server.port}"

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is None:
            msg = "no app is mounted on the web host"
            raise RuntimeError(msg)
        await self.app(scope, receive, send)


@dataclass
class Stored:
    """What the app left in the database, read back as a person would query it."""

    engine: Engine

    def rows(self, table: Table) -> list[RowMapping]:
        with self.engine.connect() as connection:
            return list(connection.execute(select(table)).mappings())

    def grants(self) -> list[RowMapping]:
        return self.rows(grants)

    def tokens(self) -> list[RowMapping]:
        return self.rows(tokens)

    def events(self) -> list[RowMapping]:
        with self.engine.connect() as connection:
            query = select(grant_events).order_by(grant_events.c.id)
            return list(connection.execute(query).mappings())

    def sessions(self) -> list[RowMapping]:
        return self.rows(oauth_sessions)


@pytest.fixture(scope="session")
def web_host() -> Iterator[WebHost]:
    host = WebHost()
    with host.server:
        yield host


@pytest.fixture
def auto_approve() -> bool:
    return True


@pytest.fixture
def sandbox_config(web_host: WebHost, auto_approve: bool) -> SandboxConfig:
    """A sandbox whose one client is registered with the web app's real callback URL."""
    client = SandboxClient(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        redirect_uri=f"{web_host.url}/callback",
    )
    return SandboxConfig(
        users=3, seed=11, results_per_user=5, client=client, knobs=Knobs(auto_approve=auto_approve)
    )


@pytest.fixture
def web_url(web_host: WebHost, services: Services) -> Iterator[str]:
    """The base URL of a freshly created app on this test's services."""
    web_host.app = create_app(services)
    yield web_host.url
    web_host.app = None


@pytest.fixture
def web(web_url: str) -> Iterator[httpx.Client]:
    """A browser-like client of the app: keeps cookies, never follows redirects itself."""
    with httpx.Client(base_url=web_url, follow_redirects=False, timeout=10) as client:
        yield client


@pytest.fixture
def stored(services: Services) -> Stored:
    return Stored(services.engine)


@pytest.fixture(scope="session")
def chromium() -> Iterator[Browser]:
    """Debian's Chromium through Playwright: required under CI=true, skipped elsewhere."""
    executable = shutil.which("chromium")
    if executable is None:
        reason = "no `chromium` on PATH (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true requires the browser tests")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()
