"""File permissions for what memdump writes: VM names, paths, hashes and memory images are
for the operator only.

``private_umask()`` is called first thing by every entry point (the ``memdump`` CLI, the
runner, the worker, the API module, and before exec in the children ``memdump serve``
starts), so every file memdump, SQLite or Prefect creates is 0600 and every directory
0700 whatever the caller's umask was. ``private_dir()`` replaces
``Path.mkdir(mode=0o700, parents=True)``, which applies the mode to the leaf only (the
parents get 0777 & ~umask, 0755 under the usual 022).
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_UMASK = 0o077


def private_umask() -> int:
    """Set the process umask to 077; returns the previous one."""
    return os.umask(PRIVATE_UMASK)


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and every missing parent, each 0700; return ``path``.

    A directory that already exists is left as it is (its mode is the operator's
    choice, e.g. a shared 0755 ``/var/lib``): only what this call creates is set. Raises
    NotADirectoryError if ``path`` exists and is not a directory (or a symlink to one).
    """
    target = Path(path)
    missing: list[Path] = []
    cur = target.absolute()
    while not cur.exists() and not cur.is_symlink():
        missing.append(cur)
        if cur.parent == cur:
            break
        cur = cur.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue  # created meanwhile by someone else: theirs, not ours to change
        # mkdir's mode is masked by the umask (a caller's 0o277 would give 0500): exact.
        os.chmod(d, 0o700)
    if not target.is_dir():
        raise NotADirectoryError(f"not a directory: {target}")
    return target


def private_file(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` empty and 0600 if it does not exist (an existing file is left as
    it is). Before SQLite opens a database: it creates the ``-wal`` and ``-shm`` files
    with the database file's mode, so all three are 0600 whatever the umask."""
    target = Path(path)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return target
    try:
        os.fchmod(fd, 0o600)  # exact, as for private_dir: the umask only removes bits
    finally:
        os.close(fd)
    return target
