"""Retention: delete dumps older than N days or beyond the last K per VM, keep their
records (marked ``deleted_at``), and say what was freed and how much is still stored.

Selection is a pure function of the records and a clock, so it is tested on a fake clock.
A VM is its hypervisor and its vmid: Proxmox vmid 100 exists on every standalone node,
and one node's newer dumps must not push out another's.

A dump may live in several places (memdump.locations): a local copy on the collector
that wrote it and an S3 object. Each copy is deleted where it lives, with its manifest;
a local copy held by another collector is left for that collector's retention run, and
the record is marked ``deleted_at`` only when every copy is gone (each copy's deletion
is marked on its own, so the other collector finishes the job). Every location is
confined to the dump directory or the S3 prefix before anything is deleted: a record
pointing elsewhere is refused, reported as an error, and nothing of it is deleted.

The bounds on ``days`` and ``keep_last`` are the settings' (memdump.settings), checked
here again for values that come from elsewhere (the flow's parameters): ``keep_last=0``
or ``days<=0`` would delete every dump. A dry run plans the same and deletes nothing.

An S3 copy under Object Lock (memdump's own MEMDUMP_S3__OBJECT_LOCK_MODE, a bucket's
default retention or a legal hold: S3 is asked, not the record) is not deleted before its
retain-until date: the run says until when (``locked``), keeps the record's S3 location
unmarked, and a later run deletes it once the lock has expired. That is not an error (the
lock outliving retention's period is a choice); a delete S3 still refuses for a lock is
reported the same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from memdump.errors import ConfigError, LocationError, MemdumpError, ObjectLockedError
from memdump.escaping import md_text
from memdump.locations import record_locations
from memdump.records.base import RecordStore
from memdump.settings import RETENTION_DAYS_ABOVE, RETENTION_KEEP_LAST_MIN, Settings
from memdump.stored import StoredDump, open_stored

log = logging.getLogger("memdump.retention")
PAGE = 1000


def check_bounds(days: float | None, keep_last: int | None) -> None:
    """The settings' bounds, for values given another way (the flow's parameters)."""
    if days is not None and (
        isinstance(days, bool)
        or not isinstance(days, int | float)
        or not math.isfinite(days)
        or days <= RETENTION_DAYS_ABOVE
    ):
        raise ConfigError(
            f"retention days must be a finite number above {RETENTION_DAYS_ABOVE:g}, "
            f"got {days!r} (it would delete every dump)",
            parameter="days",
            value=repr(days)[:80],
        )
    if keep_last is not None and (
        isinstance(keep_last, bool)
        or not isinstance(keep_last, int)
        or keep_last < RETENTION_KEEP_LAST_MIN
    ):
        raise ConfigError(
            f"retention keep_last must be an integer of at least {RETENTION_KEEP_LAST_MIN}, "
            f"got {keep_last!r} (it would delete every dump)",
            parameter="keep_last",
            value=repr(keep_last)[:80],
        )


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
    not among the ``keep_last`` newest kept dumps of their VM (hypervisor + vmid).
    Newest first."""
    live = sorted((r for r in rows if not r.get("deleted_at")), key=_when, reverse=True)
    cutoff = None if days is None else now - timedelta(days=days)
    seen: dict[tuple[str, str], int] = {}
    due = []
    for r in live:
        vm = (str(r.get("hypervisor") or ""), str(r["vmid"]))
        n = seen[vm] = seen.get(vm, 0) + 1
        if (cutoff is not None and _when(r) < cutoff) or (keep_last is not None and n > keep_last):
            due.append(r)
    return due


@dataclass
class Report:
    deleted: list[str] = field(default_factory=list)  # records whose every copy is gone
    freed_bytes: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    stored_bytes: int = 0
    warn_bytes: int = 0
    # copies this collector cannot reach (another collector's local copy): location -> why
    left: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False
    would_delete: list[str] = field(default_factory=list)  # dry run: the copies it would delete
    # S3 copies kept because S3 Object Lock forbids their deletion yet: location -> until when
    locked: dict[str, str] = field(default_factory=dict)
    reason: str = ""  # the rule applied (the custody log's ``deleted`` entries say it)

    @property
    def over_threshold(self) -> bool:
        return self.stored_bytes > self.warn_bytes


def _plan(
    row: Mapping[str, Any], settings: Settings
) -> tuple[list[StoredDump], dict[str, str], bool]:
    """(copies to delete here, copies left for another collector with why, True if some
    copy is still pending elsewhere). Raises LocationError if any copy is out of bounds:
    then nothing of this record is touched."""
    targets: list[StoredDump] = []
    left: dict[str, str] = {}
    for loc in record_locations(row):
        if loc.deleted_at:
            continue
        stored = open_stored(loc, settings)
        if loc.kind == "s3":
            targets.append(stored)
        elif loc.collector and loc.collector != settings.collector_id:
            left[loc.where] = f"a local copy on collector {loc.collector}: left for it"
        elif not loc.collector and not stored.exists():
            # A record from before collectors were recorded: a file missing here may be
            # on another collector, so it is not taken as gone.
            left[loc.where] = "no collector recorded and not found here: left"
        else:
            targets.append(stored)
    return targets, left, bool(left)


def apply(
    settings: Settings,
    store: RecordStore,
    now: datetime | None = None,
    *,
    days: float | None = None,
    keep_last: int | None = None,
    dry_run: bool = False,
) -> Report:
    """Run retention over every record (``days``/``keep_last`` default to the settings).
    ``dry_run``: plan and report the same, delete and mark nothing."""
    now = now or datetime.now(UTC)
    check_bounds(days, keep_last)
    days = settings.retention.days if days is None else days
    keep_last = settings.retention.keep_last if keep_last is None else keep_last
    check_bounds(days, keep_last)
    report = Report(warn_bytes=settings.storage_warn_bytes, dry_run=dry_run)
    report.reason = f"retention: older than {days} days or beyond the newest {keep_last} of its VM"
    if days is not None or keep_last is not None:
        rows: list[dict[str, Any]] = []
        while page := store.list(PAGE, len(rows)):
            rows.extend(page)
        for row in select(rows, now, days=days, keep_last=keep_last):
            _apply_one(row, settings, store, now, report)
    report.stored_bytes = store.stats().total_size_bytes
    return report


def _apply_one(
    row: Mapping[str, Any], settings: Settings, store: RecordStore, now: datetime, report: Report
) -> None:
    where = str(row["dump_path"])
    try:
        targets, left, pending = _plan(row, settings)
    except LocationError as exc:
        report.errors[where] = f"refused: {exc}"
        log.warning("retention: refused %s: %s", where, exc)
        return
    report.left.update(left)
    for t in targets:
        try:
            # S3 Object Lock: never try to delete what S3 must refuse (memdump never asks
            # to bypass a governance lock); the record keeps this location, unmarked.
            held = t.lock()
            if held is not None and held.holds_at(now):
                _locked(report, t.location.where, held.mode, held.until_text())
                pending = True
                continue
            if report.dry_run:
                report.would_delete.append(t.location.where)
                continue
            if t.delete():
                report.freed_bytes += int(row.get("gzip_size_bytes") or 0)
            _custody_deleted(row, settings, t, now, report)
            store.mark_location_deleted(dict(row), t.location.kind, now)
        except ObjectLockedError as exc:  # S3 refused for a lock after all (a legal hold...)
            until = exc.fields.get("retain_until")
            _locked(report, t.location.where, exc.fields.get("mode"), until)
            pending = True
        except Exception as exc:  # one copy's trouble must not stop the others
            report.errors[t.location.where] = f"{type(exc).__name__}: {exc}"
            log.warning("retention: could not delete %s: %s", t.location.where, exc)
            pending = True
    if pending or report.dry_run:
        return
    try:
        store.mark_deleted(dict(row), now)
    except MemdumpError as exc:
        report.errors[where] = f"{type(exc).__name__}: {exc}"
        return
    report.deleted.append(where)


def _custody_deleted(
    row: Mapping[str, Any], settings: Settings, copy: StoredDump, now: datetime, report: Report
) -> None:
    """A ``deleted`` entry in the dump's custody log (memdump.custody), which retention
    never deletes: the evidence of the deletion outlives the last copy, as the record
    does. A failed append waits in the custody outbox; the deletion stands."""
    from memdump import custody

    try:
        t = custody.targets_of(settings, row)
    except Exception as exc:
        log.error("retention: no custody log for %s: %s", copy.location.where, exc)
        return
    custody.record_event(
        settings,
        t,
        "deleted",
        {
            "copy": copy.location.kind,
            "where": copy.location.where,
            "version_id": copy.location.version_id,
            "why": report.reason,
            "dump_timestamp": str(row.get("timestamp") or ""),
            "deleted_at": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        },
    )


def _locked(report: Report, where: str, mode: object, until: object) -> None:
    what = f"under S3 Object Lock ({mode or 'legal hold'}) until {until or '?'}"
    report.locked[where] = what
    log.info("retention: kept %s: %s; a later run deletes it", where, what)


def md(text: str) -> str:
    """``text`` (from records or errors) as literal markdown: the one escape every
    artifact uses (memdump.escaping.md_text)."""
    return md_text(text)


def describe(report: Report) -> str:
    gib = 1 << 30
    if report.dry_run:
        lines = [
            f"Dry run: would delete {len(report.would_delete)} copy(ies) of dumps; nothing "
            f"deleted. Stored: {report.stored_bytes / gib:.2f} GiB"
            f" (warning above {report.warn_bytes / gib:.0f} GiB)."
        ]
    else:
        lines = [
            f"Deleted {len(report.deleted)} dump(s), freed {report.freed_bytes / gib:.2f} GiB;"
            f" still stored: {report.stored_bytes / gib:.2f} GiB"
            f" (warning above {report.warn_bytes / gib:.0f} GiB)."
        ]
    if report.over_threshold:
        lines.append("**WARNING: stored dumps exceed the storage threshold.**")
    lines += [f"- would delete {md(p)}" for p in report.would_delete]
    lines += [f"- deleted {md(p)}" for p in report.deleted]
    lines += [f"- left {md(p)}: {md(why)}" for p, why in report.left.items()]
    lines += [f"- **kept** {md(p)}: {md(why)}" for p, why in report.locked.items()]
    lines += [f"- **not deleted** {md(p)}: {md(e)}" for p, e in report.errors.items()]
    return "\n".join(lines)
