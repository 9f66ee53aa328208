"""``memdump trigger VM... [--wait]``: start a capture run through the running service
and, with --wait, follow it to its end (the one polling loop of the CLI)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from memdump.cli import client, render
from memdump.cli.client import Api

# `memdump trigger --wait` exit codes, by the run's final status (documented in --help).
RUN_EXIT = {"completed": 0, "failed": 1, "timeout": 2, "error": 3}


def cmd_trigger(api: Api, args: argparse.Namespace) -> int:
    console = render.console()
    before = None
    if args.wait:
        # To tell the run this trigger starts from the one /status showed before it.
        before = api.get("/status").get("timestamp")
    body = api.request("POST", "/trigger", json={"vm_ids": args.vm_ids}).json()
    render.print_json(console, body)
    if not args.wait:
        return 0
    try:
        with render.run_view(console) as view:
            final = follow(api, view, before, args.interval, args.wait_timeout)
    except KeyboardInterrupt:
        print("memdump: stopped waiting; the run goes on (see `memdump status`)", file=sys.stderr)
        return 130
    if final is None:
        print(
            f"memdump: the run is still in progress after {args.wait_timeout:g} s"
            " (see `memdump status`)",
            file=sys.stderr,
        )
        return 1
    console.print(render.vm_table(final.get("vms") or [], title="Result"))
    st = final["status"]
    line = f"run {st}"
    if final.get("duration") is not None:
        line += f" in {final['duration']:.3f} s"
    if final.get("error"):
        line += f": {final['error']}"
    console.print(render.cell(line, render.STATE_STYLE.get(st, "")), soft_wrap=True)
    return RUN_EXIT.get(st, 3)


def follow(
    api: Api,
    view: render.RunLines | render.RunBars,
    before: str | None,
    interval: float,
    timeout: float | None,
) -> dict[str, Any] | None:
    """Poll /status until the run this trigger started is final, showing each answer
    that is about it; its last answer, or None if ``timeout`` passed first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        s = api.get("/status")
        # Not the run /status showed before the trigger (another replica's cache, say).
        if s.get("status") != "idle" and (before is None or s.get("timestamp") != before):
            view.show(s)
            if s["status"] in render.FINAL:
                return dict(s)
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(interval)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "trigger",
        parents=[client.options()],
        help="start a capture run through the service (POST /trigger)",
        description="Start a capture run through the running service and print its answer."
        " With --wait, follow it (a bar per VM) and end with a result per VM.",
        epilog="Exit status: 0 the run completed (or, without --wait, was scheduled);"
        " 1 the run failed, the API refused the trigger (its detail is printed), the service"
        " could not be reached, or --wait-timeout passed; 2 the run timed out"
        " (MEMDUMP_CAPTURE_TIMEOUT_SEC); 3 the run ended in error (crashed or cancelled);"
        " 130 interrupted while waiting (the run goes on).",
    )
    p.add_argument("vm_ids", nargs="+", metavar="VM", help='VM ids (name, id or UUID), or "all"')
    p.add_argument("--wait", action="store_true", help="follow the run until it ends")
    p.add_argument(
        "--interval", type=client.positive, default=0.5, help="seconds between polls (default 0.5)"
    )
    p.add_argument(
        "--wait-timeout",
        type=client.positive,
        default=None,
        help="give up waiting after this many seconds",
    )
    p.set_defaults(handler=client.api_command(cmd_trigger))
