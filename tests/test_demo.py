"""`make demo` end to end: what a newcomer runs first must work and leave a warehouse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.settings import Settings
from sqlalchemy import create_engine, func, select

from loop_sync.demo import prefect_environment
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


def test_the_demo_waits_for_a_cold_first_start_of_prefects_local_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh clone's first demo starts Prefect's local server on a new database, which
    took longer than Prefect's default 20 s on a slow machine: the demo stopped with
    "Timed out while attempting to connect to ephemeral Prefect API server"."""
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    for name, value in prefect_environment(tmp_path).items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.server.ephemeral.startup_timeout_seconds >= 120
    assert settings.home == (tmp_path / "prefect").resolve()
