"""A stored copy of a dump, wherever it lives (memdump.locations.Location: a local file
or an S3 object), confined before it is opened: reading it (verify) and deleting it with
its manifest (retention) are written once here, not once per caller and kind."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, cast

from memdump.errors import ObjectNotFoundError
from memdump.locations import Location
from memdump.manifest import SIDECAR_SUFFIXES, SIG_SUFFIX, TSR_SUFFIX, manifest_key, manifest_path

if TYPE_CHECKING:  # types only: `memdump diff` of two files reads no settings (pydantic)
    from memdump.settings import Settings
    from memdump.storage import ObjectLock, S3Store

CHUNK = 4 << 20
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _sig_name(dump: Path) -> str:
    return manifest_path(dump).name + SIG_SUFFIX


class StoredDump(Protocol):
    @property
    def location(self) -> Location: ...

    def exists(self) -> bool: ...

    def chunks(self) -> Iterable[bytes]:
        """The stored (.gz) bytes; FileNotFoundError or ObjectNotFoundError if gone."""
        ...

    def manifest(self, limit: int) -> bytes | None:
        """At most ``limit`` bytes of its manifest (None if there is none)."""
        ...

    def signature(self, limit: int) -> bytes | None:
        """At most ``limit`` bytes of its manifest's signature (memdump.signing; None if
        there is none)."""
        ...

    def timestamp(self, limit: int) -> bytes | None:
        """At most ``limit`` bytes of its manifest's timestamp token (memdump.timestamping;
        None if there is none)."""
        ...

    def size(self) -> int:
        """The stored (.gz) size in bytes."""
        ...

    def read_range(self, start: int, length: int) -> bytes:
        """``length`` stored bytes from ``start`` (fewer at the end); safe from several
        threads at once (a chunked dump's members are read in parallel)."""
        ...

    def open(self) -> BinaryIO:
        """A seekable, read-only file of the stored bytes (S3: ranged GETs)."""
        ...

    def delete(self) -> bool:
        """Delete this copy and its manifest; whether the dump was there."""
        ...

    def lock(self) -> ObjectLock | None:
        """The S3 Object Lock that outlasts the others on this copy's objects (the dump
        and each sidecar deleted with it), as the store reports it now; None if none
        (a local copy has none)."""
        ...


def open_stored(location: Location, settings: Settings) -> StoredDump:
    """``location`` confined to the dump directory or the S3 prefix (LocationError
    otherwise, before anything is touched)."""
    if location.kind == "s3":
        key = location.key(settings.s3)
        from memdump.storage import S3Store

        assert settings.s3 is not None  # noqa: S101 - key() refused it otherwise
        return S3Dump(location, S3Store(settings.s3), key)
    return LocalDump(location, location.path(settings.dump_dir))


@dataclass(frozen=True)
class LocalDump:
    location: Location
    path: Path

    def exists(self) -> bool:
        return self.path.is_file()

    def chunks(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def manifest(self, limit: int) -> bytes | None:
        try:
            with manifest_path(self.path).open("rb") as f:
                return f.read(limit)
        except FileNotFoundError:
            return None

    def signature(self, limit: int) -> bytes | None:
        try:
            with (manifest_path(self.path).parent / _sig_name(self.path)).open("rb") as f:
                return f.read(limit)
        except FileNotFoundError:
            return None

    def timestamp(self, limit: int) -> bytes | None:
        mpath = manifest_path(self.path)
        try:
            with mpath.with_name(mpath.name + TSR_SUFFIX).open("rb") as f:
                return f.read(limit)
        except FileNotFoundError:
            return None

    def size(self) -> int:
        return self.path.stat().st_size

    def read_range(self, start: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), length, start)

    def open(self) -> BinaryIO:
        return open(self.path, "rb")

    def delete(self) -> bool:
        existed = self.path.exists()
        self.path.unlink(missing_ok=True)
        manifest_path(self.path).unlink(missing_ok=True)
        mpath = manifest_path(self.path)
        for suffix in SIDECAR_SUFFIXES:
            mpath.with_name(mpath.name + suffix).unlink(missing_ok=True)
        return existed

    def lock(self) -> ObjectLock | None:
        return None


@dataclass(frozen=True)
class S3Dump:
    location: Location
    store: S3Store
    key: str

    def exists(self) -> bool:
        return self.store.exists(self.key)

    def chunks(self) -> Iterable[bytes]:
        return self.store.open_stream(self.key, chunk_size=CHUNK)

    def manifest(self, limit: int) -> bytes | None:
        return self._small(manifest_key(self.key), limit)

    def signature(self, limit: int) -> bytes | None:
        return self._small(manifest_key(self.key) + SIG_SUFFIX, limit)

    def timestamp(self, limit: int) -> bytes | None:
        return self._small(manifest_key(self.key) + TSR_SUFFIX, limit)

    def _small(self, key: str, limit: int) -> bytes | None:
        buf = bytearray()
        try:
            for chunk in self.store.open_stream(key):
                buf += chunk[: limit - len(buf)]
                if len(buf) >= limit:
                    break
        except ObjectNotFoundError:
            return None
        return bytes(buf)

    def size(self) -> int:
        return self.store.size(self.key)

    def read_range(self, start: int, length: int) -> bytes:
        return self.store.read_range(self.key, start, length)

    def open(self) -> BinaryIO:
        return cast(BinaryIO, RangedFile(self.size(), self.read_range))

    def delete(self) -> bool:
        existed = self.store.exists(self.key)
        # The version this capture wrote (versioned bucket), else the key itself.
        version = self.location.version_id or None
        self.store.delete(self.key, version_id=version)
        mkey = manifest_key(self.key)
        # On a versioned bucket the manifest's version goes too, not just behind a delete
        # marker: it was written with If-None-Match, so the version there is this dump's.
        mversion = self.store.current_version(mkey) if version else None
        self.store.delete(mkey, version_id=mversion)
        for key in (mkey + suffix for suffix in SIDECAR_SUFFIXES):
            sversion = self.store.current_version(key) if version else None
            self.store.delete(key, version_id=sversion)
        return existed

    def lock(self) -> ObjectLock | None:
        # The dump's recorded version, and the sidecars as they are now: retention deletes
        # none of them while any is locked (a dump without its manifest proves little).
        mkey = manifest_key(self.key)
        locks = [
            self.store.object_lock(self.key, version_id=self.location.version_id or None),
            self.store.object_lock(mkey),
            *(self.store.object_lock(mkey + suffix) for suffix in SIDECAR_SUFFIXES),
        ]
        held = [lk for lk in locks if lk is not None]
        if not held:
            return None
        # A legal hold has no end; else the latest date.
        return max(held, key=lambda lk: (lk.legal_hold, lk.retain_until or _EPOCH))


class RangedFile(io.RawIOBase):
    """A read-only, seekable file over ranged reads (an S3 object): each read is one
    request for exactly the bytes asked for, so reading a chunked dump's trailer and index
    costs a few small GETs, not a download."""

    def __init__(self, size: int, read_range: Callable[[int, int], bytes]) -> None:
        self._size = size
        self._read_range = read_range
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        data = self._read_range(self._pos, want)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)
