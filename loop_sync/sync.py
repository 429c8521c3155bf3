"""A sync run: pull users' results from Loop and write them, batch by batch.

A pipeline with two ends. `concurrency` fetchers pull users one after another, all under
the process's rate budget for the client_id, and hand each finished pull to a bounded
queue; one writer takes whatever the queue holds (up to `batch_size` users) and writes it
in one transaction, in a thread, while the fetchers go on. So the request rate never
waits for a slow user or a write, and memory holds at most a few batches, whatever the
number of users. One user's failure is recorded in their sync state and never stops the
others. The CLI and the Prefect flows both call `run_sync` or `sync_users_now`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import math
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime

from sqlalchemy import Engine, select, update

from loop_sync.client import LoopClient
from loop_sync.errors import LoopSyncError, ReauthRequired
from loop_sync.load import LoadCounts, UserPull, last_digests, record_failure, write_batch
from loop_sync.schema import GRANT_ACTIVE, grants, sync_runs
from loop_sync.services import Services
from loop_sync.vault import utcnow

BATCH_SIZE = 200  # users per transaction at most: ~20k rows, where the write path levels off
BATCH_LINGER_S = 0.25  # how long a batch waits to fill up before it is written
# The garbage collector's thresholds in a process that syncs (see `sync_users_now`):
# a collection every 50,000 allocations rather than CPython's 700.
GC_THRESHOLDS = (50_000, 20, 100)
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
    # Where the time went, summed over users and batches (fetches overlap each other and
    # the writes): rate_wait, http, json_decode, hash, normalize, db_write.
    seconds: dict[str, float] = field(default_factory=dict)
    # When `pull_and_write` ran (time.perf_counter at start and end): the rest of a run's
    # wall time is overhead. Batches run at once, so that is the union, not the sum.
    spans: list[tuple[float, float]] = field(default_factory=list)

    def add(self, counts: LoadCounts) -> None:
        self.rows_inserted += counts.inserted
        self.rows_updated += counts.updated
        self.rows_deleted += counts.deleted
        self.rows_rejected += counts.rejected
        self.rows_unchanged += counts.unchanged
        self.spent(counts.seconds)

    def spent(self, seconds: Mapping[str, float]) -> None:
        for stage, spent in seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + spent

    def merge(self, other: SyncCounts) -> None:
        for name in _counters():
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failures.update(other.failures)
        self.spent(other.seconds)
        self.spans += other.spans

    def syncing_s(self) -> float:
        """Wall seconds during which some `pull_and_write` ran (the union of the spans)."""
        total, reached = 0.0, -math.inf
        for start, end in sorted(self.spans):
            total += max(0.0, end - max(start, reached))
            reached = max(reached, end)
        return total


def _counters() -> Iterator[str]:
    return (f.name for f in fields(SyncCounts) if f.name not in ("failures", "seconds", "spans"))


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
        rows: list[dict[str, str | int | float]] = [
            {"metric": "status", "value": self.status},
            *({"metric": name, "value": getattr(self, name)} for name in _counters()),
            {"metric": "duration_s", "value": round(self.duration_s, 3)},
        ]
        rows += [
            {"metric": f"seconds_{stage}", "value": round(spent, 3)}
            for stage, spent in sorted(self.seconds.items())
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
    """Pull and write these users within run `run_id`; one user's failure never raises.

    It runs on `services.portal`'s event loop when there is one (a flow run's batches at
    once share it), else on an event loop of its own. It raises the process's garbage
    collector thresholds, for good (`GC_THRESHOLDS`): a sync allocates about a thousand
    containers per user (the parsed records) and keeps them until they are written, so
    at CPython's defaults the collector ran all the time and its full collections walked
    the whole heap, Prefect's included; at R = 200 req/s one process reached 88 % of R
    instead of 82-84 % (benchmarks, docs/performance.md).
    """
    gc.set_threshold(*GC_THRESHOLDS)
    pulling = functools.partial(
        pull_and_write,
        services,
        run_id,
        user_ids,
        concurrency=concurrency or services.settings.concurrency,
        batch_size=batch_size,
        progress=progress,
        keep=keep,
        record_state=record_state,
    )
    if services.portal is not None:
        return services.portal.call(pulling)
    return asyncio.run(pulling())


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
    """Fetch and write at once (see the module docstring). `keep` may trim a pull
    (backfill windows). A write that fails stops the run and raises its error."""
    started = time.perf_counter()
    counts = SyncCounts(users_attempted=len(user_ids))
    pipe = _Pipeline(services, run_id, counts, batch_size, record_state)
    async with LoopClient(
        services.settings,
        services.vault,
        services.budget,
        concurrency=concurrency,
        tls=services.tls,
    ) as client:
        fetching = asyncio.create_task(pipe.fetch_all(client, user_ids, concurrency, keep))
        writing = asyncio.create_task(pipe.write_all(progress))
        try:
            await asyncio.gather(fetching, writing)
        finally:  # one end failed: stop the other before the error goes up
            for task in (fetching, writing):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    pipe.counts.spans.append((started, time.perf_counter()))
    return pipe.counts


@dataclass
class _Pipeline:
    """The two ends of `pull_and_write` and the bounded queue between them."""

    services: Services
    run_id: str
    counts: SyncCounts
    batch_size: int
    record_state: bool  # False for a backfill: see `load.write_batch`
    pulled: asyncio.Queue[UserPull | None] = field(init=False)

    def __post_init__(self) -> None:
        self.pulled = asyncio.Queue(maxsize=self.batch_size)

    async def fetch_all(
        self,
        client: LoopClient,
        user_ids: Sequence[str],
        concurrency: int,
        keep: Callable[[UserPull], UserPull] | None,
    ) -> None:
        """`concurrency` fetchers take the next user as soon as they are free.

        Users reach them through a queue a batch long, each batch's stored access tokens
        read in one query as it enters: one read per request would cost the event loop a
        thread hop and three database round trips per user. A sync (not a backfill) reads
        the batch's last pull digests too, so that a pull identical to the last one is
        not even parsed (`LoopClient.fetch_results`).
        """
        waiting: asyncio.Queue[str | None] = asyncio.Queue(maxsize=self.batch_size)
        digests: dict[str, str] = {}

        async def feed() -> None:
            for start in range(0, len(user_ids), self.batch_size):
                batch = user_ids[start : start + self.batch_size]
                await asyncio.to_thread(self.services.vault.warm, batch)
                if self.record_state and keep is None:  # a sync, which compares digests
                    engine = self.services.engine
                    digests.update(await asyncio.to_thread(last_digests, engine, batch))
                for user_id in batch:
                    await waiting.put(user_id)
            for _ in range(concurrency):
                await waiting.put(None)  # one end for each fetcher

        async def fetcher() -> None:
            while (user_id := await waiting.get()) is not None:
                try:
                    fetched = await client.fetch_results(user_id, digests.pop(user_id, None))
                except LoopSyncError as exc:
                    await asyncio.to_thread(
                        _fail, self.services.engine, self.counts, user_id, exc, self.run_id
                    )
                    continue
                self.counts.spent(fetched.seconds)
                pull = UserPull(
                    user_id, fetched.records, fetched.complete, fetched.digest, fetched.unchanged
                )
                await self.pulled.put(keep(pull) if keep is not None else pull)

        await asyncio.gather(feed(), *(fetcher() for _ in range(concurrency)))
        await self.pulled.put(None)  # the end

    async def write_all(self, progress: Progress | None) -> None:
        """Write what has been pulled, up to `batch_size` users a transaction, to the end.

        A batch takes what is waiting, then up to BATCH_LINGER_S more for users still
        coming: a transaction has a fixed cost (a lock, three reads, the sync state), and
        many tiny ones would take the process's CPU from the fetchers whenever writing is
        quicker than fetching.
        """
        finished = False
        while not finished:
            batch: list[UserPull] = []
            pull = await self.pulled.get()
            closes = time.monotonic() + BATCH_LINGER_S
            while pull is not None:
                batch.append(pull)
                if len(batch) >= self.batch_size:
                    break
                if not self.pulled.empty():
                    pull = self.pulled.get_nowait()
                    continue
                remaining = closes - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    pull = await asyncio.wait_for(self.pulled.get(), remaining)
                except TimeoutError:
                    break
            finished = pull is None
            if batch:
                loaded = await asyncio.to_thread(
                    write_batch,
                    self.services.engine,
                    batch,
                    run_id=self.run_id,
                    now=utcnow(),
                    record_state=self.record_state,
                )
                self.counts.add(loaded)
                self.counts.users_succeeded += len(batch)
            if progress is not None:
                counts = self.counts
                done = counts.users_succeeded + counts.users_failed + counts.users_reauth_required
                progress(done, counts.users_attempted)


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
