"""Fixtures for the client tests: consented users, a fetch runner, and a tap on the sandbox.

Everything is real: the live sandbox over loopback HTTP, the real vault on SQLite and
PostgreSQL. The tap only watches the sandbox's biomarker requests (and, for two tests,
advances its clock or revokes a token at a chosen moment); it never answers for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from loop_sync import contract
from loop_sync.client import FetchResult, LoopClient
from loop_sync.ratelimit import RateBudget, RetryPolicy
from loop_sync.sandbox import Sandbox
from loop_sync.services import Services

# Backoff for tests that are not about backoff: same rule, smaller numbers (stamina's
# testing mode, in spirit).
FAST = RetryPolicy(backoff_base_s=0.01, backoff_cap_s=0.1)
TEST_RPS = 500.0  # the client budget unless a test is about it

Outcome = FetchResult | BaseException
Fetch = Callable[..., list[Outcome]]


@pytest.fixture
def consent(services: Services) -> Callable[..., None]:
    """Consent users headlessly, as a browser would (the sandbox auto-approves)."""

    def run(*user_ids: str) -> None:
        for user_id in user_ids:
            url, binding = services.onboarding.start(user_id)
            location = httpx.URL(httpx.get(url).headers["location"])
            assert services.onboarding.finish(dict(location.params), binding) == user_id

    return run


@pytest.fixture
def fetch(services: Services) -> Fetch:
    """Fetch users concurrently with one LoopClient and one RateBudget; exceptions returned.

    Keyword arguments override settings (e.g. page_size=7); `budget`, `policy` and
    `last_digests` (user → `last_digest` for `fetch_results`) too.
    """

    def run(
        *user_ids: str,
        budget: RateBudget | None = None,
        policy: RetryPolicy = FAST,
        last_digests: dict[str, str] | None = None,
        **overrides: Any,
    ) -> list[Outcome]:
        settings = services.settings.model_copy(update={"rate_limit_rps": TEST_RPS, **overrides})
        shared = budget or RateBudget(settings.rate_limit_rps)

        async def main() -> list[Outcome]:
            async with LoopClient(settings, services.vault, shared, policy=policy) as client:
                return await asyncio.gather(
                    *(client.fetch_results(u, (last_digests or {}).get(u)) for u in user_ids),
                    return_exceptions=True,
                )

        return asyncio.run(main())

    return run


def ok(outcome: Outcome) -> FetchResult:
    """The result, or the exception it raised, so a failing test shows why."""
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def ids(records: list[Any]) -> list[Any]:
    return [r.get("id") if isinstance(r, dict) else r for r in records]


@dataclass(frozen=True)
class Call:
    """One biomarker request as the sandbox saw it."""

    started: float  # time.monotonic() when it arrived
    status: int
    offset: int
    user_id: str | None  # behind the bearer token, if it was valid on arrival
    token: str


class Tap:
    """Wraps a live sandbox's ASGI app to record each biomarker request and its status.

    `before` / `after` run on the sandbox's thread around a request; tests use them to
    revoke a token or advance the sandbox clock at an exact point of a pull.
    """

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.inner = sandbox.app
        self.calls: list[Call] = []
        self.before: Callable[[str], None] | None = None
        self.after: Callable[[Call], None] | None = None
        sandbox.app = self  # the host serves sandbox.app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != contract.BIOMARKERS_PATH:
            await self.inner(scope, receive, send)
            return
        started = time.monotonic()
        headers = dict(scope["headers"])
        token = headers.get(b"authorization", b"").decode().removeprefix("Bearer ")
        grant = self.sandbox.authority.bearer(token)
        if self.before is not None:
            self.before(token)
        status = 0

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.inner(scope, receive, capture)
        query = parse_qs(scope["query_string"].decode())
        offset = int(query.get("offset", ["0"])[0])
        call = Call(started, status, offset, grant.user_id if grant else None, token)
        self.calls.append(call)
        if self.after is not None:
            self.after(call)


@pytest.fixture
def tap(sandbox: Sandbox) -> Tap:
    return Tap(sandbox)
