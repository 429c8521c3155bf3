"""A sync killed with SIGKILL mid-run, then run again, leaves the warehouse a clean run leaves."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from loop_sync.sandbox import Knobs, Sandbox, SandboxConfig
from loop_sync.sandbox.authority import user_ids
from loop_sync.schema import raw_records, sync_runs, sync_state, upgrade
from loop_sync.services import Services
from loop_sync.sync import run_sync, select_users
from tests.sync.helpers import consent, content, count, rows, worker_env

USERS = 12
BATCH_SIZE = 2
# Three kill points, drawn once from a seed: after 1..4 of the 6 batches are committed,
# plus 0-60 ms, so the kill lands while the next batch is fetched or being written.
_DRAW = random.Random(20_240_917)
KILL_POINTS = [
    (batches * BATCH_SIZE, round(_DRAW.uniform(0.0, 0.06), 3))
    for batches in sorted(_DRAW.sample(range(1, USERS // BATCH_SIZE - 1), 3))
]


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    """12 users with 30 results each: several pages per user, six batches per run. The clock
    is frozen: a result Loop parses between the killed run and the clean one would differ."""
    return SandboxConfig(
        users=USERS,
        seed=6,
        results_per_user=30,
        knobs=Knobs(auto_approve=True),
        frozen_clock=True,
    )


def committed(services: Services) -> int:
    """Users whose batch the worker has committed."""
    return count(services.engine, sync_state, sync_state.c.last_status == "ok")


def kill_mid_run(services: Services, kill_after: int, extra_s: float, tmp_path: Path) -> int:
    """Start a worker, SIGKILL it `extra_s` after `kill_after` users are committed;
    returns how many users it had committed."""
    log = (tmp_path / "worker.log").open("w+")
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.sync.worker", "--batch-size", str(BATCH_SIZE)],
        env=worker_env(services.settings),
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while committed(services) < kill_after:
            if worker.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"the worker ended or stalled before the kill point:\n{log.read()}")
            time.sleep(0.005)
        time.sleep(extra_s)
        worker.send_signal(signal.SIGKILL)
        assert worker.wait(10) == -signal.SIGKILL
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        log.close()
    return committed(services)


@pytest.mark.parametrize("kill_point", KILL_POINTS, ids=lambda p: f"after{p[0]}+{p[1]}s")
def test_a_sync_killed_mid_run_and_run_again_equals_one_clean_run(
    services: Services,
    sandbox: Sandbox,
    second_database_url: str,
    tmp_path: Path,
    kill_point: tuple[int, float],
) -> None:
    """SIGKILL between (or during) batch commits, then a new run: biomarker_results, the
    raw landing and every user's state are what a single clean run gives."""
    users = user_ids(USERS)
    consent(services, *users)
    sandbox.set_knobs(latency_ms=20)

    kill_after, extra_s = kill_point
    synced = kill_mid_run(services, kill_after, extra_s, tmp_path)

    assert kill_after <= synced < len(users)
    runs = rows(services.engine, select(sync_runs.c.status, sync_runs.c.finished_at))
    assert runs == [{"status": "running", "finished_at": None}]  # it never got to finish
    sandbox.set_knobs(latency_ms=0)
    again = run_sync(services, select_users(services.engine))
    assert again.status == "ok"
    assert again.users_succeeded == len(users)

    clean = Services.build(
        services.settings.model_copy(update={"database_url": SecretStr(second_database_url)})
    )
    try:
        upgrade(clean.engine)
        consent(clean, *users)
        once = run_sync(clean, users)
        assert once.status == "ok"
        assert content(services.engine) == content(clean.engine)
        assert count(services.engine, raw_records) == count(clean.engine, raw_records)
        landed = select(raw_records.c.user_id, raw_records.c.content_hash, raw_records.c.payload)
        assert sorted(map(str, rows(services.engine, landed))) == sorted(
            map(str, rows(clean.engine, landed))
        )
        per_user = select(sync_state.c.user_id, sync_state.c.last_status, sync_state.c.results_live)
        assert rows(services.engine, per_user.order_by(sync_state.c.user_id)) == rows(
            clean.engine, per_user.order_by(sync_state.c.user_id)
        )
    finally:
        clean.close()
