"""Fault and behaviour knobs of the sandbox, settable at start and at runtime.

One validated model, so a typo in a test's PATCH fails loudly instead of silently doing
nothing.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from loop_sync import contract

Endpoint = Literal["discovery", "jwks", "authorize", "token", "revoke", "introspect", "biomarkers"]
Malformation = Literal["html", "truncated_json", "wrong_types"]
Rate = float  # a probability in [0, 1]
Millis = Annotated[float, Field(ge=0)]


class Knobs(BaseModel):
    """What the sandbox does beyond the happy path. Defaults are a healthy Loop."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    auto_approve: bool = False
    latency_ms: float = Field(0.0, ge=0)
    latency_spike_rate: Rate = Field(0.0, ge=0, le=1)
    latency_spike_ms: float = Field(2000.0, ge=0)
    endpoint_latency_ms: dict[Endpoint, Millis] = Field(
        default_factory=dict, description="more latency for some endpoints, before they act"
    )
    rate_limit_rps: float | None = Field(None, gt=0)
    rate_limit_burst: int | None = Field(None, ge=1, description="default: one second's worth")
    retry_after_format: Literal["seconds", "http-date", "absent"] = "seconds"
    storm_rate: Rate = Field(0.0, ge=0, le=1, description="429s regardless of the budget")
    storm_retry_after_s: int = Field(2, ge=0)
    error_rates: dict[Endpoint, Rate] = Field(default_factory=dict)
    malformed_rates: dict[Malformation, Rate] = Field(default_factory=dict)
    access_token_ttl_s: int = Field(contract.ACCESS_TOKEN_TTL_S, ge=1)
    refresh_answer_delay_ms: float = Field(
        0.0, ge=0, description="a refresh's answer leaves this long after the token rotated"
    )
    lose_refresh_rate: Rate = Field(0.0, ge=0, le=1)
    lose_refresh_users: set[str] = Field(
        default_factory=set, description="each loses the response of its next refresh, once"
    )
    narrow_scopes: set[str] = Field(default_factory=set, description="withheld at consent")
    rotate_refresh_tokens: bool = True
    insufficient_scope_status: Literal[401, 403] = 403
    results_key: Literal["data", "results"] = "data"
    advertise_introspection: bool = Field(True, description="list it in discovery")
    forbidden_users: set[str] = Field(default_factory=set)

    def update(self, changes: dict[str, object]) -> Knobs:
        """A validated copy with `changes` applied; raises pydantic.ValidationError."""
        return Knobs.model_validate({**self.model_dump(), **changes})
