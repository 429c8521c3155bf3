"""The rate budget, Retry-After parsing, backoff and the retry predicate, on their own."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import httpx
import pytest

from loop_sync.errors import (
    LeaseBusy,
    LoopUnreachable,
    ReauthRequired,
    RefreshOutcomeUnknown,
    TransientError,
)
from loop_sync.ratelimit import (
    DEFAULT_RETRY_POLICY,
    HEADROOM,
    MalformedPage,
    RateBudget,
    RetryPolicy,
    budget_for,
    full_jitter_backoff,
    parse_retry_after,
    retry_wait,
)


class FakeTime:
    """A monotonic clock that only moves when something sleeps on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


def budget_on(fake: FakeTime, rate: float, burst: int | None = None) -> RateBudget:
    return RateBudget(rate, burst, clock=fake.clock, sleep=fake.sleep)


def acquire_times(budget: RateBudget, fake: FakeTime, n: int) -> list[float]:
    async def main() -> list[float]:
        times = []
        for _ in range(n):
            await budget.acquire()
            times.append(round(fake.now - 100.0, 6))
        return times

    return asyncio.run(main())


def test_a_fresh_budget_starts_with_one_request_not_a_burst() -> None:
    """A run's first requests are spread at the rate, so they never meet Loop's bucket
    head on."""
    fake = FakeTime()
    assert acquire_times(budget_on(fake, rate=5, burst=3), fake, 4) == [0.0, 0.2, 0.4, 0.6]


def test_after_idle_a_burst_goes_at_once_then_one_per_interval() -> None:
    """An idle bucket refills up to `burst` (never more), then one every 1/rate seconds."""
    fake = FakeTime()
    budget = budget_on(fake, rate=10, burst=3)
    acquire_times(budget, fake, 3)
    fake.now += 60
    start = fake.now - 100.0
    assert [round(t - start, 6) for t in acquire_times(budget, fake, 5)] == [
        0.0,
        0.0,
        0.0,
        0.1,
        0.2,
    ]


def test_default_burst_is_one_seconds_worth_and_at_least_one() -> None:
    """Without a burst, the bucket holds ceil(rate) requests, and never less than one."""
    assert RateBudget(2.5).burst == 3
    assert RateBudget(0.5).burst == 1
    assert RateBudget(10).burst == 10


def test_the_budget_for_loops_limit_spends_a_little_under_it() -> None:
    """Spent at exactly Loop's limit, the budget runs ahead of Loop's bucket (which loses
    refill whenever requests reach it late) and meets 429s, each a second of silence."""
    assert budget_for(20.0).rate == pytest.approx(20.0 * HEADROOM)
    assert 0.9 <= HEADROOM < 1


def test_pause_holds_everyone_until_the_deadline_then_resumes_one_at_a_time() -> None:
    """A pause (a 429's Retry-After) blocks all acquires; after it, no stampede."""
    fake = FakeTime()
    budget = budget_on(fake, rate=10, burst=10)
    budget.pause_until(fake.now + 2.0)
    assert acquire_times(budget, fake, 3) == [2.0, 2.1, 2.2]


def test_a_shorter_pause_never_shortens_a_longer_one() -> None:
    """pause_until keeps the latest deadline it has been given."""
    fake = FakeTime()
    budget = budget_on(fake, rate=10)
    budget.pause_until(fake.now + 3.0)
    budget.pause_for(1.0)
    assert budget.paused_until == fake.now + 3.0


def test_pause_reaches_requests_already_waiting_for_a_slot() -> None:
    """A request asleep waiting for its slot waits for a pause that began meanwhile."""

    async def main() -> tuple[float, float]:
        budget = RateBudget(20, burst=1)
        await budget.acquire()  # the bucket is empty now; the next slot is 50 ms away
        started = time.monotonic()
        waiter = asyncio.create_task(budget.acquire())
        await asyncio.sleep(0.01)
        budget.pause_for(0.25)  # a 429 arrives for another user
        waited = await waiter
        return waited, time.monotonic() - started

    waited, elapsed = asyncio.run(main())
    assert elapsed >= 0.25
    assert waited >= 0.24


def test_concurrent_acquires_share_one_rate() -> None:
    """Many tasks acquiring at once are spread at the budget's rate, not each at it."""

    async def main() -> float:
        budget = RateBudget(200, burst=1)
        started = time.monotonic()
        await asyncio.gather(*(budget.acquire() for _ in range(11)))
        return time.monotonic() - started

    assert asyncio.run(main()) >= 10 / 200 - 0.005


@pytest.mark.parametrize(("rate", "burst"), [(0, None), (-1, None), (5, 0)])
def test_invalid_budget_is_refused_with_its_values(rate: float, burst: int | None) -> None:
    """A non-positive rate or burst fails at construction, naming what was given."""
    with pytest.raises(ValueError, match="rate > 0 and burst >= 1"):
        RateBudget(rate, burst)


NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("3", 3.0),
        (" 0 ", 0.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        ("Sat, 01 Mar 2025 12:02:00 GMT", 120.0),
        ("Sat, 01 Mar 2025 11:59:00 GMT", 0.0),
        ("Sat, 01 Mar 2025 12:00:30", 30.0),  # no zone: RFC 9110 dates are GMT
        ("soon", None),
        ("", None),
        (None, None),
        ("nan", None),
        ("inf", None),
    ],
)
def test_retry_after_reads_seconds_and_http_dates(value: str | None, seconds: float | None) -> None:
    """Retry-After as delay-seconds or an HTTP date; past dates are 0, junk is None."""
    assert parse_retry_after(value, now=NOW) == seconds


@pytest.mark.parametrize("attempt", range(1, 12))
def test_backoff_is_full_jitter_below_the_exponential_ceiling(attempt: int) -> None:
    """Each wait is uniform in [0, min(cap, base * 2**(attempt-1))]."""
    ceiling = min(10.0, 0.2 * 2 ** (attempt - 1))
    waits = [full_jitter_backoff(attempt, base_s=0.2, cap_s=10.0) for _ in range(200)]
    assert all(0 <= w <= ceiling for w in waits)
    assert max(waits) > ceiling / 2  # jittered across the range, not stuck at 0


def response(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers, json={"error": "x"})


def wait_for(outcome: httpx.Response | BaseException, attempt: int = 1) -> float | None:
    return retry_wait(outcome, attempt, retry_after_cap_s=30.0)


def test_retry_predicate_honours_retry_after_up_to_the_cap() -> None:
    """A 429 waits its Retry-After (seconds or date), never longer than the cap."""
    assert wait_for(response(429, **{"Retry-After": "7"})) == 7.0
    assert wait_for(response(429, **{"Retry-After": "3600"})) == 30.0
    far = "Wed, 01 Jan 2100 00:00:00 GMT"
    assert wait_for(response(429, **{"Retry-After": far})) == 30.0


def test_retry_predicate_backs_off_on_429_without_retry_after() -> None:
    """A 429 without a readable Retry-After gets exponential backoff instead."""
    for attempt in (1, 3):
        ceiling = DEFAULT_RETRY_POLICY.backoff_base_s * 2 ** (attempt - 1)
        for headers in ({}, {"Retry-After": "later"}):
            wait = wait_for(response(429, **headers), attempt)
            assert wait is not None
            assert 0 <= wait <= ceiling


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_retry_predicate_backs_off_on_server_errors(status: int) -> None:
    """5xx answers are transient: backoff within the policy's ceiling."""
    policy = RetryPolicy(backoff_base_s=1.0, backoff_cap_s=4.0)
    wait = retry_wait(response(status), 5, retry_after_cap_s=30.0, policy=policy)
    assert wait is not None
    assert 0 <= wait <= 4.0


@pytest.mark.parametrize(
    "outcome",
    [
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("closed"),
        MalformedPage("an HTML page"),
        TransientError("temporarily_unavailable", "overloaded", 503),
        LoopUnreachable("http://loop", "ConnectError"),
        LeaseBusy("usr_0001"),
        RefreshOutcomeUnknown("lost"),
    ],
    ids=type,
)
def test_retry_predicate_retries_transient_exceptions(outcome: BaseException) -> None:
    """Transport errors, malformed pages and transient vault errors are retried."""
    assert wait_for(outcome) is not None


@pytest.mark.parametrize("status", [200, 400, 401, 403, 404, 409, 422])
def test_retry_predicate_never_retries_other_answers(status: int) -> None:
    """401, 403, 404 and other 4xx are final (a 401 was already refreshed once)."""
    assert wait_for(response(status)) is None


@pytest.mark.parametrize(
    "outcome", [ValueError("bug"), ReauthRequired("usr_0001", "gone")], ids=type
)
def test_retry_predicate_never_retries_unknown_or_final_exceptions(outcome: BaseException) -> None:
    """Bugs and dead grants are not retried."""
    assert wait_for(outcome) is None
