"""`loop-sync sync` as an operator runs it, against the live sandbox and a real database."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from loop_sync.cli import app, console
from loop_sync.config import Settings
from loop_sync.sandbox import Sandbox
from loop_sync.schema import biomarker_results, sync_runs
from loop_sync.services import Services
from tests.support import settings_env
from tests.sync.helpers import consent, count, live, rows, truth_ids

runner = CliRunner()
TEAM = ["usr_0001", "usr_0002", "usr_0003"]


@pytest.fixture
def env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The operator's environment: the same settings, as variables."""
    values = settings_env(settings, LOOP_SYNC_RATE_LIMIT_RPS="1000")
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(console, "width", 200)  # a wide terminal: one line per table row
    return values


@pytest.fixture
def team(services: Services) -> list[str]:
    consent(services, *TEAM)
    return TEAM


def figure(output: str, label: str) -> int:
    """The number in the summary table's row `label`."""
    found = re.search(rf"{label}\W+(\d+)", output)
    assert found, f"no '{label}' row in:\n{output}"
    return int(found.group(1))


def test_sync_all_prints_the_summary_table_and_exits_0(
    env: dict[str, str], services: Services, sandbox: Sandbox, team: list[str]
) -> None:
    """`sync --all` syncs every connected user and shows what it changed."""
    result = runner.invoke(app, ["sync", "--all"])

    assert result.exit_code == 0, result.output
    assert "sync ok" in result.output
    expected = sum(len(sandbox.truth(user)) for user in team)
    assert figure(result.output, "users attempted") == len(team)
    assert figure(result.output, "users synced") == len(team)
    assert figure(result.output, "users failed") == 0
    assert figure(result.output, "rows inserted") == expected
    assert figure(result.output, "rows deleted") == 0
    assert count(services.engine, biomarker_results) == expected
    run = rows(services.engine, sync_runs.select())
    assert [(r["status"], r["rows_inserted"]) for r in run] == [("ok", expected)]
    assert run[0]["run_id"] in result.output


def test_sync_user_limits_the_run_to_that_user(
    env: dict[str, str], services: Services, sandbox: Sandbox, team: list[str]
) -> None:
    """`sync --user X` touches X only."""
    result = runner.invoke(app, ["sync", "--user", "usr_0002"])

    assert result.exit_code == 0, result.output
    assert figure(result.output, "users attempted") == 1
    assert figure(result.output, "rows inserted") == len(sandbox.truth("usr_0002"))
    assert set(live(services.engine, "usr_0002")) == truth_ids(sandbox, "usr_0002")
    assert count(services.engine, biomarker_results) == len(sandbox.truth("usr_0002"))


def test_sync_exits_1_and_names_the_user_and_reason_when_a_user_failed(
    env: dict[str, str], services: Services, sandbox: Sandbox, team: list[str]
) -> None:
    """A user Loop refuses is listed with the reason, exit code 1; the others are synced."""
    sandbox.set_knobs(forbidden_users={"usr_0003"})

    result = runner.invoke(app, ["sync", "--all"])

    assert result.exit_code == 1, result.output
    assert "sync partial" in result.output
    assert figure(result.output, "users failed") == 1
    assert figure(result.output, "users synced") == 2
    assert re.search(r"usr_0003: .*Loop forbids reading this user's results", result.output)
    assert set(live(services.engine, "usr_0001")) == truth_ids(sandbox, "usr_0001")


def test_sync_without_user_or_all_is_a_usage_error(
    env: dict[str, str], services: Services, team: list[str]
) -> None:
    """Neither --user nor --all: exit code 2 with the fix, and nothing is synced."""
    result = runner.invoke(app, ["sync"])

    assert result.exit_code == 2, result.output
    assert "--user" in result.output
    assert "--all" in result.output
    assert count(services.engine, sync_runs) == 0


def test_backfill_replay_is_recorded_as_a_backfill_run_without_calling_loop(
    env: dict[str, str], services: Services, sandbox: Sandbox, team: list[str]
) -> None:
    """`backfill --mode replay` re-loads from the landing; sync_runs says it was a backfill."""
    assert runner.invoke(app, ["sync", "--all"]).exit_code == 0
    requests = sandbox.counters.requests["biomarkers"]

    result = runner.invoke(app, ["backfill", "--mode", "replay", "--start", "2000-01-01"])

    assert result.exit_code == 0, result.output
    assert "backfill ok" in result.output
    assert sandbox.counters.requests["biomarkers"] == requests
    kinds = [r["kind"] for r in rows(services.engine, sync_runs.select())]
    assert sorted(kinds) == ["backfill", "sync"]


def test_backfill_with_an_unknown_mode_is_a_usage_error(env: dict[str, str]) -> None:
    """Only refetch and replay exist."""
    result = runner.invoke(app, ["backfill", "--mode", "rewind"])
    assert result.exit_code == 2
