"""Disconnect a user and delete their data: revoke the grant at Loop, mark it revoked,
delete their tokens, results, history, landing and sync state (`TokenVault.disconnect`
with `purge=True`). The grant row and its events stay, as the record of consent and of
its withdrawal.

The summary (`kind` purge) counts the user's result rows deleted; it goes to `sync_runs`
and to the `purge-summary` table artifact. A user loop-sync has never seen makes the
run Failed.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from prefect import State, flow, task
from pydantic import Field
from sqlalchemy import func, select

from flows._common import (
    TASK_OPTIONS,
    current_services,
    final_state,
    recorded_run,
    run_services,
)
from loop_sync.errors import LoopSyncError, ReauthRequired
from loop_sync.schema import biomarker_results
from loop_sync.sync import RunSummary, SyncCounts


@task(
    name="purge-user",
    **TASK_OPTIONS,
)
def purge(user_id: str) -> SyncCounts:
    """Revoke and purge one user; returns the result rows deleted. Safe to repeat."""
    services = current_services()
    with services.engine.connect() as connection:
        rows = connection.execute(
            select(func.count())
            .select_from(biomarker_results)
            .where(biomarker_results.c.user_id == user_id)
        ).scalar_one()
    services.vault.disconnect(user_id, purge=True)
    return SyncCounts(users_attempted=1, users_succeeded=1, rows_deleted=int(rows))


@flow(name="purge-user", persist_result=False, flow_run_name="purge-{user_id}")
async def purge_user(
    user_id: Annotated[str, Field(min_length=1)],
) -> State[RunSummary]:
    """Revoke the user's grant at Loop and delete everything loop-sync holds about them.

    Args:
        user_id: the Loop user id to disconnect and purge.
    """
    return await asyncio.to_thread(_purge, user_id)


def _purge(user_id: str) -> State[RunSummary]:
    with run_services() as services, recorded_run(services, "purge") as summary:
        try:
            summary.merge(purge(user_id))
        except LoopSyncError as exc:
            reason = exc.reason if isinstance(exc, ReauthRequired) else str(exc)
            summary.merge(SyncCounts(users_attempted=1, users_failed=1, failures={user_id: reason}))
    return final_state(summary)
