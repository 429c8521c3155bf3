"""The one SQLAlchemy engine: SQLite for a laptop, PostgreSQL in production.

SQLite gets WAL, foreign keys and a busy timeout, so several processes (a sync worker, the
web app, a backfill) can share the file without "database is locked" failures.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Float,
    Integer,
    Table,
    create_engine,
    event,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from loop_sync.config import FIXES, Settings
from loop_sync.errors import ConfigError
from loop_sync.schema import UTCDateTime

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


def bulk_insert(
    connection: Connection,
    table: Table,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
) -> None:
    """Insert `rows` (values in `columns` order) as fast as the database allows.

    PostgreSQL gets a binary COPY, the write path the sync's speed rests on (about 6x an
    executemany of INSERTs); values must already be what the column holds: aware UTC
    datetimes, None for NULL (never NaN). SQLite gets an executemany.
    """
    if connection.dialect.name != "postgresql":
        records = [dict(zip(columns, row, strict=True)) for row in rows]
        if records:
            connection.execute(table.insert(), records)
        return
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    statement = f"COPY {table.name} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
    with cursor.copy(statement) as copy:
        copy.set_types([_copy_type(table.c[name]) for name in columns])
        for row in rows:
            copy.write_row(row)


def _copy_type(column: Column[Any]) -> str:
    """The PostgreSQL type a binary COPY must send for one of our columns."""
    kind = column.type
    if isinstance(kind, UTCDateTime):
        return "timestamptz"
    if isinstance(kind, Boolean):
        return "bool"
    if isinstance(kind, Float):
        return "float8"
    if isinstance(kind, Integer):
        return "int4"
    return "text"  # String and Text: varchar's binary form is text's
