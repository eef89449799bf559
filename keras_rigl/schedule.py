"""When masks are updated and by how much: the drop-fraction schedule.

Pure functions of the optimizer step, so that a resumed run recomputes
exactly the same schedule.
"""

from __future__ import annotations

import dataclasses
import math

DECAYS = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class UpdateSchedule:
    """Mask updates every ``update_freq`` steps in ``[begin_step, end_step]``.

    ``step`` counts optimizer steps done (``optimizer.iterations`` after the
    step), so the first possible update is after the first step.
    """

    update_freq: int
    drop_fraction: float
    end_step: int
    begin_step: int = 0
    decay: str = "cosine"

    def __post_init__(self):
        validate(self.update_freq, self.drop_fraction, self.decay, self.begin_step, self.end_step)

    def is_update_step(self, step):
        return (
            self.begin_step <= step <= self.end_step
            and step > 0
            and (step - self.begin_step) % self.update_freq == 0
        )

    def fraction(self, step):
        """Drop fraction at ``step`` (the paper's cosine decay by default)."""
        return drop_fraction_at(step, self.drop_fraction, self.end_step, self.decay)

    def update_steps(self, last_step):
        """All update steps up to ``last_step`` (inclusive)."""
        return [s for s in range(1, last_step + 1) if self.is_update_step(s)]


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
    if not isinstance(update_freq, int) or isinstance(update_freq, bool) or update_freq < 1:
        raise ValueError(f"update_freq must be an integer >= 1 (steps between mask updates), got {update_freq!r}.")
    try:
        fraction = float(drop_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"drop_fraction must be a number in (0, 1], got {drop_fraction!r}.") from None
    if not 0.0 < fraction <= 1.0:
        raise ValueError(
            f"drop_fraction must be in (0, 1] (the share of active weights moved at an update; "
            f"the paper uses 0.3), got {drop_fraction!r}."
        )
    if decay not in DECAYS:
        raise ValueError(f"Unknown decay {decay!r}; use one of {', '.join(DECAYS)}.")
    if not isinstance(begin_step, int) or begin_step < 0:
        raise ValueError(f"begin_step must be an integer >= 0, got {begin_step!r}.")
    if end_step is not None and (not isinstance(end_step, int) or end_step <= begin_step):
        raise ValueError(
            f"end_step ({end_step!r}) must be an integer after begin_step ({begin_step}); updates "
            "run from begin_step to end_step."
        )
