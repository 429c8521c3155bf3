"""Fixtures for the vault tests: the real services, with the vault on the sandbox's clock."""

from __future__ import annotations

import pytest

from loop_sync.onboarding import Onboarding
from loop_sync.sandbox import Sandbox
from loop_sync.services import Services
from loop_sync.vault import TokenVault


@pytest.fixture
def services(services: Services, sandbox: Sandbox) -> Services:
    """The project's `services`, with the vault and onboarding reading the sandbox's clock,
    so `sandbox.clock.advance(...)` expires tokens for Loop and loop-sync alike."""
    services.vault = TokenVault(
        services.engine, services.cipher, services.oidc, clock=sandbox.clock.now
    )
    services.onboarding = Onboarding(
        services.engine, services.cipher, services.oidc, services.vault, clock=sandbox.clock.now
    )
    return services
