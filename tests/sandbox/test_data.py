"""The sandbox's synthetic results: deterministic, realistic, messy, and evolving with the clock."""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import pytest

from loop_sync.catalog import load_catalog
from loop_sync.sandbox.data import SyntheticResults

Record = dict[str, Any]
Snapshots = dict[int, dict[str, list[Record]]]

EPOCH = datetime(2026, 1, 15, 10, 30, tzinfo=UTC)
USERS = [f"usr_{i:04d}" for i in range(1, 301)]
DAYS = (-90, -20, 0, 1, 3, 10, 30, 61)  # snapshot times, in days after the epoch
CATALOG = load_catalog()
UNITS: dict[str, set[str]] = {}
for _row in CATALOG:
    UNITS.setdefault(_row.loop_code, set()).add(_row.unit)
CONVERSIONS = {(row.loop_code, row.unit): row for row in CATALOG if row.factor is not None}
FIELDS = {
    "id", "patient_id", "biomarker_code", "biomarker_name", "value", "unit", "reference_low",
    "reference_high", "status", "collected_at", "parsed_at", "loinc", "value_text", "lab",
}  # fmt: skip
OFFSET = re.compile(r"[+-]\d\d:\d\d$")


def _at(days: int) -> datetime:
    return EPOCH + timedelta(days=days)


def _fold(unit: str) -> str:
    return unit.strip().lower().replace("µ", "u")


def _numeric(record: Record) -> bool:
    return record["value_text"] is None and record["value"] is not None


@pytest.fixture(scope="module")
def snapshots() -> Snapshots:
    """Every user's records at each of DAYS, from one generator."""
    results = SyntheticResults(seed=7, epoch=EPOCH)
    return {days: {user: results.records(user, _at(days)) for user in USERS} for days in DAYS}


@pytest.fixture(scope="module")
def latest(snapshots: Snapshots) -> list[Record]:
    """All records at the last snapshot, after every panel of the 60 future days."""
    return [record for records in snapshots[DAYS[-1]].values() for record in records]


def test_same_seed_gives_identical_records() -> None:
    """Two generators with the same seed and epoch list the same records."""
    first, second = (SyntheticResults(seed=3, epoch=EPOCH) for _ in range(2))
    for user in USERS[:20]:
        assert first.records(user, _at(30)) == second.records(user, _at(30))


def test_histories_made_ahead_list_the_same_records() -> None:
    """`generate` (the sandbox's --pregenerate) changes when a history is made, not what
    it lists, today or after the clock has moved."""
    ahead, on_demand = (SyntheticResults(seed=3, epoch=EPOCH) for _ in range(2))
    ahead.generate(USERS[:20])
    for user in USERS[:20]:
        for day in (0, 30):
            assert ahead.records(user, _at(day)) == on_demand.records(user, _at(day))


def test_different_seeds_give_different_records() -> None:
    """Another seed gives another history."""
    first, second = SyntheticResults(seed=3, epoch=EPOCH), SyntheticResults(seed=4, epoch=EPOCH)
    assert first.records("usr_0001", EPOCH) != second.records("usr_0001", EPOCH)


def test_history_is_relative_to_the_epoch_day() -> None:
    """The same seed gives the same records per day offset, whatever the epoch's day or hour."""
    later_epoch = datetime(2026, 3, 2, 23, 59, tzinfo=UTC)
    early = SyntheticResults(seed=3, epoch=EPOCH.replace(hour=0, minute=5))
    shifted = SyntheticResults(seed=3, epoch=later_epoch)
    shift = later_epoch.date() - EPOCH.date()
    for user in USERS[:10]:
        before = early.records(user, _at(5))
        after = shifted.records(user, _at(5) + shift)
        assert [r["id"] for r in before] == [r["id"] for r in after]
        assert [r["value"] for r in before] == [r["value"] for r in after]
        for old, new in zip(before, after, strict=True):
            parsed_old = datetime.fromisoformat(old["parsed_at"])
            assert datetime.fromisoformat(new["parsed_at"]) - parsed_old == shift


def test_records_are_ordered_by_parsed_at_then_id(snapshots: Snapshots) -> None:
    """Records come in (parsed_at, id) ascending order, as Loop lists them."""
    for by_user in snapshots.values():
        for records in by_user.values():
            keys = [(record["parsed_at"], record["id"]) for record in records]
            assert keys == sorted(keys)


def test_ids_are_unique_per_user_and_stable_over_time(snapshots: Snapshots) -> None:
    """An id names one result of one user, and keeps its marker and times as the clock moves."""
    for user in USERS:
        seen: dict[str, tuple[str, str, str]] = {}
        for days in DAYS:
            ids = [record["id"] for record in snapshots[days][user]]
            assert len(ids) == len(set(ids))
            for record in snapshots[days][user]:
                assert re.fullmatch(r"res_[0-9a-f]{16}", record["id"])
                assert record["patient_id"] == "pat_" + user.removeprefix("usr_")
                facts = (record["biomarker_code"], record["collected_at"], record["parsed_at"])
                assert seen.setdefault(record["id"], facts) == facts


def test_advancing_the_clock_only_adds_corrects_or_deletes(snapshots: Snapshots) -> None:
    """Between two times, a record appears, gets a higher revision, disappears, or stays equal."""
    for earlier, later in pairwise(DAYS):
        for user in USERS:
            before = {record["id"]: record for record in snapshots[earlier][user]}
            after = {record["id"]: record for record in snapshots[later][user]}
            for rid, record in after.items():
                if rid not in before:
                    parsed = datetime.fromisoformat(record["parsed_at"])
                    assert _at(earlier) < parsed <= _at(later)
                elif record != before[rid]:
                    assert record["revision"] > before[rid].get("revision", 1)
                    updated = datetime.fromisoformat(record["updated_at"])
                    assert _at(earlier) < updated <= _at(later)
            gone = before.keys() - after.keys()
            assert not gone & {r["id"] for d in DAYS if d > later for r in snapshots[d][user]}


def test_some_users_get_new_results_after_a_day(snapshots: Snapshots) -> None:
    """Advancing the clock by one day brings new results for some users, not all."""

    def ids(days: int, user: str) -> set[str]:
        return {record["id"] for record in snapshots[days][user]}

    grew = sum(bool(ids(1, user) - ids(0, user)) for user in USERS)
    assert 0 < grew < len(USERS)


def test_corrections_and_deletions_happen_before_and_after_the_epoch(
    snapshots: Snapshots,
) -> None:
    """Some results are already corrected or deleted at the epoch, others only later."""
    at_epoch = {r["id"]: r for records in snapshots[0].values() for r in records}
    earlier = {r["id"] for d in DAYS if d < 0 for records in snapshots[d].values() for r in records}
    later = {r["id"]: r for d in DAYS if d > 0 for recs in snapshots[d].values() for r in recs}
    assert any(record.get("revision", 1) > 1 for record in at_epoch.values())
    assert any(
        record.get("revision", 1) > at_epoch[rid].get("revision", 1)
        for rid, record in later.items()
        if rid in at_epoch
    )
    assert earlier - at_epoch.keys()  # deleted before the epoch
    last = {r["id"] for records in snapshots[DAYS[-1]].values() for r in records}
    assert at_epoch.keys() - last  # deleted after it
    revisions = Counter(record.get("revision", 1) for record in later.values())
    assert revisions[2] > revisions[3] > 0


def test_messy_cases_each_occur(latest: list[Record]) -> None:
    """Censored and text values, local and naive times, unknown markers, units and fields,
    and implausible values all occur, each rarely."""
    cases: Counter[str] = Counter()
    for record in latest:
        text, code, unit = record["value_text"], record["biomarker_code"], record["unit"]
        if text in {"Positive", "Negative", "TNP"}:
            cases["text"] += 1
        elif text is not None:
            assert re.fullmatch(r"(<|>|<=|>=)\d+(\.\d+)?", text)
            assert record["value"] in {None, float(text.lstrip("<>="))}
            cases["censored"] += 1
        if record["collected_at"].endswith("Z"):
            cases["utc"] += 1
        else:
            cases["offset" if OFFSET.search(record["collected_at"]) else "naive"] += 1
        if code not in UNITS:
            cases["unknown marker"] += 1
            assert record["loinc"] is None
        elif unit not in UNITS[code]:
            cases["unknown unit"] += 1
        elif _numeric(record) and (conversion := CONVERSIONS.get((code, unit))):
            assert conversion.factor is not None
            canonical = record["value"] * conversion.factor + (conversion.offset or 0)
            if not conversion.plausible_min <= canonical <= conversion.plausible_max:
                cases["implausible"] += 1
        if record.keys() - FIELDS - {"updated_at", "revision"}:
            cases["extra field"] += 1
    total = len(latest)
    assert set(cases) == {
        "text", "censored", "utc", "offset", "naive", "unknown marker", "unknown unit",
        "implausible", "extra field",
    }  # fmt: skip
    assert cases["utc"] > 0.7 * total
    assert all(cases[case] < 0.1 * total for case in cases if case not in {"utc", "offset"})


def test_units_belong_to_the_marker_unless_deliberately_unknown(latest: list[Record]) -> None:
    """A record's unit is one the catalog lists for its marker, or a near-miss spelling of one."""
    for record in latest:
        code, unit = record["biomarker_code"], record["unit"]
        if code in UNITS and unit not in UNITS[code]:
            assert _fold(unit) in {_fold(known) for known in UNITS[code]}


def test_users_mix_us_and_si_units(snapshots: Snapshots, latest: list[Record]) -> None:
    """Most users have results from several labs, so one marker comes in several units."""
    several_labs = sum(len({r["lab"] for r in snapshots[DAYS[-1]][user]}) > 1 for user in USERS)
    assert several_labs > 0.9 * len(USERS)
    glucose_units = {r["unit"] for r in latest if r["biomarker_code"] == "glucose-fasting"}
    assert {"mg/dL", "mmol/L", "g/L"} <= glucose_units


def test_status_matches_value_and_reference_range(latest: list[Record]) -> None:
    """For plain numbers, status is normal inside the range, low/high/critical outside it."""
    statuses: Counter[str] = Counter()
    for record in filter(_numeric, latest):
        value, low, high = record["value"], record["reference_low"], record["reference_high"]
        assert low < high
        if value < low:
            assert record["status"] in {"low", "critical"}
        elif value > high:
            assert record["status"] in {"high", "critical"}
        else:
            assert record["status"] == "normal"
        statuses[record["status"]] += 1
    assert statuses["normal"] > statuses["high"] > statuses["critical"] > 0
    assert statuses["low"] > 0


def test_records_are_json_ready_with_loop_fields(latest: list[Record]) -> None:
    """Records hold Loop's fields as JSON values; revision and updated_at only when corrected."""
    sample = latest[::4]
    assert json.loads(json.dumps(sample)) == sample
    for record in sample:
        assert record.keys() >= FIELDS
        assert record["status"] in {"normal", "low", "high", "critical"}
        assert record["value"] is None or isinstance(record["value"], float)
        assert record["parsed_at"].endswith("Z")
        assert ("revision" in record) == ("updated_at" in record)
        if "revision" in record:
            assert record["revision"] > 1
            assert record["updated_at"].endswith("Z")
            assert record["updated_at"] > record["parsed_at"]
        collected = datetime.fromisoformat(record["collected_at"]).replace(tzinfo=None)
        parsed = datetime.fromisoformat(record["parsed_at"]).replace(tzinfo=None)
        assert abs(parsed - collected) < timedelta(days=3)
    with_loinc = sum(record["loinc"] is not None for record in sample)
    assert 0.5 < with_loinc / len(sample) < 0.7


def test_returned_records_are_copies() -> None:
    """Changing a returned record does not change what the next call returns."""
    results = SyntheticResults(seed=3, epoch=EPOCH)
    first = results.records("usr_0001", EPOCH)
    first[0]["value"] = "tampered"
    first.clear()
    assert results.records("usr_0001", EPOCH) == SyntheticResults(3, EPOCH).records(
        "usr_0001", EPOCH
    )


def test_cache_size_and_call_order_do_not_change_records() -> None:
    """Evicting users, reading at many times, or going back in time gives the same records."""
    users = USERS[:5]
    direct = {user: SyntheticResults(seed=3, epoch=EPOCH).records(user, _at(40)) for user in users}
    stepwise, tiny = SyntheticResults(seed=3, epoch=EPOCH), SyntheticResults(3, EPOCH, cache_size=2)
    for days in (0, 2, 7, 20, 40):
        for user in users:
            assert stepwise.records(user, _at(days)) == tiny.records(user, _at(days))
    assert {user: stepwise.records(user, _at(40)) for user in users} == direct
    fresh = SyntheticResults(seed=3, epoch=EPOCH)
    assert all(stepwise.records(user, _at(7)) == fresh.records(user, _at(7)) for user in users)


def test_naive_times_are_rejected() -> None:
    """The generator needs timezone-aware datetimes, for the epoch and for reading."""
    with pytest.raises(ValueError, match="timezone-aware"):
        SyntheticResults(seed=3, epoch=EPOCH).records("usr_0001", datetime(2026, 1, 15))
    with pytest.raises(ValueError, match="timezone-aware"):
        SyntheticResults(seed=3, epoch=datetime(2026, 1, 15))


def test_five_thousand_users_with_a_hundred_results_each() -> None:
    """A 5,000-user sandbox with 100 results per user lists everyone's records."""
    results = SyntheticResults(seed=1, epoch=EPOCH, results_per_user=100, cache_size=5000)
    total = sum(len(results.records(f"usr_{i:04d}", EPOCH)) for i in range(1, 5001))
    assert 95 * 5000 < total <= 112 * 5000
