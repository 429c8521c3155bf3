"""Helpers for the vault tests: consent a user headlessly, read rows, call the sandbox.

Everything goes through the real database and real HTTP on loopback; nothing is mocked.
"""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import Engine, Row, select, update

from loop_sync import contract
from loop_sync.sandbox import Sandbox
from loop_sync.schema import grant_events, grants, tokens
from loop_sync.services import Services


def consent(services: Services, user_id: str) -> str:
    """Run the consent flow for `user_id` as a browser would (the sandbox auto-approves)."""
    url, binding = services.onboarding.start(user_id)
    location = httpx.URL(httpx.get(url).headers["location"])
    return services.onboarding.finish(dict(location.params), binding)


def api_status(sandbox: Sandbox, access_token: str) -> int:
    """The status Loop's clinical API answers a bearer token with."""
    response = httpx.get(
        f"{sandbox.issuer}{contract.BIOMARKERS_PATH}",
        headers={"Authorization": f"Bearer {access_token}"},
        params={"limit": 1},
    )
    return response.status_code


def token_endpoint(sandbox: Sandbox, **form: str) -> httpx.Response:
    """A raw request to the sandbox's token endpoint, as the registered client."""
    client = sandbox.config.client
    return httpx.post(
        f"{sandbox.issuer}/v1/oauth/token",
        data={**form, "client_id": client.client_id, "client_secret": client.client_secret},
    )


def introspect(sandbox: Sandbox, token: str) -> dict[str, Any]:
    client = sandbox.config.client
    response = httpx.post(
        f"{sandbox.issuer}/v1/oauth/introspect",
        data={"token": token, "client_id": client.client_id, "client_secret": client.client_secret},
    )
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def revoke_at_loop(sandbox: Sandbox, token: str) -> None:
    """The user (or Loop) revokes the grant behind `token`, outside loop-sync."""
    client = sandbox.config.client
    httpx.post(
        f"{sandbox.issuer}/v1/oauth/revoke",
        data={"token": token, "client_id": client.client_id, "client_secret": client.client_secret},
    ).raise_for_status()


def token_row(engine: Engine, user_id: str) -> Row[Any] | None:
    with engine.connect() as connection:
        return connection.execute(select(tokens).where(tokens.c.user_id == user_id)).one_or_none()


def grant_row(engine: Engine, user_id: str) -> Row[Any]:
    with engine.connect() as connection:
        return connection.execute(select(grants).where(grants.c.user_id == user_id)).one()


def events(engine: Engine, user_id: str) -> list[Row[Any]]:
    with engine.connect() as connection:
        return list(
            connection.execute(
                select(grant_events)
                .where(grant_events.c.user_id == user_id)
                .order_by(grant_events.c.id)
            )
        )


def set_tokens(engine: Engine, user_id: str, **values: Any) -> None:
    """Write columns of a user's tokens row directly, as a crashed process would leave it."""
    with engine.begin() as connection:
        connection.execute(update(tokens).where(tokens.c.user_id == user_id).values(**values))


def stored_refresh_token(services: Services, user_id: str) -> str:
    row = token_row(services.engine, user_id)
    assert row is not None
    assert row.refresh_token is not None
    return services.cipher.decrypt(row.refresh_token)


def stored_access_token(services: Services, user_id: str) -> str:
    row = token_row(services.engine, user_id)
    assert row is not None
    assert row.access_token is not None
    return services.cipher.decrypt(row.access_token)
