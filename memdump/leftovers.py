"""What a killed worker leaves behind, found and removed when a worker starts.

A worker killed mid-dump (SIGKILL, OOM, power) leaves a ``.part`` file in the dump
directory and possibly a temp directory with a FIFO on the hypervisor. Neither is ever
evidence (a ``.part`` was never verified), so both go. Several workers may share a dump
directory or a hypervisor, so only what has no living owner is removed: a ``.part`` whose
writer still holds its lock (memdump.pipeline) is skipped, and so is a remote directory
whose script is alive (memdump.hypervisors.fifo). On a hypervisor the clean-up runs as
root among local users: it looks in the scripts' root-only run directory and in
``${TMPDIR:-/tmp}`` (and each ``staging_dir``) and takes only directories of the remote
user that nobody else can write, checked from the inside, never following a symlink
(fifo._CLEAN); nothing it needs comes from a command line.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from memdump.analysis import TEMP_PREFIX
from memdump.errors import MemdumpError
from memdump.hypervisors import open_driver
from memdump.settings import Settings

log = logging.getLogger("memdump.leftovers")


@dataclass
class Cleanup:
    local: list[Path] = field(default_factory=list)
    remote: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def clean_parts(dump_dir: Path, min_age_sec: float = 60.0) -> list[Path]:
    """Remove ``*.part`` files nobody writes to (lock free) and older than ``min_age_sec``."""
    removed: list[Path] = []
    if not dump_dir.is_dir():
        return removed
    now = time.time()
    for part in sorted(dump_dir.glob("*.part")):
        try:
            fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile, or a symlink: not ours
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer
            st = os.fstat(fd)
            with contextlib.suppress(FileNotFoundError):
                # Still the same file under that name (not committed and replaced)?
                if os.stat(part).st_ino != st.st_ino or now - st.st_mtime < min_age_sec:
                    continue
                part.unlink()
                removed.append(part)
        finally:
            os.close(fd)
    return removed


def clean_analysis_dirs(work_dir: Path, min_age_sec: float = 60.0) -> list[Path]:
    """Remove temporary copies of memdump.analysis whose check is gone (it holds an
    exclusive flock on the directory while it runs)."""
    removed: list[Path] = []
    if not work_dir.is_dir():
        return removed
    now = time.time()
    for d in sorted(work_dir.glob(TEMP_PREFIX + "*")):
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a check is running
            if now - os.fstat(fd).st_mtime < min_age_sec:
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        finally:
            os.close(fd)
    return removed


def clean_leftovers(settings: Settings, min_age_sec: float = 60.0) -> Cleanup:
    """Local ``.part`` files and every hypervisor's stale dump directories.

    An unreachable hypervisor is reported, not raised: a worker must still start.
    """
    out = Cleanup(local=clean_parts(settings.dump_dir, min_age_sec))
    for work_dir in {settings.dump_dir, settings.analysis.work_dir or settings.dump_dir}:
        out.local += clean_analysis_dirs(work_dir, min_age_sec)
    for part in out.local:
        log.warning("removed %s, left by a capture that never finished", part)
    for hv in settings.inventory:
        try:
            driver = open_driver(hv, settings.ssh)
            try:
                out.remote[hv.name] = driver.clean_stale(min_age_sec)
            finally:
                driver.close()
        except MemdumpError as exc:
            out.errors[hv.name] = str(exc)
            log.warning("%s: stale dump directories not checked: %s", hv.name, exc)
            continue
        for d in out.remote[hv.name]:
            log.warning("%s: removed %s, left by a dump script that was killed", hv.name, d)
    return out
