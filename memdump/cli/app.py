"""``memdump`` command line: capture VMs of the inventory directly (no server needed), or
talk to a running service (`memdump serve`) over its REST API: trigger, status, records,
stats."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, TypeAlias

from memdump.errors import MemdumpError
from memdump.fsperm import private_umask

if TYPE_CHECKING:
    Subcommands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
# Each command module adds its subparsers, each with ``handler`` (settings, args) -> exit
# status and, where the arguments need a check argparse cannot express, ``check`` (args)
# -> an error message or None. A command that needs the settings only for some of its
# arguments (diff: for s3:// URIs) has ``run`` (args) -> exit status instead of
# ``handler`` and builds them itself.
Register: TypeAlias = "Callable[[Subcommands], None]"
# Commands of the layers above the engine (``memdump serve`` supervises the API and the
# Prefect runner) are found by this entry-point group of memdump's own distribution
# (pyproject.toml), so the engine never names them.
PLUGIN_GROUP = "memdump.commands"
# The engine's command modules (memdump.cli.<name>, in the order of the help) and the
# commands each registers: `memdump diff A B` imports and registers only its own module,
# and neither the plugins nor the settings, so it starts without the capture chain, SSH,
# pydantic or Volatility (benchmarks/diff.py).
ENGINE = (
    "inventory",
    "capture",
    "maintenance",
    "trigger",
    "queries",
    "vol",
    "keys",
    "custody",
    "timestamps",
)
COMMANDS = {
    "vms": "inventory",
    "capture": "capture",
    "clean": "maintenance",
    "verify": "maintenance",
    "diff": "maintenance",
    "trigger": "trigger",
    "status": "queries",
    "records": "queries",
    "stats": "queries",
    "vol": "vol",
    "keys": "keys",
    "timestamps": "timestamps",
    "countersign": "keys",
    "custody": "custody",
    "copy": "custody",
}


def engine(module: str) -> Register:
    """The ``register`` of the engine's command module ``module`` (one of ENGINE)."""
    register: Register = importlib.import_module(f"memdump.cli.{module}").register
    return register


def plugins() -> list[Register]:
    """The ``register`` of each command memdump's distribution declares in PLUGIN_GROUP.
    Only its own metadata is read: scanning every installed distribution's costs the
    CLI's start-up 10-25 ms for nothing."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        found = distribution("memdump").entry_points.select(group=PLUGIN_GROUP)
    except PackageNotFoundError:  # the engine alone, not installed: no such commands
        return []
    return [ep.load() for ep in sorted(found, key=lambda e: e.name)]


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command; for ``command``, one of the engine's (COMMANDS), only its module's
    (they parse its arguments the same)."""
    p = argparse.ArgumentParser(prog="memdump", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    if command in COMMANDS:
        registers = [engine(COMMANDS[command])]
    else:
        registers = [*plugins(), *map(engine, ENGINE)]
    for register in registers:
        register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # Records, dumps, manifests, Prefect's database: for the operator only, whatever
    # umask the shell or the supervisor gave us (the children inherit it).
    private_umask()
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser(argv[0] if argv else None)
    args = p.parse_args(argv)
    check: Callable[[argparse.Namespace], str | None] | None = getattr(args, "check", None)
    if check is not None and (problem := check(args)):
        p.error(problem)
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    try:
        if run is not None:
            return int(run(args))
        from memdump.settings import Settings

        return int(args.handler(Settings(), args))
    except MemdumpError as exc:
        print(f"memdump: {exc}", file=sys.stderr)
        return 2


def run() -> NoReturn:
    """The console script (and ``python -m memdump.cli``): ``main()``, then the exit
    without the interpreter's teardown. What memdump writes is closed and fsynced before
    main returns (dump, manifest, custody line, committed record); the teardown that is
    skipped frees the objects of ~700 modules, about 0.1 s after every `memdump capture`
    has printed its record (issue 14: what the CLI adds to a capture). What a normal exit
    does first is done here too: non-daemon threads joined (thread pools told to stop),
    the atexit handlers (logging's flush, temporary directories' removal), stdio flushed.
    An exception or SystemExit out of main takes the normal way."""
    code = main()
    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
