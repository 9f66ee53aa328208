"""``memdump`` command line: capture VMs of the inventory directly (no server needed)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from memdump.capture import capture
from memdump.errors import MemdumpError
from memdump.hypervisors import Driver, VMRef, open_driver
from memdump.settings import Settings
from memdump.targets import ALL, find, list_all


def _drivers(settings: Settings) -> list[Driver]:
    return [open_driver(hv, settings.ssh) for hv in settings.inventory]


def cmd_vms(settings: Settings, _args: argparse.Namespace) -> int:
    for ref in list_all(_drivers(settings)):
        print(f"{ref.hypervisor}\t{ref.vmid}\t{ref.name}")
    return 0


def cmd_capture(settings: Settings, args: argparse.Namespace) -> int:
    drivers = _drivers(settings)
    failed = 0

    def report_failure(vm_id: str, exc: MemdumpError) -> None:
        nonlocal failed
        failed += 1
        print(json.dumps({"vm_id": vm_id, **exc.to_dict()}, default=str), file=sys.stderr)

    targets: list[tuple[Driver, VMRef]] = []
    for vm_id in dict.fromkeys(args.vm_ids):  # duplicates are captured once
        try:
            if vm_id == ALL:
                targets.extend((d, ref) for d in drivers for ref in d.list_vms())
            else:
                targets.append(find(drivers, vm_id))
        except MemdumpError as exc:
            report_failure(vm_id, exc)
    for driver, ref in dict.fromkeys(targets):
        try:
            result = capture(driver, ref, settings)
        except MemdumpError as exc:
            report_failure(ref.vmid, exc)
            continue
        print(json.dumps(result.record.full_dict()), flush=True)
    for d in drivers:
        d.close()
    return 1 if failed else 0


def cmd_clean(settings: Settings, args: argparse.Namespace) -> int:
    from memdump.leftovers import clean_leftovers

    out = clean_leftovers(settings, args.min_age)
    for path in out.local:
        print(f"removed\tlocal\t{path}")
    for hv, dirs in out.remote.items():
        for d in dirs:
            print(f"removed\t{hv}\t{d}")
    for hv, err in out.errors.items():
        print(f"memdump: {hv}: {err}", file=sys.stderr)
    return 1 if out.errors else 0


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    """Verify recorded dumps: one per path given, or all since ``--since-days``. One JSON
    line each; exit 1 unless every one is verified."""
    from datetime import UTC, datetime, timedelta

    from memdump.records import open_store
    from memdump.records.base import RecordQuery
    from memdump.verify import verify

    store = open_store(settings)
    rows: list[dict[str, object]] = []
    for path in args.dump_paths:
        found = store.list(1, 0, RecordQuery(dump_path=path))
        if not found:
            print(json.dumps({"status": "unknown", "dump_path": path, "detail": "no record"}))
            rows.append({})
        rows.extend(found)
    if args.since_days is not None:
        since = datetime.now(UTC) - timedelta(days=args.since_days)
        offset = 0
        while page := store.list(1000, offset, RecordQuery(since=since)):
            rows.extend(page)
            offset += len(page)
    bad = sum(1 for r in rows if not r)
    for row in (r for r in rows if r):
        v = verify(row, settings)
        bad += v.status != "verified"
        print(json.dumps(v.to_dict()), flush=True)
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memdump", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run Prefect server + runner + API (embedded defaults)")
    sub.add_parser("vms", help="list running VMs of every hypervisor in the inventory")
    p = sub.add_parser("capture", help="capture VMs now, into MEMDUMP_DUMP_DIR")
    p.add_argument("vm_ids", nargs="+", help='VM ids (domain name, id or UUID), or "all"')
    p = sub.add_parser(
        "clean", help="remove .part files and hypervisor temp dirs left by killed captures"
    )
    p.add_argument(
        "--min-age",
        type=float,
        default=None,
        help="seconds (default MEMDUMP_CLEANUP_MIN_AGE_SEC); younger leftovers are kept",
    )
    p = sub.add_parser("verify", help="re-read recorded dumps and check hashes and manifests")
    p.add_argument("dump_paths", nargs="*", help="dump_path of a record (local or s3://)")
    p.add_argument("--since-days", type=float, help="every record of the last N days")
    args = parser.parse_args(argv)
    if args.command == "verify" and not args.dump_paths and args.since_days is None:
        parser.error("verify: give dump paths or --since-days")
    try:
        settings = Settings()
        if args.command == "serve":
            from memdump.serve import serve

            return serve(settings)
        if args.command == "clean" and args.min_age is None:
            args.min_age = settings.cleanup_min_age_sec
        handler = {
            "vms": cmd_vms,
            "capture": cmd_capture,
            "clean": cmd_clean,
            "verify": cmd_verify,
        }[args.command]
        return handler(settings, args)
    except MemdumpError as exc:
        print(f"memdump: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
