"""Raw landing: every distinct record exactly as Loop sent it, keyed by its content hash.

The hash is also how a re-sync recognises what it already has: a record whose hash is
already live in the warehouse (or already rejected) costs no normalization and no write.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select

from loop_sync.db import dialect_insert
from loop_sync.schema import biomarker_results, raw_records, rejects


def canonical_json(record: Any) -> str:
    """One text per JSON value, whatever the key order Loop used."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(record: Any) -> str:
    return hashlib.sha256(canonical_json(record).encode()).hexdigest()


def record_id(record: Any) -> str | None:
    """The record's Loop id when it has a usable one."""
    if isinstance(record, dict):
        value = record.get("id")
        if isinstance(value, str) and value:
            return value
    return None


@dataclass(frozen=True)
class Landed:
    """A user's pulled records, hashed; `fresh` are those the warehouse has not seen."""

    user_id: str
    hashes: list[str]
    fresh: list[int]  # positions in the pulled list


def known_hashes(connection: Connection, user_ids: Sequence[str]) -> set[tuple[str, str]]:
    """(user_id, content_hash) already live in results or already rejected."""
    live = select(biomarker_results.c.user_id, biomarker_results.c.content_hash).where(
        biomarker_results.c.user_id.in_(user_ids), biomarker_results.c.deleted_at.is_(None)
    )
    rejected = select(rejects.c.user_id, rejects.c.content_hash).where(
        rejects.c.user_id.in_(user_ids)
    )
    return {(row[0], row[1]) for row in connection.execute(live.union(rejected))}


def triage(user_id: str, records: Sequence[Any], known: set[tuple[str, str]]) -> Landed:
    hashes = [content_hash(record) for record in records]
    fresh = [i for i, digest in enumerate(hashes) if (user_id, digest) not in known]
    return Landed(user_id, hashes, fresh)


def land(
    connection: Connection,
    rows: Sequence[tuple[str, str, Any]],
    fetched_at: datetime,
) -> None:
    """Insert (user_id, content_hash, record) rows not landed before; repeats are no-ops."""
    if not rows:
        return
    statement = dialect_insert(connection, raw_records).on_conflict_do_nothing(
        index_elements=["user_id", "content_hash"]
    )
    connection.execute(
        statement,
        [
            {
                "user_id": user,
                "content_hash": digest,
                "result_id": record_id(record),
                "payload": canonical_json(record),
                "fetched_at": fetched_at,
            }
            for user, digest, record in rows
        ],
    )
