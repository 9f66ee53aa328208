"""A flow that reports the process it ran in (tests/flows/test_warm_runs.py)."""

from __future__ import annotations

import json
import os
import sys

from prefect import flow


@flow(name="memdump-test-where-am-i")
def where_am_i(out: str, module: str) -> None:
    with open(out, "w") as f:
        json.dump({"pid": os.getpid(), "ppid": os.getppid(), "preloaded": module in sys.modules}, f)
