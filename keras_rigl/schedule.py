"""When masks are updated and by how much: the update plan and drop-fraction schedules.

Pure functions of the optimizer step, so that a resumed run recomputes
exactly the same schedule.

``drop_fraction`` may be

* a float, decayed to 0 at ``end_step`` by ``decay`` (the paper: cosine);
* a :class:`DropFractionSchedule` (serializable, like TFMOT's
  ``PruningSchedule``), e.g. :class:`DecayedFraction`;
* any callable ``step -> fraction`` of the optimizer step (saved in a
  callback's config only when Keras can serialize it, e.g. a function
  registered with ``keras.saving.register_keras_serializable``).
"""

from __future__ import annotations

import dataclasses
import math

import keras

from keras_rigl import validation

DECAYS = ("cosine", "linear", "constant")


@keras.saving.register_keras_serializable(package="keras_rigl")
class DropFractionSchedule:
    """Base of serializable drop-fraction schedules: ``schedule(step) -> fraction``.

    ``step`` is the optimizer step of the update (``optimizer.iterations``
    after the step). Subclasses implement ``__call__`` and ``get_config``;
    register them with ``keras.saving.register_keras_serializable`` so that a
    callback's ``get_config`` / ``from_config`` round-trips them.
    """

    def __call__(self, step):
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(step) -> fraction.")

    def get_config(self):
        raise NotImplementedError(f"{type(self).__name__} must implement get_config() (its __init__ arguments).")

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="keras_rigl")
class DecayedFraction(DropFractionSchedule):
    """``initial_fraction`` decayed to 0 at the absolute optimizer step ``end_step``.

    The float ``drop_fraction`` with ``decay=`` does the same with the end
    step of the callback's plan; this object fixes it explicitly.
    """

    def __init__(self, initial_fraction, end_step, decay="cosine"):
        self.initial_fraction = validation.check_number(
            "initial_fraction", initial_fraction, 0.0, 1.0, low_open=True, hint=" (the paper uses 0.3)"
        )
        self.end_step = validation.check_int("end_step", end_step, 1)
        self.decay = validation.check_choice("decay", decay, DECAYS)

    def __call__(self, step):
        return drop_fraction_at(step, self.initial_fraction, self.end_step, self.decay)

    def get_config(self):
        return {"initial_fraction": self.initial_fraction, "end_step": self.end_step, "decay": self.decay}


@dataclasses.dataclass(frozen=True)
class UpdateSchedule:
    """Mask updates every ``update_freq`` steps in ``[plan_start + begin_step, end_step]``.

    ``step`` counts optimizer steps done (``optimizer.iterations`` after the
    step), so the first possible update is after the first step.
    ``plan_start`` is the optimizer step at which the planned run began (0
    for a first ``fit``; see the callbacks' "Repeated fit" notes): update
    steps and the float decay count from it. ``end_step`` is absolute.
    """

    update_freq: int
    drop_fraction: object  # float, DropFractionSchedule or callable step -> fraction
    end_step: int
    begin_step: int = 0
    decay: str = "cosine"
    plan_start: int = 0

    def __post_init__(self):
        values = validate(self.update_freq, self.drop_fraction, self.decay, self.begin_step)
        plan_start = validation.check_int("plan_start", self.plan_start)
        end_step = validation.check_int(
            "end_step", self.end_step, plan_start + values[3] + 1,
            hint=" (the last update step; it must come after begin_step)",
        )
        # frozen: store the plain Python values the checks returned
        for name, value in zip(("update_freq", "drop_fraction", "decay", "begin_step"), values[:4]):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "end_step", end_step)
        object.__setattr__(self, "plan_start", plan_start)

    def is_update_step(self, step):
        offset = step - self.plan_start - self.begin_step
        return step <= self.end_step and step > self.plan_start and offset >= 0 and offset % self.update_freq == 0

    def fraction(self, step):
        """Drop fraction at ``step`` (the paper's cosine decay by default)."""
        if callable(self.drop_fraction):
            value = self.drop_fraction(step)
            return validation.check_number(
                f"drop_fraction({step})", value, 0.0, 1.0, hint=" (the callable drop_fraction's value)"
            )
        return drop_fraction_at(step - self.plan_start, self.drop_fraction, self.end_step - self.plan_start, self.decay)

    def next_update_after(self, step):
        """The first update step after ``step``, or None when the plan has no more."""
        base = self.plan_start + self.begin_step
        after = max(int(step), self.plan_start)
        j = max(0, -(-(after + 1 - base) // self.update_freq))
        candidate = base + j * self.update_freq
        return candidate if candidate <= self.end_step else None

    def progress(self, step):
        """How far ``step`` is through the plan: 0 at ``plan_start``, 1 at ``end_step`` (clipped)."""
        return min(1.0, max(0.0, (step - self.plan_start) / (self.end_step - self.plan_start)))

    def update_steps(self, last_step, first_step=1):
        """All update steps in ``[first_step, last_step]``."""
        start = max(first_step, self.plan_start + self.begin_step, self.plan_start + 1)
        return [s for s in range(start, min(last_step, self.end_step) + 1) if self.is_update_step(s)]


def drop_fraction_at(step, drop_fraction, end_step, decay="cosine"):
    if step > end_step:
        return 0.0
    t = step / end_step
    if decay == "cosine":
        return drop_fraction / 2.0 * (1.0 + math.cos(math.pi * t))
    if decay == "linear":
        return drop_fraction * (1.0 - t)
    if decay == "constant":
        return drop_fraction
    raise ValueError(f"Unknown decay {decay!r}; use one of {', '.join(DECAYS)}.")


def validate(update_freq, drop_fraction, decay, begin_step, end_step=None):
    """Check the schedule arguments; returns them as plain Python values."""
    update_freq = validation.check_int("update_freq", update_freq, 1, hint=" (optimizer steps between mask updates)")
    if not callable(drop_fraction):
        if isinstance(drop_fraction, bool) or not isinstance(drop_fraction, (int, float)) and not hasattr(drop_fraction, "dtype"):
            raise ValueError(
                f"drop_fraction must be a number in (0, 1], a callable step -> fraction or a "
                f"keras_rigl.DropFractionSchedule, got {drop_fraction!r}."
            )
        try:
            drop_fraction = float(drop_fraction)
        except (TypeError, ValueError):
            raise ValueError(f"drop_fraction must be a number in (0, 1], got {drop_fraction!r}.") from None
        if not 0.0 < drop_fraction <= 1.0:
            raise ValueError(
                f"drop_fraction must be in (0, 1] (the share of active weights moved at an update; "
                f"the paper uses 0.3), got {drop_fraction!r}."
            )
    decay = validation.check_choice("decay", decay, DECAYS)
    begin_step = validation.check_int("begin_step", begin_step, 0)
    if end_step is not None:
        end_step = validation.check_int(
            "end_step", end_step, begin_step + 1,
            hint=f" after begin_step ({begin_step}); updates run from begin_step to end_step",
        )
    return update_freq, drop_fraction, decay, begin_step, end_step
