"""``memdump clean`` and ``memdump verify``: what killed captures left, and whether
recorded dumps still match their records (no server needed)."""

from __future__ import annotations

import argparse
import json
import sys

from memdump.settings import Settings


def cmd_clean(settings: Settings, args: argparse.Namespace) -> int:
    from memdump.leftovers import clean_leftovers

    min_age = settings.orchestration.cleanup_min_age_sec if args.min_age is None else args.min_age
    out = clean_leftovers(settings, min_age)
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


def _verify_needs_a_target(args: argparse.Namespace) -> str | None:
    if not args.dump_paths and args.since_days is None:
        return "verify: give dump paths or --since-days"
    return None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "clean", help="remove .part files and hypervisor temp dirs left by killed captures"
    )
    p.add_argument(
        "--min-age",
        type=float,
        default=None,
        help="seconds (default MEMDUMP_ORCHESTRATION__CLEANUP_MIN_AGE_SEC); "
        "younger leftovers are kept",
    )
    p.set_defaults(handler=cmd_clean)
    p = sub.add_parser("verify", help="re-read recorded dumps and check hashes and manifests")
    p.add_argument("dump_paths", nargs="*", help="dump_path of a record (local or s3://)")
    p.add_argument("--since-days", type=float, help="every record of the last N days")
    p.set_defaults(handler=cmd_verify, check=_verify_needs_a_target)
