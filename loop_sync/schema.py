"""The operational tables, defined once in SQLAlchemy metadata for SQLite and PostgreSQL.

Tokens live apart from grants: the grant says who consented to what and where the
relationship stands; the token row is the vault's, with the lease that makes one process
the only refresher of a user.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    inspect,
)
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.types import TypeDecorator

from loop_sync.errors import ConfigError

metadata = MetaData()

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
    Column("status_changed_at", UTC_TIME, nullable=False),
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
    Column("reason", Text, nullable=False),
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


def upgrade(engine: Engine) -> None:
    """Create what is missing; running it again changes nothing."""
    metadata.create_all(engine)


def require_schema(engine: Engine) -> None:
    """Stop with the fix when the database has not been set up (or is behind)."""
    missing = set(metadata.tables) - set(inspect(engine).get_table_names())
    if missing:
        msg = (
            f"the database lacks loop-sync tables ({', '.join(sorted(missing))}); "
            "run `loop-sync db upgrade`"
        )
        raise ConfigError(msg)
