"""Dump records: the contract's record model, the stores that keep them, the outbox."""

from __future__ import annotations

from typing import TYPE_CHECKING

from memdump.records.base import RecordStore, Stats
from memdump.records.model import DumpRecord
from memdump.records.outbox import DurableRecorder, Outbox

if TYPE_CHECKING:  # types only: memdump.manifest (`memdump diff`) reads no settings
    from memdump.settings import Settings


def open_store(settings: Settings) -> RecordStore:
    """The configured record store (SQLite, embedded, by default)."""
    if settings.record_store == "influxdb3":
        from memdump.errors import ConfigError
        from memdump.records.influxdb3 import InfluxDB3RecordStore

        if settings.influxdb3 is None:
            raise ConfigError("record_store is influxdb3 but MEMDUMP_INFLUXDB3__URL is not set")
        return InfluxDB3RecordStore(settings.influxdb3)
    from memdump.records.sqlite import SQLiteRecordStore

    return SQLiteRecordStore(settings.records_db)


def open_recorder(settings: Settings) -> DurableRecorder:
    return DurableRecorder(open_store(settings), Outbox(settings.outbox_db))


__all__ = [
    "DumpRecord",
    "DurableRecorder",
    "Outbox",
    "RecordStore",
    "Stats",
    "open_recorder",
    "open_store",
]
