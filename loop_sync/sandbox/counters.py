"""What the sandbox saw, for tests and benchmarks to assert on."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Counters:
    requests: Counter[str] = field(default_factory=Counter)  # per endpoint
    token_requests: Counter[str] = field(default_factory=Counter)  # per user
    refreshes: Counter[str] = field(default_factory=Counter)  # successful, per user
    replays_detected: Counter[str] = field(default_factory=Counter)  # per user
    grants_revoked: Counter[str] = field(default_factory=Counter)  # per user
    responses_lost: Counter[str] = field(default_factory=Counter)  # per user
    rate_limited: Counter[str] = field(default_factory=Counter)  # per client
    faults: Counter[str] = field(default_factory=Counter)  # per fault kind
    in_flight: Counter[str] = field(default_factory=Counter)  # per path: received, not done
    alerts: list[dict[str, str]] = field(default_factory=list)  # "Loop alerts the user"
    # Each record sent with wrong types: user_id, the id it had, the record as sent, and
    # when (sandbox time), so a test can find every one in the rejects or the results.
    malformed_records: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, name: str, key: str, n: int = 1) -> None:
        with self._lock:
            counter: Counter[str] = getattr(self, name)
            counter[key] += n

    def alert(self, user_id: str, client_id: str, reason: str) -> None:
        with self._lock:
            self.alerts.append({"user_id": user_id, "client_id": client_id, "reason": reason})

    def malformed(self, entry: dict[str, Any]) -> None:
        """Record a record sent with wrong types (see `malformed_records`)."""
        with self._lock:
            self.malformed_records.append(entry)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready copy with a total per counter."""
        with self._lock:
            out: dict[str, Any] = {
                "alerts": list(self.alerts),
                "malformed_records": list(self.malformed_records),
            }
            for name in (
                "requests",
                "token_requests",
                "refreshes",
                "replays_detected",
                "grants_revoked",
                "responses_lost",
                "rate_limited",
                "faults",
                "in_flight",
            ):
                counter: Counter[str] = getattr(self, name)
                out[name] = {"total": counter.total(), **dict(counter)}
            return out
