"""The drop-and-grow update as pure functions over (weight, mask, scores).

Nothing here knows about callbacks or ``model.fit``: a custom training loop
can call :func:`drop_and_grow` directly (see README, "Custom training loop").
Written with ``keras.ops`` so it runs on any backend.

One update of one masked weight with ``n_active`` active connections and
drop fraction ``f``:

1. ``k = floor(f * n_active)``.
2. Keep the ``n_active - k`` active connections with the largest |w|
   (drop the ``k`` smallest).
3. Grow the ``k`` connections with the largest grow score among all that
   are not kept (so a just-dropped connection may come straight back).
4. The active count is unchanged.

Ties are broken by a random permutation drawn from a seed, never by index
order alone, so that e.g. all-zero gradients do not always grow the first
rows of a matrix.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from keras import ops


@dataclasses.dataclass
class UpdateResult:
    new_mask: object  # same shape as the weight, dtype of the mask
    grown: object  # bool: connections that are new and must be initialised
    removed: object  # bool: connections active before and inactive now
    n_moved: int  # connections that changed (= count of grown)
    n_active: int


def _top_k_flat(scores, k, permutation):
    """Indices of the k largest scores; ties follow ``permutation`` order."""
    if k <= 0:
        return ops.zeros((0,), dtype="int32")
    permuted = ops.take(scores, permutation)
    _, idx = ops.top_k(permuted, k, sorted=False)
    return ops.take(permutation, idx)


def _indicator(indices, size):
    updates = ops.ones(ops.shape(indices), dtype="bool")
    return ops.scatter(ops.expand_dims(indices, -1), updates, (size,))


def drop_and_grow(weight, mask, grow_scores, drop_fraction, seed=0, reinit_regrown=False):
    """One RigL/SET-style update of one masked weight.

    Args:
        weight: the weight tensor (masked entries may hold anything).
        mask: 0/1 tensor of the same shape.
        grow_scores: tensor of the same shape; larger = grow first
            (|dense gradient| for RigL, random for SET).
        drop_fraction: fraction of the active connections to move.
        seed: int, for the tie-breaking permutation.
        reinit_regrown: treat a connection dropped and regrown in the same
            update as new (SET) instead of keeping its weight (RigL).

    Returns:
        :class:`UpdateResult`.
    """
    shape = ops.shape(weight)
    size = int(np.prod(shape))
    flat_w = ops.reshape(ops.convert_to_tensor(weight), (size,))
    flat_m = ops.reshape(ops.convert_to_tensor(mask), (size,))
    active = ops.greater(flat_m, 0)
    n_active = int(ops.convert_to_numpy(ops.sum(ops.cast(active, "int32"))))
    k = int(np.floor(float(drop_fraction) * n_active))
    permutation = ops.convert_to_tensor(np.random.default_rng(seed).permutation(size).astype("int32"))
    neg_inf = ops.full((size,), -np.inf, dtype="float32")

    drop_scores = ops.where(active, ops.abs(ops.cast(flat_w, "float32")), neg_inf)
    keep = _indicator(_top_k_flat(drop_scores, n_active - k, permutation), size)
    scores = ops.cast(ops.reshape(ops.convert_to_tensor(grow_scores), (size,)), "float32")
    scores = ops.where(ops.isfinite(scores), scores, ops.zeros_like(scores))  # a NaN never wins
    grow_candidates = ops.where(keep, neg_inf, scores)
    grow = _indicator(_top_k_flat(grow_candidates, k, permutation), size)

    new_active = ops.logical_or(keep, grow)
    was = keep if reinit_regrown else active
    grown = ops.logical_and(grow, ops.logical_not(was))
    removed = ops.logical_and(active, ops.logical_not(new_active))
    n_moved = int(ops.convert_to_numpy(ops.sum(ops.cast(ops.logical_and(grow, ops.logical_not(active)), "int32"))))
    return UpdateResult(
        new_mask=ops.reshape(ops.cast(new_active, ops.dtype(mask)), shape),
        grown=ops.reshape(grown, shape),
        removed=ops.reshape(removed, shape),
        n_moved=n_moved,
        n_active=n_active,
    )


def apply_update(weight_variable, mask_variable, result, grow_values=None):
    """Write an :class:`UpdateResult` into the variables.

    Grown connections get ``grow_values`` (zeros by default, as in the
    paper), removed ones 0; the rest keep their weight.
    """
    w = ops.convert_to_tensor(weight_variable)
    init = ops.zeros_like(w) if grow_values is None else ops.cast(grow_values, w.dtype)
    w = ops.where(result.grown, init, w)
    w = w * ops.cast(result.new_mask, w.dtype)
    weight_variable.assign(w)
    mask_variable.assign(ops.cast(result.new_mask, mask_variable.dtype))


def random_scores(shape, seed):
    """Uniform random grow scores (SET)."""
    return np.random.default_rng(seed).random(tuple(int(d) for d in shape), dtype=np.float32)


