"""The custody log of a dump (issue 15, item 3): an append-only, hash-chained, signed list
of what happened to it: ``captured`` (trigger, run id, collector), ``analysed`` (the
post-capture check's status), ``offloaded`` (S3 URI, VersionId), ``verified`` (status,
by whom), ``copied``, ``deleted`` (which copy, why).

Format: JSON Lines beside the manifest, ``<stem>.custody.jsonl`` (0600, created O_EXCL in
the dump's 0700 directory). One entry per line, each line the entry's canonical JSON
(memdump.signing.canonical: sorted keys, no whitespace, UTF-8): a line is a whole entry,
so appending is one write(2) of one line, a reader needs no parser beyond ``json``, and
the bytes hashed are exactly the bytes stored (a re-serialisation that differs from the
line is itself an edit). Each entry::

    {"type": "memdump-custody", "version": 1, "index": n, "prev": "<hex>",
     "event": "captured", "at": "...Z", "details": {...},
     "by": {"collector_id": ..., "key_fingerprint": ..., "public_key": "<b64>"},
     "signature": "<b64 Ed25519>"}

``prev`` is the SHA-256 of the previous entry's line (without its newline); for entry 0
it is the SHA-256 of the manifest file (the record's ``manifest_sha256``; 64 zeros for a
dump without one): the log is bound to its dump. ``signature`` is the collector's Ed25519
key (memdump.signing) over the canonical JSON of the entry without ``signature``;
``key_fingerprint`` must be the SHA-256 of ``public_key`` and in MEMDUMP_TRUSTED_KEYS.

Appending (local): the log is opened O_APPEND|O_NOFOLLOW, locked with flock(2), read to
find its head, and the new line written in one write(2) and fsynced; earlier lines are
never rewritten. S3 objects cannot be appended to: each entry is its own object,
``<stem>.custody/<index, 8 digits>.json``, written once with ``If-None-Match: *`` (two
appenders racing for one index: one wins, the other re-reads and takes the next). Where a
dump has both copies, the longer one must extend the shorter (else the copies diverge:
named by ``check``) and the missing entries are copied across before the new one.

A failed append never fails the capture (or verify, or retention): the event is logged
at ERROR and kept in ``<data_dir>/custody-outbox/`` (0600 files), appended in order
before the next event of any dump (its original time kept, ``late`` set).

What ``check`` catches: an edited entry (signature, and the next entry's ``prev``), a
removed entry (indexes skip; a removed first entry: ``prev`` is not the manifest's
hash), a reordered pair (indexes out of order), an entry from another dump or a log put
beside another manifest (entry 0's ``prev``), an untrusted or forged key. A removed
*last* entry leaves a valid shorter chain: it is caught only against something else
that knows of it: the other copy (local vs S3), and the record (an ``s3_uri`` needs an
``offloaded`` entry, ``*_deleted_at`` a ``deleted`` entry: ``check_record``). The same
entries removed from every copy after the record last changed (e.g. the latest
``verified``) are not caught.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from memdump.errors import ObjectExistsError, StorageError
from memdump.manifest import SUFFIX as MANIFEST_SUFFIX
from memdump.manifest import manifest_key, manifest_path
from memdump.signing import Signer, canonical, collector_signer, fingerprint

if TYPE_CHECKING:
    from memdump.settings import Settings
    from memdump.storage import S3Store

log = logging.getLogger("memdump.custody")

TYPE = "memdump-custody"
SUFFIX = ".custody.jsonl"
S3_DIR = ".custody/"
NO_MANIFEST = "0" * 64  # entry 0's prev for a dump without a manifest
EVENTS = (
    "captured",
    "analysed",
    # The manifest's RFC 3161 token asked for, pending, or stored (memdump.timestamping).
    "timestamped",
    "offloaded",
    "verified",
    "copied",
    "deleted",
)
MAX_LINE = 64 << 10  # an entry is a few hundred bytes
MAX_ENTRIES = 100_000
MAX_LOG_BYTES = 64 << 20  # a log of thousands of entries is a few MiB
OUTBOX = "custody-outbox"
_APPEND_TRIES = 5


def log_path(dump: Path) -> Path:
    """``X.mem.gz`` -> ``X.custody.jsonl`` beside its manifest."""
    m = manifest_path(dump)
    return m.with_name(m.name.removesuffix(MANIFEST_SUFFIX) + SUFFIX)


def log_prefix(dump_key: str) -> str:
    """The S3 prefix of a dump object's log entries: ``<stem>.custody/``."""
    return manifest_key(dump_key).removesuffix(MANIFEST_SUFFIX) + S3_DIR


def entry_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def make_entry(
    signer: Signer, index: int, prev: str, event: str, details: Mapping[str, Any], at: str
) -> bytes:
    """One signed entry as its line (canonical JSON, no newline)."""
    body: dict[str, Any] = {
        "type": TYPE,
        "version": 1,
        "index": index,
        "prev": prev,
        "event": event,
        "at": at,
        "details": dict(details),
        "by": {
            "collector_id": signer.collector_id,
            "key_fingerprint": signer.fingerprint,
            "public_key": base64.b64encode(signer.public_raw).decode(),
        },
    }
    body["signature"] = base64.b64encode(signer.sign(canonical(body))).decode()
    return canonical(body)


# -- checking ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    index: int | None  # the entry's position in the log (None: the log as a whole)
    kind: str  # edited, removed, reordered, bad-signature, untrusted-key, malformed, ...
    detail: str

    def __str__(self) -> str:
        where = "log" if self.index is None else f"entry {self.index}"
        return f"{where}: {self.kind}: {self.detail}"


@dataclass
class ChainCheck:
    entries: list[dict[str, Any]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": "intact" if self.ok else "broken",
            "entries": len(self.entries),
            "head": self.entries[-1].get("_hash") if self.entries else None,
            "problems": [
                {"index": p.index, "kind": p.kind, "detail": p.detail} for p in self.problems
            ],
        }


def _signature_problem(doc: Mapping[str, Any], trusted: frozenset[str]) -> tuple[str, str] | None:
    by = doc.get("by") if isinstance(doc.get("by"), Mapping) else {}
    assert isinstance(by, Mapping)  # noqa: S101 - narrowed above
    try:
        public = base64.b64decode(str(by.get("public_key")), validate=True)
        signature = base64.b64decode(str(doc.get("signature")), validate=True)
    except (binascii.Error, ValueError):
        return "bad-signature", "the key or signature is not base64"
    if len(public) != 32:
        return "bad-signature", "the public key is not 32 bytes"
    fp = fingerprint(public)
    if by.get("key_fingerprint") != fp:
        return "bad-signature", "the fingerprint is not its public key's"
    body = {k: v for k, v in doc.items() if k not in ("signature", "_hash")}
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, canonical(body))
    except InvalidSignature:
        return "edited", f"the signature by key {fp[:16]}... does not match the entry"
    if fp not in trusted:
        return "untrusted-key", f"signed by key {fp}, not in MEMDUMP_TRUSTED_KEYS"
    return None


def check_chain(
    lines: Sequence[bytes], trusted: frozenset[str], genesis: str | None = None
) -> ChainCheck:
    """Check a log's lines (without newlines). ``genesis``: the manifest's SHA-256 when
    known (entry 0's ``prev`` must be it); else entry 0's own claim is taken."""
    out = ChainCheck()
    offset = 0  # entry index minus position, as the indexes so far say
    prev_line: bytes | None = None
    indexes = [_index_of(line) for line in lines]
    for pos, line in enumerate(lines):
        try:
            doc = json.loads(line)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or doc.get("type") != TYPE:
            out.problems.append(Problem(pos, "malformed", "not a custody entry (JSON)"))
            prev_line = line
            continue
        doc["_hash"] = entry_hash(line)
        out.entries.append(doc)
        if canonical({k: v for k, v in doc.items() if k != "_hash"}) != line:
            out.problems.append(Problem(pos, "edited", "the line is not its canonical JSON"))
        n = indexes[pos]
        want = pos + offset
        if n is None:
            out.problems.append(Problem(pos, "malformed", "no index"))
        elif n != want:
            if want in indexes[pos + 1 :] or n < want:
                # The entry expected here comes later (or this one came earlier): moved.
                out.problems.append(
                    Problem(pos, "reordered", f"entry {n} at position {pos}: out of order")
                )
            else:
                gone = f"entry {want}" if n == want + 1 else f"entries {want}-{n - 1}"
                out.problems.append(
                    Problem(pos, "removed", f"{gone} removed (position {pos} holds entry {n})")
                )
                offset = n - pos
        elif pos > 0 and indexes[pos - 1] != n - 1:
            pass  # the entry before is out of place: named already
        elif pos == 0 and genesis is not None and doc.get("prev") != genesis:
            out.problems.append(
                Problem(0, "removed", "entry 0's prev is not the manifest's SHA-256 (the first"
                        " entry was removed, or the log belongs to another dump)")
            )  # fmt: skip
        elif prev_line is not None and doc.get("prev") != entry_hash(prev_line):
            out.problems.append(
                Problem(pos, "edited", f"prev is not the hash of entry {n - 1}: entry"
                        f" {n - 1} was edited or replaced")
            )  # fmt: skip
        sig = _signature_problem(doc, trusted)
        if sig is not None:
            out.problems.append(Problem(pos, *sig))
        prev_line = line
    return out


def _index_of(line: bytes) -> int | None:
    try:
        n = json.loads(line).get("index")
    except (ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def check_record(entries: Sequence[Mapping[str, Any]], row: Mapping[str, Any]) -> list[Problem]:
    """What the record knows happened that the log must say (a removed last entry)."""
    problems: list[Problem] = []
    events = [(e.get("event"), e.get("details") or {}) for e in entries]
    if not any(ev == "captured" for ev, _ in events):
        problems.append(Problem(None, "truncated", "no captured entry"))
    uri = str(row.get("s3_uri") or "")
    if uri and not any(ev == "offloaded" and d.get("uri") == uri for ev, d in events):
        problems.append(
            Problem(None, "truncated", f"the record says offloaded to {uri}; the log does not")
        )
    for kind in ("local", "s3"):
        if row.get(f"{kind}_deleted_at") and not any(
            ev == "deleted" and d.get("copy") == kind for ev, d in events
        ):
            problems.append(
                Problem(None, "truncated", f"the record says the {kind} copy was deleted;"
                        " the log has no such entry")
            )  # fmt: skip
    return problems


def compare_copies(a: Sequence[bytes], b: Sequence[bytes], names: tuple[str, str]) -> list[Problem]:
    """Two copies of one log: the longer must extend the shorter."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return [Problem(i, "diverged", f"the {names[0]} and {names[1]} copies differ here")]
    if len(a) != len(b):
        short, long_ = (names[0], names[1]) if len(a) < len(b) else (names[1], names[0])
        n = min(len(a), len(b))
        return [
            Problem(n, "truncated", f"the {short} copy ends before entry {n}; the {long_}"
                    f" copy has {max(len(a), len(b))} entries")
        ]  # fmt: skip
    return []


# -- the copies --------------------------------------------------------------------------


def read_lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


class LocalLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[bytes]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return []
        with os.fdopen(fd, "rb") as f:
            # read() of a size allocates that size: ask for what is there, no more.
            size = os.fstat(f.fileno()).st_size
            if size > MAX_LOG_BYTES:
                raise StorageError(f"the custody log {self.path} is larger than a log can be")
            return read_lines(f.read(size))

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            os.fchmod(fd, 0o600)
            return fd
        except FileExistsError:
            return os.open(self.path, flags)

    @contextlib.contextmanager
    def locked(self) -> Any:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def write(fd: int, lines: Iterable[bytes]) -> None:
        data = b"".join(line + b"\n" for line in lines)
        if not data:
            return
        # One write of whole lines (O_APPEND): a reader never sees half an entry.
        n = os.write(fd, data)
        if n != len(data):
            raise StorageError(f"short write to the custody log ({n} of {len(data)} bytes)")
        os.fsync(fd)


class S3Log:
    def __init__(self, store: S3Store, prefix: str) -> None:
        self.store = store
        self.prefix = prefix

    def key(self, index: int) -> str:
        return f"{self.prefix}{index:08d}.json"

    def read(self) -> list[bytes]:
        keys = sorted(self.store.list_keys(self.prefix, MAX_ENTRIES))
        return [
            b"".join(self.store.open_stream(k)).rstrip(b"\n") for k in keys if k.endswith(".json")
        ]

    def put(self, index: int, line: bytes) -> None:
        self.store.put_new(self.key(index), line + b"\n")


@dataclass(frozen=True)
class Targets:
    """Where one dump's log lives: the local file and/or the S3 prefix."""

    local: Path | None
    s3: S3Log | None
    genesis: str  # entry 0's prev

    def as_json(self) -> dict[str, Any]:
        return {
            "local": str(self.local) if self.local else None,
            "s3_prefix": self.s3.prefix if self.s3 else None,
            "genesis": self.genesis,
        }


def targets(
    settings: Settings, *, local_dump: Path | None, s3_key: str | None, manifest_sha256: str
) -> Targets:
    s3 = None
    if s3_key and settings.s3 is not None:
        from memdump.storage import S3Store

        s3 = S3Log(S3Store(settings.s3), log_prefix(s3_key))
    return Targets(
        log_path(local_dump) if local_dump is not None else None,
        s3,
        manifest_sha256 or NO_MANIFEST,
    )


def targets_of(settings: Settings, row: Mapping[str, Any]) -> Targets:
    """A record's log copies on this host: its local log (a local copy recorded here,
    deleted or not: the log outlives the dump) and its S3 objects' prefix."""
    from memdump.locations import record_locations

    local: Path | None = None
    key: str | None = None
    for loc in record_locations(row):
        if loc.kind == "s3":
            key = loc.key(settings.s3)
        elif not loc.collector or loc.collector == settings.collector_id:
            local = loc.path(settings.dump_dir)
    return targets(
        settings,
        local_dump=local,
        s3_key=key,
        manifest_sha256=str(row.get("manifest_sha256") or ""),
    )


def _append(signer: Signer, t: Targets, event: str, details: Mapping[str, Any], at: str) -> int:
    """Append one entry to every copy in ``t``; its index."""
    for _ in range(_APPEND_TRIES):
        with contextlib.ExitStack() as stack:
            fd = None
            local: list[bytes] = []
            if t.local is not None and t.local.parent.is_dir():
                lf = LocalLog(t.local)
                fd = stack.enter_context(lf.locked())
                local = lf.read()
            remote = t.s3.read() if t.s3 is not None else []
            diverged = compare_copies(local, remote, ("local", "S3"))
            if diverged and diverged[0].kind == "diverged":
                raise StorageError(f"custody log copies diverge: {diverged[0]}")
            if fd is None and t.s3 is None:
                raise StorageError("no custody log to append to (the dump's directory is gone)")
            base = local if len(local) >= len(remote) else remote
            prev = entry_hash(base[-1]) if base else t.genesis
            line = make_entry(signer, len(base), prev, event, details, at)
            full = [*base, line]
            if t.s3 is not None:
                try:
                    for i in range(len(remote), len(full)):
                        t.s3.put(i, full[i])
                except ObjectExistsError:
                    continue  # another appender took this index: read again
            if fd is not None:
                LocalLog.write(fd, full[len(local) :])
            return len(base)
    raise StorageError("custody log: too many concurrent appenders")


def _outbox(settings: Settings) -> Path:
    from memdump.fsperm import private_dir

    return private_dir(settings.data_dir / OUTBOX)


def record_event(settings: Settings, t: Targets, event: str, details: Mapping[str, Any]) -> bool:
    """Append ``event`` to the dump's log; never raises. False: it could not be appended
    now (logged at ERROR) and waits in the custody outbox."""
    at = _now()
    try:
        replay(settings)
    except Exception as exc:
        log.error("custody outbox replay failed: %s", exc)
    try:
        _append(collector_signer(settings), t, event, details, at)
        return True
    except Exception as exc:
        log.error("CUSTODY LOG NOT WRITTEN (%s of %s), kept in the outbox: %s", event, t, exc)
        with contextlib.suppress(Exception):
            _keep(settings, t, event, details, at)
        return False


def _keep(settings: Settings, t: Targets, event: str, details: Mapping[str, Any], at: str) -> None:
    doc = {"targets": t.as_json(), "event": event, "details": dict(details), "at": at}
    name = f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}-{secrets.token_hex(4)}.json"
    path = _outbox(settings) / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(canonical(doc))
        f.flush()
        os.fsync(f.fileno())


def pending(settings: Settings) -> list[Path]:
    d = settings.data_dir / OUTBOX
    return sorted(d.glob("*.json")) if d.is_dir() else []


def replay(settings: Settings) -> int:
    """Append the events waiting in the outbox, oldest first; stop at the first that still
    fails (order is kept). How many were appended."""
    done = 0
    for path in pending(settings):
        doc = json.loads(path.read_bytes())
        tj = doc["targets"]
        key = None
        if tj.get("s3_prefix"):
            key = str(tj["s3_prefix"]).removesuffix(S3_DIR) + ".mem.gz"
        local = Path(tj["local"]) if tj.get("local") else None
        t = Targets(local, None, str(tj["genesis"]))
        if key is not None:
            t = targets(
                settings,
                local_dump=None,
                s3_key=key,
                manifest_sha256=str(tj["genesis"]),
            )
            t = Targets(local, t.s3, t.genesis)
        details = {**doc["details"], "late": _now()}
        _append(collector_signer(settings), t, str(doc["event"]), details, str(doc["at"]))
        path.unlink()
        done += 1
    return done


def read_copies(t: Targets) -> dict[str, list[bytes]]:
    """The lines of each copy of one log there is: ``local``, ``S3``."""
    copies: dict[str, list[bytes]] = {}
    if t.local is not None and t.local.is_file():
        copies["local"] = LocalLog(t.local).read()
    if t.s3 is not None:
        copies["S3"] = t.s3.read()
    return copies


def longest_copy(t: Targets) -> list[bytes]:
    """The lines of the longest copy of one log (the others are its prefixes, unless
    they diverge, which check_copies names)."""
    return max(read_copies(t).values(), key=len, default=[])


def check_targets(
    t: Targets, settings: Settings, row: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Every copy of one log read and checked: the chain of the longest copy, the copies
    against each other, and (``row``) against the record. ``to_dict`` plus ``copies``."""
    from memdump.signing import trusted_keys

    return check_copies(read_copies(t), trusted_keys(settings), t.genesis, row)


def check_copies(
    copies: Mapping[str, list[bytes]],
    trusted: frozenset[str],
    genesis: str | None,
    row: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    names = list(copies)
    longest = max(names, key=lambda n: len(copies[n]), default=None)
    result = check_chain(copies[longest] if longest else [], trusted, genesis)
    if longest is None:
        result.problems.append(Problem(None, "missing", "the dump has no custody log"))
    for other in names:
        if other != longest and longest is not None:
            result.problems += compare_copies(copies[other], copies[longest], (other, longest))
    if row is not None and longest is not None:
        result.problems += check_record(result.entries, row)
    out = result.to_dict()
    if longest is None:
        out["status"] = "missing"
    out["copies"] = {n: len(c) for n, c in copies.items()}
    out["entries_list"] = [{k: v for k, v in e.items() if k != "_hash"} for e in result.entries]
    return out
