"""``memdump clean``, ``memdump verify`` and ``memdump diff``: what killed captures left,
whether recorded dumps still match their records (whole, or one guest-physical range of a
chunked dump), and what changed between two chunked dumps (no server needed)."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from memdump.errors import StorageError

if TYPE_CHECKING:
    from memdump.settings import Settings
    from memdump.stored import StoredDump


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
    guest_range = parse_range(args.range) if args.range else None
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
        v = verify(row, settings, guest_range=guest_range, by="cli")
        bad += v.status != "verified"
        print(json.dumps(v.to_dict()), flush=True)
    return 1 if bad else 0


def _verify_needs_a_target(args: argparse.Namespace) -> str | None:
    if not args.dump_paths and args.since_days is None:
        return "verify: give dump paths or --since-days"
    if args.range is not None:
        if args.since_days is not None or not args.dump_paths:
            return "verify: --range takes dump paths, not --since-days"
        try:
            parse_range(args.range)
        except ValueError as exc:
            return f"verify: --range: {exc}"
    return None


def parse_range(text: str) -> tuple[int, int]:
    """``START:END``, guest-physical, END exclusive; each hex (0x...) or decimal."""
    start_text, sep, end_text = text.partition(":")
    if not sep:
        raise ValueError(f"{text!r} is not START:END")
    try:
        start, end = int(start_text.strip(), 0), int(end_text.strip(), 0)
    except ValueError:
        raise ValueError(f"{text!r}: START and END are hex (0x...) or decimal") from None
    if not 0 <= start < end:
        raise ValueError(f"{text!r}: START must be below END")
    return start, end


def cmd_diff(args: argparse.Namespace) -> int:
    """The guest-physical ranges that differ between two chunked dumps, from their
    indexes: 0 if none differ, 1 if some do (as diff(1)); errors exit 2. The settings
    are read only for an s3:// dump (two local files need none)."""
    from memdump.changes import diff

    @functools.cache
    def settings() -> Settings:
        from memdump.settings import Settings

        return Settings()

    result = diff(_dump_arg(args.dump_a, settings), _dump_arg(args.dump_b, settings))
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        d = result.to_dict()
        print(
            f"# {d['chunks_changed']} of {d['chunk_count']} chunks of {d['chunk_size']} bytes"
            f" changed: {d['changed_guest_bytes']} bytes of guest memory in"
            f" {len(d['ranges'])} ranges (start end bytes, end exclusive)"
        )
        for start, end in result.ranges:
            print(f"{start:#014x} {end:#014x} {end - start}")
        for start, end in result.outside:
            print(
                f"# raw bytes {start:#x}-{end:#x} changed outside guest memory (ELF headers/notes)"
            )
    return 1 if result.changed else 0


def _dump_arg(where: str, settings: Callable[[], Settings]) -> StoredDump:
    """A dump named on the command line: an s3:// URI (confined to the configured bucket
    and prefix), or a local file the operator names (any path: it is only read).
    ``settings`` is called for an s3:// URI only."""
    from memdump.locations import Location
    from memdump.stored import LocalDump, open_stored

    if where.startswith("s3://"):
        return open_stored(Location.of(where), settings())
    path = Path(where)
    if not path.is_file():
        raise StorageError(f"no such dump file: {where}", path=where)
    return LocalDump(Location.of(str(path.resolve())), path)


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
    p.add_argument(
        "--range",
        metavar="START:END",
        help="check only the chunks holding guest-physical [START, END) (hex 0x... or decimal;"
        " chunked dumps), against the index and its Merkle root",
    )
    p.set_defaults(handler=cmd_verify, check=_verify_needs_a_target)
    p = sub.add_parser(
        "diff",
        help="guest-physical ranges that differ between two chunked dumps (from their indexes)",
    )
    p.add_argument("dump_a", help="a .mem.gz file, or an s3:// URI in the configured bucket")
    p.add_argument("dump_b", help="the dump to compare with it (same VM, same layout)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of lines")
    p.set_defaults(run=cmd_diff)
