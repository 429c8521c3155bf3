"""Backfills an operator runs by hand: refetch from Loop, or replay from the raw landing.

Both write only results collected inside the window, delete nothing (a windowed pull says
nothing about results outside it) and leave each user's `sync_state` alone, so a backfill
never moves a user's live sync state backwards. Replay makes no API call: it re-normalizes
the latest landed version of each record, e.g. after a catalog or normalizer change.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Any, Literal

from sqlalchemy import Engine, func, select

from loop_sync.lenient import read_lenient
from loop_sync.load import UserPull, write_batch
from loop_sync.schema import biomarker_results, raw_records
from loop_sync.services import Services
from loop_sync.sync import SyncCounts, sync_users_now
from loop_sync.vault import utcnow

Mode = Literal["refetch", "replay"]


def in_window(record: Any, start: date | None, end: date | None) -> bool:
    """Whether a raw record was collected in [start, end] (UTC days; naive times by date)."""
    if start is None and end is None:
        return True
    text = record.get("collected_at") if isinstance(record, dict) else None
    if not isinstance(text, str):
        return False
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    day = moment.astimezone(UTC).date() if moment.tzinfo else moment.date()
    return (start is None or day >= start) and (end is None or day <= end)


def backfill_users(
    services: Services,
    run_id: str,
    user_ids: Sequence[str],
    *,
    start: date | None,
    end: date | None,
    mode: Mode,
    concurrency: int | None = None,
) -> SyncCounts:
    """Backfill these users' results collected in [start, end] within run `run_id`."""
    if start is not None and end is not None and start > end:
        msg = f"the window starts ({start}) after it ends ({end})"
        raise ValueError(msg)
    if mode == "replay":
        return _replay(services.engine, run_id, user_ids, start, end)

    def trim(pull: UserPull) -> UserPull:
        kept = [r for r in pull.records if in_window(r, start, end)]
        return UserPull(pull.user_id, kept, complete=False)

    return sync_users_now(
        services, run_id, user_ids, concurrency=concurrency, keep=trim, record_state=False
    )


def _replay(
    engine: Engine, run_id: str, user_ids: Sequence[str], start: date | None, end: date | None
) -> SyncCounts:
    counts = SyncCounts(users_attempted=len(user_ids))
    for user_id in user_ids:
        pull = UserPull(user_id, _latest_landed(engine, user_id, start, end), complete=False)
        loaded = write_batch(
            engine, [pull], run_id=run_id, now=utcnow(), record_state=False, force=True
        )
        counts.add(loaded)
        counts.users_succeeded += 1
    return counts


def _latest_landed(engine: Engine, user_id: str, start: date | None, end: date | None) -> list[Any]:
    """The newest landed version of each of the user's live results, in the window."""
    newest = (
        select(raw_records.c.result_id, func.max(raw_records.c.fetched_at).label("fetched_at"))
        .where(raw_records.c.user_id == user_id, raw_records.c.result_id.is_not(None))
        .group_by(raw_records.c.result_id)
        .subquery()
    )
    deleted = select(biomarker_results.c.result_id).where(
        biomarker_results.c.user_id == user_id, biomarker_results.c.deleted_at.is_not(None)
    )
    query = (
        select(raw_records.c.payload)
        .join(
            newest,
            (newest.c.result_id == raw_records.c.result_id)
            & (newest.c.fetched_at == raw_records.c.fetched_at),
        )
        .where(raw_records.c.user_id == user_id, raw_records.c.result_id.not_in(deleted))
        .order_by(raw_records.c.result_id)
    )
    with engine.connect() as connection:
        records = [read_lenient(payload) for payload in connection.execute(query).scalars()]
    return [record for record in records if in_window(record, start, end)]
