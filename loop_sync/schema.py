"""The operational tables, defined once in SQLAlchemy metadata for SQLite and PostgreSQL.

Tokens live apart from grants: the grant says who consented to what and where the
relationship stands; the token row is the vault's, with the lease that makes one process
the only refresher of a user.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    text,
)
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.schema import CreateColumn
from sqlalchemy.types import TypeDecorator

from loop_sync.errors import ConfigError

metadata = MetaData()

# Text no column can hold: PostgreSQL refuses NUL, and UTF-8 cannot encode a lone surrogate.
UNSTORABLE_TEXT: Final = re.compile("[\x00\ud800-\udfff]")


def varchar_length(column: Column[Any]) -> int | None:
    """A column's VARCHAR length, None for TEXT."""
    kind = column.type
    return kind.length if isinstance(kind, String) else None


GRANT_ACTIVE = "active"
GRANT_REAUTH_REQUIRED = "reauth_required"
GRANT_REVOKED = "revoked"
GRANT_STATUSES = (GRANT_ACTIVE, GRANT_REAUTH_REQUIRED, GRANT_REVOKED)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every dialect (SQLite would hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            msg = "naive datetime: loop-sync stores UTC only"
            raise ValueError(msg)
        utc = value.astimezone(UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment: datetime = value
        return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


UTC_TIME = UTCDateTime()
USER_ID = String(255)

grants = Table(
    "grants",
    metadata,
    Column("user_id", USER_ID, primary_key=True, comment="Loop user id: the id_token's sub"),
    Column("status", String(32), nullable=False, comment="active | reauth_required | revoked"),
    Column("scopes", Text, nullable=False, comment="scopes granted, space-separated"),
    Column("consented_at", UTC_TIME, nullable=False, comment="time of the latest consent"),
    Column("status_changed_at", UTC_TIME, nullable=False, comment="time of the last change"),
    Column("status_reason", Text, comment="why the grant is in its status"),
    comment="One row per Loop user who connected their account.",
)

grant_events = Table(
    "grant_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "user_id", String(255), ForeignKey("grants.user_id", ondelete="CASCADE"), nullable=False
    ),
    Column("at", UTC_TIME, nullable=False),
    Column("from_status", String(32), comment="null for the first consent"),
    Column("to_status", String(32), nullable=False),
    Column("reason", Text, nullable=False, comment="why, e.g. rotation outcome lost"),
    Index("ix_grant_events_user_at", "user_id", "at"),
    comment="Every status change of every grant, with its time and reason.",
)

tokens = Table(
    "tokens",
    metadata,
    Column(
        "user_id", String(255), ForeignKey("grants.user_id", ondelete="CASCADE"), primary_key=True
    ),
    Column("refresh_token", Text, comment="encrypted (Fernet); null if Loop issued none"),
    Column("access_token", Text, comment="encrypted (Fernet)"),
    Column("access_expires_at", UTC_TIME),
    Column("access_lifetime_s", Integer, comment="expires_in of the latest access token"),
    Column("generation", Integer, nullable=False, comment="+1 at each stored token pair"),
    Column("last_refresh_at", UTC_TIME),
    Column(
        "refresh_started_at",
        UTC_TIME,
        comment="set before a refresh POST, cleared once its outcome is stored: "
        "non-null means the outcome of a refresh is unknown",
    ),
    Column("lease_owner", String(64), comment="the process refreshing this user, if any"),
    Column("lease_expires_at", UTC_TIME),
    comment="The token vault: one row per grant, tokens encrypted at rest.",
)

oauth_sessions = Table(
    "oauth_sessions",
    metadata,
    Column("state_hash", String(64), primary_key=True, comment="sha256 of the state"),
    Column("binding_hash", String(64), nullable=False, comment="sha256 of the browser cookie"),
    Column("code_verifier", Text, nullable=False, comment="encrypted (Fernet)"),
    Column("nonce", String(255), nullable=False),
    Column("created_at", UTC_TIME, nullable=False),
    Column("expires_at", UTC_TIME, nullable=False),
    Column("used_at", UTC_TIME, comment="set when a callback consumed it: single use"),
    comment="Pending consent flows: PKCE verifier, state and nonce, 10 minutes, single use.",
)


# --- the warehouse ---------------------------------------------------------------------
# Columns shared by the current results and their history, in the order the normalizer
# produces them. Units: *_source is as Loop sent it, *_canonical is in unit_canonical.
def _result_columns() -> list[Column[Any]]:
    """Fresh Column objects: a Column belongs to one table."""
    return [
        Column("result_id", String(255), nullable=False, comment="Loop's result id"),
        Column("user_id", USER_ID, nullable=False, comment="Loop user id (grants.user_id)"),
        Column("patient_id", String(255), comment="Loop's patient id, as sent"),
        Column("biomarker_code", String(255), comment="Loop's code as sent, e.g. ldl-c"),
        Column("biomarker_name", Text, comment="name as sent"),
        Column("catalog_code", String(64), comment="our catalog code, e.g. ldl_c; null if unknown"),
        Column("loinc", String(32), comment="the catalog's LOINC for the biomarker"),
        Column("loinc_source", String(32), comment="the LOINC Loop sent, if any"),
        Column("value_source", Float, comment="numeric value as sent, in unit_source"),
        Column("value_text", Text, comment="verbatim result text, e.g. <0.5, Positive, TNP"),
        Column("value_operator", String(2), comment="<, <=, > or >= for a censored value; null"),
        Column("unit_source", String(64), comment="unit as sent"),
        Column(
            "value_canonical", Float, comment="value in unit_canonical; null if not convertible"
        ),
        Column("unit_canonical", String(64), comment="the catalog's canonical unit"),
        Column("reference_low_source", Float, comment="in unit_source"),
        Column("reference_high_source", Float, comment="in unit_source"),
        Column("reference_low_canonical", Float, comment="in unit_canonical"),
        Column("reference_high_canonical", Float, comment="in unit_canonical"),
        Column("loop_status", String(16), comment="Loop's flag: normal, low, high, critical"),
        Column("collected_at", UTC_TIME, comment="specimen time in UTC; null if sent without zone"),
        Column("collected_at_source", String(64), comment="collected_at verbatim"),
        Column("parsed_at", UTC_TIME, comment="when Loop parsed the result"),
        Column("updated_at", UTC_TIME, comment="when Loop last corrected it; null if never"),
        Column("revision", Integer, nullable=False, comment="1, raised by each correction"),
        Column("lab", Text, comment="laboratory name as sent"),
        Column(
            "quality_flags",
            Text,
            nullable=False,
            comment="comma-separated: unknown_code, unknown_unit, non_convertible_unit, "
            "implausible, naive_timestamp, censored, text_result; empty when clean",
        ),
        Column("content_hash", String(64), nullable=False, comment="sha256 of the raw record"),
    ]


RESULT_COLUMN_NAMES = tuple(column.name for column in _result_columns())

biomarker_results = Table(
    "biomarker_results",
    metadata,
    *_result_columns(),
    Column("first_seen_at", UTC_TIME, nullable=False, comment="when loop-sync first stored it"),
    Column("last_changed_at", UTC_TIME, nullable=False, comment="last insert or update here"),
    Column("deleted_at", UTC_TIME, comment="set when Loop no longer lists it; null if live"),
    UniqueConstraint("result_id", name="uq_biomarker_results_result_id"),
    Index("ix_biomarker_results_user_code", "user_id", "catalog_code", "collected_at"),
    comment="Current results: one row per Loop result id, at its latest revision.",
)

biomarker_result_history = Table(
    "biomarker_result_history",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True, comment="surrogate key"),
    *_result_columns(),
    Column("superseded_at", UTC_TIME, nullable=False, comment="when a newer version replaced it"),
    Index("ix_biomarker_result_history_result", "result_id"),
    comment="Earlier versions of corrected results.",
)

raw_records = Table(
    "raw_records",
    metadata,
    Column("user_id", USER_ID, nullable=False, comment="whose pull carried it"),
    Column("content_hash", String(64), nullable=False, comment="sha256 of the record JSON"),
    Column("result_id", String(255), comment="the record's id if it has a string one"),
    Column("payload", Text, nullable=False, comment="the record as received, JSON"),
    Column("fetched_at", UTC_TIME, nullable=False, comment="first time this content arrived"),
    UniqueConstraint("user_id", "content_hash", name="uq_raw_records_user_hash"),
    comment="Every distinct record as Loop sent it, for replays and audits.",
)

rejects = Table(
    "rejects",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True, comment="surrogate key"),
    Column("user_id", USER_ID, nullable=False, comment="whose pull carried it"),
    Column("content_hash", String(64), nullable=False, comment="sha256 of the record JSON"),
    Column("result_id", String(255), comment="the record's id if it has a string one"),
    Column("reason", Text, nullable=False, comment="why the record could not be used"),
    Column("payload", Text, nullable=False, comment="the record as received, JSON"),
    Column("first_seen_at", UTC_TIME, nullable=False, comment="first run that rejected it"),
    Column("last_seen_at", UTC_TIME, nullable=False, comment="latest run that saw it"),
    UniqueConstraint("user_id", "content_hash", name="uq_rejects_user_hash"),
    comment="Records that were malformed, with the reason; the rest of the run went on.",
)

sync_state = Table(
    "sync_state",
    metadata,
    Column("user_id", USER_ID, primary_key=True, comment="Loop user id"),
    Column("last_attempt_at", UTC_TIME, comment="start of the latest attempt"),
    Column("last_success_at", UTC_TIME, comment="last sync whose rows were committed"),
    Column("last_complete_at", UTC_TIME, comment="last pull that saw a consistent total"),
    Column("results_live", Integer, comment="results held for the user after the last success"),
    Column("last_status", String(32), comment="ok, failed, reauth_required"),
    Column("last_error", Text, comment="why the last attempt failed; no secrets, no values"),
    Column("consecutive_failures", Integer, nullable=False, default=0, comment="0 after a success"),
    Column("last_run_id", String(64), comment="sync_runs.run_id of the latest attempt"),
    Column(
        "pull_digest",
        String(64),
        comment="sha256 of the last committed complete pull's pages; a pull with the same "
        "one changed nothing",
    ),
    comment="Per-user sync state, committed with the user's rows.",
)

sync_runs = Table(
    "sync_runs",
    metadata,
    Column(
        "run_id",
        String(64),
        primary_key=True,
        comment="a run's id, also shown in its Prefect artifact",
    ),
    Column("kind", String(32), nullable=False, comment="sync, backfill, onboard, rotate, purge"),
    Column("started_at", UTC_TIME, nullable=False),
    Column("finished_at", UTC_TIME),
    Column("status", String(32), nullable=False, comment="running, ok, partial, failed"),
    Column("users_attempted", Integer, nullable=False, default=0),
    Column("users_succeeded", Integer, nullable=False, default=0),
    Column("users_failed", Integer, nullable=False, default=0),
    Column("users_reauth_required", Integer, nullable=False, default=0),
    Column("rows_inserted", Integer, nullable=False, default=0),
    Column("rows_updated", Integer, nullable=False, default=0),
    Column("rows_deleted", Integer, nullable=False, default=0),
    Column("rows_rejected", Integer, nullable=False, default=0),
    Column("duration_s", Float),
    comment="One row per run: what it attempted and what it changed.",
)


VIEWS_DIR = Path(__file__).resolve().parent.parent / "sql" / "views"


def upgrade(engine: Engine) -> None:
    """Create what is missing, add columns newer versions brought (always nullable), and
    (re)create the analyst views; safe to repeat."""
    metadata.create_all(engine)
    with engine.begin() as connection:
        for table, column in _missing_columns(connection):
            spec = CreateColumn(column).compile(dialect=connection.dialect)
            connection.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {spec}"))
        for path in sorted(VIEWS_DIR.glob("*.sql")):
            connection.execute(text(f"DROP VIEW IF EXISTS {path.stem}"))
            connection.execute(text(path.read_text()))


def _missing_columns(connection: Connection) -> list[tuple[Table, Column[Any]]]:
    inspector = inspect(connection)
    missing = []
    for name in set(metadata.tables) & set(inspector.get_table_names()):
        present = {column["name"] for column in inspector.get_columns(name)}
        table = metadata.tables[name]
        missing += [(table, column) for column in table.columns if column.name not in present]
    return missing


def require_schema(engine: Engine) -> None:
    """Stop with the fix when the database has not been set up (or is behind)."""
    with engine.connect() as connection:
        missing = sorted(set(metadata.tables) - set(inspect(connection).get_table_names()))
        missing += sorted(f"{t.name}.{c.name}" for t, c in _missing_columns(connection))
    if missing:
        msg = (
            f"the database lacks loop-sync tables or columns ({', '.join(missing)}); "
            "run `loop-sync db upgrade`"
        )
        raise ConfigError(msg)
