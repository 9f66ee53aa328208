"""``memdump`` command line: capture VMs of the inventory directly (no server needed), or
talk to a running service (`memdump serve`) over its REST API: trigger, status, records,
stats."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from memdump.capture import capture
from memdump.errors import MemdumpError
from memdump.escaping import plain_text
from memdump.fsperm import private_umask
from memdump.hypervisors import Driver, VMRef, open_driver
from memdump.settings import Settings
from memdump.targets import ALL, find, list_each

if TYPE_CHECKING:
    import httpx
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text


def _drivers(settings: Settings) -> list[Driver]:
    return [open_driver(hv, settings.ssh) for hv in settings.inventory]


def cmd_vms(settings: Settings, _args: argparse.Namespace) -> int:
    # Each hypervisor on its own: one that cannot be listed is reported, not fatal.
    failed = 0
    for listing in list_each(_drivers(settings)):
        if listing.error is not None:
            failed += 1
            err = {"hypervisor": listing.hypervisor, **listing.error.to_dict()}
            print(json.dumps(err, default=str), file=sys.stderr)
        for ref in listing.vms:  # names as the hypervisor gave them: no escape sequences
            print("\t".join(plain_text(v) for v in (ref.hypervisor, ref.vmid, ref.name)))
    return 1 if failed else 0


def cmd_capture(settings: Settings, args: argparse.Namespace) -> int:
    drivers = _drivers(settings)
    failed = 0

    def report_failure(vm_id: str, exc: MemdumpError) -> None:
        nonlocal failed
        failed += 1
        print(json.dumps({"vm_id": vm_id, **exc.to_dict()}, default=str), file=sys.stderr)

    targets: list[tuple[Driver, VMRef]] = []
    for vm_id in dict.fromkeys(args.vm_ids):  # duplicates are captured once
        try:
            if vm_id == ALL:  # each hypervisor on its own: one failing fails its VMs only
                for d, listing in zip(drivers, list_each(drivers), strict=True):
                    if listing.error is not None:
                        report_failure(f"{listing.hypervisor}:{ALL}", listing.error)
                    targets.extend((d, ref) for ref in listing.vms)
            else:
                targets.append(find(drivers, vm_id))
        except MemdumpError as exc:
            report_failure(vm_id, exc)
    for driver, ref in dict.fromkeys(targets):
        try:
            result = capture(driver, ref, settings, trigger={"source": "cli"}, mode=args.mode)
        except MemdumpError as exc:
            report_failure(ref.vmid, exc)
            continue
        if result.fallback_reason:  # also in the record's live_fallback_reason
            why = plain_text(result.fallback_reason)
            print(
                f"memdump: {plain_text(ref.vmid)}: captured paused, not live: {why}",
                file=sys.stderr,
            )
        print(json.dumps(result.record.full_dict()), flush=True)
    for d in drivers:
        d.close()
    return 1 if failed else 0


def cmd_clean(settings: Settings, args: argparse.Namespace) -> int:
    from memdump.leftovers import clean_leftovers

    out = clean_leftovers(settings, args.min_age)
    for path in out.local:
        print(f"removed\tlocal\t{path}")
    for hv, dirs in out.remote.items():
        for d in dirs:
            print(f"removed\t{hv}\t{d}")
    for hv, err in out.errors.items():
        print(f"memdump: {hv}: {err}", file=sys.stderr)
    return 1 if out.errors else 0


def cmd_verify(settings: Settings, args: argparse.Namespace) -> int:
    """Verify recorded dumps: one per path given, or all since ``--since-days``. One JSON
    line each; exit 1 unless every one is verified."""
    from datetime import UTC, datetime, timedelta

    from memdump.records import open_store
    from memdump.records.base import RecordQuery
    from memdump.verify import verify

    store = open_store(settings)
    rows: list[dict[str, object]] = []
    for path in args.dump_paths:
        found = store.list(1, 0, RecordQuery(dump_path=path))
        if not found:
            print(json.dumps({"status": "unknown", "dump_path": path, "detail": "no record"}))
            rows.append({})
        rows.extend(found)
    if args.since_days is not None:
        since = datetime.now(UTC) - timedelta(days=args.since_days)
        offset = 0
        while page := store.list(1000, offset, RecordQuery(since=since)):
            rows.extend(page)
            offset += len(page)
    bad = sum(1 for r in rows if not r)
    for row in (r for r in rows if r):
        v = verify(row, settings)
        bad += v.status != "verified"
        print(json.dumps(v.to_dict()), flush=True)
    return 1 if bad else 0


# -- Commands that talk to a running service (`memdump serve`) over its REST API --------

API_PREFIX = "/api/memory-dumps"
# `memdump trigger --wait` exit codes, by the run's final status (documented in --help).
RUN_EXIT = {"completed": 0, "failed": 1, "timeout": 2, "error": 3}
FINAL = set(RUN_EXIT)


class ApiError(Exception):
    """The API answered an error, or could not be reached: printed, exit 1."""


def api_base(settings: Settings, given: str | None) -> str:
    """``--api``, else ``http://MEMDUMP_API_HOST:MEMDUMP_API_PORT`` (a wildcard bind
    address means this host)."""
    if given:
        return given.rstrip("/")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(  # noqa: S104
        settings.api_host, settings.api_host
    )
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.api_port}"


def _http(base_url: str, headers: dict[str, str], timeout: float) -> httpx.Client:
    """The HTTP client (tests put a FastAPI TestClient here)."""
    import httpx

    return httpx.Client(base_url=base_url, headers=headers, timeout=timeout)


class Api:
    def __init__(self, base: str, token: str | None, timeout: float = 30.0) -> None:
        from memdump import __version__

        self.base = base
        self.timeout = timeout
        headers = {"user-agent": f"memdump-cli/{__version__}"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self.http = _http(base, headers, timeout)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        import httpx

        try:
            r = self.http.request(method, API_PREFIX + path, **kw)
        except httpx.ConnectError as exc:
            raise ApiError(
                f"cannot connect to the memdump API ({exc}): "
                f"is `memdump serve` running at {self.base}?"
            ) from None
        except httpx.TimeoutException:
            raise ApiError(
                f"the memdump API at {self.base} did not answer within {self.timeout:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise ApiError(f"request to the memdump API at {self.base} failed: {exc}") from None
        if r.status_code >= 400:
            try:
                detail = r.json()["detail"]
            except Exception:
                detail = r.text.strip()[:500] or r.reason_phrase
            raise ApiError(f"{detail} (HTTP {r.status_code})")
        return r

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params).json()

    def close(self) -> None:
        self.http.close()


def _console() -> Console:
    from rich.console import Console

    # Not a terminal (a pipe, a file, a test): no colour, no animation, and a width that
    # does not fold ids and hashes (COLUMNS still wins).
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        return Console(width=200, highlight=False)
    return Console(highlight=False)


def _size(n: Any) -> str:
    if not isinstance(n, int | float):
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def _text(v: Any) -> str:
    return "" if v is None else str(v)


STATE_STYLE = {
    "completed": "green",
    "failed": "red",
    "timeout": "red",
    "error": "red",
    "running": "cyan",
    "in_progress": "cyan",
    "retrying": "yellow",
}


def _cell(value: Any, style: str = "") -> Text:
    """Text as it is: ids and error messages are never read as rich markup."""
    from rich.text import Text

    return Text(_text(value), style=style)


def _state(state: str) -> Text:
    return _cell(state, STATE_STYLE.get(state, ""))


def _vm_table(vms: list[dict[str, Any]], title: str | None = None) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("VM")
    table.add_column("state")
    table.add_column("progress", justify="right")
    table.add_column("error", overflow="fold")
    for i, vm in enumerate(vms):
        progress = vm.get("progress")
        table.add_row(
            _cell(vm.get("vm_id") or f"(VM {i + 1}, not started)"),
            _state(vm["state"]),
            "" if progress is None else f"{progress:.1f}%",
            _cell(vm.get("error")),
        )
    return table


def _status_table(s: dict[str, Any]) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("status", _state(s.get("status", "")))
    table.add_row("timestamp", _cell(s.get("timestamp")))
    table.add_row("vm_ids", _cell(", ".join(s.get("vm_ids") or [])))
    duration = s.get("duration")
    table.add_row("duration", "" if duration is None else f"{duration:.3f} s")
    table.add_row("error", _cell(s.get("error")))
    return table


def _print_json(console: Console, value: Any) -> None:
    # Plain JSON (one document) either way: `memdump status --json | jq` must work.
    console.file.write(json.dumps(value, indent=2) + "\n")
    console.file.flush()


def cmd_status(api: Api, args: argparse.Namespace) -> int:
    s = api.get("/status")
    console = _console()
    if args.json:
        _print_json(console, s)
        return 0
    console.print(_status_table(s))
    if s.get("vms"):
        console.print(_vm_table(s["vms"]))
    return 0


def cmd_stats(api: Api, args: argparse.Namespace) -> int:
    from rich import box
    from rich.table import Table

    s = api.get("/stats")
    console = _console()
    if args.json:
        _print_json(console, s)
        return 0
    table = Table(box=box.SIMPLE_HEAD, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", justify="right")
    table.add_column("", style="dim")
    table.add_row("total_dumps", str(s["total_dumps"]), "")
    table.add_row("total_vms", str(s["total_vms"]), "")
    table.add_row("total_size_bytes", str(s["total_size_bytes"]), _size(s["total_size_bytes"]))
    table.add_row("avg_duration_sec", f"{s['avg_duration_sec']:.3f}", "")
    table.add_row("last_dump", _cell(s.get("last_dump")), "")
    console.print(table)
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
    console = _console()
    if args.json:
        _print_json(console, body)
        return 0
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD)
    for col, just in (
        ("timestamp", "left"),
        ("vmid", "left"),
        ("dom", "left"),
        ("hypervisor", "left"),
        ("size (.gz)", "right"),
        ("seconds", "right"),
        ("sha256", "left"),
        ("analysis", "left"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for rec in body["records"]:
        table.add_row(
            _cell(rec["timestamp"]),
            _cell(rec["vmid"]),
            _cell(rec["dom"]),
            _cell(rec.get("hypervisor")),
            _size(rec["gzip_size_bytes"]),
            f"{rec['duration_sec']:.3f}",
            _cell(rec["sha256"][:16] + "…"),
            _state(_text(rec.get("analysis"))),
        )
    console.print(table)
    more = f", offset {body['offset']}" if body.get("offset") else ""
    console.print(f"{body['count']} record(s) (limit {body['limit']}{more})")
    return 0


def cmd_trigger(api: Api, args: argparse.Namespace) -> int:
    console = _console()
    before = None
    if args.wait:
        # To tell the run this trigger starts from the one /status showed before it.
        before = api.get("/status").get("timestamp")
    body = api.request("POST", "/trigger", json={"vm_ids": args.vm_ids}).json()
    _print_json(console, body)
    if not args.wait:
        return 0
    try:
        final = _wait(api, console, before, args.interval, args.wait_timeout)
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
    console.print(_vm_table(final.get("vms") or [], title="Result"))
    st = final["status"]
    line = f"run {st}"
    if final.get("duration") is not None:
        line += f" in {final['duration']:.3f} s"
    if final.get("error"):
        line += f": {final['error']}"
    console.print(_cell(line, STATE_STYLE.get(st, "")), soft_wrap=True)
    return RUN_EXIT.get(st, 3)


def _wait(
    api: Api, console: Console, before: str | None, interval: float, timeout: float | None
) -> dict[str, Any] | None:
    """Poll /status until the run this trigger started is final; its last answer, or
    None if ``timeout`` passed first. A live bar per VM on a terminal, else a line per
    change."""
    deadline = None if timeout is None else time.monotonic() + timeout

    def ours(s: dict[str, Any]) -> bool:
        return s.get("status") != "idle" and (before is None or s.get("timestamp") != before)

    if console.is_terminal:
        return _wait_live(api, console, ours, interval, deadline)
    # A line when a VM changes state or passes a quarter of its dump.
    seen: dict[int, tuple[str | None, str, int]] = {}
    run_state = ""
    while True:
        s = api.get("/status")
        if ours(s):
            for i, vm in enumerate(s.get("vms") or []):
                pct = vm.get("progress")
                now = (vm.get("vm_id"), vm["state"], -1 if pct is None else int(pct // 25))
                if seen.get(i) != now:
                    seen[i] = now
                    extra = "" if pct is None else f" {pct:.1f}%"
                    console.print(_cell(f"{now[0] or f'(VM {i + 1})'}: {now[1]}{extra}"))
            if s["status"] != run_state:
                run_state = s["status"]
                console.print(_cell(f"run: {run_state}"))
            if s["status"] in FINAL:
                return dict(s)
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(interval)


def _wait_live(
    api: Api,
    console: Console,
    ours: Any,
    interval: float,
    deadline: float | None,
) -> dict[str, Any] | None:
    from rich.progress import (
        BarColumn,
        Progress,
        SpinnerColumn,
        TaskID,
        TextColumn,
        TimeElapsedColumn,
    )

    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TextColumn("{task.fields[pct]:>6}", markup=False),
        TextColumn("{task.fields[state]}", markup=False),
        TimeElapsedColumn(),
        console=console,
    )
    bars: dict[int, TaskID] = {}
    with progress:
        header = progress.add_task("run", total=None, pct="", state="waiting for the run")
        while True:
            s = api.get("/status")
            if ours(s):
                progress.update(header, state=s["status"])
                for i, vm in enumerate(s.get("vms") or []):
                    pct = vm.get("progress")
                    done = vm["state"] == "completed"
                    fields = {
                        "description": vm.get("vm_id") or f"(VM {i + 1})",
                        "pct": "" if pct is None else f"{pct:.1f}%",
                        "state": vm["state"],
                    }
                    if i not in bars:
                        bars[i] = progress.add_task(
                            fields["description"], total=100.0, pct="", state=""
                        )
                    unknown = pct is None and vm["state"] not in FINAL
                    progress.update(
                        bars[i],
                        total=None if unknown else 100.0,
                        completed=100.0 if done else (pct or 0.0),
                        **fields,
                    )
                    if vm["state"] in FINAL:
                        progress.stop_task(bars[i])
                if s["status"] in FINAL:
                    progress.update(header, total=1, completed=1)
                    return dict(s)
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(interval)


API_COMMANDS: dict[str, Callable[[Api, argparse.Namespace], int]] = {
    "trigger": cmd_trigger,
    "status": cmd_status,
    "records": cmd_records,
    "stats": cmd_stats,
}


def run_api_command(settings: Settings, args: argparse.Namespace) -> int:
    token = settings.api_token.get_secret_value() if settings.api_token else None
    try:
        api = Api(api_base(settings, args.api), token, args.timeout)
        try:
            return API_COMMANDS[args.command](api, args)
        finally:
            api.close()
    except ApiError as exc:
        print(f"memdump: {exc}", file=sys.stderr)
        return 1


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def _add_api_parsers(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api",
        metavar="URL",
        help="base URL of the service (default: http://MEMDUMP_API_HOST:MEMDUMP_API_PORT);"
        " the token is MEMDUMP_API_TOKEN",
    )
    common.add_argument(
        "--timeout", type=_positive, default=30.0, help="seconds per HTTP request (default 30)"
    )
    p = sub.add_parser(
        "trigger",
        parents=[common],
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
        "--interval", type=_positive, default=0.5, help="seconds between polls (default 0.5)"
    )
    p.add_argument(
        "--wait-timeout",
        type=_positive,
        default=None,
        help="give up waiting after this many seconds",
    )
    p = sub.add_parser("status", parents=[common], help="the last run, per VM (GET /status)")
    p.add_argument("--json", action="store_true", help="the API's JSON as is")
    p = sub.add_parser(
        "records",
        parents=[common],
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
    p = sub.add_parser("stats", parents=[common], help="aggregates over all records (GET /stats)")
    p.add_argument("--json", action="store_true", help="the API's JSON as is")


def main(argv: Sequence[str] | None = None) -> int:
    # Records, dumps, manifests, Prefect's database: for the operator only, whatever
    # umask the shell or the supervisor gave us (the children inherit it).
    private_umask()
    parser = argparse.ArgumentParser(prog="memdump", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run Prefect server + runner + API (embedded defaults)")
    sub.add_parser("vms", help="list running VMs of every hypervisor in the inventory")
    p = sub.add_parser("capture", help="capture VMs now, into MEMDUMP_DUMP_DIR")
    p.add_argument("vm_ids", nargs="+", help='VM ids (domain name, id or UUID), or "all"')
    p.add_argument(
        "--mode",
        choices=("paused", "live"),
        default=None,
        help="paused: the guest is stopped for the whole dump; live: a point-in-time image"
        " while it runs (falls back to paused, with the reason, where live cannot run)."
        " Default: the hypervisor's capture_mode, else MEMDUMP_CAPTURE_MODE",
    )
    p = sub.add_parser(
        "clean", help="remove .part files and hypervisor temp dirs left by killed captures"
    )
    p.add_argument(
        "--min-age",
        type=float,
        default=None,
        help="seconds (default MEMDUMP_CLEANUP_MIN_AGE_SEC); younger leftovers are kept",
    )
    p = sub.add_parser("verify", help="re-read recorded dumps and check hashes and manifests")
    p.add_argument("dump_paths", nargs="*", help="dump_path of a record (local or s3://)")
    p.add_argument("--since-days", type=float, help="every record of the last N days")
    _add_api_parsers(sub)
    args = parser.parse_args(argv)
    if args.command == "verify" and not args.dump_paths and args.since_days is None:
        parser.error("verify: give dump paths or --since-days")
    try:
        settings = Settings()
        if args.command == "serve":
            from memdump.serve import serve

            return serve(settings)
        if args.command in API_COMMANDS:
            return run_api_command(settings, args)
        if args.command == "clean" and args.min_age is None:
            args.min_age = settings.cleanup_min_age_sec
        handler = {
            "vms": cmd_vms,
            "capture": cmd_capture,
            "clean": cmd_clean,
            "verify": cmd_verify,
        }[args.command]
        return handler(settings, args)
    except MemdumpError as exc:
        print(f"memdump: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
