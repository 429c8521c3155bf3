"""The biomarker catalog: Loop's canonical markers, their units and conversion factors.

It ships as package data (``loop_sync/data/biomarker_catalog.csv``) so that the sandbox,
which invents results in these units, and the normalizer, which converts them back, read
one table and cannot drift apart. Each row is one (marker, unit) pair.
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from importlib.resources import files


@dataclass(frozen=True, slots=True)
class CatalogUnit:
    """One unit a marker can be reported in, and how to convert it to the canonical unit."""

    code: str
    loop_code: str
    loinc: str
    name: str
    canonical_unit: str
    unit: str
    # canonical = value * factor + offset; both None when the unit cannot be converted.
    factor: float | None
    offset: float | None
    # Hard validation limits in the canonical unit (not reference ranges).
    plausible_min: float
    plausible_max: float


def _optional_float(text: str) -> float | None:
    return float(text) if text.strip() else None


@functools.cache
def load_catalog() -> tuple[CatalogUnit, ...]:
    """Every (marker, unit) row of the catalog, in file order."""
    text = (files("loop_sync") / "data" / "biomarker_catalog.csv").read_text(encoding="utf-8")
    return tuple(
        CatalogUnit(
            code=row["code"],
            loop_code=row["loop_code"],
            loinc=row["loinc"],
            name=row["name"],
            canonical_unit=row["canonical_unit"],
            unit=row["alt_unit"],
            factor=_optional_float(row["factor_to_canonical"]),
            offset=_optional_float(row["offset_to_canonical"]),
            plausible_min=float(row["plausible_min"]),
            plausible_max=float(row["plausible_max"]),
        )
        for row in csv.DictReader(io.StringIO(text))
    )
