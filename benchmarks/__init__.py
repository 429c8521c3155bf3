"""Benchmarks of loop-sync against the targets of issue 6: run ``python -m benchmarks.sync``."""
