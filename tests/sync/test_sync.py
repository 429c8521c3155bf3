"""Sync runs against the live sandbox, on SQLite and PostgreSQL: the warehouse is Loop's truth."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import event, select

from loop_sync.catalog import CatalogUnit, load_catalog
from loop_sync.load import HELD_ELSEWHERE, LoadCounts, UserPull, write_batch
from loop_sync.sandbox import Sandbox
from loop_sync.schema import (
    biomarker_result_history,
    biomarker_results,
    grants,
    raw_records,
    rejects,
)
from loop_sync.services import Services
from loop_sync.sync import RunSummary, SyncCounts, run_sync, select_users
from loop_sync.vault import utcnow
from tests.sync.helpers import (
    DAY,
    Record,
    advance_until,
    consent,
    count,
    live,
    results,
    rows,
    run_row,
    state,
    truth_ids,
    view,
    with_settings,
)

# The catalog, read here on its own: (Loop code, unit) -> conversion to the canonical unit.
CATALOG: dict[tuple[str, str], CatalogUnit] = {(u.loop_code, u.unit): u for u in load_catalog()}
KNOWN_CODES = {unit.loop_code for unit in load_catalog()}
CENSORED_TEXT = re.compile(r"^(<=|>=|<|>)(\d+(?:\.\d+)?)$")
ZONED = re.compile(r"(Z|[+-]\d\d:\d\d)$")
WRONG_TYPE_REASONS = {
    "id is missing",
    "id is not a string",
    "value is not a number",
    "collected_at is not a timestamp",
}


def revision(record: Record) -> int:
    value: int = record.get("revision", 1)
    return value


def assert_warehouse_is_the_truth(services: Services, sandbox: Sandbox, users: list[str]) -> None:
    """Every user's live rows are exactly Loop's records, value for value."""
    seen = dict.fromkeys(
        ("converted", "implausible", "censored", "text", "naive", "unknown", "corrected"), 0
    )
    for user in users:
        truth = {record["id"]: record for record in sandbox.truth(user)}
        stored = live(services.engine, user)
        assert set(stored) == set(truth), user
        for result_id, record in truth.items():
            row = stored[result_id]
            expect_record(row, record, seen)
    # The seed has each kind of record, so each check above really ran.
    assert all(seen.values()), seen


def expect_record(row: dict[str, Any], record: Record, seen: dict[str, int]) -> None:
    """One stored row against Loop's record; `seen` counts the kinds of record checked."""
    flags = row["quality_flags"].split(",")
    assert row["patient_id"] == record["patient_id"]
    assert row["biomarker_code"] == record["biomarker_code"]
    assert row["unit_source"] == record["unit"]
    assert row["revision"] == revision(record)
    assert row["loop_status"] == record["status"]
    assert row["lab"] == record["lab"]
    assert row["value_text"] == record["value_text"]
    seen["corrected"] += revision(record) > 1
    expect_value(row, record, seen)
    if record["biomarker_code"] not in KNOWN_CODES:
        seen["unknown"] += 1
        assert row["catalog_code"] is None
        assert row["value_canonical"] is None
        assert "unknown_code" in flags
    assert row["collected_at_source"] == record["collected_at"]
    if ZONED.search(record["collected_at"]):
        assert row["collected_at"] == datetime.fromisoformat(record["collected_at"])
        assert "naive_timestamp" not in flags
    else:
        seen["naive"] += 1
        assert row["collected_at"] is None
        assert "naive_timestamp" in flags
    assert row["parsed_at"] == datetime.fromisoformat(record["parsed_at"])


def expect_value(row: dict[str, Any], record: Record, seen: dict[str, int]) -> None:
    """The value: censored (operator and bound), numeric (converted by the catalog), or text."""
    flags = row["quality_flags"].split(",")
    unit = CATALOG.get((record["biomarker_code"], record["unit"]))
    censored = CENSORED_TEXT.match(record["value_text"] or "")
    if censored:
        seen["censored"] += 1
        assert row["value_operator"] == censored.group(1)
        assert row["value_source"] == float(censored.group(2))
        assert "censored" in flags
        if unit is not None and unit.factor is not None:
            bound = float(censored.group(2)) * unit.factor + (unit.offset or 0.0)
            assert row["value_canonical"] == pytest.approx(bound)
    elif record["value"] is not None:
        assert row["value_operator"] is None
        assert row["value_source"] == record["value"]
        if unit is not None and unit.factor is not None:
            seen["converted"] += 1
            offset = unit.offset or 0.0
            canonical = record["value"] * unit.factor + offset
            assert row["value_canonical"] == pytest.approx(canonical)
            assert row["unit_canonical"] == unit.canonical_unit
            outside = not unit.plausible_min <= canonical <= unit.plausible_max
            seen["implausible"] += outside
            assert ("implausible" in flags) == outside
            low, high = record["reference_low"], record["reference_high"]
            assert row["reference_low_canonical"] == pytest.approx(low * unit.factor + offset)
            assert row["reference_high_canonical"] == pytest.approx(high * unit.factor + offset)
    else:
        seen["text"] += 1
        assert row["value_source"] is None
        assert row["value_canonical"] is None
        assert "text_result" in flags


def test_a_second_sync_in_a_row_writes_nothing(
    services: Services, sandbox: Sandbox, users: list[str]
) -> None:
    """Syncing again with nothing new at Loop changes no row and lands no record."""
    first = run_sync(services, users)
    assert first.status == "ok"
    assert first.rows_inserted == sum(len(sandbox.truth(u)) for u in users)
    changed = {rid: row["last_changed_at"] for rid, row in results(services.engine).items()}
    landed = count(services.engine, raw_records)

    second = run_sync(services, users)

    assert second.status == "ok"
    assert (second.rows_inserted, second.rows_updated, second.rows_deleted) == (0, 0, 0)
    assert second.rows_rejected == 0
    assert second.rows_unchanged == first.rows_inserted
    after = {rid: row["last_changed_at"] for rid, row in results(services.engine).items()}
    assert after == changed
    assert count(services.engine, raw_records) == landed
    assert run_row(services.engine, second.run_id)["rows_inserted"] == 0


def test_the_warehouse_equals_the_truth_value_for_value(
    services: Services, sandbox: Sandbox, users: list[str]
) -> None:
    """After one sync every user's live rows are Loop's records, converted by the catalog."""
    summary = run_sync(services, users)
    assert summary.status == "ok"
    assert summary.users_succeeded == len(users)
    assert_warehouse_is_the_truth(services, sandbox, users)
    for user in users:
        assert state(services.engine, user)["results_live"] == len(sandbox.truth(user))


def test_the_warehouse_equals_the_truth_after_a_month_of_changes_at_loop(
    services: Services, sandbox: Sandbox, users: list[str]
) -> None:
    """New results, corrections and deletions over a month: the next sync catches up exactly."""
    run_sync(services, users)
    sandbox.clock.advance(30 * DAY)  # recent results, some of them corrected or deleted later
    run_sync(services, users)
    sandbox.clock.advance(30 * DAY)
    summary = run_sync(services, users)
    assert summary.status == "ok"
    assert summary.rows_inserted > 0
    assert summary.rows_updated > 0
    assert summary.rows_deleted > 0
    assert_warehouse_is_the_truth(services, sandbox, users)


def test_a_correction_replaces_the_current_row_and_keeps_the_old_one_in_history(
    services: Services, sandbox: Sandbox, users: list[str]
) -> None:
    """Loop raises a result's revision: the row shows the new value, history the old one."""
    sandbox.clock.advance(30 * DAY)  # a month of recent results, some still to be corrected
    first = run_sync(services, users)
    before = results(services.engine)
    corrected = advance_until(
        sandbox,
        users,
        lambda _, truth: [
            r for r in truth if r["id"] in before and revision(r) > before[r["id"]]["revision"]
        ],
    )

    summary = run_sync(services, users)

    ids = [record["id"] for records in corrected.values() for record in records]
    assert summary.status == "ok"
    assert summary.rows_updated >= len(ids)
    assert count(services.engine, biomarker_result_history) == summary.rows_updated
    now = results(services.engine)
    for records in corrected.values():
        for record in records:
            old, new = before[record["id"]], now[record["id"]]
            assert new["revision"] == revision(record)
            assert new["value_source"] == record["value"]
            assert new["updated_at"] == datetime.fromisoformat(record["updated_at"])
            assert new["first_seen_at"] == old["first_seen_at"]
            assert new["last_changed_at"] > old["last_changed_at"]
            history = rows(
                services.engine,
                select(biomarker_result_history).where(
                    biomarker_result_history.c.result_id == record["id"]
                ),
            )
            assert len(history) == 1
            assert history[0]["revision"] == old["revision"]
            assert history[0]["value_source"] == old["value_source"]
            assert history[0]["content_hash"] == old["content_hash"]
            assert history[0]["superseded_at"] >= first.started_at
    assert_warehouse_is_the_truth(services, sandbox, users)


def test_a_deleted_result_is_soft_deleted_and_left_out_of_the_views(
    services: Services, sandbox: Sandbox, users: list[str]
) -> None:
    """A result Loop no longer lists keeps its row with deleted_at, and no view shows it."""
    sandbox.clock.advance(30 * DAY)
    run_sync(services, users)
    listed = {user: set(live(services.engine, user)) for user in users}
    gone = advance_until(
        sandbox,
        users,
        lambda user, truth: [
            {"id": rid} for rid in sorted(listed[user] - {r["id"] for r in truth})
        ],
    )
    ids = [record["id"] for records in gone.values() for record in records]
    dated = [rid for rid in ids if results(services.engine)[rid]["collected_at"] is not None]
    in_series = {r["result_id"] for r in view(services.engine, "v_biomarker_timeseries")}
    assert set(dated) <= in_series

    summary = run_sync(services, users)

    assert summary.status == "ok"
    assert summary.rows_deleted >= len(ids)
    stored = results(services.engine)
    for rid in ids:
        assert stored[rid]["deleted_at"] is not None  # the row is kept, marked deleted
    for name in ("v_biomarker_timeseries", "v_latest_biomarkers", "v_out_of_range"):
        shown = {r["result_id"] for r in view(services.engine, name)}
        assert not shown & set(ids), name
    for user in users:
        assert set(live(services.engine, user)) == truth_ids(sandbox, user)
        assert state(services.engine, user)["results_live"] == len(sandbox.truth(user))


def test_a_429_storm_is_waited_out_as_retry_after_says_and_every_user_is_synced(
    services: Services, sandbox: Sandbox
) -> None:
    """With 30% of requests answered 429 + Retry-After, the run still syncs everyone, and
    takes at least the waits it was told (capped by LOOP_SYNC_RETRY_AFTER_CAP_S)."""
    team = ["usr_0001", "usr_0002", "usr_0003", "usr_0004"]
    consent(services, *team)
    sandbox.set_knobs(storm_rate=0.3, storm_retry_after_s=1)
    cap = 0.2
    storm = with_settings(services, retry_after_cap_s=cap, page_size=20, concurrency=1)

    summary = run_sync(storm, team)

    throttled = sandbox.counters.rate_limited.total()
    assert throttled > 0
    assert summary.status == "ok"
    assert summary.users_succeeded == len(team)
    assert summary.duration_s >= throttled * min(cap, 1) * 0.95  # one user at a time: waits add up
    for user in team:
        assert set(live(services.engine, user)) == truth_ids(sandbox, user)
        assert state(services.engine, user)["last_status"] == "ok"


def test_a_forbidden_user_fails_clearly_and_the_others_are_synced(
    services: Services, sandbox: Sandbox, users: list[str]
) -> None:
    """Loop refuses one user (403): their sync_state says why and counts the failures; the
    run is partial and everyone else is complete."""
    refused = "usr_0003"
    sandbox.set_knobs(forbidden_users={refused})

    first = run_sync(services, users)
    assert state(services.engine, refused)["consecutive_failures"] == 1
    second = run_sync(services, users)

    for summary in (first, second):
        assert summary.status == "partial"
        assert (summary.users_failed, summary.users_succeeded) == (1, len(users) - 1)
        assert run_row(services.engine, summary.run_id)["status"] == "partial"
        assert run_row(services.engine, summary.run_id)["users_failed"] == 1
        assert "Loop forbids" in summary.failures[refused]
    refused_state = state(services.engine, refused)
    assert refused_state["last_status"] == "failed"
    assert "Loop forbids reading this user's results" in refused_state["last_error"]
    assert "HTTP 403 forbidden" in refused_state["last_error"]
    assert refused_state["consecutive_failures"] == 2
    assert refused_state["last_run_id"] == second.run_id
    assert live(services.engine, refused) == {}
    for user in users:
        if user != refused:
            assert set(live(services.engine, user)) == truth_ids(sandbox, user)
            assert state(services.engine, user)["consecutive_failures"] == 0


def test_html_with_status_200_fails_the_user_clearly_and_deletes_nothing(
    services: Services, sandbox: Sandbox, users: list[str]
) -> None:
    """Loop answers a maintenance page with 200: the user fails with a clear reason, and
    the results already stored stay live."""
    user = "usr_0005"
    run_sync(services, users)
    sandbox.set_knobs(malformed_rates={"html": 1.0})

    summary = run_sync(services, [user])

    assert summary.status == "failed"
    assert summary.users_failed == 1
    assert run_row(services.engine, summary.run_id)["status"] == "failed"
    failed = state(services.engine, user)
    assert failed["last_status"] == "failed"
    assert "Loop answered 200 with an HTML page" in failed["last_error"]
    assert failed["consecutive_failures"] == 1
    assert failed["last_success_at"] is not None  # from the clean run before
    assert set(live(services.engine, user)) == truth_ids(sandbox, user)


def test_a_user_without_read_biomarkers_is_reauth_required_and_the_others_go_on(
    services: Services, sandbox: Sandbox
) -> None:
    """A grant without read:biomarkers counts as reauth_required; the others are synced."""
    narrowed = "usr_0002"
    sandbox.set_knobs(narrow_scopes={"read:biomarkers"})
    consent(services, narrowed)
    sandbox.set_knobs(narrow_scopes=set())
    others = ["usr_0001", "usr_0003", "usr_0004"]
    consent(services, *others)

    summary = run_sync(services, select_users(services.engine))

    assert summary.users_reauth_required == 1
    assert summary.users_failed == 0
    assert summary.users_succeeded == len(others)
    assert summary.status == "partial"
    assert run_row(services.engine, summary.run_id)["users_reauth_required"] == 1
    assert "insufficient_scope" in summary.failures[narrowed]
    reauth = state(services.engine, narrowed)
    assert reauth["last_status"] == "reauth_required"
    assert "insufficient_scope" in reauth["last_error"]
    grant = rows(services.engine, select(grants).where(grants.c.user_id == narrowed))[0]
    assert grant["status"] == "reauth_required"
    for user in others:
        assert set(live(services.engine, user)) == truth_ids(sandbox, user)
    assert select_users(services.engine) == others  # the next run does not try them


def test_shards_split_the_users_disjointly_and_completely(
    services: Services, users: list[str]
) -> None:
    """Three workers with shard=0..2 of 3 together sync every user exactly once."""
    shards = [select_users(services.engine, shard=i, shards=3) for i in range(3)]
    assert all(shards)
    assert sorted(u for shard in shards for u in shard) == sorted(users)
    assert [select_users(services.engine, shard=i, shards=3) for i in range(3)] == shards
    some = users[:5]
    for i, shard in enumerate(shards):
        assert select_users(services.engine, some, shard=i, shards=3) == [
            u for u in shard if u in some
        ]
    with pytest.raises(ValueError, match=re.escape("shard must be in 0..2")):
        select_users(services.engine, shard=3, shards=3)


def sync_with_wrong_types(
    services: Services, sandbox: Sandbox, users: list[str], rate: float
) -> RunSummary:
    """One run during which `rate` of Loop's pages carry a record of the wrong types."""
    sandbox.set_knobs(malformed_rates={"wrong_types": rate})
    summary = run_sync(with_settings(services, page_size=20), users)
    sandbox.set_knobs(malformed_rates={})
    return summary


def test_malformed_records_go_to_rejects_and_every_record_lands_exactly_once(
    services: Services, sandbox: Sandbox, users: list[str]
) -> None:
    """Records of the wrong type are rejected with a reason; every pulled record is in
    exactly one of results or rejects, and the counts of the run add up."""
    summary = sync_with_wrong_types(services, sandbox, users, 0.5)

    assert summary.status == "ok"
    assert summary.rows_rejected > 0
    landed = {(r["user_id"], r["content_hash"]) for r in rows(services.engine, select(raw_records))}
    stored = {(r["user_id"], r["content_hash"]) for r in results(services.engine).values()}
    refused = rows(services.engine, select(rejects))
    rejected = {(r["user_id"], r["content_hash"]) for r in refused}
    assert stored | rejected == landed
    assert not stored & rejected
    assert (summary.rows_inserted, summary.rows_rejected) == (len(stored), len(rejected))
    assert {r["reason"] for r in refused} <= WRONG_TYPE_REASONS
    assert all(r["payload"] for r in refused)  # kept as received, for a look later
    for user in users:
        truth = truth_ids(sandbox, user)
        assert set(live(services.engine, user)) <= truth
        pulled = len(sandbox.truth(user))
        held = len(live(services.engine, user)) + sum(r["user_id"] == user for r in refused)
        assert held == pulled, user


def test_a_clean_run_after_malformed_records_fills_in_the_good_versions(
    services: Services, sandbox: Sandbox, users: list[str]
) -> None:
    """The next clean pull stores the records that came malformed; the rejects stay."""
    first = sync_with_wrong_types(services, sandbox, users, 0.5)
    refused = rows(services.engine, select(rejects))

    summary = run_sync(services, users)

    assert summary.status == "ok"
    assert summary.rows_inserted == first.rows_rejected
    assert summary.rows_rejected == 0
    for user in users:
        assert set(live(services.engine, user)) == truth_ids(sandbox, user)
    stored = results(services.engine)
    for reject in refused:
        if reject["result_id"] is not None:
            assert stored[reject["result_id"]]["content_hash"] != reject["content_hash"]
    assert count(services.engine, rejects) == len(refused)


def test_malformed_records_in_a_later_run_delete_nothing(
    services: Services, sandbox: Sandbox, users: list[str]
) -> None:
    """A record Loop still lists but sent malformed (even without a readable id) is not
    taken for a deletion: every stored result stays live."""
    run_sync(services, users)

    summary = sync_with_wrong_types(services, sandbox, users, 1.0)

    assert summary.rows_rejected > 0
    assert summary.rows_deleted == 0
    for user in users:
        assert set(live(services.engine, user)) == truth_ids(sandbox, user)
    assert (
        count(services.engine, biomarker_results, biomarker_results.c.deleted_at.is_not(None)) == 0
    )


def test_an_older_revision_never_replaces_a_newer_one(services: Services) -> None:
    """Design: only a higher revision replaces the current row; a stale one is ignored."""
    record = {
        "id": "res_stale_test",
        "patient_id": "pat_0001",
        "biomarker_code": "ldl-c",
        "biomarker_name": "LDL",
        "value": 120.0,
        "unit": "mg/dL",
        "reference_low": None,
        "reference_high": 130.0,
        "status": "normal",
        "collected_at": "2026-01-02T08:00:00Z",
        "parsed_at": "2026-01-03T08:00:00Z",
    }
    newer = {**record, "value": 125.0, "revision": 2, "updated_at": "2026-01-05T08:00:00Z"}
    for version in (newer, record):
        write_batch(
            services.engine, [UserPull("usr_0001", [version], False)], run_id="r", now=utcnow()
        )
    with services.engine.connect() as connection:
        row = connection.execute(
            select(biomarker_results.c.revision, biomarker_results.c.value_source)
        ).one()
        history = connection.execute(select(biomarker_result_history.c.id)).all()
    assert tuple(row) == (2, 125.0)
    assert history == []


def ldl_result(result_id: str) -> Record:
    """A plain LDL result as Loop lists it."""
    return {
        "id": result_id,
        "patient_id": "pat_0001",
        "biomarker_code": "ldl-c",
        "biomarker_name": "LDL",
        "value": 120.0,
        "unit": "mg/dL",
        "status": "normal",
        "collected_at": "2026-01-02T08:00:00Z",
        "parsed_at": "2026-01-03T08:00:00Z",
    }


def test_a_result_that_comes_back_is_restored_and_landed_once(services: Services) -> None:
    """Loop deletes a result, then lists it again unchanged: the row is live again, counted
    as updated, and its raw content, landed the first time, is not landed twice."""
    record = ldl_result("res_back_test")
    counts = [
        write_batch(services.engine, [UserPull("usr_0001", pulled, True)], run_id="r", now=utcnow())
        for pulled in ([record], [], [record])
    ]
    assert [(c.inserted, c.deleted, c.updated) for c in counts] == [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    assert list(live(services.engine, "usr_0001")) == ["res_back_test"]
    assert count(services.engine, raw_records) == 1


def test_one_result_id_listed_for_two_users_stays_with_the_first_and_is_rejected_for_the_other(
    services: Services,
) -> None:
    """Loop listing one result id for two people, in one batch or in two: the first user's
    row is neither taken over nor lost, and the other's record waits in rejects."""
    first, second = ldl_result("res_shared"), {**ldl_result("res_shared"), "value": 99.0}
    pulls = [UserPull("usr_0001", [first], True), UserPull("usr_0002", [second], True)]
    together = write_batch(services.engine, pulls, run_id="r1", now=utcnow())
    own = {**ldl_result("res_own"), "value": 101.0}  # written beside the refused one
    apart = write_batch(
        services.engine, [UserPull("usr_0003", [second, own], True)], run_id="r2", now=utcnow()
    )

    assert (together.inserted, together.rejected, apart.inserted, apart.rejected) == (1, 1, 1, 1)
    with services.engine.connect() as connection:
        held = connection.execute(
            select(biomarker_results.c.user_id, biomarker_results.c.value_source)
        ).all()
        refused = connection.execute(select(rejects.c.user_id, rejects.c.reason)).all()
    assert sorted(tuple(row) for row in held) == [("usr_0001", 120.0), ("usr_0003", 101.0)]
    assert sorted(tuple(row) for row in refused) == [
        ("usr_0002", HELD_ELSEWHERE),
        ("usr_0003", HELD_ELSEWHERE),
    ]


def test_a_batch_whose_ids_no_one_else_holds_asks_nothing_about_other_users(
    services: Services,
) -> None:
    """The look-up of ids held by other users runs only when the upsert wrote fewer rows
    than it was given: a batch of new results (every night's usual) skips it."""
    statements: list[str] = []

    def seen(*args: Any) -> None:
        statements.append(args[2])  # the SQL text

    event.listen(services.engine, "before_cursor_execute", seen)
    try:
        fresh = [ldl_result(f"res_new_{n}") for n in range(3)]
        counts = write_batch(
            services.engine, [UserPull("usr_0001", fresh, True)], run_id="r", now=utcnow()
        )
    finally:
        event.remove(services.engine, "before_cursor_execute", seen)
    assert (counts.inserted, counts.rejected) == (3, 0)
    joins = [sql for sql in statements if "JOIN biomarker_results" in sql]
    assert joins == []


def test_a_result_one_user_no_longer_lists_is_deleted_though_another_lists_its_id(
    services: Services,
) -> None:
    """Loop moves a result to another person: the first user's complete pull no longer
    lists it, so their row is deleted, while the other's record waits in rejects."""
    moved = ldl_result("res_moved")
    write_batch(services.engine, [UserPull("usr_0001", [moved], True)], run_id="r1", now=utcnow())
    pulls = [UserPull("usr_0001", [], True), UserPull("usr_0002", [moved], True)]
    counts = write_batch(services.engine, pulls, run_id="r2", now=utcnow())

    assert (counts.deleted, counts.rejected, counts.inserted) == (1, 1, 0)
    assert list(live(services.engine, "usr_0001")) == []


def test_a_pull_identical_to_the_last_complete_one_writes_only_the_sync_state(
    services: Services,
) -> None:
    """A user whose pages are byte for byte those of their last committed complete pull
    is not re-read record by record: the rows stay as they are and the state says when it
    was checked. An incomplete pull forgets the digest, so the next complete one is read
    in full."""
    first = ldl_result("res_digest_1")
    second = {**ldl_result("res_digest_2"), "value": 99.0}

    def write(records: list[dict[str, Any]], complete: bool, digest: str | None) -> LoadCounts:
        pull = UserPull("usr_0001", records, complete, digest)
        return write_batch(services.engine, [pull], run_id="r", now=utcnow())

    write([first, second], True, "a" * 64)
    written = {rid: row["last_changed_at"] for rid, row in results(services.engine).items()}
    checked = state(services.engine, "usr_0001")["last_success_at"]

    again = write([first, second], True, "a" * 64)
    assert (again.inserted, again.updated, again.deleted, again.unchanged) == (0, 0, 0, 2)
    assert {rid: r["last_changed_at"] for rid, r in results(services.engine).items()} == written
    assert state(services.engine, "usr_0001")["last_success_at"] > checked

    partial = write([first], False, None)
    assert partial.deleted == 0  # an incomplete pull proves no absence
    assert state(services.engine, "usr_0001")["pull_digest"] is None

    full = write([first], True, "b" * 64)
    assert full.deleted == 1
    assert list(live(services.engine, "usr_0001")) == ["res_digest_1"]


def test_an_unparsed_pull_writes_only_the_sync_state_and_never_deletes(
    services: Services,
) -> None:
    """A pull the client did not parse (`unchanged`: the last one byte for byte) holds no
    records. It counts the user's live results as unchanged and deletes nothing, even if
    the stored digest moved meanwhile; a write without the sync state refuses it, since
    its empty records would read as "everything was deleted"."""
    write_batch(
        services.engine,
        [UserPull("usr_0001", [ldl_result("res_kept")], True, "a" * 64)],
        run_id="r",
        now=utcnow(),
    )
    unparsed = UserPull("usr_0001", [], True, "b" * 64, unchanged=True)

    counts = write_batch(services.engine, [unparsed], run_id="r2", now=utcnow())

    assert (counts.inserted, counts.updated, counts.deleted, counts.unchanged) == (0, 0, 0, 1)
    assert list(live(services.engine, "usr_0001")) == ["res_kept"]
    assert state(services.engine, "usr_0001")["last_run_id"] == "r2"
    assert state(services.engine, "usr_0001")["pull_digest"] == "a" * 64
    with pytest.raises(ValueError, match="unparsed"):
        write_batch(services.engine, [unparsed], run_id="r3", now=utcnow(), record_state=False)
    assert list(live(services.engine, "usr_0001")) == ["res_kept"]


def test_a_runs_time_spent_syncing_counts_batches_that_ran_at_once_only_once() -> None:
    """A flow runs two batches at once: the wall time spent syncing (what orchestration
    overhead is measured against) is the union of their spans, not the sum."""
    counts = SyncCounts(spans=[(0.0, 4.0)])
    counts.merge(SyncCounts(spans=[(3.0, 6.0), (8.0, 9.0)]))
    counts.merge(SyncCounts(spans=[(8.5, 8.75)]))
    assert counts.syncing_s() == 7.0
