"""Normalization: raw Loop biomarker records in, warehouse rows and rejects out.

Pure and vectorized: no I/O, no database, no logging, and no Python loop over the rows. The
frame is built in one pass (``pd.DataFrame`` over the records), a field's JSON types are
checked with ``infer_dtype`` (a C scan) and, only when a column is mixed, a ``map(type)``.
Per-value Python work (unit spelling, ``value_text`` grammar, timestamp zones) runs on the
*distinct* values of a column (``pd.factorize``), which are few: units, codes, panel times.

Every record lands in exactly one place. A record is **rejected** only when it is broken in
structure: not a JSON object, a field of the wrong JSON type, a missing required field, a
timestamp that does not parse, or a string the warehouse cannot store (longer than its column,
or holding NUL or an unpaired surrogate, which PostgreSQL refuses). The reason is the first
problem found, in `REJECT_REASONS` order; it names fields, never values. Every other record
becomes a row, and what is odd about it goes into ``quality_flags`` (see `FLAGS`).

Decisions where Loop and the brief are silent:

- ``value_text`` is the lab's verbatim result. When it holds a number (plain, or censored such
  as ``<0.5``, ``> 1000``, ``<=10``, ``≥2000``), that number is ``value_source`` even if
  ``value`` disagrees: Part B says ``value`` is then "null or the bound", i.e. derived from it.
  Otherwise ``value_source`` is ``value``.
- A record with neither ``value`` nor a non-blank ``value_text`` has no result: rejected.
- ``value_text`` that is not a number while ``value`` is null is a ``text_result``; with a
  ``value`` present the value is used and the text kept verbatim, unflagged.
- JSON ``NaN`` in a number field counts as null; ``±Infinity`` (or an integer too big for a
  double) is rejected as "not finite".
- Units: exact match after stripping outer whitespace and writing µ/μ as ``u``; else a
  case-insensitive match if exactly one of the marker's catalog units matches so. Codes,
  LOINCs and statuses match exactly (Loop's codes are canonical). The unit flags
  (``unknown_unit``, ``non_convertible_unit``) are only raised for a known marker; an unknown
  marker carries ``unknown_code`` alone.
- LOINC fallback (``biomarker_code`` unknown, empty or absent) accepts the catalog's LOINC
  and the alternative LOINCs its notes say map to the same marker (`LOINC_ALIASES`). Lp(a) in
  a non-convertible unit is flagged, not re-routed to the other Lp(a) series.
- ``unit_canonical`` is set only when ``value_canonical`` could be computed from the unit
  (known marker, known convertible unit); text results keep it, with their reference bounds.
- A canonical value that overflows a double is null and flagged ``implausible``.
- Timestamps: ISO 8601 only. ``collected_at`` without a zone is kept verbatim in
  ``collected_at_source``, ``collected_at`` null, flagged ``naive_timestamp``; a date-only
  ``collected_at`` counts as without zone. ``parsed_at`` and ``updated_at`` without a zone are
  rejected (never guessed). Digits past microseconds are truncated. A moment outside the
  years 1 to 9999 in UTC (e.g. ``0000-06-01T00:00:00Z``, or ``9999-12-31T23:00:00-05:00``)
  is not a timestamp: no datetime the warehouse drivers take can hold it.
- ``revision``: a JSON integer (or an integral float such as ``2.0``) from 1 to 2**31-1 (the
  column is a 32-bit INTEGER); absent or null means 1.
- ``status`` is never a reason to reject: anything but normal/low/high/critical gives a null
  ``loop_status``.

Dtypes of `Normalized.results` (chosen to write cleanly through SQLAlchemy or psycopg COPY):
text columns are ``object`` holding ``str`` or ``None`` (never NaN); float columns ``float64``
with NaN for null; ``collected_at``/``parsed_at``/``updated_at`` ``datetime64[us, UTC]`` with
NaT for null (microseconds: PostgreSQL's precision, and no year-2262 limit); ``revision``
``int64``. ``frame.astype(object).where(frame.notna(), None)`` turns a frame into plain
Python values with ``None`` for every null, ready for ``executemany`` or ``copy.write_row``.
`Normalized.rejects` is all ``object`` text; ``result_id`` is ``None`` unless the record has a
storable string id.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import pandas as pd

from loop_sync import contract, schema
from loop_sync.catalog import load_catalog
from loop_sync.lenient import NonFinite

Bools = npt.NDArray[np.bool_]
Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Objects = npt.NDArray[np.object_]

# --- Quality flags (a row is kept; what is odd about it is said here) --------------------
CENSORED: Final = "censored"
IMPLAUSIBLE: Final = "implausible"
NAIVE_TIMESTAMP: Final = "naive_timestamp"
NON_CONVERTIBLE_UNIT: Final = "non_convertible_unit"
TEXT_RESULT: Final = "text_result"
UNKNOWN_CODE: Final = "unknown_code"
UNKNOWN_UNIT: Final = "unknown_unit"
FLAGS: Final = tuple(
    sorted(
        (
            CENSORED,
            IMPLAUSIBLE,
            NAIVE_TIMESTAMP,
            NON_CONVERTIBLE_UNIT,
            TEXT_RESULT,
            UNKNOWN_CODE,
            UNKNOWN_UNIT,
        )
    )
)
_FLAG_LABELS: Final = np.array(
    [",".join(f for i, f in enumerate(FLAGS) if bits >> i & 1) for bits in range(1 << len(FLAGS))],
    dtype=object,
)

# Other LOINCs that the catalog's notes map onto one of its markers (used only when Loop's
# biomarker_code is unknown). Not mapped on purpose: other eGFR equations, 25-OH vitamin D3
# only (1989-3), standard CRP (1988-5), glucose not known to be fasting (2345-7, 14749-6).
LOINC_ALIASES: Final = {
    "17856-6": "hba1c",  # HbA1c by HPLC
    "59261-8": "hba1c",  # HbA1c IFCC (mmol/mol)
    "14771-0": "glucose_fasting",  # fasting glucose, moles/volume
    "14647-2": "cholesterol_total",  # cholesterol, moles/volume
    "13457-7": "ldl_c",  # LDL calculated
    "18262-6": "ldl_c",  # LDL direct
    "14682-9": "creatinine",  # creatinine, moles/volume
    "20570-8": "hematocrit",  # hematocrit, generic
}

FIELDS: Final = (*contract.RECORD_FIELDS, *contract.RECORD_OPTIONAL_FIELDS)
REJECT_COLUMNS: Final = ("user_id", "content_hash", "result_id", "reason", "payload")
_REVISION_MAX: Final = 2**31 - 1
_FLOAT_COLUMNS: Final = (
    "value_source",
    "value_canonical",
    "reference_low_source",
    "reference_high_source",
    "reference_low_canonical",
    "reference_high_canonical",
)
_TIME_COLUMNS: Final = ("collected_at", "parsed_at", "updated_at")
_TIME_DTYPE: Final = "datetime64[us, UTC]"
# What Python's datetime (hence every driver) can hold; pandas parses years 0 and 10000 too.
_EARLIEST: Final = pd.Timestamp("0001-01-01T00:00:00", tz="UTC")
_LATEST: Final = pd.Timestamp("9999-12-31T23:59:59.999999", tz="UTC")

# value_text: an optional censoring operator, then a plain decimal number.
_VALUE_TEXT: Final = re.compile(
    r"^\s*(?P<op><=|>=|=<|=>|<|>|≤|≥)?\s*(?P<num>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*$"
)
_OPERATORS: Final = {
    **dict.fromkeys(("<",), "<"),
    **dict.fromkeys(("<=", "=<", "≤"), "<="),
    **dict.fromkeys((">",), ">"),
    **dict.fromkeys((">=", "=>", "≥"), ">="),
}
# A time of day followed by a zone designator: Z, ±hh, ±hhmm or ±hh:mm.
_ZONED: Final = re.compile(
    r"\d[T ]\d{2}(?::?\d{2}(?::?\d{2}(?:[.,]\d+)?)?)?\s*(?:Z|[+-]\d{2}(?::?\d{2})?)$",
    re.IGNORECASE,
)
_PADDED: Final = re.compile(r"(?:^|\n)\s|\s(?:\n|$)")
_SUBMICRO: Final = r"([.,]\d{6})\d+"


def _max_length(column: str) -> int | None:
    """The VARCHAR length of a result column, None for TEXT."""
    return schema.varchar_length(schema.biomarker_results.c[column])


# Source field -> the result column that stores it verbatim (for length limits).
_STORED_AS: Final = {
    "id": "result_id",
    "patient_id": "patient_id",
    "biomarker_code": "biomarker_code",
    "biomarker_name": "biomarker_name",
    "unit": "unit_source",
    "loinc": "loinc_source",
    "value_text": "value_text",
    "lab": "lab",
    "collected_at": "collected_at_source",
}


def _text_reasons(field: str) -> tuple[str, ...]:
    reasons = [f"{field} is not a string"]
    if (limit := _max_length(_STORED_AS[field])) is not None:
        reasons.append(f"{field} is longer than {limit} characters")
    reasons.append(f"{field} has characters that cannot be stored")
    return tuple(reasons)


def _number_reasons(field: str) -> tuple[str, ...]:
    return (f"{field} is not a number", f"{field} is not finite")


def _zoned_time_reasons(field: str, *, required: bool) -> tuple[str, ...]:
    missing = (f"{field} is missing",) if required else ()
    return (*missing, f"{field} is not a timestamp", f"{field} has no timezone")


NOT_AN_OBJECT: Final = "record is not a JSON object"
NO_RESULT: Final = "value and value_text are both missing"
# Every reason a record can be rejected for, in the order they are checked.
REJECT_REASONS: Final = (
    NOT_AN_OBJECT,
    "id is missing",
    *_text_reasons("id"),
    "id is empty",
    *_text_reasons("patient_id"),
    *_text_reasons("biomarker_code"),
    *_text_reasons("biomarker_name"),
    *_number_reasons("value"),
    *_text_reasons("unit"),
    *_number_reasons("reference_low"),
    *_number_reasons("reference_high"),
    "collected_at is missing",
    "collected_at is not a timestamp",
    f"collected_at is longer than {_max_length('collected_at_source')} characters",
    *_zoned_time_reasons("parsed_at", required=True),
    *_text_reasons("loinc"),
    *_text_reasons("value_text"),
    NO_RESULT,
    *_text_reasons("lab"),
    *_zoned_time_reasons("updated_at", required=False),
    "revision is not a positive integer",
    "revision is too large",
)
_REASON_INDEX: Final = {reason: i for i, reason in enumerate(REJECT_REASONS, start=1)}
_REASON_LABELS: Final = np.array(["", *REJECT_REASONS], dtype=object)


@dataclass(frozen=True, eq=False)
class Normalized:
    """What became of a batch of records: every record is in exactly one of the two frames."""

    results: pd.DataFrame  # exactly schema.RESULT_COLUMN_NAMES, in order
    rejects: pd.DataFrame  # REJECT_COLUMNS: user_id, content_hash, result_id, reason, payload


# --- The catalog, as lookup tables ---------------------------------------------------------
@dataclass(frozen=True)
class _Catalog:
    # Per marker (position m; arrays have one more slot, at -1, for "no marker").
    catalog_code: Objects
    loinc: Objects
    unit_canonical: Objects
    plausible_min: Floats
    plausible_max: Floats
    by_loop_code: pd.Series  # loop_code -> marker position
    by_loinc: pd.Series  # LOINC (the catalog's, then aliases) -> marker position
    # Per catalog unit row (position u; one more slot at -1 for "no unit").
    factor: Floats
    offset: Floats
    units: pd.Series  # "marker|unit key" -> unit row
    folded: pd.Series  # "marker|case-folded unit key" -> unit row, for unambiguous ones only


def _unit_key(units: pd.Series) -> pd.Series:
    """The spelling-noise-free form of units: outer whitespace stripped, µ and μ as u."""
    return units.str.strip().str.replace("[µμ]", "u", regex=True)


def _folded_key(units: pd.Series) -> pd.Series:
    return _unit_key(units.str.lower())


@functools.cache
def _catalog() -> _Catalog:
    rows = pd.DataFrame([asdict(row) for row in load_catalog()])
    markers = rows.drop_duplicates("code").reset_index(drop=True)
    position = pd.Series(markers.index.to_numpy(), index=markers["code"])
    by_loop_code = pd.Series(position.to_numpy(), index=markers["loop_code"].to_numpy())
    by_loop_code = by_loop_code[~by_loop_code.index.duplicated()]
    aliases = pd.Series(LOINC_ALIASES).map(position)
    by_loinc = pd.concat(
        [pd.Series(position.to_numpy(), index=markers["loinc"].to_numpy()), aliases]
    )
    by_loinc = by_loinc[~by_loinc.index.duplicated()].astype(np.int64)

    def with_blank(values: pd.Series, blank: Any) -> Any:
        return np.append(values.to_numpy(dtype=object if blank is None else np.float64), blank)

    marker_of_row = rows["code"].map(position).to_numpy(np.int64)
    units = pd.DataFrame(
        {
            "exact": _pair_keys(marker_of_row, _unit_key(rows["unit"].astype(object))),
            "folded": _pair_keys(marker_of_row, _folded_key(rows["unit"].astype(object))),
            "row": np.arange(len(rows), dtype=np.int64),
        }
    ).drop_duplicates("exact")
    unambiguous = units[~units.duplicated("folded", keep=False)]
    factor, offset = rows["factor"].astype(np.float64), rows["offset"].astype(np.float64)
    return _Catalog(
        catalog_code=with_blank(markers["code"], None),
        loinc=with_blank(markers["loinc"], None),
        unit_canonical=with_blank(markers["canonical_unit"], None),
        plausible_min=with_blank(markers["plausible_min"], np.nan),
        plausible_max=with_blank(markers["plausible_max"], np.nan),
        by_loop_code=by_loop_code,
        by_loinc=by_loinc,
        factor=with_blank(factor, np.nan),
        offset=with_blank(offset.where(factor.isna(), offset.fillna(0.0)), np.nan),
        units=pd.Series(units["row"].to_numpy(), index=units["exact"].to_numpy()),
        folded=pd.Series(unambiguous["row"].to_numpy(), index=unambiguous["folded"].to_numpy()),
    )


# --- Field checks: each appends its (rows, reason) problems and returns the clean column ---
Problems = list[tuple[Bools, str]]


def _present(column: pd.Series) -> Bools:
    return np.array(column.notna(), dtype=bool)  # a writable copy


def _keep(values: Objects, keep: Bools) -> Objects:
    """The values where keep is true, None elsewhere (a new object array)."""
    kept = np.array(values, dtype=object)
    kept[~keep] = None
    return kept


def _spread(uniques: Objects, codes: Ints) -> Objects:
    """uniques[codes], with None where a code is -1."""
    return np.append(uniques, np.array([None], dtype=object))[codes]


@dataclass(frozen=True)
class _Strings:
    """A field's JSON strings: where it is present at all, where it is a string, and the
    strings themselves, factorized (codes -1 where there is no string)."""

    present: Bools
    is_text: Bools
    codes: Ints
    uniques: Objects


def _strings(column: pd.Series, *, distinct: bool = True) -> _Strings:
    """A C scan (``infer_dtype``) says whether the field holds only strings; only a mixed
    column pays for a ``map(type)``. ``distinct=False`` skips hashing for fields such as ids,
    where every string is its own."""
    values = column.to_numpy(object)
    if pd.api.types.infer_dtype(values, skipna=True) in {"string", "empty"}:
        if distinct:
            codes, uniques = pd.factorize(values)
            return _Strings(codes >= 0, codes >= 0, codes, np.asarray(uniques, dtype=object))
        present = _present(column)
        is_text = present.copy()
    else:
        present = _present(column)
        is_text = np.array(column.map(type) == str, dtype=bool)  # noqa: E721 - exact JSON type
        values = _keep(values, is_text)
    if distinct:
        codes, uniques = pd.factorize(values)
        return _Strings(present, is_text, codes, np.asarray(uniques, dtype=object))
    codes = np.where(is_text, np.cumsum(is_text) - 1, -1)
    return _Strings(present, is_text, codes, values[is_text])


@dataclass(frozen=True)
class _Text:
    """A text field: its storable strings (None elsewhere), factorized."""

    values: Objects
    codes: Ints  # position in uniques, -1 where values is None
    uniques: Objects

    def per_row(self, per_unique: npt.NDArray[Any], blank: Any) -> npt.NDArray[Any]:
        """Spread one value per distinct string back to the rows (blank where None)."""
        return np.append(per_unique, np.array([blank], dtype=per_unique.dtype))[self.codes]


def _text(column: pd.Series, field: str, problems: Problems, *, distinct: bool = True) -> _Text:
    """A string field. Not a string, longer than its warehouse column, or holding characters
    PostgreSQL refuses: a problem. Checks run once per distinct string (``distinct=False``
    for fields such as ids, where every string is its own)."""
    found = _strings(column, distinct=distinct)
    codes, uniques = found.codes, found.uniques
    problems.append((found.present & ~found.is_text, f"{field} is not a string"))
    texts = pd.Series(uniques, dtype=object)
    storable = np.ones(len(uniques), dtype=bool)
    if (limit := _max_length(_STORED_AS[field])) is not None and len(uniques):
        long = np.array(texts.str.len() > limit, dtype=bool)
        problems.append(
            (np.append(long, False)[codes], f"{field} is longer than {limit} characters")
        )
        storable &= ~long
    if schema.UNSTORABLE_TEXT.search("".join(uniques)):  # one scan of all the text, usually clean
        bad = np.array(texts.str.contains(schema.UNSTORABLE_TEXT.pattern), dtype=bool)
        problems.append(
            (np.append(bad, False)[codes], f"{field} has characters that cannot be stored")
        )
        storable &= ~bad
    codes = np.where(np.append(storable, False)[codes], codes, -1).astype(np.int64)
    return _Text(_spread(uniques, codes), codes, uniques)


def _to_float(value: Any) -> float:
    """A JSON number (int or float, never bool) as a float; None for anything else is NaN."""
    if value is None:
        return float("nan")
    try:
        return float(value)
    except OverflowError:  # an integer beyond the range of a double
        return float("inf") if value > 0 else float("-inf")


@dataclass(frozen=True)
class _Numbers:
    values: Floats  # NaN where null, not a number or infinite
    not_number: Bools  # present but not a JSON number (a string, a boolean, an object...)
    infinite: Bools


_NUMERIC_KINDS: Final = frozenset({"floating", "integer", "mixed-integer-float", "empty"})


def _numbers(column: pd.Series) -> _Numbers:
    values: Floats | None = None
    if pd.api.types.infer_dtype(column, skipna=True) in _NUMERIC_KINDS:
        with contextlib.suppress(OverflowError):  # a huge integer: the slow path says inf
            values = np.asarray(column.astype(np.float64), dtype=np.float64)
            not_number = np.zeros(len(column), dtype=bool)
    if values is None:
        is_number = np.array(column.map(type).isin([int, float, NonFinite]), dtype=bool)
        not_number = _present(column) & ~is_number
        numbers = _keep(column.to_numpy(object), is_number)
        values = pd.Series(numbers, dtype=object).map(_to_float).to_numpy(np.float64)
    infinite = np.isinf(values)
    return _Numbers(np.where(infinite, np.nan, values), not_number, infinite)


def _number(column: pd.Series, field: str, problems: Problems) -> Floats:
    """A JSON number field as float64 (NaN for null); other types and ±inf are problems."""
    numbers = _numbers(column)
    problems.append((numbers.not_number, f"{field} is not a number"))
    problems.append((numbers.infinite, f"{field} is not finite"))
    return numbers.values


def _revision(column: pd.Series, problems: Problems) -> Ints:
    """A positive 32-bit integer; absent or null means the default."""
    numbers = _numbers(column)
    values = numbers.values
    given = ~np.isnan(values)
    with np.errstate(invalid="ignore"):
        integral = given & (np.floor(values) == values)
        usable = integral & (values >= 1) & (values <= _REVISION_MAX)
    wrong = numbers.not_number | numbers.infinite | (given & ~integral) | (integral & (values < 1))
    problems.append((wrong, "revision is not a positive integer"))
    problems.append((integral & (values > _REVISION_MAX), "revision is too large"))
    return np.where(usable, values, contract.REVISION_DEFAULT).astype(np.int64)


@dataclass(frozen=True)
class _Times:
    utc: pd.api.extensions.ExtensionArray  # datetime64[us, UTC]; NaT if absent, bad or naive
    verbatim: Objects  # the string as sent where it parsed (None elsewhere)
    naive: Bools  # parsed, but without a zone


def _times(column: pd.Series, field: str, problems: Problems, *, required: bool) -> _Times:
    """An ISO 8601 field, each distinct string parsed once; mixed UTC offsets are fine."""
    found = _strings(column)
    if required:
        problems.append((~found.present, f"{field} is missing"))
    problems.append((found.present & ~found.is_text, f"{field} is not a timestamp"))
    codes, uniques = found.codes, found.uniques
    texts = pd.Series(uniques, dtype=object)
    usable = np.ones(len(texts), dtype=bool)
    if field == "collected_at" and len(texts):  # kept verbatim in a VARCHAR column
        limit = _max_length("collected_at_source") or 0
        long = np.array(texts.str.len() > limit, dtype=bool)
        problems.append(
            (np.append(long, False)[codes], f"{field} is longer than {limit} characters")
        )
        usable &= ~long
    stripped = texts
    if _PADDED.search("\n".join(texts)):  # rare: whitespace around a timestamp
        stripped = texts.str.strip()
    if re.search(_SUBMICRO, "\n".join(stripped)):  # rare: drop digits below a microsecond
        stripped = stripped.str.replace(_SUBMICRO, r"\1", regex=True)
    moments = pd.to_datetime(stripped, utc=True, format="ISO8601", errors="coerce")
    moments = moments.astype(_TIME_DTYPE)
    usable &= np.array((moments >= _EARLIEST) & (moments <= _LATEST), dtype=bool)  # NaT: no
    zoned = np.array(stripped.str.contains(_ZONED.pattern, flags=_ZONED.flags), dtype=bool)
    parsed = np.append(usable, False)[codes]
    problems.append((found.is_text & ~parsed, f"{field} is not a timestamp"))
    naive = parsed & ~np.append(zoned, False)[codes]
    if field != "collected_at":
        problems.append((naive, f"{field} has no timezone"))
    utc = moments.mask(~(usable & zoned)).array.take(codes, allow_fill=True)
    verbatim = _spread(uniques, np.where(parsed, codes, -1))
    return _Times(utc=utc, verbatim=verbatim, naive=naive)


@dataclass(frozen=True)
class _Result:
    number: Floats  # the number in value_text, NaN if it holds none
    operator: Objects  # its censoring operator (<, <=, >, >=), None if none
    blank: Bools  # value_text is absent, empty or only whitespace


def _value_text(text: _Text) -> _Result:
    """Parse each distinct value_text once."""
    texts = pd.Series(text.uniques, dtype=object)
    parts = texts.str.extract(_VALUE_TEXT.pattern)
    numbers = pd.to_numeric(parts["num"], errors="coerce").to_numpy(np.float64)
    numbers = np.where(np.isfinite(numbers), numbers, np.nan)
    operators = parts["op"].astype(object).map(_OPERATORS).to_numpy(object)
    operators = _keep(operators, ~np.isnan(numbers) & pd.notna(operators))
    blank = np.array(texts.str.strip() == "", dtype=bool)
    return _Result(
        number=text.per_row(numbers, np.nan),
        operator=text.per_row(operators, None),
        blank=text.per_row(blank, True),
    )


def _resolve_units(catalog: _Catalog, marker: Ints, unit: _Text) -> Ints:
    """The catalog unit row of each (marker, unit) pair, -1 if none; resolved once per pair."""
    width = len(unit.uniques) + 1
    pair_codes, pair_uniques = pd.factorize(marker * width + unit.codes + 1)
    pairs = np.asarray(pair_uniques, dtype=np.int64)
    spelled = pd.Series(_spread(unit.uniques, pairs % width - 1), dtype=object)
    markers = pairs // width
    exact = catalog.units.reindex(_pair_keys(markers, _unit_key(spelled))).to_numpy(np.float64)
    folded = catalog.folded.reindex(_pair_keys(markers, _folded_key(spelled)))
    rows = np.where(np.isnan(exact), folded.to_numpy(np.float64), exact)
    return np.nan_to_num(rows, nan=-1).astype(np.int64)[pair_codes]


def _pair_keys(markers: npt.NDArray[np.int64], units: pd.Series) -> Objects:
    """One string per (marker, unit key) pair, to look pairs up in a flat index."""
    numbers = pd.Series(markers, dtype=np.int64).astype(str).to_numpy(object)
    keys: Objects = numbers + "|" + units.fillna("\x00").to_numpy(object)
    return keys


def _lookup(text: _Text, table: pd.Series) -> Floats:
    """Look each distinct string up in a small table: its value, NaN if absent."""
    found = table.reindex(text.uniques).to_numpy(np.float64)
    return text.per_row(found, np.nan)


def _payload(record: Any) -> str:
    try:
        return json.dumps(record, sort_keys=True, default=repr)
    except (TypeError, ValueError):  # keys that cannot be sorted, or a cycle: not from JSON
        return json.dumps(repr(record))


# --- The normalizer -------------------------------------------------------------------------
def normalize(
    user_ids: Sequence[str], records: Sequence[Any], content_hashes: Sequence[str]
) -> Normalized:
    """records[i] (any JSON value, as Loop sent it) belongs to user_ids[i] and has
    content_hashes[i]. Every record ends up in exactly one of results and rejects."""
    count = len(records)
    if len(user_ids) != count or len(content_hashes) != count:
        msg = "user_ids, records and content_hashes must have the same length"
        raise ValueError(msg)
    users = _object_array(user_ids)
    hashes = _object_array(content_hashes)
    listed = records if isinstance(records, list) else list(records)
    boxed = pd.Series(listed, dtype=object)
    is_object = np.array(boxed.map(type) == dict, dtype=bool)  # noqa: E721 - what json makes
    if not is_object.all():  # anything else that is still a mapping of names
        others = ~is_object
        is_object[others] = np.array(boxed[others].map(_is_object), dtype=bool)
        listed = boxed[is_object].tolist()
    objects = np.flatnonzero(is_object)
    raw = pd.DataFrame(listed, columns=list(FIELDS), dtype=object)
    columns, reasons, ids = _rows(raw, users[objects], hashes[objects])

    reason_of = np.full(count, _REASON_INDEX[NOT_AN_OBJECT], dtype=np.int64)
    reason_of[objects] = reasons
    id_of = np.full(count, None, dtype=object)
    id_of[objects] = ids
    rejected = np.flatnonzero(reason_of)
    rejects = pd.DataFrame(
        {
            "user_id": users[rejected],
            "content_hash": hashes[rejected],
            "result_id": id_of[rejected],
            "reason": _REASON_LABELS[reason_of[rejected]],
            "payload": boxed.iloc[rejected].map(_payload).to_numpy(object),
        },
        columns=list(REJECT_COLUMNS),
        dtype=object,  # keeps None as None
    )
    accepted = reasons == 0
    if not accepted.all():
        columns = {name: values[accepted] for name, values in columns.items()}
    return Normalized(results=_frame(columns), rejects=rejects)


def _object_array(values: Sequence[Any]) -> Objects:
    return pd.Series(values if isinstance(values, list) else list(values), dtype=object).to_numpy()


def _is_object(record: Any) -> bool:
    return isinstance(record, dict)


def _rows(
    raw: pd.DataFrame, users: Objects, hashes: Objects
) -> tuple[dict[str, Any], Ints, Objects]:
    """Every JSON-object record as a result row (column arrays); each one's reject reason
    (0: none, else an index into _REASON_LABELS); and its id if a storable non-empty string."""
    catalog = _catalog()
    problems: Problems = []

    # Structure, in REJECT_REASONS order: the first problem found is the reason.
    problems.append((~_present(raw["id"]), "id is missing"))
    result_id = _text(raw["id"], "id", problems, distinct=False)
    empty_id = np.array(result_id.values == "", dtype=bool)
    problems.append((empty_id, "id is empty"))
    patient_id = _text(raw["patient_id"], "patient_id", problems)
    code = _text(raw["biomarker_code"], "biomarker_code", problems)
    name = _text(raw["biomarker_name"], "biomarker_name", problems)
    value = _number(raw["value"], "value", problems)
    unit = _text(raw["unit"], "unit", problems)
    reference_low = _number(raw["reference_low"], "reference_low", problems)
    reference_high = _number(raw["reference_high"], "reference_high", problems)
    collected = _times(raw["collected_at"], "collected_at", problems, required=True)
    parsed = _times(raw["parsed_at"], "parsed_at", problems, required=True)
    loinc = _text(raw["loinc"], "loinc", problems)
    value_text = _text(raw["value_text"], "value_text", problems)
    result = _value_text(value_text)
    problems.append((np.isnan(value) & result.blank, NO_RESULT))
    lab = _text(raw["lab"], "lab", problems)
    updated = _times(raw["updated_at"], "updated_at", problems, required=False)
    revision = _revision(raw["revision"], problems)
    reasons = np.zeros(len(raw), dtype=np.int64)
    for rows, reason in problems:
        reasons[(reasons == 0) & rows] = _REASON_INDEX[reason]

    # Meaning: which marker, which unit row, which number; then the flags.
    by_code = _lookup(code, catalog.by_loop_code)
    by_loinc = _lookup(loinc, catalog.by_loinc)
    marker = np.nan_to_num(np.where(np.isnan(by_code), by_loinc, by_code), nan=-1).astype(np.int64)
    unit_row = _resolve_units(catalog, marker, unit)
    known_unit = unit_row >= 0
    factor, offset = catalog.factor[unit_row], catalog.offset[unit_row]
    convertible = known_unit & ~np.isnan(factor)
    value_source = np.where(np.isnan(result.number), value, result.number)

    def canonical(source: Floats) -> Floats:
        with np.errstate(over="ignore", invalid="ignore"):
            converted = source * factor + offset
        return np.where(np.isfinite(converted), converted, np.nan)

    value_canonical = canonical(value_source)
    overflow = convertible & ~np.isnan(value_source) & np.isnan(value_canonical)
    with np.errstate(invalid="ignore"):
        outside = (value_canonical < catalog.plausible_min[marker]) | (
            value_canonical > catalog.plausible_max[marker]
        )
    flagged = {
        CENSORED: np.array(pd.notna(result.operator), dtype=bool),
        IMPLAUSIBLE: overflow | outside,
        NAIVE_TIMESTAMP: collected.naive,
        NON_CONVERTIBLE_UNIT: known_unit & ~convertible,
        TEXT_RESULT: ~result.blank & np.isnan(value_source),
        UNKNOWN_CODE: marker < 0,
        UNKNOWN_UNIT: (marker >= 0) & ~known_unit,
    }
    bits = np.zeros(len(raw), dtype=np.int64)
    for position, flag in enumerate(FLAGS):
        bits |= flagged[flag].astype(np.int64) << position

    status = _strings(raw["status"])
    statuses = _keep(status.uniques, np.isin(status.uniques, contract.RECORD_STATUSES))
    columns: dict[str, Any] = {
        "result_id": result_id.values,
        "user_id": users,
        "patient_id": patient_id.values,
        "biomarker_code": code.values,
        "biomarker_name": name.values,
        "catalog_code": catalog.catalog_code[marker],
        "loinc": catalog.loinc[marker],
        "loinc_source": loinc.values,
        "value_source": value_source,
        "value_text": value_text.values,
        "value_operator": result.operator,
        "unit_source": unit.values,
        "value_canonical": value_canonical,
        "unit_canonical": _keep(catalog.unit_canonical[marker], convertible),
        "reference_low_source": reference_low,
        "reference_high_source": reference_high,
        "reference_low_canonical": canonical(reference_low),
        "reference_high_canonical": canonical(reference_high),
        "loop_status": _spread(statuses, status.codes),
        "collected_at": collected.utc,
        "collected_at_source": collected.verbatim,
        "parsed_at": parsed.utc,
        "updated_at": updated.utc,
        "revision": revision,
        "lab": lab.values,
        "quality_flags": _FLAG_LABELS[bits],
        "content_hash": hashes,
    }
    return columns, reasons, _keep(result_id.values, ~empty_id)


def _dtype(column: str) -> Any:
    if column in _FLOAT_COLUMNS:
        return np.float64
    if column in _TIME_COLUMNS:
        return _TIME_DTYPE
    return np.int64 if column == "revision" else object


def _frame(columns: dict[str, Any]) -> pd.DataFrame:
    """The results frame in the documented dtypes. Each column is a Series of its dtype, so
    that pandas infers no ``str`` dtype (with NaN) for text holding None; ``copy=False``
    keeps one block per column instead of copying them all into one."""
    return pd.DataFrame(
        {
            name: pd.Series(columns.get(name, []), dtype=_dtype(name), copy=False)
            for name in schema.RESULT_COLUMN_NAMES
        },
        copy=False,
    )
