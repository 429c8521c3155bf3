"""The nightly sync: every active user's biomarker results, pulled from Loop and written.

Users go in batches of `batch_size`, one Prefect task per batch (never one per user: at
100k users Prefect would spend the night recording task runs), with async concurrency
inside each batch (`concurrency`, default LOOP_SYNC_CONCURRENCY). `shard`/`shards` split
the users stably between several workers; each shard takes an equal share of the
client's rate budget. The final state is Completed, Completed named "Partial" or Failed,
as `flows/_common.py` explains; the summary goes to `sync_runs` and to the
`sync-summary` table artifact.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from prefect import State, flow
from pydantic import Field

from flows._common import (
    BATCH_SIZE,
    final_state,
    recorded_run,
    run_in_batches,
    run_services,
    select_active_users,
    sync_batch,
)
from loop_sync.sync import RunSummary


@flow(name="sync-biomarkers", persist_result=False)
async def sync_biomarkers(
    shard: Annotated[int, Field(ge=0)] = 0,
    shards: Annotated[int, Field(ge=1)] = 1,
    batch_size: Annotated[int, Field(ge=1)] = BATCH_SIZE,
    concurrency: Annotated[int | None, Field(ge=1, le=256)] = None,
) -> State[RunSummary]:
    """Sync every active user of this shard; one user's failure never stops the others.

    Args:
        shard: this worker's shard, 0 to shards - 1.
        shards: how many workers split the users (stably, by a hash of the user id).
        batch_size: users per task.
        concurrency: users fetched at once in a batch (default LOOP_SYNC_CONCURRENCY).
    """
    return await asyncio.to_thread(_sync_biomarkers, shard, shards, batch_size, concurrency)


def _sync_biomarkers(
    shard: int, shards: int, batch_size: int, concurrency: int | None
) -> State[RunSummary]:
    with run_services(rate_share=shards) as services, recorded_run(services, "sync") as summary:
        users = select_active_users(shard=shard, shards=shards)
        run_in_batches(
            summary,
            users,
            batch_size,
            lambda batch, number: sync_batch.submit(summary.run_id, batch, number, concurrency),
        )
    return final_state(summary)
