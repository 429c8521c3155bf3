"""Shared fixtures: a clean environment, a live sandbox, and the PostgreSQL server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from loop_sync.config import Settings
from loop_sync.sandbox import Knobs, Sandbox, SandboxConfig, SandboxHost
from loop_sync.schema import upgrade
from loop_sync.services import Services
from tests.support import fresh_pg_schema, sandbox_settings

PG_URL = os.environ.get(
    "LOOP_SYNC_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No test sees the developer's LOOP_* variables or .env."""
    for name in list(os.environ):
        if name.startswith("LOOP_") and name != "LOOP_SYNC_TEST_PG_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def fernet_key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    """Loop's clock is frozen: what it lists changes only when a test advances the clock."""
    return SandboxConfig(
        users=5, seed=7, results_per_user=30, knobs=Knobs(auto_approve=True), frozen_clock=True
    )


@pytest.fixture(scope="session")
def sandbox_host() -> Iterator[SandboxHost]:
    """One loopback server for the session; each test mounts a fresh sandbox on it."""
    with SandboxHost() as host:
        yield host


@pytest.fixture
def sandbox(sandbox_config: SandboxConfig, sandbox_host: SandboxHost) -> Iterator[Sandbox]:
    """A live sandbox, fresh for this test: own clock, counters, knobs and grants."""
    yield sandbox_host.mount(sandbox_config)
    sandbox_host.sandbox = None


@pytest.fixture
def http(sandbox: Sandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.issuer, timeout=10) as client:
        yield client


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The PostgreSQL test server: required under CI=true, skipped (with why) elsewhere."""
    try:
        with create_engine(PG_URL).connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = f"PostgreSQL not reachable at {PG_URL}: {str(exc.orig).splitlines()[0]}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true requires it; run scripts/ensure-postgres)")
        pytest.skip(reason)
    return PG_URL


@pytest.fixture
def pg_schema_url(pg_url: str) -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    with fresh_pg_schema(pg_url) as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each storage test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'loop_sync.db'}"
    url: str = request.getfixturevalue("pg_schema_url")
    return url


@pytest.fixture
def settings(sandbox: Sandbox, database_url: str, fernet_key: str) -> Settings:
    """loop-sync configured against the live sandbox, as an operator would configure it."""
    return sandbox_settings(sandbox, database_url, fernet_key)


@pytest.fixture
def services(settings: Settings) -> Iterator[Services]:
    """The real objects an entry point builds, on a freshly upgraded database."""
    built = Services.build(settings)
    upgrade(built.engine)
    try:
        yield built
    finally:
        built.close()
