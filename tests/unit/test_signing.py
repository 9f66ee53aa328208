"""Issue 15, items 1 and 2 (the manifest): the collector's Ed25519 key (made on first use,
0600 in a 0700 dir, never overwritten, its fingerprint), trusted keys, the canonical JSON
signed and the detached envelope, and what `verify` reports for each kind of tampering:
a manifest edited on disk, a dump replaced together with a recomputed manifest and
record (signed by a key nobody trusts, or not signed), a signature removed."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import SecretStr

from memdump import manifest, signing
from memdump.errors import ConfigError, StorageError
from memdump.manifest import manifest_path
from memdump.settings import Settings
from memdump.verify import verify
from tests.helpers.signing import other_signer, trusting
from tests.helpers.verify_dumps import HIGH, Made, core, guest_ram, write_dump

REPO = Path(__file__).resolve().parents[2]


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", dump_dir=tmp_path / "dumps")


# -- item 1: keys -------------------------------------------------------------------------


def test_a_key_is_made_on_first_use_0600_in_a_0700_dir_and_then_reused(
    settings: Settings,
) -> None:
    old = os.umask(0o022)  # whatever the caller's umask
    try:
        first = signing.collector_signer(settings)
    finally:
        os.umask(old)
    assert first.path == settings.data_dir / "keys" / "collector.key"
    assert mode(first.path) == 0o600 and mode(first.path.parent) == 0o700
    assert [p.name for p in first.path.parent.iterdir()] == ["collector.key"]  # no temp left
    again = signing.collector_signer(settings)
    assert again.fingerprint == first.fingerprint


def test_an_existing_key_is_never_overwritten(settings: Settings) -> None:
    keydir = settings.data_dir / "keys"
    keydir.mkdir(parents=True, mode=0o700)
    mine = Ed25519PrivateKey.generate()
    pem = mine.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = keydir / "collector.key"
    path.write_bytes(pem)
    path.chmod(0o600)
    # Even asked to generate (as a racing process would be), link(2) keeps the one there.
    signing._generate(path, None)
    assert path.read_bytes() == pem
    assert signing.collector_signer(settings).fingerprint == signing.fingerprint(mine.public_key())


def test_collectors_starting_at_once_end_up_with_one_key(settings: Settings) -> None:
    found: list[str] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        found.append(signing.collector_signer(settings).fingerprint)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 8 and len(set(found)) == 1
    assert [p.name for p in (settings.data_dir / "keys").iterdir()] == ["collector.key"]


def test_the_fingerprint_is_the_sha256_of_the_raw_public_key(settings: Settings) -> None:
    signer = signing.collector_signer(settings)
    raw = signer.key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert len(raw) == 32
    assert signer.fingerprint == hashlib.sha256(raw).hexdigest()
    assert len(signer.fingerprint) == 64


def test_a_key_readable_by_others_is_refused(settings: Settings) -> None:
    path = signing.collector_signer(settings).path
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="not a private file"):
        signing.collector_signer(settings)


def test_a_configured_key_file_must_exist_it_is_not_made(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "data", signing_key_file=tmp_path / "nope.key")
    with pytest.raises(ConfigError, match="cannot read signing key"):
        signing.collector_signer(s)
    assert not (tmp_path / "nope.key").exists() and not (tmp_path / "data").exists()


def test_a_passphrase_encrypts_the_key_it_makes(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path / "data", signing_key_passphrase=SecretStr("correct horse"))
    signer = signing.collector_signer(s)
    assert b"ENCRYPTED" in signer.path.read_bytes()
    assert signing.collector_signer(s).fingerprint == signer.fingerprint
    wrong = Settings(data_dir=tmp_path / "data", signing_key_passphrase=SecretStr("battery staple"))
    with pytest.raises(ConfigError, match="cannot be loaded") as err:
        signing.collector_signer(wrong)
    assert "battery" not in str(err.value)
    with pytest.raises(ConfigError):
        signing.collector_signer(Settings(data_dir=tmp_path / "data"))


def test_trusted_keys_by_fingerprint_or_public_key(settings: Settings, tmp_path: Path) -> None:
    a = signing.collector_signer(settings)
    b = other_signer(tmp_path)
    text = (
        "# examiner's list\n\n"
        f"{a.fingerprint.upper()} collector-a  # upper case is the same fingerprint\n"
        f"   {base64.b64encode(b.public_raw).decode()} collector-b\n"
    )
    assert signing.parse_trusted(text) == {a.fingerprint, b.fingerprint}
    with pytest.raises(ConfigError, match="line 2"):
        signing.parse_trusted(f"{a.fingerprint}\n{a.fingerprint[:-1]}\n")
    listed = tmp_path / "trusted"
    listed.write_text(text)
    s = settings.model_copy(update={"trusted_keys": listed})
    assert signing.trusted_keys(s) == {a.fingerprint, b.fingerprint}
    assert signing.trusted_keys(settings) == frozenset()  # unset: nothing, not even ours
    with pytest.raises(ConfigError, match="cannot read the trusted keys"):
        signing.trusted_keys(settings.model_copy(update={"trusted_keys": tmp_path / "gone"}))


def test_keys_show_prints_the_public_key_and_its_fingerprint(settings: Settings) -> None:
    env = {**os.environ, "MEMDUMP_DATA_DIR": str(settings.data_dir)}
    env.pop("MEMDUMP_SIGNING_KEY_FILE", None)
    env.pop("MEMDUMP_TRUSTED_KEYS", None)

    def keys(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "memdump.cli", "keys", "show", *args],
            env=env, cwd=REPO, capture_output=True, text=True, check=True,
        )  # fmt: skip
        return out.stdout

    shown = json.loads(keys("--json"))
    signer = signing.collector_signer(settings)  # the key the command made
    assert shown["fingerprint"] == signer.fingerprint and shown["trusted"] is False
    assert base64.b64decode(shown["public_key"]) == signer.public_raw
    line = keys("--trusted-line")
    assert signing.parse_trusted(line) == {signer.fingerprint}
    (settings.data_dir / "trusted").write_text(line)
    env["MEMDUMP_TRUSTED_KEYS"] = str(settings.data_dir / "trusted")
    assert json.loads(keys("--json"))["trusted"] is True
    assert signer.fingerprint in keys()


# -- item 2: canonical JSON, the envelope ----------------------------------------------------


def test_canonical_json_ignores_key_order_and_whitespace() -> None:
    a = json.loads('{"b": [1, 2.5, "é"], "a": {"y": null, "x": true}}')
    b = json.loads('{\n  "a": {"x": true, "y": null},\n  "b": [1, 2.5, "é"]\n}')
    assert signing.canonical(a) == signing.canonical(b)
    assert signing.canonical(a) == '{"a":{"x":true,"y":null},"b":[1,2.5,"é"]}'.encode()


def test_envelope_checks_valid_edited_untrusted_unsigned_forged(
    settings: Settings, tmp_path: Path
) -> None:
    signer = signing.collector_signer(settings)
    doc = {"manifest_version": 3, "output": {"raw_sha256": "ab" * 32}}
    data = manifest.encode(doc)
    env = signing.encode_envelope(signing.envelope(doc, signer, file="x.manifest.json"))
    trusted = frozenset({signer.fingerprint})
    assert signing.check(data, env, trusted).status == "valid"
    # Reformatted but the same document: still valid (the canonical JSON is signed).
    assert signing.check(json.dumps(doc).encode(), env, trusted).status == "valid"
    edited = manifest.encode({**doc, "output": {"raw_sha256": "cd" * 32}})
    assert signing.check(edited, env, trusted).status == "bad-signature"
    assert signing.check(data, env, frozenset()).status == "untrusted-key"
    assert signing.check(data, None, trusted).status == "unsigned"
    # A valid signature by another key, relabelled with the trusted key's fingerprint.
    forged = json.loads(
        signing.encode_envelope(
            signing.envelope(doc, other_signer(tmp_path), file="x.manifest.json")
        )
    )
    forged["key_fingerprint"] = signer.fingerprint
    got = signing.check(data, json.dumps(forged).encode(), trusted)
    assert got.status == "bad-signature" and "fingerprint" in got.detail
    assert signing.check(data, b"not json", trusted).status == "bad-signature"


def test_manifest_write_signs_beside_it_0600_never_over_a_signature(
    settings: Settings,
) -> None:
    settings.dump_dir.mkdir(mode=0o700)
    dump = settings.dump_dir / "hv_vm_1.mem.gz"
    path, digest = manifest.write(dump, {"manifest_version": 3}, settings=settings)
    sig = signing.sig_path(path)
    assert sig.name == "hv_vm_1.manifest.json.sig" and mode(sig) == 0o600
    env = json.loads(sig.read_bytes())
    assert env["algorithm"] == "Ed25519" and env["signed"]["file"] == path.name
    assert env["manifest_sha256"] == digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert env["key_fingerprint"] == signing.collector_signer(settings).fingerprint

    # A signature already there (planted, or a countersignature) is never replaced: the
    # write fails and leaves no unsigned manifest behind.
    other = settings.dump_dir / "hv_vm_2.mem.gz"
    planted = signing.sig_path(manifest_path(other))
    planted.write_bytes(b"planted")
    with pytest.raises(StorageError, match="cannot write signature"):
        manifest.write(other, {"manifest_version": 3}, settings=settings)
    assert planted.read_bytes() == b"planted" and not manifest_path(other).exists()


# -- item 2: what verify reports -------------------------------------------------------------


@pytest.fixture
def signed(settings: Settings, tmp_path: Path) -> tuple[Made, Settings]:
    s = trusting(settings, tmp_path)
    return write_dump(s.dump_dir, core(guest_ram(1)), settings=s), s


def test_a_signed_dump_verifies_whole_and_by_range(signed: tuple[Made, Settings]) -> None:
    made, s = signed
    v = verify(made.row, s)
    assert v.status == "verified", v
    assert v.signature is not None and v.signature["status"] == "valid"
    assert v.signature["key_fingerprint"] == signing.collector_signer(s).fingerprint
    assert verify(made.row, s, guest_range=(HIGH, HIGH + 0x1000)).status == "verified"


def test_without_the_key_trusted_it_is_untrusted_key(signed: tuple[Made, Settings]) -> None:
    made, s = signed
    v = verify(made.row, s.model_copy(update={"trusted_keys": None}))
    assert v.status == "untrusted-key" and "MEMDUMP_TRUSTED_KEYS" in v.detail, v
    r = verify(made.row, s.model_copy(update={"trusted_keys": None}), guest_range=(HIGH, HIGH + 1))
    assert r.status == "untrusted-key"


def test_a_manifest_edited_on_disk_is_caught(signed: tuple[Made, Settings]) -> None:
    made, s = signed
    mpath = manifest_path(made.path)
    doc = json.loads(mpath.read_bytes())
    doc["vm"] = {"name": "someone-else"}
    mpath.write_bytes(manifest.encode(doc))
    # The record still names the original: a mismatch, and the signature says why too.
    v = verify(made.row, s)
    assert v.status == "mismatch" and "manifest_sha256" in v.detail, v
    assert v.signature is not None and v.signature["status"] == "bad-signature"
    # The record rewritten to match (a store's write token is enough): bad-signature.
    row = {**made.row, "manifest_sha256": hashlib.sha256(mpath.read_bytes()).hexdigest()}
    v = verify(row, s)
    assert v.status == "bad-signature", v


def _replace(made: Made, s: Settings, signer: signing.Signer | None) -> dict[str, Any]:
    """The dump replaced by other memory, with a manifest and record recomputed to match
    it (every hash consistent), signed by ``signer`` or not at all."""
    other = write_dump(s.dump_dir, core(guest_ram(7)))  # unsigned, its own name
    mpath, opath = manifest_path(made.path), manifest_path(other.path)
    for p in (mpath, signing.sig_path(mpath)):
        p.unlink()
    os.replace(other.path, made.path)
    doc = json.loads(opath.read_bytes())
    opath.unlink()
    data = manifest.encode(doc)
    mpath.write_bytes(data)
    if signer is not None:
        env = signing.envelope(doc, signer, file=mpath.name)
        signing.write_signature(mpath, env)
    rec = dataclasses.replace(
        other.record, dump_path=str(made.path), manifest_sha256=hashlib.sha256(data).hexdigest()
    )
    return rec.api_dict()


def test_a_replaced_dump_signed_by_an_untrusted_key(
    signed: tuple[Made, Settings], tmp_path: Path
) -> None:
    made, s = signed
    row = _replace(made, s, other_signer(tmp_path))
    v = verify(row, s)
    assert all(c["ok"] for c in v.checks.values() if "ok" in c), v.checks  # hashes agree
    assert v.status == "untrusted-key", v


def test_a_replaced_dump_without_a_signature_is_unsigned(signed: tuple[Made, Settings]) -> None:
    made, s = signed
    row = _replace(made, s, None)
    v = verify(row, s)
    assert all(c["ok"] for c in v.checks.values() if "ok" in c), v.checks
    assert v.status == "unsigned", v


def test_a_removed_signature_is_unsigned_a_damaged_one_bad(signed: tuple[Made, Settings]) -> None:
    made, s = signed
    sig = signing.sig_path(manifest_path(made.path))
    env = json.loads(sig.read_bytes())
    raw = bytearray(base64.b64decode(env["signature"]))
    raw[0] ^= 1
    env["signature"] = base64.b64encode(bytes(raw)).decode()
    sig.write_text(json.dumps(env))
    assert verify(made.row, s).status == "bad-signature"
    sig.unlink()
    assert verify(made.row, s).status == "unsigned"


def test_a_hash_mismatch_outranks_a_valid_signature(signed: tuple[Made, Settings]) -> None:
    made, s = signed
    data = bytearray(made.path.read_bytes())
    data[len(data) // 2] ^= 1
    made.path.write_bytes(data)
    v = verify(made.row, s)
    assert v.status == "mismatch" and v.signature is not None
    assert v.signature["status"] == "valid"


def test_deleting_a_local_copy_takes_its_signature(signed: tuple[Made, Settings]) -> None:
    """Retention deletes a copy through memdump.stored: the .sig goes with the manifest."""
    from memdump.locations import Location
    from memdump.stored import open_stored

    made, s = signed
    sig = signing.sig_path(manifest_path(made.path))
    assert sig.is_file()
    assert open_stored(Location.of(str(made.path)), s).delete()
    assert not made.path.exists() and not manifest_path(made.path).exists()
    assert not sig.exists()
