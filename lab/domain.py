#!/usr/bin/env python3
"""Print the libvirt domain XML for one lab VM, built from its layout.json.

Usage: domain.py LAYOUT_JSON BIOS_BIN VIRT_TYPE STATE_DIR

The XML carries a <metadata> element with a fingerprint of everything that
matters, so lab/up can tell "same domain, reuse it" from "stale, recreate"
and lab/down can refuse to touch domains the lab did not make.
"""

from __future__ import annotations

import hashlib
import json
import sys
from xml.sax.saxutils import quoteattr

LAB_NS = "urn:memdump:lab"


def qemu_opt(value: str) -> str:
    # QEMU option values escape ',' by doubling it.
    return value.replace(",", ",,")


def domain_xml(layout: dict, bios: str, virt_type: str, state_dir: str) -> str:
    name = layout["name"]
    mib = layout["memory_bytes"] >> 20
    args = ["-bios", bios]
    for r in layout["regions"]:
        args += ["-device", f"loader,file={qemu_opt(r['file'])},addr={r['addr']:#x},force-raw=on"]
    # Fingerprint covers the inputs, not the XML libvirt echoes back (which it
    # normalises), so comparing it with the running domain's is stable.
    fp = hashlib.sha256(
        json.dumps(
            [name, mib, layout["seed"], layout.get("generator_version"), virt_type, args]
        ).encode()
    ).hexdigest()[:16]
    qargs = "\n".join(f"    <qemu:arg value={quoteattr(a)}/>" for a in args)
    return f"""<domain type={quoteattr(virt_type)} xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <description>memdump lab VM (lab/up); RAM preloaded from {state_dir}</description>
  <metadata>
    <lab:vm xmlns:lab='{LAB_NS}' state={quoteattr(state_dir)}
            fingerprint='{fp}' mib='{mib}' seed='{layout["seed"]}'/>
  </metadata>
  <memory unit='MiB'>{mib}</memory>
  <currentMemory unit='MiB'>{mib}</currentMemory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
  <!-- -bios: a 64 KiB ROM that only does cli;hlt, so nothing but the loader
       images ever writes guest RAM and dumps are reproducible. -->
  <qemu:commandline>
{qargs}
  </qemu:commandline>
</domain>
"""


def main() -> int:
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    layout_path, bios, virt_type, state_dir = sys.argv[1:]
    with open(layout_path) as f:
        layout = json.load(f)
    sys.stdout.write(domain_xml(layout, bios, virt_type, state_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
