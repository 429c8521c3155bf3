"""A sync run: pull users' results from Loop and write them, batch by batch.

Users go in batches. Inside a batch they are fetched concurrently under one rate budget
for the client_id; the batch is then written in one transaction while the next batch is
being fetched. One user's failure is recorded in their sync state and never stops the
others. The CLI and the Prefect flows both call `run_sync`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime

from sqlalchemy import Engine, select, update

from loop_sync.client import LoopClient
from loop_sync.errors import LoopSyncError, ReauthRequired
from loop_sync.load import LoadCounts, UserPull, record_failure, write_batch
from loop_sync.ratelimit import RateBudget
from loop_sync.schema import GRANT_ACTIVE, grants, sync_runs
from loop_sync.services import Services
from loop_sync.vault import utcnow

BATCH_SIZE = 50
log = logging.getLogger(__name__)
Progress = Callable[[int, int], None]


@dataclass
class SyncCounts:
    """What some users' sync did. No values, no secrets: safe to log and publish."""

    users_attempted: int = 0
    users_succeeded: int = 0
    users_failed: int = 0
    users_reauth_required: int = 0
    rows_inserted: int = 0
    rows_updated: int = 0
    rows_deleted: int = 0
    rows_rejected: int = 0
    rows_unchanged: int = 0
    failures: dict[str, str] = field(default_factory=dict)

    def add(self, counts: LoadCounts) -> None:
        self.rows_inserted += counts.inserted
        self.rows_updated += counts.updated
        self.rows_deleted += counts.deleted
        self.rows_rejected += counts.rejected
        self.rows_unchanged += counts.unchanged

    def merge(self, other: SyncCounts) -> None:
        for name in (f.name for f in fields(SyncCounts) if f.name != "failures"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures.update(other.failures)


@dataclass(kw_only=True)
class RunSummary(SyncCounts):
    """One run (a CLI sync, a flow run, a backfill) as recorded in `sync_runs`."""

    run_id: str
    kind: str
    started_at: datetime
    duration_s: float = 0.0
    aborted: bool = False  # the run itself stopped (e.g. the database went away)

    @property
    def status(self) -> str:
        """ok; partial when some users failed; failed when none succeeded or it aborted."""
        if self.aborted:
            return "failed"
        if not self.users_failed and not self.users_reauth_required:
            return "ok"
        return "partial" if self.users_succeeded else "failed"

    def as_rows(self) -> list[dict[str, str | int | float]]:
        """The summary as metric/value rows, e.g. for a table artifact."""
        names = [f.name for f in fields(SyncCounts) if f.name != "failures"]
        rows: list[dict[str, str | int | float]] = [
            {"metric": "status", "value": self.status},
            *({"metric": name, "value": getattr(self, name)} for name in names),
            {"metric": "duration_s", "value": round(self.duration_s, 3)},
        ]
        return rows


def select_users(
    engine: Engine,
    user_ids: Sequence[str] | None = None,
    *,
    shard: int = 0,
    shards: int = 1,
) -> list[str]:
    """Active grants (optionally only `user_ids`), split stably across `shards` workers."""
    if not 0 <= shard < shards:
        msg = f"shard must be in 0..{shards - 1}, got {shard}"
        raise ValueError(msg)
    query = select(grants.c.user_id).where(grants.c.status == GRANT_ACTIVE)
    if user_ids is not None:
        query = query.where(grants.c.user_id.in_(list(user_ids)))
    with engine.connect() as connection:
        selected = connection.execute(query.order_by(grants.c.user_id)).scalars().all()
    return [u for u in selected if zlib.crc32(u.encode()) % shards == shard]


def start_run(engine: Engine, kind: str) -> RunSummary:
    """Open a `sync_runs` row; `finish_run` closes it with the counts."""
    summary = RunSummary(run_id=uuid.uuid4().hex, kind=kind, started_at=utcnow())
    with engine.begin() as connection:
        connection.execute(
            sync_runs.insert().values(
                run_id=summary.run_id,
                kind=summary.kind,
                started_at=summary.started_at,
                status="running",
            )
        )
    return summary


def finish_run(engine: Engine, summary: RunSummary) -> None:
    summary.duration_s = (utcnow() - summary.started_at).total_seconds()
    with engine.begin() as connection:
        connection.execute(
            update(sync_runs)
            .where(sync_runs.c.run_id == summary.run_id)
            .values(
                finished_at=utcnow(),
                status=summary.status,
                users_attempted=summary.users_attempted,
                users_succeeded=summary.users_succeeded,
                users_failed=summary.users_failed,
                users_reauth_required=summary.users_reauth_required,
                rows_inserted=summary.rows_inserted,
                rows_updated=summary.rows_updated,
                rows_deleted=summary.rows_deleted,
                rows_rejected=summary.rows_rejected,
                duration_s=summary.duration_s,
            )
        )
    log.info(
        "run %s %s: %d users, %d ok, %d failed, %d reauth; rows +%d ~%d -%d, %d rejected",
        summary.run_id,
        summary.status,
        summary.users_attempted,
        summary.users_succeeded,
        summary.users_failed,
        summary.users_reauth_required,
        summary.rows_inserted,
        summary.rows_updated,
        summary.rows_deleted,
        summary.rows_rejected,
    )


def run_sync(
    services: Services,
    user_ids: Sequence[str],
    *,
    kind: str = "sync",
    concurrency: int | None = None,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
) -> RunSummary:
    """Sync these users now as one recorded run; returns its summary."""
    summary = start_run(services.engine, kind)
    try:
        summary.merge(
            sync_users_now(
                services,
                summary.run_id,
                user_ids,
                concurrency=concurrency,
                batch_size=batch_size,
                progress=progress,
            )
        )
    except BaseException:
        summary.aborted = True
        raise
    finally:
        finish_run(services.engine, summary)
    return summary


def sync_users_now(
    services: Services,
    run_id: str,
    user_ids: Sequence[str],
    *,
    concurrency: int | None = None,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
    keep: Callable[[UserPull], UserPull] | None = None,
    record_state: bool = True,
) -> SyncCounts:
    """Pull and write these users within run `run_id`; one user's failure never raises."""
    return asyncio.run(
        pull_and_write(
            services,
            run_id,
            user_ids,
            concurrency=concurrency or services.settings.concurrency,
            batch_size=batch_size,
            progress=progress,
            keep=keep,
            record_state=record_state,
        )
    )


async def pull_and_write(
    services: Services,
    run_id: str,
    user_ids: Sequence[str],
    *,
    concurrency: int,
    batch_size: int = BATCH_SIZE,
    progress: Progress | None = None,
    keep: Callable[[UserPull], UserPull] | None = None,
    record_state: bool = True,
) -> SyncCounts:
    """Fetch batch k+1 while batch k is written. `keep` may trim a pull (backfill windows)."""
    counts = SyncCounts(users_attempted=len(user_ids))
    budget = RateBudget(services.settings.rate_limit_rps)
    gate = asyncio.Semaphore(concurrency)
    writing: asyncio.Task[LoadCounts] | None = None
    written = 0
    done = 0
    async with LoopClient(services.settings, services.vault, budget) as client:
        for start in range(0, len(user_ids), batch_size):
            batch = user_ids[start : start + batch_size]
            results = await asyncio.gather(*(_fetch(client, gate, u) for u in batch))
            pulls = [pull for pull in results if isinstance(pull, UserPull)]
            if keep is not None:
                pulls = [keep(pull) for pull in pulls]
            for user_id, outcome in zip(batch, results, strict=True):
                if not isinstance(outcome, UserPull):
                    await asyncio.to_thread(
                        _fail, services.engine, counts, user_id, outcome, run_id
                    )
            if writing is not None:
                counts.add(await writing)
                counts.users_succeeded += written
            writing = asyncio.create_task(
                asyncio.to_thread(
                    write_batch,
                    services.engine,
                    pulls,
                    run_id=run_id,
                    now=utcnow(),
                    record_state=record_state,
                )
            )
            written = len(pulls)
            done += len(batch)
            if progress is not None:
                progress(done, len(user_ids))
        if writing is not None:
            counts.add(await writing)
            counts.users_succeeded += written
    return counts


async def _fetch(
    client: LoopClient, gate: asyncio.Semaphore, user_id: str
) -> UserPull | LoopSyncError:
    async with gate:
        try:
            fetched = await client.fetch_results(user_id)
        except LoopSyncError as exc:
            return exc
    return UserPull(user_id, fetched.records, fetched.complete)


def _fail(
    engine: Engine, summary: SyncCounts, user_id: str, error: LoopSyncError, run_id: str
) -> None:
    reauth = isinstance(error, ReauthRequired)
    if reauth:
        summary.users_reauth_required += 1
    else:
        summary.users_failed += 1
    reason = error.reason if isinstance(error, ReauthRequired) else str(error)
    summary.failures[user_id] = reason
    log.warning("user %s not synced: %s", user_id, reason)
    record_failure(
        engine,
        user_id,
        status="reauth_required" if reauth else "failed",
        error=reason,
        run_id=run_id,
        now=utcnow(),
    )
