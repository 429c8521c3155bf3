"""The result columns by the dtype the normalizer promises for them."""

from __future__ import annotations

from loop_sync.schema import RESULT_COLUMN_NAMES

FLOAT_COLUMNS = {
    "value_source",
    "value_canonical",
    "reference_low_source",
    "reference_high_source",
    "reference_low_canonical",
    "reference_high_canonical",
}
TIME_COLUMNS = {"collected_at", "parsed_at", "updated_at"}
TEXT_COLUMNS = set(RESULT_COLUMN_NAMES) - FLOAT_COLUMNS - TIME_COLUMNS - {"revision"}
