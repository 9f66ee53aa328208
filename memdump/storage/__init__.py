"""Where finished dumps go after capture: S3 (or an S3-compatible object store)."""

from memdump.errors import (
    ObjectNotFoundError,
    ObjectStoreAccessError,
    ObjectStoreError,
    ObjectStoreUnavailableError,
    OffloadIntegrityError,
)
from memdump.settings import S3Settings
from memdump.storage.s3 import ObjectLock, S3Object, S3Store
from memdump.storage.s3_errors import map_s3_error

__all__ = [
    "ObjectNotFoundError",
    "ObjectStoreAccessError",
    "ObjectStoreError",
    "ObjectStoreUnavailableError",
    "OffloadIntegrityError",
    "ObjectLock",
    "S3Object",
    "S3Settings",
    "S3Store",
    "map_s3_error",
]
