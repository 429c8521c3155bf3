"""The onboarding web app: translate requests to `Onboarding` calls and answers to pages.

All the security of the consent flow (state, PKCE, nonce, binding) lives in
`loop_sync.onboarding`; this module only carries the binding cookie, renders pages and
adds the headers that keep those pages from being framed, sniffed, cached or leaking
the callback URL (which holds the code) through a Referer. It never logs a query string.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from urllib.parse import urlsplit

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loop_sync.errors import ConfigError, ProviderError
from loop_sync.onboarding import SESSION_TTL, OnboardingError
from loop_sync.services import Services
from loop_sync.serving import serve_app
from loop_sync.web.pages import STYLE_HASH, error_page, home_page, success_page

COOKIE = "loop_sync_flow"
RESERVED_PATHS = frozenset({"/", "/login", "/healthz"})
CSP = "; ".join(
    (
        "default-src 'none'",
        f"style-src '{STYLE_HASH}'",
        "base-uri 'none'",
        "form-action 'none'",  # the pages have links, no forms
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
NO_STORE = {"Cache-Control": "no-store"}
log = logging.getLogger(__name__)


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every HTTP response, and no-store on `no_store_paths`."""

    def __init__(self, app: ASGIApp, no_store_paths: frozenset[str]) -> None:
        self.app = app
        self.no_store_paths = no_store_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        no_store = scope["path"] in self.no_store_paths

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.update(SECURITY_HEADERS)
                if no_store:
                    headers.update(NO_STORE)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(services: Services) -> Starlette:
    """The app: `/`, `/login`, the callback at LOOP_REDIRECT_URI's path, and `/healthz`."""
    callback_path = urlsplit(services.settings.redirect_uri).path or "/"
    if callback_path in RESERVED_PATHS:
        msg = (
            f"LOOP_REDIRECT_URI's path is {callback_path}, which the web app already serves; "
            "use another path, e.g. /callback"
        )
        raise ConfigError(msg)
    views = _Views(services)
    app = Starlette(
        routes=[
            Route("/", views.home),
            Route("/login", views.login),
            Route(callback_path, views.callback),
            Route("/healthz", views.healthz),
        ],
        middleware=[
            Middleware(SecurityHeaders, no_store_paths=frozenset({"/login", callback_path}))
        ],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    # Starlette answers /login/ with a redirect to an absolute URL built from the request's
    # Host header: an open redirect (a forged Host, or a proxy passing one on, sends the
    # browser and, for /callback/?code=..., the code to any site). Such paths are 404s.
    app.router.redirect_slashes = False
    return app


class _Views:
    """Sync endpoints (Starlette runs them in its threadpool; the library is sync)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.https_redirect = services.settings.redirect_uri.startswith("https://")

    def home(self, request: Request) -> Response:
        return HTMLResponse(home_page())

    def login(self, request: Request) -> Response:
        hint = request.query_params.get("login_hint") or None
        try:
            url, binding = self.services.onboarding.start(hint)
        except ConfigError as exc:
            log.error("cannot start a consent flow: %s", exc)
            return _page(
                "loop-sync is misconfigured",
                "The operator has been told. Please try again later.",
                500,
                retry=False,
            )
        except ProviderError as exc:
            log.warning("cannot start a consent flow: %s", exc)
            return _page("Loop cannot be reached right now", "Please try again shortly.", 503)
        response = RedirectResponse(url, status_code=302)
        response.set_cookie(
            COOKIE,
            binding,
            max_age=int(SESSION_TTL.total_seconds()),
            path="/",
            secure=self._secure(request),
            httponly=True,
            samesite="lax",
        )
        return response

    def callback(self, request: Request) -> Response:
        pairs = request.query_params.multi_items()
        params = dict(pairs)
        try:
            if len(params) != len(pairs):
                raise OnboardingError(
                    "This sign-in answer is malformed",
                    "It repeats a parameter, so it was not used. Start again.",
                )
            user_id = self.services.onboarding.finish(params, request.cookies.get(COOKIE))
        except OnboardingError as exc:
            log.info("consent callback refused: %s", exc.title)
            response = _page(exc.title, exc.message, exc.status)
        else:
            deployment = self.services.settings.onboard_deployment
            response = HTMLResponse(
                success_page(user_id),
                background=BackgroundTask(start_onboarding, deployment, user_id)
                if deployment
                else None,
            )
        response.delete_cookie(
            COOKIE, path="/", secure=self._secure(request), httponly=True, samesite="lax"
        )
        return response

    def healthz(self, request: Request) -> Response:
        try:
            with self.services.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            log.warning("health check: the database is unreachable (%s)", type(exc).__name__)
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    def _secure(self, request: Request) -> bool:
        return request.url.scheme == "https" or self.https_redirect


def _page(title: str, message: str, status: int, *, retry: bool = True) -> HTMLResponse:
    return HTMLResponse(error_page(title, message, retry=retry), status_code=status)


async def _http_error(request: Request, exc: Exception) -> Response:
    """404, 405 and the like as pages (the middleware adds the headers)."""
    status = exc.status_code if isinstance(exc, HTTPException) else 400
    headers = exc.headers if isinstance(exc, HTTPException) else None
    title = "Page not found" if status == 404 else "This request cannot be served"
    response = _page(title, "There is nothing to do at this address.", status, retry=False)
    response.headers.update(headers or {})
    return response


async def _server_error(request: Request, exc: Exception) -> Response:
    """A generic page with no detail. It is sent from outside the middleware stack, so it
    carries the security headers itself; uvicorn logs the traceback."""
    return HTMLResponse(
        error_page(
            "Something went wrong", "An unexpected error stopped this page. Please try again."
        ),
        status_code=500,
        headers={**SECURITY_HEADERS, **NO_STORE},
    )


def start_onboarding(deployment: str, user_id: str) -> None:
    """Ask Prefect for the user's first full sync (the `onboard` flow), after the page is
    sent; a failure here never undoes the consent: the nightly sync picks the user up."""
    from prefect.deployments import run_deployment  # noqa: PLC0415 (slow; only if configured)

    try:
        run_deployment(deployment, parameters={"user_id": user_id}, timeout=0)
    except Exception as exc:
        log.warning("could not start %s for %s: %s", deployment, user_id, type(exc).__name__)


def serve_web(
    services: Services, host: str, port: int, announce: Callable[[str], None] | None = None
) -> None:
    """Run the web app in the foreground until interrupted (no access log: see serving)."""
    serve_app(create_app(services), host, port, announce)
