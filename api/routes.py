"""The /api/memory-dumps routes. Small on purpose: the work is in memdump/ and Prefect."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.deps import LatestRunDep, OutboxDep, RunsDep, SettingsDep, StoreDep, VerifyJobsDep
from api.limits import json_content_type
from api.models import (
    ID_PATTERN,
    ErrorBody,
    OutboxResponse,
    RecordsResponse,
    StatsResponse,
    StatusResponse,
    TriggerRequest,
    TriggerResponse,
    VerifyJobResponse,
    VerifyRequest,
    VerifyResponse,
)
from api.runs import LatestRunCache, Runs, TriggerBusy, Triggered, TriggerView
from api.status import map_state
from api.verify_jobs import VerifyBusy, VerifyJob, VerifyJobs
from memdump import recordsig
from memdump.errors import LocationError, MemdumpError
from memdump.escaping import csv_cell
from memdump.identifiers import split_qualified, validate_id
from memdump.records.base import RecordQuery
from memdump.records.model import API_FIELDS, iso_utc
from memdump.runinfo import ALL
from memdump.signing import trusted_keys
from memdump.verify import verify

# Larger offsets cannot be passed to the stores (SQLite integers are 64-bit).
MAX_OFFSET = 2**53 - 1


@contextmanager
def _answer_500(what: str) -> Iterator[None]:
    """A store or Prefect failure becomes the contract's 500 ``{"detail": "<what>: ..."}``."""
    try:
        yield
    except HTTPException:
        raise
    except Exception as exc:
        raise HTTPException(500, f"{what}: {exc}") from exc


router = APIRouter(prefix="/api/memory-dumps", tags=["memory-dumps"])

AUTH = "only when MEMDUMP_API__TOKEN is set: missing or wrong bearer token"
BAD_REQUEST: dict[int | str, dict[str, Any]] = {400: {"model": ErrorBody}}
SERVER_ERROR: dict[int | str, dict[str, Any]] = {
    500: {"model": ErrorBody},
    401: {"model": ErrorBody, "description": AUTH},
}
TOO_LARGE: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorBody, "description": "request body over MEMDUMP_API__MAX_BODY_BYTES"},
}
TOO_MANY: dict[int | str, dict[str, Any]] = {
    429: {
        "model": ErrorBody,
        "description": "a trigger came too soon, a run is in progress, or another"
        " trigger made its run from the same last run first (Retry-After says when to try again)",
    },
}


def require_json(request: Request) -> None:
    # Runs before the body is parsed: a form or text body gets a plain answer, not a
    # validation message about dictionaries.
    if not json_content_type(request.headers):
        raise HTTPException(400, "Content-Type must be application/json")


@router.post(
    "/trigger",
    response_model=TriggerResponse,
    responses={**BAD_REQUEST, **TOO_LARGE, **TOO_MANY, **SERVER_ERROR},
    dependencies=[Depends(require_json)],
    summary="Schedule memory dumps of VMs (returns once the flow run exists)",
)
def trigger(
    body: TriggerRequest, runs: RunsDep, settings: SettingsDep, latest: LatestRunDep
) -> TriggerResponse:
    if not body.vm_ids:
        raise HTTPException(400, "No VM IDs specified")
    if len(body.vm_ids) > settings.api.trigger_max_vms:
        raise HTTPException(
            400,
            f"Too many VM IDs: {len(body.vm_ids)} (at most {settings.api.trigger_max_vms}"
            ' per trigger; "all" captures every VM of the inventory)',
        )
    vm_ids = list(dict.fromkeys(body.vm_ids))  # a VM asked for twice is dumped once
    for vm_id in vm_ids:
        if vm_id != ALL:
            try:
                split_qualified(vm_id)
            except MemdumpError as exc:
                raise HTTPException(400, str(exc)) from None
    interval = settings.api.trigger_min_interval_sec
    if interval <= 0:  # limit off
        run = _schedule(runs, vm_ids, latest, None)
    else:
        # The check reads the newest run on the Prefect server's clock, and the run is
        # made keyed by what the check saw (api.runs.AFTER_KEY): of N concurrent
        # triggers in any API replicas one makes a run, the others are refused.
        try:
            view = runs.view()
        except Exception as exc:
            raise HTTPException(500, f"Error checking the last trigger: {exc}") from exc
        _check_rate(view, interval)
        run = _schedule(runs, vm_ids, latest, view)
    return TriggerResponse(
        message=f"Memory dump scheduled for {len(vm_ids)} VM(s)",
        vm_ids=vm_ids,
        # The run's own due time, as Prefect stored it: /status shows this same value.
        timestamp=iso_utc(run.triggered_at),
    )


def _schedule(
    runs: Runs, vm_ids: list[str], latest: LatestRunCache, view: TriggerView | None
) -> Triggered:
    try:
        if view is None:
            run = runs.trigger(vm_ids, "api")
        else:
            run = runs.trigger(vm_ids, "api", view.now, after=view)
        latest.invalidate()
        return run
    except TriggerBusy:
        raise HTTPException(
            429,
            "Another trigger is being scheduled; retry in 1 s",
            headers={"Retry-After": "1"},
        ) from None
    except Exception as exc:
        reason = str(exc) if str(exc) not in ("", "None") else type(exc).__name__
        raise HTTPException(500, f"Error scheduling memory dump: {reason}") from exc


# Documented in the schema; checked by validate_id (pydantic's regex has no look-ahead).
_ID_SCHEMA: dict[str, Any] = {"pattern": ID_PATTERN}
_TIME_SCHEMA: dict[str, Any] = {"format": "date-time"}


@router.get(
    "/records",
    response_model=RecordsResponse,
    responses={
        **BAD_REQUEST,
        **SERVER_ERROR,
        200: {
            "content": {"text/csv": {"schema": {"type": "string"}}},
            "description": "JSON, or with format=csv a CSV of the same rows (header first;"
            " the contract's fields in order, then the documented extras)",
        },
    },
    summary="Dump records, newest first (filters: since, until, vmid, dom; JSON or CSV)",
)
def records(
    store: StoreDep,
    settings: SettingsDep,
    # No upper bound here: MEMDUMP_API__RECORDS_MAX_LIMIT is (checked below, a 400).
    limit: Annotated[
        int,
        Query(
            ge=1,
            description="Max records (1 to MEMDUMP_API__RECORDS_MAX_LIMIT, 1000 by default;"
            " more is a 400)",
        ),
    ] = 1000,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Records to skip")] = 0,
    since: Annotated[
        str | None,
        Query(
            max_length=64,
            description="ISO 8601 date or date-time; records at or after it (no offset: UTC)",
            json_schema_extra=_TIME_SCHEMA,
        ),
    ] = None,
    until: Annotated[
        str | None,
        Query(
            max_length=64,
            description="ISO 8601 date or date-time; records before it (exclusive)",
            json_schema_extra=_TIME_SCHEMA,
        ),
    ] = None,
    vmid: Annotated[str | None, Query(max_length=128, json_schema_extra=_ID_SCHEMA)] = None,
    dom: Annotated[str | None, Query(max_length=128, json_schema_extra=_ID_SCHEMA)] = None,
    format: Annotated[Literal["json", "csv"], Query(description="json (default) or csv")] = "json",
) -> Any:
    if limit > settings.api.records_max_limit:
        raise HTTPException(400, f"limit must be at most {settings.api.records_max_limit}")
    for name, value in (("vmid", vmid), ("dom", dom)):
        if value is not None:
            try:
                validate_id(value, what=name)
            except MemdumpError as exc:
                raise HTTPException(400, str(exc)) from None
    query = RecordQuery(
        since=_instant("since", since), until=_instant("until", until), vmid=vmid, dom=dom
    )
    with _answer_500("Error fetching records"):
        rows = store.list(limit, offset, query)
        rows = recordsig.with_status(rows, trusted_keys(settings))
    if format == "csv":
        return StreamingResponse(
            csv_lines(rows),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": 'attachment; filename="memory-dumps.csv"'},
        )
    return {"records": rows, "count": len(rows), "limit": limit, "offset": offset}


def document_limits(spec: dict[str, Any], max_limit: int) -> None:
    """The OpenAPI schema states the records limit this app applies (its setting): the
    route itself has no fixed bound."""
    for param in spec["paths"][f"{router.prefix}/records"]["get"]["parameters"]:
        if param["name"] == "limit":
            param["schema"]["maximum"] = max_limit


def _instant(name: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        raise HTTPException(400, f"{name}: not an ISO 8601 date or time: {value!r}") from None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def csv_lines(rows: list[dict[str, Any]]) -> Iterator[str]:
    """One CSV line at a time (header first), so the response streams."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    # Cells are escaped against formula injection (VM names come from hypervisors).
    columns = (*API_FIELDS, recordsig.STATUS_FIELD)
    header: list[object] = list(columns)
    cells = ([csv_cell(r.get(k, "")) for k in columns] for r in rows)
    for row in [header, *cells]:
        writer.writerow(row)
        yield buf.getvalue()
        buf.seek(0)
        buf.truncate()


@router.get(
    "/status",
    response_model=StatusResponse,
    responses=SERVER_ERROR,
    summary="State of the last trigger (API or schedule), read from Prefect; per-VM detail",
)
def status(latest: LatestRunDep) -> dict[str, Any]:
    with _answer_500("Error fetching status"):
        run = latest.get()
    if run is None:
        return {
            "last_trigger": {},
            "status": "idle",
            "vm_ids": [],
            "timestamp": None,
            "duration": None,
            "error": None,
            "vms": [],
        }
    st = map_state(run.state_type, run.state_name)
    ts = iso_utc(run.triggered_at)
    last: dict[str, Any] = {"timestamp": ts, "vm_ids": run.vm_ids, "status": st}
    if st != "in_progress":
        last["duration"] = run.duration
    error = run.message if st in ("failed", "timeout", "error") else None
    return {
        "last_trigger": last,
        "status": st,
        "vm_ids": run.vm_ids,
        "timestamp": ts,
        "duration": run.duration if st != "in_progress" else None,
        "error": error,
        "vms": [
            {
                "vm_id": v.vm_id,
                "state": v.state,
                "progress": v.progress,
                "bytes_done": v.bytes_done,
                "bytes_total": v.bytes_total,
                "error": v.error,
                "note": v.note,
            }
            for v in run.vms
        ],
    }


@router.get(
    "/stats",
    response_model=StatsResponse,
    responses=SERVER_ERROR,
    summary="Aggregates over all records (computed by the store)",
)
def stats(store: StoreDep) -> dict[str, Any]:
    with _answer_500("Error fetching stats"):
        return store.stats().contract_dict()


@router.get(
    "/outbox",
    response_model=OutboxResponse,
    responses=SERVER_ERROR,
    summary="Records waiting for the record store (beyond the contract; see README)",
)
def outbox(box: OutboxDep) -> dict[str, Any]:
    with _answer_500("Error reading the outbox"):
        st = box.state()
    oldest = None
    if st.oldest_queued_at is not None:
        oldest = iso_utc(datetime.fromtimestamp(st.oldest_queued_at, UTC))
    return {"depth": st.depth, "oldest_queued_at": oldest, "last_error": st.last_error}


def _check_rate(view: TriggerView, interval: float) -> None:
    """At most one trigger per ``interval`` seconds, and none while the last run is still
    in progress (so /status never hides a running capture behind a newer one). Read from
    Prefect, on the Prefect server's clock, so every API replica applies the same rule."""
    last = view.last
    if last is None:
        return
    if map_state(last.state_type, last.state_name) == "in_progress":
        raise HTTPException(
            429,
            f"A memory dump is in progress (triggered {iso_utc(last.triggered_at)}); "
            "trigger again when it has finished",
            headers={"Retry-After": "10"},
        )
    age = (view.now - last.triggered_at).total_seconds()
    if age < interval:
        wait = max(1, math.ceil(interval - age))
        raise HTTPException(
            429,
            f"Too many triggers: at most one every {interval:g} s; retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )


VERIFY_BUSY: dict[int | str, dict[str, Any]] = {
    429: {
        "model": ErrorBody,
        "description": "MEMDUMP_VERIFY__MAX_CONCURRENT verifications are already running in"
        " this API process (Retry-After says when to try again)",
    },
}
VERIFY_RETRY_AFTER = "10"


def _verify_busy(jobs: VerifyJobs) -> HTTPException:
    return HTTPException(
        429,
        f"Too many verifications: at most {jobs.max_concurrent} at once; retry later",
        headers={"Retry-After": VERIFY_RETRY_AFTER},
    )


@router.post(
    "/verify",
    response_model=VerifyResponse,
    responses={
        **BAD_REQUEST,
        202: {
            "model": VerifyJobResponse,
            "description": 'A background verification ("wait": false, or a .gz larger than'
            " MEMDUMP_VERIFY__BACKGROUND_BYTES): poll the Location",
        },
        403: {
            "model": ErrorBody,
            "description": "the record's location is outside the dump directory or S3 prefix",
        },
        404: {"model": ErrorBody, "description": "no record for that dump"},
        **TOO_LARGE,
        **VERIFY_BUSY,
        **SERVER_ERROR,
    },
    dependencies=[Depends(require_json)],
    summary="Re-read a recorded dump (local or S3) and check both hashes and its manifest",
)
def verify_dump(
    body: VerifyRequest, store: StoreDep, settings: SettingsDep, jobs: VerifyJobsDep
) -> Any:
    # Only dumps the store knows are read: a path from the request never opens a file
    # by itself, it only selects a record.
    if body.dump_path is not None and body.vmid is None and body.timestamp is None:
        query = RecordQuery(dump_path=body.dump_path)
        what = body.dump_path
    elif body.dump_path is None and body.vmid is not None and body.timestamp is not None:
        try:
            validate_id(body.vmid)
        except MemdumpError as exc:
            raise HTTPException(400, str(exc)) from None
        ts = _instant("timestamp", body.timestamp)
        assert ts is not None  # noqa: S101 - checked above
        query = RecordQuery(vmid=body.vmid, since=ts, until=ts + timedelta(microseconds=1))
        what = f"{body.vmid} at {body.timestamp}"
    else:
        raise HTTPException(400, "Give either dump_path, or vmid and timestamp")
    with _answer_500("Error fetching records"):
        rows = store.list(1, 0, query)
    if not rows:
        raise HTTPException(404, f"No record for {what}")
    row = rows[0]
    size = row.get("gzip_size_bytes")
    background = body.wait is False or (
        body.wait is None and isinstance(size, int) and size > settings.verify.background_bytes
    )
    if background:
        try:
            job = jobs.start(
                str(row["dump_path"]),
                lambda: verify(row, settings, by="api").to_dict(),
                lambda exc: f"Error verifying dump: {exc}",
            )
        except VerifyBusy:
            raise _verify_busy(jobs) from None
        return JSONResponse(
            _job_body(job),
            status_code=202,
            headers={"Location": f"{router.prefix}/verify/{job.id}"},
        )
    try:
        with jobs.slot(), _answer_500("Error verifying dump"):
            try:
                return verify(row, settings, by="api").to_dict()
            except LocationError as exc:
                # A record is data, not a licence to read: its location is outside the
                # dump directory or S3 prefix, so nothing of it is read or described.
                raise HTTPException(403, f"Refused to verify: {exc}") from None
    except VerifyBusy:
        raise _verify_busy(jobs) from None


@router.get(
    "/verify/{job_id}",
    response_model=VerifyJobResponse,
    responses={
        **BAD_REQUEST,
        404: {"model": ErrorBody, "description": "no such job"},
        **SERVER_ERROR,
    },
    summary="A background verification: running, or its result (beyond the contract)",
)
def verify_job(
    job_id: Annotated[str, Path(max_length=64, pattern=r"^[0-9a-f]+$")], jobs: VerifyJobsDep
) -> dict[str, Any]:
    job = jobs.get(job_id)
    if job is None:
        # Jobs live in the API process that started them, and only the newest
        # MEMDUMP_VERIFY__JOBS_KEPT finished ones are kept.
        raise HTTPException(404, f"No verification job {job_id} (kept by this API process)")
    return _job_body(job)


def _job_body(job: VerifyJob) -> dict[str, Any]:
    return {
        "job_id": job.id,
        "state": job.state,
        "dump_path": job.dump_path,
        "started_at": iso_utc(job.started_at),
        "finished_at": iso_utc(job.finished_at) if job.finished_at else None,
        "result": job.result,
        "detail": job.detail,
    }
