"""What every record store offers (sqlite embedded default; InfluxDB 3 in production)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from memdump.records.model import DumpRecord


@dataclass(frozen=True)
class RecordQuery:
    """Filters of /records (all optional, all combined with AND). ``since`` is inclusive,
    ``until`` exclusive; both are aware datetimes."""

    since: datetime | None = None
    until: datetime | None = None
    vmid: str | None = None
    dom: str | None = None
    dump_path: str | None = None


@dataclass(frozen=True)
class Stats:
    total_dumps: int
    total_vms: int
    total_size_bytes: int
    avg_duration_sec: float
    last_dump: str | None  # ISO 8601 like the records' timestamp

    def contract_dict(self) -> dict[str, Any]:
        return {
            "total_dumps": self.total_dumps,
            "total_vms": self.total_vms,
            "total_size_bytes": self.total_size_bytes,
            "avg_duration_sec": self.avg_duration_sec,
            "last_dump": self.last_dump,
        }


class RecordReader(Protocol):
    """What the API needs of a store: reads only (memdump.records.open_reader gives one
    opened with read-only credentials, so the API cannot write even by mistake)."""

    def list(
        self, limit: int, offset: int, query: RecordQuery | None = None
    ) -> list[dict[str, Any]]:
        """API dicts (contract fields, then EXTRA_FIELDS), newest first."""
        ...

    def stats(self) -> Stats:
        """``total_size_bytes`` counts dumps still stored (not deleted by retention)."""
        ...

    def close(self) -> None: ...


class RecordStore(RecordReader, Protocol):
    """The collectors' store: reads, and the writes of the chain and of retention."""

    def add(self, record: DumpRecord) -> bool:
        """Write one record; True if new, False if it was already there (the key is
        vmid + timestamp + sha256, so a replayed write is never a duplicate)."""
        ...

    def mark_deleted(self, record: dict[str, Any], when: datetime) -> None:
        """Retention deleted this record's dump: keep the record, note when."""
        ...

    def mark_location_deleted(self, record: dict[str, Any], kind: str, when: datetime) -> None:
        """Retention deleted one copy of this record's dump (``kind``: "local" or "s3",
        memdump.locations); the record's deleted_at waits until every copy is gone."""
        ...
