"""Fixtures for the orchestration tests: one Prefect test server for the whole session,
loop-sync's settings in the environment (as a worker has them), and connected users.

The flows add no SQL of their own beyond one count, so they run on SQLite only; the
library's tests cover PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import Artifact, Log, TaskRun
from prefect.logging.handlers import APILogWorker
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    PREFECT_HOME,
    PREFECT_LOCAL_STORAGE_PATH,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    temporary_settings,
)
from prefect.testing.utilities import prefect_test_harness
from sqlalchemy import select

from loop_sync.config import Settings
from loop_sync.sandbox import Sandbox
from loop_sync.sandbox.authority import user_ids
from loop_sync.schema import sync_runs
from loop_sync.services import Services
from tests.support import sandbox_settings, settings_env
from tests.sync.helpers import consent, fast, rows

ROOT = Path(__file__).resolve().parents[2]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "prefect_deploy: deploys deployments.yaml to a local Prefect server and runs a flow "
        "through a process worker (subprocesses, ~20 s)",
    )


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prefect's home for the session: profiles, result storage, the server's database."""
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="session")
def prefect_api(prefect_home: Path) -> Iterator[str]:
    """One Prefect test server for the session (it takes ~10 s to start); its API URL.

    No analytics, no flow-run heartbeat (a synchronous flow run would wait for its thread
    on exit), and everything Prefect writes under a temporary home.
    """
    with (
        temporary_settings(
            updates={
                PREFECT_HOME: prefect_home,
                PREFECT_LOCAL_STORAGE_PATH: prefect_home / "storage",
                PREFECT_SERVER_ANALYTICS_ENABLED: False,
                PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
            }
        ),
        prefect_test_harness(server_startup_timeout=60),
    ):
        url = PREFECT_API_URL.value()
        assert url, "the Prefect test harness gave no API URL"
        yield url


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """A SQLite file the test process and a worker's flow-run process can share."""
    return f"sqlite:///{tmp_path / 'loop_sync.db'}"


@pytest.fixture
def settings(sandbox: Sandbox, database_url: str, fernet_key: str) -> Settings:
    """The operator's settings, with a rate budget that does not slow the tests down."""
    return fast(sandbox_settings(sandbox, database_url, fernet_key))


@pytest.fixture
def loop_env(
    settings: Settings, services: Services, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """loop-sync's settings as environment variables, as a worker has them; the schema
    exists (the `services` fixture upgraded it)."""
    env = worker_env(settings)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def worker_env(settings: Settings) -> dict[str, str]:
    """`settings_env` without the settings left unset (it would spell them "None")."""
    unset = {
        str(field.validation_alias)
        for name, field in Settings.model_fields.items()
        if getattr(settings, name) is None
    }
    return {name: value for name, value in settings_env(settings).items() if name not in unset}


@pytest.fixture
def users(services: Services, sandbox: Sandbox) -> list[str]:
    """Every sandbox user, connected."""
    everyone = user_ids(sandbox.config.users)
    consent(services, *everyone)
    return everyone


def runs(services: Services, kind: str | None = None) -> list[dict[str, Any]]:
    """sync_runs rows (of one kind), oldest first."""
    query = select(sync_runs).order_by(sync_runs.c.started_at)
    if kind is not None:
        query = query.where(sync_runs.c.kind == kind)
    return rows(services.engine, query)


def artifacts(flow_run_id: UUID) -> dict[str, Artifact]:
    """The artifacts of a flow run by key."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {artifact.key: artifact for artifact in found if artifact.key}


def table(artifact: Artifact) -> list[dict[str, Any]]:
    """A table artifact's rows."""
    data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert isinstance(data, list)
    return data


def metrics(artifact: Artifact) -> dict[str, Any]:
    """A summary artifact as {metric: value}."""
    return {row["metric"]: row["value"] for row in table(artifact)}


def task_runs(flow_run_id: UUID) -> list[TaskRun]:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def api_logs(flow_run_id: UUID) -> list[Log]:
    """What the run logged to the Prefect API (after sending what is still queued)."""
    APILogWorker.drain_all()
    with get_client(sync_client=True) as client:
        return client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
