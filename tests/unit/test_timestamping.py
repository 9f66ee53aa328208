"""Issue 15, item 4: RFC 3161 trusted timestamps of each manifest (memdump.timestamping),
against a local TSA on loopback (OpenSSL's ``openssl ts -reply`` behind http.server,
tests/helpers/tsa.py): the DER request OpenSSL reads back as sent, the response parsed
and checked (status, imprint, nonce, the TSA's signature against the configured CA), a
forged, altered or untrusted token refused, a TSA that is down queues the request and a
later flush stores the token, and verify reports the token (a bad one is a bad
signature, an untrusted TSA an untrusted key; missing and pending change nothing)."""

from __future__ import annotations

import hashlib
import json
import re
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from memdump import timestamping as ts
from memdump.errors import StorageError, TimestampError
from memdump.manifest import manifest_path
from memdump.settings import Settings
from memdump.verify import verify
from tests.helpers.signing import trusting
from tests.helpers.tsa import LocalTSA, closed_url, local_tsa, make_pki
from tests.helpers.verify_dumps import Made, core, guest_ram, write_dump

MANIFEST = b'{\n  "output": {"file": "x.mem.gz"}\n}\n'


@pytest.fixture
def tsa(tmp_path: Path) -> Iterator[LocalTSA]:
    with local_tsa(tmp_path / "tsa") as t:
        yield t


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    """A CA the local TSA's certificate does not chain to."""
    make_pki(tmp_path / "other", "someone else")
    return tmp_path / "other" / "ca.pem"


@pytest.fixture
def settings(tmp_path: Path, tsa: LocalTSA) -> Settings:
    base = Settings(dump_dir=tmp_path / "dumps", data_dir=tmp_path / "data")
    signed = trusting(base, tmp_path)
    return signed.model_copy(update={"tsa_url": tsa.url, "tsa_ca_file": tsa.ca})


def _token(settings: Settings, data: bytes = MANIFEST) -> bytes:
    tsr, _ = ts.fetch(settings, hashlib.sha256(data).digest())
    return tsr


# -- DER: the request and the response ---------------------------------------------------------


def test_the_request_is_a_der_timestampreq_openssl_reads_back(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"manifest").digest()
    q = tmp_path / "q.tsq"
    q.write_bytes(ts.request(digest, 0x8123456789ABCDEF))
    out = subprocess.run(
        ["openssl", "ts", "-query", "-in", str(q), "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Hash Algorithm: sha256" in out
    assert "Certificate required: yes" in out
    assert re.search(r"Nonce: 0x0?8123456789ABCDEF", out, re.I), out
    hexdump = "".join(re.findall(r"^\s*[0-9a-f]{4} - ((?:[0-9a-f]{2}[ -]?)+)", out, re.M | re.I))
    assert digest.hex() in re.sub(r"[ -]", "", hexdump).lower()


def test_a_granted_response_is_parsed(settings: Settings) -> None:
    tsr = _token(settings)
    resp = ts.parse_response(tsr)
    assert resp.status == 0
    assert resp.tst is not None and resp.token is not None
    assert resp.tst.hash_oid == ts.SHA256_OID
    assert resp.tst.hashed == hashlib.sha256(MANIFEST).digest()
    assert resp.tst.policy == "1.3.6.1.4.1.99999.1"
    assert resp.tst.nonce is not None
    assert resp.certificates  # certReq: the TSA's certificate is in the token


def test_a_refusal_is_parsed_and_never_taken(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PKIStatusInfo { rejection(2), statusString { "bad alg" } }, no token.
    text = b"bad alg"
    info = b"\x02\x01\x02" + b"\x30" + bytes([len(text) + 2]) + b"\x0c" + bytes([len(text)]) + text
    refusal = b"\x30" + bytes([len(info) + 2]) + b"\x30" + bytes([len(info)]) + info
    resp = ts.parse_response(refusal)
    assert (resp.status, resp.status_text, resp.token) == (2, "bad alg", None)
    monkeypatch.setattr(ts, "_post", lambda _s, _b: refusal)
    with pytest.raises(TimestampError, match="refused .*bad alg"):
        ts.fetch(settings, hashlib.sha256(MANIFEST).digest())


def test_a_replayed_answer_without_our_nonce_is_refused(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _token(settings)  # a genuine token for the same digest, another request's nonce
    monkeypatch.setattr(ts, "_post", lambda _s, _b: old)
    with pytest.raises(TimestampError, match="nonce"):
        ts.fetch(settings, hashlib.sha256(MANIFEST).digest())


def _nonce_of(query: bytes) -> int:
    """The nonce of a TimeStampReq (its third field)."""
    _, start, end = ts._read(query)
    _, cs, ce, _ = ts._children(query, start, end)[2]
    return int.from_bytes(query[cs:ce], "big")


def test_an_answer_for_another_digest_is_refused(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ts._post

    def other_digest(s: Settings, body: bytes) -> bytes:
        digest = hashlib.sha256(b"something else").digest()
        return real(s, ts.request(digest, _nonce_of(body)))

    monkeypatch.setattr(ts, "_post", other_digest)
    with pytest.raises(TimestampError, match="another digest"):
        ts.fetch(settings, hashlib.sha256(MANIFEST).digest())


def test_garbage_is_not_a_response() -> None:
    for junk in (b"", b"\x30\x80\x00\x00", b"<html>503</html>", b"\x30\x05\x02\x01\x00"):
        with pytest.raises(ts.DERError):
            ts.parse_response(junk)


# -- the token's check -------------------------------------------------------------------------


def test_a_token_from_the_local_tsa_verifies_and_openssl_agrees(
    settings: Settings, tsa: LocalTSA, tmp_path: Path
) -> None:
    tsr = _token(settings)
    got = ts.check(MANIFEST, tsr, tsa.ca)
    assert got.status == "valid", got
    assert got.gen_time is not None and got.gen_time.endswith("Z")
    # The examiner's check, without memdump (README "Trusted timestamps").
    (tmp_path / "m.json").write_bytes(MANIFEST)
    (tmp_path / "m.json.tsr").write_bytes(tsr)
    out = subprocess.run(
        ["openssl", "ts", "-verify", "-data", str(tmp_path / "m.json")]
        + ["-in", str(tmp_path / "m.json.tsr"), "-CAfile", str(tsa.ca)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0 and "Verification: OK" in out.stdout, out


def test_an_altered_token_is_a_bad_token(settings: Settings, tsa: LocalTSA) -> None:
    tsr = _token(settings)
    resp = ts.parse_response(tsr)
    assert resp.tst is not None
    gen = resp.tst.gen_time.strftime("%Y%m%d%H%M%S").encode()
    at = tsr.index(gen)
    for offset in (len(tsr) - 1, at + 3):  # the signature's last byte; a digit of genTime
        bad = bytearray(tsr)
        bad[offset] ^= 0x01
        got = ts.check(MANIFEST, bytes(bad), tsa.ca)
        assert got.status == "bad-token", (offset, got)
        # Without a CA too: the token's own certificate shows the signature is broken.
        assert ts.check(MANIFEST, bytes(bad), None).status == "bad-token"


def test_a_token_for_another_manifest_is_a_bad_token(settings: Settings, tsa: LocalTSA) -> None:
    tsr = _token(settings, b"another manifest\n")
    got = ts.check(MANIFEST, tsr, tsa.ca)
    assert got.status == "bad-token" and "imprint" in got.detail


def test_a_token_by_a_tsa_the_ca_did_not_certify_is_untrusted(
    settings: Settings, other_ca: Path
) -> None:
    tsr = _token(settings)
    assert ts.check(MANIFEST, tsr, other_ca).status == "untrusted-tsa"
    # No CA configured: nothing is trusted implicitly (as MEMDUMP_TRUSTED_KEYS unset).
    assert ts.check(MANIFEST, tsr, None).status == "untrusted-tsa"


def test_missing_and_pending() -> None:
    assert ts.check(MANIFEST, None, None).status == "missing"
    assert ts.check(MANIFEST, None, None, pending=True).status == "pending"
    assert ts.check(MANIFEST, b"\x30\x03\x02\x01\x00", None).status == "bad-token"


def test_a_fetch_by_an_untrusted_tsa_is_refused(settings: Settings, other_ca: Path) -> None:
    with pytest.raises(TimestampError, match="does not check out"):
        ts.fetch(settings.model_copy(update={"tsa_ca_file": other_ca}), b"\x01" * 32)


# -- the capture's stamp, the queue, the flush -------------------------------------------------


def _manifest(settings: Settings, tmp_path: Path) -> tuple[Path, str]:
    made = write_dump(settings.dump_dir, core(guest_ram(1, 64 << 10, 64 << 10)), settings=settings)
    mpath = manifest_path(made.path)
    return mpath, hashlib.sha256(mpath.read_bytes()).hexdigest()


def test_a_stamp_writes_the_token_beside_the_manifest_once(
    settings: Settings, tmp_path: Path, tsa: LocalTSA
) -> None:
    mpath, sha = _manifest(settings, tmp_path)
    got = ts.stamp(settings, mpath, sha)
    assert got.status == "granted", got
    tsr = ts.tsr_path(mpath)
    assert stat.S_IMODE(tsr.stat().st_mode) == 0o600
    first = tsr.read_bytes()
    assert ts.check(mpath.read_bytes(), first, tsa.ca).status == "valid"
    with pytest.raises(StorageError):  # O_EXCL: never over an existing token
        ts.write_token(mpath, b"another")
    assert tsr.read_bytes() == first


def test_a_tsa_down_queues_the_request_and_a_flush_fetches_it_later(
    settings: Settings, tmp_path: Path, tsa: LocalTSA
) -> None:
    mpath, sha = _manifest(settings, tmp_path)
    down = settings.model_copy(update={"tsa_url": closed_url()})
    got = ts.stamp(down, mpath, sha)  # does not raise
    assert got.status == "pending" and "unreachable" in got.detail
    assert not ts.tsr_path(mpath).exists()
    assert ts.is_pending(down, sha)
    assert ts.flush(down).left == 1  # still down: kept, with the reason
    (item,) = ts.TimestampQueue(ts.queue_path(down)).pending()
    assert item.attempts == 1 and "unreachable" in item.last_error
    # The TSA comes up: the token is fetched and stored, the queue empties.
    tsa.failing = True
    assert ts.flush(settings).left == 1  # up but failing (503): still kept
    tsa.failing = False
    done = ts.flush(settings)
    assert (done.fetched, done.left) == (1, 0)
    assert not ts.is_pending(settings, sha)
    assert stat.S_IMODE(ts.tsr_path(mpath).stat().st_mode) == 0o600
    assert ts.check(mpath.read_bytes(), ts.tsr_path(mpath).read_bytes(), tsa.ca).status == "valid"


def _custody_events(settings: Settings, mpath: Path) -> list[dict[str, object]]:
    """The ``timestamped`` entries of the dump's custody log, checked as a chain."""
    from memdump import custody

    dump = mpath.with_name(mpath.name.removesuffix(".manifest.json") + ".mem.gz")
    lines = custody.LocalLog(custody.log_path(dump)).read()
    entries = [json.loads(line) for line in lines]
    for i, e in enumerate(entries):
        assert e["index"] == i
        assert e["prev"] == (custody.entry_hash(lines[i - 1]) if i else e["prev"])
    return [e["details"] for e in entries if e["event"] == "timestamped"]


def test_the_custody_log_says_when_the_token_came(
    settings: Settings, tmp_path: Path, tsa: LocalTSA
) -> None:
    mpath, sha = _manifest(settings, tmp_path)
    down = settings.model_copy(update={"tsa_url": closed_url()})
    ts.stamp(down, mpath, sha)
    (pending,) = _custody_events(settings, mpath)
    assert pending["status"] == "pending" and "unreachable" in str(pending["reason"])
    ts.flush(settings)
    token = ts.tsr_path(mpath).read_bytes()
    _, late = _custody_events(settings, mpath)
    assert late["status"] == "granted" and late["late"] is True
    assert late["token_sha256"] == hashlib.sha256(token).hexdigest()
    resp = ts.parse_response(token)
    assert resp.tst is not None
    assert late["gen_time"] == resp.tst.gen_time.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # Asked for at capture, given later (genTime in whole seconds here).
    assert str(late["queued_at"])[:19] <= str(late["gen_time"])[:19]


def test_the_custody_log_names_the_tsa_without_its_credentials(
    settings: Settings, tmp_path: Path
) -> None:
    assert ts._tsa_name("https://user:pw@tsa.example:8443/tsr?x=1") == (
        "https://tsa.example:8443/tsr"
    )
    mpath, sha = _manifest(settings, tmp_path)
    ts.stamp(settings, mpath, sha)
    (granted,) = _custody_events(settings, mpath)
    assert granted["status"] == "granted" and granted["tsa"] == settings.tsa_url


def test_a_flush_never_replaces_a_token_already_there(settings: Settings, tmp_path: Path) -> None:
    mpath, sha = _manifest(settings, tmp_path)
    ts.stamp(settings.model_copy(update={"tsa_url": closed_url()}), mpath, sha)
    ts.write_token(mpath, b"the first one")  # another flush was faster
    assert ts.flush(settings).left == 0  # done: the request is answered
    assert ts.tsr_path(mpath).read_bytes() == b"the first one"


def test_settings_keep_a_tsa_secret_off_plain_http() -> None:
    with pytest.raises(ValidationError):
        Settings(tsa_url="http://tsa.example/", tsa_authorization=SecretStr("Basic eDp5"))
    with pytest.raises(ValidationError):
        Settings(tsa_url="file:///etc/passwd")
    ok = Settings(tsa_url="https://tsa.example/", tsa_authorization=SecretStr("Basic eDp5"))
    assert "eDp5" not in repr(ok)


# -- verify --------------------------------------------------------------------------------


@pytest.fixture
def made(settings: Settings) -> Made:
    return write_dump(settings.dump_dir, core(guest_ram(7, 64 << 10, 64 << 10)), settings=settings)


def test_verify_reports_a_valid_token(settings: Settings, made: Made) -> None:
    mpath = manifest_path(made.path)
    ts.stamp(settings, mpath, made.record.manifest_sha256)
    v = verify(made.row, settings)
    assert v.status == "verified", v
    assert v.timestamp is not None and v.timestamp["status"] == "valid"
    assert v.timestamp["gen_time"]
    assert v.to_dict()["timestamp"] == v.timestamp


def test_verify_without_a_token_is_unchanged_and_says_missing_or_pending(
    settings: Settings, made: Made
) -> None:
    v = verify(made.row, settings)
    assert v.status == "verified" and v.timestamp is not None
    assert v.timestamp["status"] == "missing"
    down = settings.model_copy(update={"tsa_url": closed_url()})
    ts.stamp(down, manifest_path(made.path), made.record.manifest_sha256)
    v = verify(made.row, settings)
    assert v.status == "verified" and v.timestamp is not None
    assert v.timestamp["status"] == "pending"


def test_verify_of_a_forged_token_is_not_verified(settings: Settings, made: Made) -> None:
    mpath = manifest_path(made.path)
    tsr = _token(settings, mpath.read_bytes())
    bad = bytearray(tsr)
    bad[-1] ^= 0x01
    ts.write_token(mpath, bytes(bad))
    v = verify(made.row, settings)
    assert v.status == "bad-signature", v
    assert v.timestamp is not None and v.timestamp["status"] == "bad-token"
    assert "timestamp" in v.detail


def test_verify_of_a_token_for_another_manifest_is_not_verified(
    settings: Settings, made: Made
) -> None:
    ts.write_token(manifest_path(made.path), _token(settings, b"not this manifest"))
    v = verify(made.row, settings)
    assert v.status == "bad-signature" and v.timestamp["status"] == "bad-token"  # type: ignore[index]


def test_verify_of_a_token_by_an_untrusted_tsa_is_untrusted(
    settings: Settings, made: Made, other_ca: Path
) -> None:
    mpath = manifest_path(made.path)
    ts.write_token(mpath, _token(settings, mpath.read_bytes()))
    v = verify(made.row, settings.model_copy(update={"tsa_ca_file": other_ca}))
    assert v.status == "untrusted-key", v
    assert v.timestamp is not None and v.timestamp["status"] == "untrusted-tsa"


def test_retention_delete_takes_the_token_with_the_dump(settings: Settings, made: Made) -> None:
    from memdump.locations import Location
    from memdump.stored import open_stored

    mpath = manifest_path(made.path)
    ts.stamp(settings, mpath, made.record.manifest_sha256)
    assert ts.tsr_path(mpath).exists()
    open_stored(Location.of(str(made.path)), settings).delete()
    assert not ts.tsr_path(mpath).exists()
