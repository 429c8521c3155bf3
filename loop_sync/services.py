"""Wiring: the objects every entry point (CLI, web app, flows) builds from the settings."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine

from loop_sync.config import Settings
from loop_sync.crypto import TokenCipher
from loop_sync.db import make_engine
from loop_sync.oidc import OidcClient
from loop_sync.onboarding import Onboarding
from loop_sync.vault import TokenVault


@dataclass
class Services:
    settings: Settings
    engine: Engine
    cipher: TokenCipher
    oidc: OidcClient
    vault: TokenVault
    onboarding: Onboarding

    @classmethod
    def build(cls, settings: Settings) -> Services:
        engine = make_engine(settings)
        cipher = TokenCipher(settings.fernet_keys)
        oidc = OidcClient(settings)
        vault = TokenVault(engine, cipher, oidc)
        return cls(settings, engine, cipher, oidc, vault, Onboarding(engine, cipher, oidc, vault))

    def close(self) -> None:
        self.oidc.close()
        self.engine.dispose()
