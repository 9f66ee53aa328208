"""The integration tests' judgement of a live capture (tests.helpers.counter_guest):
what it lets through and what it must refuse, on probes written out by hand."""

from __future__ import annotations

import pytest

from tests.helpers.counter_guest import Consistency, Probe, assert_live_point_in_time

IMAGE = Consistency(counter=3445, step=64, pages=64)


def probes(*seen: tuple[int, str]) -> list[Probe]:
    """Probes before the migration, the ones ``seen`` while it was active, one after."""
    return [
        Probe(0, 1800, "running", "setup"),
        *(Probe(i + 1, c, s, "active") for i, (c, s) in enumerate(seen)),
        Probe(len(seen) + 1, 5100, "running", "completed"),
    ]


def test_a_guest_running_throughout_passes() -> None:
    assert_live_point_in_time(IMAGE, 1843, 5121, probes((3468, "running"), (4393, "running")), "t")


def test_the_set_up_stop_seen_by_the_first_probes_passes() -> None:
    # CI on 9b4d8de: QEMU marks the migration active, then stops the vCPUs for its set-up;
    # the first probe read the run state inside that stop.
    seen = probes((3425, "paused"), (3468, "running"), (3900, "running"), (4393, "running"))
    assert_live_point_in_time(IMAGE, 1843, 5121, seen, "t")


@pytest.mark.parametrize(
    "seen",
    [
        # stopped after it had run again: not the set-up stop
        ((3468, "running"), (3500, "paused"), (4393, "running")),
        # never running while the migration was active (left paused)
        ((3445, "paused"), (3445, "paused"), (3445, "paused")),
        # one running probe cannot show the counter moving
        ((3425, "paused"), (3468, "running")),
        # running, but the counter did not move
        ((3468, "running"), (3468, "running")),
        # the image holds a value written after the capture began sweeping
        ((3300, "running"), (3400, "running")),
    ],
    ids=["paused-later", "left-paused", "one-running", "no-progress", "later-value"],
)
def test_a_capture_that_is_not_live_or_not_one_instant_fails(
    seen: tuple[tuple[int, str], ...],
) -> None:
    with pytest.raises(AssertionError):
        assert_live_point_in_time(IMAGE, 1843, 5121, probes(*seen), "t")


def test_an_image_outside_the_reads_before_and_after_fails() -> None:
    seen = probes((3468, "running"), (4393, "running"))
    with pytest.raises(AssertionError):
        assert_live_point_in_time(IMAGE, 3446, 5121, seen, "t")
    with pytest.raises(AssertionError):
        assert_live_point_in_time(IMAGE, 1843, 3445, seen, "t")
