"""The REST client subcommands of ``memdump`` (trigger, status, records, stats): argument
parsing, output and exit codes, against the real API app (FastAPI TestClient) with a
scripted Runs backend and a real SQLite store; plus the failure paths (HTTP errors,
nothing listening, a proxy's non-JSON answer)."""

from __future__ import annotations

import csv
import io
import json
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

import memdump.cli as cli
from api.main import create_app
from api.runs import RunSummary, Triggered, VMRun
from memdump.cli import capture, client, inventory, maintenance, render
from memdump.records.model import DumpRecord
from memdump.records.sqlite import SQLiteRecordStore
from memdump.settings import Settings

T0 = datetime(2025, 11, 11, 10, 30, 45, 123456, tzinfo=UTC)
FAST = ("--interval", "0.01")  # poll the in-process app without waiting long


class ScriptedRuns:
    """latest() walks through ``script`` (the last entry repeats); trigger() records."""

    def __init__(self) -> None:
        self.script: list[RunSummary | None] = [None]
        self.calls = 0
        self.triggered: list[list[str]] = []

    def trigger(self, vm_ids: list[str], source: str) -> Triggered:
        self.triggered.append(vm_ids)
        return Triggered("run-1", T0)

    def latest(self) -> RunSummary | None:
        value = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return value


def run(state: str, name: str, vms: list[VMRun], *, at: datetime = T0, **kw: Any) -> RunSummary:
    final = state not in ("SCHEDULED", "PENDING", "RUNNING")
    ids = [v.vm_id or "all" for v in vms]
    return RunSummary(
        "r", state, name, ids, at, 2.5 if final else None, kw.get("message"), tuple(vms)
    )


def rec(i: int, vmid: str = "vm-web-01") -> DumpRecord:
    ts = datetime(2025, 11, 11, 10, 30, tzinfo=UTC) + timedelta(minutes=i)
    path = f"/d/{vmid}_{i}.mem.gz"
    return DumpRecord(
        ts, vmid, vmid, f"{i:064x}", 1.5, 2048 + i, 1, 2, 3, path, "0" * 64, 4096, "lab"
    )


@pytest.fixture
def runs() -> ScriptedRuns:
    return ScriptedRuns()


@pytest.fixture
def store(tmp_path: Path) -> SQLiteRecordStore:
    return SQLiteRecordStore(tmp_path / "r.db")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI reads Settings() like the service: a clean MEMDUMP_* environment."""
    import os

    for k in list(os.environ):
        if k.startswith("MEMDUMP_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setenv("MEMDUMP_API__HOST", "127.0.0.1")
    monkeypatch.setenv("MEMDUMP_API__PORT", "8123")


@pytest.fixture
def seen(
    env: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    runs: ScriptedRuns,
    store: SQLiteRecordStore,
) -> Iterator[list[dict[str, Any]]]:
    """Route the CLI's HTTP client to the real app in-process; record what it sent."""
    token = None
    import os

    if os.environ.get("MEMDUMP_API__TOKEN"):
        token = os.environ["MEMDUMP_API__TOKEN"]
    settings = Settings(
        data_dir=tmp_path,
        api={
            "status_cache_sec": 0,
            "trigger_min_interval_sec": 0,
            "token": token,
            "allowed_hosts": ["127.0.0.1", "10.0.0.5"],
            "allow_anonymous": True,
        },  # type: ignore[arg-type]
        # The in-process app also stands for a remote API (--api http://10.0.0.5:9000).
    )
    app = create_app(settings, store=store, runs=runs)
    sent: list[dict[str, Any]] = []

    def factory(base_url: str, headers: dict[str, str], timeout: float) -> httpx.Client:
        sent.append({"base_url": base_url, "headers": headers})
        client = TestClient(app, base_url=base_url, headers=headers)
        client.event_hooks["request"].append(
            lambda req: sent.append({"method": req.method, "url": str(req.url)})
        )
        return client

    monkeypatch.setattr(client, "_http", factory)
    yield sent


def main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- base URL and token ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8123"),
        ("0.0.0.0", "http://127.0.0.1:8123"),  # noqa: S104 - a bind address, not a bind
        ("::", "http://[::1]:8123"),
        ("fd00::5", "http://[fd00::5]:8123"),
        ("api.internal", "http://api.internal:8123"),
    ],
)
def test_api_base_from_settings(host: str, url: str) -> None:
    assert client.api_base(Settings(api={"host": host, "port": 8123}), None) == url
    given = "https://memdump.example/"
    assert client.api_base(Settings(api={"host": host}), given) == "https://memdump.example"


def test_base_url_from_settings_and_api_flag(
    seen: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(capsys, "status")[0] == 0
    assert seen[0]["base_url"] == "http://127.0.0.1:8123"
    assert "authorization" not in seen[0]["headers"]
    assert seen[1] == {"method": "GET", "url": "http://127.0.0.1:8123/api/memory-dumps/status"}
    seen.clear()
    assert main(capsys, "stats", "--api", "http://10.0.0.5:9000/")[0] == 0
    assert seen[0]["base_url"] == "http://10.0.0.5:9000"


def test_bearer_token_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
    env: None,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    # The app requires the token (set before it is built); the CLI sends it from the
    # same setting, MEMDUMP_API__TOKEN.
    monkeypatch.setenv("MEMDUMP_API__TOKEN", "s3cret")
    sent = request.getfixturevalue("seen")
    code, out, _ = main(capsys, "status", "--json")
    assert code == 0 and json.loads(out)["status"] == "idle"
    assert sent[0]["headers"]["authorization"] == "Bearer s3cret"
    # A wrong token: the API's 401 detail, exit 1.
    monkeypatch.setenv("MEMDUMP_API__TOKEN", "wrong")
    code, out, err = main(capsys, "status")
    assert code == 1 and out == ""
    assert "Not authenticated: a valid bearer token is required (HTTP 401)" in err


# -- status ------------------------------------------------------------------------------


def test_status_table_and_json(
    seen: list[dict[str, Any]], runs: ScriptedRuns, capsys: pytest.CaptureFixture[str]
) -> None:
    runs.script = [
        run(
            "FAILED",
            "Failed",
            [
                VMRun("vm-web-01", "completed", 100.0, None),
                VMRun("nope-01", "failed", None, "no VM 'nope-01' [x]"),
            ],
            message="1 of 2 VM(s) failed: nope-01: no VM 'nope-01' [x]",
        )
    ]
    code, out, _ = main(capsys, "status")
    assert code == 0
    assert "failed" in out and "2.500 s" in out and "2025-11-11T10:30:45.123456" in out
    lines = [line.split() for line in out.splitlines()]
    assert ["vm-web-01", "completed", "100.0%"] in lines
    # An error with brackets is shown as it is (not read as rich markup).
    assert "no VM 'nope-01' [x]" in out
    assert "\x1b[" not in out  # not a terminal: no colour codes
    code, out, _ = main(capsys, "status", "--json")
    body = json.loads(out)
    assert code == 0 and body["status"] == "failed"
    assert [v["vm_id"] for v in body["vms"]] == ["vm-web-01", "nope-01"]


def test_status_table_shows_the_note_of_a_hypervisor_with_nothing_to_capture(
    seen: list[dict[str, Any]], runs: ScriptedRuns, capsys: pytest.CaptureFixture[str]
) -> None:
    note = "no running VM on hypervisor lab2 [idle]"
    runs.script = [
        run(
            "COMPLETED",
            "Completed",
            [
                VMRun("vm-web-01", "completed", 100.0, None),
                VMRun("lab2:all", "completed", None, None, note=note),
            ],
        )
    ]
    code, out, _ = main(capsys, "status")
    assert code == 0
    assert note in out  # as it is: not read as rich markup
    code, out, _ = main(capsys, "status", "--json")
    assert json.loads(out)["vms"][1]["note"] == note


def test_status_idle(seen: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = main(capsys, "status")
    assert code == 0 and "idle" in out and "VM" not in out


# -- trigger -----------------------------------------------------------------------------


def test_trigger_prints_the_response(
    seen: list[dict[str, Any]], runs: ScriptedRuns, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = main(capsys, "trigger", "vm-web-01", "vm-db-01", "vm-web-01")
    body = json.loads(out)
    assert code == 0
    assert body["status"] == "scheduled" and body["vm_ids"] == ["vm-web-01", "vm-db-01"]
    assert body["message"] == "Memory dump scheduled for 2 VM(s)"
    assert runs.triggered == [["vm-web-01", "vm-db-01"]]
    # Without --wait, /status is not asked.
    assert [s.get("url", "").rsplit("/", 1)[-1] for s in seen[1:]] == ["trigger"]


def vms(a: tuple[str, float | None], b: tuple[str, float | None]) -> list[VMRun]:
    return [VMRun("a", a[0], a[1], None), VMRun("b", b[0], b[1], None)]


def _progressing(final: str, name: str, last: list[VMRun], **kw: Any) -> list[RunSummary | None]:
    return [
        None,  # /status before the trigger: idle
        run("SCHEDULED", "Scheduled", vms(("pending", None), ("pending", None))),
        run("RUNNING", "Running", vms(("running", 40.0), ("pending", None))),
        run("RUNNING", "Running", vms(("completed", 100.0), ("running", 80.0))),
        run(final, name, last, **kw),
    ]


@pytest.mark.parametrize(
    ("final", "name", "b", "code"),
    [
        ("COMPLETED", "Completed", VMRun("b", "completed", 100.0, None), 0),
        ("FAILED", "Failed", VMRun("b", "failed", 80.0, "disk full"), 1),
        ("FAILED", "TimedOut", VMRun("b", "timeout", 80.0, "past the deadline"), 2),
        ("CRASHED", "Crashed", VMRun("b", "error", 80.0, "did not finish"), 3),
        ("CANCELLED", "Cancelled", VMRun("b", "error", 80.0, "did not finish"), 3),
    ],
)
def test_trigger_wait_follows_the_run_and_exits_by_its_status(
    seen: list[dict[str, Any]],
    runs: ScriptedRuns,
    capsys: pytest.CaptureFixture[str],
    final: str,
    name: str,
    b: VMRun,
    code: int,
) -> None:
    last = [VMRun("a", "completed", 100.0, None), b]
    runs.script = _progressing(final, name, last, message=None if code == 0 else b.error)
    got, out, err = main(capsys, "trigger", "a", "b", "--wait", *FAST)
    assert got == code, (out, err)
    lines = out.splitlines()
    # One line per change (not a live display: stdout is not a terminal) ...
    assert "a: running 40.0%" in lines and "b: running 80.0%" in lines
    assert lines.count("a: completed 100.0%") == 1
    assert "run: in_progress" in lines and f"run: {cli_status(final, name)}" in lines
    # ... then a table of results and the run's outcome.
    result = out[out.index("Result") :]
    assert ["a", "completed", "100.0%"] in [x.split() for x in result.splitlines()]
    assert ["b", b.state, "100.0%" if code == 0 else "80.0%"] == next(
        x.split()[:3] for x in result.splitlines() if x.split()[:1] == ["b"]
    )
    assert f"run {cli_status(final, name)} in 2.500 s" in out
    if b.error:
        assert b.error in out


def cli_status(state: str, name: str) -> str:
    from api.status import map_state

    return map_state(state, name)


def test_trigger_wait_does_not_take_the_previous_run_for_its_own(
    seen: list[dict[str, Any]], runs: ScriptedRuns, capsys: pytest.CaptureFixture[str]
) -> None:
    old = run("FAILED", "Failed", [VMRun("a", "failed", None, "old")], message="old")
    later = T0 + timedelta(minutes=5)
    new = run("COMPLETED", "Completed", [VMRun("a", "completed", 100.0, None)], at=later)
    # Before the trigger and twice after it, /status still shows the old run (another
    # API replica's cache, say): that is not this trigger's outcome.
    runs.script = [old, old, old, new]
    code, out, _ = main(capsys, "trigger", "a", "--wait", *FAST)
    assert code == 0 and "old" not in out and "run completed" in out
    assert runs.calls == 4


def test_trigger_wait_timeout(
    seen: list[dict[str, Any]], runs: ScriptedRuns, capsys: pytest.CaptureFixture[str]
) -> None:
    runs.script = [None, run("RUNNING", "Running", [VMRun("a", "running", 1.0, None)])]
    code, out, err = main(capsys, "trigger", "a", "--wait", "--wait-timeout", "0.2", *FAST)
    assert code == 1 and "still in progress after 0.2 s" in err
    assert "a: running 1.0%" in out and "Result" not in out


def test_trigger_wait_live_display_on_a_terminal(
    seen: list[dict[str, Any]],
    runs: ScriptedRuns,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rich.console import Console

    buf = io.StringIO()
    term = Console(file=buf, force_terminal=True, width=100)
    monkeypatch.setattr(render, "console", lambda: term)
    runs.script = _progressing(
        "COMPLETED", "Completed", vms(("completed", 100), ("completed", 100))
    )
    code, _, _ = main(capsys, "trigger", "a", "b", "--wait", *FAST)
    shown = buf.getvalue()
    assert code == 0
    assert "\x1b[" in shown  # drawn live, with colour
    assert "Result" in shown and "run completed in 2.500 s" in shown


def test_trigger_refused_prints_the_detail(
    seen: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = main(capsys, "trigger", "a;rm")
    assert code == 1 and out == ""
    assert err.startswith("memdump: ") and "not a plain identifier" in err and "HTTP 400" in err


# -- records, stats ----------------------------------------------------------------------


def test_records_filters_are_passed_on(
    seen: list[dict[str, Any]], store: SQLiteRecordStore, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(3):
        store.add(rec(i))
    store.add(rec(9, "vm-db-01"))
    code, out, _ = main(
        capsys,
        "records",
        "--since",
        "2025-11-11T10:31:00",
        "--until",
        "2025-11-12",
        "--vmid",
        "vm-web-01",
        "--dom",
        "vm-web-01",
        "--limit",
        "5",
        "--offset",
        "0",
    )
    assert code == 0
    url = httpx.URL(seen[-1]["url"])
    assert url.path == "/api/memory-dumps/records"
    assert dict(url.params) == {
        "since": "2025-11-11T10:31:00",
        "until": "2025-11-12",
        "vmid": "vm-web-01",
        "dom": "vm-web-01",
        "limit": "5",
        "offset": "0",
    }
    rows = [line.split() for line in out.splitlines() if "vm-web-01" in line]
    assert [r[0] for r in rows] == ["2025-11-11T10:32:00.000000", "2025-11-11T10:31:00.000000"]
    assert "2 record(s) (limit 5)" in out
    assert "vm-db-01" not in out


def test_records_csv_is_the_apis_own(
    seen: list[dict[str, Any]], store: SQLiteRecordStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.add(rec(1))
    store.add(rec(2, "vm-db-01"))
    code, out, _ = main(capsys, "records", "--csv", "--vmid", "vm-db-01")
    assert code == 0
    assert dict(httpx.URL(seen[-1]["url"]).params) == {"vmid": "vm-db-01", "format": "csv"}
    from api.routes import csv_lines
    from memdump.recordsig import with_status

    # What the API lists: the store's rows, each with its signature's status.
    assert out == "".join(csv_lines(with_status(store.list(1000, 0, None)[:1], frozenset())))
    table = list(csv.reader(io.StringIO(out)))
    assert table[0][:3] == ["timestamp", "dom", "vmid"] and len(table) == 2
    assert table[1][2] == "vm-db-01"


def test_records_json_and_empty(
    seen: list[dict[str, Any]], store: SQLiteRecordStore, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = main(capsys, "records")
    assert code == 0 and "0 record(s) (limit 1000)" in out
    store.add(rec(1))
    code, out, _ = main(capsys, "records", "--json", "--limit", "1")
    body = json.loads(out)
    assert code == 0 and body["count"] == 1 and body["records"][0]["vmid"] == "vm-web-01"


@pytest.mark.parametrize(
    ("argv", "detail"),
    [
        (["records", "--limit", "5000"], "limit must be at most 1000"),
        (["records", "--since", "yesterday"], "since: not an ISO 8601 date or time"),
        (["records", "--vmid", "../x"], "vmid"),
    ],
)
def test_records_bad_filters_print_the_apis_detail(
    seen: list[dict[str, Any]], capsys: pytest.CaptureFixture[str], argv: list[str], detail: str
) -> None:
    code, out, err = main(capsys, *argv)
    assert code == 1 and out == "" and detail in err and "(HTTP 400)" in err


def test_stats(
    seen: list[dict[str, Any]], store: SQLiteRecordStore, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(3):
        store.add(rec(i, f"vm-{i % 2}"))
    code, out, _ = main(capsys, "stats")
    assert code == 0
    lines = [line.split() for line in out.splitlines()]
    assert ["total_dumps", "3"] in lines and ["total_vms", "2"] in lines
    assert ["total_size_bytes", "6147", "6.0", "KiB"] in lines
    code, out, _ = main(capsys, "stats", "--json")
    assert json.loads(out) == {
        "total_dumps": 3,
        "total_vms": 2,
        "total_size_bytes": 6147,
        "avg_duration_sec": 1.5,
        "last_dump": "2025-11-11T10:32:00.000000",
    }


def test_server_error_detail(
    seen: list[dict[str, Any]], runs: ScriptedRuns, capsys: pytest.CaptureFixture[str]
) -> None:
    def down() -> None:
        raise ConnectionError("Prefect is down")

    runs.latest = down  # type: ignore[assignment,method-assign]
    code, _, err = main(capsys, "status")
    assert code == 1 and "Error fetching status: Prefect is down (HTTP 500)" in err


# -- the service is not there ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("argv", [["status"], ["stats"], ["records", "--csv"], ["trigger", "a"]])
def test_connection_refused(
    env: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    port = _free_port()
    monkeypatch.setenv("MEMDUMP_API__PORT", str(port))
    code, out, err = main(capsys, *argv)
    assert code == 1 and out == ""
    assert f"is `memdump serve` running at http://127.0.0.1:{port}?" in err
    assert "Traceback" not in err


def test_non_json_error_from_a_proxy(
    env: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>Bad Gateway</html>")

    monkeypatch.setattr(
        client,
        "_http",
        lambda base_url, headers, timeout: httpx.Client(
            base_url=base_url, transport=httpx.MockTransport(handler)
        ),
    )
    code, _, err = main(capsys, "stats")
    assert code == 1 and "<html>Bad Gateway</html> (HTTP 502)" in err


def test_read_timeout(
    env: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    monkeypatch.setattr(
        client,
        "_http",
        lambda base_url, headers, timeout: httpx.Client(
            base_url=base_url, transport=httpx.MockTransport(handler)
        ),
    )
    code, _, err = main(capsys, "status", "--timeout", "2.5")
    assert code == 1 and "did not answer within 2.5 s" in err


# -- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["trigger"],  # no VM
        ["trigger", "a", "--interval", "0"],
        ["trigger", "a", "--wait-timeout", "-1"],
        ["status", "--timeout", "x"],
        ["records", "--limit", "ten"],
        ["records", "--csv", "--json"],
        ["stats", "--csv"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage: memdump" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["trigger", "status", "records", "stats"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--api URL" in out
    if command == "trigger":
        assert "Exit status: 0 the run completed" in " ".join(out.split())


def test_existing_subcommands_are_unchanged(
    env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    called: list[tuple[str, Any]] = []
    for module, name in (
        (inventory, "cmd_vms"),
        (capture, "cmd_capture"),
        (maintenance, "cmd_verify"),
    ):
        monkeypatch.setattr(
            module, name, lambda s, a, name=name: called.append((name, vars(a))) or 0
        )

    class Cleaned:  # what clean_leftovers found: nothing
        local: list[str] = []
        remote: dict[str, list[str]] = {}
        errors: dict[str, str] = {}

    monkeypatch.setattr(
        "memdump.leftovers.clean_leftovers",
        lambda s, min_age: called.append(("cmd_clean", {"min_age": min_age})) or Cleaned(),
    )
    assert cli.main(["vms"]) == 0
    assert cli.main(["capture", "vm-web-01", "all"]) == 0
    assert cli.main(["clean"]) == 0
    assert cli.main(["verify", "--since-days", "2"]) == 0
    assert [c[0] for c in called] == ["cmd_vms", "cmd_capture", "cmd_clean", "cmd_verify"]
    assert called[1][1]["vm_ids"] == ["vm-web-01", "all"]
    # Without --min-age, clean keeps leftovers younger than the setting.
    assert called[2][1]["min_age"] == Settings().orchestration.cleanup_min_age_sec
    assert called[3][1]["since_days"] == 2.0
    with pytest.raises(SystemExit) as exc:
        cli.main(["verify"])
    assert exc.value.code == 2
