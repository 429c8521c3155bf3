"""Helpers for the sandbox contract tests: PKCE, the authorize→code→token dance, API calls.

Every helper speaks plain HTTP through the `httpx.Client` it is given, so the tests observe
exactly what a Loop client would: status, headers, the redirect Location and JSON bodies.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from loop_sync.sandbox import Sandbox

# Loop signs id_tokens with EdDSA, which joserfc (signing in the sandbox, verifying in the
# tests) flags as deprecated by RFC 9864. The sandbox's own import-time filter does not
# survive pytest's per-test warning capture, so each module applies this mark.
IGNORE_EDDSA_WARNING = pytest.mark.filterwarnings(
    "ignore:EdDSA is deprecated:joserfc.errors.SecurityWarning"
)

DEFAULT_SCOPE = "openid profile read:biomarkers"
BIOMARKERS = "/v1/biomarkers/me"
AUTHORIZE = "/v1/oauth/authorize"
TOKEN = "/v1/oauth/token"
REVOKE = "/v1/oauth/revoke"
INTROSPECT = "/v1/oauth/introspect"


@dataclass(frozen=True)
class Pkce:
    verifier: str
    challenge: str


def s256(verifier: str) -> str:
    """BASE64URL(SHA256(verifier)) without padding, computed independently of the sandbox."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_pkce() -> Pkce:
    """A fresh verifier as in Loop's quickstart: 32 random bytes, base64url (43 chars)."""
    verifier = secrets.token_urlsafe(32)
    return Pkce(verifier, s256(verifier))


@dataclass(frozen=True)
class AuthRequest:
    """The parameters of one authorize request, and the PKCE verifier kept by the client."""

    params: dict[str, str]
    pkce: Pkce

    @property
    def state(self) -> str:
        return self.params["state"]

    @property
    def nonce(self) -> str:
        return self.params["nonce"]

    @property
    def redirect_uri(self) -> str:
        return self.params["redirect_uri"]


def auth_request(
    sandbox: Sandbox,
    *,
    scope: str = DEFAULT_SCOPE,
    login_hint: str | None = "usr_0001",
    drop: tuple[str, ...] = (),
    **overrides: str,
) -> AuthRequest:
    """A valid authorize request for the registered app; `overrides` replace parameters and
    `drop` removes them."""
    pkce = new_pkce()
    params = {
        "response_type": "code",
        "client_id": sandbox.config.client.client_id,
        "redirect_uri": sandbox.config.client.redirect_uri,
        "scope": scope,
        "state": secrets.token_urlsafe(16),
        "nonce": secrets.token_urlsafe(16),
        "code_challenge": pkce.challenge,
        "code_challenge_method": "S256",
    }
    if login_hint is not None:
        params["login_hint"] = login_hint
    params.update(overrides)
    for name in drop:
        params.pop(name, None)
    return AuthRequest(params, pkce)


def authorize(http: httpx.Client, request: AuthRequest) -> httpx.Response:
    """GET the authorize endpoint without following the redirect."""
    return http.get(AUTHORIZE, params=request.params, follow_redirects=False)


def redirect_query(response: httpx.Response, redirect_uri: str) -> dict[str, str]:
    """The query of a 302 to the client's callback, one value per parameter."""
    assert response.status_code == 302, response.text
    location = response.headers["location"]
    base, _, _ = location.partition("?")
    assert base == redirect_uri, location
    query = parse_qs(urlsplit(location).query, keep_blank_values=True, strict_parsing=False)
    assert all(len(values) == 1 for values in query.values()), location
    return {name: values[0] for name, values in query.items()}


@dataclass(frozen=True)
class Code:
    """An authorization code and the request it answers."""

    code: str
    request: AuthRequest


def get_code(http: httpx.Client, sandbox: Sandbox, **kwargs: Any) -> Code:
    """Authorize with auto-approve on and return the code from the callback."""
    request = auth_request(sandbox, **kwargs)
    query = redirect_query(authorize(http, request), request.redirect_uri)
    assert query["state"] == request.state
    return Code(query["code"], request)


def client_form(sandbox: Sandbox, **fields: str) -> dict[str, str]:
    """A form body carrying the registered app's client_secret_post credentials."""
    client = sandbox.config.client
    return {"client_id": client.client_id, "client_secret": client.client_secret, **fields}


def exchange(
    http: httpx.Client,
    sandbox: Sandbox,
    code: Code,
    /,
    drop: tuple[str, ...] = (),
    **overrides: str,
) -> httpx.Response:
    """POST the code exchange (client_secret_post, form-encoded); `overrides` replace form
    fields and `drop` removes them."""
    form = client_form(
        sandbox,
        grant_type="authorization_code",
        code=code.code,
        redirect_uri=code.request.redirect_uri,
        code_verifier=code.request.pkce.verifier,
    )
    form.update(overrides)
    for name in drop:
        del form[name]
    return http.post(TOKEN, data=form)


@dataclass(frozen=True)
class Tokens:
    """A successful token response."""

    access_token: str
    refresh_token: str | None
    scope: str
    expires_in: int
    id_token: str | None
    body: dict[str, Any] = field(repr=False)

    @classmethod
    def parse(cls, response: httpx.Response) -> Tokens:
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return cls(
            body["access_token"],
            body.get("refresh_token"),
            body["scope"],
            body["expires_in"],
            body.get("id_token"),
            body,
        )


def login(http: httpx.Client, sandbox: Sandbox, **kwargs: Any) -> Tokens:
    """The whole dance: authorize with PKCE, take the code, exchange it."""
    return Tokens.parse(exchange(http, sandbox, get_code(http, sandbox, **kwargs)))


def refresh(http: httpx.Client, sandbox: Sandbox, refresh_token: str) -> httpx.Response:
    form = client_form(sandbox, grant_type="refresh_token", refresh_token=refresh_token)
    return http.post(TOKEN, data=form)


def revoke(http: httpx.Client, sandbox: Sandbox, token: str) -> httpx.Response:
    return http.post(REVOKE, data=client_form(sandbox, token=token))


def introspect(http: httpx.Client, sandbox: Sandbox, token: str) -> httpx.Response:
    return http.post(INTROSPECT, data=client_form(sandbox, token=token))


def biomarkers(http: httpx.Client, access_token: str | None, **params: int | str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {access_token}"} if access_token is not None else {}
    return http.get(BIOMARKERS, params=params, headers=headers)


def oauth_error(response: httpx.Response, status: int) -> str:
    """The `error` of an OAuth endpoint's JSON error, after checking status and shape."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert isinstance(body.get("error_description"), str), body
    error: str = body["error"]
    return error


def api_error(response: httpx.Response, status: int) -> str:
    """The `error` of a clinical API JSON error, after checking status and shape."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert isinstance(body.get("message"), str), body
    error: str = body["error"]
    return error


def jwks(http: httpx.Client) -> KeySet:
    response = http.get("/.well-known/jwks.json")
    assert response.status_code == 200, response.text
    return KeySet.import_key_set(response.json())


def id_token_claims(http: httpx.Client, id_token: str) -> dict[str, Any]:
    """The id_token's claims after checking its EdDSA signature against the served JWKS."""
    token = jwt.decode(id_token, jwks(http), algorithms=["EdDSA"])
    return dict(token.claims)


@dataclass
class Form:
    """The first HTML form of a page, as a browser would see it."""

    action: str = ""
    method: str = ""
    hidden: dict[str, str] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)
    checkboxes: list[tuple[str, str, bool]] = field(default_factory=list)  # name, value, checked
    buttons: list[tuple[str, str, str]] = field(default_factory=list)  # name, value, label


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.form: Form | None = None
        self._in_form = False
        self._button: tuple[str, str] | None = None
        self._label = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form" and self.form is None:
            self.form, self._in_form = Form(a.get("action", ""), a.get("method", "")), True
        elif self.form is not None and self._in_form and tag == "input":
            kind, name, value = a.get("type", "text"), a.get("name", ""), a.get("value", "")
            if kind == "hidden":
                self.form.hidden[name] = value
            elif kind == "checkbox":
                self.form.checkboxes.append((name, value, "checked" in a))
            else:
                self.form.text[name] = value
        elif self._in_form and tag == "button":
            self._button, self._label = (a.get("name", ""), a.get("value", "")), ""

    def handle_data(self, data: str) -> None:
        if self._button is not None:
            self._label += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "button" and self._button is not None and self.form is not None:
            self.form.buttons.append((*self._button, self._label.strip()))
            self._button = None
        elif tag == "form":
            self._in_form = False


def parse_form(html: str) -> Form:
    parser = _FormParser()
    parser.feed(html)
    assert parser.form is not None, "the page has no form"
    return parser.form


def consent_page(http: httpx.Client, request: AuthRequest) -> Form:
    """GET authorize with auto-approve off: the consent page's form."""
    response = authorize(http, request)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert "location" not in response.headers
    return parse_form(response.text)


def submit_consent(
    http: httpx.Client,
    form: Form,
    decision: str,
    *,
    scopes: list[str] | None = None,
    user: str | None = None,
) -> httpx.Response:
    """POST the consent form as a browser would: hidden fields, the user field, the checked
    scope boxes (all the page checked, unless `scopes` says which) and the clicked button."""
    fields: list[tuple[str, str]] = list(form.hidden.items())
    if user is not None:
        fields = [(k, v) for k, v in fields if k != "user"] + [("user", user)]
    elif "user" in form.text:
        fields.append(("user", form.text["user"]))
    checked = [v for _, v, on in form.checkboxes if on] if scopes is None else scopes
    fields += [("scope", scope) for scope in checked]
    fields.append(("decision", decision))
    return http.post(
        form.action,
        content=urlencode(fields),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
