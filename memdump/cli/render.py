"""The one renderer of the service commands: rich tables for a terminal or a pipe, plain
JSON, and the two views of a run being followed (live bars on a terminal, a line per
change elsewhere). Every value is shown as text, never read as rich markup."""

from __future__ import annotations

import json
import os
import sys
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID
    from rich.table import Table
    from rich.text import Text

# The documented statuses a run ends in (the API contract).
FINAL = frozenset({"completed", "failed", "timeout", "error"})
STATE_STYLE = {
    "completed": "green",
    "failed": "red",
    "timeout": "red",
    "error": "red",
    "running": "cyan",
    "in_progress": "cyan",
    "retrying": "yellow",
}


def console() -> Console:
    from rich.console import Console

    # Not a terminal (a pipe, a file, a test): no colour, no animation, and a width that
    # does not fold ids and hashes (COLUMNS still wins).
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        return Console(width=200, highlight=False)
    return Console(highlight=False)


def size(n: Any) -> str:
    if not isinstance(n, int | float):
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def text(v: Any) -> str:
    return "" if v is None else str(v)


def cell(value: Any, style: str = "") -> Text:
    """Text as it is: ids and error messages are never read as rich markup."""
    from rich.text import Text

    return Text(text(value), style=style)


def state(name: str) -> Text:
    return cell(name, STATE_STYLE.get(name, ""))


def print_json(out: Console, value: Any) -> None:
    # Plain JSON (one document) either way: `memdump status --json | jq` must work.
    out.file.write(json.dumps(value, indent=2) + "\n")
    out.file.flush()


def _table(**kw: Any) -> Table:
    from rich import box
    from rich.table import Table

    return Table(box=box.SIMPLE_HEAD, **kw)


def vm_table(vms: list[dict[str, Any]], title: str | None = None) -> Table:
    table = _table(title=title, title_justify="left")
    table.add_column("VM")
    table.add_column("state")
    table.add_column("progress", justify="right")
    # The error of a VM that failed, else the note of an entry that captured nothing
    # ("<hypervisor>:all": no running VM there): /status's `error` and `note`.
    table.add_column("error / note", overflow="fold")
    for i, vm in enumerate(vms):
        progress = vm.get("progress")
        table.add_row(
            cell(vm.get("vm_id") or f"(VM {i + 1}, not started)"),
            state(vm["state"]),
            "" if progress is None else f"{progress:.1f}%",
            cell(vm.get("error") or vm.get("note")),
        )
    return table


def status_table(s: dict[str, Any]) -> Table:
    table = _table(show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("status", state(s.get("status", "")))
    table.add_row("timestamp", cell(s.get("timestamp")))
    table.add_row("vm_ids", cell(", ".join(s.get("vm_ids") or [])))
    duration = s.get("duration")
    table.add_row("duration", "" if duration is None else f"{duration:.3f} s")
    table.add_row("error", cell(s.get("error")))
    return table


def stats_table(s: dict[str, Any]) -> Table:
    table = _table(show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", justify="right")
    table.add_column("", style="dim")
    table.add_row("total_dumps", str(s["total_dumps"]), "")
    table.add_row("total_vms", str(s["total_vms"]), "")
    table.add_row("total_size_bytes", str(s["total_size_bytes"]), size(s["total_size_bytes"]))
    table.add_row("avg_duration_sec", f"{s['avg_duration_sec']:.3f}", "")
    table.add_row("last_dump", cell(s.get("last_dump")), "")
    return table


RECORD_COLUMNS = (
    ("timestamp", "left"),
    ("vmid", "left"),
    ("dom", "left"),
    ("hypervisor", "left"),
    ("size (.gz)", "right"),
    ("seconds", "right"),
    ("sha256", "left"),
    ("analysis", "left"),
)


def records_table(records: list[dict[str, Any]]) -> Table:
    table = _table()
    for col, just in RECORD_COLUMNS:
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for rec in records:
        table.add_row(
            cell(rec["timestamp"]),
            cell(rec["vmid"]),
            cell(rec["dom"]),
            cell(rec.get("hypervisor")),
            size(rec["gzip_size_bytes"]),
            f"{rec['duration_sec']:.3f}",
            cell(rec["sha256"][:16] + "…"),
            state(text(rec.get("analysis"))),
        )
    return table


class RunLines:
    """A followed run off a terminal: a line when a VM changes state or passes a quarter
    of its dump, and one when the run's status changes."""

    def __init__(self, out: Console) -> None:
        self.out = out
        self.seen: dict[int, tuple[str | None, str, int]] = {}
        self.run_state = ""

    def __enter__(self) -> RunLines:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def show(self, s: dict[str, Any]) -> None:
        for i, vm in enumerate(s.get("vms") or []):
            pct = vm.get("progress")
            now = (vm.get("vm_id"), vm["state"], -1 if pct is None else int(pct // 25))
            if self.seen.get(i) != now:
                self.seen[i] = now
                extra = "" if pct is None else f" {pct:.1f}%"
                self.out.print(cell(f"{now[0] or f'(VM {i + 1})'}: {now[1]}{extra}"))
        if s["status"] != self.run_state:
            self.run_state = s["status"]
            self.out.print(cell(f"run: {self.run_state}"))


class RunBars:
    """A followed run on a terminal: a live bar for the run and one per VM."""

    def __init__(self, out: Console) -> None:
        from rich.progress import (
            BarColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress: Progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            TextColumn("{task.fields[pct]:>6}", markup=False),
            TextColumn("{task.fields[state]}", markup=False),
            TimeElapsedColumn(),
            console=out,
        )
        self.bars: dict[int, TaskID] = {}

    def __enter__(self) -> RunBars:
        self.progress.__enter__()
        self.header = self.progress.add_task("run", total=None, pct="", state="waiting for the run")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.__exit__(exc_type, exc, tb)

    def show(self, s: dict[str, Any]) -> None:
        progress = self.progress
        progress.update(self.header, state=s["status"])
        for i, vm in enumerate(s.get("vms") or []):
            pct = vm.get("progress")
            done = vm["state"] == "completed"
            fields = {
                "description": vm.get("vm_id") or f"(VM {i + 1})",
                "pct": "" if pct is None else f"{pct:.1f}%",
                "state": vm["state"],
            }
            if i not in self.bars:
                self.bars[i] = progress.add_task(
                    fields["description"], total=100.0, pct="", state=""
                )
            unknown = pct is None and vm["state"] not in FINAL
            progress.update(
                self.bars[i],
                total=None if unknown else 100.0,
                completed=100.0 if done else (pct or 0.0),
                **fields,
            )
            if vm["state"] in FINAL:
                progress.stop_task(self.bars[i])
        if s["status"] in FINAL:
            progress.update(self.header, total=1, completed=1)


def run_view(out: Console) -> RunLines | RunBars:
    """Live bars on a terminal, else a line per change."""
    return RunBars(out) if out.is_terminal else RunLines(out)
