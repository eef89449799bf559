"""Find and reset the optimizer state (slots) that belongs to one weight.

Keras 3 optimizers keep per-variable state in lists aligned with their
trainable variables (``SGD.momentums``, ``Adam._momentums`` /
``_velocities``, ``RMSprop._velocities``, ``Adagrad._accumulators``,
``Lion._momentums``, the EMA of ``use_ema``...). Rather than hard-code each
optimizer we look for every such list and take the entry of our variable,
so new optimizers with the same layout work too. State with another shape
(Adafactor's factored moments) cannot be reset element-wise: that is an
error naming the fix.

Reset means "as a freshly created slot": 0, except accumulators created with
``initial_accumulator_value`` (Adagrad, Ftrl), which get that value.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops


def unwrap(optimizer):
    while hasattr(optimizer, "inner_optimizer"):  # LossScaleOptimizer
        optimizer = optimizer.inner_optimizer
    return optimizer


def slot_variables(optimizer, variable):
    """``[(slot_variable, reset_value)]`` of ``variable`` in ``optimizer``."""
    opt = unwrap(optimizer)
    if opt is None or not getattr(opt, "built", False):
        return []
    try:
        index = opt._get_variable_index(variable)
    except (KeyError, AttributeError):
        return []
    n = len(opt._trainable_variables)
    slots = []
    for name, value in vars(opt).items():
        if name in ("_trainable_variables", "_variables", "_tracker") or not isinstance(value, (list, tuple)):
            continue
        if len(value) != n or not value or not all(isinstance(v, (keras.Variable, type(None))) for v in value):
            continue
        slot = value[index]
        if slot is None or slot is variable:
            continue
        if tuple(slot.shape) != tuple(variable.shape):
            if len(slot.shape) == 0:
                continue
            raise NotImplementedError(
                f"{type(opt).__name__} keeps state {name!r} of shape {tuple(slot.shape)} for a weight of shape "
                f"{tuple(variable.shape)} (factored), which cannot be reset connection by connection. Use SGD, "
                "Adam/AdamW/Adamax/Nadam, RMSprop, Adagrad or Lion, or pass reset_optimizer_state=False."
            )
        reset_value = 0.0
        if name == "_accumulators" and hasattr(opt, "initial_accumulator_value"):
            reset_value = float(opt.initial_accumulator_value)
        slots.append((slot, reset_value))
    return slots


def reset_slots(optimizer, variable, positions):
    """Reset the optimizer state of ``variable`` where ``positions`` is True."""
    positions = np.asarray(positions, dtype=bool)
    if not positions.any():
        return
    for slot, value in slot_variables(optimizer, variable):
        current = np.asarray(ops.convert_to_numpy(slot))
        slot.assign(np.where(positions, np.asarray(value, current.dtype), current))
