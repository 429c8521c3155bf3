"""SIGKILL a sync worker at 20 seeded points, and run again after each (issue 7).

The kills land while Loop holds a refresh (before and after it rotated), inside the
warehouse write transaction, between two batch commits, and at random moments. After
each, the next run must leave the warehouse equal to Loop's truth with no record lost,
and no refresh token may be lost except in the one case docs/tokens.md documents: the
process died after recording a refresh attempt and before storing its answer, and Loop
had rotated. That user alone becomes reauth_required ("rotation outcome lost") without
the stale token ever reaching Loop again: Loop sees no replay and revokes no grant.

Nothing is mocked: a worker subprocess (tests/sync/worker.py), a real SIGKILL, the
sandbox over loopback HTTP, PostgreSQL. The test times each kill by watching Loop's side
in-process (the sandbox's counters) and the worker's locks in pg_locks, and establishes
after the fact where each kill really landed; a kill that comes after the worker finished
counts as "too late" and fails the test, so it cannot pass without killing anything.
"""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Connection, Engine, exists, select, text
from sqlalchemy.engine import make_url

from loop_sync.config import Settings
from loop_sync.oidc import TokenResponse
from loop_sync.sandbox import Knobs, Sandbox, SandboxConfig
from loop_sync.sandbox.authority import user_ids
from loop_sync.schema import (
    GRANT_ACTIVE,
    GRANT_REAUTH_REQUIRED,
    biomarker_results,
    grant_events,
    grants,
    raw_records,
    sync_runs,
    sync_state,
    tokens,
    upgrade,
)
from loop_sync.services import Services
from loop_sync.sync import run_sync, select_users
from loop_sync.vault import LEASE_S, LOST_ROTATION, TokenVault, utcnow
from tests.sandbox.helpers import TOKEN, login
from tests.support import fresh_pg_schema, sandbox_settings
from tests.sync.helpers import CONTENT_COLUMNS, DAY, consent, count, fast, rows, worker_env

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(300)]

USERS = 8
BATCH_SIZE = 2
BATCHES = USERS // BATCH_SIZE
API_LATENCY_MS = 20.0  # per page of 10 results: a run lasts ~2 s, so a kill lands mid-run
TOKEN_DELAY_MS = 300.0  # how long Loop holds a refresh in the refresh kills
ANYWHERE_S = (0.05, 1.2)  # a random kill comes this long after the run started

Target = Literal[
    "refresh_sent", "refresh_rotated", "upsert_open", "upsert_blocked", "between_users", "anywhere"
]
TARGETS: dict[Target, int] = {  # how many of the 20 kills aim at each point
    "refresh_sent": 3,  # Loop has the refresh request and has not acted on it yet
    "refresh_rotated": 3,  # Loop has rotated and holds the answer
    "upsert_open": 3,  # the batch's write transaction is open
    "upsert_blocked": 3,  # it has landed raw records and waits to write results
    "between_users": 3,  # a batch has just committed
    "anywhere": 5,
}


@dataclass(frozen=True)
class KillPoint:
    """Where a kill aims: at the `nth` refresh, write transaction or commit of the run (or
    just after the run started), plus `offset_s`. Loop's clock first moves `advance_days`
    on: new results, corrections and deletions, and every access token expired at Loop,
    so each user's first request is refused and their token refreshed."""

    target: Target
    nth: int
    offset_s: float
    advance_days: int


def draw_plan(seed: int) -> list[KillPoint]:
    """The 20 kill points, reproducible from the seed."""
    rng = random.Random(seed)
    targets = [target for target, times in TARGETS.items() for _ in range(times)]
    rng.shuffle(targets)
    plan = []
    for target in targets:
        if target in ("refresh_sent", "refresh_rotated"):
            nth, offset = rng.randint(1, 4), rng.uniform(0, TOKEN_DELAY_MS / 2000)
        elif target == "upsert_open":
            nth, offset = rng.randint(1, BATCHES), rng.uniform(0, 0.01)
        elif target == "upsert_blocked":  # the first batch with new or corrected results
            nth, offset = 1, 0.0
        elif target == "between_users":  # after the last commit the run is over
            nth, offset = rng.randint(1, BATCHES - 1), rng.uniform(0, 0.005)
        else:
            nth, offset = 0, rng.uniform(*ANYWHERE_S)
        days = 3 if target == "upsert_blocked" else rng.randint(1, 3)  # 3: results change
        plan.append(KillPoint(target, nth, round(offset, 3), days))
    return plan


PLAN = draw_plan(20_250_611)


def knobs_for(target: Target) -> dict[str, Any]:
    """A refresh kill makes Loop hold each refresh before it acts (`refresh_sent`) or after
    it rotated (`refresh_rotated`); the other kills see a token endpoint a little slow both
    ways, so that they too may catch a refresh."""
    before, after = {
        "refresh_sent": (TOKEN_DELAY_MS, 0.0),
        "refresh_rotated": (0.0, TOKEN_DELAY_MS),
    }.get(target, (50.0, 50.0))
    return {
        "endpoint_latency_ms": {"biomarkers": API_LATENCY_MS, "token": before},
        "refresh_answer_delay_ms": after,
    }


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    """8 users of 40 results (seed 6 corrects and deletes some as the clock moves); access
    tokens live 1 s, so refreshes happen all through a run. The clock is frozen: Loop's truth
    changes only when the test moves it, never between a kill and the check of its re-run."""
    return SandboxConfig(
        users=USERS,
        seed=6,
        results_per_user=40,
        knobs=Knobs(auto_approve=True, access_token_ttl_s=1),
        frozen_clock=True,
    )


@pytest.fixture
def database_url(pg_schema_url: str) -> str:
    """PostgreSQL only: the kills are timed by the worker's locks in pg_locks."""
    return pg_schema_url


@pytest.fixture
def settings(sandbox: Sandbox, database_url: str, fernet_key: str) -> Settings:
    return fast(sandbox_settings(sandbox, database_url, fernet_key))


# --- the worker and its kill -------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """The worker's run as PostgreSQL sees it at one moment."""

    committed: int  # users of the run whose batch is committed
    in_transaction: bool  # it holds its batch's grants FOR UPDATE: a write transaction is open
    writing: bool  # and that transaction has written warehouse rows it has not committed
    waiting: bool  # and waits for a lock


PROBE = text(
    """
    SELECT
      (SELECT count(*) FROM sync_state WHERE last_run_id = :run AND last_status = 'ok'),
      EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)
              WHERE a.application_name = :app AND l.mode = 'RowShareLock'
                AND l.relation = 'grants'::regclass),
      EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)
              WHERE a.application_name = :app AND l.mode = 'RowExclusiveLock' AND l.granted
                AND l.relation IN ('raw_records'::regclass, 'biomarker_results'::regclass,
                                   'biomarker_result_history'::regclass,
                                   'rejects'::regclass, 'sync_state'::regclass)),
      EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)
              WHERE a.application_name = :app AND NOT l.granted)
    """
)


def probe(connection: Connection, run_id: str, app: str) -> Probe:
    committed, in_transaction, writing, waiting = connection.execute(
        PROBE, {"run": run_id, "app": app}
    ).one()
    connection.rollback()  # hold no snapshot between probes
    return Probe(committed, in_transaction, writing, waiting)


@dataclass
class Worker:
    """A sync worker started ahead of time (`--wait`): it syncs once told to go."""

    process: subprocess.Popen[bytes]
    app: str  # the application_name of its database sessions
    log: IO[bytes]

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.log.close()


def spawn(settings: Settings, tmp_path: Path, index: int) -> Worker:
    """A worker whose database sessions carry a name of their own, so that pg_locks tells
    its transactions from anyone else's on the server."""
    app = f"loop-sync-kill-{index:02d}-{uuid.uuid4().hex[:8]}"
    url = make_url(settings.database_url.get_secret_value()).update_query_dict(
        {"application_name": app}
    )
    named = settings.model_copy(
        update={"database_url": SecretStr(url.render_as_string(hide_password=False))}
    )
    log = (tmp_path / f"worker-{index:02d}.log").open("w+b")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.sync.worker", "--batch-size", str(BATCH_SIZE), "--wait"],
        env=worker_env(named),
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return Worker(process, app, log)


@dataclass(frozen=True)
class Shot:
    """The moment of a kill: the worker's run and the last look at it before SIGKILL."""

    run_id: str
    at_kill: Probe | None  # None: the worker had finished, the kill came too late
    loop_held_refresh: bool  # Loop had a token request it had not finished with


@contextmanager
def results_locked(engine: Engine) -> Iterator[None]:
    """Another session holds biomarker_results in SHARE mode, as a CREATE INDEX would: a
    writer of results waits, inside its transaction, until the block ends."""
    with engine.connect() as session:
        session.execute(text("LOCK TABLE biomarker_results IN SHARE MODE"))
        try:
            yield
        finally:
            session.rollback()


def kill_at(point: KillPoint, worker: Worker, engine: Engine, sandbox: Sandbox) -> Shot:
    """Tell the worker to go and SIGKILL it at the point."""
    blocked = results_locked(engine) if point.target == "upsert_blocked" else nullcontext()
    with blocked:
        return _kill_at(point, worker, engine, sandbox)


def _kill_at(point: KillPoint, worker: Worker, engine: Engine, sandbox: Sandbox) -> Shot:
    counters = sandbox.counters
    runs_before = count(engine, sync_runs)
    sent_before, rotated_before = counters.requests["token"], counters.refreshes.total()
    fired: dict[Target, Callable[[Probe, float], bool]] = {
        "refresh_sent": lambda _, __: counters.requests["token"] - sent_before >= point.nth,
        "refresh_rotated": lambda _, __: counters.refreshes.total() - rotated_before >= point.nth,
        "upsert_open": lambda now, _: now.in_transaction and now.committed >= point.nth - 1,
        "upsert_blocked": lambda now, _: now.waiting,
        "between_users": lambda now, _: now.committed >= point.nth,
        "anywhere": lambda _, running_s: running_s >= point.offset_s,
    }
    worker.go()
    deadline = time.monotonic() + 30
    while count(engine, sync_runs) == runs_before:
        if worker.process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the worker ended or stalled before its run began:\n{worker.output()}")
        time.sleep(0.005)
    started = time.monotonic()
    newest = select(sync_runs.c.run_id).order_by(sync_runs.c.started_at.desc()).limit(1)
    run_id: str = rows(engine, newest)[0]["run_id"]
    with engine.connect() as connection:
        while not fired[point.target](
            last := probe(connection, run_id, worker.app), time.monotonic() - started
        ):
            if worker.process.poll() is not None:
                return Shot(run_id, None, loop_held_refresh=False)
            if time.monotonic() > deadline:
                pytest.fail(f"kill point {point} never came:\n{worker.output()}")
            time.sleep(0.002)
        if point.offset_s and point.target != "anywhere":
            time.sleep(point.offset_s)
            last = probe(connection, run_id, worker.app)
    held = counters.in_flight[TOKEN] > 0
    worker.process.send_signal(signal.SIGKILL)
    code = worker.process.wait(10)
    assert code in (0, -signal.SIGKILL), worker.output()
    return Shot(run_id, last if code == -signal.SIGKILL else None, held)


@dataclass
class Kill:
    """Where one kill landed, established once the worker's sessions and requests ended."""

    point: KillPoint
    shot: Shot
    committed_after: int  # users of the killed run whose batch had committed
    in_window: set[str]  # refresh attempt recorded, its answer not stored
    lost: set[str]  # their refresh token is no longer valid at Loop
    leases_left: int  # users whose refresh lease the dead worker still held

    def phases(self) -> list[str]:
        at_kill = self.shot.at_kill
        if at_kill is None:
            return ["too late"]
        landed = []
        if self.shot.loop_held_refresh:
            landed.append("refresh at Loop, rotated" if self.lost else "refresh at Loop, unrotated")
        elif self.in_window:
            landed.append("refresh recorded, not at Loop")
        if at_kill.in_transaction and self.committed_after == at_kill.committed:
            landed.append("upsert, rows written" if at_kill.writing else "upsert, before rows")
        elif 0 < self.committed_after < USERS:
            landed.append("between users")
        else:
            landed.append("before the first commit" if not self.committed_after else "at the end")
        return landed


def settle(engine: Engine, sandbox: Sandbox, app: str) -> None:
    """Wait until PostgreSQL has rolled back and closed the dead worker's sessions and Loop
    has finished (or dropped) every request it had from it."""
    deadline = time.monotonic() + 10
    sessions = text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :app")
    while True:
        with engine.connect() as connection:
            gone = not connection.execute(sessions, {"app": app}).scalar_one()
        if gone and not sandbox.counters.in_flight.total():
            return
        assert time.monotonic() < deadline, f"the dead worker lingers: {app}"
        time.sleep(0.01)


def observe(services: Services, shot: Shot, point: KillPoint) -> Kill:
    engine = services.engine
    unknown = select(tokens.c.user_id).where(tokens.c.refresh_started_at.is_not(None))
    return Kill(
        point,
        shot,
        committed_after=count(
            engine,
            sync_state,
            sync_state.c.last_run_id == shot.run_id,
            sync_state.c.last_status == "ok",
        ),
        in_window={row["user_id"] for row in rows(engine, unknown)},
        lost=lost_tokens(services),
        leases_left=count(engine, tokens, tokens.c.lease_owner.is_not(None)),
    )


def lost_tokens(services: Services) -> set[str]:
    """Active users whose stored refresh token Loop no longer accepts, by RFC 7662
    introspection, which (unlike presenting the token) never revokes anything."""
    stored = rows(
        services.engine,
        select(tokens.c.user_id, tokens.c.refresh_token)
        .join(grants, grants.c.user_id == tokens.c.user_id)
        .where(grants.c.status == GRANT_ACTIVE),
    )
    return {
        row["user_id"]
        for row in stored
        if services.oidc.still_active(services.cipher.decrypt(row["refresh_token"])) is not True
    }


# --- the next run and its checks ---------------------------------------------------------


def next_run(services: Services) -> Services:
    """The services of the next run, which comes after the dead worker's refresh lease
    expired (docs/tokens.md: a dead holder blocks its user for at most LEASE_S): the vault's
    clock is LEASE_S + 5 s on, so that no re-run sits out a lease."""
    later = timedelta(seconds=LEASE_S + 5)

    def clock() -> datetime:
        return utcnow() + later

    vault = TokenVault(services.engine, services.cipher, services.oidc, clock=clock)
    return dataclasses.replace(services, vault=vault)


def check_next_run(services: Services, sandbox: Sandbox, lost: set[str], where: str) -> None:
    """The next run syncs every user but those whose token is lost; those are
    reauth_required for "rotation outcome lost", and Loop saw no replayed token."""
    engine = services.engine
    again = run_sync(next_run(services), select_users(engine))

    assert again.users_failed == 0, f"{where}: {again.failures}"
    assert again.failures == dict.fromkeys(lost, LOST_ROTATION), where
    assert again.users_succeeded == USERS - len(lost), where
    not_active = rows(
        engine,
        select(grants.c.user_id, grants.c.status, grants.c.status_reason).where(
            grants.c.status != GRANT_ACTIVE
        ),
    )
    assert {g["user_id"]: (g["status"], g["status_reason"]) for g in not_active} == dict.fromkeys(
        lost, (GRANT_REAUTH_REQUIRED, LOST_ROTATION)
    ), where
    assert count(engine, tokens, tokens.c.refresh_started_at.is_not(None)) == 0, where
    assert count(engine, tokens, tokens.c.lease_owner.is_not(None)) == 0, where
    seen = sandbox.counters.snapshot()
    assert seen["replays_detected"]["total"] == 0, f"{where}: {seen}"
    assert seen["grants_revoked"]["total"] == 0, f"{where}: {seen}"
    assert seen["alerts"] == [], where


def reconnect(services: Services, sandbox: Sandbox, *users: str) -> None:
    """The person connects again, the documented fix for reauth_required: Loop's consent and
    code exchange over HTTP, stored as onboarding stores them. Onboarding itself would refuse
    the id_token, rightly: Loop signs it by its clock, which this test has moved weeks ahead
    of ours (onboarding's checks are tested in tests/web)."""
    with httpx.Client(base_url=sandbox.issuer, timeout=10) as http:
        for user in users:
            response = TokenResponse.model_validate(login(http, sandbox, login_hint=user).body)
            assert response.scope is not None
            services.vault.store_consent(user, response, tuple(response.scope.split()))


def wrong_records(engine: Engine, sandbox: Sandbox, users: list[str]) -> dict[str, Any]:
    """Per user, Loop's results the warehouse lacks or holds at an older revision, and live
    rows Loop no longer lists; empty when the warehouse is the truth."""
    wrong: dict[str, Any] = {}
    for user in users:
        truth = {r["id"]: r.get("revision", 1) for r in sandbox.truth(user)}
        live = select(biomarker_results.c.result_id, biomarker_results.c.revision).where(
            biomarker_results.c.user_id == user, biomarker_results.c.deleted_at.is_(None)
        )
        held = {row["result_id"]: row["revision"] for row in rows(engine, live)}
        missing = sorted(truth.keys() - held.keys())
        stale = sorted(k for k in truth.keys() & held.keys() if held[k] != truth[k])
        extra = sorted(held.keys() - truth.keys())
        if missing or stale or extra:
            wrong[user] = {"missing": missing, "stale": stale, "not_at_loop": extra}
    return wrong


def check_warehouse(engine: Engine, sandbox: Sandbox, users: list[str], where: str) -> int:
    """Every user's live results are Loop's, each stored result has its raw record landed
    (a replay backfill rebuilds from the landing), and every sync state says ok with the
    right count. Returns how many of Loop's results were missing or stale: 0 or it fails."""
    wrong = wrong_records(engine, sandbox, users)
    lost = sum(len(w["missing"]) + len(w["stale"]) for w in wrong.values())
    assert wrong == {}, f"{where}: the warehouse is not Loop's truth: {wrong}"
    landed = (raw_records.c.user_id == biomarker_results.c.user_id) & (
        raw_records.c.content_hash == biomarker_results.c.content_hash
    )
    unlanded = select(biomarker_results.c.result_id).where(~exists().where(landed))
    assert rows(engine, unlanded) == [], f"{where}: results without their raw record"
    states = select(sync_state.c.user_id, sync_state.c.last_status, sync_state.c.results_live)
    assert {s["user_id"]: (s["last_status"], s["results_live"]) for s in rows(engine, states)} == {
        user: ("ok", len(sandbox.truth(user))) for user in users
    }, where
    return lost


def live_content(engine: Engine) -> list[tuple[Any, ...]]:
    query = (
        select(*CONTENT_COLUMNS)
        .where(biomarker_results.c.deleted_at.is_(None))
        .order_by(biomarker_results.c.result_id)
    )
    return [tuple(row.values()) for row in rows(engine, query)]


def check_same_as_one_clean_run(
    services: Services, sandbox: Sandbox, pg_url: str, users: list[str]
) -> None:
    """Value for value, the warehouse killed 20 times holds what one clean run writes."""
    with fresh_pg_schema(pg_url) as clean_url:
        clean = Services.build(
            services.settings.model_copy(update={"database_url": SecretStr(clean_url)})
        )
        try:
            upgrade(clean.engine)
            reconnect(clean, sandbox, *users)
            assert run_sync(clean, users).status == "ok"
            assert live_content(services.engine) == live_content(clean.engine)
        finally:
            clean.close()


def test_sigkill_at_20_points_then_rerun_loses_no_record_and_no_token_but_as_documented(
    services: Services,
    sandbox: Sandbox,
    pg_url: str,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """Each kill, then the next run: every user is synced to Loop's truth, or (only when the
    kill caught that user's refresh at Loop after it rotated) reauth_required for "rotation
    outcome lost" and back once they connect again; Loop never sees a replayed token. Every
    kind of kill point is hit several times."""
    began = time.monotonic()
    users = user_ids(USERS)
    consent(services, *users)
    kills: list[Kill] = []
    records_lost = 0
    worker: Worker | None = spawn(services.settings, tmp_path, 0)
    try:
        for index, point in enumerate(PLAN):
            assert worker is not None
            sandbox.clock.advance(point.advance_days * DAY)
            sandbox.set_knobs(**knobs_for(point.target))
            shot = kill_at(point, worker, services.engine, sandbox)
            dead, worker = worker, None
            dead.stop()
            if index + 1 < len(PLAN):  # it imports while this kill is checked
                worker = spawn(services.settings, tmp_path, index + 1)
            settle(services.engine, sandbox, dead.app)
            sandbox.set_knobs(endpoint_latency_ms={}, refresh_answer_delay_ms=0.0)
            kill = observe(services, shot, point)
            kills.append(kill)
            where = f"kill {index} at {point}, landed {kill.phases()}"
            assert kill.lost <= kill.in_window, f"{where}: tokens lost outside a refresh: {kill}"

            check_next_run(services, sandbox, kill.lost, where)
            if kill.lost:
                reconnect(services, sandbox, *sorted(kill.lost))
                assert run_sync(next_run(services), sorted(kill.lost)).status == "ok", where

            records_lost += check_warehouse(services.engine, sandbox, users, where)
            reauth = grant_events.c.to_status == GRANT_REAUTH_REQUIRED
            assert count(services.engine, grant_events, reauth) == sum(
                len(kill.lost) for kill in kills
            ), f"{where}: each loss is one grant event"
    finally:
        if worker is not None:
            worker.stop()
    check_same_as_one_clean_run(services, sandbox, pg_url, users)

    phases = Counter(phase for kill in kills for phase in kill.phases())
    report = {
        "kills": len(kills),
        "by_phase": dict(sorted(phases.items())),
        "crashes_survived": len(kills),
        "records_lost": records_lost,
        "tokens_lost_in_flight_as_documented": sum(len(kill.lost) for kill in kills),
        "tokens_lost_otherwise": sum(len(kill.lost - kill.in_window) for kill in kills),
        "leases_left_by_the_dead": sum(kill.leases_left for kill in kills),
        "seconds": round(time.monotonic() - began, 1),
    }
    print(json.dumps(report, indent=2))
    for number, kill in enumerate(kills):
        print(f"kill {number:2d}: {kill.point} -> {kill.phases()} lost={sorted(kill.lost)}")
    record_property("kills", json.dumps(report))
    # Not vacuous: each kind of point was hit several times, and no kill came too late.
    assert phases["too late"] == 0, report
    assert phases["refresh at Loop, rotated"] >= 2, report
    assert phases["refresh at Loop, unrotated"] >= 2, report
    assert phases["upsert, rows written"] + phases["upsert, before rows"] >= 3, report
    assert phases["upsert, rows written"] >= 2, report
    assert phases["between users"] >= 3, report
