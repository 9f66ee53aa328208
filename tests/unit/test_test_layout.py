"""The tests' own layout (issue 13, item 6): shared test code lives in tests/helpers/ (plain
functions and classes) or in a conftest.py as fixtures, where pytest finds them. No test
module or conftest imports from a test module, from a conftest, or from a module at
tests/ top level other than the support packages, so moving or renaming a test never
breaks another."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

# Packages at tests/ top level that hold shared test code: the helpers, and the
# InfluxDB-3-compatible test server (a program of its own: python -m tests.influxdb3_server).
SUPPORT_PACKAGES = {"helpers", "influxdb3_server"}


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in ``path``, relative ones resolved,
    ``from pkg import mod`` counted as both ``pkg`` and ``pkg.mod``."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{alias.name}") for alias in node.names]
    return sorted(out)


def why_forbidden(module: str) -> str | None:
    parts = module.split(".")
    if "conftest" in parts:
        return "imports from a conftest (fixtures go in the nearest common conftest.py)"
    if parts[0] != "tests" or len(parts) < 2:
        return None
    if any(p.startswith("test_") for p in parts[1:]):
        return "imports from a test module (shared code goes to tests/helpers/)"
    if parts[1] not in SUPPORT_PACKAGES:
        return "imports from a tests/ module outside tests/helpers/"
    return None


def layout_violations(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        for line, module in imported_modules(path, root):
            why = why_forbidden(module)
            if why:
                out.append(f"{path.relative_to(root.parent)}:{line}: {module}: {why}")
    return out


def test_no_test_module_imports_another_test_module_or_conftest() -> None:
    assert layout_violations(TESTS) == []


def test_shared_code_is_only_in_the_support_packages() -> None:
    # A plain module at tests/ top level or beside the tests of a directory would be
    # importable by anyone and found by no one: outside tests/helpers (and the InfluxDB
    # server) there are only tests, conftests and package markers.
    allowed = {"__init__.py", "conftest.py"}
    stray = [
        str(p.relative_to(TESTS))
        for p in sorted(TESTS.rglob("*.py"))
        if p.relative_to(TESTS).parts[0] not in SUPPORT_PACKAGES
        and p.name not in allowed
        and not p.name.startswith("test_")
    ]
    assert stray == []


def test_the_checker_sees_each_kind_of_forbidden_import(tmp_path: Path) -> None:
    # The checker itself must catch each form, relative imports included.
    root = tmp_path / "tests"
    (root / "helpers").mkdir(parents=True)
    (root / "faults").mkdir()
    for d in (root, root / "helpers", root / "faults"):
        (d / "__init__.py").write_text("")
    (root / "faults" / "test_a.py").write_text(
        "from tests.integration.conftest import virsh\n"
        "from tests.api.test_routes import FakeRuns\n"
        "from tests.stack import Stack\n"
        "from .test_b import helper\n"
        "from . import conftest\n"
        "import tests.procs\n"
        "from tests.helpers.lab import virsh as ok\n"
        "from tests.influxdb3_server import InfluxDB3TestServer\n"
        "from tests import helpers\n"
    )
    found = layout_violations(root)
    assert [v.split(": ")[1] for v in found] == [
        "tests.integration.conftest",
        "tests.integration.conftest.virsh",
        "tests.api.test_routes",
        "tests.api.test_routes.FakeRuns",
        "tests.stack",
        "tests.stack.Stack",
        "tests.faults.test_b",
        "tests.faults.test_b.helper",
        "tests.faults",
        "tests.faults.conftest",
        "tests.procs",
    ]
