"""Trusted timestamps (RFC 3161) of each manifest, optional (issue 15, item 4).

With MEMDUMP_TSA_URL set, once the manifest is written (and signed) the SHA-256 of the
manifest **file's exact bytes** is sent to the timestamp authority (TSA) as a DER
TimeStampReq (a 64-bit random nonce, certReq true) and the DER TimeStampResp it answers
is kept beside the manifest as ``<manifest>.tsr`` (0600, O_EXCL: never over an existing
one). The file's bytes rather than the canonical JSON the signature covers: they are
what the record's ``manifest_sha256`` names (so the token binds the record's anchor),
and an examiner checks the token with ``openssl ts -verify -data <manifest> -in <tsr>
-CAfile ca.pem`` alone, with no canonicalisation step. The manifest names the dump by
both of its hashes, so the token dates the dump too; the signature is beside it, not
inside it, so a token does not date the signature.

A response is taken only if it checks out: status granted, the token's messageImprint
(SHA-256) the digest sent, its nonce ours, and its signature good (``openssl ts
-verify``, arguments as a list, no shell: ``cryptography`` cannot verify CMS) against
MEMDUMP_TSA_CA_FILE, or, unset, against the certificate inside the token (integrity
only). http or https: the token authenticates itself by the TSA's signature; https only
hides which digests are stamped (and carries MEMDUMP_TSA_AUTHORIZATION, which is never
sent over plain http).

An unreachable or failing TSA never fails a capture: the request waits in a small queue
(``<data_dir>/timestamps.db``, like the record outbox) and is fetched later: after the
next capture whose own stamp succeeds, by ``memdump timestamps flush``, and by the
runner/worker's outbox loop. Its genTime is then the time it was fetched, later than the
capture: a token proves the manifest existed no later than its genTime, never when the
capture was made.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from memdump.errors import StorageError, TimestampError
from memdump.fsperm import private_dir, private_file
from memdump.manifest import TSR_SUFFIX

if TYPE_CHECKING:
    from memdump.settings import Settings

log = logging.getLogger("memdump.timestamping")

TSR_MAX_BYTES = 64 << 10  # a response with its TSA's certificate is a few KiB
CONTENT_TYPE_QUERY = "application/timestamp-query"
CONTENT_TYPE_REPLY = "application/timestamp-reply"
# DER of AlgorithmIdentifier { id-sha256 (2.16.840.1.101.3.4.2.1), NULL }.
SHA256_ALGID = bytes.fromhex("300d06096086480165030402010500")
SHA256_OID = bytes.fromhex("608648016503040201")
TST_INFO_OID = bytes.fromhex("2a864886f70d0109100104")  # 1.2.840.113549.1.9.16.1.4
SIGNED_DATA_OID = bytes.fromhex("2a864886f70d010702")  # 1.2.840.113549.1.7.2

TimestampStatus = Literal[
    "valid", "missing", "pending", "bad-token", "untrusted-tsa", "not-checked"
]


def tsr_path(manifest: Path) -> Path:
    """``X.manifest.json`` -> ``X.manifest.json.tsr`` (same directory)."""
    return manifest.with_name(manifest.name + TSR_SUFFIX)


def tsr_key(manifest_key: str) -> str:
    """The same naming for an object key (S3: beside the manifest)."""
    return manifest_key + TSR_SUFFIX


# -- DER: just what a TimeStampReq and a TimeStampResp need ------------------------------------


def _len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _len(len(content)) + content


def _der_int(n: int) -> bytes:
    """A non-negative INTEGER (a leading 0 byte where the top bit would make it negative)."""
    return _tlv(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def request(digest: bytes, nonce: int) -> bytes:
    """The DER TimeStampReq for a SHA-256 ``digest``: version 1, messageImprint, nonce,
    certReq true (the TSA's certificate in the token: a verifier needs only the CA)."""
    if len(digest) != 32:
        raise ValueError("a SHA-256 digest is 32 bytes")
    imprint = _tlv(0x30, SHA256_ALGID + _tlv(0x04, digest))
    return _tlv(0x30, _der_int(1) + imprint + _der_int(nonce) + _tlv(0x01, b"\xff"))


class DERError(ValueError):
    """Not the DER structure expected."""


def _read(data: bytes, pos: int = 0) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the TLV at ``pos`` (definite lengths
    only: DER)."""
    if pos + 2 > len(data):
        raise DERError("truncated")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise DERError("not a definite DER length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise DERError("truncated")
    return tag, pos, pos + length


def _children(data: bytes, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """The TLVs inside [start, end): (tag, content start, content end, TLV start)."""
    out = []
    pos = start
    while pos < end:
        tag, s, e = _read(data, pos)
        if e > end:
            raise DERError("element overruns its parent")
        out.append((tag, s, e, pos))
        pos = e
    return out


def _expect(tag: int, want: int, what: str) -> None:
    if tag != want:
        raise DERError(f"{what}: tag {tag:#x}, expected {want:#x}")


@dataclass(frozen=True)
class TSTInfo:
    hash_oid: bytes
    hashed: bytes
    serial: int
    gen_time: datetime
    nonce: int | None
    policy: str


@dataclass(frozen=True)
class Response:
    status: int  # PKIStatus: 0 granted, 1 grantedWithMods, 2.. refused
    status_text: str
    token: bytes | None  # the TimeStampToken (CMS ContentInfo), DER
    tst: TSTInfo | None
    certificates: list[bytes] = field(default_factory=list)  # DER, as the token holds them


def _oid_text(body: bytes) -> str:
    parts = [str(body[0] // 40), str(body[0] % 40)] if body else []
    n = 0
    for b in body[1:]:
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(str(n))
            n = 0
    return ".".join(parts)


def _gen_time(text: str) -> datetime:
    """GeneralizedTime ``YYYYMMDDHHMMSS[.f]Z`` (RFC 3161: UTC, Z)."""
    if not text.endswith("Z"):
        raise DERError(f"genTime {text!r} is not UTC")
    whole, _, frac = text[:-1].partition(".")
    at = datetime.strptime(whole, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    if frac:
        at = at.replace(microsecond=int((frac + "000000")[:6]))
    return at


def _tst_info(data: bytes) -> TSTInfo:
    tag, s, e = _read(data)
    _expect(tag, 0x30, "TSTInfo")
    kids = _children(data, s, e)
    if len(kids) < 5:
        raise DERError("TSTInfo: too few fields")
    (_, vs, ve, _), (ptag, ps, pe, _), (mtag, ms, me, _), (stag, ss, se, _) = kids[:4]
    _expect(ptag, 0x06, "TSTInfo.policy")
    _expect(mtag, 0x30, "TSTInfo.messageImprint")
    _expect(stag, 0x02, "TSTInfo.serialNumber")
    if data[vs:ve] != b"\x01":
        raise DERError("TSTInfo: version is not 1")
    (atag, as_, ae, _), (htag, hs, he, _) = _children(data, ms, me)
    _expect(atag, 0x30, "messageImprint.hashAlgorithm")
    _expect(htag, 0x04, "messageImprint.hashedMessage")
    otag, os_, oe = _read(data, as_)
    _expect(otag, 0x06, "hashAlgorithm.algorithm")
    gtag, gs, ge, _ = kids[4]
    _expect(gtag, 0x18, "TSTInfo.genTime")
    nonce = None
    for tag, cs, ce, _ in kids[5:]:
        if tag == 0x02:
            nonce = int.from_bytes(data[cs:ce], "big", signed=True)
    return TSTInfo(
        hash_oid=data[os_:oe],
        hashed=data[hs:he],
        serial=int.from_bytes(data[ss:se], "big", signed=True),
        gen_time=_gen_time(data[gs:ge].decode("ascii")),
        nonce=nonce,
        policy=_oid_text(data[ps:pe]),
    )


def parse_response(data: bytes) -> Response:
    """A DER TimeStampResp: its status, and (granted) the token, its TSTInfo and the
    certificates it carries. DERError if it is not one."""
    try:
        tag, s, e = _read(data)
        _expect(tag, 0x30, "TimeStampResp")
        if e != len(data):
            raise DERError("bytes after the TimeStampResp")
        kids = _children(data, s, e)
        if not kids:
            raise DERError("TimeStampResp: empty")
        tag, ss, se, _ = kids[0]
        _expect(tag, 0x30, "PKIStatusInfo")
        status_kids = _children(data, ss, se)
        _expect(status_kids[0][0], 0x02, "PKIStatus")
        status = int.from_bytes(data[status_kids[0][1] : status_kids[0][2]], "big")
        text = ""
        if len(status_kids) > 1 and status_kids[1][0] == 0x30:
            strings = _children(data, status_kids[1][1], status_kids[1][2])
            text = "; ".join(data[a:b].decode("utf-8", "replace") for _, a, b, _ in strings)
        if len(kids) < 2:
            return Response(status, text, None, None)
        ttag, ts, te, tpos = kids[1]
        _expect(ttag, 0x30, "TimeStampToken")
        token = data[tpos:te]
        ctype, content = _children(data, ts, te)[:2]
        _expect(ctype[0], 0x06, "ContentInfo.contentType")
        if data[ctype[1] : ctype[2]] != SIGNED_DATA_OID:
            raise DERError("the token is not CMS SignedData")
        _expect(content[0], 0xA0, "ContentInfo.content")
        sd_tag, sds, sde = _read(data, content[1])
        _expect(sd_tag, 0x30, "SignedData")
        sd = _children(data, sds, sde)
        encap = sd[2]
        _expect(encap[0], 0x30, "SignedData.encapContentInfo")
        etype, econtent = _children(data, encap[1], encap[2])[:2]
        if data[etype[1] : etype[2]] != TST_INFO_OID:
            raise DERError("the token does not hold a TSTInfo")
        _expect(econtent[0], 0xA0, "eContent")
        otag, os_, oe = _read(data, econtent[1])
        _expect(otag, 0x04, "eContent OCTET STRING")
        tst = _tst_info(data[os_:oe])
        certs = []
        for tag, cs, ce, _ in sd[3:]:
            if tag == 0xA0:  # certificates [0] IMPLICIT SET OF Certificate
                certs = [data[p:ee] for _, _, ee, p in _children(data, cs, ce)]
        return Response(status, text, token, tst, certs)
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, DERError):
            raise
        raise DERError(f"malformed: {exc}") from None


# -- the TSA's signature: openssl ts -verify -------------------------------------------------


@dataclass(frozen=True)
class SignatureResult:
    ok: bool
    trusted: bool  # chains to MEMDUMP_TSA_CA_FILE (False: no CA given, or not to it)
    detail: str


def _pem_certs(certs: list[bytes]) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    out = b""
    for der in certs:
        with contextlib.suppress(ValueError):
            out += x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM)
    return out


def _openssl_verify(tsr: bytes, digest_hex: str, ca_pem: Path, partial: bool) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="memdump-tsr-") as d:
        resp = Path(d) / "resp.tsr"
        resp.write_bytes(tsr)
        argv = ["openssl", "ts", "-verify", "-digest", digest_hex, "-in", str(resp)]
        argv += ["-CAfile", str(ca_pem)]
        if partial:
            argv.append("-partial_chain")
        try:
            done = subprocess.run(  # noqa: S603 - a list, no shell; values are ours
                argv, capture_output=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"openssl ts -verify could not run: {exc}"
    out = (done.stdout + done.stderr).decode("utf-8", "replace")
    lines = [line for line in out.strip().splitlines() if line.strip()]
    # openssl's last line names the failure; the rest is its stack of ASN.1 frames.
    return done.returncode == 0 and "Verification: OK" in out, (lines or [""])[-1][-300:]


def check_signature(
    tsr: bytes, digest_hex: str, resp: Response, ca_file: Path | None
) -> SignatureResult:
    """The TSA's signature over the token: against ``ca_file`` (trusted), and where that
    fails or no CA is given, against the token's own certificate (integrity only)."""
    if ca_file is not None:
        ok, out = _openssl_verify(tsr, digest_hex, ca_file, partial=False)
        if ok:
            return SignatureResult(True, True, "the TSA's signature chains to MEMDUMP_TSA_CA_FILE")
    else:
        out = "MEMDUMP_TSA_CA_FILE unset"
    pem = _pem_certs(resp.certificates)
    if not pem:
        return SignatureResult(False, False, "the token carries no certificate to check it by")
    with tempfile.TemporaryDirectory(prefix="memdump-tsa-") as d:
        own = Path(d) / "own.pem"
        own.write_bytes(pem)
        ok, own_out = _openssl_verify(tsr, digest_hex, own, partial=True)
    if not ok:
        return SignatureResult(False, False, f"the TSA's signature does not check out: {own_out}")
    why = "not to MEMDUMP_TSA_CA_FILE" if ca_file is not None else out
    return SignatureResult(True, False, f"the signature is intact but {why}")


# -- verify's view ---------------------------------------------------------------------------


@dataclass
class TimestampCheck:
    status: TimestampStatus
    detail: str
    gen_time: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "detail": self.detail,
            "gen_time": self.gen_time,
            **self.info,
        }


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check(
    manifest: bytes, tsr: bytes | None, ca_file: Path | None, *, pending: bool = False
) -> TimestampCheck:
    """The token ``tsr`` (a stored TimeStampResp, None if there is none) of the manifest
    bytes ``manifest``: valid (imprint = SHA-256 of the bytes, signature chaining to
    ``ca_file``), or why not. ``pending``: a request for it waits in the queue."""
    if tsr is None:
        if pending:
            return TimestampCheck("pending", "requested; the TSA has not answered yet")
        return TimestampCheck("missing", "no timestamp token beside the manifest")
    if len(tsr) > TSR_MAX_BYTES:
        return TimestampCheck("bad-token", "the .tsr is larger than a timestamp response")
    try:
        resp = parse_response(tsr)
    except DERError as exc:
        return TimestampCheck("bad-token", f"the .tsr is not a timestamp response: {exc}")
    if resp.status not in (0, 1) or resp.tst is None or resp.token is None:
        return TimestampCheck("bad-token", f"the .tsr holds no granted token ({resp.status_text})")
    tst = resp.tst
    gen = _iso(tst.gen_time)
    info = {"serial": tst.serial, "policy": tst.policy}
    digest = hashlib.sha256(manifest).digest()
    if tst.hash_oid != SHA256_OID or tst.hashed != digest:
        return TimestampCheck(
            "bad-token", "the token's imprint is not the SHA-256 of this manifest", gen, info
        )
    sig = check_signature(tsr, digest.hex(), resp, ca_file)
    if not sig.ok:
        return TimestampCheck("bad-token", sig.detail, gen, info)
    if not sig.trusted:
        return TimestampCheck("untrusted-tsa", f"token of {gen}: {sig.detail}", gen, info)
    return TimestampCheck(
        "valid", f"the manifest existed at {gen} (TSA token, {sig.detail})", gen, info
    )


# -- asking the TSA --------------------------------------------------------------------------


def _post(settings: Settings, body: bytes) -> bytes:
    url = settings.tsa_url
    assert url is not None  # noqa: S101 - callers check
    headers = {"Content-Type": CONTENT_TYPE_QUERY, "Accept": CONTENT_TYPE_REPLY}
    if settings.tsa_authorization is not None:
        headers["Authorization"] = settings.tsa_authorization.get_secret_value()
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=settings.tsa_timeout_sec) as answer:  # noqa: S310
            data: bytes = answer.read(TSR_MAX_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise TimestampError(f"timestamp authority {url} unreachable: {exc}", url=url) from exc
    if len(data) > TSR_MAX_BYTES:
        raise TimestampError(f"timestamp authority {url} answered more than a response", url=url)
    return data


def fetch(settings: Settings, digest: bytes) -> tuple[bytes, TimestampCheck]:
    """A checked TimeStampResp for ``digest`` from MEMDUMP_TSA_URL (TimestampError if
    the TSA cannot be reached, refuses, or answers what does not check out)."""
    nonce = secrets.randbits(64)
    data = _post(settings, request(digest, nonce))
    try:
        resp = parse_response(data)
    except DERError as exc:
        raise TimestampError(f"the TSA's answer is not a timestamp response: {exc}") from None
    if resp.status not in (0, 1) or resp.tst is None:
        raise TimestampError(
            f"the TSA refused (status {resp.status}: {resp.status_text or 'no reason'})",
            retryable=resp.status == 3,  # waiting: ask again later
        )
    if resp.tst.hash_oid != SHA256_OID or resp.tst.hashed != digest:
        raise TimestampError("the TSA's token is for another digest than the one sent")
    if resp.tst.nonce != nonce:
        raise TimestampError("the TSA's token does not carry our nonce (a replayed answer?)")
    sig = check_signature(data, digest.hex(), resp, settings.tsa_ca_file)
    if not sig.ok or (settings.tsa_ca_file is not None and not sig.trusted):
        raise TimestampError(f"the TSA's token does not check out: {sig.detail}")
    gen = _iso(resp.tst.gen_time)
    status: TimestampStatus = "valid" if sig.trusted else "untrusted-tsa"
    return data, TimestampCheck(status, sig.detail, gen, {"serial": resp.tst.serial})


def write_token(manifest: Path, data: bytes) -> Path:
    """``data`` beside ``manifest`` as its .tsr (0600, never over an existing one:
    StorageError)."""
    from memdump.signing import _fsync_dir, _write_new

    path = tsr_path(manifest)
    try:
        _write_new(path, data)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise StorageError(
            f"cannot write timestamp token {path}: {exc.strerror or exc}",
            path=str(path),
            errno=exc.errno,
        ) from exc
    return path


# -- the pending-timestamps queue ------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    manifest_sha256 TEXT NOT NULL UNIQUE,
    manifest_path TEXT NOT NULL,
    s3_key TEXT NOT NULL DEFAULT '',
    queued_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
"""


@dataclass(frozen=True)
class Pending:
    seq: int
    manifest_sha256: str
    manifest_path: str  # the local manifest ("" once the local copy is gone)
    s3_key: str  # the manifest's object key, once offloaded
    queued_at: float
    attempts: int
    last_error: str


def queue_path(settings: Settings) -> Path:
    return settings.data_dir / "timestamps.db"


class TimestampQueue:
    """Requests the TSA did not answer, kept until a token is stored (never dropped)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        private_dir(path.parent)
        private_file(path)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self._path, timeout=30)
        try:
            with db:
                yield db
        finally:
            db.close()

    def put(self, manifest_sha256: str, manifest: Path, error: str) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR IGNORE INTO pending (manifest_sha256, manifest_path, queued_at,"
                " last_error) VALUES (?, ?, ?, ?)",
                (manifest_sha256, str(manifest), time.time(), error[:2000]),
            )

    def located(self, manifest_sha256: str, *, s3_key: str, local_kept: bool) -> None:
        """Where the token goes once the dump is offloaded."""
        with self._db() as db:
            if local_kept:
                db.execute(
                    "UPDATE pending SET s3_key = ? WHERE manifest_sha256 = ?",
                    (s3_key, manifest_sha256),
                )
            else:
                db.execute(
                    "UPDATE pending SET s3_key = ?, manifest_path = '' WHERE manifest_sha256 = ?",
                    (s3_key, manifest_sha256),
                )

    def pending(self) -> list[Pending]:
        with self._db() as db:
            rows = db.execute(
                "SELECT seq, manifest_sha256, manifest_path, s3_key, queued_at, attempts,"
                " COALESCE(last_error, '') FROM pending ORDER BY seq"
            ).fetchall()
        return [Pending(*row) for row in rows]

    def is_pending(self, manifest_sha256: str) -> bool:
        with self._db() as db:
            row = db.execute(
                "SELECT 1 FROM pending WHERE manifest_sha256 = ?", (manifest_sha256,)
            ).fetchone()
        return row is not None

    def done(self, seq: int) -> None:
        with self._db() as db:
            db.execute("DELETE FROM pending WHERE seq = ?", (seq,))

    def failed(self, seq: int, error: str) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE pending SET attempts = attempts + 1, last_error = ? WHERE seq = ?",
                (error[:2000], seq),
            )


def is_pending(settings: Settings, manifest_sha256: str) -> bool:
    """Whether a request for this manifest waits in this host's queue (read only: no
    queue file is made where there is none, e.g. on an API host)."""
    path = queue_path(settings)
    if not manifest_sha256 or not path.is_file():
        return False
    return TimestampQueue(path).is_pending(manifest_sha256)


# -- the capture's stamp, and the later fetch -------------------------------------------------


def _tsa_name(url: str) -> str:
    """The TSA's URL without any user:password@ in it (for the custody log)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _custody(
    settings: Settings,
    manifest_sha256: str,
    details: dict[str, Any],
    *,
    manifest: Path | None = None,
    manifest_key: str = "",
) -> None:
    """A ``timestamped`` entry in the dump's custody log (memdump.custody), where its
    manifest is: when the token was asked for, pending, or stored (its genTime). Never
    raises (the custody log keeps what it cannot append in its own outbox)."""
    from memdump import custody
    from memdump.manifest import SUFFIX

    def dump_of(name: str) -> str:
        return name.removesuffix(SUFFIX) + ".mem.gz"

    try:
        local = manifest.with_name(dump_of(manifest.name)) if manifest else None
        key = dump_of(manifest_key) if manifest_key else None
        t = custody.targets(settings, local_dump=local, s3_key=key, manifest_sha256=manifest_sha256)
        custody.record_event(settings, t, "timestamped", details)
    except Exception as exc:  # noqa: BLE001 - the token is stored: a log line only
        log.error("custody log: timestamped entry not written: %s", exc)


def _token_details(data: bytes, got: TimestampCheck, settings: Settings) -> dict[str, Any]:
    return {
        "status": "granted",
        "gen_time": got.gen_time,
        "serial": got.info.get("serial"),
        "tsa": _tsa_name(settings.tsa_url or ""),
        "token_sha256": hashlib.sha256(data).hexdigest(),
    }


@dataclass(frozen=True)
class Stamp:
    status: Literal["granted", "pending", "failed", "off"]
    detail: str
    gen_time: str | None = None


def stamp(settings: Settings, manifest: Path, manifest_sha256: str) -> Stamp:
    """Timestamp the manifest just written (MEMDUMP_TSA_URL set): its token beside it, or
    the request queued. Never raises for the TSA: a capture does not fail for it."""
    if settings.tsa_url is None:
        return Stamp("off", "MEMDUMP_TSA_URL unset")
    try:
        data, got = fetch(settings, bytes.fromhex(manifest_sha256))
        write_token(manifest, data)
    except (TimestampError, StorageError) as exc:
        try:
            TimestampQueue(queue_path(settings)).put(manifest_sha256, manifest, str(exc))
        except (OSError, sqlite3.Error) as qexc:
            # The local disk failed under the queue: the dump is complete all the same,
            # and verify reports its timestamp missing (never a failed capture).
            log.error("timestamp of %s NOT queued: %s (TSA: %s)", manifest.name, qexc, exc)
            return Stamp("failed", f"{exc}; not queued: {qexc}")
        log.warning("timestamp of %s pending (%s): the queue fetches it later", manifest.name, exc)
        details = {"status": "pending", "tsa": _tsa_name(settings.tsa_url), "reason": str(exc)}
        _custody(settings, manifest_sha256, details, manifest=manifest)
        return Stamp("pending", str(exc))
    _custody(settings, manifest_sha256, _token_details(data, got, settings), manifest=manifest)
    return Stamp("granted", got.detail, got.gen_time)


@dataclass(frozen=True)
class FlushResult:
    fetched: int
    left: int
    last_error: str

    def to_dict(self) -> dict[str, Any]:
        return {"fetched": self.fetched, "left": self.left, "last_error": self.last_error}


def _store_token(settings: Settings, item: Pending, data: bytes) -> None:
    """The token beside the manifest wherever it is: the local copy, and the S3 object."""
    if item.manifest_path:
        local = Path(item.manifest_path)
        if local.is_file() and not tsr_path(local).exists():
            write_token(local, data)
    if item.s3_key and settings.s3 is not None:
        from memdump.storage import S3Store

        store = S3Store(settings.s3)
        key = tsr_key(item.s3_key)
        if store.exists(key):
            # Another flush (the runner's loop, the CLI) stored one first: never replaced,
            # and this request is done too.
            return
        with tempfile.TemporaryDirectory(prefix="memdump-tsr-", dir=settings.data_dir) as d:
            tmp = Path(d) / "token.tsr"
            tmp.write_bytes(data)
            store.upload(tmp, key, gz_sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def flush(settings: Settings) -> FlushResult:
    """Fetch the tokens of the queued requests, in order, until the TSA fails; each stored
    beside its manifest (local and S3) before it leaves the queue."""
    path = queue_path(settings)
    if settings.tsa_url is None or not path.is_file():
        return FlushResult(0, 0, "")
    queue = TimestampQueue(path)
    items = queue.pending()
    for i, item in enumerate(items):
        try:
            data, got = fetch(settings, bytes.fromhex(item.manifest_sha256))
            _store_token(settings, item, data)
        except Exception as exc:  # noqa: BLE001 - kept with its reason, retried later
            queue.failed(item.seq, str(exc))
            return FlushResult(i, len(items) - i, str(exc))
        queue.done(item.seq)
        # When it came: the custody log says so, beside the manifest wherever it is.
        details = _token_details(data, got, settings)
        details["late"] = True
        details["queued_at"] = _iso(datetime.fromtimestamp(item.queued_at, UTC))
        manifest = Path(item.manifest_path) if item.manifest_path else None
        _custody(
            settings, item.manifest_sha256, details, manifest=manifest, manifest_key=item.s3_key
        )
        log.info(
            "timestamp of %s fetched (genTime %s)", item.manifest_path or item.s3_key, got.gen_time
        )
    return FlushResult(len(items), 0, "")


def summary(settings: Settings) -> dict[str, Any]:
    """The queue's state (`memdump timestamps flush --json`, logs)."""
    path = queue_path(settings)
    items = TimestampQueue(path).pending() if path.is_file() else []
    return {
        "depth": len(items),
        "oldest_queued_at": min((p.queued_at for p in items), default=None),
        "last_error": items[-1].last_error if items else None,
    }
