"""The sandbox's clock: real time plus an offset that tests advance, or a frozen instant.

Tokens, codes and results all read this one clock, so advancing it a day expires access
tokens and reveals the day's new results and corrections together, as on Loop. Frozen, it
moves only when advanced: results parsed or corrected "now" cannot appear between two
reads that a test compares.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta


class Clock:
    def __init__(self, *, frozen: bool = False) -> None:
        self._offset = timedelta()
        self._frozen_at = datetime.now(UTC) if frozen else None
        self._lock = threading.Lock()

    def now(self) -> datetime:
        return (self._frozen_at or datetime.now(UTC)) + self._offset

    def advance(self, seconds: float) -> datetime:
        if seconds < 0:
            msg = "the sandbox clock only moves forward"
            raise ValueError(msg)
        with self._lock:
            self._offset += timedelta(seconds=seconds)
        return self.now()
