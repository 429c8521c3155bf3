"""The analyst views in sql/views, on SQLite and PostgreSQL, on known rows and on a real sync."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine

from loop_sync.sandbox import Sandbox
from loop_sync.schema import RESULT_COLUMN_NAMES, VIEWS_DIR, biomarker_results
from loop_sync.services import Services
from loop_sync.sync import run_sync
from tests.sync.helpers import consent, live, rows, view

VIEWS = {"v_biomarker_timeseries", "v_latest_biomarkers", "v_out_of_range", "v_sync_health"}
WRITTEN = datetime(2025, 6, 1, tzinfo=UTC)


def day(month: int, day_of_month: int, hour: int = 8) -> datetime:
    return datetime(2025, month, day_of_month, hour, tzinfo=UTC)


def result(result_id: str, **values: Any) -> dict[str, Any]:
    """A biomarker_results row: an LDL result of usr_0001 unless `values` say otherwise."""
    row: dict[str, Any] = dict.fromkeys(RESULT_COLUMN_NAMES)
    row.update(
        result_id=result_id,
        user_id="usr_0001",
        biomarker_code="ldl-c",
        catalog_code="ldl_c",
        unit_canonical="mg/dL",
        value_canonical=100.0,
        reference_low_canonical=0.0,
        reference_high_canonical=130.0,
        loop_status="normal",
        collected_at=day(1, 1),
        parsed_at=day(1, 2),
        revision=1,
        quality_flags="",
        content_hash=hashlib.sha256(result_id.encode()).hexdigest(),
        first_seen_at=WRITTEN,
        last_changed_at=WRITTEN,
        deleted_at=None,
    )
    row.update(values)
    return row


def store(engine: Engine, *results: dict[str, Any]) -> None:
    with engine.begin() as connection:
        connection.execute(biomarker_results.insert(), list(results))


def test_every_view_in_sql_views_runs_on_a_synced_warehouse(
    services: Services, sandbox: Sandbox
) -> None:
    """Each view answers on real synced data, and the latest per biomarker is the latest."""
    assert {path.stem for path in VIEWS_DIR.glob("*.sql")} == VIEWS  # a new view needs tests
    team = ["usr_0001", "usr_0002", "usr_0003"]
    consent(services, *team)
    assert run_sync(services, team).status == "ok"
    for name in sorted(VIEWS):
        assert view(services.engine, name), name
    latest: dict[tuple[str, str], tuple[datetime, datetime, str]] = {}
    for user in team:
        for row in live(services.engine, user).values():
            if row["collected_at"] is None:
                continue
            key = (user, row["catalog_code"] or row["biomarker_code"])
            latest[key] = max(
                latest.get(key, (row["collected_at"], row["parsed_at"], row["result_id"])),
                (row["collected_at"], row["parsed_at"], row["result_id"]),
            )
    shown = view(services.engine, "v_latest_biomarkers")
    assert {(r["user_id"], r["biomarker"]): r["result_id"] for r in shown} == {
        key: newest[2] for key, newest in latest.items()
    }
    assert len(shown) == len(latest)  # one row per (user, biomarker)


def test_v_latest_biomarkers_has_one_row_per_user_and_biomarker_the_latest_collected(
    services: Services,
) -> None:
    """The latest live, dated result per (user, biomarker); unknown codes are their own."""
    store(
        services.engine,
        result("ldl-jan", collected_at=day(1, 1)),
        result("ldl-feb", collected_at=day(2, 1), value_canonical=120.0),
        result("ldl-mar-deleted", collected_at=day(3, 1), deleted_at=WRITTEN),
        result("ldl-undated", collected_at=None, parsed_at=day(5, 1)),
        result(
            "a1c-early-parse", catalog_code="hba1c", collected_at=day(1, 5), parsed_at=day(1, 6)
        ),
        result("a1c-late-parse", catalog_code="hba1c", collected_at=day(1, 5), parsed_at=day(1, 9)),
        result("k2", catalog_code=None, biomarker_code="vitamin-k2", collected_at=day(1, 3)),
        result("ldl-other-user", user_id="usr_0002", collected_at=day(1, 1, 7)),
    )

    shown = view(services.engine, "v_latest_biomarkers")

    assert {(r["user_id"], r["biomarker"]): r["result_id"] for r in shown} == {
        ("usr_0001", "ldl_c"): "ldl-feb",
        ("usr_0001", "hba1c"): "a1c-late-parse",
        ("usr_0001", "vitamin-k2"): "k2",
        ("usr_0002", "ldl_c"): "ldl-other-user",
    }
    assert len(shown) == 4
    feb = next(r for r in shown if r["result_id"] == "ldl-feb")
    assert (feb["value_canonical"], feb["unit_canonical"]) == (120.0, "mg/dL")


def test_v_out_of_range_lists_results_outside_their_range_or_flagged_by_loop(
    services: Services,
) -> None:
    """Below or above the reference range, or flagged low/high/critical; never deleted."""
    store(
        services.engine,
        result("below", value_canonical=40.0, reference_low_canonical=50.0, loop_status="low"),
        result("above", value_canonical=190.0, loop_status="high"),
        result("flag-only", value_canonical=100.0, loop_status="high"),
        result("text-critical", value_canonical=None, loop_status="critical"),
        result("in-range", value_canonical=100.0),
        result(
            "no-range",
            value_canonical=900.0,
            reference_low_canonical=None,
            reference_high_canonical=None,
        ),
        result("deleted-above", value_canonical=400.0, loop_status="high", deleted_at=WRITTEN),
    )

    shown = view(services.engine, "v_out_of_range")

    assert {r["result_id"]: r["direction"] for r in shown} == {
        "below": "below",
        "above": "above",
        "flag-only": "flagged",
        "text-critical": "flagged",
    }


def test_v_out_of_range_counts_a_censored_value_only_when_its_bound_proves_it(
    services: Services,
) -> None:
    """A bound under the low limit with "<" is below; with ">" it proves nothing."""
    store(
        services.engine,
        result("lt-below", value_canonical=2.0, value_operator="<", reference_low_canonical=3.0),
        result("gt-unknown", value_canonical=2.0, value_operator=">", reference_low_canonical=3.0),
        result("ge-above", value_canonical=200.0, value_operator=">="),
        result("le-unknown", value_canonical=200.0, value_operator="<="),
    )

    shown = view(services.engine, "v_out_of_range")

    assert {r["result_id"]: r["direction"] for r in shown} == {
        "lt-below": "below",
        "ge-above": "above",
    }


def test_v_biomarker_timeseries_excludes_deleted_and_undated_results(services: Services) -> None:
    """Every live result with a specimen time is a point, in canonical units."""
    store(
        services.engine,
        result("jan", collected_at=day(1, 1), value_canonical=90.0),
        result("feb", collected_at=day(2, 1), value_canonical=110.0, value_operator="<"),
        result("mar-deleted", collected_at=day(3, 1), deleted_at=WRITTEN),
        result("undated", collected_at=None, quality_flags="naive_timestamp"),
        result("other-user", user_id="usr_0002"),
    )

    shown = view(services.engine, "v_biomarker_timeseries")

    points = {r["result_id"]: r for r in shown}
    assert set(points) == {"jan", "feb", "other-user"}
    assert (points["feb"]["value_canonical"], points["feb"]["value_operator"]) == (110.0, "<")
    assert points["jan"]["unit_canonical"] == "mg/dL"
    assert points["jan"]["biomarker"] == "ldl_c"


def test_v_sync_health_shows_failures_and_reauth(services: Services, sandbox: Sandbox) -> None:
    """One row per connected user: the forbidden one with its failures and error, the one
    without read:biomarkers as reauth_required with the reason, the others healthy."""
    sandbox.set_knobs(narrow_scopes={"read:biomarkers"})
    consent(services, "usr_0002")
    sandbox.set_knobs(narrow_scopes=set(), forbidden_users={"usr_0003"})
    consent(services, "usr_0001", "usr_0003")
    run_sync(services, ["usr_0001", "usr_0002", "usr_0003"])
    run_sync(services, ["usr_0001", "usr_0003"])

    health = {r["user_id"]: r for r in view(services.engine, "v_sync_health")}

    assert set(health) == {"usr_0001", "usr_0002", "usr_0003"}
    healthy, reauth, failing = health["usr_0001"], health["usr_0002"], health["usr_0003"]
    assert (healthy["grant_status"], healthy["last_status"]) == ("active", "ok")
    assert healthy["consecutive_failures"] == 0
    assert healthy["results_live"] == len(sandbox.truth("usr_0001"))
    assert healthy["rejects"] == 0
    assert (reauth["grant_status"], reauth["last_status"]) == ("reauth_required", "reauth_required")
    assert "insufficient_scope" in reauth["grant_reason"]
    assert reauth["results_live"] == 0
    assert (failing["grant_status"], failing["last_status"]) == ("active", "failed")
    assert failing["consecutive_failures"] == 2
    assert "Loop forbids" in failing["last_error"]
    assert failing["last_success_at"] is None
    attention = rows(
        services.engine,
        "SELECT user_id FROM v_sync_health "
        "WHERE grant_status <> 'active' OR consecutive_failures > 0 ORDER BY user_id",
    )
    assert [r["user_id"] for r in attention] == ["usr_0002", "usr_0003"]  # the documented query


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_each_view_answers_on_an_empty_warehouse(services: Services, name: str) -> None:
    """A freshly upgraded database: every view exists and returns no rows."""
    assert view(services.engine, name) == []


def test_v_latest_biomarkers_breaks_a_tie_by_result_id(services: Services) -> None:
    """Two results at the same specimen and parse time: still one row, the higher id."""
    store(
        services.engine,
        result("res_a", collected_at=day(4, 1), parsed_at=day(4, 2)),
        result("res_b", collected_at=day(4, 1), parsed_at=day(4, 2)),
    )
    shown = view(services.engine, "v_latest_biomarkers")
    per_key: defaultdict[tuple[str, str], list[str]] = defaultdict(list)
    for row in shown:
        per_key[(row["user_id"], row["biomarker"])].append(row["result_id"])
    assert per_key == {("usr_0001", "ldl_c"): ["res_b"]}
