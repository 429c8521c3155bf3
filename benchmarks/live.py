"""The nightly sync flow against a sandbox in a separate process, on PostgreSQL.

`run` starts ``loop-sync sandbox`` and a Prefect server as subprocesses, consents users
headlessly through the real onboarding, and runs every sync as the real
`flows.sync_biomarkers.sync_biomarkers` flow in a child process (``python -m
benchmarks.live``), which prints the flow's `RunSummary`, its wall time and its
`resource.getrusage` figures as one JSON line. Between runs the warehouse is emptied
(grants and tokens kept), so every "first sync" starts from nothing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
from cryptography.fernet import Fernet
from sqlalchemy import Engine, text, update

from benchmarks._common import Report, engine_for, rate, scratch_database, scratch_schema
from loop_sync.config import load_settings
from loop_sync.sandbox.app import SandboxClient
from loop_sync.sandbox.authority import user_ids
from loop_sync.schema import metadata, tokens, upgrade
from loop_sync.services import Services

MARK = "BENCH_RESULT "
READY = "BENCH_READY"
UNLIMITED_RPS = 100_000.0
ROOT = Path(__file__).resolve().parents[1]  # where `benchmarks` and `flows` import from
WIPED = (
    "biomarker_result_history",
    "biomarker_results",
    "raw_records",
    "rejects",
    "sync_state",
    "sync_runs",
)
# The time split, in the order the data flows.
STAGES = ("rate_wait", "http", "json_decode", "hash", "normalize", "db_write")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def _process(command: list[str], env: dict[str, str], ready: str, what: str) -> Iterator[None]:
    """A subprocess, once GET `ready` answers 200; terminated afterwards."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log, cwd=ROOT)  # noqa: S603
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    httpx.get(ready, timeout=2).raise_for_status()
                    break
                except httpx.HTTPError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        msg = f"{what} did not start: {log.read().decode()[-2000:]}"
                        raise RuntimeError(msg) from None
                    time.sleep(0.2)
            yield
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def sandbox_process(env: dict[str, str], users: int, results_per_user: int) -> Iterator[str]:
    """``loop-sync sandbox`` in its own process (auto-approve, every user's results made
    before it answers, so not during a measured run); its URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "loop_sync", "sandbox", "--port", str(port)]
    command += ["--users", str(users), "--results-per-user", str(results_per_user)]
    command += ["--auto-approve", "--pregenerate"]
    with _process(command, env, f"{url}/_sandbox/counters", "the sandbox"):
        yield url


@contextmanager
def prefect_server(env: dict[str, str], database: str) -> Iterator[str]:
    """A Prefect server of its own, as a deployment has one, on a PostgreSQL database of
    its own, as Prefect advises for production: on its default SQLite, the second of two
    flow runs starting at once (the shards) waited ~2 s for the server's database."""
    port = _free_port()
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    command += ["--port", str(port)]
    api = f"http://127.0.0.1:{port}/api"
    server_env = {**env, "PREFECT_API_DATABASE_CONNECTION_URL": database}
    with _process(command, server_env, f"{api}/health", "the Prefect server"):
        yield api


def _counters(url: str) -> tuple[int, int]:
    """(requests, 429s) the sandbox has answered so far, all endpoints and clients."""
    snapshot = httpx.get(f"{url}/_sandbox/counters", timeout=10).json()
    return snapshot["requests"]["total"], snapshot["rate_limited"]["total"]


def _knobs(url: str, **changes: Any) -> None:
    httpx.patch(f"{url}/_sandbox/knobs", json=changes, timeout=10).raise_for_status()


def consent_users(env: dict[str, str], users: Sequence[str]) -> None:
    """Each user through the real onboarding, the sandbox approving at once (setup, not
    measured; run in worker processes, since a consent is CPU-bound on both sides)."""
    with _environment(env):
        services = Services.build(load_settings())
    try:
        with httpx.Client(timeout=30) as browser:
            for user in users:
                url, binding = services.onboarding.start(user)
                location = httpx.URL(browser.get(url).headers["location"])
                services.onboarding.finish(dict(location.params), binding)
    finally:
        services.close()


def _consent(env: dict[str, str], users: Sequence[str]) -> None:
    workers = 2
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=spawn) as pool:
        list(pool.map(consent_users, [env] * workers, [users[i::workers] for i in range(workers)]))


def _wipe(db_url: str) -> None:
    engine = engine_for(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(f"TRUNCATE {', '.join(WIPED)}"))
    finally:
        engine.dispose()
    _settle(db_url)


def _settle(db_url: str) -> None:
    """VACUUM ANALYZE every loop-sync table, so that autovacuum, woken by the last run's
    writes or the consents, does not take a core from the next measured run (a nightly
    re-sync comes a day after the writes, not seconds)."""
    engine = engine_for(db_url)
    names = ", ".join(table.name for table in metadata.sorted_tables)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text(f"VACUUM ANALYZE {names}"))
    finally:
        engine.dispose()


def _start_flow(env: dict[str, str], shard: int = 0, shards: int = 1) -> subprocess.Popen[str]:
    """A child that runs the flow at once, or, for a shard, once told to (`_go`)."""
    command = [sys.executable, "-m", "benchmarks.live", str(shard), str(shards)]
    return subprocess.Popen(  # noqa: S603
        command,
        env=env,
        cwd=ROOT,
        stdin=subprocess.PIPE if shards > 1 else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _go(processes: Sequence[subprocess.Popen[str]]) -> None:
    """Start the shards' flows together, once every child has imported and reached the
    Prefect server: on two cores, two interpreters starting at once finish their
    start-up seconds apart, and the combined rate measures the flows, not that."""
    for process in processes:
        if not any(line.strip() == READY for line in process.stdout or ()):
            _flow_result(process)  # it ended before it was ready: raises with its error
    for process in processes:
        if process.stdin is not None:
            process.stdin.write("go\n")
            process.stdin.flush()


def _flow_result(process: subprocess.Popen[str]) -> dict[str, Any]:
    stdout, stderr = process.communicate()
    for line in stdout.splitlines():
        if line.startswith(MARK):
            found: dict[str, Any] = json.loads(line.removeprefix(MARK))
            return found
    msg = f"the sync flow's process failed ({process.returncode}): {stderr[-3000:]}"
    raise RuntimeError(msg)


def _flow(env: dict[str, str]) -> dict[str, Any]:
    """One nightly sync flow run over every active grant, in a child process."""
    return _flow_result(_start_flow(env))


def _records(result: dict[str, Any]) -> int:
    return int(
        result["rows_inserted"]
        + result["rows_updated"]
        + result["rows_unchanged"]
        + result["rows_rejected"]
    )


def _from_429(result: dict[str, Any]) -> int:
    failures: dict[str, str] = result["failures"]
    return sum("429" in reason for reason in failures.values())


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run(
    report: Report,
    database: str,
    *,
    users: int,
    results_per_user: int,
    rate_limit: float,
    latency_ms: float,
    rss_users: tuple[int, int],
) -> None:
    """The sync figures and targets (issue 6, priority 3 and the RSS and overhead targets)."""
    client = SandboxClient()
    most = max(users, *rss_users)
    with scratch_schema(database) as (_, db_url), tempfile.TemporaryDirectory() as home:
        env = {
            **os.environ,
            "LOOP_CLIENT_ID": client.client_id,
            "LOOP_CLIENT_SECRET": client.client_secret,
            "LOOP_REDIRECT_URI": client.redirect_uri,
            "LOOP_SYNC_DATABASE_URL": db_url,
            "LOOP_SYNC_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
            "PREFECT_HOME": home,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }
        env.pop("PREFECT_API_URL", None)
        started = time.perf_counter()
        with (
            scratch_database(database, "postgresql+asyncpg") as prefect_db,
            prefect_server(env, prefect_db) as api,
            sandbox_process(env, most, results_per_user) as url,
        ):
            env |= {"PREFECT_API_URL": api, "LOOP_ISSUER": url, "LOOP_API_BASE_URL": url}
            report.add("sync", "sandbox + Prefect server started, s", _secs(started))
            with _environment(env):
                services = Services.build(load_settings())
            try:
                upgrade(services.engine)
                consented = 0

                def consent_up_to(count: int) -> None:
                    nonlocal consented
                    if count > consented:
                        began = time.perf_counter()
                        _consent(env, user_ids(count)[consented:])
                        report.add(
                            "setup", f"users {consented + 1}-{count} consented, s", _secs(began)
                        )
                        consented = count

                unlimited = {**env, "LOOP_SYNC_RATE_LIMIT_RPS": str(UNLIMITED_RPS)}
                limited = {**env, "LOOP_SYNC_RATE_LIMIT_RPS": str(rate_limit)}
                consent_up_to(rss_users[0])
                _wipe(db_url)
                small = _flow(unlimited)
                consent_up_to(users)
                _wipe(db_url)
                _knobs(url, latency_ms=latency_ms, rate_limit_rps=rate_limit)
                _limited(report, url, limited, users=users, rps=rate_limit, latency_ms=latency_ms)
                _wipe(db_url)
                _expired(report, url, limited, services.engine, users=users, rps=rate_limit)
                _wipe(db_url)
                _sharded(report, url, limited, rps=rate_limit)
                _knobs(url, latency_ms=0, rate_limit_rps=None)
                _wipe(db_url)
                first = _flow(unlimited)
                _settle(db_url)
                again = _flow(unlimited)
                _resync(report, first, again)
                consent_up_to(rss_users[1])
                _wipe(db_url)
                large = _flow(unlimited)
                _memory(report, rss_users, small, large)
            finally:
                services.close()


def _secs(since: float) -> str:
    return f"{time.perf_counter() - since:.1f}"


def _limited(
    report: Report, url: str, env: dict[str, str], *, users: int, rps: float, latency_ms: float
) -> None:
    section = f"L={latency_ms:g}ms"
    result, share, from_429 = _measured(report, section, url, env, users=users, rps=rps)
    wall = result["wall_s"]
    seconds: dict[str, float] = result["seconds"]
    for stage in STAGES:
        spent = seconds.get(stage, 0.0)
        report.add(
            section, f"time split: {stage}, s (share of wall)", f"{spent:.1f} ({spent / wall:.0%})"
        )
    overhead = _overhead(result)
    report.add(
        section,
        "time split: orchestration overhead, s (share of wall)",
        f"{wall * overhead:.2f} ({overhead:.1%})",
    )
    report.target(
        share >= 0.90 and from_429 == 0,
        f"request rate {share:.0%} of R >= 90%, {from_429} 429s became failures (0)",
    )
    report.target(overhead < 0.05, f"orchestration overhead {overhead:.1%} of wall time < 5%")


def _expired(
    report: Report, url: str, env: dict[str, str], engine: Engine, *, users: int, rps: float
) -> None:
    """The same first sync with every access token expired, as a nightly run finds them a
    day after the last: a refresh and a page per user. A figure, not one of the targets."""
    with engine.begin() as connection:
        expired = datetime.now(UTC) - timedelta(hours=1)
        connection.execute(update(tokens).values(access_expires_at=expired))
    _measured(report, "expired", url, env, users=users, rps=rps)


def _measured(
    report: Report, section: str, url: str, env: dict[str, str], *, users: int, rps: float
) -> tuple[dict[str, Any], float, int]:
    """One run of the flow under the sandbox's limit and its figures; (its result, the
    achieved share of R, 429s that became failures)."""
    requests_before, limited_before = _counters(url)
    result = _flow(env)
    requests_after, limited_after = _counters(url)
    wall = result["wall_s"]
    requests = requests_after - requests_before
    achieved = rate(requests, wall)
    share = achieved / rps
    from_429 = _from_429(result)
    report.add(section, f"first sync, {users:,} users, R={rps:g}/s: wall s", f"{wall:.1f}")
    report.add(
        section,
        "users ok / failed / reauth",
        f"{result['users_succeeded']} / {result['users_failed']} / "
        f"{result['users_reauth_required']}",
    )
    report.add(section, "users/s", f"{rate(result['users_succeeded'], wall):.1f}")
    report.add(section, "rows/s", f"{rate(_records(result), wall):,.0f}")
    report.add(
        section, "requests; achieved rate vs R", f"{requests:,}; {achieved:.1f}/s = {share:.0%}"
    )
    report.add(
        section,
        "429s seen / 429s that became failures",
        f"{limited_after - limited_before} / {from_429}",
    )
    report.add(
        section,
        "CPU s of the sync process per 1,000 users",
        f"{_cpu_per_1000_users(result):.1f}",
    )
    report.add(section, "peak RSS of the sync process, MiB", f"{result['max_rss_kib'] / 1024:.0f}")
    return result, share, from_429


def _cpu_per_1000_users(result: dict[str, Any]) -> float:
    return float(result["cpu_s"]) * 1000 / max(int(result["users_attempted"]), 1)


def _overhead(result: dict[str, Any]) -> float:
    """The share of the flow's wall time spent outside the sync work itself: Prefect
    (flow and task runs, states, artifacts) and our bookkeeping (sync_runs, selection)."""
    wall: float = result["wall_s"]
    syncing: float = result["syncing_s"]
    return max(0.0, wall - syncing) / wall if wall else 0.0


def _sharded(report: Report, url: str, env: dict[str, str], *, rps: float) -> None:
    section = "shards=2"
    requests_before, limited_before = _counters(url)
    processes = [_start_flow(env, shard, 2) for shard in range(2)]
    _go(processes)
    results = [_flow_result(process) for process in processes]
    requests_after, limited_after = _counters(url)
    began = min(result["started_at"] for result in results)
    ended = max(result["ended_at"] for result in results)
    achieved = rate(requests_after - requests_before, ended - began)
    share = achieved / rps
    from_429 = sum(_from_429(result) for result in results)
    walls = " / ".join(f"{result['wall_s']:.1f}" for result in results)
    counts = " + ".join(str(result["users_attempted"]) for result in results)
    report.add(section, "users per shard; wall s per shard", f"{counts}; {walls}")
    report.add(
        section,
        "per shard: orchestration overhead s; CPU s per 1,000 users",
        " / ".join(
            f"{result['wall_s'] * _overhead(result):.2f}; {_cpu_per_1000_users(result):.1f}"
            for result in results
        ),
    )
    report.add(section, "combined request rate vs R", f"{achieved:.1f}/s = {share:.0%}")
    report.add(
        section,
        "429s seen / 429s that became failures",
        f"{limited_after - limited_before} / {from_429}",
    )
    report.target(
        0.85 <= share <= 1.0 and from_429 == 0,
        f"shards=2 in two processes: combined rate {share:.0%} of R within 85-100%",
    )


def _resync(report: Report, first: dict[str, Any], again: dict[str, Any]) -> None:
    section = "no limit"
    for label, result in (("first sync", first), ("re-sync, nothing changed", again)):
        report.add(
            section,
            f"{label}: wall s, records/s",
            f"{result['wall_s']:.1f}, {rate(_records(result), result['wall_s']):,.0f}/s "
            f"(+{result['rows_inserted']:,} new, {result['rows_unchanged']:,} unchanged, "
            f"{result['users_failed']} failed)",
        )
    speedup = first["wall_s"] / again["wall_s"] if again["wall_s"] else float("inf")
    report.add(section, "re-sync speed-up over the first sync", f"{speedup:.1f}x")
    report.target(speedup >= 3, f"re-sync with nothing changed: {speedup:.1f}x faster >= 3x")


def _memory(
    report: Report, users: tuple[int, int], small: dict[str, Any], large: dict[str, Any]
) -> None:
    section = "memory"
    rss = [result["max_rss_kib"] / 1024 for result in (small, large)]
    for count, result, mib in zip(users, (small, large), rss, strict=True):
        report.add(
            section,
            f"first sync of {count:,} users (no limit): peak RSS MiB, wall s",
            f"{mib:.0f}, {result['wall_s']:.1f}",
        )
    growth = rss[1] / rss[0]
    report.target(
        growth <= 1.25,
        f"peak RSS {users[0]:,} vs {users[1]:,} users: {growth:.2f}x within 1.25x",
    )


def _peak_rss_kib(maxrss: int) -> int:
    """This process's peak RSS, KiB: VmHWM where Linux has it, since `ru_maxrss` keeps the
    peak of the process that forked us (it survives exec); else `ru_maxrss`."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return maxrss


def child_main(shard: int, shards: int) -> None:
    """In the child: one run of the nightly flow; its figures as one JSON line."""
    from prefect.client.orchestration import get_client  # noqa: PLC0415

    from flows.sync_biomarkers import sync_biomarkers  # noqa: PLC0415
    from loop_sync.sync import RunSummary  # noqa: PLC0415

    with get_client(sync_client=True) as prefect:  # the server is up, as in production
        prefect.hello()
    if shards > 1:
        print(READY, flush=True)
        sys.stdin.readline()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started_at = time.time()
    started = time.perf_counter()
    state = anyio.run(lambda: sync_biomarkers(shard=shard, shards=shards, return_state=True))
    wall = time.perf_counter() - started
    ended_at = time.time()
    after = resource.getrusage(resource.RUSAGE_SELF)
    summary = state.result(raise_on_failure=False)
    if not isinstance(summary, RunSummary):
        msg = f"the flow ended {state.name} without a summary: {summary!r}"
        raise SystemExit(msg)
    figures = {
        "wall_s": wall,
        "started_at": started_at,
        "ended_at": ended_at,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "max_rss_kib": _peak_rss_kib(after.ru_maxrss),
        "users_attempted": summary.users_attempted,
        "users_succeeded": summary.users_succeeded,
        "users_failed": summary.users_failed,
        "users_reauth_required": summary.users_reauth_required,
        "rows_inserted": summary.rows_inserted,
        "rows_updated": summary.rows_updated,
        "rows_unchanged": summary.rows_unchanged,
        "rows_rejected": summary.rows_rejected,
        "failures": summary.failures,
        "seconds": summary.seconds,
        "syncing_s": summary.syncing_s(),
    }
    print(MARK + json.dumps(figures), flush=True)


if __name__ == "__main__":
    child_main(int(sys.argv[1]), int(sys.argv[2]))
