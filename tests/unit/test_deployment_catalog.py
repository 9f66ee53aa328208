"""Deployments are declared once (deployments/catalog.py): what `memdump serve` serves and
what production's prefect.yaml registers are the same deployments, and prefect.yaml is
exactly what the table generates."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml

from deployments.catalog import (
    POOL,
    deployment_specs,
    prefect_yaml,
    runner_deployments,
)
from memdump.settings import OrchestrationSettings, Settings, VerifySettings

REPO = Path(__file__).resolve().parents[2]


def _defaults(**orchestration: Any) -> Settings:
    """Settings at their defaults for what shapes deployments (the committed prefect.yaml
    is generated from these), whatever the environment says."""
    return Settings(orchestration=OrchestrationSettings(**orchestration), verify=VerifySettings())


def test_the_committed_prefect_yaml_is_what_the_table_generates() -> None:
    committed = (REPO / "prefect.yaml").read_text()
    assert committed == prefect_yaml(_defaults()), (
        "prefect.yaml differs from deployments/catalog.py: "
        "run `python -m deployments.catalog > prefect.yaml`"
    )


def _yaml_view(settings: Settings) -> dict[str, Any]:
    doc = yaml.safe_load(prefect_yaml(settings))
    view = {}
    for d in doc["deployments"]:
        crons = [(s["cron"], s["timezone"]) for s in d.get("schedules", [])]
        view[d["name"]] = (d["entrypoint"], crons, d["parameters"], d["tags"], d["description"])
        assert d["work_pool"] == {"name": POOL}
    return view


def _runner_view(settings: Settings) -> dict[str, Any]:
    view = {}
    for d in runner_deployments(settings):
        crons = [(s.schedule.cron, s.schedule.timezone) for s in d.schedules]
        view[d.name] = (d.entrypoint, crons, d.parameters, d.tags, d.description)
    return view


def test_memdump_serve_and_prefect_yaml_declare_the_same_deployments() -> None:
    # Non-default settings too: what a setting governs must not be baked into one side
    # (prefect.yaml used to say `days: 7` where serve read MEMDUMP_VERIFY__DAYS).
    adhoc = _defaults(deployment="adhoc").model_copy(update={"verify": VerifySettings(days=3)})
    for settings in (_defaults(), adhoc):
        runner, project = _runner_view(settings), _yaml_view(settings)
        assert runner == project
        assert len(runner) == 5 and "weekly" in runner


def test_every_schedule_is_utc_and_every_parameter_is_one_the_flow_takes() -> None:
    for spec in deployment_specs(_defaults()):
        params = inspect.signature(spec.flow().fn).parameters
        assert set(spec.parameters) <= set(params), spec
        if spec.cron is None:
            continue  # started with its parameters (by the API, by a trigger's flow run)
        # A flow parameter a schedule leaves out must have a default (read from a setting
        # at run time where it is one), or the scheduled run could not start.
        missing = [n for n in params if n not in spec.parameters]
        assert all(params[n].default is not inspect.Parameter.empty for n in missing), spec
    crons = [c for d in _runner_view(_defaults()).values() for c in d[1]]
    assert crons and all(tz == "UTC" for _, tz in crons)


def test_verify_reads_its_window_from_the_setting_when_the_deployment_gives_none() -> None:
    spec = next(s for s in deployment_specs(_defaults()) if s.name == "verify-weekly")
    assert "days" not in spec.parameters
    assert inspect.signature(spec.flow().fn).parameters["days"].default is None
