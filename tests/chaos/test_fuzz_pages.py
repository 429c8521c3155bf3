"""Generated Loop pages, served over loopback HTTP, pulled by the real client and written to
a real warehouse (SQLite; PostgreSQL in a fresh schema with a smaller budget).

A listing is one user's pages of results. Listings come in three kinds:

- valid: records with the documented fields and the optional ones (loinc, value_text such
  as "<0.5", ">1000" or "Positive", lab, updated_at, revision), unknown extra fields, and
  `results` instead of `data` as the array key;
- invalid: records with one thing wrong (a wrong type, a missing field, a null or
  non-string id, NaN or Infinity, a huge number or integer, a bad or out-of-range date, a
  naive timestamp, a bad revision, an unknown unit or code) and ids repeated on a page;
- adversarial: nesting as deep as a page may go (254 levels), huge strings, NUL and lone
  surrogates, records that are not objects, a `total` that lies, and pages that cannot be
  used at all (not an object, `data` not a list, no integer total, truncated JSON, HTML,
  undecodable bytes, nesting deeper than 254 levels).

Each listing is served by a tiny Starlette app (`LoopStub`) on 127.0.0.1 through
`BackgroundServer`; nothing in httpx or the client is replaced. The test knows what each
record must become (a result row, a reject with a given reason, or either) and what the
client must return, and checks the pull, the raw landing, the results and the rejects.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import re
import reprlib
import secrets
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hypothesis
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlalchemy import Engine, Row, create_engine, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from loop_sync import contract
from loop_sync.catalog import load_catalog
from loop_sync.client import FetchResult, LoopClient, UserSyncFailed
from loop_sync.config import load_settings
from loop_sync.landing import canonical_json, content_hash, record_id
from loop_sync.lenient import NonFinite, read_lenient
from loop_sync.load import UserPull, write_batch
from loop_sync.normalize import NO_RESULT, NOT_AN_OBJECT
from loop_sync.oidc import TokenResponse
from loop_sync.ratelimit import RateBudget, RetryPolicy
from loop_sync.schema import (
    biomarker_result_history,
    biomarker_results,
    raw_records,
    rejects,
    sync_state,
    upgrade,
)
from loop_sync.services import Services
from loop_sync.serving import BackgroundServer
from loop_sync.sync import run_sync

FUZZ_USER, CONTROL_USER = "usr_fuzz", "usr_control"
CLIENT_SECRET = "fuzz-client-secret-never-shown"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FAST = RetryPolicy(backoff_base_s=0.001, backoff_cap_s=0.01)  # same rule, tiny waits
MALFORMED_TRIES = FAST.malformed_retries + 1
EITHER = "a result or a reject"  # a record whose place the test does not predict

# What the client says about a page it cannot use (`MalformedPage.what`).
NOT_AN_OBJECT_PAGE = "JSON that is not an object"
NO_LIST = "JSON with no list under data or results"
NO_TOTAL = "JSON with no integer total"
NOT_JSON = "a body that is not JSON"
HTML = "an HTML page"
TOO_DEEP = "JSON nested more than 254 levels deep"
MAX_DEPTH = 254  # levels a page may nest (loop_sync.client); the page itself is level 1
FIELD_DEPTH = MAX_DEPTH - 3  # the most a record's field may nest: it starts at level 4

FUZZ = settings(
    max_examples=200,
    deadline=None,
    # The server, warehouse and client are built once per test on purpose (each example
    # starts from an emptied warehouse); generated records are big on purpose; and an
    # example costs real HTTP requests and a real transaction.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
        HealthCheck.too_slow,
        HealthCheck.large_base_example,
    ],
)

# --- The model: what is served, and what must become of it ------------------------------


@dataclass(frozen=True)
class Record:
    """One record as served, and what it must become: a result (`reason` None, carrying
    `flag` if given), a reject for `reason`, or EITHER."""

    value: Any
    kind: str  # valid, invalid or adversarial: for the tally
    reason: str | None = None
    flag: str | None = None

    def __repr__(self) -> str:
        return f"Record({_short.repr(self.value)}, reason={self.reason!r}, flag={self.flag!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis prints this
        printer.text(repr(self))

    @property
    def python(self) -> Any:
        """The record as the client must read it."""
        return as_read(self.value)


@dataclass(frozen=True)
class Page:
    """One response body, and the records it carries when the client can use it
    (`refusal` is what the client must say about it when it cannot)."""

    body: bytes
    content_type: str = "application/json"
    records: tuple[Record, ...] = ()
    total: int = 0
    refusal: str | None = None

    def __repr__(self) -> str:
        return f"Page({_short.repr(self.body)}, records={self.records!r}, refusal={self.refusal!r})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis prints this
        printer.text(repr(self))


@dataclass(frozen=True)
class Pull:
    """What the client must make of a listing."""

    refusal: str | None  # the page that makes the pull fail, if any
    records: tuple[Record, ...]  # deduped as the client does: by id, the last one wins
    complete: bool


@dataclass(frozen=True)
class Listing:
    """A user's results at Loop: pages at consecutive offsets, then empty pages."""

    kind: str
    pages: tuple[Page, ...]
    total: int

    def page_at(self, offset: int) -> Page:
        start = 0
        for page in self.pages:
            if start == offset:
                return page
            start += len(page.records)
        return make_page([], total=self.total)

    def expected(self) -> Pull:
        """Follow the paging rule (Part B1) over these pages, as the client must."""
        offset, seen = 0, dict[tuple[str, str], Record]()
        while True:
            page = self.page_at(offset)
            if page.refusal is not None:
                return Pull(page.refusal, (), complete=False)
            for record in page.records:
                seen[dedupe_key(record.python)] = record
            offset += len(page.records)
            if not page.records or offset >= page.total:
                return Pull(None, tuple(seen.values()), complete=offset >= self.total)

    def all_records(self) -> list[Record]:
        return [record for page in self.pages for record in page.records]


_short = reprlib.Repr()  # failing examples stay readable with megabyte strings in them
_short.maxstring = _short.maxother = 60


def as_read(value: Any) -> Any:
    """A JSON value as the client reads it (loop_sync.client): an integer beyond 64 bits
    becomes the nearest float, infinite past a float's range."""
    if isinstance(value, dict):
        return {key: as_read(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_read(item) for item in value]
    if type(value) is int and not -(2**63) <= value < 2**64:
        return float(str(value))
    return value


def nested(depth: int) -> list[Any]:
    """A list `depth` levels deep: [[[...]]]."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def fingerprint(value: Any) -> str:
    """A JSON value as text that tells apart what JSON does (1, 1.0 and true; NaN is
    itself), whatever the key order."""
    return json.dumps(value, sort_keys=True)


def dedupe_key(record: Any) -> tuple[str, str]:
    """Part B1: records are the same result when their ids are; without a string id, when
    they are the same JSON."""
    if isinstance(record, dict) and isinstance(record.get("id"), str):
        return ("id", record["id"])
    return ("json", fingerprint(record))


def decode(text: str | bytes) -> Any:
    """A landed payload read back: strictly, else leniently (NaN, Infinity, lone surrogates)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def to_text(value: Any, *, ascii_only: bool = True) -> str:
    """JSON text as a lenient server writes it: NaN and Infinity as such."""
    return json.dumps(value, ensure_ascii=ascii_only)


def encoded(value: Any, encoding: str = "ascii") -> bytes:
    """The body bytes; lone surrogates can only travel escaped, so they force ASCII."""
    try:
        return to_text(value, ascii_only=encoding == "ascii").encode(
            "utf-8" if encoding == "ascii" else encoding
        )
    except UnicodeEncodeError:
        return to_text(value).encode()


def make_page(
    records: Sequence[Record],
    *,
    total: int,
    key: str = "data",
    encoding: str = "ascii",
    extra: dict[str, Any] | None = None,
) -> Page:
    body = {key: [record.value for record in records], "total": total, **(extra or {})}
    return Page(encoded(body, encoding), records=tuple(records), total=total)


def listing_of(kind: str, records: Sequence[Record], **page: Any) -> Listing:
    """A one-page listing whose total tells the truth (for explicit examples)."""
    return Listing(kind, (make_page(records, total=len(records), **page),), len(records))


def refused_listing(page: Page) -> Listing:
    return Listing("adversarial", (page,), 0)


HTML_PAGE = refused_listing(
    Page(
        b"<!doctype html><html><body><h1>502 Bad Gateway</h1></body></html>",
        "text/html; charset=utf-8",
        refusal=HTML,
    )
)


def deep_page(depth: int, **fields: Any) -> Page:
    """A page whose one record has a field nested `depth` levels deep, which the client must
    refuse: written by hand, as Python's json cannot write the deepest."""
    body = encoded({"data": [{**BASE_RECORD, **fields, "specimen": "<deep>"}], "total": 1})
    return Page(body.replace(b'"<deep>"', b"[" * depth + b"]" * depth), refusal=TOO_DEEP)


# --- Strategies -----------------------------------------------------------------------------

BASE_RECORD: dict[str, Any] = {
    "id": "res_1",
    "patient_id": "pat_9",
    "biomarker_code": "tsh",
    "biomarker_name": "TSH",
    "value": 2.5,
    "unit": "mIU/L",
    "reference_low": 0.4,
    "reference_high": 4.0,
    "status": "normal",
    "collected_at": "2026-01-10T08:30:00+01:00",
    "parsed_at": "2026-01-10T12:00:00Z",
}
CATALOG = load_catalog()
CODES = sorted({row.loop_code for row in CATALOG})
UNITS_OF: dict[str, list[str]] = {}
for _row in CATALOG:
    UNITS_OF.setdefault(_row.loop_code, []).append(_row.unit)
LOINCS = sorted({row.loinc for row in CATALOG})
STATUSES = [*contract.RECORD_STATUSES, "H", "", "abnormal"]
EXTRA_KEYS = ["specimen", "fasting", "note", "Id", "x-source", "meta"]
assert not set(EXTRA_KEYS) & {*contract.RECORD_FIELDS, *contract.RECORD_OPTIONAL_FIELDS}
# Fields nested deeper than FIELD_DEPTH: one level too many; orjson reads the page (it reads
# 1,024 levels) or not; Python's json reads it or runs out of stack.
TOO_DEEP_FIELDS = [FIELD_DEPTH + 1, 600, 1024 - 3, 1024 - 2, 30_000]

storable_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)
numbers = finite | st.integers(-(10**6), 10**6)
aware_times = st.builds(
    lambda moment, zone: moment.isoformat(timespec="seconds") + zone,
    st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2035, 12, 31)),
    st.sampled_from(["Z", "+00:00", "-05:00", "+05:30", "+14:00", "-12:00"]),
)
value_texts = st.sampled_from(["<0.5", ">1000", "Positive", "Negative", "<= 10", "≥2000", "5.4"])
extra_values = st.recursive(
    st.none() | st.booleans() | finite | st.integers(-(2**63), 2**63 - 1) | storable_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(storable_text, inner, max_size=3),
    max_leaves=5,
)


@st.composite
def valid_records(draw: st.DrawFn, rid: str) -> dict[str, Any]:
    """A record with the documented fields, some optional ones and unknown extras."""
    code = draw(st.sampled_from(CODES))
    record: dict[str, Any] = {
        "id": rid,
        "patient_id": draw(st.sampled_from(["pat_1", "pat_2"])),
        "biomarker_code": code,
        "biomarker_name": draw(storable_text),
        "value": draw(numbers),
        "unit": draw(st.sampled_from(UNITS_OF[code])),
        "reference_low": draw(st.none() | finite),
        "reference_high": draw(st.none() | finite),
        "status": draw(st.sampled_from(STATUSES)),
        "collected_at": draw(aware_times),
        "parsed_at": draw(aware_times),
    }
    optional: dict[str, st.SearchStrategy[Any]] = {
        "loinc": st.none() | st.sampled_from(LOINCS),
        "value_text": st.none() | value_texts,
        "lab": st.none() | storable_text,
        "updated_at": st.none() | aware_times,
        "revision": st.integers(1, 10**6),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            record[name] = draw(strategy)
    if record.get("value_text") and draw(st.booleans()):
        record["value"] = None  # the verbatim text carries the result
    for name in draw(st.lists(st.sampled_from(EXTRA_KEYS), max_size=2, unique=True)):
        record[name] = draw(extra_values)
    return record


Edit = Callable[[dict[str, Any]], None]


def setting(**fields: Any) -> Edit:
    return lambda record: record.update(fields)


def removing(*names: str) -> Edit:
    def edit(record: dict[str, Any]) -> None:
        for name in names:
            record.pop(name, None)

    return edit


def both(*edits: Edit) -> Edit:
    def edit(record: dict[str, Any]) -> None:
        for one in edits:
            one(record)

    return edit


@dataclass(frozen=True)
class Damage:
    """One thing wrong with an otherwise valid record, and what it must then become."""

    name: str
    edit: Edit
    reason: str | None  # None: still a result
    flag: str | None = None


NAN, INF = float("nan"), float("inf")
DAMAGES = [
    Damage("null id", setting(id=None), "id is missing"),
    Damage("no id", removing("id"), "id is missing"),
    Damage("numeric id", setting(id=1234), "id is not a string"),
    Damage("object id", setting(id={"id": "res_1"}), "id is not a string"),
    Damage("empty id", setting(id=""), "id is empty"),
    Damage("no collected_at", removing("collected_at"), "collected_at is missing"),
    Damage("no parsed_at", removing("parsed_at"), "parsed_at is missing"),
    Damage("no result", removing("value", "value_text"), NO_RESULT),
    Damage("value as text", setting(value="12.5"), "value is not a number"),
    Damage("value as boolean", setting(value=True), "value is not a number"),
    Damage("unit as number", setting(unit=5), "unit is not a string"),
    Damage(
        "code as object", setting(biomarker_code={"code": "tsh"}), "biomarker_code is not a string"
    ),
    Damage("patient_id as list", setting(patient_id=["pat_1"]), "patient_id is not a string"),
    Damage("reference as text", setting(reference_low="low"), "reference_low is not a number"),
    Damage("lab as boolean", setting(lab=False), "lab is not a string"),
    Damage("NaN value, no text", both(setting(value=NAN), removing("value_text")), NO_RESULT),
    Damage("NaN value, censored text", setting(value=NAN, value_text="<0.5"), None, "censored"),
    Damage("Infinity value", setting(value=INF), "value is not finite"),
    Damage("-Infinity reference", setting(reference_high=-INF), "reference_high is not finite"),
    Damage("integer beyond a double", setting(value=10**400), "value is not finite"),
    Damage("huge finite value", both(setting(value=1e300), removing("value_text")), None),
    Damage("huge integer revision", setting(revision=10**30), "revision is too large"),
    Damage("64-bit integer in an extra field", setting(note=2**64 - 1), None),
    Damage("integer beyond 64 bits", both(setting(value=2**64), removing("value_text")), None),
    Damage(
        "impossible date",
        setting(collected_at="2026-02-30T08:00:00Z"),
        "collected_at is not a timestamp",
    ),
    Damage("words for a date", setting(parsed_at="yesterday"), "parsed_at is not a timestamp"),
    Damage("date as a number", setting(collected_at=1767225600), "collected_at is not a timestamp"),
    Damage(
        "year 0", setting(collected_at="0000-06-01T00:00:00Z"), "collected_at is not a timestamp"
    ),
    Damage(
        "after year 9999 in UTC",
        setting(parsed_at="9999-12-31T23:00:00-05:00"),
        "parsed_at is not a timestamp",
    ),
    Damage(
        "before year 1 in UTC",
        setting(updated_at="0001-01-01T00:00:00+14:00"),
        "updated_at is not a timestamp",
    ),
    Damage(
        "naive collected_at", setting(collected_at="2026-01-10T08:30:00"), None, "naive_timestamp"
    ),
    Damage(
        "naive parsed_at", setting(parsed_at="2026-01-10T12:00:00"), "parsed_at has no timezone"
    ),
    Damage(
        "naive updated_at", setting(updated_at="2026-01-11T09:00:00"), "updated_at has no timezone"
    ),
    Damage("negative revision", setting(revision=-1), "revision is not a positive integer"),
    Damage("zero revision", setting(revision=0), "revision is not a positive integer"),
    Damage("revision as text", setting(revision="2"), "revision is not a positive integer"),
    Damage("revision too large", setting(revision=2**31), "revision is too large"),
    Damage("unknown unit", setting(unit="furlongs/fortnight"), None, "unknown_unit"),
    Damage(
        "unknown code",
        both(setting(biomarker_code="vitamin-k2"), removing("loinc")),
        None,
        "unknown_code",
    ),
]
NASTY = [
    Damage("huge lab", setting(lab="L" * 1_000_000), None),
    Damage("huge name", setting(biomarker_name="N" * 200_000), None),
    Damage("huge value_text", setting(value=1.0, value_text="x" * 100_000), None),
    Damage("huge extra field", setting(note="n" * 300_000), None),
    Damage("id too long", setting(id="r" * 256), "id is longer than 255 characters"),
    Damage("unit too long", setting(unit="u" * 65), "unit is longer than 64 characters"),
    Damage(
        "patient_id too long",
        setting(patient_id="p" * 256),
        "patient_id is longer than 255 characters",
    ),
    Damage(
        "NUL in name",
        setting(biomarker_name="Ferritin\x00"),
        "biomarker_name has characters that cannot be stored",
    ),
    Damage(
        "lone surrogate in lab",
        setting(lab="Lab \udfff"),
        "lab has characters that cannot be stored",
    ),
    Damage("lone surrogate in an extra field", setting(note="\ud83d"), None),
    Damage("NUL in an extra field", setting(note="a\x00b"), None),
    Damage(
        "emoji and bidi text",
        setting(biomarker_name="🧪 Ferritin \u202eetirreF\u202c e\u0301"),
        None,
    ),
]
# As deep as a page may nest, read by orjson or (NaN, a lone surrogate) by Python's json.
DEEPEST = nested(FIELD_DEPTH)
DEEP = [
    *(Damage(f"extra field {d} deep", setting(specimen=nested(d)), None) for d in (2, 40)),
    Damage("deepest extra field", setting(specimen=DEEPEST), None),
    Damage("no id, deepest extra field", setting(id=None, specimen=DEEPEST), "id is missing"),
    Damage(
        "NaN value, deepest extra field",
        both(setting(value=NAN, specimen=DEEPEST), removing("value_text")),
        NO_RESULT,
    ),
    Damage("lone surrogate, deepest extra field", setting(note="\ud83d", specimen=DEEPEST), None),
]
BAD_IDS = [
    Damage(
        "NUL in id",
        lambda r: r.update(id=f"{r['id']}\x00"),
        "id has characters that cannot be stored",
    ),
    Damage(
        "lone surrogate in id",
        lambda r: r.update(id=f"{r['id']}\ud800"),
        "id has characters that cannot be stored",
    ),
]
NOT_OBJECTS = st.sampled_from([[], ["res_1"], 42, "res_1", None, True, 2.5, nested(30)])
DEEP_NOT_OBJECTS = st.sampled_from([nested(200), nested(MAX_DEPTH - 2)])  # at level 3


@st.composite
def damaged_records(draw: st.DrawFn, rid: str, damages: list[Damage], kind: str) -> Record:
    damage = draw(st.sampled_from(damages))
    record = draw(valid_records(rid))
    damage.edit(record)
    return Record(record, kind, damage.reason, damage.flag)


@st.composite
def record_lists(draw: st.DrawFn, kind: str, *, deep: bool = False) -> list[Record]:
    """Records of one kind (valid ones mixed in), each with an id of its own; adversarial
    ones are nasty, or `deep`."""
    count = draw(st.integers(0 if kind == "valid" else 1, 8))
    records = []
    for n in range(count):
        rid = f"res_{n:03d}{draw(st.sampled_from(['', 'a', '-x', '.2']))}"
        choice = draw(st.integers(0, 3)) if kind != "valid" else 0
        if choice == 0:
            records.append(Record(draw(valid_records(rid)), "valid"))
        elif kind == "invalid":
            records.append(draw(damaged_records(rid, DAMAGES, kind)))
        elif choice == 1:
            not_object = draw(DEEP_NOT_OBJECTS if deep else NOT_OBJECTS)
            records.append(Record(not_object, kind, NOT_AN_OBJECT))
        else:
            records.append(draw(damaged_records(rid, DEEP if deep else NASTY + BAD_IDS, kind)))
    if kind == "invalid" and records and draw(st.booleans()):  # an id repeated on a page
        first = draw(st.sampled_from(records))
        if isinstance(first.value, dict):
            twin = dict(first.value, revision=draw(st.integers(1, 5)))
            records.insert(draw(st.integers(0, len(records))), Record(twin, kind, EITHER))
    return records


@st.composite
def paged(
    draw: st.DrawFn, kind: str, records: list[Record], total: int | None = None
) -> tuple[Page, ...]:
    """The records in 1 to 3 non-empty pages (or one empty page), keyed data or results."""
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(records) - 1)), max_size=2)))
    cuts = [c for c in cuts if 0 < c < len(records)]
    bounds = [0, *cuts, len(records)]
    encoding = draw(st.sampled_from(["ascii", "utf-8", "utf-16"]))
    pages = []
    for start, end in itertools.pairwise(bounds):
        extras: list[dict[str, Any]] = [{}, {"limit": 500, "offset": start}, {"next": None}]
        extra = draw(st.sampled_from(extras))
        pages.append(
            make_page(
                records[start:end],
                total=len(records) if total is None else total,
                key=draw(st.sampled_from(contract.PAGE_ARRAY_KEYS)),
                encoding=encoding,
                extra=extra,
            )
        )
    return tuple(pages)


@st.composite
def valid_listings(draw: st.DrawFn) -> Listing:
    records = draw(record_lists("valid"))
    return Listing("valid", draw(paged("valid", records)), len(records))


@st.composite
def invalid_listings(draw: st.DrawFn) -> Listing:
    records = draw(record_lists("invalid"))
    return Listing("invalid", draw(paged("invalid", records)), len(records))


@st.composite
def refused_pages(draw: st.DrawFn, records: list[Record]) -> Page:
    """A page the client cannot use, and what it must say about it."""
    values = [record.value for record in records]
    page: dict[str, Any] = {"data": values, "total": len(values)}
    how = draw(st.sampled_from(["array", "no list", "total", "truncated", "html", "bytes", "deep"]))
    if how == "array":
        bodies: list[Any] = [values, 42, "page", None, [page]]
        return Page(encoded(draw(st.sampled_from(bodies))), refusal=NOT_AN_OBJECT_PAGE)
    if how == "no list":
        listless: list[dict[str, Any]] = [
            {"data": {"0": values}, "total": 1},
            {"data": "[]", "total": 0},
            {"data": None, "results": values, "total": len(values)},
            {"items": values, "total": len(values)},
        ]
        return Page(encoded(draw(st.sampled_from(listless))), refusal=NO_LIST)
    if how == "total":
        total = draw(st.sampled_from(["missing", "3", 3.0, -1, True, None, 10**30 + 0.5]))
        broken = {"data": values} if total == "missing" else {"data": values, "total": total}
        return Page(encoded(broken), refusal=NO_TOTAL)
    if how == "truncated":
        text = encoded(page)
        return Page(text[: draw(st.integers(0, len(text) - 1))], refusal=NOT_JSON)
    if how == "html":
        return HTML_PAGE.pages[0]
    if how == "bytes":
        junk = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\x80abc"]))
        return Page(b'{"data":[{"id":"res_' + junk + b'"}],"total":1}', refusal=NOT_JSON)
    # Read by orjson, or by Python's json (NaN), or by Python's json and walked (a lone
    # surrogate, which orjson cannot write back to tell the depth).
    also: dict[str, Any] = draw(st.sampled_from([{}, {"value": NAN}, {"note": "\ud800"}]))
    return deep_page(draw(st.sampled_from(TOO_DEEP_FIELDS)), **also)


@st.composite
def adversarial_listings(draw: st.DrawFn) -> Listing:
    how = draw(st.sampled_from(["nasty records", "deep records", "total lies", "refused page"]))
    records = draw(record_lists("adversarial", deep=how == "deep records"))
    if how in {"nasty records", "deep records"}:
        return Listing("adversarial", draw(paged("adversarial", records)), len(records))
    if how == "total lies":
        total = draw(st.integers(0, len(records) + 1000).filter(lambda t: t != len(records)))
        return Listing("adversarial", draw(paged("adversarial", records, total)), total)
    usable = draw(st.integers(0, 1))  # a usable page before the one that fails, or none
    first = (make_page(records, total=len(records) + 5),) if usable else ()
    return Listing("adversarial", (*first, draw(refused_pages(records))), len(records) + 5)


listings = st.one_of(valid_listings(), invalid_listings(), adversarial_listings())
# For the smaller budgets: Hypothesis starts with the first branch's simplest examples.
hostile_listings = st.one_of(adversarial_listings(), invalid_listings(), valid_listings())


# --- Loop on loopback -----------------------------------------------------------------------


class LoopStub:
    """Loop's biomarker listing: each consented user's listing, the page at the requested
    offset; any other bearer token gets a 403."""

    def __init__(self) -> None:
        self.users: dict[str, str] = {}  # access token -> user id
        self.listings: dict[str, Listing] = {}
        self.url = ""
        self.app = Starlette(routes=[Route(contract.BIOMARKERS_PATH, self.biomarkers)])

    async def biomarkers(self, request: Request) -> Response:
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        user_id = self.users.get(token)
        if user_id is None:
            return JSONResponse({"error": "forbidden", "message": "who?"}, status_code=403)
        page = self.listings[user_id].page_at(int(request.query_params.get("offset", "0")))
        return Response(page.body, media_type=page.content_type)


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopStub]:
    stub = LoopStub()
    with BackgroundServer(stub.app) as server:
        stub.url = server.url
        yield stub


@dataclass
class World:
    """A warehouse with consented users whose Loop is the stub, and the secrets that no
    message may show."""

    services: Services
    loop: LoopStub
    secrets: list[str] = field(default_factory=list)
    runner: asyncio.Runner = field(default_factory=asyncio.Runner)
    client: LoopClient | None = None

    def __repr__(self) -> str:
        return f"World({self.services.settings.database_url_display})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # Hypothesis prints this
        printer.text(repr(self))

    def consent(self, user_id: str) -> None:
        """Store a consent the way onboarding does; the stub knows the access token."""
        access = contract.ACCESS_TOKEN_PREFIX + secrets.token_urlsafe(24)
        refresh = contract.REFRESH_TOKEN_PREFIX + secrets.token_urlsafe(24)
        response = TokenResponse(
            access_token=SecretStr(access),
            token_type="Bearer",
            expires_in=3600,
            refresh_token=SecretStr(refresh),
        )
        self.services.vault.store_consent(user_id, response, contract.DEFAULT_SCOPES)
        self.loop.users[access] = user_id
        self.secrets += [access, refresh]

    def pull(self, user_id: str) -> FetchResult | UserSyncFailed:
        """One user's pull by a LoopClient kept open across examples."""
        if self.client is None:
            budget = RateBudget(1000.0)
            self.client = LoopClient(
                self.services.settings, self.services.vault, budget, concurrency=1, policy=FAST
            )
            self.runner.run(self.client.__aenter__())
        try:
            return self.runner.run(self.client.fetch_results(user_id))
        except UserSyncFailed as failed:
            return failed

    def close(self) -> None:
        if self.client is not None:
            self.runner.run(self.client.__aexit__(None, None, None))
        self.runner.close()
        self.services.close()


def open_world(loop: LoopStub, database_url: str, fernet_key: str, **overrides: Any) -> World:
    settings = load_settings(
        client_id="loop-sync-fuzz",
        client_secret=CLIENT_SECRET,
        redirect_uri="http://localhost:8080/callback",
        issuer="http://127.0.0.1:9",  # never called: no token is refreshed here
        api_base_url=loop.url,
        database_url=database_url,
        encryption_keys=fernet_key,
        rate_limit_rps=1000.0,
        **overrides,
    )
    services = Services.build(settings)
    upgrade(services.engine)
    world = World(services, loop, [CLIENT_SECRET, fernet_key])
    world.consent(FUZZ_USER)
    return world


@pytest.fixture
def sqlite_world(loop: LoopStub, tmp_path: Path, fernet_key: str) -> Iterator[World]:
    world = open_world(loop, f"sqlite:///{tmp_path / 'warehouse.db'}", fernet_key)
    yield world
    world.close()


@pytest.fixture
def pg_world(loop: LoopStub, pg_schema_url: str, fernet_key: str) -> Iterator[World]:
    world = open_world(loop, pg_schema_url, fernet_key)
    yield world
    world.close()


CONTROL = listing_of(
    "valid", [Record(dict(BASE_RECORD, id=f"ctrl_{n}", value=1.5 + n), "valid") for n in (1, 2)]
)


@pytest.fixture
def sync_world(loop: LoopStub, tmp_path: Path, fernet_key: str) -> Iterator[World]:
    """Two users synced together: the fuzzed one and one whose listing is always fine."""
    # Time budget: an unusable page is given up on within it, a usable one never nears it.
    world = open_world(
        loop, f"sqlite:///{tmp_path / 'warehouse.db'}", fernet_key, user_time_budget_s=2.0
    )
    world.consent(CONTROL_USER)
    loop.listings[CONTROL_USER] = CONTROL
    yield world
    world.close()


# --- Checks -------------------------------------------------------------------------------


def empty_warehouse(engine: Engine) -> None:
    with engine.begin() as connection:
        for table in (raw_records, rejects, biomarker_result_history, biomarker_results):
            connection.execute(table.delete())
        connection.execute(sync_state.delete())


def fetch_rows(engine: Engine, query: Any) -> list[Row[Any]]:
    with engine.connect() as connection:
        return list(connection.execute(query).all())


def stored_id(record: Any) -> str | None:
    """The id the warehouse keeps with a record: a string of 1 to 255 characters that
    PostgreSQL can store (no NUL, no lone surrogate)."""
    rid = record.get("id") if isinstance(record, dict) else None
    if isinstance(rid, str) and 0 < len(rid) <= 255 and not re.search("[\x00\ud800-\udfff]", rid):
        return rid
    return None


def assert_secret_free(message: str, world: World) -> None:
    leaked = [s[:10] for s in world.secrets if s in message]
    assert not leaked, f"a secret is in the message: {leaked}"
    assert "pat_" not in message  # no record value either


def check_landed(engine: Engine, user_id: str, pull: Pull) -> None:
    """Every record the pull must carry is in the raw landing once, and in exactly one of
    results and rejects: where its expectation says, with the reason it says."""
    raw = fetch_rows(
        engine,
        select(raw_records.c.content_hash, raw_records.c.result_id, raw_records.c.payload).where(
            raw_records.c.user_id == user_id
        ),
    )
    results = fetch_rows(
        engine, select(biomarker_results).where(biomarker_results.c.user_id == user_id)
    )
    rejected = fetch_rows(engine, select(rejects).where(rejects.c.user_id == user_id))
    landed = {fingerprint(decode(row.payload)): row for row in raw}
    assert len(landed) == len(raw) == len(pull.records), "raw landing: not one row per record"
    assert len(results) + len(rejected) == len(pull.records), "not one place per record"
    result_of = {row.content_hash: row for row in results}
    reject_of = {row.content_hash: row for row in rejected}
    for record in pull.records:
        python = record.python
        row = landed.get(fingerprint(python))
        assert row is not None, f"{record!r} is not in the raw landing as sent"
        assert row.result_id == stored_id(python)
        result, reject = result_of.get(row.content_hash), reject_of.get(row.content_hash)
        assert (result is None) != (reject is None), (
            f"{record!r} landed {2 - (result is None) - (reject is None)} times"
        )
        if reject is not None:
            assert reject.reason, f"{record!r} was rejected without a reason"
            assert reject.result_id == stored_id(python)
        if record.reason is None:
            assert result is not None, f"{record!r} was rejected: {reject.reason if reject else ''}"
            assert result.result_id == row.result_id == python["id"]
            assert result.revision == (python.get("revision") or contract.REVISION_DEFAULT)
            if record.flag is not None:
                assert record.flag in result.quality_flags.split(","), result.quality_flags
        elif record.reason != EITHER:
            assert reject is not None, f"{record!r} became a result, not a reject"
            assert reject.reason == record.reason, f"{record!r}: {reject.reason}"


@contextlib.contextmanager
def default_recursion_limit() -> Iterator[None]:
    """CPython's default recursion limit, which a sync runs under. Hypothesis raises it
    (to 2,000 frames above the test) while a test runs, which would hide every failure
    of Python's json on deep nesting."""
    raised = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        yield
    finally:
        sys.setrecursionlimit(raised)


@default_recursion_limit()
def pull_and_land(world: World, listing: Listing) -> None:
    """Serve the listing, pull it with the real client, and write what it returned."""
    hypothesis.event(f"listing: {listing.kind}")
    engine = world.services.engine
    empty_warehouse(engine)
    world.loop.listings[FUZZ_USER] = listing
    expected = listing.expected()

    pulled = world.pull(FUZZ_USER)

    if expected.refusal is not None:
        hypothesis.event(f"refused: {expected.refusal}")
        assert isinstance(pulled, UserSyncFailed), "a page that cannot be used was accepted"
        tries = f"{MALFORMED_TRIES} times in a row"
        assert pulled.reason == f"Loop answered 200 with {expected.refusal} {tries}"
        assert_secret_free(str(pulled), world)
        return
    assert isinstance(pulled, FetchResult), pulled.reason
    got = [fingerprint(record) for record in pulled.records]
    assert got == [fingerprint(record.python) for record in expected.records]
    assert pulled.complete is expected.complete
    hypothesis.event(f"pull: {'complete' if pulled.complete else 'incomplete'}")

    counts = write_batch(
        engine,
        [UserPull(FUZZ_USER, pulled.records, pulled.complete, pulled.digest)],
        run_id="fuzz",
        now=NOW,
    )

    check_landed(engine, FUZZ_USER, expected)
    assert counts.inserted + counts.rejected == len(expected.records)


# --- Explicit examples: bugs the fuzzing found (each failed before its fix), and edges ------


def _valid(rid: str = "res_1", **changes: Any) -> dict[str, Any]:
    """A valid record with this id and some changes."""
    return {**BASE_RECORD, "id": rid, **changes}


# The nesting limit (loop_sync.client): one level too deep, read by orjson; the same with a
# lone surrogate, read by Python's json and walked; past what Python's json reads (its
# RecursionError was a crash); and records exactly as deep as allowed.
ONE_LEVEL_TOO_DEEP = refused_listing(deep_page(FIELD_DEPTH + 1))
ONE_LEVEL_TOO_DEEP_WALKED = refused_listing(deep_page(FIELD_DEPTH + 1, note="\ud800"))
DEEP_PAGE = refused_listing(deep_page(1100))
DEEPEST_RECORDS = listing_of(
    "adversarial",
    [
        Record(_valid(specimen=DEEPEST), "adversarial"),
        Record(_valid("res_2", id=None, specimen=DEEPEST), "adversarial", "id is missing"),
        Record(_valid("res_3", note="\ud83d", specimen=DEEPEST), "adversarial"),
        Record(nested(MAX_DEPTH - 2), "adversarial", NOT_AN_OBJECT),
    ],
)
# orjson reads an integer beyond 64 bits as a float, Python's json (which reads UTF-16
# pages) read it whole: the same record landed differently depending on its page.
BIG_INTEGERS = [
    Record(_valid(revision=10**30), "invalid", "revision is too large"),
    Record(_valid("res_2", value=2**64), "invalid"),
    Record(_valid("res_3", note=2**64 - 1, specimen=[-(2**63) - 1]), "invalid"),
]
BIG_INTEGERS_UTF8 = listing_of("invalid", BIG_INTEGERS)
BIG_INTEGERS_UTF16 = listing_of("invalid", BIG_INTEGERS, encoding="utf-16")
NON_FINITE = listing_of(
    "invalid",
    [
        Record(_valid(value=NAN, value_text="<0.5"), "invalid", None, "censored"),
        Record(_valid("res_2", value=INF), "invalid", "value is not finite"),
        Record(_valid("res_3", value=None, value_text="<0.5"), "valid", None, "censored"),
        Record({"value": NAN}, "invalid", "id is missing"),
        Record({"value": None}, "invalid", "id is missing"),
    ],
)
SURROGATES = listing_of(
    "adversarial",
    [
        Record(_valid(note="\ud83d"), "adversarial"),
        Record(_valid("res_2\ud800"), "adversarial", "id has characters that cannot be stored"),
        Record(["\udfff"], "adversarial", NOT_AN_OBJECT),
    ],
)
OUT_OF_RANGE_TIMES = listing_of(
    "invalid",
    [
        Record(
            _valid(collected_at="0000-06-01T00:00:00Z"),
            "invalid",
            "collected_at is not a timestamp",
        ),
        Record(
            _valid("res_2", parsed_at="9999-12-31T23:00:00-05:00"),
            "invalid",
            "parsed_at is not a timestamp",
        ),
        Record(
            _valid("res_3", updated_at="0001-01-01T00:00:00+14:00"),
            "invalid",
            "updated_at is not a timestamp",
        ),
    ],
)
# Not UTF-8, but Python's json reads an encoded surrogate as it reads the escaped one.
ENCODED_SURROGATE = Listing(
    "adversarial",
    (
        Page(
            b'{"data":[{"id":"res_\xed\xa0\x80"}],"total":1}',
            records=(
                Record(
                    {"id": "res_\ud800"}, "adversarial", "id has characters that cannot be stored"
                ),
            ),
            total=1,
        ),
    ),
    total=1,
)
UNSTORABLE_IDS = listing_of(
    "adversarial",
    [
        Record(_valid("res_1\x00"), "adversarial", "id has characters that cannot be stored"),
        Record(_valid("r" * 256), "adversarial", "id is longer than 255 characters"),
        Record(_valid("res_3"), "valid"),
    ],
)


@FUZZ
@given(listing=listings)
@example(listing=ONE_LEVEL_TOO_DEEP)
@example(listing=ONE_LEVEL_TOO_DEEP_WALKED)
@example(listing=DEEP_PAGE)
@example(listing=DEEPEST_RECORDS)
@example(listing=BIG_INTEGERS_UTF8)
@example(listing=BIG_INTEGERS_UTF16)
@example(listing=NON_FINITE)
@example(listing=SURROGATES)
@example(listing=ENCODED_SURROGATE)
@example(listing=OUT_OF_RANGE_TIMES)
@example(listing=UNSTORABLE_IDS)
def test_any_page_is_landed_record_by_record_or_refused_with_a_reason(
    sqlite_world: World, listing: Listing
) -> None:
    """Whatever Loop serves, the pull either fails with a fixed, secret-free reason naming
    what is wrong with the page, or every record it carried lands once in the raw landing
    and once in results or rejects (SQLite)."""
    pull_and_land(sqlite_world, listing)


@pytest.mark.postgres
@settings(FUZZ, max_examples=40)
@given(listing=hostile_listings)
@example(listing=UNSTORABLE_IDS)
@example(listing=SURROGATES)
@example(listing=OUT_OF_RANGE_TIMES)
@example(listing=NON_FINITE)
@example(listing=DEEPEST_RECORDS)
def test_any_page_is_landed_or_refused_on_postgresql(pg_world: World, listing: Listing) -> None:
    """The same on PostgreSQL, which refuses NUL, lone surrogates and over-long ids that
    SQLite would store."""
    pull_and_land(pg_world, listing)


@settings(FUZZ, max_examples=15)
@given(listing=hostile_listings)
@example(listing=DEEP_PAGE)
@example(listing=HTML_PAGE)
def test_a_sync_run_records_why_a_user_failed_and_still_syncs_the_others(
    sync_world: World, listing: Listing
) -> None:
    """In a real sync run, a user whose page cannot be used is marked failed with a clear,
    secret-free reason and nothing of theirs written, a usable listing lands in full, and
    the other user of the run is synced either way."""
    hypothesis.event(f"listing: {listing.kind}")
    engine = sync_world.services.engine
    empty_warehouse(engine)
    sync_world.loop.listings[FUZZ_USER] = listing
    expected = listing.expected()
    hypothesis.event(f"refused: {expected.refusal}")

    with default_recursion_limit():
        summary = run_sync(sync_world.services, [FUZZ_USER, CONTROL_USER], concurrency=2)

    states = {row.user_id: row for row in fetch_rows(engine, select(sync_state))}
    assert states[CONTROL_USER].last_status == "ok"
    check_landed(engine, CONTROL_USER, CONTROL.expected())
    fuzzed = states[FUZZ_USER]
    if expected.refusal is None:
        assert (summary.status, fuzzed.last_status) == ("ok", "ok")
        assert (fuzzed.last_complete_at is not None) is expected.complete
        check_landed(engine, FUZZ_USER, expected)
        return
    assert (summary.status, summary.users_failed, fuzzed.last_status) == ("partial", 1, "failed")
    assert fuzzed.last_error.startswith(f"syncing user {FUZZ_USER} failed: ")
    assert expected.refusal in fuzzed.last_error
    assert_secret_free(fuzzed.last_error, sync_world)
    assert not fetch_rows(engine, select(raw_records).where(raw_records.c.user_id == FUZZ_USER))


def test_nan_and_infinity_are_landed_as_sent_not_as_null() -> None:
    """The raw landing keeps NaN and ±Infinity as Loop sent them (read by the client's
    lenient reader): each has its own content hash, and the payload reads back to the same
    record with the same hash (a replay sees what Loop sent)."""
    records = [read_lenient(f'{{"value": {text}}}') for text in ("NaN", "Infinity", "-Infinity")]
    records.append({"value": None})
    payloads = [canonical_json(record) for record in records]
    assert len(set(payloads)) == 4
    assert len({content_hash(record) for record in records}) == 4
    assert math.isnan(decode(payloads[0])["value"])
    assert [decode(p)["value"] for p in payloads[1:]] == [INF, -INF, None]
    assert [content_hash(read_lenient(p)) for p in payloads] == list(map(content_hash, records))


def test_a_lone_surrogate_is_landed_escaped_not_raised() -> None:
    """A record holding a lone surrogate (Loop sent it escaped) gets a content hash and a
    payload any database stores, and the payload reads back to the same record."""
    record = {"id": "res_1", "note": "a\ud800"}
    payload = canonical_json(record)
    assert payload.isascii()
    assert decode(payload) == record
    assert len(content_hash(record)) == 64


@default_recursion_limit()
def test_the_deepest_record_a_page_may_hold_is_landed_by_either_writer() -> None:
    """A record as deep as the client lets through (252 levels) gets a payload, from orjson
    or, holding NaN, from Python's json under the default recursion limit, that reads back
    to the same record."""
    nan = NonFinite("nan")  # as the client reads NaN
    for record in ({"id": "res_1", "x": nested(251)}, {"id": "res_1", "x": [nan, nested(250)]}):
        assert fingerprint(decode(canonical_json(record))) == fingerprint(record)


def test_only_ids_the_warehouse_can_store_are_landed_as_ids() -> None:
    """The raw landing keeps an id in its result_id column only if the column can hold it:
    a string of 1 to 255 characters without NUL or a lone surrogate."""
    assert record_id({"id": "res_1"}) == "res_1"
    assert record_id({"id": "r" * 255}) == "r" * 255
    assert record_id({"id": "résultat-µ"}) == "résultat-µ"  # not ASCII, but storable
    unstorable = ["", "res\x00", "rés\x00", "res\ud800", "r" * 256, 7, None]
    assert [record_id({"id": rid}) for rid in unstorable] == [None] * len(unstorable)


def test_a_result_id_another_user_holds_is_neither_taken_over_nor_lost(tmp_path: Path) -> None:
    """When Loop lists the same result id for two users, the first user's result stays
    theirs, and the second user's record still lands once, as a result or a reject."""
    engine = create_engine(f"sqlite:///{tmp_path / 'warehouse.db'}")
    upgrade(engine)
    first, second = _valid("res_shared"), _valid("res_shared", value=9.9)
    write_batch(engine, [UserPull("usr_a", [first], complete=True)], run_id="a", now=NOW)

    write_batch(engine, [UserPull("usr_b", [second], complete=True)], run_id="b", now=NOW)

    held = fetch_rows(engine, select(biomarker_results.c.user_id, biomarker_results.c.value_source))
    of_b = fetch_rows(engine, select(rejects.c.reason).where(rejects.c.user_id == "usr_b"))
    engine.dispose()
    assert ("usr_a", 2.5) in [tuple(row) for row in held]
    assert len([row for row in held if row.user_id == "usr_b"]) + len(of_b) == 1
