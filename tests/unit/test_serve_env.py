"""Issue 11 item 8: the Prefect server `memdump serve` starts never runs without a
credential: one given by the operator, else one made once under the data dir (0600,
the same on every start), handed to the children as PREFECT_API_AUTH_STRING."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from deployments.stack import prefect_env
from memdump.settings import Settings


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for k in list(os.environ):
        if k.startswith("PREFECT_"):
            monkeypatch.delenv(k)
    return Settings(data_dir=tmp_path / "data", orchestration={"prefect_port": 4311})


def test_own_server_gets_a_private_credential_made_once(settings: Settings) -> None:
    env, own = prefect_env(settings)
    assert own
    cred_file = settings.data_dir / "prefect" / "auth-string"
    cred = cred_file.read_text().strip()
    user, _, password = cred.partition(":")
    assert user == "memdump" and len(password) >= 43  # 256 bits, urlsafe base64
    assert env["PREFECT_SERVER_API_AUTH_STRING"] == env["PREFECT_API_AUTH_STRING"] == cred
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4311/api"
    assert stat.S_IMODE(cred_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(cred_file.parent.stat().st_mode) == 0o700
    again, _ = prefect_env(settings)
    assert again["PREFECT_API_AUTH_STRING"] == cred  # the UI login stays valid


def test_operator_credential_wins_and_nothing_is_written(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", "ops:chosen-secret")
    env, own = prefect_env(settings)
    assert own
    assert env["PREFECT_SERVER_API_AUTH_STRING"] == env["PREFECT_API_AUTH_STRING"]
    assert env["PREFECT_API_AUTH_STRING"] == "ops:chosen-secret"
    assert not (settings.data_dir / "prefect" / "auth-string").exists()


def test_external_server_is_left_to_the_operator(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "https://prefect.example.internal/api")
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", "ops:secret")
    env, own = prefect_env(settings)
    assert not own
    assert env["PREFECT_API_AUTH_STRING"] == "ops:secret"
    assert "PREFECT_SERVER_API_AUTH_STRING" not in env
    assert not (settings.data_dir / "prefect").exists()


def test_a_symlinked_credential_file_is_not_followed_for_writing(settings: Settings) -> None:
    home = settings.data_dir / "prefect"
    home.mkdir(parents=True)
    target = settings.data_dir / "elsewhere"
    (home / "auth-string").symlink_to(target)  # dangling: O_CREAT would create the target
    with pytest.raises(OSError):
        prefect_env(settings)
    assert not target.exists()


def test_memdump_serve_is_the_stack_supervisors_entry_point() -> None:
    # Issue 13 item 4: the engine's CLI does not name the supervisor; it finds `serve`
    # through the memdump.commands entry point that pyproject.toml declares.
    from deployments import stack
    from memdump.cli.app import PLUGIN_GROUP, parser

    assert PLUGIN_GROUP == "memdump.commands"
    assert parser().parse_args(["serve"]).handler is stack.cmd_serve
