"""Run loop-sync's Prefect deployments from one process, for a single machine without a
work pool: `loop-sync serve`.

The schedules, parameters and concurrency limits come from `deployments.yaml`, the file
`prefect deploy` reads, so there is one source of truth for when things run. Only the work
pool and the pull step are ignored: `prefect.serve` runs each flow run in a subprocess of
this process, in the project directory. The served deployments keep their names, so a
worker polling the pool could pick up the same runs: use either `serve` or workers. When
`serve` stops, Prefect pauses the deployments' schedules.

This module imports Prefect (slow), so the CLI imports it only for `serve`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.deployments.runner import RunnerDeployment
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.schedules import Cron

from loop_sync.errors import ConfigError

__all__ = [
    "DEPLOYMENTS_FILE",
    "CronSpec",
    "DeploymentSpec",
    "read_deployments",
    "runner_deployments",
    "serve_schedules",
]

DEPLOYMENTS_FILE = "deployments.yaml"


@dataclass(frozen=True)
class CronSpec:
    """One cron schedule of a deployment, as deployments.yaml spells it."""

    cron: str
    timezone: str | None = None
    day_or: bool = True
    active: bool = True
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeploymentSpec:
    """What `serve` needs of one deployment in deployments.yaml."""

    name: str
    entrypoint: str  # "flows/x.py:function", relative to the project directory
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[CronSpec, ...] = ()
    concurrency_limit: int | None = None
    collision_strategy: str | None = None
    tags: tuple[str, ...] = ()


def read_deployments(project_dir: Path) -> list[DeploymentSpec]:
    """The deployments of `project_dir/deployments.yaml`; a shape `serve` cannot run (an
    interval or rrule schedule, a missing entrypoint) is a ConfigError naming it."""
    path = project_dir / DEPLOYMENTS_FILE
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        msg = f"cannot read {path} ({exc}); run `loop-sync serve` from the project directory"
        raise ConfigError(msg) from None
    entries = document.get("deployments") if isinstance(document, dict) else None
    if not isinstance(entries, list) or not entries:
        msg = f"{path} declares no deployments"
        raise ConfigError(msg)
    return [_deployment(path, entry) for entry in entries]


def _deployment(path: Path, entry: Any) -> DeploymentSpec:
    if not isinstance(entry, dict) or not entry.get("name") or not entry.get("entrypoint"):
        msg = f"{path}: every deployment needs a name and an entrypoint, got {entry!r}"
        raise ConfigError(msg)
    name = str(entry["name"])
    limit = entry.get("concurrency_limit")
    if isinstance(limit, dict):
        concurrency_limit, strategy = limit.get("limit"), limit.get("collision_strategy")
    else:
        concurrency_limit, strategy = limit, None
    return DeploymentSpec(
        name=name,
        entrypoint=str(entry["entrypoint"]),
        description=entry.get("description"),
        parameters=dict(entry.get("parameters") or {}),
        schedules=tuple(_cron(path, name, s) for s in entry.get("schedules") or ()),
        concurrency_limit=concurrency_limit,
        collision_strategy=strategy,
        tags=tuple(entry.get("tags") or ()),
    )


def _cron(path: Path, name: str, schedule: Any) -> CronSpec:
    if not isinstance(schedule, dict) or "cron" not in schedule:
        msg = f"{path}: deployment {name}: `loop-sync serve` runs cron schedules only"
        raise ConfigError(msg)
    return CronSpec(
        cron=str(schedule["cron"]),
        timezone=schedule.get("timezone"),
        day_or=bool(schedule.get("day_or", True)),
        active=bool(schedule.get("active", True)),
        parameters=dict(schedule.get("parameters") or {}),
    )


def runner_deployments(project_dir: Path) -> list[RunnerDeployment]:
    """deployments.yaml as Prefect `RunnerDeployment`s, each flow loaded from its
    entrypoint. The flows import `flows._common`: Prefect's loader puts the working
    directory on `sys.path`, so that must be the project directory (`serve_schedules`
    moves there)."""
    deployments = []
    for spec in read_deployments(project_dir):
        path, _, function = spec.entrypoint.rpartition(":")
        flow: Flow[..., Any] = load_flow_from_entrypoint(f"{project_dir / path}:{function}")
        limit: int | ConcurrencyLimitConfig | None = spec.concurrency_limit
        if spec.concurrency_limit is not None and spec.collision_strategy is not None:
            limit = ConcurrencyLimitConfig.model_validate(
                {"limit": spec.concurrency_limit, "collision_strategy": spec.collision_strategy}
            )
        deployment = flow.to_deployment(
            name=spec.name,
            description=spec.description,
            parameters=spec.parameters,
            schedules=[
                Cron(
                    s.cron,
                    timezone=s.timezone,
                    day_or=s.day_or,
                    active=s.active,
                    parameters=s.parameters,
                )
                for s in spec.schedules
            ],
            concurrency_limit=limit,
            tags=list(spec.tags) or None,
        )
        if not isinstance(deployment, RunnerDeployment):  # typed maybe-async; it is not here
            msg = f"Prefect returned {type(deployment).__name__} for deployment {spec.name}"
            raise TypeError(msg)
        deployments.append(deployment)
    return deployments


def serve_schedules(project_dir: Path | None = None, *, limit: int | None = None) -> None:
    """Serve every deployment of deployments.yaml from this process until interrupted.

    Args:
        project_dir: the loop-sync checkout holding deployments.yaml and flows/; the
            process moves there, because the flows and `.env` are found relative to it.
            Default: the working directory.
        limit: at most this many flow runs at once (default: no limit but the
            deployments' own concurrency limits).
    """
    project = (project_dir or Path.cwd()).resolve()
    os.chdir(project)
    serve(*runner_deployments(project), limit=limit)
