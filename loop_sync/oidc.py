"""Standard OAuth 2.0 + OIDC against any provider that publishes discovery.

Nothing here is peculiar to Loop or to our sandbox: endpoints and keys come from
`{issuer}/.well-known/openid-configuration`, the client authenticates with
client_secret_post, and id_tokens are verified with joserfc. Every token is a `SecretStr`
from the moment it is parsed, so it cannot slip into a log line or an exception by repr.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import ssl
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import httpx
from joserfc import jwt
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from loop_sync import contract
from loop_sync.config import Settings
from loop_sync.errors import (
    ConfigError,
    InvalidGrant,
    LoopUnreachable,
    ProviderError,
    RefreshOutcomeUnknown,
    TransientError,
)

# Loop signs with EdDSA, which RFC 9864 deprecates in favour of "Ed25519"; accept both.
warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)
ID_TOKEN_ALGORITHMS = (
    "EdDSA",
    "Ed25519",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "ES256",
    "ES384",
    "ES512",
)
CLOCK_SKEW_S = 60
# RFC 8414 section 2: a provider that does not list its client authentication methods
# supports client_secret_basic only.
DEFAULT_AUTH_METHODS = ["client_secret_basic"]
HTTP_TIMEOUT_S = 10.0
# Errors that mean our configuration is wrong, not the user's grant.
CONFIG_ERRORS = {
    "invalid_client": "LOOP_CLIENT_ID / LOOP_CLIENT_SECRET are not accepted by the issuer",
    "unauthorized_client": "the Loop app is not allowed this grant type",
    "invalid_scope": "LOOP_SCOPES asks for a scope the Loop app may not have",
}


class ProviderMetadata(BaseModel):
    """The parts of OIDC discovery loop-sync uses."""

    model_config = ConfigDict(extra="allow", frozen=True)

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    revocation_endpoint: str | None = None
    introspection_endpoint: str | None = None
    id_token_signing_alg_values_supported: list[str] = []
    token_endpoint_auth_methods_supported: list[str] = DEFAULT_AUTH_METHODS
    revocation_endpoint_auth_methods_supported: list[str] = DEFAULT_AUTH_METHODS


class TokenResponse(BaseModel):
    """A token endpoint answer (Part B3): refresh_token may be absent on a refresh."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    access_token: SecretStr
    token_type: str
    expires_in: int
    refresh_token: SecretStr | None = None
    scope: str | None = None
    id_token: SecretStr | None = None
    user_id: str | None = None  # accepted only if it equals the id_token's sub


@dataclass(frozen=True)
class AuthorizationStart:
    """The secrets of one consent flow; only `challenge` and `state` leave the server."""

    state: str
    nonce: str
    verifier: str

    @property
    def challenge(self) -> str:
        digest = hashlib.sha256(self.verifier.encode("ascii")).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")

    @classmethod
    def new(cls) -> AuthorizationStart:
        """State, nonce and a 43-character PKCE verifier from the OS CSPRNG."""
        return cls(secrets.token_urlsafe(32), secrets.token_urlsafe(32), secrets.token_urlsafe(32))


class OidcClient:
    """One provider, one registered client. Thread-safe for use from a web app's threads."""

    def __init__(
        self,
        settings: Settings,
        http: httpx.Client | None = None,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        # No keep-alive: a refresh must never go out on a connection the server may have
        # closed, where a failure could not tell "not sent" from "answer lost".
        self._http = http or httpx.Client(
            timeout=HTTP_TIMEOUT_S,
            limits=httpx.Limits(max_keepalive_connections=0),
            verify=tls or True,
        )
        self._metadata: ProviderMetadata | None = None
        self._keys: KeySet | None = None

    def close(self) -> None:
        self._http.close()

    # --- discovery and keys ----------------------------------------------------------

    def metadata(self) -> ProviderMetadata:
        if self._metadata is None:
            url = self.settings.issuer + contract.DISCOVERY_PATH
            body = self._get_json(url, what="OIDC discovery")
            try:
                found = ProviderMetadata.model_validate(body)
            except ValidationError:
                msg = f"{url} is not an OIDC discovery document; check LOOP_ISSUER"
                raise ConfigError(msg) from None
            if found.issuer.rstrip("/") != self.settings.issuer:
                msg = (
                    f"LOOP_ISSUER is {self.settings.issuer} but its discovery document names "
                    f"{found.issuer}; set LOOP_ISSUER to the issuer exactly"
                )
                raise ConfigError(msg)
            self._metadata = found
        return self._metadata

    def _get_json(self, url: str, *, what: str) -> Any:
        try:
            response = self._http.get(url)
        except httpx.TransportError as exc:
            raise LoopUnreachable(url, type(exc).__name__) from None
        if response.status_code >= 500:
            raise TransientError("server_error", f"{what} answered {response.status_code}")
        try:
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPStatusError, ValueError):
            msg = f"{what} at {url} answered {response.status_code}, not JSON; check LOOP_ISSUER"
            raise ConfigError(msg) from None

    def _key_set(self, *, refetch: bool = False) -> KeySet:
        if self._keys is None or refetch:
            body = self._get_json(self.metadata().jwks_uri, what="the JWKS")
            self._keys = KeySet.import_key_set(body)
        return self._keys

    # --- the consent flow ------------------------------------------------------------

    def authorization_url(self, start: AuthorizationStart, login_hint: str | None = None) -> str:
        metadata = self.metadata()
        params = {
            "response_type": "code",
            "client_id": self.settings.client_id,
            "redirect_uri": self.settings.redirect_uri,
            "scope": " ".join(self.settings.scopes),
            "state": start.state,
            "code_challenge": start.challenge,
            "code_challenge_method": contract.PKCE_METHOD,
        }
        if "openid" in self.settings.scopes:
            params["nonce"] = start.nonce
        if login_hint:
            params["login_hint"] = login_hint
        return f"{metadata.authorization_endpoint}?{urlencode(params)}"

    def check_redirect_uri(self) -> None:
        """Raise ConfigError unless the authorize endpoint accepts LOOP_REDIRECT_URI.

        A redirect_uri the provider has not registered for the client_id (or an unknown
        client_id) gets an error page, never a redirect (RFC 6749 4.1.2.1; Loop: "identity
        does not redirect at all"), so a person who starts a consent would be stuck on
        Loop's page and loop-sync would never hear of it. This asks once, with a consent
        request as a browser would send it, and does not follow the answer: a redirect or
        a page (login, consent) means the URI was accepted, and a redirect back carrying
        an OAuth error is that error. Nothing is consented or exchanged.
        """
        url = self.authorization_url(AuthorizationStart.new())
        endpoint = self.metadata().authorization_endpoint
        try:
            response = self._http.get(url)  # redirects are not followed
        except httpx.TransportError as exc:
            raise LoopUnreachable(endpoint, type(exc).__name__) from None
        if response.status_code >= 500:
            raise TransientError("server_error", f"authorize answered {response.status_code}")
        if response.is_redirect:
            location = urlsplit(response.headers.get("location", ""))
            back = location._replace(query="", fragment="").geturl() == self.settings.redirect_uri
            error = dict(parse_qsl(location.query)).get("error") if back else None
            if error in CONFIG_ERRORS:
                raise ConfigError(f"Loop answered {error}: {CONFIG_ERRORS[error]}")
            if error:
                raise ProviderError(error, "to a consent request from loop-sync's settings")
            return
        if response.status_code >= 400:
            msg = (
                f"Loop refuses to send people back to LOOP_REDIRECT_URI "
                f"{self.settings.redirect_uri} (its authorize page answered "
                f"{response.status_code} instead of redirecting): register that URI exactly "
                f"for LOOP_CLIENT_ID {self.settings.client_id} with Loop, or set "
                "LOOP_REDIRECT_URI to the one registered (and check LOOP_CLIENT_ID)"
            )
            raise ConfigError(msg)

    def exchange_code(self, code: str, verifier: str) -> TokenResponse:
        return self._token_request(
            {
                "grant_type": contract.GRANT_AUTHORIZATION_CODE,
                "code": code,
                "redirect_uri": self.settings.redirect_uri,
                "code_verifier": verifier,
            },
            outcome_matters=False,
        )

    def refresh(self, refresh_token: str) -> TokenResponse:
        """Raises TransientError only when the request surely had no effect, and
        RefreshOutcomeUnknown when Loop may have rotated without us seeing the answer."""
        return self._token_request(
            {"grant_type": contract.GRANT_REFRESH_TOKEN, "refresh_token": refresh_token},
            outcome_matters=True,
        )

    def revoke(self, token: str, token_type_hint: str = "refresh_token") -> None:  # noqa: S107
        endpoint = self.metadata().revocation_endpoint
        if endpoint is None:
            return
        methods = self.metadata().revocation_endpoint_auth_methods_supported
        self._client_post(endpoint, {"token": token, "token_type_hint": token_type_hint}, methods)

    def still_active(self, token: str) -> bool | None:
        """RFC 7662 introspection of a token: None when the provider offers none.

        Asking costs nothing at Loop, unlike presenting a possibly rotated refresh token,
        which Loop treats as a leak (revoke the grant, alert the user).
        """
        endpoint = self.metadata().introspection_endpoint
        if endpoint is None:
            return None
        methods = self.metadata().token_endpoint_auth_methods_supported
        form = {"token": token, "token_type_hint": "refresh_token"}
        response = self._client_post(endpoint, form, methods)
        try:
            return bool(response.json()["active"])
        except (ValueError, KeyError, TypeError):
            raise TransientError("invalid_response", "unreadable introspection") from None

    def verify_id_token(self, id_token: str, nonce: str) -> dict[str, Any]:
        """Claims of a valid id_token: signature via JWKS, iss, aud, exp, nonce checked."""
        metadata = self.metadata()
        algorithms = [
            a
            for a in (metadata.id_token_signing_alg_values_supported or ID_TOKEN_ALGORITHMS)
            if a in ID_TOKEN_ALGORITHMS
        ]
        try:
            try:
                token = jwt.decode(id_token, self._key_set(), algorithms=algorithms)
            except JoseError:  # a rotated signing key: fetch the JWKS once more
                token = jwt.decode(id_token, self._key_set(refetch=True), algorithms=algorithms)
            JWTClaimsRegistry(
                leeway=CLOCK_SKEW_S,
                iss={"essential": True, "value": metadata.issuer},
                aud={"essential": True, "value": self.settings.client_id},
                exp={"essential": True},
                sub={"essential": True},
                nonce={"essential": True, "value": nonce},
            ).validate(token.claims)
        except (JoseError, ValueError) as exc:
            raise ProviderError("invalid_id_token", type(exc).__name__) from None
        return dict(token.claims)

    # --- the token endpoint ----------------------------------------------------------

    def _client_auth(self, methods: list[str]) -> tuple[dict[str, str], httpx.BasicAuth | None]:
        """Form fields and HTTP auth for the client: client_secret_post as Loop documents,
        or client_secret_basic when that is all the provider supports (RFC 6749 2.3.1)."""
        client_id = self.settings.client_id
        secret = self.settings.client_secret.get_secret_value()
        if contract.CLIENT_AUTH_METHOD in methods or "client_secret_basic" not in methods:
            return {"client_id": client_id, "client_secret": secret}, None
        return {}, httpx.BasicAuth(quote(client_id, safe=""), quote(secret, safe=""))

    def _client_post(
        self, endpoint: str, form: dict[str, str], methods: list[str]
    ) -> httpx.Response:
        """An authenticated POST whose effect is harmless to repeat (revoke, introspect)."""
        fields, auth = self._client_auth(methods)
        try:
            response = self._http.post(
                endpoint, data={**form, **fields}, auth=auth or httpx.USE_CLIENT_DEFAULT
            )
        except httpx.TransportError as exc:
            raise LoopUnreachable(endpoint, type(exc).__name__) from None
        if response.status_code != 200:
            raise _error_from(response)
        return response

    def _token_request(self, form: dict[str, str], *, outcome_matters: bool) -> TokenResponse:
        metadata = self.metadata()
        fields, auth = self._client_auth(metadata.token_endpoint_auth_methods_supported)
        try:
            response = self._http.post(
                metadata.token_endpoint,
                data={**form, **fields},
                auth=auth or httpx.USE_CLIENT_DEFAULT,
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise LoopUnreachable(metadata.token_endpoint, type(exc).__name__) from None
        except httpx.TransportError as exc:
            if outcome_matters:
                raise RefreshOutcomeUnknown(
                    f"the token endpoint's answer was lost ({type(exc).__name__})"
                ) from None
            raise LoopUnreachable(metadata.token_endpoint, type(exc).__name__) from None
        if response.status_code != 200:
            raise _error_from(response)
        try:
            return TokenResponse.model_validate(response.json())
        except (ValueError, ValidationError):
            if outcome_matters:  # Loop answered 200: it rotated, and we cannot read how
                msg = "the token endpoint answered 200 with an unreadable body"
                raise RefreshOutcomeUnknown(msg) from None
            raise ProviderError("invalid_response", "unreadable token response") from None


def _error_from(response: httpx.Response) -> ConfigError | ProviderError:
    """The exception for an OAuth error answer; never includes the request."""
    try:
        body = response.json()
        error = str(body.get("error", "unknown_error"))
        description = str(body.get("error_description") or body.get("message") or "")
    except (ValueError, AttributeError):
        error, description = "unknown_error", f"HTTP {response.status_code}"
    status = response.status_code
    if error in CONFIG_ERRORS:
        return ConfigError(f"Loop answered {error}: {CONFIG_ERRORS[error]}")
    if error == "invalid_grant":
        return InvalidGrant(error, description, status)
    if status >= 500 or status == 429:
        return TransientError(error, description, status)
    return ProviderError(error, description, status)
