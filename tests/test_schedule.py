"""The update schedule against the paper's formula."""

import math

import pytest

from keras_rigl import schedule


def test_update_steps_every_update_freq_up_to_and_including_end():
    s = schedule.UpdateSchedule(update_freq=100, drop_fraction=0.3, end_step=750)
    assert s.update_steps(1000) == [100, 200, 300, 400, 500, 600, 700]
    s = schedule.UpdateSchedule(update_freq=100, drop_fraction=0.3, end_step=700)
    assert s.update_steps(1000)[-1] == 700
    s = schedule.UpdateSchedule(update_freq=10, drop_fraction=0.3, end_step=50, begin_step=25)
    assert s.update_steps(100) == [25, 35, 45]


@pytest.mark.parametrize("t", [0, 1, 100, 375, 749, 750])
def test_cosine_fraction(t):
    s = schedule.UpdateSchedule(update_freq=1, drop_fraction=0.3, end_step=750)
    assert s.fraction(t) == pytest.approx(0.3 / 2 * (1 + math.cos(math.pi * t / 750)))
    assert s.fraction(751) == 0.0


def test_linear_and_constant():
    assert schedule.drop_fraction_at(250, 0.4, 1000, "linear") == pytest.approx(0.3)
    assert schedule.drop_fraction_at(999, 0.4, 1000, "constant") == 0.4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(update_freq=0), "update_freq"),
        (dict(update_freq=2.5), "update_freq"),
        (dict(drop_fraction=0.0), r"drop_fraction must be in \(0, 1\]"),
        (dict(drop_fraction=1.5), r"drop_fraction must be in \(0, 1\]"),
        (dict(decay="step"), "Unknown decay"),
        (dict(begin_step=10, end_step=5), "end_step"),
    ],
)
def test_bad_schedules_are_refused(kwargs, match):
    args = dict(update_freq=10, drop_fraction=0.3, end_step=100, begin_step=0, decay="cosine")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        schedule.UpdateSchedule(**args)
