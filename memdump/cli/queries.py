"""``memdump status``, ``records`` and ``stats``: what the running service knows, as a
table, JSON or (records) the API's own CSV."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from memdump.cli import client, render
from memdump.cli.client import Api


def cmd_status(api: Api, args: argparse.Namespace) -> int:
    s = api.get("/status")
    console = render.console()
    if args.json:
        render.print_json(console, s)
        return 0
    console.print(render.status_table(s))
    if s.get("vms"):
        console.print(render.vm_table(s["vms"]))
    return 0


def cmd_stats(api: Api, args: argparse.Namespace) -> int:
    s = api.get("/stats")
    console = render.console()
    if args.json:
        render.print_json(console, s)
        return 0
    console.print(render.stats_table(s))
    return 0


def cmd_records(api: Api, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {
        k: getattr(args, k)
        for k in ("since", "until", "vmid", "dom", "limit", "offset")
        if getattr(args, k) is not None
    }
    if args.csv:
        # The API's own CSV, as it sends it (header first; the same columns as the JSON).
        r = api.request("GET", "/records", params={**params, "format": "csv"})
        sys.stdout.write(r.text)
        sys.stdout.flush()
        return 0
    body = api.get("/records", **params)
    console = render.console()
    if args.json:
        render.print_json(console, body)
        return 0
    console.print(render.records_table(body["records"]))
    more = f", offset {body['offset']}" if body.get("offset") else ""
    console.print(f"{body['count']} record(s) (limit {body['limit']}{more})")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status", parents=[client.options()], help="the last run, per VM (GET /status)"
    )
    p.add_argument("--json", action="store_true", help="the API's JSON as is")
    p.set_defaults(handler=client.api_command(cmd_status))
    p = sub.add_parser(
        "records",
        parents=[client.options()],
        help="dump records, newest first (GET /records)",
        description="Dump records from the service, newest first, as a table, JSON or CSV.",
    )
    p.add_argument(
        "--since", metavar="ISO", help="at or after this date or time (UTC if no offset)"
    )
    p.add_argument("--until", metavar="ISO", help="before this date or time")
    p.add_argument("--vmid", help="only this vmid")
    p.add_argument("--dom", help="only this domain name")
    p.add_argument("--limit", type=int, help="at most N records (1-1000, default 1000)")
    p.add_argument("--offset", type=int, help="skip N records")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="the API's CSV to stdout")
    fmt.add_argument("--json", action="store_true", help="the API's JSON as is")
    p.set_defaults(handler=client.api_command(cmd_records))
    p = sub.add_parser(
        "stats", parents=[client.options()], help="aggregates over all records (GET /stats)"
    )
    p.add_argument("--json", action="store_true", help="the API's JSON as is")
    p.set_defaults(handler=client.api_command(cmd_stats))
