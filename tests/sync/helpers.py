"""Helpers for the sync tests: consent, settings for speed, and reading the warehouse back."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, Table, func, literal_column, select, table, text

from loop_sync.config import Settings
from loop_sync.sandbox import Sandbox
from loop_sync.schema import biomarker_results, sync_runs, sync_state
from loop_sync.services import Services
from tests.support import settings_env

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DAY = 86_400
TEST_RPS = 1000.0  # our client budget, unless a test is about rate limits
# Every column of biomarker_results but the two that say *when* loop-sync wrote a row.
CONTENT_COLUMNS = tuple(
    c for c in biomarker_results.c if c.name not in ("first_seen_at", "last_changed_at")
)

Record = dict[str, Any]


def fast(settings: Settings, **overrides: Any) -> Settings:
    """The settings with a high rate budget (and any other overrides)."""
    return settings.model_copy(update={"rate_limit_rps": TEST_RPS, **overrides})


def with_settings(services: Services, **overrides: Any) -> Services:
    """The same services (engine, vault) with some settings changed for a run."""
    return services.with_settings(fast(services.settings, **overrides))


def worker_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """The environment of a sync worker subprocess (tests/sync/worker.py), configured as an
    operator would; small pages and concurrency make a run take long enough to be killed."""
    return {
        **os.environ,
        "PYTHONPATH": str(PROJECT_ROOT),
        **settings_env(
            settings,
            LOOP_SYNC_RATE_LIMIT_RPS="1000",
            LOOP_SYNC_CONCURRENCY="2",
            LOOP_SYNC_PAGE_SIZE="10",  # several requests per user: each batch takes a while
            **overrides,
        ),
    }


def consent(services: Services, *user_ids: str) -> None:
    """Connect users headlessly, as a browser would (the sandbox auto-approves)."""
    for user_id in user_ids:
        url, binding = services.onboarding.start(user_id)
        location = httpx.URL(httpx.get(url).headers["location"])
        assert services.onboarding.finish(dict(location.params), binding) == user_id


def count(engine: Engine, table: Table, *where: Any) -> int:
    with engine.connect() as connection:
        return int(
            connection.execute(select(func.count()).select_from(table).where(*where)).scalar_one()
        )


def rows(engine: Engine, query: Any, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """A query's rows as dicts (a SQL string is run as text)."""
    statement = text(query) if isinstance(query, str) else query
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(statement, params or {})]


def view(engine: Engine, name: str) -> list[dict[str, Any]]:
    """Every row of an analyst view."""
    return rows(engine, select(literal_column("*")).select_from(table(name)))


def results(engine: Engine, *where: Any) -> dict[str, dict[str, Any]]:
    """biomarker_results rows by result_id."""
    found = rows(engine, select(biomarker_results).where(*where))
    return {row["result_id"]: row for row in found}


def live(engine: Engine, user_id: str) -> dict[str, dict[str, Any]]:
    """The user's live results (deleted_at IS NULL) by result_id."""
    return results(
        engine, biomarker_results.c.user_id == user_id, biomarker_results.c.deleted_at.is_(None)
    )


def truth_ids(sandbox: Sandbox, user_id: str) -> set[str]:
    return {record["id"] for record in sandbox.truth(user_id)}


def state(engine: Engine, user_id: str) -> dict[str, Any]:
    found = rows(engine, select(sync_state).where(sync_state.c.user_id == user_id))
    assert found, f"no sync_state row for {user_id}"
    return found[0]


def run_row(engine: Engine, run_id: str) -> dict[str, Any]:
    return rows(engine, select(sync_runs).where(sync_runs.c.run_id == run_id))[0]


def content(engine: Engine) -> list[tuple[Any, ...]]:
    """biomarker_results in full, but for when rows were written, ordered by result_id."""
    with engine.connect() as connection:
        query = select(*CONTENT_COLUMNS).order_by(biomarker_results.c.result_id)
        return [tuple(row) for row in connection.execute(query)]


def advance_until(
    sandbox: Sandbox,
    user_ids: list[str],
    found: Callable[[str, list[Record]], list[Record]],
    *,
    max_days: int = 60,
) -> dict[str, list[Record]]:
    """Move Loop's clock a day at a time until `found` picks records in some user's truth."""
    for _ in range(max_days):
        sandbox.clock.advance(DAY)
        hits = {user: found(user, sandbox.truth(user)) for user in user_ids}
        if any(hits.values()):
            return {user: picked for user, picked in hits.items() if picked}
    pytest.fail(f"nothing of the kind happened at Loop within {max_days} days")
