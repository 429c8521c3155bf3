"""Backfills by hand: refetch from Loop or replay from the raw landing, within a window."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from sqlalchemy import select, update

from loop_sync.backfill import backfill_users, in_window
from loop_sync.sandbox import Sandbox
from loop_sync.schema import biomarker_results, sync_state
from loop_sync.services import Services
from loop_sync.sync import run_sync, start_run
from tests.sync.helpers import count, rows


def _state(services: Services) -> list[dict[str, object]]:
    return rows(services.engine, select(sync_state).order_by(sync_state.c.user_id))


def test_replay_renormalizes_from_the_landing_without_calling_loop(
    services: Services, sandbox: Sandbox, users: list[str]
) -> None:
    """A replay rewrites every live result from raw_records and sends no API request."""
    run_sync(services, users)
    with services.engine.begin() as connection:  # as if an older normalizer had erred
        connection.execute(update(biomarker_results).values(value_canonical=-1.0))
    requests = sandbox.counters.requests["biomarkers"]
    state = _state(services)

    counts = backfill_users(
        services,
        start_run(services.engine, "backfill").run_id,
        users,
        start=None,
        end=None,
        mode="replay",
    )

    assert sandbox.counters.requests["biomarkers"] == requests
    assert counts.rows_updated == count(services.engine, biomarker_results)
    assert (
        count(services.engine, biomarker_results, biomarker_results.c.value_canonical == -1.0) == 0
    )
    assert _state(services) == state  # live sync state untouched


def test_replay_does_not_bring_back_deleted_results(
    services: Services, sandbox: Sandbox, users: list[str]
) -> None:
    """A result Loop deleted stays deleted through a replay of its old raw record."""
    run_sync(services, users)
    for _ in range(3):  # a month at a time: refresh tokens die after 90 idle days
        sandbox.clock.advance(30 * 86400)
        run_sync(services, users)
    deleted = count(services.engine, biomarker_results, biomarker_results.c.deleted_at.is_not(None))
    assert deleted > 0

    backfill_users(
        services,
        start_run(services.engine, "backfill").run_id,
        users,
        start=None,
        end=None,
        mode="replay",
    )

    assert (
        count(services.engine, biomarker_results, biomarker_results.c.deleted_at.is_not(None))
        == deleted
    )


def test_refetch_writes_only_the_window_and_deletes_nothing(
    services: Services, sandbox: Sandbox, users: list[str]
) -> None:
    """Refetching a window stores exactly the results collected in it; nothing else moves."""
    today = sandbox.clock.now().date()
    start, end = today - timedelta(days=120), today - timedelta(days=60)
    expected = {
        record["id"]
        for user in users
        for record in sandbox.truth(user)
        if in_window(record, start, end)
    }

    counts = backfill_users(
        services,
        start_run(services.engine, "backfill").run_id,
        users,
        start=start,
        end=end,
        mode="refetch",
    )

    stored = {row["result_id"] for row in rows(services.engine, select(biomarker_results))}
    assert stored == expected
    assert counts.rows_inserted == len(expected)
    assert counts.rows_deleted == 0
    assert _state(services) == []  # a backfill is not a sync


def test_a_window_that_ends_before_it_starts_is_refused(services: Services) -> None:
    """start after end is an operator error, said plainly, before any work."""
    with pytest.raises(ValueError, match="starts"):
        backfill_users(
            services,
            "run",
            ["usr_0001"],
            start=date(2026, 2, 1),
            end=date(2026, 1, 1),
            mode="refetch",
        )
