"""The sandbox against code we did not write: authlib's OAuth2Client and joserfc.

If a standard OAuth 2.0 / OIDC client can run the flow (discovery, PKCE S256 authorize,
client_secret_post code exchange, refresh with rotation, revocation) and joserfc can verify
the id_token against the JWKS served over HTTP, the sandbox speaks the protocol, not just
our own reading of it.
"""

from __future__ import annotations

import secrets
import warnings
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.errors import InvalidClaimError
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry

from loop_sync.sandbox import Sandbox

from .helpers import IGNORE_EDDSA_WARNING

with warnings.catch_warnings():
    # authlib warns at import that it falls back from httpx2 to httpx, which is our client.
    # Its deprecate module turns that warning on when imported, so it comes first.
    from authlib.deprecate import AuthlibDeprecationWarning

    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.integrations.base_client import OAuthError
    from authlib.integrations.httpx_client import OAuth2Client

pytestmark = IGNORE_EDDSA_WARNING

SCOPE = "openid profile read:biomarkers"


@pytest.fixture
def discovery(http: httpx.Client) -> dict[str, Any]:
    doc: dict[str, Any] = http.get("/.well-known/openid-configuration").json()
    return doc


@pytest.fixture
def oauth(sandbox: Sandbox) -> Any:
    """authlib's httpx OAuth2Client configured as Loop's quickstart says."""
    client = sandbox.config.client
    with OAuth2Client(
        client_id=client.client_id,
        client_secret=client.client_secret,
        token_endpoint_auth_method="client_secret_post",
        revocation_endpoint_auth_method="client_secret_post",
        scope=SCOPE,
        redirect_uri=client.redirect_uri,
        code_challenge_method="S256",
    ) as session:
        yield session


def _authorize_with_authlib(
    oauth: Any, discovery: dict[str, Any], user: str
) -> tuple[dict[str, Any], str]:
    """authlib builds the authorize URL and exchanges the code; returns (token, nonce)."""
    verifier = secrets.token_urlsafe(48)
    nonce = secrets.token_urlsafe(16)
    url, state = oauth.create_authorization_url(
        discovery["authorization_endpoint"], code_verifier=verifier, nonce=nonce, login_hint=user
    )
    callback = httpx.get(url, follow_redirects=False)
    assert callback.status_code == 302, callback.text
    token: dict[str, Any] = oauth.fetch_token(
        discovery["token_endpoint"],
        authorization_response=callback.headers["location"],
        state=state,
        code_verifier=verifier,
    )
    return token, nonce


def _verified_claims(
    id_token: str, discovery: dict[str, Any], client_id: str, nonce: str
) -> dict[str, Any]:
    """joserfc verifies the id_token: signature via the JWKS fetched over HTTP, then iss,
    aud, exp, sub and nonce."""
    keys = KeySet.import_key_set(httpx.get(discovery["jwks_uri"]).json())
    token = jwt.decode(id_token, keys, algorithms=["EdDSA"])
    registry = JWTClaimsRegistry(
        iss={"essential": True, "value": discovery["issuer"]},
        aud={"essential": True, "value": client_id},
        nonce={"essential": True, "value": nonce},
        sub={"essential": True},
        exp={"essential": True},
        iat={"essential": True},
    )
    registry.validate(token.claims)
    return dict(token.claims)


def test_authlib_runs_the_pkce_code_flow_and_joserfc_verifies_the_id_token(
    sandbox: Sandbox, http: httpx.Client, oauth: Any, discovery: dict[str, Any]
) -> None:
    """Standard clients: authlib (S256, client_secret_post) gets a Loop token response whose
    id_token joserfc verifies against the served JWKS, and whose access token reads the API."""
    token, nonce = _authorize_with_authlib(oauth, discovery, "usr_0002")

    assert token["token_type"] == "Bearer"
    assert token["access_token"].startswith("lph_at_")
    assert token["refresh_token"].startswith("lph_rt_")
    claims = _verified_claims(token["id_token"], discovery, sandbox.config.client.client_id, nonce)
    assert claims["sub"] == "usr_0002"
    response = oauth.get(f"{sandbox.issuer}/v1/biomarkers/me", params={"limit": 500})
    assert response.status_code == 200
    assert response.json()["data"] == sandbox.truth("usr_0002")


def test_joserfc_rejects_an_id_token_for_another_nonce(
    sandbox: Sandbox, oauth: Any, discovery: dict[str, Any]
) -> None:
    """Standard clients: the id_token is bound to the request's nonce (joserfc refuses a
    different one), so the verification above is not vacuous."""
    token, _ = _authorize_with_authlib(oauth, discovery, "usr_0001")

    with pytest.raises(InvalidClaimError, match="nonce"):
        _verified_claims(token["id_token"], discovery, sandbox.config.client.client_id, "other")


def test_authlib_refresh_rotates_the_refresh_token(
    sandbox: Sandbox, oauth: Any, discovery: dict[str, Any]
) -> None:
    """Standard clients: authlib's refresh_token() gets a new pair, and the old refresh token,
    presented again by authlib, is refused as invalid_grant (a replay that ends the grant)."""
    token, _ = _authorize_with_authlib(oauth, discovery, "usr_0003")

    fresh = oauth.refresh_token(discovery["token_endpoint"])

    assert fresh["refresh_token"] != token["refresh_token"]
    assert fresh["access_token"] != token["access_token"]
    assert sandbox.counters.refreshes["usr_0003"] == 1
    with pytest.raises(OAuthError) as replay:
        oauth.refresh_token(discovery["token_endpoint"], refresh_token=token["refresh_token"])
    assert replay.value.error == "invalid_grant"
    assert sandbox.counters.replays_detected["usr_0003"] == 1


def test_authlib_refreshes_a_short_lived_token_on_its_own(
    sandbox: Sandbox, oauth: Any, discovery: dict[str, Any]
) -> None:
    """Standard clients: with access_token_ttl_s=5 authlib sees the token as expiring,
    refreshes it before the API call through the token endpoint, and hands over the
    rotated pair."""
    sandbox.set_knobs(access_token_ttl_s=5)
    _authorize_with_authlib(oauth, discovery, "usr_0004")
    oauth.metadata["token_endpoint"] = discovery["token_endpoint"]
    updates: list[dict[str, Any]] = []
    oauth.update_token = lambda token, refresh_token=None, access_token=None: updates.append(
        {"token": token, "old_refresh_token": refresh_token}
    )
    old_refresh = oauth.token["refresh_token"]

    response = oauth.get(f"{sandbox.issuer}/v1/biomarkers/me")

    assert response.status_code == 200
    assert sandbox.counters.refreshes["usr_0004"] == 1
    assert len(updates) == 1
    assert updates[0]["old_refresh_token"] == old_refresh
    assert updates[0]["token"]["refresh_token"] != old_refresh


def test_authlib_revocation_ends_the_grant(
    sandbox: Sandbox, oauth: Any, discovery: dict[str, Any]
) -> None:
    """Standard clients: authlib's revoke_token (client_secret_post) is 200 and the grant is
    gone: a refresh by authlib is invalid_grant."""
    token, _ = _authorize_with_authlib(oauth, discovery, "usr_0005")

    revoked = oauth.revoke_token(
        discovery["revocation_endpoint"],
        token=token["refresh_token"],
        token_type_hint="refresh_token",
    )

    assert revoked.status_code == 200
    with pytest.raises(OAuthError) as refused:
        oauth.refresh_token(discovery["token_endpoint"])
    assert refused.value.error == "invalid_grant"
    assert sandbox.counters.grants_revoked["usr_0005"] == 1
