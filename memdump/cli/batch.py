"""Commands that act on recorded dumps one by one (``memdump countersign``, ``memdump
copy``): each ``dump_path`` looked up in the record store (read-only), acted on, and one
JSON line printed for it; exit 1 unless every one was done."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memdump.settings import Settings


def each_record(
    settings: Settings,
    dump_paths: Iterable[str],
    done: str,
    act: Callable[[Mapping[str, Any]], Any],
    refused: tuple[type[Exception], ...],
) -> int:
    """``act(record)`` for each path's record (a dataclass, printed with ``{done: true}``);
    a path without a record, or whose ``act`` raised one of ``refused``, prints
    ``{done: false, "detail": why}`` (any other error ends the command)."""
    from memdump.records import open_reader
    from memdump.records.base import RecordQuery

    store = open_reader(settings)
    failures: tuple[type[Exception], ...] = (LookupError, *refused)
    bad = 0
    for path in dump_paths:
        found = store.list(1, 0, RecordQuery(dump_path=path))
        try:
            if not found:
                raise LookupError("no record")
            result = act(found[0])
        except failures as exc:
            print(json.dumps({"dump_path": path, done: False, "detail": str(exc)}), flush=True)
            bad += 1
            continue
        print(json.dumps({done: True, **dataclasses.asdict(result)}), flush=True)
    sys.stdout.flush()
    return 1 if bad else 0
