"""The binding contract (shared/contract/memory-dumps-api.md, beside the repository) read
as data: its JSON examples, by the section they are in."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

CONTRACT = Path(__file__).resolve().parents[2].parent / "shared/contract/memory-dumps-api.md"


def contract_examples() -> dict[str, list[Any]]:
    """JSON examples of the contract, by the section ("### 1. Trigger ...") they are in."""
    if not CONTRACT.is_file():
        pytest.fail(f"contract not found at {CONTRACT} (shared/ sits beside the repo)")
    out: dict[str, list[Any]] = {}
    section = ""
    for part in re.split(r"(^### .*$)", CONTRACT.read_text(), flags=re.M):
        if part.startswith("### "):
            section = part[4:].strip()
            continue
        for block in re.findall(r"```json\n(.*?)```", part, flags=re.S):
            out.setdefault(section, []).append(json.loads(block))
    return out
