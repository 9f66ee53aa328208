"""Turning requested ids into VMs on the inventory's hypervisors."""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from memdump.errors import (
    AmbiguousVMError,
    ConfigError,
    HypervisorError,
    InvalidIdentifierError,
    MemdumpError,
    TransportError,
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
    "locate",
    "require_hypervisors",
]

# Lookups at once on one hypervisor when locating ids: channels of its one SSH
# connection (sshd's MaxSessions allows 10).
LOCATE_PER_HYPERVISOR = 4


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


class _Asker:
    """One hypervisor's answers about ids, as :func:`find` takes them: a VMRef, None (not
    there, or a HypervisorError find passes over), or an error find would raise. Once
    its connection fails, the hypervisor is not asked again."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.broken: Exception | None = None

    def ask(self, vm_id: str) -> VMRef | Exception | None:
        if self.broken is not None:
            return self.broken
        try:
            return self.driver.resolve(vm_id)
        except HypervisorError:  # VMNotFoundError among them
            return None
        except Exception as exc:  # noqa: BLE001 - an answer: find would raise it
            if isinstance(exc, TransportError):
                self.broken = exc
            return exc


def locate(
    drivers: Sequence[Driver],
    vm_ids: Sequence[str],
    *,
    per_hypervisor: int = LOCATE_PER_HYPERVISOR,
) -> Generator[tuple[str, str | None]]:
    """Which hypervisor :func:`find` would find each of ``vm_ids`` on, every hypervisor
    asked through one driver (one SSH connection) for all of them, at most
    ``per_hypervisor`` lookups at a time on each, instead of a connection to each per id.

    Yields ``(id, hypervisor)`` in the order of ``vm_ids``, each as soon as it is
    answered: the hypervisor when find would return a VM there (``hv:id`` names it, one
    hypervisor in all is it, or exactly one knows the id and none failed in a way find
    would raise), else None (not found, found on several, an invalid id, a hypervisor
    that could not answer): whoever captures it then calls find itself, so its error is
    find's own. An unqualified id is still looked up on every hypervisor: one found on
    two is never guessed."""
    drivers = list(drivers)
    names = {d.name for d in drivers}
    askers = [_Asker(d) for d in drivers]
    pools = [
        ThreadPoolExecutor(per_hypervisor, thread_name_prefix=f"memdump-locate-{d.name}")
        for d in drivers
    ]
    known: dict[int, str | None] = {}
    asked: dict[int, list[Future[VMRef | Exception | None]]] = {}
    try:
        for i, vm_id in enumerate(vm_ids):
            try:
                hv, _ = split_qualified(vm_id)
            except InvalidIdentifierError:
                known[i] = None
                continue
            if hv is not None:
                known[i] = hv if hv in names else None
            elif len(drivers) == 1:
                known[i] = drivers[0].name
            else:
                asked[i] = [p.submit(a.ask, vm_id) for a, p in zip(askers, pools, strict=True)]
        for i, vm_id in enumerate(vm_ids):
            if i in known:
                yield vm_id, known[i]
                continue
            answers = [f.result() for f in asked[i]]
            hits = [
                a.driver.name
                for a, answer in zip(askers, answers, strict=True)
                if isinstance(answer, VMRef)
            ]
            failed = any(isinstance(a, Exception) for a in answers)
            yield vm_id, hits[0] if len(hits) == 1 and not failed else None
    finally:
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=True)
