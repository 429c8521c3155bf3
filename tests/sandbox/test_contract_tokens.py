"""Contract tests of Loop's token, revoke and introspect endpoints as the sandbox serves them.

Rules come from /work/shared/loop-platform.md (Part A unless marked B), RFC 6749 (OAuth),
RFC 7636 (PKCE), RFC 7009 (revocation) and RFC 7662 (introspection).
"""

from __future__ import annotations

import base64
import json
import secrets

import httpx
import pytest

from loop_sync.sandbox import Sandbox
from loop_sync.sandbox.authority import Client

from .helpers import (
    IGNORE_EDDSA_WARNING,
    INTROSPECT,
    REVOKE,
    TOKEN,
    Code,
    Tokens,
    api_error,
    auth_request,
    authorize,
    biomarkers,
    client_form,
    exchange,
    get_code,
    id_token_claims,
    introspect,
    jwks,
    login,
    oauth_error,
    redirect_query,
    refresh,
    revoke,
)

pytestmark = IGNORE_EDDSA_WARNING

DAY = 86_400
USER = "usr_0001"


def _api_rejects(http: httpx.Client, access_token: str) -> bool:
    """Whether the API refuses the access token as invalid_token (401)."""
    response = biomarkers(http, access_token)
    return response.status_code == 401 and response.json()["error"] == "invalid_token"


def _other_client(
    sandbox: Sandbox,
    client_id: str = "other-app",
    grant_types: frozenset[str] = frozenset({"authorization_code", "refresh_token"}),
) -> Client:
    """Register a second client with the sandbox (the API lets tests add clients)."""
    client = Client(client_id, "other-secret", ("http://localhost:9100/cb",), grant_types)
    sandbox.authority.register_client(client)
    return client


# --- code exchange: the token response --------------------------------------------------


def test_code_exchange_returns_the_documented_token_response(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Token (B3): the code exchange answers {access_token lph_at_…, token_type Bearer,
    expires_in 3600, refresh_token lph_rt_…, scope, id_token} with Cache-Control: no-store."""
    response = exchange(http, sandbox, get_code(http, sandbox))

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert "no-store" in response.headers["cache-control"]
    body = response.json()
    assert body["access_token"].startswith("lph_at_")
    assert body["refresh_token"].startswith("lph_rt_")
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["scope"].split() == ["openid", "profile", "read:biomarkers"]
    assert body["id_token"].count(".") == 2
    assert body["access_token"] != body["refresh_token"]


def test_id_token_is_signed_by_the_jwks_key_and_carries_the_documented_claims(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Token: the id_token verifies against the JWKS (EdDSA, its kid) and carries sub, iss,
    aud = client_id, the request's nonce, iat, exp = iat + 300, name and brand."""
    code = get_code(http, sandbox, login_hint="usr_0002")
    tokens = Tokens.parse(exchange(http, sandbox, code))
    assert tokens.id_token is not None

    claims = id_token_claims(http, tokens.id_token)

    header = json.loads(base64.urlsafe_b64decode(tokens.id_token.split(".")[0] + "=="))
    assert header["alg"] == "EdDSA"
    assert header["kid"] in {key.kid for key in jwks(http).keys}
    assert claims["sub"] == "usr_0002"
    assert claims["iss"] == sandbox.issuer
    assert claims["aud"] == sandbox.config.client.client_id
    assert claims["nonce"] == code.request.nonce
    assert claims["exp"] - claims["iat"] == 300
    assert abs(claims["iat"] - sandbox.clock.now().timestamp()) < 60
    assert isinstance(claims["name"], str)
    assert claims["name"]
    assert claims["brand"] == "loop"


def test_id_token_has_no_name_without_the_profile_scope(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Token: the name claim comes with profile only."""
    tokens = login(http, sandbox, scope="openid read:biomarkers")
    assert tokens.id_token is not None

    claims = id_token_claims(http, tokens.id_token)

    assert "name" not in claims
    assert claims["sub"] == USER


def test_code_exchange_without_openid_returns_no_id_token(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Token: an id_token is issued only when openid was granted."""
    tokens = login(http, sandbox, scope="read:biomarkers", drop=("nonce",))

    assert tokens.id_token is None
    assert tokens.scope == "read:biomarkers"


# --- code exchange: errors --------------------------------------------------------------


def test_code_is_single_use_and_its_replay_revokes_the_first_exchange(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Token: a code works once; its second use is 400 invalid_grant, and (RFC 6749 4.1.2,
    "SHOULD revoke") the tokens issued from the first exchange stop working."""
    code = get_code(http, sandbox)
    first = Tokens.parse(exchange(http, sandbox, code))
    assert first.refresh_token is not None
    assert not _api_rejects(http, first.access_token)

    second = exchange(http, sandbox, code)

    assert oauth_error(second, 400) == "invalid_grant"
    assert _api_rejects(http, first.access_token)
    assert oauth_error(refresh(http, sandbox, first.refresh_token), 400) == "invalid_grant"
    assert sandbox.counters.grants_revoked[USER] == 1


def test_code_expires_after_60_seconds(sandbox: Sandbox, http: httpx.Client) -> None:
    """Token: an authorization code expires 60 s after it was issued (invalid_grant)."""
    code = get_code(http, sandbox)
    sandbox.clock.advance(61)

    response = exchange(http, sandbox, code)

    assert oauth_error(response, 400) == "invalid_grant"


def test_code_still_works_just_before_60_seconds(sandbox: Sandbox, http: httpx.Client) -> None:
    """Token: a code 55 s old is still exchanged (the 60 s limit is not shorter)."""
    code = get_code(http, sandbox)
    sandbox.clock.advance(55)

    response = exchange(http, sandbox, code)

    assert response.status_code == 200


def test_wrong_code_verifier_is_invalid_grant(sandbox: Sandbox, http: httpx.Client) -> None:
    """Token (PKCE): a well-formed verifier that does not hash to the challenge is
    invalid_grant."""
    code = get_code(http, sandbox)

    response = exchange(http, sandbox, code, code_verifier=secrets.token_urlsafe(32))

    assert oauth_error(response, 400) == "invalid_grant"


@pytest.mark.parametrize(
    "verifier",
    ["a" * 42, "a" * 129, "a" * 42 + "!", "a" * 42 + " "],
    ids=["42-chars", "129-chars", "bad-char", "space"],
)
def test_malformed_code_verifier_is_invalid_request(
    sandbox: Sandbox, http: httpx.Client, verifier: str
) -> None:
    """Token (PKCE): a verifier that is not 43-128 unreserved characters is invalid_request."""
    code = get_code(http, sandbox)

    response = exchange(http, sandbox, code, code_verifier=verifier)

    assert oauth_error(response, 400) == "invalid_request"


def test_redirect_uri_differing_from_the_authorize_request_is_invalid_grant(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Token: the redirect_uri must equal the authorize request's exactly, else invalid_grant."""
    code = get_code(http, sandbox)

    response = exchange(http, sandbox, code, redirect_uri=code.request.redirect_uri + "/")

    assert oauth_error(response, 400) == "invalid_grant"


@pytest.mark.parametrize("missing", ["code", "redirect_uri", "code_verifier"])
def test_code_exchange_missing_a_parameter_is_invalid_request(
    sandbox: Sandbox, http: httpx.Client, missing: str
) -> None:
    """Token: code, redirect_uri and code_verifier are required for the code exchange, and
    the request without one does not consume the code."""
    code = get_code(http, sandbox)

    response = exchange(http, sandbox, code, drop=(missing,))

    assert oauth_error(response, 400) == "invalid_request"
    assert exchange(http, sandbox, code).status_code == 200


def test_unknown_code_is_invalid_grant(sandbox: Sandbox, http: httpx.Client) -> None:
    """Token: a code the server never issued is invalid_grant."""
    code = get_code(http, sandbox)

    response = exchange(http, sandbox, Code("not-a-code", code.request))

    assert oauth_error(response, 400) == "invalid_grant"


def test_code_issued_to_another_client_is_invalid_grant(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Token: a code is bound to the client it was issued to."""
    other = _other_client(sandbox)
    code = get_code(http, sandbox)
    form = {
        "grant_type": "authorization_code",
        "code": code.code,
        "redirect_uri": code.request.redirect_uri,
        "code_verifier": code.request.pkce.verifier,
        "client_id": other.client_id,
        "client_secret": other.client_secret,
    }

    response = http.post(TOKEN, data=form)

    assert oauth_error(response, 400) == "invalid_grant"


@pytest.mark.parametrize(
    ("client_id", "client_secret"),
    [
        ("loop-sync-demo", "wrong-secret"),
        ("loop-sync-demo", ""),
        ("unknown-app", "demo-secret-for-the-local-sandbox-only"),
    ],
    ids=["wrong-secret", "no-secret", "unknown-client"],
)
def test_bad_client_credentials_are_401_invalid_client(
    sandbox: Sandbox, http: httpx.Client, client_id: str, client_secret: str
) -> None:
    """Token: an unknown client or a wrong client_secret is 401 invalid_client, and the code
    is not consumed by the failed call."""
    code = get_code(http, sandbox)

    response = exchange(http, sandbox, code, client_id=client_id, client_secret=client_secret)

    assert oauth_error(response, 401) == "invalid_client"
    assert exchange(http, sandbox, code).status_code == 200


def test_client_secret_in_an_http_basic_header_is_401_invalid_client(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Token: only client_secret_post is supported; credentials sent with HTTP Basic
    (client_secret_basic) are 401 invalid_client."""
    code = get_code(http, sandbox)
    client = sandbox.config.client
    form = {
        "grant_type": "authorization_code",
        "code": code.code,
        "redirect_uri": code.request.redirect_uri,
        "code_verifier": code.request.pkce.verifier,
    }

    response = http.post(TOKEN, data=form, auth=(client.client_id, client.client_secret))

    assert oauth_error(response, 401) == "invalid_client"


def test_json_body_is_invalid_request(sandbox: Sandbox, http: httpx.Client) -> None:
    """Token: the body must be form-encoded; a JSON body is invalid_request."""
    code = get_code(http, sandbox)
    form = client_form(
        sandbox,
        grant_type="authorization_code",
        code=code.code,
        redirect_uri=code.request.redirect_uri,
        code_verifier=code.request.pkce.verifier,
    )

    response = http.post(TOKEN, json=form)

    assert oauth_error(response, 400) == "invalid_request"


def test_repeated_parameter_is_invalid_request(sandbox: Sandbox, http: httpx.Client) -> None:
    """Token: a parameter sent twice is invalid_request (RFC 6749 3.2)."""
    code = get_code(http, sandbox)
    form = client_form(
        sandbox,
        grant_type="authorization_code",
        redirect_uri=code.request.redirect_uri,
        code_verifier=code.request.pkce.verifier,
    )

    response = http.post(TOKEN, data={**form, "code": [code.code, code.code]})

    assert oauth_error(response, 400) == "invalid_request"


@pytest.mark.parametrize(
    "grant_type",
    ["client_credentials", "password", "implicit", "urn:ietf:params:oauth:grant-type:device_code"],
)
def test_other_grant_types_are_unsupported_grant_type(
    sandbox: Sandbox, http: httpx.Client, grant_type: str
) -> None:
    """Token: only authorization_code and refresh_token exist; others are
    unsupported_grant_type."""
    form = client_form(sandbox, grant_type=grant_type, username="u", password="p")

    response = http.post(TOKEN, data=form)

    assert oauth_error(response, 400) == "unsupported_grant_type"


def test_missing_grant_type_is_invalid_request(sandbox: Sandbox, http: httpx.Client) -> None:
    """Token: grant_type is required."""
    response = http.post(TOKEN, data=client_form(sandbox))

    assert oauth_error(response, 400) == "invalid_request"


def test_client_without_the_refresh_grant_gets_unauthorized_client(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Token: a client not allowed refresh_token gets unauthorized_client on refresh."""
    client = _other_client(sandbox, "code-only", grant_types=frozenset({"authorization_code"}))
    request = auth_request(
        sandbox, client_id=client.client_id, redirect_uri=client.redirect_uris[0]
    )
    query = redirect_query(authorize(http, request), request.redirect_uri)
    form = {
        "grant_type": "authorization_code",
        "code": query["code"],
        "redirect_uri": request.redirect_uri,
        "code_verifier": request.pkce.verifier,
        "client_id": client.client_id,
        "client_secret": client.client_secret,
    }
    tokens = Tokens.parse(http.post(TOKEN, data=form))
    assert tokens.refresh_token is None  # nothing to refresh with is issued either
    refresh_form = {
        "grant_type": "refresh_token",
        "refresh_token": "lph_rt_none",
        "client_id": client.client_id,
        "client_secret": client.client_secret,
    }

    response = http.post(TOKEN, data=refresh_form)

    assert oauth_error(response, 400) == "unauthorized_client"
    assert sandbox.counters.refreshes.total() == 0


# --- refresh and rotation ---------------------------------------------------------------


def test_refresh_returns_a_new_token_pair(sandbox: Sandbox, http: httpx.Client) -> None:
    """Rotation: a refresh answers a new lph_at_/lph_rt_ pair (Bearer, no-store) that works,
    and counts one refresh for the user."""
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None

    response = refresh(http, sandbox, tokens.refresh_token)

    fresh = Tokens.parse(response)
    assert "no-store" in response.headers["cache-control"]
    assert fresh.body["token_type"] == "Bearer"
    assert fresh.access_token.startswith("lph_at_")
    assert fresh.access_token != tokens.access_token
    assert fresh.refresh_token is not None
    assert fresh.refresh_token.startswith("lph_rt_")
    assert fresh.refresh_token != tokens.refresh_token
    assert fresh.scope == tokens.scope
    assert biomarkers(http, fresh.access_token).status_code == 200
    assert sandbox.counters.refreshes[USER] == 1


def test_a_rotated_refresh_token_no_longer_refreshes(sandbox: Sandbox, http: httpx.Client) -> None:
    """Rotation: every successful refresh invalidates the refresh token it used."""
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None
    assert refresh(http, sandbox, tokens.refresh_token).status_code == 200

    again = refresh(http, sandbox, tokens.refresh_token)

    assert oauth_error(again, 400) == "invalid_grant"


def test_replayed_refresh_token_revokes_the_whole_grant_and_alerts_the_user(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Rotation: presenting an already-used refresh token is invalid_grant and revokes the
    grant: the newest refresh token and access token die; a replay, a revoked grant and an
    alert are recorded."""
    old = login(http, sandbox, login_hint="usr_0003")
    assert old.refresh_token is not None
    new = Tokens.parse(refresh(http, sandbox, old.refresh_token))
    assert new.refresh_token is not None

    replay = refresh(http, sandbox, old.refresh_token)

    assert oauth_error(replay, 400) == "invalid_grant"
    assert oauth_error(refresh(http, sandbox, new.refresh_token), 400) == "invalid_grant"
    assert _api_rejects(http, new.access_token)
    assert sandbox.counters.replays_detected["usr_0003"] == 1
    assert sandbox.counters.grants_revoked["usr_0003"] == 1
    alerts = sandbox.counters.snapshot()["alerts"]
    assert [(a["user_id"], a["client_id"]) for a in alerts] == [
        ("usr_0003", sandbox.config.client.client_id)
    ]


def test_new_consent_replaces_the_refresh_token_without_counting_a_replay(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Rotation: one active refresh token per (user, client); a new consent makes the previous
    one invalid_grant, and that is not a replay (no revocation, no alert)."""
    first = login(http, sandbox)
    second = login(http, sandbox)
    assert first.refresh_token is not None
    assert second.refresh_token is not None

    stale = refresh(http, sandbox, first.refresh_token)

    assert oauth_error(stale, 400) == "invalid_grant"
    assert refresh(http, sandbox, second.refresh_token).status_code == 200
    counters = sandbox.counters.snapshot()
    assert counters["replays_detected"]["total"] == 0
    assert counters["grants_revoked"]["total"] == 0
    assert counters["alerts"] == []


def test_used_refresh_token_stays_a_replay_after_a_new_consent(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Rotation: a token already used before a re-consent is still treated as a leak."""
    first = login(http, sandbox)
    assert first.refresh_token is not None
    assert refresh(http, sandbox, first.refresh_token).status_code == 200
    login(http, sandbox)

    replay = refresh(http, sandbox, first.refresh_token)

    assert oauth_error(replay, 400) == "invalid_grant"
    assert sandbox.counters.replays_detected["usr_0001"] == 1


def test_consent_of_another_user_leaves_the_first_users_refresh_token_alone(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Rotation: the one-refresh-token rule is per (user, client), not per client."""
    first = login(http, sandbox, login_hint="usr_0001")
    login(http, sandbox, login_hint="usr_0002")
    assert first.refresh_token is not None

    response = refresh(http, sandbox, first.refresh_token)

    assert response.status_code == 200


def test_refresh_token_idle_expires_after_90_days(sandbox: Sandbox, http: httpx.Client) -> None:
    """Rotation: a refresh token unused for 90 days is invalid_grant."""
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None
    sandbox.clock.advance(90 * DAY + 1)

    response = refresh(http, sandbox, tokens.refresh_token)

    assert oauth_error(response, 400) == "invalid_grant"
    assert sandbox.counters.replays_detected.total() == 0


def test_each_refresh_extends_the_refresh_token_life_by_90_days(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Rotation: validity is 90 days from last use, so refreshing every 80 days keeps the
    grant alive past 90 days, until it idles for more than 90."""
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None
    sandbox.clock.advance(80 * DAY)
    second = Tokens.parse(refresh(http, sandbox, tokens.refresh_token))
    assert second.refresh_token is not None
    sandbox.clock.advance(80 * DAY)  # 160 days after consent, 80 after the last use

    third = Tokens.parse(refresh(http, sandbox, second.refresh_token))

    assert third.refresh_token is not None
    sandbox.clock.advance(90 * DAY + 1)
    assert oauth_error(refresh(http, sandbox, third.refresh_token), 400) == "invalid_grant"


def test_without_rotation_the_refresh_response_omits_refresh_token_and_the_old_one_stays(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Rotation (B3, knob rotate_refresh_tokens=False): a refresh answers no refresh_token,
    and the stored one keeps working without counting a replay."""
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None
    sandbox.set_knobs(rotate_refresh_tokens=False)

    first = Tokens.parse(refresh(http, sandbox, tokens.refresh_token))
    second = Tokens.parse(refresh(http, sandbox, tokens.refresh_token))

    assert "refresh_token" not in first.body
    assert "refresh_token" not in second.body
    assert first.access_token != second.access_token
    assert sandbox.counters.replays_detected.total() == 0
    assert sandbox.counters.refreshes[USER] == 2


def test_refresh_token_of_another_client_is_invalid_grant(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Rotation: a refresh token only works for the client it was issued to, and another
    client presenting it does not revoke the grant."""
    other = _other_client(sandbox)
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None
    form = {
        "grant_type": "refresh_token",
        "refresh_token": tokens.refresh_token,
        "client_id": other.client_id,
        "client_secret": other.client_secret,
    }

    response = http.post(TOKEN, data=form)

    assert oauth_error(response, 400) == "invalid_grant"
    assert refresh(http, sandbox, tokens.refresh_token).status_code == 200


def test_refresh_asking_for_more_scope_than_granted_is_invalid_scope(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Rotation (RFC 6749 6): a refresh may not widen the granted scope."""
    tokens = login(http, sandbox, scope="openid read:biomarkers")
    assert tokens.refresh_token is not None
    form = client_form(
        sandbox,
        grant_type="refresh_token",
        refresh_token=tokens.refresh_token,
        scope="openid profile read:biomarkers",
    )

    response = http.post(TOKEN, data=form)

    assert oauth_error(response, 400) == "invalid_scope"


def test_refresh_with_a_narrower_scope_gives_a_token_limited_to_it(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Rotation (RFC 6749 6): a narrowed refresh yields an access token without the dropped
    scope, and the API enforces that."""
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None
    form = client_form(
        sandbox, grant_type="refresh_token", refresh_token=tokens.refresh_token, scope="openid"
    )
    narrowed = Tokens.parse(http.post(TOKEN, data=form))

    response = biomarkers(http, narrowed.access_token)

    assert narrowed.scope == "openid"
    assert api_error(response, 403) == "insufficient_scope"


def test_unknown_refresh_token_is_invalid_grant(sandbox: Sandbox, http: httpx.Client) -> None:
    """Rotation: a refresh token the server never issued is invalid_grant."""
    response = refresh(http, sandbox, "lph_rt_" + secrets.token_urlsafe(32))

    assert oauth_error(response, 400) == "invalid_grant"


# --- revoke (RFC 7009) ------------------------------------------------------------------


def test_revoking_the_refresh_token_ends_the_grant(sandbox: Sandbox, http: httpx.Client) -> None:
    """Revoke (RFC 7009): 200 for a valid refresh token; the grant ends, so refresh is
    invalid_grant and the access token is 401 invalid_token."""
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None

    response = revoke(http, sandbox, tokens.refresh_token)

    assert response.status_code == 200
    assert oauth_error(refresh(http, sandbox, tokens.refresh_token), 400) == "invalid_grant"
    assert _api_rejects(http, tokens.access_token)
    assert sandbox.counters.grants_revoked[USER] == 1
    assert sandbox.counters.replays_detected.total() == 0


def test_revoking_an_access_token_stops_it(sandbox: Sandbox, http: httpx.Client) -> None:
    """Revoke (RFC 7009): 200 for a valid access token, which the API then refuses."""
    tokens = login(http, sandbox)

    response = revoke(http, sandbox, tokens.access_token)

    assert response.status_code == 200
    assert _api_rejects(http, tokens.access_token)


@pytest.mark.parametrize(
    "token", ["lph_rt_never-issued", "lph_at_never-issued", "garbage"], ids=["rt", "at", "junk"]
)
def test_revoking_an_unknown_token_answers_200(
    sandbox: Sandbox, http: httpx.Client, token: str
) -> None:
    """Revoke (RFC 7009 2.2): 200 whether or not the token was valid."""
    response = revoke(http, sandbox, token)

    assert response.status_code == 200


def test_revoking_twice_answers_200_both_times(sandbox: Sandbox, http: httpx.Client) -> None:
    """Revoke (RFC 7009 2.2): revoking an already revoked token is still 200."""
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None

    assert revoke(http, sandbox, tokens.refresh_token).status_code == 200
    assert revoke(http, sandbox, tokens.refresh_token).status_code == 200
    assert sandbox.counters.grants_revoked[USER] == 1


def test_revoke_with_bad_client_credentials_is_401_and_revokes_nothing(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Revoke: bad client credentials are 401 invalid_client and the token keeps working."""
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None
    form = client_form(sandbox, token=tokens.refresh_token, client_secret="wrong")

    response = http.post(REVOKE, data=form)

    assert oauth_error(response, 401) == "invalid_client"
    assert refresh(http, sandbox, tokens.refresh_token).status_code == 200


def test_another_client_cannot_revoke_our_tokens(sandbox: Sandbox, http: httpx.Client) -> None:
    """Revoke: a client can only revoke tokens issued to it."""
    other = _other_client(sandbox)
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None
    form = {
        "token": tokens.refresh_token,
        "client_id": other.client_id,
        "client_secret": other.client_secret,
    }

    http.post(REVOKE, data=form)

    assert refresh(http, sandbox, tokens.refresh_token).status_code == 200


def test_revoke_without_a_token_is_invalid_request(sandbox: Sandbox, http: httpx.Client) -> None:
    """Revoke (RFC 7009 2.1): the token parameter is required."""
    response = http.post(REVOKE, data=client_form(sandbox))

    assert oauth_error(response, 400) == "invalid_request"


# --- introspect (RFC 7662) --------------------------------------------------------------


def test_introspecting_an_active_access_token_describes_it(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Introspect: an active access token gives {active, sub, client_id, scope, exp, brand,
    token_type} with exp one hour ahead and token_type Bearer (RFC 7662 2.2)."""
    tokens = login(http, sandbox, login_hint="usr_0004")

    response = introspect(http, sandbox, tokens.access_token)

    assert response.status_code == 200
    body = response.json()
    assert body["active"] is True
    assert body["sub"] == "usr_0004"
    assert body["client_id"] == sandbox.config.client.client_id
    assert body["scope"].split() == ["openid", "profile", "read:biomarkers"]
    assert abs(body["exp"] - (sandbox.clock.now().timestamp() + 3600)) < 60
    assert body["brand"] == "loop"
    assert body["token_type"] == "Bearer"


def test_introspecting_an_active_refresh_token_describes_it(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Introspect: an active refresh token is active for the same user and client, with exp
    90 days ahead."""
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None

    body = introspect(http, sandbox, tokens.refresh_token).json()

    assert body["active"] is True
    assert body["sub"] == USER
    assert body["client_id"] == sandbox.config.client.client_id
    assert abs(body["exp"] - (sandbox.clock.now().timestamp() + 90 * DAY)) < 60
    assert {"scope", "brand", "token_type"} <= body.keys()


def test_introspecting_a_revoked_token_is_inactive(sandbox: Sandbox, http: httpx.Client) -> None:
    """Introspect: revoked tokens answer exactly {"active": false}."""
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None
    revoke(http, sandbox, tokens.refresh_token)

    assert introspect(http, sandbox, tokens.access_token).json() == {"active": False}
    assert introspect(http, sandbox, tokens.refresh_token).json() == {"active": False}


def test_introspecting_an_expired_access_token_is_inactive(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Introspect: an access token past expires_in answers {"active": false}."""
    tokens = login(http, sandbox)
    sandbox.clock.advance(tokens.expires_in + 1)

    response = introspect(http, sandbox, tokens.access_token)

    assert response.status_code == 200
    assert response.json() == {"active": False}


def test_introspecting_an_unknown_token_is_inactive(sandbox: Sandbox, http: httpx.Client) -> None:
    """Introspect: a token the server never issued answers {"active": false}."""
    response = introspect(http, sandbox, "lph_at_" + secrets.token_urlsafe(32))

    assert response.status_code == 200
    assert response.json() == {"active": False}


def test_introspecting_a_used_refresh_token_is_inactive(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Introspect: a refresh token spent by rotation is no longer active."""
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None
    refresh(http, sandbox, tokens.refresh_token)

    assert introspect(http, sandbox, tokens.refresh_token).json() == {"active": False}


def test_introspect_with_bad_client_credentials_is_401(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Introspect: bad client credentials are 401 invalid_client, revealing nothing."""
    tokens = login(http, sandbox)
    form = client_form(sandbox, token=tokens.access_token, client_secret="wrong")

    response = http.post(INTROSPECT, data=form)

    assert oauth_error(response, 401) == "invalid_client"
    assert "sub" not in response.json()


def test_introspecting_another_clients_token_is_inactive(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Introspect: a client learns nothing about tokens issued to another client."""
    other = _other_client(sandbox)
    tokens = login(http, sandbox)
    form = {
        "token": tokens.access_token,
        "client_id": other.client_id,
        "client_secret": other.client_secret,
    }

    response = http.post(INTROSPECT, data=form)

    assert response.json() == {"active": False}
