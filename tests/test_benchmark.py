"""The benchmark's smoke run: `make bench`'s script still runs every part, end to end.

At these sizes the figures mean nothing, so no target is asserted; what is asserted is
that each part ran and reported, so the script cannot rot between real benchmark runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.sync import SYNC_TARGETS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_the_benchmark_runs_every_part_and_reports_every_target(pg_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.sync", "--quick", "--database", pg_url],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    verdicts = re.findall(r"^(PASS|FAIL|SKIP)  (.*)$", done.stdout, re.MULTILINE)
    assert len(verdicts) == 2 + len(SYNC_TARGETS)
    assert all(label != "SKIP" for label, _ in verdicts), verdicts
    for figure in ("binary COPY", "upsert, half changed", "raw -> normalized", "achieved rate"):
        assert figure in done.stdout
    assert "time split: orchestration overhead" in done.stdout
    # The nightly-like run with every access token expired: every user synced, none failed.
    assert re.search(
        r"^\| expired +\| users ok / failed / reauth +\| (\d+) / 0 / 0$", done.stdout, re.M
    )
    # The rate budget keeps the sync under the sandbox's limit: no 429 becomes a failure.
    assert re.search(r"429s that became failures\s+\| \d+ / 0$", done.stdout, re.MULTILINE)
