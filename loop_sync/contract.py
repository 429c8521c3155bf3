"""The Loop platform contract, in one place.

Part A is what Loop documents; Part B is what loop-sync assumes where the docs are
silent (see docs/loop-contract.md). Both the client and the sandbox read these names, so
when Loop documents a Part B point, it changes here and nowhere else. Identity endpoint
paths are not here on purpose: the client finds them through OIDC discovery.
"""

from __future__ import annotations

from typing import Final

# --- Part A: documented -------------------------------------------------------------

DEFAULT_ISSUER: Final = "https://identity.platform.loop.health"
DEFAULT_API_BASE_URL: Final = "https://clinical.platform.loop.health"
DEFAULT_SCOPES: Final = ("openid", "profile", "read:biomarkers")
DISCOVERY_PATH: Final = "/.well-known/openid-configuration"

PKCE_METHOD: Final = "S256"
PKCE_VERIFIER_MIN: Final = 43
PKCE_VERIFIER_MAX: Final = 128
AUTH_CODE_TTL_S: Final = 60

ACCESS_TOKEN_PREFIX: Final = "lph_at_"
REFRESH_TOKEN_PREFIX: Final = "lph_rt_"
ACCESS_TOKEN_TTL_S: Final = 3600
ACCESS_TOKEN_TTL_MIN_S: Final = 300
REFRESH_TOKEN_IDLE_TTL_S: Final = 90 * 24 * 3600
ID_TOKEN_TTL_S: Final = 300

GRANT_AUTHORIZATION_CODE: Final = "authorization_code"
GRANT_REFRESH_TOKEN: Final = "refresh_token"
CLIENT_AUTH_METHOD: Final = "client_secret_post"

# OAuth error codes and the HTTP status Loop answers them with.
OAUTH_ERROR_STATUS: Final = {
    "invalid_request": 400,
    "invalid_client": 401,
    "invalid_grant": 400,
    "unauthorized_client": 400,
    "unsupported_grant_type": 400,
    "unsupported_response_type": 400,
    "invalid_scope": 400,
    "server_error": 500,
    "temporarily_unavailable": 503,
}
ACCESS_DENIED: Final = "access_denied"

# Service (API) error codes.
API_INVALID_TOKEN: Final = "invalid_token"
API_INSUFFICIENT_SCOPE: Final = "insufficient_scope"
# "insufficient_scope" is 403 on Loop's reference page and 401 on another page: accept both.
INSUFFICIENT_SCOPE_STATUSES: Final = frozenset({401, 403})
API_FORBIDDEN: Final = "forbidden"
API_NOT_FOUND: Final = "not_found"
API_RATE_LIMITED: Final = "rate_limited"

# --- Part B: assumed where the docs are silent -------------------------------------

# B1. Listing a user's results.
BIOMARKERS_PATH: Final = "/v1/biomarkers/me"
BIOMARKERS_SCOPE: Final = "read:biomarkers"
PAGE_LIMIT_DEFAULT: Final = 100
PAGE_LIMIT_MAX: Final = 500
# The page's array key: "data" like Loop's other list endpoints, "results" also accepted.
PAGE_ARRAY_KEYS: Final = ("data", "results")

# B2. Optional record fields beyond the documented ones.
RECORD_FIELDS: Final = (
    "id",
    "patient_id",
    "biomarker_code",
    "biomarker_name",
    "value",
    "unit",
    "reference_low",
    "reference_high",
    "status",
    "collected_at",
    "parsed_at",
)
RECORD_OPTIONAL_FIELDS: Final = ("loinc", "value_text", "lab", "updated_at", "revision")
RECORD_STATUSES: Final = ("normal", "low", "high", "critical")
REVISION_DEFAULT: Final = 1

# B3. Token response: refresh_token may be absent on a refresh (the stored one stays
# valid); scope may be narrower than asked; the user id is the id_token's `sub`, and a
# `user_id` field is accepted only if it equals `sub`.
TOKEN_RESPONSE_USER_ID_FIELD: Final = "user_id"

# B4. Rate limit: per client; Retry-After in seconds or as an HTTP date.
RATE_LIMIT_HEADERS: Final = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")

# B5. Revocation by the user is seen only as invalid_grant on refresh or invalid_token
# on a fresh token: nothing to declare, listed here so the list stays complete.
