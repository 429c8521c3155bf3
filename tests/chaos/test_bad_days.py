"""Five bad days at Loop: the nightly flow under every fault at once (issue 7, parts 1 and 4).

The sandbox serves 200 users (seed 15: new results, corrections and deletions arrive in
the window whatever the hour the test starts) with every fault knob on at once, all five
nights: 5xx from the API, token and introspection endpoints; 429s, both `Retry-After`
storms and over Loop's per-client rate limit; maintenance pages (HTML with status 200),
truncated JSON and records of the wrong types; latency spikes; 5-second access tokens;
and, on three nights, a refresh whose answer is lost after Loop rotated the token. Night 2
is a 5xx burst and night 4 a 429 storm, at several times the usual rates.

Loop's clock is frozen and moves one day before each night: the day's results appear and
every access token loop-sync holds has expired at Loop. loop-sync times tokens by its own
clock, so it refreshes the tokens it knows are due and learns of the others from a 401.

Each night the real `sync-biomarkers` flow runs in-process on the session's Prefect test
server, with the operator's settings in the environment. A run that does not end
Completed (some user failed or must re-consent: "Partial") is run again the same night,
as an operator does, up to MAX_RUNS_A_NIGHT runs in all. The re-run also shows that
syncing a night twice under faults is harmless, and that it no longer tries the users
who must re-consent.

The five nights run once per warehouse (`bad_days`: SQLite, then PostgreSQL, the
production database), and each test checks one property of them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import anyio
import httpx
import pytest
from cryptography.fernet import Fernet
from prefect import State
from sqlalchemy import Engine, Table, select

from flows.sync_biomarkers import sync_biomarkers
from loop_sync.landing import content_hash, record_id
from loop_sync.sandbox import Knobs, Sandbox, SandboxConfig, SandboxHost
from loop_sync.sandbox.authority import user_ids
from loop_sync.schema import (
    GRANT_ACTIVE,
    GRANT_REAUTH_REQUIRED,
    biomarker_result_history,
    biomarker_results,
    grant_events,
    grants,
    raw_records,
    rejects,
    sync_runs,
    sync_state,
    upgrade,
)
from loop_sync.services import Services
from loop_sync.sync import RunSummary
from loop_sync.vault import LOST_ROTATION, utcnow
from tests.orchestration import conftest as orchestration
from tests.support import fresh_pg_schema, sandbox_settings
from tests.sync.helpers import DAY, Record, fast, rows
from tests.sync.test_sync import expect_record

# The session's Prefect test server, shared with tests/orchestration (~10 s to start once).
prefect_home = orchestration.prefect_home
prefect_api = orchestration.prefect_api

USERS = 200
RESULTS_PER_USER = 40
SEED = 15  # >= 4 corrections, >= 3 deletions after night 1 (any start, 5-minute steps)
DAYS = 5
MAX_RUNS_A_NIGHT = 4  # the scheduled run and up to three re-runs by the operator
# Users whose next refresh loses its answer after Loop rotated, listed on that day.
LOSE_ANSWER = {1: {"usr_0007"}, 3: {"usr_0042", "usr_0123"}, 5: {"usr_0188"}}
FAULTS = Knobs(
    auto_approve=True,
    latency_spike_rate=0.02,
    latency_spike_ms=150,  # short, so that five nights fit the suite's time budget
    rate_limit_rps=400,  # Loop's limit for our client_id: our budget (TEST_RPS) is higher,
    rate_limit_burst=10,  # and 32 users fetched at once burst past this many
    storm_rate=0.01,
    storm_retry_after_s=1,
    error_rates={"biomarkers": 0.04, "token": 0.04, "introspect": 0.25},
    malformed_rates={"html": 0.01, "truncated_json": 0.01, "wrong_types": 0.02},
    access_token_ttl_s=5,
)
BURSTS: dict[int, dict[str, Any]] = {  # nights worse than the others
    2: {"error_rates": {"biomarkers": 0.2, "token": 0.2, "introspect": 0.25}},
    4: {"storm_rate": 0.06},
}
PAGE_SIZE = 20  # 2-3 pages a user, so faults also land between the pages of a pull
RETRY_AFTER_CAP_S = 0.1  # LOOP_SYNC_RETRY_AFTER_CAP_S: Loop says 1 s; kept short here
# What normalize says of each kind of record the sandbox sends with wrong types.
REJECT_REASON = {
    "no_id": "id is missing",
    "id_number": "id is not a string",
    "value_object": "value is not a number",
    "collected_number": "collected_at is not a timestamp",
}
REFRESHED_AFTER_401 = "access token rejected (401); refreshing it once"
JWT = re.compile(r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]+")  # id_tokens: not in the sandbox's list
# Loggers that do not propagate to the root logger, so they get the collector themselves.
ISOLATED_LOGGERS = ("prefect._internal", "prefect.extra", "uvicorn")


@dataclass
class Night:
    """One sandbox day: that night's flow runs, and who synced or lost an answer."""

    day: int
    states: list[State[Any]] = field(default_factory=list)
    summaries: list[RunSummary] = field(default_factory=list)
    synced: set[str] = field(default_factory=set)  # users whose rows were committed
    lost: set[str] = field(default_factory=set)  # users whose refresh answer Loop dropped

    @property
    def failed(self) -> set[str]:
        """Users some run of the night did not sync (failed or reauth_required)."""
        return {user for summary in self.summaries for user in summary.failures}


@dataclass
class BadDays:
    """What the five nights left behind."""

    sandbox: Sandbox
    services: Services
    nights: list[Night]
    truth: dict[int, dict[str, list[Record]]]  # day -> user -> what Loop listed that day
    day_at: dict[str, int]  # the sandbox clock's ISO time on each day -> the day
    logs: list[str]  # every log record, formatted with its exception
    output: str  # everything written to stdout and stderr
    fernet_key: str
    _prefect: dict[str, str] | None = None

    @property
    def engine(self) -> Engine:
        return self.services.engine

    def table(self, table: Table) -> list[dict[str, Any]]:
        return rows(self.engine, select(table))

    def last_synced(self, user: str) -> int | None:
        """The last day whose pull of the user was committed; None if none was."""
        return max((night.day for night in self.nights if user in night.synced), default=None)

    def lost_on(self) -> dict[str, int]:
        """User -> the day Loop dropped the answer to their rotated refresh."""
        return {user: night.day for night in self.nights for user in night.lost}

    def prefect(self) -> dict[str, str]:
        """What Prefect holds of each flow run (read once): its state, artifacts, task
        runs and logs, by where they are."""
        if self._prefect is None:
            self._prefect = {}
            for night in self.nights:
                for n, state in enumerate(night.states, start=1):
                    self._prefect.update(prefect_places(f"night {night.day} run {n}", state))
        return self._prefect

    def injected(self) -> list[dict[str, Any]]:
        """The records Loop sent with wrong types, each with the day it sent them."""
        return [
            {**entry, "day": self.day_at[entry["at"]]}
            for entry in self.sandbox.counters.malformed_records
        ]


class _Collector(logging.Handler):
    """Keeps every record it sees, formatted with its exception and stack."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def collected_output(request: pytest.FixtureRequest) -> Iterator[tuple[list[str], io.StringIO]]:
    """Every log record (loop_sync and prefect at DEBUG, as caplog.set_level sets them)
    and all stdout/stderr while the block runs, for the scans.

    caplog and capsys do not reach a module fixture, so this does what they do. Output is
    taken from pytest's own capture where there is one (Prefect's console handler writes
    to the stream it got at start-up) and written back to it afterwards, so the test
    report still shows it.
    """
    collector, output = _Collector(), io.StringIO()
    levels = {name: logging.getLogger(name).level for name in ("loop_sync", "prefect")}
    targets = [logging.getLogger(), *map(logging.getLogger, ISOLATED_LOGGERS)]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is not None and not capture.is_globally_capturing():
        capture = None  # pytest -s: the output goes to the terminal
    before = capture.read_global_capture() if capture is not None else None
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    for logger in targets:
        logger.addHandler(collector)
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            yield collector.lines, output
    finally:
        for logger in targets:
            logger.removeHandler(collector)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if capture is not None and before is not None:
            after = capture.read_global_capture()
            output.write(after.out + after.err)
            sys.stdout.write(before.out + after.out)  # back into pytest's report
            sys.stderr.write(before.err + after.err)


def connect(services: Services, users: list[str]) -> None:
    """Consent for each user through one browser (the sandbox approves at once)."""
    with httpx.Client() as browser:
        for user in users:
            url, binding = services.onboarding.start(user)
            location = httpx.URL(browser.get(url).headers["location"])
            assert services.onboarding.finish(dict(location.params), binding) == user


def summary_of(state: State[Any]) -> RunSummary:
    """A flow run's summary (its result, also when the run ended Failed)."""
    summary = state.result(raise_on_failure=False)
    assert isinstance(summary, RunSummary), state
    return summary


def synced_since(engine: Engine, moment: datetime) -> set[str]:
    """Users whose rows were committed at or after `moment` (loop-sync's clock)."""
    query = select(sync_state.c.user_id).where(sync_state.c.last_success_at >= moment)
    return {row["user_id"] for row in rows(engine, query)}


def run_night(sandbox: Sandbox, services: Services, night: Night) -> None:
    """The scheduled run, then the operator's re-runs until one ends Completed."""
    started = utcnow()
    lost_before = Counter(sandbox.counters.responses_lost)
    for _ in range(MAX_RUNS_A_NIGHT):
        state = anyio.run(lambda: sync_biomarkers(return_state=True))
        night.states.append(state)
        night.summaries.append(summary_of(state))
        if state.name == "Completed":
            break
    night.synced = synced_since(services.engine, started)
    night.lost = set(Counter(sandbox.counters.responses_lost) - lost_before)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def warehouse_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The five nights' warehouse: a SQLite file, then a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('warehouse') / 'warehouse.db'}"
        return
    with fresh_pg_schema(request.getfixturevalue("pg_url")) as url:
        yield url


@pytest.fixture(scope="module")
def bad_days(
    request: pytest.FixtureRequest,
    warehouse_url: str,
    sandbox_host: SandboxHost,
    prefect_api: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[BadDays]:
    """Connect 200 users on a good day, turn every fault on, then live five nights."""
    home = tmp_path_factory.mktemp("bad-days")
    config = SandboxConfig(
        users=USERS,
        seed=SEED,
        results_per_user=RESULTS_PER_USER,
        knobs=Knobs(auto_approve=True, access_token_ttl_s=FAULTS.access_token_ttl_s),
        frozen_clock=True,
    )
    sandbox = sandbox_host.mount(config)
    fernet_key = Fernet.generate_key().decode()
    settings = fast(
        sandbox_settings(sandbox, warehouse_url, fernet_key),
        page_size=PAGE_SIZE,
        retry_after_cap_s=RETRY_AFTER_CAP_S,
    )
    services = Services.build(settings)
    everyone = user_ids(USERS)
    nights = [Night(day) for day in range(1, DAYS + 1)]
    truth: dict[int, dict[str, list[Record]]] = {}
    day_at: dict[str, int] = {}
    calm = FAULTS.model_dump(exclude={"lose_refresh_users"})
    try:
        upgrade(services.engine)
        with (
            pytest.MonkeyPatch.context() as env,
            collected_output(request) as (logs, output),
        ):
            for name in list(os.environ):  # a worker's environment: loop-sync's settings
                if name.startswith("LOOP_") and name != "LOOP_SYNC_TEST_PG_URL":
                    env.delenv(name)
            for name, value in orchestration.worker_env(settings).items():
                env.setenv(name, value)
            env.chdir(home)  # and no .env but its own
            connect(services, everyone)
            for night in nights:
                sandbox.clock.advance(DAY)
                day_at[sandbox.clock.now().isoformat()] = night.day
                truth[night.day] = {user: sandbox.truth(user) for user in everyone}
                listed = sandbox.knobs.lose_refresh_users | LOSE_ANSWER.get(night.day, set())
                knobs = {**calm, **BURSTS.get(night.day, {}), "lose_refresh_users": listed}
                sandbox.set_knobs(**knobs)
                run_night(sandbox, services, night)
        yield BadDays(sandbox, services, nights, truth, day_at, logs, output.getvalue(), fernet_key)
    finally:
        services.close()
        sandbox_host.sandbox = None


# --- part 1: five nights under every fault ---------------------------------------------


def fault_counts(days: BadDays) -> dict[str, int]:
    """The faults injected during the five nights, by kind."""
    counters = days.sandbox.counters
    faults = counters.faults
    storms = faults["retry_after_storm"]
    return {
        "5xx from the API": faults["biomarkers:500"] + faults["biomarkers:503"],
        "5xx from the token endpoint": faults["token:500"] + faults["token:503"],
        "5xx from introspection": faults["introspect:500"] + faults["introspect:503"],
        "429 in a Retry-After storm": storms,
        "429 over the rate limit": counters.rate_limited.total() - storms,
        "HTML with status 200": faults["malformed:html"],
        "truncated JSON": faults["malformed:truncated_json"],
        "record of wrong types": faults["malformed:wrong_types"],
        "latency spike": faults["latency_spike"],
        "access token expired (refreshes)": counters.refreshes.total(),
        "  of which loop-sync learnt by a 401": sum(REFRESHED_AFTER_401 in x for x in days.logs),
        "refresh answer lost after rotation": faults["refresh_response_lost"],
    }


def test_every_kind_of_fault_was_injected(bad_days: BadDays, record_property: Any) -> None:
    """The nights were as bad as claimed: each kind of fault happened at least once (5xx
    from introspection, asked only after a lost answer, may not), every user's token
    expired each night they were synced, and the counts are printed and recorded."""
    counts = fault_counts(bad_days)
    runs = [len(night.states) for night in bad_days.nights]
    took = [round(sum(s.duration_s for s in night.summaries), 1) for night in bad_days.nights]
    print(f"\n{DAYS} nights of {USERS} users: flow runs {runs}, seconds {took}; faults:")
    for kind, n in counts.items():
        print(f"  {kind:40} {n:6d}")
        record_property(f"faults: {kind.strip()}", n)
    record_property("flow runs a night", runs)
    required = {k: n for k, n in counts.items() if "introspection" not in k and "401" not in k}
    assert all(required.values()), counts
    refreshes = bad_days.sandbox.counters.refreshes
    for user in user_ids(USERS):
        nights = sum(user in night.synced for night in bad_days.nights)
        assert refreshes[user] >= nights, user  # a 5-second token never lasts to the next day


def test_loop_added_corrected_and_deleted_results_and_the_syncs_saw_it(
    bad_days: BadDays,
) -> None:
    """Between the nights Loop listed new results, corrected some and deleted some (so
    the comparison below is not vacuous), and the warehouse has history and soft-deleted
    rows to show for it."""
    new = corrected = deleted = 0
    for day in range(2, DAYS + 1):
        for user, records in bad_days.truth[day].items():
            before = {r["id"]: r.get("revision", 1) for r in bad_days.truth[day - 1][user]}
            now = {r["id"]: r.get("revision", 1) for r in records}
            new += len(now.keys() - before.keys())
            deleted += len(before.keys() - now.keys())
            corrected += sum(now[rid] > before[rid] for rid in now.keys() & before.keys())
    assert min(new, corrected, deleted) > 0, (new, corrected, deleted)
    assert bad_days.table(biomarker_result_history)
    assert any(row["deleted_at"] is not None for row in bad_days.table(biomarker_results))


def sent_malformed(days: BadDays, user: str, day: int) -> tuple[set[str], bool]:
    """What may differ from Loop's truth after the user's committed pull of `day` because
    Loop sent it malformed then: the ids of records it sent with wrong types that were
    rejected (the row keeps its earlier version, or is missing), and whether one of them
    had no usable id (such a pull proves no absence, so it deleted nothing)."""
    refused = {(r["user_id"], r["content_hash"]) for r in days.table(rejects)}
    that_day = [
        entry
        for entry in days.injected()
        if entry["user_id"] == user
        and entry["day"] == day
        and (user, content_hash(entry["record"])) in refused
    ]
    return (
        {entry["id"] for entry in that_day},
        any(record_id(entry["record"]) is None for entry in that_day),
    )


def test_the_warehouse_is_loops_truth_for_every_user_still_connected(bad_days: BadDays) -> None:
    """Every user not reauth_required was synced on the last night, and their rows are
    Loop's records value for value, soft deletions included; a reauth_required user keeps
    exactly what their last good night wrote. Only records Loop sent with wrong types that
    night may differ (each is in the rejects, checked below): no client could know better."""
    stored = bad_days.table(biomarker_results)
    active = {r["user_id"] for r in bad_days.table(grants) if r["status"] == GRANT_ACTIVE}
    assert len(active) == USERS - sum(map(len, LOSE_ANSWER.values()))
    seen: dict[str, int] = Counter()
    for user in user_ids(USERS):
        day = bad_days.last_synced(user)
        mine = {row["result_id"]: row for row in stored if row["user_id"] == user}
        if user in active:
            assert day == DAYS, f"{user} was not synced on the last night"
        if day is None:
            assert mine == {}, user
            continue
        truth = {record["id"]: record for record in bad_days.truth[day][user]}
        may_differ, deletions_pending = sent_malformed(bad_days, user, day)
        live = {rid for rid, row in mine.items() if row["deleted_at"] is None}
        assert truth.keys() - live <= may_differ, (user, day)
        if not deletions_pending:
            assert live <= truth.keys(), (user, day)
        for rid in (truth.keys() & live) - may_differ:
            expect_record(mine[rid], truth[rid], seen)
        seen["users checked"] += 1
    assert seen["users checked"] == sum(
        bad_days.last_synced(u) is not None for u in user_ids(USERS)
    )
    assert seen["corrected"] > 0


def test_the_reauth_users_are_exactly_those_whose_refresh_answer_was_lost(
    bad_days: BadDays,
) -> None:
    """The reauth_required users are exactly the users Loop dropped a rotated refresh's
    answer for (each listed user once, on the night listed), each with the reason
    "rotation outcome lost" in their grant, its history and their sync state, and for no
    other reason; that night's run ended Partial, and later runs no longer try them."""
    sandbox = bad_days.sandbox
    lost = bad_days.lost_on()
    assert lost == {user: day for day, users in LOSE_ANSWER.items() for user in users}
    assert dict(sandbox.counters.responses_lost) == dict.fromkeys(lost, 1)
    assert sandbox.knobs.lose_refresh_users == set()
    reauth = {r["user_id"] for r in bad_days.table(grants) if r["status"] != GRANT_ACTIVE}
    assert reauth == set(lost)
    for grant in bad_days.table(grants):
        if grant["user_id"] in reauth:
            assert (grant["status"], grant["status_reason"]) == (
                GRANT_REAUTH_REQUIRED,
                LOST_ROTATION,
            )
    changes = [e for e in bad_days.table(grant_events) if e["from_status"] is not None]
    assert sorted((e["user_id"], e["to_status"], e["reason"]) for e in changes) == sorted(
        (user, GRANT_REAUTH_REQUIRED, LOST_ROTATION) for user in reauth
    )
    for state in bad_days.table(sync_state):
        if state["user_id"] in reauth:
            assert state["last_status"] == "reauth_required"
            assert LOST_ROTATION in state["last_error"]
        else:
            assert (state["last_status"], state["last_error"]) == ("ok", None)
    gone: set[str] = set()
    for night in bad_days.nights:
        first = night.summaries[0]
        assert first.users_attempted == USERS - len(gone)
        assert sum(s.users_reauth_required for s in night.summaries) == len(night.lost)
        assert {u: first.failures.get(u) for u in night.lost} == dict.fromkeys(
            night.lost, LOST_ROTATION
        )
        assert night.states[0].name == ("Partial" if first.failures else "Completed")
        gone |= night.lost
        for summary in night.summaries[1:]:  # the operator's re-runs
            assert summary.users_attempted == USERS - len(gone)
        assert night.states[-1].name == "Completed", night.day


def test_no_refresh_was_replayed_and_no_grant_revoked(bad_days: BadDays) -> None:
    """Not one refresh token was presented twice, not even after a lost answer: Loop
    revoked no grant and alerted no user."""
    counters = bad_days.sandbox.counters
    assert counters.replays_detected.total() == 0
    assert counters.grants_revoked.total() == 0
    assert counters.alerts == []


def test_every_record_sent_with_wrong_types_is_rejected_or_stored_right_later(
    bad_days: BadDays,
) -> None:
    """Each record Loop sent with wrong types is in the rejects, with the reason for its
    kind; or the pull it came in was dropped (the user failed that run) and the record
    is right in the results. The rejects hold nothing else: no good record was refused."""
    refused = {(r["user_id"], r["content_hash"]): r for r in bad_days.table(rejects)}
    sent = bad_days.injected()
    assert len(sent) == bad_days.sandbox.counters.faults["malformed:wrong_types"] > 0
    dropped = 0
    for entry in sent:
        user, key = entry["user_id"], (entry["user_id"], content_hash(entry["record"]))
        if key in refused:
            assert REJECT_REASON[entry["mutation"]] in refused[key]["reason"], entry
            continue
        dropped += 1
        night = bad_days.nights[entry["day"] - 1]
        assert user in night.failed, entry  # only a failed user's pull is dropped
        day = bad_days.last_synced(user)
        if day is None or day < entry["day"]:
            continue  # never synced since: the record is not in the warehouse at all
        truth = {record["id"]: record for record in bad_days.truth[day][user]}
        found = rows(
            bad_days.engine,
            select(biomarker_results).where(biomarker_results.c.result_id == entry["id"]),
        )
        if entry["id"] in truth:
            assert found, entry
            expect_record(found[0], truth[entry["id"]], Counter())
        else:
            assert not found or found[0]["deleted_at"] is not None, entry
    assert set(refused) <= {(entry["user_id"], content_hash(entry["record"])) for entry in sent}
    print(f"\n{len(sent)} records sent with wrong types: {dropped} in dropped pulls")


# --- part 2: secrets and PHI ------------------------------------------------------------


def prefect_places(where: str, state: State[Any]) -> dict[str, str]:
    """A flow run's final state, artifacts, task runs and logs at the Prefect server."""
    run = state.state_details.flow_run_id
    assert isinstance(run, UUID)
    places = {f"{where} state": f"{state!r} {state.message} {state.data!r}"}
    for key, artifact in orchestration.artifacts(run).items():
        places[f"{where} artifact {key}"] = repr(artifact.model_dump())
    for task in orchestration.task_runs(run):
        places[f"{where} task run {task.name}"] = repr(task.model_dump())
    for n, log in enumerate(orchestration.api_logs(run)):
        places[f"{where} API log {n}"] = log.message
    return places


def test_no_token_code_or_secret_in_logs_output_tables_or_prefect(bad_days: BadDays) -> None:
    """No token, authorization code or secret Loop issued, no id_token and not the
    encryption key appears in a log line, stdout/stderr, a sync_runs, rejects, sync_state,
    grants or grant_events row, or in Prefect's states, artifacts, task runs and logs."""
    secrets = [*bad_days.sandbox.authority.issued_secrets, bad_days.fernet_key]
    assert bad_days.services.settings.client_secret.get_secret_value() in secrets
    assert sum(s.startswith("lph_rt_") for s in secrets) > USERS * DAYS  # rotated nightly
    places = {f"log line {n}": line for n, line in enumerate(bad_days.logs)}
    places["stdout/stderr"] = bad_days.output
    for table in (sync_runs, rejects, sync_state, grants, grant_events):
        for n, row in enumerate(bad_days.table(table)):
            places[f"{table.name} row {n}"] = repr(row)
    places.update(bad_days.prefect())
    everything = "\n".join(places.values())
    assert LOST_ROTATION in everything
    assert "sync-failures" in everything  # the scan reads what it should
    leaks = [(place, s[:10] + "…") for place, text in places.items() for s in secrets if s in text]
    leaks += [(place, "a JWT") for place, text in places.items() if JWT.search(text)]
    assert leaks == []


def as_sent(value: Any) -> str:
    """A value as Loop's JSON writes it: 1.23, 123.0, "<0.5"."""
    return value if isinstance(value, str) else json.dumps(value)


def significant(text: str) -> int:
    """How specific a value is: its digits without leading or trailing zeros (a number),
    or its length (a text such as "Positive")."""
    if not re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", text):
        return len(text)
    return len(text.split("e", maxsplit=1)[0].replace("-", "").replace(".", "").strip("0"))


def synced_values(days: BadDays) -> set[str]:
    """Every biomarker value synced, as Loop sent it (raw_records) and as the warehouse
    holds it (the stored numbers and texts), with at least 3 significant characters.

    Why 3: numbers of one or two digits ("1", "5.5", "0.04") also occur in log lines as
    counts, offsets, attempts and waits, so they would be false positives; from three on
    (1.23, 0.134, 123.0, "TNP"), a value is specific enough that a hit is a leak. Stored
    conversions (3.1857000000000004) are the most specific of all.
    """
    values: set[str] = set()
    for raw in days.table(raw_records):
        record = json.loads(raw["payload"])
        for name in ("value", "value_text", "reference_low", "reference_high"):
            found = record.get(name) if isinstance(record, dict) else None
            if isinstance(found, str | int | float) and not isinstance(found, bool):
                values.add(as_sent(found))
    for row in days.table(biomarker_results):
        for name in (
            "value_source",
            "value_text",
            "value_canonical",
            "reference_low_canonical",
            "reference_high_canonical",
        ):
            if row[name] is not None:
                values.add(str(row[name]))
    return {value for value in values if significant(value) >= 3}


def phi_pattern(values: set[str]) -> re.Pattern[str]:
    """Any of `values` as a whole token: not inside a longer number or word (127.0 in
    127.0.0.1), not the seconds of a console timestamp (05:46:14.988), and not a duration
    (the client logs its waits as "retrying in 1.63 s", of the same shape as hundreds of
    values and drawn at random: that one was a false positive before this exclusion)."""
    alternatives = "|".join(re.escape(v) for v in sorted(values, key=len, reverse=True))
    return re.compile(rf"(?<![\w.])(?<!\d\d:\d\d:)(?:{alternatives})(?![\w]|\.\d| ?s\b)")


def test_no_biomarker_value_in_any_log_line_or_output(bad_days: BadDays) -> None:
    """No biomarker value synced, as Loop sent it or as the warehouse holds it, appears in
    a log line, stdout/stderr or the runs' logs and states at Prefect: no PHI in logs."""
    values = synced_values(bad_days)
    assert len(values) > 1000
    pattern = phi_pattern(values)
    for value in sorted(values)[:: len(values) // 20]:  # the scan would see a leak
        assert pattern.search(f"user usr_0001: LDL {value} mg/dL"), value
        assert pattern.search(f'record {{"id":"res_1","value":{value}}} rejected'), value
    places = {f"log line {n}": line for n, line in enumerate(bad_days.logs)}
    places["stdout/stderr"] = bad_days.output
    places.update(
        (place, text)
        for place, text in bad_days.prefect().items()
        if " API log " in place or place.endswith("state")
    )
    hits = [(place, m.group()) for place, text in places.items() for m in pattern.finditer(text)]
    assert hits == []
