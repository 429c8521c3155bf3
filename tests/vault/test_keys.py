"""Encryption keys: a `loop-sync keys rotate` round trip, and clear errors for a wrong or
missing key (never a crash, never the key itself in the message)."""

from __future__ import annotations

import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from loop_sync.config import load_settings
from loop_sync.crypto import TokenCipher
from loop_sync.errors import ConfigError
from loop_sync.onboarding import Onboarding
from loop_sync.sandbox import Sandbox
from loop_sync.schema import oauth_sessions, tokens
from loop_sync.services import Services
from loop_sync.vault import TokenVault

from .helpers import api_status, consent

USERS = ("usr_0001", "usr_0002")
KEY_VAR = "LOOP_SYNC_ENCRYPTION_KEYS"


def _ciphertexts(services: Services) -> list[str]:
    with services.engine.connect() as connection:
        pairs = connection.execute(select(tokens.c.refresh_token, tokens.c.access_token)).all()
        verifiers = connection.execute(select(oauth_sessions.c.code_verifier)).scalars().all()
    return [value for pair in pairs for value in pair] + list(verifiers)


def _vault(services: Services, sandbox: Sandbox, cipher: TokenCipher) -> TokenVault:
    return TokenVault(services.engine, cipher, services.oidc, clock=sandbox.clock.now)


def test_rotating_keys_reencrypts_everything_so_the_old_key_can_be_dropped(
    services: Services, sandbox: Sandbox, fernet_key: str
) -> None:
    """A→[B, A] rotate→[B]: every secret decrypts under B alone, and tokens keep working."""
    for user in USERS:
        consent(services, user)
    pending_url, pending_binding = services.onboarding.start("usr_0003")  # mid-consent
    before = _ciphertexts(services)
    key_b = Fernet.generate_key().decode()

    touched = _vault(services, sandbox, TokenCipher([key_b, fernet_key])).rotate_keys()

    assert touched == len(USERS) * 2 + 1  # 2 token rows, 2 used sessions, 1 pending
    after = _ciphertexts(services)
    assert len(after) == len(before)
    assert not set(after) & set(before)
    only_a, only_b = Fernet(fernet_key.encode()), Fernet(key_b.encode())
    for old, new in zip(before, after, strict=True):
        assert only_b.decrypt(new.encode()) == only_a.decrypt(old.encode())

    cipher_b = TokenCipher([key_b])
    vault_b = _vault(services, sandbox, cipher_b)
    for user in USERS:
        cached = vault_b.access_token(user)
        assert api_status(sandbox, cached) == 200
        refreshed = vault_b.access_token(user, rejected=cached)
        assert api_status(sandbox, refreshed) == 200
    assert sandbox.counters.refreshes == dict.fromkeys(USERS, 1)
    # A consent flow started before the rotation still finishes under the new key alone.
    onboarding_b = Onboarding(services.engine, cipher_b, services.oidc, vault_b)
    location = httpx.URL(httpx.get(pending_url).headers["location"])
    assert onboarding_b.finish(dict(location.params), pending_binding) == "usr_0003"


def test_rotating_keys_twice_changes_nothing_a_reader_can_tell(
    services: Services, sandbox: Sandbox, fernet_key: str
) -> None:
    """Rotation is re-runnable: a second run (e.g. after an interruption) is harmless."""
    consent(services, USERS[0])
    key_b = Fernet.generate_key().decode()
    vault = _vault(services, sandbox, TokenCipher([key_b, fernet_key]))

    vault.rotate_keys()
    vault.rotate_keys()

    token = _vault(services, sandbox, TokenCipher([key_b])).access_token(USERS[0])
    assert api_status(sandbox, token) == 200


def test_after_rotation_the_old_key_alone_is_a_config_error_naming_the_variable(
    services: Services, sandbox: Sandbox, fernet_key: str
) -> None:
    """A reader left with only key A gets a ConfigError naming LOOP_SYNC_ENCRYPTION_KEYS."""
    consent(services, USERS[0])
    key_b = Fernet.generate_key().decode()
    _vault(services, sandbox, TokenCipher([key_b, fernet_key])).rotate_keys()
    requests_before = sandbox.counters.requests["token"]

    with pytest.raises(ConfigError, match=KEY_VAR) as raised:
        _vault(services, sandbox, TokenCipher([fernet_key])).access_token(USERS[0])

    assert fernet_key not in str(raised.value)
    assert key_b not in str(raised.value)
    assert sandbox.counters.requests["token"] == requests_before  # Loop was not called


def test_a_wrong_key_makes_the_vault_fail_with_a_config_error_and_no_loop_call(
    services: Services, sandbox: Sandbox
) -> None:
    """A key that never encrypted anything: ConfigError naming the variable, no refresh."""
    consent(services, USERS[0])
    stranger = TokenCipher([Fernet.generate_key().decode()])

    with pytest.raises(ConfigError, match=KEY_VAR):
        _vault(services, sandbox, stranger).access_token(USERS[0])
    with pytest.raises(ConfigError, match=KEY_VAR):
        _vault(services, sandbox, stranger).rotate_keys()

    assert sandbox.counters.refreshes[USERS[0]] == 0
    assert api_status(sandbox, services.vault.access_token(USERS[0])) == 200  # data intact


def _settings_without_key(sandbox: Sandbox, **extra: str) -> None:
    client = sandbox.config.client
    load_settings(
        client_id=client.client_id,
        client_secret=client.client_secret,
        redirect_uri=client.redirect_uri,
        issuer=sandbox.issuer,
        **extra,
    )


def test_missing_encryption_keys_setting_is_a_config_error_naming_it(sandbox: Sandbox) -> None:
    """No LOOP_SYNC_ENCRYPTION_KEYS at all: one ConfigError line that names it and the fix."""
    with pytest.raises(ConfigError, match=f"{KEY_VAR} is not set") as raised:
        _settings_without_key(sandbox)

    assert "loop-sync keys generate" in str(raised.value)
    with pytest.raises(ConfigError, match=KEY_VAR):
        TokenCipher([])


def test_a_malformed_encryption_key_is_a_config_error_that_does_not_echo_it(
    sandbox: Sandbox, fernet_key: str
) -> None:
    """A key that is not a Fernet key is named by position, never printed."""
    bad = "this-is-not-a-fernet-key-but-a-secret"

    with pytest.raises(ConfigError, match=f"{KEY_VAR} is invalid: key 2") as raised:
        _settings_without_key(sandbox, encryption_keys=f"{fernet_key},{bad}")

    assert bad not in str(raised.value)
    assert fernet_key not in str(raised.value)
