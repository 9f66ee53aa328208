"""Warm flow-run processes for the runner (``deployments.serve``).

Prefect's runner starts every flow run of a served flow in a new process through
``prefect.flow_engine.run_flow_in_subprocess``: a *spawned* interpreter that imports
Prefect, then this project, before the run's first line (about 2 s on a collector of two
cores; issue 17 measured 8.5 s from trigger to ``completed`` for a capture of 1.6 s).
Here that spawn becomes a fork from a *forkserver* that has already imported them: each
flow run still gets a process of its own (a cancelled or timed-out run is still ended by
killing it, and one run's crash cannot take another down), but without the start-up.

The forkserver is its own process, started once (from the runner's main thread, before
its first trigger); it imports only modules that start no thread at import (a test
checks ``PRELOAD``), so a forked child never inherits a lock held by a thread that does
not exist in it.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
from collections.abc import Sequence
from types import ModuleType
from typing import Any

# What every capture flow run imports first: Prefect's engine and client, this project's
# flows, tasks and engine; and what a run imported on its own when these were all
# (strace of a flow run, 2026-11-30: 0.5 s of its start, between PENDING and the first
# capture): what the runner's main module imports (multiprocessing runs deployments.serve
# again in every child as __mp_main__; preloading the module itself would make runpy warn
# in every run), the SSH transport (paramiko, cryptography, nacl),
# the drivers, the live-capture converter, anyio's asyncio backend (Prefect's loop
# thread), graphviz (Prefect imports it when a flow submits a task), rich's emoji table
# (its console logging).
PRELOAD: tuple[str, ...] = (
    "prefect",
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.client.orchestration",
    "prefect.utilities.visualization",
    "anyio._backends._asyncio",
    "rich._emoji_codes",
    "encodings.idna",
    "prefect.runner",
    "deployments.catalog",
    "deployments.wake",
    "memdump.children",
    "memdump.leftovers",
    "memdump.timestamping",
    "flows.capture",
    "tasks.capture",
    "memdump.chain",
    "memdump.capture",
    "memdump.pipeline",
    "memdump.records",
    "memdump.custody",
    "memdump.livecore",
    "memdump.transport.ssh",
    "memdump.transport.process",
    "memdump.hypervisors.libvirt",
    "memdump.hypervisors.qemu",
    "memdump.hypervisors.proxmox",
)


class _WarmMultiprocessing:
    """What ``prefect.flow_engine`` sees as its ``multiprocessing`` module: the "spawn"
    context it asks for is the forkserver; everything else is the real module."""

    def __init__(self, ctx: multiprocessing.context.BaseContext) -> None:
        self._ctx = ctx

    def get_context(self, method: str | None = None) -> Any:
        if method == "spawn":
            return self._ctx
        return multiprocessing.get_context(method)

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)


def install(preload: Sequence[str] = PRELOAD) -> int:
    """Make the runner's flow runs forks of a warm forkserver; start it now (before the
    first trigger waits for it). Returns the forkserver's pid."""
    import prefect.flow_engine as flow_engine

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    multiprocessing.forkserver.ensure_running()
    flow_engine.multiprocessing = _WarmMultiprocessing(ctx)  # type: ignore[attr-defined,assignment]
    return forkserver_pid()


def installed() -> bool:
    import prefect.flow_engine as flow_engine

    mp: ModuleType | _WarmMultiprocessing = flow_engine.multiprocessing  # type: ignore[attr-defined]
    return isinstance(mp, _WarmMultiprocessing)


def helper_pids() -> set[int]:
    """multiprocessing's own helpers among our children: the resource tracker, started
    with the forkserver. It ignores SIGTERM by design and ends by itself when its last
    user (this process) exits: ending our children at exit must not wait a grace period
    on it and then SIGKILL it."""
    import multiprocessing.resource_tracker as resource_tracker

    tracker = getattr(resource_tracker, "_resource_tracker", None)
    pid = getattr(tracker, "_pid", None)
    return {pid} if isinstance(pid, int) else set()


def forkserver_pid() -> int:
    pid = multiprocessing.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    if not isinstance(pid, int):
        raise RuntimeError("the forkserver is not running")
    return pid
