"""Issue 14's target for ``memdump diff`` (two 4 GiB dumps in under a second; timed in
benchmarks/diff.py), as the properties that make it cheap without checking less: the
second index of a comparison is read ``like`` the first (its Merkle root re-hashes only
the runs of chunks that differ, and a root that does not match is still refused), the
index's tiling is checked column by column yet names the entry out of place as the loop
did, and ``memdump diff`` imports neither the settings nor the capture, SSH, S3 or
Volatility stacks (it registers only its own command), s3:// dumps still compared."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from memdump import chunkedgz
from memdump.chunkedgz import ENTRY, SUBTREE, Index
from memdump.cli import app
from memdump.errors import ChunkedDumpError
from tests.helpers.merkle import rfc6962
from tests.helpers.moto import new_bucket, running_moto
from tests.helpers.verify_dumps import HIGH, core, file_offset, guest_ram, write_dump

REPO = Path(__file__).resolve().parents[2]
C = chunkedgz.MIN_CHUNK_SIZE
RUNS = 4  # chunks: three whole runs of SUBTREE and a short one
CHUNKS = 3 * SUBTREE + 5


def _raw(chunks: int, changed: Sequence[int] = ()) -> bytes:
    """Zero chunks but for each one's number (distinct digests); ``changed`` ones also
    carry a mark."""
    out = bytearray(chunks * C)
    for n in range(chunks):
        out[n * C : n * C + 8] = n.to_bytes(8, "little")
    for n in changed:
        out[n * C + 8] = 0xAA
    return bytes(out)


def _index(blob: bytes, like: Index | None = None) -> Index:
    index = chunkedgz.read_index(io.BytesIO(blob), like=like)
    assert index is not None
    return index


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of each run of leaves chunkedgz hashes from here on."""
    hashed: list[int] = []
    real: Callable[[Sequence[bytes]], bytes] = chunkedgz._run_root

    def counting(run: Sequence[bytes]) -> bytes:
        hashed.append(len(run))
        return real(run)

    monkeypatch.setattr(chunkedgz, "_run_root", counting)
    return hashed


@pytest.mark.parametrize("n", [SUBTREE - 1, SUBTREE, SUBTREE + 1, 2 * SUBTREE, 5 * SUBTREE + 3])
def test_the_merkle_root_over_runs_of_subtrees_is_rfc6962(n: int) -> None:
    leaves = [hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(n)]
    tree = chunkedgz.MerkleTree()  # the writer's, leaf by leaf
    for leaf in leaves:
        tree.add(leaf)
    assert chunkedgz.merkle_root(leaves) == rfc6962(leaves) == tree.root()


def test_a_second_index_read_like_the_first_rehashes_only_the_runs_that_differ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = _index(chunkedgz.compress_bytes(_raw(CHUNKS), C))
    blob = chunkedgz.compress_bytes(_raw(CHUNKS, changed=[SUBTREE + 7, SUBTREE + 9]), C)
    alone = _index(blob)
    assert len(a.subtree_roots) == len(alone.subtree_roots) == 32 * RUNS
    hashed = _counting(monkeypatch)
    b = _index(blob, like=a)
    assert hashed == [SUBTREE]  # run 1 only; the other three are a's
    assert b == alone and b.subtree_roots == alone.subtree_roots
    assert b.merkle_root == rfc6962(b.chunks.digests()).hex()
    # Another chunk count (another VM size): nothing to take from, every run hashed.
    hashed.clear()
    _index(chunkedgz.compress_bytes(_raw(CHUNKS + 1), C), like=a)
    assert hashed == [SUBTREE] * 3 + [6]


def test_a_root_that_does_not_match_is_refused_whatever_the_first_index() -> None:
    # B's entries are consistent with its index SHA-256 but its trailer claims A's root:
    # only the Merkle check can see it, and it does, read like A or alone.
    a = _index(chunkedgz.compress_bytes(_raw(CHUNKS), C))
    blob = bytearray(chunkedgz.compress_bytes(_raw(CHUNKS, changed=[2 * SUBTREE]), C))
    root_at = len(blob) - chunkedgz.TRAILER_SIZE + 16 + 40 + 32  # the MT payload's root
    blob[root_at : root_at + 32] = bytes.fromhex(a.merkle_root)
    for like in (a, None):
        with pytest.raises(ChunkedDumpError, match="Merkle root"):
            _index(bytes(blob), like=like)


def _entries(chunks: int, last: int) -> tuple[list[list[int | bytes]], int]:
    """Index entries (as lists of fields) of ``chunks`` chunks, the last of ``last``
    bytes, members of 100 bytes; and the raw size."""
    rows: list[list[int | bytes]] = [
        [n * C, C if n < chunks - 1 else last, n * 100, 100, hashlib.sha256(bytes([n])).digest()]
        for n in range(chunks)
    ]
    return rows, (chunks - 1) * C + last


# Each: how the entries are spoiled, and the entry the error names (None: "does not
# cover the image"). Offsets and sizes are those the loop checks entry by entry.
SPOILED: dict[str, tuple[Callable[[list[list[int | bytes]]], None], int | None]] = {
    "raw offset": (lambda rows: rows[3].__setitem__(0, 3 * C + 1), 3),
    "raw size": (lambda rows: rows[2].__setitem__(1, C - 1), 2),
    "last raw size": (lambda rows: rows[-1].__setitem__(1, 4096), 4),
    "member offset": (lambda rows: rows[4].__setitem__(2, 401), 4),
    "member offset beyond 4 GiB": (lambda rows: rows[1].__setitem__(2, 100 + (1 << 32)), 1),
    "member of a header alone": (lambda rows: rows[2].__setitem__(3, 28), 2),
    "extra chunk": (lambda rows: rows.append([5 * C, 0, 500, 100, bytes(32)]), 5),
    "missing chunk": (lambda rows: rows.__delitem__(-1), None),
}


@pytest.mark.parametrize("spoil", sorted(SPOILED))
def test_entries_out_of_place_are_named_as_the_loop_named_them(spoil: str) -> None:
    rows, raw_size = _entries(5, 3000)
    how, number = SPOILED[spoil]

    def check(rows: list[list[int | bytes]]) -> tuple[bool, Index]:
        entries = b"".join(ENTRY.pack(*row) for row in rows)
        end = sum(int(row[3]) for row in rows)
        fast = chunkedgz._tiles(entries, C, raw_size, end)
        digests = [bytes(row[4]) for row in rows]
        index = chunkedgz.index_from_entries(
            entries,
            C,
            len(rows),
            raw_size,
            end,
            hashlib.sha256(entries).digest(),
            chunkedgz.merkle_root(digests),
        )
        return fast, index

    fast, index = check(rows)
    assert fast and len(index.chunks) == 5  # the column compares decide a good index
    how(rows)
    with pytest.raises(ChunkedDumpError) as err:
        check(rows)
    if number is None:
        assert "does not cover the image" in str(err.value)
    else:
        assert err.value.fields["number"] == number
        assert f"index entry {number} does not follow" in str(err.value)


def _dumps(tmp_path: Path) -> tuple[Path, Path]:
    """Two small ELF cores written as memdump names dumps, one guest byte apart."""
    raw = core(guest_ram(1))
    changed = bytearray(raw)
    changed[file_offset(raw, HIGH + 0x100)] ^= 0xFF
    dumps = tmp_path / "dumps"
    return write_dump(dumps, raw).path, write_dump(dumps, bytes(changed)).path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMDUMP_")}
    env.update(extra)
    return env


# What `memdump diff` of two files does not need: the settings (pydantic), the capture
# chain, SSH, S3, Volatility, the HTTP client and renderer of the service commands.
NOT_FOR_DIFF = (
    "memdump.settings",
    "pydantic",
    "pydantic_settings",
    "yaml",
    "memdump.capture",
    "memdump.chain",
    "memdump.pipeline",
    "memdump.hypervisors",
    "memdump.analysis",
    "paramiko",
    "boto3",
    "botocore",
    "volatility3",
    "httpx",
    "rich",
)


def test_memdump_diff_of_two_files_imports_no_settings_capture_ssh_s3_or_volatility(
    tmp_path: Path,
) -> None:
    a, b = _dumps(tmp_path)
    code = (
        "import json, sys\n"
        "from memdump.cli import main\n"
        "status = main(['diff', '--json', sys.argv[1], sys.argv[2]])\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
        "sys.exit(status)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(a), str(b)],
        env=_env(MEMDUMP_DATA_DIR=str(tmp_path)),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1, out.stderr  # they differ
    assert json.loads(out.stdout)["chunks_changed"] == 1
    modules = json.loads(out.stderr.splitlines()[-1])
    assert "memdump.changes" in modules
    loaded = [m for m in modules if any(m == x or m.startswith(x + ".") for x in NOT_FOR_DIFF)]
    assert loaded == []


def _subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_each_engine_command_is_registered_by_the_module_the_cli_imports_for_it() -> None:
    registered: dict[str, str] = {}
    for module in app.ENGINE:
        p = argparse.ArgumentParser()
        app.engine(module)(p.add_subparsers())
        registered.update(dict.fromkeys(_subcommands(p), module))
    assert registered == app.COMMANDS
    everything = _subcommands(app.parser())
    assert set(app.COMMANDS) < set(everything)  # and the plugins' (serve)
    for command, module in app.COMMANDS.items():
        alone = _subcommands(app.parser(command))
        assert command in alone and {app.COMMANDS[c] for c in alone} == {module}
        # The same command as in the whole parser: the same code runs it.
        for how in ("handler", "run"):
            assert _code(alone[command].get_default(how)) == _code(
                everything[command].get_default(how)
            )


def _code(handler: object) -> object:
    """A handler's code (the service commands' handlers are closures made per parser)."""
    return getattr(handler, "__code__", handler)


def test_memdump_diff_of_an_s3_dump_builds_the_settings_it_needs(tmp_path: Path) -> None:
    a, b = _dumps(tmp_path)
    with running_moto() as url:
        client, bucket = new_bucket(url, "diff")
        client.put_object(Bucket=bucket, Key=f"memdump/{a.name}", Body=a.read_bytes())
        env = _env(
            MEMDUMP_DATA_DIR=str(tmp_path / "data"),
            MEMDUMP_DUMP_DIR=str(tmp_path / "dumps"),
            MEMDUMP_S3__BUCKET=bucket,
            MEMDUMP_S3__ENDPOINT_URL=url,
            MEMDUMP_S3__ACCESS_KEY_ID="t",
            MEMDUMP_S3__SECRET_ACCESS_KEY="t",
        )
        out = subprocess.run(
            [sys.executable, "-m", "memdump.cli", "diff", "--json"]
            + [f"s3://{bucket}/memdump/{a.name}", str(b)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 1, out.stderr
        assert json.loads(out.stdout)["chunks_changed"] == 1
        # Outside the configured prefix: refused before anything is read (exit 2).
        out = subprocess.run(
            [sys.executable, "-m", "memdump.cli", "diff"]
            + [f"s3://{bucket}/elsewhere/{a.name}", str(b)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 2 and "memdump:" in out.stderr, out
