"""One Prefect test harness (a real, temporary Prefect server) for the API tests that need
one, started on first use and stopped after the last test of tests/api: each module
starting its own cost CI a server start per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.prefect_harness import prefect_harness


@pytest.fixture(scope="package")
def prefect_server() -> Iterator[None]:
    with prefect_harness():
        yield
