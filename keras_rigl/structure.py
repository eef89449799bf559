"""Structures of a sparse weight: which masks are allowed, and the update that keeps them.

A structure is a small serializable object held by every :class:`keras_rigl.Masked`
layer (``Masked(layer, structure="1x4")``, ``keras_rigl.sparsify(model, sparsity,
structure="2:4")``). It answers, for one masked weight:

* ``check_shape(shape, path)``: can this weight carry the structure? (a one-line
  ValueError naming the fix if not);
* ``unit(shape)``: the active count is a multiple of this many entries (k for
  "1xk": whole blocks), ``max_density(shape)`` / ``max_active(shape)``: the
  most it can hold (N/M for "N:M"), and ``count_steps(shape)``: the counts it
  can hold, which the distributions round to (the multiples of the unit up to
  the most, unless a structure says otherwise: "1xk" over inputs that are not
  a multiple of k);
* ``initial_mask(shape, n_active, rng, scores=None)``: a NumPy bool mask with
  ``n_active`` entries on that holds the structure (random, or the largest
  ``scores`` first for ``mask_init="magnitude"``);
* ``holds(mask)``: the invariant;
* ``drop_and_grow(weight, mask, grow_scores, drop_fraction, seed, reinit_regrown,
  drop_scores=None, progress=None)``: the update as a pure NumPy function returning a
  :class:`keras_rigl.updates.UpdateResult`; the active count never changes
  (``progress``, the share of the update plan gone by, is for structures whose
  update changes over training, as ``fan_in``'s unit target).

Axis convention. The last axis of a kernel is the output unit (Dense
``(in, out)``, Conv ``(..., in, out)``) and the **input axis** is the one before
it. Blocks and groups run along the input axis, for one output unit and one
spatial position: a weight of shape ``(*spatial, in, out)`` is seen as
``rows = moveaxis(w, -1, -2).reshape(-1, in)`` (:func:`to_rows`), one row per
(spatial position, output unit), and a block/group is ``k``/``M`` consecutive
entries of a row. For a Dense kernel this is exactly TFLite's 1x4 block of a
fully-connected weight, which TFLite stores as ``(out, in)``: 4 consecutive
input features of one output row. (Keras' transposed convolutions store
``(..., out, in)``; the structure follows the layout, so there it runs along
the output channels.) Weights with fewer than two axes cannot carry a block
structure.

Which weights get it: every masked weight of a ``Masked`` layer (kernels,
recurrent kernels, pointwise kernels, embedding tables; biases are never
masked). A weight that cannot carry it is refused by name; leave that layer
dense with ``sparsify(..., exclude=[...])``.

"1xk" (:class:`Blocks`): a block of k entries is all active or all inactive.
The update ranks whole blocks by the block's summed score (|w| or the
``drop_scores`` hook for dropping, the grow score for growing) and runs the
unstructured update on those sums, so it drops ``floor(f * active blocks)``
blocks and grows as many.

Inputs that are not a multiple of k, ``n_in = q * k + r`` with ``0 < r < k``
(LeNet's 300 and 100 inputs under "1x16"): every row has q whole blocks and
then a last, shorter block of its r last inputs, all on or all off too (what
TFLite stores for a float 1x4 weight, and what the int8 export pads to a
whole 16-block). The whole blocks and the last blocks are two pools, and the
update runs on each as above on its own: ``floor(f * active whole blocks)``
whole blocks drop and as many grow, ``floor(f * active last blocks)`` last
blocks likewise (the same seed, each pool's own block indices for the
tie-break hash; a pool with every block on, or none, is left alone), so a
weight with ``a`` whole and ``b`` last blocks on keeps ``a * k + b * r``
active entries exactly. A count is a number of blocks split between the
pools in proportion to their sizes (:meth:`Blocks.count_steps`,
:class:`keras_rigl.distributions.BlockSteps`), which is what ``initial_mask``
takes and the distributions round to; a weight with fewer than k inputs (no
whole block) is refused.

"N:M" (:class:`NofM`): at most N active entries in every group of M
consecutive inputs of one output unit (a group may have fewer). The update
drops the ``k = floor(f * n_active)`` active entries with the smallest drop
score (dropping never breaks the invariant), then grows the k best inactive
entries subject to every group's remaining capacity ``N - kept``: within a
group the candidates are ranked by grow score and only the first
``capacity`` are eligible; the k largest eligible ones grow (this is the best
k-subset under the capacities). The layer density may be anything up to N/M.

Ties are broken as in :mod:`keras_rigl.updates`: by the lowbias32 hash of the
(row-layout) index under the update's seed, which the callbacks derive from
(seed, step, weight index), so an update is a pure function of its inputs.

New structures (e.g. "fan_in") subclass :class:`Structure` and are made
known to :func:`get` with :func:`register_structure`.
"""

from __future__ import annotations

import math
import re

import keras
import numpy as np

from keras_rigl import distributions, updates


# ------------------------------------------------------------------- layout
def to_rows(array):
    """``(*spatial, in, out)`` -> ``(prod(spatial) * out, in)``: one row per (position, output unit)."""
    array = np.asarray(array)
    if array.ndim < 2:
        raise ValueError(f"to_rows needs a weight with at least 2 axes (input, output), got shape {array.shape}.")
    return np.moveaxis(array, -1, -2).reshape(-1, array.shape[-2])


def from_rows(rows, shape):
    """Inverse of :func:`to_rows` for a weight of ``shape``."""
    shape = tuple(int(d) for d in shape)
    return np.moveaxis(np.asarray(rows).reshape(shape[:-2] + (shape[-1], shape[-2])), -1, -2)


def _size(shape):
    return int(math.prod(int(d) for d in shape))


# ---------------------------------------------------------------- the base
class Structure:
    """Base class: the interface every structure implements (see the module docstring)."""

    #: the name used in error messages and by :func:`get` (``spec`` adds the parameters)
    name = "structure"

    @property
    def spec(self):
        """The string :func:`get` parses back into this structure, e.g. ``"1x4"``."""
        return self.name

    def check_shape(self, shape, path="weight"):
        """Raise a one-line ValueError naming the fix if a weight of ``shape`` cannot carry this structure."""

    def _check_kernel_shape(self, shape, path, size=None, size_name=None, divisor=None):
        """``check_shape`` of the structures over a kernel's input axis (``shape[-2]``): rank >= 2 and,
        with ``size``, inputs a multiple of ``size`` (``size_name``: "block size"; ``divisor``: "a k")."""
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2:
            raise ValueError(
                f"{path} has shape {shape}: structure {self.spec!r} needs a kernel with input and output axes; "
                "leave the layer dense with sparsify(..., exclude=[...])."
            )
        if size is not None and shape[-2] % size:
            raise ValueError(
                f"{path} has {shape[-2]} inputs (shape {shape}), not a multiple of the {size_name} of structure "
                f"{self.spec!r}; leave the layer dense with sparsify(..., exclude=[...]) or choose {divisor} that "
                f"divides {shape[-2]}."
            )

    def unit(self, shape):
        """The active count of a weight of ``shape`` is a multiple of this many entries."""
        return 1

    def max_density(self, shape):
        """The largest density a weight of ``shape`` can have under this structure."""
        return 1.0

    def at_model_output(self):
        """The structure :func:`keras_rigl.sparsify` gives a layer whose output units are model outputs.

        The same structure by default; ``"fan_in"`` turns neuron ablation off there.
        """
        return self

    def max_active(self, shape):
        """The largest active count (``max_density * size``, a multiple of :meth:`unit`)."""
        unit = self.unit(shape)
        return int(math.floor(self.max_density(shape) * _size(shape) / unit + 1e-9)) * unit

    def count_steps(self, shape):
        """The achievable active counts of a weight of ``shape`` (what the distributions round to):
        by default the multiples of :meth:`unit` up to :meth:`max_active`."""
        return distributions.UnitSteps(self.unit(shape), self.max_active(shape))

    def check_count(self, shape, n_active, path="weight"):
        n_active = int(n_active)
        unit, most = self.unit(shape), self.max_active(shape)
        if n_active < 0 or n_active % unit or n_active > most:
            raise ValueError(
                f"{path}: {n_active} active entries do not fit structure {self.spec!r} (shape {tuple(shape)}): "
                f"the count must be a multiple of {unit} and at most {most}."
            )
        return n_active

    def initial_mask(self, shape, n_active, rng, scores=None):
        """A bool mask of ``shape`` with ``n_active`` entries on that holds the structure.

        ``rng``: a NumPy Generator. ``scores`` (optional, same shape): keep the
        largest first (ties at random), as ``mask_init="magnitude"`` does.
        """
        raise NotImplementedError

    def holds(self, mask):
        """True when ``mask`` (any 0/1 array) satisfies the structure."""
        raise NotImplementedError

    def drop_and_grow(self, weight, mask, grow_scores, drop_fraction, seed=0, reinit_regrown=False,
                      drop_scores=None, progress=None):
        """One update; the same contract as :func:`keras_rigl.updates.drop_and_grow`.

        ``progress``: how far through its update plan this update is (0 at the
        plan's start, 1 at ``end_step``; None outside a plan). A structure whose
        update changes over training reads it (``fan_in``'s unit target); the
        others ignore it.
        """
        raise NotImplementedError

    # ----------------------------------------------------------- plumbing
    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__, tuple(sorted(self.get_config().items()))))

    def __repr__(self):
        return f"keras_rigl.structure.get({self.spec!r})"

    # helpers for subclasses
    def _numpy_arrays(self, weight, mask):
        """``(weight, mask, active)`` as NumPy arrays, the mask checked against this structure."""
        w = updates._to_numpy(weight)
        m = updates._to_numpy(mask)
        return w, m, self._checked_mask(m, w.shape)

    def _checked_mask(self, mask, weight_shape=None):
        mask = np.asarray(updates._to_numpy(mask)) != 0
        if weight_shape is not None and mask.shape != tuple(weight_shape):
            raise ValueError(f"mask has shape {mask.shape}; it must have the weight's shape {tuple(weight_shape)}.")
        self.check_shape(mask.shape, "mask")
        if not self.holds(mask):
            raise ValueError(
                f"The mask of shape {mask.shape} does not hold structure {self.spec!r}; set masks that do "
                f"(keras_rigl.initialize_masks(..., structure={self.spec!r}) draws them)."
            )
        return mask


@keras.saving.register_keras_serializable(package="keras_rigl")
class Unstructured(Structure):
    """Any mask: today's unstructured RigL (:func:`keras_rigl.updates.drop_and_grow`)."""

    name = "unstructured"

    def initial_mask(self, shape, n_active, rng, scores=None):
        shape = tuple(int(d) for d in shape)
        size = _size(shape)
        n_active = self.check_count(shape, n_active)
        mask = np.zeros(size, dtype=bool)
        if scores is None:
            mask[rng.choice(size, size=n_active, replace=False)] = True
        else:
            # Largest score first; ties broken by a seeded random key so that a
            # constant-initialised tensor still gets a random (reproducible) mask.
            order = np.lexsort((rng.random(size), -np.asarray(scores, dtype=np.float64).reshape(-1)))
            mask[order[:n_active]] = True
        return mask.reshape(shape)

    def holds(self, mask):
        return True

    def drop_and_grow(self, weight, mask, grow_scores, drop_fraction, seed=0, reinit_regrown=False,
                      drop_scores=None, progress=None):
        return updates.drop_and_grow(weight, mask, grow_scores, drop_fraction, seed=seed,
                                     reinit_regrown=reinit_regrown, drop_scores=drop_scores)


def _check_positive(what, value, example):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}; e.g. {example!r}.")
    return int(value)


def _reduce(scores, n_rows, n_blocks, k, infinity):
    """Summed score of every block, flat (row-major over (row, block)): float32, finite.

    Each entry is sanitized as the unstructured update does (NaN -> 0, inf per
    ``infinity``), then added in float64 strictly left to right, so a device
    implementation doing the same additions gets the same bits (a tree sum may not).
    """
    entries = updates.sanitize_scores(to_rows(scores), infinity).reshape(n_rows, n_blocks, k)
    return _sum_blocks(entries)


def _sum_blocks(entries):
    """``(..., block length)`` sanitized float32 entries -> flat float32 block sums, in float64 left to right."""
    sums = entries[..., 0].astype(np.float64)
    for j in range(1, entries.shape[-1]):
        sums = sums + entries[..., j]
    return np.clip(sums, -updates.FLOAT32_MAX, updates.FLOAT32_MAX).astype(np.float32).reshape(-1)


def _reduce_pools(scores, k, infinity):
    """Inputs not a multiple of ``k``: ``(whole block sums, last block sums)``, flat, as :func:`_reduce` sums
    (whole blocks row-major over (row, block); one last block of ``inputs % k`` entries per row)."""
    rows = updates.sanitize_scores(to_rows(scores), infinity)
    cut = rows.shape[1] // k * k
    return _sum_blocks(rows[:, :cut].reshape(rows.shape[0], -1, k)), _sum_blocks(rows[:, cut:])


@keras.saving.register_keras_serializable(package="keras_rigl")
class Blocks(Structure):
    """``"1xk"``: blocks of ``k`` consecutive inputs of one output unit, all on or all off."""

    name = "1xk"

    def __init__(self, k):
        self.k = _check_positive("The block size k of structure '1xk'", k, "1x4")

    @property
    def spec(self):
        return f"1x{self.k}"

    def get_config(self):
        return {"k": self.k}

    def check_shape(self, shape, path="weight"):
        self._check_kernel_shape(shape, path)
        shape = tuple(int(d) for d in shape)
        if 0 < shape[-2] < self.k:
            raise ValueError(
                f"{path} has {shape[-2]} inputs (shape {shape}), fewer than the block size of structure "
                f"{self.spec!r} (whole blocks and then a shorter last one are fine); leave the layer dense with "
                f"sparsify(..., exclude=[...]) or choose a k of at most {shape[-2]}."
            )

    def _layout(self, shape):
        """``(rows, whole blocks per row, length of the last block: 0 when the inputs are a multiple of k)``."""
        shape = tuple(int(d) for d in shape)
        if len(shape) < 2 or shape[-2] == 0:
            return 0, 0, 0
        return _size(shape) // shape[-2], shape[-2] // self.k, shape[-2] % self.k

    def unit(self, shape):
        _, _, r = self._layout(shape)
        return self.k if r == 0 else math.gcd(self.k, r)

    def max_active(self, shape):
        _, _, r = self._layout(shape)
        return super().max_active(shape) if r == 0 else _size(shape)

    def count_steps(self, shape):
        """Whole blocks of k (and, when the inputs are not a multiple of k, last blocks of r) in steps:
        :class:`keras_rigl.distributions.BlockSteps` splits a count's blocks between the two in proportion."""
        n_rows, per_row, r = self._layout(shape)
        if r == 0:
            return super().count_steps(shape)
        return distributions.BlockSteps(self.k, n_rows * per_row, r, n_rows)

    def check_count(self, shape, n_active, path="weight"):
        n_rows, per_row, r = self._layout(shape)
        if r == 0:
            return super().check_count(shape, n_active, path)
        n_active = int(n_active)
        steps = self.count_steps(shape)
        if steps.blocks_of(n_active) is None:
            below = steps.floor(min(max(n_active, 0), _size(shape)))
            above = steps.next(below) if below < n_active else None
            nearest = f"{below} or {above}" if above is not None else f"{below}"
            raise ValueError(
                f"{path}: {n_active} active entries do not fit structure {self.spec!r} (shape {tuple(shape)}): "
                f"each row has {per_row} blocks of {self.k} inputs and a last one of {r}, and a count is a number "
                f"of blocks split between the two in proportion to their numbers; the nearest counts that fit are "
                f"{nearest} (structure.count_steps(shape) lists them)."
            )
        return n_active

    def _blocks(self, mask):
        """``(rows, blocks per row, k)`` view of a bool mask (inputs a multiple of k)."""
        rows = to_rows(np.asarray(mask) != 0)
        return rows.reshape(rows.shape[0], rows.shape[1] // self.k, self.k)

    def _pools(self, mask):
        """``(whole, last)``: ``(rows, blocks per row, k)`` and ``(rows, r)`` views of a bool mask."""
        rows = to_rows(np.asarray(mask) != 0)
        cut = rows.shape[1] // self.k * self.k
        return rows[:, :cut].reshape(rows.shape[0], -1, self.k), rows[:, cut:]

    def _expand(self, block_values, shape):
        shape = tuple(shape)
        n_rows = _size(shape) // shape[-2]
        rows = np.repeat(np.asarray(block_values).reshape(n_rows, shape[-2] // self.k), self.k, axis=1)
        return from_rows(rows, shape)

    def _expand_pools(self, whole_values, last_values, shape):
        """Flat values of the whole blocks and of the last blocks -> entries of a weight of ``shape``."""
        shape = tuple(shape)
        n_rows, per_row, r = self._layout(shape)
        whole = np.repeat(np.asarray(whole_values).reshape(n_rows, per_row), self.k, axis=1)
        last = np.repeat(np.asarray(last_values).reshape(n_rows, 1), r, axis=1)
        return from_rows(np.concatenate([whole, last], axis=1), shape)

    def holds(self, mask):
        mask = np.asarray(mask)
        if mask.ndim < 2 or (mask.shape[-2] % self.k and mask.shape[-2] < self.k):
            return False
        if mask.shape[-2] % self.k == 0:
            blocks = self._blocks(mask)
            return bool((blocks.all(axis=-1) == blocks.any(axis=-1)).all())
        whole, last = self._pools(mask)
        return bool((whole.all(axis=-1) == whole.any(axis=-1)).all() and (last.all(axis=-1) == last.any(axis=-1)).all())

    def initial_mask(self, shape, n_active, rng, scores=None):
        shape = tuple(int(d) for d in shape)
        self.check_shape(shape)
        n_active = self.check_count(shape, n_active)
        n_rows, per_row, r = self._layout(shape)
        if r:
            return self._initial_pools(shape, n_active, rng, scores)
        block_scores = None
        if scores is not None:
            block_scores = _reduce(np.abs(np.asarray(scores, np.float32)), n_rows, per_row, self.k, "zero")
        chosen = Unstructured().initial_mask((n_rows * per_row,), n_active // self.k, rng, block_scores)
        return self._expand(chosen, shape)

    def _initial_pools(self, shape, n_active, rng, scores):
        """:meth:`initial_mask` with a last, shorter block: the count's whole and last blocks drawn apart."""
        n_rows, per_row, _ = self._layout(shape)
        steps = self.count_steps(shape)
        n_whole, n_last = steps.split(steps.blocks_of(n_active))
        whole_scores = last_scores = None
        if scores is not None:
            whole_scores, last_scores = _reduce_pools(np.abs(np.asarray(scores, np.float32)), self.k, "zero")
        whole = Unstructured().initial_mask((n_rows * per_row,), n_whole, rng, whole_scores)
        last = Unstructured().initial_mask((n_rows,), n_last, rng, last_scores)
        return self._expand_pools(whole, last, shape)

    def drop_and_grow(self, weight, mask, grow_scores, drop_fraction, seed=0, reinit_regrown=False,
                      drop_scores=None, progress=None):
        w, m, on = self._numpy_arrays(weight, mask)
        shape = m.shape
        n_rows, per_row, r = self._layout(shape)
        if drop_scores is not None:
            drop_scores = updates._to_numpy(drop_scores)
            if drop_scores.shape != shape:
                raise ValueError(f"drop_scores has shape {drop_scores.shape}; it must have the mask's shape {shape}.")
        if r:
            return self._drop_and_grow_pools(w, m, on, grow_scores, drop_fraction, seed, reinit_regrown, drop_scores)
        block_active = self._blocks(on).any(axis=-1).reshape(-1)
        reduce = lambda s, infinity: _reduce(s, n_rows, per_row, self.k, infinity)  # noqa: E731
        grow = reduce(updates._to_numpy(grow_scores), "zero")
        if drop_scores is None:
            keep_weight, keep_scores = reduce(np.abs(w), "zero"), None
        else:
            keep_weight, keep_scores = np.zeros(block_active.size, np.float32), reduce(drop_scores, "clip")
        blocks = updates.drop_and_grow(keep_weight, block_active.astype(np.float32), grow, drop_fraction, seed=seed,
                                       reinit_regrown=reinit_regrown, drop_scores=keep_scores)
        return updates.UpdateResult(
            new_mask=self._expand(blocks.new_mask != 0, shape).astype(m.dtype),
            grown=self._expand(blocks.grown, shape),
            removed=self._expand(blocks.removed, shape),
            n_moved=blocks.n_moved * self.k,
            n_active=blocks.n_active * self.k,
            n_dropped=blocks.n_dropped * self.k,
        )

    def _drop_and_grow_pools(self, w, m, on, grow_scores, drop_fraction, seed, reinit_regrown, drop_scores):
        """:meth:`drop_and_grow` with a last, shorter block: the whole blocks and the last blocks are two pools,
        each updated as the blocks of a multiple of k are (same seed, its own block indices); a pool whose
        blocks are all on (or all off) is left alone, as a dense weight is."""
        shape = m.shape
        r = shape[-2] % self.k
        whole_on, last_on = self._pools(on)
        actives = (whole_on.any(axis=-1).reshape(-1), last_on.any(axis=-1))
        grows = _reduce_pools(updates._to_numpy(grow_scores), self.k, "zero")
        if drop_scores is None:
            keeps, hooks = _reduce_pools(np.abs(w), self.k, "zero"), (None, None)
        else:
            keeps = tuple(np.zeros(a.size, np.float32) for a in actives)
            hooks = _reduce_pools(drop_scores, self.k, "clip")
        results = []
        for active, grow, keep, hook in zip(actives, grows, keeps, hooks):
            movable = 0 < int(active.sum()) < active.size
            results.append(updates.drop_and_grow(keep, active.astype(np.float32), grow,
                                                 drop_fraction if movable else 0.0, seed=seed,
                                                 reinit_regrown=reinit_regrown, drop_scores=hook))
        whole, last = results
        both = lambda name: self._expand_pools(getattr(whole, name) != 0, getattr(last, name) != 0, shape)  # noqa: E731
        count = lambda name: getattr(whole, name) * self.k + getattr(last, name) * r  # noqa: E731
        return updates.UpdateResult(
            new_mask=both("new_mask").astype(m.dtype),
            grown=both("grown"),
            removed=both("removed"),
            n_moved=count("n_moved"),
            n_active=count("n_active"),
            n_dropped=count("n_dropped"),
        )


@keras.saving.register_keras_serializable(package="keras_rigl")
class NofM(Structure):
    """``"N:M"``: at most ``n`` active in every group of ``m`` consecutive inputs of one output unit."""

    name = "N:M"

    def __init__(self, n, m):
        self.n = _check_positive("N of structure 'N:M'", n, "2:4")
        self.m = _check_positive("M of structure 'N:M'", m, "2:4")
        if self.n >= self.m:
            raise ValueError(
                f"Structure '{self.n}:{self.m}' needs N below M (at most N active of every M); e.g. '2:4', "
                "or structure=None for no constraint."
            )

    @property
    def spec(self):
        return f"{self.n}:{self.m}"

    def get_config(self):
        return {"n": self.n, "m": self.m}

    def check_shape(self, shape, path="weight"):
        self._check_kernel_shape(shape, path, self.m, "group size M", "an M")

    def max_density(self, shape):
        return self.n / self.m

    def max_active(self, shape):
        return _size(shape) // self.m * self.n

    def _groups(self, array):
        rows = to_rows(array)
        return rows.reshape(-1, self.m)

    def _ungroup(self, groups, shape):
        shape = tuple(shape)
        return from_rows(np.asarray(groups).reshape(-1, shape[-2]), shape)

    def holds(self, mask):
        mask = np.asarray(mask)
        if mask.ndim < 2 or mask.shape[-2] % self.m:
            return False
        return bool(((self._groups(mask != 0)).sum(axis=1) <= self.n).all())

    @staticmethod
    def _ranks(keys):
        """Rank of every entry within its group (row of ``keys``), 0 = largest key."""
        order = np.argsort(keys, axis=1, kind="stable")[:, ::-1]
        ranks = np.empty_like(order)
        np.put_along_axis(ranks, order, np.arange(keys.shape[1])[None, :].repeat(keys.shape[0], 0), axis=1)
        return ranks

    def initial_mask(self, shape, n_active, rng, scores=None):
        shape = tuple(int(d) for d in shape)
        self.check_shape(shape)
        n_active = self.check_count(shape, n_active)
        tie = rng.random(_size(shape))
        if scores is None:
            primary = np.zeros(_size(shape))
        else:
            primary = self._groups(np.abs(np.asarray(scores, np.float64))).reshape(-1)
        # One total order (score, then a random tie-break) for both steps.
        order = np.lexsort((tie, primary))
        position = np.empty(order.size, dtype=np.int64)
        position[order] = np.arange(order.size)
        groups = position.reshape(-1, self.m)
        eligible = (self._ranks(groups) < self.n).reshape(-1)  # the n best of every group
        chosen = updates._largest(np.where(eligible, position, -1), n_active)
        return self._ungroup(chosen, shape)

    def drop_and_grow(self, weight, mask, grow_scores, drop_fraction, seed=0, reinit_regrown=False,
                      drop_scores=None, progress=None):
        w, m, on = self._numpy_arrays(weight, mask)
        shape = m.shape
        size = on.size
        active = self._groups(on).reshape(-1)
        n_active = int(active.sum())
        k = int(np.floor(float(drop_fraction) * n_active))
        if drop_scores is None:
            keep_scores, infinity = np.abs(w), "zero"
        else:
            keep_scores = updates._to_numpy(drop_scores)
            if keep_scores.shape != shape:
                raise ValueError(f"drop_scores has shape {keep_scores.shape}; it must have the mask's shape {shape}.")
            infinity = "clip"
        keep_scores = self._groups(keep_scores).reshape(-1)
        drop_keys = updates.order_keys(
            keep_scores, updates.element_hashes(size, updates.stream_key(seed, updates.STREAM_DROP)), infinity
        )
        keep = active & ~updates._largest(np.where(active, ~drop_keys, updates.EXCLUDED), k)
        grow_keys = updates.order_keys(
            self._groups(updates._to_numpy(grow_scores)).reshape(-1),
            updates.element_hashes(size, updates.stream_key(seed, updates.STREAM_GROW)),
        )
        candidates = np.where(keep, updates.EXCLUDED, grow_keys).reshape(-1, self.m)
        capacity = self.n - keep.reshape(-1, self.m).sum(axis=1)
        # capacity <= the group's candidates (n - kept <= m - kept), so every eligible entry is a candidate,
        # and there are sum(capacity) = n * groups - (n_active - k) >= k of them.
        eligible = (self._ranks(candidates) < capacity[:, None]).reshape(-1)
        grow = updates._largest(np.where(eligible, grow_keys, updates.EXCLUDED), k)
        new_active = keep | grow
        was = keep if reinit_regrown else active
        back = lambda flat: self._ungroup(flat, shape)  # noqa: E731
        return updates.UpdateResult(
            new_mask=back(new_active).astype(m.dtype),
            grown=back(grow & ~was),
            removed=back(active & ~new_active),
            n_moved=int((grow & ~active).sum()),
            n_active=n_active,
            n_dropped=k,
        )


# ---------------------------------------------------------------- registry
_NAMES: dict[str, type] = {}
_PARSERS: list = []


def register_structure(name_or_parser, cls):
    """Make a structure known to :func:`get`.

    ``name_or_parser``: a name (``"fan_in"``: ``get("fan_in")`` returns
    ``cls()``), or a callable ``spec string -> dict of keyword arguments for
    cls, or None`` (None: not this structure). Names are matched
    case-insensitively; a later registration of a name replaces the earlier one.
    """
    if not (isinstance(cls, type) and issubclass(cls, Structure)):
        raise TypeError(f"register_structure needs a keras_rigl.structure.Structure subclass, got {cls!r}.")
    if isinstance(name_or_parser, str):
        _NAMES[name_or_parser.strip().lower()] = cls
    elif callable(name_or_parser):
        _PARSERS.append((name_or_parser, cls))
    else:
        raise TypeError(f"register_structure needs a name (str) or a parser (callable), got {name_or_parser!r}.")
    return cls


def _regex_parser(pattern, names):
    compiled = re.compile(pattern)

    def parse(spec):
        found = compiled.fullmatch(spec)
        return None if found is None else {name: int(value) for name, value in zip(names, found.groups())}

    return parse


register_structure("unstructured", Unstructured)
register_structure(_regex_parser(r"1x(\d+)", ("k",)), Blocks)
register_structure(_regex_parser(r"(\d+):(\d+)", ("n", "m")), NofM)


def get(spec):
    """The :class:`Structure` named by ``spec``: None or ``"unstructured"``, ``"1xk"`` (e.g. ``"1x4"``),
    ``"N:M"`` (e.g. ``"2:4"``), a registered name, a structure's config dict, or an instance."""
    if spec is None:
        return Unstructured()
    if isinstance(spec, Structure):
        return spec
    if isinstance(spec, dict):
        return keras.saving.deserialize_keras_object(spec)
    if not isinstance(spec, str):
        raise TypeError(
            f"structure must be None, a string such as '1x4' or '2:4', or a keras_rigl.structure.Structure; "
            f"got {type(spec).__name__}."
        )
    text = spec.strip().lower().replace(" ", "")
    if text in _NAMES:
        return _NAMES[text]()
    for parser, cls in _PARSERS:
        arguments = parser(text)
        if arguments is not None:
            return cls(**arguments)
    known = ", ".join(repr(n) for n in ["unstructured", "1x4", "2:4", *[n for n in _NAMES if n != "unstructured"]])
    raise ValueError(f"Unknown structure {spec!r}; use one of {known} (any '1xk' or 'N:M'), or None.")


def serialize(structure):
    """Config of a structure for a layer's ``get_config`` (None for unstructured: old files stay the same)."""
    structure = get(structure)
    return None if isinstance(structure, Unstructured) else keras.saving.serialize_keras_object(structure)
