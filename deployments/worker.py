"""Production: one collector's Prefect worker for the pool ``deployments.pool`` filled.

``python -m deployments.worker [--pool memdump] [--name NAME] [--limit N]``: first what a
capture killed on this collector left (memdump.leftovers), the concurrency limits and the
automation that marks runs of a dead collector Crashed (tasks/automations.py), then the
worker as a child process (deployments.warm_worker: Prefect's process worker whose flow
runs are forked warm; ``prefect worker start`` with
MEMDUMP_ORCHESTRATION__WARM_FLOW_RUNS=false), with this process replaying the record
outbox meanwhile. SIGTERM or
SIGINT stop the worker (it lets its flow runs finish as Prefect's worker does).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
from collections.abc import Mapping
from types import FrameType

from deployments.catalog import POOL
from deployments.serve import replay_outbox
from memdump.children import popen_dying_with_parent
from memdump.errors import ConfigError
from memdump.fsperm import private_umask
from memdump.leftovers import clean_leftovers
from memdump.settings import Settings
from memdump.targets import require_hypervisors
from tasks.automations import ensure_crash_automation, ensure_pending_automation
from tasks.limits import ensure_limits


def prefect_environ(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """What this process sets for the worker it starts and the flow runs that inherit it.
    The flow runs' heartbeats every heartbeat_sec feed the crash automation. The worker
    asks for due flow runs every runner_poll_sec, as `memdump serve`'s runner does,
    unless PREFECT_WORKER_QUERY_SECONDS says otherwise: at Prefect's default, 10 s, a
    fan-out trigger waited for a poll twice, for its own run and then for its parts."""
    orch = settings.orchestration
    out = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(orch.heartbeat_sec)}
    if not environ.get("PREFECT_WORKER_QUERY_SECONDS"):
        out["PREFECT_WORKER_QUERY_SECONDS"] = str(orch.runner_poll_sec)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", default=POOL)
    parser.add_argument("--name", default=None, help="worker name (default: Prefect's)")
    parser.add_argument("--limit", type=int, default=None, help="flow runs at once")
    args = parser.parse_args()
    private_umask()  # records, outbox, dumps: 0600 in 0700 dirs (flow runs inherit it)
    settings = Settings()
    try:
        require_hypervisors(settings, "the worker refuses to start without one")
    except ConfigError as exc:
        print(f"deployments.worker: {exc}", file=sys.stderr)
        return 2
    clean_leftovers(settings, settings.orchestration.cleanup_min_age_sec)
    ensure_limits(settings)
    ensure_crash_automation(settings.orchestration.heartbeat_sec)
    ensure_pending_automation(settings.orchestration.heartbeat_sec, args.pool)
    os.environ.update(prefect_environ(settings, os.environ))
    threading.Thread(target=replay_outbox, args=(settings,), name="outbox", daemon=True).start()
    if settings.orchestration.warm_flow_runs:  # Prefect's worker, its flow runs forked warm
        argv = [sys.executable, "-m", "deployments.warm_worker", "--pool", args.pool]
    else:
        prefect = shutil.which("prefect", path=os.path.dirname(sys.executable)) or "prefect"
        argv = [prefect, "worker", "start", "--pool", args.pool, "--type", "process"]
    if args.name:
        argv += ["--name", args.name]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    # SIGTERM to `prefect worker` if this process is SIGKILLed (memdump.children).
    worker = popen_dying_with_parent(argv)

    def forward(signum: int, _frame: FrameType | None) -> None:
        worker.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return worker.wait()


if __name__ == "__main__":
    sys.exit(main())
