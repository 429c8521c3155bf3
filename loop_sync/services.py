"""Wiring: the objects every entry point (CLI, web app, flows) builds from the settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sqlalchemy import Engine

from loop_sync.config import Settings
from loop_sync.crypto import TokenCipher
from loop_sync.db import make_engine
from loop_sync.oidc import OidcClient
from loop_sync.onboarding import Onboarding
from loop_sync.ratelimit import RateBudget
from loop_sync.vault import TokenVault


@dataclass
class Services:
    """`budget` is this process's share of Loop's rate limit for our client_id: one per
    process, so that every sync in it (a flow's batches one after another, or a CLI run)
    draws from it and a 429's pause outlives the batch that met it."""

    settings: Settings
    engine: Engine
    cipher: TokenCipher
    oidc: OidcClient
    vault: TokenVault
    onboarding: Onboarding
    budget: RateBudget

    @classmethod
    def build(cls, settings: Settings) -> Services:
        engine = make_engine(settings)
        cipher = TokenCipher(settings.fernet_keys)
        oidc = OidcClient(settings)
        vault = TokenVault(engine, cipher, oidc)
        onboarding = Onboarding(engine, cipher, oidc, vault)
        budget = RateBudget(settings.rate_limit_rps)
        return cls(settings, engine, cipher, oidc, vault, onboarding, budget)

    def with_settings(self, settings: Settings) -> Services:
        """The same connections under other settings, with a budget for their rate."""
        return dataclasses.replace(
            self, settings=settings, budget=RateBudget(settings.rate_limit_rps)
        )

    def close(self) -> None:
        self.oidc.close()
        self.engine.dispose()
