"""Contract tests of the clinical API's GET /v1/biomarkers/me as the sandbox serves it.

Rules come from /work/shared/loop-platform.md: Part A "API errors" and "Biomarker records",
Part B1 (listing and paging) and B2 (optional record fields); RFC 6750 for the challenges.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import httpx
import pytest

from loop_sync import contract
from loop_sync.sandbox import Knobs, Sandbox, SandboxConfig

from .helpers import (
    IGNORE_EDDSA_WARNING,
    api_error,
    biomarkers,
    login,
    oauth_error,
    refresh,
    revoke,
)

pytestmark = IGNORE_EDDSA_WARNING

USER = "usr_0001"


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    """More results than one default page holds (100), so paging is observable."""
    return SandboxConfig(users=5, seed=7, results_per_user=130, knobs=Knobs(auto_approve=True))


@pytest.fixture
def token(sandbox: Sandbox, http: httpx.Client) -> str:
    """A valid access token for usr_0001 with openid profile read:biomarkers."""
    return login(http, sandbox).access_token


def _challenge(response: httpx.Response) -> str:
    header: str = response.headers.get("www-authenticate", "")
    assert header.startswith("Bearer "), header
    return header


def _all_pages(http: httpx.Client, token: str, limit: int) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    offset, total = 0, None
    while total is None or offset < total:
        response = biomarkers(http, token, limit=limit, offset=offset)
        assert response.status_code == 200, response.text
        page = response.json()
        assert page["limit"] == limit
        assert page["offset"] == offset
        assert total is None or page["total"] == total
        total = page["total"]
        assert len(page["data"]) == min(limit, total - offset)
        records += page["data"]
        offset += limit
    return records


# --- 401 invalid_token ------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer lph_at_never-issued", "Bearer", "Basic dXNlcjpwYXNz", "lph_at_no-scheme"],
    ids=["no-header", "unknown-token", "empty-token", "basic-scheme", "no-scheme"],
)
def test_request_without_a_valid_token_is_401_invalid_token_with_a_bearer_challenge(
    http: httpx.Client, authorization: str | None
) -> None:
    """API: no token, an unknown token or another scheme is 401 {error: invalid_token,
    message} with WWW-Authenticate: Bearer … error="invalid_token"."""
    headers = {"Authorization": authorization} if authorization is not None else {}

    response = http.get("/v1/biomarkers/me", headers=headers)

    assert api_error(response, 401) == "invalid_token"
    assert 'error="invalid_token"' in _challenge(response)


def test_expired_access_token_is_401_invalid_token(sandbox: Sandbox, http: httpx.Client) -> None:
    """API: an access token is refused once its expires_in (3600 s) has passed."""
    tokens = login(http, sandbox)
    sandbox.clock.advance(tokens.expires_in + 1)

    response = biomarkers(http, tokens.access_token)

    assert api_error(response, 401) == "invalid_token"
    assert 'error="invalid_token"' in _challenge(response)


def test_access_token_works_until_shortly_before_it_expires(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """API: an access token is still accepted 5 s before expires_in runs out."""
    tokens = login(http, sandbox)
    sandbox.clock.advance(tokens.expires_in - 5)

    response = biomarkers(http, tokens.access_token)

    assert response.status_code == 200


def test_revoked_access_token_is_401_invalid_token(sandbox: Sandbox, http: httpx.Client) -> None:
    """API: a token revoked through the grant (refresh token revoked) is 401 invalid_token."""
    tokens = login(http, sandbox)
    assert tokens.refresh_token is not None
    assert revoke(http, sandbox, tokens.refresh_token).status_code == 200

    response = biomarkers(http, tokens.access_token)

    assert api_error(response, 401) == "invalid_token"
    assert 'error="invalid_token"' in _challenge(response)


def test_access_token_from_a_refresh_token_works_and_is_for_the_same_user(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """API: the access token from a refresh reads the same user's results."""
    tokens = login(http, sandbox, login_hint="usr_0002")
    assert tokens.refresh_token is not None
    fresh = refresh(http, sandbox, tokens.refresh_token).json()

    response = biomarkers(http, fresh["access_token"], limit=500)

    assert response.status_code == 200
    assert response.json()["data"] == sandbox.truth("usr_0002")


# --- scope and business rules -----------------------------------------------------------


def test_token_without_read_biomarkers_is_403_insufficient_scope(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """API: a grant lacking read:biomarkers gets 403 insufficient_scope and a Bearer
    challenge naming the scope."""
    tokens = login(http, sandbox, scope="openid profile")

    response = biomarkers(http, tokens.access_token)

    assert api_error(response, 403) == "insufficient_scope"
    challenge = _challenge(response)
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="read:biomarkers"' in challenge


def test_insufficient_scope_is_401_when_the_knob_says_so(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """API: Loop's docs give both 403 and 401 for insufficient_scope; the knob serves 401."""
    sandbox.set_knobs(insufficient_scope_status=401)
    tokens = login(http, sandbox, scope="openid profile")

    response = biomarkers(http, tokens.access_token)

    assert api_error(response, 401) == "insufficient_scope"
    assert 'error="insufficient_scope"' in _challenge(response)


def test_forbidden_user_is_403_forbidden_and_others_are_not(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """API: a business rule (knob forbidden_users) denies one user with 403 forbidden."""
    sandbox.set_knobs(forbidden_users={"usr_0002"})
    denied = login(http, sandbox, login_hint="usr_0002")
    allowed = login(http, sandbox, login_hint="usr_0003")

    response = biomarkers(http, denied.access_token)

    assert api_error(response, 403) == "forbidden"
    assert "www-authenticate" not in response.headers
    assert biomarkers(http, allowed.access_token).status_code == 200


# --- paging (B1) ------------------------------------------------------------------------


def test_default_page_is_the_first_100_records_with_total_limit_and_offset(
    sandbox: Sandbox, http: httpx.Client, token: str
) -> None:
    """API (B1): without parameters the page is {data, total, limit: 100, offset: 0} and
    holds the first 100 of the user's records."""
    truth = sandbox.truth(USER)
    assert len(truth) > 100

    response = biomarkers(http, token)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    page = response.json()
    assert set(page) == {"data", "total", "limit", "offset"}
    assert page["limit"] == 100
    assert page["offset"] == 0
    assert page["total"] == len(truth)
    assert page["data"] == truth[:100]


def test_limit_500_is_the_maximum(sandbox: Sandbox, http: httpx.Client, token: str) -> None:
    """API (B1): limit=500 is accepted and returns everything the user has (≤ 500)."""
    response = biomarkers(http, token, limit=500)

    assert response.status_code == 200
    assert response.json()["limit"] == 500
    assert response.json()["data"] == sandbox.truth(USER)


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 501},
        {"limit": 0},
        {"limit": -1},
        {"limit": "ten"},
        {"offset": -1},
        {"offset": "x"},
    ],
    ids=["limit-501", "limit-0", "limit-negative", "limit-text", "offset-negative", "offset-text"],
)
def test_out_of_range_paging_parameters_are_400(
    http: httpx.Client, token: str, params: dict[str, int | str]
) -> None:
    """API (B1): limit outside 1-500 or a negative/non-integer offset is 400 {error,
    message}."""
    response = biomarkers(http, token, **params)

    assert api_error(response, 400) == "invalid_request"


def test_paging_with_limit_7_yields_exactly_the_users_records_in_order(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """API (B1): paging through with limit=7 yields exactly sandbox.truth(user), with no
    duplicate id, ordered by (parsed_at, id) ascending."""
    token = login(http, sandbox, login_hint="usr_0004").access_token

    records = _all_pages(http, token, limit=7)

    assert records == sandbox.truth("usr_0004")
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    keys = [(datetime.fromisoformat(r["parsed_at"]), r["id"]) for r in records]
    assert keys == sorted(keys)


def test_each_user_sees_only_their_own_records(sandbox: Sandbox, http: httpx.Client) -> None:
    """API (B1): /me is the token's user: two users' listings are their own truths."""
    one = login(http, sandbox, login_hint="usr_0001").access_token
    two = login(http, sandbox, login_hint="usr_0002").access_token

    first = biomarkers(http, one, limit=500).json()["data"]
    second = biomarkers(http, two, limit=500).json()["data"]

    assert first == sandbox.truth("usr_0001")
    assert second == sandbox.truth("usr_0002")
    assert {r["patient_id"] for r in first}.isdisjoint({r["patient_id"] for r in second})


def test_offset_past_the_end_is_an_empty_page(
    sandbox: Sandbox, http: httpx.Client, token: str
) -> None:
    """API (B1): an offset at or past total answers an empty data list with the total."""
    total = len(sandbox.truth(USER))

    page = biomarkers(http, token, offset=total).json()

    assert page["data"] == []
    assert page["total"] == total
    assert page["offset"] == total


def test_records_carry_the_documented_fields(
    sandbox: Sandbox, http: httpx.Client, token: str
) -> None:
    """API (A, B2): every record has the documented fields with their types; the optional
    ones, when present, have theirs."""
    records = biomarkers(http, token, limit=500).json()["data"]

    assert records
    for record in records:
        assert set(contract.RECORD_FIELDS) <= record.keys(), record
        assert isinstance(record["id"], str)
        assert isinstance(record["patient_id"], str)
        assert isinstance(record["biomarker_code"], str)
        assert isinstance(record["biomarker_name"], str)
        assert isinstance(record["unit"], str)
        assert record["status"] in contract.RECORD_STATUSES
        for name in ("reference_low", "reference_high"):
            assert record[name] is None or isinstance(record[name], int | float), record
        assert isinstance(record["collected_at"], str)
        datetime.fromisoformat(record["parsed_at"])
        if record["value"] is None:
            assert isinstance(record.get("value_text"), str), record
        else:
            assert isinstance(record["value"], int | float), record
        assert record.get("loinc") is None or isinstance(record["loinc"], str)
        assert record.get("value_text") is None or isinstance(record["value_text"], str)
        assert record.get("lab") is None or isinstance(record["lab"], str)
        assert isinstance(record.get("revision", 1), int)
        if "updated_at" in record:
            datetime.fromisoformat(record["updated_at"])


def test_results_key_knob_renames_the_array(
    sandbox: Sandbox, http: httpx.Client, token: str
) -> None:
    """API (B1): with results_key="results" the page's array is under "results"."""
    sandbox.set_knobs(results_key="results")

    page = biomarkers(http, token, limit=10).json()

    assert "data" not in page
    assert page["results"] == sandbox.truth(USER)[:10]
    assert page["limit"] == 10


# --- errors -----------------------------------------------------------------------------


def test_unknown_path_is_404_not_found(http: httpx.Client, token: str) -> None:
    """API: an unknown path is 404 {error: not_found, message}."""
    response = http.get("/v1/biomarkers/someone-else", headers={"Authorization": f"Bearer {token}"})

    assert api_error(response, 404) == "not_found"


def test_api_errors_use_message_and_oauth_errors_use_error_description(
    sandbox: Sandbox, http: httpx.Client
) -> None:
    """Errors: the API answers {error, message}, OAuth endpoints {error, error_description}."""
    api = biomarkers(http, None)
    oauth = refresh(http, sandbox, "lph_rt_never-issued")

    assert api_error(api, 401) == "invalid_token"
    assert set(api.json()) == {"error", "message"}
    assert oauth_error(oauth, 400) == "invalid_grant"
    assert set(oauth.json()) == {"error", "error_description"}
