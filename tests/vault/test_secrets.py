"""No secret leaks: not into logs at DEBUG, not into stderr, not into any exception, and
not into the database in plaintext.

"Secret" means everything the sandbox ever issued (access and refresh tokens, codes, the
client secret) plus every PKCE verifier loop-sync generated, read back from
`oauth_sessions` and decrypted before the flow used it.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, inspect, select, text

from loop_sync.config import Settings
from loop_sync.errors import ConfigError, ReauthRequired, RefreshOutcomeUnknown, TransientError
from loop_sync.onboarding import OnboardingError
from loop_sync.sandbox import Sandbox
from loop_sync.schema import oauth_sessions
from loop_sync.services import Services

from .helpers import api_status, set_tokens, stored_refresh_token, token_row

USER = "usr_0002"
OTHER = "usr_0003"
WRONG_SECRET = "wrong-client-secret-that-must-not-leak"
LOGGERS = ("httpx", "httpcore", "uvicorn", "uvicorn.error", "uvicorn.access", "loop_sync")
JWT = re.compile(r"eyJ[\w-]+\.eyJ[\w-]+\.[\w-]*")


@pytest.fixture
def all_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every log record at DEBUG: the root, httpx, httpcore, uvicorn and loop_sync."""
    caplog.set_level(logging.DEBUG)
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    # uvicorn's own loggers do not propagate to the root: listen to them directly.
    isolated = [
        logging.getLogger(name) for name in LOGGERS if not logging.getLogger(name).propagate
    ]
    for logger in isolated:
        logger.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        for logger in isolated:
            logger.removeHandler(caplog.handler)


@contextmanager
def _browser() -> Iterator[None]:
    """The test's own HTTP calls playing the browser, kept out of the captured logs: the
    browser, not loop-sync, sees the code in Loop's redirect."""
    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.split(".")[0] in ("httpx", "httpcore")
    ]
    for logger in loggers:
        logger.disabled = True
    try:
        yield
    finally:
        for logger in loggers:
            logger.disabled = False


class Flow:
    """Runs loop-sync operations, keeping every PKCE verifier and every exception raised."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.verifiers: set[str] = set()
        self.raised: list[BaseException] = []

    def start(self, user_id: str) -> tuple[dict[str, str], str]:
        """Start a consent flow and drive the browser part; the callback query and cookie."""
        url, binding = self.services.onboarding.start(user_id)
        with self.services.engine.connect() as connection:
            for row in connection.execute(select(oauth_sessions.c.code_verifier)):
                self.verifiers.add(self.services.cipher.decrypt(row.code_verifier))
        with _browser():
            location = httpx.URL(httpx.get(url).headers["location"])
        return dict(location.params), binding

    def consent(self, user_id: str) -> dict[str, str]:
        params, binding = self.start(user_id)
        assert self.services.onboarding.finish(params, binding) == user_id
        return params

    def expect(self, error: type[BaseException], call: Callable[[], Any]) -> None:
        with pytest.raises(error) as raised:
            call()
        self.raised.append(raised.value)


def _exception_texts(raised: list[BaseException]) -> list[str]:
    texts = []
    for exc in raised:
        texts += [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    return texts


def _dump(engine: Engine) -> str:
    """Every column of every row of every table, as text."""
    parts = []
    with engine.connect() as connection:
        for name in inspect(engine).get_table_names():
            for row in connection.execute(text(f"SELECT * FROM {name}")):  # noqa: S608
                parts += [f"{name}:{value}" for value in row]
    return "\n".join(parts)


def test_no_secret_reaches_logs_stderr_exceptions_or_the_database_in_plaintext(
    services: Services,
    sandbox: Sandbox,
    settings: Settings,
    all_logs: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Onboarding, refreshes, a 5xx, a lost answer, a replay, a replayed code, a bad secret."""
    flow = Flow(services)
    vault = services.vault
    callback = flow.consent(USER)
    flow.consent(OTHER)
    token = vault.access_token(USER)
    for _ in range(3):  # several refreshes
        token = vault.access_token(USER, rejected=token)
    assert api_status(sandbox, token) == 200

    # A replayed authorization code, and a callback with a forged state.
    flow.expect(OnboardingError, lambda: services.onboarding.finish(callback, "binding"))
    params, binding = flow.start(USER)
    flow.expect(
        OnboardingError, lambda: services.onboarding.finish({**params, "state": "x"}, binding)
    )
    # Loop fails with a 5xx.
    sandbox.set_knobs(error_rates={"token": 1.0})
    flow.expect(TransientError, lambda: vault.access_token(USER, rejected=token))
    sandbox.set_knobs(error_rates={})
    # A wrong client secret.
    wrong = Services.build(settings.model_copy(update={"client_secret": SecretStr(WRONG_SECRET)}))
    try:
        flow.expect(ConfigError, lambda: wrong.vault.access_token(USER, rejected=token))
    finally:
        wrong.close()
    # The answer of a refresh is lost; the next attempt learns it by introspection.
    sandbox.set_knobs(lose_refresh_users={USER})
    flow.expect(RefreshOutcomeUnknown, lambda: vault.access_token(USER, rejected=token))
    flow.expect(ReauthRequired, lambda: vault.access_token(USER, rejected=token))
    # A stale refresh token restored into the database.
    other_token = vault.access_token(OTHER)
    stale = token_row(services.engine, OTHER).refresh_token  # type: ignore[union-attr]
    other_token = vault.access_token(OTHER, rejected=other_token)
    set_tokens(services.engine, OTHER, refresh_token=stale)
    flow.expect(ReauthRequired, lambda: vault.access_token(OTHER, rejected=other_token))
    assert sandbox.counters.replays_detected == {OTHER: 1}

    out, err = capfd.readouterr()
    seen = "\n".join(
        [
            all_logs.text,
            *(record.getMessage() for record in all_logs.records),
            out,
            err,
            *_exception_texts(flow.raised),
            repr(settings),
            str(settings),
        ]
    )
    secrets = [*sandbox.authority.issued_secrets, *flow.verifiers, WRONG_SECRET]
    assert len(flow.verifiers) == 3  # one per consent flow started
    assert sandbox.config.client.client_secret in secrets
    assert "HTTP Request: POST" in all_logs.text  # httpx really logged at DEBUG/INFO
    assert any(r.name.startswith("httpcore") for r in all_logs.records)
    leaked = [secret[:12] + "…" for secret in secrets if secret in seen]
    assert leaked == []

    stored = _dump(services.engine)
    assert "lph_" not in stored
    assert not JWT.search(stored), "an id_token was stored"
    assert [secret[:12] + "…" for secret in secrets if secret in stored] == []
    assert stored_refresh_token(services, OTHER).startswith("lph_rt_")  # encrypted, not gone
