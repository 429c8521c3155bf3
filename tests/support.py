"""Helpers shared by several test packages (fixtures live in conftest.py)."""

from __future__ import annotations

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
