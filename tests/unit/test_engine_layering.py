"""Issue 13 item 4 (third bullet): the engine, memdump/, names nothing above it. No module
under memdump/ imports api, flows, tasks or deployments, nor Prefect, FastAPI or the
servers that run them, and none names one of those layers' modules in a string (a module
to start with ``-m``, ``api.main:app``, an ``import_module`` argument, a docstring's
``deployments.serve``): supervising those processes is the job of deployments/stack.py,
which the CLI finds through an entry point."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "memdump"
LAYERS = ("api", "flows", "tasks", "deployments")
# Frameworks the engine must not import (they belong to the layers above it).
FRAMEWORKS = ("prefect", "fastapi", "starlette", "uvicorn")
# A layer's module by dotted path or as package:attribute, anywhere in a string
# ("api.main:app", "deployments.serve", "see tasks.capture"). A dotted name counts when
# the layer has that module: "api.host" is a settings path (MEMDUMP_API__HOST), and
# "MEMDUMP_API__HOST", "rapid.api" or "tasks/" name no module at all.
DOTTED = re.compile(rf"(?<![\w.\-/])((?:{'|'.join(LAYERS)})(?:\.[a-z_]\w*)+)|"
                    rf"(?<![\w.\-/])(?:{'|'.join(LAYERS)}):[a-z_]\w*")  # fmt: skip
# Calls whose string argument is a module name to import or run.
IMPORTERS = {"import_module", "__import__", "run_module", "find_spec", "find_module"}
NAMED = set(LAYERS) | set(FRAMEWORKS)


def _top(module: str) -> str:
    return module.split(".")[0]


def is_layer_module(dotted: str) -> bool:
    """``api.main`` or ``deployments.serve.main``: names a module or package of a layer
    (some prefix of it is one)."""
    parts = dotted.split(".")
    return any(
        REPO.joinpath(*parts[:n]).with_suffix(".py").is_file()
        or (REPO.joinpath(*parts[:n]) / "__init__.py").is_file()
        for n in range(2, len(parts) + 1)
    )


def violations(source: str) -> list[str]:
    """What in ``source`` names a layer above the engine (or imports a framework)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if _top(a.name) in NAMED]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _top(node.module) in NAMED:
                found.append(f"from {node.module} import")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [
                f"string {m.group(0)!r}"
                for m in DOTTED.finditer(node.value)
                if m.group(1) is None or is_layer_module(m.group(1))
            ]
        elif isinstance(node, ast.Call):
            # A bare layer name is a module only where it is imported or run: as the
            # argument of an importer, or after "-m" in an argv list.
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in IMPORTERS:
                found += [
                    f"{name}({a.value!r})"
                    for a in node.args
                    if isinstance(a, ast.Constant) and _top(str(a.value)) in NAMED
                ]
        if isinstance(node, ast.List | ast.Tuple):
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            found += [
                f"-m {module!r}"
                for flag, module in zip(items, items[1:], strict=False)
                if flag == "-m" and isinstance(module, str) and _top(module) in NAMED
            ]
    return found


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("import api.main", True),
        ("from flows.capture import capture_vms", True),
        ("import prefect", True),
        ("from fastapi import FastAPI", True),
        ("from uvicorn import run", True),
        ("argv = [sys.executable, '-m', 'deployments.serve']", True),
        ("argv = ('-m', 'api')", True),
        ("argv = ['-m', 'uvicorn', 'x:app']", True),
        ("app = 'api.main:app'", True),
        ("importlib.import_module('tasks')", True),
        ("'''Started by deployments.serve.'''", True),
        ("from memdump.settings import Settings", False),
        ("from . import api", False),  # a module of the engine's own package
        ("fanout = 'tasks'  # a setting's value, not a module", False),
        ("STOP = {'api': 10.0}", False),
        ("fields = ('api.host', 'api.allow_anonymous')  # settings paths", False),
        ("run = 'flows.capture'", True),
        ("env = 'MEMDUMP_API__HOST'; path = 'tasks/capture.py'; u = 'rapid.api'", False),
        ("argv = ['-m', 'memdump.cli']", False),
    ],
)
def test_the_scan_finds_what_it_must(source: str, bad: bool) -> None:
    assert bool(violations(source)) is bad, violations(source)


def test_no_engine_module_names_a_layer_above_it() -> None:
    modules = sorted(ENGINE.rglob("*.py"))
    assert len(modules) > 20  # the engine was found
    found = {
        str(p.relative_to(ENGINE.parent)): v
        for p in modules
        if (v := violations(p.read_text(encoding="utf-8")))
    }
    assert found == {}


def test_importing_the_whole_engine_loads_no_layer_above_it() -> None:
    # What the source scan cannot see (a name built at run time): import every engine
    # module in a fresh interpreter and look at what got loaded.
    code = (
        "import importlib, pkgutil, sys, memdump\n"
        "for m in pkgutil.walk_packages(memdump.__path__, 'memdump.'):\n"
        "    if m.name.rsplit('.', 1)[-1] != '__main__':\n"
        "        importlib.import_module(m.name)\n"
        f"names = {sorted(NAMED)!r}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in names)\n"
        "sys.exit(str(bad) if bad else 0)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ENGINE.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, (r.stdout, r.stderr[-2000:])
