"""Prefect global concurrency limits for captures: one overall, one per hypervisor.

They live on the Prefect server, so they hold across every worker and runner that
shares it. A capture takes a slot of both at once (Prefect acquires several limits
all-or-nothing). In front of them, :data:`GATE` mirrors the same caps in this process:
a capture waits there, in order, and asks the server only once its hypervisor and the
process have room (see :class:`CaptureGate`).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from memdump.settings import Settings

GLOBAL_LIMIT = "memdump-captures"
_PAGE = 200  # limits read per request (the server's default page size)


def hypervisor_limit(name: str) -> str:
    return f"memdump-hv-{name}"


def ensure_limits(settings: Settings, *, reset_slots: bool = False) -> list[str]:
    """Create or update the limits from settings. ``reset_slots`` frees slots leaked by
    a server restart (leases are kept in the server's memory); only safe when no
    capture can be running, e.g. when ``memdump serve`` starts its own server.

    Each capture flow run calls it, so a changed cap, a hypervisor added to the
    inventory or a limit deleted on the server is right again from the next run. One
    read of the server's limits (one request up to 200 limits), and a write only for a
    limit that is missing or differs: not a read per limit."""
    from prefect import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate,
        GlobalConcurrencyLimitUpdate,
    )
    from prefect.exceptions import ObjectAlreadyExists

    wanted = {GLOBAL_LIMIT: settings.orchestration.max_concurrent_captures}
    for hv in settings.inventory:
        wanted[hypervisor_limit(hv.name)] = settings.orchestration.max_captures_per_hypervisor
    with get_client(sync_client=True) as client:
        have = {lim.name: lim for lim in _read_limits(client)}
        for name, limit in wanted.items():
            current = have.get(name)
            if current is None:
                try:
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=limit)
                    )
                except ObjectAlreadyExists:
                    # Another worker or flow run created it between our read and create.
                    client.upsert_global_concurrency_limit_by_name(name, limit)
            elif current.limit != limit:
                client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(limit=limit)
                )
            if reset_slots:
                client.update_global_concurrency_limit(
                    name, GlobalConcurrencyLimitUpdate(active_slots=0)
                )
    return list(wanted)


def _read_limits(client: Any) -> list[Any]:
    out: list[Any] = []
    while True:
        page = client.read_global_concurrency_limits(limit=_PAGE, offset=len(out))
        out.extend(page)
        if len(page) < _PAGE:
            return out


class _Waiter:
    """One capture waiting for its place (compared by identity)."""

    __slots__ = ("hypervisor", "per_hypervisor", "total")

    def __init__(self, hypervisor: str, total: int, per_hypervisor: int) -> None:
        self.hypervisor, self.total, self.per_hypervisor = hypervisor, total, per_hypervisor


class CaptureGate:
    """The capture limits mirrored in this process. A capture waits here, in the order
    it came, until the process and its hypervisor have room under the caps it was given
    (the settings the Prefect limits are made from); only then does it open its SSH
    connection and ask the server for its slots, which still hold across runs and
    collectors. A place given back goes to the next capture that fits at once.

    Without it, every task of a trigger over many VMs opened its SSH connection first
    (sshd's MaxStartups drops new connections beyond 10 being set up) and then polled
    the server, each refused request sleeping for the server's Retry-After (which grows
    with the number refused, up to 30 s) while a freed slot sat idle."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[_Waiter] = []
        self._total = 0
        self._per: Counter[str] = Counter()

    def _fits(self, w: _Waiter) -> bool:
        return self._total < w.total and self._per[w.hypervisor] < w.per_hypervisor

    def _turn(self, me: _Waiter) -> bool:
        # The first waiter that fits goes first; one that does not fit (its hypervisor
        # is full) does not hold up the others.
        return next((w for w in self._queue if self._fits(w)), None) is me

    @contextmanager
    def place(self, hypervisor: str, *, total: int, per_hypervisor: int) -> Iterator[None]:
        """Hold a place for a capture on ``hypervisor`` for the ``with`` block."""
        me = _Waiter(hypervisor, total, per_hypervisor)
        with self._cond:
            self._queue.append(me)
            try:
                while not self._turn(me):
                    self._cond.wait()
            finally:
                self._queue.remove(me)
                self._cond.notify_all()  # the queue changed: the next in line may fit
            self._total += 1
            self._per[hypervisor] += 1
        try:
            yield
        finally:
            with self._cond:
                self._total -= 1
                self._per[hypervisor] -= 1
                self._cond.notify_all()

    def held(self) -> tuple[int, dict[str, int]]:
        """Places held now: in all, and per hypervisor."""
        with self._cond:
            return self._total, {hv: n for hv, n in self._per.items() if n}

    def waiting(self) -> int:
        """Captures waiting for a place now."""
        with self._cond:
            return len(self._queue)


# The process's one gate: every capture task of this process waits at it.
GATE = CaptureGate()
