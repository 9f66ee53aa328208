"""The task that lists one hypervisor's running VMs: its part of an "all" trigger."""

from __future__ import annotations

from prefect import task

from memdump.hypervisors import open_driver
from memdump.runinfo import LIST_TASK, step_tag
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
def list_vms(hypervisor: str) -> list[str]:
    """The running VMs of one hypervisor. A failure fails this task only; the flow fails
    that hypervisor's VMs with the reason and captures the rest."""
    settings = Settings()
    driver = open_driver(settings.hypervisor(hypervisor), settings.ssh)
    try:
        listing = list_one(driver)
    finally:
        driver.close()
    if listing.error is not None:
        raise listing.error
    return [ref.vmid for ref in listing.vms]
