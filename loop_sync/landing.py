"""Raw landing: every distinct record exactly as Loop sent it, keyed by its content hash.

The hash is also how a re-sync recognises what it already has: a record whose hash is
already live in the warehouse (or already rejected) costs no normalization and no write.
Hashing is on the hot path of every sync, so the canonical text comes from orjson (about
5x the standard library). The few records orjson cannot write faithfully take the standard
library's path, written ASCII-only: lone surrogates (escaped, so the text can be encoded
and stored) and NaN and ±Infinity, which `lenient.read_lenient` reads as `NonFinite`. The
client keeps every record within the nesting orjson writes (see `loop_sync.client`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import orjson
from sqlalchemy import Connection, select

from loop_sync.db import bulk_insert
from loop_sync.schema import UNSTORABLE_TEXT, raw_records, varchar_length

_RAW_COLUMNS = ("user_id", "content_hash", "result_id", "payload", "fetched_at")
_RESULT_ID_LENGTH: Final = varchar_length(raw_records.c.result_id)


def canonical_json(record: Any) -> str:
    """One text per JSON value, whatever the key order Loop used, and faithful to it."""
    return _canonical(record).decode()


def content_hash(record: Any) -> str:
    return hashlib.sha256(_canonical(record)).hexdigest()


def _canonical(record: Any) -> bytes:
    """`canonical_json`, UTF-8 encoded: hashed as it comes, and decoded only for what is
    landed (a re-sync's records are mostly known already)."""
    try:
        return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # a lone surrogate, or a NonFinite
        return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def record_id(record: Any) -> str | None:
    """The record's Loop id when the warehouse can store it as one: a string of 1 to 255
    characters without NUL or a lone surrogate (normalize rejects the others). An ASCII
    id, Loop's usual, cannot hold a surrogate, so only the rest pay for the search."""
    if isinstance(record, dict):
        value = record.get("id")
        if (
            isinstance(value, str)
            and value
            and (_RESULT_ID_LENGTH is None or len(value) <= _RESULT_ID_LENGTH)
            and ("\x00" not in value if value.isascii() else not UNSTORABLE_TEXT.search(value))
        ):
            return value
    return None


@dataclass
class Fresh:
    """The records of a batch the warehouse has not seen, in pull order, hashed once; and
    the `record_id` of every record of each pull, fresh or not (`listed`, in the order of
    the pulls given to `triage`), for the soft deletion of what a pull no longer lists."""

    user_ids: list[str] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list)
    payloads: list[str] = field(default_factory=list)  # canonical JSON, as landed
    ids: list[str | None] = field(default_factory=list)  # record_id of each fresh record
    listed: list[list[str | None]] = field(default_factory=list)
    unchanged: int = 0  # records skipped because their hash is already known


def triage(pulls: Sequence[tuple[str, Sequence[Any]]], known: set[tuple[str, str]]) -> Fresh:
    """Hash each (user_id, records) pull's records and keep those not in `known`."""
    fresh = Fresh()
    for user_id, records in pulls:
        ids = list(map(record_id, records))
        fresh.listed.append(ids)
        for record, rid in zip(records, ids, strict=True):
            canonical = _canonical(record)
            digest = hashlib.sha256(canonical).hexdigest()
            if (user_id, digest) in known:
                fresh.unchanged += 1
                continue
            fresh.user_ids.append(user_id)
            fresh.records.append(record)
            fresh.hashes.append(digest)
            fresh.payloads.append(canonical.decode())
            fresh.ids.append(rid)
    return fresh


def land(connection: Connection, fresh: Fresh, fetched_at: datetime) -> int:
    """Land the records whose content these users never had before; returns how many.

    The caller holds the users' lock (`load.write_batch`), so the landed hashes read here
    stay true until the COPY: no conflict handling is needed, which keeps it a plain COPY.
    """
    if not fresh.records:
        return 0
    users = sorted(set(fresh.user_ids))
    query = select(raw_records.c.user_id, raw_records.c.content_hash).where(
        raw_records.c.user_id.in_(users)
    )
    seen: set[tuple[str, str]] = {(row[0], row[1]) for row in connection.execute(query)}
    rows = []
    for user_id, rid, digest, payload in zip(
        fresh.user_ids, fresh.ids, fresh.hashes, fresh.payloads, strict=True
    ):
        if (user_id, digest) not in seen:
            seen.add((user_id, digest))
            rows.append((user_id, digest, rid, payload, fetched_at))
    bulk_insert(connection, raw_records, _RAW_COLUMNS, rows)
    return len(rows)
