"""The drop-and-grow update of every masked weight as one compiled function on the device.

:func:`keras_rigl.updates.drop_and_grow` (NumPy) is the reference: it copies
weight, mask and scores to the host. Here the same selection runs where the
variables live, inside one ``tf.function`` for all masked weights of a model
(which calls, per weight, one traced update of a flat weight shared by
weights of every shape, see ``CompiledUpdate._update_one_by_index``):

* top-k by the drop score (|w|) and by the grow score with ``keras.ops.top_k``
  over the int64 keys of :func:`keras_rigl.updates.order_keys`, built with the
  same integer operations (lowbias32 hash of (seed, index)), so the masks are
  bit-identical to the reference for the same scores and seed;
* SET's random grow scores from the same hash (:func:`random_scores`), i.e.
  the numbers :func:`keras_rigl.updates.random_scores` draws;
* masks, weights and optimizer slots written in place with ``assign``;
* the host sends the drop fraction and one uint32 seed per weight and gets
  back three small integer vectors for the logs (active, dropped, moved).
  The only TensorFlow-specific choice in the math: 32-bit words live in
  int64 tensors (see ``_mul32``).

The per-weight math is written with ``keras.ops``; only the function, the
ordering of the weights (control dependencies, so that one weight's
temporaries are freed before the next one's are made) and ``assign`` are
TensorFlow. The update of one weight reads it, its mask and its scores and
holds about 40 bytes per entry of temporaries (int64 keys, hashes, booleans).
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
from keras import ops

from keras_rigl import gradient_capture, optimizer_state, updates

GROW_BY = ("gradient", "random")


# ----------------------------------------------------------- the math, in ops
# 32-bit words are held in int64 tensors: TensorFlow registers int64 (not
# uint32) multiply and range kernels on every device, and splitting each
# multiplier in 16-bit halves keeps every product below 2**49, so the
# wrap-around modulo 2**32 is exact without relying on integer overflow.
_LOW32 = 0xFFFFFFFF


def _mul32(x, multiplier):
    low, high = multiplier & 0xFFFF, multiplier >> 16
    high_part = ops.multiply(ops.bitwise_and(ops.multiply(x, high), 0xFFFF), 0x10000)
    return ops.bitwise_and(ops.add(ops.multiply(x, low), high_part), _LOW32)


def _xorshift(x, shift):
    return ops.bitwise_xor(x, ops.right_shift(x, shift))


def hash32(x):
    """:func:`keras_rigl.updates.hash32` in ``keras.ops``, on int64 tensors holding uint32 values."""
    x = ops.bitwise_and(ops.cast(x, "int64"), _LOW32)
    x = _mul32(_xorshift(x, 16), updates.HASH_MULTIPLIERS[0])
    x = _mul32(_xorshift(x, 15), updates.HASH_MULTIPLIERS[1])
    return _xorshift(x, 16)


def stream_key(seed, stream):
    """:func:`keras_rigl.updates.stream_key` of a seed tensor (seeds < 2**32)."""
    key = hash32(ops.bitwise_xor(hash32(seed), 0))
    return hash32(ops.bitwise_xor(key, stream))


def element_hashes(size, key):
    return hash32(ops.bitwise_xor(ops.arange(size, dtype="int64"), key))


def order_keys(scores, hashes):
    """:func:`keras_rigl.updates.order_keys` in ``keras.ops``."""
    scores = ops.cast(scores, "float32")
    scores = ops.where(ops.logical_and(ops.isfinite(scores), ops.not_equal(scores, 0.0)), scores, 0.0)
    if scores.shape[-1] is None:  # a candidate set of data-dependent size: keras's view needs a static one
        import tensorflow as tf

        bits = tf.bitcast(scores, tf.int32)
    else:
        bits = ops.view(scores, "int32")
    ordered = ops.bitwise_xor(bits, ops.bitwise_and(ops.right_shift(bits, 31), 0x7FFFFFFF))
    return ops.add(ops.multiply(ops.cast(ordered, "int64"), 2**32), hashes)


def random_scores(shape, seed):
    """:func:`keras_rigl.updates.random_scores` on the device, from a uint32 seed tensor."""
    size = int(np.prod(shape))
    draws = ops.right_shift(element_hashes(size, stream_key(seed, updates.STREAM_RANDOM)), 8)
    return ops.reshape(ops.multiply(ops.cast(draws, "float32"), 2.0**-24), shape)


def _largest(keys, k, size, static_k=False):
    """Boolean selection of the ``k`` (tensor) largest keys, distinct among candidates.

    ``static_k``: XLA needs a compile-time k, so rank all ``size`` keys and
    keep the first ``k`` ranks.
    """
    if static_k:
        _, indices = ops.top_k(keys, size, sorted=True)
        hits = ops.cast(ops.less(ops.arange(size, dtype="int32"), k), "int32")
    else:
        _, indices = ops.top_k(keys, k, sorted=False)
        hits = ops.ones_like(indices, dtype="int32")
    return ops.scatter(ops.expand_dims(indices, -1), hits, (size,)) > 0


def candidate_keys(weight, mask, grow_scores, seed):
    """The elementwise part of one weight's update (flat): ``(active, drop_keys, grow_keys)``.

    ``drop_keys`` are negated (largest = dropped first) and EXCLUDED where
    inactive. Some thirty elementwise integer operations per entry and no
    data-dependent shape: what XLA fuses into one pass (``fuse_keys``).
    """
    size = int(np.prod(mask.shape))
    active = ops.not_equal(ops.reshape(mask, (-1,)), 0)
    excluded = ops.convert_to_tensor(updates.EXCLUDED, dtype="int64")
    drop_keys = order_keys(ops.abs(ops.reshape(weight, (-1,))), element_hashes(size, stream_key(seed, updates.STREAM_DROP)))
    grow_keys = order_keys(ops.reshape(grow_scores, (-1,)), element_hashes(size, stream_key(seed, updates.STREAM_GROW)))
    return active, ops.where(active, ops.bitwise_invert(drop_keys), excluded), grow_keys


def select(weight, mask, grow_scores, k, seed, reinit_regrown, static_k=False, keys_fn=candidate_keys):
    """One weight's drop-and-grow as tensors; the same sets as :func:`updates.drop_and_grow`.

    Args:
        weight, mask, grow_scores: tensors of one shape.
        k: int32 scalar tensor, connections to drop (and grow).
        seed: integer scalar tensor in [0, 2**32).
        reinit_regrown: Python bool (see :func:`updates.drop_and_grow`).
        static_k: rank every entry instead of a top-k of dynamic size (for XLA).
        keys_fn: :func:`candidate_keys` or a compiled version of it.

    Returns:
        ``(new_active, grown, removed, n_moved)``, flat booleans and an int32 scalar.
    """
    size = int(np.prod(mask.shape))
    excluded = ops.convert_to_tensor(updates.EXCLUDED, dtype="int64")
    active, drop_candidates, grow_keys = keys_fn(weight, mask, grow_scores, seed)
    dropped = _largest(drop_candidates, k, size, static_k)
    keep = ops.logical_and(active, ops.logical_not(dropped))
    grow = _largest(ops.where(keep, excluded, grow_keys), k, size, static_k)
    new_active = ops.logical_or(keep, grow)
    was = keep if reinit_regrown else active
    grown = ops.logical_and(grow, ops.logical_not(was))
    removed = ops.logical_and(active, ops.logical_not(new_active))
    n_moved = ops.sum(ops.cast(ops.logical_and(grow, ops.logical_not(active)), "int32"))
    return new_active, grown, removed, n_moved


# ------------------------------------------- the same sets by index (default)
# ``select`` ranks every entry of a weight twice (some thirty integer operations
# per entry for the keys, two top-k over all entries) and writes whole tensors.
# But a drop touches only active entries (a few percent of a sparse kernel) and
# a grow needs only the entries whose score can reach the k-th largest. Here the
# int64 keys are built only for those entries, and the writes are scatters of
# the 2k changed entries: a handful of plain passes over each weight instead of
# some forty. The candidate sets have data-dependent sizes, which TensorFlow's
# graph runs but XLA (and JAX) cannot: hence tf ops, and ``select`` stays the
# shape-static path for ``jit_compile=True``.
SAMPLE_ABOVE = 1 << 16  # weights with more entries select near a sampled bracket (_top_k_bracketed)
SAMPLE_STRIDE = 61  # prime: a strided sample cuts evenly across every axis of a kernel
BRACKET_SIGMAS, BRACKET_SLACK = 4, 16  # sample ranks either side of the k-th: 4 standard deviations + 16


_FUSED = {}


def _fused(fn):
    """``fn`` compiled by XLA (its elementwise passes fused into one pass over the weight), called on tensors.

    The candidate sets of the by-index update have data-dependent sizes, which
    XLA cannot compile, but the passes over every entry around them can be: each
    costs about as much as one read of the weight, and unfused a weight takes
    some thirty of them (measured: a ResNet50 update 1.2 s on 2 CPU cores).
    """
    import tensorflow as tf

    compiled = _FUSED.get(fn)
    if compiled is None:
        compiled = _FUSED[fn] = tf.function(fn, jit_compile=True, autograph=False)
    # tf.identity: hand the XLA function tensors (the values read now), never variables
    return lambda *tensors, **static: compiled(*tf.nest.map_structure(tf.identity, tensors), **static)


def _flat_active_eager(mask):
    return ops.not_equal(ops.reshape(mask, (-1,)), 0)


def _active_and_count_eager(mask):
    """Flat ``mask != 0`` and its count: one fused pass over the mask."""
    active = _flat_active_eager(mask)
    return active, ops.sum(ops.cast(active, "int32"))


def _count_active_eager(mask):
    return ops.sum(ops.cast(ops.not_equal(mask, 0), "int32"))


def _ever_active_eager(ever, mask):
    now = ops.logical_or(ever, ops.not_equal(mask, 0))
    return now, ops.sum(ops.cast(now, "int32"))


def _write_by_index_eager(mask, delta, weight, slots, resets, reinit_regrown):
    """The new mask, weight and optimizer slots of one weight (all flat) from its flat ``delta``.

    ``delta`` is -1 at every dropped entry plus +2 at every grown one (summed:
    an entry dropped and grown back gets +1), so ``code = was_active + delta``
    is 0 off, 1 kept and 2 grown; grown entries that were active before keep
    their weight and slots unless ``reinit_regrown``. ``resets``: per slot its
    reset value, or ``optimizer_state.FOLLOW_WEIGHT``. The same values as the
    reference (:func:`keras_rigl.updates.apply_update`, ``reset_slots``).
    """
    was = ops.not_equal(mask, 0)
    code = ops.add(ops.cast(was, "int32"), delta)
    grown = ops.equal(code, 2)
    restarted = grown if reinit_regrown else ops.logical_and(grown, ops.logical_not(was))
    changed = ops.logical_or(restarted, ops.logical_and(was, ops.equal(code, 0)))
    new_mask = ops.cast(ops.greater(code, 0), mask.dtype)
    new_weight = ops.multiply(ops.where(restarted, ops.zeros_like(weight), weight), ops.cast(new_mask, weight.dtype))
    new_slots = []
    for slot, reset in zip(slots, resets):
        fresh = ops.cast(new_weight, slot.dtype) if reset == optimizer_state.FOLLOW_WEIGHT else ops.full_like(slot, reset)
        new_slots.append(ops.where(changed, fresh, slot))
    return new_mask, new_weight, tuple(new_slots)


def _hashes_at(indices, key):
    """``element_hashes(size, key)[indices]`` for int64 ``indices``."""
    return hash32(ops.bitwise_xor(indices, key))


def _top_k_of(keys, indices, k):
    import tensorflow as tf

    _, local = tf.math.top_k(keys, k, sorted=False)
    return tf.gather(indices, local)


def _bracket(sample, k, stride, margin=None):
    """Keys ``(ceiling, floor)`` around the k-th largest of a set, from its strided ``sample`` (int64 keys).

    The k-th largest of the whole set lies near rank ``r = k // stride`` of
    the sample, give or take ``sqrt(r)`` ranks (one standard deviation of a
    sample quantile); the ceiling and floor are the sample's keys ``margin``
    ranks before and after it (default ``4 * sqrt(r) + 16``; the largest int64
    before the sample's start, ``EXCLUDED`` past its end). Keys are distinct,
    so ties in the scores (all-zero gradients) do not widen the bracket. The
    caller checks that it really encloses the k-th, so the result never
    depends on the sample.
    """
    import tensorflow as tf

    n_sample = tf.shape(sample, out_type=tf.int32)[0]
    rank = k // stride
    if margin is None:
        spread = BRACKET_SIGMAS * tf.sqrt(tf.cast(rank, tf.float32))
        margin = tf.cast(tf.math.ceil(spread), tf.int32) + BRACKET_SLACK
    top = tf.math.top_k(sample, tf.minimum(rank + margin + 1, n_sample), sorted=True).values
    n_top = tf.shape(top, out_type=tf.int32)[0]
    excluded = tf.constant(updates.EXCLUDED, tf.int64)
    top = tf.concat([top, [excluded]], 0)  # rank n_top (past the sample) reads EXCLUDED; an empty sample works too
    at = lambda r: top[tf.clip_by_value(r, 0, n_top)]  # noqa: E731
    ceiling = tf.where(rank - margin >= 0, at(rank - margin), tf.constant(np.iinfo(np.int64).max, tf.int64))
    floor = at(rank + margin)
    return ceiling, floor


def _bracket_masks_eager(keys, ceiling, floor):
    eligible = ops.not_equal(keys, updates.EXCLUDED)
    above = ops.greater(keys, ceiling)
    middle = ops.logical_and(eligible, ops.logical_and(ops.greater_equal(keys, floor), ops.less_equal(keys, ceiling)))
    return above, middle, ops.sum(ops.cast(above, "int32")), ops.sum(ops.cast(middle, "int32"))


def _top_k_bracketed(keys, k, stride, margin=None, extra_keys=None, extra=None):
    """Indices of the k largest of ``keys`` (flat int64, ``EXCLUDED`` = not a candidate) and ``extra_keys``.

    Returns positions in ``keys``, or for the extra candidates their ``extra``
    index. Instead of a top-k of size k over every candidate (its cost grows
    with k: at a drop fraction of 0.3, k is 30% of the active entries), a
    strided sample brackets the k-th key (:func:`_bracket`): the candidates
    above the ceiling are all chosen, and a top-k ranks only those between
    floor and ceiling (some ``2 * margin * stride`` entries: ~18k for k = 70k at
    stride 61). Where the bracket misses (fewer than k reach the floor, or
    more than k pass the ceiling) every candidate is ranked, so the result is
    exactly the top k either way.
    """
    import tensorflow as tf

    if extra_keys is None:
        extra_keys, extra = tf.zeros((0,), tf.int64), tf.zeros((0,), tf.int64)
    # the sample covers the extra candidates too: the just-dropped entries, whose gradients are often the largest
    ceiling, floor = _bracket(tf.concat([keys[::stride], extra_keys[::stride]], 0), k, stride, margin)
    above, middle, n_above, n_middle = _fused(_bracket_masks_eager)(keys, ceiling, floor)
    extra_above = extra_keys > ceiling
    extra_middle = tf.logical_and(extra_keys >= floor, extra_keys <= ceiling)
    count = lambda b: tf.reduce_sum(tf.cast(b, "int32"))  # noqa: E731
    n_above = n_above + count(extra_above)
    n_middle = n_middle + count(extra_middle)

    def rank(at, at_extra, m):  # the m largest of keys[at] and extra_keys[at_extra]
        candidates = tf.concat([tf.gather(keys, at), tf.gather(extra_keys, at_extra)], 0)
        return _top_k_of(candidates, tf.concat([at, tf.gather(extra, at_extra)], 0), m)

    def where(b):
        return tf.reshape(tf.where(b), (-1,))

    def bracketed():
        chosen = rank(where(middle), where(extra_middle), k - n_above)
        return tf.concat([where(above), tf.boolean_mask(extra, extra_above), chosen], 0)

    def every_candidate():
        return rank(where(tf.not_equal(keys, updates.EXCLUDED)), tf.range(tf.size(extra, tf.int64)), k)

    hit = tf.logical_and(n_above <= k, n_above + n_middle >= k)
    return tf.cond(hit, bracketed, every_candidate)


def _grow_keys_eager(active, grow, key):
    """The grow keys of every inactive entry (``EXCLUDED`` at active ones): one fused pass."""
    keys = order_keys(grow, element_hashes(ops.shape(grow)[0], key))
    return ops.where(active, updates.EXCLUDED, keys)


def select_indices(weight, mask, grow_scores, k, seed, reinit_regrown, sample_above=SAMPLE_ABOVE,
                   sample_stride=SAMPLE_STRIDE, margin=None, bracketed=None, active=None):
    """One weight's drop-and-grow as index sets; the same sets as :func:`select` (and the reference).

    Drop: the k active entries with the smallest |w| (keys built for active
    entries only). Grow: the k best by ``grow_scores`` among the inactive and
    the just-dropped entries. Both select by :func:`_top_k_bracketed` when the
    weight has more than ``sample_above`` entries (or where ``bracketed`` says
    so: tensors of unknown static size): a top-k only over the entries near
    the k-th. ``active``: the flat ``mask != 0`` where the caller has it already.
    The grow scores go in as they are: every key is made by :func:`order_keys`,
    which reads non-finite scores as 0 itself.

    Returns:
        ``(dropped, grown_all, was_active, n_active)``: int64 flat indices of
        the k dropped and the k grown entries, a boolean per grown entry (was
        it active before the update: a dropped entry grown back), and the
        active count before.
    """
    import tensorflow as tf

    if bracketed is None:
        bracketed = int(np.prod(mask.shape)) > sample_above
    if active is None:
        active = _fused(_flat_active_eager)(mask)
    grow = tf.reshape(grow_scores, (-1,))
    active_at = tf.reshape(tf.where(active), (-1,))
    n_active = tf.shape(active_at, out_type=tf.int32)[0]
    magnitude = tf.abs(tf.gather(tf.reshape(weight, (-1,)), active_at))
    # smallest |w| first: the inverted key (both halves inverted, as the reference ranks ~key)
    drop_keys = tf.bitwise.invert(order_keys(magnitude, _hashes_at(active_at, stream_key(seed, updates.STREAM_DROP))))
    grow_hash_key = stream_key(seed, updates.STREAM_GROW)
    if bracketed:
        dropped = tf.gather(active_at, _top_k_bracketed(drop_keys, k, sample_stride, margin))
        dropped_keys = order_keys(tf.gather(grow, dropped), _hashes_at(dropped, grow_hash_key))
        grown_all = _top_k_bracketed(_fused(_grow_keys_eager)(active, grow, grow_hash_key), k, sample_stride, margin,
                                     extra_keys=dropped_keys, extra=dropped)
    else:
        dropped = _top_k_of(drop_keys, active_at, k)
        candidates = tf.concat([tf.reshape(tf.where(tf.logical_not(active)), (-1,)), dropped], 0)
        grown_all = _top_k_of(order_keys(tf.gather(grow, candidates), _hashes_at(candidates, grow_hash_key)),
                              candidates, k)
    return dropped, grown_all, tf.gather(active, grown_all), n_active


def drop_count(fraction, n_active, size):
    """k = floor(fraction * n_active) in float64, as the reference computes it in Python; 0 where nothing can move."""
    k = ops.cast(ops.floor(ops.multiply(fraction, ops.cast(n_active, "float64"))), "int32")
    return ops.where(ops.logical_and(ops.greater(n_active, 0), ops.less(n_active, size)), k, 0)


# ------------------------------------------------------------ the whole model
@dataclasses.dataclass
class UpdateCounts:
    """What the logs need of one update, one entry per masked weight (NumPy int64)."""

    n_active: np.ndarray
    n_dropped: np.ndarray  # k; 0 for weights that are dense or empty (left alone)
    n_moved: np.ndarray
    n_ever_active: np.ndarray  # entries active at some point so far (-1 unless track_ever_active)


def check_grow_by(grow_by, masked_weights):
    """``grow_by`` if it is known and the weights keep what it needs (the dense gradient for "gradient")."""
    if grow_by not in GROW_BY:
        raise ValueError(f"grow_by must be one of {GROW_BY}, got {grow_by!r}.")
    if grow_by == "gradient":
        missing = [mw.path for mw in masked_weights if mw.capture is None]
        if missing:
            raise ValueError(
                f"grow_by='gradient' needs the captured dense gradient, which these weights do not keep: "
                f"{missing}. Build them with Masked(..., capture_gradients=True) (the default)."
            )
    return grow_by


class CompiledUpdate:
    """Drop and grow in every given masked weight at once, on the device.

    Args:
        masked_weights: list of :class:`keras_rigl.masked.MaskedWeight`, in
            the order the seeds will be given.
        grow_by: ``"gradient"`` (|captured dense gradient|: RigL, and SNFS
            whose capture keeps the moving average) or ``"random"`` (SET).
        reinit_regrown: see :func:`keras_rigl.updates.drop_and_grow`.
        optimizer: its slots of grown and removed connections are reset, if
            ``reset_optimizer_state``. The slot list is read once, when the
            function is traced (the optimizer must be built by then).
        track_ever_active: keep on the device, per weight, which entries were
            ever active (for the ITOP rate) instead of copying masks to the
            host; ``ever_active`` gives the starting arrays (default: the masks now).
        fuse_keys: compile only the elementwise key computation
            (:func:`candidate_keys`) with XLA, keeping the top-k of dynamic size
            (default): one fused pass instead of some thirty, measured 4.5x
            faster on a 2M-entry weight on CPU, with identical results.
        by_index: select and write by index (:func:`select_indices`, the
            default without XLA): keys only for the entries that can be chosen,
            scatters of the changed entries; ``False`` ranks every entry
            (:func:`select`) as XLA needs.
        jit_compile: compile everything with XLA. ``top_k`` needs a static k there, so
            each selection becomes a full sort; measured slower on CPU (see
            ``benchmarks/update_scale.py``), hence off by default.

    Weights that are dense or have no active entry are left alone (k = 0),
    as the NumPy path skips them. Grown connections start at 0.
    """

    def __init__(self, masked_weights, grow_by="gradient", reinit_regrown=False, optimizer=None,
                 reset_optimizer_state=True, track_ever_active=False, ever_active=None, jit_compile=False,
                 fuse_keys=True, by_index=None):
        import tensorflow as tf

        self.masked_weights = list(masked_weights)
        self.grow_by = check_grow_by(grow_by, self.masked_weights)
        self.reinit_regrown = bool(reinit_regrown)
        self.optimizer = optimizer
        self.reset_optimizer_state = bool(reset_optimizer_state)
        self.jit_compile = bool(jit_compile)
        if by_index and self.jit_compile:
            raise ValueError("by_index=True needs data-dependent shapes, which XLA cannot compile: "
                             "pass jit_compile=False or by_index=False.")
        self.by_index = not self.jit_compile if by_index is None else bool(by_index)
        self.ever_active = None
        if track_ever_active:
            starts = ever_active or [None] * len(self.masked_weights)
            with tf.init_scope():
                self.ever_active = [
                    tf.Variable(tf.not_equal(mw.mask.value, 0) if start is None else tf.cast(start, tf.bool),
                                trainable=False, name="ever_active")
                    for mw, start in zip(self.masked_weights, starts)
                ]
        self._keys_fn = candidate_keys
        if fuse_keys and not self.jit_compile:
            fused = tf.function(candidate_keys, jit_compile=True, autograph=False)
            # tf.identity: hand the XLA function tensors (the values read now), never variables.
            self._keys_fn = lambda *args: fused(*[tf.identity(x) for x in args])
        self._flat_updates = {}
        self._function = tf.function(self._update_all, jit_compile=self.jit_compile, autograph=False)
        self._written = tf.function(
            lambda: ops.stack([mw.capture.written.read_value() for mw in self.masked_weights]), autograph=False
        )

    def reset_ever_active(self, arrays):
        """Start the ever-active record again from ``arrays`` (None: the mask now), without retracing.

        A device array (a record the callback kept between fits) stays on the device.
        """
        for variable, mw, start in zip(self.ever_active or [], self.masked_weights, arrays):
            variable.assign(ops.not_equal(mw.mask.value, 0) if start is None else ops.cast(start, "bool"))

    def _grow_scores(self, mw, seed):
        if self.grow_by == "random":
            return random_scores(tuple(mw.mask.shape), seed)
        return ops.abs(mw.capture.value())

    def _slots(self, mw):
        if not self.reset_optimizer_state or self.optimizer is None:
            return []
        return optimizer_state.slot_variables(self.optimizer, mw.weight)

    def _update_all(self, fraction, seeds):
        import tensorflow as tf

        counts = []
        previous = []
        for i, mw in enumerate(self.masked_weights):
            # One weight at a time: its temporaries die before the next one's are made.
            with tf.control_dependencies(previous):
                counts_i, previous = self._update_one(mw, fraction, seeds[i])
                if self.ever_active is None:
                    counts_i += (ops.convert_to_tensor(-1, "int32"),)
                else:
                    ever = self.ever_active[i]
                    with tf.control_dependencies(previous):
                        now, n_ever = _fused(_ever_active_eager)(ever, mw.mask)
                        previous = previous + [ever.assign(now)]
                        counts_i += (n_ever,)
            counts.append(counts_i)
        with tf.control_dependencies(previous):
            return ops.stack([ops.stack(c) for c in counts])

    def _update_one(self, mw, fraction, seed):
        if self.by_index:
            return self._update_one_by_index(mw, fraction, seed)
        shape = tuple(mw.mask.shape)
        mask = ops.convert_to_tensor(mw.mask)
        weight = ops.convert_to_tensor(mw.weight)
        n_active = _count_active_eager(mask)
        k = drop_count(fraction, n_active, int(np.prod(shape)))
        new_active, grown, removed, n_moved = select(
            weight, mask, self._grow_scores(mw, seed), k, seed, self.reinit_regrown, static_k=self.jit_compile,
            keys_fn=self._keys_fn,
        )
        return (n_active, k, n_moved), self._write_whole(mw, weight, new_active, grown, removed)

    def _write_whole(self, mw, weight, new_active, grown, removed):
        """Assign the new mask, weight and optimizer slots from booleans of any shape with the weight's size."""
        shape = tuple(mw.mask.shape)
        new_mask = ops.reshape(ops.cast(new_active, mw.mask.dtype), shape)
        grown = ops.reshape(grown, shape)
        new_weight = ops.multiply(ops.where(grown, ops.zeros_like(weight), weight), ops.cast(new_mask, weight.dtype))
        writes = [mw.mask.assign(new_mask), mw.weight.assign(new_weight)]
        changed = ops.logical_or(grown, ops.reshape(removed, shape))
        for slot, reset_value in self._slots(mw):
            if reset_value == optimizer_state.FOLLOW_WEIGHT:  # the use_ema average starts at the new weight
                fresh = ops.cast(new_weight, slot.dtype)
            else:
                fresh = ops.full(shape, reset_value, dtype=slot.dtype)
            writes.append(slot.assign(ops.where(changed, fresh, ops.convert_to_tensor(slot))))
        return [w.op if hasattr(w, "op") else w for w in writes]

    def _update_one_by_index(self, mw, fraction, seed):
        """:meth:`_update_one` through :func:`select_indices`, in a function shared by every weight.

        The weight, its mask, scores and slots go in flat, of unknown static
        size, so that weights of every shape call one traced function (one per
        dtype, slot list and :func:`select_indices` variant). Traced once per
        weight instead, the update of ResNet50 (54 masked weights) was a graph
        of 40,000 operations, most of them the same hashes unrolled 54 times,
        and building and instantiating it held some 700 MiB (measured with
        ``benchmarks/update_scale.py --memory-phases``).
        """
        shape = tuple(mw.mask.shape)
        slots = self._slots(mw)
        flat = lambda x: ops.reshape(ops.convert_to_tensor(x), (-1,))  # noqa: E731
        inputs = [flat(mw.mask), flat(mw.weight), flat(self._grow_scores(mw, seed))]
        inputs += [flat(slot) for slot, _ in slots]
        update = self._flat_update(
            tuple(x.dtype for x in inputs), resets=tuple(reset for _, reset in slots),
            bracketed=int(np.prod(shape)) > SAMPLE_ABOVE)
        n_active, k, n_moved, new_mask, new_weight, *new_slots = update(fraction, seed, *inputs)
        writes = [mw.mask.assign(ops.reshape(new_mask, shape)), mw.weight.assign(ops.reshape(new_weight, shape))]
        writes += [slot.assign(ops.reshape(value, shape)) for (slot, _), value in zip(slots, new_slots)]
        return (n_active, k, n_moved), [w.op if hasattr(w, "op") else w for w in writes]

    def _flat_update(self, dtypes, resets, bracketed):
        """The traced by-index update of one flat weight: ``(fraction, seed, mask, weight, grow_scores, *slots)``.

        Returns ``(n_active, k, n_moved, new_mask, new_weight, *new_slots)``, all flat.
        """
        import tensorflow as tf

        key = (dtypes, resets, bracketed)
        function = self._flat_updates.get(key)
        if function is not None:
            return function

        def update(fraction, seed, mask, weight, grow, *slots):
            size = tf.size(mask, out_type=tf.int64)
            active, n_active = _fused(_active_and_count_eager)(mask)
            k = drop_count(fraction, n_active, tf.cast(size, tf.int32))
            dropped, grown_all, was_active, _ = select_indices(weight, mask, grow, k, seed, self.reinit_regrown,
                                                               bracketed=bracketed, active=active)
            indices = tf.concat([dropped, grown_all], 0)
            marks = tf.concat([tf.fill(tf.shape(dropped), -1), tf.fill(tf.shape(grown_all), 2)], 0)
            # duplicates add up (dropped and grown back: +1); a segment sum, not scatter_nd, which on CPU
            # took 1.6-2.7x as long for the same 2k entries (min 8 against 5 ms for 140k into 2.4M)
            delta = tf.math.unsorted_segment_sum(marks, indices, size)
            new_mask, new_weight, new_slots = _fused(_write_by_index_eager)(
                mask, delta, weight, list(slots), resets=resets, reinit_regrown=self.reinit_regrown)
            n_moved = k - tf.reduce_sum(tf.cast(was_active, "int32"))
            return (n_active, k, n_moved, new_mask, new_weight, *new_slots)

        signature = [tf.TensorSpec((), tf.float64), tf.TensorSpec((), tf.int64)]
        signature += [tf.TensorSpec((None,), dtype) for dtype in dtypes]
        # _noinline: the caller's graph keeps one call per weight; inlined, it would be the 54 copies again
        function = self._flat_updates[key] = tf.function(
            update, input_signature=signature, autograph=False, experimental_attributes={"_noinline": True})
        return function

    def __call__(self, fraction, seeds):
        """Update every weight with drop fraction ``fraction`` and ``seeds[i]`` for weight i.

        Returns :class:`UpdateCounts`.
        """
        seeds = np.asarray(seeds, dtype=np.uint32)
        if seeds.shape != (len(self.masked_weights),):
            raise ValueError(f"Expected {len(self.masked_weights)} seeds (one per masked weight), got shape {seeds.shape}.")
        if self.grow_by == "gradient":
            written = keras.ops.convert_to_numpy(self._written())  # one small read for every weight
            if not (written > 0).all():
                self.masked_weights[int(np.argmin(written))].capture.read()  # raises, naming before_step
        counts = keras.ops.convert_to_numpy(self._function(np.float64(fraction), seeds.astype(np.int64)))
        counts = counts.astype(np.int64)
        return UpdateCounts(n_active=counts[:, 0], n_dropped=counts[:, 1], n_moved=counts[:, 2],
                            n_ever_active=counts[:, 3])
