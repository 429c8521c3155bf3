"""`make demo`: the whole job on the embedded default, offline, in about a minute.

A local Loop sandbox and the consent web app run in-process; 25 synthetic people connect
through the real /login → consent → /callback HTTP path; the nightly sync flow runs in
Prefect's local mode; the sandbox's clock then moves a month on (new results, corrections,
deletions) and the flow runs again. What is left behind is a SQLite warehouse in `demo/`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
from cryptography.fernet import Fernet
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sqlalchemy import Engine, func, select, text
from starlette.types import ASGIApp, Receive, Scope, Send

from loop_sync.config import Settings, load_settings
from loop_sync.sandbox import Knobs, Sandbox, SandboxClient, SandboxConfig, SandboxHost
from loop_sync.sandbox.authority import user_ids
from loop_sync.schema import sync_state, upgrade
from loop_sync.services import Services
from loop_sync.serving import BackgroundServer
from loop_sync.sync import RunSummary
from loop_sync.vault import utcnow
from loop_sync.web.app import create_app

USERS = 25
MONTH_S = 30 * 86400
# How long the demo lets Prefect's local (ephemeral) server take to start. Its first start
# from a fresh clone creates and migrates a new database from cold files: that took more
# than Prefect's default of 20 s on a slow day of the 2-core build machine, and the demo
# stopped with "Timed out while attempting to connect to ephemeral Prefect API server".
PREFECT_STARTUP_S = 180
EXAMPLE_QUERIES = {
    "Latest LDL cholesterol per person, in mg/dL": (
        "SELECT user_id, collected_at, value_operator, value_canonical, unit_canonical\n"
        "FROM v_latest_biomarkers WHERE biomarker = 'ldl_c' ORDER BY user_id;"
    ),
    "Results outside their reference range, by biomarker": (
        "SELECT biomarker, direction, COUNT(*) AS results\n"
        "FROM v_out_of_range GROUP BY biomarker, direction ORDER BY results DESC;"
    ),
    "Corrections Loop sent, old value next to new": (
        "SELECT h.result_id, h.value_canonical AS before, r.value_canonical AS after,\n"
        "       h.superseded_at\n"
        "FROM biomarker_result_history h JOIN biomarker_results r USING (result_id);"
    ),
}


def prefect_environment(directory: Path) -> dict[str, str]:
    """Prefect's local mode for the demo, unless the environment says otherwise: its state
    under `directory`, no analytics, quiet logs, and time for a cold first start."""
    return {
        "PREFECT_HOME": str((directory / "prefect").resolve()),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(PREFECT_STARTUP_S),
    }


def run_demo(directory: Path, console: Console) -> Path:
    """Run the demo into `directory` (replacing an earlier demo's warehouse); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    warehouse = directory / "loop_sync_demo.db"
    for stale in directory.glob("loop_sync_demo.db*"):
        stale.unlink()
    for name, value in prefect_environment(directory).items():
        os.environ.setdefault(name, value)
    started = time.monotonic()
    with _platform(warehouse) as (sandbox, web_url, settings):
        console.print(f"[bold]1.[/bold] Loop sandbox on {sandbox.issuer}, web app on {web_url}")
        services = Services.build(settings)
        try:
            upgrade(services.engine)
            _connect_everyone(web_url, console)
            console.print("[bold]3.[/bold] Nightly sync, through Prefect (local mode)")
            first = _sync(services.engine, console)
            sandbox.clock.advance(MONTH_S)
            console.print(
                "[bold]4.[/bold] A month later at Loop (new results, corrections, deletions)"
            )
            second = _sync(services.engine, console)
            _report(console, [first, second], services.engine, warehouse)
        finally:
            services.close()
    console.print(f"Done in {time.monotonic() - started:.0f} s. Warehouse: {warehouse}")
    return warehouse


@contextmanager
def _platform(warehouse: Path) -> Iterator[tuple[Sandbox, str, Settings]]:
    """The sandbox and the web app on free loopback ports, and settings pointing at them."""
    apps: list[ASGIApp] = []  # the web app needs settings that need its URL: bind first

    async def web(scope: Scope, receive: Receive, send: Send) -> None:
        await apps[0](scope, receive, send)

    server = BackgroundServer(web)
    web_url = server.url
    client = SandboxClient(
        client_id="loop-sync-demo",
        client_secret="demo-secret-for-the-local-sandbox-only",  # noqa: S106
        redirect_uri=f"{web_url}/callback",
    )
    with SandboxHost() as host:
        sandbox = host.mount(
            SandboxConfig(users=USERS, seed=42, knobs=Knobs(auto_approve=True), client=client)
        )
        env = {
            "LOOP_CLIENT_ID": client.client_id,
            "LOOP_CLIENT_SECRET": client.client_secret,
            "LOOP_REDIRECT_URI": client.redirect_uri,
            "LOOP_ISSUER": host.url,
            "LOOP_API_BASE_URL": host.url,
            "LOOP_SYNC_DATABASE_URL": f"sqlite:///{warehouse.resolve()}",
            "LOOP_SYNC_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            "LOOP_SYNC_RATE_LIMIT_RPS": "200",
        }
        os.environ.update(env)  # the flows read their settings from the environment
        settings = load_settings()
        web_services = Services.build(settings)
        try:
            upgrade(web_services.engine)
            apps.append(create_app(web_services))
            with server:
                yield sandbox, web_url, settings
        finally:
            web_services.close()


def _connect_everyone(web_url: str, console: Console) -> None:
    """Each person: open /login, consent at Loop (auto-approved), land on /callback."""
    with Progress(console=console, transient=True) as bar, httpx.Client(timeout=30) as browser:
        task = bar.add_task("connecting people", total=USERS)
        for user in user_ids(USERS):
            browser.cookies.clear()
            page = browser.get(
                f"{web_url}/login", params={"login_hint": user}, follow_redirects=True
            )
            if page.status_code != 200 or "connected" not in page.text.lower():
                msg = f"{user} could not connect: HTTP {page.status_code}"
                raise RuntimeError(msg)
            bar.advance(task)
    console.print(f"[bold]2.[/bold] {USERS} people connected through /login → consent → /callback")


def _sync(engine: Engine, console: Console) -> RunSummary:
    """Run the sync flow while a progress bar follows the users it has attempted."""
    # Imported here: Prefect reads PREFECT_HOME and friends when first imported.
    from flows.sync_biomarkers import sync_biomarkers  # noqa: PLC0415

    since = utcnow()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("syncing users", total=USERS)
        with _polling(lambda: bar.update(task, completed=_attempted(engine, since))):
            state = anyio.run(lambda: sync_biomarkers(batch_size=5, return_state=True))
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, RunSummary):
        msg = f"the sync flow ended {state.name} without a summary"
        raise RuntimeError(msg)
    console.print(
        f"   {state.name}: {summary.users_succeeded}/{summary.users_attempted} users, "
        f"+{summary.rows_inserted} new, {summary.rows_updated} corrected, "
        f"{summary.rows_deleted} deleted, {summary.rows_unchanged} unchanged"
    )
    return summary


@contextmanager
def _polling(tick: Callable[[], Any], every_s: float = 0.2) -> Iterator[None]:
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            tick()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        tick()


def _attempted(engine: Engine, since: datetime) -> int:
    with engine.connect() as connection:
        query = select(func.count()).where(sync_state.c.last_attempt_at >= since)
        return int(connection.execute(query.select_from(sync_state)).scalar_one())


def _report(console: Console, runs: list[RunSummary], engine: Engine, warehouse: Path) -> None:
    table = Table(title="The two runs")
    table.add_column("")
    for label in ("first sync", "a month later"):
        table.add_column(label, justify="right")
    for name in (
        "users_succeeded",
        "users_failed",
        "rows_inserted",
        "rows_updated",
        "rows_deleted",
        "rows_rejected",
        "rows_unchanged",
    ):
        table.add_row(name.replace("_", " "), *(str(getattr(run, name)) for run in runs))
    table.add_row("duration", *(f"{run.duration_s:.1f} s" for run in runs))
    console.print(table)
    console.print(f"Try these in any SQLite client (e.g. `sqlite3 {warehouse}`):")
    with engine.connect() as connection:
        for title, sql in EXAMPLE_QUERIES.items():
            found = len(connection.execute(text(sql)).all())
            console.print(f"\n-- {title} ({found} rows now)\n{sql}")
