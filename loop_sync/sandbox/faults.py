"""Injected faults: latency, the per-client rate limit, 5xx, malformed bodies, lost responses.

Every decision is drawn from one seeded RNG so that a failing chaos run can be replayed.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from email.utils import format_datetime
from typing import Any

from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import Receive, Scope, Send

from loop_sync import contract
from loop_sync.sandbox.clock import Clock
from loop_sync.sandbox.counters import Counters
from loop_sync.sandbox.knobs import Endpoint, Knobs

MAINTENANCE_PAGE = (
    "<!doctype html><html><head><title>Loop</title></head>"
    "<body><h1>We'll be right back</h1><p>Loop is under maintenance.</p></body></html>"
)


def error_response(status: int, error: str, text: str, *, oauth: bool) -> JSONResponse:
    """OAuth endpoints answer `{error, error_description}`, the API `{error, message}`."""
    key = "error_description" if oauth else "message"
    return JSONResponse({"error": error, key: text}, status_code=status)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class Faults:
    def __init__(
        self, knobs: Callable[[], Knobs], counters: Counters, clock: Clock, seed: int
    ) -> None:
        self._knobs = knobs
        self._counters = counters
        self._clock = clock
        self._rng = random.Random(f"faults:{seed}")
        self._buckets: dict[str, _Bucket] = {}

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self._rng.random() < rate

    async def delay(self, endpoint: Endpoint) -> None:
        """Latency before the endpoint acts: a client that goes away meanwhile changed nothing."""
        knobs = self._knobs()
        wait = knobs.latency_ms + knobs.endpoint_latency_ms.get(endpoint, 0.0)
        if self._roll(knobs.latency_spike_rate):
            self._counters.count("faults", "latency_spike")
            wait += knobs.latency_spike_ms
        if wait:
            await asyncio.sleep(wait / 1000)

    def throttle(self, client_id: str, *, oauth: bool) -> Response | None:
        """A 429 when the client is over its budget (or a storm is on), else None."""
        knobs = self._knobs()
        if self._roll(knobs.storm_rate):
            self._counters.count("faults", "retry_after_storm")
            return self._too_many(client_id, knobs, knobs.storm_retry_after_s, oauth=oauth)
        if knobs.rate_limit_rps is None:
            return None
        rate = knobs.rate_limit_rps
        burst = knobs.rate_limit_burst or max(1, math.ceil(rate))
        now = time.monotonic()
        bucket = self._buckets.setdefault(client_id, _Bucket(float(burst), now))
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        wait = max(1, math.ceil((1 - bucket.tokens) / rate))
        return self._too_many(client_id, knobs, wait, oauth=oauth)

    def rate_headers(self, client_id: str) -> dict[str, str]:
        knobs = self._knobs()
        bucket = self._buckets.get(client_id)
        if knobs.rate_limit_rps is None or bucket is None:
            return {}
        burst = knobs.rate_limit_burst or max(1, math.ceil(knobs.rate_limit_rps))
        reset = math.ceil((burst - bucket.tokens) / knobs.rate_limit_rps)
        limit, remaining, reset_name = contract.RATE_LIMIT_HEADERS
        return {
            limit: str(burst),
            remaining: str(max(0, math.floor(bucket.tokens))),
            reset_name: str(reset),
        }

    def _too_many(self, client_id: str, knobs: Knobs, wait: int, *, oauth: bool) -> Response:
        self._counters.count("rate_limited", client_id)
        response = error_response(
            429, contract.API_RATE_LIMITED, "too many requests for this client", oauth=oauth
        )
        if knobs.retry_after_format == "seconds":
            response.headers["Retry-After"] = str(wait)
        elif knobs.retry_after_format == "http-date":
            at = self._clock.now().replace(microsecond=0) + timedelta(seconds=wait)
            response.headers["Retry-After"] = format_datetime(at, usegmt=True)
        response.headers.update(self.rate_headers(client_id))
        return response

    def server_error(self, endpoint: Endpoint, *, oauth: bool) -> Response | None:
        if not self._roll(self._knobs().error_rates.get(endpoint, 0.0)):
            return None
        if self._rng.random() < 0.5:
            self._counters.count("faults", f"{endpoint}:500")
            return error_response(500, "server_error", "internal error", oauth=oauth)
        self._counters.count("faults", f"{endpoint}:503")
        return error_response(503, "temporarily_unavailable", "overloaded", oauth=oauth)

    def malformed(self, page: dict[str, Any], user_id: str) -> Response | None:
        """A 200 whose body is broken: HTML, truncated JSON, or a record of wrong types
        (recorded in `Counters.malformed_records` with `user_id`, whose page it was)."""
        rates = self._knobs().malformed_rates
        if self._roll(rates.get("html", 0.0)):
            self._counters.count("faults", "malformed:html")
            return HTMLResponse(MAINTENANCE_PAGE)
        if self._roll(rates.get("truncated_json", 0.0)):
            self._counters.count("faults", "malformed:truncated_json")
            body = json.dumps(page).encode()
            cut = self._rng.randrange(1, max(2, len(body) - 1))
            return Response(body[:cut], media_type="application/json")
        if page_records(page) and self._roll(rates.get("wrong_types", 0.0)):
            self._counters.count("faults", "malformed:wrong_types")
            return JSONResponse(self._wrong_types(page, user_id))
        return None

    def _wrong_types(self, page: dict[str, Any], user_id: str) -> dict[str, Any]:
        records = [dict(r) for r in page_records(page)]
        victim = records[self._rng.randrange(len(records))]
        original_id = victim.get("id")
        mutation = self._rng.choice(("no_id", "id_number", "value_object", "collected_number"))
        if mutation == "no_id":
            del victim["id"]
        elif mutation == "id_number":
            victim["id"] = self._rng.randrange(10**6)
        elif mutation == "value_object":
            victim["value"] = {"amount": victim.get("value")}
        else:
            victim["collected_at"] = self._rng.randrange(10**9)
        at = self._clock.now().isoformat()
        self._counters.malformed(
            {
                "user_id": user_id,
                "id": original_id,
                "mutation": mutation,
                "record": victim,
                "at": at,
            }
        )
        key = next(k for k in contract.PAGE_ARRAY_KEYS if k in page)
        return {**page, key: records}

    async def hold_refresh_answer(self) -> None:
        """Latency after a refresh rotated: a client that dies meanwhile has lost the new
        refresh token (the case docs/tokens.md calls "rotation outcome lost")."""
        wait = self._knobs().refresh_answer_delay_ms
        if wait:
            await asyncio.sleep(wait / 1000)

    def lose_refresh(self, user_id: str) -> bool:
        """Whether to drop the response of a refresh the server has already rotated."""
        knobs = self._knobs()
        if user_id in knobs.lose_refresh_users:
            knobs.lose_refresh_users.discard(user_id)  # once per listing
        elif not self._roll(knobs.lose_refresh_rate):
            return False
        self._counters.count("responses_lost", user_id)
        self._counters.count("faults", "refresh_response_lost")
        return True


def page_records(page: dict[str, Any]) -> list[dict[str, Any]]:
    for key in contract.PAGE_ARRAY_KEYS:
        if key in page:
            records: list[dict[str, Any]] = page[key]
            return records
    return []


class DroppedResponse(Response):
    """Starts a response, then drops the connection: the client never learns the outcome."""

    def __init__(self) -> None:
        super().__init__(status_code=200, media_type="application/json")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"512")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"access_to', "more_body": True})
        raise ConnectionAbortedError("sandbox: response lost on purpose")
