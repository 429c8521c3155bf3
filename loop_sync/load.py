"""The warehouse write: one transaction per batch of users.

Raw landing, normalized rows, corrections into history, soft deletions, rejects and each
user's sync state all commit together, so a crash anywhere leaves either the batch or
nothing, and a re-run converges on the same warehouse. Only what changed is written:
records whose content hash is already live are skipped before normalization.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import (
    Column,
    Connection,
    Engine,
    MetaData,
    Table,
    func,
    literal,
    select,
    update,
)

from loop_sync.db import dialect_insert
from loop_sync.landing import known_hashes, land, record_id, triage
from loop_sync.normalize import normalize
from loop_sync.schema import (
    RESULT_COLUMN_NAMES,
    biomarker_result_history,
    biomarker_results,
    rejects,
    sync_state,
)

CHUNK = 5_000  # ids per IN (...) list: well under SQLite's parameter limit


@dataclass(frozen=True)
class UserPull:
    """What one user's sync fetched: raw records, and whether the pull was complete."""

    user_id: str
    records: Sequence[Any]
    complete: bool


@dataclass
class LoadCounts:
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    rejected: int = 0
    unchanged: int = 0


def write_batch(
    engine: Engine,
    pulls: Sequence[UserPull],
    *,
    run_id: str,
    now: datetime,
    record_state: bool = True,
    force: bool = False,
) -> LoadCounts:
    """Write a batch of users' pulls and their sync state in one transaction.

    A backfill passes `record_state=False`, so it never moves a user's live sync state,
    and a replay passes `force=True` to re-normalize records whose raw content is known.
    """
    counts = LoadCounts()
    if not pulls:
        return counts
    user_ids = [pull.user_id for pull in pulls]
    with engine.begin() as connection:
        known = set() if force else known_hashes(connection, user_ids)
        fresh_users: list[str] = []
        fresh_records: list[Any] = []
        fresh_hashes: list[str] = []
        for pull in pulls:
            landed = triage(pull.user_id, pull.records, known)
            counts.unchanged += len(pull.records) - len(landed.fresh)
            for position in landed.fresh:
                fresh_users.append(pull.user_id)
                fresh_records.append(pull.records[position])
                fresh_hashes.append(landed.hashes[position])
        land(connection, list(zip(fresh_users, fresh_hashes, fresh_records, strict=True)), now)
        normalized = normalize(fresh_users, fresh_records, fresh_hashes)
        counts.rejected = _upsert_rejects(connection, normalized.rejects, now)
        counts.inserted, counts.updated = _upsert_results(
            connection, normalized.results, now, force=force
        )
        counts.deleted = _soft_delete(connection, [p for p in pulls if p.complete], now)
        if record_state:
            _record_success(connection, pulls, run_id=run_id, now=now)
    return counts


def _chunks(values: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), CHUNK):
        yield values[start : start + CHUNK]


def _rows(frame: pd.DataFrame, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Records for the driver: missing values as None, timestamps as datetimes."""
    subset = frame[list(columns)].astype(object)
    return subset.where(frame[list(columns)].notna(), None).to_dict("records")  # type: ignore[return-value]


def _upsert_rejects(connection: Connection, frame: pd.DataFrame, now: datetime) -> int:
    if frame.empty:
        return 0
    rows = _rows(frame, ["user_id", "content_hash", "result_id", "reason", "payload"])
    for row in rows:
        row["first_seen_at"] = row["last_seen_at"] = now
    statement = dialect_insert(connection, rejects)
    connection.execute(
        statement.on_conflict_do_update(
            index_elements=["user_id", "content_hash"],
            set_={"last_seen_at": statement.excluded.last_seen_at},
        ),
        rows,
    )
    return len(rows)


def _upsert_results(
    connection: Connection, frame: pd.DataFrame, now: datetime, *, force: bool = False
) -> tuple[int, int]:
    """Insert new results; replace changed or restore deleted ones, keeping history."""
    if frame.empty:
        return 0, 0
    frame = frame.drop_duplicates("result_id", keep="last")
    current: dict[str, tuple[str, int]] = {}
    for chunk in _chunks(frame["result_id"].tolist()):
        query = select(
            biomarker_results.c.result_id,
            biomarker_results.c.content_hash,
            biomarker_results.c.revision,
        ).where(biomarker_results.c.result_id.in_(chunk))
        current.update((row[0], (row[1], row[2])) for row in connection.execute(query))
    # An older revision than the one held is stale (design: only a higher one replaces).
    held = frame["result_id"].map({rid: revision for rid, (_, revision) in current.items()})
    frame = frame[~(frame["revision"] < held)]  # NaN (not held yet) compares False
    if frame.empty:
        return 0, 0
    incoming = dict(zip(frame["result_id"], frame["content_hash"], strict=True))
    existing = [rid for rid in incoming if rid in current]
    corrected = [rid for rid in existing if incoming[rid] != current[rid][0]]
    _keep_history(connection, corrected, now)
    rows = _rows(frame, RESULT_COLUMN_NAMES)
    for row in rows:
        row["first_seen_at"] = row["last_changed_at"] = now
        row["deleted_at"] = None
    if connection.dialect.name == "postgresql":
        _copy_upsert(connection, rows, force=force)
    else:
        connection.execute(_upsert_statement(connection, biomarker_results, force=force), rows)
    return len(incoming) - len(existing), len(existing)


def _upsert_statement(connection: Connection, source: Any, *, force: bool = False) -> Any:
    """ON CONFLICT (result_id) DO UPDATE … WHERE the row changed or was deleted (always,
    when `force`d by a replay)."""
    statement = dialect_insert(connection, biomarker_results)
    if source is not biomarker_results:
        columns = [*RESULT_COLUMN_NAMES, "first_seen_at", "last_changed_at", "deleted_at"]
        statement = statement.from_select(columns, select(*(source.c[c] for c in columns)))
    changed = {name: statement.excluded[name] for name in RESULT_COLUMN_NAMES}
    return statement.on_conflict_do_update(
        index_elements=["result_id"],
        set_={
            **changed,
            "last_changed_at": statement.excluded.last_changed_at,
            "deleted_at": None,
        },
        where=None
        if force
        else (biomarker_results.c.content_hash != statement.excluded.content_hash)
        | biomarker_results.c.deleted_at.is_not(None),
    )


def _copy_upsert(connection: Connection, rows: list[dict[str, Any]], *, force: bool) -> None:
    """PostgreSQL: COPY into a temp staging table, then one INSERT … ON CONFLICT."""
    columns = [*RESULT_COLUMN_NAMES, "first_seen_at", "last_changed_at", "deleted_at"]
    stage = Table(
        "stage_results",
        MetaData(),
        *(Column(name, biomarker_results.c[name].type) for name in columns),
        prefixes=["TEMPORARY"],
        postgresql_on_commit="DROP",
    )
    stage.create(connection)
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    with cursor.copy(f"COPY stage_results ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row([row[name] for name in columns])
    connection.execute(_upsert_statement(connection, stage, force=force))


def _keep_history(connection: Connection, result_ids: Sequence[str], now: datetime) -> None:
    columns = [biomarker_results.c[name] for name in RESULT_COLUMN_NAMES]
    for chunk in _chunks(result_ids):
        connection.execute(
            biomarker_result_history.insert().from_select(
                [*RESULT_COLUMN_NAMES, "superseded_at"],
                select(*columns, literal(now, biomarker_result_history.c.superseded_at.type)).where(
                    biomarker_results.c.result_id.in_(chunk)
                ),
            )
        )


def _soft_delete(connection: Connection, complete: Sequence[UserPull], now: datetime) -> int:
    """Results a complete pull no longer lists are marked deleted (restored if they return).

    A pull holding a record without a usable id (malformed, hence rejected) proves nothing
    about absence: that record may be any of the user's results, so it deletes nothing.
    """
    complete = [pull for pull in complete if all(map(record_id, pull.records))]
    if not complete:
        return 0
    seen = {rid for pull in complete for rid in map(record_id, pull.records) if rid}
    live = connection.execute(
        select(biomarker_results.c.result_id).where(
            biomarker_results.c.user_id.in_([pull.user_id for pull in complete]),
            biomarker_results.c.deleted_at.is_(None),
        )
    ).scalars()
    gone = [rid for rid in live if rid not in seen]
    for chunk in _chunks(gone):
        connection.execute(
            update(biomarker_results)
            .where(biomarker_results.c.result_id.in_(chunk))
            .values(deleted_at=now, last_changed_at=now)
        )
    return len(gone)


def _record_success(
    connection: Connection, pulls: Sequence[UserPull], *, run_id: str, now: datetime
) -> None:
    live: dict[str, int] = dict(
        connection.execute(
            select(biomarker_results.c.user_id, func.count())
            .where(
                biomarker_results.c.user_id.in_([pull.user_id for pull in pulls]),
                biomarker_results.c.deleted_at.is_(None),
            )
            .group_by(biomarker_results.c.user_id)
        ).all()
    )
    rows = [
        {
            "user_id": pull.user_id,
            "last_attempt_at": now,
            "last_success_at": now,
            "last_complete_at": now if pull.complete else None,
            "results_live": live.get(pull.user_id, 0),
            "last_status": "ok",
            "last_error": None,
            "consecutive_failures": 0,
            "last_run_id": run_id,
        }
        for pull in pulls
    ]
    statement = dialect_insert(connection, sync_state)
    excluded = statement.excluded
    connection.execute(
        statement.on_conflict_do_update(
            index_elements=["user_id"],
            set_={
                "last_attempt_at": excluded.last_attempt_at,
                "last_success_at": excluded.last_success_at,
                "last_complete_at": func.coalesce(
                    excluded.last_complete_at, sync_state.c.last_complete_at
                ),
                "results_live": excluded.results_live,
                "last_status": excluded.last_status,
                "last_error": None,
                "consecutive_failures": 0,
                "last_run_id": excluded.last_run_id,
            },
        ),
        rows,
    )


def record_failure(
    engine: Engine, user_id: str, *, status: str, error: str, run_id: str, now: datetime
) -> None:
    """A user whose sync failed: nothing else of theirs is written, the reason is kept."""
    with engine.begin() as connection:
        statement = dialect_insert(connection, sync_state)
        connection.execute(
            statement.values(
                user_id=user_id,
                last_attempt_at=now,
                last_status=status,
                last_error=error,
                consecutive_failures=1,
                last_run_id=run_id,
            ).on_conflict_do_update(
                index_elements=["user_id"],
                set_={
                    "last_attempt_at": now,
                    "last_status": status,
                    "last_error": error,
                    "consecutive_failures": sync_state.c.consecutive_failures + 1,
                    "last_run_id": run_id,
                },
            )
        )
