"""The data dictionary keeps up with the schema and the views."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loop_sync.schema import VIEWS_DIR, metadata

ROOT = Path(__file__).resolve().parents[1]
DICTIONARY = (ROOT / "docs" / "warehouse.md").read_text()
WAREHOUSE = [
    "biomarker_results",
    "biomarker_result_history",
    "raw_records",
    "rejects",
    "sync_state",
    "sync_runs",
]


@pytest.mark.parametrize("table", WAREHOUSE)
def test_every_warehouse_column_is_in_the_data_dictionary(table: str) -> None:
    """Each column has a row (with a meaning) under its table's heading in docs/warehouse.md."""
    section = DICTIONARY.split(f"### `{table}`", 1)[1].split("### ", 1)[0]
    for column in metadata.tables[table].columns:
        row = re.search(rf"^\| `{column.name}` \|.*\| (.+) \|$", section, re.MULTILINE)
        assert row is not None, f"{table}.{column.name} is not documented"
        assert row.group(1).strip(), f"{table}.{column.name} has no meaning"


@pytest.mark.parametrize("view", sorted(p.stem for p in VIEWS_DIR.glob("*.sql")))
def test_every_view_is_in_the_data_dictionary(view: str) -> None:
    """Each view in sql/views/ is listed in docs/warehouse.md."""
    assert f"| `{view}` |" in DICTIONARY
