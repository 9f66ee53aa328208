"""One exception tree for the whole engine.

Every error carries structured fields (``fields``) for logs and records, and a
``retryable`` flag: task retries read it, so only errors that may go away on a
second attempt (a dropped connection, a dump cut short) are retried; a wrong host
key or an unknown VM never is.
"""

from __future__ import annotations

from typing import Any


class MemdumpError(Exception):
    """Base of every error memdump raises on purpose."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields: dict[str, Any] = fields
        if retryable is not None:
            self.retryable = retryable

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "retryable": self.retryable,
            **self.fields,
        }


# -- configuration and input -------------------------------------------------------------


class ConfigError(MemdumpError):
    """Settings or inventory are wrong; fixing them needs a human."""


class PortInUseError(ConfigError):
    """A port ``memdump serve`` must listen on is taken (``port``, ``host``; ``holders``:
    pid and command line of each process holding it, where /proc shows them)."""


class InvalidIdentifierError(MemdumpError):
    """An id that is not a plain identifier; it never reaches a command."""


# -- transport (SSH / local subprocess) ---------------------------------------------------


class TransportError(MemdumpError):
    """Talking to the hypervisor failed."""


class ConnectError(TransportError):
    """TCP connect, SSH handshake or keepalive failure: worth another try."""

    retryable = True


class HostKeyError(TransportError):
    """The hypervisor's host key is unknown or does not match known_hosts. Never retried."""


class AuthenticationError(TransportError):
    """Key authentication was refused. Never retried."""


class StreamInterruptedError(TransportError):
    """The byte stream ended without a clean exit (connection cut, peer died)."""

    retryable = True


class StreamStalledError(TransportError):
    """No bytes arrived for longer than the stall timeout."""

    retryable = True


class OutputTooLargeError(TransportError):
    """A command wrote more to stdout or stderr than the cap allows (``stream``, ``limit``):
    it is stopped, its output dropped. A hostile or broken peer: never retried."""


class CommandTimeoutError(TransportError):
    """A command did not finish within its deadline and was stopped. Never retried."""


class RemoteCommandError(TransportError):
    """A command on the hypervisor exited non-zero; ``stderr`` holds what it said."""


# -- hypervisor ---------------------------------------------------------------------------


class HypervisorError(MemdumpError):
    """The hypervisor refused or failed an operation."""


class VMNotFoundError(HypervisorError):
    """No VM with this id on the hypervisor(s)."""


class VMNotRunningError(HypervisorError):
    """The VM exists but is not running, so it has no memory to dump."""


class AmbiguousVMError(HypervisorError):
    """An unqualified id matches VMs on more than one hypervisor."""


class DumpFailedError(HypervisorError):
    """The hypervisor's dump command failed (virsh/QEMU said so)."""

    retryable = True


class LiveCaptureUnsupportedError(HypervisorError):
    """A live capture cannot run on this VM (QEMU too old, no userfaultfd write-protect,
    another migration in progress, ...), found before the guest was touched. ``reason``
    says why; the capture falls back to a paused dump and records it."""


# -- capture pipeline and storage ---------------------------------------------------------


class CaptureError(MemdumpError):
    """The captured bytes cannot be trusted as a whole image."""


class ShortDumpError(CaptureError):
    """Fewer (or more) bytes than the dump's own ELF headers declare."""

    retryable = True


class InvalidDumpError(CaptureError):
    """The stream is not a well-formed ELF core."""


class ChunkedDumpError(InvalidDumpError):
    """A chunked .mem.gz's trailer or index is malformed or does not match its own digests."""


class CorruptChunkError(ChunkedDumpError):
    """One chunk of a chunked .mem.gz does not match its index entry (``number``,
    ``raw_offset``, ``raw_size``; ``reason``: crc, size, sha256 or member)."""


class MigrationStreamError(CaptureError):
    """A live capture's migration stream cannot be turned into the guest's memory image
    (malformed, an unknown section, a page outside the layout, a page sent twice)."""


class CaptureTimeoutError(CaptureError):
    """The capture ran past its deadline and was stopped."""


class StorageError(MemdumpError):
    """Writing the dump locally failed (disk full, permissions, name clash)."""


class InsufficientSpaceError(StorageError):
    """Not enough free space for the dump: found before the guest is paused."""


# -- records ------------------------------------------------------------------------------


class RecordStoreError(MemdumpError):
    """The record store could not read or take a record."""


# -- object store (S3) ---------------------------------------------------------------------


class ObjectStoreError(StorageError):
    """The object store (S3) refused or failed an operation."""


class ObjectStoreUnavailableError(ObjectStoreError):
    """Connection refused or dropped, timeout, throttling, 5xx: worth another try."""

    retryable = True


class ObjectStoreAccessError(ObjectStoreError):
    """Credentials missing or refused, access denied, bad signature. Never retried."""


class ObjectNotFoundError(ObjectStoreError):
    """The bucket (or object) does not exist. Never retried."""


class OffloadIntegrityError(ObjectStoreError):
    """The bytes in the object store are not (or would not be) the captured file: a
    checksum or size mismatch. The object is not kept. Never retried."""


class ObjectExistsError(ObjectStoreError):
    """The key already holds an object (conditional write, ``If-None-Match: *``): it is
    someone else's evidence, so nothing is overwritten or deleted. Never retried."""


class ObjectLockUnavailableError(ObjectStoreError):
    """The settings ask for S3 Object Lock (``mode``) but the bucket cannot give it
    (Object Lock not enabled on it): found before anything is uploaded, so no object is
    ever stored unlocked when a lock was asked for. Never retried (the bucket's set-up)."""


class ObjectLockedError(ObjectStoreError):
    """The object is under S3 Object Lock (``mode``, ``retain_until`` ISO 8601 UTC, or a
    legal hold): it cannot be deleted before then, by memdump or anyone. Retention keeps
    it and tries again on a later run. Not retried now (the lock outlasts any retry)."""


class LocationError(MemdumpError):
    """A record's dump location is outside the dump directory or the S3 prefix, or not a
    dump file name: it is refused (nothing read or deleted there). Never retried."""


# -- settings and results ----------------------------------------------------------------


# -- orchestration -------------------------------------------------------------------------


class CollectorLostError(MemdumpError):
    """The flow run capturing a VM on another collector crashed (its worker or machine
    went away): another collector may take the VM."""

    retryable = True


# -- the capture chain (memdump.chain) ----------------------------------------------------


class OffloadFailedError(StorageError):
    """A finished capture could not be offloaded, after its retries: the local file is
    kept and no record claims an object. Never retried as a whole (the capture is done);
    ``cause`` names the S3 error."""


class RecordNotWrittenError(RecordStoreError):
    """Neither the record store nor the outbox took a capture's record (the outbox is a
    local file: its disk failed)."""


# -- custody (memdump.signing, memdump.countersign) ----------------------------------------


class CountersignRefusedError(MemdumpError):
    """``memdump countersign`` would not vouch for a dump: it does not verify, or it is
    signed already (``status``: what verify said)."""


class CopyRefusedError(MemdumpError):
    """``memdump copy`` wrote no copy: the stored dump is gone or does not match its
    record, or a file of the copy exists already (``path``: which)."""


class TimestampError(MemdumpError):
    """A timestamp authority (RFC 3161, memdump.timestamping) gave no usable token: it
    could not be reached, refused, or answered something that does not check out. Never
    fails a capture: the request waits in the pending-timestamps queue."""

    retryable = True
