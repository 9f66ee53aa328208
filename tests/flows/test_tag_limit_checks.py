"""Before a task run starts, Prefect checks its set of tags against tag concurrency limits
(a request to the server, unless its 5 s cache of "no limit for this set" answers). The
capture task runs carried a tag per VM, so every VM of a trigger sent one. At N = 100 on
the lab (benchmarks/fleet.py on 97d9b9b, 2026-11-30, 2 runs of 2) the embedded Prefect
server's SQLite answered some of them 503 and Prefect failed the run:
``ConcurrencySlotAcquisitionError: Unable to acquire concurrency slots on
['tag:vm:vm-many-034', ...]: 503 Service Unavailable``, 3 and 4 VMs never captured. Which
VM a task run is for is data of its flow run now (memdump.runinfo.Target)."""

from __future__ import annotations

import json
from typing import Any

import pytest

CHECK = "/concurrency_limits/increment-with-lease"


def test_a_trigger_asks_for_one_set_of_tags_whatever_its_vms(
    fake_engine: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import httpx

    from flows.capture import capture_vms

    asked: list[frozenset[str]] = []
    send = httpx.AsyncClient.send

    async def counting(self: httpx.AsyncClient, request: httpx.Request, **kw: Any) -> Any:
        if request.url.path.endswith(CHECK):
            names = json.loads(request.content)["names"]
            if all(n.startswith("tag:") for n in names):  # not memdump's own slots
                asked.append(frozenset(names))
        return await send(self, request, **kw)

    monkeypatch.setattr(httpx.AsyncClient, "send", counting)
    vms = [f"vm-{i}" for i in range(6)]
    state = capture_vms(vm_ids=vms, source="test", return_state=True)
    assert state.is_completed()
    assert sorted(fake_engine["calls"]) == vms
    # At most one set (the step's; none if the cache of an earlier test still answers):
    # a tag per VM would be six.
    assert len(set(asked)) <= 1, sorted(map(sorted, set(asked)))
