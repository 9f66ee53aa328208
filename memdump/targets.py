"""Turning requested ids into VMs on the inventory's hypervisors."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from memdump.errors import (
    AmbiguousVMError,
    ConfigError,
    HypervisorError,
    MemdumpError,
    VMNotFoundError,
)
from memdump.hypervisors import Driver, VMRef
from memdump.identifiers import split_qualified
from memdump.runinfo import ALL
from memdump.settings import Settings

__all__ = [
    "ALL",
    "Listing",
    "find",
    "list_all",
    "list_each",
    "list_one",
    "require_hypervisors",
]


def require_hypervisors(settings: Settings, refusal: str) -> None:
    """ConfigError naming the settings when the inventory has no hypervisor (an
    inventory that cannot be read raises its own). Without one, every capture of "all"
    (the weekly schedule's) would complete having captured nothing; ``refusal`` says
    what is refused instead (e.g. "memdump serve refuses to start")."""
    if settings.inventory:
        return
    if settings.inventory_file is not None:
        where = f"MEMDUMP_INVENTORY_FILE={settings.inventory_file} lists none"
    else:
        where = "neither MEMDUMP_INVENTORY_FILE nor MEMDUMP_HYPERVISORS is set"
    raise ConfigError(
        f"no hypervisor in the inventory ({where}): {refusal}. Set MEMDUMP_INVENTORY_FILE"
        " to a YAML file with a 'hypervisors' list (`lab/up` writes one; `. .lab/env`"
        " sets it), or MEMDUMP_HYPERVISORS to that list as JSON",
        setting="MEMDUMP_INVENTORY_FILE",
    )


@dataclass(frozen=True)
class Listing:
    """One hypervisor's running VMs, or why they could not be listed: one bad hypervisor
    fails only its own VMs, never the listing of the others."""

    hypervisor: str
    vms: tuple[VMRef, ...] = ()
    error: MemdumpError | None = None


def list_one(driver: Driver) -> Listing:
    try:
        return Listing(driver.name, tuple(driver.list_vms()))
    except MemdumpError as exc:
        return Listing(driver.name, error=exc)
    except Exception as exc:  # noqa: BLE001 - a driver bug fails this hypervisor only
        err = HypervisorError(
            f"{driver.name}: cannot list VMs: {type(exc).__name__}: {exc}",
            hypervisor=driver.name,
            cause=type(exc).__name__,
        )
        return Listing(driver.name, error=err)


def list_each(drivers: Iterable[Driver]) -> list[Listing]:
    return [list_one(d) for d in drivers]


def list_all(drivers: Iterable[Driver]) -> list[VMRef]:
    """Every running VM; raises the first hypervisor's error (see list_each to go on)."""
    out: list[VMRef] = []
    for listing in list_each(drivers):
        if listing.error is not None:
            raise listing.error
        out.extend(listing.vms)
    return out


def find(drivers: Iterable[Driver], vm_id: str) -> tuple[Driver, VMRef]:
    """Find ``id`` on every hypervisor (more than one match is an error, not a guess), or
    ``hypervisor:id`` on that one only."""
    hv, vm_id = split_qualified(vm_id)
    if hv is not None:
        drivers = [d for d in drivers if d.name == hv]
        if not drivers:
            raise VMNotFoundError(
                f"no hypervisor {hv!r} in the inventory", vm_id=vm_id, hypervisor=hv
            )
    hits: list[tuple[Driver, VMRef]] = []
    errors: list[str] = []
    for d in drivers:
        try:
            hits.append((d, d.resolve(vm_id)))
        except VMNotFoundError:
            continue
        except HypervisorError as exc:
            errors.append(str(exc))
    if len(hits) > 1:
        raise AmbiguousVMError(
            f"VM id {vm_id!r} matches on several hypervisors: "
            + ", ".join(d.name for d, _ in hits)
            + f"; ask for one as HYPERVISOR:{vm_id}",
            vm_id=vm_id,
            hypervisors=[d.name for d, _ in hits],
        )
    if not hits:
        detail = f" ({'; '.join(errors)})" if errors else ""
        raise VMNotFoundError(f"no VM {vm_id!r} on any hypervisor{detail}", vm_id=vm_id)
    return hits[0]
