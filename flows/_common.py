"""What every loop-sync flow shares: the services of a run, the retry rule, batching and
the run summary with its final state.

Final state, the operators' contract (docs/orchestration.md, "Final states"):

- `Completed` when every user attempted went through (status `ok` in `sync_runs`).
- `Completed` named **`Partial`** when some users failed or must re-consent but others
  went through (status `partial`). The run still finished everybody else. It stays of
  type COMPLETED so that a few users who revoked consent (normal churn at 100k users)
  don't turn every nightly run red, trigger flow retries or page anyone; the state's
  name emits its own event, `prefect.flow-run.Partial`, for an automation to count.
- `Failed` when no user went through although some were attempted, or the run itself
  stopped (the database went away): that is an outage, and what operators page on
  (`prefect.flow-run.Failed`).

Services (settings read once, the engine, the token vault) are built once per flow run and
reach the tasks through a context variable, never as task parameters, so Prefect neither
hashes nor records them. Batches run two at a time (`BATCHES_AT_ONCE`), so one's
fetching covers the other's last writes, and share the process's one rate budget for
Loop; with `shards` workers each takes an equal share of the client's rate
(`LOOP_SYNC_RATE_LIMIT_RPS / shards`). Their tasks run in the task runner's threads, but
their syncs run on the flow run's one event loop (`Services.portal`): two event loops in
two threads handed the GIL back and forth at every socket call, which cost a re-sync
about 40% more CPU than one loop running both.

Every flow is an `async def` whose body, plain blocking code, runs on a worker thread
(`asyncio.to_thread`, which carries the flow run's context along). Prefect's engine for a
sync flow joins the flow run's heartbeat thread when the run ends, and that thread sleeps
in one-second steps: every sync flow run waited up to a second after its work was done,
up to 4 % of a benchmark's nightly run and a fifth of its re-sync (docs/performance.md).
The engine for an async flow lets the thread go. Outside a worker, run a flow with
`anyio.run(lambda: sync_biomarkers(return_state=True))`.

Tokens are never parameters, results, artifacts or log lines: every task that may touch
one uses `cache_policy=NO_CACHE` and `persist_result=False` and returns only counts.

A configuration that cannot work (a setting missing or malformed, the database or Loop
out of reach, an encryption key that cannot read the stored tokens) fails the run in
`run_services`, before `sync_runs` or anything else is written; like every LoopSyncError
that ends a flow or task run, it is logged as its one line, without a traceback.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import httpx
from anyio.from_thread import start_blocking_portal
from prefect import State, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.futures import PrefectFuture
from prefect.states import Completed, Failed
from prefect.tasks import Task
from sqlalchemy.exc import OperationalError

from loop_sync.config import load_settings
from loop_sync.errors import LoopSyncError, ReauthRequired, RefreshOutcomeUnknown, TransientError
from loop_sync.services import Services
from loop_sync.sync import (
    RunSummary,
    SyncCounts,
    finish_run,
    select_users,
    start_run,
    sync_users_now,
)

__all__ = [
    "BATCH_SIZE",
    "FAILURES_SHOWN",
    "TASK_OPTIONS",
    "current_services",
    "final_state",
    "publish_summary",
    "recorded_run",
    "retry_transient",
    "run_in_batches",
    "run_services",
    "select_active_users",
    "sync_batch",
]

BATCH_SIZE = 500  # users per task: ~30 task runs/s is all a SQLite-backed server records
# A batch's end has no fetching left, only its last writes: the next batch fetches then.
BATCHES_AT_ONCE = 2
TASK_RETRIES = 2
TASK_RETRY_DELAYS_S = [30.0, 120.0]  # Loop or the database had a moment; give it time
FAILURES_SHOWN = 100  # users listed in the failures artifact; sync_state holds them all

# Failures that say nothing about the users or the data: retrying the task may work.
TRANSIENT = (
    TransientError,  # Loop answered 5xx/429 or could not be reached
    RefreshOutcomeUnknown,  # the next attempt tells what happened to the refresh
    httpx.TransportError,
    OperationalError,  # the database dropped the connection or was locked too long
    ConnectionError,
    TimeoutError,
)

_services: ContextVar[Services] = ContextVar("loop_sync_services")


class _OneLineErrors(logging.Filter):
    """Drops the traceback from Prefect's record of a LoopSyncError that ended a flow or
    task run: the message already says what to fix (as the CLI prints it), and a
    traceback would bury it in the worker's output and the run's logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], LoopSyncError):
            record.exc_info = None
            record.exc_text = None
        return True


for _logger in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_logger).addFilter(_OneLineErrors())


@contextmanager
def run_services(*, rate_share: int = 1) -> Iterator[Services]:
    """Services for one flow run, from the worker's environment and `.env`; closed after.

    `rate_share` splits the client's rate budget between that many concurrent shards,
    because Loop limits the client_id, not a process. The configuration is checked first
    (`Services.check`: database, schema, stored tokens, Loop), so a run that cannot work
    fails before it writes anything.
    """
    settings = load_settings()
    if rate_share > 1:
        settings = settings.model_copy(
            update={"rate_limit_rps": settings.rate_limit_rps / rate_share}
        )
    services = Services.build(settings)
    try:
        services.check()
        with start_blocking_portal(name="loop-sync") as portal:
            run = dataclasses.replace(services, portal=portal)
            token = _services.set(run)
            try:
                yield run
            finally:
                _services.reset(token)
    finally:
        services.close()


def current_services() -> Services:
    """The services of the flow run this task belongs to."""
    try:
        return _services.get()
    except LookupError:
        msg = "loop-sync tasks run inside a loop-sync flow (no `run_services()` is active)"
        raise RuntimeError(msg) from None


def retry_transient(task: Task[..., Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a task only for a transient failure; never a ReauthRequired or a bug."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            state.result()
        except Exception as exc:  # we only classify it
            error = exc
    return isinstance(error, TRANSIENT) and not isinstance(error, ReauthRequired)


# Every loop-sync task: no cache and no persisted result (tasks touch tokens), and retries
# for transient failures only.
TASK_OPTIONS: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "persist_result": False,
    "retries": TASK_RETRIES,
    "retry_delay_seconds": TASK_RETRY_DELAYS_S,
    "retry_condition_fn": retry_transient,
}


def _reason(error: BaseException) -> str:
    """Why a batch failed, for the summary. Our errors carry no secrets by contract; other
    messages (a database error may quote its parameters) are reduced to their type."""
    if isinstance(error, ReauthRequired):
        return error.reason
    if isinstance(error, LoopSyncError):
        return str(error)
    return f"{type(error).__name__} (see the task run's logs)"


@task(
    name="select-users",
    task_run_name="select-users",
    **TASK_OPTIONS,
)
def select_active_users(
    user_ids: Sequence[str] | None = None, shard: int = 0, shards: int = 1
) -> list[str]:
    """The active grants this shard syncs (optionally only `user_ids`)."""
    return select_users(current_services().engine, user_ids, shard=shard, shards=shards)


@task(
    name="sync-batch",
    task_run_name="sync-batch-{batch}",
    **TASK_OPTIONS,
)
def sync_batch(
    run_id: str, user_ids: list[str], batch: int, concurrency: int | None = None
) -> SyncCounts:
    """Pull and write one batch of users, concurrently inside; returns only counts.

    Re-running a batch is safe: each user's rows and sync state commit together.
    """
    return sync_users_now(current_services(), run_id, user_ids, concurrency=concurrency)


def run_in_batches(
    summary: RunSummary,
    user_ids: Sequence[str],
    batch_size: int,
    submit_batch: Callable[[list[str], int], PrefectFuture[SyncCounts]],
) -> None:
    """Feed the users to `submit_batch` (a task's submit) `batch_size` at a time, in
    order, with at most BATCHES_AT_ONCE running.

    A batch that still fails after its retries counts its users as failed and the run
    goes on with the others: one bad batch never stops them.
    """
    running: deque[tuple[list[str], int, PrefectFuture[SyncCounts]]] = deque()
    for number, batch in enumerate(_staggered(user_ids, batch_size), start=1):
        running.append((batch, number, submit_batch(batch, number)))
        if len(running) == BATCHES_AT_ONCE:
            summary.merge(_outcome(*running.popleft()))
    while running:
        summary.merge(_outcome(*running.popleft()))


def _staggered(user_ids: Sequence[str], batch_size: int) -> Iterator[list[str]]:
    """The users `batch_size` at a time, the first batch half as big when batches run at
    once. Batches at once share the rate budget, so they progress alike: equal batches
    started together would end together, and a batch's end is only writes, with no
    request going out. Half a batch apart, one batch fetches while the other writes."""
    first = batch_size
    if BATCHES_AT_ONCE > 1 and len(user_ids) > batch_size > 1:
        first = batch_size // 2
    bounds = [0, *range(first, len(user_ids), batch_size), len(user_ids)]
    for start, end in itertools.pairwise(bounds):
        if start < end:
            yield list(user_ids[start:end])


def _outcome(batch: list[str], number: int, future: PrefectFuture[SyncCounts]) -> SyncCounts:
    try:
        return future.result()
    except Exception as exc:  # recorded, and the run goes on
        reason = f"batch {number} failed: {_reason(exc)}"
        return SyncCounts(
            users_attempted=len(batch),
            users_failed=len(batch),
            failures=dict.fromkeys(batch, reason),
        )


@contextmanager
def recorded_run(services: Services, kind: str) -> Iterator[RunSummary]:
    """A `sync_runs` row for the block, closed with its counts, then published to Prefect.

    If the block raises, the run is recorded as failed (aborted) and the error goes on.
    """
    summary = start_run(services.engine, kind)
    try:
        yield summary
    except BaseException:
        summary.aborted = True
        raise
    finally:
        finish_run(services.engine, summary)
        publish_summary(summary)


def publish_summary(summary: RunSummary) -> None:
    """The summary as a table artifact (`<kind>-summary`), and the failed users (up to
    FAILURES_SHOWN) as `<kind>-failures`; counts, user ids and reasons only.

    It runs on a flow's worker thread, in an async flow's context, where Prefect's
    `create_table_artifact` would hand back its coroutine: `_sync=True` asks for the call.
    """
    rows: list[dict[str, Any]] = [{"metric": "run_id", "value": summary.run_id}]
    tables = {
        f"{summary.kind}-summary": (
            rows + summary.as_rows(),
            f"loop-sync {summary.kind} run `{summary.run_id}`: {_headline(summary)}",
        )
    }
    if summary.failures:
        shown = sorted(summary.failures.items())[:FAILURES_SHOWN]
        tables[f"{summary.kind}-failures"] = (
            [{"user_id": user, "reason": reason} for user, reason in shown],
            f"{len(shown)} of {len(summary.failures)} users not synced in run "
            f"`{summary.run_id}`; `sync_state` has every one",
        )
    for key, (table, description) in tables.items():
        # `_sync` is the switch of Prefect's async_dispatch, which its stubs do not declare.
        create_table_artifact(table=table, key=key, description=description, _sync=True)  # type: ignore[call-arg]


def _headline(summary: RunSummary) -> str:
    return (
        f"{summary.kind} {summary.status}: {summary.users_succeeded} of "
        f"{summary.users_attempted} users ok, {summary.users_failed} failed, "
        f"{summary.users_reauth_required} must re-consent; rows +{summary.rows_inserted} "
        f"~{summary.rows_updated} -{summary.rows_deleted}, {summary.rows_rejected} rejected"
    )


def final_state(summary: RunSummary) -> State[RunSummary]:
    """The flow run's final state from its summary; see the module docstring for why."""
    message = _headline(summary)
    if summary.status == "ok":
        return Completed(message=message, data=summary)
    if summary.status == "partial":
        return Completed(name="Partial", message=message, data=summary)
    return Failed(message=message, data=summary)
