"""`make demo` end to end: what a newcomer runs first must work and leave a warehouse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, func, select

from loop_sync.schema import biomarker_result_history, biomarker_results, grants, sync_runs


def test_the_demo_connects_25_people_syncs_twice_and_leaves_a_warehouse(tmp_path: Path) -> None:
    """The demo's warehouse holds 25 active grants and two clean runs that applied changes."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    result = subprocess.run(
        [sys.executable, "-m", "loop_sync", "demo", "--dir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "25 people connected" in result.stdout
    assert result.stdout.count("SELECT") == 3  # the example queries an analyst can paste

    engine = create_engine(f"sqlite:///{tmp_path / 'demo' / 'loop_sync_demo.db'}")
    with engine.connect() as connection:
        statuses = connection.execute(select(grants.c.status)).scalars().all()
        runs = connection.execute(
            select(
                sync_runs.c.status, sync_runs.c.users_succeeded, sync_runs.c.rows_updated
            ).order_by(sync_runs.c.started_at)
        ).all()
        results = connection.execute(select(func.count()).select_from(biomarker_results)).scalar()
        history = connection.execute(
            select(func.count()).select_from(biomarker_result_history)
        ).scalar()
    assert statuses == ["active"] * 25
    assert [(status, users) for status, users, _ in runs] == [("ok", 25), ("ok", 25)]
    assert results is not None
    assert results > 25
    assert history == runs[1][2]  # each correction the second run applied kept its old version
