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

Ties are broken by a counter-based hash of (seed, flat index), never by
index order alone, so that e.g. all-zero gradients do not always grow the
first rows of a matrix. Every selection ranks by the 64-bit key
``(order bits of the float32 score) * 2**32 + hash32(index ^ stream key)``:
the hash is a bijection of the index, so no two entries ever share a key and
the selected set is unique. The same integer operations run in NumPy here and
on the device in :mod:`keras_rigl.compiled_update`, which makes the two paths
select bit-identical masks for the same scores and seed, without drawing a
permutation of every layer on the host. Scores are compared in float32 (the
dtype of the weights and gradients the device path ranks); NaN counts as 0,
and so does +-inf in grow scores and |w| (a ``drop_scores`` hook's +-inf
ranks as +-float32 max).

SET's random grow scores come from the same hash (:func:`random_scores`), so
the device path draws the very numbers this module draws.
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


@dataclasses.dataclass
class UpdateCounts:
    """What the logs need of one weight's update when it ran compiled (no arrays come back)."""

    n_active: int
    n_dropped: int
    n_moved: int
    n_ever_active: int  # entries active at some point so far (ITOP)


def _to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x)) if not isinstance(x, np.ndarray) else x


# --------------------------------------------------------------- tie-break hash
# lowbias32 (C. Wellons' integer hash): a bijection of uint32 with good
# avalanche, three xor-shifts and two multiplies that wrap modulo 2**32 in
# NumPy, TensorFlow, XLA and JAX alike.
HASH_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
# One stream per use, so that the drop and grow tie-breaks and SET's random
# scores of one update are unrelated (hex digits of pi).
STREAM_DROP, STREAM_GROW, STREAM_RANDOM = 0x243F6A88, 0x85A308D3, 0x13198A2E
EXCLUDED = np.iinfo(np.int64).min  # key of an entry that may not be selected


def hash32(x):
    """lowbias32 of a uint32 array (wrapping arithmetic); a bijection."""
    x = np.array(x, dtype=np.uint32, ndmin=1)  # arrays wrap silently, NumPy scalars warn
    x ^= x >> np.uint32(16)
    x *= np.uint32(HASH_MULTIPLIERS[0])
    x ^= x >> np.uint32(15)
    x *= np.uint32(HASH_MULTIPLIERS[1])
    x ^= x >> np.uint32(16)
    return x


def seed_key(seed):
    """32-bit key of a non-negative integer seed (all 64 low bits count)."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}.")
    low, high = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    return int(hash32(hash32(low)[0] ^ np.uint32(high))[0])


def stream_key(seed, stream):
    """Key of one use (``STREAM_*``) of ``seed``."""
    return int(hash32(np.uint32(seed_key(seed)) ^ np.uint32(stream))[0])


def element_hashes(size, key):
    """``hash32(index ^ key)`` for every flat index: distinct for distinct indices."""
    if size > 2**32:
        raise ValueError(f"A weight of {size} entries is too large for 32-bit tie-break hashes.")
    return hash32(np.arange(size, dtype=np.uint32) ^ np.uint32(key))


def update_seed(seed, step, index):
    """Seed of the update of masked weight ``index`` (1-based) at ``step``: a pure function of the three."""
    return int(hash32(hash32(hash32(seed_key(seed)) ^ np.uint32(int(step) & 0xFFFFFFFF))[0] ^ np.uint32(index))[0])


FLOAT32_MAX = float(np.finfo(np.float32).max)


def sanitize_scores(scores, infinity="zero"):
    """float32 scores, one bit pattern per value: NaN -> 0, -0.0 -> +0.0, and +-inf -> 0
    (``infinity="zero"``: grow scores, |w|) or -> +-float32 max (``"clip"``: a ``drop_scores`` hook's)."""
    scores = np.asarray(scores, dtype=np.float32)
    if infinity == "clip":
        scores = np.clip(scores, -FLOAT32_MAX, FLOAT32_MAX)  # NaN stays NaN, then -> 0
    return np.where(np.isfinite(scores) & (scores != 0), scores, np.float32(0)).astype(np.float32)


def order_keys(scores, hashes, infinity="zero"):
    """int64 keys that order by float32 score first and by the hash among equal scores."""
    bits = sanitize_scores(scores, infinity).view(np.int32)
    ordered = bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF))  # monotone in the float value
    return ordered.astype(np.int64) * np.int64(2**32) + hashes.astype(np.int64)


def _largest(keys, m):
    """Boolean selection of the ``m`` largest keys (keys are distinct among candidates)."""
    chosen = np.zeros(keys.size, dtype=bool)
    if m > 0:
        chosen[np.argpartition(keys, keys.size - m)[keys.size - m :]] = True
    return chosen


def drop_and_grow(weight, mask, grow_scores, drop_fraction, seed=0, reinit_regrown=False, drop_scores=None):
    """One RigL/SET-style update of one masked weight.

    Args:
        weight: the weight (array, tensor or variable; masked entries may hold anything).
        mask: 0/1 array of the same shape.
        grow_scores: array of the same shape; larger = grow first
            (|dense gradient| for RigL, random for SET). NaN/inf count as 0.
        drop_fraction: fraction of the active connections to move.
        seed: non-negative int, for the tie-breaking hash.
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

    if drop_scores is None:
        keep_scores, infinity = np.abs(w.reshape(-1)), "zero"
    else:
        keep_scores = _to_numpy(drop_scores)
        if keep_scores.shape != shape:
            raise ValueError(f"drop_scores has shape {keep_scores.shape}; it must have the mask's shape {shape}.")
        keep_scores, infinity = keep_scores.reshape(-1), "clip"
    # Drop the k active entries with the smallest keys: the largest of the
    # bitwise-negated keys (~x = -x-1 reverses the order without overflow).
    drop_keys = order_keys(keep_scores, element_hashes(size, stream_key(seed, STREAM_DROP)), infinity)
    keep = active & ~_largest(np.where(active, ~drop_keys, EXCLUDED), k)
    grow_keys = order_keys(_to_numpy(grow_scores).reshape(-1), element_hashes(size, stream_key(seed, STREAM_GROW)))
    grow = _largest(np.where(keep, EXCLUDED, grow_keys), k)

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
    """Uniform random grow scores in [0, 1) (SET), from the tie-break hash.

    ``(hash32(index ^ key) >> 8) / 2**24``: exact in float32, so the device
    path (:func:`keras_rigl.compiled_update.random_scores`) draws the same numbers.
    """
    shape = tuple(int(d) for d in shape)
    size = int(np.prod(shape))
    draws = element_hashes(size, stream_key(seed, STREAM_RANDOM)) >> np.uint32(8)
    return (draws.astype(np.float32) * np.float32(2.0**-24)).reshape(shape)
