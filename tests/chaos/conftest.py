"""The chaos suite: faults, crashes, bad input and secrets, injected on purpose.

Every test here carries the `chaos` marker (`pytest -m chaos` runs just this suite); the
suite runs with the rest in `make test`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).is_relative_to(HERE):
            item.add_marker(pytest.mark.chaos)
