"""Settings come in groups (api, orchestration, analysis, retention, verify, as ssh and s3
already were); the old flat names keep working for a release, with a warning naming the
new one, from the environment, a .env file and keyword arguments alike."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from memdump.settings import LEGACY_NAMES, LegacySettingWarning, Settings, env_name


def test_grouped_names_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMDUMP_API__PORT", "8111")
    monkeypatch.setenv("MEMDUMP_API__ALLOWED_HOSTS", "a.example, B.example")
    monkeypatch.setenv("MEMDUMP_ORCHESTRATION__FANOUT", "deployments")
    monkeypatch.setenv("MEMDUMP_ANALYSIS__ENABLED", "false")
    monkeypatch.setenv("MEMDUMP_RETENTION__KEEP_LAST", "4")
    monkeypatch.setenv("MEMDUMP_VERIFY__DAYS", "3")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LegacySettingWarning)  # none of these is legacy
        s = Settings()
    assert s.api.port == 8111 and s.api.allowed_hosts == ["a.example", "b.example"]
    assert s.orchestration.fanout == "deployments" and s.analysis.enabled is False
    assert s.retention.keep_last == 4 and s.verify.days == 3


@pytest.mark.parametrize("old", sorted(LEGACY_NAMES))
def test_every_old_flat_name_still_works_from_the_environment_with_a_warning(
    old: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    group, field = LEGACY_NAMES[old]
    default = getattr(getattr(Settings(), group), field)
    value = _another_value(group, field, default)
    monkeypatch.setenv(f"MEMDUMP_{old.upper()}", value)
    with pytest.warns(LegacySettingWarning, match=env_name(group, field)):
        s = Settings()
    got = getattr(getattr(s, group), field)
    assert got != default
    monkeypatch.delenv(f"MEMDUMP_{old.upper()}")
    monkeypatch.setenv(env_name(group, field), value)
    assert getattr(getattr(Settings(), group), field) == got  # what the new name gives


def _another_value(group: str, field: str, default: object) -> str:
    """A valid value of this setting that differs from its default, as text."""
    special = {
        ("api", "token"): "s3cret-token",
        ("api", "allowed_hosts"): "ops.example",
        ("api", "host"): "127.0.0.2",
        ("orchestration", "fanout"): "deployments",
        ("orchestration", "flow_name"): "other-flow",
        ("orchestration", "deployment"): "adhoc",
        ("orchestration", "child_deployment"): "f/d",
        ("analysis", "work_dir"): "/tmp/an",
    }
    if (group, field) in special:
        return special[(group, field)]
    if isinstance(default, bool):
        return str(not default).lower()
    if default is None:
        return "7"
    if isinstance(default, int | float):
        return str(default + 1)
    raise AssertionError(f"no test value for {group}.{field}")


def test_old_names_as_keyword_arguments_and_in_a_dotenv_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.warns(LegacySettingWarning, match="MEMDUMP_API__PORT"):
        assert Settings(api_port=9000).api.port == 9000
    with pytest.warns(LegacySettingWarning, match="MEMDUMP_ANALYSIS__ENABLED"):
        assert Settings(analysis=False).analysis.enabled is False
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MEMDUMP_CAPTURE_RETRIES=7\nMEMDUMP_RETENTION_DAYS=9\n")
    with pytest.warns(LegacySettingWarning, match="RETENTION__DAYS|ORCHESTRATION__CAPTURE_RETRIES"):
        s = Settings()
    assert s.orchestration.capture_retries == 7 and s.retention.days == 9


def test_the_new_name_wins_over_the_old_and_the_warning_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEMDUMP_API_PORT", "1111")
    monkeypatch.setenv("MEMDUMP_API__PORT", "2222")
    with pytest.warns(LegacySettingWarning, match="MEMDUMP_API_PORT .* is ignored"):
        assert Settings().api.port == 2222


def test_old_names_are_validated_like_new_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMDUMP_API_TOKEN", "  ")
    with (
        pytest.raises(ValueError, match="MEMDUMP_API__TOKEN is empty"),
        pytest.warns(LegacySettingWarning),
    ):
        Settings()
    monkeypatch.delenv("MEMDUMP_API_TOKEN")
    monkeypatch.setenv("MEMDUMP_RETENTION_KEEP_LAST", "0")  # would delete every dump
    with pytest.raises(ValueError, match="keep_last"), pytest.warns(LegacySettingWarning):
        Settings()
