"""FastAPI dependencies: one Settings, one record reader (read-only: the API never writes
records), one Runs backend per app."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.runs import LatestRunCache, Runs
from api.verify_jobs import VerifyJobs
from memdump.records.base import RecordReader
from memdump.records.outbox import OutboxReader
from memdump.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_store(request: Request) -> RecordReader:
    store: RecordReader = request.app.state.store
    return store


def get_outbox(request: Request) -> OutboxReader:
    outbox: OutboxReader = request.app.state.outbox
    return outbox


def get_runs(request: Request) -> Runs:
    runs: Runs = request.app.state.runs
    return runs


def get_latest_run(request: Request) -> LatestRunCache:
    cache: LatestRunCache = request.app.state.latest_run
    return cache


def get_verify_jobs(request: Request) -> VerifyJobs:
    jobs: VerifyJobs = request.app.state.verify_jobs
    return jobs


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[RecordReader, Depends(get_store)]
RunsDep = Annotated[Runs, Depends(get_runs)]
OutboxDep = Annotated[OutboxReader, Depends(get_outbox)]
LatestRunDep = Annotated[LatestRunCache, Depends(get_latest_run)]
VerifyJobsDep = Annotated[VerifyJobs, Depends(get_verify_jobs)]
