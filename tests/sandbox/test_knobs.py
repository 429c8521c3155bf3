"""The sandbox's fault knobs, counters and /_sandbox admin endpoints, seen over HTTP.

The knobs model the failure modes of /work/shared/loop-platform.md ("What the sandbox must
model"): latency, the per-client rate limit with Retry-After (B4), 5xx per endpoint,
malformed 200s, a Retry-After storm, short access tokens, and a refresh response lost after
the server rotated. /_sandbox is not part of Loop.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import pytest

from loop_sync.sandbox import Sandbox
from loop_sync.sandbox.clock import Clock

from .helpers import (
    IGNORE_EDDSA_WARNING,
    INTROSPECT,
    REVOKE,
    TOKEN,
    Tokens,
    api_error,
    biomarkers,
    client_form,
    introspect,
    login,
    oauth_error,
    refresh,
)

pytestmark = IGNORE_EDDSA_WARNING

DAY = 86_400


def _burst(http: httpx.Client, token: str, count: int) -> list[httpx.Response]:
    return [biomarkers(http, token, limit=1) for _ in range(count)]


def _first_429(responses: list[httpx.Response]) -> httpx.Response:
    limited = [r for r in responses if r.status_code == 429]
    assert limited, [r.status_code for r in responses]
    return limited[0]


# --- latency and rate limit -------------------------------------------------------------


def test_latency_knob_delays_every_response(sandbox: Sandbox, http: httpx.Client) -> None:
    """latency_ms: each response takes at least that long (a lower bound)."""
    token = login(http, sandbox).access_token
    sandbox.set_knobs(latency_ms=150)
    elapsed = []

    for path, headers in (
        ("/.well-known/openid-configuration", {}),
        ("/v1/biomarkers/me", {"Authorization": f"Bearer {token}"}),
    ):
        started = time.perf_counter()
        response = http.get(path, headers=headers)
        elapsed.append(time.perf_counter() - started)
        assert response.status_code == 200

    assert min(elapsed) >= 0.15


def test_rate_limit_answers_a_burst_with_429_and_integer_retry_after(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """rate_limit_rps=5 (B4): a burst beyond one second's budget gets 429 {error:
    rate_limited, message} with Retry-After in whole seconds and X-RateLimit-* headers."""
    token = login(http, sandbox).access_token
    sandbox.set_knobs(rate_limit_rps=5)

    responses = _burst(http, token, 12)

    assert [r.status_code for r in responses[:5]] == [200] * 5
    limited = _first_429(responses)
    assert api_error(limited, 429) == "rate_limited"
    assert limited.headers["retry-after"].isdigit()
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["x-ratelimit-limit"] == "5"
    assert limited.headers["x-ratelimit-remaining"] == "0"
    client_id = sandbox.config.client.client_id
    assert sandbox.counters.rate_limited[client_id] == sum(r.status_code == 429 for r in responses)


def test_rate_limit_applies_to_the_token_endpoint_with_an_oauth_error_body(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """rate_limit_rps (B4): the limit is per client on identity too; there the 429 body is
    {error: rate_limited, error_description}."""
    sandbox.set_knobs(rate_limit_rps=2)
    form = client_form(sandbox, grant_type="refresh_token", refresh_token="lph_rt_unknown")

    responses = [http.post(TOKEN, data=form) for _ in range(6)]

    limited = _first_429(responses)
    assert oauth_error(limited, 429) == "rate_limited"
    assert limited.headers["retry-after"].isdigit()


def test_retry_after_can_be_an_http_date(sandbox: Sandbox, http: httpx.Client) -> None:
    """retry_after_format="http-date" (B4): Retry-After is an HTTP date in the near future
    of the sandbox clock."""
    token = login(http, sandbox).access_token
    sandbox.set_knobs(rate_limit_rps=5, retry_after_format="http-date")

    limited = _first_429(_burst(http, token, 12))

    value = limited.headers["retry-after"]
    assert not value.isdigit()
    when = parsedate_to_datetime(value)
    assert when.tzinfo is not None
    assert -2 <= (when - sandbox.clock.now()).total_seconds() <= 60  # whole seconds


def test_retry_after_can_be_absent(sandbox: Sandbox, http: httpx.Client) -> None:
    """retry_after_format="absent" (A: back off when absent): the 429 has no Retry-After."""
    token = login(http, sandbox).access_token
    sandbox.set_knobs(rate_limit_rps=5, retry_after_format="absent")

    limited = _first_429(_burst(http, token, 12))

    assert api_error(limited, 429) == "rate_limited"
    assert "retry-after" not in limited.headers


def test_storm_answers_429_with_the_storm_retry_after(sandbox: Sandbox, http: httpx.Client) -> None:
    """storm_rate=1: every call is 429 whatever the budget, Retry-After = storm_retry_after_s."""
    token = login(http, sandbox).access_token
    sandbox.set_knobs(storm_rate=1.0, storm_retry_after_s=7)

    responses = _burst(http, token, 3)

    for response in responses:
        assert api_error(response, 429) == "rate_limited"
        assert response.headers["retry-after"] == "7"
    assert sandbox.counters.faults["retry_after_storm"] == 3


# --- 5xx --------------------------------------------------------------------------------


def test_biomarkers_error_rate_answers_500_or_503(sandbox: Sandbox, http: httpx.Client) -> None:
    """error_rates={"biomarkers": 1.0}: every listing is 500 server_error or 503
    temporarily_unavailable, with the API's {error, message} body."""
    token = login(http, sandbox).access_token
    sandbox.set_knobs(error_rates={"biomarkers": 1.0})

    responses = _burst(http, token, 8)

    for response in responses:
        expected = {500: "server_error", 503: "temporarily_unavailable"}.get(response.status_code)
        assert expected is not None, response.status_code
        assert api_error(response, response.status_code) == expected


def test_token_error_rate_fails_the_refresh_without_rotating(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """error_rates={"token": 1.0}: a refresh is 500/503 {error: server_error |
    temporarily_unavailable, error_description} and nothing rotated: the same refresh token
    works afterwards, with no replay."""
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None
    sandbox.set_knobs(error_rates={"token": 1.0})

    failed = refresh(http, sandbox, tokens.refresh_token)

    assert failed.status_code in {500, 503}
    error = oauth_error(failed, failed.status_code)
    assert error == {500: "server_error", 503: "temporarily_unavailable"}[failed.status_code]
    assert sandbox.counters.refreshes.total() == 0
    sandbox.set_knobs(error_rates={})
    assert refresh(http, sandbox, tokens.refresh_token).status_code == 200
    assert sandbox.counters.replays_detected.total() == 0


# --- malformed 200s ---------------------------------------------------------------------


def test_malformed_html_answers_200_text_html(sandbox: Sandbox, http: httpx.Client) -> None:
    """malformed_rates html: a 200 whose body is an HTML page, not JSON."""
    token = login(http, sandbox).access_token
    sandbox.set_knobs(malformed_rates={"html": 1.0})

    response = biomarkers(http, token)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.text)


def test_malformed_truncated_json_answers_200_json_that_does_not_parse(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """malformed_rates truncated_json: a 200 application/json whose body fails json.loads."""
    token = login(http, sandbox).access_token
    sandbox.set_knobs(malformed_rates={"truncated_json": 1.0})

    response = biomarkers(http, token)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.content
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.content)


def _badly_typed(record: dict[str, Any]) -> bool:
    return (
        not isinstance(record.get("id"), str)
        or isinstance(record.get("value"), dict)
        or not isinstance(record.get("collected_at"), str)
    )


def test_malformed_wrong_types_sends_a_record_with_a_missing_or_wrong_typed_field(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """malformed_rates wrong_types: a valid JSON page in which exactly one record lacks its id
    or has a wrongly typed field."""
    token = login(http, sandbox).access_token
    sandbox.set_knobs(malformed_rates={"wrong_types": 1.0})

    response = biomarkers(http, token, limit=20)

    assert response.status_code == 200
    records = response.json()["data"]
    assert len(records) == 20
    assert sum(_badly_typed(r) for r in records) == 1
    assert not any(_badly_typed(r) for r in sandbox.truth("usr_0001")[:20])


# --- tokens -----------------------------------------------------------------------------


def test_short_access_token_ttl_expires_the_token(sandbox: Sandbox, http: httpx.Client) -> None:
    """access_token_ttl_s=5: expires_in is 5 and the token is 401 invalid_token 6 s later."""
    sandbox.set_knobs(access_token_ttl_s=5)
    tokens = login(http, sandbox)
    assert tokens.expires_in == 5
    assert biomarkers(http, tokens.access_token).status_code == 200

    sandbox.clock.advance(6)

    assert api_error(biomarkers(http, tokens.access_token), 401) == "invalid_token"


def test_lost_refresh_response_after_rotation(sandbox: Sandbox, http: httpx.Client) -> None:
    """lose_refresh_users: the refresh fails at transport level after the server rotated, so
    the old refresh token is now a replay (invalid_grant, grant revoked); once per listing."""
    user = "usr_0002"
    tokens = login(http, sandbox, login_hint=user)
    assert tokens.refresh_token is not None
    sandbox.set_knobs(lose_refresh_users={user})

    with pytest.raises(httpx.TransportError):
        refresh(http, sandbox, tokens.refresh_token)

    assert sandbox.counters.responses_lost[user] == 1
    assert sandbox.counters.refreshes[user] == 1  # the server did rotate
    assert oauth_error(refresh(http, sandbox, tokens.refresh_token), 400) == "invalid_grant"
    assert sandbox.counters.replays_detected[user] == 1
    assert sandbox.counters.grants_revoked[user] == 1
    assert sandbox.knobs.lose_refresh_users == set()
    again = login(http, sandbox, login_hint=user)
    assert again.refresh_token is not None
    assert refresh(http, sandbox, again.refresh_token).status_code == 200
    assert sandbox.counters.responses_lost[user] == 1


def test_lost_refresh_response_spares_users_not_listed(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """lose_refresh_users: users not listed refresh normally."""
    tokens = login(http, sandbox, login_hint="usr_0003")
    assert tokens.refresh_token is not None
    sandbox.set_knobs(lose_refresh_users={"usr_0002"})

    response = refresh(http, sandbox, tokens.refresh_token)

    assert response.status_code == 200
    assert sandbox.counters.responses_lost.total() == 0
    assert sandbox.knobs.lose_refresh_users == {"usr_0002"}


def _until_idle(sandbox: Sandbox) -> None:
    """Wait until the sandbox is done with every request, abandoned ones included."""
    deadline = time.monotonic() + 5
    while sandbox.counters.in_flight.total():
        assert time.monotonic() < deadline, sandbox.counters.in_flight
        time.sleep(0.01)


def test_endpoint_latency_slows_one_endpoint_before_it_acts(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """endpoint_latency_ms={"token": 600}: the token endpoint answers 0.6 s late, others at
    once; a client that gives up meanwhile changed nothing: its refresh token still works."""
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None
    sandbox.set_knobs(endpoint_latency_ms={"token": 600})
    started = time.perf_counter()
    assert http.get("/.well-known/openid-configuration").status_code == 200
    assert time.perf_counter() - started < 0.6
    form = client_form(sandbox, grant_type="refresh_token", refresh_token=tokens.refresh_token)

    with pytest.raises(httpx.ReadTimeout):
        http.post(TOKEN, data=form, timeout=0.1)
    _until_idle(sandbox)

    assert sandbox.counters.refreshes.total() == 0
    started = time.perf_counter()
    assert refresh(http, sandbox, tokens.refresh_token).status_code == 200
    assert time.perf_counter() - started >= 0.6
    assert sandbox.counters.replays_detected.total() == 0


def test_refresh_answer_delay_holds_the_answer_after_rotating(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """refresh_answer_delay_ms=300: Loop rotates at once and answers 0.3 s later, the request
    counted in flight meanwhile; a client that gives up then has lost the new token (the old
    one is no longer active), and a patient one gets it late."""
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None
    sandbox.set_knobs(refresh_answer_delay_ms=300)
    form = client_form(sandbox, grant_type="refresh_token", refresh_token=tokens.refresh_token)

    with pytest.raises(httpx.ReadTimeout):
        http.post(TOKEN, data=form, timeout=0.1)

    assert sandbox.counters.refreshes.total() == 1
    assert sandbox.counters.in_flight[TOKEN] == 1  # the answer is still held
    _until_idle(sandbox)
    assert sandbox.counters.in_flight[TOKEN] == 0
    assert introspect(http, sandbox, tokens.refresh_token).json() == {"active": False}
    assert sandbox.counters.replays_detected.total() == 0
    patient = login(http, sandbox)
    assert patient.refresh_token is not None
    started = time.perf_counter()
    assert refresh(http, sandbox, patient.refresh_token).status_code == 200
    assert time.perf_counter() - started >= 0.3


def test_narrow_scopes_withholds_a_scope_at_consent(sandbox: Sandbox, http: httpx.Client) -> None:
    """narrow_scopes={"read:biomarkers"} (B3): the granted scope lacks it, and the API says
    insufficient_scope."""
    sandbox.set_knobs(narrow_scopes={"read:biomarkers"})

    tokens = login(http, sandbox)

    assert tokens.scope.split() == ["openid", "profile"]
    assert api_error(biomarkers(http, tokens.access_token), 403) == "insufficient_scope"


# --- admin endpoints --------------------------------------------------------------------


def test_patching_knobs_over_http_changes_behaviour(sandbox: Sandbox, http: httpx.Client) -> None:
    """PATCH /_sandbox/knobs: applies the change, answers the knobs, and GET shows them."""
    token = login(http, sandbox).access_token

    patched = http.patch("/_sandbox/knobs", json={"results_key": "results", "latency_ms": 1})

    assert patched.status_code == 200
    assert patched.json()["results_key"] == "results"
    assert http.get("/_sandbox/knobs").json() == patched.json()
    assert "results" in biomarkers(http, token).json()


@pytest.mark.parametrize(
    "change",
    [{"no_such_knob": 1}, {"latency_ms": -5}, {"error_rates": {"nowhere": 1.0}}],
    ids=["unknown-knob", "negative-latency", "unknown-endpoint"],
)
def test_patching_an_unknown_or_invalid_knob_is_422_and_changes_nothing(
    sandbox: Sandbox, http: httpx.Client, change: dict[str, Any]
) -> None:
    """PATCH /_sandbox/knobs: an unknown knob or a bad value is 422 and nothing changes."""
    before = http.get("/_sandbox/knobs").json()

    response = http.patch("/_sandbox/knobs", json=change)

    assert response.status_code == 422
    assert response.json()["error"] == "invalid_knobs"
    assert http.get("/_sandbox/knobs").json() == before


def test_counters_count_requests_per_endpoint(sandbox: Sandbox, http: httpx.Client) -> None:
    """GET /_sandbox/counters: requests are counted per endpoint, with a total."""
    http.get("/.well-known/openid-configuration")
    http.get("/.well-known/openid-configuration")
    http.get("/.well-known/jwks.json")
    token = login(http, sandbox).access_token  # one authorize, one token
    for _ in range(3):
        biomarkers(http, token)
    http.post(INTROSPECT, data=client_form(sandbox, token=token))
    http.post(REVOKE, data=client_form(sandbox, token=token))

    requests = http.get("/_sandbox/counters").json()["requests"]

    assert requests == {
        "total": 10,
        "discovery": 2,
        "jwks": 1,
        "authorize": 1,
        "token": 1,
        "biomarkers": 3,
        "introspect": 1,
        "revoke": 1,
    }


def test_counters_count_token_requests_and_refreshes_per_user(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Counters: token requests (code exchanges and refreshes, failed ones too) and
    successful refreshes are counted per user."""
    one = login(http, sandbox, login_hint="usr_0001")
    login(http, sandbox, login_hint="usr_0002")
    assert one.refresh_token is not None
    assert refresh(http, sandbox, one.refresh_token).status_code == 200
    assert refresh(http, sandbox, one.refresh_token).status_code == 400  # replay

    counters = http.get("/_sandbox/counters").json()

    assert counters["token_requests"] == {"total": 4, "usr_0001": 3, "usr_0002": 1}
    assert counters["refreshes"] == {"total": 1, "usr_0001": 1}
    assert counters["replays_detected"] == {"total": 1, "usr_0001": 1}
    assert counters["grants_revoked"] == {"total": 1, "usr_0001": 1}
    assert counters["alerts"][0]["user_id"] == "usr_0001"


def test_advancing_the_clock_over_http_expires_access_tokens(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """POST /_sandbox/clock: advance_seconds moves the clock that tokens expire by."""
    tokens = login(http, sandbox)
    before = datetime.fromisoformat(http.get("/_sandbox/clock").json()["now"])

    moved = http.post("/_sandbox/clock", json={"advance_seconds": tokens.expires_in + 1})

    assert moved.status_code == 200
    after = datetime.fromisoformat(moved.json()["now"])
    assert 3601 <= (after - before).total_seconds() < 3661
    assert api_error(biomarkers(http, tokens.access_token), 401) == "invalid_token"


def test_a_frozen_clock_moves_only_when_advanced() -> None:
    """Frozen, what Loop lists cannot change between two reads a test compares (a result
    parsed between a killed run and its clean twin once failed CI); running, it keeps time."""
    frozen, running = Clock(frozen=True), Clock()
    held, started = frozen.now(), running.now()
    time.sleep(0.02)
    assert frozen.now() == held
    assert running.now() - started >= timedelta(seconds=0.02)
    assert frozen.advance(DAY) == held + timedelta(days=1)
    assert frozen.now() == held + timedelta(days=1)


def test_admin_results_endpoint_serves_the_ground_truth(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """GET /_sandbox/users/{id}/results: the user's full current list, as truth() has it."""
    response = http.get("/_sandbox/users/usr_0003/results")

    assert response.status_code == 200
    assert response.json() == {"data": sandbox.truth("usr_0003")}
    assert response.json()["data"]


def test_admin_secrets_lists_every_secret_issued(sandbox: Sandbox, http: httpx.Client) -> None:
    """GET /_sandbox/secrets: the client secret and every token and code issued, so tests
    can check that none leaks into logs."""
    tokens = login(http, sandbox)

    secrets = http.get("/_sandbox/secrets").json()["secrets"]

    assert sandbox.config.client.client_secret in secrets
    assert tokens.access_token in secrets
    assert tokens.refresh_token in secrets
    assert secrets == sandbox.authority.issued_secrets


def test_advancing_the_clock_30_days_reveals_new_results(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Clock: 30 days later some user has results they did not have, and the API lists
    them (a refreshed token reads the grown truth)."""
    users = [f"usr_{n:04d}" for n in range(1, 6)]
    sessions = {user: login(http, sandbox, login_hint=user) for user in users}
    before = {
        user: {r["id"] for r in biomarkers(http, s.access_token, limit=500).json()["data"]}
        for user, s in sessions.items()
    }

    sandbox.clock.advance(30 * DAY)

    grew = []
    for user, session in sessions.items():
        assert session.refresh_token is not None
        fresh = Tokens.parse(refresh(http, sandbox, session.refresh_token))
        listed = biomarkers(http, fresh.access_token, limit=500).json()["data"]
        assert listed == sandbox.truth(user)
        if {r["id"] for r in listed} - before[user]:
            grew.append(user)
    assert grew
