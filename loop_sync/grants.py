"""The grant lifecycle: active → reauth_required → (re-consent) active, or → revoked.

Every transition writes a `grant_events` row with its time and reason in the same
transaction, so an operator can always answer "why is this user not syncing?".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, select

from loop_sync.schema import GRANT_ACTIVE, grant_events, grants, tokens


@dataclass(frozen=True)
class Grant:
    user_id: str
    status: str
    scopes: tuple[str, ...]
    consented_at: datetime
    status_changed_at: datetime
    status_reason: str | None
    last_refresh_at: datetime | None


def get_grant(connection: Connection, user_id: str) -> Grant | None:
    return next(iter(_select(connection, user_id)), None)


def list_grants(connection: Connection) -> list[Grant]:
    return _select(connection, None)


def _select(connection: Connection, user_id: str | None) -> list[Grant]:
    query = (
        select(
            grants.c.user_id,
            grants.c.status,
            grants.c.scopes,
            grants.c.consented_at,
            grants.c.status_changed_at,
            grants.c.status_reason,
            tokens.c.last_refresh_at,
        )
        .select_from(grants.outerjoin(tokens, tokens.c.user_id == grants.c.user_id))
        .order_by(grants.c.user_id)
    )
    if user_id is not None:
        query = query.where(grants.c.user_id == user_id)
    return [
        Grant(
            row.user_id,
            row.status,
            tuple(row.scopes.split()),
            row.consented_at,
            row.status_changed_at,
            row.status_reason,
            row.last_refresh_at,
        )
        for row in connection.execute(query)
    ]


def record_consent(
    connection: Connection, user_id: str, scopes: tuple[str, ...], now: datetime
) -> None:
    """A first consent creates the grant; a new one reactivates it with the new scopes."""
    current = get_grant(connection, user_id)
    values = {
        "status": GRANT_ACTIVE,
        "scopes": " ".join(scopes),
        "consented_at": now,
        "status_changed_at": now,
    }
    if current is None:
        reason = "consented"
        connection.execute(grants.insert().values(user_id=user_id, **values))
    else:
        reason = "consented again"
        connection.execute(
            grants.update()
            .where(grants.c.user_id == user_id)
            .values(**values, status_reason=reason)
        )
    _event(
        connection,
        user_id,
        from_status=current.status if current else None,
        to_status=GRANT_ACTIVE,
        reason=reason,
        now=now,
    )


def set_status(
    connection: Connection, user_id: str, status: str, reason: str, now: datetime
) -> None:
    """Move a grant to `status`, recording why; a no-op if it is already there."""
    current = get_grant(connection, user_id)
    if current is None or current.status == status:
        return
    connection.execute(
        grants.update()
        .where(grants.c.user_id == user_id)
        .values(status=status, status_changed_at=now, status_reason=reason)
    )
    _event(
        connection, user_id, from_status=current.status, to_status=status, reason=reason, now=now
    )


def _event(
    connection: Connection,
    user_id: str,
    *,
    from_status: str | None,
    to_status: str,
    reason: str,
    now: datetime,
) -> None:
    connection.execute(
        grant_events.insert().values(
            user_id=user_id, at=now, from_status=from_status, to_status=to_status, reason=reason
        )
    )
