"""When loop-sync may send to Loop again: the client_id's rate budget and the retry rule.

Loop limits requests per client, not per user (loop-platform.md, Part B4), so every user
synced by this process draws from one `RateBudget`. A 429 is a statement about the whole
client: `pause_until` stops every user, not only the one that got it.

The budget is a token bucket kept as GCRA (a "theoretical arrival time"): each `acquire`
reserves its slot without awaiting anything in between, so it needs no `asyncio.Lock`
and works from several event loops; a `threading.Lock` guards the few lines that touch
the state, so threads that each run their own loop (a flow's task runner) may share it.

`budget_for` spends a little under Loop's limit (`HEADROOM`). At exactly the limit the two
buckets drift apart: Loop's is full whenever requests reach it late (jitter, a busy
moment on either side) and loses that refill, while ours does not, so ours runs ahead and
Loop answers 429; every 429 then stops the whole client for its `Retry-After` (a second
at least), which costs far more than the headroom. Two percent is enough margin: Loop's
bucket then refills faster than ours by 2 % of the rate whenever it is not full (at R = 200,
four requests a second), and no benchmark run at 98 % has met a 429. At 95 % a nightly run
could not reach 90 % of Loop's limit: the fixed seconds of a run's start and end come on
top of the budget's pace (docs/performance.md).

`X-RateLimit-Remaining`/`Reset` are deliberately not acted on: Loop does not document
whether `Reset` means seconds or an epoch, nor "until one request" or "until the window
is full", and misreading it would stall every user. The 429 with its `Retry-After` is
the one signal Loop documents, and the bucket keeps us under the configured rate.

`retry_wait` is the one retry decision of the API client, stamina-style: an outcome in,
seconds to wait (or None: final) out, so it is tested on its own.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from loop_sync.errors import RefreshOutcomeUnknown, TransientError

__all__ = [
    "DEFAULT_RETRY_POLICY",
    "TRANSIENT_STATUSES",
    "MalformedPage",
    "RateBudget",
    "RetryPolicy",
    "budget_for",
    "full_jitter_backoff",
    "parse_retry_after",
    "retry_wait",
]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

_jitter = random.Random()  # noqa: S311  (spreads retries; not cryptography)
TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})
HEADROOM = 0.98  # the share of Loop's limit the budget spends (see the module docstring)


class RateBudget:
    """At most `rate` requests per second on average, `burst` at once, shared by all users.

    Request delays vary, so a budget exactly equal to Loop's limit can still meet a 429
    after an idle spell; the client honours it. A rate a little under Loop's avoids even
    that.

    Args:
        rate: requests per second (e.g. `Settings.rate_limit_rps`).
        burst: requests allowed back to back after an idle spell; default one second's
            worth, at least 1 (what Loop's sandbox allows).
        clock: a monotonic clock in seconds; injected by tests.
        sleep: an async sleep; injected by tests with a fake clock.
    """

    def __init__(
        self,
        rate: float,
        burst: int | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if rate <= 0 or (burst is not None and burst < 1):
            msg = f"a RateBudget needs rate > 0 and burst >= 1, not rate={rate}, burst={burst}"
            raise ValueError(msg)
        self.rate = rate
        self.burst = burst if burst is not None else max(1, math.ceil(rate))
        self._interval = 1.0 / rate
        self._tolerance = (self.burst - 1) * self._interval  # how far ahead a slot may be
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        # Start with one request's worth, not a full bucket: a run's first burst would
        # otherwise meet Loop's full bucket head on, and request delays vary, so even equal
        # budgets could collide. After an idle spell the bucket refills up to `burst`.
        self._tat = clock() + self._tolerance  # the theoretical arrival time (GCRA)
        self._paused_until = 0.0

    @property
    def paused_until(self) -> float:
        """The monotonic time before which nobody may send (0 if never paused)."""
        return self._paused_until

    async def acquire(self) -> float:
        """Wait for this request's slot; returns the seconds waited (for logs and stats)."""
        started = self._clock()
        while True:
            slot = self._reserve()
            now = self._clock()
            if slot > now:
                await self._sleep(slot - now)
            # A slot is never before the pause it was reserved under; a later deadline means
            # a 429 elsewhere paused everyone while we slept: reserve again.
            if self._paused_until <= slot:
                return self._clock() - started

    def acquire_blocking(self) -> float:
        """`acquire` for code that blocks instead of awaiting: a keep-alive rotation refreshes
        one user after another in a plain thread, as fast as Loop answers."""
        return asyncio.run(self.acquire())

    def _reserve(self) -> float:
        with self._lock:
            now = self._clock()
            tat = max(self._tat, now)
            slot = max(now, tat - self._tolerance, self._paused_until)
            self._tat = max(tat, slot) + self._interval
            return slot

    def pause_until(self, monotonic_deadline: float) -> None:
        """Nobody sends before `monotonic_deadline`; then requests resume one at a time.

        The bucket restarts with a single request's worth at the deadline rather than a
        full burst, so the first request after a 429 is a probe, not a stampede.
        """
        with self._lock:
            if monotonic_deadline <= self._paused_until:
                return
            self._paused_until = monotonic_deadline
            self._tat = max(self._tat, monotonic_deadline + self._tolerance)

    def pause_for(self, seconds: float) -> None:
        """`pause_until` that many seconds from now."""
        self.pause_until(self._clock() + max(0.0, seconds))


def budget_for(limit_rps: float) -> RateBudget:
    """The budget for a client Loop allows `limit_rps` requests per second."""
    return RateBudget(limit_rps * HEADROOM)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` value: delay-seconds or an HTTP date (RFC 9110).

    Returns None when absent or unreadable (the caller then backs off on its own); a
    date in the past means 0.
    """
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # RFC 9110 dates are GMT
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - (now or datetime.now(UTC))).total_seconds())


def full_jitter_backoff(attempt: int, *, base_s: float, cap_s: float) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**(attempt-1))].

    Full jitter spreads the retries of many users that failed together (AWS Architecture
    Blog, "Exponential Backoff And Jitter").
    """
    ceiling = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    return _jitter.uniform(0.0, ceiling)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one request is retried; the per-user time budget bounds it all."""

    backoff_base_s: float = 0.2
    backoff_cap_s: float = 10.0
    malformed_retries: int = 3  # a malformed 200 body is retried this often per request
    repulls: int = 3  # pulls again from offset 0 this often when `total` moves


DEFAULT_RETRY_POLICY = RetryPolicy()


class MalformedPage(Exception):
    """A 200 whose body is not a page of results; `what` says how, without the body."""

    def __init__(self, what: str) -> None:
        super().__init__(f"malformed page: {what}")
        self.what = what


def retry_wait(
    outcome: httpx.Response | BaseException,
    attempt: int,
    *,
    retry_after_cap_s: float,
    policy: RetryPolicy = DEFAULT_RETRY_POLICY,
) -> float | None:
    """Seconds to wait before retrying `outcome` (the `attempt`-th try), or None: don't.

    429: Retry-After (seconds or HTTP date) capped at `retry_after_cap_s`, else backoff.
    500/502/503/504, transport errors, malformed pages and transient token-vault errors:
    exponential backoff with full jitter. Anything else (401, 403, 404, other 4xx) is
    final. A 401 invalid_token never gets here: `VaultAuth` already refreshed once.
    """

    def backoff() -> float:
        return full_jitter_backoff(
            attempt, base_s=policy.backoff_base_s, cap_s=policy.backoff_cap_s
        )

    if isinstance(outcome, httpx.Response):
        if outcome.status_code == 429:
            told = parse_retry_after(outcome.headers.get("Retry-After"))
            return min(retry_after_cap_s, backoff() if told is None else told)
        return backoff() if outcome.status_code in TRANSIENT_STATUSES else None
    retryable = (httpx.TransportError, MalformedPage, TransientError, RefreshOutcomeUnknown)
    return backoff() if isinstance(outcome, retryable) else None
