"""``memdump copy DUMP... --to DIR``: copy recorded dumps out for an examiner with their
manifest, signature, timestamp token and custody log, the copy logged as ``copied``
(memdump.export); one JSON line per dump, exit 0 when every one was copied, 1 otherwise.

``memdump custody DUMP``: print a dump's custody log (memdump.custody) and check it: the
hash chain, each entry's signature by a trusted key (MEMDUMP_TRUSTED_KEYS), entry 0
against the manifest, the local and S3 copies against each other, and the log against
the dump's record (when the record store has one). Exit 0: intact; 1: broken (each
problem names its entry); 2: an error (nothing to read)."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memdump.errors import MemdumpError

if TYPE_CHECKING:
    from memdump.cli.app import Subcommands
    from memdump.export import Copied
    from memdump.settings import Settings


def _record(settings: Settings, where: str) -> dict[str, Any] | None:
    """The dump's record, if the store has one (the log is checked without otherwise)."""
    from memdump.records import open_store
    from memdump.records.base import RecordQuery

    try:
        rows = open_store(settings).list(2, 0, RecordQuery(dump_path=where))
    except MemdumpError as exc:
        print(f"memdump: record store not read ({exc}): log checked without it", file=sys.stderr)
        return None
    return dict(rows[0]) if rows else None


def cmd_custody(settings: Settings, args: argparse.Namespace) -> int:
    from memdump import custody
    from memdump.locations import Location
    from memdump.signing import trusted_keys
    from memdump.stored import S3Dump, open_stored

    where = str(args.dump)
    trusted = trusted_keys(settings)
    copies: dict[str, list[bytes]] = {}
    manifest: bytes | None
    if where.startswith("s3://"):
        stored = open_stored(Location.of(where), settings)
        assert isinstance(stored, S3Dump)  # noqa: S101 - an s3:// location
        copies["S3"] = custody.S3Log(stored.store, custody.log_prefix(stored.key)).read()
        manifest = stored.manifest(1 << 20)
    else:
        dump = Path(where)
        path = custody.log_path(dump)
        if path.is_file():
            copies["local"] = custody.LocalLog(path).read()
        from memdump.manifest import manifest_path

        mpath = manifest_path(dump)
        manifest = mpath.read_bytes() if mpath.is_file() else None
    if not any(copies.values()):
        print(f"memdump: no custody log for {where}", file=sys.stderr)
        return 2
    genesis = hashlib.sha256(manifest).hexdigest() if manifest is not None else None
    row = None if args.no_record else _record(settings, where)
    result = custody.check_copies(copies, trusted, genesis, row)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for e in result["entries_list"]:
            by = e.get("by") or {}
            details = json.dumps(e.get("details"), sort_keys=True, ensure_ascii=False)
            print(
                f"{e.get('index')!s:>4} {e.get('at')} {e.get('event'):<10}"
                f" by {by.get('collector_id')} [{str(by.get('key_fingerprint'))[:16]}] {details}"
            )
        status = result["status"]
        print(
            f"# {status}: {result['entries']} entries"
            + (f", head {result['head']}" if result["head"] else "")
            + ("" if genesis else "; no manifest to check entry 0 against")
            + ("" if row else "; no record to check the end against")
        )
        for p in result["problems"]:
            where_ = "log" if p["index"] is None else f"entry {p['index']}"
            print(f"BROKEN {where_}: {p['kind']}: {p['detail']}")
    return 0 if result["status"] == "intact" else 1


def cmd_copy(settings: Settings, args: argparse.Namespace) -> int:
    from memdump.cli.batch import each_record
    from memdump.export import copy_dump

    def act(row: Mapping[str, Any]) -> Copied:
        return copy_dump(row, settings, Path(args.to), case=args.case)

    # A dump that cannot be copied (gone, altered, out of bounds, already there) is that
    # dump's failure; the others are still copied.
    return each_record(settings, args.dump_paths, "copied", act, (MemdumpError, OSError))


def register(sub: Subcommands) -> None:
    p = sub.add_parser(
        "custody",
        help="print a dump's custody log and check its chain (0 intact, 1 broken, 2 error)",
    )
    p.add_argument("dump", help="a .mem.gz path, or its s3:// URI in the configured bucket")
    p.add_argument("--json", action="store_true", help="the check as JSON")
    p.add_argument("--no-record", action="store_true", help="do not look the dump's record up")
    p.set_defaults(handler=cmd_custody)
    p = sub.add_parser(
        "copy",
        help="copy recorded dumps (with manifest, signature, timestamp, custody log) into a"
        " directory for an examiner; the copy is logged in each dump's custody log",
    )
    p.add_argument("dump_paths", nargs="+", help="dump_path of a record (local or s3://)")
    p.add_argument("--to", required=True, help="the directory (made 0700 if missing)")
    p.add_argument("--case", help="a case or ticket reference, written into the log entry")
    p.set_defaults(handler=cmd_copy)
