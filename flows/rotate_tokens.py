"""Keep-alive: refresh the tokens of grants idle for `idle_days`, sliding Loop's 90-day
refresh window so that quiet users are never lost. `idle_days=None` refreshes every
active grant.

One task does the whole rotation: the vault refreshes user by user under per-user leases
and never stops for one user's failure, so there is no per-user fan-out to pay for. The
task returns counts only; the summary goes to `sync_runs` (`kind` rotate) and to the
`rotate-summary` table artifact, where "users ok" means refreshed.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from prefect import State, flow, task
from pydantic import Field

from flows._common import (
    TASK_OPTIONS,
    current_services,
    final_state,
    recorded_run,
    run_services,
)
from loop_sync.sync import RunSummary, SyncCounts


@task(
    name="refresh-tokens",
    **TASK_OPTIONS,
)
def refresh_tokens(idle_days: float | None) -> SyncCounts:
    """Refresh the idle grants; returns how many were refreshed, lost or failed."""
    services = current_services()
    report = services.vault.rotate(idle_days=idle_days, budget=services.budget)
    reauth = set(report.reauth_required)
    return SyncCounts(
        users_attempted=len(report.refreshed) + len(report.failed),
        users_succeeded=len(report.refreshed),
        users_failed=len(set(report.failed) - reauth),
        users_reauth_required=len(reauth),
        failures=dict(report.failed),
    )


@flow(name="rotate-tokens", persist_result=False)
async def rotate_tokens(
    idle_days: Annotated[float | None, Field(ge=0)] = 30,
) -> State[RunSummary]:
    """Refresh idle grants so that they outlive Loop's 90-day window.

    Args:
        idle_days: only grants not refreshed for this many days; none means every grant.
    """
    return await asyncio.to_thread(_rotate, idle_days)


def _rotate(idle_days: float | None) -> State[RunSummary]:
    with run_services() as services, recorded_run(services, "rotate") as summary:
        summary.merge(refresh_tokens(idle_days))
    return final_state(summary)
