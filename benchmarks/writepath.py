"""The write path on PostgreSQL: binary COPY vs. the product's upsert, and raw records end to end.

Everything runs in one scratch schema created by `loop_sync.schema.upgrade`, so both sides
write into the real `biomarker_results` table with its real keys and indexes.

The product's writes run as the nightly flow runs them: `BATCHES_AT_ONCE` transactions at
once (each flow batch has its own writer), every one a batch of users. The benchmark's own
inputs (a million raw dicts, their frame) are frozen out of the garbage collector before
anything is timed: a sync process never holds more than a few batches, and every full
collection walking the harness's million objects would be charged to the code under test.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar

import numpy as np
import pandas as pd
from sqlalchemy import Engine, text

from benchmarks._common import Records, Report, engine_for, rate, scratch_schema
from flows._common import BATCHES_AT_ONCE
from loop_sync.db import bulk_insert
from loop_sync.landing import content_hash
from loop_sync.load import UserPull, driver_values, held_results, upsert_results, write_batch
from loop_sync.normalize import normalize
from loop_sync.schema import RESULT_COLUMN_NAMES, biomarker_results, upgrade
from loop_sync.vault import utcnow

COPY_COLUMNS = [*RESULT_COLUMN_NAMES, "first_seen_at", "last_changed_at", "deleted_at"]
Batch = TypeVar("Batch")
WAREHOUSE_TABLES = (
    "biomarker_result_history",
    "biomarker_results",
    "raw_records",
    "rejects",
    "sync_state",
)


def normalized_frame(records: Records) -> tuple[pd.DataFrame, float]:
    """The records hashed and normalized once (seconds taken), for the write benchmarks."""
    users, flat = records.flat()
    started = time.perf_counter()
    hashes = [content_hash(record) for record in flat]
    result = normalize(users, flat, hashes)
    return result.results.drop_duplicates("result_id", keep="last"), time.perf_counter() - started


def copy_rows(frame: pd.DataFrame, now: datetime) -> list[tuple[Any, ...]]:
    """Rows in COPY_COLUMNS order, prepared before the COPY is timed."""
    columns = [driver_values(frame[name]) for name in RESULT_COLUMN_NAMES]
    n = len(frame)
    columns += [[now] * n, [now] * n, [None] * n]
    return list(zip(*columns, strict=True))


def binary_copy(engine: Engine, rows: Sequence[tuple[Any, ...]]) -> float:
    """Binary COPY of `rows` into biomarker_results in one transaction; seconds taken."""
    started = time.perf_counter()
    with engine.begin() as connection:
        bulk_insert(connection, biomarker_results, COPY_COLUMNS, rows)
    return time.perf_counter() - started


def half_changed(frame: pd.DataFrame) -> pd.DataFrame:
    """Every other row corrected: a new value, revision and content hash."""
    changed = frame.copy()
    every_other = np.arange(len(changed)) % 2 == 0
    changed.loc[every_other, "value_source"] = changed.loc[every_other, "value_source"] + 1.0
    changed.loc[every_other, "revision"] = changed.loc[every_other, "revision"] + 1
    changed.loc[every_other, "content_hash"] = (
        "z" + changed.loc[every_other, "content_hash"].str[1:]
    )
    return changed


def user_slices(frame: pd.DataFrame, batch_users: int) -> list[pd.DataFrame]:
    """The frame cut into batches of `batch_users` users, as `run_sync` writes them."""
    users = pd.unique(frame["user_id"])
    batches = []
    for start in range(0, len(users), batch_users):
        chosen = set(users[start : start + batch_users])
        batches.append(frame[frame["user_id"].isin(chosen)])
    return batches


def _in_writers(write: Callable[[Batch], object], batches: Sequence[Batch]) -> float:
    """`write` over the batches, BATCHES_AT_ONCE at a time as the flow writes; seconds."""
    started = time.perf_counter()
    with ThreadPoolExecutor(BATCHES_AT_ONCE) as writers:
        list(writers.map(write, batches))
    return time.perf_counter() - started


def upsert(engine: Engine, batches: Sequence[pd.DataFrame], now: datetime) -> float:
    """The product's results upsert (`load.upsert_results` after reading what is held for
    the batch's users), one transaction per batch; seconds."""

    def write(batch: pd.DataFrame) -> None:
        with engine.begin() as connection:
            held = held_results(connection, batch["user_id"].unique().tolist())
            upsert_results(connection, batch, held, now)

    return _in_writers(write, batches)


def end_to_end(engine: Engine, records: Records, batch_users: int, now: datetime) -> float:
    """`load.write_batch` on raw records (hash, land, normalize, upsert, state); seconds."""
    pulls = [UserPull(user, recs, complete=True) for user, recs in records.by_user.items()]
    batches = [pulls[start : start + batch_users] for start in range(0, len(pulls), batch_users)]
    return _in_writers(lambda batch: write_batch(engine, batch, run_id="bench", now=now), batches)


def _count(engine: Engine, table: str) -> int:
    with engine.connect() as connection:
        query = text(f"SELECT count(*) FROM {table}")  # noqa: S608 - our own table names
        return int(connection.execute(query).scalar_one())


def _empty_warehouse(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {', '.join(WAREHOUSE_TABLES)}"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text(f"VACUUM ANALYZE {', '.join(WAREHOUSE_TABLES)}"))


def run(
    report: Report,
    database: str,
    records: Records,
    *,
    batch_users: int,
    end_to_end_too: bool,
) -> None:
    """Priority 1 (COPY vs. upsert) and, if asked, priority 2 (raw records end to end)."""
    section = "write"
    frame, normalize_s = normalized_frame(records)
    n = len(frame)
    report.add(section, "rows (normalized, distinct result_id)", f"{n:,}")
    report.add(section, "hash + normalize, rows/s (in memory)", f"{rate(n, normalize_s):,.0f}")
    now = utcnow()
    rows = copy_rows(frame, now)
    batches = user_slices(half_changed(frame), batch_users)
    gc.collect()
    gc.freeze()  # the inputs above are the harness's, not the product's: see the docstring
    with scratch_schema(database) as (_, url):
        engine = engine_for(url)
        try:
            upgrade(engine)
            copy_s = binary_copy(engine, rows)
            copy_rate = rate(n, copy_s)
            report.add(
                section, "binary COPY into empty biomarker_results, rows/s", f"{copy_rate:,.0f}"
            )
            del rows
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(text("VACUUM ANALYZE biomarker_results"))
            upsert_s = upsert(engine, batches, utcnow())
            upsert_rate = rate(n, upsert_s)
            ratio = upsert_rate / copy_rate
            history = _count(engine, "biomarker_result_history")
            report.add(
                section,
                f"upsert, half changed, {batch_users} users/txn, {BATCHES_AT_ONCE} at once, rows/s",
                f"{upsert_rate:,.0f} ({ratio:.2f}x COPY; {history:,} to history)",
            )
            report.target(
                ratio >= 0.55, f"upsert of {n:,} rows, half changed: {ratio:.2f}x COPY >= 0.55"
            )
            if end_to_end_too:
                _empty_warehouse(engine)
                e2e_s = end_to_end(engine, records, batch_users, utcnow())
                total = records.count
                e2e_rate = rate(total, e2e_s)
                e2e_ratio = e2e_rate / copy_rate
                landed = _count(engine, "raw_records")
                report.add(
                    section,
                    f"raw -> normalized + landed + upserted, {BATCHES_AT_ONCE} at once, records/s",
                    f"{e2e_rate:,.0f} ({e2e_ratio:.2f}x COPY; {landed:,} landed)",
                )
                report.target(
                    e2e_ratio >= 0.30,
                    f"{total:,} raw records -> normalized + landed + upserted: "
                    f"{e2e_ratio:.2f}x COPY >= 0.30",
                )
        finally:
            engine.dispose()
