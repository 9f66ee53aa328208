"""The task that lists one hypervisor's running VMs: its part of an "all" trigger."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.client.schemas.objects import State
from prefect.states import Completed

from memdump.hypervisors import open_driver
from memdump.runinfo import LIST_TASK, NO_RUNNING_VM, step_tag
from memdump.settings import Settings
from memdump.targets import list_one
from tasks.capture import retry_if_retryable


@task(
    name=LIST_TASK,
    task_run_name=LIST_TASK + "-{hypervisor}",
    # The flow adds the hypervisor's tag: /status shows a failed listing as that
    # hypervisor's part of "all" (memdump.runinfo.unlisted_id).
    tags=[step_tag("list")],
    retry_condition_fn=retry_if_retryable,
)
def list_vms(hypervisor: str) -> list[str] | State[Any]:
    """The running VMs of one hypervisor. A failure fails this task only; the flow fails
    that hypervisor's VMs with the reason and captures the rest. None running: Completed
    named NO_RUNNING_VM (its result still the empty list), which /status reads as data."""
    settings = Settings()
    driver = open_driver(settings.hypervisor(hypervisor), settings.ssh)
    try:
        listing = list_one(driver)
    finally:
        driver.close()
    if listing.error is not None:
        raise listing.error
    vms = [ref.vmid for ref in listing.vms]
    if not vms:
        return Completed(
            name=NO_RUNNING_VM, message=f"no running VM on hypervisor {hypervisor}", data=vms
        )
    return vms
