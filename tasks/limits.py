"""Prefect global concurrency limits for captures: one overall, one per hypervisor.

They live on the Prefect server, so they hold across every worker and runner that
shares it. A capture takes a slot of both at once (Prefect acquires several limits
all-or-nothing). In front of them, :data:`GATE` mirrors the same caps in this process:
a capture waits there, in order, and asks the server only once its hypervisor and the
process have room (see :class:`CaptureGate`).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from memdump.errors import ConfigError
from memdump.settings import Settings
from tasks.busy_retries import busy_retried

log = logging.getLogger(__name__)

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


class _Lease:
    __slots__ = ("duration", "id", "renew_at")

    def __init__(self, lease_id: UUID, duration: float) -> None:
        self.id, self.duration = lease_id, duration
        self.renew_at = time.monotonic() + duration * _RENEW_AFTER


# A lease is renewed once this share of its duration has gone by (Prefect's client: 3/4).
_RENEW_AFTER = 0.5
# The longest wait for a refused slot between two requests, whatever Retry-After says.
_MAX_RETRY_AFTER_SEC = 30.0


class SlotLeases:
    """The Prefect limits' slots, each held with a lease, as Prefect's ``concurrency()``
    does, but with one request to take the slots and one to give them back, on the
    caller's own client (the task run's), and one thread that renews every lease the
    process holds.

    Why not ``concurrency()``: besides those two requests, it runs each acquisition
    through a queue service on Prefect's one event-loop thread of the process, starts a
    renewal thread per lease with a client of its own that renews at once, releases
    through a new async client, and emits two events. Measured with
    benchmarks/orchestration.py (25 VMs whose capture is a 1 s sleep, caps 3 / 2 per
    hypervisor): 2.5 s median from a capture's place at the gate to its slot, and 0.55 s
    to give the slot back, all of it time a place was held and nothing captured.

    A request the server refuses (423: the slots are taken, by another process or
    collector) is sent again after its Retry-After, as Prefect's client does. A lease
    whose renewal fails is logged; the server frees its slots when it runs out (a lost
    process cannot hold a slot for ever), the capture goes on."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._leases: dict[UUID, _Lease] = {}
        self._renewer: threading.Thread | None = None
        self._renewer_pid = 0

    @contextmanager
    def hold(self, names: list[str], *, lease_sec: float, holder: Any = None) -> Iterator[UUID]:
        """One slot of every limit in ``names`` (all or none), for the ``with`` block."""
        from prefect import get_client

        client = get_client(sync_client=True)
        lease_id = self._acquire(client, names, lease_sec, holder)
        try:
            yield lease_id
        finally:
            with self._lock:
                self._leases.pop(lease_id, None)
            # Quickly, as the slot was taken: a slot given back 2 s late (Prefect's
            # client's wait after a busy answer) is a VM of the fleet started 2 s late.
            busy_retried(lambda: client.release_concurrency_slots_with_lease(lease_id))

    def held(self) -> int:
        with self._lock:
            return len(self._leases)

    def _acquire(self, client: Any, names: list[str], lease_sec: float, holder: Any) -> UUID:
        import httpx

        while True:
            try:
                response = busy_retried(
                    lambda: client.increment_concurrency_slots_with_lease(
                        names=names,
                        slots=1,
                        mode="concurrency",
                        lease_duration=lease_sec,
                        holder=holder,
                    )
                )
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423:
                    raise
                wait = float(exc.response.headers.get("Retry-After") or 1.0)
                time.sleep(min(max(wait, 0.0), _MAX_RETRY_AFTER_SEC))
                continue
            body = response.json()
            got = {lim["name"] for lim in body.get("limits") or []}
            if got != set(names):
                # Slots of only some limits would not cap anything: give them back.
                if got:
                    partial = functools.partial(
                        client.release_concurrency_slots_with_lease, UUID(body["lease_id"])
                    )
                    busy_retried(partial)
                missing = ", ".join(sorted(set(names) - got))
                raise ConfigError(
                    f"the Prefect concurrency limit(s) {missing} do not exist: a capture "
                    "runs only under its limits (tasks.limits.ensure_limits makes them)",
                    limits=sorted(set(names) - got),
                )
            lease = _Lease(UUID(body["lease_id"]), lease_sec)
            with self._lock:
                self._leases[lease.id] = lease
                self._start_renewer()
                self._lock.notify_all()
            return lease.id

    def _start_renewer(self) -> None:
        # A forked process has the parent's dict and lock state but not its thread.
        if self._renewer is not None and self._renewer_pid == os.getpid():
            return
        self._renewer_pid = os.getpid()
        self._renewer = threading.Thread(
            target=self._renew_forever, name="memdump-slot-leases", daemon=True
        )
        self._renewer.start()

    def _renew_forever(self) -> None:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            while True:
                with self._lock:
                    now = time.monotonic()
                    due = [lease for lease in self._leases.values() if lease.renew_at <= now]
                    if not due:
                        soonest = min((le.renew_at for le in self._leases.values()), default=None)
                        self._lock.wait(None if soonest is None else soonest - now)
                        continue
                for lease in due:
                    try:
                        client.renew_concurrency_lease(lease.id, lease.duration)
                    except Exception as exc:  # the server frees its slots when it runs out
                        with self._lock:
                            if lease.id in self._leases:  # not given back meanwhile
                                log.warning("renewing slot lease %s failed: %s", lease.id, exc)
                    lease.renew_at = time.monotonic() + lease.duration * _RENEW_AFTER


# The process's leases of Prefect slots (one renewal thread for all of them).
SLOTS = SlotLeases()
