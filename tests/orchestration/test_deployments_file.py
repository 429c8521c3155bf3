"""deployments.yaml is what `prefect deploy` expects, and what we mean.

Prefect validates the file with pydantic models that ignore unknown keys, so a typo such
as `concurency_limit` would deploy without a limit and without a word. `problems()`
therefore validates with Prefect's own models AND walks the YAML against their fields,
checks every schedule with Prefect's CronSchedule, imports every entrypoint and checks
the parameters against the flow's signature. The tests below prove it catches each kind
of mistake, on modified copies of the file.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.cli.deploy._models import (
    DeploymentConfig,
    PrefectYamlModel,
    RawScheduleConfig,
)
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import RunnerDeployment
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.utilities.schema_tools.validation import validate
from pydantic import BaseModel, ValidationError

from loop_sync import orchestration
from loop_sync.config import Settings
from loop_sync.orchestration import runner_deployments

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = ROOT / "deployments.yaml"
WORK_POOL = "loop-sync"
# `definitions:` only holds YAML anchors; Prefect's docs put it at the top level.
ALLOWED_EXTRA_TOP_LEVEL = {"definitions"}
EXPECTED = {
    "nightly": "flows/sync_biomarkers.py:sync_biomarkers",
    "daily": "flows/rotate_tokens.py:rotate_tokens",
    "backfill": "flows/backfill.py:backfill",
    "onboard": "flows/onboard.py:onboard",
    "purge-user": "flows/purge_user.py:purge_user",
}
SCHEDULED = {"nightly", "daily"}


def problems(path: Path) -> list[str]:
    """Everything wrong with a prefect.yaml-format file, as readable lines (none: fine)."""
    raw = yaml.safe_load(path.read_text())
    try:
        PrefectYamlModel.model_validate(raw)
    except ValidationError as exc:
        return [f"Prefect rejects {_loc(e['loc'])}: {e['msg']}" for e in exc.errors()]
    found = unknown_keys(raw, PrefectYamlModel, "", extra=ALLOWED_EXTRA_TOP_LEVEL)
    deployments = raw.get("deployments") or []
    if not deployments:
        found.append("no deployments")
    names = [entry.get("name") for entry in deployments]
    found += [f"deployment name {n!r} is used twice" for n in set(names) if names.count(n) > 1]
    for entry in deployments:
        where = f"deployment {entry.get('name')}"
        found += _schedule_problems(entry, where)
        found += _concurrency_problems(entry, where)
        found += _flow_problems(path.parent, entry, where)
        if (entry.get("work_pool") or {}).get("name") != WORK_POOL:
            found.append(f"{where}: work_pool.name is not {WORK_POOL}")
    return found


def unknown_keys(
    value: Any, model: type[BaseModel], where: str, extra: set[str] | None = None
) -> list[str]:
    """Keys of `value` that are no field (name or alias) of `model`, recursively."""
    if not isinstance(value, dict):
        return []
    names = {name: name for name in model.model_fields}
    names |= {f.alias: name for name, f in model.model_fields.items() if f.alias}
    hints = typing.get_type_hints(model)  # resolves the models' forward references
    found = []
    for key, item in value.items():
        here = f"{where}.{key}" if where else str(key)
        if key in (extra or set()):
            continue
        if key not in names:
            found.append(f"{here}: unknown key (Prefect would silently ignore it)")
            continue
        found += _walk(item, hints[names[key]], here)
    return found


def _walk(value: Any, annotation: Any, where: str) -> list[str]:
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _walk(item, annotation, f"{where}[{i}]")]
    models = _models_in(annotation)
    if not isinstance(value, dict) or not models:
        return []
    if RawScheduleConfig in models:  # the shape `prefect deploy` reads a schedule as
        return unknown_keys(value, RawScheduleConfig, where)
    if len(models) == 1:
        return unknown_keys(value, models[0], where)
    return []  # an open union (e.g. SLAs): Prefect's validation has the last word


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation mentions (through Optional, Union, list ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _schedule_problems(entry: dict[str, Any], where: str) -> list[str]:
    found = []
    schedules = entry.get("schedules")
    if schedules is None:
        found.append(f"{where}: no `schedules:` (say `[]`; missing, `prefect deploy` prompts)")
    for schedule in schedules or []:
        if "cron" not in schedule:
            found.append(f"{where}: only cron schedules (loop-sync serve runs those)")
            continue
        if not schedule.get("timezone"):
            found.append(f"{where}: cron {schedule['cron']!r} has no timezone")
        try:
            CronSchedule(
                cron=schedule["cron"],
                timezone=schedule.get("timezone"),
                day_or=schedule.get("day_or", True),
            )
        except ValidationError as exc:
            found += [f"{where}: {e['msg']}" for e in exc.errors()]
    if bool(schedules) != (entry.get("name") in SCHEDULED):
        found.append(f"{where}: scheduled deployments are {sorted(SCHEDULED)}")
    return found


def _concurrency_problems(entry: dict[str, Any], where: str) -> list[str]:
    limit = entry.get("concurrency_limit")
    if not isinstance(limit, dict):
        return [f"{where}: concurrency_limit needs a limit and a collision_strategy"]
    try:
        config = ConcurrencyLimitConfig.model_validate(limit)
    except ValidationError as exc:
        return [f"{where}: concurrency_limit: {e['msg']}" for e in exc.errors()]
    wanted = (
        ConcurrencyLimitStrategy.CANCEL_NEW
        if entry.get("name") in SCHEDULED
        else ConcurrencyLimitStrategy.ENQUEUE
    )
    found = []
    if config.limit != 1:
        found.append(f"{where}: concurrency limit {config.limit}, not 1 (runs race on tokens)")
    if config.collision_strategy != wanted:
        found.append(f"{where}: collision_strategy should be {wanted.value}")
    return found


def _flow_problems(project: Path, entry: dict[str, Any], where: str) -> list[str]:
    entrypoint = str(entry.get("entrypoint") or "")
    file, _, function = entrypoint.rpartition(":")
    try:
        flow: Flow[..., Any] = load_flow_from_entrypoint(f"{project / file}:{function}")
    except Exception as exc:  # any import failure is the finding
        return [f"{where}: entrypoint {entrypoint!r} does not load: {type(exc).__name__}"]
    schema = flow.parameters.model_dump()
    base = entry.get("parameters") or {}
    # A run by hand may still supply a required parameter; a scheduled run cannot.
    checks = [(base, False)] + [
        ({**base, **(s.get("parameters") or {})}, True) for s in entry.get("schedules") or []
    ]
    found = []
    for parameters, complete in checks:
        unknown = set(parameters) - set(flow.parameters.properties)
        if unknown:
            found.append(f"{where}: {flow.name} has no parameter {sorted(unknown)}")
            continue
        # What the server checks when enforce_parameter_schema is on.
        errors = validate(dict(parameters), schema, ignore_required=not complete)
        found += [f"{where}: bad parameters: {error.message}" for error in errors]
    return sorted(set(found), key=found.index)


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


# --- the real file --------------------------------------------------------------------


def test_the_deployments_file_has_no_problems() -> None:
    """Prefect's models accept it, and nothing in it is ignored, invalid or mismatched."""
    assert problems(DEPLOYMENTS) == []


def test_the_file_declares_the_expected_deployments() -> None:
    """Nightly sync, daily rotation, and the by-hand backfill, onboard and purge."""
    raw = yaml.safe_load(DEPLOYMENTS.read_text())
    model = PrefectYamlModel.model_validate(raw)
    assert {d.name: d.entrypoint for d in model.deployments} == EXPECTED
    assert raw["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PWD }}"}}
    ]


def test_the_file_holds_no_secrets() -> None:
    """Settings come from the worker's environment: no variable, key or token in the file."""
    text = DEPLOYMENTS.read_text()
    names = [str(field.validation_alias) for field in Settings.model_fields.values()]
    assert [name for name in names if name in text] == []
    assert not re.search(r"[A-Za-z0-9_-]{43}=", text)  # a Fernet key
    assert "prefect.blocks" not in text  # nor a reference to one: nothing secret is needed


def test_serve_uses_the_schedules_of_the_file() -> None:
    """`loop-sync serve` builds its deployments from deployments.yaml: same crons, zones,
    parameters and concurrency limits."""
    model = PrefectYamlModel.model_validate(yaml.safe_load(DEPLOYMENTS.read_text()))
    declared: dict[str, DeploymentConfig] = {d.name or "": d for d in model.deployments}

    served = runner_deployments(ROOT)

    assert [d.name for d in served] == list(declared)
    for deployment in served:
        entry = declared[deployment.name]
        crons = [
            (s.schedule.cron, s.schedule.timezone)
            for s in deployment.schedules or []
            if isinstance(s.schedule, CronSchedule)
        ]
        assert crons == [(s.cron, s.timezone) for s in entry.schedules or []]  # type: ignore[union-attr]
        assert deployment.parameters == entry.parameters
        assert deployment.concurrency_limit == 1
        assert deployment.concurrency_options is not None
        limit = entry.concurrency_limit
        assert not isinstance(limit, int)
        assert limit is not None
        assert deployment.concurrency_options.collision_strategy.value == limit.collision_strategy


def test_serve_schedules_serves_every_deployment_from_the_project_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`serve_schedules` moves to the project (flows and .env are found there) and serves
    every deployment of the file at once."""
    served: list[tuple[list[str], int | None, Path]] = []

    def fake_serve(*deployments: RunnerDeployment, limit: int | None = None) -> None:
        served.append(([d.name for d in deployments], limit, Path.cwd()))

    monkeypatch.setattr(orchestration, "serve", fake_serve)

    orchestration.serve_schedules(ROOT, limit=3)

    assert served == [(list(EXPECTED), 3, ROOT)]


# --- the checker catches mistakes -----------------------------------------------------

Edit = Callable[[dict[str, Any]], None]


def _deployment(raw: dict[str, Any], name: str) -> dict[str, Any]:
    return next(d for d in raw["deployments"] if d["name"] == name)


def _set(name: str, key: str, value: Any) -> Edit:
    def edit(raw: dict[str, Any]) -> None:
        _deployment(raw, name)[key] = value

    return edit


def _rename(name: str, key: str, new: str) -> Edit:
    def edit(raw: dict[str, Any]) -> None:
        entry = _deployment(raw, name)
        entry[new] = entry.pop(key)

    return edit


def _schedule(name: str, **changes: Any) -> Edit:
    def edit(raw: dict[str, Any]) -> None:
        entry = _deployment(raw, name)
        schedule = {**entry["schedules"][0], **changes}
        entry["schedules"] = [{k: v for k, v in schedule.items() if v is not None}]

    return edit


def _scheduled_onboarding(raw: dict[str, Any]) -> None:
    nightly = _deployment(raw, "nightly")
    nightly["entrypoint"] = "flows/onboard.py:onboard"
    nightly["parameters"] = {}


def _top_level(raw: dict[str, Any]) -> None:
    raw["pul"] = raw.pop("pull")


MISTAKES: dict[str, tuple[Edit, str]] = {
    "unknown top-level key": (_top_level, "pul: unknown key"),
    "misspelt deployment key": (
        _rename("nightly", "concurrency_limit", "concurency_limit"),
        "concurency_limit: unknown key",
    ),
    "misspelt work pool key": (
        _set("daily", "work_pool", {"name": WORK_POOL, "work_queue": "default"}),
        "work_pool.work_queue: unknown key",
    ),
    "misspelt concurrency key": (
        _set("backfill", "concurrency_limit", {"limit": 1, "collision_stratgy": "ENQUEUE"}),
        "concurrency_limit.collision_stratgy: unknown key",
    ),
    "misspelt schedule key": (_schedule("nightly", timezon="UTC"), "timezon"),
    "bad cron": (_schedule("nightly", cron="61 * * * *"), "Invalid cron string"),
    "bad timezone": (_schedule("daily", timezone="Mars/Olympus"), "Invalid timezone"),
    "cron without a timezone": (_schedule("nightly", timezone=None), "has no timezone"),
    "interval schedule": (
        _set("daily", "schedules", [{"interval": 86400, "timezone": "UTC"}]),
        "only cron schedules",
    ),
    "bad collision strategy": (
        _set("daily", "concurrency_limit", {"limit": 1, "collision_strategy": "CANCEL"}),
        "Input should be 'ENQUEUE' or 'CANCEL_NEW'",
    ),
    "scheduled run that queues": (
        _set("nightly", "concurrency_limit", {"limit": 1, "collision_strategy": "ENQUEUE"}),
        "collision_strategy should be CANCEL_NEW",
    ),
    "limit of two": (
        _set("backfill", "concurrency_limit", {"limit": 2, "collision_strategy": "ENQUEUE"}),
        "concurrency limit 2",
    ),
    "bare concurrency limit": (
        _set("backfill", "concurrency_limit", 1),
        "needs a limit and a collision_strategy",
    ),
    "missing flow function": (
        _set("backfill", "entrypoint", "flows/backfill.py:backfil"),
        "does not load",
    ),
    "missing flow file": (
        _set("backfill", "entrypoint", "flows/backfil.py:backfill"),
        "does not load",
    ),
    "unknown parameter": (
        _set("nightly", "parameters", {"shardz": 1}),
        "has no parameter ['shardz']",
    ),
    "bad parameter value": (_set("backfill", "parameters", {"mode": "rewind"}), "'rewind'"),
    "scheduled run without a required parameter": (
        _scheduled_onboarding,
        "'user_id' is a required property",
    ),
    "other work pool": (
        _set("backfill", "work_pool", {"name": "default"}),
        "work_pool.name is not loop-sync",
    ),
    "schedules left out": (
        lambda raw: _deployment(raw, "backfill").pop("schedules"),
        "no `schedules:`",
    ),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_the_checker_catches(mistake: str, tmp_path: Path) -> None:
    """A copy of the file with one mistake fails the check, naming the mistake."""
    edit, expected = MISTAKES[mistake]
    raw = yaml.safe_load(DEPLOYMENTS.read_text())  # anchors become shared dicts: fine
    edit(raw)
    copy = tmp_path / "deployments.yaml"
    copy.write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "flows").symlink_to(ROOT / "flows")

    found = problems(copy)

    assert any(expected in line for line in found), found


def test_prefect_alone_would_accept_a_misspelt_key() -> None:
    """Why the checker walks the keys: Prefect's model drops `concurency_limit` silently."""
    config = DeploymentConfig.model_validate({"name": "nightly", "concurency_limit": 1})

    assert config.concurrency_limit is None
