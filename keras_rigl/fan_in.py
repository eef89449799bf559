"""Constant fan-in sparsity with neuron ablation (SRigL), as pure NumPy functions.

SRigL (Lasby et al., "Dynamic Sparse Training with Structured Sparsity",
ICLR 2024; reference code calgaryml/condensed-sparsity,
``rigl_torch/rigl_constant_fan.py``) keeps every output unit of a sparse
layer at the same number of active inputs, which a dense kernel over the
"condensed" weights can run fast, and ablates units that have too few
salient weights, giving their connections to the others.

Layout: the last axis of a weight is the output unit (a Dense column, a
convolution's output channel); the unit's fan-in is its count of active
entries over all other axes (``dense_fan_in(shape)`` possible).

The counting rule (all functions below keep it):

* The layer's **budget** ``B`` is a multiple of its units (the structure's
  ``unit``): ``sparsify`` / ``initialize_masks`` count every layer in whole
  units (:func:`keras_rigl.distributions.active_counts`: the model total is
  the achievable total nearest to the target); :func:`fan_in_count` rounds a
  single count to the nearest multiple (at least one input per unit).
* With ``alive`` units not ablated, each has fan-in ``F = B // alive`` and
  the layer holds ``alive * F`` active weights: exactly ``B`` when nothing
  is ablated, and at most ``alive - 1`` fewer after an ablation (SRigL's
  rule: the budget's remainder is not spread, so fan-in stays constant).
* ``B`` is never stored: it is ``units * ceil(active / units)``
  (:func:`budget`), because ``alive * (B // alive)`` lies in ``(B - units, B]``.

One update (:func:`drop_and_grow`, following SRigL's ``_rigl_step``) with
``C`` active weights and drop fraction ``f``:

1. ``n_prune = floor(f * C)``, ``n_keep = C - n_prune``.
2. Saliency: an entry is salient if it is among the ``n_keep`` active ones
   with the largest drop score (|w|), or among the ``n_prune`` entries with
   the largest grow score (|dense gradient| for RigL), active or not.
3. Ablation (``ablation_threshold`` gamma_sal > 0): a unit with fewer than
   ``max(1, int(gamma_sal * (B // units)))`` salient entries is ablated (all
   its inputs masked off). The threshold is lowered, as in SRigL, so that at
   least ``B // dense_fan_in + 1`` units stay (their fan-in must fit), and
   an ablated unit whose salient count reaches it again comes back.
4. ``F = B // alive``. Keep the ``n_keep`` active entries of living units
   with the largest drop score (over the whole layer), at most ``F`` per
   unit (the largest); each living unit then grows its missing ``F - kept``
   entries by the largest grow score among its entries not kept.

Ties are broken by the same hashes as :mod:`keras_rigl.updates`, so a
selection is a pure function of the scores and the seed.
"""

from __future__ import annotations

import dataclasses
import math
import re

import keras
import numpy as np

from keras_rigl import structure as structures
from keras_rigl import updates, validation

DEFAULT_ABLATION_THRESHOLD = 0.3  # SRigL's gamma_sal (configs/config.yaml: min_salient_weights_per_neuron)
STREAM_ABLATE = 0x03707344  # tie-break stream of the unit target's ranking (next hex digits of pi)


@dataclasses.dataclass
class FanInUpdateResult(updates.UpdateResult):
    """:class:`keras_rigl.updates.UpdateResult` plus which units are ablated after the update.

    ``n_active`` is the count after the update (``alive * fan_in``).
    """

    ablated: np.ndarray = None  # bool per unit (last axis)
    fan_in: int = 0  # the fan-in of every living unit


def check_shape(shape):
    """A weight with output units on its last axis and at least one input axis, or a one-line ValueError."""
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(
            f"The 'fan_in' structure needs a weight of rank >= 2 with the output units on the last axis, got "
            f"shape {shape}; exclude this layer (sparsify(..., exclude=[...])) or use structure=None for it."
        )
    return shape


def units_of(shape):
    return int(shape[-1])


def dense_fan_in(shape):
    """Inputs of one output unit when dense: the product of all axes but the last."""
    return int(np.prod(shape[:-1]))


def fan_in_count(shape, n_active):
    """The layer's budget for a distribution's ``n_active``: the nearest multiple of its units (>= 1 per unit, <= dense)."""
    shape = check_shape(shape)
    units = units_of(shape)
    per_unit = int(math.floor(int(n_active) / units + 0.5))
    return units * min(dense_fan_in(shape), max(1, per_unit))


def budget(shape, n_active):
    """The budget ``B`` of a layer that holds ``n_active`` under the rule: ``units * ceil(n_active / units)``."""
    units = units_of(shape)
    return units * (-(-int(n_active) // units))


def unit_counts(mask):
    """Active inputs of every output unit."""
    mask = np.asarray(mask)
    return np.count_nonzero(mask.reshape(-1, mask.shape[-1]), axis=0)


def holds(mask):
    """Whether ``mask`` keeps the rule: every living unit has fan-in ``B // alive`` and the rest none."""
    mask = np.asarray(mask)
    if mask.ndim < 2:
        return False
    counts = unit_counts(mask)
    alive = int(np.count_nonzero(counts))
    if alive == 0:
        return True  # an empty weight (a count of 0): nothing to keep constant
    fan_in = budget(mask.shape, counts.sum()) // alive
    return bool(np.all((counts == 0) | (counts == fan_in)) and fan_in <= dense_fan_in(mask.shape))


def ablated_units(mask):
    """Units with no active input (bool per unit): the ones :func:`keras_rigl.condense` removes."""
    return unit_counts(mask) == 0


def initial_mask(shape, n_active, rng, scores=None):
    """A bool mask with ``n_active // units`` active inputs in every unit (``n_active`` a multiple of the units).

    ``rng``: a NumPy Generator (uniformly random inputs per unit); ``scores``
    (optional, same shape): the largest |score| of every unit first, ties at
    random (``mask_init="magnitude"``).
    """
    shape = check_shape(shape)
    units = units_of(shape)
    n_active = int(n_active)
    if n_active % units or not 0 <= n_active <= int(np.prod(shape)):
        raise ValueError(
            f"The 'fan_in' structure needs an active count that is a multiple of the {units} units and at most "
            f"{int(np.prod(shape))} (shape {shape}), got {n_active}; use fan_in_count(shape, n) to round one."
        )
    tie = rng.random(int(np.prod(shape))).reshape(-1, units)
    primary = np.zeros_like(tie) if scores is None else np.abs(np.asarray(scores, np.float64)).reshape(-1, units)
    order = np.lexsort((tie, primary), axis=0)[::-1]  # per unit: largest score first, ties by the draw
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(order.shape[0])[:, None], axis=0)
    return (ranks < n_active // units).reshape(shape)


def _top_per_unit(keys, counts):
    """Bool (inputs, units): in column u the ``counts[u]`` largest keys (never an ``EXCLUDED`` one)."""
    order = np.argsort(keys, axis=0, kind="stable")[::-1]  # descending per column; keys are distinct
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(keys.shape[0])[:, None], axis=0)
    chosen = ranks < np.asarray(counts)[None, :]
    if np.any(chosen & (keys == updates.EXCLUDED)):
        raise AssertionError("a unit was asked for more entries than it has candidates")  # pragma: no cover
    return chosen


def salient_counts(keep_keys, grow_keys, active, n_keep, n_prune, units):
    """SRigL's saliency: per unit, entries among the ``n_keep`` kept by drop score or the ``n_prune`` best grow scores."""
    salient = updates._largest(np.where(active, keep_keys, updates.EXCLUDED), n_keep)
    salient |= updates._largest(grow_keys, n_prune)
    return np.count_nonzero(salient.reshape(-1, units), axis=0)


def units_to_ablate(unit_sparsity, progress, units):
    """Units a unit target wants ablated at an update ``progress`` (0..1) through the update plan.

    ``round(unit_sparsity * units * (1 - (1 - progress)^3))``: the cubic ramp of
    gradual pruning (Zhu & Gupta 2017), which Chase (Yin et al. 2023) uses for
    its channels; ``progress`` None (an update outside a plan) is the target.
    """
    if not unit_sparsity:
        return 0
    p = 1.0 if progress is None else min(1.0, max(0.0, float(progress)))
    return int(math.floor(float(unit_sparsity) * units * (1.0 - (1.0 - p) ** 3) + 0.5))


def ablation_decision(counts, threshold_fraction, budget_, dense_fan_in_, n_required=0, ablate_first=None):
    """Bool per unit: ablated, keeping enough units alive to hold the budget.

    SRigL's rule: fewer salient entries (``counts``) than its threshold. Under a
    unit target (``ablate_first`` given: a key per unit, ``updates.EXCLUDED`` for
    units ablated already), ablated units stay so and more are ablated,
    smallest key first, until ``n_required`` are.
    """
    units = counts.size
    min_units = budget_ // dense_fan_in_  # SRigL's min_neurons: one more than this must stay
    if min_units >= units:
        return np.zeros(units, dtype=bool)  # the budget needs every unit at full fan-in
    ablated = np.zeros(units, dtype=bool)
    if threshold_fraction != 0:
        threshold = max(1, int(threshold_fraction * (budget_ // units)))
        floor = int(np.sort(counts)[::-1][min_units])
        ablated = counts < min(threshold, floor)
    if ablate_first is not None:
        before = ablate_first == updates.EXCLUDED
        ablated |= before
        spare = units - min_units - 1
        # SRigL's rule on top of the units ablated before can leave too few: revive its most salient ones
        revive = [u for u in np.argsort(-counts, kind="stable") if ablated[u] and not before[u]]
        ablated[revive[: max(0, int(ablated.sum()) - spare)]] = False
        order = [u for u in np.argsort(ablate_first, kind="stable") if not ablated[u]]
        ablated[order[: max(0, min(n_required, spare) - int(ablated.sum()))]] = True
    return ablated


def drop_and_grow(
    weight,
    mask,
    grow_scores,
    drop_fraction,
    seed=0,
    reinit_regrown=False,
    drop_scores=None,
    ablation_threshold=DEFAULT_ABLATION_THRESHOLD,
    unit_sparsity=0.0,
    progress=None,
):
    """One SRigL update of one masked weight (see the module docstring).

    Arguments as :func:`keras_rigl.updates.drop_and_grow`, plus
    ``ablation_threshold`` (SRigL's gamma_sal, a fraction of the layer's
    constant fan-in; 0 turns ablation off), ``unit_sparsity`` (a target
    share of ablated units, reached by :func:`units_to_ablate` over the
    plan's ``progress``: Chase's channel sparsity) and ``progress``. The mask
    must hold the rule (:func:`holds`), as :func:`initial_mask` and every
    update leave it.

    Returns:
        :class:`FanInUpdateResult`.
    """
    w = updates._to_numpy(weight)
    m = updates._to_numpy(mask)
    shape = check_shape(m.shape)
    if not holds(m):
        counts = unit_counts(m)
        raise ValueError(
            f"The mask does not have constant fan-in (per-unit counts {np.unique(counts).tolist()[:6]}); draw it "
            "with keras_rigl.fan_in.initial_mask (sparsify(..., structure='fan_in')) before updating."
        )
    size, units, full = m.size, units_of(shape), dense_fan_in(shape)
    active = m.reshape(-1) > 0
    n_active = int(active.sum())
    budget_ = budget(shape, n_active)
    n_prune = int(np.floor(float(drop_fraction) * n_active))
    n_keep = n_active - n_prune

    if drop_scores is None:
        keep_scores, infinity = np.abs(w.reshape(-1)), "zero"
    else:
        keep_scores = updates._to_numpy(drop_scores)
        if keep_scores.shape != shape:
            raise ValueError(f"drop_scores has shape {keep_scores.shape}; it must have the mask's shape {shape}.")
        keep_scores, infinity = keep_scores.reshape(-1), "clip"
    drop_keys = updates.order_keys(keep_scores, updates.element_hashes(size, updates.stream_key(seed, updates.STREAM_DROP)), infinity)
    grow_keys = updates.order_keys(
        updates._to_numpy(grow_scores).reshape(-1),
        updates.element_hashes(size, updates.stream_key(seed, updates.STREAM_GROW)),
    )

    counts = salient_counts(drop_keys, grow_keys, active, n_keep, n_prune, units)
    n_required = units_to_ablate(unit_sparsity, progress, units)
    ablate_first = None
    if unit_sparsity:
        # Chase's channel score: the |w| a unit holds (the sum of its drop scores; every living unit has the
        # same fan-in, so this orders as their mean); ablated units first (they stay so), ties by hash
        held = np.where(active, updates.sanitize_scores(keep_scores, infinity), 0).astype(np.float64)
        held = held.reshape(-1, units).sum(axis=0)
        held = np.clip(held, -updates.FLOAT32_MAX, updates.FLOAT32_MAX).astype(np.float32)
        keys = updates.order_keys(held, updates.element_hashes(units, updates.stream_key(seed, STREAM_ABLATE)))
        ablate_first = np.where(unit_counts(m) == 0, updates.EXCLUDED, keys)
    ablated = ablation_decision(counts, float(ablation_threshold), budget_, full, n_required, ablate_first)
    alive = units - int(ablated.sum())
    fan_in = budget_ // alive

    living = ~np.broadcast_to(ablated, (size // units, units)).reshape(-1)
    candidates = active & living
    keep = updates._largest(np.where(candidates, drop_keys, updates.EXCLUDED), min(n_keep, int(candidates.sum())))
    keep = _top_per_unit(np.where(keep, drop_keys, updates.EXCLUDED).reshape(-1, units),
                         np.minimum(np.count_nonzero(keep.reshape(-1, units), axis=0), fan_in)).reshape(-1)
    missing = np.where(ablated, 0, fan_in - np.count_nonzero(keep.reshape(-1, units), axis=0))
    grow = _top_per_unit(np.where(keep, updates.EXCLUDED, grow_keys).reshape(-1, units), missing).reshape(-1)

    new_active = keep | grow
    was = keep if reinit_regrown else active
    return FanInUpdateResult(
        new_mask=new_active.reshape(shape).astype(m.dtype),
        grown=(grow & ~was).reshape(shape),
        removed=(active & ~new_active).reshape(shape),
        n_moved=int((grow & ~active).sum()),
        n_active=int(new_active.sum()),
        n_dropped=n_active - int(keep.sum()),
        ablated=ablated,
        fan_in=int(fan_in),
    )


# ------------------------------------------------------------ the structure
_NUMBER = r"\d*\.?\d+"


def _parse(spec):
    """``fan_in``, ``fan_in(0.5)``, ``fan_in(unit_sparsity=0.5)``, ``fan_in(0.5,unit_sparsity=0.5)`` (spaces removed)."""
    found = re.fullmatch(rf"fan_in(?:\(({_NUMBER})?(?:,?unit_sparsity=({_NUMBER}))?\))?", spec)
    if found is None or spec.endswith("()"):
        return None
    arguments = {}
    if found.group(1) is not None:
        arguments["ablation_threshold"] = float(found.group(1))
    if found.group(2) is not None:
        arguments["unit_sparsity"] = float(found.group(2))
    return arguments


@keras.saving.register_keras_serializable(package="keras_rigl")
class FanIn(structures.Structure):
    """``"fan_in"``: every output unit has the same number of active inputs, with SRigL's neuron ablation.

    Args:
        ablation_threshold: SRigL's gamma_sal, in [0, 1]: a unit with fewer
            salient weights than this fraction of the layer's constant fan-in
            is ablated at an update (its inputs masked off, its budget given to
            the other units); 0 turns ablation off. Default 0.3, SRigL's.
            :func:`keras_rigl.sparsify` turns it off in layers whose units are
            model outputs (SRigL never ablates its last layer).

        unit_sparsity: a share of the units of every layer to ablate by the
            end of the update plan, in [0, 1): Chase's channel sparsity (Yin et
            al., NeurIPS 2023), so that :func:`keras_rigl.condense` gives a
            model that is physically that much narrower. Reached gradually
            (:func:`units_to_ablate`: a cubic ramp over the plan's progress)
            by ablating the living units that hold the least |w| (the sum of
            their drop scores); units ablated under a target stay ablated. The
            layer's budget goes to the living units, so the model's sparsity
            is unchanged. As many units as the budget allows (a layer whose
            living units would need more than their dense fan-in keeps more);
            never at the model's outputs. Default 0 (SRigL's rule alone).

    ``"fan_in"`` is this with the defaults; ``"fan_in(0.5)"`` sets the threshold,
    ``"fan_in(unit_sparsity=0.5)"`` the unit target (``"fan_in(0.3,unit_sparsity=0.5)"`` both).
    See the module docstring for the counting rule: the layer's count is a
    multiple of its units, and after an ablation the living units share the
    budget (``alive * (B // alive)`` active).
    """

    name = "fan_in"

    def __init__(self, ablation_threshold=DEFAULT_ABLATION_THRESHOLD, unit_sparsity=0.0):
        self.ablation_threshold = validation.check_number(
            "ablation_threshold", ablation_threshold, 0.0, 1.0,
            hint=" (SRigL's gamma_sal: a fraction of the fan-in; 0 turns neuron ablation off)",
        )
        self.unit_sparsity = validation.check_number(
            "unit_sparsity", unit_sparsity, 0.0, 1.0, high_open=True,
            hint=" (the share of each layer's units to ablate; 0 leaves it to SRigL's threshold)",
        )

    @property
    def spec(self):
        arguments = []
        if self.ablation_threshold != DEFAULT_ABLATION_THRESHOLD:
            arguments.append(f"{self.ablation_threshold:g}")
        if self.unit_sparsity:
            arguments.append(f"unit_sparsity={self.unit_sparsity:g}")
        return f"fan_in({','.join(arguments)})" if arguments else "fan_in"

    def get_config(self):
        return {"ablation_threshold": self.ablation_threshold, "unit_sparsity": self.unit_sparsity}

    def at_model_output(self):
        return FanIn(ablation_threshold=0.0, unit_sparsity=0.0)

    def check_shape(self, shape, path="weight"):
        self._check_kernel_shape(shape, path)

    def unit(self, shape):
        return units_of(shape)

    def initial_mask(self, shape, n_active, rng, scores=None):
        self.check_shape(shape)
        return initial_mask(shape, self.check_count(shape, n_active), rng, scores)

    def holds(self, mask):
        return holds(mask)

    def drop_and_grow(self, weight, mask, grow_scores, drop_fraction, seed=0, reinit_regrown=False,
                      drop_scores=None, progress=None):
        return drop_and_grow(weight, mask, grow_scores, drop_fraction, seed=seed, reinit_regrown=reinit_regrown,
                             drop_scores=drop_scores, ablation_threshold=self.ablation_threshold,
                             unit_sparsity=self.unit_sparsity, progress=progress)


structures.register_structure("fan_in", FanIn)  # listed by name in structure.get's error
structures.register_structure(_parse, FanIn)  # "fan_in(0.5)", "fan_in(unit_sparsity=0.5)"
