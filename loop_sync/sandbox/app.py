"""The sandbox as an ASGI app: identity and clinical API on one origin, plus `/_sandbox`.

`/_sandbox/*` is not part of Loop. It lets tests and benchmarks in other processes turn
knobs, advance the clock and read counters and ground truth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from urllib.parse import parse_qsl

import orjson
from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from loop_sync import contract
from loop_sync.sandbox.authority import (
    SCOPES_SUPPORTED,
    Authority,
    AuthorizationRequest,
    AuthorizePageError,
    Client,
    OAuthError,
    RedirectError,
    user_ids,
)
from loop_sync.sandbox.clock import Clock
from loop_sync.sandbox.counters import Counters
from loop_sync.sandbox.data import SyntheticResults
from loop_sync.sandbox.faults import DroppedResponse, Faults, error_response
from loop_sync.sandbox.knobs import Endpoint, Knobs
from loop_sync.sandbox.pages import consent_page, error_page

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
FORM_TYPE = "application/x-www-form-urlencoded"
# Each cached user costs ~80 kB at 100 results; a sweep over more users than the cache
# holds regenerates every user, so cache all of them up to this many.
RESULTS_CACHE_MAX_USERS = 10_000


class SandboxClient(BaseSettings):
    """The one app registered with the sandbox: the quickstart's env vars, demo defaults."""

    model_config = SettingsConfigDict(env_prefix="LOOP_", env_file=".env", extra="ignore")

    client_id: str = "loop-sync-demo"
    client_secret: str = "demo-secret-for-the-local-sandbox-only"  # noqa: S105
    redirect_uri: str = "http://localhost:8000/callback"


@dataclass
class SandboxConfig:
    users: int = 25
    seed: int = 1
    results_per_user: int = 40
    knobs: Knobs = field(default_factory=Knobs)
    client: SandboxClient = field(default_factory=SandboxClient)
    frozen_clock: bool = False  # time moves only when advanced: for runs a test compares
    pregenerate: bool = False  # every user's results made at start (`SyntheticResults.generate`)


class Sandbox:
    """A stand-in for Loop's identity and clinical hosts, with fault knobs."""

    def __init__(self, config: SandboxConfig, issuer: str) -> None:
        self.config = config
        self.issuer = issuer.rstrip("/")
        self.clock = Clock(frozen=config.frozen_clock)
        self.counters = Counters()
        self.knobs = config.knobs.model_copy(deep=True)
        self.authority = Authority(
            issuer=self.issuer,
            users=config.users,
            seed=config.seed,
            clock=self.clock,
            knobs=lambda: self.knobs,
            counters=self.counters,
        )
        self.authority.register_client(
            Client(
                config.client.client_id,
                config.client.client_secret,
                (config.client.redirect_uri,),
            )
        )
        self.results = SyntheticResults(
            config.seed,
            self.clock.now(),
            config.results_per_user,
            cache_size=max(1, min(config.users, RESULTS_CACHE_MAX_USERS)),
        )
        if config.pregenerate:
            self.results.generate(user_ids(config.users))
        self.faults = Faults(lambda: self.knobs, self.counters, self.clock, config.seed)
        self._routed = Starlette(routes=self._routes(), exception_handlers={404: _not_found})
        self.app: ASGIApp = self._counted

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app; `counters.in_flight` holds each request, by path, until the sandbox
        is done with it (answered, dropped, or abandoned by a client that went away), so a
        test can act while Loop holds a request and know when Loop is idle again."""
        if scope["type"] != "http":
            await self._routed(scope, receive, send)
            return
        path = str(scope["path"])
        self.counters.count("in_flight", path)
        try:
            await self._routed(scope, receive, send)
        finally:
            self.counters.count("in_flight", path, -1)

    def set_knobs(self, **changes: Any) -> Knobs:
        self.knobs = self.knobs.update(changes)
        return self.knobs

    def truth(self, user_id: str) -> list[dict[str, Any]]:
        """What Loop holds for the user right now, without paging or faults."""
        return self.results.records(user_id, self.clock.now())

    def discovery(self) -> dict[str, Any]:
        base = self.issuer
        document = {
            "issuer": base,
            "authorization_endpoint": f"{base}/v1/oauth/authorize",
            "token_endpoint": f"{base}/v1/oauth/token",
            "revocation_endpoint": f"{base}/v1/oauth/revoke",
            "introspection_endpoint": f"{base}/v1/oauth/introspect",
            "jwks_uri": f"{base}/.well-known/jwks.json",
            "response_types_supported": ["code"],
            "grant_types_supported": [
                contract.GRANT_AUTHORIZATION_CODE,
                contract.GRANT_REFRESH_TOKEN,
            ],
            "token_endpoint_auth_methods_supported": [contract.CLIENT_AUTH_METHOD],
            "revocation_endpoint_auth_methods_supported": [contract.CLIENT_AUTH_METHOD],
            "introspection_endpoint_auth_methods_supported": [contract.CLIENT_AUTH_METHOD],
            "code_challenge_methods_supported": [contract.PKCE_METHOD],
            "scopes_supported": list(SCOPES_SUPPORTED),
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["EdDSA"],
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nonce", "name", "brand"],
        }
        if not self.knobs.advertise_introspection:
            del document["introspection_endpoint"]
            del document["introspection_endpoint_auth_methods_supported"]
        return document

    def _routes(self) -> list[Route]:
        return [
            Route(contract.DISCOVERY_PATH, self._discovery),
            Route("/.well-known/jwks.json", self._jwks),
            Route("/v1/oauth/authorize", self._authorize, methods=["GET"]),
            Route("/v1/oauth/authorize", self._decide, methods=["POST"]),
            Route("/v1/oauth/token", self._token, methods=["POST"]),
            Route("/v1/oauth/revoke", self._revoke, methods=["POST"]),
            Route("/v1/oauth/introspect", self._introspect, methods=["POST"]),
            Route(contract.BIOMARKERS_PATH, self._biomarkers),
            Route("/_sandbox/knobs", self._admin_knobs, methods=["GET", "PATCH"]),
            Route("/_sandbox/counters", self._admin_counters),
            Route("/_sandbox/clock", self._admin_clock, methods=["GET", "POST"]),
            Route("/_sandbox/users/{user_id}/results", self._admin_truth),
            Route("/_sandbox/secrets", self._admin_secrets),
        ]

    # --- identity ------------------------------------------------------------------

    async def _discovery(self, request: Request) -> Response:
        return await self._served("discovery", lambda: JSONResponse(self.discovery()))

    async def _jwks(self, request: Request) -> Response:
        keys = {"keys": [self.authority.key.as_dict(private=False)]}
        return await self._served("jwks", lambda: JSONResponse(keys))

    async def _served(self, endpoint: Endpoint, build: Callable[[], Response]) -> Response:
        self.counters.count("requests", endpoint)
        await self.faults.delay(endpoint)
        return self.faults.server_error(endpoint, oauth=True) or build()

    async def _authorize(self, request: Request) -> Response:
        self.counters.count("requests", "authorize")
        await self.faults.delay("authorize")
        try:
            auth = self.authority.check_authorization(dict(request.query_params))
        except AuthorizePageError as exc:
            return HTMLResponse(error_page(str(exc)), status_code=400)
        except RedirectError as exc:
            return RedirectResponse(exc.location, status_code=302)
        if self.knobs.auto_approve:
            user = auth.login_hint or user_ids(1)[0]
            return RedirectResponse(self.authority.approve(auth, user), status_code=302)
        return HTMLResponse(consent_page(self.authority.hold(auth), auth))

    async def _decide(self, request: Request) -> Response:
        body = (await request.body()).decode()
        form = parse_qsl(body, keep_blank_values=True)
        values = dict(form)
        auth: AuthorizationRequest | None = self.authority.pending(values.get("request_id", ""))
        if auth is None:
            return HTMLResponse(
                error_page("This consent request expired. Start again from the app."), 400
            )
        if values.get("decision") != "allow":
            return RedirectResponse(self.authority.deny(auth), status_code=302)
        scopes = tuple(v for k, v in form if k == "scope")
        try:
            location = self.authority.approve(auth, values.get("user", ""), scopes)
        except AuthorizePageError as exc:
            return HTMLResponse(error_page(str(exc)), status_code=400)
        return RedirectResponse(location, status_code=302)

    async def _token(self, request: Request) -> Response:
        self.counters.count("requests", "token")
        await self.faults.delay("token")
        try:
            form = await _read_form(request)
        except OAuthError as exc:
            return _oauth_error(exc)
        failed = self.faults.throttle(
            form.get("client_id", ""), oauth=True
        ) or self.faults.server_error("token", oauth=True)
        if failed:
            return failed
        try:
            user_id, body = self.authority.token(form)
        except OAuthError as exc:
            return _oauth_error(exc)
        if form.get("grant_type") == contract.GRANT_REFRESH_TOKEN:
            if self.faults.lose_refresh(user_id):
                return DroppedResponse()
            await self.faults.hold_refresh_answer()
        return JSONResponse(body, headers=NO_STORE)

    async def _revoke(self, request: Request) -> Response:
        return await self._client_call(request, "revoke")

    async def _introspect(self, request: Request) -> Response:
        return await self._client_call(request, "introspect")

    async def _client_call(
        self, request: Request, endpoint: Literal["revoke", "introspect"]
    ) -> Response:
        self.counters.count("requests", endpoint)
        await self.faults.delay(endpoint)
        try:
            form = await _read_form(request)
            failed = self.faults.throttle(
                form.get("client_id", ""), oauth=True
            ) or self.faults.server_error(endpoint, oauth=True)
            if failed:
                return failed
            if endpoint == "revoke":
                self.authority.revoke(form)
                return Response(status_code=200)
            return JSONResponse(self.authority.introspect(form), headers=NO_STORE)
        except OAuthError as exc:
            return _oauth_error(exc)

    # --- clinical API --------------------------------------------------------------

    async def _biomarkers(self, request: Request) -> Response:
        self.counters.count("requests", "biomarkers")
        await self.faults.delay("biomarkers")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        grant = self.authority.bearer(token) if scheme.lower() == "bearer" else None
        client_key = grant.client_id if grant else "anonymous"
        failed = self.faults.throttle(client_key, oauth=False) or self.faults.server_error(
            "biomarkers", oauth=False
        )
        if failed:
            return failed
        if grant is None:
            return _bearer_error(401, contract.API_INVALID_TOKEN, "the access token is invalid")
        if contract.BIOMARKERS_SCOPE not in grant.scopes:
            return _bearer_error(
                self.knobs.insufficient_scope_status,
                contract.API_INSUFFICIENT_SCOPE,
                f"the grant lacks {contract.BIOMARKERS_SCOPE}",
                scope=contract.BIOMARKERS_SCOPE,
            )
        if grant.user_id in self.knobs.forbidden_users:
            return error_response(403, contract.API_FORBIDDEN, "access denied", oauth=False)
        try:
            limit = int(request.query_params.get("limit", contract.PAGE_LIMIT_DEFAULT))
            offset = int(request.query_params.get("offset", 0))
        except ValueError:
            limit = offset = -1
        if not (1 <= limit <= contract.PAGE_LIMIT_MAX) or offset < 0:
            return error_response(
                400,
                "invalid_request",
                f"limit must be 1-{contract.PAGE_LIMIT_MAX} and offset >= 0",
                oauth=False,
            )
        records = self.results.records(grant.user_id, self.clock.now())
        page = {
            self.knobs.results_key: records[offset : offset + limit],
            "total": len(records),
            "limit": limit,
            "offset": offset,
        }
        # orjson, not JSONResponse's json.dumps (half the sandbox's CPU in a sync): in a
        # benchmark the sandbox shares the machine with the sync it serves. Same bytes.
        return self.faults.malformed(page, grant.user_id) or Response(
            orjson.dumps(page),
            media_type="application/json",
            headers=self.faults.rate_headers(client_key),
        )

    # --- /_sandbox ----------------------------------------------------------------

    async def _admin_knobs(self, request: Request) -> Response:
        if request.method == "PATCH":
            try:
                self.set_knobs(**await request.json())
            except ValidationError as exc:
                return JSONResponse({"error": "invalid_knobs", "detail": exc.errors()}, 422)
        return JSONResponse(self.knobs.model_dump(mode="json"))

    async def _admin_counters(self, request: Request) -> Response:
        return JSONResponse(self.counters.snapshot())

    async def _admin_clock(self, request: Request) -> Response:
        if request.method == "POST":
            self.clock.advance(float((await request.json()).get("advance_seconds", 0)))
        return JSONResponse({"now": _iso(self.clock.now())})

    async def _admin_truth(self, request: Request) -> Response:
        return JSONResponse({"data": self.truth(request.path_params["user_id"])})

    async def _admin_secrets(self, request: Request) -> Response:
        return JSONResponse({"secrets": list(self.authority.issued_secrets)})


async def _read_form(request: Request) -> dict[str, str]:
    """A strict OAuth form body: form-encoded, no repeated parameter (RFC 6749 3.2)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != FORM_TYPE:
        raise OAuthError("invalid_request", f"the body must be {FORM_TYPE}")
    pairs = parse_qsl((await request.body()).decode(), keep_blank_values=True)
    form = dict(pairs)
    if len(form) != len(pairs):
        raise OAuthError("invalid_request", "a parameter was repeated")
    return form


def _oauth_error(exc: OAuthError) -> JSONResponse:
    return JSONResponse(
        {"error": exc.error, "error_description": exc.description},
        status_code=exc.status,
        headers=NO_STORE,
    )


def _bearer_error(status: int, error: str, text: str, *, scope: str | None = None) -> Response:
    response = error_response(status, error, text, oauth=False)
    challenge = f'Bearer realm="loop", error="{error}", error_description="{text}"'
    if scope:
        challenge += f', scope="{scope}"'
    response.headers["WWW-Authenticate"] = challenge
    return response


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, contract.API_NOT_FOUND, "no such resource", oauth=False)


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
