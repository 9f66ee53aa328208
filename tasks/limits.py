"""Prefect global concurrency limits for captures: one overall, one per hypervisor.

They live on the Prefect server, so they hold across every worker and runner that
shares it. A capture takes a slot of both at once (Prefect acquires several limits
all-or-nothing).
"""

from __future__ import annotations

from memdump.settings import Settings

GLOBAL_LIMIT = "memdump-captures"


def hypervisor_limit(name: str) -> str:
    return f"memdump-hv-{name}"


def ensure_limits(settings: Settings, *, reset_slots: bool = False) -> list[str]:
    """Create or update the limits from settings. ``reset_slots`` frees slots leaked by
    a server restart (leases are kept in the server's memory); only safe when no
    capture can be running, e.g. when ``memdump serve`` starts its own server."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    wanted = {GLOBAL_LIMIT: settings.orchestration.max_concurrent_captures}
    for hv in settings.inventory:
        wanted[hypervisor_limit(hv.name)] = settings.orchestration.max_captures_per_hypervisor
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        for name, limit in wanted.items():
            try:
                client.upsert_global_concurrency_limit_by_name(name, limit)
            except ObjectAlreadyExists:
                # Another worker or flow run created it between our read and create.
                client.upsert_global_concurrency_limit_by_name(name, limit)
            if reset_slots:
                client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(active_slots=0)
                )
    return list(wanted)
