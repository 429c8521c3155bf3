"""normalize() on generated records: plausible ones, damaged ones and plain garbage.

Whatever comes in, it never raises, every record lands exactly once, and the frames keep
their columns and dtypes.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loop_sync.catalog import load_catalog
from loop_sync.normalize import FLAGS, REJECT_COLUMNS, REJECT_REASONS, normalize
from loop_sync.schema import RESULT_COLUMN_NAMES
from tests.normalize.columns import FLOAT_COLUMNS, TEXT_COLUMNS, TIME_COLUMNS

Record = dict[str, Any]
CATALOG = load_catalog()
CODES = [*sorted({row.loop_code for row in CATALOG}), "vitamin-k2", "omega-3-index", ""]
UNITS = [*sorted({row.unit for row in CATALOG}), "mg/dl ", "mmol/l", "µmol/L", "%", "", "?"]
UNITS_OF: dict[str, list[str]] = {}
for _row in CATALOG:
    UNITS_OF.setdefault(_row.loop_code, []).append(_row.unit)
ODD_REVISIONS = [2.0, 2.5, 2**31, True, "2", float("inf")]
LOINCS = [*sorted({row.loinc for row in CATALOG}), "13457-7", "1989-3", "0-0"]
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- Strategies ---------------------------------------------------------------------------

odd_text = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ["", " ", "\x00", "\ud800", "NaN", "null", "<", "<=", "1e999", "-0", "≥"]
)
numbers = (
    st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, -0.0, 1e308, -1e308, 5e-324, 2**53 + 1, 10**400, -(10**400)])
)
json_scalars = st.none() | st.booleans() | numbers | odd_text
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def timestamps(draw: st.DrawFn) -> str:
    """ISO 8601 in the spellings labs use: Z, offsets with and without colon, no zone, date
    only, fractions up to nanoseconds, a space for T; at any date from year 1 to 9999."""
    moment = draw(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
    text = moment.isoformat(timespec=draw(st.sampled_from(["seconds", "minutes", "microseconds"])))
    zone = draw(
        st.sampled_from(["Z", "", "+00:00", "-05:00", "+0530", "+14:00", "-12:00", "+01", "nanos"])
    )
    if zone == "nanos":
        text = moment.isoformat(timespec="microseconds") + "789Z"
    else:
        text += zone
    if draw(st.booleans()):
        text = text.replace("T", " ")
    if draw(st.integers(0, 9)) == 0:
        text = text[:10]
    return text


aware_times = st.builds(
    lambda moment, minutes: moment.replace(tzinfo=timezone(timedelta(minutes=minutes))).isoformat(),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    st.integers(-14 * 60, 14 * 60),
)


value_texts = st.sampled_from(["<0.5", "> 1000", "<=10", "≥2000", "≤ 3", "TNP", "Positive"]) | (
    st.tuples(st.sampled_from(["", "<", ">", "<=", ">=", "=<", "≤"]), numbers).map(
        lambda pair: f"{pair[0]}{pair[1]}"
    )
)


def mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """common nine times in ten, rare otherwise."""
    return st.integers(0, 9).flatmap(lambda k: rare if k == 0 else common)


@st.composite
def plausible_records(draw: st.DrawFn) -> Record:
    """Records shaped like Loop's, with realistic variety, and damage now and then."""
    code = draw(st.sampled_from(CODES))
    units = UNITS_OF.get(code, ["ng/mL", "%"])
    record: Record = {
        "id": draw(mostly(st.integers(0, 10**6).map(lambda n: f"res_{n}"), st.text(max_size=20))),
        "patient_id": draw(st.sampled_from(["pat_1", "pat_2"])),
        "biomarker_code": code,
        "biomarker_name": draw(st.text(max_size=10)),
        "value": draw(mostly(st.floats(-1e6, 1e6) | st.integers(-(10**6), 10**6), st.none())),
        "unit": draw(mostly(st.sampled_from(units), st.sampled_from(UNITS) | odd_text)),
        "reference_low": draw(st.none() | st.floats(0, 1e4)),
        "reference_high": draw(st.none() | st.floats(0, 1e4)),
        "status": draw(st.sampled_from(["normal", "low", "high", "critical", "H", ""])),
        "collected_at": draw(timestamps()),
        "parsed_at": draw(mostly(aware_times, timestamps())),
    }
    optional = {
        "loinc": st.none() | st.sampled_from(LOINCS),
        "value_text": st.none() | value_texts,
        "lab": st.none() | st.text(max_size=8),
        "updated_at": st.none() | mostly(aware_times, timestamps()),
        "revision": mostly(st.integers(1, 5), st.integers(-2, 0) | st.sampled_from(ODD_REVISIONS)),
        "specimen": json_values,  # an extra field
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            record[name] = draw(strategy)
    damaged = draw(
        mostly(st.just([]), st.lists(st.sampled_from(sorted(record)), max_size=2, unique=True))
    )
    for name in damaged:
        if draw(st.booleans()):
            del record[name]
        else:
            record[name] = draw(json_values)
    return record


records_strategy = st.lists(
    st.one_of(plausible_records(), plausible_records(), json_values), min_size=0, max_size=25
)


# --- Properties -----------------------------------------------------------------------------


def check_invariants(records: list[Any]) -> None:
    users = [f"usr_{i % 3}" for i in range(len(records))]
    hashes = [f"{i:064x}" for i in range(len(records))]
    out = normalize(users, records, hashes)
    results, rejects = out.results, out.rejects

    assert len(results) + len(rejects) == len(records)
    landed = [*results["content_hash"], *rejects["content_hash"]]
    assert sorted(landed) == hashes  # each exactly once
    owner = dict(zip(hashes, users, strict=True))
    assert all(
        owner[h] == u for h, u in zip(results["content_hash"], results["user_id"], strict=True)
    )
    assert all(
        owner[h] == u for h, u in zip(rejects["content_hash"], rejects["user_id"], strict=True)
    )

    assert tuple(results.columns) == RESULT_COLUMN_NAMES
    for name, dtype in results.dtypes.items():
        if name in FLOAT_COLUMNS:
            assert dtype == np.float64, name
        elif name in TIME_COLUMNS:
            assert str(dtype) == "datetime64[us, UTC]", name
        elif name == "revision":
            assert dtype == np.int64, name
        else:
            assert dtype == np.dtype(object), name
    for name in TEXT_COLUMNS:
        assert all(value is None or isinstance(value, str) for value in results[name]), name
    for name in FLOAT_COLUMNS:
        assert not np.isinf(results[name]).any(), name
    assert (results["revision"] >= 1).all()
    assert results["result_id"].map(lambda v: isinstance(v, str) and 0 < len(v) <= 255).all()
    assert results["value_operator"].isin([None, "<", "<=", ">", ">="]).all()
    assert results["loop_status"].isin([None, "normal", "low", "high", "critical"]).all()
    for text in results["quality_flags"]:
        flags = text.split(",") if text else []
        assert flags == sorted(set(flags))
        assert set(flags) <= set(FLAGS)

    assert tuple(rejects.columns) == REJECT_COLUMNS
    assert rejects["reason"].map(lambda r: isinstance(r, str) and r != "").all()
    assert rejects["reason"].isin(REJECT_REASONS).all()
    for payload in rejects["payload"]:
        assert json.dumps(json.loads(payload), sort_keys=True) == payload


@SETTINGS
@given(records_strategy)
def test_normalize_never_raises_and_places_every_record_once(records: list[Any]) -> None:
    check_invariants(records)


@SETTINGS
@given(st.lists(json_values, max_size=20))
def test_garbage_is_rejected_not_raised(records: list[Any]) -> None:
    check_invariants(records)
    out = normalize(["u"] * len(records), records, [str(i) for i in range(len(records))])
    not_objects = sum(not isinstance(record, dict) for record in records)
    assert (out.rejects["reason"] == "record is not a JSON object").sum() == not_objects


@settings(SETTINGS, max_examples=60)
@given(st.lists(plausible_records(), min_size=2, max_size=8))
def test_a_record_comes_out_the_same_alone_or_in_a_batch(records: list[Record]) -> None:
    """Nothing about one record (resolution of its dates, its unit...) depends on the others."""
    hashes = [str(i) for i in range(len(records))]
    batch = normalize(["u"] * len(records), records, hashes)
    together = _outcomes(batch.results, batch.rejects)
    for i, record in enumerate(records):
        alone = normalize(["u"], [record], [hashes[i]])
        assert _outcomes(alone.results, alone.rejects)[hashes[i]] == together[hashes[i]]


def _outcomes(results: pd.DataFrame, rejects: pd.DataFrame) -> dict[str, Any]:
    out: dict[str, Any] = {
        h: ("reject", r) for h, r in zip(rejects["content_hash"], rejects["reason"], strict=True)
    }
    for row in results.astype(object).where(results.notna(), None).to_dict("records"):
        out[row["content_hash"]] = tuple(
            "nan" if isinstance(v, float) and math.isnan(v) else v for v in row.values()
        )
    return out


CONVERTIBLE = [row for row in CATALOG if row.factor is not None]


@settings(SETTINGS, max_examples=100)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(CONVERTIBLE),
            st.floats(0, 1e5),
            st.sampled_from(["", "<", ">=", "≤"]),
            st.booleans(),
        ),
        min_size=1,
        max_size=20,
    )
)
def test_canonical_value_is_value_times_factor_plus_offset(
    cases: list[tuple[Any, float, str, bool]],
) -> None:
    """An oracle from the catalog: any known unit, any value, censored or not."""
    records = [
        {
            "id": f"r{i}",
            "biomarker_code": unit.loop_code,
            "unit": unit.unit,
            "value": None if censor and as_text else value,
            "value_text": f"{censor}{value!r}" if censor else None,
            "collected_at": "2026-01-10T08:30:00+01:00",
            "parsed_at": "2026-01-10T12:00:00Z",
        }
        for i, (unit, value, censor, as_text) in enumerate(cases)
    ]
    out = normalize(["u"] * len(records), records, [str(i) for i in range(len(records))])
    assert out.rejects.empty
    rows = out.results.to_dict("records")
    for (unit, value, censor, _), row in zip(cases, rows, strict=True):
        assert row["catalog_code"] == unit.code
        assert row["unit_canonical"] == unit.canonical_unit
        assert row["value_source"] == value
        canonical = row["value_canonical"]
        assert math.isclose(canonical, value * unit.factor + (unit.offset or 0.0))
        assert (row["value_operator"] is not None) == bool(censor)
        implausible = not unit.plausible_min <= canonical <= unit.plausible_max
        assert ("implausible" in row["quality_flags"].split(",")) == implausible
