"""The onboarding web app under attack, over real loopback HTTP against the real sandbox.

Open redirects (paths, query parameters, Host and proxy headers), state fixation and
replay, cookie and header hardening, secrets in URLs, pages and logs, and
Hypothesis-generated callback query strings. Nothing of ours is mocked: each request goes
through uvicorn to a fresh app on its own database, and Loop is the sandbox.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from html.parser import HTMLParser
from urllib.parse import parse_qsl, quote, urljoin, urlsplit

import httpx
import hypothesis
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlalchemy import update

from loop_sync.config import Settings
from loop_sync.sandbox import Sandbox
from loop_sync.schema import grant_events, grants, oauth_sessions, tokens, upgrade
from loop_sync.services import Services
from loop_sync.vault import utcnow
from loop_sync.web import create_app
from tests.web import conftest as web_fixtures
from tests.web.conftest import CLIENT_SECRET, Stored, WebHost

# The web app's fixtures, as tests/web uses them: one loopback server, a sandbox whose
# client is registered with that server's callback, and a fresh app per test.
web_host = web_fixtures.web_host
auto_approve = web_fixtures.auto_approve
sandbox_config = web_fixtures.sandbox_config
web_url = web_fixtures.web_url
web = web_fixtures.web
stored = web_fixtures.stored

# Storage behaviour runs on both dialects; what only concerns HTTP runs on SQLite.
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
COOKIE = "loop_sync_flow"
USER = "usr_0002"
ATTACKER = "usr_0001"
EVIL = "evil.example"
REFUSED = "This sign-in link is no longer valid"
MALFORMED = "This sign-in answer is malformed"
SAFE_REFERRER_POLICIES = {
    "no-referrer",
    "same-origin",
    "strict-origin",
    "strict-origin-when-cross-origin",
}
JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
TOKEN_PREFIXES = ("lph_at_", "lph_rt_")
UTF8 = st.characters(codec="utf-8")  # what a URL can carry: no lone surrogates
HYPOTHESIS = hypothesis.settings(
    deadline=None,
    # The fixtures (an app, its database, a pending flow) are set up once per test and
    # shared by its examples on purpose: no example may change what they hold.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


# --- helpers ----------------------------------------------------------------------------


class Page(HTMLParser):
    """What a browser takes from a page: its h1 headings and every URL it could follow."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.h1: list[str] = []
        self.links: list[str] = []
        self.urls: list[str] = []
        self._in_h1 = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in {"href", "src", "action", "content"} and v]
        self.links += [v for k, v in attrs if tag == "a" and k == "href" and v]
        if tag == "h1":
            self._in_h1 = True
            self.h1.append("")

    def handle_data(self, data: str) -> None:
        if self._in_h1:
            self.h1[-1] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "h1":
            self._in_h1 = False


def cookies_set(response: httpx.Response) -> dict[str, dict[str, str]]:
    """Every cookie `response` sets, by name: its value and attributes (names lower-cased)."""
    found: dict[str, dict[str, str]] = {}
    for header in response.headers.get_list("set-cookie"):
        name_value, *attributes = (part.strip() for part in header.split(";"))
        name, _, value = name_value.partition("=")
        found[name] = {"value": value}
        for attribute in attributes:
            key, _, setting = attribute.partition("=")
            found[name][key.lower()] = setting
    return found


def assert_hardened(response: httpx.Response) -> None:
    """The page cannot be framed, sends no referrer that could carry a path off-site, and
    any cookie it sets is HttpOnly and SameSite."""
    csp = {
        directive.split()[0]: directive.split()[1:]
        for directive in response.headers.get("content-security-policy", "").split(";")
        if directive.strip()
    }
    framing_blocked = csp.get("frame-ancestors") == ["'none'"] or (
        response.headers.get("x-frame-options", "").upper() == "DENY"
    )
    assert "default-src" in csp, (response.url, dict(response.headers))
    assert framing_blocked, (response.url, dict(response.headers))
    assert response.headers.get("referrer-policy") in SAFE_REFERRER_POLICIES, response.url
    for name, cookie in cookies_set(response).items():
        assert "httponly" in cookie, (name, cookie)
        assert cookie.get("samesite", "").lower() in {"lax", "strict"}, (name, cookie)


def snapshot(stored: Stored) -> dict[str, list[str]]:
    """Every row of the tables a callback could write, comparable before and after."""
    return {
        table.name: sorted(repr(dict(row)) for row in stored.rows(table))
        for table in (grants, tokens, grant_events, oauth_sessions)
    }


def login(client: httpx.Client, login_hint: str | None = None) -> str:
    """Start a consent flow in `client` (which keeps the binding cookie); Loop's URL."""
    response = client.get("/login", params={"login_hint": login_hint} if login_hint else {})
    assert response.status_code == 302, response.text
    return response.headers["location"]


def consent_at_loop(authorize_url: str) -> str:
    """Loop (auto-approve) answers the authorize URL with the callback URL it redirects to."""
    answer = httpx.get(authorize_url, follow_redirects=False)
    assert answer.status_code == 302, answer.text
    return answer.headers["location"]


def query_of(url: str) -> dict[str, str]:
    pairs = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    assert len(pairs) == len(dict(pairs)), f"a repeated parameter in {url}"
    return dict(pairs)


def browser_target(location: str, base: str) -> tuple[str, str, int | None, str]:
    """Where a browser goes for a Location header: (scheme, host, port, path).

    Follows the WHATWG URL rules that make open redirects: leading and trailing controls
    and spaces are stripped, tabs and newlines dropped, a backslash is a slash in http(s)
    URLs, and `https:evil.example` (no slashes) names a host unless it is the base's scheme.
    """
    controls = "".join(map(chr, range(0x21)))
    cleaned = re.sub(r"[\t\n\r]", "", location.strip(controls)).replace("\\", "/")
    scheme, colon, rest = cleaned.partition(":")
    base_scheme = urlsplit(base).scheme
    if colon and scheme.lower() in {"http", "https"} and not rest.startswith("//"):
        cleaned = rest if scheme.lower() == base_scheme else f"{scheme}://{rest.lstrip('/')}"
    parts = urlsplit(urljoin(base, cleaned))
    return parts.scheme, parts.hostname or "", parts.port, parts.path


def assert_redirect_stays_home(
    response: httpx.Response, app_url: str, authorize_endpoint: str
) -> None:
    """A Location, if any, is the app itself or exactly Loop's authorize endpoint."""
    location = response.headers.get("location")
    if location is None:
        return
    target = browser_target(location, app_url)
    home = browser_target(app_url, app_url)
    authorize = browser_target(authorize_endpoint, app_url)
    assert target[:3] == home[:3] or target == authorize, (location, target)


@pytest.mark.parametrize(
    "location",
    [
        f"http://{EVIL}/login",
        f"https://{EVIL}",
        f"//{EVIL}/login",
        f"/\\{EVIL}/",
        f"\\\\{EVIL}",
        f" //{EVIL}",
        f"/\t/{EVIL}",
        f"https:{EVIL}",
        f"https:/{EVIL}",
        f"http://localhost@{EVIL}/",
        "javascript:alert(1)",
    ],
)
def test_the_redirect_check_sees_where_a_browser_would_go(location: str) -> None:
    """Location values a browser follows to another site are caught by the redirect
    check these tests rely on, while the app's own paths pass it."""
    app_url = "http://localhost:8000"
    authorize = "http://127.0.0.1:9000/v1/oauth/authorize"
    assert_redirect_stays_home(
        httpx.Response(302, headers={"location": "/login?next=%2F%2Fx"}), app_url, authorize
    )
    assert_redirect_stays_home(
        httpx.Response(302, headers={"location": f"{authorize}?state=s"}), app_url, authorize
    )

    with pytest.raises(AssertionError):
        assert_redirect_stays_home(
            httpx.Response(302, headers={"location": location}), app_url, authorize
        )


def fetch(
    client: httpx.Client, target: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    """GET the exact request-target `target` (not normalised) with only `headers` and no
    cookie but those in them."""
    client.cookies.clear()
    return client.get(client.base_url.copy_with(raw_path=target.encode()), headers=headers)


@pytest.fixture
def raw(web_url: str) -> Iterator[httpx.Client]:
    """A client of the app for `fetch`: sends what it is told, never follows redirects."""
    with httpx.Client(base_url=web_url, follow_redirects=False, timeout=10) as client:
        yield client


# --- 1. open redirects ------------------------------------------------------------------

EVIL_VALUES = [
    f"//{EVIL}",
    f"///{EVIL}/login",
    f"https:{EVIL}",
    f"http:{EVIL}",
    f"/\\{EVIL}",
    f"\\\\{EVIL}",
    f"http:\\\\{EVIL}",
    f"https://{EVIL}/callback",
    f"https://localhost@{EVIL}/",
    f"%2F%2F{EVIL}",
    f"/%2F{EVIL}",
    f"\t//{EVIL}",
    f" //{EVIL}",
    "javascript:alert(1)",
    f"data:text/html,<a href=//{EVIL}>x</a>",
]
AUTHORIZE_PARAMS = {
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
    "nonce",
    "login_hint",
}
REDIRECT_PARAMS = ["next", "return_to", "returnTo", "redirect", "redirect_uri", "url", "continue"]
PATH_TARGETS = [
    "/",
    "/login",
    "/login/",
    "/callback",
    "/callback/",
    "/callback/?code=c0de&state=st4te",
    "/healthz/",
    "/no-such-page/",
    f"//{EVIL}",
    f"//{EVIL}/",
    f"//{EVIL}/login",
    f"//{EVIL}/login/",
    f"///{EVIL}/login/",
    f"/\\{EVIL}",
    f"/\\{EVIL}/",
    f"/\\/{EVIL}/login/",
    f"/%2F%2F{EVIL}/",
    f"/%2f%2f{EVIL}/login/",
    f"/%5C{EVIL}/",
    f"/%5C%5C{EVIL}/login/",
    f"/https:{EVIL}/",
    f"/https://{EVIL}/",
    f"/https:%2F%2F{EVIL}/",
    f"/%09/{EVIL}/",
    f"/.%2E/{EVIL}/",
    f"/login/?next=//{EVIL}",
    f"/login//{EVIL}/",
]
HOST_TRICKS: dict[str, Callable[[str], dict[str, str]]] = {
    "genuine host": lambda host: {},
    "evil Host": lambda host: {"host": EVIL},
    "evil Host with port": lambda host: {"host": f"{EVIL}:443"},
    "userinfo Host": lambda host: {"host": f"{host}@{EVIL}"},
    "X-Forwarded-Host": lambda host: {"x-forwarded-host": EVIL},
    "evil Host over forwarded https": lambda host: {"host": EVIL, "x-forwarded-proto": "https"},
    "Forwarded": lambda host: {"forwarded": f"host={EVIL};proto=https"},
    "X-Original-URL": lambda host: {"x-original-url": f"//{EVIL}/", "x-rewrite-url": f"//{EVIL}/"},
}


def redirect_attempts() -> list[str]:
    """Request-targets that try to make the app redirect off-site via a query parameter."""
    attempts = [
        f"{route}?{param}={quote(value, safe='')}"
        for route in ("/login", "/callback")
        for param in REDIRECT_PARAMS
        for value in EVIL_VALUES
    ]
    attempts += [f"/login?login_hint={quote(value, safe='')}" for value in EVIL_VALUES]
    attempts += [
        f"/login?login_hint=x{quote(f'&redirect_uri=https://{EVIL}/cb', safe='')}",
        f"/login?login_hint=x%0D%0ALocation:%20https://{EVIL}/",
        f"/login?redirect_uri=https://{EVIL}/cb&redirect_uri=//{EVIL}",
        f"/callback?state=x&code=c&redirect_uri=//{EVIL}&iss=https://{EVIL}",
    ]
    return attempts


@SQLITE_ONLY
@pytest.mark.parametrize("trick", list(HOST_TRICKS))
def test_no_path_or_host_trick_redirects_off_site(
    web_url: str, raw: httpx.Client, services: Services, trick: str
) -> None:
    """No crafted path, Host or proxy header makes the app send a browser to another site."""
    authorize = services.oidc.metadata().authorization_endpoint
    headers = HOST_TRICKS[trick](urlsplit(web_url).netloc)
    targets = PATH_TARGETS + (redirect_attempts() if trick in {"genuine host", "evil Host"} else [])

    for target in targets:
        response = fetch(raw, target, headers)

        assert response.status_code < 500, (target, response.status_code)
        assert_redirect_stays_home(response, web_url, authorize)
        assert_hardened(response)


@SQLITE_ONLY
def test_login_redirects_only_to_loops_authorize_endpoint_with_our_callback(
    raw: httpx.Client, services: Services
) -> None:
    """/login sends the browser to Loop's authorize endpoint with our registered callback,
    whatever redirect-like parameters the request carries."""
    authorize = services.oidc.metadata().authorization_endpoint
    attempts = [target for target in redirect_attempts() if target.startswith("/login")]

    for target in attempts:
        response = fetch(raw, target)

        assert response.status_code == 302, target
        location = response.headers["location"]
        assert location.startswith(f"{authorize}?"), (target, location)
        params = query_of(location)
        assert params["redirect_uri"] == services.settings.redirect_uri, target
        assert set(params) <= AUTHORIZE_PARAMS, target


@SQLITE_ONLY
@hypothesis.settings(HYPOTHESIS, max_examples=60)
@given(
    hint=st.text(UTF8, max_size=300),
    extra=st.lists(st.tuples(st.sampled_from(REDIRECT_PARAMS), st.text(UTF8, max_size=50))),
)
def test_login_hint_cannot_steer_the_redirect(
    web: httpx.Client,
    services: Services,
    settings: Settings,
    hint: str,
    extra: list[tuple[str, str]],
) -> None:
    """Whatever login_hint and redirect parameters /login gets, Loop's authorize endpoint
    is where the browser goes, with our callback and the hint passed on verbatim."""
    authorize = services.oidc.metadata().authorization_endpoint

    response = web.get("/login", params=[("login_hint", hint), *extra])

    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(f"{authorize}?")
    params = query_of(location)
    assert params["redirect_uri"] == settings.redirect_uri
    assert set(params) <= AUTHORIZE_PARAMS
    assert params.get("login_hint", "") == hint


# --- 2. state fixation ------------------------------------------------------------------


@pytest.fixture
def other_browser(web_url: str) -> Iterator[httpx.Client]:
    """A second browser, with its own cookie jar (an attacker's, or a victim's)."""
    with httpx.Client(base_url=web_url, follow_redirects=False, timeout=10) as client:
        yield client


FIXATIONS = [
    "another browser's state",
    "the attacker's own consented flow",
    "replayed after success",
    "forged binding cookie",
    "missing binding cookie",
    "expired session",
    "this browser's older flow's cookie",
    "empty state",
    "a state that differs by one character",
]


@pytest.mark.parametrize("attack", FIXATIONS)
def test_a_callback_this_browser_did_not_start_is_refused(
    web: httpx.Client,
    other_browser: httpx.Client,
    sandbox: Sandbox,
    stored: Stored,
    attack: str,
) -> None:
    """A callback whose state this browser's cookie did not start shows the 400 'no longer
    valid' page, stores nothing and never reaches Loop's token endpoint; when someone else
    sent it, the person's own pending flow still connects them afterwards."""
    victim_callback = consent_at_loop(login(web, USER))
    victim_state = query_of(victim_callback)["state"]
    victim_cookie = web.cookies[COOKIE]
    callback, browser = victim_callback, web
    if attack == "another browser's state":
        login(other_browser, ATTACKER)  # the other browser has a pending flow of its own
        browser = other_browser
    elif attack == "the attacker's own consented flow":
        callback = consent_at_loop(login(other_browser, ATTACKER))
    elif attack == "replayed after success":
        assert web.get(victim_callback).status_code == 200
        web.cookies.set(COOKIE, victim_cookie)
    elif attack == "forged binding cookie":
        web.cookies.set(COOKIE, secrets.token_urlsafe(32))
    elif attack == "missing binding cookie":
        web.cookies.clear()
    elif attack == "expired session":
        with stored.engine.begin() as connection:
            connection.execute(
                update(oauth_sessions).values(expires_at=utcnow() - timedelta(seconds=1))
            )
    elif attack == "this browser's older flow's cookie":
        callback = consent_at_loop(login(web, USER))  # a newer flow replaces the cookie
        web.cookies.set(COOKIE, victim_cookie)
    elif attack == "empty state":
        callback = victim_callback.replace(f"state={victim_state}", "state=")
    elif attack == "a state that differs by one character":
        flipped = victim_state[:-1] + ("A" if victim_state[-1] != "A" else "B")
        callback = victim_callback.replace(victim_state, flipped)
    before = snapshot(stored)
    exchanges = sandbox.counters.requests["token"]

    response = browser.get(callback)

    assert response.status_code == 400
    assert Page(response.text).h1 == [REFUSED]
    assert_hardened(response)
    assert snapshot(stored) == before
    assert sandbox.counters.requests["token"] == exchanges
    if attack in {"another browser's state", "the attacker's own consented flow"}:
        # The attack did not use up the person's own flow: with their cookie, it connects.
        with httpx.Client(cookies={COOKIE: victim_cookie}, timeout=10) as person:
            assert person.get(victim_callback).status_code == 200
        assert [grant["user_id"] for grant in stored.grants()] == [USER]


def test_the_genuine_state_with_another_flows_code_stores_nothing(
    web: httpx.Client, other_browser: httpx.Client, sandbox: Sandbox, stored: Stored
) -> None:
    """An attacker's code pasted into this browser's genuine callback (code injection) is
    refused by PKCE: a 400 page, no grant, no token."""
    victim_state = query_of(consent_at_loop(login(web, USER)))["state"]
    attacker_code = query_of(consent_at_loop(login(other_browser, ATTACKER)))["code"]

    response = web.get("/callback", params={"code": attacker_code, "state": victim_state})

    assert response.status_code == 400
    assert Page(response.text).h1 == [REFUSED]
    assert sandbox.counters.requests["token"] == 1  # Loop saw it, and refused the verifier
    assert stored.grants() == []
    assert stored.tokens() == []
    assert stored.events() == []


def test_concurrent_replays_of_one_callback_connect_once(
    web: httpx.Client, sandbox: Sandbox, stored: Stored
) -> None:
    """Eight simultaneous copies of one genuine callback: exactly one success page, the
    rest refused with a 400 page (none a 500), one grant and one code exchange."""
    callback = consent_at_loop(login(web, USER))
    cookie = web.cookies[COOKIE]
    barrier = threading.Barrier(8)

    def replay(_: int) -> int:
        with httpx.Client(cookies={COOKIE: cookie}, timeout=10) as client:
            barrier.wait()
            return client.get(callback).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = sorted(pool.map(replay, range(8)))

    assert statuses == [200] + [400] * 7
    assert sandbox.counters.requests["token"] == 1
    assert [grant["user_id"] for grant in stored.grants()] == [USER]
    assert len(stored.tokens()) == 1
    assert len(stored.events()) == 1


# --- 3. cookies -------------------------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("served_over", "secure"),
    [
        ("http", False),
        ("https redirect uri", True),
        ("X-Forwarded-Proto https from a loopback proxy", True),
        ("https redirect uri, proxy says http", True),
    ],
)
def test_flow_cookies_are_httponly_samesite_and_secure_over_https(
    web_host: WebHost, settings: Settings, served_over: str, secure: bool
) -> None:
    """The binding cookie, as set by /login and as cleared by the callback, is HttpOnly
    and SameSite=Lax, and Secure exactly when the app is served over https."""
    if served_over.startswith("https redirect uri"):
        settings = settings.model_copy(update={"redirect_uri": "https://loop-sync.example/cb"})
    headers = {}
    if served_over.startswith("X-Forwarded-Proto"):
        headers = {"x-forwarded-proto": "https"}
    elif served_over.endswith("proxy says http"):
        headers = {"x-forwarded-proto": "http"}
    services = Services.build(settings)
    upgrade(services.engine)
    callback = urlsplit(settings.redirect_uri).path
    web_host.app = create_app(services)
    try:
        with httpx.Client(base_url=web_host.url, headers=headers, timeout=10) as client:
            set_by_login = client.get("/login")
            cleared_by_callback = client.get(callback, params={"state": "unknown"})
    finally:
        web_host.app = None
        services.close()

    assert set_by_login.status_code == 302
    assert cleared_by_callback.status_code == 400
    for response, max_age in ((set_by_login, "600"), (cleared_by_callback, "0")):
        cookie = cookies_set(response)[COOKIE]
        assert cookie["max-age"] == max_age
        assert "httponly" in cookie
        assert cookie["samesite"].lower() == "lax"
        assert ("secure" in cookie) is secure, (served_over, cookie)
        assert cookie["path"] == "/"
        assert "domain" not in cookie


# --- 4. headers on every answer ---------------------------------------------------------


ANSWERS = {
    "home page": 200,
    "HEAD of the home page": 200,
    "login redirect": 302,
    "login with Loop down": 503,
    "success page": 200,
    "refused callback": 400,
    "malformed callback": 400,
    "callback after an internal error": 500,
    "unknown page": 404,
    "trailing-slash address": 404,
    "wrong method": 405,
    "healthz": 200,
    "healthz without a database": 503,
}


@SQLITE_ONLY
@pytest.mark.parametrize("answer", list(ANSWERS))
def test_every_answer_forbids_framing_and_referrers(
    web: httpx.Client, web_host: WebHost, sandbox: Sandbox, services: Services, answer: str
) -> None:
    """Pages, redirects, errors, 404s, 405s and health checks all carry a CSP with
    frame-ancestors 'none' and a Referrer-Policy that sends no path off-site."""
    if answer == "home page":
        response = web.get("/")
    elif answer == "HEAD of the home page":
        response = web.head("/")
    elif answer == "login redirect":
        response = web.get("/login")
    elif answer == "login with Loop down":
        sandbox.set_knobs(error_rates={"discovery": 1.0})
        response = web.get("/login")
    elif answer == "success page":
        response = web.get(consent_at_loop(login(web, USER)))
    elif answer == "refused callback":
        response = web.get("/callback", params={"state": "unknown", "code": "x"})
    elif answer == "malformed callback":
        response = web.get("/callback?state=a&state=b")
    elif answer == "callback after an internal error":
        callback = consent_at_loop(login(web, USER))
        tokens.drop(services.engine)
        response = web.get(callback)
    elif answer == "unknown page":
        response = web.get("/no-such-page")
    elif answer == "trailing-slash address":
        response = web.get("/login/")
    elif answer == "wrong method":
        response = web.post("/login")
    elif answer == "healthz":
        response = web.get("/healthz")
    else:
        broken = Services.build(
            services.settings.model_copy(
                update={"database_url": SecretStr("sqlite:////nonexistent-dir/x.db")}
            )
        )
        web_host.app = create_app(broken)
        try:
            response = web.get("/healthz")
        finally:
            broken.close()

    assert response.status_code == ANSWERS[answer]
    assert_hardened(response)


# --- 5. secrets never in URLs, pages, cookies or logs -----------------------------------


def test_a_full_consent_shows_no_token_in_any_url_page_or_log(
    web: httpx.Client,
    sandbox: Sandbox,
    services: Services,
    stored: Stored,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Through a whole consent, no URL the app serves or redirects to, no link, page body,
    cookie or log line of the app holds a token, id_token, PKCE verifier or the client
    secret; the code is only in the callback URL Loop sends the browser to."""
    caplog.set_level(logging.DEBUG)
    home = web.get("/")
    [link] = Page(home.text).links
    to_loop = web.get(link)
    callback_url = consent_at_loop(to_loop.headers["location"])
    connected = web.get(callback_url)

    assert (home.status_code, to_loop.status_code, connected.status_code) == (200, 302, 200)
    assert Page(connected.text).h1 == ["Your Loop account is connected"]
    assert str(connected.url) == callback_url
    [session] = stored.sessions()
    verifier = services.cipher.decrypt(session["code_verifier"])
    code = query_of(callback_url)["code"]
    issued_tokens = [s for s in sandbox.authority.issued_secrets if s.startswith(TOKEN_PREFIXES)]
    assert len(issued_tokens) == 2  # an access token and a refresh token
    never = [*issued_tokens, verifier, CLIENT_SECRET, *TOKEN_PREFIXES]
    places: dict[str, str] = {}
    for response in (home, to_loop, connected):
        where = str(response.url)
        places[f"URL {where}"] = where
        places[f"Location from {where}"] = response.headers.get("location", "")
        places[f"Set-Cookie from {where}"] = " ".join(response.headers.get_list("set-cookie"))
        places[f"page at {where}"] = response.text
        for url in Page(response.text).urls:
            places[f"link {url!r} on {where}"] = url
    main_thread = threading.main_thread().ident  # the test's own client logs there
    for n, record in enumerate(caplog.records):
        if record.thread != main_thread and not record.name.startswith("loop_sync.sandbox"):
            places[f"log line {n} of {record.name}"] = record.getMessage()
    assert any(place.startswith("log line") for place in places)

    leaks = [(place, s[:12]) for place, text in places.items() for s in never if s in text]
    leaks += [(place, "a JWT") for place, text in places.items() if JWT.search(text)]
    leaks += [(place, "the code") for place, text in places.items() if code in text]
    assert leaks == [("URL " + callback_url, "the code")]


# --- 6. generated callback query strings ------------------------------------------------

JUNK = st.sampled_from(
    ["", "%", "%2", "%zz", "%00", "%ff", "%C0%AF", "%uFFFF", "+", "%2B", "%26", "%3D", "=", "==",
     ";", "%25", "%E2%80%AE", "%F0%9F%92%A9", "%ED%A0%80", "%0D%0A", "'", '"', "<", ">", "\\",
     "..%2F", "%2F%2Fevil.example", "%3Cscript%3E"]
)  # fmt: skip
KEYS = st.sampled_from(
    ["code", "state", "error", "error_description", "error_uri", "iss", "session_state",
     "scope", "redirect_uri", "next", "", "STATE", "state[]", "cOdE", "state%00", "code%20"]
)  # fmt: skip
ERRORS = st.sampled_from(
    ["access_denied", "server_error", "temporarily_unavailable", "invalid_request",
     "invalid_scope", "login_required", "A", "x" * 65, "<script>", "access_denied "]
)  # fmt: skip
MAX_QUERY = 14_000  # uvicorn (h11) answers longer request heads itself; see the test below


def encoded(value: str) -> str:
    return quote(value, safe="")


VALUES = st.one_of(
    st.text(UTF8, max_size=40).map(encoded),
    st.lists(JUNK, min_size=1, max_size=6).map("".join),
    ERRORS.map(encoded),
    st.integers(min_value=1_000, max_value=6_000).map(lambda n: "A" * n),
)
ANSWER_KEYS = st.sampled_from(["error", "error_description", "error_uri", "iss", "scope"])


def joined(draw: st.DrawFn, pairs: list[tuple[str, str]]) -> str:
    """`pairs` as a query string, in any order, with odd separators and bare keys."""
    pairs = draw(st.permutations(pairs))
    separator = draw(st.sampled_from(["&", "&", "&", ";", "&&"]))
    bare = draw(st.booleans())  # `key` rather than `key=` for empty values
    query = separator.join(k if bare and not v else f"{k}={v}" for k, v in pairs)
    hypothesis.assume(len(query) <= MAX_QUERY)
    return query


@st.composite
def callback_queries(draw: st.DrawFn, genuine_state: str) -> str:
    """A callback query string as an attacker, a broken proxy or a confused Loop might send
    it: any keys, values and encodings, repeats, huge, empty and missing values. Its state,
    if any, is never the genuine one (near misses of it are drawn on purpose)."""
    near_misses = st.sampled_from(
        [
            genuine_state + "x",
            genuine_state[:-1],
            genuine_state.swapcase(),
            genuine_state[::-1],
            f" {genuine_state}",
            genuine_state * 2,
        ]
    ).filter(lambda value: value != genuine_state)
    value = VALUES | near_misses.map(encoded)
    if draw(st.booleans()):  # what Loop sends, with each part damaged, missing or repeated
        names = ["code"] * draw(st.integers(0, 2)) + ["state"] * draw(st.integers(0, 2))
        names += draw(st.lists(ANSWER_KEYS, unique=True))
    else:  # anything at all
        key = st.one_of(KEYS, st.text(UTF8, min_size=1, max_size=10).map(encoded))
        names = draw(st.lists(key, max_size=8))
    return joined(draw, [(name, draw(value)) for name in names])


@st.composite
def answers_to(draw: st.DrawFn, genuine_state: str) -> str:
    """A callback carrying the genuine state with anything else: a junk or missing code,
    any error, error_description or iss, extra keys, and sometimes a repeated key."""
    names = ["code"] * draw(st.integers(0, 1)) + draw(st.lists(ANSWER_KEYS, unique=True))
    names += draw(st.lists(KEYS, max_size=1))  # may repeat a key
    pairs = [("state", encoded(genuine_state))] + [(name, draw(VALUES)) for name in names]
    return joined(draw, pairs)


@pytest.fixture
def pending_flow(web: httpx.Client) -> tuple[str, str]:
    """This browser's pending consent flow: its genuine state and its binding cookie."""
    state = query_of(login(web))["state"]
    return state, web.cookies[COOKIE]


@pytest.fixture
def refusal_pages(web_url: str) -> set[str]:
    """The app's two fixed 400 pages: for an unknown state, and for a repeated parameter."""
    with httpx.Client(base_url=web_url) as client:
        expired = client.get("/callback?state=x")
        malformed = client.get("/callback?state=a&state=b")
    assert Page(expired.text).h1 == [REFUSED]
    assert Page(malformed.text).h1 == [MALFORMED]
    return {expired.text, malformed.text}


@hypothesis.settings(HYPOTHESIS, max_examples=250)
@given(data=st.data())
def test_any_callback_query_is_a_4xx_page_that_stores_nothing(
    raw: httpx.Client,
    sandbox: Sandbox,
    stored: Stored,
    pending_flow: tuple[str, str],
    refusal_pages: set[str],
    *,
    data: st.DataObject,
) -> None:
    """A callback with any generated query string (sent with this browser's genuine
    binding cookie) gets a fixed 4xx refusal page, never a 500 or a success page, and
    changes nothing in the database."""
    genuine_state, binding = pending_flow
    query = data.draw(callback_queries(genuine_state), label="query")
    before = snapshot(stored)

    response = fetch(raw, f"/callback?{query}", {"cookie": f"{COOKIE}={binding}"})

    assert 400 <= response.status_code < 500, response.status_code
    assert response.text in refusal_pages
    hypothesis.event(Page(response.text).h1[0])  # how many hit each refusal
    assert_hardened(response)
    assert snapshot(stored) == before
    assert sandbox.counters.requests["token"] == 0


@SQLITE_ONLY
def test_an_oversized_callback_is_refused_without_a_500(
    raw: httpx.Client, stored: Stored, pending_flow: tuple[str, str]
) -> None:
    """A callback URL far longer than any proxy passes (60 kB) is a 4xx and stores
    nothing."""
    _, binding = pending_flow
    before = snapshot(stored)
    huge = f"/callback?state={'s' * 30_000}&code={'c' * 30_000}"

    response = fetch(raw, huge, {"cookie": f"{COOKIE}={binding}"})

    assert 400 <= response.status_code < 500
    assert snapshot(stored) == before


@hypothesis.settings(HYPOTHESIS, max_examples=60)
@given(data=st.data())
def test_the_genuine_state_with_any_other_answer_stores_no_grant(
    web: httpx.Client, raw: httpx.Client, sandbox: Sandbox, stored: Stored, *, data: st.DataObject
) -> None:
    """A callback with this browser's genuine state and cookie but a junk, missing or
    refused answer (any code, error, error_description, iss) is a 4xx page, never a
    500 or a success page; no grant or token is stored, and the flow cannot be reused."""
    genuine_state = query_of(login(web))["state"]
    binding = web.cookies[COOKIE]
    query = data.draw(answers_to(genuine_state), label="query")
    before = {name: rows for name, rows in snapshot(stored).items() if name != "oauth_sessions"}

    response = fetch(raw, f"/callback?{query}", {"cookie": f"{COOKIE}={binding}"})

    assert 400 <= response.status_code < 500, response.status_code
    [title] = Page(response.text).h1
    hypothesis.event(title)
    assert title != "Your Loop account is connected"
    assert_hardened(response)
    assert {name: rows for name, rows in snapshot(stored).items() if name in before} == before
    assert stored.grants() == []
    if title != MALFORMED:  # a malformed answer is refused before the flow is looked up
        replay = fetch(raw, f"/callback?{query}", {"cookie": f"{COOKIE}={binding}"})
        assert Page(replay.text).h1 == [REFUSED]
