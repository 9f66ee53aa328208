"""A flow run's targets artifact (memdump.runinfo.Target) as /status reads it from
Prefect, made offline: for tests that hand api.runs Prefect objects of their own."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

from memdump.runinfo import TARGETS_KEY, Target, targets_to_data


def targets_artifact(flow_run_id: UUID, targets: list[tuple[Any, str, str | None]]) -> Any:
    """``targets``: (task run id, VM id, hypervisor or None) per capture task run."""
    from prefect.client.schemas.objects import Artifact

    return Artifact(
        id=uuid4(),
        key=TARGETS_KEY,
        type="table",
        data=targets_to_data(Target(str(tr), vm, hv) for tr, vm, hv in targets),
        flow_run_id=flow_run_id,
        created=datetime.now(UTC),
    )
