"""The shell scripts the drivers run on a hypervisor: real files in
memdump/hypervisors/sh/ (package data), read with importlib.resources.

``load(NAME, ...)`` gives a script as it is sent: ``sh/lib.sh`` (the exit codes of
exitcodes.py and the shared functions: the temp dir and its token, the FIFO's reader,
the pause window, the userfaultfd window...), then each named file, one after the other,
with each ``@NAME@`` replaced by a constant of this package (``@RUN_DIR@`` always; a
driver passes its own, such as the QMP client's text). Only such constants ever reach a
script's text; every value (VM ids, URIs, paths from the inventory or a request) reaches
it as a positional argument (``sh -c SCRIPT sh ARG...``, memdump.transport).
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

# The root-only base of FIFO dumps' temp dirs (the environment variable MEMDUMP_RUN_DIR
# moves it: tests, hosts without /run).
RUN_DIR = "/run/memdump"

_PLACEHOLDER = re.compile(r"@([A-Z][A-Z_]*)@")
# The files of every script loaded so far, in order (scripts/shellcheck-hv checks each
# such sequence as one script: as it is sent).
LOADED: set[tuple[str, ...]] = set()


@cache
def read(name: str) -> str:
    """The text of ``sh/NAME`` (a path relative to sh/, "/" separated), as it is."""
    node = resources.files("memdump.hypervisors").joinpath("sh")
    for part in name.split("/"):
        node = node.joinpath(part)
    return node.read_text("utf-8")


def load(*names: str, **constants: str) -> str:
    """lib.sh, then the files ``names``, joined; ``@RUN_DIR@`` and each ``@KEY@`` of
    ``constants`` replaced (a placeholder without a value is an error: a typo must not
    reach a hypervisor)."""
    values = {"RUN_DIR": RUN_DIR, **constants}
    LOADED.add(("lib.sh", *names))
    text = "".join(read(n) for n in ("lib.sh", *names))

    def value(m: re.Match[str]) -> str:
        if m.group(1) not in values:
            raise RuntimeError(f"no value for {m.group(0)} in hypervisor script {names}")
        return values[m.group(1)]

    return _PLACEHOLDER.sub(value, text)


# lib.sh as every script starts with it: for scripts put together in tests.
LIB = load()

__all__ = ["LIB", "RUN_DIR", "load", "read"]
