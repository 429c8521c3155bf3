"""Benchmark of loop-sync against the performance targets of issue 6.

Run it (PostgreSQL must be running; each part uses a fresh schema, dropped afterwards)::

    make bench                                   # = .venv/bin/python -m benchmarks.sync
    .venv/bin/python -m benchmarks.sync --quick  # small sizes, a smoke run of a minute or so
    .venv/bin/python -m benchmarks.sync --rows 1000000 --users 5000 --results-per-user 100
    .venv/bin/python -m benchmarks.sync --only write      # write, e2e or sync, repeatable

Options: ``--database URL`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``),
``--rows N`` rows for the write path (default 1,000,000), ``--batch-users`` users per
transaction (default `loop_sync.sync.BATCH_SIZE`, as the sync writes), ``--users N``,
``--results-per-user M``, ``--rate-limit R`` (req/s), ``--latency-ms L``, ``--concurrency C``
(LOOP_SYNC_CONCURRENCY for the sync; default: the product's default).

It prints each figure as it is measured, then a table and one PASS/FAIL line per target
(SKIP when a part was not run). Targets compare figures taken in the same run, since this
machine varies by about 20% from run to run. Nothing in the product is tuned here.

What the figures mean
---------------------
``write`` (priority 1 and 2 of the issue; rows from the sandbox's generator
`loop_sync.sandbox.data.SyntheticResults`, hashed and normalized once):

- *hash + normalize, rows/s*: `landing.content_hash` and `normalize.normalize` in memory.
- *binary COPY*: psycopg ``COPY … FROM STDIN (FORMAT BINARY)`` of the normalized rows into
  the empty, logged ``biomarker_results`` table (with its keys and indexes), one
  transaction. Rows are turned into Python tuples before the clock starts. This is the
  reference rate, 1.0x.
- *upsert, half changed*: the same rows, every other one corrected (new value, revision
  and content hash), written by the product's results upsert (`load._upsert_results`:
  read the held hashes, copy corrected rows to history, COPY into a temp table, one
  ``INSERT … ON CONFLICT DO UPDATE``), one transaction per batch of users. Target ≥ 0.55x.
- *raw -> normalized + landed + upserted*: the raw dicts, as the client yields them, given
  user batch by user batch to `load.write_batch` (hash, skip known, land in
  ``raw_records``, normalize, upsert, soft-delete check, sync state) on an emptied
  warehouse. Target ≥ 0.30x COPY.

``sync`` (priority 3): the sandbox runs in a separate process (``loop-sync sandbox``) with N
users x M results; users are consented headlessly; each sync runs `loop_sync.sync.run_sync`
over every active grant in a child process (`benchmarks.live`), which reports its
`RunSummary` and `resource.getrusage`.

- *first sync (L ms, R req/s)*: sandbox latency L and rate limit R, LOOP_SYNC_RATE_LIMIT_RPS=R:
  wall time, users/s, rows/s; *request rate* is the sandbox's request count (all endpoints,
  tokens included) over the sync's wall time, against R (target ≥ 90%); *429s seen* is the
  sandbox's ``rate_limited`` count; *429s → failures* counts failed users whose reason
  names a 429 (target 0); *CPU s / 1,000 users* is user + system time of the sync process
  during the run; *peak RSS* is its VmHWM (``ru_maxrss`` where there is no /proc).
- *first sync / re-sync (no limit)*: the warehouse emptied (grants and tokens kept), the
  sandbox's latency and rate limit off, LOOP_SYNC_RATE_LIMIT_RPS=100000: a first sync, then
  a re-sync with nothing changed. Target: re-sync ≥ 3x faster.

Not measured yet (later versions): the time split (HTTP wait, JSON decode, normalize, DB
write, orchestration), ``shards=2``, peak RSS at 1,000 vs. 10,000 users, and the Prefect flow.
"""

from __future__ import annotations

import argparse
import time

from benchmarks import live, writepath
from benchmarks._common import DEFAULT_DATABASE, Report, synthetic_records
from loop_sync.sync import BATCH_SIZE

PARTS = ("write", "e2e", "sync")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sync", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    parser.add_argument("--database", default=DEFAULT_DATABASE)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", action="append", choices=PARTS, help="run only these parts")
    parser.add_argument("--rows", type=int, default=None, help="write-path rows (1,000,000)")
    parser.add_argument("--write-results-per-user", type=int, default=100)
    parser.add_argument("--batch-users", type=int, default=BATCH_SIZE)
    parser.add_argument("--users", type=int, default=None, help="sync users (500)")
    parser.add_argument("--results-per-user", type=int, default=100)
    parser.add_argument("--rate-limit", type=float, default=200.0)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=None)
    args = parser.parse_args(argv)
    if args.rows is None:
        args.rows = 50_000 if args.quick else 1_000_000
    if args.users is None:
        args.users = 50 if args.quick else 500
    if args.quick:
        args.results_per_user = min(args.results_per_user, 40)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    parts = set(args.only or PARTS)
    report = Report()
    started = time.perf_counter()
    if parts & {"write", "e2e"}:
        print(f"write path: {args.rows:,} rows from the sandbox generator", flush=True)
        records = synthetic_records(args.rows, args.write_results_per_user)
        writepath.run(
            report,
            args.database,
            records,
            batch_users=args.batch_users,
            end_to_end_too="e2e" in parts,
        )
        del records
    if "sync" in parts:
        print(
            f"sync: {args.users} users x {args.results_per_user} results, "
            f"L={args.latency_ms:g} ms, R={args.rate_limit:g} req/s",
            flush=True,
        )
        live.run(
            report,
            args.database,
            users=args.users,
            results_per_user=args.results_per_user,
            rate_limit=args.rate_limit,
            latency_ms=args.latency_ms,
            concurrency=args.concurrency,
        )
    if "write" not in parts and "e2e" not in parts:
        report.target(None, "upsert 1M rows, half changed >= 0.55x COPY (not run)")
    if "e2e" not in parts:
        report.target(None, "raw records -> normalized + landed + upserted >= 0.30x COPY (not run)")
    if "sync" not in parts:
        report.target(None, "sync: request rate >= 90% of R, no 429 failures (not run)")
        report.target(None, "re-sync with nothing changed >= 3x faster (not run)")
    report.target(None, "shards=2 combined rate within 85-100% of R (not measured yet)")
    report.target(None, "peak RSS 1,000 vs 10,000 users within 1.25x (not measured yet)")
    report.target(None, "orchestration overhead < 5% of wall time (not measured yet)")
    print(f"\nbenchmark finished in {time.perf_counter() - started:.0f} s\n")
    print(report.render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
