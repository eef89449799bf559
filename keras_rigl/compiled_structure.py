"""The compiled update of structured weights ("1xk", "N:M"): the same masks as their NumPy update.

:class:`StructuredCompiledUpdate` is :class:`keras_rigl.compiled_update.CompiledUpdate`
for a model some of whose masked weights have a structure
(:mod:`keras_rigl.structure`). Unstructured weights go through the parent's
update unchanged; structured ones select here, with ``keras.ops`` on the
device, the very sets their ``drop_and_grow`` selects in NumPy:

* ``"1xk"`` reduces to the unstructured selection on block sums: the block
  scores are summed exactly as :func:`keras_rigl.structure._reduce` sums them
  (each entry sanitized in float32, added in float64 strictly left to right,
  clipped to the float32 range, rounded to float32), so
  :func:`keras_rigl.compiled_update.select` on the reduced tensors gives the
  reference's blocks bit for bit; the result is expanded back to entries.
  When the inputs are not a multiple of k, the whole blocks and the last,
  shorter blocks of the rows are two pools, each selected so on its own (a
  pool with every block on, or none, is left alone), as the reference does.
* ``"N:M"`` drops by the unstructured keys, then ranks the grow candidates
  of every group by pairwise comparison of their (distinct) keys (an
  ``M x M`` comparison per group, no sort), keeps the first ``N - kept`` of each
  group and takes the top k of those.

A structure this module does not know (e.g. one registered later) makes the
callbacks fall back to NumPy (:func:`supported`).

Kept out of ``compiled_update.py`` so the two can change independently; the
writes (mask, weight, optimizer slots) repeat the parent's, and
tests/test_structure.py checks the two paths against each other.
"""

from __future__ import annotations

import numpy as np
from keras import ops

from keras_rigl import compiled_update, updates
from keras_rigl import structure as _structure


def supported(structure):
    """True when this module can run ``structure``'s update compiled."""
    return type(structure) in (_structure.Unstructured, _structure.Blocks, _structure.NofM)


# ------------------------------------------------------------- layout, in ops
def _to_rows(x, shape):
    perm = list(range(len(shape) - 2)) + [len(shape) - 1, len(shape) - 2]
    return ops.reshape(ops.transpose(x, perm), (-1, shape[-2]))


def _from_rows(rows, shape):
    lead = tuple(shape[:-2])
    perm = list(range(len(shape) - 2)) + [len(shape) - 1, len(shape) - 2]
    return ops.transpose(ops.reshape(rows, lead + (shape[-1], shape[-2])), perm)


def _sanitize(scores):
    """:func:`keras_rigl.updates.sanitize_scores` with ``infinity="zero"``."""
    scores = ops.cast(scores, "float32")
    return ops.where(ops.logical_and(ops.isfinite(scores), ops.not_equal(scores, 0.0)), scores, 0.0)


def block_sums(scores, shape, k):
    """:func:`keras_rigl.structure._reduce` (``infinity="zero"``) in ``keras.ops``: flat, float32."""
    entries = ops.reshape(_sanitize(_to_rows(scores, shape)), (-1, shape[-2] // k, k))
    sums = ops.cast(entries[..., 0], "float64")
    for j in range(1, k):
        sums = ops.add(sums, ops.cast(entries[..., j], "float64"))
    return ops.reshape(ops.cast(ops.clip(sums, -updates.FLOAT32_MAX, updates.FLOAT32_MAX), "float32"), (-1,))


def _expand(blocks, shape, k):
    """Flat per-block values -> entries of a weight of ``shape`` (each block's value on its k entries)."""
    per_row = ops.reshape(blocks, (-1, shape[-2] // k, 1))
    rows = ops.reshape(ops.repeat(per_row, k, axis=2), (-1, shape[-2]))
    return _from_rows(rows, shape)


def _sum_blocks(entries):
    """``(..., block length)`` sanitized float32 entries -> flat float32 sums, float64 left to right
    (:func:`keras_rigl.structure._sum_blocks`)."""
    sums = ops.cast(entries[..., 0], "float64")
    for j in range(1, entries.shape[-1]):
        sums = ops.add(sums, ops.cast(entries[..., j], "float64"))
    return ops.reshape(ops.cast(ops.clip(sums, -updates.FLOAT32_MAX, updates.FLOAT32_MAX), "float32"), (-1,))


def pool_sums(scores, shape, k):
    """:func:`keras_rigl.structure._reduce_pools` (``infinity="zero"``): ``(whole block sums, last block sums)``."""
    rows = _sanitize(_to_rows(scores, shape))
    cut = shape[-2] // k * k
    return _sum_blocks(ops.reshape(rows[:, :cut], (-1, shape[-2] // k, k))), _sum_blocks(rows[:, cut:])


def _select_pool(keep, active, grow, fraction, seed, reinit_regrown, keys_fn, static_k):
    """One pool of blocks (flat): the unstructured selection, left alone when all or none is on."""
    size = int(active.shape[0])
    n_active = ops.sum(ops.cast(active, "int32"))
    n = compiled_update.drop_count(fraction, n_active, size)
    new_active, grown, removed, n_moved = compiled_update.select(
        keep, ops.cast(active, "float32"), grow, n, seed, reinit_regrown, static_k=static_k, keys_fn=keys_fn)
    return new_active, grown, removed, (n_active, n, n_moved)


def _select_partial_blocks(weight, mask, grow_scores, fraction, seed, reinit_regrown, k, keys_fn, static_k):
    """:func:`select_blocks` when the inputs are not a multiple of ``k``: the whole blocks and the last,
    shorter blocks (``r`` inputs) are two pools, as :meth:`keras_rigl.structure.Blocks.drop_and_grow` has them."""
    shape = tuple(mask.shape)
    n_in, r = shape[-2], shape[-2] % k
    cut = n_in - r
    on = ops.not_equal(_to_rows(mask, shape), 0)
    actives = (ops.any(ops.reshape(on[:, :cut], (-1, k)), axis=-1), ops.any(on[:, cut:], axis=-1))
    pools = [_select_pool(keep, active, grow, fraction, seed, reinit_regrown, keys_fn, static_k)
             for keep, active, grow in zip(pool_sums(ops.abs(weight), shape, k), actives,
                                           pool_sums(grow_scores, shape, k))]

    def expand(i):
        whole = ops.reshape(ops.repeat(ops.reshape(pools[0][i], (-1, cut // k, 1)), k, axis=2), (-1, cut))
        last = ops.repeat(ops.reshape(pools[1][i], (-1, 1)), r, axis=1)
        return _from_rows(ops.concatenate([whole, last], axis=1), shape)

    counts = tuple(ops.add(ops.multiply(a, k), ops.multiply(b, r)) for a, b in zip(pools[0][3], pools[1][3]))
    return expand(0), expand(1), expand(2), counts


def select_blocks(weight, mask, grow_scores, fraction, seed, reinit_regrown, k, keys_fn, static_k=False):
    """One "1xk" weight: ``(new_active, grown, removed)`` in the weight's shape and the counts."""
    shape = tuple(mask.shape)
    if shape[-2] % k:
        return _select_partial_blocks(weight, mask, grow_scores, fraction, seed, reinit_regrown, k, keys_fn,
                                      static_k)
    size = int(np.prod(shape))
    n_blocks = size // k
    block_on = ops.any(ops.reshape(ops.not_equal(_to_rows(mask, shape), 0), (-1, k)), axis=-1)
    n_active = ops.sum(ops.cast(block_on, "int32"))
    n = compiled_update.drop_count(fraction, n_active, n_blocks)
    new_active, grown, removed, n_moved = compiled_update.select(
        block_sums(ops.abs(weight), shape, k), ops.cast(block_on, "float32"), block_sums(grow_scores, shape, k),
        n, seed, reinit_regrown, static_k=static_k, keys_fn=keys_fn,
    )
    expand = lambda x: _expand(x, shape, k)  # noqa: E731
    return expand(new_active), expand(grown), expand(removed), (n_active * k, n * k, n_moved * k)


def select_n_of_m(weight, mask, grow_scores, fraction, seed, reinit_regrown, n, m, static_k=False):
    """One "N:M" weight: the sets of :meth:`keras_rigl.structure.NofM.drop_and_grow`."""
    shape = tuple(mask.shape)
    size = int(np.prod(shape))
    excluded = ops.convert_to_tensor(updates.EXCLUDED, dtype="int64")
    active = ops.reshape(ops.not_equal(_to_rows(mask, shape), 0), (-1,))
    n_active = ops.sum(ops.cast(active, "int32"))
    k = compiled_update.drop_count(fraction, n_active, size)
    drop_keys = compiled_update.order_keys(
        ops.reshape(ops.abs(_to_rows(weight, shape)), (-1,)),
        compiled_update.element_hashes(size, compiled_update.stream_key(seed, updates.STREAM_DROP)),
    )
    dropped = compiled_update._largest(ops.where(active, ops.bitwise_invert(drop_keys), excluded), k, size, static_k)
    keep = ops.logical_and(active, ops.logical_not(dropped))
    grow_keys = compiled_update.order_keys(
        ops.reshape(_to_rows(grow_scores, shape), (-1,)),
        compiled_update.element_hashes(size, compiled_update.stream_key(seed, updates.STREAM_GROW)),
    )
    candidates = ops.reshape(ops.where(keep, excluded, grow_keys), (-1, m))
    # rank within the group = how many keys of the group are larger (candidate keys are distinct;
    # excluded ones are smaller than every candidate, so they never count and are never eligible)
    larger = ops.greater(ops.expand_dims(candidates, 1), ops.expand_dims(candidates, 2))
    rank = ops.sum(ops.cast(larger, "int32"), axis=2)
    capacity = n - ops.sum(ops.cast(ops.reshape(keep, (-1, m)), "int32"), axis=1)
    eligible = ops.reshape(ops.less(rank, ops.expand_dims(capacity, 1)), (-1,))
    grow = compiled_update._largest(ops.where(eligible, grow_keys, excluded), k, size, static_k)
    new_active = ops.logical_or(keep, grow)
    was = keep if reinit_regrown else active
    grown = ops.logical_and(grow, ops.logical_not(was))
    removed = ops.logical_and(active, ops.logical_not(new_active))
    n_moved = ops.sum(ops.cast(ops.logical_and(grow, ops.logical_not(active)), "int32"))
    back = lambda x: _from_rows(ops.reshape(x, (-1, shape[-2])), shape)  # noqa: E731
    return back(new_active), back(grown), back(removed), (n_active, k, n_moved)


class StructuredCompiledUpdate(compiled_update.CompiledUpdate):
    """:class:`keras_rigl.compiled_update.CompiledUpdate` with one structure per masked weight.

    Args:
        masked_weights: as for the parent.
        structures: one :class:`keras_rigl.structure.Structure` per masked
            weight (each :func:`supported`).
        **kwargs: the parent's arguments.
    """

    def __init__(self, masked_weights, structures=None, **kwargs):
        masked_weights = list(masked_weights)
        chosen = list(structures or [_structure.Unstructured()] * len(masked_weights))
        if len(chosen) != len(masked_weights):
            raise ValueError(f"Expected one structure per masked weight ({len(masked_weights)}), got {len(chosen)}.")
        unsupported = [s.spec for s in chosen if not supported(s)]
        if unsupported:
            raise ValueError(f"Structures {unsupported} have no compiled update; use the NumPy path (compiled=False).")
        self._structures = {id(mw.mask): s for mw, s in zip(masked_weights, chosen)}
        super().__init__(masked_weights, **kwargs)

    def _update_one(self, mw, fraction, seed):
        structure = self._structures[id(mw.mask)]
        if isinstance(structure, _structure.Unstructured):
            return super()._update_one(mw, fraction, seed)
        mask = ops.convert_to_tensor(mw.mask)
        weight = ops.convert_to_tensor(mw.weight)
        grow_scores = self._grow_scores(mw, seed)
        if isinstance(structure, _structure.Blocks):
            new_active, grown, removed, counts = select_blocks(
                weight, mask, grow_scores, fraction, seed, self.reinit_regrown, structure.k, self._keys_fn,
                static_k=self.jit_compile,
            )
        else:
            new_active, grown, removed, counts = select_n_of_m(
                weight, mask, grow_scores, fraction, seed, self.reinit_regrown, structure.n, structure.m,
                static_k=self.jit_compile,
            )
        return counts, self._write_whole(mw, weight, new_active, grown, removed)
