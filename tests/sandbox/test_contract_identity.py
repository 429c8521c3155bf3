"""Contract tests of Loop identity as the sandbox serves it: discovery, JWKS, authorize, consent.

Rules come from /work/shared/loop-platform.md (Part A unless marked B) and RFC 6749/7636.
"""

from __future__ import annotations

import httpx
import pytest

from loop_sync.sandbox import Sandbox
from loop_sync.sandbox.authority import Client

from .helpers import (
    IGNORE_EDDSA_WARNING,
    Code,
    Tokens,
    auth_request,
    authorize,
    biomarkers,
    consent_page,
    exchange,
    id_token_claims,
    login,
    redirect_query,
    submit_consent,
)

pytestmark = IGNORE_EDDSA_WARNING

# --- discovery and keys -----------------------------------------------------------------


def test_discovery_issuer_is_the_base_url_and_lists_every_endpoint(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Discovery: issuer equals the base URL and names jwks, authorize, token, revoke and
    introspect endpoints on it, with no userinfo endpoint."""
    response = http.get("/.well-known/openid-configuration")

    assert response.status_code == 200
    doc = response.json()
    base = sandbox.issuer
    assert doc["issuer"] == base
    assert doc["jwks_uri"] == f"{base}/.well-known/jwks.json"
    assert doc["authorization_endpoint"] == f"{base}/v1/oauth/authorize"
    assert doc["token_endpoint"] == f"{base}/v1/oauth/token"
    assert doc["revocation_endpoint"] == f"{base}/v1/oauth/revoke"
    assert doc["introspection_endpoint"] == f"{base}/v1/oauth/introspect"
    assert "userinfo_endpoint" not in doc


def test_discovery_advertises_only_the_code_flow_with_s256_and_client_secret_post(
    http: httpx.Client,
) -> None:
    """Discovery: response type code, grants authorization_code and refresh_token only,
    client_secret_post, PKCE S256 only, and the quickstart's scopes."""
    doc = http.get("/.well-known/openid-configuration").json()

    assert doc["response_types_supported"] == ["code"]
    assert sorted(doc["grant_types_supported"]) == ["authorization_code", "refresh_token"]
    assert "client_secret_post" in doc["token_endpoint_auth_methods_supported"]
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert {"openid", "profile", "read:biomarkers"} <= set(doc["scopes_supported"])


def test_discovery_endpoints_are_served_at_the_advertised_urls(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Discovery: the advertised jwks_uri answers over HTTP (the URLs are real, not decor)."""
    doc = http.get("/.well-known/openid-configuration").json()

    response = httpx.get(doc["jwks_uri"])

    assert response.status_code == 200
    assert response.json()["keys"]


def test_jwks_publishes_an_ed25519_signing_key(http: httpx.Client) -> None:
    """JWKS: every key is OKP/Ed25519 with x, kid, alg=EdDSA and use=sig, and no private d."""
    response = http.get("/.well-known/jwks.json")

    assert response.status_code == 200
    keys = response.json()["keys"]
    assert len(keys) >= 1
    for key in keys:
        assert key["kty"] == "OKP"
        assert key["crv"] == "Ed25519"
        assert key["alg"] == "EdDSA"
        assert key["use"] == "sig"
        assert key["x"]
        assert key["kid"]
        assert "d" not in key


# --- authorize: success -----------------------------------------------------------------


def test_authorize_with_auto_approve_redirects_with_a_code_and_the_same_state(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Authorize: a valid request redirects to redirect_uri?code=…&state=… (state echoed)."""
    request = auth_request(sandbox)

    query = redirect_query(authorize(http, request), request.redirect_uri)

    assert query["state"] == request.state
    assert query["code"]
    assert "error" not in query


@pytest.mark.parametrize("user", ["usr_0002", "usr_0005"])
def test_login_hint_picks_the_user_named_in_the_id_token(
    sandbox: Sandbox, http: httpx.Client, user: str
) -> None:
    """Authorize: login_hint selects the user, and the id_token's sub is that user."""
    tokens = login(http, sandbox, login_hint=user)

    assert tokens.id_token is not None
    assert id_token_claims(http, tokens.id_token)["sub"] == user


def test_authorize_without_openid_needs_no_nonce(sandbox: Sandbox, http: httpx.Client) -> None:
    """Authorize: nonce is required only with openid, so read:biomarkers alone works without."""
    request = auth_request(sandbox, scope="read:biomarkers", drop=("nonce",))

    query = redirect_query(authorize(http, request), request.redirect_uri)

    assert query["code"]
    assert query["state"] == request.state


def test_authorize_accepts_the_baa_scope_for_a_client_with_a_baa(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Authorize: read:documents is granted to a client that signed a BAA."""
    redirect_uri = "http://localhost:9000/cb"
    sandbox.authority.register_client(Client("baa-app", "baa-secret", (redirect_uri,), baa=True))
    request = auth_request(
        sandbox, scope="read:documents", client_id="baa-app", redirect_uri=redirect_uri
    )

    query = redirect_query(authorize(http, request), redirect_uri)

    assert query["code"]
    assert "error" not in query


# --- authorize: errors redirected to the client -----------------------------------------


@pytest.mark.parametrize(
    ("drop", "overrides", "what"),
    [
        (("code_challenge",), {}, "PKCE required: no code_challenge"),
        (("code_challenge_method",), {}, "PKCE required: no code_challenge_method"),
        (("code_challenge", "code_challenge_method"), {}, "PKCE required: neither"),
        ((), {"code_challenge_method": "plain"}, "plain is rejected"),
        ((), {"code_challenge": "too-short"}, "challenge is not 43 base64url chars"),
        (("nonce",), {}, "nonce required with openid"),
        ((), {"login_hint": "usr_9999"}, "unknown login_hint"),
    ],
)
def test_authorize_rejects_a_bad_request_by_redirecting_invalid_request_with_state(
    sandbox: Sandbox,
    http: httpx.Client,
    drop: tuple[str, ...],
    overrides: dict[str, str],
    what: str,
) -> None:
    """Authorize: PKCE is mandatory and S256-only, nonce comes with openid, login_hint must
    name a user; each violation redirects error=invalid_request carrying state, no code."""
    request = auth_request(sandbox, drop=drop, **overrides)

    query = redirect_query(authorize(http, request), request.redirect_uri)

    assert query["error"] == "invalid_request", what
    assert query["state"] == request.state
    assert "code" not in query


def test_authorize_without_state_redirects_invalid_request(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Authorize: state is required on every call; without it, error=invalid_request, no code."""
    request = auth_request(sandbox, drop=("state",))

    query = redirect_query(authorize(http, request), request.redirect_uri)

    assert query["error"] == "invalid_request"
    assert "code" not in query
    assert "state" not in query


@pytest.mark.parametrize(
    ("scope", "why"),
    [
        ("openid profile read:everything", "unknown scope"),
        ("openid read:documents", "read:documents needs a BAA"),
    ],
)
def test_authorize_with_a_scope_not_allowed_redirects_invalid_scope_with_state(
    sandbox: Sandbox, http: httpx.Client, scope: str, why: str
) -> None:
    """Authorize: an unknown scope, or the BAA-only read:documents for a client without a
    BAA, redirects error=invalid_scope carrying state."""
    request = auth_request(sandbox, scope=scope)

    query = redirect_query(authorize(http, request), request.redirect_uri)

    assert query["error"] == "invalid_scope", why
    assert query["state"] == request.state
    assert "code" not in query


@pytest.mark.parametrize("response_type", ["token", "id_token", "code token"])
def test_authorize_with_another_response_type_redirects_unsupported_response_type(
    sandbox: Sandbox, http: httpx.Client, response_type: str
) -> None:
    """Authorize: response_type other than code → error=unsupported_response_type, with state."""
    request = auth_request(sandbox, response_type=response_type)

    query = redirect_query(authorize(http, request), request.redirect_uri)

    assert query["error"] == "unsupported_response_type"
    assert query["state"] == request.state
    assert "code" not in query


def test_authorize_for_a_client_without_the_code_grant_redirects_unauthorized_client(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Authorize: a client not allowed authorization_code gets error=unauthorized_client."""
    redirect_uri = "http://localhost:9001/cb"
    sandbox.authority.register_client(
        Client("refresh-only", "s3cret", (redirect_uri,), grant_types=frozenset({"refresh_token"}))
    )
    request = auth_request(sandbox, client_id="refresh-only", redirect_uri=redirect_uri)

    query = redirect_query(authorize(http, request), redirect_uri)

    assert query["error"] == "unauthorized_client"
    assert query["state"] == request.state


# --- authorize: errors shown on Loop's page, never redirected ---------------------------


@pytest.mark.parametrize(
    "redirect_uri",
    [
        "http://localhost:8000/other",  # different path
        "http://localhost:8000/callback?next=/admin",  # extra query
        "http://localhost:8000/callback/",  # trailing slash
        "http://localhost:8000/callback#frag",  # fragment
        "http://localhost:8001/callback",  # different port
        "https://evil.example/callback",  # different host
    ],
)
def test_authorize_with_a_mismatched_redirect_uri_shows_an_error_page_without_redirecting(
    sandbox: Sandbox, http: httpx.Client, redirect_uri: str
) -> None:
    """Authorize: redirect_uri must match exactly; on a mismatch Loop shows a 400 HTML error
    page and sends no Location header."""
    request = auth_request(sandbox, redirect_uri=redirect_uri)

    response = authorize(http, request)

    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/html")
    assert "location" not in response.headers
    assert "redirect_uri" in response.text


def test_authorize_with_an_unknown_client_shows_an_error_page_without_redirecting(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Authorize: an unknown client_id gets Loop's 400 HTML error page, no Location."""
    request = auth_request(sandbox, client_id="not-registered")

    response = authorize(http, request)

    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/html")
    assert "location" not in response.headers
    assert "client_id" in response.text


# --- consent page (auto_approve off) ----------------------------------------------------


@pytest.fixture
def consent(sandbox: Sandbox) -> Sandbox:
    """The sandbox with Loop's consent screen shown instead of approving automatically."""
    sandbox.set_knobs(auto_approve=False)
    return sandbox


def test_consent_page_is_html_with_allow_and_deny_buttons(
    consent: Sandbox, http: httpx.Client
) -> None:
    """Consent: the authorize page is an HTML form posting back to authorize, with a checked
    box per requested scope and Allow and Deny buttons."""
    form = consent_page(http, auth_request(consent))

    assert form.method.lower() == "post"
    assert form.action == "/v1/oauth/authorize"
    assert form.hidden["request_id"]
    assert form.checkboxes == [
        ("scope", "openid", True),
        ("scope", "profile", True),
        ("scope", "read:biomarkers", True),
    ]
    assert ("decision", "allow", "Allow") in form.buttons
    assert ("decision", "deny", "Deny") in form.buttons


def test_consent_allow_redirects_with_a_code_that_exchanges_for_tokens(
    consent: Sandbox, http: httpx.Client
) -> None:
    """Consent: Allow redirects to redirect_uri?code=…&state=…, and the code works."""
    request = auth_request(consent, login_hint="usr_0003")
    form = consent_page(http, request)

    query = redirect_query(submit_consent(http, form, "allow"), request.redirect_uri)

    assert query["state"] == request.state
    tokens = Tokens.parse(exchange(http, consent, Code(query["code"], request)))
    assert tokens.scope.split() == ["openid", "profile", "read:biomarkers"]
    assert tokens.id_token is not None
    assert id_token_claims(http, tokens.id_token)["sub"] == "usr_0003"


def test_consent_deny_redirects_access_denied_with_state(
    consent: Sandbox, http: httpx.Client
) -> None:
    """Consent: Deny redirects with error=access_denied and the request's state, no code."""
    request = auth_request(consent)
    form = consent_page(http, request)

    query = redirect_query(submit_consent(http, form, "deny"), request.redirect_uri)

    assert query["error"] == "access_denied"
    assert query["state"] == request.state
    assert "code" not in query


def test_consent_without_login_hint_lets_the_user_say_who_they_are(
    consent: Sandbox, http: httpx.Client
) -> None:
    """Consent: without login_hint the page asks for the user, and the grant is for that user."""
    request = auth_request(consent, login_hint=None)
    form = consent_page(http, request)
    assert "user" in form.text

    query = redirect_query(
        submit_consent(http, form, "allow", user="usr_0004"), request.redirect_uri
    )

    tokens = Tokens.parse(exchange(http, consent, Code(query["code"], request)))
    assert tokens.id_token is not None
    assert id_token_claims(http, tokens.id_token)["sub"] == "usr_0004"


def test_consent_unchecking_read_biomarkers_grants_a_narrower_scope(
    consent: Sandbox, http: httpx.Client
) -> None:
    """Consent (B3): a scope the user unchecks is not granted; the token response's scope
    says so and the API answers insufficient_scope."""
    request = auth_request(consent)
    form = consent_page(http, request)

    response = submit_consent(http, form, "allow", scopes=["openid", "profile"])

    query = redirect_query(response, request.redirect_uri)
    tokens = Tokens.parse(exchange(http, consent, Code(query["code"], request)))
    assert tokens.scope.split() == ["openid", "profile"]
    api = biomarkers(http, tokens.access_token)
    assert api.status_code == 403
    assert api.json()["error"] == "insufficient_scope"


def test_consent_with_every_scope_unchecked_grants_none_of_them(
    consent: Sandbox, http: httpx.Client
) -> None:
    """Consent: Allow with every box unchecked grants no scope (not all of them)."""
    request = auth_request(consent, scope="read:biomarkers", drop=("nonce",))
    form = consent_page(http, request)

    response = submit_consent(http, form, "allow", scopes=[])

    query = redirect_query(response, request.redirect_uri)
    tokens = Tokens.parse(exchange(http, consent, Code(query["code"], request)))
    assert tokens.scope == ""
    assert biomarkers(http, tokens.access_token).status_code == 403


def test_consent_cannot_grant_a_scope_that_was_not_requested(
    consent: Sandbox, http: httpx.Client
) -> None:
    """Consent: a scope value added to the posted form beyond the request is not granted."""
    request = auth_request(consent, scope="openid profile", login_hint="usr_0002")
    form = consent_page(http, request)

    response = submit_consent(http, form, "allow", scopes=["openid", "profile", "read:biomarkers"])

    query = redirect_query(response, request.redirect_uri)
    tokens = Tokens.parse(exchange(http, consent, Code(query["code"], request)))
    assert tokens.scope.split() == ["openid", "profile"]


def test_consent_request_id_cannot_be_reused(consent: Sandbox, http: httpx.Client) -> None:
    """Consent: once answered, the same consent request id is refused with an error page and
    no redirect (no second code)."""
    request = auth_request(consent)
    form = consent_page(http, request)
    first = submit_consent(http, form, "allow")
    assert redirect_query(first, request.redirect_uri)["code"]

    again = submit_consent(http, form, "allow")

    assert again.status_code == 400
    assert again.headers["content-type"].startswith("text/html")
    assert "location" not in again.headers


def test_consent_denied_request_id_cannot_be_allowed_afterwards(
    consent: Sandbox, http: httpx.Client
) -> None:
    """Consent: after Deny, posting Allow with the same request id gives no code."""
    request = auth_request(consent)
    form = consent_page(http, request)
    denied = redirect_query(submit_consent(http, form, "deny"), request.redirect_uri)
    assert denied["error"] == "access_denied"

    again = submit_consent(http, form, "allow")

    assert again.status_code == 400
    assert "location" not in again.headers
