"""The test suite gives back its disk as it goes: a passed test's tmp_path is removed when
the test ends, a failed test's is kept for the post-mortem. The suite's big tests write
GiBs there; kept to the end of the run (pytest's default), they filled a CI machine's disk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

TESTS = """
def test_passes(tmp_path):
    (tmp_path / "dump").write_bytes(b"x" * 4096)

def test_fails(tmp_path):
    (tmp_path / "dump").write_bytes(b"x" * 4096)
    assert False, "kept for the post-mortem"
"""


def test_a_passed_tests_tmp_path_goes_when_it_ends_a_failed_ones_stays(tmp_path: Path) -> None:
    suite, base = tmp_path / "suite", tmp_path / "base"
    suite.mkdir()
    (suite / "test_sizes.py").write_text(TESTS)
    argv = [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "-q"]
    argv += ["--rootdir", str(suite), "--basetemp", str(base), "-p", "no:cacheprovider"]
    argv += ["-o", "testpaths=", str(suite / "test_sizes.py")]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=suite)
    assert run.returncode == 1, run.stdout + run.stderr  # one test failed, on purpose
    assert "1 failed, 1 passed" in run.stdout, run.stdout
    left = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.is_symlink())
    assert left == ["test_fails0"], left
    assert (base / "test_fails0" / "dump").stat().st_size == 4096
