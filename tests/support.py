"""Helpers shared by several test packages (fixtures live in conftest.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

from pydantic import SecretStr
from sqlalchemy import create_engine, text

from loop_sync.config import Settings, load_settings
from loop_sync.sandbox import Sandbox


def sandbox_settings(sandbox: Sandbox, database_url: str, fernet_key: str) -> Settings:
    """loop-sync configured against a sandbox, as an operator would configure it."""
    client = sandbox.config.client
    return load_settings(
        client_id=client.client_id,
        client_secret=client.client_secret,
        redirect_uri=client.redirect_uri,
        issuer=sandbox.issuer,
        api_base_url=sandbox.issuer,
        database_url=database_url,
        encryption_keys=fernet_key,
    )


def settings_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """The same settings as the environment variables an operator would set."""
    env: dict[str, str] = {}
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, tuple):
            value = " ".join(value)
        env[str(field.validation_alias)] = str(value)
    return {**env, **overrides}


@contextmanager
def fresh_pg_schema(pg_url: str) -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a new, empty schema, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{pg_url}?options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
