"""Operator commands against a live sandbox and a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
from sqlalchemy import select, text
from typer.testing import CliRunner

from loop_sync.cli import app, console
from loop_sync.config import Settings
from loop_sync.errors import ConfigError
from loop_sync.sandbox import Sandbox
from loop_sync.schema import grant_events, sync_state, tokens
from loop_sync.services import Services
from tests.support import settings_env

runner = CliRunner()


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The operator's environment: the same settings, as variables."""
    values = settings_env(settings)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def connect(services: Services, user_id: str) -> None:
    url, binding = services.onboarding.start(user_id)
    callback = httpx.URL(httpx.get(url).headers["location"])
    services.onboarding.finish(dict(callback.params), binding)


def test_db_upgrade_twice_is_harmless(env: dict[str, str], services: Services) -> None:
    """`loop-sync db upgrade` on an up-to-date database succeeds and keeps the data."""
    connect(services, "usr_0001")
    for _ in range(2):
        result = runner.invoke(app, ["db", "upgrade"])
        assert result.exit_code == 0, result.output
    assert "usr_0001" in runner.invoke(app, ["users"]).output


def test_commands_on_an_empty_database_say_to_run_db_upgrade(
    env: dict[str, str], settings: Settings
) -> None:
    """Before `db upgrade`, commands stop with the fix instead of a SQL error."""
    result = runner.invoke(app, ["users"])
    assert isinstance(result.exception, ConfigError)
    assert "run `loop-sync db upgrade`" in str(result.exception)


def test_db_upgrade_adds_the_columns_a_newer_version_brought_and_keeps_the_data(
    env: dict[str, str], services: Services
) -> None:
    """A warehouse made by an older loop-sync (no sync_state.pull_digest) is refused with
    the fix, and `db upgrade` brings it up to date without losing a row."""
    connect(services, "usr_0001")
    with services.engine.begin() as connection:
        connection.execute(sync_state.insert().values(user_id="usr_0001", last_status="ok"))
        connection.execute(text("ALTER TABLE sync_state DROP COLUMN pull_digest"))

    behind = runner.invoke(app, ["users"])
    assert isinstance(behind.exception, ConfigError)
    assert "sync_state.pull_digest" in str(behind.exception)
    assert "run `loop-sync db upgrade`" in str(behind.exception)

    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    assert "usr_0001" in runner.invoke(app, ["users"]).output
    with services.engine.connect() as connection:
        kept = connection.execute(select(sync_state.c.user_id, sync_state.c.pull_digest)).all()
    assert [tuple(row) for row in kept] == [("usr_0001", None)]


def test_users_lists_status_scopes_and_last_refresh(
    env: dict[str, str], services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator sees who is connected, with what, and when tokens were last refreshed."""
    monkeypatch.setattr(console, "width", 200)  # a wide terminal: one line per user
    connect(services, "usr_0001")
    connect(services, "usr_0002")
    result = runner.invoke(app, ["users"])
    assert result.exit_code == 0, result.output
    assert "usr_0001" in result.output
    assert "usr_0002" in result.output
    assert "active" in result.output
    assert "read:biomarkers" in result.output
    assert "2 users" in result.output


def test_rotate_refreshes_the_selected_users_only(
    env: dict[str, str], services: Services, sandbox: Sandbox
) -> None:
    """`rotate --user` refreshes exactly the named grants at Loop."""
    connect(services, "usr_0001")
    connect(services, "usr_0002")
    result = runner.invoke(app, ["rotate", "--user", "usr_0002"])
    assert result.exit_code == 0, result.output
    assert "refreshed 1" in result.output
    assert sandbox.counters.refreshes["usr_0002"] == 1
    assert sandbox.counters.refreshes["usr_0001"] == 0


def test_rotate_exits_1_when_a_user_must_reconsent(
    env: dict[str, str], services: Services, sandbox: Sandbox
) -> None:
    """A grant Loop revoked is reported, the others are still refreshed, exit code 1."""
    connect(services, "usr_0001")
    connect(services, "usr_0002")
    with services.engine.connect() as connection:
        stale = connection.execute(
            select(tokens.c.refresh_token).where(tokens.c.user_id == "usr_0001")
        ).scalar_one()
    services.vault.access_token("usr_0001", rejected=services.vault.access_token("usr_0001"))
    with services.engine.begin() as connection:  # a stale copy, e.g. restored from a backup
        connection.execute(
            tokens.update().where(tokens.c.user_id == "usr_0001").values(refresh_token=stale)
        )
    result = runner.invoke(app, ["rotate"])
    assert result.exit_code == 1
    assert "refreshed 1, reauth_required 1" in result.output
    assert "usr_0001" in result.output
    assert sandbox.counters.refreshes["usr_0002"] == 1


def test_disconnect_revokes_at_loop_and_records_why(
    env: dict[str, str], services: Services, sandbox: Sandbox
) -> None:
    """After `disconnect --purge` the grant is revoked here and at Loop, tokens deleted."""
    connect(services, "usr_0003")
    token = services.vault.access_token("usr_0003")
    result = runner.invoke(app, ["disconnect", "--user", "usr_0003", "--purge"])
    assert result.exit_code == 0, result.output
    api = httpx.get(
        f"{sandbox.issuer}/v1/biomarkers/me", headers={"Authorization": f"Bearer {token}"}
    )
    assert api.status_code == 401
    with services.engine.connect() as connection:
        assert connection.execute(select(tokens)).all() == []
        events = connection.execute(
            select(grant_events.c.to_status, grant_events.c.reason).order_by(grant_events.c.id)
        ).all()
    assert [tuple(e) for e in events][-1] == ("revoked", "disconnected by an operator")


def test_keys_rotate_reencrypts_under_the_new_first_key(
    env: dict[str, str], services: Services, monkeypatch: pytest.MonkeyPatch, fernet_key: str
) -> None:
    """With NEW,OLD configured, `keys rotate` lets the old key be dropped afterwards."""
    connect(services, "usr_0001")
    new_key = runner.invoke(app, ["keys", "generate"]).output.strip()
    monkeypatch.setenv("LOOP_SYNC_ENCRYPTION_KEYS", f"{new_key},{fernet_key}")
    result = runner.invoke(app, ["keys", "rotate"])
    assert result.exit_code == 0, result.output
    assert "re-encrypted" in result.output
    monkeypatch.setenv("LOOP_SYNC_ENCRYPTION_KEYS", new_key)
    assert runner.invoke(app, ["rotate"]).exit_code == 0


def test_wrong_key_is_one_line_naming_the_variable(
    env: dict[str, str], services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokens stored under another key give a one-line error, exit code 2, no traceback."""
    connect(services, "usr_0001")
    other_key = runner.invoke(app, ["keys", "generate"]).output.strip()
    monkeypatch.setenv("LOOP_SYNC_ENCRYPTION_KEYS", other_key)
    result = subprocess.run(
        [sys.executable, "-m", "loop_sync", "rotate"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "LOOP_SYNC_ENCRYPTION_KEYS" in lines[0]
