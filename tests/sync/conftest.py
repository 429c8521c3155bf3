"""Fixtures for the sync tests: more users and results, a fast budget, a second database.

Everything is real: the live sandbox over loopback HTTP, SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loop_sync.config import Settings
from loop_sync.sandbox import Knobs, Sandbox, SandboxConfig
from loop_sync.sandbox.authority import user_ids
from loop_sync.services import Services
from tests.support import fresh_pg_schema, sandbox_settings
from tests.sync.helpers import consent, fast


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    """12 users with 60 results each; seed 6 has corrections and deletions soon after a
    month, and results collected without a time zone. Loop's clock is frozen, so what it
    lists changes only when a test advances it."""
    return SandboxConfig(
        users=12, seed=6, results_per_user=60, knobs=Knobs(auto_approve=True), frozen_clock=True
    )


@pytest.fixture
def settings(sandbox: Sandbox, database_url: str, fernet_key: str) -> Settings:
    """The operator's settings, with a rate budget that does not slow the tests down."""
    return fast(sandbox_settings(sandbox, database_url, fernet_key))


@pytest.fixture
def users(services: Services, sandbox: Sandbox) -> list[str]:
    """Every sandbox user, connected."""
    everyone = user_ids(sandbox.config.users)
    consent(services, *everyone)
    return everyone


@pytest.fixture
def second_database_url(
    database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    """Another empty database of the same dialect: a SQLite file, or a new PostgreSQL schema."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'second.db'}"
        return
    pg_url: str = request.getfixturevalue("pg_url")
    with fresh_pg_schema(pg_url) as url:
        yield url
