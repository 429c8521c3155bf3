"""The token vault's everyday behaviour against the live sandbox, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy
from sqlalchemy import Column, Integer, String, Table, select

from loop_sync.errors import ReauthRequired
from loop_sync.ratelimit import RateBudget
from loop_sync.sandbox import Sandbox
from loop_sync.schema import (
    GRANT_ACTIVE,
    GRANT_REAUTH_REQUIRED,
    GRANT_REVOKED,
    metadata,
    oauth_sessions,
)
from loop_sync.services import Services
from loop_sync.vault import TokenVault

from .helpers import (
    api_status,
    consent,
    events,
    grant_row,
    introspect,
    revoke_at_loop,
    stored_access_token,
    stored_refresh_token,
    token_endpoint,
    token_row,
)

USER = "usr_0002"
OTHER = "usr_0003"
THIRD = "usr_0004"
HOUR = 3600
DAY = 24 * HOUR
# Small enough that an id_token minted on the sandbox's clock passes loop-sync's 60 s skew
# check (the OIDC client verifies iat/exp against the wall clock).
STEP = 20


# --- consent -------------------------------------------------------------------------


def test_consent_stores_an_active_grant_with_the_granted_scopes_and_encrypted_tokens(
    services: Services, sandbox: Sandbox
) -> None:
    """Consent records the scopes Loop granted (not those asked) and encrypted tokens."""
    sandbox.set_knobs(narrow_scopes={"profile"})

    assert consent(services, USER) == USER

    grant = grant_row(services.engine, USER)
    assert grant.status == GRANT_ACTIVE
    assert grant.scopes.split() == ["openid", "read:biomarkers"]
    row = token_row(services.engine, USER)
    assert row is not None
    assert row.generation == 1
    assert row.refresh_started_at is None
    assert row.lease_owner is None
    refresh = services.cipher.decrypt(row.refresh_token)
    access = services.cipher.decrypt(row.access_token)
    assert refresh.startswith("lph_rt_")
    assert access.startswith("lph_at_")
    assert refresh in sandbox.authority.issued_secrets
    assert access in sandbox.authority.issued_secrets
    assert refresh not in row.refresh_token
    assert access not in row.access_token
    assert row.access_lifetime_s == sandbox.knobs.access_token_ttl_s
    assert [(e.from_status, e.to_status, e.reason) for e in events(services.engine, USER)] == [
        (None, GRANT_ACTIVE, "consented")
    ]
    with services.engine.connect() as connection:
        used = connection.execute(select(oauth_sessions.c.used_at)).scalars().all()
    assert len(used) == 1
    assert used[0] is not None


# --- access tokens -------------------------------------------------------------------


def test_access_token_is_served_from_the_cache_without_calling_loop_while_fresh(
    services: Services, sandbox: Sandbox
) -> None:
    """A fresh token comes from the database: the token endpoint sees no request."""
    consent(services, USER)
    stored = stored_access_token(services, USER)
    requests_before = sandbox.counters.requests["token"]
    sandbox.clock.advance(HOUR / 2)

    first = services.vault.access_token(USER)
    second = services.vault.access_token(USER)

    assert first == second == stored
    assert sandbox.counters.requests["token"] == requests_before
    assert sandbox.counters.token_requests[USER] == 1  # the code exchange only
    assert sandbox.counters.refreshes[USER] == 0
    assert api_status(sandbox, first) == 200


def test_warm_reads_a_batchs_tokens_in_one_query_and_then_serves_them_without_the_database(
    services: Services, sandbox: Sandbox
) -> None:
    """A sync warms a batch of users with one read; their requests then cost no read at all,
    and a user whose grant is not active is not warmed."""
    for user in (USER, OTHER, THIRD):
        consent(services, user)
    services.vault.mark_reauth_required(THIRD, "test: consent withdrawn")
    cold = TokenVault(services.engine, services.cipher, services.oidc, clock=sandbox.clock.now)
    statements: list[str] = []
    listen = sqlalchemy.event.listens_for(services.engine, "before_cursor_execute")
    listen(lambda *args: statements.append(args[2]))

    cold.warm([USER, OTHER, THIRD])
    warmed = len(statements)
    tokens = [cold.access_token(USER), cold.access_token(OTHER)]

    assert warmed == 1
    assert len(statements) == warmed  # served from what warm read
    assert tokens == [stored_access_token(services, USER), stored_access_token(services, OTHER)]
    assert cold.cached(THIRD) is None
    with pytest.raises(ReauthRequired):
        cold.access_token(THIRD)


def test_a_cached_token_another_process_replaced_is_read_again_once_loop_rejects_it(
    services: Services, sandbox: Sandbox
) -> None:
    """The cache never causes a second refresh: a token Loop rejects is looked up again,
    and the replacement another process stored is used as is."""
    consent(services, USER)
    ours = TokenVault(services.engine, services.cipher, services.oidc, clock=sandbox.clock.now)
    theirs = TokenVault(services.engine, services.cipher, services.oidc, clock=sandbox.clock.now)
    cached = ours.access_token(USER)
    replacement = theirs.access_token(USER, rejected=cached)
    assert sandbox.counters.refreshes[USER] == 1

    assert ours.access_token(USER) == cached  # still fresh as far as this process knows
    assert ours.access_token(USER, rejected=cached) == replacement

    assert sandbox.counters.refreshes[USER] == 1
    assert ours.access_token(USER) == replacement


@pytest.mark.parametrize(
    "advance_s",
    [HOUR - 200, HOUR + 1],
    ids=["inside-the-early-refresh-window", "past-expires_in"],
)
def test_access_token_refreshes_once_near_expiry_and_the_api_accepts_the_new_token(
    services: Services, sandbox: Sandbox, advance_s: float
) -> None:
    """Near or past expiry the vault refreshes once, stores the pair, and Loop accepts it."""
    consent(services, USER)
    old_access = stored_access_token(services, USER)
    old_refresh = stored_refresh_token(services, USER)
    sandbox.clock.advance(advance_s)

    token = services.vault.access_token(USER)
    again = services.vault.access_token(USER)

    assert token == again != old_access
    assert sandbox.counters.refreshes[USER] == 1
    assert sandbox.counters.replays_detected[USER] == 0
    assert api_status(sandbox, token) == 200
    row = token_row(services.engine, USER)
    assert row is not None
    assert row.generation == 2
    assert abs((row.last_refresh_at - sandbox.clock.now()).total_seconds()) < 5
    assert row.refresh_started_at is None
    assert row.lease_owner is None
    assert stored_refresh_token(services, USER) != old_refresh
    assert introspect(sandbox, old_refresh) == {"active": False}  # rotated away


def test_rejected_token_forces_exactly_one_refresh(services: Services, sandbox: Sandbox) -> None:
    """A token the API refused is replaced even while it looks fresh, with one refresh."""
    consent(services, USER)
    rejected = services.vault.access_token(USER)

    replacement = services.vault.access_token(USER, rejected=rejected)

    assert replacement != rejected
    assert sandbox.counters.refreshes[USER] == 1
    assert api_status(sandbox, replacement) == 200
    assert services.vault.access_token(USER) == replacement


def test_rejected_token_already_replaced_by_another_caller_does_not_refresh_again(
    services: Services, sandbox: Sandbox
) -> None:
    """When the stored token already differs from the rejected one, it is returned as is."""
    consent(services, USER)
    rejected = services.vault.access_token(USER)
    replacement = services.vault.access_token(USER, rejected=rejected)
    assert sandbox.counters.refreshes[USER] == 1

    # A second worker that was refused the same old token asks too.
    assert services.vault.access_token(USER, rejected=rejected) == replacement

    assert sandbox.counters.refreshes[USER] == 1
    assert sandbox.counters.token_requests[USER] == 2  # code exchange + one refresh


def test_refresh_without_a_new_refresh_token_keeps_the_old_one_working(
    services: Services, sandbox: Sandbox
) -> None:
    """If Loop sends no refresh_token on a refresh, the stored one stays and keeps working."""
    consent(services, USER)
    refresh = stored_refresh_token(services, USER)
    sandbox.set_knobs(rotate_refresh_tokens=False)

    first = services.vault.access_token(USER, rejected=services.vault.access_token(USER))
    assert stored_refresh_token(services, USER) == refresh
    second = services.vault.access_token(USER, rejected=first)

    assert len({first, second}) == 2
    assert stored_refresh_token(services, USER) == refresh
    assert sandbox.counters.refreshes[USER] == 2
    assert sandbox.counters.replays_detected[USER] == 0
    assert introspect(sandbox, refresh)["active"] is True
    assert api_status(sandbox, second) == 200
    assert grant_row(services.engine, USER).status == GRANT_ACTIVE


def test_access_token_for_a_user_who_never_consented_asks_for_consent(
    services: Services, sandbox: Sandbox
) -> None:
    """No grant on record is ReauthRequired, and Loop is not called."""
    with pytest.raises(ReauthRequired, match="no consent on record") as raised:
        services.vault.access_token(USER)

    assert raised.value.user_id == USER
    assert sandbox.counters.requests["token"] == 0


# --- keep-alive rotation --------------------------------------------------------------


def test_rotate_idle_days_refreshes_only_grants_idle_longer_than_that(
    services: Services, sandbox: Sandbox
) -> None:
    """`rotate(idle_days=N)` slides the window of long-idle grants and leaves the rest."""
    consent(services, USER)
    consent(services, OTHER)
    sandbox.clock.advance(10 * DAY)
    services.vault.access_token(OTHER)  # OTHER was used (refreshed) ten days later
    sandbox.clock.advance(1 * DAY)

    report = services.vault.rotate(idle_days=5, budget=services.budget)

    assert report.refreshed == [USER]
    assert report.reauth_required == []
    assert report.failed == {}
    assert sandbox.counters.refreshes == {OTHER: 1, USER: 1}
    assert token_row(services.engine, USER).generation == 2  # type: ignore[union-attr]
    assert token_row(services.engine, OTHER).generation == 2  # type: ignore[union-attr]
    assert api_status(sandbox, services.vault.access_token(USER)) == 200


def test_rotate_user_ids_refreshes_only_those_users(services: Services, sandbox: Sandbox) -> None:
    """`rotate(user_ids=[...])` refreshes the named users even with fresh tokens, no others."""
    for user in ("usr_0001", USER, OTHER):
        consent(services, user)
    before = {user: stored_access_token(services, user) for user in ("usr_0001", USER, OTHER)}

    report = services.vault.rotate(user_ids=[OTHER, "usr_0001"], budget=services.budget)

    assert report.refreshed == ["usr_0001", OTHER]
    assert sandbox.counters.refreshes == {"usr_0001": 1, OTHER: 1}
    assert stored_access_token(services, USER) == before[USER]
    assert stored_access_token(services, OTHER) != before[OTHER]
    assert api_status(sandbox, stored_access_token(services, OTHER)) == 200


def test_rotate_reports_a_dead_grant_and_still_refreshes_the_others(
    services: Services, sandbox: Sandbox
) -> None:
    """One user's revoked grant is reported as reauth_required; the rest are refreshed."""
    consent(services, USER)
    consent(services, OTHER)
    revoke_at_loop(sandbox, stored_refresh_token(services, USER))

    report = services.vault.rotate(budget=services.budget)

    assert report.refreshed == [OTHER]
    assert report.reauth_required == [USER]
    assert "Loop refused the refresh token" in report.failed[USER]
    assert grant_row(services.engine, USER).status == GRANT_REAUTH_REQUIRED
    assert grant_row(services.engine, OTHER).status == GRANT_ACTIVE


def test_rotate_paces_its_refreshes_under_loops_limit(services: Services, sandbox: Sandbox) -> None:
    """A keep-alive of many grants takes a slot of the client's budget per refresh: unpaced,
    refreshes one after another outran Loop's limit and users failed on its 429s."""
    users = [f"usr_{n:04d}" for n in range(1, 6)]  # every user of the test sandbox
    for user in users:
        consent(services, user)
    sandbox.set_knobs(rate_limit_rps=5, rate_limit_burst=2)

    report = services.vault.rotate(budget=RateBudget(4, burst=1))

    assert report.failed == {}
    assert report.refreshed == users
    assert sandbox.counters.rate_limited.total() == 0


# --- disconnect ----------------------------------------------------------------------


def test_disconnect_revokes_at_loop_marks_the_grant_revoked_and_deletes_the_tokens(
    services: Services, sandbox: Sandbox
) -> None:
    """Disconnect ends the grant at Loop, records why, and keeps no token."""
    consent(services, USER)
    consent(services, OTHER)
    refresh = stored_refresh_token(services, USER)
    access = services.vault.access_token(USER)

    services.vault.disconnect(USER)

    assert introspect(sandbox, refresh) == {"active": False}
    assert introspect(sandbox, access) == {"active": False}
    assert api_status(sandbox, access) == 401
    refused = token_endpoint(sandbox, grant_type="refresh_token", refresh_token=refresh)
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_grant"
    assert sandbox.counters.grants_revoked[USER] == 1
    grant = grant_row(services.engine, USER)
    assert grant.status == GRANT_REVOKED
    assert grant.status_reason == "disconnected by an operator"
    assert events(services.engine, USER)[-1].to_status == GRANT_REVOKED
    assert token_row(services.engine, USER) is None
    with pytest.raises(ReauthRequired):
        services.vault.access_token(USER)
    # The other user is untouched.
    assert api_status(sandbox, services.vault.access_token(OTHER)) == 200


@pytest.fixture
def user_table(services: Services) -> Iterator[Table]:
    """A stand-in for the user tables later modules add (results, sync state)."""
    table = Table(
        "vault_test_user_rows",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("user_id", String(255), nullable=False),
    )
    table.create(services.engine)
    try:
        yield table
    finally:
        metadata.remove(table)


def test_disconnect_with_purge_deletes_the_users_rows_in_other_tables(
    services: Services, sandbox: Sandbox, user_table: Table
) -> None:
    """`purge=True` deletes the user's rows everywhere but the grant and its history."""
    consent(services, USER)
    consent(services, OTHER)
    with services.engine.begin() as connection:
        connection.execute(
            user_table.insert(), [{"user_id": USER}, {"user_id": USER}, {"user_id": OTHER}]
        )

    services.vault.disconnect(USER, purge=True)

    with services.engine.connect() as connection:
        left = connection.execute(select(user_table.c.user_id)).scalars().all()
    assert left == [OTHER]
    assert grant_row(services.engine, USER).status == GRANT_REVOKED
    assert token_row(services.engine, USER) is None
    assert [e.to_status for e in events(services.engine, USER)] == [GRANT_ACTIVE, GRANT_REVOKED]
    assert sandbox.counters.grants_revoked[USER] == 1
    assert token_row(services.engine, OTHER) is not None


# --- lifecycle -----------------------------------------------------------------------


def test_reconsent_of_a_reauth_required_user_reactivates_it_with_a_new_refresh_token(
    services: Services, sandbox: Sandbox
) -> None:
    """A dead grant comes back with a new consent: active, new refresh token, working API."""
    consent(services, USER)
    old_refresh = stored_refresh_token(services, USER)
    revoke_at_loop(sandbox, old_refresh)  # the user revoked loop-sync on Loop's side
    with pytest.raises(ReauthRequired, match="Loop refused the refresh token"):
        services.vault.access_token(USER, rejected=services.vault.access_token(USER))
    assert grant_row(services.engine, USER).status == GRANT_REAUTH_REQUIRED

    assert consent(services, USER) == USER

    grant = grant_row(services.engine, USER)
    assert grant.status == GRANT_ACTIVE
    assert grant.status_reason == "consented again"
    new_refresh = stored_refresh_token(services, USER)
    assert new_refresh != old_refresh
    row = token_row(services.engine, USER)
    assert row is not None
    assert row.generation == 2
    assert row.refresh_started_at is None
    token = services.vault.access_token(USER)
    assert api_status(sandbox, token) == 200
    assert api_status(sandbox, services.vault.access_token(USER, rejected=token)) == 200
    assert sandbox.counters.refreshes[USER] == 1


def test_grant_events_record_every_transition_with_its_time_and_reason(
    services: Services, sandbox: Sandbox
) -> None:
    """consent → reauth_required → consent again → revoked: four events, timed and explained."""
    consent(services, USER)
    t_consent = sandbox.clock.now()
    sandbox.clock.advance(STEP)
    revoke_at_loop(sandbox, stored_refresh_token(services, USER))
    with pytest.raises(ReauthRequired):
        services.vault.access_token(USER, rejected=services.vault.access_token(USER))
    t_reauth = sandbox.clock.now()
    sandbox.clock.advance(STEP)
    consent(services, USER)
    t_again = sandbox.clock.now()
    sandbox.clock.advance(STEP)
    services.vault.disconnect(USER)
    t_revoked = sandbox.clock.now()

    recorded = events(services.engine, USER)

    assert [(e.from_status, e.to_status) for e in recorded] == [
        (None, GRANT_ACTIVE),
        (GRANT_ACTIVE, GRANT_REAUTH_REQUIRED),
        (GRANT_REAUTH_REQUIRED, GRANT_ACTIVE),
        (GRANT_ACTIVE, GRANT_REVOKED),
    ]
    assert recorded[0].reason == "consented"
    assert recorded[1].reason.startswith("Loop refused the refresh token")
    assert recorded[2].reason == "consented again"
    assert recorded[3].reason == "disconnected by an operator"
    for event, expected in zip(recorded, (t_consent, t_reauth, t_again, t_revoked), strict=True):
        assert abs((event.at - expected).total_seconds()) < 2
    assert [e.at for e in recorded] == sorted({e.at for e in recorded})
    assert grant_row(services.engine, USER).status_changed_at == recorded[-1].at
