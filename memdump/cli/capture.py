"""``memdump capture VM...``: capture VMs now, into MEMDUMP_DUMP_DIR (no server needed):
the same chain as a trigger's (memdump.chain: file, manifest, S3 offload when
configured, record through the outbox)."""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor

from memdump.cli.inventory import open_drivers
from memdump.errors import MemdumpError
from memdump.escaping import plain_text
from memdump.hypervisors import Driver, VMRef
from memdump.runinfo import ALL, unlisted_id
from memdump.settings import Settings
from memdump.targets import find, list_each

Failure = tuple[str, MemdumpError]  # the id as given, why it cannot be captured


def _targets(
    settings: Settings, vm_ids: list[str]
) -> tuple[list[Driver], list[tuple[Driver, VMRef]], list[Failure]]:
    """The inventory's drivers, the VMs ``vm_ids`` name (duplicates once), and the ids
    that name none."""
    drivers = open_drivers(settings)
    failures: list[Failure] = []
    targets: list[tuple[Driver, VMRef]] = []
    for vm_id in dict.fromkeys(vm_ids):  # duplicates are captured once
        try:
            if vm_id == ALL:  # each hypervisor on its own: one failing fails its VMs only
                for d, listing in zip(drivers, list_each(drivers), strict=True):
                    if listing.error is not None:
                        failures.append((unlisted_id(listing.hypervisor), listing.error))
                    targets.extend((d, ref) for ref in listing.vms)
            else:
                targets.append(find(drivers, vm_id))
        except MemdumpError as exc:
            failures.append((vm_id, exc))
    return drivers, list(dict.fromkeys(targets)), failures


def cmd_capture(settings: Settings, args: argparse.Namespace) -> int:
    # The hypervisors are reached (SSH, a lookup per id) on a thread while the capture
    # chain's modules import: the remote side's time (a session, info.sh: 0.2-0.3 s on
    # the lab) and the imports overlap instead of adding up before the first dump.
    with ThreadPoolExecutor(1, thread_name_prefix="memdump-targets") as pool:
        found = pool.submit(_targets, settings, list(args.vm_ids))
        from memdump.chain import run_chain

        drivers, targets, failures = found.result()
    failed = 0

    def report_failure(vm_id: str, exc: MemdumpError) -> None:
        nonlocal failed
        failed += 1
        print(json.dumps({"vm_id": vm_id, **exc.to_dict()}, default=str), file=sys.stderr)

    for vm_id, exc in failures:
        report_failure(vm_id, exc)
    for driver, ref in targets:
        try:
            # The whole chain, as a trigger's: file, manifest, offload, record (outbox).
            done = run_chain(driver, ref, settings, trigger={"source": "cli"}, mode=args.mode)
        except MemdumpError as exc:
            report_failure(ref.vmid, exc)
            continue
        if done.capture.fallback_reason:  # also in the record's live_fallback_reason
            why = plain_text(done.capture.fallback_reason)
            print(
                f"memdump: {plain_text(ref.vmid)}: captured paused, not live: {why}",
                file=sys.stderr,
            )
        if done.outbox is not None:  # the capture is complete; its record waits
            print(
                f"memdump: {plain_text(ref.vmid)}: record store unavailable, record kept in"
                f" the outbox (depth {done.outbox.depth})",
                file=sys.stderr,
            )
        if done.timestamp is not None and done.timestamp.status != "granted":
            # Complete all the same: the token comes later (memdump timestamps flush).
            print(
                f"memdump: {plain_text(ref.vmid)}: trusted timestamp {done.timestamp.status}:"
                f" {plain_text(done.timestamp.detail)}",
                file=sys.stderr,
            )
        print(json.dumps(done.record.full_dict()), flush=True)
    for d in drivers:
        d.close()
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("capture", help="capture VMs now, into MEMDUMP_DUMP_DIR")
    p.add_argument("vm_ids", nargs="+", help='VM ids (domain name, id or UUID), or "all"')
    p.add_argument(
        "--mode",
        choices=("paused", "live"),
        default=None,
        help="paused: the guest is stopped for the whole dump; live: a point-in-time image"
        " while it runs (falls back to paused, with the reason, where live cannot run)."
        " Default: the hypervisor's capture_mode, else MEMDUMP_CAPTURE_MODE",
    )
    p.set_defaults(handler=cmd_capture)
