"""Dump records: the contract's record model, the stores that keep them, the outbox."""

from __future__ import annotations

from typing import TYPE_CHECKING

from memdump.records.base import RecordReader, RecordStore, Stats
from memdump.records.model import DumpRecord
from memdump.records.outbox import DurableRecorder, Outbox

if TYPE_CHECKING:  # types only: memdump.manifest (`memdump diff`) reads no settings
    from memdump.records.influxdb3 import InfluxDB3RecordStore
    from memdump.settings import Settings


def open_store(settings: Settings) -> RecordStore:
    """The configured record store (SQLite, embedded, by default)."""
    if settings.record_store == "influxdb3":
        return _influxdb3(settings, read_only=False)
    from memdump.records.sqlite import SQLiteRecordStore

    return SQLiteRecordStore(settings.records_db)


def open_reader(settings: Settings) -> RecordReader:
    """The configured store opened for reading only, with the least credential that
    reads (the API's: it never writes records). SQLite: read-only mode, nothing created;
    InfluxDB 3: MEMDUMP_INFLUXDB3__READ_TOKEN when set."""
    if settings.record_store == "influxdb3":
        return _influxdb3(settings, read_only=True)
    from memdump.records.sqlite import SQLiteRecordReader

    return SQLiteRecordReader(settings.records_db)


def _influxdb3(settings: Settings, *, read_only: bool) -> InfluxDB3RecordStore:
    from memdump.errors import ConfigError
    from memdump.records.influxdb3 import InfluxDB3RecordStore

    cfg = settings.influxdb3
    if cfg is None:
        raise ConfigError("record_store is influxdb3 but MEMDUMP_INFLUXDB3__URL is not set")
    return InfluxDB3RecordStore(cfg, token=cfg.read_token if read_only else None)


def open_recorder(settings: Settings) -> DurableRecorder:
    return DurableRecorder(open_store(settings), Outbox(settings.outbox_db))


__all__ = [
    "DumpRecord",
    "DurableRecorder",
    "Outbox",
    "RecordReader",
    "RecordStore",
    "Stats",
    "open_reader",
    "open_recorder",
    "open_store",
]
