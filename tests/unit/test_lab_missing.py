"""A test that reaches for a lab that is not there fails, and says why: in scripts/test's
lane without the lab, that its module lacks the ``lab`` marker."""

from __future__ import annotations

import pytest

from tests.helpers.lab import NO_LAB_LANE, lab_missing, stray_lab_tests


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


class _Item:
    def __init__(self, nodeid: str, lab: bool) -> None:
        self.nodeid, self.lab = nodeid, lab

    def get_closest_marker(self, name: str) -> object | None:
        return object() if name == "lab" and self.lab else None


def test_a_lab_test_outside_the_lab_lanes_directories_is_named() -> None:
    items = [
        _Item("tests/integration/test_a.py::t", lab=True),
        _Item("tests/flows/test_b.py::t", lab=True),
        _Item("tests/unit/test_c.py::t", lab=False),
        _Item("tests/unit/test_d.py::t", lab=True),
        _Item("tests/integrationx/test_e.py::t", lab=True),
    ]
    assert stray_lab_tests(items) == [
        "tests/unit/test_d.py::t",
        "tests/integrationx/test_e.py::t",
    ]
