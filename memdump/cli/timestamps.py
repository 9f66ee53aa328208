"""``memdump timestamps flush|status``: the RFC 3161 timestamps whose TSA did not answer
at capture time (memdump.timestamping): fetch them now, or show the queue."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memdump.settings import Settings


def cmd_flush(settings: Settings, args: argparse.Namespace) -> int:
    """Fetch the pending tokens (in order, until the TSA fails); exit 1 if any is left."""
    from memdump.timestamping import flush

    if settings.tsa_url is None:
        print(json.dumps({"fetched": 0, "left": None, "last_error": "MEMDUMP_TSA_URL unset"}))
        return 1
    done = flush(settings)
    print(json.dumps(done.to_dict()))
    return 1 if done.left else 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from memdump.timestamping import summary

    print(json.dumps(summary(settings)))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "timestamps", help="trusted timestamps still pending (memdump timestamps flush)"
    )
    tsub = p.add_subparsers(dest="timestamps_command", required=True)
    tsub.add_parser(
        "flush", help="fetch the tokens the TSA did not give at capture time"
    ).set_defaults(handler=cmd_flush)
    tsub.add_parser("status", help="how many requests wait, and why").set_defaults(
        handler=cmd_status
    )
