"""Validation of identifiers that reach a remote command or a file name.

An id must start with a letter or digit (so it can never be read as an option such
as ``--help``) and contain only letters, digits, ``.``, ``_`` and ``-``: no
whitespace, quotes, shell metacharacters, path separators or control characters.
Validated ids are still passed to remote scripts as quoted positional arguments,
never pasted into script text.
"""

from __future__ import annotations

import re

from memdump.errors import InvalidIdentifierError

MAX_ID_LENGTH = 128
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate_id(value: object, *, what: str = "VM id") -> str:
    """Return ``value`` if it is a plain identifier, else raise InvalidIdentifierError."""
    if not isinstance(value, str):
        raise InvalidIdentifierError(f"{what} must be a string", value=repr(value)[:80])
    if not value:
        raise InvalidIdentifierError(f"{what} must not be empty", value="")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidIdentifierError(
            f"{what} is longer than {MAX_ID_LENGTH} characters", value=value[:80] + "..."
        )
    if not _ID_RE.fullmatch(value) or ".." in value:
        raise InvalidIdentifierError(
            f"{what} {value!r} is not a plain identifier "
            "(letters, digits, '.', '_', '-'; starting with a letter or digit)",
            value=value[:80],
        )
    return value


def split_qualified(value: object, *, what: str = "VM id") -> tuple[str | None, str]:
    """``"hv:101"`` -> ``("hv", "101")``; ``"101"`` -> ``(None, "101")``. Both parts must be
    plain identifiers: a qualified id names the hypervisor from the inventory, so an id
    that exists on two hypervisors can still be asked for."""
    if isinstance(value, str) and value.count(":") == 1:
        hv, _, vm = value.partition(":")
        return validate_id(hv, what="hypervisor name"), validate_id(vm, what=what)
    return None, validate_id(value, what=what)
