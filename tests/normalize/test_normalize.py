"""normalize(): raw Loop records in, warehouse rows and rejects out, one literal case at a time."""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest

from loop_sync import normalize as normalize_module
from loop_sync.catalog import CatalogUnit, load_catalog
from loop_sync.normalize import (
    FIELDS,
    FLAGS,
    REJECT_COLUMNS,
    REJECT_REASONS,
    Normalized,
    normalize,
)
from loop_sync.sandbox.data import SyntheticResults
from loop_sync.schema import RESULT_COLUMN_NAMES
from tests.normalize.columns import FLOAT_COLUMNS, TEXT_COLUMNS, TIME_COLUMNS

Record = dict[str, Any]
MISSING = object()  # a key to delete from the base record

BASE: Record = {
    "id": "res_0001",
    "patient_id": "pat_1",
    "biomarker_code": "ldl-c",
    "biomarker_name": "LDL cholesterol",
    "value": 100.0,
    "unit": "mg/dL",
    "reference_low": 50.0,
    "reference_high": 130.0,
    "status": "normal",
    "collected_at": "2026-01-10T08:30:00Z",
    "parsed_at": "2026-01-10T12:00:00Z",
    "loinc": "2089-1",
    "lab": "Quest Diagnostics",
}


def record(**changes: Any) -> Record:
    """BASE with some fields changed; a field set to MISSING is removed."""
    out = BASE | changes
    return {key: value for key, value in out.items() if value is not MISSING}


def run(*records: Any, user: str = "usr_1") -> Normalized:
    hashes = [f"hash_{i}" for i in range(len(records))]
    return normalize([user] * len(records), list(records), hashes)


def row(**changes: Any) -> pd.Series:
    """The one result row of record(**changes), which must not be rejected."""
    out = run(record(**changes))
    assert out.rejects.empty, out.rejects["reason"].tolist()
    assert len(out.results) == 1
    return out.results.iloc[0]


def reason(candidate: Any) -> str:
    out = run(candidate)
    assert out.results.empty
    assert len(out.rejects) == 1
    text: str = out.rejects.iloc[0]["reason"]
    return text


def flags(result: pd.Series) -> list[str]:
    return [flag for flag in result["quality_flags"].split(",") if flag]


# --- Mapping and units ----------------------------------------------------------------------


def test_a_clean_us_record_maps_to_the_catalog_unchanged() -> None:
    result = row()
    assert result["result_id"] == "res_0001"
    assert result["user_id"] == "usr_1"
    assert result["content_hash"] == "hash_0"
    assert result["catalog_code"] == "ldl_c"
    assert result["loinc"] == "2089-1"
    assert result["loinc_source"] == "2089-1"
    assert result["value_source"] == 100.0
    assert result["value_canonical"] == 100.0
    assert result["unit_source"] == "mg/dL"
    assert result["unit_canonical"] == "mg/dL"
    assert (result["reference_low_canonical"], result["reference_high_canonical"]) == (50, 130)
    assert result["loop_status"] == "normal"
    assert result["revision"] == 1
    assert pd.isna(result["updated_at"])
    assert result["collected_at"] == pd.Timestamp("2026-01-10T08:30:00Z")
    assert result["quality_flags"] == ""


def test_si_ldl_converts_to_mg_dl_with_its_reference_range() -> None:
    result = row(value=2.59, unit="mmol/L", reference_low=1.3, reference_high=3.4)
    assert result["value_source"] == 2.59
    assert result["unit_source"] == "mmol/L"
    assert result["value_canonical"] == pytest.approx(100.15, abs=0.01)  # x 38.67
    assert result["unit_canonical"] == "mg/dL"
    assert result["reference_low_source"] == 1.3
    assert result["reference_low_canonical"] == pytest.approx(1.3 * 38.67)
    assert result["reference_high_canonical"] == pytest.approx(3.4 * 38.67)
    assert result["quality_flags"] == ""


def test_hba1c_ifcc_mmol_per_mol_uses_the_offset() -> None:
    result = row(
        biomarker_code="hba1c",
        value=48.0,
        unit="mmol/mol",
        reference_low=20.0,
        reference_high=42.0,
        loinc="59261-8",
    )
    assert result["value_canonical"] == pytest.approx(0.0915 * 48 + 2.15)  # 6.54 %
    assert result["unit_canonical"] == "%"
    assert result["reference_low_canonical"] == pytest.approx(0.0915 * 20 + 2.15)
    assert result["loinc"] == "4548-4"  # the catalog's, whatever was sent
    assert result["loinc_source"] == "59261-8"


@pytest.mark.parametrize(
    ("code", "value", "unit", "canonical", "canonical_unit"),
    [
        ("creatinine", 88.4, "umol/L", 1.0, "mg/dL"),
        ("glucose-fasting", 5.5, "mmol/L", 99.09, "mg/dL"),
        ("glucose-fasting", 0.99, "g/L", 99.0, "mg/dL"),
        ("vitamin-d-25oh", 75.0, "nmol/L", 30.05, "ng/mL"),
        ("testosterone-total", 15.0, "nmol/L", 432.63, "ng/dL"),
        ("tsh", 2.1, "uIU/mL", 2.1, "m[IU]/L"),
        ("alt", 0.5, "ukat/L", 30.0, "U/L"),
        ("hematocrit", 0.42, "L/L", 42.0, "%"),
    ],
)
def test_si_and_alias_units_convert(
    code: str, value: float, unit: str, canonical: float, canonical_unit: str
) -> None:
    result = row(biomarker_code=code, value=value, unit=unit, loinc=None)
    assert result["value_canonical"] == pytest.approx(canonical, abs=0.01)
    assert result["unit_canonical"] == canonical_unit
    assert result["quality_flags"] == ""


@pytest.mark.parametrize(
    ("code", "unit"),
    [
        ("ldl-c", " mg/dL "),  # stray whitespace
        ("ldl-c", "mg/dl"),  # case
        ("ldl-c", "MG/DL"),
        ("ldl-c", "mmol/l"),
        ("creatinine", "µmol/L"),  # micro sign U+00B5
        ("creatinine", "μmol/L"),  # Greek mu U+03BC
        ("creatinine", "\u039cMOL/L"),  # Greek capital mu: what "µmol/L".upper() gives
        ("creatinine", "UMOL/L "),
    ],
)
def test_unambiguous_unit_spelling_noise_is_tolerated(code: str, unit: str) -> None:
    result = row(biomarker_code=code, unit=unit, value=88.4 if code == "creatinine" else 2.0)
    assert result["unit_source"] == unit  # kept as sent
    assert result["unit_canonical"] == "mg/dL"
    assert not np.isnan(result["value_canonical"])
    assert result["quality_flags"] == ""


@pytest.fixture
def catalog_with_ambiguous_units(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A marker whose units differ only by case: milli- and mega-units per litre."""
    extra = [
        CatalogUnit("x_test", "x-test", "0000-0", "test marker", "mU/L", unit, factor, 0.0, 0, 1e9)
        for unit, factor in (("mU/L", 1.0), ("MU/L", 1e9))
    ]
    monkeypatch.setattr(normalize_module, "load_catalog", lambda: (*load_catalog(), *extra))
    normalize_module._catalog.cache_clear()
    yield
    normalize_module._catalog.cache_clear()


@pytest.mark.usefixtures("catalog_with_ambiguous_units")
def test_a_case_insensitive_match_is_used_only_when_it_is_unambiguous() -> None:
    assert row(biomarker_code="x-test", unit="MU/L", value=1.0)["value_canonical"] == 1e9
    assert row(biomarker_code="x-test", unit=" mU/L", value=1.0)["value_canonical"] == 1.0
    ambiguous = row(biomarker_code="x-test", unit="mu/l", value=1.0)
    assert flags(ambiguous) == ["unknown_unit"]
    assert np.isnan(ambiguous["value_canonical"])


def test_an_unknown_unit_is_flagged_and_not_converted() -> None:
    result = row(unit="mg/100mL")
    assert flags(result) == ["unknown_unit"]
    assert result["catalog_code"] == "ldl_c"
    assert result["value_source"] == 100.0
    assert np.isnan(result["value_canonical"])
    assert result["unit_canonical"] is None
    assert np.isnan(result["reference_low_canonical"])


def test_a_missing_unit_is_an_unknown_unit() -> None:
    assert flags(row(unit=None)) == ["unknown_unit"]
    assert flags(row(unit=MISSING)) == ["unknown_unit"]


def test_lp_a_in_the_other_kind_of_unit_is_not_convertible() -> None:
    result = row(biomarker_code="lpa-mass", unit="nmol/L", value=80.0, loinc=None)
    assert flags(result) == ["non_convertible_unit"]
    assert result["catalog_code"] == "lpa_mass"
    assert np.isnan(result["value_canonical"])
    assert result["unit_canonical"] is None
    molar = row(biomarker_code="lpa-molar", unit="mg/dL", value=30.0, loinc=None)
    assert flags(molar) == ["non_convertible_unit"]


def test_an_unknown_code_is_flagged_with_null_catalog_fields() -> None:
    result = row(biomarker_code="vitamin-k2", unit="ng/mL", value=0.4, loinc=None)
    assert flags(result) == ["unknown_code"]  # no unit flag for an unknown marker
    assert result["biomarker_code"] == "vitamin-k2"
    assert result["catalog_code"] is None
    assert result["loinc"] is None
    assert result["value_source"] == 0.4
    assert np.isnan(result["value_canonical"])
    assert result["unit_canonical"] is None


@pytest.mark.parametrize(
    ("loinc", "catalog_code", "catalog_loinc"),
    [
        ("2089-1", "ldl_c", "2089-1"),  # the catalog's own LOINC
        ("13457-7", "ldl_c", "2089-1"),  # calculated LDL, mapped by the catalog's notes
        ("14682-9", "creatinine", "2160-0"),  # SI creatinine
    ],
)
def test_an_unknown_code_falls_back_to_its_loinc(
    loinc: str, catalog_code: str, catalog_loinc: str
) -> None:
    result = row(biomarker_code="LDL direct?", loinc=loinc, unit="mg/dL")
    assert result["catalog_code"] == catalog_code
    assert result["loinc"] == catalog_loinc
    assert result["loinc_source"] == loinc
    assert result["biomarker_code"] == "LDL direct?"
    assert "unknown_code" not in flags(result)


@pytest.mark.parametrize("loinc", ["1989-3", "62238-1", "1988-5", "9999-9", None])
def test_loincs_the_catalog_keeps_apart_are_not_mapped(loinc: str | None) -> None:
    """D3-only vitamin D, other eGFR equations, standard CRP: different analytes."""
    assert flags(row(biomarker_code="something-else", loinc=loinc)) == ["unknown_code"]


def test_a_known_code_wins_over_a_conflicting_loinc() -> None:
    result = row(loinc="2085-9")  # HDL's LOINC on an ldl-c record
    assert result["catalog_code"] == "ldl_c"
    assert result["loinc"] == "2089-1"
    assert result["loinc_source"] == "2085-9"


def test_a_missing_code_can_still_map_by_loinc() -> None:
    assert row(biomarker_code=MISSING)["catalog_code"] == "ldl_c"
    assert flags(row(biomarker_code=None, loinc=None)) == ["unknown_code"]


# --- Values: censored, text, plausibility ----------------------------------------------------


@pytest.mark.parametrize(
    ("text", "operator", "bound"),
    [
        ("<0.5", "<", 0.5),
        ("> 1000", ">", 1000.0),
        ("<=10", "<=", 10.0),
        (">=2000", ">=", 2000.0),
        ("≤3", "<=", 3.0),
        ("≥ 2000", ">=", 2000.0),
        (" <.5 ", "<", 0.5),
    ],
)
@pytest.mark.parametrize("value", ["null", "bound"])
def test_censored_value_text_gives_operator_and_bound(
    text: str, operator: str, bound: float, value: str
) -> None:
    result = row(
        biomarker_code="psa", unit="ng/mL", loinc=None, value_text=text,
        value=None if value == "null" else bound,
    )  # fmt: skip
    assert result["value_operator"] == operator
    assert result["value_source"] == bound
    assert result["value_canonical"] == bound  # ng/mL is canonical for psa
    assert result["value_text"] == text
    assert flags(result) == ["censored"]


def test_censored_si_value_converts_its_bound() -> None:
    result = row(biomarker_code="tsh", unit="mIU/L", value=None, value_text="<0.01", loinc=None)
    assert result["value_canonical"] == pytest.approx(0.01)
    result = row(value=None, value_text="<0.5", unit="mmol/L")
    assert result["value_canonical"] == pytest.approx(0.5 * 38.67)
    assert result["value_operator"] == "<"


def test_value_text_bound_wins_when_value_disagrees() -> None:
    result = row(value=7.0, value_text="<0.5")
    assert result["value_source"] == 0.5
    assert result["value_operator"] == "<"


def test_a_plain_numeric_value_text_equal_to_value_is_clean() -> None:
    result = row(value=100.0, value_text="100")
    assert result["value_source"] == 100.0
    assert result["value_operator"] is None
    assert result["value_text"] == "100"
    assert result["quality_flags"] == ""


@pytest.mark.parametrize("text", ["TNP", "Positive", "Negative", "see comment"])
def test_a_text_result_keeps_its_text_and_has_no_canonical_value(text: str) -> None:
    result = row(value=None, value_text=text, unit="mmol/L")
    assert flags(result) == ["text_result"]
    assert result["value_text"] == text
    assert np.isnan(result["value_source"])
    assert np.isnan(result["value_canonical"])
    assert result["value_operator"] is None
    assert result["unit_canonical"] == "mg/dL"  # the unit is known: the range converts
    assert result["reference_low_canonical"] == pytest.approx(50 * 38.67)


def test_text_beside_a_number_keeps_the_number() -> None:
    result = row(value=100.0, value_text="Positive")
    assert result["value_source"] == 100.0
    assert result["value_text"] == "Positive"
    assert result["quality_flags"] == ""


@pytest.mark.parametrize(("value", "unit"), [(5000.0, "mg/dL"), (0.5, "mg/dL"), (80.0, "mmol/L")])
def test_an_implausible_value_is_kept_and_flagged(value: float, unit: str) -> None:
    result = row(value=value, unit=unit)
    assert flags(result) == ["implausible"]
    assert result["value_source"] == value


def test_a_value_overflowing_the_conversion_is_implausible_and_null() -> None:
    result = row(value=1e308, unit="g/L")  # x100
    assert flags(result) == ["implausible"]
    assert np.isnan(result["value_canonical"])


def test_several_flags_are_sorted_and_comma_separated() -> None:
    result = row(value=None, value_text=">5000", collected_at="2026-01-10T08:30:00")
    assert result["quality_flags"] == "censored,implausible,naive_timestamp"
    result = row(biomarker_code="omega-3-index", loinc=None, collected_at="2026-01-10 08:30")
    assert result["quality_flags"] == "naive_timestamp,unknown_code"
    assert list(FLAGS) == sorted(FLAGS)


# --- Timestamps, corrections, status ----------------------------------------------------------


def test_offsets_are_converted_to_utc_in_one_batch() -> None:
    sent = [
        "2026-01-10T08:30:00Z",
        "2026-01-10T09:30:00+01:00",
        "2026-01-10T03:30:00-0500",
        "2026-01-10T14:00:00+05:30",
        "2026-01-10T08:30:00.000000+00:00",
        "2026-01-10 08:30:00Z",
        "2026-01-10T08:30:00.000000123Z",  # nanoseconds: dropped below a microsecond
    ]
    out = run(*(record(id=f"r{i}", collected_at=text) for i, text in enumerate(sent)))
    assert out.rejects.empty
    assert set(out.results["collected_at"]) == {pd.Timestamp("2026-01-10T08:30:00Z")}
    assert out.results["collected_at_source"].tolist() == sent
    assert str(out.results["collected_at"].dtype) == "datetime64[us, UTC]"


def test_far_dates_stay_exact_whatever_else_is_in_the_batch() -> None:
    out = run(
        record(id="a", collected_at="2300-01-01T00:00:00Z"),
        record(id="b", collected_at="0001-01-01T00:00:00Z"),
        record(id="c", collected_at="2026-01-10T08:30:00.123456789Z"),
    )
    assert out.rejects.empty
    assert out.results["collected_at"].dt.year.tolist() == [2300, 1, 2026]


@pytest.mark.parametrize("sent", ["2026-01-10T08:30:00", "2026-01-10 08:30", "2026-01-10"])
def test_collected_at_without_a_zone_is_null_and_flagged_never_guessed(sent: str) -> None:
    result = row(collected_at=sent)
    assert pd.isna(result["collected_at"])
    assert result["collected_at_source"] == sent
    assert flags(result) == ["naive_timestamp"]


def test_a_correction_keeps_its_revision_and_updated_at() -> None:
    result = row(revision=2, updated_at="2026-01-12T10:00:00+02:00", value=104.0)
    assert result["revision"] == 2
    assert result["updated_at"] == pd.Timestamp("2026-01-12T08:00:00Z")
    assert row(revision=3.0)["revision"] == 3  # an integral float is an integer
    assert row(revision=None)["revision"] == 1
    assert row(updated_at=None)["revision"] == 1


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        *[(status, status) for status in ("normal", "low", "high", "critical")],
        *[(status, None) for status in ("H", "NORMAL", "", None, MISSING, 3, {"flag": "high"})],
    ],
)
def test_loop_status_is_one_of_the_documented_values_or_null(status: Any, expected: Any) -> None:
    assert row(status=status)["loop_status"] == expected


def test_extra_and_nested_fields_are_ignored() -> None:
    result = row(specimen="serum", fasting=True, meta={"nested": [1, {"x": None}]}, Value=3)
    assert result["value_source"] == 100.0
    assert result["quality_flags"] == ""


def test_optional_fields_may_be_absent() -> None:
    result = row(
        patient_id=MISSING,
        biomarker_name=MISSING,
        reference_low=MISSING,
        reference_high=None,
        status=MISSING,
        loinc=MISSING,
        lab=MISSING,
    )
    assert result["catalog_code"] == "ldl_c"
    assert result["patient_id"] is None
    assert result["lab"] is None
    assert np.isnan(result["reference_low_canonical"])


# --- Rejects ----------------------------------------------------------------------------------

REJECTS: list[tuple[Any, str]] = [
    (["not", "an", "object"], "record is not a JSON object"),
    ("a string", "record is not a JSON object"),
    (None, "record is not a JSON object"),
    (42, "record is not a JSON object"),
    (record(id=MISSING), "id is missing"),
    (record(id=None), "id is missing"),
    (record(id=123456), "id is not a string"),
    (record(id="r" * 256), "id is longer than 255 characters"),
    (record(id="res\x00"), "id has characters that cannot be stored"),
    (record(id=""), "id is empty"),
    (record(patient_id=7), "patient_id is not a string"),
    (record(patient_id="p" * 256), "patient_id is longer than 255 characters"),
    (record(patient_id="pat\ud800"), "patient_id has characters that cannot be stored"),
    (record(biomarker_code=["ldl-c"]), "biomarker_code is not a string"),
    (record(biomarker_code="c" * 256), "biomarker_code is longer than 255 characters"),
    (record(biomarker_code="ldl\x00c"), "biomarker_code has characters that cannot be stored"),
    (record(biomarker_name=False), "biomarker_name is not a string"),
    (record(biomarker_name="LDL\udfff"), "biomarker_name has characters that cannot be stored"),
    (record(value={"amount": 100}), "value is not a number"),
    (record(value="100"), "value is not a number"),
    (record(value=True), "value is not a number"),
    (record(value=float("inf")), "value is not finite"),
    (record(value=-(10**400)), "value is not finite"),
    (record(unit=1), "unit is not a string"),
    (record(unit="u" * 65), "unit is longer than 64 characters"),
    (record(unit="mg\x00dL"), "unit has characters that cannot be stored"),
    (record(reference_low="1"), "reference_low is not a number"),
    (record(reference_low=float("-inf")), "reference_low is not finite"),
    (record(reference_high=[130]), "reference_high is not a number"),
    (record(reference_high=10**400), "reference_high is not finite"),
    (record(collected_at=MISSING), "collected_at is missing"),
    (record(collected_at=None), "collected_at is missing"),
    (record(collected_at=1768033800), "collected_at is not a timestamp"),
    (record(collected_at="yesterday"), "collected_at is not a timestamp"),
    (record(collected_at="2026-13-40T00:00:00Z"), "collected_at is not a timestamp"),
    (record(collected_at="0000-06-01T00:00:00Z"), "collected_at is not a timestamp"),  # year 0
    (
        record(collected_at="2026-01-10T08:30:00Z" + " " * 60),
        "collected_at is longer than 64 characters",
    ),
    (record(parsed_at=MISSING), "parsed_at is missing"),
    (record(parsed_at={"at": "2026-01-10"}), "parsed_at is not a timestamp"),
    (record(parsed_at="soon"), "parsed_at is not a timestamp"),
    (record(parsed_at="9999-12-31T23:00:00-05:00"), "parsed_at is not a timestamp"),  # 10000 UTC
    (record(parsed_at="2026-01-10T12:00:00"), "parsed_at has no timezone"),
    (record(loinc=2089), "loinc is not a string"),
    (record(loinc="2089-1" * 6), "loinc is longer than 32 characters"),
    (record(loinc="2089\x00"), "loinc has characters that cannot be stored"),
    (record(value=None, value_text=0.5), "value_text is not a string"),
    (record(value_text="<0.5\x00"), "value_text has characters that cannot be stored"),
    (record(value=None), "value and value_text are both missing"),
    (record(value=MISSING, value_text="  "), "value and value_text are both missing"),
    (record(value=float("nan")), "value and value_text are both missing"),
    (record(lab=["Quest"]), "lab is not a string"),
    (record(lab="Quest\x00"), "lab has characters that cannot be stored"),
    (record(updated_at=20260112), "updated_at is not a timestamp"),
    (record(updated_at="later"), "updated_at is not a timestamp"),
    (record(updated_at="0001-01-01T00:00:00+14:00"), "updated_at is not a timestamp"),  # year 0
    (record(updated_at="2026-01-12T10:00:00"), "updated_at has no timezone"),
    (record(revision="2"), "revision is not a positive integer"),
    (record(revision=0), "revision is not a positive integer"),
    (record(revision=-1), "revision is not a positive integer"),
    (record(revision=1.5), "revision is not a positive integer"),
    (record(revision=True), "revision is not a positive integer"),
    (record(revision=float("inf")), "revision is not a positive integer"),
    (record(revision=2**31), "revision is too large"),
    (record(revision=1e30), "revision is too large"),  # how the client reads 10**30
]


@pytest.mark.parametrize(("candidate", "expected"), REJECTS)
def test_a_structurally_broken_record_is_rejected_with_its_reason(
    candidate: Any, expected: str
) -> None:
    assert reason(candidate) == expected


def test_every_reject_reason_is_exercised_and_names_a_field_not_a_value() -> None:
    assert {expected for _, expected in REJECTS} == set(REJECT_REASONS)
    assert len(set(REJECT_REASONS)) == len(REJECT_REASONS)
    for text in REJECT_REASONS:
        assert text.split()[0] in {*FIELDS, "record"}, text


def test_the_first_problem_found_is_the_reason() -> None:
    assert reason(record(id=5, value="x", collected_at=None)) == "id is not a string"
    assert reason(record(value="x", collected_at=None)) == "value is not a number"
    assert reason(record(collected_at=None, revision=0)) == "collected_at is missing"


def test_a_reject_keeps_user_hash_id_and_the_record_as_sorted_json() -> None:
    broken = record(value={"amount": 1}, extra=[1, 2])
    out = normalize(["usr_9"], [broken], ["abc"])
    reject = out.rejects.iloc[0]
    assert list(out.rejects.columns) == list(REJECT_COLUMNS)
    assert (reject["user_id"], reject["content_hash"], reject["result_id"]) == (
        "usr_9",
        "abc",
        "res_0001",
    )
    assert reject["payload"] == json.dumps(broken, sort_keys=True)
    assert json.loads(reject["payload"]) == broken


def test_a_reject_without_a_usable_id_has_a_null_result_id() -> None:
    out = run(record(id=7), record(id="r" * 300), record(id=""), ["x"])
    assert out.rejects["result_id"].tolist() == [None, None, None, None]


# --- The batch --------------------------------------------------------------------------------


def test_every_record_lands_in_exactly_one_place_with_its_user_and_hash() -> None:
    records: list[Any] = [record(id=f"r{i}", value=float(i + 1)) for i in range(6)]
    records[1] = "garbage"
    records[4] = record(id="r4", parsed_at=None)
    users = [f"usr_{i % 2}" for i in range(6)]
    hashes = [f"h{i}" for i in range(6)]
    out = normalize(users, records, hashes)
    assert len(out.results) + len(out.rejects) == 6
    assert sorted([*out.results["content_hash"], *out.rejects["content_hash"]]) == hashes
    assert out.rejects["content_hash"].tolist() == ["h1", "h4"]
    assert out.results["result_id"].tolist() == ["r0", "r2", "r3", "r5"]
    assert out.results["user_id"].tolist() == ["usr_0", "usr_0", "usr_1", "usr_1"]
    assert out.results["value_source"].tolist() == [1.0, 3.0, 4.0, 6.0]
    assert out.results.index.tolist() == [0, 1, 2, 3]


def test_results_have_the_warehouse_columns_and_documented_dtypes() -> None:
    out = run(record(), record(id="r2", value=None, value_text="TNP", loinc=None, lab=None))
    assert tuple(out.results.columns) == RESULT_COLUMN_NAMES
    for name, dtype in out.results.dtypes.items():
        if name in FLOAT_COLUMNS:
            assert dtype == np.float64, name
        elif name in TIME_COLUMNS:
            assert str(dtype) == "datetime64[us, UTC]", name
        elif name == "revision":
            assert dtype == np.int64
        else:
            assert dtype == np.dtype(object), name
    for name in TEXT_COLUMNS:  # str or None, never NaN: what a SQL driver expects
        assert all(v is None or isinstance(v, str) for v in out.results[name]), name
    assert all(dtype == np.dtype(object) for dtype in out.rejects.dtypes)


def test_the_documented_recipe_gives_sql_ready_python_values() -> None:
    out = run(record(value=None, value_text="TNP", collected_at="2026-01-10T08:30"))
    rows = out.results.astype(object).where(out.results.notna(), None).to_dict("records")
    values = rows[0]
    assert values["value_canonical"] is None
    assert values["collected_at"] is None
    assert values["updated_at"] is None
    assert values["value_operator"] is None
    parsed = values["parsed_at"]
    assert isinstance(parsed, datetime)
    assert parsed.utcoffset() == timedelta(0)


def test_empty_input_gives_empty_frames_with_the_right_columns() -> None:
    out = normalize([], [], [])
    assert tuple(out.results.columns) == RESULT_COLUMN_NAMES
    assert tuple(out.rejects.columns) == REJECT_COLUMNS
    assert out.results.empty
    assert out.rejects.empty
    assert str(out.results["collected_at"].dtype) == "datetime64[us, UTC]"
    assert out.results["revision"].dtype == np.int64


def test_only_rejects_gives_an_empty_typed_results_frame() -> None:
    out = run(None, record(id=None))
    assert out.results.empty
    assert tuple(out.results.columns) == RESULT_COLUMN_NAMES
    assert out.results["value_source"].dtype == np.float64
    assert len(out.rejects) == 2


def test_inputs_of_different_lengths_are_a_programming_error() -> None:
    with pytest.raises(ValueError, match="same length"):
        normalize(["usr_1"], [record(), record()], ["h1", "h2"])


def test_the_normalizer_is_pure_and_loops_over_no_rows() -> None:
    source = inspect.getsource(normalize_module)
    for forbidden in ("iterrows", "itertuples", ".apply(", "import logging", "open(", "print("):
        assert forbidden not in source, forbidden


# --- The sandbox's realistic mess ---------------------------------------------------------------

EPOCH = datetime(2026, 1, 15, tzinfo=UTC)
USERS = [f"usr_{i:04d}" for i in range(1, 51)]
KNOWN_CODES = {row.loop_code for row in load_catalog()}
NO_CANONICAL_FLAGS = {"text_result", "non_convertible_unit", "unknown_unit", "unknown_code"}


@pytest.fixture(scope="module")
def sandbox_records() -> tuple[list[str], list[Record], list[str]]:
    """Every record of 50 sandbox users, 30 days after the epoch (so with corrections)."""
    results = SyntheticResults(seed=3, epoch=EPOCH, results_per_user=60)
    users: list[str] = []
    records: list[Record] = []
    for user in USERS:
        listed = results.records(user, EPOCH + timedelta(days=30))
        users += [user] * len(listed)
        records += listed
    hashes = [hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest() for r in records]
    return users, records, hashes


def test_every_sandbox_record_normalizes_without_rejects(
    sandbox_records: tuple[list[str], list[Record], list[str]],
) -> None:
    users, records, hashes = sandbox_records
    out = normalize(users, records, hashes)
    assert out.rejects.empty, out.rejects["reason"].value_counts().to_dict()
    results = out.results
    assert len(results) == len(records)
    assert results["result_id"].tolist() == [r["id"] for r in records]
    assert results["content_hash"].tolist() == hashes
    assert results["user_id"].tolist() == users

    known = results["biomarker_code"].isin(KNOWN_CODES)
    assert results.loc[known, "catalog_code"].notna().all()
    assert (results.loc[~known, "quality_flags"].str.contains("unknown_code")).all()
    excused = results["quality_flags"].map(lambda f: bool(NO_CANONICAL_FLAGS & set(f.split(","))))
    assert results.loc[known & ~excused, "value_canonical"].notna().all()
    assert results.loc[known & ~excused, "unit_canonical"].notna().all()
    seen = {flag for text in results["quality_flags"] for flag in text.split(",") if flag}
    assert {"censored", "text_result", "unknown_code", "non_convertible_unit"} <= seen
    assert (results["revision"] >= 1).all()
    assert results.loc[results["revision"] > 1, "updated_at"].notna().all()


def test_sandbox_values_convert_back_to_their_canonical_level(
    sandbox_records: tuple[list[str], list[Record], list[str]],
) -> None:
    """A record in the canonical unit keeps its number; one in another unit comes back on
    the same scale (the generator draws canonical levels, then converts with the catalog)."""
    out = normalize(*sandbox_records).results
    clean = out[out["quality_flags"] == ""]
    same_unit = clean["unit_source"] == clean["unit_canonical"]
    assert (clean.loc[same_unit, "value_canonical"] == clean.loc[same_unit, "value_source"]).all()
    converted = clean[~same_unit]
    assert len(converted) > 100
    low = converted["reference_low_canonical"]
    high = converted["reference_high_canonical"]
    assert (low < high).all()
    inside = (converted["value_canonical"] > low / 3) & (converted["value_canonical"] < high * 3)
    assert inside.mean() > 0.95
