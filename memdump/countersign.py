"""``memdump countersign``: an operator's signature on a dump from before signing (issue
15). It attests to the dump's state now only: the dump is verified first (every hash
agreeing with the record and the manifest, no signature yet) and the envelope's
``attests`` (signed with the manifest: memdump.signing.countersign_message) says when and
what was checked, and that it says nothing of the time before. Written as the manifest's
``.sig`` beside it (0600, never over an existing one; S3: If-None-Match), where verify
looks for it."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from memdump.errors import CountersignRefusedError
from memdump.locations import Location
from memdump.manifest import manifest_key, manifest_path
from memdump.settings import Settings
from memdump.signing import collector_signer, envelope, sig_key, write_signature
from memdump.stored import open_stored
from memdump.verify import MANIFEST_MAX_BYTES, verify

STATEMENT = (
    "attests only that at attested_at this dump and its manifest matched the record"
    " (verified); it says nothing of their state before that time"
)


@dataclass(frozen=True)
class Countersigned:
    dump_path: str
    signature: str  # the file or s3:// URI written
    key_fingerprint: str
    attests: dict[str, Any]


def countersign(record: Mapping[str, Any], settings: Settings) -> Countersigned:
    """Countersign the dump of ``record`` with this collector's key (CountersignRefused
    unless it verifies as ``unsigned``)."""
    signer = collector_signer(settings)
    where = str(record["dump_path"])
    v = verify(record, settings, by="countersign")
    if v.status != "unsigned":
        why = {
            "verified": "it is signed by a trusted key already",
            "untrusted-key": "it is signed already (list its key if you trust it)",
        }.get(v.status, "it does not verify: countersigning would vouch for it as it is")
        raise CountersignRefusedError(
            f"not countersigned ({v.status}): {why}; {v.detail}", status=v.status, path=where
        )
    stored = open_stored(Location.of(where), settings)
    data = stored.manifest(MANIFEST_MAX_BYTES + 1)
    expected = str(record.get("manifest_sha256") or "")
    if data is None or not expected:
        raise CountersignRefusedError(
            "not countersigned: the record has no manifest to sign", status=v.status, path=where
        )
    if hashlib.sha256(data).hexdigest() != expected:  # changed since verify read it
        raise CountersignRefusedError(
            "not countersigned: the manifest changed while it was verified", path=where
        )
    doc = json.loads(data)
    at = datetime.now(UTC)
    attests = {
        "role": "countersign",
        "attested_at": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "statement": STATEMENT,
        "dump": where,
        "verified": {k: record.get(k) for k in ("sha256", "gz_sha256", "manifest_sha256")},
    }
    if stored.location.kind == "s3":
        key = manifest_key(stored.location.key(settings.s3))
        env = envelope(doc, signer, file=key, role="countersign", attests=attests, at=at)
        target = _upload(env, sig_key(key), settings)
    else:
        mpath = manifest_path(stored.location.path(settings.dump_dir))
        env = envelope(doc, signer, file=mpath.name, role="countersign", attests=attests, at=at)
        target = str(write_signature(mpath, env))
    return Countersigned(where, target, signer.fingerprint, attests)


def _upload(env: Mapping[str, Any], key: str, settings: Settings) -> str:
    from memdump.signing import encode_envelope
    from memdump.storage import S3Store

    assert settings.s3 is not None  # noqa: S101 - an s3 location needs it
    data = encode_envelope(env)
    with tempfile.TemporaryDirectory(prefix="memdump-countersign-") as tmp:
        path = Path(tmp) / "envelope.sig"
        path.write_bytes(data)
        obj = S3Store(settings.s3).upload(
            path, key, gz_sha256=hashlib.sha256(data).hexdigest(), size=len(data)
        )
    return obj.uri
