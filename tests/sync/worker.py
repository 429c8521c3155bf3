"""A sync run in a process of its own, for the crash tests to kill.

Configured like the CLI, by LOOP_* variables; `--batch-size` keeps batches small so the
kill lands between commits. Run as `python -m tests.sync.worker --batch-size 2`. With
`--wait` it starts syncing only once a line arrives on stdin: a test that kills many runs
starts the next worker (two seconds of imports) while it checks the last one.
"""

from __future__ import annotations

import argparse
import sys

from loop_sync.config import load_settings
from loop_sync.services import Services
from loop_sync.sync import run_sync, select_users


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--wait", action="store_true", help="sync once stdin has a line")
    args = parser.parse_args(argv)
    services = Services.build(load_settings())
    try:
        if args.wait and not sys.stdin.readline():
            return  # the test ended without saying go
        run_sync(services, select_users(services.engine), batch_size=args.batch_size)
    finally:
        services.close()


if __name__ == "__main__":
    main()
