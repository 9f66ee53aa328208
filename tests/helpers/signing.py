"""Signing set-ups for tests (issue 15): a collector key in a temp dir, listed in a
trusted-keys file, as `scripts/run` lists the local key for the lab; and a second key
nobody trusts, for forgeries."""

from __future__ import annotations

from pathlib import Path

from memdump.settings import Settings
from memdump.signing import Signer, collector_signer


def trusting(settings: Settings, where: Path) -> Settings:
    """``settings`` signing with a key made under ``where`` (not the repository's
    .data) and trusting it: what a lab or dev machine set up by scripts/run has."""
    signed = settings.model_copy(update={"data_dir": where / "signing"})
    signer = collector_signer(signed)  # generated under where/signing/keys
    trusted = where / "signing" / "trusted_keys"
    trusted.write_text(f"# the lab collector\n{signer.fingerprint} test-collector\n")
    return settings.model_copy(update={"signing_key_file": signer.path, "trusted_keys": trusted})


def trust_local_key(data_dir: Path) -> Path:
    """The key a collector with ``data_dir`` makes on first use, made now and listed in
    ``<data_dir>/trusted_keys`` (returned): what scripts/run does for the lab."""
    signer = collector_signer(Settings(data_dir=data_dir, signing_key_file=None))
    trusted = data_dir / "trusted_keys"
    trusted.write_text(f"{signer.fingerprint} local-collector\n")
    return trusted


def other_signer(where: Path) -> Signer:
    """A key that no trusted-keys file lists (an intruder's)."""
    return collector_signer(Settings(data_dir=where / "intruder"))
