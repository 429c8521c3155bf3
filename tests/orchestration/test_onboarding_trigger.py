"""The consent web app starts the `onboard` deployment for each new user."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
from prefect.deployments.runner import RunnerDeployment

from flows.onboard import onboard
from loop_sync.web.app import start_onboarding

pytestmark = pytest.mark.usefixtures("prefect_api")


async def _runs_of(deployment_id: object) -> list[dict[str, object]]:
    async with get_client() as client:
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
    return [run.parameters for run in runs]


def test_a_consent_schedules_the_users_first_sync_on_prefect() -> None:
    """start_onboarding creates a run of onboard/onboard for that user, without waiting."""
    deployment = onboard.to_deployment(name="onboard")
    assert isinstance(deployment, RunnerDeployment)  # typed maybe-async; sync here
    deployment_id = deployment.apply()

    start_onboarding("onboard/onboard", "usr_0007")

    assert asyncio.run(_runs_of(deployment_id)) == [{"user_id": "usr_0007"}]


def test_prefect_failing_never_undoes_the_consent(caplog: pytest.LogCaptureFixture) -> None:
    """An unknown deployment is logged as a warning; the web request is not failed."""
    with caplog.at_level(logging.WARNING, logger="loop_sync.web.app"):
        start_onboarding("onboard/does-not-exist", "usr_0008")

    assert "could not start onboard/does-not-exist for usr_0008" in caplog.text
