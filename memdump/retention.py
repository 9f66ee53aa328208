"""Retention: delete dumps older than N days or beyond the last K per VM, keep their
records (marked ``deleted_at``), and say what was freed and how much is still stored.

Selection is a pure function of the records and a clock, so it is tested on a fake clock;
deletion removes the dump and its manifest (local files or S3 objects) and then marks
the record. A dump already gone is marked too: retention's job is done for it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from memdump.manifest import manifest_key, manifest_path
from memdump.records.base import RecordStore
from memdump.settings import Settings

log = logging.getLogger("memdump.retention")
PAGE = 1000


def _when(row: Mapping[str, Any]) -> datetime:
    return datetime.fromisoformat(str(row["timestamp"])).replace(tzinfo=UTC)


def select(
    rows: Iterable[Mapping[str, Any]],
    now: datetime,
    *,
    days: float | None,
    keep_last: int | None,
) -> list[Mapping[str, Any]]:
    """Records whose dump is due for deletion (not yet deleted): older than ``days``, or
    not among the ``keep_last`` newest kept dumps of their VM. Newest first."""
    live = sorted((r for r in rows if not r.get("deleted_at")), key=_when, reverse=True)
    cutoff = None if days is None else now - timedelta(days=days)
    seen: dict[str, int] = {}
    due = []
    for r in live:
        n = seen[str(r["vmid"])] = seen.get(str(r["vmid"]), 0) + 1
        if (cutoff is not None and _when(r) < cutoff) or (keep_last is not None and n > keep_last):
            due.append(r)
    return due


@dataclass
class Report:
    deleted: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    stored_bytes: int = 0
    warn_bytes: int = 0

    @property
    def over_threshold(self) -> bool:
        return self.stored_bytes > self.warn_bytes


def _delete_artifacts(row: Mapping[str, Any], settings: Settings) -> int:
    """Delete the dump and its manifest; returns the dump bytes freed (0 if gone)."""
    where = str(row["dump_path"])
    size = int(row.get("gzip_size_bytes") or 0)
    if where.startswith("s3://"):
        if settings.s3 is None:
            raise ValueError(f"{where}: S3 is not configured")
        from memdump.storage import S3Store

        store = S3Store(settings.s3)
        key = where.removeprefix(f"s3://{store.bucket}/")
        existed = store.exists(key)
        store.delete(key)
        store.delete(manifest_key(key))
        return size if existed else 0
    path = Path(where)
    existed = path.exists()
    path.unlink(missing_ok=True)
    manifest_path(path).unlink(missing_ok=True)
    return size if existed else 0


def apply(
    settings: Settings,
    store: RecordStore,
    now: datetime | None = None,
    *,
    days: float | None = None,
    keep_last: int | None = None,
) -> Report:
    """Run retention over every record (``days``/``keep_last`` default to the settings)."""
    now = now or datetime.now(UTC)
    days = settings.retention_days if days is None else days
    keep_last = settings.retention_keep_last if keep_last is None else keep_last
    report = Report(warn_bytes=settings.storage_warn_bytes)
    if days is not None or keep_last is not None:
        rows: list[dict[str, Any]] = []
        while page := store.list(PAGE, len(rows)):
            rows.extend(page)
        for row in select(rows, now, days=days, keep_last=keep_last):
            where = str(row["dump_path"])
            try:
                report.freed_bytes += _delete_artifacts(row, settings)
                store.mark_deleted(dict(row), now)
            except Exception as exc:  # one dump's trouble must not stop the others
                report.errors[where] = f"{type(exc).__name__}: {exc}"
                log.warning("retention: could not delete %s: %s", where, exc)
                continue
            report.deleted.append(where)
    report.stored_bytes = store.stats().total_size_bytes
    return report


def describe(report: Report) -> str:
    gib = 1 << 30
    lines = [
        f"Deleted {len(report.deleted)} dump(s), freed {report.freed_bytes / gib:.2f} GiB;"
        f" still stored: {report.stored_bytes / gib:.2f} GiB"
        f" (warning above {report.warn_bytes / gib:.0f} GiB)."
    ]
    if report.over_threshold:
        lines.append("**WARNING: stored dumps exceed the storage threshold.**")
    lines += [f"- deleted `{p}`" for p in report.deleted]
    lines += [f"- **not deleted** `{p}`: {e}" for p, e in report.errors.items()]
    return "\n".join(lines)
