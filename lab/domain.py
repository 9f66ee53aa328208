#!/usr/bin/env python3
"""Print the libvirt domain XML for one lab VM, built from its layout.json.

Usage: domain.py LAYOUT_JSON BIOS_BIN VIRT_TYPE STATE_DIR
       domain.py --linux KERNEL_JSON NAME MIB VIRT_TYPE STATE_DIR CONSOLE_LOG [EXTRA_CMDLINE]

--linux: a guest booting Debian's kernel and the lab's initramfs (lab/linux.py)
with libvirt's direct kernel boot, its serial console logged to CONSOLE_LOG;
EXTRA_CMDLINE is appended to the kernel command line.

The XML carries a <metadata> element with a fingerprint of everything that
matters, so lab/up can tell "same domain, reuse it" from "stale, recreate"
and lab/down can refuse to touch domains the lab did not make.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from xml.sax.saxutils import escape, quoteattr

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


def linux_domain_xml(
    kernel: dict,
    cache_dir: str,
    name: str,
    mib: int,
    virt_type: str,
    state_dir: str,
    console: str,
    extra_cmdline: str = "",
) -> str:
    vmlinuz = f"{cache_dir}/{kernel['vmlinuz']['file']}"
    initrd = f"{cache_dir}/{kernel['initrd']['file']}"
    cmdline = " ".join([kernel["cmdline"], *extra_cmdline.split()])
    fp = hashlib.sha256(
        json.dumps(
            [
                name,
                mib,
                "linux",
                virt_type,
                kernel["vmlinuz"]["sha256"],
                kernel["initrd"]["sha256"],
                cmdline,
                vmlinuz,
                initrd,
                console,
            ]
        ).encode()
    ).hexdigest()[:16]
    return f"""<domain type={quoteattr(virt_type)}>
  <name>{name}</name>
  <description>memdump lab VM (lab/up): Linux {kernel["release"]} from {cache_dir}</description>
  <metadata>
    <lab:vm xmlns:lab='{LAB_NS}' state={quoteattr(state_dir)}
            fingerprint='{fp}' mib='{mib}' kind='linux'/>
  </metadata>
  <memory unit='MiB'>{mib}</memory>
  <currentMemory unit='MiB'>{mib}</currentMemory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(vmlinuz)}</kernel>
    <initrd>{escape(initrd)}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <clock offset='utc'/>
  <!-- panic=-1 turns a kernel panic into a reboot, and a reboot ends the domain:
       lab/up sees a failed boot at once instead of waiting for its timeout. -->
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path={quoteattr(console)} append='off'/>
      <target port='0'/>
    </serial>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def main() -> int:
    if len(sys.argv) in (8, 9) and sys.argv[1] == "--linux":
        kernel_json, name, mib, virt_type, state_dir, console = sys.argv[2:8]
        extra = sys.argv[8] if len(sys.argv) == 9 else ""
        with open(kernel_json) as f:
            kernel = json.load(f)
        cache_dir = os.path.dirname(os.path.abspath(kernel_json))
        sys.stdout.write(
            linux_domain_xml(
                kernel, cache_dir, name, int(mib), virt_type, state_dir, console, extra
            )
        )
        return 0
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
