"""The warehouse write: one transaction per batch of users.

Raw landing, normalized rows, corrections into history, soft deletions, rejects and each
user's sync state all commit together, so a crash anywhere leaves either the batch or
nothing, and a re-run converges on the same warehouse. Only what changed is written:
records whose content hash is already live are skipped before normalization.

The batch starts by locking its users (PostgreSQL: their `grants` rows, FOR UPDATE) and
reading what the warehouse holds for them, in one query by user. Every decision (new,
corrected, restored, stale, gone) is then made in memory against that snapshot, which the
lock keeps true, and the rows go to the database by COPY into a staging table followed by
set-based statements: the write path runs near COPY speed rather than statement speed.

A result id belongs to the first user it was written for. Another user's record with the
same id (Loop listing one result for two people: bad data) is rejected, `HELD_ELSEWHERE`,
rather than taking the row over, which would hand one person's result to another; the
reject keeps the record, so nothing is lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Engine,
    MetaData,
    Row,
    Table,
    func,
    literal,
    null,
    select,
    true,
    update,
)

from loop_sync.db import bulk_insert, dialect_insert
from loop_sync.landing import Fresh, land, triage
from loop_sync.normalize import REJECT_COLUMNS, normalize
from loop_sync.schema import (
    RESULT_COLUMN_NAMES,
    biomarker_result_history,
    biomarker_results,
    grants,
    rejects,
    sync_state,
)

CHUNK = 5_000  # ids per IN (...) list: well under SQLite's parameter limit
HELD_ELSEWHERE = "id is held by another user"  # a reject reason (see `upsert_results`)
_STAGED = (*RESULT_COLUMN_NAMES, "corrected")


@dataclass(frozen=True)
class UserPull:
    """What one user's sync fetched: raw records, whether the pull was complete, and the
    digest of a complete pull's pages (`FetchResult.digest`). `unchanged`: the client
    found the pull to be the last committed one byte for byte and did not parse it, so
    `records` is empty (`FetchResult.unchanged`); only a sync's write may take it."""

    user_id: str
    records: Sequence[Any]
    complete: bool
    digest: str | None = None
    unchanged: bool = False


@dataclass
class LoadCounts:
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    rejected: int = 0
    unchanged: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # hash, normalize, db_write


# What the warehouse holds of a result, as far as the write decisions need it: the row as
# `held_results` fetched it (result_id, user_id, content_hash, revision, live), unwrapped
# into nothing else, since a batch holds tens of thousands of them.
Held = Row[tuple[str, str, str, int, bool]]


def held_results(connection: Connection, user_ids: Sequence[str]) -> dict[str, Held]:
    """result_id → what is held, for every result of these users (live or deleted)."""
    held: dict[str, Held] = {}
    for chunk in _chunks(user_ids):
        query = select(
            biomarker_results.c.result_id,
            biomarker_results.c.user_id,
            biomarker_results.c.content_hash,
            biomarker_results.c.revision,
            biomarker_results.c.deleted_at.is_(None).label("live"),
        ).where(biomarker_results.c.user_id.in_(chunk))
        held.update({row.result_id: row for row in connection.execute(query).all()})
    return held


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
    A user whose complete pull has the digest of their last committed one changed
    nothing: only their sync state is written.
    """
    counts = LoadCounts()
    if not pulls:
        return counts
    started = time.perf_counter()
    with engine.begin() as connection:
        _plan_by_key(connection)
        _lock_users(connection, sorted({pull.user_id for pull in pulls}))
        changed, unchanged = pulls, list[UserPull]()
        if record_state and not force:
            changed, unchanged, counts.unchanged = _changed(connection, pulls)
        elif any(pull.unchanged for pull in pulls):
            msg = "an unparsed (unchanged) pull can only be written with its sync state"
            raise ValueError(msg)
        user_ids = sorted({pull.user_id for pull in changed})
        held = held_results(connection, user_ids)
        known = set() if force else _known_hashes(connection, user_ids, held)
        hashing = time.perf_counter()
        fresh = triage([(pull.user_id, pull.records) for pull in changed], known)
        counts.unchanged += fresh.unchanged
        normalizing = writing = time.perf_counter()
        if fresh.records:  # normalizing nothing still costs pandas ~10 ms: a re-sync's batch
            normalized = normalize(fresh.user_ids, fresh.records, fresh.hashes)
            writing = time.perf_counter()
            land(connection, fresh, now)
            written = upsert_results(connection, normalized.results, held, now, force=force)
            counts.inserted, counts.updated = written.inserted, written.updated
            refused = normalized.rejects
            if written.held_elsewhere:
                refused = pd.concat([refused, _held_elsewhere(fresh, written.held_elsewhere)])
            counts.rejected = _upsert_rejects(connection, refused, now)
        listed = zip(changed, fresh.listed, strict=True)
        complete = [(pull.user_id, ids) for pull, ids in listed if pull.complete]
        counts.deleted = _soft_delete(connection, complete, held, now)
        if record_state:
            _record_success(connection, changed, run_id=run_id, now=now)
            _record_unchanged(connection, unchanged, run_id=run_id, now=now)
    finished = time.perf_counter()
    counts.seconds = {
        "hash": normalizing - hashing,
        "normalize": writing - normalizing,
        "db_write": (hashing - started) + (finished - writing),
    }
    return counts


def _plan_by_key(connection: Connection) -> None:
    """PostgreSQL: every statement of the write reads by key, so use the indexes even
    without statistics (a warehouse filling up for the first time, before autovacuum has
    analyzed it, was scanned whole for every batch), and skip JIT, which cost ~120 ms a
    statement here for no gain."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
        connection.exec_driver_sql("SET LOCAL jit = off")


def _lock_users(connection: Connection, user_ids: Sequence[str]) -> None:
    """Writers of the same users take turns (a nightly sync and a backfill, say), so the
    snapshot read next stays true until commit. SQLite writes one at a time anyway.
    `user_ids` are sorted, so two writers always lock in the same order."""
    if connection.dialect.name != "postgresql":
        return
    for chunk in _chunks(user_ids):
        query = select(grants.c.user_id).where(grants.c.user_id.in_(chunk))
        connection.execute(query.order_by(grants.c.user_id).with_for_update()).all()


def _records(pulls: Sequence[UserPull]) -> int:
    return sum(len(pull.records) for pull in pulls)


def _changed(
    connection: Connection, pulls: Sequence[UserPull]
) -> tuple[list[UserPull], list[UserPull], int]:
    """The pulls that differ from the user's last committed complete pull, the rest, and
    how many records the rest hold (for an unparsed pull: the user's live results).

    An unparsed pull is unchanged even if the stored digest moved since it was read: a
    newer pull or a purge committed meanwhile, and either way it has nothing to add.
    """
    stored = _sync_states(connection, [pull.user_id for pull in pulls])
    changed: list[UserPull] = []
    unchanged: list[UserPull] = []
    records = 0
    for pull in pulls:
        digest, live = stored.get(pull.user_id, (None, 0))
        if pull.unchanged:
            unchanged.append(pull)
            records += live or 0
        elif pull.digest is not None and digest == pull.digest:
            unchanged.append(pull)
            records += len(pull.records)
        else:
            changed.append(pull)
    return changed, unchanged, records


def _sync_states(
    connection: Connection, user_ids: Sequence[str]
) -> dict[str, tuple[str | None, int | None]]:
    """user_id → (pull_digest, results_live) as committed."""
    stored: dict[str, tuple[str | None, int | None]] = {}
    for chunk in _chunks(user_ids):
        query = select(sync_state.c.user_id, sync_state.c.pull_digest, sync_state.c.results_live)
        rows = connection.execute(query.where(sync_state.c.user_id.in_(chunk))).all()
        stored.update((row[0], (row[1], row[2])) for row in rows)
    return stored


def last_digests(engine: Engine, user_ids: Sequence[str]) -> dict[str, str]:
    """user_id → the digest of their last committed complete pull, for those that have one
    (`LoopClient.fetch_results(last_digest=…)`)."""
    with engine.connect() as connection:
        stored = _sync_states(connection, user_ids)
    return {user_id: digest for user_id, (digest, _) in stored.items() if digest}


def _known_hashes(
    connection: Connection, user_ids: Sequence[str], held: dict[str, Held]
) -> set[tuple[str, str]]:
    """(user_id, content_hash) already live in results or already rejected: nothing to do."""
    known = {(h.user_id, h.content_hash) for h in held.values() if h.live}
    for chunk in _chunks(user_ids):
        query = select(rejects.c.user_id, rejects.c.content_hash).where(
            rejects.c.user_id.in_(chunk)
        )
        known.update((row[0], row[1]) for row in connection.execute(query))
    return known


def _chunks(values: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), CHUNK):
        yield values[start : start + CHUNK]


def driver_values(series: pd.Series) -> list[Any]:
    """A column as the driver takes it: None for missing, aware UTC datetimes for times.

    Done per column with numpy rather than per cell: this runs for every row written.
    """
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        moments = pd.DatetimeIndex(series).tz_convert(UTC).to_pydatetime()  # in C
        moments[series.isna().to_numpy()] = None
        return moments.tolist()
    if series.dtype == np.float64:
        numbers = series.to_numpy()
        boxed = numbers.astype(object)
        boxed[np.isnan(numbers)] = None
        return boxed.tolist()
    return series.tolist()


def _upsert_rejects(connection: Connection, frame: pd.DataFrame, now: datetime) -> int:
    if frame.empty:
        return 0
    names = ["user_id", "content_hash", "result_id", "reason", "payload"]
    rows = [
        {**dict(zip(names, values, strict=True)), "first_seen_at": now, "last_seen_at": now}
        for values in zip(*(driver_values(frame[name]) for name in names), strict=True)
    ]
    statement = dialect_insert(connection, rejects)
    connection.execute(
        statement.on_conflict_do_update(
            index_elements=["user_id", "content_hash"],
            set_={"last_seen_at": statement.excluded.last_seen_at},
        ),
        rows,
    )
    return len(rows)


class Written(NamedTuple):
    inserted: int
    updated: int
    held_elsewhere: set[tuple[str, str]]  # (user_id, content_hash): see `_held_elsewhere`


def upsert_results(
    connection: Connection,
    frame: pd.DataFrame,
    held: dict[str, Held],
    now: datetime,
    *,
    force: bool = False,
) -> Written:
    """Insert new results; replace corrected or restore deleted ones, keeping history.

    `held` is `held_results` for the frame's users. A row whose revision is older than the
    one held is stale and skipped (design: only a higher revision replaces); one identical
    to a live row is skipped unless `force`d (a replay). A result id belongs to the user it
    was first written for: another user's row with that id is not written but returned in
    `held_elsewhere` (the upsert's own conflict check finds ids held outside the batch).
    """
    if frame.empty:
        return Written(0, 0, set())
    first_lister = frame.groupby("result_id", sort=False)["user_id"].transform("first")
    duplicate = frame["user_id"] != first_lister  # another user of the batch listed it first
    elsewhere = set(zip(frame["user_id"][duplicate], frame["content_hash"][duplicate], strict=True))
    frame = frame[~duplicate].drop_duplicates("result_id", keep="last")
    keep = np.zeros(len(frame), dtype=bool)
    corrected = np.zeros(len(frame), dtype=bool)
    new = np.zeros(len(frame), dtype=bool)
    for position, (result_id, user_id, digest, revision) in enumerate(
        zip(
            frame["result_id"],
            frame["user_id"],
            frame["content_hash"],
            frame["revision"],
            strict=True,
        )
    ):
        current = held.get(result_id)
        if current is None:
            new[position] = keep[position] = True
        elif current.user_id != user_id:
            elsewhere.add((user_id, digest))
        elif revision >= current.revision:
            corrected[position] = digest != current.content_hash
            keep[position] = corrected[position] or not current.live or force
    if not keep.any():
        return Written(0, 0, elsewhere)
    columns = [driver_values(frame[name][keep]) for name in RESULT_COLUMN_NAMES]
    columns.append(corrected[keep].tolist())
    _stage.create(connection)
    bulk_insert(connection, _stage, _STAGED, zip(*columns, strict=True))
    if corrected.any():
        _keep_history(connection, _stage, now)
    kept, added = int(keep.sum()), int(new.sum())
    upsert = _upsert_from(connection, _stage, now, force=force)
    # SQLAlchemy keeps an INSERT's rowcount only when asked; without it, it reads -1.
    written = connection.execute(upsert, execution_options={"preserve_rowcount": True}).rowcount
    taken: set[tuple[str, str]] = set()
    if written < kept:  # some ids new to these users are another user's: which (bad data)
        taken = _held_by_others(connection, _stage)
        elsewhere |= taken
    if connection.dialect.name != "postgresql":
        _stage.drop(connection)  # PostgreSQL drops it at commit; a rollback undoes it anyway
    return Written(added - len(taken), kept - added, elsewhere)


def _held_by_others(connection: Connection, stage: Table) -> set[tuple[str, str]]:
    """(user_id, content_hash) of the staged rows whose result id another user holds,
    which the upsert left alone. Only asked when it wrote fewer rows than were staged:
    a RETURNING of every written id cost each batch a 20k-row fetch to find none."""
    held = biomarker_results
    query = (
        select(stage.c.user_id, stage.c.content_hash)
        .join(held, held.c.result_id == stage.c.result_id)
        .where(held.c.user_id != stage.c.user_id)
    )
    return {(row[0], row[1]) for row in connection.execute(query)}


def _held_elsewhere(fresh: Fresh, refused: set[tuple[str, str]]) -> pd.DataFrame:
    """Rejects for the records whose id belongs to another user: Loop listing one result
    for two people is bad data, and taking the row over would hand one person's result
    to another. The reject keeps the record as it was landed, so nothing is lost."""
    rows = [
        (user_id, digest, rid, HELD_ELSEWHERE, payload)
        for user_id, rid, digest, payload in zip(
            fresh.user_ids, fresh.ids, fresh.hashes, fresh.payloads, strict=True
        )
        if (user_id, digest) in refused
    ]
    return pd.DataFrame(rows, columns=list(REJECT_COLUMNS), dtype=object)


# A temporary table shaped like the result columns, plus whether a row is a correction;
# created (and, on PostgreSQL, dropped at commit) by each transaction that writes results.
_stage = Table(
    "stage_results",
    MetaData(),
    *(Column(name, biomarker_results.c[name].type) for name in RESULT_COLUMN_NAMES),
    Column("corrected", Boolean, nullable=False),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DROP",
)


def _keep_history(connection: Connection, stage: Table, now: datetime) -> None:
    """The held version of each corrected row, before the upsert replaces it."""
    held = biomarker_results
    corrected = select(stage.c.result_id).where(stage.c.corrected)
    connection.execute(
        biomarker_result_history.insert().from_select(
            [*RESULT_COLUMN_NAMES, "superseded_at"],
            select(
                *(held.c[name] for name in RESULT_COLUMN_NAMES),
                literal(now, biomarker_result_history.c.superseded_at.type),
            ).where(held.c.result_id.in_(corrected)),
        )
    )


def _upsert_from(connection: Connection, stage: Table, now: datetime, *, force: bool) -> Any:
    """INSERT … SELECT FROM the stage ON CONFLICT (result_id) DO UPDATE, where the row is
    the same user's and changed or was deleted (always, when `force`d by a replay)."""
    moment = literal(now, biomarker_results.c.last_changed_at.type)
    source = select(*(stage.c[name] for name in RESULT_COLUMN_NAMES), moment, moment, null()).where(
        true()
    )  # SQLite needs a WHERE to parse INSERT … SELECT … ON CONFLICT
    statement = dialect_insert(connection, biomarker_results).from_select(
        [*RESULT_COLUMN_NAMES, "first_seen_at", "last_changed_at", "deleted_at"], source
    )
    changed = {name: statement.excluded[name] for name in RESULT_COLUMN_NAMES}
    own = biomarker_results.c.user_id == statement.excluded.user_id  # never another's row
    return statement.on_conflict_do_update(
        index_elements=["result_id"],
        set_={
            **changed,
            "last_changed_at": statement.excluded.last_changed_at,
            "deleted_at": None,
        },
        where=own
        if force
        else own
        & (
            (biomarker_results.c.content_hash != statement.excluded.content_hash)
            | biomarker_results.c.deleted_at.is_not(None)
        ),
    )


def _soft_delete(
    connection: Connection,
    complete: Sequence[tuple[str, list[str | None]]],
    held: dict[str, Held],
    now: datetime,
) -> int:
    """Results a complete pull no longer lists are marked deleted (restored if they return).

    `complete` holds each complete pull's user and the `record_id` of its every record. A
    pull holding a record without a usable id (malformed, hence rejected) proves nothing
    about absence: that record may be any of the user's results, so it deletes nothing.
    """
    listed = [(user_id, ids) for user_id, ids in complete if all(ids)]
    if not listed:
        return 0
    users = {user_id for user_id, _ in listed}
    seen = {(user_id, rid) for user_id, ids in listed for rid in ids}  # by user: see HELD_ELSEWHERE
    gone = [
        rid
        for rid, current in held.items()
        if current.live and current.user_id in users and (current.user_id, rid) not in seen
    ]
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
    if not pulls:
        return
    live: dict[str, int] = {}
    for chunk in _chunks([pull.user_id for pull in pulls]):
        live.update(
            connection.execute(
                select(biomarker_results.c.user_id, func.count())
                .where(
                    biomarker_results.c.user_id.in_(chunk),
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
            "pull_digest": pull.digest if pull.complete else None,
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
                "pull_digest": excluded.pull_digest,
                "last_status": excluded.last_status,
                "last_error": None,
                "consecutive_failures": 0,
                "last_run_id": excluded.last_run_id,
            },
        ),
        rows,
    )


def _record_unchanged(
    connection: Connection, pulls: Sequence[UserPull], *, run_id: str, now: datetime
) -> None:
    """Users whose complete pull had their stored digest: a success that changed nothing,
    so their digest and live count stay as they are (a re-sync writes only this)."""
    for chunk in _chunks([pull.user_id for pull in pulls]):
        connection.execute(
            update(sync_state)
            .where(sync_state.c.user_id.in_(chunk))
            .values(
                last_attempt_at=now,
                last_success_at=now,
                last_complete_at=now,
                last_status="ok",
                last_error=None,
                consecutive_failures=0,
                last_run_id=run_id,
            )
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
