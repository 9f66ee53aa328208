"""Issue 13 item 1: one exit-code table for the hypervisor scripts. exitcodes.Exit, the
EXIT_* variables of sh/lib.sh and the EXIT_* constants of the QMP client (remote/qmp.py)
are the same table; no script exits with a bare number other than 0 or 1 or names a code
the table does not have; the scripts are files loaded as package data."""

from __future__ import annotations

import ast
import re
import shlex
from importlib import resources
from pathlib import Path

import pytest

from memdump.hypervisors import scripts
from memdump.hypervisors.exitcodes import Exit

SH = Path(str(resources.files("memdump.hypervisors").joinpath("sh")))
ALL_SH = sorted(SH.rglob("*.sh"))


def _lib_table() -> dict[str, int]:
    """lib.sh's ``EXIT_NAME=N`` lines."""
    text = (SH / "lib.sh").read_text()
    return {m[1]: int(m[2]) for m in re.finditer(r"^\s*EXIT_([A-Z_]+)=(\d+)\s*$", text, re.M)}


def test_lib_sh_mirrors_the_table_exactly() -> None:
    assert _lib_table() == {e.name: e.value for e in Exit}


def test_one_meaning_per_code() -> None:
    # An IntEnum with two names for one value would make the second an alias.
    assert len({e.value for e in Exit}) == len(Exit.__members__)


def test_the_qmp_client_uses_the_same_numbers() -> None:
    src = resources.files("memdump.hypervisors.remote").joinpath("qmp.py").read_text("utf-8")
    tree = ast.parse(src)
    consts = {
        node.targets[0].id.removeprefix("EXIT_"): node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id.startswith("EXIT_")
        and isinstance(node.value, ast.Constant)
    }
    assert consts, "qmp.py defines its exit codes as EXIT_* constants"
    assert consts == {name: Exit[name].value for name in consts}
    # Its codes are those constants: no Fail(74, ...), return 70, "memdump-error", "80".
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("Fail",):
            assert not isinstance(node.args[0], ast.Constant), ast.unparse(node)
        if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant):
            value = node.value.value
            assert not isinstance(value, int) or value in (0, 1), ast.unparse(node)
    assert not re.search(r'"memdump-error", "\d+"', src)


@pytest.mark.parametrize("path", ALL_SH, ids=lambda p: str(p.relative_to(SH)))
def test_scripts_exit_with_named_codes(path: Path) -> None:
    # The code, comments left out (they say "exit" in words).
    text = "".join(ln if not ln.lstrip().startswith("#") else "\n" for ln in path.open())
    for m in re.finditer(r"\bexit\b[ \t]*([^\s;)}']*)", text):
        word = m[1]
        line = text[: m.start()].count("\n") + 1
        where = f"{path.name}:{line}: exit {word}"
        if word.isdigit():
            assert word in ("0", "1"), f"{where}: a bare code (use an EXIT_ name)"
        elif word.startswith('"$EXIT_'):
            assert word.removeprefix('"$EXIT_').removesuffix('"') in Exit.__members__, where
        else:  # a status passed on: the tool's, $?, or none (the last command's)
            assert word in ("", '"$rc"', "$?", '"$1"'), where
    for name in re.findall(r"\$\{?EXIT_([A-Z_]+)", text):
        assert name in Exit.__members__, f"{path.name}: EXIT_{name} is not in the table"


def test_the_scripts_as_sent_have_every_placeholder_filled() -> None:
    import memdump.hypervisors.fifo as fifo
    import memdump.hypervisors.libvirt as libvirt
    import memdump.hypervisors.proxmox as proxmox
    import memdump.hypervisors.qemu as qemu

    sent = {
        f"{mod.__name__}.{name}": v
        for mod in (fifo, libvirt, proxmox, qemu)
        for name, v in vars(mod).items()
        if isinstance(v, str) and v.startswith(scripts.LIB)
    }
    assert len(sent) == 23  # fifo 3, libvirt 10, qemu 7, proxmox 3
    for name, text in sent.items():
        assert not scripts._PLACEHOLDER.search(text), name
    assert scripts.RUN_DIR in scripts.LIB
    # The QMP client is in each qemu script that runs it once (memdump_qmp), whole.
    assert qemu._LIVE.count(qemu.QMP_CLIENT) == 1
    assert shlex.quote(libvirt._DRAIN) in libvirt._LIVE


def test_an_unknown_placeholder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scripts, "read", lambda name: "echo @TYPO@\n" if name != "lib.sh" else "")
    with pytest.raises(RuntimeError, match="@TYPO@"):
        scripts.load("x.sh")


def test_scripts_are_package_data() -> None:
    """pyproject declares sh/ as package data: a wheel carries every script."""
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    m = re.search(r'"memdump\.hypervisors" = \[([^\]]*)\]', pyproject)
    assert m is not None
    globs = re.findall(r'"([^"]+)"', m[1])
    for p in ALL_SH:
        rel = str(p.relative_to(SH.parent))
        assert any(Path(rel).match(g) for g in globs), rel
