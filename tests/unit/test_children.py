"""Issue 11 item 16 (the parts below `memdump serve`): a child started with
popen_dying_with_parent dies when its parent is SIGKILLed, and a busy port is reported
with the port and the pid and command line of the process holding it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from memdump.children import check_port_free, port_holders
from memdump.errors import PortInUseError
from tests.helpers.listeners import hold_port, port_free
from tests.helpers.stack import free_port


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_child_dies_with_a_sigkilled_parent() -> None:
    # A parent (its own process) starts a sleeper the way memdump serve starts its
    # children, prints the sleeper's pid, and is SIGKILLed: no chance to stop it.
    parent_code = textwrap.dedent(
        """
        import sys, time
        from memdump.children import popen_dying_with_parent
        p = popen_dying_with_parent([sys.executable, "-c", "import time; time.sleep(600)"],
                                    start_new_session=True)
        print(p.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert _alive(child)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its SIGKILLed parent"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_busy_port_names_the_port_and_its_holder() -> None:
    port = free_port()
    holder = hold_port(port)
    try:
        assert [h.pid for h in port_holders(port)] == [holder.pid]
        with pytest.raises(PortInUseError) as err:
            var = "MEMDUMP_ORCHESTRATION__PREFECT_PORT"
            check_port_free("127.0.0.1", port, "Prefect server", var)
        msg = str(err.value)
        assert f"port {port}" in msg and f"pid {holder.pid}" in msg
        assert "MEMDUMP_ORCHESTRATION__PREFECT_PORT" in msg and "time.sleep(600)" in msg
        assert err.value.fields["holders"][0]["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert port_free(port)
    check_port_free("127.0.0.1", port, "Prefect server", "MEMDUMP_ORCHESTRATION__PREFECT_PORT")


def test_child_started_off_the_main_thread_is_refused() -> None:
    import threading

    from memdump.children import popen_dying_with_parent

    errors: list[BaseException] = []

    def run() -> None:
        try:
            popen_dying_with_parent(["true"])
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert len(errors) == 1 and "main thread" in str(errors[0])


def test_orphans_left_to_a_subreaper_are_ended_even_if_they_ignore_sigterm() -> None:
    # As memdump serve after its runner was killed: the runner's flow run (here a
    # grandchild in its own session that ignores SIGTERM) was reparented to serve, which
    # ends it, SIGKILL after the grace, so a stop is bounded.
    reaper_code = textwrap.dedent(
        """
        import subprocess, sys, time
        from memdump.children import become_subreaper, child_pids, end_adopted
        become_subreaper()
        stubborn = (
            "import os, signal, subprocess, sys, time\\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
            "print(os.getpid(), flush=True)\\n"
            "time.sleep(600)\\n"
        )
        middle = subprocess.Popen(
            [sys.executable, "-c",
             "import subprocess, sys; "
             f"p = subprocess.Popen([sys.executable, '-c', {stubborn!r}], "
             "stdout=subprocess.PIPE, start_new_session=True); "
             "print(p.stdout.readline().decode().strip(), flush=True)"],
            stdout=subprocess.PIPE,
        )
        grandchild = int(middle.stdout.readline())
        middle.wait()  # the "runner" is gone; its flow run is ours now
        while grandchild not in child_pids():
            time.sleep(0.05)
        print(grandchild, flush=True)
        ended = end_adopted(set(), grace=0.5)
        print(" ".join(map(str, ended)), flush=True)
        """
    )
    reaper = subprocess.run(
        [sys.executable, "-c", reaper_code], capture_output=True, text=True, timeout=60
    )
    assert reaper.returncode == 0, reaper.stderr
    lines = reaper.stdout.split("\n")
    grandchild = int(lines[0])
    assert [int(x) for x in lines[1].split()] == [grandchild]
    assert not _alive(grandchild)
