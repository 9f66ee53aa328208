"""Issue 11 item 14: a validation error of a settings model that holds a secret never
shows the secret, nor any part of it (pydantic prints ``input_value=`` by default)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from pydantic import ValidationError

from memdump.settings import HypervisorConfig, InfluxDB3Settings, S3Settings, Settings

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY-0123456789"
# A secret YAML or JSON reads as a number (all digits): the wrong type, printed back.
NUMERIC_SECRET = 73940128475610293847561


def _leaks(text: str) -> list[str]:
    """Every 6-character piece of either secret that appears in ``text``."""
    out = []
    for secret in (SECRET, str(NUMERIC_SECRET)):
        out += [secret[i : i + 6] for i in range(len(secret) - 5) if secret[i : i + 6] in text]
    return out


@pytest.mark.parametrize(
    ("model", "data"),
    [
        # A model-level check fails: pydantic would print the whole input, secret included.
        (S3Settings, {"bucket": "evidence", "secret_access_key": SECRET}),
        (S3Settings, {"bucket": "evidence", "secret_access_key": SECRET, "kms_key_id": "k"}),
        # The secret field itself has the wrong type: its value would be printed.
        (S3Settings, {"bucket": "evidence", "access_key_id": "A", "secret_access_key": [SECRET]}),
        (S3Settings, {"bucket": "ev", "access_key_id": "A", "secret_access_key": NUMERIC_SECRET}),
        (InfluxDB3Settings, {"url": "http://x", "token": NUMERIC_SECRET}),
        (InfluxDB3Settings, {"url": "http://x", "token": SECRET, "timeout_sec": -1}),
        (HypervisorConfig, {"name": "hv", "key_passphrase": NUMERIC_SECRET}),
        (HypervisorConfig, {"name": "bad name", "key_passphrase": SECRET}),
    ],
)
def test_secret_models_hide_their_input(model: type[Any], data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as ei:
        model(**data)
    text = f"{ei.value}\n{ei.value!r}"  # what a log, a traceback or a CLI shows
    assert _leaks(text) == []


def test_root_settings_hide_the_s3_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMDUMP_S3", f'{{"bucket": "evidence", "secret_access_key": "{SECRET}"}}')
    with pytest.raises(ValidationError) as ei:
        Settings()
    assert "secret_access_key go together" in str(ei.value)  # still says what is wrong
    assert _leaks(f"{ei.value}\n{ei.value!r}") == []


@pytest.mark.parametrize(
    "given",
    [{"api": {"token": NUMERIC_SECRET}}, {"api_token": NUMERIC_SECRET}],  # new, legacy name
    ids=["api.token", "api_token"],
)
def test_root_settings_hide_the_api_token(given: dict[str, Any]) -> None:
    with (
        pytest.raises(ValidationError) as ei,
        pytest.warns(FutureWarning) if "api_token" in given else contextlib.nullcontext(),
    ):
        Settings(**given)  # the wrong type
    assert "api.token" in str(ei.value)
    assert _leaks(f"{ei.value}\n{ei.value!r}") == []


def test_every_settings_model_with_a_secret_hides_its_input() -> None:
    # A secret field added later to any settings model must come with the setting.
    import inspect

    from pydantic import BaseModel

    import memdump.settings as mod

    models = [
        m
        for _, m in inspect.getmembers(mod, inspect.isclass)
        if issubclass(m, BaseModel) and m.__module__ == mod.__name__
    ]
    with_secrets = [
        m for m in models if any("SecretStr" in str(f.annotation) for f in m.model_fields.values())
    ]
    assert {m.__name__ for m in with_secrets} >= {"S3Settings", "APISettings"}
    for m in with_secrets:
        assert m.model_config.get("hide_input_in_errors") is True, m.__name__
