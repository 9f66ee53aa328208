"""memdump.livecore: a QEMU background-snapshot migration stream -> the ELF core that
dump-guest-memory writes (issue 12, Build 3). Synthetic streams from tests/helpers/migstream;
layouts from recorded `info mtree -f` outputs of real QEMU 7.2 guests."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import struct
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest
from isal import igzip

from memdump.elfcore import PT_LOAD, PT_NOTE, parse_core
from memdump.errors import MigrationStreamError, StorageError
from memdump.livecore import (
    EM_386,
    EM_X86_64,
    GuestLayout,
    LayoutError,
    LiveCoreSource,
    RamSegment,
    elf_machine_from_registers,
)
from memdump.pipeline import write_dump
from tests.helpers import migstream as ms

PAGE = ms.PAGE
VRAM = "0000:00:02.0/vga.vram"
# Sweep order: QEMU keeps RAM blocks sorted largest first.
BLOCKS = [
    ("pc.ram", 16 * PAGE),
    ("/rom@etc/acpi/tables", 2 * PAGE),
    (VRAM, 2 * PAGE),
    ("pc.bios", PAGE),
]
MTREE = ms.mtree(
    [
        (0x0, 0x6000, "ram", "pc.ram", 0),
        (0x6000, 0x2000, "rom", "pc.ram", 0x6000),  # PAM read-only: same region, merged
        (0x8000, 0x2000, "i/o", "vga-lowmem", 0),
        (0xA000, 0x1000, "rom", "pc.bios", 0),  # isa-bios: an alias of the BIOS' tail
        (0x10000, 0x6000, "ram", "pc.ram", 0xA000),
        (0xE0000000, 0x2000, "ram", "vga.vram", 0),  # a device's block: "<qdev path>/vga.vram"
        (0xFEE00000, 0x1000, "i/o", "kvm-apic-msi", 0),
        (0xFFFFF000, 0x1000, "rom", "pc.bios", 0),
    ]
)
LAYOUT = GuestLayout.from_mtree(MTREE)
IDSTR = {"pc.ram": "pc.ram", "vga.vram": VRAM, "pc.bios": "pc.bios"}


def expected(seg: RamSegment, zeros: Collection[tuple[str, int]] = ()) -> bytes:
    block = IDSTR[seg.block]
    out = b""
    for off in range(seg.block_offset, seg.block_offset + seg.size, PAGE):
        out += bytes(PAGE) if (block, off) in zeros else ms.pattern(block, off)
    return out


def convert(
    stream: bytes,
    tmp_path: Path,
    layout: GuestLayout = LAYOUT,
    *,
    buffer_bytes: int = 64 << 20,
    source: ms.BytesSource | None = None,
    read_size: int = 7777,  # not a multiple of anything: chunks cross pages and headers
    **kw: Any,
) -> tuple[bytes, LiveCoreSource, ms.BytesSource]:
    src = ms.BytesSource(stream) if source is None else source
    core = LiveCoreSource(src, layout, spill_dir=tmp_path, buffer_bytes=buffer_bytes, **kw)
    out = bytearray()
    buf = bytearray(read_size)
    while True:
        n = core.readinto(memoryview(buf))
        if not n:
            break
        out += buf[:n]
    core.close_ok()
    return bytes(out), core, src


def phdrs(core: bytes) -> list[tuple[int, ...]]:
    e = struct.unpack_from("<16sHHIQQQIHHHHHH", core)
    return [struct.unpack_from("<IIQQQQQQ", core, e[5] + i * 56) for i in range(e[10])]


def check_core(core: bytes, zeros: Collection[tuple[str, int]] = ()) -> None:
    layout = parse_core(core)
    assert layout is not None
    assert layout.file_size == len(core)
    loads = [s for s in layout.segments if s.type == PT_LOAD]
    assert [(s.paddr, s.filesz) for s in loads] == [(s.phys_start, s.size) for s in LAYOUT.segments]
    for seg, s in zip(LAYOUT.segments, loads, strict=True):
        assert core[s.offset : s.offset + s.filesz] == expected(seg, zeros), hex(s.paddr)


def test_sweep_becomes_the_core_dump_guest_memory_writes(tmp_path: Path) -> None:
    zeros = {("pc.ram", 3 * PAGE), ("pc.ram", 4 * PAGE), (VRAM, PAGE)}
    stream = ms.sweep(BLOCKS, zero_pages=zeros)
    core, src, raw = convert(stream, tmp_path)

    check_core(core, zeros)
    e = struct.unpack_from("<16sHHIQQQIHHHHHH", core)
    assert e[0] == b"\x7fELF\x02\x01\x01" + bytes(9)
    assert (e[1], e[2], e[3], e[4], e[7]) == (4, EM_X86_64, 1, 0, 0)  # ET_CORE, entry, flags
    # Section headers first, then program headers, as QEMU 7.2 writes them.
    assert (e[6], e[5], e[8], e[9], e[11], e[12], e[13]) == (64, 192, 64, 56, 64, 2, 1)
    ph = phdrs(core)
    assert ph[0][0] == PT_NOTE
    # PT_LOADs: p_flags 0, p_vaddr = p_paddr, p_memsz = p_filesz, p_align 0, in address order.
    assert [(p[0], p[1], p[3], p[4], p[5], p[6], p[7]) for p in ph[1:]] == [
        (PT_LOAD, 0, s.phys_start, s.phys_start, s.size, s.size, 0) for s in LAYOUT.segments
    ]
    # The note says what it holds (no vCPU registers).
    note = core[ph[0][2] : ph[0][2] + ph[0][5]]
    assert b"MEMDUMP\0" in note and b"No vCPU registers" in note
    # Last: the .shstrtab its section header points at.
    sh1 = struct.unpack_from("<IIQQQQIIQQ", core, 64 + 64)
    assert core[sh1[4] : sh1[4] + sh1[5]] == b"\0.shstrtab\0" and sh1[4] + sh1[5] == len(core)

    assert src.stream_sha256 == hashlib.sha256(stream).hexdigest()
    assert src.stream_bytes == len(stream)
    pages = src.live["pages"]
    assert pages == {"normal": 18, "zero": 3, "early": 0, "spilled": 0, "dropped": 2 + 2}
    assert raw.closed_ok and not raw.aborted


def test_file_order_follows_the_sweep_not_the_addresses(tmp_path: Path) -> None:
    """Segment data lie in the file in the order the stream brings them: pc.ram's part at
    0x10000 before the BIOS at 0xa000, so nothing but the BIOS' second copy waits."""
    core, src, _ = convert(ms.sweep(BLOCKS), tmp_path)
    off = {p[4]: p[2] for p in phdrs(core)[1:]}
    assert off[0x0] < off[0x10000] < off[0xE0000000] < off[0xA000] < off[0xFFFFF000]
    assert src.live["buffer_peak_bytes"] == PAGE  # the BIOS page, kept for its second copy


def test_zero_record_with_a_fill_byte_and_a_stream_without_configuration(tmp_path: Path) -> None:
    """RAM_SAVE_FLAG_ZERO carries the byte the loader fills the page with (ram.c
    ram_handle_compressed); old machine types send no configuration section."""
    body = ms.header(machine=None) + ms.ram_setup(BLOCKS) + ms.part()
    last = None
    for name, size in BLOCKS:
        for off in range(0, size, PAGE):
            blk = None if name == last else name
            last = name
            if (name, off) == ("pc.ram", 0x7000):
                body += ms.zero(off, blk, fill=0xAB)
            else:
                body += ms.page(off, ms.pattern(name, off), blk)
    stream = body + ms.eos() + ms.device_tail()
    core, src, _ = convert(stream, tmp_path)
    s = next(s for s in parse_core(core).segments if s.type == PT_LOAD)  # type: ignore[union-attr]
    assert core[s.offset + 0x7000 : s.offset + 0x8000] == b"\xab" * PAGE
    assert core[s.offset : s.offset + 0x7000] == b"".join(
        ms.pattern("pc.ram", o) for o in range(0, 0x7000, PAGE)
    )
    assert src.live["machine_type"] is None


@pytest.mark.parametrize(
    ("chunk", "read_size"),
    [(1 << 20, 4 << 20), (1 << 20, 3 * PAGE + 5), (1000, 4 << 20)],
    ids=["long-runs", "short-reads", "small-stream-reads"],
)
def test_runs_taken_in_batches_stop_at_every_kind_of_break(
    tmp_path: Path, chunk: int, read_size: int
) -> None:
    """The sweep's fast path checks records a batch at a time (up to 256 pages into a
    4 MiB read): each thing that must end a batch ends it at its very record, wherever
    it falls in the batch, and the batch resumes after it. Breaks: runs of zero pages
    and single ones, a ZERO record with another fill byte, pages that came early (sent
    first, so the sweep skips them; or one sent mid-sweep, just ahead of its place), a
    page no PT_LOAD holds and pages two hold, RAM parts of uneven length, and the read
    buffer's end."""
    n = 700
    blocks = [("pc.ram", n * PAGE)]
    layout = GuestLayout(
        (
            RamSegment(0x0, 600 * PAGE, "pc.ram", 0),  # pages 600-649: in no PT_LOAD
            RamSegment(0x1000000, 40 * PAGE, "pc.ram", 650 * PAGE),
            RamSegment(0x2000000, 20 * PAGE, "pc.ram", 680 * PAGE),
            RamSegment(0x3000000, 5 * PAGE, "pc.ram", 690 * PAGE),  # 690-694: twice
            RamSegment(0x4000000, 10 * PAGE, "pc.ram", 690 * PAGE),
        )
    )
    zeros = {("pc.ram", p * PAGE) for p in [*range(10, 60), 100, 257, *range(510, 530), 699]}
    early = [("pc.ram", p * PAGE) for p in (300, 513, 2, 692)]
    body = ms.header() + ms.ram_setup(blocks)
    order = early + [("pc.ram", p * PAGE) for p in range(n) if ("pc.ram", p * PAGE) not in early]
    # A page written mid-sweep: 202 before 201, words that differ in one byte (0x..c9028,
    # 0x..ca028).
    order.remove(("pc.ram", 202 * PAGE))
    order.insert(order.index(("pc.ram", 201 * PAGE)), ("pc.ram", 202 * PAGE))
    recs = [
        ms.zero(off, name if i == 0 else None, fill=0xAB if off == 150 * PAGE else 0)
        if (name, off) in zeros or off == 150 * PAGE
        else ms.page(off, ms.pattern(name, off), name if i == 0 else None)
        for i, (name, off) in enumerate(order)
    ]
    cuts = [0, 37, 300, 301, 555, n]
    for a, b in zip(cuts, cuts[1:], strict=False):
        body += ms.part() + b"".join(recs[a:b]) + ms.eos()
    stream = body + ms.part() + ms.eos() + ms.device_tail()
    source = ms.BytesSource(stream, chunk=chunk, vary=False)
    core, src, _ = convert(stream, tmp_path, layout, source=source, read_size=read_size)

    def content(off: int) -> bytes:
        if off == 150 * PAGE:
            return b"\xab" * PAGE
        return bytes(PAGE) if ("pc.ram", off) in zeros else ms.pattern("pc.ram", off)

    loads = [s for s in parse_core(core).segments if s.type == PT_LOAD]  # type: ignore[union-attr]
    assert len(loads) == len(layout.segments)
    for seg, s in zip(layout.segments, loads, strict=True):
        want = b"".join(
            content(o) for o in range(seg.block_offset, seg.block_offset + seg.size, PAGE)
        )
        assert core[s.offset : s.offset + s.filesz] == want, hex(seg.phys_start)
    pages = src.live["pages"]
    assert pages["zero"] == len(zeros) + 1 and pages["normal"] == n - len(zeros) - 1
    assert pages["dropped"] == 50 and pages["early"] == len(early) + 1


@pytest.mark.parametrize("size", [4096 + 8, 9])
def test_a_batch_of_records_ends_at_the_first_byte_that_differs(size: int) -> None:
    """_records_matching against a record-by-record reading: a record whose word differs
    in any one of its 8 bytes (or, for ZERO, whose fill byte is not 0) ends the batch
    there, and every record before it counts."""
    from memdump import livecore

    flags = (ms.PAGE_FLAG if size > 9 else ms.ZERO) | ms.CONTINUE
    first = 0x12345 * PAGE
    k = 40
    good = b"".join(
        ms.be64((first + i * PAGE) | flags) + (b"\x5a" * (size - 8) if size > 9 else b"\0")
        for i in range(k)
    )
    buf = bytearray(b"junk" + good)
    assert livecore._records_matching(buf, 4, size, first | flags, k) == k
    assert livecore._records_matching(buf, 4, size, first | flags, 0) == 0
    assert livecore._records_matching(buf, 4, size, (first + PAGE) | flags, k) == 0
    columns = range(9) if size == 9 else range(8)
    for at in (0, 1, 17, k - 1):
        for col in columns:
            bad = bytearray(buf)
            bad[4 + at * size + col] ^= 0x01
            got = livecore._records_matching(bad, 4, size, first | flags, k)
            assert got == at, (at, col)
    if size > 9:  # a page's own bytes are data, not checked
        data = bytearray(buf)
        data[4 + 3 * size + 100] ^= 0xFF
        assert livecore._records_matching(data, 4, size, first | flags, k) == k


def test_common_prefix() -> None:
    from memdump import livecore

    for n in (1, 2, 3, 255, 256):
        a = bytes(range(n))
        assert livecore._common_prefix(a, a) == n
        for i in range(n):
            b = bytearray(a)
            b[i] ^= 0x80
            assert livecore._common_prefix(a, bytes(b)) == i


def test_early_pages_wait_for_their_place(tmp_path: Path) -> None:
    """Pages the guest wrote during the capture come first, out of order."""
    early = [("pc.ram", 0xF000), ("pc.bios", 0), (VRAM, PAGE), ("pc.ram", 0x2000)]
    core, src, _ = convert(ms.sweep(BLOCKS, early=early, zero_pages={("pc.ram", 0xF000)}), tmp_path)
    check_core(core, {("pc.ram", 0xF000)})
    assert src.live["pages"]["early"] == 4
    assert src.live["pages"]["spilled"] == 0


def test_sweep_restarting_mid_block_after_a_write_fault(tmp_path: Path) -> None:
    """QEMU 7.2 continues its sweep after the page a write fault sent (ram.c
    ram_find_and_save_block keeps the queued page as last_seen_block/last_page) and wraps
    around: the pages before it come last."""
    order = [("pc.ram", off) for off in range(0x9000, 16 * PAGE, PAGE)]
    order += [(n, o) for n, size in BLOCKS[1:] for o in range(0, size, PAGE)]
    order += [("pc.ram", off) for off in range(0, 0x9000, PAGE)]
    core, src, _ = convert(ms.sweep(BLOCKS, early=order), tmp_path, buffer_bytes=4 * PAGE)
    check_core(core)
    assert src.live["pages"]["spilled"] > 0


def test_waiting_pages_of_every_kind_leave_together_in_place(tmp_path: Path) -> None:
    """After the sweep jumped, the pages that waited leave in runs: zero pages, pages in
    memory and spilled pages mixed, each at its own place."""
    order = [("pc.ram", off) for off in range(0x9000, 16 * PAGE, PAGE)]
    order += [(n, o) for n, size in BLOCKS[1:] for o in range(0, size, PAGE)]
    order += [("pc.ram", off) for off in range(0, 0x9000, PAGE)]
    zeros = {("pc.ram", off) for off in range(0x9000, 16 * PAGE, 2 * PAGE)} | {(VRAM, PAGE)}
    stream = ms.sweep(BLOCKS, early=order, zero_pages=zeros)
    core, src, _ = convert(stream, tmp_path, buffer_bytes=2 * PAGE)
    check_core(core, zeros)
    pages = src.live["pages"]
    assert pages["spilled"] > 0 and src.live["buffer_peak_bytes"] == 2 * PAGE
    assert pages["zero"] == len(zeros)


def test_spill_past_the_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past buffer_bytes, waiting pages go to a private file in spill_dir: created 0600
    with O_EXCL, unlinked at once, so nothing is ever left behind."""
    seen: list[tuple[str, int, int]] = []
    real_open, real_unlink = os.open, os.unlink

    def spy_open(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        fd = real_open(path, flags, mode, **kw)
        if str(path).endswith(".spill"):
            st = os.fstat(fd)
            seen.append((str(path), flags, stat.S_IMODE(st.st_mode)))
        return fd

    def spy_unlink(path: Any, **kw: Any) -> None:
        assert seen and str(path) == seen[-1][0]
        real_unlink(path, **kw)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "unlink", spy_unlink)
    early = [("pc.ram", off) for off in range(15 * PAGE, 0, -PAGE)]  # all but page 0, reversed
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    core, src, _ = convert(ms.sweep(BLOCKS, early=early), spill_dir, buffer_bytes=2 * PAGE)
    check_core(core)
    pages = src.live["pages"]
    assert pages["early"] == 13  # pages 0x8000 and 0x9000 lie behind vga-lowmem: dropped
    assert pages["spilled"] == 11  # 2 pages fit the buffer
    assert src.live["buffer_peak_bytes"] == 2 * PAGE
    assert src.live["spill_peak_bytes"] == 11 * PAGE
    assert len(seen) == 1
    path, flags, mode = seen[0]
    assert Path(path).parent == spill_dir
    assert flags & os.O_EXCL and flags & os.O_CREAT and flags & os.O_NOFOLLOW
    assert mode == 0o600
    assert list(spill_dir.iterdir()) == []


def test_spill_file_closed_on_abort_and_on_error(tmp_path: Path) -> None:
    early = [("pc.ram", off) for off in range(15 * PAGE, 0, -PAGE)]
    stream = ms.sweep(BLOCKS, early=early)
    for how in ("abort", "error"):
        data = stream if how == "abort" else stream[: len(stream) // 2]
        src = ms.BytesSource(data)
        core = LiveCoreSource(src, LAYOUT, spill_dir=tmp_path, buffer_bytes=PAGE)
        buf = memoryview(bytearray(4096))
        if how == "abort":
            core.readinto(buf)
            core.readinto(buf)
            assert core._spill is not None and core._spill.fd is not None
            fd = core._spill.fd
            core.abort()
            assert src.aborted
        else:
            with pytest.raises(MigrationStreamError, match="truncated"):
                while core.readinto(buf):
                    pass
            assert core._spill is not None
            fd = -1 if core._spill.fd is None else core._spill.fd
        assert core._spill.fd is None
        with pytest.raises(OSError):
            os.fstat(fd)
        assert list(tmp_path.iterdir()) == []


def _convert_error(stream: bytes, tmp_path: Path, layout: GuestLayout = LAYOUT) -> str:
    with pytest.raises(MigrationStreamError) as info:
        convert(stream, tmp_path, layout)
    assert "offset" in info.value.fields or isinstance(info.value, LayoutError)
    return str(info.value)


def test_truncated_stream_is_an_error_wherever_it_is_cut(tmp_path: Path) -> None:
    stream = ms.sweep(BLOCKS)
    tail = len(ms.device_tail())
    ram_end = len(stream) - tail
    cuts = [0, 3, 8, 12, 30, 60, 120, ram_end - 1, ram_end]
    cuts += list(range(200, ram_end, 997))
    for cut in cuts:
        msg = _convert_error(stream[:cut], tmp_path)
        assert "truncated" in msg, (cut, msg)
    # The device state after RAM is not parsed (only each device's code knows its length),
    # but the stream must end with QEMU_VM_EOF and the JSON vmdescription.
    for cut in range(ram_end + 1, len(stream)):
        msg = _convert_error(stream[:cut], tmp_path)
        assert "does not end with QEMU's vmdescription: stream truncated" in msg, cut
    core, src, _ = convert(stream, tmp_path)
    check_core(core)
    assert src.tail_bytes == tail


def test_truncation_reports_its_offset(tmp_path: Path) -> None:
    stream = ms.sweep(BLOCKS)
    with pytest.raises(MigrationStreamError) as info:
        convert(stream[:500], tmp_path)
    assert info.value.fields["offset"] <= 500
    assert f"offset {info.value.fields['offset']}" in str(info.value)


@pytest.mark.parametrize(
    ("insert", "match"),
    [
        (bytes([0x08]) + b"\x00\x01", "unknown section type 0x8"),  # QEMU_VM_COMMAND
        (ms.part(section_id=7), "section 7 in the RAM phase"),
        (b"\x99", "unknown section type 0x99"),
    ],
)
def test_unknown_section_after_ram_part(tmp_path: Path, insert: bytes, match: str) -> None:
    head = (
        ms.header()
        + ms.ram_setup(BLOCKS)
        + ms.part()
        + ms.page(0, ms.pattern("pc.ram", 0), "pc.ram")
        + ms.eos()
    )
    assert match in _convert_error(head + insert + b"\x00" * 64, tmp_path)


def test_vmdescription_checks(tmp_path: Path) -> None:
    stream = ms.sweep(BLOCKS)
    desc = b'{"page_size": 4096, "devices": []}'
    good = stream[: -len(ms.device_tail())] + bytes([ms.FULL]) + bytes(30)
    good += b"\x00\x06" + ms.be32(len(desc)) + desc
    convert(good, tmp_path)
    # Length off by one, not JSON, another page size: not QEMU's end of stream.
    for bad in (
        good[: -len(desc) - 6] + b"\x00\x06" + ms.be32(len(desc) + 1) + desc,
        good[: -len(desc)] + b"[" + desc[1:],
        good.replace(b'"page_size": 4096', b'"page_size": 65536'),
    ):
        assert "vmdescription" in _convert_error(bad, tmp_path)


def test_other_iterable_section_and_bad_header(tmp_path: Path) -> None:
    block = ms.header() + ms.section_header(ms.START, "block", 3, version=1) + b"\x00" * 32
    assert "unsupported iterable section 'block'" in _convert_error(block, tmp_path)
    assert "not a QEMU migration stream" in _convert_error(b"QEVX" + bytes(60), tmp_path)
    assert "stream version 2" in _convert_error(b"QEVM\x00\x00\x00\x02" + bytes(60), tmp_path)
    full = ms.header() + bytes([ms.FULL]) + bytes(60)
    assert "expected the RAM section's start, found section type 0x4" in _convert_error(
        full, tmp_path
    )


def test_configuration_subsections(tmp_path: Path) -> None:
    rest = ms.ram_setup(BLOCKS)
    sweep = ms.sweep(BLOCKS)
    body = sweep[len(ms.header()) + len(rest) :]
    ok = ms.subsection("configuration/target-page-bits", ms.be32(12)) + ms.subsection(
        "configuration/uuid", bytes(range(16))
    )
    ok += ms.subsection("configuration/capabilities", ms.be32(0))
    core, src, _ = convert(ms.header(subsections=ok) + rest + body, tmp_path)
    check_core(core)
    assert src.live["machine_type"] == "pc-i440fx-7.2"

    caps = ms.subsection("configuration/capabilities", ms.be32(1) + ms.string("x-ignore-shared"))
    msg = _convert_error(ms.header(subsections=caps) + rest + body, tmp_path)
    assert "['x-ignore-shared'] change the RAM format" in msg
    bits = ms.subsection("configuration/target-page-bits", ms.be32(16))
    assert "target page bits 16" in _convert_error(ms.header(subsections=bits) + rest, tmp_path)
    other = ms.subsection("configuration/future", b"")
    assert "unknown subsection 'configuration/future'" in _convert_error(
        ms.header(subsections=other) + rest, tmp_path
    )


@pytest.mark.parametrize(
    ("flag", "name"),
    [(ms.XBZRLE, "XBZRLE"), (ms.COMPRESS, "COMPRESS_PAGE"), (ms.HOOK, "HOOK"), (0x200, "MULTIFD")],
)
def test_unsupported_page_encodings(tmp_path: Path, flag: int, name: str) -> None:
    head = ms.header() + ms.ram_setup(BLOCKS) + ms.part()
    rec = ms.be64(0x1000 | flag) + ms.string("pc.ram") + bytes(64)
    assert f"flag {name}" in _convert_error(head + rec, tmp_path)


def test_pages_outside_the_layout_are_counted_and_dropped(tmp_path: Path) -> None:
    """Blocks no PT_LOAD maps (ACPI tables, option ROMs) and pc.ram's pages hidden behind
    an I/O range (0x8000-0x9fff here, like VGA's window) travel in the stream too."""
    core, src, _ = convert(ms.sweep(BLOCKS), tmp_path)
    assert src.live["pages"]["dropped"] == 4  # 2 of /rom@etc/acpi/tables, 2 of pc.ram
    assert len(core) == parse_core(core).file_size  # type: ignore[union-attr]


def test_page_past_its_block_or_of_an_unknown_block(tmp_path: Path) -> None:
    head = ms.header() + ms.ram_setup(BLOCKS) + ms.part()
    past = head + ms.page(16 * PAGE, bytes(PAGE), "pc.ram")
    assert "page at 0x10000 of RAM block 'pc.ram' lies past its end" in _convert_error(
        past, tmp_path
    )
    unknown = head + ms.page(0, bytes(PAGE), "pc.ram2")
    assert "unknown block 'pc.ram2'" in _convert_error(unknown, tmp_path)
    cont = head + ms.page(0, bytes(PAGE))
    assert "none was named" in _convert_error(cont, tmp_path)


def test_page_sent_twice(tmp_path: Path) -> None:
    for dup in [("pc.ram", 0x3000), ("/rom@etc/acpi/tables", 0)]:  # in the layout or not
        stream = ms.sweep(BLOCKS, early=[dup])
        # sweep() sends an early page once; splice a second copy in after its first.
        rec = ms.page(dup[1], ms.pattern(*dup), dup[0])
        i = stream.index(rec) + len(rec)
        bad = stream[:i] + ms.page(dup[1], ms.pattern(*dup), dup[0]) + stream[i:]
        msg = _convert_error(bad, tmp_path)
        assert f"page at {dup[1]:#x} of RAM block {dup[0]!r} sent twice" in msg


def test_missing_page(tmp_path: Path) -> None:
    stream = ms.sweep(BLOCKS)
    rec = ms.page(0x5000, ms.pattern("pc.ram", 0x5000))
    assert stream.count(rec) == 1
    msg = _convert_error(stream.replace(rec, b""), tmp_path)
    assert "RAM ended without page 0x5000 of block 'pc.ram' (guest-physical 0x5000)" in msg


def test_missing_page_of_a_block_mapped_high(tmp_path: Path) -> None:
    stream = ms.sweep(BLOCKS)
    rec = ms.page(PAGE, ms.pattern(VRAM, PAGE))
    assert stream.count(rec) == 1
    msg = _convert_error(stream.replace(rec, b""), tmp_path)
    assert f"page 0x1000 of block {VRAM!r} (guest-physical 0xe0001000)" in msg


def test_ram_setup_checks(tmp_path: Path) -> None:
    bad_total = ms.header() + ms.ram_setup(BLOCKS)
    i = len(ms.header()) + len(ms.section_header(ms.START, "ram", ms.RAM_ID))
    word = ms.be64(0x13000 | ms.MEM_SIZE)
    msg = _convert_error(bad_total[:i] + word + bad_total[i + 8 :], tmp_path)
    assert "RAM blocks add up to 0x14000, the stream said 0x13000" in msg
    word = ms.be64(0x15000 | ms.MEM_SIZE | ms.ZERO)
    msg = _convert_error(bad_total[:i] + word + bad_total[i + 8 :], tmp_path)
    assert "RAM set-up starts with flags 0x6, not MEM_SIZE" in msg
    missing_block = [b for b in BLOCKS if b[0] != VRAM]
    stream = ms.sweep(missing_block)
    with pytest.raises(LayoutError, match="'vga.vram' matches 0 RAM blocks"):
        convert(stream, tmp_path)


def test_layout_beyond_its_block(tmp_path: Path) -> None:
    big = GuestLayout((RamSegment(0, 17 * PAGE, "pc.ram", 0),))
    with pytest.raises(LayoutError, match="lies outside its RAM block"):
        convert(ms.sweep(BLOCKS), tmp_path, big)


def test_ambiguous_device_block(tmp_path: Path) -> None:
    blocks = BLOCKS + [("0000:00:03.0/vga.vram", PAGE)]
    with pytest.raises(LayoutError, match="'vga.vram' matches 2 RAM blocks"):
        convert(ms.sweep(blocks), tmp_path)


def test_partial_pages_at_segment_edges(tmp_path: Path) -> None:
    layout = GuestLayout(
        (RamSegment(0x800, 0x1000, "pc.ram", 0x800), RamSegment(0x100000, 0x10, "pc.bios", 0xFF0))
    )
    core, _, _ = convert(ms.sweep(BLOCKS), tmp_path, layout)
    loads = [s for s in parse_core(core).segments if s.type == PT_LOAD]  # type: ignore[union-attr]
    ram = ms.pattern("pc.ram", 0) + ms.pattern("pc.ram", PAGE)
    assert core[loads[0].offset : loads[0].offset + 0x1000] == ram[0x800:0x1800]
    assert core[loads[1].offset : loads[1].offset + 0x10] == ms.pattern("pc.bios", 0)[0xFF0:]


def test_close_ok_abort_and_pass_through(tmp_path: Path) -> None:
    stream = ms.sweep(BLOCKS)
    src = ms.BytesSource(stream, live={"downtime_ms": 3})
    core = LiveCoreSource(src, LAYOUT, spill_dir=tmp_path, machine=EM_386)
    with pytest.raises(MigrationStreamError, match="did not reach its end"):
        core.close_ok()
    assert core.pause_window == ("t0", "t1") and core.staging == "fifo"
    assert core.dump_format == "elf"
    buf = memoryview(bytearray(1 << 16))
    first = core.readinto(buf)
    assert struct.unpack_from("<H", buf, 18)[0] == EM_386
    while core.readinto(buf):
        pass
    src.close_error = MigrationStreamError("remote said no")
    with pytest.raises(MigrationStreamError, match="remote said no"):
        core.close_ok()
    src.close_error = None
    core.close_ok()
    assert first > 0 and src.closed_ok
    live = core.live
    assert live["mode"] == "live" and live["downtime_ms"] == 3
    assert live["stream_sha256"] == hashlib.sha256(stream).hexdigest()
    assert live["stream_bytes"] == len(stream)


class DeferringSource(ms.BytesSource):
    """A raw stream that, like the drivers' live streams, can wait for its producer's end
    in close_ok instead of at its last byte."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.deferred_at: list[int] = []

    def defer_end(self) -> None:
        self.deferred_at.append(self.pos)


def test_the_producer_end_is_deferred_only_once_ram_is_whole(tmp_path: Path) -> None:
    stream = ms.sweep(BLOCKS)
    ram_end = len(stream) - len(ms.device_tail())
    src = DeferringSource(stream)
    core = LiveCoreSource(src, LAYOUT, spill_dir=tmp_path)
    buf = memoryview(bytearray(7777))
    while core.readinto(buf):
        pass
    core.close_ok()
    assert len(src.deferred_at) == 1 and src.deferred_at[0] >= ram_end
    assert src.closed_ok
    # Cut in RAM: never deferred (the driver's stream raises the script's error at the cut).
    cut = DeferringSource(stream[: ram_end - 100])
    with pytest.raises(MigrationStreamError, match="truncated"):
        convert_source(cut, tmp_path)
    assert cut.deferred_at == []


def test_a_cut_device_state_reports_the_producers_error_first(tmp_path: Path) -> None:
    stream = ms.sweep(BLOCKS)
    src = DeferringSource(stream[:-20])
    src.close_error = MigrationStreamError("the script says: migration failed")
    with pytest.raises(MigrationStreamError, match="the script says"):
        convert_source(src, tmp_path)
    assert src.deferred_at


def convert_source(src: ms.BytesSource, tmp_path: Path) -> None:
    core = LiveCoreSource(src, LAYOUT, spill_dir=tmp_path)
    buf = memoryview(bytearray(7777))
    while core.readinto(buf):
        pass
    core.close_ok()


def test_through_the_pipeline(tmp_path: Path) -> None:
    """pipeline.write_dump reads the length from the ELF headers, as for a paused dump."""

    stream = ms.sweep(BLOCKS, early=[("pc.ram", 0x4000)])
    (tmp_path / "a").mkdir()
    core, _, _ = convert(stream, tmp_path / "a")
    src = LiveCoreSource(ms.BytesSource(stream), LAYOUT, spill_dir=tmp_path)
    res = write_dump(src, tmp_path / "out", "x.mem.gz")
    assert res.raw_bytes == len(core)
    assert igzip.decompress(res.path.read_bytes()) == core
    assert src.stream_sha256 == hashlib.sha256(stream).hexdigest()


def test_elf_machine_from_registers() -> None:
    assert elf_machine_from_registers("RIP=000000000000fff0\nEFER=0000000000000d01\n") == EM_X86_64
    assert elf_machine_from_registers("EFER=0000000000000000 FS=0") == EM_386
    with pytest.raises(LayoutError):
        elf_machine_from_registers("EAX=00000000")


# -- info mtree -f ---------------------------------------------------------------------

# Recorded from QEMU 7.2 (Debian 1:7.2+dfsg-7+deb12u18) on the lab, `info mtree -f`
# (I/O flat views shortened). i440fx, 256 MiB: a lab QEMU VM and a lab libvirt domain
# (the same flat view); readelf -l of dump-guest-memory: 0x0 0xc0000, 0xc0000 0x20000,
# 0xe0000 0x10000, 0xf0000 0x10000, 0x100000 0xff00000, 0xffff0000 0x10000.
MTREE_PC_256 = """\
FlatView #0
 AS "i440FX", root: bus master container
 AS "PIIX3", root: bus master container
 AS "piix3-ide", root: bus master container
 AS "PIIX4_PM", root: bus master container
 Root memory region: (none)
  No rendered FlatView

FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000bffff (prio 0, ram): pc.ram KVM
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom KVM
  00000000000e0000-00000000000effff (prio 0, ram): pc.ram @00000000000e0000 KVM
  00000000000f0000-00000000000fffff (prio 0, rom): pc.bios KVM
  0000000000100000-000000000fffffff (prio 0, ram): pc.ram @0000000000100000 KVM
  00000000fec00000-00000000fec00fff (prio 0, i/o): kvm-ioapic
  00000000fed00000-00000000fed003ff (prio 0, i/o): hpet
  00000000fee00000-00000000feefffff (prio 4096, i/o): kvm-apic-msi
  00000000ffff0000-00000000ffffffff (prio 0, rom): pc.bios KVM

FlatView #2
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
  0000000000000008-000000000000000f (prio 0, i/o): dma-cont
  0000000000000010-000000000000001f (prio 0, i/o): io @0000000000000010
"""
PT_LOADS_PC_256 = [
    (0x0, 0xC0000),
    (0xC0000, 0x20000),
    (0xE0000, 0x10000),
    (0xF0000, 0x10000),
    (0x100000, 0xFF00000),
    (0xFFFF0000, 0x10000),
]

# i440fx, 4 GiB: 3 GiB below the PCI hole, 1 GiB from 4 GiB (pc.ram's tail).
MTREE_PC_4G = """\
FlatView #0
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000bffff (prio 0, ram): pc.ram KVM
  00000000000c0000-00000000000dffff (prio 1, rom): pc.rom KVM
  00000000000e0000-00000000000effff (prio 0, ram): pc.ram @00000000000e0000 KVM
  00000000000f0000-00000000000fffff (prio 0, rom): pc.bios KVM
  0000000000100000-00000000bfffffff (prio 0, ram): pc.ram @0000000000100000 KVM
  00000000fec00000-00000000fec00fff (prio 0, i/o): kvm-ioapic
  00000000fed00000-00000000fed003ff (prio 0, i/o): hpet
  00000000fee00000-00000000feefffff (prio 4096, i/o): kvm-apic-msi
  00000000ffff0000-00000000ffffffff (prio 0, rom): pc.bios KVM
  0000000100000000-000000013fffffff (prio 0, ram): pc.ram @00000000c0000000 KVM

FlatView #1
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan

FlatView #2
 AS "i440FX", root: bus master container
 AS "PIIX3", root: bus master container
 Root memory region: (none)
  No rendered FlatView
"""
PT_LOADS_PC_4G = PT_LOADS_PC_256[:4] + [
    (0x100000, 0xBFF00000),
    (0xFFFF0000, 0x10000),
    (0x100000000, 0x40000000),
]

# q35 with SeaBIOS, a std VGA and a virtio NIC, 512 MiB: PAM turned 0xc0000-0xfffff into
# alternating ram/rom views of pc.ram (merged: the same region, contiguous), VGA's VRAM
# BAR mapped at 0xfd000000, names with spaces. dump-guest-memory: 0x0 0xa0000,
# 0xc0000 0x1ff40000, 0xfd000000 0x1000000, 0xfffc0000 0x40000.
MTREE_Q35 = """\
FlatView #0
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 AS "ich9-ahci", root: bus master container
 Root memory region: system
  0000000000000000-000000000009ffff (prio 0, ram): pc.ram KVM
  00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem
  00000000000c0000-00000000000cafff (prio 0, rom): pc.ram @00000000000c0000 KVM
  00000000000cb000-00000000000cdfff (prio 0, ram): pc.ram @00000000000cb000 KVM
  00000000000ce000-00000000000e7fff (prio 0, rom): pc.ram @00000000000ce000 KVM
  00000000000e8000-00000000000effff (prio 0, ram): pc.ram @00000000000e8000 KVM
  00000000000f0000-00000000000fffff (prio 0, rom): pc.ram @00000000000f0000 KVM
  0000000000100000-000000001fffffff (prio 0, ram): pc.ram @0000000000100000 KVM
  00000000b0000000-00000000bfffffff (prio 0, i/o): pcie-mmcfg-mmio
  00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram KVM
  00000000fe000000-00000000fe000fff (prio 0, i/o): virtio-pci-common-virtio-net
  00000000febd0000-00000000febd017f (prio 0, i/o): edid
  00000000febd0180-00000000febd03ff (prio 1, i/o): vga.mmio @0000000000000180
  00000000febd0400-00000000febd041f (prio 0, i/o): vga ioports remapped
  00000000febd0420-00000000febd04ff (prio 1, i/o): vga.mmio @0000000000000420
  00000000febd0500-00000000febd0515 (prio 0, i/o): bochs dispi interface
  00000000fec00000-00000000fec00fff (prio 0, i/o): kvm-ioapic
  00000000fed1c000-00000000fed1ffff (prio 1, i/o): lpc-rcrb-mmio
  00000000fee00000-00000000feefffff (prio 4096, i/o): kvm-apic-msi
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios KVM

FlatView #1
 AS "mch", root: bus master container
 AS "VGA", root: bus master container
 Root memory region: (none)
  No rendered FlatView

FlatView #2
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
  00000000000001ce-00000000000001d1 (prio 0, i/o): vbe
"""
PT_LOADS_Q35 = [
    (0x0, 0xA0000),
    (0xC0000, 0x1FF40000),
    (0xFD000000, 0x1000000),
    (0xFFFC0000, 0x40000),
]


@pytest.mark.parametrize(
    ("text", "loads"),
    [(MTREE_PC_256, PT_LOADS_PC_256), (MTREE_PC_4G, PT_LOADS_PC_4G), (MTREE_Q35, PT_LOADS_Q35)],
    ids=["i440fx-256M", "i440fx-4G", "q35-vga"],
)
def test_mtree_of_real_guests_gives_dump_guest_memorys_pt_loads(
    text: str, loads: list[tuple[int, int]]
) -> None:
    layout = GuestLayout.from_mtree(text)
    assert [(s.phys_start, s.size) for s in layout.segments] == loads


def test_mtree_block_offsets() -> None:
    four = GuestLayout.from_mtree(MTREE_PC_4G).segments
    assert four[-1] == RamSegment(0x100000000, 0x40000000, "pc.ram", 0xC0000000)
    assert four[3] == RamSegment(0xF0000, 0x10000, "pc.bios", 0)
    assert four[5] == RamSegment(0xFFFF0000, 0x10000, "pc.bios", 0)
    q35 = GuestLayout.from_mtree(MTREE_Q35).segments
    assert q35[1] == RamSegment(0xC0000, 0x1FF40000, "pc.ram", 0xC0000)
    assert q35[2] == RamSegment(0xFD000000, 0x1000000, "vga.vram", 0)


@pytest.mark.parametrize(
    ("kind", "kept"),
    [
        ("ram", True),
        ("rom", True),
        ("nv-ram", False),
        ("ramd", False),
        ("romd", False),
        ("i/o", False),
    ],
)
def test_mtree_region_types(kind: str, kept: bool) -> None:
    """As guest_phys_blocks_region_add: RAM and ROM; not nonvolatile, ram devices (VFIO
    BARs), ROM devices (pflash) or I/O."""
    text = ms.mtree([(0x0, 0x1000, "ram", "pc.ram", 0), (0x10000, 0x1000, kind, "x", 0)])
    segs = GuestLayout.from_mtree(text).segments
    assert (len(segs) == 2) is kept


def test_mtree_merge_rules() -> None:
    text = ms.mtree(
        [
            (0x0, 0x1000, "ram", "pc.ram", 0),
            (0x1000, 0x1000, "rom", "pc.ram", 0x1000),  # merged: same region, contiguous
            (0x2000, 0x1000, "ram", "pc.ram", 0x3000),  # not: a gap in the region
            (0x3000, 0x1000, "ram", "other", 0x4000),  # not: another region
            (0x5000, 0x1000, "ram", "other", 0x6000),  # not: a physical gap
        ]
    )
    assert [(s.phys_start, s.size) for s in GuestLayout.from_mtree(text).segments] == [
        (0x0, 0x2000),
        (0x2000, 0x1000),
        (0x3000, 0x1000),
        (0x5000, 0x1000),
    ]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (MTREE_PC_256.replace(' AS "memory", root: system\n', ""), "0 flat views"),
        (MTREE_PC_256 + MTREE_PC_4G, "2 flat views"),
        (
            MTREE_PC_256.replace("(prio 1, rom): pc.rom", "(prio 1, rxm): pc.rom"),
            "unknown region type 'rxm'",
        ),
        (
            MTREE_PC_256.replace(
                "00000000000c0000-00000000000dffff", "00000000000b0000-00000000000dffff"
            ),
            "overlaps or is out of order",
        ),
        (
            MTREE_PC_256.replace("  0000000000100000-", "  garbage 0000000000100000-"),
            "is not a flat range",
        ),
        # `info mtree` without -f: a tree of aliases, not the flat view.
        (
            "address-space: memory\n  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n"
            "    0000000000000000-000000000fffffff (prio 0, ram): alias ram-below-4g @pc.ram\n",
            "0 flat views",
        ),
        (ms.mtree([(0x0, 0x1000, "i/o", "x", 0)]), "no RAM"),
    ],
)
def test_mtree_errors(text: str, match: str) -> None:
    with pytest.raises(LayoutError, match=match) as info:
        GuestLayout.from_mtree(text)
    assert isinstance(info.value, MigrationStreamError)


class _BlockingSource(ms.BytesSource):
    """Hands out ``data``, then blocks (a live stream waiting on QEMU) until released."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.release = threading.Event()
        self.blocked = threading.Event()

    def readinto(self, view: memoryview) -> int:
        if self.pos < len(self.data):
            return super().readinto(view)
        self.blocked.set()
        self.release.wait(30)
        raise MigrationStreamError("stream closed by abort")


def test_abort_from_another_thread_while_reading(tmp_path: Path) -> None:
    """The pipeline's deadline aborts from a timer thread while readinto blocks: abort()
    stops the producer but leaves the spill file's descriptor to the reading thread, which
    drops it when it returns (closing it under a pread/pwrite could hit a reused fd)."""
    early = [("pc.ram", off) for off in range(15 * PAGE, 0, -PAGE)]
    stream = ms.sweep(BLOCKS, early=early)
    cut = stream.index(ms.page(0, ms.pattern("pc.ram", 0)))  # just before page 0
    src = _BlockingSource(stream[:cut])
    core = LiveCoreSource(src, LAYOUT, spill_dir=tmp_path, buffer_bytes=PAGE)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while core.readinto(memoryview(bytearray(1 << 16))):
                pass
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=read)
    t.start()
    assert src.blocked.wait(30)
    spill = core._spill
    assert spill is not None and spill.fd is not None
    core.abort()
    assert src.aborted
    assert spill.fd is not None  # the reader is still inside readinto
    src.release.set()
    t.join(30)
    assert spill.fd is None
    assert [str(e) for e in errors] == ["stream closed by abort"]
    with pytest.raises(MigrationStreamError, match="stream closed by abort"):
        core.readinto(memoryview(bytearray(10)))
    # Aborted between reads: the next read says so.
    other = LiveCoreSource(ms.BytesSource(stream), LAYOUT, spill_dir=tmp_path)
    other.abort()
    with pytest.raises(MigrationStreamError, match="aborted"):
        other.readinto(memoryview(bytearray(10)))


def test_spill_disk_full_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    early = [("pc.ram", off) for off in range(15 * PAGE, 0, -PAGE)]
    stream = ms.sweep(BLOCKS, early=early)

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(StorageError, match="no space left") as info:
        convert(stream, tmp_path, buffer_bytes=PAGE)
    assert info.value.fields["errno"] == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(StorageError, match="spill file"):
        convert(stream, tmp_path / "missing", buffer_bytes=PAGE)


def test_ram_end_section_and_footers(tmp_path: Path) -> None:
    """A RAM section closed by SECTION_END (as a precopy migration does) is read the same;
    a footer naming another section, or a RAM section of another version, is an error."""
    stream = ms.sweep(BLOCKS)
    last = ms.part() + ms.eos() + ms.device_tail()
    assert stream.endswith(last)
    ended = (
        stream[: -len(last)] + bytes([ms.END]) + ms.be32(ms.RAM_ID) + ms.eos() + ms.device_tail()
    )
    core, _, _ = convert(ended, tmp_path)
    check_core(core)
    bad_footer = stream[: -len(last)] + ms.part() + ms.be64(ms.EOS) + ms.footer(9)
    assert "footer of section 9 in RAM section 2" in _convert_error(bad_footer, tmp_path)
    v3 = ms.header() + ms.section_header(ms.START, "ram", ms.RAM_ID, version=3) + bytes(40)
    assert "RAM section instance 0 version 3" in _convert_error(v3, tmp_path)
