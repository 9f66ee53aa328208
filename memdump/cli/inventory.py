"""``memdump vms``: the running VMs of every hypervisor in the inventory."""

from __future__ import annotations

import argparse
import json
import sys

from memdump.escaping import plain_text
from memdump.hypervisors import Driver, open_driver
from memdump.settings import Settings
from memdump.targets import list_each


def open_drivers(settings: Settings) -> list[Driver]:
    return [open_driver(hv, settings.ssh) for hv in settings.inventory]


def cmd_vms(settings: Settings, _args: argparse.Namespace) -> int:
    # Each hypervisor on its own: one that cannot be listed is reported, not fatal.
    failed = 0
    for listing in list_each(open_drivers(settings)):
        if listing.error is not None:
            failed += 1
            err = {"hypervisor": listing.hypervisor, **listing.error.to_dict()}
            print(json.dumps(err, default=str), file=sys.stderr)
        for ref in listing.vms:  # names as the hypervisor gave them: no escape sequences
            print("\t".join(plain_text(v) for v in (ref.hypervisor, ref.vmid, ref.name)))
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("vms", help="list running VMs of every hypervisor in the inventory")
    p.set_defaults(handler=cmd_vms)
