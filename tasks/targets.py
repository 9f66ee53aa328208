"""Which VM each capture task run of a flow run is for, written once as data (an artifact
of the flow run, memdump.runinfo.Target): /status reads it back, and the Prefect UI shows
it as a table. Not tags: see memdump.runinfo (a tag per VM costs a Prefect request per
task run)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.actions import ArtifactCreate

from memdump.runinfo import TARGETS_KEY, Target, targets_to_data


def publish_targets(flow_run_id: UUID | str, targets: Iterable[Target], client: Any = None) -> None:
    """One table artifact of ``flow_run_id``: its capture task runs and their VMs."""
    artifact = ArtifactCreate(
        type="table",
        key=TARGETS_KEY,
        description="which VM each capture task run of this flow run is for",
        data=targets_to_data(targets),
        flow_run_id=UUID(str(flow_run_id)),
    )
    if client is not None:
        client.create_artifact(artifact)
        return
    with get_client(sync_client=True) as own:
        own.create_artifact(artifact)
