"""The sandbox's identity provider: clients, consent, codes, grants and rotating tokens.

It follows Part A of the Loop contract to the letter, because loop-sync's token handling is
only as good as the server it was tested against: single-use 60-second codes, S256-only
PKCE, one active refresh token per (user, client), and a replayed refresh token revoking
the whole grant.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import OKPKey

from loop_sync import contract
from loop_sync.sandbox.clock import Clock
from loop_sync.sandbox.counters import Counters
from loop_sync.sandbox.knobs import Knobs

# Loop documents EdDSA for its id_tokens; RFC 9864 prefers "Ed25519", which joserfc warns
# about. We sign what Loop signs.
warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)

SCOPES_SUPPORTED = ("openid", "profile", "email", "read:biomarkers", "read:documents")
SCOPES_NEEDING_BAA = frozenset({"read:documents"})
BRAND = "loop"
_CHALLENGE_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")
_VERIFIER_RE = re.compile(r"^[A-Za-z0-9._~-]+$")


class OAuthError(Exception):
    """An OAuth error as Loop answers it: `{error, error_description}`."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description

    @property
    def status(self) -> int:
        return contract.OAUTH_ERROR_STATUS.get(self.error, 400)


class AuthorizePageError(Exception):
    """An authorize request that must not redirect (unknown client, wrong redirect_uri)."""


@dataclass(frozen=True)
class Client:
    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]
    grant_types: frozenset[str] = frozenset(
        {contract.GRANT_AUTHORIZATION_CODE, contract.GRANT_REFRESH_TOKEN}
    )
    baa: bool = False


@dataclass(frozen=True)
class AuthorizationRequest:
    client_id: str
    redirect_uri: str
    scopes: tuple[str, ...]
    state: str
    code_challenge: str
    nonce: str | None
    login_hint: str | None


@dataclass
class _Code:
    request: AuthorizationRequest
    user_id: str
    scopes: tuple[str, ...]
    expires_at: datetime
    used: bool = False
    grant_id: str | None = None


@dataclass
class _Grant:
    grant_id: str
    user_id: str
    client_id: str
    scopes: tuple[str, ...]
    revoked: bool = False
    access_tokens: set[str] = field(default_factory=set)
    refresh_tokens: set[str] = field(default_factory=set)


@dataclass
class _Token:
    grant_id: str
    expires_at: datetime
    state: str = "active"  # active | used | superseded | revoked
    scopes: tuple[str, ...] = ()  # access tokens: what a narrowed refresh granted


@dataclass(frozen=True)
class AccessGrant:
    """What a valid bearer token entitles its holder to."""

    user_id: str
    client_id: str
    scopes: tuple[str, ...]
    expires_at: datetime


def user_ids(count: int) -> list[str]:
    return [f"usr_{n:04d}" for n in range(1, count + 1)]


def signing_key(seed: int) -> OKPKey:
    """A deterministic Ed25519 key per seed, so restarts keep the same JWKS."""
    raw = hashlib.sha256(f"loop-sandbox-signing:{seed}".encode()).digest()
    pem = Ed25519PrivateKey.from_private_bytes(raw).private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
    )
    key = OKPKey.import_key(pem)
    return OKPKey.import_key(
        {**key.as_dict(private=True), "kid": key.thumbprint(), "alg": "EdDSA", "use": "sig"}
    )


class Authority:
    def __init__(
        self,
        *,
        issuer: str,
        users: int,
        seed: int,
        clock: Clock,
        knobs: Callable[[], Knobs],
        counters: Counters,
    ) -> None:
        self.issuer = issuer
        self.users = frozenset(user_ids(users))
        self.key = signing_key(seed)
        self._clock = clock
        self._knobs = knobs
        self._counters = counters
        self._clients: dict[str, Client] = {}
        self._pending: dict[str, AuthorizationRequest] = {}
        self._codes: dict[str, _Code] = {}
        self._grants: dict[str, _Grant] = {}
        self._current_grant: dict[tuple[str, str], str] = {}
        self._access: dict[str, _Token] = {}
        self._refresh: dict[str, _Token] = {}
        self.issued_secrets: list[str] = []
        self._lock = threading.RLock()

    # --- clients -------------------------------------------------------------------

    def register_client(self, client: Client) -> None:
        with self._lock:
            self._clients[client.client_id] = client
            self.issued_secrets.append(client.client_secret)

    def _authenticate(self, form: Mapping[str, str]) -> Client:
        client = self._clients.get(form.get("client_id", ""))
        secret = form.get("client_secret", "")
        if client is None or not secrets.compare_digest(
            client.client_secret.encode(), secret.encode()
        ):
            raise OAuthError("invalid_client", "unknown client or wrong client_secret")
        return client

    # --- authorize -----------------------------------------------------------------

    def check_authorization(self, params: Mapping[str, str]) -> AuthorizationRequest:
        """Validate an authorize request; the order follows RFC 6749 section 4.1.2.1."""
        client = self._clients.get(params.get("client_id", ""))
        if client is None:
            raise AuthorizePageError("Unknown client_id. Check the app's client id.")
        redirect_uri = params.get("redirect_uri", "")
        if redirect_uri not in client.redirect_uris:
            raise AuthorizePageError(
                "The redirect_uri does not exactly match one registered for this app."
            )
        state = params.get("state", "")
        redirect = _Redirect(redirect_uri, state)
        if params.get("response_type") != "code":
            raise redirect.error("unsupported_response_type", "response_type must be code")
        if not state:
            raise redirect.error("invalid_request", "state is required")
        if contract.GRANT_AUTHORIZATION_CODE not in client.grant_types:
            raise redirect.error("unauthorized_client", "authorization_code is not allowed")
        scopes = tuple(params.get("scope", "").split())
        if not scopes:
            raise redirect.error("invalid_scope", "scope is required")
        unknown = [s for s in scopes if s not in SCOPES_SUPPORTED]
        if unknown:
            raise redirect.error("invalid_scope", f"unknown scope: {' '.join(unknown)}")
        if not client.baa and SCOPES_NEEDING_BAA.intersection(scopes):
            raise redirect.error("invalid_scope", "this scope needs a signed BAA")
        method = params.get("code_challenge_method")
        if method != contract.PKCE_METHOD:
            raise redirect.error(
                "invalid_request", "PKCE is required and code_challenge_method must be S256"
            )
        challenge = params.get("code_challenge", "")
        if not _CHALLENGE_RE.match(challenge):
            raise redirect.error("invalid_request", "code_challenge must be 43 base64url chars")
        nonce = params.get("nonce") or None
        if "openid" in scopes and nonce is None:
            raise redirect.error("invalid_request", "nonce is required with the openid scope")
        hint = params.get("login_hint") or None
        if hint is not None and hint not in self.users:
            raise redirect.error("invalid_request", "login_hint names no such user")
        return AuthorizationRequest(
            client.client_id, redirect_uri, scopes, state, challenge, nonce, hint
        )

    def hold(self, request: AuthorizationRequest) -> str:
        """Park a request behind the consent page; returns its id."""
        request_id = secrets.token_urlsafe(16)
        with self._lock:
            self._pending[request_id] = request
        return request_id

    def pending(self, request_id: str) -> AuthorizationRequest | None:
        with self._lock:
            return self._pending.pop(request_id, None)

    def approve(
        self, request: AuthorizationRequest, user_id: str, scopes: tuple[str, ...] | None = None
    ) -> str:
        """Consent given: the redirect URL carrying a fresh single-use code."""
        if user_id not in self.users:
            raise AuthorizePageError("No such sandbox user.")
        withheld = self._knobs().narrow_scopes
        chosen = request.scopes if scopes is None else scopes  # () = every box unchecked
        granted = tuple(s for s in chosen if s in request.scopes and s not in withheld)
        code = secrets.token_urlsafe(32)
        expires = self._clock.now() + timedelta(seconds=contract.AUTH_CODE_TTL_S)
        with self._lock:
            self._codes[code] = _Code(request, user_id, granted, expires)
            self.issued_secrets.append(code)
        return _Redirect(request.redirect_uri, request.state).url(code=code)

    def deny(self, request: AuthorizationRequest) -> str:
        return _Redirect(request.redirect_uri, request.state).url(
            error=contract.ACCESS_DENIED, error_description="the user denied access"
        )

    # --- token endpoint ------------------------------------------------------------

    def token(self, form: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
        """The user the tokens are for, and the token response body."""
        client = self._authenticate(form)
        grant_type = form.get("grant_type")
        if not grant_type:
            raise OAuthError("invalid_request", "grant_type is required")
        if grant_type not in (contract.GRANT_AUTHORIZATION_CODE, contract.GRANT_REFRESH_TOKEN):
            raise OAuthError("unsupported_grant_type", f"unsupported grant_type {grant_type!r}")
        if grant_type not in client.grant_types:
            raise OAuthError("unauthorized_client", f"{grant_type} is not allowed for this client")
        with self._lock:
            if grant_type == contract.GRANT_AUTHORIZATION_CODE:
                return self._exchange_code(client, form)
            return self._refresh_grant(client, form)

    def _exchange_code(self, client: Client, form: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
        for name in ("code", "redirect_uri", "code_verifier"):
            if not form.get(name):
                raise OAuthError("invalid_request", f"{name} is required")
        code = self._codes.get(form["code"])
        if code is None or code.request.client_id != client.client_id:
            raise OAuthError("invalid_grant", "the code is unknown")
        self._counters.count("token_requests", code.user_id)
        if code.used:
            # RFC 6749 4.1.2: a replayed code revokes what it issued.
            if code.grant_id is not None:
                self._revoke_grant(self._grants[code.grant_id], "authorization code replayed")
            raise OAuthError("invalid_grant", "the code was already used")
        code.used = True
        if self._clock.now() >= code.expires_at:
            raise OAuthError("invalid_grant", "the code expired")
        if form["redirect_uri"] != code.request.redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri differs from the authorize request")
        verifier = form["code_verifier"]
        if not (
            contract.PKCE_VERIFIER_MIN <= len(verifier) <= contract.PKCE_VERIFIER_MAX
            and _VERIFIER_RE.match(verifier)
        ):
            raise OAuthError("invalid_request", "code_verifier must be 43-128 unreserved chars")
        if not secrets.compare_digest(s256(verifier), code.request.code_challenge):
            raise OAuthError("invalid_grant", "PKCE verification failed")
        key = (code.user_id, client.client_id)
        previous = self._current_grant.get(key)
        if previous is not None:  # a new consent replaces the refresh token
            for token in self._grants[previous].refresh_tokens:
                if self._refresh[token].state == "active":  # a used one stays a replay
                    self._refresh[token].state = "superseded"
        grant = _Grant(secrets.token_hex(8), code.user_id, client.client_id, code.scopes)
        self._grants[grant.grant_id] = grant
        self._current_grant[key] = grant.grant_id
        code.grant_id = grant.grant_id
        with_refresh = contract.GRANT_REFRESH_TOKEN in client.grant_types
        return grant.user_id, self._issue(
            grant, nonce=code.request.nonce, with_refresh=with_refresh
        )

    def _refresh_grant(self, client: Client, form: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
        presented = form.get("refresh_token")
        if not presented:
            raise OAuthError("invalid_request", "refresh_token is required")
        token = self._refresh.get(presented)
        grant = self._grants[token.grant_id] if token else None
        if token is None or grant is None or grant.client_id != client.client_id:
            raise OAuthError("invalid_grant", "the refresh token is unknown")
        self._counters.count("token_requests", grant.user_id)
        if token.state == "used":
            self._counters.count("replays_detected", grant.user_id)
            self._revoke_grant(grant, "refresh token replayed")
            raise OAuthError("invalid_grant", "the refresh token was already used")
        if token.state != "active" or grant.revoked:
            raise OAuthError("invalid_grant", "the refresh token was revoked")
        if self._clock.now() >= token.expires_at:
            raise OAuthError("invalid_grant", "the refresh token expired")
        scopes = grant.scopes
        if form.get("scope"):
            scopes = tuple(form["scope"].split())
            if not set(scopes) <= set(grant.scopes):
                raise OAuthError("invalid_scope", "scope exceeds the granted scope")
        rotate = self._knobs().rotate_refresh_tokens
        if rotate:
            token.state = "used"
        else:
            token.expires_at = self._clock.now() + timedelta(
                seconds=contract.REFRESH_TOKEN_IDLE_TTL_S
            )
        self._counters.count("refreshes", grant.user_id)
        return grant.user_id, self._issue(grant, nonce=None, with_refresh=rotate, scopes=scopes)

    def _issue(
        self,
        grant: _Grant,
        *,
        nonce: str | None,
        with_refresh: bool,
        scopes: tuple[str, ...] | None = None,
    ) -> dict[str, Any]:
        now = self._clock.now()
        scopes = scopes or grant.scopes
        ttl = self._knobs().access_token_ttl_s
        access = contract.ACCESS_TOKEN_PREFIX + secrets.token_urlsafe(32)
        self._access[access] = _Token(grant.grant_id, now + timedelta(seconds=ttl), scopes=scopes)
        grant.access_tokens.add(access)
        body: dict[str, Any] = {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ttl,
            "scope": " ".join(scopes),
        }
        self.issued_secrets.append(access)
        if with_refresh:
            refresh = contract.REFRESH_TOKEN_PREFIX + secrets.token_urlsafe(32)
            self._refresh[refresh] = _Token(
                grant.grant_id, now + timedelta(seconds=contract.REFRESH_TOKEN_IDLE_TTL_S)
            )
            grant.refresh_tokens.add(refresh)
            body["refresh_token"] = refresh
            self.issued_secrets.append(refresh)
        if "openid" in grant.scopes:
            body["id_token"] = self._id_token(grant, nonce, now)
        return body

    def _id_token(self, grant: _Grant, nonce: str | None, now: datetime) -> str:
        iat = int(now.timestamp())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": grant.user_id,
            "aud": grant.client_id,
            "iat": iat,
            "exp": iat + contract.ID_TOKEN_TTL_S,
            "brand": BRAND,
        }
        if nonce is not None:
            claims["nonce"] = nonce
        if "profile" in grant.scopes:
            claims["name"] = f"Sandbox User {grant.user_id.removeprefix('usr_')}"
        if "email" in grant.scopes:
            claims["email"] = f"{grant.user_id}@sandbox.loop.invalid"
            claims["email_verified"] = True
        header = {"alg": "EdDSA", "kid": self.key.kid, "typ": "JWT"}
        return jwt.encode(header, claims, self.key, algorithms=["EdDSA"])

    def _revoke_grant(self, grant: _Grant, reason: str) -> None:
        if grant.revoked:
            return
        grant.revoked = True
        for token in grant.refresh_tokens:
            self._refresh[token].state = "revoked"
        for token in grant.access_tokens:
            self._access[token].state = "revoked"
        self._counters.count("grants_revoked", grant.user_id)
        self._counters.alert(grant.user_id, grant.client_id, reason)

    # --- revoke, introspect, bearer ------------------------------------------------

    def revoke(self, form: Mapping[str, str]) -> None:
        """RFC 7009: 200 whether or not the token was valid; revoking a refresh token ends
        the grant."""
        client = self._authenticate(form)
        presented = form.get("token")
        if not presented:
            raise OAuthError("invalid_request", "token is required")
        with self._lock:
            if (refresh := self._refresh.get(presented)) is not None:
                grant = self._grants[refresh.grant_id]
                if grant.client_id == client.client_id:
                    self._revoke_grant(grant, "revoked by the client")
            elif (access := self._access.get(presented)) is not None and (
                self._grants[access.grant_id].client_id == client.client_id
            ):
                access.state = "revoked"

    def introspect(self, form: Mapping[str, str]) -> dict[str, Any]:
        client = self._authenticate(form)
        presented = form.get("token", "")
        with self._lock:
            # RFC 7662 2.2: token_type is the RFC 6749 5.1 type ("Bearer") for access
            # tokens; refresh tokens have no such type, so the sandbox names the kind.
            kind, token = "Bearer", self._access.get(presented)
            if token is None:
                kind, token = "refresh_token", self._refresh.get(presented)
            grant = self._grants[token.grant_id] if token else None
            if (
                token is None
                or grant is None
                or token.state != "active"
                or grant.revoked
                or grant.client_id != client.client_id
                or self._clock.now() >= token.expires_at
            ):
                return {"active": False}
            return {
                "active": True,
                "sub": grant.user_id,
                "client_id": grant.client_id,
                "scope": " ".join(token.scopes or grant.scopes),
                "exp": int(token.expires_at.timestamp()),
                "brand": BRAND,
                "token_type": kind,
            }

    def bearer(self, token: str) -> AccessGrant | None:
        """The grant behind a valid access token, or None if expired, revoked or unknown."""
        with self._lock:
            access = self._access.get(token)
            if access is None or access.state != "active":
                return None
            grant = self._grants[access.grant_id]
            if grant.revoked or self._clock.now() >= access.expires_at:
                return None
            return AccessGrant(grant.user_id, grant.client_id, access.scopes, access.expires_at)


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class _Redirect:
    redirect_uri: str
    state: str

    def url(self, **params: str) -> str:
        if self.state:
            params["state"] = self.state
        return f"{self.redirect_uri}?{urlencode(params)}"

    def error(self, error: str, description: str) -> RedirectError:
        return RedirectError(self.url(error=error, error_description=description))


class RedirectError(Exception):
    """An authorize error that Loop reports by redirecting to the client."""

    def __init__(self, location: str) -> None:
        super().__init__(location)
        self.location = location
