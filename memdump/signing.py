"""The collector's signing key and the manifest's detached signature (issue 15).

Key: Ed25519 (``cryptography``), a PKCS#8 PEM file (encrypted when
MEMDUMP_SIGNING_KEY_PASSPHRASE is set). MEMDUMP_SIGNING_KEY_FILE names it; unset, it is
``<data_dir>/keys/collector.key``, generated on first use: written to a temp file
(O_EXCL, 0600) in the 0700 ``keys`` directory, then published with link(2), which never
replaces an existing file: two collectors starting at once end up with one key, and a
reader never sees half of one. A key file readable by others is refused, as ssh does.

Fingerprint: the SHA-256 of the raw 32-byte public key, lowercase hex (64 characters).

Trust: MEMDUMP_TRUSTED_KEYS names a file, one key per line, ``#`` starts a comment; the
first word of a line is a fingerprint (64 hex) or a raw public key in base64 (44
characters); the rest of the line is a free label. Nothing is trusted implicitly, not
even this collector's own key: a key file any process on the collector can replace
would otherwise vouch for whatever it signs, and on the API host "our key" would be a
key no collector holds. The trust anchor is the examiner's, kept apart from the
evidence (``memdump keys show --trusted-line`` prints the line to list a key).

Signature: over the canonical JSON of the manifest (memdump.manifest): keys sorted, no
whitespace (separators ``,`` and ``:``), non-ASCII as UTF-8 (no ``\\u`` escapes), numbers
as Python's json writes them. Detached, beside the manifest as
``<manifest>.sig``: a small JSON envelope (see ``envelope``). Only ``signature`` is
cryptographic; ``key_fingerprint`` is recomputed from ``public_key``, and the rest
(``signed_at``, ``signer``) is information. Detached so that the manifest's bytes, and
the record's ``manifest_sha256`` of them, stay as they were (older tools and records
keep working) and a signature can be added later (``memdump countersign``) without
rewriting evidence.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from memdump.errors import ConfigError, StorageError
from memdump.manifest import SIG_SUFFIX

if TYPE_CHECKING:
    from memdump.settings import Settings

ALGORITHM = "Ed25519"
ENVELOPE_TYPE = "memdump-signature"
CANONICAL = "json: sorted keys, separators ',' ':', UTF-8, no ASCII escapes"
SIG_MAX_BYTES = 64 << 10  # an envelope is a few hundred bytes
_HEX64 = re.compile(r"[0-9a-f]{64}")

SignatureStatus = Literal["valid", "unsigned", "bad-signature", "untrusted-key", "not-checked"]


def canonical(doc: Any) -> bytes:
    """The bytes signed: ``doc`` as canonical JSON (see the module's docstring)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public: bytes | Ed25519PublicKey) -> str:
    """SHA-256 of the raw 32-byte public key, lowercase hex."""
    raw = public if isinstance(public, bytes) else raw_public(public)
    return hashlib.sha256(raw).hexdigest()


def sig_path(manifest: Path) -> Path:
    """``X.manifest.json`` -> ``X.manifest.json.sig`` (same directory)."""
    return manifest.with_name(manifest.name + SIG_SUFFIX)


def sig_key(manifest_key: str) -> str:
    """The same naming for an object key (S3: beside the manifest)."""
    return manifest_key + SIG_SUFFIX


# -- the collector's key ---------------------------------------------------------------------


@dataclass(frozen=True)
class Signer:
    key: Ed25519PrivateKey
    path: Path
    collector_id: str = ""

    @property
    def public_raw(self) -> bytes:
        return raw_public(self.key.public_key())

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_raw)

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)


def key_path(settings: Settings) -> Path:
    return settings.signing_key_file or settings.data_dir / "keys" / "collector.key"


def _passphrase(settings: Settings) -> bytes | None:
    secret = settings.signing_key_passphrase
    return secret.get_secret_value().encode() if secret is not None else None


def collector_signer(settings: Settings) -> Signer:
    """This collector's key: MEMDUMP_SIGNING_KEY_FILE (which must exist), else the data
    dir's, generated on first use (never over an existing one). ConfigError if it cannot
    be read or is not a private Ed25519 key."""
    path = key_path(settings)
    if settings.signing_key_file is None and not path.exists():
        _generate(path, _passphrase(settings))
    return Signer(load_key(path, _passphrase(settings)), path, settings.collector_id)


def load_key(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(
            f"cannot read signing key {path}: {exc.strerror or exc}",
            path=str(path),
            setting="MEMDUMP_SIGNING_KEY_FILE",
        ) from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            raise ConfigError(
                f"signing key {path} is not a private file (mode {st.st_mode & 0o7777:o};"
                " it must be 0600, readable by its owner only)",
                path=str(path),
            )
        data = f.read(64 << 10)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError) as exc:
        # Wrong or missing passphrase, or not a PEM key: the reason, never the bytes.
        raise ConfigError(
            f"signing key {path} cannot be loaded: {exc}",
            path=str(path),
            setting="MEMDUMP_SIGNING_KEY_PASSPHRASE",
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is not an Ed25519 key", path=str(path))
    return key


def _generate(path: Path, passphrase: bytes | None) -> None:
    """A new key at ``path`` unless one is there (or appears meanwhile): the key is whole
    in a private temp file before link(2) publishes it, and link never replaces."""
    from memdump.fsperm import private_dir

    d = private_dir(path.parent)
    st = d.lstat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise ConfigError(
            f"key directory {d} is writable by others (mode {st.st_mode & 0o7777:o}):"
            " a key there could be swapped",
            path=str(d),
        )
    key = Ed25519PrivateKey.generate()
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    tmp = d / f".{path.name}.{secrets.token_hex(8)}.tmp"
    _write_new(tmp, pem)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process made it first: theirs is the key
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(d)


def _write_new(path: Path, data: bytes) -> None:
    """``data`` into a new 0600 file (never over an existing one), on disk on return."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exact, whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)


def _fsync_dir(d: Path) -> None:
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# -- trusted keys ----------------------------------------------------------------------------


def parse_trusted(text: str, source: str = "MEMDUMP_TRUSTED_KEYS") -> frozenset[str]:
    """The fingerprints a trusted-keys file lists (format: the module's docstring). A line
    that is neither a fingerprint nor a public key is an error, never skipped: a typo
    must not silently distrust (or seem to trust) a key."""
    out: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        word = line.split("#", 1)[0].split(maxsplit=1)
        if not word:
            continue
        token = word[0]
        if _HEX64.fullmatch(token.lower()):
            out.add(token.lower())
            continue
        try:
            raw = base64.b64decode(token, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ConfigError(
                f"{source} line {n}: not a SHA-256 fingerprint (64 hex) or an Ed25519"
                " public key (base64 of 32 bytes)",
                line=n,
            )
        out.add(fingerprint(raw))
    return frozenset(out)


def trusted_keys(settings: Settings) -> frozenset[str]:
    """MEMDUMP_TRUSTED_KEYS's fingerprints (none when unset). ConfigError if it is set and
    cannot be read."""
    path = settings.trusted_keys
    if path is None:
        return frozenset()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read the trusted keys {path}: {exc}",
            path=str(path),
            setting="MEMDUMP_TRUSTED_KEYS",
        ) from exc
    return parse_trusted(text, str(path))


# -- the envelope ----------------------------------------------------------------------------


def countersign_message(doc: Any, attests: Mapping[str, Any]) -> bytes:
    """What a countersignature signs: the manifest and the attestation together, so its
    statement and time cannot be stripped to pass it off as a signature made at capture."""
    return canonical({"countersignature": dict(attests), "manifest": doc})


def envelope(
    doc: Mapping[str, Any],
    signer: Signer,
    *,
    file: str,
    role: str = "collector",
    manifest_sha256: str = "",
    attests: Mapping[str, Any] | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """The detached signature of manifest ``doc`` (written as ``file``). With
    ``attests`` (an operator's countersignature, memdump.countersign), the signature is
    over countersign_message and the envelope carries ``attests`` as signed."""
    at = at or datetime.now(UTC)
    message = canonical(doc) if attests is None else countersign_message(doc, attests)
    env: dict[str, Any] = {
        "type": ENVELOPE_TYPE,
        "version": 1,
        "algorithm": ALGORITHM,
        "signed": {"file": file, "canonicalization": CANONICAL},
        "key_fingerprint": signer.fingerprint,
        "public_key": base64.b64encode(signer.public_raw).decode(),
        "signature": base64.b64encode(signer.sign(message)).decode(),
        "signed_at": at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "signer": {"role": role, "collector_id": signer.collector_id},
        # The SHA-256 of the manifest file's bytes (the record's manifest_sha256): a hint
        # for a reader, not signed (the signature is over the canonical JSON).
        "manifest_sha256": manifest_sha256,
    }
    if attests is not None:
        env["attests"] = dict(attests)
    return env


def encode_envelope(env: Mapping[str, Any]) -> bytes:
    return (json.dumps(env, indent=2, sort_keys=True) + "\n").encode()


def write_signature(manifest: Path, env: Mapping[str, Any]) -> Path:
    """``env`` beside ``manifest`` (0600, never over an existing one: StorageError)."""
    path = sig_path(manifest)
    try:
        _write_new(path, encode_envelope(env))
        _fsync_dir(path.parent)
    except OSError as exc:
        raise StorageError(
            f"cannot write signature {path}: {exc.strerror or exc}",
            path=str(path),
            errno=exc.errno,
        ) from exc
    return path


@dataclass
class SignatureCheck:
    status: SignatureStatus
    detail: str
    key_fingerprint: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "detail": self.detail,
            "key_fingerprint": self.key_fingerprint,
            **self.info,
        }


def open_envelope(
    env: Mapping[str, Any], what: str, info: dict[str, Any]
) -> tuple[bytes, bytes, str] | SignatureCheck:
    """(public key, signature, fingerprint) of an envelope's ``public_key``,
    ``signature`` and ``key_fingerprint`` (also the record's, memdump.recordsig), or the
    bad-signature that says why not (``what``: whose, in the detail)."""
    try:
        public = base64.b64decode(str(env.get("public_key")), validate=True)
        signature = base64.b64decode(str(env.get("signature")), validate=True)
    except (binascii.Error, ValueError):
        return SignatureCheck("bad-signature", f"{what}'s key or signature is not base64")
    if len(public) != 32:
        return SignatureCheck("bad-signature", f"{what}'s public key is not 32 bytes")
    fp = fingerprint(public)
    if env.get("key_fingerprint") != fp:
        return SignatureCheck(
            "bad-signature", f"{what}'s fingerprint is not its public key's", fp, info
        )
    return public, signature, fp


def untrusted_reason(trusted: frozenset[str]) -> str:
    return (
        "is not in MEMDUMP_TRUSTED_KEYS"
        if trusted
        else "is not trusted (MEMDUMP_TRUSTED_KEYS unset)"
    )


def check(manifest: bytes, sig: bytes | None, trusted: frozenset[str]) -> SignatureCheck:
    """The signature ``sig`` (an envelope's bytes, None if there is none) of the manifest
    bytes ``manifest``: valid by a trusted key, or why not."""
    if sig is None:
        return SignatureCheck("unsigned", "the manifest has no signature")
    if len(sig) > SIG_MAX_BYTES:
        return SignatureCheck("bad-signature", "the signature file is larger than an envelope")
    try:
        env = json.loads(sig)
    except ValueError:
        env = None
    if not isinstance(env, dict) or env.get("type") != ENVELOPE_TYPE:
        return SignatureCheck("bad-signature", "the signature file is not a memdump envelope")
    if env.get("algorithm") != ALGORITHM:
        return SignatureCheck("bad-signature", f"unknown algorithm {str(env.get('algorithm'))!r}")
    signer: dict[str, Any] = env["signer"] if isinstance(env.get("signer"), dict) else {}
    info = {"signed_at": env.get("signed_at"), "role": signer.get("role")}
    opened = open_envelope(env, "the envelope", info)
    if isinstance(opened, SignatureCheck):
        return opened
    public, signature, fp = opened
    try:
        doc = json.loads(manifest)
    except ValueError:
        return SignatureCheck("bad-signature", "the manifest is not JSON", fp, info)
    attests = env.get("attests")
    if attests is not None and not isinstance(attests, dict):
        return SignatureCheck("bad-signature", "the envelope's attestation is not an object")
    if attests is not None:
        info["role"] = "countersign"
        info["attests"] = attests
    message = canonical(doc) if attests is None else countersign_message(doc, attests)
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except InvalidSignature:
        return SignatureCheck(
            "bad-signature",
            f"the signature by key {fp[:16]}... does not match the manifest (edited since?)",
            fp,
            info,
        )
    if fp not in trusted:
        why = untrusted_reason(trusted)
        return SignatureCheck("untrusted-key", f"signed by key {fp} which {why}", fp, info)
    if attests is not None:
        when = attests.get("attested_at")
        return SignatureCheck(
            "valid",
            f"countersigned by trusted key {fp[:16]}... at {when}: it attests to the state"
            " verified then, not to the capture",
            fp,
            info,
        )
    return SignatureCheck("valid", f"signed by trusted key {fp[:16]}...", fp, info)
