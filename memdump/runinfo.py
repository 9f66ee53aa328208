"""What a capture run tells whoever watches it: the names and the typed data that the
orchestration writes and the API reads back, written once here so both sides follow a
rename together.

A capture run's task runs carry their step as a tag (``step:<step>``; a hypervisor's
listing of "all" also ``hypervisor:<name>``); which VM each capture task run is for is
one artifact of its flow run (:class:`Target`, ``TARGETS_KEY``); the capture's
progress is a Prefect progress artifact whose percent is its data (for the UI) and whose
byte counts are its metadata (:class:`Progress`). Nothing is parsed back out of a state
message, a run name or an artifact description.

Plain strings and dataclasses only: the engine imports neither Prefect nor FastAPI.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Literal

# A trigger's id for "every running VM of the inventory".
ALL = "all"

# Flow and task names (the Prefect UI shows them; /status does not depend on them).
CAPTURE_FLOW = "capture-vms"
CAPTURE_PART_FLOW = "capture-part"  # fan-out: some of a trigger's VMs, on any worker
CAPTURE_TASK = "capture-vm"  # one VM's whole chain: capture, offload, record
CAPTURE_PART_TASK = "capture-part"  # fan-out: waits for a part's flow run
LIST_TASK = "list-vms"
LIST_RECORDED_TASK = "list-recorded-dumps"
VERIFY_TASK = "verify-dump"

# Prefect state names with a meaning of their own.
TIMED_OUT = "TimedOut"  # a VM's capture exceeded its deadline (contract status "timeout")
STORAGE_WARNING = "StorageWarning"  # retention completed; storage above its threshold
# A hypervisor's part of "all" listed fine and found no running VM (its list task run's
# Completed state is named so): the run, its summary and /status say so.
NO_RUNNING_VM = "NoRunningVM"

# Prefect state types of a run that has not finished.
IN_PROGRESS = frozenset({"SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"})

# Artifact keys.
PROGRESS_KEY = "capture-progress-"  # + slug(vmid): one progress artifact per capture
SUMMARY_KEY = "capture-summary"
RESULT_KEY = "capture-result"  # how a VM's chain ended in a part's flow run, read as data
TARGETS_KEY = "capture-targets"  # a flow run's capture task runs and their VMs (Target)

# Tags: what a task run is (and which hypervisor a listing is for). Not which VM a
# capture is for: before a task run starts, Prefect checks its set of tags against tag
# concurrency limits, a request (and a new client) per distinct set, cached for 5 s;
# a tag per VM made every set distinct (benchmarks/orchestration.py: 0.4-0.6 s per VM).
Step = Literal["capture", "list"]
STEP_TAG = "step:"
HYPERVISOR_TAG = "hypervisor:"


def slug(value: str) -> str:
    """An artifact key from an id: Prefect keys allow only [a-z0-9-]."""
    return re.sub(r"[^a-z0-9-]+", "-", value.lower()).strip("-") or "x"


def step_tag(step: Step) -> str:
    return f"{STEP_TAG}{step}"


def _tagged(tags: Iterable[str], prefix: str) -> str | None:
    return next((t.removeprefix(prefix) for t in tags if t.startswith(prefix)), None)


def tagged_step(tags: Iterable[str]) -> str | None:
    return _tagged(tags, STEP_TAG)


def tagged_hypervisor(tags: Iterable[str]) -> str | None:
    return _tagged(tags, HYPERVISOR_TAG)


@dataclass(frozen=True)
class Target:
    """Which VM a capture task run is for: the id as asked for (or as listed for "all")
    and, when known before the capture resolves it, its hypervisor. A flow run writes
    its targets once, after it has submitted them, as one table artifact
    (``TARGETS_KEY``; the Prefect UI shows it as a table)."""

    task_run_id: str
    vm_id: str
    hypervisor: str | None = None


def targets_to_data(targets: Iterable[Target]) -> str:
    return json.dumps([asdict(t) for t in targets])


def targets_from_data(data: object) -> list[Target]:
    """The targets of an artifact's data; a row that is not one is left out."""
    try:
        rows = json.loads(data) if isinstance(data, str) else data
    except ValueError:
        return []
    out = []
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict):
            continue
        tr, vm, hv = row.get("task_run_id"), row.get("vm_id"), row.get("hypervisor")
        if isinstance(tr, str) and isinstance(vm, str) and (hv is None or isinstance(hv, str)):
            out.append(Target(tr, vm, hv))
    return out


def unlisted_id(hypervisor: str) -> str:
    """How a hypervisor whose VMs could not be listed appears among the VMs: its part of
    "all" (the run's state, its summary and /status name it so)."""
    return f"{hypervisor}:{ALL}"


@dataclass(frozen=True)
class Progress:
    """A capture's progress: bytes of the dump streamed so far, of the dump's size."""

    done: int
    total: int

    @property
    def percent(self) -> float:
        return round(100.0 * self.done / self.total, 1) if self.total else 0.0

    def to_metadata(self) -> dict[str, str]:
        # Prefect artifact metadata holds strings only.
        return {"bytes_done": str(self.done), "bytes_total": str(self.total)}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str] | None) -> Progress | None:
        try:
            return cls(int((meta or {})["bytes_done"]), int((meta or {})["bytes_total"]))
        except (KeyError, TypeError, ValueError):
            return None


# Answers of Prefect's API after which memdump sends the same request again, and the
# delays between its tries: the embedded server's SQLite answers 503 ("database is
# locked") while a run's other writes go in, for milliseconds. Prefect's own client
# waits 2, 4, 8, 16 s between tries, which a trigger or a capture's slot paid in full
# (2026-11-30: a trigger's run, then a capture's slot, 1.9-2.4 s on half the triggers).
BUSY_STATUS = frozenset({429, 502, 503})
BUSY_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8)
