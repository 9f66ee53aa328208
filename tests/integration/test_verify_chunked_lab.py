"""Issue 14, items 4 and 5 on real lab captures (256 MiB guests, the real capture chain and
pipeline): a flipped byte in a .mem.gz is reported with its chunk and the guest-physical
range holding it, for a local dump and for one offloaded to the moto S3 server (whole and
``--range``, the latter by ranged GETs of a few members only); two captures of the same
VM give ``chunks_changed`` in the second record: 0 for a halted guest whose memory does
not change, most of its chunks for a writer guest."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from isal import igzip

from memdump.chain import run_chain
from memdump.chunkedgz import Chunk, read_index
from memdump.elfcore import CoreLayout, parse_core
from memdump.hypervisors import Driver
from memdump.manifest import manifest_path
from memdump.settings import S3Settings, Settings
from memdump.storage.s3 import S3Store
from memdump.verify import verify
from tests.helpers.lab import layout
from tests.helpers.moto import new_bucket
from tests.helpers.stores import record_row
from tests.helpers.writer_guest import writer_domain

pytestmark = pytest.mark.lab

VM = "vm-web-01"  # 256 MiB, the halt BIOS: its memory does not change
WRITER = "md-vd-wr"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(
        update={
            "data_dir": tmp_path / "data",
            "analysis": settings.analysis.model_copy(update={"enabled": False}),
        }
    )


def _elf(head: bytes) -> CoreLayout:
    layout_ = parse_core(head)
    assert layout_ is not None
    return layout_


def _target(lab_dir: Path, head: bytes, chunks: tuple[Chunk, ...]) -> tuple[int, Chunk]:
    """A marker's guest-physical address in the lab's seeded layout and the chunk holding
    it (found here through Python's gzip and the ELF headers, not memdump.changes)."""
    addr = int(layout(lab_dir, VM)["markers"][1]["addr"])
    off = _elf(head).offset_of(addr)
    assert off is not None
    (chunk,) = [c for c in chunks if c.raw_offset <= off < c.raw_offset + c.raw_size]
    return addr, chunk


def _flipped(data: bytes, chunk: Chunk) -> bytes:
    out = bytearray(data)
    out[chunk.gz_offset + chunk.gz_size // 2] ^= 0x10  # inside the member's deflate data
    return bytes(out)


def _assert_names(v: Any, chunk: Chunk, addr: int) -> None:
    assert v.status == "mismatch", v
    first = v.checks["chunks"]["first_bad"]
    assert first["number"] == chunk.number
    assert first["raw_range"] == [hex(chunk.raw_offset), hex(chunk.raw_offset + chunk.raw_size)]
    ((lo, hi),) = first["guest_ranges"]  # the chunk lies inside one PT_LOAD
    assert int(lo, 16) <= addr < int(hi, 16) and int(hi, 16) - int(lo, 16) == chunk.raw_size
    assert (
        f"chunk {chunk.number} is corrupt" in v.detail and f"guest-physical {lo}-{hi}" in v.detail
    )


def test_a_flipped_byte_in_a_local_capture(
    driver: Driver, settings: Settings, lab_dir: Path
) -> None:
    done = run_chain(driver, driver.resolve(VM), settings, mode="paused")
    dump = Path(done.record.dump_path)
    row = record_row(settings, str(dump))
    v = verify(row, settings)
    assert v.status == "verified", v
    with open(dump, "rb") as f:
        index = read_index(f)
    assert index is not None
    assert (
        v.checks["chunks"]["checked"] == len(index.chunks) == -(-index.raw_size // index.chunk_size)
    )
    with gzip.open(dump) as g:
        head = g.read(1 << 20)
    addr, chunk = _target(lab_dir, head, index.chunks)

    dump.write_bytes(_flipped(dump.read_bytes(), chunk))
    _assert_names(verify(row, settings), chunk, addr)
    _assert_names(verify(row, settings, guest_range=(addr, addr + 64)), chunk, addr)
    # A range elsewhere does not read the damaged chunk: verified against the Merkle root.
    far = int(layout(lab_dir, VM)["markers"][2]["addr"])
    v = verify(row, settings, guest_range=(far, far + 4096))
    assert v.status == "verified" and v.checks["chunks"]["checked"] == 2, v

    env = {k: val for k, val in os.environ.items() if not k.startswith("MEMDUMP_DATA")}
    env.update(MEMDUMP_DATA_DIR=str(settings.data_dir), MEMDUMP_DUMP_DIR=str(settings.dump_dir))
    out = subprocess.run(
        [sys.executable, "-m", "memdump.cli", "verify", "--range", f"{addr:#x}:{addr + 1:#x}",
         str(dump)],
        env=env, cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1, out
    assert json.loads(out.stdout)["checks"]["chunks"]["first_bad"]["number"] == chunk.number


def test_a_flipped_byte_in_a_capture_offloaded_to_s3(
    driver: Driver,
    settings: Settings,
    lab_dir: Path,
    moto_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, bucket = new_bucket(moto_url, "vfy")
    s3 = S3Settings(
        bucket=bucket, endpoint_url=moto_url, access_key_id="t", secret_access_key="t",
        keep_local=False,
    )  # fmt: skip
    s = settings.model_copy(update={"s3": s3})
    done = run_chain(driver, driver.resolve(VM), s, mode="paused")
    uri = done.record.dump_path
    assert uri.startswith(f"s3://{bucket}/")
    key = uri.removeprefix(f"s3://{bucket}/")
    row = record_row(s, uri)
    assert verify(row, s).status == "verified"

    data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    index = read_index(io.BytesIO(data))
    assert index is not None
    addr, chunk = _target(lab_dir, igzip.decompress(data)[: 1 << 20], index.chunks)
    client.put_object(Bucket=bucket, Key=key, Body=_flipped(data, chunk))

    _assert_names(verify(row, s), chunk, addr)
    fetched: list[int] = []
    real = S3Store.open_stream

    def counting(self: S3Store, key: str, **kw: Any) -> Any:
        if key.endswith(".mem.gz"):
            end = kw.get("end")
            assert end is not None, "a whole-object GET during --range"
            fetched.append(end - kw.get("start", 0))
        return real(self, key, **kw)

    monkeypatch.setattr(S3Store, "open_stream", counting)
    _assert_names(verify(row, s, guest_range=(addr, addr + 64)), chunk, addr)
    # Trailer, index and two members (the headers' and the range's), nothing more.
    assert sum(fetched) < 4 * chunk.gz_size + (1 << 20) < len(data) // 4, fetched


def _capture_twice(driver: Driver, settings: Settings, vm: str) -> tuple[Any, Any]:
    ref = driver.resolve(vm)
    first = run_chain(driver, ref, settings, mode="paused").record
    second = run_chain(driver, ref, settings, mode="paused").record
    return first, second


def test_two_captures_of_a_halted_guest_change_no_chunk(driver: Driver, settings: Settings) -> None:
    first, second = _capture_twice(driver, settings, VM)
    assert first.chunks_changed is None and "no previous capture" in first.chunks_changed_reason
    assert (second.chunks_changed, second.chunks_compared_with) == (0, first.dump_path)
    row = record_row(settings, second.dump_path)
    assert (row["chunks_changed"], row["chunks_changed_reason"]) == (0, "")
    doc = json.loads(manifest_path(Path(second.dump_path)).read_text())
    assert doc["changes"]["chunks_changed"] == 0
    assert doc["changes"]["previous"]["dump_path"] == first.dump_path
    assert doc["changes"]["chunk_count"] == doc["output"]["chunks"]["chunk_count"]


def test_two_captures_of_a_writer_guest_change_most_chunks(
    driver: Driver, settings: Settings
) -> None:
    with writer_domain(WRITER, 256) as name:
        first, second = _capture_twice(driver, settings, name)
    assert second.chunks_compared_with == first.dump_path
    doc = json.loads(manifest_path(Path(second.dump_path)).read_text())
    count = doc["changes"]["chunk_count"]
    # The writer rewrites every page from 1 MiB to the end of RAM on every pass.
    assert second.chunks_changed is not None and count * 0.9 < second.chunks_changed <= count
    assert record_row(settings, second.dump_path)["chunks_changed"] == second.chunks_changed
