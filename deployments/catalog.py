"""Every deployment memdump has, declared once.

Two consumers read this table: ``memdump serve`` (deployments/serve.py builds runner
deployments from it) and production's ``prefect.yaml`` (generated from it:
``python -m deployments.catalog > prefect.yaml``; a test checks the committed file is what
the table gives). Names, entrypoints, schedules, parameters and descriptions are written
here and nowhere else. Values that are settings (how many days verify looks back, how
long dumps are kept) are read by the flows when they run, not baked into a deployment.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

import yaml
from prefect.schedules import Cron

from memdump.runinfo import ALL
from memdump.settings import Settings

POOL = "memdump"  # the process work pool production's workers serve
TAGS = ("memdump",)
TIMEZONE = "UTC"

WEEKLY_CRON = "0 2 * * 1"
VERIFY_CRON = "0 4 * * 0"
RETENTION_CRON = "30 3 * * *"


@dataclass(frozen=True)
class DeploymentSpec:
    name: str
    entrypoint: str  # "flows/capture.py:capture_vms", as prefect.yaml spells it
    description: str
    cron: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)

    def flow(self) -> Any:
        """The flow object the entrypoint names (imported on demand: prefect.yaml's
        generation needs no flow code)."""
        path, attr = self.entrypoint.split(":")
        return getattr(import_module(path.removesuffix(".py").replace("/", ".")), attr)


def deployment_specs(settings: Settings) -> list[DeploymentSpec]:
    """The deployments, in the order they are served and written; the on-demand and
    per-part names are settings because the API and the trigger's flow run start them."""
    return [
        DeploymentSpec(
            settings.orchestration.deployment,
            "flows/capture.py:capture_vms",
            "Started by POST /api/memory-dumps/trigger",
        ),
        DeploymentSpec(
            settings.orchestration.child_deployment.split("/", 1)[-1],
            "flows/capture.py:capture_part",
            "Some of a trigger's VMs; started per part by a trigger's flow run "
            "(MEMDUMP_ORCHESTRATION__FANOUT=deployments)",
        ),
        DeploymentSpec(
            "weekly",
            "flows/capture.py:capture_vms",
            "Every VM of the inventory, Mondays 02:00 UTC",
            cron=WEEKLY_CRON,
            parameters={"vm_ids": [ALL], "source": "schedule"},
        ),
        DeploymentSpec(
            "verify-weekly",
            "flows/verify.py:verify_dumps",
            "Re-read and check every dump of the last MEMDUMP_VERIFY__DAYS days, Sundays 04:00 UTC",
            cron=VERIFY_CRON,
        ),
        DeploymentSpec(
            "retention-daily",
            "flows/retention.py:apply_retention",
            "Delete dumps past MEMDUMP_RETENTION__DAYS / __KEEP_LAST (records stay)",
            cron=RETENTION_CRON,
        ),
    ]


def runner_options(spec: DeploymentSpec) -> dict[str, Any]:
    """How a runner serves ``spec``: the keywords of ``Flow.to_deployment`` and of
    ``Runner.add_flow`` alike."""
    return {
        "name": spec.name,
        "schedules": [Cron(spec.cron, timezone=TIMEZONE)] if spec.cron else None,
        "parameters": dict(spec.parameters),
        "tags": list(TAGS),
        "description": spec.description,
    }


def runner_deployments(settings: Settings) -> list[Any]:
    """The table as deployments for ``prefect.serve``."""
    return [
        spec.flow().to_deployment(**runner_options(spec)) for spec in deployment_specs(settings)
    ]


HEADER = """\
# GENERATED from deployments/catalog.py: `python -m deployments.catalog > prefect.yaml`
# (edit the table there, not this file; tests/unit/test_deployment_catalog.py checks them).
# Prefect project file, for production: `prefect --no-prompt deploy --all` registers the
# deployments that `memdump serve` serves, on the process work pool "memdump", served by
# a worker on each collector (`python -m deployments.worker --pool memdump`), which runs
# flow runs from $MEMDUMP_HOME (this checkout, at the same path on every collector).
# See README "Several collectors".
"""


def prefect_yaml(settings: Settings) -> str:
    """prefect.yaml's text for these settings (the committed file: the defaults)."""
    deployments: list[dict[str, Any]] = []
    for spec in deployment_specs(settings):
        d: dict[str, Any] = {
            "name": spec.name,
            "entrypoint": spec.entrypoint,
            "description": spec.description,
            "tags": list(TAGS),
            "parameters": dict(spec.parameters),
        }
        if spec.cron:
            d["schedules"] = [{"cron": spec.cron, "timezone": TIMEZONE}]
        d["work_pool"] = {"name": POOL}
        deployments.append(d)
    doc = {
        "name": "memdump",
        "pull": [
            {
                "prefect.deployments.steps.set_working_directory": {
                    "directory": "{{ $MEMDUMP_HOME }}"
                }
            }
        ],
        "deployments": deployments,
    }
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="print prefect.yaml, generated from the table")
    parser.parse_args(argv)
    sys.stdout.write(prefect_yaml(Settings()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
