"""A loop-sync process asking the vault for one user's access token, for the concurrency tests.

Usage: python -m tests.vault.worker USER_ID BARRIER_DIR NAME

Settings come from the environment as in production (LOOP_CLIENT_ID, LOOP_ISSUER,
LOOP_SYNC_DATABASE_URL, LOOP_SYNC_ENCRYPTION_KEYS, ...). The worker warms up (discovery,
a database connection), writes BARRIER_DIR/ready-NAME, waits for BARRIER_DIR/go, asks for
the token, and prints one JSON line: {"token": ...} or {"error": type, "message": str}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from sqlalchemy import text

from loop_sync.config import load_settings
from loop_sync.errors import LoopSyncError
from loop_sync.services import Services

BARRIER_TIMEOUT_S = 30


def main(user_id: str, barrier: Path, name: str) -> int:
    services = Services.build(load_settings())
    try:
        services.oidc.metadata()
        with services.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        (barrier / f"ready-{name}").touch()
        go = barrier / "go"
        deadline = time.monotonic() + BARRIER_TIMEOUT_S
        while not go.exists():
            if time.monotonic() > deadline:
                print(json.dumps({"error": "barrier", "message": "no go signal"}))
                return 2
            time.sleep(0.001)
        started = time.monotonic()
        try:
            token = services.vault.access_token(user_id)
        except LoopSyncError as exc:
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
            return 1
        print(json.dumps({"token": token, "seconds": time.monotonic() - started}))
        return 0
    finally:
        services.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3]))
