"""Find and reset the optimizer state (slots) that belongs to one weight.

Keras 3 optimizers keep per-variable state in lists aligned with their
trainable variables (``SGD.momentums``, Adam's moments, RMSprop's
velocities, Adagrad's accumulators, Lion's momentums, the EMA of
``use_ema``, gradient accumulators...). :func:`keras_rigl._compat.optimizer_slot_lists`
finds every such list, so new optimizers with the same layout work too.
The public ``optimizer.variables`` is the check: only state Keras lists
there is reset, and state of the weight listed there that no aligned list
holds, or state of another shape (Adafactor's factored moments), cannot be
reset connection by connection: that is a one-line error naming
``reset_optimizer_state=False``.

Reset means "as a freshly created slot" for the new connection: 0, except

* accumulators created with ``initial_accumulator_value`` (Adagrad, Ftrl):
  that value;
* the moving average of the weights kept with ``use_ema=True``
  (:data:`FOLLOW_WEIGHT`): the weight's new value, i.e. 0 for a dropped
  connection and for one grown at 0 (``grow_init="zeros"``), the drawn value
  for ``grow_init="random"``. The average of a grown connection then starts
  where the connection starts instead of averaging its old, dropped life.
"""

from __future__ import annotations

import numpy as np
from keras import ops

from keras_rigl import _compat

#: reset value meaning "the weight's current (new) value" (the ``use_ema`` average)
FOLLOW_WEIGHT = "weight"

_EMA_LISTS = ("_model_variables_moving_average",)
_ACCUMULATOR_LISTS = ("_accumulators",)


def unwrap(optimizer):
    while hasattr(optimizer, "inner_optimizer"):  # LossScaleOptimizer
        optimizer = optimizer.inner_optimizer
    return optimizer


def _state_prefix(variable):
    # Keras names a slot made by add_variable_from_reference "<path with _>_<kind>".
    return variable.path.replace("/", "_") + "_"


def slot_variables(optimizer, variable):
    """``[(slot_variable, reset_value)]`` of ``variable`` in ``optimizer``.

    ``reset_value`` is a float, or :data:`FOLLOW_WEIGHT` for state that must
    take the weight's new value. Empty when the optimizer is not built yet or
    does not update ``variable``.
    """
    opt = unwrap(optimizer)
    if opt is None or not getattr(opt, "built", False):
        return []
    index = _compat.optimizer_variable_index(opt, variable)
    if index is None:
        return []
    public = {id(v) for v in opt.variables}
    slots = []
    slot_lists = _compat.optimizer_slot_lists(opt)
    for name, values in slot_lists:
        slot = values[index]
        if slot is None or slot is variable or id(slot) not in public:
            continue  # placeholders (Adafactor's scalars for 1-D weights) are not state Keras lists
        if tuple(slot.shape) != tuple(variable.shape):
            if len(slot.shape) == 0:
                continue
            raise NotImplementedError(
                f"{type(opt).__name__} keeps state {name!r} of shape {tuple(slot.shape)} for weight {variable.path!r} "
                f"of shape {tuple(variable.shape)} (factored), which cannot be reset connection by connection: use "
                "SGD, Adam/AdamW/Adamax/Nadam, RMSprop, Adagrad or Lion, or pass reset_optimizer_state=False."
            )
        reset_value = 0.0
        if name in _EMA_LISTS:
            reset_value = FOLLOW_WEIGHT
        elif name in _ACCUMULATOR_LISTS and hasattr(opt, "initial_accumulator_value"):
            reset_value = float(opt.initial_accumulator_value)
        slots.append((slot, reset_value))
    # State named after this weight that no aligned list holds would be left stale.
    aligned = {id(v) for _, values in slot_lists for v in values if v is not None}
    prefix = _state_prefix(variable)
    unknown = [v.name for v in opt.variables if v.name.startswith(prefix) and id(v) not in aligned]
    if unknown:
        raise NotImplementedError(
            f"{type(opt).__name__} keeps state {unknown} for weight {variable.path!r} that keras_rigl does not know "
            "how to reset connection by connection; pass reset_optimizer_state=False."
        )
    return slots


def reset_slots(optimizer, variable, positions):
    """Reset the optimizer state of ``variable`` where ``positions`` is True.

    Call after the weight has its new value (the ``use_ema`` average follows it).
    """
    positions = np.asarray(positions, dtype=bool)
    if not positions.any():
        return
    weight = None
    for slot, value in slot_variables(optimizer, variable):
        current = np.asarray(ops.convert_to_numpy(slot))
        if isinstance(value, str):  # FOLLOW_WEIGHT
            if weight is None:
                weight = np.asarray(ops.convert_to_numpy(variable))
            new = weight.astype(current.dtype)
        else:
            new = np.asarray(value, current.dtype)
        slot.assign(np.where(positions, new, current))
