"""Dump records: the contract's record model, and (later) the stores that keep them."""

from memdump.records.model import DumpRecord

__all__ = ["DumpRecord"]
