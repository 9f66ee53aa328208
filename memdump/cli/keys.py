"""``memdump keys show``: this collector's signing key (memdump.signing): its public key
and fingerprint, and whether MEMDUMP_TRUSTED_KEYS lists it. The key is made on first use
(in the data dir) unless MEMDUMP_SIGNING_KEY_FILE names one. ``memdump countersign``: an
operator's signature on a recorded dump from before signing (memdump.countersign), which
attests to its present state only."""

from __future__ import annotations

import argparse
import base64
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memdump.countersign import Countersigned
    from memdump.settings import Settings


def cmd_keys_show(settings: Settings, args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    from memdump.signing import ALGORITHM, collector_signer, trusted_keys

    signer = collector_signer(settings)
    public_b64 = base64.b64encode(signer.public_raw).decode()
    if args.trusted_line:
        # One line of a MEMDUMP_TRUSTED_KEYS file: the fingerprint, then a label.
        print(f"{signer.fingerprint} {settings.collector_id} {public_b64}")
        return 0
    pem = (
        signer.key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    trusted = signer.fingerprint in trusted_keys(settings)
    out = {
        "algorithm": ALGORITHM,
        "key_file": str(signer.path),
        "collector_id": settings.collector_id,
        "public_key": public_b64,
        "public_key_pem": pem,
        "fingerprint": signer.fingerprint,
        "fingerprint_is": "SHA-256 of the raw 32-byte public key, hex",
        "trusted": trusted,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"algorithm:    {ALGORITHM}")
    print(f"key file:     {signer.path}")
    print(f"public key:   {public_b64}  (raw 32 bytes, base64)")
    print(f"fingerprint:  {signer.fingerprint}  (SHA-256 of the raw public key)")
    listed = "yes" if trusted else "no (not listed in MEMDUMP_TRUSTED_KEYS)"
    print(f"trusted:      {listed}")
    print(pem, end="")
    return 0


def cmd_countersign(settings: Settings, args: argparse.Namespace) -> int:
    """One JSON line per dump; exit 1 unless every one was countersigned."""
    from memdump.cli.batch import each_record
    from memdump.countersign import countersign
    from memdump.errors import CountersignRefusedError

    def act(row: Mapping[str, Any]) -> Countersigned:
        return countersign(row, settings)

    return each_record(settings, args.dump_paths, "countersigned", act, (CountersignRefusedError,))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keys", help="the collector's signing key (memdump keys show)")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    show = ksub.add_parser(
        "show", help="print the public key and its fingerprint (the key is made on first use)"
    )
    show.add_argument("--json", action="store_true", help="one JSON document")
    show.add_argument(
        "--trusted-line",
        action="store_true",
        help="print only a line for a MEMDUMP_TRUSTED_KEYS file (fingerprint, label, key)",
    )
    show.set_defaults(handler=cmd_keys_show)
    p = sub.add_parser(
        "countersign",
        help="sign recorded dumps from before signing with this collector's key: it attests"
        " to their present state only (each is verified first; a signed one is refused)",
    )
    p.add_argument("dump_paths", nargs="+", help="dump_path of a record (local or s3://)")
    p.set_defaults(handler=cmd_countersign)
