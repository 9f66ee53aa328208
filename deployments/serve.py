"""Serve the capture deployments (on-demand for the API, weekly cron) from one process.

``python -m deployments.serve [--reset-slots]``; ``memdump serve`` runs it for you.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

import httpx
from prefect import serve
from prefect.exceptions import TerminationSignal
from prefect.runner import Runner

from deployments import warm
from deployments.catalog import deployment_specs, runner_deployments, runner_options
from deployments.wake import Doorbell, wake_path
from memdump import timestamping
from memdump.children import become_subreaper, end_adopted
from memdump.errors import ConfigError
from memdump.fsperm import private_umask
from memdump.leftovers import clean_leftovers
from memdump.records import open_recorder
from memdump.settings import Settings
from memdump.targets import require_hypervisors
from tasks.limits import ensure_limits

ORPHAN_GRACE_SEC = 10.0  # SIGTERM -> SIGKILL for flow runs left at exit
# How long the runner waits for Prefect's API at its start (memdump serve starts both).
PREFECT_START_SEC = 120.0


def replay_outbox(settings: Settings) -> None:
    """Records kept while the store was down go in on start and then periodically."""
    log = logging.getLogger("memdump.outbox")
    recorder = open_recorder(settings)
    while True:
        try:
            left = recorder.replay()
            if left:
                log.warning("outbox: %d record(s) still waiting: %s", left, recorder.last_error)
        except Exception:  # keep the runner alive; the next round retries
            log.exception("outbox replay failed")
        try:
            # RFC 3161 tokens the TSA did not give at capture time (memdump.timestamping).
            stamps = timestamping.flush(settings)
            if stamps.left:
                log.warning("timestamps: %d still pending: %s", stamps.left, stamps.last_error)
        except Exception:
            log.exception("pending timestamps: flush failed")
        time.sleep(settings.orchestration.outbox_replay_sec)


def exit_with_parent(parent: int) -> None:
    """End this runner and its flow runs once ``parent`` (memdump serve) is gone.

    memdump serve's death, even by SIGKILL, sends this process SIGTERM (PDEATHSIG), but
    Prefect's graceful stop needs the Prefect server, which is being stopped the same
    way: it was seen hanging past a minute. So the runner does not wait for it: its flow
    runs get SIGTERM (their process groups), SIGKILL after ORPHAN_GRACE_SEC, and it
    exits. A capture killed so is cleaned on the next start (memdump.leftovers).
    """
    while os.getppid() == parent:
        time.sleep(0.5)
    logging.getLogger("memdump.runner").warning("memdump serve is gone: stopping")
    end_flow_runs()
    os._exit(1)


def serve_warm(settings: Settings) -> None:
    """``prefect.serve`` of the catalog's deployments, with warm flow runs
    (deployments.warm). Served as flows (``Runner.add_flow``), not as deployments, so that
    Prefect's runner runs each flow run through ``run_flow_in_subprocess`` (the one it
    makes a fork) instead of a ``python -m prefect.engine`` command."""
    # Flow runs are the forkserver's children: as a subreaper this runner adopts any the
    # forkserver leaves behind, so that its ends (main's, exit_with_parent's) find them.
    become_subreaper()
    warm.install()
    runner = Runner(
        pause_on_shutdown=True, limit=None, query_seconds=settings.orchestration.runner_poll_sec
    )
    for spec in deployment_specs(settings):
        runner.add_flow(spec.flow(), **runner_options(spec))
    try:
        asyncio.run(run_with_doorbell(runner, wake_path(settings.data_dir)))
    except (KeyboardInterrupt, TerminationSignal) as exc:
        logging.getLogger("memdump.runner").info("%s: stopping", type(exc).__name__)


async def run_with_doorbell(runner: Runner, path: Path) -> None:
    """``runner.start()``, and on each ring of the doorbell at ``path``
    (deployments.wake: the API rings once it created a trigger's flow run) one look for
    scheduled runs, as the runner's own poll makes. Without the socket (a path too long,
    something else there) the poll alone starts them."""
    log = logging.getLogger("memdump.runner")
    try:
        bell: Doorbell | None = Doorbell(path)
    except OSError as exc:
        log.warning("no doorbell, flow runs start at the runner's poll: %s", exc)
        bell = None

    async def look() -> None:
        if runner.started and not runner.stopping:
            await runner._get_and_submit_flow_runs()  # type: ignore[no-untyped-call]

    answering = asyncio.create_task(bell.answer(look)) if bell is not None else None
    try:
        await runner.start()
    finally:
        if answering is not None:
            answering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answering
        if bell is not None:
            bell.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--reset-slots",
        action="store_true",
        help="free concurrency slots leaked by a Prefect server restart",
    )
    parser.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="stop (and end the flow runs) when the parent process dies (memdump serve)",
    )
    args = parser.parse_args()
    private_umask()  # records, outbox, dumps: 0600 in 0700 dirs
    if args.exit_with_parent:
        threading.Thread(
            target=exit_with_parent, args=(os.getppid(),), name="parent", daemon=True
        ).start()
    settings = Settings()
    try:
        require_hypervisors(settings, "the runner refuses to start without one")
    except ConfigError as exc:
        sys.exit(f"deployments.serve: {exc}")
    # What a worker killed mid-dump left (a .part, a FIFO on the hypervisor) goes first.
    clean_leftovers(settings, settings.orchestration.cleanup_min_age_sec)
    wait_for_prefect()
    ensure_limits(settings, reset_slots=args.reset_slots)
    threading.Thread(target=replay_outbox, args=(settings,), name="outbox", daemon=True).start()
    try:
        if settings.orchestration.warm_flow_runs:
            serve_warm(settings)
        else:
            serve(
                *runner_deployments(settings),
                query_seconds=settings.orchestration.runner_poll_sec,
                limit=None,
            )
    finally:
        # Flow runs Prefect could not cancel on the way out (it reads each run from the
        # server first: with the server gone too, as when `memdump serve` is SIGKILLed
        # and all its children get SIGTERM at once, it skips them) end with us.
        end_flow_runs()


def wait_for_prefect(timeout: float = PREFECT_START_SEC) -> None:
    """Return once Prefect's API answers its health check. `memdump serve` starts this
    runner beside its own Prefect server, not after it, so that the runner's imports and
    its clean-up above (SSH, no Prefect) overlap the server's start-up; nothing here asks
    Prefect anything before this. Raises after ``timeout`` seconds."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return  # no server configured: Prefect's client starts its own (tests, by hand)
    headers = {}
    if auth := PREFECT_API_AUTH_STRING.value():
        headers["Authorization"] = "Basic " + base64.b64encode(str(auth).encode()).decode()
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0, headers=headers) as http:
        while True:
            try:
                if http.get(str(url).rstrip("/") + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ConfigError(f"Prefect's API at {url} not ready after {timeout:.0f} s")
            time.sleep(0.2)


def end_flow_runs() -> list[int]:
    """End what is left of our children at exit (SIGTERM, SIGKILL after
    ORPHAN_GRACE_SEC); multiprocessing's resource tracker ends by itself once we exit.
    Returns the pids ended."""
    return end_adopted(warm.helper_pids(), ORPHAN_GRACE_SEC)


if __name__ == "__main__":
    main()
