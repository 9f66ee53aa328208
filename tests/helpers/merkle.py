"""RFC 6962's Merkle Tree Hash (section 2.1) written recursively as the RFC states it: the
reference the chunked .mem.gz's Merkle root (memdump.chunkedgz) is tested against."""

from __future__ import annotations

import hashlib


def rfc6962(leaves: list[bytes]) -> bytes:
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < n:
        k *= 2
    return hashlib.sha256(b"\x01" + rfc6962(leaves[:k]) + rfc6962(leaves[k:])).digest()
