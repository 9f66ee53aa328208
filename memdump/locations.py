"""Where a dump lives, and the one check that a location from a record may be touched.

A dump is named ``<hypervisor>_<vmid>_<UTC time, microseconds>_<random>.mem.gz`` (older
ones ``<vmid>_<epoch seconds>.mem.gz``), with its manifest beside it under the same stem.
Records are data: anyone who can write to the record store could point ``dump_path`` at
any file or key. So before retention deletes or verify reads a location, it is confined:
a local path must resolve (symlinks followed) to a file directly in the dump directory,
an S3 URI must name the configured bucket and a key directly under the configured
prefix, and in both the file name must be a dump file name. Anything else raises
:class:`LocationError` and is neither read nor deleted.

A record may hold a dump in two places (a local copy on the collector that wrote it and
an S3 object); :func:`record_locations` lists them, also for records written before
locations were recorded (their ``dump_path`` is their only location).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from memdump.errors import LocationError
from memdump.identifiers import validate_id

if TYPE_CHECKING:  # types only: `memdump diff` of two files reads no settings (pydantic)
    from memdump.settings import S3Settings

SUFFIX = ".mem.gz"
S3_SCHEME = "s3://"
_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*"
# hypervisor_vmid_20261129T015216.123456Z_3f9a1c.mem.gz (ids are plain identifiers)
NEW_NAME = re.compile(rf"{_ID}_{_ID}_\d{{8}}T\d{{6}}\.\d{{6}}Z_[0-9a-f]{{6,32}}\.mem\.gz")
# vmid_1699520400.mem.gz, from before names carried the hypervisor
OLD_NAME = re.compile(rf"{_ID}_\d{{1,12}}\.mem\.gz")
MAX_NAME = 255


def is_dump_name(name: str) -> bool:
    """A file name memdump writes (new or old form), and nothing a path could abuse."""
    return (
        len(name) <= MAX_NAME
        and ".." not in name
        and (NEW_NAME.fullmatch(name) is not None or OLD_NAME.fullmatch(name) is not None)
    )


def dump_name(hypervisor: str, vmid: str, when: datetime, rand: str | None = None) -> str:
    """The file name (and S3 key tail) of a new dump: unique across hypervisors (the same
    vmid exists on every Proxmox node), collectors (a random suffix) and time, and still
    readable. Both ids are checked again here: the name must never hold ``/``, ``..`` or
    a control character, whatever a caller passes."""
    validate_id(hypervisor, what="hypervisor name")
    validate_id(vmid, what="VM id")
    stamp = when.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    name = f"{hypervisor}_{vmid}_{stamp}_{rand or secrets.token_hex(3)}{SUFFIX}"
    if not is_dump_name(name):
        raise LocationError(f"not a valid dump file name: {name!r}", name=name[:300])
    return name


def confine_local(where: str, dump_dir: Path) -> Path:
    """``where`` resolved, if it is a dump file directly in ``dump_dir``; else LocationError."""
    base = dump_dir.resolve()
    if not where or "\0" in where:
        raise LocationError(f"refused local path {where!r}: empty or NUL", location=where[:300])
    path = Path(where)
    if not path.is_absolute():
        raise LocationError(f"refused local path {where!r}: not absolute", location=where[:300])
    resolved = path.resolve()
    if resolved.parent != base:
        raise LocationError(
            f"refused local path {where!r}: not in the dump directory {base}",
            location=where[:300],
            dump_dir=str(base),
        )
    if not is_dump_name(resolved.name) or resolved.name != path.name:
        raise LocationError(
            f"refused local path {where!r}: not a dump file name", location=where[:300]
        )
    return resolved


def confine_s3(uri: str, s3: S3Settings | None) -> str:
    """The key of ``uri`` if it is ``s3://<configured bucket>/<prefix><dump name>``."""
    if s3 is None:
        raise LocationError(
            f"refused {uri!r}: S3 is not configured (MEMDUMP_S3__BUCKET)", location=uri[:300]
        )
    head = f"{S3_SCHEME}{s3.bucket}/"
    if not uri.startswith(head):
        raise LocationError(
            f"refused {uri!r}: not in the configured bucket {s3.bucket}", location=uri[:300]
        )
    key = uri.removeprefix(head)
    if not key.startswith(s3.prefix):
        raise LocationError(
            f"refused {uri!r}: not under the configured prefix {s3.prefix!r}", location=uri[:300]
        )
    name = key.removeprefix(s3.prefix)
    if "/" in name or not is_dump_name(name):
        raise LocationError(f"refused {uri!r}: not a dump file name", location=uri[:300])
    return key


Kind = Literal["local", "s3"]


@dataclass(frozen=True)
class Location:
    """One copy of a dump: a local file or an S3 object, the one type capture, offload,
    verify and retention pass around. ``collector``: who holds a local copy ("" for
    records older than this field: unknown). ``deleted_at``: retention removed this copy.
    A location from a record is data: :meth:`path` and :meth:`key` confine it before
    anything is read or deleted."""

    kind: Kind
    where: str
    collector: str = ""
    version_id: str = ""
    deleted_at: str = ""

    @classmethod
    def of(cls, where: str, *, collector: str = "", version_id: str = "") -> Location:
        """A dump path as records hold it: an ``s3://`` URI, else a local path (the one
        place the two are told apart)."""
        kind: Kind = "s3" if where.startswith(S3_SCHEME) else "local"
        return cls(kind, where, collector, version_id)

    def path(self, dump_dir: Path) -> Path:
        """The confined local file (LocationError if not local or out of bounds)."""
        if self.kind != "local":
            raise LocationError(f"{self.where!r} is not a local path", location=self.where[:300])
        return confine_local(self.where, dump_dir)

    def key(self, s3: S3Settings | None) -> str:
        """The confined S3 key (LocationError if not S3, S3 is not configured, or out of
        bounds)."""
        if self.kind != "s3":
            raise LocationError(f"{self.where!r} is not an S3 URI", location=self.where[:300])
        return confine_s3(self.where, s3)


def record_locations(row: Mapping[str, Any]) -> list[Location]:
    """Every copy of a record's dump: its local copy and its S3 object, as recorded; a
    record from before these fields has just its ``dump_path``."""
    out: list[Location] = []
    local = str(row.get("local_path") or "")
    s3_uri = str(row.get("s3_uri") or "")
    if local:
        out.append(
            Location(
                "local",
                local,
                str(row.get("collector") or ""),
                deleted_at=str(row.get("local_deleted_at") or ""),
            )
        )
    if s3_uri:
        out.append(
            Location(
                "s3",
                s3_uri,
                version_id=str(row.get("s3_version_id") or ""),
                deleted_at=str(row.get("s3_deleted_at") or ""),
            )
        )
    if not out:
        out.append(Location.of(str(row.get("dump_path") or "")))
    return out
