"""The one SQLAlchemy engine: SQLite for a laptop, PostgreSQL in production.

SQLite gets WAL, foreign keys and a busy timeout, so several processes (a sync worker, the
web app, a backfill) can share the file without "database is locked" failures.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Table, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from loop_sync.config import FIXES, Settings
from loop_sync.errors import ConfigError

SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(settings: Settings) -> Engine:
    url = settings.database_url.get_secret_value()
    # hide_parameters: a logged database error must not quote values (PHI) or ciphertexts.
    engine = create_engine(url, pool_pre_ping=True, hide_parameters=True)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def check_database(engine: Engine, settings: Settings) -> None:
    """Fail early, in one line, when the database cannot be reached."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        reason = str(exc.orig if hasattr(exc, "orig") and exc.orig else exc).splitlines()[0]
        msg = (
            f"cannot reach the database {settings.database_url_display} ({reason}); "
            f"check that it is running, or fix LOOP_SYNC_DATABASE_URL: "
            f"{FIXES['LOOP_SYNC_DATABASE_URL']}"
        )
        raise ConfigError(msg) from None


def dialect_insert(connection: Connection, table: Table) -> Any:
    """INSERT with ON CONFLICT support (both dialects spell it alike; SQLAlchemy does not)."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
