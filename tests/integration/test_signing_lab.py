"""Issue 15, items 1 and 2 on the real parts: a lab capture through the real chain is
signed by the collector's key and verifies as ``verified``; its signature checks out with
python's cryptography and with the openssl command alone (the README's walk-through,
without memdump); offloaded to the moto S3 server, the signature travels with the
manifest, verify of the object checks it (a swapped or removed signature object is
named, an operator countersigns it in place), and retention's delete takes it with the dump."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
import subprocess
from pathlib import Path

import pytest
from pydantic import SecretStr

from memdump.chain import run_chain
from memdump.countersign import countersign
from memdump.errors import CountersignRefusedError
from memdump.hypervisors import Driver
from memdump.locations import Location
from memdump.manifest import manifest_key, manifest_path
from memdump.settings import S3Settings, Settings
from memdump.signing import encode_envelope, envelope
from memdump.stored import open_stored
from memdump.verify import verify
from tests.helpers.moto import new_bucket
from tests.helpers.signing import other_signer
from tests.helpers.stores import record_row

pytestmark = pytest.mark.lab

VM = "vm-web-01"
# DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the raw key follows.
SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(
        update={
            "data_dir": tmp_path / "data",
            "analysis": settings.analysis.model_copy(update={"enabled": False}),
        }
    )


def _canonical(manifest: bytes) -> bytes:
    """The examiner's canonical JSON, with the standard library only."""
    doc = json.loads(manifest)
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_a_lab_capture_is_signed_and_verified_and_checks_out_without_memdump(
    driver: Driver, settings: Settings, tmp_path: Path
) -> None:
    done = run_chain(driver, driver.resolve(VM), settings, mode="paused")
    dump = Path(done.record.dump_path)
    mpath = manifest_path(dump)
    sig = mpath.with_name(mpath.name + ".sig")
    assert stat.S_IMODE(sig.stat().st_mode) == 0o600
    v = verify(record_row(settings, str(dump)), settings)
    assert v.status == "verified", v
    assert v.signature is not None and v.signature["status"] == "valid"

    # The walk-through: python's cryptography, nothing of memdump.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    env = json.loads(sig.read_bytes())
    public = base64.b64decode(env["public_key"])
    signature = base64.b64decode(env["signature"])
    assert hashlib.sha256(public).hexdigest() == env["key_fingerprint"]
    assert env["key_fingerprint"] in settings.trusted_keys.read_text()  # type: ignore[union-attr]
    message = _canonical(mpath.read_bytes())
    Ed25519PublicKey.from_public_bytes(public).verify(signature, message)  # raises if not

    # And openssl alone: the raw key as a PEM, the canonical bytes, the raw signature.
    work = tmp_path / "examiner"
    work.mkdir()
    (work / "pub.der").write_bytes(SPKI_PREFIX + public)
    (work / "manifest.canonical").write_bytes(message)
    (work / "manifest.sig.bin").write_bytes(signature)

    def openssl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["openssl", *args], cwd=work, capture_output=True, text=True)

    pem = openssl("pkey", "-pubin", "-inform", "DER", "-in", "pub.der", "-out", "pub.pem")
    assert pem.returncode == 0, pem.stderr
    check = ["pkeyutl", "-verify", "-pubin", "-inkey", "pub.pem", "-rawin"]
    ok = openssl(*check, "-in", "manifest.canonical", "-sigfile", "manifest.sig.bin")
    assert ok.returncode == 0 and "Signature Verified Successfully" in ok.stdout, ok
    # One changed byte of the manifest and openssl says no as well.
    (work / "manifest.canonical").write_bytes(message.replace(b'"paused"', b'"PAUSED"', 1))
    bad = openssl(*check, "-in", "manifest.canonical", "-sigfile", "manifest.sig.bin")
    assert bad.returncode != 0, bad


def test_offloaded_to_s3_the_signature_travels_and_is_checked(
    driver: Driver, settings: Settings, moto_url: str, tmp_path: Path
) -> None:
    client, bucket = new_bucket(moto_url, "sig")
    s3 = S3Settings(
        bucket=bucket, endpoint_url=moto_url, access_key_id="t", secret_access_key=SecretStr("t"),
        keep_local=False,
    )  # fmt: skip
    s = settings.model_copy(update={"s3": s3})
    done = run_chain(driver, driver.resolve(VM), s, mode="paused")
    uri = done.record.dump_path
    key = uri.removeprefix(f"s3://{bucket}/")
    skey = manifest_key(key) + ".sig"
    # The local copies, signature too, are gone.
    assert [p for p in s.dump_dir.iterdir() if p.name.endswith((".gz", ".json", ".sig"))] == []
    stored_sig = client.get_object(Bucket=bucket, Key=skey)["Body"].read()
    row = record_row(s, uri)
    v = verify(row, s)
    assert v.status == "verified", v

    # A signature object swapped for one by a key nobody trusts: named.
    mdata = client.get_object(Bucket=bucket, Key=manifest_key(key))["Body"].read()
    forged = envelope(json.loads(mdata), other_signer(tmp_path), file=manifest_key(key))
    client.put_object(Bucket=bucket, Key=skey, Body=encode_envelope(forged))
    assert verify(row, s).status == "untrusted-key"
    client.delete_object(Bucket=bucket, Key=skey)
    assert verify(row, s).status == "unsigned"
    # An operator's countersignature goes where the signature was (If-None-Match).
    signed = countersign(row, s)
    assert signed.signature == f"s3://{bucket}/{skey}"
    v = verify(row, s)
    assert v.status == "verified" and v.signature is not None, v
    assert v.signature["role"] == "countersign"
    with pytest.raises(CountersignRefusedError):
        countersign(row, s)

    # Retention's delete (memdump.stored) takes the signature with the dump and manifest.
    client.put_object(Bucket=bucket, Key=skey, Body=stored_sig)
    assert verify(row, s).status == "verified"
    assert open_stored(Location.of(uri), s).delete()
    listed = {o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert not listed & {key, manifest_key(key), skey}, listed
