"""Wiring: the objects every entry point (CLI, web app, flows) builds from the settings,
and the check that the configuration can work before an entry point writes anything."""

from __future__ import annotations

import dataclasses
import ssl
from dataclasses import dataclass
from pathlib import Path

import httpx
from anyio.from_thread import BlockingPortal
from sqlalchemy import Engine, select
from sqlalchemy.engine import make_url

from loop_sync.config import FIXES, Settings
from loop_sync.crypto import TokenCipher
from loop_sync.db import check_database, make_engine
from loop_sync.errors import ConfigError
from loop_sync.oidc import OidcClient
from loop_sync.onboarding import Onboarding
from loop_sync.ratelimit import RateBudget, budget_for
from loop_sync.schema import GRANT_ACTIVE, grants, require_schema, tokens
from loop_sync.vault import TokenVault

TOKENS_READ_AT_ONCE = 2_000  # rows per fetch while checking that stored tokens decrypt


@dataclass
class Services:
    """`budget` is this process's share of Loop's rate limit for our client_id: one per
    process, so that every sync in it (a flow's batches one after another, or a CLI run)
    draws from it and a 429's pause outlives the batch that met it. `tls` is the one TLS
    context of its HTTPS clients, Loop's API and identity alike: building one reads the
    CA bundle (~35 ms). `portal`, when set (a flow run sets it:
    `flows._common.run_services`), is the one event loop its syncs run on, so syncs at
    once in several threads do not each spin a loop of their own and fight over the GIL."""

    settings: Settings
    engine: Engine
    cipher: TokenCipher
    oidc: OidcClient
    vault: TokenVault
    onboarding: Onboarding
    budget: RateBudget
    tls: ssl.SSLContext
    portal: BlockingPortal | None = None

    @classmethod
    def build(cls, settings: Settings) -> Services:
        engine = make_engine(settings)
        cipher = TokenCipher(settings.fernet_keys)
        tls = httpx.create_ssl_context()
        oidc = OidcClient(settings, tls=tls)
        vault = TokenVault(engine, cipher, oidc)
        onboarding = Onboarding(engine, cipher, oidc, vault)
        budget = budget_for(settings.rate_limit_rps)
        return cls(settings, engine, cipher, oidc, vault, onboarding, budget, tls)

    def check(
        self,
        *,
        schema: bool = True,
        stored_tokens: bool = True,
        loop: bool = True,
        onboarding: bool = False,
    ) -> None:
        """Stop with one ConfigError (or LoopSyncError) line, before anything is written,
        when the configuration cannot work. In order: the database can be opened (a
        SQLite file that does not exist is not created unless `schema` is False, as
        `db upgrade` creates it); `schema`: it has loop-sync's tables; `stored_tokens`
        (with `schema`): every active grant's tokens decrypt with the configured keys (a
        wrong key would otherwise fail users one by one, or encrypt new tokens under a
        key the old ones do not share); `loop`: Loop's OIDC discovery answers at
        LOOP_ISSUER; `onboarding`: Loop accepts LOOP_REDIRECT_URI for LOOP_CLIENT_ID.
        """
        _check_sqlite_file(self.settings, create=not schema)
        check_database(self.engine, self.settings)
        if schema:
            require_schema(self.engine)
        if schema and stored_tokens:  # the tokens table exists only after `db upgrade`
            check_stored_tokens(self.engine, self.cipher)
        if loop or onboarding:
            self.oidc.metadata()
        if onboarding:
            self.oidc.check_redirect_uri()

    def with_settings(self, settings: Settings) -> Services:
        """The same connections under other settings, with a budget for their rate."""
        return dataclasses.replace(
            self, settings=settings, budget=budget_for(settings.rate_limit_rps)
        )

    def close(self) -> None:
        self.oidc.close()
        self.engine.dispose()


def check_stored_tokens(engine: Engine, cipher: TokenCipher) -> None:
    """Raise ConfigError (put the key back) if a token of an active grant cannot be
    decrypted with the configured keys; reads only, so a wrong key changes nothing.

    Every token is tried, not a sample: after a rotation without `loop-sync keys rotate`,
    tokens written since hold the new key and older ones the dropped key.
    """
    query = (
        select(tokens.c.refresh_token, tokens.c.access_token)
        .select_from(tokens.join(grants, grants.c.user_id == tokens.c.user_id))
        .where(grants.c.status == GRANT_ACTIVE)
    )
    with engine.connect() as connection:
        found = connection.execution_options(yield_per=TOKENS_READ_AT_ONCE).execute(query)
        for row in found:
            for ciphertext in row:
                if ciphertext is not None:
                    cipher.decrypt(ciphertext)


def _check_sqlite_file(settings: Settings, *, create: bool) -> None:
    """A SQLite warehouse must exist, unless it is about to be created; either way its
    directory must. (SQLite would create an empty file, or fail with "unable to open".)"""
    url = make_url(settings.database_url.get_secret_value())
    if url.get_backend_name() != "sqlite" or url.query.get("uri"):
        return
    if not url.database or url.database == ":memory:":
        return
    path = Path(url.database).absolute()
    fix = f"fix LOOP_SYNC_DATABASE_URL: {FIXES['LOOP_SYNC_DATABASE_URL']}"
    if "database_url" not in settings.model_fields_set:
        fix = (
            "LOOP_SYNC_DATABASE_URL is not set (its default is sqlite:///loop_sync.db, in "
            f"the current directory): {FIXES['LOOP_SYNC_DATABASE_URL']}"
        )
    if not path.parent.is_dir():
        msg = f"the directory of the SQLite database {path} does not exist; create it, or {fix}"
        raise ConfigError(msg)
    if not create and not path.exists():
        msg = (
            f"the SQLite database {path} does not exist; {fix}; or, for a new warehouse "
            "there, run `loop-sync db upgrade` first"
        )
        raise ConfigError(msg)
