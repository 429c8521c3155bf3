"""Refreshes that go wrong: lost answers, replays, 5xx, crashes, dead leases, no Loop.

Each test says what the operator and the user notice (an exception, the grant's status and
reason) and what Loop saw (the sandbox's counters), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, inspect, text

from loop_sync.config import Settings
from loop_sync.errors import (
    LoopUnreachable,
    ReauthRequired,
    RefreshOutcomeUnknown,
    TransientError,
)
from loop_sync.sandbox import Sandbox, SandboxConfig, running_sandbox
from loop_sync.schema import GRANT_ACTIVE, GRANT_REAUTH_REQUIRED, upgrade
from loop_sync.services import Services
from loop_sync.vault import LEASE_S, LOST_ROTATION, TokenVault
from tests.support import sandbox_settings

from .helpers import (
    api_status,
    consent,
    events,
    grant_row,
    set_tokens,
    stored_access_token,
    stored_refresh_token,
    token_row,
)

USER = "usr_0002"
OTHER = "usr_0003"


def _others_unaffected(services: Services, sandbox: Sandbox) -> None:
    """Another consented user still refreshes and reads the API."""
    token = services.vault.access_token(OTHER, rejected=services.vault.access_token(OTHER))
    assert api_status(sandbox, token) == 200
    assert grant_row(services.engine, OTHER).status == GRANT_ACTIVE
    assert sandbox.counters.replays_detected[OTHER] == 0
    assert sandbox.counters.refreshes[OTHER] == 1


def _dump(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, to compare a database before and after."""
    dump = {}
    with engine.connect() as connection:
        for name in sorted(inspect(engine).get_table_names()):
            rows = connection.execute(text(f"SELECT * FROM {name}"))  # noqa: S608
            dump[name] = sorted(tuple(map(str, row)) for row in rows)
    return dump


# --- a lost answer ----------------------------------------------------------------------


def test_lost_refresh_response_is_unknown_first_then_reauth_required_as_rotation_lost(
    services: Services, sandbox: Sandbox
) -> None:
    """Loop rotated but its answer never came: the next attempt tells, with no retry storm."""
    consent(services, USER)
    consent(services, OTHER)
    rejected = services.vault.access_token(USER)
    exchanges = sandbox.counters.token_requests[USER]
    sandbox.set_knobs(lose_refresh_users={USER})

    with pytest.raises(RefreshOutcomeUnknown):
        services.vault.access_token(USER, rejected=rejected)

    assert sandbox.counters.responses_lost[USER] == 1
    assert sandbox.counters.refreshes[USER] == 1  # Loop did rotate
    assert grant_row(services.engine, USER).status == GRANT_ACTIVE  # not yet given up
    row = token_row(services.engine, USER)
    assert row is not None
    assert row.refresh_started_at is not None
    assert row.lease_owner is None
    assert row.generation == 1
    # Until someone needs a new one, the still-valid access token keeps being served.
    assert services.vault.access_token(USER) == rejected

    with pytest.raises(ReauthRequired, match="rotation outcome lost") as raised:
        services.vault.access_token(USER, rejected=rejected)

    assert raised.value.reason == LOST_ROTATION
    grant = grant_row(services.engine, USER)
    assert grant.status == GRANT_REAUTH_REQUIRED
    assert grant.status_reason is not None
    assert "rotation outcome lost" in grant.status_reason
    assert events(services.engine, USER)[-1].reason == LOST_ROTATION
    # Introspection told: the stale token was never presented, so Loop saw no replay,
    # revoked nothing and alerted nobody.
    assert sandbox.counters.token_requests[USER] - exchanges == 1
    assert sandbox.counters.requests["introspect"] == 1
    assert sandbox.counters.replays_detected[USER] == 0
    assert sandbox.counters.grants_revoked[USER] == 0
    row = token_row(services.engine, USER)
    assert row is not None
    assert row.refresh_started_at is None
    # Asking again does not call Loop.
    with pytest.raises(ReauthRequired):
        services.vault.access_token(USER, rejected=rejected)
    assert sandbox.counters.token_requests[USER] - exchanges == 1
    assert sandbox.counters.requests["introspect"] == 1
    _others_unaffected(services, sandbox)


def test_without_introspection_the_next_refresh_tells_the_lost_rotation(
    services: Services, sandbox: Sandbox
) -> None:
    """A provider without introspection: the stale token is presented once, as design.md
    describes, and the user ends reauth_required as rotation lost."""
    sandbox.set_knobs(advertise_introspection=False)
    consent(services, USER)
    consent(services, OTHER)
    rejected = services.vault.access_token(USER)
    sandbox.set_knobs(lose_refresh_users={USER})
    with pytest.raises(RefreshOutcomeUnknown):
        services.vault.access_token(USER, rejected=rejected)

    with pytest.raises(ReauthRequired, match="rotation outcome lost"):
        services.vault.access_token(USER, rejected=rejected)

    assert sandbox.counters.replays_detected[USER] == 1
    assert sandbox.counters.requests["introspect"] == 0
    _others_unaffected(services, sandbox)


# --- a replayed refresh token -------------------------------------------------------------


def test_a_stale_refresh_token_in_the_database_ends_in_reauth_required_for_that_user_only(
    services: Services, sandbox: Sandbox
) -> None:
    """A rotated-away refresh token put back is refused by Loop, which revokes the grant."""
    consent(services, USER)
    consent(services, OTHER)
    stale = token_row(services.engine, USER).refresh_token  # type: ignore[union-attr]
    first = services.vault.access_token(USER)
    second = services.vault.access_token(USER, rejected=first)  # rotates
    set_tokens(services.engine, USER, refresh_token=stale)  # e.g. a restored backup

    with pytest.raises(ReauthRequired, match="Loop refused the refresh token"):
        services.vault.access_token(USER, rejected=second)

    grant = grant_row(services.engine, USER)
    assert grant.status == GRANT_REAUTH_REQUIRED
    assert grant.status_reason is not None
    assert grant.status_reason.startswith("Loop refused the refresh token")
    assert events(services.engine, USER)[-1].to_status == GRANT_REAUTH_REQUIRED
    assert sandbox.counters.replays_detected[USER] == 1
    assert sandbox.counters.grants_revoked[USER] == 1
    assert api_status(sandbox, second) == 401  # Loop revoked the whole grant
    _others_unaffected(services, sandbox)


# --- Loop fails -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "knobs",
    [{"error_rates": {"token": 1.0}}, {"storm_rate": 1.0}],
    ids=["5xx", "429"],
)
def test_a_failing_token_endpoint_is_transient_and_loses_no_rotation(
    services: Services, sandbox: Sandbox, knobs: dict[str, Any]
) -> None:
    """5xx/429 raise TransientError; the stored refresh token is unchanged and still works."""
    consent(services, USER)
    rejected = services.vault.access_token(USER)
    before = token_row(services.engine, USER)
    assert before is not None
    sandbox.set_knobs(**knobs)

    with pytest.raises(TransientError):
        services.vault.access_token(USER, rejected=rejected)

    after = token_row(services.engine, USER)
    assert after is not None
    assert after.refresh_token == before.refresh_token
    assert after.generation == before.generation
    assert after.refresh_started_at is None
    assert after.lease_owner is None
    assert grant_row(services.engine, USER).status == GRANT_ACTIVE
    assert sandbox.counters.refreshes[USER] == 0

    sandbox.set_knobs(error_rates={}, storm_rate=0.0)
    token = services.vault.access_token(USER, rejected=rejected)

    assert api_status(sandbox, token) == 200
    assert sandbox.counters.refreshes[USER] == 1
    assert sandbox.counters.replays_detected[USER] == 0


def test_a_5xx_after_an_unknown_outcome_keeps_the_outcome_unknown(
    services: Services, sandbox: Sandbox
) -> None:
    """A 5xx tells nothing about an earlier lost refresh, so the mark stays for the next try."""
    consent(services, USER)
    rejected = services.vault.access_token(USER)
    started = sandbox.clock.now() - timedelta(minutes=5)
    set_tokens(services.engine, USER, refresh_started_at=started)
    sandbox.set_knobs(error_rates={"token": 1.0})

    with pytest.raises(TransientError):
        services.vault.access_token(USER, rejected=rejected)

    row = token_row(services.engine, USER)
    assert row is not None
    assert row.refresh_started_at == started
    assert grant_row(services.engine, USER).status == GRANT_ACTIVE


# --- a process dies mid-refresh -----------------------------------------------------------


def test_crash_after_loop_rotated_but_before_the_commit_ends_as_rotation_lost(
    services: Services, sandbox: Sandbox
) -> None:
    """The row a process left when it died after the POST: next attempt → rotation lost."""
    consent(services, USER)
    consent(services, OTHER)
    before = token_row(services.engine, USER)
    assert before is not None
    rejected = services.vault.access_token(USER)
    services.vault.access_token(USER, rejected=rejected)  # Loop rotates ...
    set_tokens(  # ... and the process dies before storing the answer
        services.engine,
        USER,
        refresh_token=before.refresh_token,
        access_token=before.access_token,
        access_expires_at=before.access_expires_at,
        generation=before.generation,
        refresh_started_at=sandbox.clock.now(),
    )

    with pytest.raises(ReauthRequired, match="rotation outcome lost"):
        services.vault.access_token(USER, rejected=rejected)

    grant = grant_row(services.engine, USER)
    assert grant.status == GRANT_REAUTH_REQUIRED
    assert grant.status_reason == LOST_ROTATION
    assert sandbox.counters.replays_detected[USER] == 0  # told by introspection
    row = token_row(services.engine, USER)
    assert row is not None
    assert row.refresh_started_at is None
    _others_unaffected(services, sandbox)


def test_crash_after_marking_the_refresh_but_before_the_post_loses_nothing(
    services: Services, sandbox: Sandbox
) -> None:
    """refresh_started_at set but nothing reached Loop: the next attempt simply succeeds."""
    consent(services, USER)
    rejected = services.vault.access_token(USER)
    set_tokens(services.engine, USER, refresh_started_at=sandbox.clock.now())

    token = services.vault.access_token(USER, rejected=rejected)

    assert api_status(sandbox, token) == 200
    assert sandbox.counters.refreshes[USER] == 1
    assert sandbox.counters.replays_detected[USER] == 0
    assert grant_row(services.engine, USER).status == GRANT_ACTIVE
    row = token_row(services.engine, USER)
    assert row is not None
    assert row.refresh_started_at is None
    assert row.generation == 2


def test_a_lease_left_by_a_dead_process_does_not_block_the_next_one(
    services: Services, sandbox: Sandbox
) -> None:
    """An expired lease (its owner died) is taken over at once; the refresh proceeds."""
    consent(services, USER)
    set_tokens(
        services.engine,
        USER,
        lease_owner="dead-host:4242:deadbeef:cafebabe",
        lease_expires_at=sandbox.clock.now() - timedelta(seconds=1),
        access_expires_at=sandbox.clock.now() - timedelta(minutes=1),
    )
    started = time.monotonic()

    token = services.vault.access_token(USER)

    assert time.monotonic() - started < 2
    assert api_status(sandbox, token) == 200
    assert sandbox.counters.refreshes[USER] == 1
    row = token_row(services.engine, USER)
    assert row is not None
    assert row.lease_owner is None
    assert row.lease_expires_at is None


def test_a_live_lease_of_another_process_makes_the_caller_wait_until_it_expires(
    services: Services, sandbox: Sandbox
) -> None:
    """While another owner's lease runs, no refresh is sent; once it expires, one is."""
    consent(services, USER)
    set_tokens(
        services.engine,
        USER,
        lease_owner="busy-host:4242:deadbeef:cafebabe",
        lease_expires_at=sandbox.clock.now() + timedelta(seconds=LEASE_S),
        access_expires_at=sandbox.clock.now() - timedelta(minutes=1),
    )
    got: list[str] = []
    waiter = threading.Thread(target=lambda: got.append(services.vault.access_token(USER)))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()
    assert sandbox.counters.token_requests[USER] == 1  # the code exchange only

    sandbox.clock.advance(LEASE_S + 1)  # the other owner never came back
    waiter.join(timeout=10)

    assert not waiter.is_alive()
    assert api_status(sandbox, got[0]) == 200
    assert sandbox.counters.refreshes[USER] == 1


# --- Loop unreachable ---------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def unreachable(settings: Settings) -> Iterator[Services]:
    """Services on the same database and key, whose LOOP_ISSUER points at a closed port."""
    url = f"http://127.0.0.1:{_closed_port()}"
    built = Services.build(settings.model_copy(update={"issuer": url, "api_base_url": url}))
    try:
        yield built
    finally:
        built.close()


def test_an_unreachable_issuer_is_a_transient_error_naming_loop_issuer_and_changes_nothing(
    services: Services, sandbox: Sandbox, unreachable: Services
) -> None:
    """Loop's issuer at a closed port: retryable, the error says LOOP_ISSUER; no row changes."""
    consent(services, USER)
    set_tokens(services.engine, USER, access_expires_at=sandbox.clock.now() - timedelta(minutes=1))
    before = _dump(services.engine)

    with pytest.raises(LoopUnreachable) as refreshing:
        unreachable.vault.access_token(USER)
    with pytest.raises(LoopUnreachable) as starting:
        unreachable.onboarding.start(OTHER)

    for raised in (refreshing, starting):
        assert "LOOP_ISSUER" in str(raised.value)
    assert _dump(services.engine) == before  # no token touched, no consent flow started


def test_loop_going_away_after_discovery_is_transient_and_changes_nothing(
    database_url: str, fernet_key: str, sandbox_config: SandboxConfig
) -> None:
    """The token endpoint refuses connections: TransientError; the stored pair stays good."""
    with running_sandbox(sandbox_config) as gone:
        services = Services.build(sandbox_settings(gone, database_url, fernet_key))
        upgrade(services.engine)
        services.vault = TokenVault(
            services.engine, services.cipher, services.oidc, clock=gone.clock.now
        )
        consent(services, USER)
        refresh = stored_refresh_token(services, USER)
        rejected = stored_access_token(services, USER)
    try:
        before = _dump(services.engine)

        with pytest.raises(LoopUnreachable, match="cannot reach Loop"):
            services.vault.access_token(USER, rejected=rejected)

        assert _dump(services.engine) == before
        assert stored_refresh_token(services, USER) == refresh
        assert gone.counters.refreshes[USER] == 0
    finally:
        services.close()
