"""The sync against a sandbox running in a separate process, on PostgreSQL.

`run` starts ``loop-sync sandbox`` as a subprocess, consents its users headlessly and runs
each sync in a child process (``python -m benchmarks.live``), which prints its `RunSummary`
and `resource.getrusage` figures as one JSON line.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from cryptography.fernet import Fernet
from sqlalchemy import text

from benchmarks._common import Report, engine_for, rate, scratch_schema
from loop_sync.config import load_settings
from loop_sync.sandbox.app import SandboxClient
from loop_sync.schema import upgrade
from loop_sync.services import Services
from loop_sync.sync import run_sync, select_users

MARK = "BENCH_RESULT "
UNLIMITED_RPS = 100_000.0
WIPED = (
    "biomarker_result_history",
    "biomarker_results",
    "raw_records",
    "rejects",
    "sync_state",
    "sync_runs",
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def sandbox_process(
    env: dict[str, str], port: int, users: int, results_per_user: int
) -> Iterator[str]:
    """``loop-sync sandbox`` in its own process (auto-approve, no latency, no limit yet)."""
    command = [
        sys.executable,
        "-m",
        "loop_sync",
        "sandbox",
        "--port",
        str(port),
        "--users",
        str(users),
        "--results-per-user",
        str(results_per_user),
        "--auto-approve",
    ]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log)  # noqa: S603
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(f"{url}/_sandbox/counters", timeout=2).raise_for_status()
                    break
                except httpx.HTTPError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        msg = f"the sandbox did not start: {log.read().decode()[-2000:]}"
                        raise RuntimeError(msg) from None
                    time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _counters(url: str) -> tuple[int, int]:
    """(requests, 429s) the sandbox has answered so far, all endpoints and clients."""
    snapshot = httpx.get(f"{url}/_sandbox/counters", timeout=10).json()
    return sum(snapshot["requests"].values()), sum(snapshot["rate_limited"].values())


def _knobs(url: str, **changes: Any) -> None:
    httpx.patch(f"{url}/_sandbox/knobs", json=changes, timeout=10).raise_for_status()


def _consent(services: Services, users: list[str]) -> None:
    """Each user through the real onboarding, the sandbox approving at once."""
    with httpx.Client(timeout=30) as browser:
        for user in users:
            url, binding = services.onboarding.start(user)
            location = httpx.URL(browser.get(url).headers["location"])
            services.onboarding.finish(dict(location.params), binding)


def _child_sync(env: dict[str, str]) -> dict[str, Any]:
    """One `run_sync` over every active grant, in a child process; its JSON figures."""
    command = [sys.executable, "-m", "benchmarks.live"]
    root = Path(__file__).resolve().parents[1]  # where `benchmarks` imports from
    done = subprocess.run(  # noqa: S603
        command, env=env, cwd=root, capture_output=True, text=True, check=False
    )
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            found: dict[str, Any] = json.loads(line.removeprefix(MARK))
            return found
    msg = f"the sync child failed ({done.returncode}): {done.stderr[-3000:]}"
    raise RuntimeError(msg)


def _records(result: dict[str, Any]) -> int:
    return int(
        result["rows_inserted"]
        + result["rows_updated"]
        + result["rows_unchanged"]
        + result["rows_rejected"]
    )


def run(
    report: Report,
    database: str,
    *,
    users: int,
    results_per_user: int,
    rate_limit: float,
    latency_ms: float,
    concurrency: int | None,
) -> None:
    section = "sync"
    client = SandboxClient()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with scratch_schema(database) as (_, db_url):
        env = {
            **os.environ,
            "LOOP_CLIENT_ID": client.client_id,
            "LOOP_CLIENT_SECRET": client.client_secret,
            "LOOP_REDIRECT_URI": client.redirect_uri,
            "LOOP_ISSUER": url,
            "LOOP_API_BASE_URL": url,
            "LOOP_SYNC_DATABASE_URL": db_url,
            "LOOP_SYNC_ENCRYPTION_KEYS": Fernet.generate_key().decode(),
        }
        if concurrency is not None:
            env["LOOP_SYNC_CONCURRENCY"] = str(concurrency)
        saved = dict(os.environ)
        os.environ.update(env)
        try:
            with sandbox_process(env, port, users, results_per_user):
                services = Services.build(load_settings())
                try:
                    upgrade(services.engine)
                    started = time.perf_counter()
                    _consent(services, select_sandbox_users(users))
                    report.add(
                        section,
                        "users consented (setup), s",
                        f"{time.perf_counter() - started:.1f}",
                    )
                finally:
                    services.close()
                _limited(report, url, env, users=users, rps=rate_limit, latency_ms=latency_ms)
                _knobs(url, latency_ms=0, rate_limit_rps=None)
                _wipe(db_url)
                unlimited = {**env, "LOOP_SYNC_RATE_LIMIT_RPS": str(UNLIMITED_RPS)}
                first = _child_sync(unlimited)
                again = _child_sync(unlimited)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    for label, result in (("first sync, no limit", first), ("re-sync, no limit", again)):
        report.add(
            section,
            f"{label}: wall s, records/s",
            f"{result['wall_s']:.1f} s, {rate(_records(result), result['wall_s']):,.0f}/s "
            f"(+{result['rows_inserted']:,} new, {result['rows_unchanged']:,} unchanged, "
            f"{result['users_failed']} failed)",
        )
    speedup = first["wall_s"] / again["wall_s"] if again["wall_s"] else float("inf")
    report.add(section, "re-sync speed-up over first sync (no limit)", f"{speedup:.1f}x")
    report.target(speedup >= 3, f"re-sync with nothing changed: {speedup:.1f}x faster >= 3x")


def select_sandbox_users(count: int) -> list[str]:
    from loop_sync.sandbox.authority import user_ids  # noqa: PLC0415

    return user_ids(count)


def _wipe(db_url: str) -> None:
    engine = engine_for(db_url)
    try:
        with engine.begin() as connection:
            connection.execute(text(f"TRUNCATE {', '.join(WIPED)}"))
    finally:
        engine.dispose()


def _limited(
    report: Report, url: str, env: dict[str, str], *, users: int, rps: float, latency_ms: float
) -> None:
    section = "sync"
    _knobs(url, latency_ms=latency_ms, rate_limit_rps=rps)
    requests_before, limited_before = _counters(url)
    result = _child_sync({**env, "LOOP_SYNC_RATE_LIMIT_RPS": str(rps)})
    requests_after, limited_after = _counters(url)
    wall = result["wall_s"]
    requests = requests_after - requests_before
    achieved = rate(requests, wall)
    share = achieved / rps
    seen = limited_after - limited_before
    failures: dict[str, str] = result["failures"]
    from_429 = sum("429" in reason for reason in failures.values())
    label = f"first sync (L={latency_ms:g} ms, R={rps:g})"
    report.add(section, f"{label}: wall s", f"{wall:.1f}")
    report.add(
        section,
        "  users ok / failed / reauth",
        f"{result['users_succeeded']} / {result['users_failed']} / "
        f"{result['users_reauth_required']}",
    )
    report.add(section, "  users/s", f"{rate(result['users_succeeded'], wall):.1f}")
    report.add(section, "  records/s", f"{rate(_records(result), wall):,.0f}")
    report.add(
        section, "  requests, achieved rate vs R", f"{requests:,}, {achieved:.1f}/s = {share:.0%}"
    )
    report.add(section, "  429s seen / 429s that became failures", f"{seen} / {from_429}")
    report.add(section, "  CPU s per 1,000 users", f"{result['cpu_s'] * 1000 / max(users, 1):.1f}")
    report.add(
        section, "  peak RSS of the sync process, MiB", f"{result['max_rss_kib'] / 1024:.0f}"
    )
    report.target(
        share >= 0.90 and from_429 == 0,
        f"request rate {share:.0%} of R >= 90%, {from_429} 429s became failures (0)",
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


def child_main() -> None:
    """In the child: sync every active grant once and print the figures as JSON."""
    services = Services.build(load_settings())
    try:
        user_ids = select_users(services.engine)
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        summary = run_sync(services, user_ids)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        services.close()
    figures = {
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "max_rss_kib": _peak_rss_kib(after.ru_maxrss),
        "users_succeeded": summary.users_succeeded,
        "users_failed": summary.users_failed,
        "users_reauth_required": summary.users_reauth_required,
        "rows_inserted": summary.rows_inserted,
        "rows_updated": summary.rows_updated,
        "rows_unchanged": summary.rows_unchanged,
        "rows_rejected": summary.rows_rejected,
        "failures": summary.failures,
    }
    print(MARK + json.dumps(figures), flush=True)


if __name__ == "__main__":
    child_main()
