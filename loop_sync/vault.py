"""The token vault: encrypted tokens, and refreshes that never lose a user.

Loop rotates refresh tokens and revokes the whole grant when an old one is replayed, so:

1. One refresher per user across processes and machines: a lease on the user's `tokens`
   row, taken by compare-and-swap (`UPDATE … WHERE lease is free`), the same on SQLite and
   PostgreSQL. The refresh HTTP timeout is shorter than the lease, so a lease cannot expire
   under a live refresh. Under the lease the row is read again: another process may have
   refreshed already.
2. Persist before use: the rotated pair is committed the moment it arrives.
3. Never blindly resend: `refresh_started_at` is committed before the POST and cleared
   once its outcome is stored. If a process dies or the answer is lost in between, the
   outcome is unknown; the next attempt tells, and an `invalid_grant` then becomes
   `reauth_required` with the reason "rotation outcome lost".
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Row, delete, or_, select, update

from loop_sync import grants as grant_store
from loop_sync.crypto import TokenCipher
from loop_sync.errors import (
    InvalidGrant,
    LeaseBusy,
    ReauthRequired,
    RefreshOutcomeUnknown,
    TransientError,
)
from loop_sync.oidc import HTTP_TIMEOUT_S, OidcClient, TokenResponse
from loop_sync.ratelimit import RateBudget
from loop_sync.schema import (
    GRANT_ACTIVE,
    GRANT_REAUTH_REQUIRED,
    GRANT_REVOKED,
    grants,
    metadata,
    oauth_sessions,
    tokens,
)

LEASE_S = 3 * HTTP_TIMEOUT_S  # outlives any refresh request
REFRESH_EARLY_S = 300  # refresh a few minutes before expiry ...
REFRESH_EARLY_SHARE = 0.1  # ... or a tenth of the token's life, whichever is shorter
LOST_ROTATION = "rotation outcome lost: a refresh reached Loop but its answer never arrived"
_TOKENS = select(grants.c.status, grants.c.status_reason, tokens).select_from(
    grants.join(tokens, tokens.c.user_id == grants.c.user_id)
)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _read_on(connection: Connection, user_id: str) -> Row[Any]:
    """The user's grant and tokens; ReauthRequired unless the grant is active."""
    row = connection.execute(_TOKENS.where(grants.c.user_id == user_id)).one_or_none()
    if row is None:
        raise ReauthRequired(user_id, "no consent on record")
    if row.status != GRANT_ACTIVE:
        raise ReauthRequired(user_id, row.status_reason or row.status)
    return row


def _due(expires_at: datetime, lifetime_s: float) -> datetime:
    """When an access token is due for a refresh: a little before it expires."""
    return expires_at - timedelta(seconds=min(REFRESH_EARLY_S, lifetime_s * REFRESH_EARLY_SHARE))


@dataclass
class RotationReport:
    refreshed: list[str] = field(default_factory=list)
    reauth_required: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # user -> error, no secrets


class TokenVault:
    def __init__(
        self,
        engine: Engine,
        cipher: TokenCipher,
        oidc: OidcClient,
        *,
        clock: Callable[[], datetime] = utcnow,
        lease_s: float = LEASE_S,
    ) -> None:
        self.engine = engine
        self.cipher = cipher
        self.oidc = oidc
        self.clock = clock
        self.lease_s = lease_s
        # Fits lease_owner (64) with the per-call suffix added in access_token.
        self.owner = f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        # Access tokens this process has read or received, each until it is due for a
        # refresh: a sync reads a batch's tokens in one query (`warm`) rather than one
        # read per request. A token Loop rejects is dropped and read again.
        self._fresh: dict[str, tuple[str, datetime]] = {}
        # Users whose stored token `warm` found due for a refresh: the first `access_token`
        # for them goes straight to the lease, whose read decides (a nightly run finds every
        # token due, and each statement of a refresh costs the event loop's thread its GIL).
        self._due: set[str] = set()

    # --- consent ---------------------------------------------------------------------

    def store_consent(self, user_id: str, response: TokenResponse, scopes: tuple[str, ...]) -> None:
        """Record a (new) consent and its tokens in one transaction."""
        self._fresh.pop(user_id, None)
        now = self.clock()
        with self.engine.begin() as connection:
            grant_store.record_consent(connection, user_id, scopes, now)
            values = self._token_values(response, now, keep_refresh=None)
            updated = connection.execute(
                update(tokens)
                .where(tokens.c.user_id == user_id)
                .values(**values, generation=tokens.c.generation + 1)
            ).rowcount
            if not updated:
                connection.execute(tokens.insert().values(user_id=user_id, generation=1, **values))

    def _token_values(
        self, response: TokenResponse, now: datetime, keep_refresh: str | None
    ) -> dict[str, Any]:
        refresh = response.refresh_token
        return {
            "refresh_token": self.cipher.encrypt(refresh.get_secret_value())
            if refresh
            else keep_refresh,
            "access_token": self.cipher.encrypt(response.access_token.get_secret_value()),
            "access_expires_at": now + timedelta(seconds=response.expires_in),
            "access_lifetime_s": response.expires_in,
            "last_refresh_at": now,
            "refresh_started_at": None,
            "lease_owner": None,
            "lease_expires_at": None,
        }

    # --- access tokens ---------------------------------------------------------------

    def access_token(self, user_id: str, *, rejected: str | None = None) -> str:
        """A valid access token for the user, refreshed only when needed.

        `rejected` is a token the API just answered 401 invalid_token to: it is replaced
        even if it looks fresh, unless another process already replaced it.
        """
        if rejected is None and (cached := self.cached(user_id)) is not None:
            return cached
        self._fresh.pop(user_id, None)
        if user_id in self._due:  # `warm` just read it due: the read under the lease decides
            self._due.discard(user_id)
        elif (usable := self._usable(self._read(user_id), rejected)) is not None:
            return usable
        # One lease holder per call, not per vault: threads sharing this vault (a web app,
        # a flow's pool) must exclude each other as much as processes do.
        owner = f"{self.owner}:{uuid.uuid4().hex[:8]}"
        deadline = time.monotonic() + self.lease_s + HTTP_TIMEOUT_S
        pause = 0.02
        while (leased := self._lease(user_id, owner, rejected)) is None:
            if time.monotonic() > deadline:
                raise LeaseBusy(user_id)
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
            usable = self._usable(self._read(user_id), rejected)
            if usable is not None:
                return usable
        row, usable = leased
        try:
            if usable is None:  # the commit of the new tokens releases the lease too
                return self._refresh_leased(user_id, row)
        except BaseException:
            self._release(user_id, owner)
            raise
        self._release(user_id, owner)
        return usable

    def refresh(self, user_id: str) -> str:
        """Refresh now, even if the cached access token is still fresh (keep-alive)."""
        return self.access_token(user_id, rejected=self._usable(self._read(user_id), None))

    def cached(self, user_id: str) -> str | None:
        """The user's access token if this vault holds one not yet due for a refresh;
        never blocks, so an event loop may call it."""
        entry = self._fresh.get(user_id)
        if entry is None or entry[1] <= self.clock():
            return None
        return entry[0]

    def warm(self, user_ids: Sequence[str]) -> None:
        """Read the stored access tokens of many active users in one query, so that their
        requests need no read of their own; the rest are left to `access_token`."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                _TOKENS.where(grants.c.user_id.in_(user_ids), grants.c.status == GRANT_ACTIVE)
            ).all()
        for row in rows:
            if self._usable(row, None) is None:
                self._due.add(row.user_id)

    def _read(self, user_id: str) -> Row[Any]:
        with self.engine.connect() as connection:
            return _read_on(connection, user_id)

    def _usable(self, row: Row[Any], rejected: str | None) -> str | None:
        """The stored access token if it is fresh and not the one just rejected; kept in
        `_fresh` until it is due."""
        if row.access_token is None or row.access_expires_at is None:
            return None
        due = _due(row.access_expires_at, row.access_lifetime_s or 0)
        if due <= self.clock():
            return None
        token = self.cipher.decrypt(row.access_token)
        if token == rejected:
            return None
        self._fresh[row.user_id] = (token, due)
        return token

    def _lease(
        self, user_id: str, owner: str, rejected: str | None
    ) -> tuple[Row[Any], str | None] | None:
        """Take the user's lease and read their row under it, in one transaction: the row
        and its usable token (None: refresh it), or None if another holder has the lease.

        A token to refresh whose last refresh is not in doubt is marked started in the same
        commit, durable before the POST (`_refresh_leased`): one transaction, where a lease,
        a read and the mark took three. The row keeps what was stored before the mark.
        """
        now = self.clock()
        with self.engine.begin() as connection:
            taken = connection.execute(
                update(tokens)
                .where(
                    tokens.c.user_id == user_id,
                    or_(
                        tokens.c.lease_owner.is_(None),
                        tokens.c.lease_owner == owner,
                        tokens.c.lease_expires_at < now,
                    ),
                )
                .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=self.lease_s))
            ).rowcount
            if not taken:
                return None
            row = _read_on(connection, user_id)  # a dead grant raises: the lease rolls back
            usable = self._usable(row, rejected)
            if usable is None and row.refresh_token is not None and row.refresh_started_at is None:
                connection.execute(
                    update(tokens).where(tokens.c.user_id == user_id).values(refresh_started_at=now)
                )
        return row, usable

    def _release(self, user_id: str, owner: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                update(tokens)
                .where(tokens.c.user_id == user_id, tokens.c.lease_owner == owner)
                .values(lease_owner=None, lease_expires_at=None)
            )

    def _refresh_leased(self, user_id: str, row: Row[Any]) -> str:
        if row.refresh_token is None:
            self._mark_reauth(user_id, "Loop issued no refresh token")
        refresh_token = self.cipher.decrypt(row.refresh_token)
        outcome_was_unknown = row.refresh_started_at is not None
        if outcome_was_unknown:  # else `_lease` marked this refresh started
            if self.oidc.still_active(refresh_token) is False:
                # Loop rotated it and the answer is gone: say so without replaying the old
                # token, which would revoke the grant at Loop and alert the user.
                self._mark_reauth(user_id, LOST_ROTATION)
            self._set_started(user_id, self.clock())
        try:
            response = self.oidc.refresh(refresh_token)
        except InvalidGrant as exc:
            reason = (
                LOST_ROTATION
                if outcome_was_unknown
                else f"Loop refused the refresh token ({exc.description or exc.error})"
            )
            self._mark_reauth(user_id, reason)
        except RefreshOutcomeUnknown:
            raise  # refresh_started_at stays set: the next attempt tells
        except Exception:
            # Surely not sent, or refused before rotating: the old token stays good.
            self._set_started(user_id, row.refresh_started_at)
            raise
        now = self.clock()
        with self.engine.begin() as connection:
            connection.execute(
                update(tokens)
                .where(tokens.c.user_id == user_id)
                .values(
                    **self._token_values(response, now, keep_refresh=row.refresh_token),
                    generation=tokens.c.generation + 1,
                )
            )
        token = response.access_token.get_secret_value()
        self._fresh[user_id] = (
            token,
            _due(now + timedelta(seconds=response.expires_in), response.expires_in),
        )
        return token

    def _set_started(self, user_id: str, started: datetime | None) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                update(tokens).where(tokens.c.user_id == user_id).values(refresh_started_at=started)
            )

    def mark_reauth_required(self, user_id: str, reason: str) -> None:
        """Record that only a new consent brings the user back, e.g. because the API said
        insufficient_scope; records the transition and its reason and does NOT raise: the
        caller raises `ReauthRequired` itself, with its own context."""
        with suppress(ReauthRequired):
            self._mark_reauth(user_id, reason)

    def _mark_reauth(self, user_id: str, reason: str) -> None:
        self._fresh.pop(user_id, None)
        with self.engine.begin() as connection:
            grant_store.set_status(connection, user_id, GRANT_REAUTH_REQUIRED, reason, self.clock())
            connection.execute(
                update(tokens).where(tokens.c.user_id == user_id).values(refresh_started_at=None)
            )
        raise ReauthRequired(user_id, reason)

    # --- operations ------------------------------------------------------------------

    def rotate(
        self,
        user_ids: Iterable[str] | None = None,
        idle_days: float | None = None,
        *,
        budget: RateBudget,
    ) -> RotationReport:
        """Keep-alive: refresh active grants (all, the given ones, or those idle that long).

        Each refresh slides Loop's 90-day refresh-token window; one user's failure never
        stops the others. Each takes a slot of the client's `budget` first: refreshes one
        after another go as fast as Loop answers, which on a quick link is past its limit,
        and a 429 would fail the user until the next rotation.
        """
        query = (
            select(grants.c.user_id)
            .select_from(grants.join(tokens, tokens.c.user_id == grants.c.user_id))
            .where(grants.c.status == GRANT_ACTIVE)
        )
        if user_ids is not None:
            query = query.where(grants.c.user_id.in_(list(user_ids)))
        if idle_days is not None:
            cutoff = self.clock() - timedelta(days=idle_days)
            query = query.where(
                or_(tokens.c.last_refresh_at.is_(None), tokens.c.last_refresh_at < cutoff)
            )
        with self.engine.connect() as connection:
            selected = list(connection.execute(query.order_by(grants.c.user_id)).scalars())
        report = RotationReport()
        for user_id in selected:
            budget.acquire_blocking()
            try:
                self.refresh(user_id)
                report.refreshed.append(user_id)
            except ReauthRequired as exc:
                report.reauth_required.append(user_id)
                report.failed[user_id] = exc.reason
            except (TransientError, RefreshOutcomeUnknown) as exc:
                report.failed[user_id] = str(exc)
        return report

    def disconnect(self, user_id: str, *, purge: bool = False) -> None:
        """Revoke at Loop, then mark the grant revoked; `purge` also deletes the user's data."""
        self._fresh.pop(user_id, None)
        with self.engine.connect() as connection:
            stored = connection.execute(
                select(tokens.c.refresh_token).where(tokens.c.user_id == user_id)
            ).scalar_one_or_none()
            if grant_store.get_grant(connection, user_id) is None:
                raise ReauthRequired(user_id, "no consent on record")
        if stored is not None:
            self.oidc.revoke(self.cipher.decrypt(stored))
        with self.engine.begin() as connection:
            grant_store.set_status(
                connection, user_id, GRANT_REVOKED, "disconnected by an operator", self.clock()
            )
            connection.execute(delete(tokens).where(tokens.c.user_id == user_id))
            if purge:
                for table in reversed(metadata.sorted_tables):
                    if "user_id" in table.c and table.name not in (
                        "grants",
                        "grant_events",
                        "tokens",
                    ):
                        connection.execute(delete(table).where(table.c.user_id == user_id))

    def rotate_keys(self) -> int:
        """Re-encrypt every stored secret under the first key; returns the rows touched."""
        touched = 0
        with self.engine.begin() as connection:
            for row in connection.execute(
                select(tokens.c.user_id, tokens.c.refresh_token, tokens.c.access_token)
            ).all():
                connection.execute(
                    update(tokens)
                    .where(tokens.c.user_id == row.user_id)
                    .values(
                        refresh_token=self.cipher.rotate(row.refresh_token)
                        if row.refresh_token
                        else None,
                        access_token=self.cipher.rotate(row.access_token)
                        if row.access_token
                        else None,
                    )
                )
                touched += 1
            for session in connection.execute(
                select(oauth_sessions.c.state_hash, oauth_sessions.c.code_verifier)
            ).all():
                connection.execute(
                    update(oauth_sessions)
                    .where(oauth_sessions.c.state_hash == session.state_hash)
                    .values(code_verifier=self.cipher.rotate(session.code_verifier))
                )
                touched += 1
        return touched
