"""A person in a real browser (Chromium via Playwright) connects, or declines, through the
sandbox's consent screen. SQLite only: the storage paths run on both dialects elsewhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect

from loop_sync.sandbox import Sandbox
from loop_sync.schema import GRANT_ACTIVE
from loop_sync.services import Services

from .conftest import Stored

pytestmark = pytest.mark.browser
TIMEOUT_MS = 10_000


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'loop_sync.db'}"


@pytest.fixture
def auto_approve() -> bool:
    """The consent screen is shown, so the person clicks Allow or Deny."""
    return False


@pytest.fixture
def page(chromium: Browser, web_url: str) -> Iterator[Page]:
    """The start page, open and styled (its stylesheet passed the CSP); afterwards, no
    page along the way reported a Content-Security-Policy violation."""
    context = chromium.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    opened = context.new_page()
    violations: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            violations.append(message.text)

    opened.on("console", on_console)
    opened.goto(f"{web_url}/")
    expect(opened.get_by_role("heading", level=1)).to_have_text("Connect your Loop account")
    expect(opened.locator("body")).to_have_css("max-width", "576px")
    yield opened
    context.close()
    assert violations == []


def consent(page: Page, decision: str) -> None:
    page.get_by_role("link", name="Connect your Loop account").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Connect with Loop")
    page.get_by_role("button", name=decision).click()


def test_allow_in_the_browser_connects_the_account(
    page: Page, sandbox: Sandbox, stored: Stored, services: Services, tmp_path: Path
) -> None:
    """Connect → Allow lands on the success page; the grant is active, tokens encrypted."""
    consent(page, "Allow")

    expect(page.get_by_role("heading", level=1)).to_have_text("Your Loop account is connected")
    expect(page.get_by_text("You can close this window.")).to_be_visible()
    page.screenshot(path=tmp_path / "connected.png", full_page=True)
    assert (tmp_path / "connected.png").stat().st_size > 0
    [grant] = stored.grants()
    assert grant["status"] == GRANT_ACTIVE
    expect(page.get_by_text(grant["user_id"])).to_be_visible()
    [row] = stored.tokens()
    issued = set(sandbox.authority.issued_secrets)
    assert row["refresh_token"] not in issued
    assert services.cipher.decrypt(row["refresh_token"]) in issued


def test_deny_in_the_browser_shows_the_denial_page(page: Page, stored: Stored) -> None:
    """Connect → Deny lands on a page that says nothing was connected, with a retry link."""
    consent(page, "Deny")

    expect(page.get_by_role("heading", level=1)).to_have_text(
        "You did not connect your Loop account"
    )
    expect(page.get_by_role("link", name="Try again")).to_be_visible()
    assert stored.grants() == []
    assert stored.tokens() == []
