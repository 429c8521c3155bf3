"""The `loop-sync` command. Each command parses options and calls one library function."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer
from cryptography.fernet import Fernet
from rich.console import Console
from rich.table import Table

from loop_sync.errors import LoopSyncError

if TYPE_CHECKING:
    from loop_sync.services import Services

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # tracebacks with locals could print secrets
    help="Keep a warehouse of Loop lab biomarkers up to date.",
)
keys_app = typer.Typer(no_args_is_help=True, help="Encryption keys for tokens at rest.")
app.add_typer(keys_app, name="keys")
db_app = typer.Typer(no_args_is_help=True, help="The database schema.")
app.add_typer(db_app, name="db")
console = Console(soft_wrap=True)


@contextmanager
def _services(
    *,
    schema_required: bool = True,
    stored_tokens: bool = True,
    loop: bool = True,
    onboarding: bool = False,
) -> Iterator[Services]:
    """Settings read once, everything wired, and what the command needs checked before it
    writes anything (see `Services.check`); closed afterwards."""
    from loop_sync.config import load_settings
    from loop_sync.services import Services

    settings = load_settings()
    services = Services.build(settings)
    try:
        services.check(
            schema=schema_required, stored_tokens=stored_tokens, loop=loop, onboarding=onboarding
        )
        yield services
    finally:
        services.close()


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
    pregenerate: Annotated[
        bool, typer.Option(help="Make every user's results at start, not at first request.")
    ] = False,
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
        pregenerate=pregenerate,
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


@keys_app.command("rotate")
def keys_rotate() -> None:
    """Re-encrypt every stored token under the first key of LOOP_SYNC_ENCRYPTION_KEYS.

    Example: LOOP_SYNC_ENCRYPTION_KEYS=$NEW,$OLD loop-sync keys rotate
    """
    with _services(stored_tokens=False, loop=False) as services:  # it decrypts every one
        touched = services.vault.rotate_keys()
    console.print(f"re-encrypted {touched} rows; the keys after the first can now be removed")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create the tables loop-sync needs. Running it again changes nothing.

    Example: LOOP_SYNC_DATABASE_URL=sqlite:///loop_sync.db loop-sync db upgrade
    """
    from loop_sync.schema import upgrade

    with _services(schema_required=False, stored_tokens=False, loop=False) as services:
        upgrade(services.engine)
        console.print(f"schema up to date in {services.settings.database_url_display}")


@app.command()
def web(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Serve the consent web app where people connect their Loop account.

    Example: loop-sync web --host 127.0.0.1 --port 8000
    """
    import httpx

    from loop_sync.web.app import serve_web

    with _services(onboarding=True) as services:
        callback = httpx.URL(services.settings.redirect_uri)
        home = f"{callback.scheme}://{callback.netloc.decode()}/"

        def announce(url: str) -> None:
            console.print(f"onboarding app listening on {url}; people open {home}")

        serve_web(services, host, port, announce)


@app.command()
def users() -> None:
    """List the connected users: grant status, scopes, consent and last refresh.

    Example: loop-sync users
    """
    from loop_sync.grants import list_grants

    with (
        _services(stored_tokens=False, loop=False) as services,
        services.engine.connect() as connection,
    ):
        grants = list_grants(connection)
    table = Table("user", "status", "scopes", "consented", "last refresh", "reason")
    for grant in grants:
        table.add_row(
            grant.user_id,
            grant.status,
            " ".join(grant.scopes),
            f"{grant.consented_at:%Y-%m-%d %H:%M}Z",
            f"{grant.last_refresh_at:%Y-%m-%d %H:%M}Z" if grant.last_refresh_at else "never",
            grant.status_reason or "",
        )
    console.print(table)
    console.print(f"{len(grants)} users")


@app.command()
def rotate(
    user: Annotated[
        list[str] | None, typer.Option("--user", help="Only this user (repeatable).")
    ] = None,
    idle_days: Annotated[
        float | None, typer.Option(help="Only grants not refreshed for this many days.")
    ] = None,
) -> None:
    """Keep grants alive: refresh their tokens, sliding Loop's 90-day window.

    Exits 1 if any user failed or needs to connect again; the others are still refreshed.

    Example: loop-sync rotate --idle-days 30
    """
    with _services() as services:
        report = services.vault.rotate(user, idle_days, budget=services.budget)
    console.print(
        f"refreshed {len(report.refreshed)}, reauth_required {len(report.reauth_required)}, "
        f"failed {len(report.failed) - len(report.reauth_required)}"
    )
    for user_id, reason in report.failed.items():
        console.print(f"  {user_id}: {reason}")
    if report.failed:
        raise typer.Exit(1)


@app.command()
def disconnect(
    user: Annotated[str, typer.Option("--user", help="The Loop user id to disconnect.")],
    purge: Annotated[bool, typer.Option(help="Also delete the user's data.")] = False,
) -> None:
    """Revoke a user's grant at Loop and mark it revoked here.

    Example: loop-sync disconnect --user usr_0042 --purge
    """
    with _services() as services:
        services.vault.disconnect(user, purge=purge)
    console.print(f"{user} disconnected" + (" and purged" if purge else ""))


@app.command()
def sync(
    user: Annotated[
        list[str] | None, typer.Option("--user", help="Sync this user (repeatable).")
    ] = None,
    all_users: Annotated[bool, typer.Option("--all", help="Sync every active grant.")] = False,
    concurrency: Annotated[
        int | None, typer.Option(help="Users fetched at once (default LOOP_SYNC_CONCURRENCY).")
    ] = None,
) -> None:
    """Pull biomarker results from Loop into the warehouse, without Prefect.

    Exits 1 if any user failed or must connect again; the others are still synced.

    Example: loop-sync sync --all --concurrency 16
    """
    from rich.progress import Progress

    from loop_sync.sync import run_sync, select_users

    if not user and not all_users:
        raise typer.BadParameter("name users with --user, or pass --all")
    with _services() as services:
        users = select_users(services.engine, None if all_users else user)
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("syncing users", total=len(users))
            summary = run_sync(
                services,
                users,
                concurrency=concurrency,
                progress=lambda done, total: bar.update(task, completed=done),
            )
    table = Table("run", summary.run_id, title=f"sync {summary.status}")
    for name, value in [
        ("users attempted", summary.users_attempted),
        ("users synced", summary.users_succeeded),
        ("users failed", summary.users_failed),
        ("users reauth_required", summary.users_reauth_required),
        ("rows inserted", summary.rows_inserted),
        ("rows updated", summary.rows_updated),
        ("rows deleted", summary.rows_deleted),
        ("rows rejected", summary.rows_rejected),
        ("rows unchanged", summary.rows_unchanged),
        ("duration", f"{summary.duration_s:.1f} s"),
    ]:
        table.add_row(name, str(value))
    console.print(table)
    for user_id, reason in summary.failures.items():
        console.print(f"  {user_id}: {reason}")
    if summary.failures:
        raise typer.Exit(1)


@app.command()
def backfill(
    user: Annotated[
        list[str] | None, typer.Option("--user", help="Only this user (repeatable).")
    ] = None,
    start: Annotated[
        datetime | None, typer.Option(formats=["%Y-%m-%d"], help="First collected_at day.")
    ] = None,
    end: Annotated[
        datetime | None, typer.Option(formats=["%Y-%m-%d"], help="Last collected_at day.")
    ] = None,
    mode: Annotated[
        str, typer.Option(help="refetch (from Loop) or replay (from the raw landing).")
    ] = "refetch",
) -> None:
    """Re-load results collected in a window; never touches users' live sync state.

    Example: loop-sync backfill --mode replay --start 2026-01-01 --end 2026-03-31
    """
    from loop_sync.backfill import backfill_users
    from loop_sync.sync import finish_run, select_users, start_run

    if mode not in ("refetch", "replay"):
        raise typer.BadParameter("mode must be refetch or replay")
    refetch = mode == "refetch"  # a replay reads the raw landing only
    with _services(stored_tokens=refetch, loop=refetch) as services:
        users = select_users(services.engine, user)
        summary = start_run(services.engine, "backfill")
        try:
            summary.merge(
                backfill_users(
                    services,
                    summary.run_id,
                    users,
                    start=start.date() if start else None,
                    end=end.date() if end else None,
                    mode="replay" if mode == "replay" else "refetch",
                )
            )
        finally:
            finish_run(services.engine, summary)
    console.print(
        f"backfill {summary.status}: {summary.users_attempted} users, "
        f"+{summary.rows_inserted} ~{summary.rows_updated} rows, {summary.rows_rejected} rejected"
    )
    if summary.failures:
        raise typer.Exit(1)


@app.command()
def demo(
    directory: Annotated[
        str, typer.Option("--dir", help="Where to leave the demo warehouse.")
    ] = "demo",
) -> None:
    """The whole job offline: sandbox, 25 consents, two Prefect syncs, a SQLite warehouse.

    Example: loop-sync demo --dir demo
    """
    from pathlib import Path

    from loop_sync.demo import run_demo

    run_demo(Path(directory), console)


@app.command()
def serve(
    project: Annotated[
        str, typer.Option(help="The checkout holding deployments.yaml and flows/.")
    ] = ".",
    limit: Annotated[int | None, typer.Option(help="At most this many runs at once.")] = None,
) -> None:
    """Run the schedules of deployments.yaml from this one process (no work pool needed).

    Example: PREFECT_API_URL=http://127.0.0.1:4200/api loop-sync serve --project .
    """
    from pathlib import Path

    from loop_sync.config import load_settings
    from loop_sync.orchestration import serve_schedules

    load_settings()  # a bad configuration stops here, not in the first scheduled run
    serve_schedules(Path(project), limit=limit)
