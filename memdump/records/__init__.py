"""Dump records: the contract's record model, the stores that keep them, the outbox."""

from __future__ import annotations

from memdump.records.base import RecordStore, Stats
from memdump.records.model import DumpRecord
from memdump.records.outbox import DurableRecorder, Outbox
from memdump.settings import Settings


def open_store(settings: Settings) -> RecordStore:
    """The configured record store (SQLite, embedded, by default)."""
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
