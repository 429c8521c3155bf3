"""The engine factory, on both dialects loop-sync supports."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from loop_sync import ConfigError, load_settings
from loop_sync.db import check_database, make_engine

BASE = {
    "client_id": "my-app",
    "client_secret": "x",
    "redirect_uri": "http://localhost:8000/callback",
}


def test_sqlite_engine_shares_the_file_safely(tmp_path: Path, fernet_key: str) -> None:
    """SQLite runs in WAL mode with foreign keys on, so workers can share one file."""
    url = f"sqlite:///{tmp_path / 'w.db'}"
    settings = load_settings(**BASE, database_url=url, encryption_keys=fernet_key)
    engine = make_engine(settings)
    check_database(engine, settings)
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1


@pytest.mark.postgres
def test_postgres_engine_connects(pg_url: str, fernet_key: str) -> None:
    """The production dialect is reachable through the same settings object."""
    settings = load_settings(**BASE, database_url=pg_url, encryption_keys=fernet_key)
    engine = make_engine(settings)
    check_database(engine, settings)
    with engine.connect() as connection:
        assert connection.execute(text("SHOW server_version")).scalar()


def test_unreachable_database_is_a_config_error_without_password(fernet_key: str) -> None:
    """A database that does not answer is named (password hidden) with the variable to fix."""
    url = "postgresql+psycopg://app:hunter2@127.0.0.1:1/nowhere?connect_timeout=2"
    settings = load_settings(**BASE, database_url=url, encryption_keys=fernet_key)
    with pytest.raises(ConfigError) as caught:
        check_database(make_engine(settings), settings)
    message = str(caught.value)
    assert "LOOP_SYNC_DATABASE_URL" in message
    assert "127.0.0.1:1/nowhere" in message
    assert "hunter2" not in message
    assert "\n" not in message
