"""Issue 15, item 2's last part: ``memdump countersign`` signs a dump from before signing
(verified first), saying it attests to its present state only: then it verifies as
``verified`` with the countersignature named; a signed or a damaged dump is refused
(nothing written); the attestation is signed with the manifest, so it cannot be edited
or stripped to pass the countersignature off as one made at capture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memdump import signing
from memdump.countersign import countersign
from memdump.errors import CountersignRefusedError
from memdump.manifest import manifest_path
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings
from memdump.verify import verify
from tests.helpers.signing import trusting
from tests.helpers.verify_dumps import Made, core, flip, guest_ram, write_dump

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return trusting(Settings(data_dir=tmp_path / "data", dump_dir=tmp_path / "dumps"), tmp_path)


@pytest.fixture
def old(settings: Settings) -> Made:
    """A dump written before signing: no .sig."""
    return write_dump(settings.dump_dir, core(guest_ram(1)))


def _sig(made: Made) -> Path:
    return signing.sig_path(manifest_path(made.path))


def test_an_old_dump_countersigned_verifies_and_says_what_it_attests(
    old: Made, settings: Settings
) -> None:
    assert verify(old.row, settings).status == "unsigned"
    done = countersign(old.row, settings)
    assert done.signature == str(_sig(old)) and os.stat(_sig(old)).st_mode & 0o777 == 0o600
    v = verify(old.row, settings)
    assert v.status == "verified", v
    assert v.signature is not None and v.signature["role"] == "countersign"
    assert "countersigned" in v.detail and "not to the capture" in v.detail
    attests = v.signature["attests"]
    assert "nothing of their state before" in attests["statement"]
    assert attests["verified"]["sha256"] == old.row["sha256"] and attests["attested_at"]


def test_the_attestation_cannot_be_edited_or_stripped(old: Made, settings: Settings) -> None:
    countersign(old.row, settings)
    env = json.loads(_sig(old).read_bytes())
    env["attests"]["attested_at"] = "2020-01-01T00:00:00.000000Z"  # back-dated
    _sig(old).write_text(json.dumps(env))
    assert verify(old.row, settings).status == "bad-signature"
    del env["attests"]  # passed off as a signature made at capture
    env["signer"]["role"] = "collector"
    _sig(old).write_text(json.dumps(env))
    assert verify(old.row, settings).status == "bad-signature"


def test_a_signed_or_damaged_dump_is_not_countersigned(settings: Settings) -> None:
    signed = write_dump(settings.dump_dir, core(guest_ram(2)), settings=settings)
    before = _sig(signed).read_bytes()
    with pytest.raises(CountersignRefusedError, match="verified"):
        countersign(signed.row, settings)
    assert _sig(signed).read_bytes() == before

    damaged = write_dump(settings.dump_dir, core(guest_ram(3)))
    flip(damaged.path, damaged.path.stat().st_size // 2)
    with pytest.raises(CountersignRefusedError, match="mismatch"):
        countersign(damaged.row, settings)
    assert not _sig(damaged).exists()


def test_cli_countersign(old: Made, settings: Settings) -> None:
    SQLiteRecordStore(settings.records_db).add(old.record)
    env = {
        **os.environ,
        "MEMDUMP_DATA_DIR": str(settings.data_dir),
        "MEMDUMP_DUMP_DIR": str(settings.dump_dir),
        "MEMDUMP_SIGNING_KEY_FILE": str(settings.signing_key_file),
        "MEMDUMP_TRUSTED_KEYS": str(settings.trusted_keys),
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "memdump.cli", *args],
            env=env, cwd=REPO, capture_output=True, text=True,
        )  # fmt: skip

    out = run("countersign", str(old.path))
    assert out.returncode == 0, out
    line = json.loads(out.stdout)
    assert line["countersigned"] is True and line["key_fingerprint"] == (
        signing.collector_signer(settings).fingerprint
    )
    again = run("countersign", str(old.path))  # signed now: refused, exit 1
    assert again.returncode == 1 and json.loads(again.stdout)["countersigned"] is False, again
    out = run("verify", str(old.path))
    assert out.returncode == 0 and json.loads(out.stdout)["status"] == "verified", out
