"""The Loop client against the live sandbox, with the real vault on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from loop_sync import contract
from loop_sync import grants as grant_store
from loop_sync.client import FetchResult, LoopClient, UserSyncFailed, api_error, parse_page
from loop_sync.errors import ReauthRequired
from loop_sync.ratelimit import DEFAULT_RETRY_POLICY, MalformedPage, RateBudget
from loop_sync.sandbox import Sandbox
from loop_sync.schema import GRANT_REAUTH_REQUIRED, tokens
from loop_sync.services import Services
from tests.client.conftest import TEST_RPS, Call, Fetch, Tap, ids, ok
from tests.vault.helpers import set_tokens

USER, OTHER = "usr_0001", "usr_0002"
USERS = ("usr_0001", "usr_0002", "usr_0003", "usr_0004", "usr_0005")
Consent = Callable[..., None]
DAY_S = 86_400
MINUTE = timedelta(minutes=1)


def client_id(sandbox: Sandbox) -> str:
    return sandbox.config.client.client_id


def faults(sandbox: Sandbox, *kinds: str) -> int:
    return sum(sandbox.counters.faults[kind] for kind in kinds)


def revoke(sandbox: Sandbox, token: str) -> None:
    """Revoke a token at Loop as the app would (RFC 7009), outside loop-sync's vault."""
    client = sandbox.config.client
    sandbox.authority.revoke(
        {"token": token, "client_id": client.client_id, "client_secret": client.client_secret}
    )


def advance_until_total_changes(sandbox: Sandbox, user_id: str) -> None:
    """Move Loop's clock a day at a time until the user's result count changes."""
    before = len(sandbox.truth(user_id))
    for _ in range(30):
        sandbox.clock.advance(DAY_S)
        if len(sandbox.truth(user_id)) != before:
            return
    pytest.fail(f"{user_id}'s total did not change within 30 sandbox days")


# --- full pulls ------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", [7, 500])
def test_full_pull_returns_loops_records_in_order(
    sandbox: Sandbox, consent: Consent, fetch: Fetch, page_size: int
) -> None:
    """Every page is fetched; records equal Loop's, same ids, same order, complete."""
    consent(USER)
    result = ok(fetch(USER, page_size=page_size)[0])
    truth = sandbox.truth(USER)
    assert ids(result.records) == ids(truth)
    assert result.records == truth
    assert result.complete
    assert result.requests == math.ceil(len(truth) / page_size)
    assert (result.retries, result.throttled) == (0, 0)


@pytest.mark.parametrize("page_size", [7, 500])
def test_a_pull_that_is_the_last_one_byte_for_byte_is_not_parsed(
    sandbox: Sandbox, consent: Consent, fetch: Fetch, page_size: int
) -> None:
    """Given the digest of the user's last complete pull, a one-page pull with that digest
    comes back `unchanged`, without records (nothing was parsed). A pull of several pages
    never matches on its first page and is read in full, as is any pull that changed."""
    consent(USER)
    last = ok(fetch(USER, page_size=page_size)[0])
    assert last.complete
    assert last.digest
    assert not last.unchanged
    one_page = len(sandbox.truth(USER)) <= page_size

    again = ok(fetch(USER, page_size=page_size, last_digests={USER: last.digest})[0])

    assert (again.complete, again.digest, again.unchanged) == (True, last.digest, one_page)
    assert again.records == ([] if one_page else sandbox.truth(USER))
    advance_until_total_changes(sandbox, USER)
    changed = ok(fetch(USER, page_size=page_size, last_digests={USER: last.digest})[0])
    assert not changed.unchanged
    assert changed.digest != last.digest
    assert changed.records == sandbox.truth(USER)


def test_results_array_key_is_accepted(sandbox: Sandbox, consent: Consent, fetch: Fetch) -> None:
    """Pages that carry their records under `results` instead of `data` work the same."""
    consent(USER)
    sandbox.set_knobs(results_key="results")
    result = ok(fetch(USER, page_size=7)[0])
    assert result.records == sandbox.truth(USER)
    assert result.complete


def test_unknown_fields_are_kept(sandbox: Sandbox, consent: Consent, fetch: Fetch) -> None:
    """Fields outside the contract reach the caller untouched, for the raw landing."""
    consent(USER)
    known = {*contract.RECORD_FIELDS, *contract.RECORD_OPTIONAL_FIELDS}
    result = ok(fetch(USER, page_size=7)[0])
    extras = [r for r in result.records if set(r) - known]
    assert extras  # usr_0001 of seed 7 has records with `specimen` / `fasting`
    assert result.records == sandbox.truth(USER)


def test_malformed_records_are_kept_for_the_rejects(
    sandbox: Sandbox, consent: Consent, fetch: Fetch
) -> None:
    """A page with a broken record is a valid page: the record is kept, as received."""
    consent(USER)
    sandbox.set_knobs(malformed_rates={"wrong_types": 1.0})
    result = ok(fetch(USER, page_size=10)[0])
    truth = sandbox.truth(USER)
    assert result.complete
    assert len(result.records) == len(truth)
    assert result.records != truth
    assert faults(sandbox, "malformed:wrong_types") == result.requests == 3
    assert {i for i in ids(result.records) if isinstance(i, str)} <= set(ids(truth))


# --- rate limits -----------------------------------------------------------------------


def test_429_storm_completes_after_honouring_each_retry_after(
    sandbox: Sandbox, consent: Consent, fetch: Fetch
) -> None:
    """Under random 429s the pull completes, and every Retry-After (capped) was waited."""
    consent(USER)
    sandbox.set_knobs(storm_rate=0.5, storm_retry_after_s=1)
    started = time.monotonic()
    result = ok(fetch(USER, page_size=15, retry_after_cap_s=0.2)[0])
    elapsed = time.monotonic() - started
    assert result.records == sandbox.truth(USER)
    assert result.complete
    assert result.throttled == sandbox.counters.rate_limited[client_id(sandbox)] > 0
    assert elapsed >= result.throttled * 0.2


def test_retry_after_as_an_http_date_is_honoured(
    sandbox: Sandbox, consent: Consent, fetch: Fetch
) -> None:
    """A Retry-After HTTP date is read as a wait, not ignored for the (shorter) backoff."""
    consent(USER)
    sandbox.set_knobs(storm_rate=0.5, storm_retry_after_s=2, retry_after_format="http-date")
    started = time.monotonic()
    result = ok(fetch(USER, page_size=15, retry_after_cap_s=0.3)[0])
    elapsed = time.monotonic() - started
    assert result.complete
    assert result.throttled > 0
    # The date is 1-2 s ahead, capped to 0.3 s; the test backoff never exceeds 0.1 s.
    assert elapsed >= result.throttled * 0.3


def test_429_without_retry_after_backs_off_and_completes(
    sandbox: Sandbox, consent: Consent, fetch: Fetch
) -> None:
    """A 429 without Retry-After is retried after exponential backoff."""
    consent(USER)
    sandbox.set_knobs(storm_rate=0.5, retry_after_format="absent")
    result = ok(fetch(USER, page_size=7)[0])
    assert result.complete
    assert result.throttled == sandbox.counters.rate_limited[client_id(sandbox)] > 0


def test_a_429_pauses_every_concurrent_user(
    sandbox: Sandbox, consent: Consent, fetch: Fetch, tap: Tap
) -> None:
    """After a 429, no user's request reaches Loop until its Retry-After has passed."""
    consent(USER, OTHER)
    sandbox.set_knobs(storm_rate=0.3, storm_retry_after_s=1)
    pause = 0.3
    results = [ok(r) for r in fetch(USER, OTHER, page_size=5, retry_after_cap_s=pause)]
    assert all(r.complete for r in results)
    assert {c.user_id for c in tap.calls} == {USER, OTHER}
    throttles = [c for c in tap.calls if c.status == 429]
    assert throttles
    for throttle in throttles:
        # A request already in flight when the 429 left may still land just after it.
        during = [
            c for c in tap.calls if throttle.started + 0.05 < c.started < throttle.started + pause
        ]
        assert during == [], f"{len(during)} requests reached Loop during a pause"


def test_client_budget_at_loops_limit_sees_no_429(
    sandbox: Sandbox, consent: Consent, fetch: Fetch
) -> None:
    """Users fetched concurrently share one budget, so Loop's per-client limit holds."""
    consent(*USERS)
    sandbox.set_knobs(rate_limit_rps=20)
    results = [ok(r) for r in fetch(*USERS, page_size=5, budget=RateBudget(20))]
    assert all(r.complete for r in results)
    assert sum(r.requests for r in results) == 30  # more than one burst of Loop's bucket
    assert sandbox.counters.rate_limited.total() == 0


def test_refreshes_draw_from_the_budget_like_every_request(
    services: Services, sandbox: Sandbox, consent: Consent, fetch: Fetch
) -> None:
    """A nightly run finds every access token expired: each user's refresh is a request to
    Loop as much as its pages are, so the budget paces both and Loop's limit holds."""
    consent(*USERS)
    for user in USERS:
        set_tokens(services.engine, user, access_expires_at=datetime.now(UTC) - MINUTE)
    sandbox.set_knobs(rate_limit_rps=12, rate_limit_burst=2)
    results = [ok(r) for r in fetch(*USERS, page_size=10, budget=RateBudget(10, burst=1))]
    assert all(r.complete for r in results)
    assert sandbox.counters.refreshes.total() == len(USERS)
    assert sandbox.counters.rate_limited.total() == 0


def test_refreshes_do_not_wait_for_the_event_loops_default_threads(
    services: Services, sandbox: Sandbox, consent: Consent
) -> None:
    """A nightly run finds every access token expired, while its writes run in the event
    loop's default threads. Refreshes have threads of their own: before, they queued there
    behind the writes, and the refreshes, not the budget, set the run's pace."""
    consent(*USERS)
    for user in USERS:
        set_tokens(services.engine, user, access_expires_at=datetime.now(UTC) - MINUTE)
    settings = services.settings.model_copy(update={"rate_limit_rps": TEST_RPS})

    async def main() -> list[FetchResult]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))
        writing = threading.Event()
        write = loop.run_in_executor(None, writing.wait)  # a long write holds that thread
        try:
            async with LoopClient(settings, services.vault, RateBudget(TEST_RPS)) as client:
                fetches = asyncio.gather(*(client.fetch_results(user) for user in USERS))
                return await asyncio.wait_for(fetches, timeout=15)
        finally:
            writing.set()
            await write

    results = asyncio.run(main())
    assert all(result.complete for result in results)
    assert sandbox.counters.refreshes.total() == len(USERS)


def test_client_budget_over_loops_limit_is_throttled_yet_completes(
    sandbox: Sandbox, consent: Consent, fetch: Fetch
) -> None:
    """With a budget above Loop's limit, 429s come, are honoured, and every user completes."""
    consent(*USERS)
    sandbox.set_knobs(rate_limit_rps=20)
    outcomes = fetch(*USERS, page_size=5, budget=RateBudget(500), retry_after_cap_s=0.2)
    results = [ok(r) for r in outcomes]
    assert all(r.complete for r in results)
    throttled = sum(r.throttled for r in results)
    assert throttled == sandbox.counters.rate_limited.total() > 0


# --- transient and malformed answers ---------------------------------------------------


def test_server_error_bursts_are_retried_to_completion(
    sandbox: Sandbox, consent: Consent, fetch: Fetch
) -> None:
    """With 30% of requests answering 500/503, every page still arrives."""
    consent(USER)
    sandbox.set_knobs(error_rates={"biomarkers": 0.3})
    result = ok(fetch(USER, page_size=7)[0])
    assert result.records == sandbox.truth(USER)
    assert result.complete
    assert result.retries == faults(sandbox, "biomarkers:500", "biomarkers:503") > 0


def test_truncated_json_is_retried_to_completion(
    sandbox: Sandbox, consent: Consent, fetch: Fetch
) -> None:
    """A 200 whose JSON is cut short is transient: retried, and the pull completes."""
    consent(USER)
    sandbox.set_knobs(malformed_rates={"truncated_json": 0.3})
    result = ok(fetch(USER, page_size=7)[0])
    assert result.records == sandbox.truth(USER)
    assert result.retries == faults(sandbox, "malformed:truncated_json") > 0


def test_html_instead_of_json_fails_that_user_clearly(
    sandbox: Sandbox, consent: Consent, fetch: Fetch
) -> None:
    """An HTML page with 200 is retried 3 times, then the user fails naming it."""
    consent(USER, OTHER)
    sandbox.set_knobs(malformed_rates={"html": 1.0})
    [failed] = fetch(USER)
    assert isinstance(failed, UserSyncFailed)
    assert failed.user_id == USER
    assert "200 with an HTML page 4 times" in str(failed)
    assert faults(sandbox, "malformed:html") == 1 + DEFAULT_RETRY_POLICY.malformed_retries
    sandbox.set_knobs(malformed_rates={})
    assert ok(fetch(OTHER)[0]).complete


def test_one_forbidden_user_does_not_stop_the_other(
    sandbox: Sandbox, consent: Consent, fetch: Fetch
) -> None:
    """A 403 forbidden fails that user at once, without retry; the other completes."""
    consent(USER, OTHER)
    sandbox.set_knobs(forbidden_users={USER})
    failed, other = fetch(USER, OTHER, page_size=7)
    assert isinstance(failed, UserSyncFailed)
    assert "HTTP 403 forbidden" in str(failed)
    assert "retrying will not help" in str(failed)
    assert ok(other).records == sandbox.truth(OTHER)
    assert sandbox.counters.requests["biomarkers"] == 1 + ok(other).requests


def test_time_budget_ends_a_user_that_never_succeeds(
    sandbox: Sandbox, consent: Consent, fetch: Fetch
) -> None:
    """With every request failing, the user fails by its time budget, saying so."""
    consent(USER)
    sandbox.set_knobs(error_rates={"biomarkers": 1.0})
    started = time.monotonic()
    [failed] = fetch(USER, user_time_budget_s=2.0, policy=DEFAULT_RETRY_POLICY)
    elapsed = time.monotonic() - started
    assert isinstance(failed, UserSyncFailed)
    assert "time budget of 2 s" in str(failed)
    assert elapsed < 2.0 + 0.5
    # Backoff ceilings 0.2 + 0.4 + 0.8 s fit in 2 s: at least 4 attempts were made.
    assert faults(sandbox, "biomarkers:500", "biomarkers:503") >= 4


# --- tokens and scopes -----------------------------------------------------------------


def test_revoked_access_token_is_refreshed_once_and_the_pull_completes(
    sandbox: Sandbox,
    services: Services,
    consent: Consent,
    fetch: Fetch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 401 invalid_token makes the auth flow refresh exactly once; no token is logged."""
    consent(USER)
    with services.engine.connect() as connection:
        stored = connection.execute(
            select(tokens.c.access_token).where(tokens.c.user_id == USER)
        ).scalar_one()
    revoke(sandbox, services.cipher.decrypt(stored))
    caplog.set_level(logging.DEBUG)
    result = ok(fetch(USER, page_size=7)[0])
    assert result.records == sandbox.truth(USER)
    assert result.complete
    assert sandbox.counters.refreshes[USER] == 1
    assert result.requests == math.ceil(len(result.records) / 7) + 1
    assert contract.ACCESS_TOKEN_PREFIX not in caplog.text
    assert contract.REFRESH_TOKEN_PREFIX not in caplog.text
    assert "refreshing it once" in caplog.text
    codes = {r["biomarker_code"] for r in result.records}
    assert not [code for code in codes if code in caplog.text]


def test_token_rejected_again_after_refresh_fails_without_looping(
    sandbox: Sandbox, consent: Consent, fetch: Fetch, tap: Tap
) -> None:
    """If Loop rejects the refreshed token too, the user fails after one refresh."""
    consent(USER)
    tap.before = lambda token: revoke(sandbox, token)  # every token dies on arrival
    [failed] = fetch(USER)
    assert isinstance(failed, UserSyncFailed)
    assert "even after one refresh (HTTP 401 invalid_token)" in str(failed)
    assert sandbox.counters.refreshes[USER] == 1
    assert len(tap.calls) == 2
    assert "lph_" not in str(failed)


@pytest.mark.parametrize("status", sorted(contract.INSUFFICIENT_SCOPE_STATUSES))
def test_insufficient_scope_marks_the_user_reauth_required(
    sandbox: Sandbox, services: Services, consent: Consent, fetch: Fetch, status: int
) -> None:
    """A grant without read:biomarkers (401 or 403) needs a new consent; no refresh."""
    sandbox.set_knobs(narrow_scopes={contract.BIOMARKERS_SCOPE}, insufficient_scope_status=status)
    consent(USER)
    [failed] = fetch(USER)
    assert isinstance(failed, ReauthRequired)
    assert "insufficient_scope" in failed.reason
    with services.engine.connect() as connection:
        grant = grant_store.get_grant(connection, USER)
    assert grant is not None
    assert grant.status == GRANT_REAUTH_REQUIRED
    assert grant.status_reason == failed.reason
    assert sandbox.counters.refreshes[USER] == 0


# --- consistency -----------------------------------------------------------------------


def test_total_changing_mid_pull_pulls_again_and_completes(
    sandbox: Sandbox, consent: Consent, fetch: Fetch, tap: Tap
) -> None:
    """New results landing during a pull restart it; the second pull is complete.

    Loop's clock jumps days after the first page, which also expires the access token:
    the auth flow refreshes once mid-pull.
    """
    consent(USER)

    def after(call: Call) -> None:
        if len(tap.calls) == 1:
            advance_until_total_changes(sandbox, USER)

    tap.after = after
    result = ok(fetch(USER, page_size=10)[0])
    assert result.complete
    assert result.records == sandbox.truth(USER)
    assert [c.offset for c in tap.calls if c.status == 200].count(0) == 2
    assert sandbox.counters.refreshes[USER] == 1


def test_total_that_never_holds_still_is_incomplete(
    sandbox: Sandbox, consent: Consent, fetch: Fetch, tap: Tap
) -> None:
    """If every pull sees the total move, the result says complete=False after 4 pulls."""
    consent(USER)

    def after(call: Call) -> None:
        if call.status == 200 and call.offset == 0:
            advance_until_total_changes(sandbox, USER)

    tap.after = after
    result = ok(fetch(USER, page_size=10)[0])
    assert not result.complete
    assert result.records
    pulls = [c for c in tap.calls if c.status == 200 and c.offset == 0]
    assert len(pulls) == 1 + DEFAULT_RETRY_POLICY.repulls


# --- parsing, on its own ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "what"),
    [
        (httpx.Response(200, html="<html>maintenance</html>"), "an HTML page"),
        (httpx.Response(200, content=b'{"data": [{"id"'), "a body that is not JSON"),
        (httpx.Response(200, json=[1, 2]), "JSON that is not an object"),
        (httpx.Response(200, json={"items": [], "total": 0}), "no list under data or results"),
        (httpx.Response(200, json={"data": {}, "total": 0}), "no list under data or results"),
        (httpx.Response(200, json={"data": []}), "no integer total"),
        (httpx.Response(200, json={"data": [], "total": "3"}), "no integer total"),
        (httpx.Response(200, json={"data": [], "total": True}), "no integer total"),
    ],
)
def test_malformed_pages_say_what_is_wrong(response: httpx.Response, what: str) -> None:
    """Each kind of broken page raises MalformedPage naming its kind, never its body."""
    with pytest.raises(MalformedPage, match=what):
        parse_page(response)


def test_page_accepts_either_array_key_and_keeps_records_as_sent() -> None:
    """`data` or `results`; records of any shape come through as received."""
    records = [{"id": "r1", "new": 1}, "odd", {"id": 5}]
    for key in contract.PAGE_ARRAY_KEYS:
        page = parse_page(httpx.Response(200, json={key: records, "total": 3}))
        assert (page.records, page.total) == (records, 3)


def nested_page(depth: int, **fields: Any) -> httpx.Response:
    """A page nesting `depth` levels (the page is level 1, its record level 3), written by
    hand: Python's json cannot write the deepest."""
    text = json.dumps({"data": [{"id": "r1", **fields, "x": "<deep>"}], "total": 1})
    levels = depth - 3
    return httpx.Response(200, content=text.replace('"<deep>"', "[" * levels + "]" * levels))


@pytest.mark.parametrize(
    "fields",
    [{}, {"value": math.nan}, {"note": "\ud800"}],
    ids=["read-by-orjson", "read-by-python-json", "read-by-python-json-and-walked"],
)
def test_a_page_may_nest_254_levels_and_a_deeper_one_is_malformed(fields: dict[str, Any]) -> None:
    """254 levels is what the landing can write; deeper is a malformed page whichever reader
    read it, and past what Python's json reads it is the same, never a RecursionError."""
    assert len(parse_page(nested_page(254, **fields)).records) == 1
    for depth in (255, 1024, 1100, 30_000):
        with pytest.raises(MalformedPage, match="JSON nested more than 254 levels deep"):
            parse_page(nested_page(depth, **fields))


def test_an_integer_beyond_64_bits_reads_as_the_nearest_float_whichever_reader_reads_it() -> None:
    """orjson reads UTF-8 pages, Python's json UTF-16 ones (and NaN, lone surrogates): a
    record must read, and so hash, the same either way."""
    record = {"a": 2**64 - 1, "b": -(2**63), "c": 2**64, "d": -(2**63) - 1, "e": 10**30}
    expected = {"a": 2**64 - 1, "b": -(2**63), "c": 2.0**64, "d": -(2.0**63), "e": 1e30}
    text = json.dumps({"data": [record], "total": 1})
    for body in (text.encode(), text.encode("utf-16")):
        (read,) = parse_page(httpx.Response(200, content=body)).records
        assert read == expected
        assert [type(value) for value in read.values()] == [int, int, float, float, float]
    (beyond_a_float,) = parse_page(
        httpx.Response(200, content=b'{"data":[%b],"total":1}' % (b"9" * 400))
    ).records
    assert beyond_a_float == math.inf


@pytest.mark.parametrize(
    ("response", "code"),
    [
        (
            httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}),
            "invalid_token",
        ),
        (
            httpx.Response(
                403,
                headers={
                    "WWW-Authenticate": 'Bearer realm="loop", error_description="x", '
                    'error="insufficient_scope"'
                },
            ),
            "insufficient_scope",
        ),
        (httpx.Response(403, json={"error": "forbidden", "message": "no"}), "forbidden"),
        (httpx.Response(401), None),
        (httpx.Response(500, html="<h1>oops</h1>"), None),
        (httpx.Response(400, json={"error": "Bearer lph_at_secret"}), None),
    ],
)
def test_api_error_reads_the_challenge_or_the_body(
    response: httpx.Response, code: str | None
) -> None:
    """The error code comes from WWW-Authenticate or the body; odd values are dropped."""
    assert api_error(response) == code
