"""The consent flow, without HTTP: start a PKCE flow, then finish it from the callback.

The PKCE verifier, `state` and `nonce` stay server-side (verifier encrypted) for 10
minutes, single use, bound to the browser by a random cookie whose hash is stored. The
web app only translates requests and pages; everything that must hold is checked here.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete, select, update

from loop_sync.crypto import TokenCipher
from loop_sync.errors import ConfigError, InvalidGrant, LoopSyncError, ProviderError
from loop_sync.oidc import AuthorizationStart, OidcClient
from loop_sync.schema import oauth_sessions
from loop_sync.vault import TokenVault, utcnow

SESSION_TTL = timedelta(minutes=10)
_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")
log = logging.getLogger(__name__)


class OnboardingError(LoopSyncError):
    """A consent flow that cannot finish. `message` is safe to show the person."""

    def __init__(self, title: str, message: str, *, status: int = 400) -> None:
        super().__init__(f"{title}: {message}")
        self.title = title
        self.message = message
        self.status = status


def expired() -> OnboardingError:
    return OnboardingError(
        "This sign-in link is no longer valid",
        "It is unknown, already used, older than 10 minutes, or was started in another "
        "browser. Start again.",
    )


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


class Onboarding:
    def __init__(
        self,
        engine: Engine,
        cipher: TokenCipher,
        oidc: OidcClient,
        vault: TokenVault,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.cipher = cipher
        self.oidc = oidc
        self.vault = vault
        self.clock = clock

    def start(self, login_hint: str | None = None) -> tuple[str, str]:
        """The authorize URL to send the browser to, and the value of its binding cookie."""
        flow = AuthorizationStart.new()
        binding = secrets.token_urlsafe(32)
        url = self.oidc.authorization_url(flow, login_hint)
        now = self.clock()
        with self.engine.begin() as connection:
            connection.execute(delete(oauth_sessions).where(oauth_sessions.c.expires_at < now))
            connection.execute(
                oauth_sessions.insert().values(
                    state_hash=_digest(flow.state),
                    binding_hash=_digest(binding),
                    code_verifier=self.cipher.encrypt(flow.verifier),
                    nonce=flow.nonce,
                    created_at=now,
                    expires_at=now + SESSION_TTL,
                )
            )
        return url, binding

    def finish(self, params: Mapping[str, str], binding: str | None) -> str:
        """Check the callback, exchange the code, verify the id_token, store the grant.

        Returns the Loop user id. Raises OnboardingError with a page-safe message.
        """
        state = params.get("state", "")
        if not state or not binding:
            raise expired()
        verifier, nonce = self._consume(state, binding)
        error = params.get("error")
        if error == "access_denied":
            raise OnboardingError(
                "You did not connect your Loop account",
                "You chose Deny on Loop's consent screen, so nothing was stored. "
                "You can connect at any time.",
            )
        if error:
            shown = error if _ERROR_CODE.match(error) else "an unknown error"
            raise OnboardingError("Loop could not connect your account", f"Loop answered {shown}.")
        code = params.get("code")
        if not code:
            raise OnboardingError("Loop could not connect your account", "The answer had no code.")
        try:
            response = self.oidc.exchange_code(code, verifier)
            if response.id_token is None:
                raise ProviderError("invalid_response", "no id_token: is openid in LOOP_SCOPES?")
            claims = self.oidc.verify_id_token(response.id_token.get_secret_value(), nonce)
        except InvalidGrant:
            raise expired() from None
        except ConfigError as exc:
            log.error("onboarding stopped by configuration: %s", exc)
            raise OnboardingError(
                "loop-sync is misconfigured", "The operator has been told.", status=500
            ) from None
        except ProviderError as exc:
            log.warning("onboarding failed: %s", exc)
            raise OnboardingError(
                "Loop could not connect your account", "Please try again.", status=502
            ) from None
        user_id = str(claims["sub"])
        if response.user_id is not None and response.user_id != user_id:
            raise OnboardingError("Loop could not connect your account", "Identity mismatch.")
        scopes = tuple((response.scope or " ".join(self.oidc.settings.scopes)).split())
        self.vault.store_consent(user_id, response, scopes)
        log.info("user %s connected with scopes %s", user_id, " ".join(scopes))
        return user_id

    def _consume(self, state: str, binding: str) -> tuple[str, str]:
        """Mark the session used, atomically; a second callback for it finds nothing."""
        now = self.clock()
        this_session = oauth_sessions.c.state_hash == _digest(state)
        with self.engine.begin() as connection:
            taken = connection.execute(
                update(oauth_sessions)
                .where(
                    this_session,
                    oauth_sessions.c.binding_hash == _digest(binding),
                    oauth_sessions.c.used_at.is_(None),
                    oauth_sessions.c.expires_at > now,
                )
                .values(used_at=now)
            ).rowcount
            if not taken:
                raise expired()
            row = connection.execute(
                select(oauth_sessions.c.code_verifier, oauth_sessions.c.nonce).where(this_session)
            ).one()
        return self.cipher.decrypt(row.code_verifier), row.nonce
