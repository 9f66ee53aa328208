"""The fan-out over deployments' parts (tasks.fanout): how a trigger's VMs are dealt,
and a VM's outcome as the data a part's flow run publishes and the trigger's run reads
back (the flows themselves: tests/flows/test_capture_fleet.py, tests/e2e/test_collectors.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from memdump.records.model import DumpRecord
from tasks.fanout import VMOutcome, deal


def test_deal_makes_even_parts_in_the_order_given() -> None:
    targets = [(f"vm-{i}", f"hv-{i % 3}") for i in range(8)]
    parts = deal(targets, 3)
    assert parts == [targets[0::3], targets[1::3], targets[2::3]]
    assert sorted(len(p) for p in parts) == [2, 3, 3]
    assert deal(targets[:2], 3) == [[targets[0]], [targets[1]]]  # never an empty part
    assert deal(targets, 0) == [targets]  # a cap below one is one part
    assert deal([], 3) == []


@pytest.mark.parametrize("hypervisor", ["lab", None])
def test_an_outcome_is_read_back_as_it_was_written(hypervisor: str | None) -> None:
    record = DumpRecord(
        datetime(2026, 12, 1, 9, 0, 0, 123456, tzinfo=UTC), "web", "vm-1", "a" * 64, 1.5,
        10, 1, 2, 3, "/d/vm-1.mem.gz", "b" * 64, 4096, "lab",
    )  # fmt: skip
    done = VMOutcome("vm-1", hypervisor, "completed", record)
    failed = VMOutcome("vm-2", hypervisor, "timeout", None, 'no | "markup" here')
    for o in (done, failed):
        assert VMOutcome.from_data(o.to_data()) == o


@pytest.mark.parametrize("data", [None, "", "not json", "[]", "{}", '[{"vm_id": "x"}]', "[1]", 42])
def test_data_that_holds_no_outcome_is_none_not_a_guess(data: object) -> None:
    assert VMOutcome.from_data(data) is None
