"""Shared fixtures. ``stack``: the whole stack as a user runs it, ``memdump serve`` (Prefect
server + runner + API) against the lab, on free loopback ports, with its data in a temp
dir; started once per session, on first use (tests/e2e, tests/faults). ``lab_dir`` and
``settings``: the lab (lab/up) for tests/integration and tests/faults."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from memdump.settings import Settings
from tests.helpers.lab import NO_LAB_LANE, lab_missing, stray_lab_tests
from tests.helpers.moto import running_moto
from tests.helpers.prefect_events import reset_events_worker
from tests.helpers.signing import trusting
from tests.helpers.stack import Stack, lab_inventory, running_stack

__all__ = ["Stack"]


@pytest.hookimpl(tryfirst=True)  # before -m deselects them
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.environ.get(NO_LAB_LANE) and (stray := stray_lab_tests(items)):
        raise pytest.UsageError(
            "marked lab outside the lab lane's directories (tests.helpers.lab.LAB_TEST_DIRS),"
            " so no lane would run them: " + ", ".join(stray)
        )


@pytest.fixture(scope="session")
def lab_dir() -> Path:
    d = os.environ.get("MEMDUMP_LAB_DIR")
    inv = os.environ.get("MEMDUMP_INVENTORY_FILE")
    if not d or not inv or not Path(inv).is_file():
        lab_missing()
    return Path(d)


@pytest.fixture
def settings(lab_dir: Path, tmp_path: Path) -> Settings:
    # Signed by a key of its own and trusting it, as scripts/run sets up the lab (issue 15).
    s = Settings(inventory_file=lab_dir / "inventory.yaml", dump_dir=tmp_path / "dumps")
    return trusting(s, tmp_path)


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    """A moto S3 server (tests/helpers/moto.py) for the module's tests."""
    with running_moto() as url:
        yield url


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    inv = lab_inventory()
    # One capture at a time per hypervisor, so a test can see the limit hold. Its Prefect
    # database is a copy of one migrated before, like the other stacks' (a first start
    # from nothing, capture included, is test_serve_lifecycle's).
    with running_stack(
        tmp_path_factory.mktemp("stack"),
        inv,
        max_captures_per_hypervisor="1",
        capture_retry_delay_sec="1",
    ) as st:
        yield st


@pytest.fixture
def on_stack_prefect(stack: Stack) -> Iterator[None]:
    """Point this process's Prefect client at the stack's server. Prefect reads its
    settings once at import, so changing the environment later is not enough."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    updates = {PREFECT_API_URL: stack.prefect_api, PREFECT_API_AUTH_STRING: stack.prefect_auth}
    reset_events_worker()
    with temporary_settings(updates=updates):
        try:
            yield
        finally:
            reset_events_worker()


@pytest.fixture
def flow_on_stack(on_stack_prefect: None, stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Stack:
    """Run a flow in this process as the stack's runner would: its Prefect server and its
    MEMDUMP_* settings (tasks read Settings() from the environment)."""
    for k, v in stack.env.items():
        if k.startswith("MEMDUMP_"):
            monkeypatch.setenv(k, v)
    return stack
