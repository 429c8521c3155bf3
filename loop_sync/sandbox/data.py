"""The sandbox's synthetic lab results: which records each user has at a given (virtual) time.

A user's history comes from ``random.Random(f"{seed}:{user_id}")``: ``results_per_user``
results parsed in the year before the epoch's day, then a panel every 3-10 days for 60 days.
Some results are corrected or deleted later, before or after the epoch, so moving the clock
reveals new results, corrections and deletions, as on Loop. A small seeded share is messy in
the ways Loop's data really is. Times count from the epoch's UTC day, so a seed gives the same
records per day offset. A user's past is drawn on their first call, and each future panel is
drawn from the same RNG, in order, when the clock first reaches it, so neither call order nor
cache evictions change anything. Otherwise ``records()`` only filters and copies.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
import time
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable
from datetime import UTC, datetime
from functools import cache
from itertools import accumulate
from statistics import NormalDist
from typing import Any, Final, NamedTuple

from loop_sync.catalog import CatalogUnit, load_catalog

# --- Shape of a user's history -----------------------------------------------------------
HISTORY_DAYS: Final = 365  # past panels are collected 3..365 days before the epoch's day
FUTURE_DAYS: Final = 60  # future panels, every PANEL_GAP_DAYS, for this many days after it
PANEL_GAP_DAYS: Final = (3, 10)
PANEL_SIZE: Final = (3, 12)
PARSE_DELAY_HOURS: Final = (1.0, 48.0)
DRAW_WINDOW_LOCAL_MIN: Final = (7 * 60, 12 * 60)  # blood is drawn 07:00-12:00 local time
PRIMARY_LAB_SHARE: Final = 0.5  # else another lab: a user's history mixes US and SI units
REFERENCE_Z: Final = 1.3  # reference range = typical * exp(+-REFERENCE_Z * sigma)
CRITICAL_MARGIN: Final = 0.5  # "critical" beyond half a range width outside the range

# --- Rates: per result, except the two collected_at rates, which are per panel ------------
LOINC_RATE: Final = 0.60
CORRECTION_RATE: Final = 0.04
THIRD_REVISION_SHARE: Final = 0.15  # of corrected results
CORRECTION_DELAY_DAYS: Final = (1.0, 20.0)  # after parsed_at, and between revisions
DELETION_RATE: Final = 0.015
DELETION_DELAY_DAYS: Final = (0.1, 90.0)  # after parsed_at
CENSORED_RATE: Final = 0.02
TEXT_RESULT_RATE: Final = 0.01
IMPLAUSIBLE_RATE: Final = 0.003
UNKNOWN_MARKER_RATE: Final = 0.005
UNKNOWN_UNIT_RATE: Final = 0.005
EXTRA_FIELD_RATE: Final = 0.05
LOCAL_OFFSET_RATE: Final = 0.20  # collected_at in the lab's UTC offset
NAIVE_TIME_RATE: Final = 0.005  # collected_at in local wall time with no offset at all


class Lab(NamedTuple):
    units: tuple[str, ...]  # preferred units, best first
    overrides: dict[str, str]  # loop_code -> unit, before the preferences
    utc_offsets_min: tuple[int, ...]


_SI = ("mmol/mol", "umol/L", "mmol/L", "pmol/L", "nmol/L", "g/L", "10*9/L", "L/L", "ug/L")
# A lab sends a marker in its override unit, else in the first preferred unit the catalog
# lists for the marker, else in the canonical unit (the US conventional one).
LABS: Final = {
    "Quest Diagnostics": Lab(("mIU/L", "K/uL"), {}, (-300, -360, -480)),
    "Labcorp": Lab(("uIU/mL", "x10E3/uL", "mL/min/1.73m2", "IU/L"), {}, (-300, -420)),
    "Synlab": Lab(("ukat/L", *_SI), {"hemoglobin": "g/L", "lpa-mass": "mg/dL"}, (60, 120)),
    "Cerba": Lab(("g/L", "umol/L", "mmol/L", "pmol/L", "nmol/L", "10*9/L"), {}, (60, 120)),
    "Sonic Healthcare": Lab((*_SI, "mIU/L"), {"hemoglobin": "g/L"}, (600, 570, 480)),
}
CENSOR_OPERATORS: Final = ("<", "<", ">", "<=", ">=")
TEXT_RESULTS: Final = {"Positive": "high", "Negative": "normal", "TNP": "normal"}  # -> status
EXTRA_FIELDS: Final = (("specimen", "serum"), ("specimen", "plasma"), ("fasting", True))
# Markers the catalog does not know: code, name, unit, typical level, sigma.
UNKNOWN_MARKERS: Final = (
    ("vitamin-k2", "Vitamin K2 (menaquinone-7)", "ng/mL", 0.4, 0.5),
    ("omega-3-index", "Omega-3 index", "%", 6.0, 0.25),
    ("cystatin-c", "Cystatin C", "mg/L", 0.9, 0.2),
)
# Typical level (canonical unit) and log-normal sigma of each catalog marker. A marker not
# listed uses the geometric mean of its plausible range and sigma 0.35.
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
# Each result is messy in at most one way: one draw picks which (and mostly none).
_MESSINESS: Final = (
    ("unknown marker", UNKNOWN_MARKER_RATE),
    ("censored", CENSORED_RATE),
    ("text", TEXT_RESULT_RATE),
    ("implausible", IMPLAUSIBLE_RATE),
    ("unknown unit", UNKNOWN_UNIT_RATE),
    ("extra field", EXTRA_FIELD_RATE),
)
_MESSY_BOUNDS: Final = tuple(accumulate(rate for _, rate in _MESSINESS))
_MESSY_RATE: Final = _MESSY_BOUNDS[-1]
_LEVELS: Final = 512  # values are drawn from this many log-normal quantiles, precomputed
_Z: Final = tuple(NormalDist().inv_cdf((i + 0.5) / _LEVELS) for i in range(_LEVELS))


class _Unit(NamedTuple):
    unit: str
    convertible: bool  # False: drawn in this unit (no factor, or a marker not in the catalog)
    scale: float  # value = canonical * scale + shift
    shift: float
    ref_low: float
    ref_high: float
    critical_low: float
    critical_high: float
    draws: tuple[tuple[float, str], ...] = ()  # (value, status) at each quantile


class _Marker(NamedTuple):
    code: str
    name: str
    loinc: str | None  # None: a marker the catalog does not know
    low: float  # plausible range, canonical unit
    high: float
    units: frozenset[str]
    by_lab: dict[str, tuple[_Unit, Record]]  # lab -> (unit, record template)


class _Panel(NamedTuple):
    day: int
    lab: str
    collected_at: str
    parsed_ts: int
    parsed_at: str
    size: int


Revisions = tuple[tuple[int, Record], ...]  # (updated_ts, record) of revisions 2 and 3
Pair = tuple[float, float]


def _round(value: float) -> float:
    """Three significant digits, but never fewer than the integer part."""
    return round(value, max(0, 2 - math.floor(math.log10(abs(value))))) if value else 0.0


def _unit(name: str, factor: float | None, offset: float, level: Pair, plausible: Pair) -> _Unit:
    """A unit's reference range and value draws, for a marker of level (mean, sigma)."""
    mean, sigma = level
    scale, shift = (1 / factor, -offset / factor) if factor else (1.0, 0.0)
    decimals = max(0, 2 - math.floor(math.log10(mean * scale + shift)))

    def convert(canonical: float) -> float:
        return round(min(max(canonical, plausible[0]), plausible[1]) * scale + shift, decimals)

    low, high = (convert(mean * math.exp(z * REFERENCE_Z * sigma)) for z in (-1, 1))
    margin = CRITICAL_MARGIN * (high - low)
    unit = _Unit(name, bool(factor), scale, shift, low, high, low - margin, high + margin)
    values = [convert(mean * math.exp(sigma * z)) for z in _Z]
    return unit._replace(draws=tuple((value, _status(value, unit)) for value in values))


@cache
def _markers() -> tuple[tuple[_Marker, ...], tuple[_Marker, ...]]:
    """The catalog's markers, then the unknown ones."""
    words = TYPICAL_LEVELS.split()
    levels = {words[i]: (float(words[i + 1]), float(words[i + 2])) for i in range(0, len(words), 3)}
    rows: dict[str, list[CatalogUnit]] = {}
    for row in load_catalog():
        rows.setdefault(row.loop_code, []).append(row)
    known = []
    for code, group in rows.items():
        head, plausible = group[0], (group[0].plausible_min, group[0].plausible_max)
        level = levels.get(code, (math.sqrt(plausible[0] * plausible[1]), 0.35))
        units = {r.unit: _unit(r.unit, r.factor, r.offset or 0.0, level, plausible) for r in group}
        chosen = {}
        for name, lab in LABS.items():
            wanted = (lab.overrides.get(code, ""), *lab.units, head.canonical_unit)
            chosen[name] = units[next(u for u in wanted if u in units)]
        by_lab = _templates(code, head.name, chosen)
        known.append(_Marker(code, head.name, head.loinc, *plausible, frozenset(units), by_lab))
    unknown = []
    for code, name, unit, mean, sigma in UNKNOWN_MARKERS:
        spec = _unit(unit, None, 0.0, (mean, sigma), (0.0, math.inf))
        by_lab = _templates(code, name, dict.fromkeys(LABS, spec))
        unknown.append(_Marker(code, name, None, 0.0, math.inf, frozenset({unit}), by_lab))
    return tuple(known), tuple(unknown)


def _templates(code: str, name: str, units: dict[str, _Unit]) -> dict[str, tuple[_Unit, Record]]:
    """Per lab, the unit and the record shape; blanks are filled per result."""
    return {
        lab: (
            unit,
            {
                "id": "",
                "patient_id": "",
                "biomarker_code": code,
                "biomarker_name": name,
                "value": None,
                "value_text": None,
                "unit": unit.unit,
                "reference_low": unit.ref_low,
                "reference_high": unit.ref_high,
                "status": "",
                "collected_at": "",
                "parsed_at": "",
                "loinc": None,
                "lab": lab,
            },
        )
        for lab, unit in units.items()
    }


def _utc(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _local(ts: int, offset_min: int, *, with_offset: bool) -> str:
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts + offset_min * 60))
    hours, minutes = divmod(abs(offset_min), 60)
    sign = "-" if offset_min < 0 else "+"
    return f"{text}{sign}{hours:02d}:{minutes:02d}" if with_offset else text


def _status(value: float, unit: _Unit) -> str:
    if value < unit.ref_low:
        return "critical" if value < unit.critical_low else "low"
    if value > unit.ref_high:
        return "critical" if value > unit.critical_high else "high"
    return "normal"


def _between(rng: random.Random, bounds: Pair) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * rng.random()


def _misspell(unit: str, known: frozenset[str], pick: float) -> str:
    """A spelling of `unit` the catalog does not list: case, micro sign or a stray space."""
    variants = (unit.lower(), unit.upper(), unit.replace("u", "µ", 1), unit + " ")
    start = int(pick * len(variants))
    return next(v for v in variants[start:] + variants[:start] if v not in known)


def _mess_up(
    rng: random.Random, record: Record, marker: _Marker, unit: _Unit, kind: float
) -> float:
    """Make `record` messy in the one way `kind` (uniform below _MESSY_RATE) picks (an unknown
    marker was already chosen by the caller); return the number a correction starts from."""
    number: float = record["value"]
    messiness = _MESSINESS[bisect_right(_MESSY_BOUNDS, kind)][0]
    if messiness == "censored":
        operator = rng.choice(CENSOR_OPERATORS)
        if operator.startswith("<"):  # a detection limit below the range, or one above it
            number = float(f"{unit.ref_low * _between(rng, (0.2, 0.9)):.1g}")
        else:
            number = float(f"{unit.ref_high * _between(rng, (1.1, 3.0)):.1g}")
        text = operator + f"{number:.10f}".rstrip("0").rstrip(".")
        value = number if rng.random() < 0.5 else None
        record.update(value=value, value_text=text, status=_status(number, unit))
    elif messiness == "text":
        text = rng.choice(tuple(TEXT_RESULTS))
        record.update(value=None, value_text=text, status=TEXT_RESULTS[text])
    elif messiness == "implausible" and unit.convertible:
        low_side = unit.shift == 0 and rng.random() < 0.3
        canonical = marker.low * _between(rng, (0.1, 0.5)) if low_side else marker.high * 2
        number = _round(canonical * unit.scale + unit.shift)
        record.update(value=number, status=_status(number, unit))
    elif messiness == "unknown unit":
        record["unit"] = _misspell(unit.unit, marker.units, rng.random())
    elif messiness == "extra field":
        field, extra = rng.choice(EXTRA_FIELDS)
        record[field] = extra
    return number


def _corrections(
    rng: random.Random, record: Record, unit: _Unit, number: float, since: int
) -> Revisions:
    revisions = []
    for revision in range(2, 4 if rng.random() < THIRD_REVISION_SHARE else 3):
        since += int(_between(rng, CORRECTION_DELAY_DAYS) * _DAY)
        number = _round(number * (1 + rng.choice((-1, 1)) * _between(rng, (0.05, 0.25))))
        correction = {"value": number, "value_text": None, "status": _status(number, unit)}
        record = record | correction | {"updated_at": _utc(since), "revision": revision}
        revisions.append((since, record))
    return tuple(revisions)


class _Timeline:
    """One user's results so far, in (parsed_at, id) order, and the next panel to arrive."""

    def __init__(self, rng: random.Random, key: str, patient_id: str) -> None:
        self.rng, self.key, self.patient_id = rng, key, patient_id
        self.primary_lab = rng.choice(tuple(LABS))
        self.other_labs = tuple(name for name in LABS if name != self.primary_lab)
        known = _markers()[0]
        self.markers = rng.sample(known, len(known)) * 2  # this user's usual tests, in a ring
        self.parsed: list[int] = []  # parsed_ts of each result
        self.base: list[Record] = []  # revision 1 of each result
        self.changes: list[tuple[int, Revisions, float]] = []  # (position, revisions, deleted_ts)
        self.next_n = 0
        self.pending: _Panel | None = None

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
        _timestamp(epoch)  # must be timezone-aware
        day = epoch.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        self._seed, self._day0 = seed, int(day.timestamp())
        self._per_user, self._cache_size = results_per_user, cache_size
        self._cache: OrderedDict[str, _Timeline] = OrderedDict()
        self._lock = threading.Lock()
        self._known, self._unknown = _markers()

    def records(self, user_id: str, at: datetime) -> list[dict[str, Any]]:
        """The user's records as Loop would list them at time `at`: JSON-ready dicts, ordered
        by (parsed_at, id) ascending, deleted ones absent, each at its latest revision visible
        at `at`."""
        at_ts = _timestamp(at)
        with self._lock:
            timeline = self._timeline(user_id)
            while timeline.pending is not None and timeline.pending.parsed_ts <= at_ts:
                panel = timeline.pending
                self._results(timeline, panel)
                day = panel.day + timeline.rng.randint(*PANEL_GAP_DAYS)
                size = timeline.rng.randint(*PANEL_SIZE)
                timeline.pending = self._panel(timeline, day, size) if day <= FUTURE_DAYS else None
            return timeline.visible(at_ts)

    def generate(self, user_ids: Iterable[str]) -> None:
        """Generate these users' histories now (as many as the cache holds), not at each
        one's first request: Loop serves results from storage, and a benchmark's sync
        should not share the machine with the sandbox making up its data."""
        with self._lock:
            for user_id in user_ids:
                self._timeline(user_id)

    def _timeline(self, user_id: str) -> _Timeline:
        timeline = self._cache.get(user_id)
        if timeline is None:
            timeline = self._cache[user_id] = self._start(user_id)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(user_id)
        return timeline

    def _start(self, user_id: str) -> _Timeline:
        rng = random.Random(f"{self._seed}:{user_id}")
        patient_id = "pat_" + user_id.removeprefix("usr_")
        timeline = _Timeline(rng, f"{self._seed}:{user_id}:", patient_id)
        sizes: list[int] = []
        while (drawn := sum(sizes)) < self._per_user:
            sizes.append(min(rng.randint(*PANEL_SIZE), self._per_user - drawn))
        days = (-rng.randint(3, HISTORY_DAYS) for _ in sizes)
        panels = [self._panel(timeline, day, size) for day, size in zip(days, sizes, strict=True)]
        for panel in sorted(panels, key=lambda panel: panel.parsed_ts):
            self._results(timeline, panel)
        first_day = int(rng.random() * rng.randint(*PANEL_GAP_DAYS))
        timeline.pending = self._panel(timeline, first_day, rng.randint(*PANEL_SIZE))
        return timeline

    def _panel(self, timeline: _Timeline, day: int, size: int) -> _Panel:
        rng, random_ = timeline.rng, timeline.rng.random
        lab, others = timeline.primary_lab, timeline.other_labs
        if random_() >= PRIMARY_LAB_SHARE:
            lab = others[int(random_() * len(others))]
        offsets = LABS[lab].utc_offsets_min
        offset = offsets[int(random_() * len(offsets))]
        local_min = int(_between(rng, DRAW_WINDOW_LOCAL_MIN))
        collected = self._day0 + day * _DAY + (local_min - offset) * 60
        style = random_()
        if style < NAIVE_TIME_RATE + LOCAL_OFFSET_RATE:
            collected_at = _local(collected, offset, with_offset=style >= NAIVE_TIME_RATE)
        else:
            collected_at = _utc(collected)
        parsed = collected + int(_between(rng, PARSE_DELAY_HOURS) * 3600)
        return _Panel(day, lab, collected_at, parsed, _utc(parsed), size)

    def _results(self, timeline: _Timeline, panel: _Panel) -> None:
        """Append a panel's results to the timeline: the hot path, so the common case is lean.

        Panels arrive in parsed_at order and a panel's results are drawn in id order, so the
        timeline stays sorted. In the rare tie with the previous panel, this one moves 1 s on.
        """
        random_, key, first = timeline.rng.random, timeline.key, timeline.next_n
        parsed, base, changes = timeline.parsed, timeline.base, timeline.changes
        if parsed and panel.parsed_ts <= parsed[-1]:
            panel = panel._replace(parsed_ts=parsed[-1] + 1, parsed_at=_utc(parsed[-1] + 1))
        lab, parsed_ts = panel.lab, panel.parsed_ts
        collected_at, parsed_at = panel.collected_at, panel.parsed_at
        timeline.next_n += panel.size
        ids = sorted(
            "res_" + hashlib.sha256(f"{key}{n}".encode()).hexdigest()[:16]
            for n in range(first, first + panel.size)
        )
        start = int(random_() * len(self._known))  # a run of this user's usual tests
        for rid, usual in zip(ids, timeline.markers[start : start + panel.size], strict=True):
            kind = random_()  # below _MESSY_RATE: one kind of mess (the first is the marker)
            unknown = kind < UNKNOWN_MARKER_RATE
            marker = self._unknown[int(random_() * len(self._unknown))] if unknown else usual
            unit, template = marker.by_lab[lab]
            record = template.copy()
            record["id"], record["patient_id"] = rid, timeline.patient_id
            record["value"], record["status"] = unit.draws[int(random_() * _LEVELS)]
            record["collected_at"], record["parsed_at"] = collected_at, parsed_at
            if random_() < LOINC_RATE:
                record["loinc"] = marker.loinc
            number = record["value"]
            if kind < _MESSY_RATE:
                number = _mess_up(timeline.rng, record, marker, unit, kind)
            revisions: Revisions = ()
            if random_() < CORRECTION_RATE:
                revisions = _corrections(timeline.rng, record, unit, number, parsed_ts)
            if random_() < DELETION_RATE:
                deleted = parsed_ts + int(_between(timeline.rng, DELETION_DELAY_DAYS) * _DAY)
                changes.append((len(base), revisions, deleted))
            elif revisions:
                changes.append((len(base), revisions, math.inf))
            base.append(record)
            parsed.append(parsed_ts)


def _timestamp(moment: datetime) -> float:
    if moment.utcoffset() is None:
        msg = f"the sandbox needs timezone-aware datetimes, got {moment!r}"
        raise ValueError(msg)
    return moment.timestamp()
