"""The drop-and-grow update as pure functions over (weight, mask, scores).

Nothing here knows about callbacks or ``model.fit``: a custom training loop
can call :func:`drop_and_grow` directly (see README, "Custom training loop").

Written in NumPy on purpose: the update runs eagerly once every ΔT steps,
and as eager ``keras.ops`` it cost about 20 ms per weight on a small CNN
(dozens of tiny op dispatches), against well under a millisecond here. NumPy
works with every Keras backend; tensors and variables are converted with
``keras.ops.convert_to_numpy`` on the way in.

One update of one masked weight with ``n_active`` active connections and
drop fraction ``f``:

1. ``k = floor(f * n_active)``.
2. Keep the ``n_active - k`` active connections with the largest |w|
   (drop the ``k`` smallest).
3. Grow the ``k`` connections with the largest grow score among all that
   are not kept (so a just-dropped connection may come straight back).
4. The active count is unchanged.

Ties are broken through a random permutation drawn from a seed, never by
index order alone, so that e.g. all-zero gradients do not always grow the
first rows of a matrix.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from keras import ops


@dataclasses.dataclass
class UpdateResult:
    new_mask: np.ndarray  # same shape as the weight, dtype of the mask
    grown: np.ndarray  # bool: connections that are new and must be initialised
    removed: np.ndarray  # bool: connections active before and inactive now
    n_moved: int  # connections that became active (= newly grown, not regrown)
    n_active: int
    n_dropped: int = 0  # k = floor(drop_fraction * n_active): connections dropped (some may regrow)


def _to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x)) if not isinstance(x, np.ndarray) else x


def _top_k_flat(scores, k, permutation):
    """Indices of the k largest scores; ties resolved through ``permutation``."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= scores.size:
        return np.arange(scores.size)
    permuted = -scores[permutation]
    return permutation[np.argpartition(permuted, k - 1)[:k]]


def drop_and_grow(weight, mask, grow_scores, drop_fraction, seed=0, reinit_regrown=False, drop_scores=None):
    """One RigL/SET-style update of one masked weight.

    Args:
        weight: the weight (array, tensor or variable; masked entries may hold anything).
        mask: 0/1 array of the same shape.
        grow_scores: array of the same shape; larger = grow first
            (|dense gradient| for RigL, random for SET). NaN/inf count as 0.
        drop_fraction: fraction of the active connections to move.
        seed: int, for the tie-breaking permutation.
        reinit_regrown: treat a connection dropped and regrown in the same
            update as new (SET) instead of keeping its weight (RigL).
        drop_scores: array of the same shape; larger = keep first, the
            smallest active ones are dropped. ``None`` (the paper): |weight|.
            NaN counts as 0, +-inf as the largest/smallest finite number.

    Returns:
        :class:`UpdateResult` with NumPy arrays.
    """
    w = _to_numpy(weight)
    m = _to_numpy(mask)
    shape, size = m.shape, m.size
    active = m.reshape(-1) > 0
    n_active = int(active.sum())
    k = int(np.floor(float(drop_fraction) * n_active))
    permutation = np.random.default_rng(seed).permutation(size)

    if drop_scores is None:
        keep_scores = np.abs(w.reshape(-1).astype(np.float64))
    else:
        keep_scores = _to_numpy(drop_scores).astype(np.float64)
        if keep_scores.shape != shape:
            raise ValueError(f"drop_scores has shape {keep_scores.shape}; it must have the mask's shape {shape}.")
        keep_scores = keep_scores.reshape(-1)
        # NaN counts as 0; -inf must still rank above the inactive entries' -inf
        keep_scores = np.nan_to_num(keep_scores, nan=0.0)
    keep_scores = np.where(active, keep_scores, -np.inf)
    keep = np.zeros(size, dtype=bool)
    keep[_top_k_flat(keep_scores, n_active - k, permutation)] = True
    scores = _to_numpy(grow_scores).reshape(-1).astype(np.float64)
    scores = np.where(np.isfinite(scores), scores, 0.0)  # a NaN never wins
    grow = np.zeros(size, dtype=bool)
    grow[_top_k_flat(np.where(keep, -np.inf, scores), k, permutation)] = True

    new_active = keep | grow
    was = keep if reinit_regrown else active
    return UpdateResult(
        new_mask=new_active.reshape(shape).astype(m.dtype),
        grown=(grow & ~was).reshape(shape),
        removed=(active & ~new_active).reshape(shape),
        n_moved=int((grow & ~active).sum()),
        n_active=n_active,
        n_dropped=k,
    )


def apply_update(weight_variable, mask_variable, result, grow_values=None):
    """Write an :class:`UpdateResult` into the variables.

    Grown connections get ``grow_values`` (zeros by default, as in the
    paper), removed ones 0; the rest keep their weight.
    """
    w = _to_numpy(weight_variable)
    init = 0.0 if grow_values is None else _to_numpy(grow_values)
    w = np.where(result.grown, init, w) * result.new_mask.astype(w.dtype)
    weight_variable.assign(w.astype(w.dtype))
    mask_variable.assign(result.new_mask.astype(_to_numpy(mask_variable).dtype))


def random_scores(shape, seed):
    """Uniform random grow scores (SET)."""
    return np.random.default_rng(seed).random(tuple(int(d) for d in shape), dtype=np.float32)
