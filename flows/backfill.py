"""Backfill by hand: results collected in a window, for some users or all active ones.

`mode="refetch"` pulls from Loop again; `mode="replay"` re-normalizes what the raw
landing already holds, with no API call (e.g. after a catalog or normalizer change).
Either way the window's results are written, nothing outside it is deleted, and no
user's live sync state moves backwards (`loop_sync.backfill`). Users go in batches, one
task per batch, like the nightly sync. The summary goes to `sync_runs` (`kind` backfill)
and to the `backfill-summary` table artifact.

    prefect deployment run backfill/backfill --param mode=replay \
        --param users='["usr_0001"]' --param start=2024-01-01
"""

from __future__ import annotations

import asyncio
from datetime import date
from typing import Annotated, Literal

from prefect import State, flow, task
from pydantic import Field

from flows._common import (
    BATCH_SIZE,
    TASK_OPTIONS,
    current_services,
    final_state,
    recorded_run,
    run_in_batches,
    run_services,
    select_active_users,
)
from loop_sync.backfill import backfill_users
from loop_sync.sync import RunSummary, SyncCounts

Mode = Literal["refetch", "replay"]


@task(
    name="backfill-batch",
    task_run_name="backfill-batch-{batch}",
    **TASK_OPTIONS,
)
def backfill_batch(
    run_id: str,
    user_ids: list[str],
    batch: int,
    *,
    start: date | None,
    end: date | None,
    mode: Mode,
    concurrency: int | None = None,
) -> SyncCounts:
    """Backfill one batch of users; returns only counts."""
    return backfill_users(
        current_services(),
        run_id,
        user_ids,
        start=start,
        end=end,
        mode=mode,
        concurrency=concurrency,
    )


@flow(name="backfill", persist_result=False)
async def backfill(  # noqa: PLR0917  (callers name flow parameters: --param)
    users: list[str] | None = None,
    start: date | None = None,
    end: date | None = None,
    mode: Mode = "refetch",
    batch_size: Annotated[int, Field(ge=1)] = BATCH_SIZE,
    concurrency: Annotated[int | None, Field(ge=1, le=256)] = None,
) -> State[RunSummary]:
    """Rewrite the window's results for these users (or all) from Loop or the landing.

    Args:
        users: Loop user ids; none means every active grant.
        start: first collected_at day (UTC) to rewrite; none means from the beginning.
        end: last collected_at day (UTC) to rewrite; none means up to now.
        mode: "refetch" pulls from Loop again; "replay" re-normalizes the raw landing.
        batch_size: users per task.
        concurrency: users fetched at once in a batch (default LOOP_SYNC_CONCURRENCY).
    """
    return await asyncio.to_thread(
        _backfill,
        users=users,
        start=start,
        end=end,
        mode=mode,
        batch_size=batch_size,
        concurrency=concurrency,
    )


def _backfill(
    *,
    users: list[str] | None,
    start: date | None,
    end: date | None,
    mode: Mode,
    batch_size: int,
    concurrency: int | None,
) -> State[RunSummary]:
    if start is not None and end is not None and start > end:
        msg = f"the window starts ({start}) after it ends ({end}); swap start and end"
        raise ValueError(msg)
    with run_services() as services, recorded_run(services, "backfill") as summary:
        chosen = list(dict.fromkeys(users)) if users is not None else select_active_users()
        run_in_batches(
            summary,
            chosen,
            batch_size,
            lambda batch, number: backfill_batch.submit(
                summary.run_id,
                batch,
                number,
                start=start,
                end=end,
                mode=mode,
                concurrency=concurrency,
            ),
        )
    return final_state(summary)
