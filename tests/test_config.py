"""Settings: one typed object; a bad or missing value is one line naming the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loop_sync import ConfigError, load_settings

REQUIRED = {
    "LOOP_CLIENT_ID": "my-app",
    "LOOP_CLIENT_SECRET": "s3cret-value-123",
    "LOOP_REDIRECT_URI": "https://sync.example.com/callback",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, fernet_key: str) -> dict[str, str]:
    values = {**REQUIRED, "LOOP_SYNC_ENCRYPTION_KEYS": fernet_key}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def test_defaults_follow_the_loop_quickstart(env: dict[str, str]) -> None:
    """Unset optional variables take Loop's production hosts and the quickstart scopes."""
    settings = load_settings()
    assert settings.issuer == "https://identity.platform.loop.health"
    assert settings.api_base_url == "https://clinical.platform.loop.health"
    assert settings.scopes == ("openid", "profile", "read:biomarkers")
    assert settings.database_url.get_secret_value() == "sqlite:///loop_sync.db"
    assert settings.client_id == "my-app"


def test_dotenv_file_is_read(monkeypatch: pytest.MonkeyPatch, fernet_key: str) -> None:
    """A .env in the working directory configures loop-sync like the environment does."""
    lines = [f"{k}={v}" for k, v in REQUIRED.items()]
    Path(".env").write_text("\n".join([*lines, f"LOOP_SYNC_ENCRYPTION_KEYS={fernet_key}"]))
    assert load_settings().redirect_uri == REQUIRED["LOOP_REDIRECT_URI"]


def test_scopes_and_urls_are_parsed(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """LOOP_SCOPES is space-separated; base URLs lose a trailing slash."""
    monkeypatch.setenv("LOOP_SCOPES", "openid  read:biomarkers")
    monkeypatch.setenv("LOOP_ISSUER", "http://127.0.0.1:8765/")
    settings = load_settings()
    assert settings.scopes == ("openid", "read:biomarkers")
    assert settings.issuer == "http://127.0.0.1:8765"


def test_missing_settings_name_each_variable_and_its_fix() -> None:
    """With nothing set, one line names every required variable and what to set."""
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "\n" not in message
    for name in [*REQUIRED, "LOOP_SYNC_ENCRYPTION_KEYS"]:
        assert f"{name} is not set" in message
    assert "loop-sync keys generate" in message


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("LOOP_REDIRECT_URI", "http://sync.example.com/callback", "must use https"),
        ("LOOP_REDIRECT_URI", "https://sync.example.com/cb?x=1", "query or a fragment"),
        ("LOOP_REDIRECT_URI", "callback", "absolute http(s) URL"),
        ("LOOP_ISSUER", "ftp://identity", "absolute http(s) URL"),
        ("LOOP_SCOPES", " ", "at least one scope"),
        ("LOOP_SYNC_DATABASE_URL", "not a url", "not a SQLAlchemy database URL"),
        ("LOOP_SYNC_ENCRYPTION_KEYS", "too-short", "key 1 is not a valid Fernet key"),
    ],
)
def test_invalid_setting_is_one_line_naming_it(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    """Each malformed variable is reported by name, with the reason and the fix."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"{name} is invalid")
    assert expected in message
    assert "\n" not in message


def test_a_second_bad_key_is_reported_by_position(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, fernet_key: str
) -> None:
    """Key rotation lists keys; the broken one is named by its position, not echoed."""
    monkeypatch.setenv("LOOP_SYNC_ENCRYPTION_KEYS", f"{fernet_key},oops-not-a-key")
    with pytest.raises(ConfigError, match="key 2 is not a valid Fernet key") as caught:
        load_settings()
    assert "oops-not-a-key" not in str(caught.value)
    assert fernet_key not in str(caught.value)


def test_secrets_are_masked_in_repr(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Printing or logging the settings never shows the secret, keys or DB password."""
    monkeypatch.setenv("LOOP_SYNC_DATABASE_URL", "postgresql+psycopg://app:pw-777@db/loop")
    settings = load_settings()
    shown = repr(settings) + str(settings) + str(settings.model_dump())
    assert "s3cret-value-123" not in shown
    assert env["LOOP_SYNC_ENCRYPTION_KEYS"] not in shown
    assert "pw-777" not in shown
    assert "pw-777" not in settings.database_url_display
    assert settings.fernet_keys == [env["LOOP_SYNC_ENCRYPTION_KEYS"]]


def test_cli_reports_bad_config_in_one_line_with_exit_code_2() -> None:
    """`loop-sync config` with nothing set prints one error line, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "loop_sync", "config"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("loop-sync: error: LOOP_CLIENT_ID is not set")
    assert "Traceback" not in result.stderr
