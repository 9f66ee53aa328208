"""Dump names (unique across hypervisors, readable, never a path) and the confinement of
a record's locations to the dump directory and the S3 prefix (issue 11, items 1 and 10)."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from memdump.errors import InvalidIdentifierError, LocationError
from memdump.locations import (
    Location,
    confine_local,
    confine_s3,
    dump_name,
    is_dump_name,
    record_locations,
)
from memdump.settings import S3Settings

WHEN = datetime(2026, 11, 29, 1, 52, 16, 123456, tzinfo=UTC)
S3 = S3Settings(bucket="forensics", prefix="memdump/")


def test_name_is_hypervisor_vmid_microseconds_and_random() -> None:
    name = dump_name("lab-pve", "101", WHEN, "3f9a1c")
    assert name == "lab-pve_101_20261129T015216.123456Z_3f9a1c.mem.gz"
    assert is_dump_name(name)
    # Same vmid, same microsecond, two hypervisors (or two collectors): two names.
    a, b = dump_name("pve1", "100", WHEN), dump_name("pve2", "100", WHEN)
    assert a != b and a.startswith("pve1_100_") and b.startswith("pve2_100_")
    assert dump_name("pve1", "100", WHEN) != dump_name("pve1", "100", WHEN)  # random suffix
    assert re.fullmatch(r"pve1_100_20261129T015216\.123456Z_[0-9a-f]{6}\.mem\.gz", a)


@pytest.mark.parametrize(
    ("hv", "vmid"),
    [("pve/1", "100"), ("pve", "../100"), ("..", "100"), ("pve", "1\n0"), ("pve", "a\x00b"),
     ("pve", ""), ("-x", "100"), ("pve", "1/2")],
)  # fmt: skip
def test_a_name_never_holds_a_path_or_control_characters(hv: str, vmid: str) -> None:
    with pytest.raises(InvalidIdentifierError):
        dump_name(hv, vmid, WHEN)


def test_old_and_new_names_are_dump_names_and_nothing_else() -> None:
    for ok in (
        "101_1699520400.mem.gz",
        "vm-db-01_1.mem.gz",
        "lab_vm.1_20261129T015216.123456Z_00ff00.mem.gz",
    ):  # noqa: E501
        assert is_dump_name(ok), ok
    for bad in ("passwd", "101_1699520400.mem", "../101_1.mem.gz", "a..b_1.mem.gz",
                "101_1699520400.manifest.json", "x_20261129T015216.123456Z_zz.mem.gz",
                ".101_1.mem.gz", "101_1.mem.gz/x", "1 0_1.mem.gz"):  # fmt: skip
        assert not is_dump_name(bad), bad


def test_local_path_confined_to_the_dump_dir(tmp_path: Path) -> None:
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    good = dumps / "lab_101_20261129T015216.123456Z_3f9a1c.mem.gz"
    assert confine_local(str(good), dumps) == good.resolve()
    assert (
        confine_local(str(dumps / "101_1699520400.mem.gz"), dumps).name == "101_1699520400.mem.gz"
    )
    outside = tmp_path / "101_1699520400.mem.gz"
    outside.write_bytes(b"not a dump of ours")
    link = dumps / "101_1699520401.mem.gz"
    os.symlink(outside, link)  # a dump-like name in the dump dir that leads out of it
    for bad in (
        str(outside),
        str(dumps / ".." / "101_1699520400.mem.gz"),
        str(link),
        str(dumps / "sub" / "101_1699520400.mem.gz"),
        str(dumps / "records.db"),
        "101_1699520400.mem.gz",  # relative
        "/etc/passwd",
        "",
    ):
        with pytest.raises(LocationError) as ei:
            confine_local(bad, dumps)
        assert "refused" in str(ei.value) and not ei.value.retryable
    assert outside.read_bytes() == b"not a dump of ours"


def test_s3_uri_confined_to_bucket_and_prefix() -> None:
    key = "memdump/lab_101_20261129T015216.123456Z_3f9a1c.mem.gz"
    assert confine_s3(f"s3://forensics/{key}", S3) == key
    assert confine_s3("s3://forensics/memdump/101_1.mem.gz", S3) == "memdump/101_1.mem.gz"
    for bad in (
        "s3://other/memdump/101_1.mem.gz",
        "s3://forensics/elsewhere/101_1.mem.gz",
        "s3://forensics/memdump/sub/101_1.mem.gz",
        "s3://forensics/memdump/../x/101_1.mem.gz",
        "s3://forensics/memdump/backup.tar",
        "s3://forensics-2/memdump/101_1.mem.gz",
    ):
        with pytest.raises(LocationError):
            confine_s3(bad, S3)
    with pytest.raises(LocationError, match="not configured"):
        confine_s3(f"s3://forensics/{key}", None)


def test_record_locations_old_and_new_rows() -> None:
    assert record_locations({"dump_path": "/d/1_1.mem.gz"}) == [Location("local", "/d/1_1.mem.gz")]
    assert record_locations({"dump_path": "s3://b/k"}) == [Location("s3", "s3://b/k")]
    row = {
        "dump_path": "/d/x.mem.gz",
        "local_path": "/d/x.mem.gz",
        "collector": "c1",
        "local_deleted_at": "",
        "s3_uri": "s3://b/p/x.mem.gz",
        "s3_version_id": "v1",
        "s3_deleted_at": "2026-01-01T00:00:00.000000",
    }
    assert record_locations(row) == [
        Location("local", "/d/x.mem.gz", "c1"),
        Location(
            "s3", "s3://b/p/x.mem.gz", version_id="v1", deleted_at="2026-01-01T00:00:00.000000"
        ),
    ]
