"""Bad configurations, met the way an operator meets them.

Each case runs the installed `loop-sync` command (and the nightly sync flow) in a
subprocess, with the operator's environment but for one bad setting, against a live
sandbox and a real warehouse that already holds connected users and their results (a
SQLite file, and PostgreSQL in a fresh schema). Each must end with:

- exactly one line on stderr, naming the setting and what to do, without a traceback and
  without echoing a secret (client secret, encryption key, database password, token);
- a non-zero exit code (for the flow: a Failed final state);
- nothing written: every table's rows are the same before and after, and Loop saw no
  request that changes state (token requests, refreshes, replays, revocations).

Settings that fail to parse are rejected before any database is opened, so those cases
run on SQLite only; every case that reaches the warehouse runs on both dialects.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr
from sqlalchemy import Connection, Engine, Row, inspect, literal_column, select, table

from loop_sync.config import FIXES, Settings
from loop_sync.crypto import WRONG_KEY
from loop_sync.sandbox import Sandbox
from loop_sync.schema import grants
from loop_sync.services import Services
from loop_sync.sync import run_sync
from tests.orchestration import conftest as orchestration
from tests.support import settings_env
from tests.sync.helpers import consent, rows, with_settings

# The session's Prefect test server, shared with tests/orchestration (~10 s to start once).
prefect_home = orchestration.prefect_home
prefect_api = orchestration.prefect_api

LOOP_SYNC = str(Path(sys.executable).with_name("loop-sync"))  # the entry point operators run
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
USERS = ("usr_0001", "usr_0002")
LATE_USER = "usr_0003"  # connects while a key rotation is under way
DB_PASSWORD = "pw-never-shown-4821"
WEB_START_TIMEOUT_S = 20  # a web app still running by then is serving: the case failed
# The nightly flow as a script would run it: its final state decides the exit code.
FLOW_SCRIPT = (
    "import asyncio, sys\n"
    "from flows.sync_biomarkers import sync_biomarkers\n"
    "state = asyncio.run(sync_biomarkers(return_state=True))\n"
    "sys.exit(0 if state.is_completed() else 1)\n"
)
COMMANDS = {
    "sync": ["sync", "--all"],
    "rotate": ["rotate"],
    "web": ["web", "--port", "0"],
    "db upgrade": ["db", "upgrade"],
}
PREFECT_ERROR_LINE = re.compile(r"\|\s*(ERROR|CRITICAL)\s*\|")


@dataclass
class Warehouse:
    """A working installation: connected users, their results synced, and the operator's
    environment for it (every setting as a variable)."""

    services: Services
    sandbox: Sandbox
    env: dict[str, str]
    cwd: Path
    secrets: list[str]

    @property
    def engine(self) -> Engine:
        return self.services.engine


@dataclass(frozen=True)
class Ran:
    """A finished command: `returncode` is None if it was still running at the deadline."""

    command: str
    returncode: int | None
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"`{self.command}` exited {self.returncode}\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )


@pytest.fixture
def warehouse(services: Services, sandbox: Sandbox, tmp_path: Path) -> Warehouse:
    """Two users connected and synced; the operator's shell, in an empty directory."""
    consent(services, *USERS)
    assert run_sync(with_settings(services), list(USERS)).status == "ok"
    cwd = tmp_path / "operator"
    cwd.mkdir()
    shell = {k: v for k, v in os.environ.items() if not k.startswith(("LOOP_", "PREFECT_"))}
    env = {**shell, **settings_env(services.settings, LOOP_SYNC_RATE_LIMIT_RPS="1000")}
    secrets = [
        services.settings.client_secret.get_secret_value(),
        *services.settings.fernet_keys,
        *sandbox.authority.issued_secrets,
    ]
    return Warehouse(services, sandbox, env, cwd, secrets)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound for the test, never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture
def flow_env(prefect_api: str, tmp_path: Path) -> dict[str, str]:
    """What a flow-run process needs besides loop-sync's settings: the Prefect API."""
    return {
        "PREFECT_API_URL": prefect_api,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


# --- running and judging ---------------------------------------------------------------


def run(command: str, env: dict[str, str], cwd: Path) -> Ran:
    """Run a `loop-sync` command (or "flow": the nightly flow) as an operator would."""
    argv = [sys.executable, "-c", FLOW_SCRIPT] if command == "flow" else [LOOP_SYNC]
    argv += COMMANDS.get(command, [])
    timeout = WEB_START_TIMEOUT_S if command == "web" else 90
    try:
        done = subprocess.run(
            argv,
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:  # it kept running: a web app serving
        return Ran(command, None, _text(exc.stdout), _text(exc.stderr))
    return Ran(command, done.returncode, done.stdout, done.stderr)


def _text(output: bytes | str | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def the_error(ran: Ran, secrets: list[str]) -> str:
    """The one error line `ran` printed, after checking it failed cleanly and leaked nothing."""
    assert ran.returncode not in (0, None), str(ran)
    printed = ran.stdout + ran.stderr
    assert "Traceback" not in printed, str(ran)
    for secret in secrets:
        assert secret not in printed, f"a secret was printed by {ran.command}:\n{ran}"
    if ran.command == "flow":  # Prefect logs every record to stderr; one is the error
        errors = [line for line in ran.stderr.splitlines() if PREFECT_ERROR_LINE.search(line)]
        # and, for an async flow, the final state quoting it: "Finished in state Failed(...)"
        error, final = errors
        assert "Finished in state Failed" in final, str(ran)
        return error
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, str(ran)
    assert lines[0].startswith("loop-sync: error: "), str(ran)
    return lines[0]


def outcome(warehouse: Warehouse) -> dict[str, Any]:
    """Every table's rows, and what Loop counted that changes state or alerts a user."""
    with warehouse.engine.connect() as connection:
        names = sorted(inspect(connection).get_table_names())
        tables = {name: _rows_of(connection, name) for name in names}
    counters = warehouse.sandbox.counters.snapshot()
    loop = {
        name: counters[name]
        for name in ("token_requests", "refreshes", "replays_detected", "grants_revoked")
    }
    loop["state-changing requests"] = {
        endpoint: counters["requests"].get(endpoint, 0) for endpoint in ("token", "revoke")
    }
    loop["alerts"] = counters["alerts"]
    return {"tables": tables, "loop": loop}


def refused(
    warehouse: Warehouse,
    commands: list[str],
    env: dict[str, str],
    *,
    secrets: tuple[str, ...] = (),
) -> dict[str, str]:
    """Run the commands with `env`; each must fail in one clean line, and together they
    must change nothing. Returns each command's error line.

    They run at once (none may write, so their order cannot matter): the CLI's start-up
    is most of each run's time, and the machine has more than one core.
    """
    secrets += tuple(_secrets_in(env))
    before = outcome(warehouse)
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        runs = list(pool.map(lambda command: run(command, env, warehouse.cwd), commands))
    lines = {ran.command: the_error(ran, [*warehouse.secrets, *secrets]) for ran in runs}
    changed = "\n".join(str(ran) for ran in runs)
    assert outcome(warehouse) == before, f"{' or '.join(commands)} changed something:\n{changed}"
    assert not list(warehouse.cwd.iterdir()), "a command left files in the working directory"
    return lines


def _rows_of(connection: Connection, name: str) -> list[str]:
    """A table's rows, each as its repr, in a stable order."""
    found: Sequence[Row[Any]] = connection.execute(
        select(literal_column("*")).select_from(table(name))
    ).all()
    return sorted(repr(tuple(row)) for row in found)


def _secrets_in(env: dict[str, str]) -> Iterator[str]:
    """The secret values an environment holds: the client secret and each key."""
    if env.get("LOOP_CLIENT_SECRET"):
        yield env["LOOP_CLIENT_SECRET"]
    yield from (k for k in env.get("LOOP_SYNC_ENCRYPTION_KEYS", "").split(",") if k.strip())


def statuses(engine: Engine) -> dict[str, str]:
    return {row["user_id"]: row["status"] for row in rows(engine, select(grants))}


# --- 1. a required setting is missing --------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("name", "commands"),
    [
        ("LOOP_CLIENT_ID", ["sync"]),
        ("LOOP_CLIENT_SECRET", ["sync", "rotate", "web", "db upgrade"]),
        ("LOOP_REDIRECT_URI", ["sync", "web"]),
        ("LOOP_SYNC_ENCRYPTION_KEYS", ["sync", "rotate"]),
    ],
)
def test_a_missing_setting_is_one_line_naming_it(
    warehouse: Warehouse, name: str, commands: list[str]
) -> None:
    """Forgetting a required variable stops each command with its name and what to set."""
    env = {k: v for k, v in warehouse.env.items() if k != name}

    for line in refused(warehouse, commands, env).values():
        assert f"{name} is not set; {FIXES[name]}" in line


@SQLITE_ONLY
def test_an_unset_database_url_does_not_create_an_empty_warehouse(warehouse: Warehouse) -> None:
    """Without LOOP_SYNC_DATABASE_URL, commands name it instead of creating ./loop_sync.db."""
    env = {k: v for k, v in warehouse.env.items() if k != "LOOP_SYNC_DATABASE_URL"}

    lines = refused(warehouse, ["sync", "rotate", "web"], env)

    for line in lines.values():
        assert "LOOP_SYNC_DATABASE_URL" in line
        assert "loop-sync db upgrade" in line
    assert not (warehouse.cwd / "loop_sync.db").exists()


# --- 2. a setting is malformed ---------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("LOOP_REDIRECT_URI", "callback", "must be an absolute http(s) URL"),
        ("LOOP_SYNC_CONCURRENCY", "lots", "valid integer"),
        ("LOOP_SYNC_CONCURRENCY", "-4", "greater than or equal to 1"),
        ("LOOP_SYNC_RATE_LIMIT_RPS", "-1", "greater than 0"),
        ("LOOP_SYNC_RATE_LIMIT_RPS", "inf", "finite number"),
        ("LOOP_SYNC_DATABASE_URL", "not a url", "not a SQLAlchemy database URL"),
        # Unencoded @ and : in a password: the rest of it would parse as a port or a host.
        (
            "LOOP_SYNC_DATABASE_URL",
            f"postgresql+psycopg://loop:s3@x:{DB_PASSWORD}@127.0.0.1:1/test",
            "percent-encode",
        ),
        (
            "LOOP_SYNC_DATABASE_URL",
            f"postgresql+psycopg://loop:x@{DB_PASSWORD}@127.0.0.1:1/test",
            "percent-encode",
        ),
        ("LOOP_SYNC_DATABASE_URL", "postgresql+psycopg2://loop@127.0.0.1:1/test", "psycopg://"),
        ("LOOP_SYNC_DATABASE_URL", "mysql://loop@127.0.0.1:1/warehouse", "SQLite or PostgreSQL"),
        ("LOOP_SYNC_ENCRYPTION_KEYS", "not-a-fernet-key", "key 1 is not a valid Fernet key"),
    ],
    ids=lambda value: str(value)[:24],
)
def test_a_malformed_setting_is_one_line_naming_it(
    warehouse: Warehouse, name: str, value: str, expected: str
) -> None:
    """A value loop-sync cannot use is named with the reason and the fix, never echoed."""
    env = {**warehouse.env, name: value}
    commands = ["sync", "db upgrade"] if name == "LOOP_SYNC_DATABASE_URL" else ["sync"]

    for line in refused(warehouse, commands, env, secrets=(DB_PASSWORD,)).values():
        assert line.startswith(f"loop-sync: error: {name} is invalid: ")
        assert expected in line
        assert FIXES[name] in line
        if name != "LOOP_REDIRECT_URI":  # a URL is no secret; every other value is not shown
            assert value not in line


# --- 3. the encryption key is not the one the tokens were stored with ------------------


@pytest.mark.parametrize("mistake", ["another key", "the old key dropped mid-rotation"])
def test_a_wrong_encryption_key_stops_before_any_token_or_user_is_touched(
    warehouse: Warehouse, settings: Settings, mistake: str
) -> None:
    """With a key that cannot read the stored tokens, nobody is marked reauth_required:
    every command stops and says to put the key back."""
    new_key = Fernet.generate_key().decode()
    if mistake == "the old key dropped mid-rotation":
        # The new key went first, a user connected (encrypted under it), and the old key
        # was removed without `loop-sync keys rotate`.
        both = SecretStr(f"{new_key},{settings.fernet_keys[0]}")
        rotating = Services.build(settings.model_copy(update={"encryption_keys": both}))
        try:
            consent(rotating, LATE_USER)
        finally:
            rotating.close()
    env = {**warehouse.env, "LOOP_SYNC_ENCRYPTION_KEYS": new_key}

    lines = refused(warehouse, ["sync", "rotate", "web"], env, secrets=(new_key,))

    for line in lines.values():
        assert WRONG_KEY in line
    assert set(statuses(warehouse.engine).values()) == {"active"}


# --- 4. the database cannot be reached -------------------------------------------------


@pytest.mark.parametrize(
    ("database_url", "where"),
    [
        pytest.param("postgresql", "PostgreSQL on a closed port", marks=pytest.mark.postgres),
        ("sqlite", "SQLite in a missing directory"),
    ],
    indirect=["database_url"],
)
def test_an_unreachable_database_is_one_line_naming_it(
    warehouse: Warehouse, closed_port: int, tmp_path: Path, where: str
) -> None:
    """A database that cannot be opened is named (password hidden) with the variable to fix,
    and the warehouse the operator meant is left as it was."""
    if where.startswith("PostgreSQL"):
        url = f"postgresql+psycopg://postgres:{DB_PASSWORD}@127.0.0.1:{closed_port}/test"
    else:
        url = f"sqlite:///{tmp_path / 'missing' / 'dir' / 'loop_sync.db'}"
    env = {**warehouse.env, "LOOP_SYNC_DATABASE_URL": url}

    lines = refused(warehouse, ["sync", "db upgrade", "web"], env, secrets=(DB_PASSWORD,))

    expected = "cannot reach the database" if where.startswith("PostgreSQL") else "does not exist"
    for line in lines.values():
        assert expected in line
        assert "LOOP_SYNC_DATABASE_URL" in line
    assert not (tmp_path / "missing").exists()


# --- 5. Loop cannot be reached ---------------------------------------------------------


def test_an_unreachable_loop_is_one_line_naming_the_issuer(
    warehouse: Warehouse, closed_port: int
) -> None:
    """An issuer nobody answers on stops the run before any user is attempted."""
    env = {**warehouse.env, "LOOP_ISSUER": f"http://127.0.0.1:{closed_port}"}

    lines = refused(warehouse, ["sync", "rotate", "web"], env)

    for line in lines.values():
        assert f"cannot reach Loop at http://127.0.0.1:{closed_port}" in line
        assert "LOOP_ISSUER" in line


# --- 6. the redirect URI is not the one registered with Loop ---------------------------


def test_a_redirect_uri_loop_does_not_know_stops_the_web_app(warehouse: Warehouse) -> None:
    """`loop-sync web` with an unregistered callback URL refuses to start, in one line,
    instead of sending each person to Loop's error page."""
    registered = warehouse.sandbox.config.client.redirect_uri
    elsewhere = registered.replace("/callback", "/elsewhere/callback")
    env = {**warehouse.env, "LOOP_REDIRECT_URI": elsewhere}

    [line] = refused(warehouse, ["web"], env).values()

    assert "LOOP_REDIRECT_URI" in line
    assert elsewhere in line
    assert "register" in line


@SQLITE_ONLY
def test_the_web_app_starts_when_loop_accepts_its_redirect_uri(warehouse: Warehouse) -> None:
    """With the registered callback URL, `loop-sync web` serves, and asking Loop cost nothing."""
    before = outcome(warehouse)
    env = {**warehouse.env, "PYTHONUNBUFFERED": "1"}
    web = subprocess.Popen(
        [LOOP_SYNC, *COMMANDS["web"]],
        env=env,
        cwd=warehouse.cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert web.stdout is not None
        announced = web.stdout.readline()  # the first line, once the port is bound
        found = re.search(r"listening on (\S+);", announced)
        assert found, announced  # otherwise the line is what stopped it
        assert httpx.get(f"{found.group(1)}/healthz", timeout=5).json() == {"status": "ok"}
    finally:
        web.terminate()
        web.communicate(timeout=10)
    assert outcome(warehouse) == before


# --- the nightly flow ------------------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize(
    "mistake",
    ["client secret missing", "wrong encryption key", "database unreachable", "Loop unreachable"],
)
def test_the_nightly_flow_fails_in_one_line_and_records_no_run(
    warehouse: Warehouse, flow_env: dict[str, str], closed_port: int, tmp_path: Path, mistake: str
) -> None:
    """A flow run with a bad configuration ends Failed with one error line and no run row."""
    env = {**warehouse.env, **flow_env}
    expected = {
        "client secret missing": "LOOP_CLIENT_SECRET is not set",
        "wrong encryption key": WRONG_KEY,
        "database unreachable": "LOOP_SYNC_DATABASE_URL",
        "Loop unreachable": "LOOP_ISSUER",
    }[mistake]
    if mistake == "client secret missing":
        del env["LOOP_CLIENT_SECRET"]
    elif mistake == "wrong encryption key":
        env["LOOP_SYNC_ENCRYPTION_KEYS"] = Fernet.generate_key().decode()
    elif mistake == "database unreachable":
        env["LOOP_SYNC_DATABASE_URL"] = f"sqlite:///{tmp_path / 'missing' / 'loop_sync.db'}"
    else:
        env["LOOP_ISSUER"] = f"http://127.0.0.1:{closed_port}"

    [line] = refused(warehouse, ["flow"], env).values()

    assert expected in line
