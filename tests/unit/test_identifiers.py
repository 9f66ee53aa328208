import pytest

from memdump.errors import InvalidIdentifierError
from memdump.identifiers import validate_id


@pytest.mark.parametrize(
    "value", ["101", "vm-web-01", "vm_db.01", "5c8f1a3e-7a59-4a0b-9a3f-0c3a1b2c3d4e", "a" * 128]
)
def test_plain_ids_pass(value: str) -> None:
    assert validate_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "-rf",
        "--help",
        ".hidden",
        "a b",
        "a;b",
        "a|b",
        "a&b",
        "$(id)",
        "`id`",
        "a'b",
        'a"b',
        "a\nb",
        "a\x00b",
        "a/b",
        "../etc",
        "a..b",
        "vm\u00e9",
        "\u202ex",
        "a" * 129,
        "a*",
        "a?",
        "a>b",
        "a\\b",
        "a,b",
        "a:b",
    ],
)
def test_hostile_ids_are_refused(value: str) -> None:
    with pytest.raises(InvalidIdentifierError):
        validate_id(value)


@pytest.mark.parametrize("value", [None, 101, ["x"], b"101"])
def test_non_strings_are_refused(value: object) -> None:
    with pytest.raises(InvalidIdentifierError):
        validate_id(value)


def test_error_is_not_retryable_and_has_fields() -> None:
    with pytest.raises(InvalidIdentifierError) as ei:
        validate_id("a;b")
    assert ei.value.retryable is False
    assert ei.value.fields["value"] == "a;b"
