"""The drop-and-grow update of every masked weight as one ``jax.jit`` function (the JAX backend).

:class:`keras_rigl.compiled_update.CompiledUpdate` is the TensorFlow version;
this one gives the same masks, weights and optimizer slots (bit-identical
masks to :func:`keras_rigl.updates.drop_and_grow` for equal scores and seed)
without leaving the device, so that on a GPU an update costs a few sorts
instead of a copy of every weight, mask, gradient and slot to the host and back.

The reference orders entries by an int64 key ``(ordered float32 score bits,
hash of index)``. JAX runs with 32-bit integers by default, so here the two
halves stay two sort keys: ``jax.lax.sort`` over ``(eligible, score bits,
hash, index)`` orders exactly as the int64 keys do, and the last k
positions are the k largest. That full sort of every entry is kept
(``full_sort=True``) as the plain statement of the order; the update itself
selects partially, because the active count n of a weight is the same
before and after every update (static for XLA): drop gathers the n active
entries (``jnp.nonzero(..., size=n)``) and sorts those only; grow sorts
only the entries at or above a floor taken from a strided sample of the
scores, with the full sort as the fallback where the floor misses
(:func:`largest_above_floor`). Same order, same masks. (``lax.top_k`` of
size n was tried: on XLA CPU it cost more than the full single-key sort.)

The host reads, per update, one active count per weight, computes
k = floor(fraction * active) (float64, as the reference) and the three
32-bit stream keys of each weight's seed, and gets back the counts the logs
need; no mask, weight or score crosses to the host.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from keras_rigl import optimizer_state, updates
from keras_rigl.compiled_update import UpdateCounts, check_grow_by


def _hash32(x):
    """:func:`keras_rigl.updates.hash32` on a uint32 jax array (uint32 multiplies wrap)."""
    import jax.numpy as jnp

    x = x ^ (x >> jnp.uint32(16))
    x = x * jnp.uint32(updates.HASH_MULTIPLIERS[0])
    x = x ^ (x >> jnp.uint32(15))
    x = x * jnp.uint32(updates.HASH_MULTIPLIERS[1])
    return x ^ (x >> jnp.uint32(16))


def _ordered_bits(scores):
    """The high half of :func:`keras_rigl.updates.order_keys`: int32, monotone in the sanitized float32 score."""
    import jax
    import jax.numpy as jnp

    scores = scores.astype(jnp.float32)
    scores = jnp.where(jnp.isfinite(scores) & (scores != 0), scores, jnp.float32(0))
    bits = jax.lax.bitcast_convert_type(scores, jnp.int32)
    return bits ^ ((bits >> 31) & jnp.int32(0x7FFFFFFF))


def largest(high, low, eligible, k):
    """Boolean selection of the k largest ``(high, low)`` pairs among ``eligible`` entries.

    ``high`` int32, ``low`` uint32 (distinct among eligible entries), flat;
    ``k`` must not exceed the number of eligible entries.
    """
    import jax
    import jax.numpy as jnp

    size = high.shape[0]
    index = jnp.arange(size, dtype=jnp.int32)
    *_, order = jax.lax.sort((eligible.astype(jnp.int32), high, low, index), num_keys=3)
    return jnp.zeros(size, bool).at[order].set(index >= size - k)


_LOWEST = -(2**31)  # below every ordered score bit pattern (sanitized scores are finite) and ineligible


def largest_of_active(high, low, active, k, n_active):
    """:func:`largest` among the ``n_active`` (static) active entries: gathers and sorts those only."""
    import jax
    import jax.numpy as jnp

    size = high.shape[0]
    (positions,) = jnp.nonzero(active, size=n_active)
    rank = jnp.arange(n_active, dtype=jnp.int32)
    *_, order = jax.lax.sort((high[positions], low[positions], positions.astype(jnp.int32)), num_keys=2)
    return jnp.zeros(size, bool).at[order].set(rank >= n_active - k)


_SAMPLE = 16384  # entries of the strided sample that sets grow's floor


def largest_above_floor(high, low, eligible, k, bound):
    """:func:`largest` without sorting every entry, for k <= ``bound`` (static).

    A strided sample of the eligible ``high`` values gives a floor that about
    1.5 k entries reach; if between k and ``2 bound + 1024`` (static) entries
    reach it, only those are gathered and sorted (the k largest are among
    them). Otherwise (a floor that misses: many ties, a skewed sample) the
    full sort of :func:`largest` runs instead. The same selection either way.
    """
    import jax
    import jax.numpy as jnp

    size = high.shape[0]
    cap = min(size, 2 * bound + 1024)
    stride = max(1, size // _SAMPLE)
    lowest = jnp.int32(_LOWEST)
    candidates = jnp.where(eligible, high, lowest)
    sample = jnp.sort(candidates[::stride])
    m = sample.shape[0]
    # rank from the top whose value about 1.5 k entries of the whole reach
    rank = jnp.clip((3 * k * m + 2 * size - 1) // (2 * size), 1, m)
    floor = sample[m - rank]
    reaching = eligible & (candidates >= floor)
    count = jnp.sum(reaching, dtype=jnp.int32)

    def gathered(_):
        (positions,) = jnp.nonzero(reaching, size=cap, fill_value=0)
        real = jnp.arange(cap, dtype=jnp.int32) < count
        # padding sorts first: its high is below every eligible entry's
        _, _, order = jax.lax.sort(
            (jnp.where(real, high[positions], lowest), jnp.where(real, low[positions], jnp.uint32(0)),
             positions.astype(jnp.int32)),
            num_keys=2,
        )
        chosen = (jnp.arange(cap, dtype=jnp.int32) >= cap - k).astype(jnp.int8)
        # padding repeats position 0: an OR (max), not a set, so it cannot unset a chosen entry 0
        return jnp.zeros(size, jnp.int8).at[order].max(chosen) != 0

    def full(_):
        return largest(high, low, eligible, k)

    return jax.lax.cond((count >= k) & (count <= cap), gathered, full, None)


def select(weight, mask, grow_scores, k, drop_key, grow_key, reinit_regrown, n_active=None):
    """One weight's update as flat booleans: ``(new_active, grown, removed, n_moved)``, as the reference.

    ``n_active`` (static, the mask's active count, which an update keeps):
    drop sorts only the active entries and grow only the entries above a
    floor from a strided sample (:func:`largest_above_floor`) instead of
    sorting every entry. None: the full sorts (:func:`largest`).
    """
    import jax.numpy as jnp

    size = mask.size
    index = jnp.arange(size, dtype=jnp.uint32)
    active = mask.reshape(-1) != 0
    drop_hash = _hash32(index ^ drop_key)
    drop_high, drop_low = ~_ordered_bits(jnp.abs(weight.reshape(-1))), ~drop_hash
    grow_high, grow_low = _ordered_bits(grow_scores.reshape(-1)), _hash32(index ^ grow_key)
    # the reference drops the largest ~key (bitwise invert of the int64 key = both halves inverted)
    if n_active is None:
        dropped = largest(drop_high, drop_low, active, k)
    elif n_active == 0:
        dropped = jnp.zeros(size, bool)
    else:
        dropped = largest_of_active(drop_high, drop_low, active, k, n_active)
    keep = active & ~dropped
    if n_active is None:
        grow = largest(grow_high, grow_low, ~keep, k)
    elif n_active == 0:
        grow = jnp.zeros(size, bool)
    else:
        grow = largest_above_floor(grow_high, grow_low, ~keep, k, n_active)
    new_active = keep | grow
    was = keep if reinit_regrown else active
    grown = grow & ~was
    removed = active & ~new_active
    return new_active, grown, removed, jnp.sum(grow & ~active, dtype=jnp.int32)


def random_scores(shape, random_key):
    """:func:`keras_rigl.updates.random_scores` on the device."""
    import jax.numpy as jnp

    size = math.prod(shape)
    draws = _hash32(jnp.arange(size, dtype=jnp.uint32) ^ random_key) >> jnp.uint32(8)
    return (draws.astype(jnp.float32) * jnp.float32(2.0**-24)).reshape(shape)


class CompiledUpdateJax:
    """:class:`keras_rigl.compiled_update.CompiledUpdate` for the JAX backend (same arguments and results).

    One ``jax.jit`` function takes every masked weight, mask, grow score and
    optimizer slot and returns their new values, which are assigned to the
    variables (device arrays: nothing crosses to the host but the counts).
    """

    def __init__(self, masked_weights, grow_by="gradient", reinit_regrown=False, optimizer=None,
                 reset_optimizer_state=True, track_ever_active=False, ever_active=None, full_sort=False):
        import jax
        import jax.numpy as jnp

        if keras.backend.backend() != "jax":
            raise ValueError(f"CompiledUpdateJax needs the JAX backend, not {keras.backend.backend()!r}.")
        self.masked_weights = list(masked_weights)
        self.grow_by = check_grow_by(grow_by, self.masked_weights)
        self.reinit_regrown = bool(reinit_regrown)
        self.optimizer = optimizer
        self.reset_optimizer_state = bool(reset_optimizer_state)
        self.ever_active = None
        if track_ever_active:
            self.reset_ever_active(ever_active or [None] * len(self.masked_weights))
        self._slot_lists = [self._slots(mw) for mw in self.masked_weights]
        # full_sort: the selection by a sort of every entry (before the partial
        # selection; kept for benchmarks/update_scale_jax.py's comparison)
        self.full_sort = bool(full_sort)
        self._function = jax.jit(self._update_all, static_argnums=(7,))
        self._count_active = jax.jit(lambda masks: jnp.stack([jnp.sum(m != 0, dtype=jnp.int32) for m in masks]))

    def reset_ever_active(self, arrays):
        """Start the ever-active record again from ``arrays`` (None: the mask now)."""
        import jax.numpy as jnp

        # Device arrays stay on the device (a record kept by the callback between
        # fits); only a NumPy start crosses, host to device.
        self.ever_active = [
            (mw.mask.value != 0) if start is None else jnp.asarray(start).astype(bool)
            for mw, start in zip(self.masked_weights, arrays)
        ]

    def _slots(self, mw):
        if not self.reset_optimizer_state or self.optimizer is None:
            return []
        return optimizer_state.slot_variables(self.optimizer, mw.weight)

    def _update_all(self, weights, masks, scores, slots, ever, ks, keys, n_actives):
        import jax.numpy as jnp

        out_weights, out_masks, out_slots, out_ever, counts = [], [], [], [], []
        for i, (weight, mask) in enumerate(zip(weights, masks)):
            drop_key, grow_key, random_key = keys[i, 0], keys[i, 1], keys[i, 2]
            grow_scores = random_scores(mask.shape, random_key) if self.grow_by == "random" else jnp.abs(scores[i])
            new_active, grown, removed, n_moved = select(weight, mask, grow_scores, ks[i], drop_key, grow_key,
                                                         self.reinit_regrown, n_active=n_actives[i])
            new_active, grown = new_active.reshape(mask.shape), grown.reshape(mask.shape)
            changed = grown | removed.reshape(mask.shape)
            new_weight = jnp.where(grown, jnp.zeros_like(weight), weight) * new_active.astype(weight.dtype)
            new_slots = []
            for slot, (_, reset_value) in zip(slots[i], self._slot_lists[i]):
                if reset_value == optimizer_state.FOLLOW_WEIGHT:
                    fresh = new_weight.astype(slot.dtype)
                else:
                    fresh = jnp.full(slot.shape, reset_value, slot.dtype)
                new_slots.append(jnp.where(changed, fresh, slot))
            out_weights.append(new_weight)
            out_masks.append(new_active.astype(mask.dtype))
            out_slots.append(new_slots)
            if ever is None:
                n_ever = jnp.int32(-1)
            else:
                now = ever[i] | new_active
                out_ever.append(now)
                n_ever = jnp.sum(now, dtype=jnp.int32)
            counts.append(jnp.stack([jnp.sum(mask != 0, dtype=jnp.int32), ks[i], n_moved, n_ever]))
        return out_weights, out_masks, out_slots, (out_ever if ever is not None else None), jnp.stack(counts)

    def __call__(self, fraction, seeds):
        """Update every weight with drop fraction ``fraction`` and ``seeds[i]`` for weight i; :class:`UpdateCounts`."""
        seeds = np.asarray(seeds, dtype=np.uint64)
        if seeds.shape != (len(self.masked_weights),):
            raise ValueError(f"Expected {len(self.masked_weights)} seeds (one per masked weight), got shape {seeds.shape}.")
        masks = [mw.mask.value for mw in self.masked_weights]
        # One read of one count per weight (not the masks): k = floor(f * n) in
        # float64 as the reference, which 32-bit JAX cannot do on the device.
        ks, n_actives = [], []
        for mask, n_active in zip(masks, np.asarray(self._count_active(masks)).tolist()):
            # dense and empty weights are left alone
            movable = 0 < n_active < mask.size
            ks.append(int(math.floor(float(fraction) * n_active)) if movable else 0)
            # static: an update keeps each count, so the function is traced once per mask layout
            n_actives.append(None if self.full_sort else (n_active if movable else 0))
        keys = np.array([[updates.stream_key(int(s), stream) for stream in
                          (updates.STREAM_DROP, updates.STREAM_GROW, updates.STREAM_RANDOM)] for s in seeds], np.uint32)
        scores = [mw.capture.read() if self.grow_by == "gradient" else None for mw in self.masked_weights]
        weights, masks, slots, ever, counts = self._function(
            [mw.weight.value for mw in self.masked_weights], masks,
            scores, [[s.value for s, _ in slot_list] for slot_list in self._slot_lists], self.ever_active,
            np.asarray(ks, np.int32), keys, tuple(n_actives),
        )
        for mw, weight, mask, slot_list, new_slots in zip(self.masked_weights, weights, masks, self._slot_lists, slots):
            mw.weight.assign(weight)
            mw.mask.assign(mask)
            for (slot, _), value in zip(slot_list, new_slots):
                slot.assign(value)
        if ever is not None:
            self.ever_active = ever
        counts = np.asarray(counts).astype(np.int64)
        return UpdateCounts(n_active=counts[:, 0], n_dropped=counts[:, 1], n_moved=counts[:, 2],
                            n_ever_active=counts[:, 3])
