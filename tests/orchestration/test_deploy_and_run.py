"""deployments.yaml deployed for real: `prefect deploy` against a local Prefect server, a
backfill started the way an operator starts one, and run by a process worker.

Everything an operator runs is a subprocess with its own environment: the Prefect CLI
and the worker see only PREFECT_API_URL and loop-sync's settings (as a worker machine
has them); the worker's flow run reaches the live sandbox and the SQLite file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.workers.process import ProcessWorker

from loop_sync.config import Settings
from loop_sync.sandbox import Sandbox
from loop_sync.services import Services
from loop_sync.sync import finish_run, start_run, sync_users_now
from tests.orchestration.conftest import ROOT, artifacts, metrics, runs, worker_env
from tests.sync.helpers import consent

PREFECT = str(Path(sys.executable).with_name("prefect"))  # the venv's CLI
POOL = "loop-sync"
UUID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

pytestmark = [pytest.mark.prefect_deploy, pytest.mark.timeout(120)]


def prefect_env(api_url: str, home: Path, **extra: str) -> dict[str, str]:
    """A clean environment for the Prefect CLI: no LOOP_* of the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOP_", "PREFECT_"))}
    return {
        **env,
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        **extra,
    }


def prefect(
    *args: str, env: dict[str, str], cwd: Path = ROOT, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the Prefect CLI; fail with its output if it fails."""
    done = subprocess.run(
        [PREFECT, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def test_backfill_deployed_from_the_file_runs_through_a_worker(
    prefect_api: str,
    tmp_path: Path,
    settings: Settings,
    services: Services,
    sandbox: Sandbox,
) -> None:
    """`prefect deploy --all`, then `prefect deployment run backfill/backfill --param ...`
    picked up by `prefect worker start --run-once`: the run completes and the warehouse
    shows a replay backfill that made no API call."""
    consent(services, "usr_0001")
    first = start_run(services.engine, "sync")
    first.merge(sync_users_now(services, first.run_id, ["usr_0001"]))
    finish_run(services.engine, first)
    assert first.users_succeeded == 1
    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(
                name=POOL,
                type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
            ),
            overwrite=True,
        )
    env = prefect_env(prefect_api, tmp_path / "prefect-home")

    deployed = prefect(
        "deploy", "--prefect-file", "deployments.yaml", "--all", env={**env, "PWD": str(ROOT)}
    )
    assert "Deployment 'backfill/backfill' successfully created" in deployed.stdout
    started = prefect(
        "deployment",
        "run",
        "backfill/backfill",
        "--param",
        "mode=replay",
        "--param",
        'users=["usr_0001"]',
        "--param",
        "start=2000-01-01",
        env=env,
    )
    match = UUID_PATTERN.search(started.stdout)
    assert match, started.stdout
    flow_run_id = UUID(match.group())
    calls_before = sandbox.counters.requests["biomarkers"]

    prefect(
        "worker",
        "start",
        "--pool",
        POOL,
        "--run-once",
        "--prefetch-seconds",
        "5",
        env={**env, **worker_env(settings)},
        cwd=tmp_path,  # not the project: the pull step must take the flow run there
        timeout=90,
    )

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.state is not None
    assert flow_run.state.type == StateType.COMPLETED, flow_run.state.message
    assert flow_run.parameters == {
        "mode": "replay",
        "users": ["usr_0001"],
        "start": "2000-01-01",
    }
    [run] = runs(services, "backfill")
    assert (run["status"], run["users_attempted"], run["users_succeeded"]) == ("ok", 1, 1)
    assert run["rows_updated"] + run["rows_inserted"] + run["rows_rejected"] > 0
    assert sandbox.counters.requests["biomarkers"] == calls_before  # replay: no API call
    summary = metrics(artifacts(flow_run_id)["backfill-summary"])
    assert (summary["run_id"], summary["users_succeeded"]) == (run["run_id"], 1)
