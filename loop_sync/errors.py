"""Errors a loop-sync user must act on. Each message says what to do, and none carries a
token, code, verifier or secret.

    LoopSyncError
    ├── ConfigError          a setting is missing, malformed or points nowhere: fix it, re-run
    ├── ReauthRequired       the user's grant is dead: they must connect their account again
    ├── ProviderError        Loop answered with an OAuth or API error
    │   ├── InvalidGrant     the code or refresh token was refused (invalid_grant)
    │   └── TransientError   Loop failed (5xx, 429); retrying later may work
    │       ├── LoopUnreachable  no connection to Loop at all: check the URL and the network
    │       └── LeaseBusy        another process kept refreshing this user too long
    └── RefreshOutcomeUnknown  a refresh was sent but its answer was lost
"""

from __future__ import annotations


class LoopSyncError(Exception):
    """Base of every error loop-sync raises on purpose."""


class ConfigError(LoopSyncError):
    """The configuration cannot work. The message names the variable and the fix."""


class ReauthRequired(LoopSyncError):
    """The user's grant no longer works; only a new consent brings them back."""

    def __init__(self, user_id: str, reason: str) -> None:
        super().__init__(
            f"user {user_id} must connect their Loop account again ({reason}): "
            "send them to the onboarding page (`loop-sync web`)"
        )
        self.user_id = user_id
        self.reason = reason


class ProviderError(LoopSyncError):
    """An error answer from Loop: `error` is its code, e.g. invalid_request."""

    def __init__(self, error: str, description: str, status: int | None = None) -> None:
        super().__init__(f"Loop answered {error}" + (f": {description}" if description else ""))
        self.error = error
        self.description = description
        self.status = status


class InvalidGrant(ProviderError):
    """The code or refresh token was refused: expired, used, revoked or replayed."""


class TransientError(ProviderError):
    """Loop failed (5xx, 429) or could not be reached; the request surely had no effect."""


class LoopUnreachable(TransientError):
    """No connection could be made, so the request surely had no effect."""

    def __init__(self, url: str, cause: str) -> None:
        LoopSyncError.__init__(
            self,
            f"cannot reach Loop at {url} ({cause}); check LOOP_ISSUER / LOOP_API_BASE_URL "
            "and the network",
        )
        self.error = "unreachable"
        self.description = cause
        self.status = None


class LeaseBusy(TransientError):
    """Another process held the user's refresh lease past its expiry; try again later."""

    def __init__(self, user_id: str) -> None:
        LoopSyncError.__init__(
            self, f"another process held the refresh lease of user {user_id} too long"
        )
        self.error = "lease_busy"
        self.description = user_id
        self.status = None


class RefreshOutcomeUnknown(LoopSyncError):
    """A refresh reached Loop but its answer was lost: Loop may have rotated the token."""
