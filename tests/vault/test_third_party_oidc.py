"""loop-sync against an OIDC provider we did not write: the `oidc-provider-mock` package.

It is a Flask app built on authlib's authorization server: discovery without
`token_endpoint_auth_methods_supported` (so RFC 8414's default, client_secret_basic,
applies to the refresh grant), RS256 id_tokens, PKCE, a consent form that takes a `sub`,
refreshes that return no new refresh token, and no revocation endpoint. If onboarding and
refresh work against it, loop-sync speaks standard OIDC, not just our sandbox's dialect.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet

from loop_sync.config import load_settings
from loop_sync.errors import ReauthRequired
from loop_sync.onboarding import OnboardingError
from loop_sync.schema import GRANT_ACTIVE, GRANT_REVOKED, upgrade
from loop_sync.services import Services

from .helpers import events, grant_row, token_row

with warnings.catch_warnings():
    # authlib (under the provider) warns at import about its own deprecations; its
    # deprecate module turns those warnings on when imported, so it comes first.
    from authlib.deprecate import AuthlibDeprecationWarning

    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from oidc_provider_mock import run_server_in_thread  # type: ignore[import-untyped]

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SUB = "alice@example.org"


@pytest.fixture(scope="module")
def provider() -> Iterator[str]:
    """The provider's issuer URL; it requires a nonce, as a careful provider may."""
    with run_server_in_thread(require_nonce=True) as server:
        yield f"http://localhost:{server.server_port}"


@pytest.fixture
def third_party(provider: str, tmp_path: Path) -> Iterator[Services]:
    """loop-sync configured with the provider as LOOP_ISSUER, as an operator would."""
    settings = load_settings(
        client_id="loop-sync-third-party",
        client_secret="third-party-client-secret",
        redirect_uri="http://localhost:8000/callback",
        issuer=provider + "/",  # a trailing slash, as issuers are often written
        api_base_url=provider,
        database_url=f"sqlite:///{tmp_path / 'loop_sync.db'}",
        encryption_keys=Fernet.generate_key().decode(),
    )
    services = Services.build(settings)
    upgrade(services.engine)
    try:
        yield services
    finally:
        services.close()


def _authorize(url: str, form: dict[str, str]) -> dict[str, str]:
    """Play the browser: open the provider's form, submit it, return the callback query."""
    page = httpx.get(url)
    assert page.status_code == 200
    assert 'name="sub"' in page.text
    answer = httpx.post(url, data=form)
    assert answer.status_code == 302
    return dict(httpx.URL(answer.headers["location"]).params)


def _userinfo(provider: str, token: str) -> int:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.get(f"{provider}/userinfo", headers=headers).status_code


def test_onboarding_against_a_third_party_provider_stores_an_active_grant_for_the_chosen_sub(
    third_party: Services, provider: str
) -> None:
    """Discovery, PKCE authorize, code exchange and RS256 id_token verification all work."""
    url, binding = third_party.onboarding.start()

    user_id = third_party.onboarding.finish(_authorize(url, {"sub": SUB}), binding)

    assert user_id == SUB
    grant = grant_row(third_party.engine, SUB)
    assert grant.status == GRANT_ACTIVE
    assert set(grant.scopes.split()) == {"openid", "profile"}  # what it granted, not asked
    assert [e.reason for e in events(third_party.engine, SUB)] == ["consented"]
    token = third_party.vault.access_token(SUB)
    assert _userinfo(provider, token) == 200


def test_refresh_against_a_third_party_provider_keeps_the_refresh_token_it_did_not_rotate(
    third_party: Services, provider: str
) -> None:
    """`access_token(rejected=...)` refreshes (client_secret_basic); the old refresh stays."""
    url, binding = third_party.onboarding.start()
    third_party.onboarding.finish(_authorize(url, {"sub": SUB}), binding)
    first = third_party.vault.access_token(SUB)
    refresh = token_row(third_party.engine, SUB).refresh_token  # type: ignore[union-attr]

    second = third_party.vault.access_token(SUB, rejected=first)
    third = third_party.vault.access_token(SUB, rejected=second)

    assert len({first, second, third}) == 3
    assert _userinfo(provider, third) == 200
    assert _userinfo(provider, first) != 200  # the provider dropped the replaced token
    row = token_row(third_party.engine, SUB)
    assert row is not None
    assert row.generation == 3
    assert row.refresh_token == refresh
    assert grant_row(third_party.engine, SUB).status == GRANT_ACTIVE


def test_a_deny_callback_without_state_is_refused_as_an_unknown_flow_and_stores_nothing(
    third_party: Services,
) -> None:
    """This provider drops `state` from its access_denied redirect; loop-sync cannot tie the
    callback to a flow (CSRF rule), so it shows the start-again page and stores nothing."""
    url, binding = third_party.onboarding.start()
    callback = _authorize(url, {"action": "deny"})
    assert callback.get("error") == "access_denied"
    assert "state" not in callback

    with pytest.raises(OnboardingError, match="no longer valid"):
        third_party.onboarding.finish(callback, binding)

    with pytest.raises(ReauthRequired, match="no consent on record"):
        third_party.vault.access_token(SUB)


def test_disconnect_from_a_provider_without_a_revocation_endpoint_still_revokes_locally(
    third_party: Services,
) -> None:
    """No RFC 7009 endpoint in discovery: the grant is still marked revoked, tokens deleted."""
    url, binding = third_party.onboarding.start()
    third_party.onboarding.finish(_authorize(url, {"sub": SUB}), binding)

    third_party.vault.disconnect(SUB)

    assert grant_row(third_party.engine, SUB).status == GRANT_REVOKED
    assert token_row(third_party.engine, SUB) is None
