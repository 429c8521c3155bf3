"""The onboarding web app over real HTTP: pages, the binding cookie, the consent flow
against the sandbox, CSRF defences, what is stored, and the headers on every answer."""

from __future__ import annotations

import base64
import hashlib
import re
from datetime import timedelta
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import update

from loop_sync.config import Settings
from loop_sync.errors import ConfigError
from loop_sync.grants import set_status
from loop_sync.sandbox import Sandbox
from loop_sync.schema import (
    GRANT_ACTIVE,
    GRANT_REAUTH_REQUIRED,
    oauth_sessions,
    tokens,
    upgrade,
)
from loop_sync.services import Services
from loop_sync.vault import utcnow
from loop_sync.web import create_app

from .conftest import Stored, WebHost

COOKIE = "loop_sync_flow"
USER = "usr_0002"
SECURITY_HEADERS = {
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
}


# --- helpers ----------------------------------------------------------------------------


def query(url: str) -> dict[str, str]:
    """A URL's query as a dict, failing the test if a parameter is repeated."""
    parsed = parse_qs(urlsplit(url).query, strict_parsing=True)
    assert all(len(values) == 1 for values in parsed.values()), url
    return {name: values[0] for name, values in parsed.items()}


def cookie_attributes(response: httpx.Response) -> dict[str, str]:
    """The attributes of the binding cookie set by `response` (names lower-cased)."""
    for header in response.headers.get_list("set-cookie"):
        name_value, *attributes = (part.strip() for part in header.split(";"))
        if name_value.startswith(f"{COOKIE}="):
            found = {"value": name_value.partition("=")[2]}
            for attribute in attributes:
                key, _, value = attribute.partition("=")
                found[key.lower()] = value
            return found
    raise AssertionError(f"no {COOKIE} cookie was set")


def start(web: httpx.Client, login_hint: str | None = None) -> httpx.Response:
    params = {"login_hint": login_hint} if login_hint else {}
    response = web.get("/login", params=params)
    assert response.status_code == 302, response.text
    return response


def loop_redirect(login: httpx.Response) -> str:
    """Follow /login's redirect at the sandbox (auto-approve); the callback URL it returns."""
    answer = httpx.get(login.headers["location"], follow_redirects=False)
    assert answer.status_code == 302, answer.text
    return answer.headers["location"]


def connect(web: httpx.Client, login_hint: str = USER) -> httpx.Response:
    """The whole consent flow as a browser runs it; the app's answer to the callback."""
    return web.get(loop_redirect(start(web, login_hint)))


def deny_at_loop(login: httpx.Response, sandbox: Sandbox) -> str:
    """Click Deny on the sandbox's consent page; the callback URL it redirects to."""
    page = httpx.get(login.headers["location"])
    assert page.status_code == 200
    match = re.search(r'name="request_id" value="([^"]+)"', page.text)
    assert match, page.text
    answer = httpx.post(
        f"{sandbox.issuer}/v1/oauth/authorize",
        data={"request_id": match.group(1), "decision": "deny"},
    )
    assert answer.status_code == 302
    return answer.headers["location"]


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class Outline(HTMLParser):
    """The parts of a page a person relies on: language, title, headings, links."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.lang: str | None = None
        self.title = ""
        self.h1: list[str] = []
        self.links: dict[str, str] = {}
        self._tag: str | None = None
        self._href: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "html":
            self.lang = attributes.get("lang")
        if tag == "a":
            self._href = attributes.get("href")
        self._tag = tag
        if tag == "h1":
            self.h1.append("")

    def handle_data(self, data: str) -> None:
        if self._tag == "title":
            self.title += data
        elif self._tag == "h1":
            self.h1[-1] += data
        elif self._tag == "a" and self._href is not None:
            self.links[data.strip()] = self._href

    def handle_endtag(self, tag: str) -> None:
        self._tag = None


def assert_nothing_stored(stored: Stored) -> None:
    assert stored.grants() == []
    assert stored.tokens() == []


# --- pages ------------------------------------------------------------------------------


def test_home_page_offers_a_connect_button_that_starts_the_flow(web: httpx.Client) -> None:
    """The start page is a titled English page with one heading and a link to /login."""
    response = web.get("/")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = Outline(response.text)
    assert page.lang == "en"
    assert "Connect your Loop account" in page.title
    assert page.h1 == ["Connect your Loop account"]
    assert page.links["Connect your Loop account"] == "/login"


def test_healthz_answers_ok_when_the_database_answers(web: httpx.Client) -> None:
    """/healthz is 200 {"status": "ok"} with a working database."""
    response = web.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_healthz_is_503_when_the_database_is_unreachable(
    web_host: WebHost, settings: Settings, database_url: str
) -> None:
    """/healthz is 503 when its SELECT 1 fails, so a load balancer stops sending people."""
    unreachable = (
        "sqlite:////nonexistent-dir/loop_sync.db"
        if database_url.startswith("sqlite")
        else "postgresql+psycopg://postgres@127.0.0.1:1/test"
    )
    broken = Services.build(settings.model_copy(update={"database_url": SecretStr(unreachable)}))
    web_host.app = create_app(broken)
    try:
        response = httpx.get(f"{web_host.url}/healthz")
    finally:
        web_host.app = None
        broken.close()

    assert response.status_code == 503
    assert response.json() == {"status": "unavailable"}


def test_unknown_page_is_a_404_page(web: httpx.Client) -> None:
    """An unknown address shows a 404 page with a way back to the start."""
    response = web.get("/no-such-page")

    assert response.status_code == 404
    assert Outline(response.text).links["Go to the start page"] == "/"


# --- /login -----------------------------------------------------------------------------


def test_login_sets_a_binding_cookie_and_redirects_to_loop(
    web: httpx.Client, sandbox: Sandbox, settings: Settings
) -> None:
    """/login sets an HttpOnly, SameSite=Lax, 10-minute cookie (not Secure over http) and
    sends the browser to Loop's authorize endpoint with PKCE S256, state, nonce and hint."""
    response = start(web, login_hint=USER)

    cookie = cookie_attributes(response)
    assert len(cookie["value"]) >= 43
    assert "httponly" in cookie
    assert cookie["samesite"].lower() == "lax"
    assert cookie["path"] == "/"
    assert cookie["max-age"] == "600"
    assert "secure" not in cookie
    location = response.headers["location"]
    assert location.startswith(f"{sandbox.issuer}/v1/oauth/authorize?")
    params = query(location)
    assert params["response_type"] == "code"
    assert params["client_id"] == settings.client_id
    assert params["redirect_uri"] == settings.redirect_uri
    assert params["code_challenge_method"] == "S256"
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", params["code_challenge"])
    assert len(params["state"]) >= 32
    assert len(params["nonce"]) >= 32
    assert params["login_hint"] == USER
    assert "code_verifier" not in params


@pytest.mark.parametrize("https", ["redirect uri", "proxied request"])
def test_login_cookie_is_secure_behind_https(
    web_host: WebHost, settings: Settings, https: str
) -> None:
    """The cookie is Secure when LOOP_REDIRECT_URI is https or the request came over https
    (X-Forwarded-Proto from a trusted proxy on loopback)."""
    if https == "redirect uri":
        settings = settings.model_copy(
            update={"redirect_uri": "https://loop-sync.example/callback"}
        )
    headers = {"x-forwarded-proto": "https"} if https == "proxied request" else {}
    services = Services.build(settings)
    upgrade(services.engine)
    web_host.app = create_app(services)
    try:
        response = httpx.get(f"{web_host.url}/login", headers=headers)
    finally:
        web_host.app = None
        services.close()

    assert response.status_code == 302
    assert "secure" in cookie_attributes(response)


def test_login_without_hint_sends_no_login_hint(web: httpx.Client) -> None:
    """Without ?login_hint the authorize URL carries none; each /login gets a new state."""
    first = query(start(web).headers["location"])
    second = query(start(web).headers["location"])

    assert "login_hint" not in first
    assert first["state"] != second["state"]


def test_login_stores_the_verifier_encrypted_and_the_state_hashed(
    web: httpx.Client, stored: Stored, services: Services
) -> None:
    """The pending flow holds the PKCE verifier only encrypted and the state only hashed."""
    params = query(start(web).headers["location"])

    [session] = stored.sessions()
    verifier = services.cipher.decrypt(session["code_verifier"])
    assert len(verifier) == 43
    assert s256(verifier) == params["code_challenge"]
    assert verifier not in session["code_verifier"]
    assert params["state"] not in session.values()
    assert session["state_hash"] == hashlib.sha256(params["state"].encode()).hexdigest()


# --- the consent flow -------------------------------------------------------------------


def test_consent_ends_on_the_success_page_and_stores_an_encrypted_grant(
    web: httpx.Client, sandbox: Sandbox, stored: Stored, services: Services
) -> None:
    """After Allow, the person sees their Loop id; the grant is active with the granted
    scopes, and the tokens are stored encrypted, never in plaintext."""
    response = connect(web)

    assert response.status_code == 200
    page = Outline(response.text)
    assert page.h1 == ["Your Loop account is connected"]
    assert USER in response.text
    assert "You can close this window" in response.text
    assert cookie_attributes(response)["max-age"] == "0"
    [grant] = stored.grants()
    assert grant["user_id"] == USER
    assert grant["status"] == GRANT_ACTIVE
    assert grant["scopes"].split() == ["openid", "profile", "read:biomarkers"]
    [row] = stored.tokens()
    secrets = set(sandbox.authority.issued_secrets)
    for column in ("refresh_token", "access_token"):
        assert row[column] not in secrets
        assert not any(secret in row[column] for secret in secrets)
        assert services.cipher.decrypt(row[column]) in secrets
    assert services.cipher.decrypt(row["refresh_token"]).startswith("lph_rt_")


def test_consent_again_replaces_the_refresh_token_and_reactivates_the_grant(
    web: httpx.Client, stored: Stored, services: Services
) -> None:
    """A person whose grant needs re-consent connects again: the grant is active again,
    with a new refresh token, and grant_events records both changes."""
    assert connect(web).status_code == 200
    first = services.cipher.decrypt(stored.tokens()[0]["refresh_token"])
    with services.engine.begin() as connection:
        set_status(connection, USER, GRANT_REAUTH_REQUIRED, "invalid_grant on refresh", utcnow())

    response = connect(web)

    assert response.status_code == 200
    [grant] = stored.grants()
    assert grant["status"] == GRANT_ACTIVE
    [row] = stored.tokens()
    assert services.cipher.decrypt(row["refresh_token"]) != first
    assert row["generation"] == 2
    changes = [(e["from_status"], e["to_status"]) for e in stored.events()]
    assert changes == [
        (None, GRANT_ACTIVE),
        (GRANT_ACTIVE, GRANT_REAUTH_REQUIRED),
        (GRANT_REAUTH_REQUIRED, GRANT_ACTIVE),
    ]


def test_grant_records_the_scopes_loop_granted_not_those_requested(
    web: httpx.Client, sandbox: Sandbox, stored: Stored
) -> None:
    """When Loop grants fewer scopes than asked, the grant says what was granted."""
    sandbox.set_knobs(narrow_scopes={"profile"})

    assert connect(web).status_code == 200

    assert stored.grants()[0]["scopes"].split() == ["openid", "read:biomarkers"]


@pytest.mark.parametrize("auto_approve", [False])
def test_deny_shows_a_retry_page_and_stores_nothing(
    web: httpx.Client, sandbox: Sandbox, stored: Stored
) -> None:
    """Deny on Loop's consent screen leads to a 400 page that says so and offers a retry."""
    response = web.get(deny_at_loop(start(web), sandbox))

    assert response.status_code == 400
    page = Outline(response.text)
    assert page.h1 == ["You did not connect your Loop account"]
    assert page.links["Try again"] == "/login"
    assert_nothing_stored(stored)


def test_loop_server_error_shows_a_clear_page_and_stores_nothing(
    web: httpx.Client, stored: Stored
) -> None:
    """error=server_error on the callback names Loop's error and offers a retry."""
    state = query(start(web).headers["location"])["state"]

    response = web.get("/callback", params={"error": "server_error", "state": state})

    assert response.status_code == 400
    assert Outline(response.text).h1 == ["Loop could not connect your account"]
    assert "server_error" in response.text
    assert Outline(response.text).links["Try again"] == "/login"
    assert_nothing_stored(stored)


def test_loop_failing_at_login_shows_a_retry_page(
    web: httpx.Client, sandbox: Sandbox, stored: Stored
) -> None:
    """If Loop's discovery fails, /login shows a 503 page instead of a broken redirect."""
    sandbox.set_knobs(error_rates={"discovery": 1.0})

    response = web.get("/login")

    assert response.status_code == 503
    assert Outline(response.text).h1 == ["Loop cannot be reached right now"]
    assert Outline(response.text).links["Try again"] == "/login"
    assert COOKIE not in response.headers.get("set-cookie", "")
    assert stored.sessions() == []


def test_loop_failing_at_code_exchange_shows_a_retry_page(
    web: httpx.Client, sandbox: Sandbox, stored: Stored
) -> None:
    """If Loop's token endpoint fails after consent, the person sees a 502 retry page."""
    callback = loop_redirect(start(web, USER))
    sandbox.set_knobs(error_rates={"token": 1.0})

    response = web.get(callback)

    assert response.status_code == 502
    assert Outline(response.text).h1 == ["Loop could not connect your account"]
    assert Outline(response.text).links["Try again"] == "/login"
    assert_nothing_stored(stored)


# --- CSRF and bad input -----------------------------------------------------------------


def test_callback_with_an_unknown_state_is_refused(
    web: httpx.Client, sandbox: Sandbox, stored: Stored
) -> None:
    """A callback whose state this app never issued is a 400 page and stores nothing."""
    callback = loop_redirect(start(web, USER))
    forged = query(callback) | {"state": "not-a-state-we-issued"}

    response = web.get("/callback", params=forged)

    assert response.status_code == 400
    assert Outline(response.text).h1 == ["This sign-in link is no longer valid"]
    assert sandbox.counters.requests["token"] == 0
    assert_nothing_stored(stored)


def test_reused_state_is_refused_the_second_time(
    web: httpx.Client, sandbox: Sandbox, stored: Stored
) -> None:
    """Replaying a callback (same state and code, same cookie) is refused before the code
    goes to Loop again, and changes nothing."""
    callback = loop_redirect(start(web, USER))
    cookie = web.cookies[COOKIE]
    assert web.get(callback).status_code == 200
    before = stored.tokens()
    exchanges = sandbox.counters.requests["token"]

    web.cookies.set(COOKIE, cookie)
    response = web.get(callback)

    assert response.status_code == 400
    assert Outline(response.text).h1 == ["This sign-in link is no longer valid"]
    assert sandbox.counters.requests["token"] == exchanges
    assert stored.tokens() == before
    assert len(stored.events()) == 1


def test_expired_state_is_refused(web: httpx.Client, stored: Stored, services: Services) -> None:
    """A callback more than 10 minutes after /login is refused and stores nothing."""
    callback = loop_redirect(start(web, USER))
    with services.engine.begin() as connection:
        connection.execute(
            update(oauth_sessions).values(expires_at=utcnow() - timedelta(seconds=1))
        )

    response = web.get(callback)

    assert response.status_code == 400
    assert Outline(response.text).h1 == ["This sign-in link is no longer valid"]
    assert_nothing_stored(stored)


@pytest.mark.parametrize("cookie", ["missing", "another browser's"])
def test_callback_without_this_browsers_cookie_is_refused(
    web: httpx.Client, web_url: str, sandbox: Sandbox, stored: Stored, cookie: str
) -> None:
    """A callback arriving in a browser that did not start the flow (login CSRF) is
    refused and stores nothing."""
    callback = loop_redirect(start(web, USER))
    with httpx.Client(base_url=web_url, follow_redirects=False) as other:
        if cookie != "missing":
            start(other)  # the other browser has a flow of its own, and its own cookie
        response = other.get(callback)

    assert response.status_code == 400
    assert Outline(response.text).h1 == ["This sign-in link is no longer valid"]
    assert sandbox.counters.requests["token"] == 0
    assert_nothing_stored(stored)


@pytest.mark.parametrize("repeated", ["state", "code"])
def test_repeated_callback_parameter_is_a_400_page(
    web: httpx.Client, stored: Stored, repeated: str
) -> None:
    """A callback repeating a parameter is bad input (which copy counts is ambiguous): a 400
    page, not a 500, even when the last copy is the genuine one."""
    callback = loop_redirect(start(web, USER))

    response = web.get(f"/callback?{repeated}=other&{urlsplit(callback).query}")

    assert response.status_code == 400
    assert Outline(response.text).h1 == ["This sign-in answer is malformed"]
    assert Outline(response.text).links["Try again"] == "/login"
    assert_nothing_stored(stored)


# --- what never leaks -------------------------------------------------------------------


def test_unexpected_error_is_a_generic_500_page(
    web: httpx.Client, stored: Stored, services: Services, sandbox: Sandbox
) -> None:
    """A failure the app did not plan for shows a generic page: no error, SQL or code."""
    callback = loop_redirect(start(web, USER))
    tokens.drop(services.engine)

    response = web.get(callback)

    assert response.status_code == 500
    assert Outline(response.text).h1 == ["Something went wrong"]
    for detail in ("Traceback", "tokens", "SELECT", "Error", query(callback)["code"]):
        assert detail not in response.text
    assert response.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


def test_no_issued_secret_appears_in_any_page_or_redirect(
    web: httpx.Client, web_url: str, sandbox: Sandbox
) -> None:
    """Across a consent, a replay, a forged and a cookie-less callback, no page body or
    Location from the app contains a code, token or client secret Loop issued."""
    seen: list[httpx.Response] = [web.get("/")]
    callback = loop_redirect(start(web, USER))
    cookie = web.cookies[COOKIE]
    seen.append(web.get(callback))
    web.cookies.set(COOKIE, cookie)
    seen.append(web.get(callback))
    seen.append(httpx.get(callback))
    seen.append(web.get("/callback", params=query(callback) | {"state": "forged"}))
    seen.append(start(web, USER))

    secrets = sandbox.authority.issued_secrets
    assert len(secrets) >= 4  # client secret, code, access and refresh tokens
    for response in seen:
        assert str(response.url).startswith(web_url)
        shown = response.text + response.headers.get("location", "")
        assert not [secret for secret in secrets if secret in shown], response.url


# --- headers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status", "no_store"),
    [
        ("/", 200, False),
        ("/login", 302, True),
        ("/callback?state=unknown", 400, True),
        ("/callback?state=a&state=b", 400, True),
        ("/no-such-page", 404, False),
        ("/healthz", 200, False),
    ],
)
def test_every_answer_carries_the_security_headers(
    web: httpx.Client, path: str, status: int, no_store: bool
) -> None:
    """Pages, redirects, errors and 404s forbid framing, sniffing and referrers, and carry
    a CSP; the login and callback answers are never cached."""
    response = web.get(path)

    assert response.status_code == status
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value
    csp = {
        directive.split()[0]: directive.split()[1:]
        for directive in response.headers["content-security-policy"].split("; ")
    }
    assert csp["default-src"] == ["'none'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert "'unsafe-inline'" not in csp["style-src"]
    assert (response.headers.get("cache-control") == "no-store") is no_store


def test_callback_is_served_at_the_path_of_the_redirect_uri(
    web_host: WebHost, settings: Settings
) -> None:
    """The callback route follows LOOP_REDIRECT_URI's path, not a fixed /callback."""
    moved = settings.model_copy(update={"redirect_uri": f"{web_host.url}/oauth/loop/return"})
    services = Services.build(moved)
    web_host.app = create_app(services)
    try:
        at_path = httpx.get(f"{web_host.url}/oauth/loop/return?state=x")
        at_default = httpx.get(f"{web_host.url}/callback?state=x")
    finally:
        web_host.app = None
        services.close()

    assert at_path.status_code == 400
    assert Outline(at_path.text).h1 == ["This sign-in link is no longer valid"]
    assert at_default.status_code == 404


def test_a_redirect_uri_on_a_page_path_is_a_config_error(settings: Settings) -> None:
    """A LOOP_REDIRECT_URI whose path is /login would shadow a page: refused at start."""
    services = Services.build(
        settings.model_copy(update={"redirect_uri": "http://localhost:8000/login"})
    )
    try:
        with pytest.raises(ConfigError, match="LOOP_REDIRECT_URI"):
            create_app(services)
    finally:
        services.close()
