"""A test that reaches for a lab that is not there fails, and says why: in scripts/test's
lane without the lab, that its module lacks the ``lab`` marker."""

from __future__ import annotations

import pytest

from tests.helpers.lab import NO_LAB_LANE, lab_missing


def test_in_the_lane_without_the_lab_it_names_the_missing_marker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(NO_LAB_LANE, "1")
    with pytest.raises(pytest.fail.Exception, match=r"pytestmark = pytest\.mark\.lab"):
        lab_missing()


def test_elsewhere_it_says_the_lab_is_not_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NO_LAB_LANE, raising=False)
    with pytest.raises(pytest.fail.Exception, match="the lab is not up"):
        lab_missing()
