"""The Loop API client: every page of one user's biomarker results, or a clear failure.

`LoopClient.fetch_results` pulls `GET {api}/v1/biomarkers/me` page by page (contract Part
B1), dedupes by `id`, and calls a pull complete only if `total` never moved, because the
caller soft-deletes ids missing from a complete pull. Each request is retried per one
stamina-style predicate, `retry_wait`; the per-user time budget bounds the whole pull.
Tokens come from the vault through `VaultAuth`. No token and no record value (PHI) is ever
logged or put in an exception: logs carry user ids, offsets, statuses and counts.

Reading a page (`parse_page`) is orjson's, with Python's json as the fallback for what orjson
refuses (UTF-16, NaN, ±Infinity, lone surrogates, escaped or encoded). Decisions where
Loop is silent:

- What orjson refuses is read by `lenient.read_lenient`, which agrees with orjson (an
  integer beyond 64 bits is the nearest float) and marks NaN and ±Infinity.
- A page nesting arrays and objects more than `MAX_DEPTH` (254) levels deep is malformed
  (Loop's pages nest 3 or 4): retried, and then that user's sync fails, with the reason,
  until the next run. 254 is what orjson writes, so every record the client returns can be
  landed and rejected as it is, with no recursion limit in the way.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import re
import ssl
import time
from collections.abc import AsyncGenerator, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

import httpx
import orjson

from loop_sync import contract
from loop_sync.config import Settings
from loop_sync.errors import (
    LoopSyncError,
    ProviderError,
    ReauthRequired,
    RefreshOutcomeUnknown,
    TransientError,
)
from loop_sync.lenient import read_lenient
from loop_sync.ratelimit import (
    DEFAULT_RETRY_POLICY,
    MalformedPage,
    RateBudget,
    RetryPolicy,
    retry_wait,
)
from loop_sync.vault import TokenVault

__all__ = ["FetchResult", "LoopClient", "UserSyncFailed", "VaultAuth", "api_error", "parse_page"]

log = logging.getLogger(__name__)

HTTP_TIMEOUT = httpx.Timeout(30.0, connect=5.0)  # a GET is safe to retry after a timeout
_ERROR_CODE = re.compile(r"[a-z_]{1,64}")  # Loop's codes; anything else is not echoed
_CHALLENGE_ERROR = re.compile(r'(?:^|[\s,])error="([^"]*)"')
MAX_DEPTH: Final = 254  # levels of nesting a page may have (the page itself is level 1)
TOO_DEEP: Final = f"JSON nested more than {MAX_DEPTH} levels deep"
# Threads a client gives the vault (`VaultAuth`). A refresh waits on Loop (its latency),
# then holds a pooled database connection for a few statements: 8 sustain ~100 refreshes/s
# per client, more than the budget lets through at R = 200 (a refresh and a page per
# user). More only fought over the GIL and the engine's connections: measured on a
# nightly-like run (5,000 users, every token expired), 8 took 58 s, 4 took 72 s, 12 took
# 70 s and 32 took 69-79 s (docs/performance.md).
REFRESHES_AT_ONCE: Final = 8


class UserSyncFailed(LoopSyncError):
    """One user's sync failed; the others go on. No token, no record value in the message."""

    def __init__(self, user_id: str, reason: str) -> None:
        super().__init__(
            f"syncing user {user_id} failed: {reason}. Other users are not affected; "
            "the next run tries this user again"
        )
        self.user_id = user_id
        self.reason = reason


@dataclass(frozen=True)
class FetchResult:
    """A user's raw records as Loop sent them, first-seen order, deduped by `id`.

    `complete` is True only if `total` held still for a whole pull: only then may ids
    missing from `records` be soft-deleted, and only then is there a `digest`: the
    SHA-256 of the pull's page bodies, which tells a writer that nothing changed since a
    pull with the same digest without looking at a single record.

    `unchanged` says the pull was the caller's `last_digest` byte for byte, so it was not
    even parsed: `records` is empty, and only a writer that compares digests may take it.
    """

    user_id: str
    records: list[Any]
    complete: bool
    digest: str | None
    requests: int
    retries: int
    throttled: int
    seconds: dict[str, float]  # rate_wait, http, json_decode: where the pull's time went
    unchanged: bool = False


@dataclass(frozen=True)
class _Page:
    records: list[Any]
    total: int
    unchanged: bool = False  # the whole pull was the last one, byte for byte: not parsed


def api_error(response: httpx.Response) -> str | None:
    """The error code of an API answer: from WWW-Authenticate, else the JSON body."""
    challenge = _CHALLENGE_ERROR.search(response.headers.get("WWW-Authenticate", ""))
    code: object = challenge.group(1) if challenge else None
    if code is None:
        try:
            body = response.json()
        except ValueError:
            return None
        code = body.get("error") if isinstance(body, dict) else None
    return code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else None


def parse_page(response: httpx.Response) -> _Page:
    """A page of results (Part B1), or MalformedPage saying what is wrong with it."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        try:  # what orjson refuses but Python's json reads: UTF-16, NaN, lone surrogates
            body = read_lenient(response.content)
        except RecursionError:  # deeper than Python's json reads (orjson reads 1,024 levels)
            raise MalformedPage(TOO_DEEP) from None
        except ValueError:  # not JSON, truncated JSON or undecodable bytes
            html = "html" in response.headers.get("content-type", "")
            raise MalformedPage("an HTML page" if html else "a body that is not JSON") from None
    if not isinstance(body, dict):
        raise MalformedPage("JSON that is not an object")
    if _too_deep(body):
        raise MalformedPage(TOO_DEEP)
    key = next((k for k in contract.PAGE_ARRAY_KEYS if k in body), None)
    if key is None or not isinstance(body[key], list):
        raise MalformedPage(f"JSON with no list under {' or '.join(contract.PAGE_ARRAY_KEYS)}")
    total = body.get("total")
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise MalformedPage("JSON with no integer total")
    return _Page(body[key], total)


def _too_deep(body: dict[str, Any]) -> bool:
    """Whether the page nests more than MAX_DEPTH levels. orjson writes exactly that many, so
    a page it writes is fine (at C speed); one it refuses (too deep, or holding a lone
    surrogate) is walked, a level at a time."""
    try:
        orjson.dumps(body)
    except orjson.JSONEncodeError:
        level: list[Any] = [body]
        for _ in range(MAX_DEPTH):
            level = [
                child
                for container in level
                for child in (container.values() if isinstance(container, dict) else container)
                if isinstance(child, dict | list)
            ]
        return bool(level)
    return False


class VaultAuth(httpx.Auth):
    """Bearer tokens from the vault; on a 401 invalid_token, one refresh and one retry.

    It overrides `async_auth_flow` because the vault blocks (a database lease, a refresh
    POST): it runs in one of `threads`, the client's own pool (`REFRESHES_AT_ONCE`). A
    nightly run finds every access token expired, so every user's first request waits for
    a refresh; in asyncio's default pool (six threads on two cores, shared with the
    writes) the refreshes, not the rate budget, set the pace. The vault's lease makes the
    refresh one per user across processes, and `rejected=` keeps a token another process
    already replaced from being refreshed twice. A bare 401 (no error code) counts as
    invalid_token.

    Every request it sends, the retry after a refresh and the refresh itself included,
    first waits for the client's shared `budget`, so the budget sees what Loop sees.
    """

    def __init__(
        self, vault: TokenVault, user_id: str, budget: RateBudget, threads: ThreadPoolExecutor
    ) -> None:
        self.vault = vault
        self.user_id = user_id
        self.budget = budget
        self.threads = threads
        self.requests = 0  # requests sent through this auth (retries included)
        self.refreshes = 0
        self.rate_wait_s = 0.0  # time its requests waited for the budget

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        msg = "VaultAuth is for httpx.AsyncClient: the vault is called through a thread"
        raise RuntimeError(msg)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        token = self.vault.cached(self.user_id) or await self._from_vault(None)
        request.headers["Authorization"] = f"Bearer {token}"
        self.requests += 1
        self.rate_wait_s += await self.budget.acquire()
        response = yield request
        if response.status_code != 401:
            return
        await response.aread()
        if api_error(response) not in (contract.API_INVALID_TOKEN, None):
            return  # e.g. 401 insufficient_scope: a refresh would not help
        log.info("user %s: access token rejected (401); refreshing it once", self.user_id)
        self.refreshes += 1
        token = await self._from_vault(token)
        request.headers["Authorization"] = f"Bearer {token}"
        self.requests += 1
        self.rate_wait_s += await self.budget.acquire()
        yield request

    async def _from_vault(self, rejected: str | None) -> str:
        """A token the vault has to look up, which nearly always means a refresh: a request
        to Loop's token endpoint, under the same per-client limit, so it takes a slot of
        the budget first (a nightly run finds every access token expired; unbudgeted, its
        refreshes came on top of the pages). A slot is wasted only when another process
        refreshed meanwhile, or when the batch's tokens were not read ahead (`warm`)."""
        self.rate_wait_s += await self.budget.acquire()
        lookup = functools.partial(self.vault.access_token, self.user_id, rejected=rejected)
        return await asyncio.get_running_loop().run_in_executor(self.threads, lookup)


@dataclass
class _Run:
    """One fetch_results call: its auth, deadline and counters."""

    user_id: str
    http: httpx.AsyncClient
    auth: VaultAuth
    deadline: float
    retries: int = 0
    throttled: int = 0
    http_s: float = 0.0  # awaiting Loop's answers, rate-budget waits excluded
    decode_s: float = 0.0
    seen: dict[tuple[str, str], Any] = field(default_factory=dict)
    bodies: hashlib._Hash = field(default_factory=hashlib.sha256)  # this pull's pages
    last_digest: str | None = None  # of the user's last committed complete pull
    unchanged: bool = False


class LoopClient:
    """One `httpx.AsyncClient` for Loop's clinical API, shared by the users of one run.

    Use it as `async with LoopClient(settings, vault, budget) as client`. At most
    `concurrency` users (default `settings.concurrency`) are fetched at once; a user's
    time budget starts when their turn does. `budget` is the process-wide `RateBudget`
    of our client_id.
    """

    def __init__(
        self,
        settings: Settings,
        vault: TokenVault,
        budget: RateBudget,
        *,
        concurrency: int | None = None,
        policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.vault = vault
        self.budget = budget
        self.policy = policy
        # One client with one keep-alive connection per concurrent user: httpcore scans
        # its whole pool on every request, which with dozens of connections cost more CPU
        # than the rest of a pull; a pool of one makes that scan free. One TLS context
        # (`Services.tls`) serves them all: each costs ~20 ms to build.
        tls = tls or httpx.create_ssl_context()
        self._clients = [
            httpx.AsyncClient(
                base_url=settings.api_base_url,
                verify=tls,
                timeout=HTTP_TIMEOUT,
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                headers={"Accept": "application/json"},
            )
            for _ in range(concurrency or settings.concurrency)
        ]
        self._vault_threads = ThreadPoolExecutor(
            min(len(self._clients), REFRESHES_AT_ONCE), "loop-sync-vault"
        )
        self._idle: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
        self._open = contextlib.AsyncExitStack()
        self._page_urls: dict[int, httpx.URL] = {}

    async def __aenter__(self) -> LoopClient:
        # Not waited for: a refresh still running (its fetch was cancelled) stores the
        # rotated token on its own, and the interpreter joins the thread before it exits.
        self._open.callback(self._vault_threads.shutdown, wait=False)
        for http in self._clients:
            self._idle.put_nowait(await self._open.enter_async_context(http))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._open.__aexit__(exc_type, exc, traceback)

    async def fetch_results(self, user_id: str, last_digest: str | None = None) -> FetchResult:
        """Every record of the user; raises UserSyncFailed, ReauthRequired or ConfigError.

        `last_digest` is the `digest` of the user's last committed complete pull. A first
        page whose body has that digest is that whole pull again (a one-page pull; a page
        cannot equal several): it is not parsed, and the result is `unchanged`. Parsing is
        most of a re-sync's own work once the request is made.
        """
        http = await self._idle.get()  # the user's turn, and the connection for it
        try:
            allowed = self.settings.user_time_budget_s
            auth = VaultAuth(self.vault, user_id, self.budget, self._vault_threads)
            run = _Run(user_id, http, auth, time.monotonic() + allowed, last_digest=last_digest)
            try:
                async with asyncio.timeout(allowed):
                    return await self._pull(run)
            except TimeoutError:
                reason = (
                    f"its time budget of {allowed:g} s (LOOP_SYNC_USER_TIME_BUDGET_S) ran "
                    f"out after {run.auth.requests} requests"
                )
                raise UserSyncFailed(user_id, reason) from None
        finally:
            self._idle.put_nowait(http)

    async def _pull(self, run: _Run) -> FetchResult:
        pulls = 1 + self.policy.repulls
        for pull in range(1, pulls + 1):
            run.seen = {}  # `_read_page` starts the digest anew at offset 0
            if await self._pull_once(run, last=pull == pulls):
                return self._result(run, complete=True)
            log.info("user %s: total changed during pull %d of %d", run.user_id, pull, pulls)
        log.warning("user %s: total never held still for a whole pull: incomplete", run.user_id)
        return self._result(run, complete=False)

    def _result(self, run: _Run, *, complete: bool) -> FetchResult:
        result = FetchResult(
            run.user_id,
            list(run.seen.values()),
            complete,
            run.bodies.hexdigest() if complete else None,
            run.auth.requests,
            run.retries,
            run.throttled,
            {
                "rate_wait": run.auth.rate_wait_s,
                "http": run.http_s,
                "json_decode": run.decode_s,
            },
            unchanged=run.unchanged,
        )
        log.info(
            "user %s: %d records in %d requests (%d retries, %d throttled), complete=%s",
            run.user_id,
            len(result.records),
            result.requests,
            result.retries,
            result.throttled,
            complete,
        )
        return result

    async def _pull_once(self, run: _Run, *, last: bool) -> bool:
        """One pull from offset 0; True if `total` held and every page up to it came.

        A moved total stops the pull at once unless it is the last one, which goes on to
        the end so the caller still gets every record it can upsert.
        """
        offset, first_total, held = 0, None, True
        while True:
            page = await self._get_page(run, offset)
            if page.unchanged:
                run.unchanged = True
                return True
            first_total = page.total if first_total is None else first_total
            held = held and page.total == first_total
            if not held and not last:
                return False
            for record in page.records:
                run.seen[_dedupe_key(record)] = record  # a repeat keeps its first position
            offset += len(page.records)
            if not page.records or offset >= page.total:
                return held and offset >= first_total

    def _page_url(self, http: httpx.AsyncClient, offset: int) -> httpx.URL:
        """The URL of the page at `offset`, built once per offset: most users have one page,
        and httpx parses a URL given as text or with params again on every request."""
        url = self._page_urls.get(offset)
        if url is None:
            params = {"limit": self.settings.page_size, "offset": offset}
            url = http.build_request("GET", contract.BIOMARKERS_PATH, params=params).url
            self._page_urls[offset] = url
        return url

    async def _get_page(self, run: _Run, offset: int) -> _Page:
        """One page, retried per `retry_wait` within the user's time budget."""
        url = self._page_url(run.http, offset)
        attempt = malformed = 0
        while True:
            attempt += 1
            outcome: httpx.Response | Exception
            waited, sent = run.auth.rate_wait_s, time.perf_counter()
            try:
                response = await run.http.get(url, auth=run.auth)
            except (httpx.TransportError, TransientError, RefreshOutcomeUnknown) as exc:
                outcome = exc
            except httpx.DecodingError:
                outcome = MalformedPage("a body that could not be decoded")
            except ProviderError as exc:  # the vault's refresh got a final OAuth error
                reason = f"refreshing its access token failed ({_describe(exc)})"
                raise UserSyncFailed(run.user_id, reason) from None
            else:
                answered = time.perf_counter()
                run.http_s += answered - sent - (run.auth.rate_wait_s - waited)
                if response.status_code != 200:
                    outcome = response
                else:
                    try:
                        return _read_page(run, response, offset)
                    except MalformedPage as exc:
                        outcome = exc
                    finally:
                        run.decode_s += time.perf_counter() - answered
            wait = retry_wait(
                outcome,
                attempt,
                retry_after_cap_s=self.settings.retry_after_cap_s,
                policy=self.policy,
            )
            if wait is None:
                raise await self._final_error(run, outcome)
            if isinstance(outcome, MalformedPage):
                malformed += 1
                if malformed > self.policy.malformed_retries:
                    reason = f"Loop answered 200 with {outcome.what} {malformed} times in a row"
                    raise UserSyncFailed(run.user_id, reason)
            if time.monotonic() + wait > run.deadline:
                reason = (
                    f"the retry after {_describe(outcome)} at offset {offset} (attempt "
                    f"{attempt}) would pass its time budget of "
                    f"{self.settings.user_time_budget_s:g} s (LOOP_SYNC_USER_TIME_BUDGET_S)"
                )
                raise UserSyncFailed(run.user_id, reason)
            log.info(
                "user %s: %s at offset %d, attempt %d; retrying in %.2f s",
                run.user_id,
                _describe(outcome),
                offset,
                attempt,
                wait,
            )
            run.retries += 1
            if isinstance(outcome, httpx.Response) and outcome.status_code == 429:
                run.throttled += 1
                self.budget.pause_for(wait)  # everyone waits; our acquire() included
            else:
                await asyncio.sleep(wait)

    async def _final_error(
        self, run: _Run, outcome: httpx.Response | Exception
    ) -> ReauthRequired | UserSyncFailed:
        """The error for an answer that must not be retried; marks reauth when due."""
        if not isinstance(outcome, httpx.Response):
            return UserSyncFailed(run.user_id, _describe(outcome))
        status, error = outcome.status_code, api_error(outcome)
        if error == contract.API_INSUFFICIENT_SCOPE and status in (
            contract.INSUFFICIENT_SCOPE_STATUSES
        ):
            reason = f"Loop answered {status} insufficient_scope: the grant lacks "
            reason += contract.BIOMARKERS_SCOPE
            await asyncio.to_thread(self.vault.mark_reauth_required, run.user_id, reason)
            return ReauthRequired(run.user_id, reason)
        if status == 401:
            reason = "Loop rejected the access token even after one refresh (HTTP 401"
        elif status == 403:
            reason = "Loop forbids reading this user's results; retrying will not help (HTTP 403"
        elif status == 404:
            reason = f"Loop has no {contract.BIOMARKERS_PATH} for this user (HTTP 404"
        else:
            reason = f"Loop refused the request (HTTP {status}"
        return UserSyncFailed(run.user_id, f"{reason} {error or 'without an error code'})")


def _read_page(run: _Run, response: httpx.Response, offset: int) -> _Page:
    """A 200's page, added to the pull's digest; not parsed when the first page is the
    user's last committed pull byte for byte (see `LoopClient.fetch_results`)."""
    body = response.content
    if offset:
        page = parse_page(response)
        run.bodies.update(body)
        return page
    first = hashlib.sha256(body)  # a pull's hash so far is its first page's: hashed once
    unchanged = run.last_digest is not None and run.last_digest == first.hexdigest()
    page = _Page([], 0, unchanged=True) if unchanged else parse_page(response)
    run.bodies = first
    return page


def _dedupe_key(record: Any) -> tuple[str, str]:
    """A record's `id`, or its JSON when it has no string id (kept for the rejects)."""
    if isinstance(record, dict) and isinstance(record.get("id"), str):
        return ("id", record["id"])
    return ("json", json.dumps(record, sort_keys=True))


def _describe(outcome: httpx.Response | BaseException) -> str:
    """A log- and message-safe name for an outcome: status or type and error code only."""
    if isinstance(outcome, httpx.Response):
        return f"HTTP {outcome.status_code}"
    if isinstance(outcome, MalformedPage):
        return f"a malformed 200 ({outcome.what})"
    code = getattr(outcome, "error", None)
    return f"{type(outcome).__name__} ({code})" if code else type(outcome).__name__
