"""sh/hugepages.pl (the huge-page restore after a live capture) on a real process of this
machine: a child that holds 8 MiB of anonymous memory madvised for huge pages, two of its
2 MiB regions written (huge pages), one only read (the huge zero page), one untouched.
The scan must name exactly the written regions; after a 4 KiB hole is punched in each
(which splits the huge page, as QEMU's 4 KiB unprotects do), the collapse must put them
back on huge pages and turn nothing else into one. Root and Linux >= 6.1 with THP
("madvise" or "always"), as on the hypervisors it runs on."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from memdump.hypervisors import libvirt as lv
from memdump.hypervisors.scripts import read

HUGE = 2 << 20
SCRIPT = read("hugepages.pl")

# The child: maps 10 MiB, keeps the 2 MiB-aligned 8 MiB inside (regions 0-3), madvises
# it for huge pages, writes regions 0 and 2, reads region 1. Commands on stdin:
# "hole" punches a 4 KiB hole (MADV_DONTNEED) into regions 0 and 2; "quit".
CHILD = r"""
import ctypes, mmap, sys
HUGE = 2 << 20
m = mmap.mmap(-1, 10 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
base = ctypes.addressof(ctypes.c_char.from_buffer(m))
off = (-base) % HUGE
m.madvise(mmap.MADV_HUGEPAGE, off, 8 << 20)
for r in (0, 2):
    m[off + r * HUGE:off + (r + 1) * HUGE] = b"\x5a" * HUGE
m[off + HUGE + 100]
print(hex(base + off), flush=True)
for line in sys.stdin:
    if line.strip() == "hole":
        for r in (0, 2):
            m.madvise(mmap.MADV_DONTNEED, off + r * HUGE + 4096, 4096)
        print("ok", flush=True)
    else:
        break
"""


class Child:
    def __init__(self) -> None:
        self.p = subprocess.Popen(  # noqa: S603 - this interpreter, fixed text
            [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.p.stdout is not None
        self.base = int(self.p.stdout.readline(), 16)

    def ask(self, what: str) -> str:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(what + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def vma(self) -> dict[str, int]:
        """smaps fields (kB) of the mapping holding the 8 MiB."""
        fields: dict[str, int] = {}
        inside = False
        for line in Path(f"/proc/{self.p.pid}/smaps").read_text().splitlines():
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= self.base < hi
            elif inside and line.split()[-1] == "kB":
                fields[head.rstrip(":")] = int(line.split()[1])
        return fields


@pytest.fixture
def child() -> Iterator[Child]:
    c = Child()
    yield c
    c.ask("quit")
    c.p.wait(timeout=10)


def perl(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - perl with the package's own script
        ["perl", "-e", SCRIPT, *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def test_scan_names_the_written_regions_only_and_collapse_restores_them(child: Child) -> None:
    assert child.vma()["AnonHugePages"] == 4096  # regions 0 and 2
    scan = perl("scan", str(child.p.pid))
    assert scan.returncode == 0, scan.stderr
    first, *runs = scan.stdout.splitlines()
    assert first.startswith("start ")
    # Two runs of one region each: 0 and 2. Not 1 (the huge zero page), not 3 (untouched).
    assert runs == [f"{child.base:x} 1", f"{child.base + 2 * HUGE:x} 1"]
    assert child.ask("hole") == "ok"
    split = child.vma()
    assert split["AnonHugePages"] == 0  # the holes split both huge pages
    rss_split = split["Rss"]
    done = perl("collapse", str(child.p.pid), "60", stdin=scan.stdout)
    assert done.returncode == 0, done.stderr
    regions, restored, failed, _ms = done.stdout.split()
    assert (regions, restored, failed) == ("2", "2", "0")
    after = child.vma()
    assert after["AnonHugePages"] == 4096
    # Exactly the two holes filled again; region 1 (zero page) and 3 did not become
    # huge pages (that would be + 4 MiB of RSS).
    assert after["Rss"] - rss_split == 8
    assert lv.huge_pages(done.stdout.strip()) == {
        "regions_before": 2,
        "restored": 2,
        "not_restored": 0,
        "restore_ms": int(_ms),
    }


def test_collapse_refuses_another_process(child: Child) -> None:
    scan = perl("scan", str(child.p.pid))
    # Another process's start time: the pid was reused, nothing is collapsed.
    other = scan.stdout.replace("start ", "start 1", 1)
    done = perl("collapse", str(child.p.pid), "60", stdin=other)
    assert done.returncode == 3 and done.stdout == ""
    gone = perl("scan", "999999999")
    assert gone.returncode == 3


@pytest.mark.parametrize(
    ("args", "stdin"),
    [
        (("collapse", "1;rm"), ""),
        (("scan", "-1"), ""),
        (("collapse", "1", "x"), "start 1\n"),
        (("collapse", "1", "9"), "start 1\nzz 1\n"),
        (("other", "1"), ""),
    ],
)
def test_bad_arguments_are_refused(args: tuple[str, ...], stdin: str) -> None:
    res = perl(*args, stdin=stdin)
    assert res.returncode == 2 and res.stdout == ""
    assert "hugepages:" in res.stderr


def test_a_user_who_cannot_read_kpageflags_gets_a_named_reason() -> None:
    """Not root (here: nobody): the scan stops at once with exit 5,
    which the manifest names, instead of finding no region (pagemap hides the page
    frames from such a user) or dying with an errno."""
    res = subprocess.run(  # noqa: S603 - setpriv and perl with the package's own script
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "perl", "-e", SCRIPT, "scan", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 5 and res.stdout == ""
    assert "/proc/kpageflags" in res.stderr
    got = lv.huge_pages("unavailable scan-5")
    assert got == {"unavailable": "the hypervisor user cannot read /proc/kpageflags (root needed)"}
