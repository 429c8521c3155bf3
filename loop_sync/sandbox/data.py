"""The sandbox's synthetic lab results: which records each user has at a given (virtual) time.

Each user's history comes from ``random.Random(f"{seed}:{user_id}")``: about
``results_per_user`` results parsed in the year before the epoch's day, then a panel every
3-10 days for the 60 days after it. Some results are later corrected (a new revision) or
deleted, before or after the epoch, so advancing the sandbox clock reveals new results,
corrections and deletions, as on Loop. A small seeded share of records is messy in the ways
Loop really sends (censored or text values, local or naive times, unknown markers, units and
fields, implausible values). Times count from the epoch's UTC day, so a seed gives the same
records for the same day offset. Past panels are drawn when a user is first asked for; the
future ones come from the same RNG, in order, when the clock reaches them.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
import time
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any, Final, NamedTuple

from loop_sync.catalog import load_catalog

# --- Shape of a user's history -----------------------------------------------------------
HISTORY_DAYS: Final = 365  # past panels are collected 3..HISTORY_DAYS days before the epoch
FUTURE_DAYS: Final = 60  # future panels stop this many days after the epoch's day
PANEL_GAP_DAYS: Final = (3, 10)
PANEL_SIZE: Final = (3, 12)
PARSE_DELAY_HOURS: Final = (1.0, 48.0)
DRAW_WINDOW_LOCAL_MIN: Final = (7 * 60, 12 * 60)  # blood is drawn 07:00-12:00 local time
PRIMARY_LAB_SHARE: Final = 0.6  # else any lab: a user's history mixes US and SI units
REFERENCE_Z: Final = 1.3  # reference range = typical * exp(+-REFERENCE_Z * sigma)
CRITICAL_MARGIN: Final = 0.5  # critical beyond this many range widths outside the range

# --- Rates: per result, except the two time-zone rates, which are per panel -------------
LOINC_RATE: Final = 0.60
CORRECTION_RATE: Final = 0.04
THIRD_REVISION_SHARE: Final = 0.15  # of corrected results
CORRECTION_DELAY_DAYS: Final = (1.0, 20.0)  # after parsed_at (and between revisions)
DELETION_RATE: Final = 0.015
DELETION_DELAY_DAYS: Final = (0.1, 90.0)  # after parsed_at
CENSORED_RATE: Final = 0.02
TEXT_RESULT_RATE: Final = 0.01
IMPLAUSIBLE_RATE: Final = 0.003
UNKNOWN_MARKER_RATE: Final = 0.005
UNKNOWN_UNIT_RATE: Final = 0.005
EXTRA_FIELD_RATE: Final = 0.05
LOCAL_OFFSET_RATE: Final = 0.20  # collected_at in the lab's UTC offset
NAIVE_TIME_RATE: Final = 0.005  # collected_at in local wall time without an offset


class LabProfile(NamedTuple):
    units: tuple[str, ...]  # preferred units: the first one the catalog lists for a marker
    overrides: dict[str, str]  # loop_code -> unit, before the preferences
    utc_offsets_min: tuple[int, ...]


_SI = ("mmol/mol", "umol/L", "mmol/L", "pmol/L", "nmol/L", "g/L", "10*9/L", "L/L", "ug/L")
# Lab name -> unit preferences. Markers without a preferred unit use the canonical one,
# which is the US conventional unit.
LABS: Final[dict[str, LabProfile]] = {
    "Quest Diagnostics": LabProfile(("mIU/L", "K/uL"), {}, (-300, -360, -480)),
    "Labcorp": LabProfile(("uIU/mL", "x10E3/uL", "mL/min/1.73m2", "IU/L"), {}, (-300, -420)),
    "Synlab": LabProfile(("ukat/L", *_SI), {"hemoglobin": "g/L", "lpa-mass": "mg/dL"}, (60, 120)),
    "Cerba": LabProfile(("g/L", "umol/L", "mmol/L", "pmol/L", "nmol/L", "10*9/L"), {}, (60,)),
    "Sonic Healthcare": LabProfile((*_SI, "mIU/L"), {"hemoglobin": "g/L"}, (600, 570, 480)),
}
CENSOR_OPERATORS: Final = ("<", "<", ">", "<=", ">=")
TEXT_RESULTS: Final = {"Positive": "high", "Negative": "normal", "TNP": "normal"}  # -> status
EXTRA_FIELDS: Final = (
    ("specimen", "serum"),
    ("specimen", "plasma"),
    ("fasting", True),
    ("fasting", False),
    ("method", "immunoassay"),
)
# Markers Loop may send that the catalog does not know: code, name, unit, typical, sigma.
UNKNOWN_MARKERS: Final = (
    ("vitamin-k2", "Vitamin K2 (menaquinone-7)", "ng/mL", 0.4, 0.5),
    ("omega-3-index", "Omega-3 index", "%", 6.0, 0.25),
    ("cystatin-c", "Cystatin C", "mg/L", 0.9, 0.2),
)
# Typical level (canonical unit) and log-normal sigma of each catalog marker in the synthetic
# population. Markers missing here use the geometric mean of the plausible range, sigma 0.35.
TYPICAL_LEVELS: Final = """
glucose-fasting 92 .12   hba1c 5.5 .10     cholesterol-total 190 .18  ldl-c 115 .28
hdl-c 55 .25             triglycerides 120 .45  creatinine 0.9 .2     egfr 95 .2
alt 25 .45               ast 24 .35        tsh 1.8 .5                 free-t4 1.2 .15
vitamin-d-25oh 30 .4     ferritin 110 .7   hs-crp 1.2 .9              testosterone-total 450 .6
estradiol 60 .8          cortisol 13 .35   insulin 8 .5               apob 95 .25
lpa-mass 18 1            lpa-molar 40 1    hemoglobin 14 .08          hematocrit 42 .07
wbc 6.5 .25              platelets 250 .22 sodium 140 .02             potassium 4.3 .07
calcium 9.5 .05          magnesium 2.1 .08 uric-acid 5.5 .25          homocysteine 10 .3
vitamin-b12 500 .4       folate 12 .4      iron 95 .3                 psa 1.2 .8
dhea-s 200 .5            bun 15 .3
"""

Record = dict[str, Any]
_DAY: Final = 86_400
_NEVER: Final = math.inf


@dataclass(frozen=True, slots=True)
class _Unit:
    unit: str
    factor: float | None  # canonical = value * factor + offset; None: drawn in this unit
    offset: float
    ref_low: float
    ref_high: float
    critical_low: float
    critical_high: float


@dataclass(frozen=True, slots=True)
class _Marker:
    code: str
    name: str
    loinc: str | None  # None for markers the catalog does not know
    typical: float
    sigma: float
    low: float  # plausible range, canonical unit
    high: float
    spellings: frozenset[str]
    lab_units: dict[str, _Unit]


class _Markers(NamedTuple):
    known: tuple[_Marker, ...]
    unknown: tuple[_Marker, ...]


class _User(NamedTuple):
    key: str  # f"{seed}:{user_id}:", the prefix of each result's id hash
    patient_id: str
    primary_lab: str


class _Panel(NamedTuple):
    day: int
    lab: str
    collected_at: str
    parsed_ts: int
    parsed_at: str
    size: int


class _Result(NamedTuple):
    parsed_ts: int
    record: Record  # revision 1
    revisions: tuple[tuple[int, Record], ...]  # (updated_ts, record) for revisions 2, 3
    deleted_ts: float


def _round(value: float) -> float:
    """Three significant digits, but never fewer than the integer part."""
    if value == 0:
        return 0.0
    return round(value, max(0, 2 - math.floor(math.log10(abs(value)))))


def _unit(unit: str, factor: float | None, offset: float, typical: float, sigma: float) -> _Unit:
    low, high = typical * math.exp(-REFERENCE_Z * sigma), typical * math.exp(REFERENCE_Z * sigma)
    if factor is not None:
        low, high = (low - offset) / factor, (high - offset) / factor
    low, high = _round(low), _round(high)
    margin = CRITICAL_MARGIN * (high - low)
    return _Unit(unit, factor, offset, low, high, low - margin, high + margin)


def _lab_unit(units: dict[str, _Unit], canonical: str, code: str, lab: LabProfile) -> _Unit:
    wanted = lab.overrides.get(code)
    if wanted in units:
        return units[wanted]
    return next((units[u] for u in lab.units if u in units), units[canonical])


@cache
def _markers() -> _Markers:
    levels = TYPICAL_LEVELS.split()
    typical = {
        levels[i]: (float(levels[i + 1]), float(levels[i + 2])) for i in range(0, len(levels), 3)
    }
    rows: dict[str, list[Any]] = {}
    for row in load_catalog():
        rows.setdefault(row.loop_code, []).append(row)
    known = []
    for code, units in rows.items():
        first = units[0]
        level, sigma = typical.get(
            code, (math.sqrt(first.plausible_min * first.plausible_max), 0.35)
        )
        by_unit = {u.unit: _unit(u.unit, u.factor, u.offset or 0.0, level, sigma) for u in units}
        lab_units = {
            name: _lab_unit(by_unit, first.canonical_unit, code, lab) for name, lab in LABS.items()
        }
        known.append(
            _Marker(
                code,
                first.name,
                first.loinc,
                level,
                sigma,
                first.plausible_min,
                first.plausible_max,
                frozenset(by_unit),
                lab_units,
            )
        )
    unknown = []
    for code, name, unit, level, sigma in UNKNOWN_MARKERS:
        spec = _unit(unit, 1.0, 0.0, level, sigma)
        unknown.append(
            _Marker(
                code,
                name,
                None,
                level,
                sigma,
                level / 100,
                level * 100,
                frozenset({unit}),
                dict.fromkeys(LABS, spec),
            )
        )
    return _Markers(tuple(known), tuple(unknown))


def _utc(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _local(ts: int, offset_min: int, *, with_offset: bool) -> str:
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts + offset_min * 60))
    if not with_offset:
        return text
    hours, minutes = divmod(abs(offset_min), 60)
    return f"{text}{'-' if offset_min < 0 else '+'}{hours:02d}:{minutes:02d}"


def _status(value: float, unit: _Unit) -> str:
    if value < unit.ref_low:
        return "critical" if value < unit.critical_low else "low"
    if value > unit.ref_high:
        return "critical" if value > unit.critical_high else "high"
    return "normal"


def _between(rng: random.Random, bounds: tuple[float, float]) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * rng.random()


def _misspell(unit: str, known: frozenset[str], pick: float) -> str:
    """A spelling of `unit` the catalog does not list (case, micro sign, stray space)."""
    variants = (unit.lower(), unit.upper(), unit.replace("u", "µ", 1), unit + " ")
    start = int(pick * len(variants))
    rotated = variants[start:] + variants[:start]
    return next(v for v in rotated if v not in known)


def _draw(rng: random.Random, marker: _Marker, unit: _Unit) -> float:
    canonical = marker.typical * math.exp(marker.sigma * rng.gauss(0.0, 1.0))
    canonical = min(max(canonical, marker.low), marker.high)
    if unit.factor is None:
        return _round(canonical)
    return _round((canonical - unit.offset) / unit.factor)


def _measure(
    rng: random.Random, marker: _Marker, unit: _Unit
) -> tuple[float | None, str | None, str, float]:
    """(value, value_text, status, the number a later correction starts from)."""
    number = _draw(rng, marker, unit)
    kind = rng.random()
    if kind < CENSORED_RATE:
        operator = rng.choice(CENSOR_OPERATORS)
        if operator.startswith("<"):
            bound = float(f"{unit.ref_low * _between(rng, (0.2, 0.9)):.1g}")
        else:
            bound = float(f"{unit.ref_high * _between(rng, (1.1, 3.0)):.1g}")
        text = operator + f"{bound:.10f}".rstrip("0").rstrip(".")
        return (bound if rng.random() < 0.5 else None), text, _status(bound, unit), bound
    if kind < CENSORED_RATE + TEXT_RESULT_RATE:
        text = rng.choice(tuple(TEXT_RESULTS))
        return None, text, TEXT_RESULTS[text], number
    if kind < CENSORED_RATE + TEXT_RESULT_RATE + IMPLAUSIBLE_RATE and unit.factor is not None:
        if unit.offset == 0 and rng.random() < 0.3:
            canonical = marker.low * _between(rng, (0.1, 0.5))
        else:
            canonical = marker.high * _between(rng, (1.5, 4.0))
        number = _round((canonical - unit.offset) / unit.factor)
    return number, None, _status(number, unit), number


class _Timeline:
    """One user's results so far, sorted by (parsed_at, id), and the next panel to arrive."""

    __slots__ = ("base", "changes", "items", "next_n", "parsed", "pending", "rng", "user")

    def __init__(self, rng: random.Random, user: _User) -> None:
        self.rng, self.user = rng, user
        self.items: list[_Result] = []
        self.parsed: list[int] = []
        self.base: list[Record] = []
        self.changes: list[tuple[int, tuple[tuple[int, Record], ...], float]] = []
        self.next_n = 0
        self.pending: _Panel | None = None

    def add(self, results: list[_Result]) -> None:
        results.sort(key=lambda r: (r.parsed_ts, r.record["id"]))
        if self.items and results and results[0].parsed_ts < self.items[-1].parsed_ts:
            results = sorted(self.items + results, key=lambda r: (r.parsed_ts, r.record["id"]))
            self.items, self.parsed, self.base, self.changes = [], [], [], []
        for result in results:
            if result.revisions or result.deleted_ts != _NEVER:
                self.changes.append((len(self.base), result.revisions, result.deleted_ts))
            self.items.append(result)
            self.parsed.append(result.parsed_ts)
            self.base.append(result.record)

    def visible(self, at_ts: float) -> list[Record]:
        count = bisect_right(self.parsed, at_ts)
        out: list[Record | None] = list(self.base[:count])
        for position, revisions, deleted_ts in self.changes:
            if position >= count:
                break
            if deleted_ts <= at_ts:
                out[position] = None
                continue
            for updated_ts, record in revisions:
                if updated_ts > at_ts:
                    break
                out[position] = record
        return [record.copy() for record in out if record is not None]


class SyntheticResults:
    """Every sandbox user's result history, deterministic per (seed, user)."""

    def __init__(
        self, seed: int, epoch: datetime, results_per_user: int = 40, cache_size: int = 4096
    ) -> None:
        day = epoch.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        self._seed = seed
        self._day0 = int(_timestamp(day))
        self._per_user = results_per_user
        self._cache_size = cache_size
        self._cache: OrderedDict[str, _Timeline] = OrderedDict()
        self._lock = threading.Lock()
        self._markers = _markers()

    def records(self, user_id: str, at: datetime) -> list[dict[str, Any]]:
        """The user's records as Loop would list them at time `at`: JSON-ready dicts, ordered by (parsed_at, id) ascending, deleted ones absent, each at its latest revision visible at `at`."""  # noqa: E501
        at_ts = _timestamp(at)
        with self._lock:
            timeline = self._cache.get(user_id)
            if timeline is None:
                timeline = self._cache[user_id] = self._start(user_id)
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(user_id)
            while timeline.pending is not None and timeline.pending.parsed_ts <= at_ts:
                self._arrive(timeline)
            return timeline.visible(at_ts)

    def _start(self, user_id: str) -> _Timeline:
        rng = random.Random(f"{self._seed}:{user_id}")
        user = _User(
            f"{self._seed}:{user_id}:",
            "pat_" + user_id.removeprefix("usr_"),
            rng.choice(tuple(LABS)),
        )
        timeline = _Timeline(rng, user)
        past: list[_Result] = []
        while timeline.next_n < self._per_user:
            day = -rng.randint(3, HISTORY_DAYS)
            past += self._results(timeline, self._panel(timeline, day, self._per_user))
        timeline.add(past)
        timeline.pending = self._panel(timeline, int(rng.random() * rng.randint(*PANEL_GAP_DAYS)))
        return timeline

    def _arrive(self, timeline: _Timeline) -> None:
        """Materialize the pending future panel and draw the one after it."""
        assert timeline.pending is not None  # noqa: S101 - the caller checked
        panel = timeline.pending
        timeline.add(self._results(timeline, panel))
        day = panel.day + timeline.rng.randint(*PANEL_GAP_DAYS)
        timeline.pending = self._panel(timeline, day) if day <= FUTURE_DAYS else None

    def _panel(self, timeline: _Timeline, day: int, limit: int | None = None) -> _Panel:
        rng, user = timeline.rng, timeline.user
        lab = user.primary_lab if rng.random() < PRIMARY_LAB_SHARE else rng.choice(tuple(LABS))
        offset = rng.choice(LABS[lab].utc_offsets_min)
        local_min = int(_between(rng, DRAW_WINDOW_LOCAL_MIN))
        collected = self._day0 + day * _DAY + local_min * 60 - offset * 60
        style = rng.random()
        if style < NAIVE_TIME_RATE + LOCAL_OFFSET_RATE:
            collected_at = _local(collected, offset, with_offset=style >= NAIVE_TIME_RATE)
        else:
            collected_at = _utc(collected)
        parsed = collected + int(_between(rng, PARSE_DELAY_HOURS) * 3600)
        size = rng.randint(*PANEL_SIZE)
        if limit is not None:
            size = min(size, limit - timeline.next_n)
        return _Panel(day, lab, collected_at, parsed, _utc(parsed), size)

    def _results(self, timeline: _Timeline, panel: _Panel) -> list[_Result]:
        rng, first = timeline.rng, timeline.next_n
        timeline.next_n += panel.size
        markers = rng.sample(self._markers.known, panel.size)
        return [self._result(timeline, panel, first + i, m) for i, m in enumerate(markers)]

    def _result(self, timeline: _Timeline, panel: _Panel, n: int, marker: _Marker) -> _Result:
        rng, user = timeline.rng, timeline.user
        if rng.random() < UNKNOWN_MARKER_RATE:
            marker = rng.choice(self._markers.unknown)
        unit = marker.lab_units[panel.lab]
        unit_text = unit.unit
        if marker.loinc is not None and rng.random() < UNKNOWN_UNIT_RATE:
            unit_text = _misspell(unit.unit, marker.spellings, rng.random())
        value, value_text, status, number = _measure(rng, marker, unit)
        record: Record = {
            "id": "res_" + hashlib.sha256(f"{user.key}{n}".encode()).hexdigest()[:16],
            "patient_id": user.patient_id,
            "biomarker_code": marker.code,
            "biomarker_name": marker.name,
            "value": value,
            "value_text": value_text,
            "unit": unit_text,
            "reference_low": unit.ref_low,
            "reference_high": unit.ref_high,
            "status": status,
            "collected_at": panel.collected_at,
            "parsed_at": panel.parsed_at,
            "loinc": marker.loinc if rng.random() < LOINC_RATE else None,
            "lab": panel.lab,
        }
        if rng.random() < EXTRA_FIELD_RATE:
            key, extra = rng.choice(EXTRA_FIELDS)
            record[key] = extra
        revisions: list[tuple[int, Record]] = []
        if rng.random() < CORRECTION_RATE:
            last_revision = 3 if rng.random() < THIRD_REVISION_SHARE else 2
            updated, previous = panel.parsed_ts, record
            for revision in range(2, last_revision + 1):
                updated += int(_between(rng, CORRECTION_DELAY_DAYS) * _DAY)
                change = _between(rng, (0.05, 0.25)) * (1 if rng.random() < 0.5 else -1)
                number = _round(number * (1 + change))
                previous = previous | {
                    "value": number,
                    "value_text": None,
                    "status": _status(number, unit),
                    "updated_at": _utc(updated),
                    "revision": revision,
                }
                revisions.append((updated, previous))
        deleted: float = _NEVER
        if rng.random() < DELETION_RATE:
            deleted = panel.parsed_ts + int(_between(rng, DELETION_DELAY_DAYS) * _DAY)
        return _Result(panel.parsed_ts, record, tuple(revisions), deleted)


def _timestamp(moment: datetime) -> float:
    if moment.utcoffset() is None:
        msg = f"the sandbox needs timezone-aware datetimes, got {moment!r}"
        raise ValueError(msg)
    return moment.timestamp()
