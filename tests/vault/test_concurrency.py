"""One refresher per user: processes and threads racing for an expired token refresh once.

Loop revokes the whole grant when a rotated refresh token is presented again, so two
workers refreshing the same user at once would lose that user. The sandbox answers the
token endpoint slowly (latency knob) so that the racers really overlap.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from loop_sync.config import Settings
from loop_sync.sandbox import Sandbox
from loop_sync.schema import upgrade
from loop_sync.services import Services
from loop_sync.vault import TokenVault
from tests.support import sandbox_settings, settings_env

from .helpers import api_status, consent, set_tokens, stored_access_token, token_row

REPO = Path(__file__).resolve().parents[2]
USER = "usr_0004"
LATENCY_MS = 200
READY_TIMEOUT_S = 30


def _worker_env(settings: Settings) -> dict[str, str]:
    """The environment an operator would give a loop-sync worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOP_")}
    return {**env, **settings_env(settings), "PYTHONPATH": str(REPO)}


def _expired_user(services: Services, sandbox: Sandbox) -> str:
    """A consented user whose stored access token expired a minute ago; Loop is slow."""
    consent(services, USER)
    set_tokens(services.engine, USER, access_expires_at=sandbox.clock.now() - timedelta(minutes=1))
    sandbox.set_knobs(latency_ms=LATENCY_MS)
    return USER


def _race_processes(settings: Settings, user_id: str, count: int, workdir: Path) -> list[Any]:
    """`count` worker processes ask for the token at the same moment; their JSON answers."""
    barrier = workdir / "barrier"
    barrier.mkdir()
    env = _worker_env(settings)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.vault.worker", user_id, str(barrier), str(n)],
            env=env,
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(count)
    ]
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all((barrier / f"ready-{n}").exists() for n in range(count)):
            dead = [p for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                errors = [p.communicate()[1] for p in dead]
                pytest.fail(f"workers did not get ready: {errors}")
            time.sleep(0.01)
        (barrier / "go").touch()
        outputs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    answers = []
    for (out, err), proc in zip(outputs, procs, strict=True):
        assert proc.returncode == 0, err or out
        answers.append(json.loads(out.strip().splitlines()[-1]))
    return answers


def _assert_one_refresh(
    services: Services, sandbox: Sandbox, user_id: str, tokens: list[str], count: int
) -> None:
    assert len(tokens) == count
    assert len(set(tokens)) == 1, "every racer must get the same token"
    assert sandbox.counters.refreshes[user_id] == 1
    assert sandbox.counters.token_requests[user_id] == 2  # the code exchange + one refresh
    assert sandbox.counters.replays_detected[user_id] == 0
    assert sandbox.counters.grants_revoked[user_id] == 0
    assert stored_access_token(services, user_id) == tokens[0]
    assert api_status(sandbox, tokens[0]) == 200
    row = token_row(services.engine, user_id)
    assert row is not None
    assert row.generation == 2
    assert row.refresh_started_at is None
    assert row.lease_owner is None


@pytest.mark.postgres
def test_eight_processes_on_postgresql_refresh_an_expired_token_exactly_once(
    sandbox: Sandbox, pg_schema_url: str, fernet_key: str, tmp_path: Path
) -> None:
    """8 OS processes ask at once: one refresh reaches Loop, all 8 get the same token."""
    settings = sandbox_settings(sandbox, pg_schema_url, fernet_key)
    services = Services.build(settings)
    try:
        upgrade(services.engine)
        user_id = _expired_user(services, sandbox)

        answers = _race_processes(settings, user_id, 8, tmp_path)

        _assert_one_refresh(services, sandbox, user_id, [a["token"] for a in answers], 8)
        # They overlapped: most racers waited out the slow refresh instead of finding it done.
        waits = sorted(a["seconds"] for a in answers)
        assert waits[len(waits) // 2] >= LATENCY_MS / 1000 / 2, waits
    finally:
        services.close()


def test_two_processes_on_sqlite_refresh_an_expired_token_exactly_once(
    sandbox: Sandbox, fernet_key: str, tmp_path: Path
) -> None:
    """2 OS processes sharing a SQLite file ask at once: one refresh, the same token."""
    settings = sandbox_settings(sandbox, f"sqlite:///{tmp_path / 'loop_sync.db'}", fernet_key)
    services = Services.build(settings)
    try:
        upgrade(services.engine)
        user_id = _expired_user(services, sandbox)

        answers = _race_processes(settings, user_id, 2, tmp_path)

        _assert_one_refresh(services, sandbox, user_id, [a["token"] for a in answers], 2)
    finally:
        services.close()


@pytest.mark.parametrize("shared", [True, False], ids=["one-vault", "vault-per-thread"])
def test_eight_threads_refresh_an_expired_token_exactly_once(
    services: Services, sandbox: Sandbox, shared: bool
) -> None:
    """8 threads of one process (a web app, a flow's thread pool) ask at once: one refresh."""
    user_id = _expired_user(services, sandbox)
    vaults = [
        services.vault
        if shared
        else TokenVault(services.engine, services.cipher, services.oidc, clock=sandbox.clock.now)
        for _ in range(8)
    ]
    start = threading.Barrier(len(vaults))
    tokens: list[str] = []
    errors: list[BaseException] = []

    def ask(vault: TokenVault) -> None:
        start.wait()
        try:
            tokens.append(vault.access_token(user_id))
        except Exception as exc:  # reported below, with the assertion
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(vault,)) for vault in vaults]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    _assert_one_refresh(services, sandbox, user_id, tokens, len(vaults))


def test_a_63_character_hostname_still_fits_the_lease_owner_column(
    services: Services, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long host name (Kubernetes pods allow 63 characters) does not break the lease."""
    consent(services, USER)
    monkeypatch.setattr(socket, "gethostname", lambda: "worker-" + "x" * 56)
    vault = TokenVault(services.engine, services.cipher, services.oidc, clock=sandbox.clock.now)

    token = vault.access_token(USER, rejected=vault.access_token(USER))

    assert api_status(sandbox, token) == 200
    assert sandbox.counters.refreshes[USER] == 1
    row = token_row(services.engine, USER)
    assert row is not None
    assert row.lease_owner is None
