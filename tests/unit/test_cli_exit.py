"""The console script's exit (memdump.cli.app.run): main's status, and what a normal
interpreter exit does before the teardown it skips."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# main() replaced by one that leaves what a normal exit finishes: a worker thread still
# writing, a thread pool's idle worker, an atexit handler, output in stdio's buffers.
_CHILD = """
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import memdump.cli.app as app

out = Path(sys.argv[1])

def main(argv=None):
    def late():
        time.sleep(0.3)
        (out / "thread").write_text("done")
    threading.Thread(target=late).start()
    pool = ThreadPoolExecutor(1)
    pool.submit(lambda: None).result()  # its worker waits for more, not shut down
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    print("record")  # a pipe: block-buffered, still in the buffer
    print("warning", file=sys.stderr)
    return 3

app.main = main
app.run()
"""


def test_run_exits_with_mains_status_after_what_a_normal_exit_finishes(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 3
    assert p.stdout == "record\n" and p.stderr == "warning\n"
    assert (tmp_path / "thread").read_text() == "done"  # joined, not cut off
    assert (tmp_path / "atexit").read_text() == "ran"


def test_python_m_memdump_cli_is_the_console_script() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "memdump.cli", "capture"],  # no VM: argparse's usage error
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and "usage: memdump capture" in p.stderr
