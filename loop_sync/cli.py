"""The `loop-sync` command. Each command parses options and calls one library function."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from cryptography.fernet import Fernet
from rich.console import Console
from rich.table import Table

from loop_sync.errors import LoopSyncError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # tracebacks with locals could print secrets
    help="Keep a warehouse of Loop lab biomarkers up to date.",
)
keys_app = typer.Typer(no_args_is_help=True, help="Encryption keys for tokens at rest.")
app.add_typer(keys_app, name="keys")
console = Console(soft_wrap=True)


def main() -> None:
    """Entry point: a known failure is one line on stderr and exit code 2, no traceback."""
    try:
        app()
    except LoopSyncError as exc:
        sys.stderr.write(f"loop-sync: error: {exc}\n")
        raise SystemExit(2) from None


@app.command()
def sandbox(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8765,
    users: Annotated[int, typer.Option(help="Number of users, usr_0001 ... usr_NNNN.")] = 25,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic results.")] = 1,
    results_per_user: Annotated[int, typer.Option(help="Results per user at start.")] = 40,
    auto_approve: Annotated[
        bool, typer.Option(help="Grant consent at once instead of showing Allow/Deny.")
    ] = False,
    latency_ms: Annotated[float, typer.Option(help="Added latency per request.")] = 0.0,
    rate_limit: Annotated[
        float | None, typer.Option(help="Requests/s allowed per client (429 beyond).")
    ] = None,
    access_token_ttl: Annotated[int, typer.Option(help="Access-token lifetime, seconds.")] = 3600,
    knobs: Annotated[
        str | None,
        typer.Option(help='Any other knobs as JSON, e.g. \'{"error_rates": {"token": 0.1}}\'.'),
    ] = None,
) -> None:
    """Run a local Loop platform (identity + clinical API) for development and tests.

    Example: loop-sync sandbox --port 8765 --auto-approve --users 5
    """
    from loop_sync.sandbox.app import SandboxConfig
    from loop_sync.sandbox.knobs import Knobs
    from loop_sync.sandbox.server import serve_forever

    config = SandboxConfig(
        users=users,
        seed=seed,
        results_per_user=results_per_user,
        knobs=Knobs.model_validate(
            {
                "auto_approve": auto_approve,
                "latency_ms": latency_ms,
                "rate_limit_rps": rate_limit,
                "access_token_ttl_s": access_token_ttl,
                **json.loads(knobs or "{}"),
            }
        ),
    )

    def announce(url: str) -> None:
        console.print(f"[bold]Loop sandbox[/bold] on {url} with {users} users (seed {seed})")
        console.print(f"  discovery  {url}/.well-known/openid-configuration")
        console.print(f"  client     {config.client.client_id} -> {config.client.redirect_uri}")
        console.print(f"  knobs      {url}/_sandbox/knobs   counters {url}/_sandbox/counters")
        console.print(f"Point loop-sync at it:  export LOOP_ISSUER={url} LOOP_API_BASE_URL={url}")
        console.print("Stop with Ctrl-C.")

    serve_forever(config, host, port, announce)


@app.command("config")
def show_config() -> None:
    """Show the settings loop-sync would use, secrets masked.

    Example: LOOP_CLIENT_ID=my-app loop-sync config
    """
    from loop_sync.config import load_settings

    settings = load_settings()
    table = Table("setting", "value")
    for name, value in settings.model_dump().items():
        table.add_row(name, str(value))
    table.add_row("database (shown)", settings.database_url_display)
    console.print(table)


@keys_app.command("generate")
def keys_generate() -> None:
    """Print a new encryption key. Put it first in LOOP_SYNC_ENCRYPTION_KEYS to rotate.

    Example: export LOOP_SYNC_ENCRYPTION_KEYS=$(loop-sync keys generate)
    """
    typer.echo(Fernet.generate_key().decode())
