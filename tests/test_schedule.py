"""The update schedule against the paper's formula."""

import math

import pytest

from keras_rigl import schedule

pytestmark = pytest.mark.any_backend  # no TensorFlow: also run on JAX and PyTorch


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


def test_plan_start_shifts_the_updates_and_restarts_the_decay():
    s = schedule.UpdateSchedule(update_freq=3, drop_fraction=0.3, end_step=28, plan_start=16)
    assert s.update_steps(40) == [19, 22, 25, 28]
    assert s.update_steps(40, first_step=23) == [25, 28]
    assert not s.is_update_step(16) and not s.is_update_step(31)
    assert s.fraction(22) == pytest.approx(0.15 * (1 + math.cos(math.pi * 6 / 12)))


def test_begin_step_counts_from_the_plan_start():
    s = schedule.UpdateSchedule(update_freq=5, drop_fraction=0.3, end_step=40, begin_step=2, plan_start=10)
    assert s.update_steps(100) == [12, 17, 22, 27, 32, 37]


def test_callable_drop_fraction_gets_the_absolute_step_and_is_checked():
    s = schedule.UpdateSchedule(update_freq=1, drop_fraction=lambda step: step / 100, end_step=50, plan_start=10)
    assert s.fraction(30) == 0.3
    bad = schedule.UpdateSchedule(update_freq=1, drop_fraction=lambda step: float("nan"), end_step=50)
    with pytest.raises(ValueError, match=r"^drop_fraction\(4\)"):
        bad.fraction(4)


def test_decayed_fraction_is_serializable():
    import keras

    sched = schedule.DecayedFraction(0.4, 1000, "linear")
    assert sched(250) == pytest.approx(0.3)
    assert sched(1001) == 0.0
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(sched))
    assert isinstance(again, schedule.DecayedFraction) and again == sched
    with pytest.raises(ValueError, match="^initial_fraction"):
        schedule.DecayedFraction(0.0, 10)
    with pytest.raises(ValueError, match="^end_step"):
        schedule.DecayedFraction(0.3, 0)


def test_numpy_integers_are_accepted():
    import numpy as np

    s = schedule.UpdateSchedule(update_freq=np.int64(10), drop_fraction=np.float32(0.5), end_step=np.int64(30),
                                begin_step=np.int32(0))
    assert s.update_steps(100) == [10, 20, 30]
    assert schedule.validate(np.int64(10), 0.3, "cosine", np.int64(0))[0] == 10


def test_next_update_after_is_the_first_update_step_that_follows():
    import itertools

    from keras_rigl.schedule import UpdateSchedule

    for freq, begin, length, start in itertools.product([1, 3, 5], [0, 2, 7], [10, 23, 40], [0, 4]):
        plan = UpdateSchedule(freq, 0.3, start + length, begin, "cosine", start)
        for step in range(start + length + 5):
            by_hand = next((s for s in range(step + 1, start + length + 1) if plan.is_update_step(s)), None)
            assert plan.next_update_after(step) == by_hand, (freq, begin, length, start, step)
