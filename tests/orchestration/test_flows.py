"""The flows, run by Prefect against a test server, the live sandbox and a SQLite file."""

from __future__ import annotations

import logging
from datetime import date
from pathlib import Path
from typing import Any

import anyio
import pytest
from prefect.client.schemas.objects import StateType
from prefect.states import Completed, Failed
from sqlalchemy import select

import flows._common
from flows._common import _staggered, retry_transient
from flows.backfill import backfill
from flows.onboard import onboard
from flows.purge_user import purge_user
from flows.rotate_tokens import rotate_tokens
from flows.sync_biomarkers import sync_biomarkers
from loop_sync.errors import LoopUnreachable, ReauthRequired, TransientError
from loop_sync.sandbox import Sandbox
from loop_sync.schema import biomarker_results, grants, sync_state
from loop_sync.services import Services
from loop_sync.sync import SyncCounts, select_users, sync_users_now
from tests.orchestration.conftest import api_logs, artifacts, metrics, runs, table, task_runs
from tests.sync.helpers import consent, count, rows

pytestmark = pytest.mark.usefixtures("prefect_api", "loop_env")


def flow_run_id(state: Any) -> Any:
    found = state.state_details.flow_run_id
    assert found is not None
    return found


def synced_by(services: Services, run_id: str) -> set[str]:
    """Users whose latest sync attempt was this run."""
    query = select(sync_state.c.user_id).where(sync_state.c.last_run_id == run_id)
    return {row["user_id"] for row in rows(services.engine, query)}


def biomarker_requests(sandbox: Sandbox) -> int:
    return sandbox.counters.requests["biomarkers"]


def test_nightly_sync_writes_every_user_one_run_row_and_a_summary_artifact(
    services: Services, users: list[str]
) -> None:
    """Every consented user is synced, in one task per batch, and the run is summarized."""
    state = anyio.run(lambda: sync_biomarkers(batch_size=2, return_state=True))

    assert state.type == StateType.COMPLETED
    assert state.name == "Completed"
    [run] = runs(services)
    assert (run["kind"], run["status"], run["users_succeeded"]) == ("sync", "ok", len(users))
    assert synced_by(services, run["run_id"]) == set(users)
    summary = metrics(artifacts(flow_run_id(state))["sync-summary"])
    assert summary["run_id"] == run["run_id"]
    assert summary["users_attempted"] == summary["users_succeeded"] == len(users)
    assert (
        summary["rows_inserted"]
        == run["rows_inserted"]
        == count(services.engine, biomarker_results)
    )
    assert summary["rows_inserted"] > 0
    assert "duration_s" in summary
    names = sorted(t.name for t in task_runs(flow_run_id(state)))
    assert names == ["select-users", "sync-batch-1", "sync-batch-2", "sync-batch-3"]


def test_a_failing_user_leaves_the_others_synced_and_the_run_partial(
    services: Services, sandbox: Sandbox, users: list[str]
) -> None:
    """Loop refusing one user ends the run Completed/"Partial", with everyone else synced."""
    sandbox.set_knobs(forbidden_users={"usr_0002"})

    state = anyio.run(lambda: sync_biomarkers(return_state=True))

    assert state.type == StateType.COMPLETED
    assert state.name == "Partial"
    assert state.message is not None
    assert "1 failed" in state.message
    [run] = runs(services)
    assert run["status"] == "partial"
    assert (run["users_succeeded"], run["users_failed"]) == (len(users) - 1, 1)
    assert synced_by(services, run["run_id"]) == set(users)  # the failure is recorded too
    ok = rows(services.engine, select(sync_state).where(sync_state.c.last_status == "ok"))
    assert {row["user_id"] for row in ok} == set(users) - {"usr_0002"}
    found = artifacts(flow_run_id(state))
    assert metrics(found["sync-summary"])["users_failed"] == 1
    assert [row["user_id"] for row in table(found["sync-failures"])] == ["usr_0002"]


def test_a_run_where_no_user_goes_through_fails(
    services: Services, sandbox: Sandbox, users: list[str]
) -> None:
    """When every user fails the run is Failed, the state operators page on."""
    sandbox.set_knobs(forbidden_users=set(users))

    state = anyio.run(lambda: sync_biomarkers(return_state=True))

    assert state.type == StateType.FAILED
    [run] = runs(services)
    assert (run["status"], run["users_failed"]) == ("failed", len(users))


def test_a_batch_that_keeps_failing_counts_its_users_failed_and_the_run_goes_on(
    services: Services, users: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch raising a non-transient error is not retried; the next batches still run."""
    calls: list[list[str]] = []

    def broken_for_first_batch(
        services: Services, run_id: str, user_ids: list[str], **kwargs: Any
    ) -> SyncCounts:
        calls.append(list(user_ids))
        if "usr_0001" in user_ids:
            msg = "a bug in the first batch"
            raise RuntimeError(msg)
        return sync_users_now(services, run_id, user_ids, **kwargs)

    monkeypatch.setattr(flows._common, "sync_users_now", broken_for_first_batch)

    state = anyio.run(lambda: sync_biomarkers(batch_size=2, return_state=True))

    assert state.name == "Partial"
    # Each batch ran once (no retry of the first); two run at once, so in either order,
    # the first half as big, so that the two never end together (`_staggered`).
    assert sorted(calls) == [users[0:1], users[1:3], users[3:5]]
    [run] = runs(services)
    assert (run["users_failed"], run["users_succeeded"]) == (1, len(users) - 1)
    failures = table(artifacts(flow_run_id(state))["sync-failures"])
    assert {row["reason"] for row in failures} == {
        "batch 1 failed: RuntimeError (see the task run's logs)"
    }


def test_a_transient_failure_retries_the_batch(
    services: Services, users: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loop failing a whole batch once is retried, and the run ends ok."""
    calls: list[list[str]] = []

    def flaky(services: Services, run_id: str, user_ids: list[str], **kwargs: Any) -> SyncCounts:
        calls.append(list(user_ids))
        if len(calls) == 1:
            raise TransientError("temporarily_unavailable", "Loop is restarting", 503)
        return sync_users_now(services, run_id, user_ids, **kwargs)

    monkeypatch.setattr(flows._common, "sync_users_now", flaky)
    monkeypatch.setattr(flows._common.sync_batch, "retry_delay_seconds", [0.0, 0.0])

    state = anyio.run(lambda: sync_biomarkers(return_state=True))

    assert state.name == "Completed"
    assert calls == [users, users]
    [run] = runs(services)
    assert (run["status"], run["users_succeeded"]) == ("ok", len(users))


def test_shards_split_the_users_between_workers(services: Services, users: list[str]) -> None:
    """Two shards sync disjoint sets of users that together make everyone."""
    first = anyio.run(lambda: sync_biomarkers(shard=0, shards=2, return_state=True))
    second = anyio.run(lambda: sync_biomarkers(shard=1, shards=2, return_state=True))

    assert first.is_completed()
    assert second.is_completed()
    one, two = runs(services, "sync")
    mine = synced_by(services, one["run_id"])
    theirs = synced_by(services, two["run_id"])
    assert mine == set(select_users(services.engine, shard=0, shards=2))
    assert not mine & theirs
    assert mine | theirs == set(users)
    assert one["users_attempted"] + two["users_attempted"] == len(users)


def test_a_shard_outside_the_shards_fails_and_is_recorded(services: Services) -> None:
    """A run that cannot start its work is Failed, and sync_runs says so."""
    state = anyio.run(lambda: sync_biomarkers(shard=2, shards=2, return_state=True))

    assert state.type == StateType.FAILED
    [run] = runs(services)
    assert (run["kind"], run["status"]) == ("sync", "failed")
    assert metrics(artifacts(flow_run_id(state))["sync-summary"])["status"] == "failed"


def test_rotate_tokens_refreshes_idle_grants_only(
    services: Services, sandbox: Sandbox, users: list[str]
) -> None:
    """Fresh grants are left alone at idle_days=30; idle_days=None refreshes them all."""
    quiet = anyio.run(lambda: rotate_tokens(return_state=True))
    everyone = anyio.run(lambda: rotate_tokens(idle_days=None, return_state=True))

    assert quiet.is_completed()
    assert everyone.is_completed()
    fresh, forced = runs(services, "rotate")
    assert fresh["users_attempted"] == 0
    assert (forced["status"], forced["users_succeeded"]) == ("ok", len(users))
    assert sandbox.counters.refreshes.total() == len(users)
    assert metrics(artifacts(flow_run_id(everyone))["rotate-summary"])["users_succeeded"] == 5


def test_backfill_replay_calls_no_api_and_refetch_does(
    services: Services, sandbox: Sandbox, users: list[str]
) -> None:
    """Replay rewrites from the raw landing alone; refetch pulls from Loop again."""
    assert anyio.run(lambda: sync_biomarkers(return_state=True)).is_completed()
    before = biomarker_requests(sandbox)

    replayed = anyio.run(lambda: backfill(mode="replay", return_state=True))
    assert biomarker_requests(sandbox) == before
    refetched = anyio.run(
        lambda: backfill(users=["usr_0001", "usr_0001"], mode="refetch", return_state=True)
    )
    assert biomarker_requests(sandbox) > before

    assert replayed.is_completed()
    assert refetched.is_completed()
    replay_run, refetch_run = runs(services, "backfill")
    assert (replay_run["status"], replay_run["users_succeeded"]) == ("ok", len(users))
    assert (refetch_run["status"], refetch_run["users_attempted"]) == ("ok", 1)
    assert metrics(artifacts(flow_run_id(replayed))["backfill-summary"])["status"] == "ok"


def test_backfill_with_a_window_that_ends_before_it_starts_records_nothing(
    services: Services,
) -> None:
    """A reversed window fails at once, before any run is recorded."""
    state = anyio.run(
        lambda: backfill(start=date(2024, 2, 1), end=date(2024, 1, 1), return_state=True)
    )

    assert state.type == StateType.FAILED
    assert "swap start and end" in (state.message or "")
    assert runs(services) == []


def test_purge_user_removes_the_users_data_and_keeps_the_others(
    services: Services, users: list[str]
) -> None:
    """The purged user's results are gone and their grant revoked; nobody else changes."""
    assert anyio.run(lambda: sync_biomarkers(return_state=True)).is_completed()
    held = count(services.engine, biomarker_results, biomarker_results.c.user_id == "usr_0001")
    others = count(services.engine, biomarker_results) - held

    state = anyio.run(lambda: purge_user("usr_0001", return_state=True))

    assert state.is_completed()
    assert count(services.engine, biomarker_results, biomarker_results.c.user_id == "usr_0001") == 0
    assert count(services.engine, biomarker_results) == others
    [grant] = rows(services.engine, select(grants).where(grants.c.user_id == "usr_0001"))
    assert grant["status"] == "revoked"
    [run] = runs(services, "purge")
    assert (run["status"], run["rows_deleted"]) == ("ok", held)


def test_purging_an_unknown_user_fails_the_run(services: Services) -> None:
    """A user loop-sync never saw cannot be purged, and the run says so."""
    state = anyio.run(lambda: purge_user("usr_9999", return_state=True))

    assert state.type == StateType.FAILED
    [run] = runs(services, "purge")
    assert (run["status"], run["users_failed"]) == ("failed", 1)


def test_onboard_syncs_the_newly_consented_user(services: Services) -> None:
    """The first sync of one user is its own recorded run."""
    consent(services, "usr_0003")

    state = anyio.run(lambda: onboard("usr_0003", return_state=True))

    assert state.is_completed()
    [run] = runs(services)
    assert (run["kind"], run["status"], run["users_succeeded"]) == ("onboard", "ok", 1)
    assert count(services.engine, biomarker_results, biomarker_results.c.user_id == "usr_0003")


def test_retries_only_transient_failures() -> None:
    """Loop or the network failing is retried; a dead grant or a bug never is."""

    def retried(error: BaseException) -> bool:
        return retry_transient(None, None, Failed(data=error))  # type: ignore[arg-type]

    assert retried(TransientError("server_error", "", 503))
    assert retried(LoopUnreachable("http://loop", "connection refused"))
    assert not retried(ReauthRequired("usr_0001", "invalid_grant"))
    assert not retried(ValueError("a bug"))
    assert not retry_transient(None, None, Completed())  # type: ignore[arg-type]


def test_no_token_reaches_artifacts_results_or_logs(
    services: Services,
    sandbox: Sandbox,
    users: list[str],
    prefect_home: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No secret Loop issued appears in artifacts, task or flow results, logs or files."""
    caplog.set_level(logging.DEBUG)
    sandbox.set_knobs(forbidden_users={"usr_0004"})
    states = [
        anyio.run(lambda: sync_biomarkers(return_state=True)),
        anyio.run(lambda: rotate_tokens(idle_days=None, return_state=True)),
        anyio.run(lambda: backfill(mode="refetch", return_state=True)),
        anyio.run(lambda: purge_user("usr_0001", return_state=True)),
        anyio.run(lambda: onboard("usr_0002", return_state=True)),
    ]
    secrets = list(sandbox.authority.issued_secrets)
    assert len(secrets) > len(users)  # client secret, codes, access and refresh tokens

    seen: list[str] = [caplog.text]
    for state in states:
        seen += [repr(state), repr(state.data), state.message or ""]
        run_id = flow_run_id(state)
        seen += [repr(a.model_dump()) for a in artifacts(run_id).values()]
        seen += [repr(t.model_dump()) for t in task_runs(run_id)]
        seen += [log.message for log in api_logs(run_id)]
    seen += [
        path.read_text(errors="replace")
        for path in prefect_home.rglob("*")
        if path.is_file() and path.suffix not in (".db", ".db-wal", ".db-shm")
    ]
    everything = "\n".join(seen)
    assert "sync-summary" in everything
    leaked = [secret[:6] + "…" for secret in secrets if secret in everything]
    assert leaked == []


@pytest.mark.parametrize(
    ("count", "batch_size", "sizes"),
    [
        (0, 4, []),
        (3, 4, [3]),
        (4, 4, [4]),
        (9, 4, [2, 4, 3]),
        (10, 4, [2, 4, 4]),
        (3, 1, [1, 1, 1]),
    ],
)
def test_batches_cover_every_user_once_the_first_half_as_big(
    count: int, batch_size: int, sizes: list[int]
) -> None:
    """Two batches run at once and progress alike, so the first is half a batch: their
    ends, when only writes remain, never coincide. Every user is in exactly one batch."""
    users = [f"usr_{i:04d}" for i in range(count)]
    batches = list(_staggered(users, batch_size))
    assert [len(batch) for batch in batches] == sizes
    assert [user for batch in batches for user in batch] == users
