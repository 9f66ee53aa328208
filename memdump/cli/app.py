"""``memdump`` command line: capture VMs of the inventory directly (no server needed), or
talk to a running service (`memdump serve`) over its REST API: trigger, status, records,
stats."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, distribution
from typing import TYPE_CHECKING, TypeAlias

from memdump.cli import capture, inventory, maintenance, queries, trigger, vol
from memdump.errors import MemdumpError
from memdump.fsperm import private_umask
from memdump.settings import Settings

if TYPE_CHECKING:
    Subcommands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
# Each command module adds its subparsers, each with ``handler`` (settings, args) -> exit
# status and, where the arguments need a check argparse cannot express, ``check`` (args)
# -> an error message or None.
Register: TypeAlias = "Callable[[Subcommands], None]"
# Commands of the layers above the engine (``memdump serve`` supervises the API and the
# Prefect runner) are found by this entry-point group of memdump's own distribution
# (pyproject.toml), so the engine never names them.
PLUGIN_GROUP = "memdump.commands"
ENGINE: tuple[Register, ...] = (
    inventory.register,
    capture.register,
    maintenance.register,
    trigger.register,
    queries.register,
    vol.register,
)


def plugins() -> list[Register]:
    """The ``register`` of each command memdump's distribution declares in PLUGIN_GROUP.
    Only its own metadata is read: scanning every installed distribution's costs the
    CLI's start-up 10-25 ms for nothing."""
    try:
        found = distribution("memdump").entry_points.select(group=PLUGIN_GROUP)
    except PackageNotFoundError:  # the engine alone, not installed: no such commands
        return []
    return [ep.load() for ep in sorted(found, key=lambda e: e.name)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memdump", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for register in (*plugins(), *ENGINE):
        register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # Records, dumps, manifests, Prefect's database: for the operator only, whatever
    # umask the shell or the supervisor gave us (the children inherit it).
    private_umask()
    p = parser()
    args = p.parse_args(argv)
    check: Callable[[argparse.Namespace], str | None] | None = getattr(args, "check", None)
    if check is not None and (problem := check(args)):
        p.error(problem)
    try:
        return int(args.handler(Settings(), args))
    except MemdumpError as exc:
        print(f"memdump: {exc}", file=sys.stderr)
        return 2
