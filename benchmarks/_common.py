"""Shared pieces of the benchmarks: a scratch PostgreSQL schema, synthetic records, the table."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, create_engine, make_url, text

from loop_sync.sandbox.authority import user_ids
from loop_sync.sandbox.data import SyntheticResults

DEFAULT_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def schema_url(database: str, schema: str) -> str:
    """The URL with every connection's search_path set to `schema`."""
    separator = "&" if "?" in database else "?"
    return f"{database}{separator}options=-csearch_path%3D{schema}"


@contextmanager
def scratch_schema(database: str) -> Iterator[tuple[str, str]]:
    """A fresh schema (name, URL using it), dropped with everything in it afterwards."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(database)
    try:
        with admin.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA {name}"))
        yield name, schema_url(database, name)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
        admin.dispose()


@contextmanager
def scratch_database(database: str, driver: str) -> Iterator[str]:
    """A fresh database on `database`'s server (its URL, with `driver`), dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(database, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f"CREATE DATABASE {name}"))
        url = make_url(database).set(drivername=driver, database=name, query={})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def engine_for(url: str) -> Engine:
    return create_engine(url, hide_parameters=True)


@dataclass
class Records:
    """Raw API records as the client yields them, user by user."""

    by_user: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(records) for records in self.by_user.values())

    def flat(self) -> tuple[list[str], list[dict[str, Any]]]:
        users = [user for user, records in self.by_user.items() for _ in records]
        records = [record for records in self.by_user.values() for record in records]
        return users, records


def synthetic_records(rows: int, per_user: int, seed: int = 7) -> Records:
    """At least `rows` records from the sandbox's generator, `per_user` (about) per user."""
    generator = SyntheticResults(seed, EPOCH, results_per_user=per_user, cache_size=4)
    at = EPOCH + timedelta(days=1)
    found = Records()
    total = 0
    users = user_ids(max(1, rows // max(1, per_user) * 2 + 10))
    for user in users:
        if total >= rows:
            break
        records = generator.records(user, at)[: rows - total]
        found.by_user[user] = records
        total += len(records)
    return found


@dataclass
class Report:
    """Rows of (section, figure, value) and the PASS/FAIL verdicts, printed at the end."""

    figures: list[tuple[str, str, str]] = field(default_factory=list)
    verdicts: list[tuple[bool | None, str]] = field(default_factory=list)

    def add(self, section: str, name: str, value: str) -> None:
        self.figures.append((section, name, value))
        print(f"  {section:<10} {name:<52} {value}", flush=True)

    def target(self, passed: bool | None, description: str) -> None:
        """`passed` None: the target could not be measured in this run."""
        self.verdicts.append((passed, description))

    def render(self) -> str:
        width = max((len(name) for _, name, _ in self.figures), default=10)
        lines = [
            f"| {'section':<10} | {'figure':<{width}} | value",
            f"|{'-' * 12}|{'-' * (width + 2)}|------",
        ]
        lines += [f"| {s:<10} | {n:<{width}} | {v}" for s, n, v in self.figures]
        lines.append("")
        for passed, description in self.verdicts:
            label = "SKIP" if passed is None else ("PASS" if passed else "FAIL")
            lines.append(f"{label}  {description}")
        return "\n".join(lines)


def rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")
