"""Reading JSON that orjson refuses, so that it reads as orjson would have read it.

Loop's pages are read by orjson. What orjson refuses but JSON readers commonly accept
(UTF-16, NaN, ±Infinity, lone surrogates, integers beyond 64 bits) is read with Python's
json, made to agree: an integer beyond 64 bits becomes the nearest float, as orjson reads
it, so a record reads (and hashes) the same whatever else is on its page. NaN, ±Infinity
and numbers past a float's range become `NonFinite`: orjson refuses to write that type
(it would write a float NaN as null), so the landing keeps such a record as Loop sent it
(`landing.canonical_json`). A backfill's replay reads landed payloads the same way.
"""

from __future__ import annotations

import json
import math
from typing import Any


class NonFinite(float):
    """NaN or ±Infinity, as Loop sent it."""

    __slots__ = ()


def read_lenient(text: str | bytes) -> Any:
    """Python's json (bytes in UTF-8, -16 or -32), agreeing with orjson as above."""
    return json.loads(text, parse_int=_integer, parse_float=_float, parse_constant=NonFinite)


def _float(text: str) -> float:
    number = float(text)
    return number if math.isfinite(number) else NonFinite(number)


def _integer(text: str) -> int | float:
    """A JSON integer as orjson reads it: beyond 64 bits, the nearest float."""
    number = int(text)
    return number if -(2**63) <= number < 2**64 else _float(text)
