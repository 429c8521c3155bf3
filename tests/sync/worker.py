"""A sync run in a process of its own, for the crash test to kill.

Configured like the CLI, by LOOP_* variables; `--batch-size` keeps batches small so the
kill lands between commits. Run as `python -m tests.sync.worker --batch-size 2`.
"""

from __future__ import annotations

import argparse

from loop_sync.config import load_settings
from loop_sync.services import Services
from loop_sync.sync import run_sync, select_users


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args(argv)
    services = Services.build(load_settings())
    try:
        run_sync(services, select_users(services.engine), batch_size=args.batch_size)
    finally:
        services.close()


if __name__ == "__main__":
    main()
