"""Dynamic sparse training callbacks: Static, SET, RigL and SNFS.

One mechanism, small variations (as in jaxpruner). :class:`SparseTraining`
is the neutral base: it owns the update plan (when), the hooks for
``model.fit`` and custom loops, the drop-and-grow of all masked weights, the
optimizer-state reset and the logs. A method is the pair of scores it ranks
connections by:

=========  ==========================  ===================================
class      drop score (keep largest)   grow score (grow largest)
=========  ==========================  ===================================
Static     (never updates)             (never updates)
SET        |w| (base)                  uniform random
RigL       |w| (base)                  |dense gradient| of the update batch
SNFS       |w| (base)                  |EMA of the dense gradient|
=========  ==========================  ===================================

A new method is a subclass overriding :meth:`SparseTraining.drop_scores`
and/or :meth:`SparseTraining.grow_scores` (see README, "Writing your own
method"). The callback only decides *when*; the math is in
:mod:`keras_rigl.updates`. The same two hooks the callback uses,
:meth:`SparseTraining.before_step` and :meth:`SparseTraining.after_step`,
drive a custom ``tf.GradientTape`` loop.

Steps are optimizer steps (``optimizer.iterations``), never batches.

Repeated ``fit`` calls and resume. Without an explicit ``end_step`` every
``fit`` plans its updates over its own planned run: the plan starts at
``optimizer.iterations - initial_epoch * steps_per_epoch`` and lasts
``epochs * steps_per_epoch`` steps (``epochs`` as passed to ``fit``, i.e.
counting the epochs before ``initial_epoch``). So ``fit(epochs=4,
initial_epoch=2)`` on a model saved after ``fit(epochs=2)`` replays the plan
of an uninterrupted ``fit(epochs=4)``, while a second plain ``fit(epochs=2)``
plans (and decays) its updates afresh over its own 2 epochs. With an
explicit ``end_step`` the plan is absolute in optimizer steps and the same
for every ``fit``. Either way, a ``fit`` in which no update step falls warns
"no mask update".
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import keras
import numpy as np
from keras import ops

from keras_rigl import (
    _compat, backend_capture, counting, gradient_capture, optimizer_state, schedule, updates, validation,
)
from keras_rigl.sparsify import masked_layers
from keras_rigl.structure import Unstructured

logger = logging.getLogger("keras_rigl")

GROW_INITS = ("zeros", "random")
UPDATE_COLUMNS = ["step", "layer", "weight", "drop_fraction", "n_active", "n_dropped", "n_moved", "sparsity"]

_INITIALIZER_ATTRS = {
    "recurrent_kernel": "recurrent_initializer",
    "embeddings": "embeddings_initializer",
    "pointwise_kernel": "pointwise_initializer",
    "depthwise_kernel": "depthwise_initializer",
}


@dataclasses.dataclass
class UpdateItem:
    """One masked weight to update, with the scores its method ranks connections by."""

    layer: object  # the keras_rigl.Masked layer
    masked_weight: object  # its MaskedWeight
    seed: int  # from (callback seed, step, weight index): the same in a resumed run
    drop_scores: object  # same shape as the weight; larger = keep
    grow_scores: object  # same shape as the weight; larger = grow first


class _DeviceEverActive:
    """ITOP bookkeeping of one weight kept on the device by the compiled update: its size and count."""

    def __init__(self, size, count, update, index):
        self.size, self._count, self._update, self._index = size, count, update, index

    def sum(self):
        return self._count

    def value(self):
        """The record as the update keeps it (a device array: nothing read to the host)."""
        return ops.convert_to_tensor(self._update.ever_active[self._index])


def _accumulation_steps(optimizer):
    """``gradient_accumulation_steps`` of ``optimizer`` (or of the one a LossScaleOptimizer wraps), 0 if none."""
    for candidate in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        steps = getattr(candidate, "gradient_accumulation_steps", None)
        if steps:
            return int(steps)
    return 0


class SparseTraining(keras.callbacks.Callback):
    """Base of the sparse-training callbacks: the mechanism, no method of its own.

    Subclasses choose the scores (:meth:`drop_scores`, :meth:`grow_scores`),
    which gradient they need (``gradient_mode``) and whether a connection
    dropped and regrown in one update starts afresh (``reinit_regrown``).

    Args:
        update_freq: ΔT, optimizer steps between mask updates.
        drop_fraction: fraction of each weight's active connections moved at
            an update: a float in (0, 1] decayed by ``decay`` to 0 at
            ``end_step``; a callable ``step -> fraction`` of the optimizer
            step; or a :class:`keras_rigl.DropFractionSchedule` (serializable).
        decay: ``"cosine"`` (paper), ``"linear"`` or ``"constant"``; only for
            a float ``drop_fraction``.
        begin_step: first step at which updates may happen, counted from the
            start of the plan.
        end_step: last step of updates (inclusive), in absolute optimizer
            steps. Default: ``end_fraction`` of the planned steps of each
            ``fit`` (see the module notes on repeated fit and resume).
        end_fraction: see ``end_step`` (0.75 as in the paper).
        grow_init: ``"zeros"`` (paper) or ``"random"`` (the layer's
            initializer) for grown connections.
        seed: int >= 0 (None: drawn once); masks depend only on (seed, step,
            weight), so a resumed run makes the same updates as an
            uninterrupted one (see README for the exact conditions).
        reset_optimizer_state: reset the optimizer state of grown and dropped
            connections (momentum, Adam moments, accumulators, the EMA of
            ``use_ema``...). Keep True unless your optimizer keeps factored
            state (Adafactor), which is refused otherwise.
        log_dir: if given, a TensorBoard writer records per-weight sparsity
            and the number of connections moved at each update.
        compiled: how an update runs. ``None`` (default): as one compiled
            function on the device (:mod:`keras_rigl.compiled_update`)
            whenever the method allows it (TensorFlow backend, or JAX on a
            GPU/TPU with :mod:`keras_rigl.compiled_update_jax`; the built-in
            drop and grow scores, ``grow_init="zeros"``), else in NumPy.
            ``True``: always compiled (an error says why it cannot be).
            ``False``: the NumPy reference (:func:`keras_rigl.updates.drop_and_grow`).
            Both select the same masks for the same seed.
            Weights with a structure (``sparsify(..., structure="1x4")``):
            "1xk" and "N:M" run compiled too
            (:mod:`keras_rigl.compiled_structure`, the same masks as their
            NumPy ``drop_and_grow``); a model with a structure that has no
            compiled update runs its whole update in NumPy (logged once per
            callback at INFO on the ``"keras_rigl"`` logger; ``compiled=True``
            is refused).
    """

    #: which gradient the grow score needs: off, this step's, or its EMA
    gradient_mode = gradient_capture.MODE_OFF
    #: a connection dropped and regrown in one update starts afresh
    reinit_regrown = True
    #: False for methods that keep the initial masks (Static)
    changes_masks = True

    def __init__(
        self,
        update_freq=100,
        drop_fraction=0.3,
        decay="cosine",
        begin_step=0,
        end_step=None,
        end_fraction=0.75,
        grow_init="zeros",
        seed=0,
        reset_optimizer_state=True,
        log_dir=None,
        compiled=None,
    ):
        super().__init__()
        update_freq, drop_fraction, decay, begin_step, end_step = schedule.validate(
            update_freq, drop_fraction, decay, begin_step, end_step
        )
        self.update_freq = update_freq
        self.drop_fraction = drop_fraction
        self.decay = decay
        self.begin_step = begin_step
        self.end_step = end_step
        self.end_fraction = validation.check_number(
            "end_fraction", end_fraction, 0.0, 1.0, low_open=True, hint=" (share of training with updates)"
        )
        self.grow_init = validation.check_choice("grow_init", grow_init, GROW_INITS)
        seed = validation.check_seed(seed)
        self.seed = int(seed if seed is not None else np.random.SeedSequence().entropy % 2**31)
        self.reset_optimizer_state = validation.check_bool("reset_optimizer_state", reset_optimizer_state)
        if log_dir is not None and not isinstance(log_dir, (str, bytes)) and not hasattr(log_dir, "__fspath__"):
            raise ValueError(f"log_dir must be a directory path or None, got {log_dir!r}.")
        self.log_dir = None if log_dir is None else str(log_dir)
        self.compiled = None if compiled is None else validation.check_bool("compiled", compiled)
        self._compiled_update = None
        self._compiled_key = None
        self._structure_logged = False
        self._plain_function = None
        self._updating_model = None
        self.schedule = None
        self.step = None
        self._rows = []
        self._ever_active = {}
        self._writer = None
        self._sparsity = None
        self._itop = 0.0
        self._counted = None
        self._read_step = self._unread = 0  # TensorFlow: the last optimizer step read, batches since
        self._steps_per_batch = 1
        self._planned = False

    # ------------------------------------------------------------ variations
    def drop_scores(self, layer, masked_weight, seed):
        """Scores for keeping; the active connections with the smallest are dropped.

        Base (the paper, all methods here): |w|. Return an array or tensor of
        the weight's shape. ``layer`` is the ``Masked`` layer, ``masked_weight``
        its :class:`keras_rigl.masked.MaskedWeight` (``.weight``, ``.mask``,
        ``.capture``), ``seed`` an int for any randomness.
        """
        return ops.abs(masked_weight.weight)

    def grow_scores(self, layer, masked_weight, seed):
        """Scores for growing; the inactive connections with the largest grow first."""
        raise NotImplementedError(
            f"{type(self).__name__} changes masks but defines no grow_scores(layer, masked_weight, seed); "
            "subclass SET, RigL or SNFS, or implement it."
        )

    # ------------------------------------------------------------- schedule
    def build_schedule(self, total_steps=None, plan_start=0):
        """Plan the updates of a run of ``total_steps`` optimizer steps starting at ``plan_start``.

        Returns the :class:`keras_rigl.schedule.UpdateSchedule` (None for a
        method that never changes masks).
        """
        if not self.changes_masks:
            self.schedule = None
            return None
        plan_start = int(plan_start)
        end_step = self.end_step
        if end_step is None:
            if not total_steps:
                raise ValueError(
                    f"{type(self).__name__} cannot tell when to stop updating masks: the number of training "
                    "steps is unknown (an infinite or unsized dataset). Pass end_step=... or steps_per_epoch "
                    "to model.fit."
                )
            end_step = plan_start + max(self.begin_step + 1, int(self.end_fraction * total_steps))
        else:
            plan_start = 0  # an explicit end_step is absolute: the same plan for every fit
        self.schedule = schedule.UpdateSchedule(
            self.update_freq, self.drop_fraction, end_step, self.begin_step, self.decay, plan_start
        )
        return self.schedule

    def is_update_step(self, step):
        return self.schedule is not None and self.schedule.is_update_step(step)

    def drop_fraction_at(self, step):
        """The drop fraction of an update at ``step`` (0 outside the plan)."""
        return self.schedule.fraction(step) if self.schedule is not None else 0.0

    # ------------------------------------------------- hooks (callback / loop)
    def attach(self, model, total_steps=None, step=0, plan_start=0):
        """Check ``model``, plan the updates and set up; ``model.fit`` does this at its start.

        For a custom loop: ``total_steps`` is the planned number of optimizer
        steps (not needed with ``end_step``), ``step`` the optimizer step
        now, ``plan_start`` the step at which the planned run began.
        """
        total_steps = validation.check_optional_int("total_steps", total_steps, 1, hint=" (planned optimizer steps)")
        step = validation.check_int("step", step, 0, hint=" (the optimizer step now)")
        plan_start = validation.check_int("plan_start", plan_start, hint=" (the step the planned run began at)")
        layers = masked_layers(model)
        if not layers:
            raise ValueError(
                f"{type(self).__name__} found no keras_rigl.Masked layer in model {model.name!r}. "
                "Make the model sparse first: model = keras_rigl.sparsify(model, sparsity=...)."
            )
        if self.gradient_mode != gradient_capture.MODE_OFF:
            missing = [l.name for l in layers if not l.can_capture_gradients]
            if missing:
                raise ValueError(
                    f"{type(self).__name__} grows by the dense gradient, which these layers do not capture: "
                    f"{missing}. Use Masked(..., capture_gradients=True) (the default) on the TensorFlow, JAX or "
                    "PyTorch backend."
                )
        self.build_schedule(total_steps, plan_start)
        self._start_counting(step)
        for layer in layers:
            for mw in layer.masked_weights:
                self._record_active(mw)
        if self.gradient_mode != gradient_capture.MODE_OFF:
            # A custom loop's step, traced after this, carries the capture behind
            # its switch; model.fit swaps in branch-free step functions instead.
            for layer in layers:
                layer.set_capture_trace(gradient_capture.TRACE_SWITCH)
        if self.gradient_mode == gradient_capture.MODE_EMA:
            for layer in layers:
                layer.set_capture_mode(gradient_capture.MODE_EMA, ema_decay=self.ema_decay)
        if self.log_dir and self._writer is None:
            from keras_rigl import tensorboard

            self._writer = tensorboard.UpdateWriter(self.log_dir)
        return layers

    def before_step(self, model, step):
        """Call before optimizer step ``step`` (1-based): switches gradient capture on if needed."""
        if self.gradient_mode == gradient_capture.MODE_STORE and self.is_update_step(step):
            for layer in masked_layers(model):
                layer.set_capture_mode(gradient_capture.MODE_STORE)

    def after_step(self, model, step, optimizer=None):
        """Call after optimizer step ``step``: updates the masks if it is an update step."""
        if self.gradient_mode == gradient_capture.MODE_EMA:
            backend_capture.accumulate(masked_layers(model))  # JAX/PyTorch: SNFS's moving average, every step
        if not self.is_update_step(step):
            return []
        rows = self.update_masks(model, step, optimizer)
        if self.gradient_mode == gradient_capture.MODE_STORE:
            for layer in masked_layers(model):
                layer.set_capture_mode(gradient_capture.MODE_OFF)
        return rows

    # ---------------------------------------------------------- the update
    def update_masks(self, model, step, optimizer=None):
        """Drop and grow in every masked weight of ``model`` now (step ``step``).

        Gathers the scores of every sparse weight through the hooks, hands
        them all to :meth:`_drop_and_grow_all`, then does the bookkeeping
        (update rows, ITOP, TensorBoard). Returns the new rows.
        """
        fraction = self.drop_fraction_at(step) if self.schedule is not None else self._float_fraction()
        on_device = self._runs_compiled(masked_layers(model)) is not None
        self._updating_model = model
        items = []
        index = 0
        for layer in masked_layers(model):
            for mw in layer.masked_weights:
                index += 1
                seed = int(np.random.SeedSequence([self.seed, int(step), index]).generate_state(1)[0])
                if on_device:
                    # Scores are made on the device, and dense or empty weights
                    # left alone there: no mask crosses to the host.
                    items.append(UpdateItem(layer, mw, seed, None, None))
                    continue
                n_active = int(np.count_nonzero(ops.convert_to_numpy(mw.mask)))
                if n_active in (0, int(np.prod(mw.mask.shape))):
                    continue  # a dense (or empty) weight has nothing to move
                items.append(
                    UpdateItem(layer, mw, seed, self.drop_scores(layer, mw, seed), self.grow_scores(layer, mw, seed))
                )
        self._counted = None  # (active, total) after the update, where the compiled update counted them
        results = self._drop_and_grow_all(items, fraction, step, optimizer)
        rows = []
        for position, (item, result) in enumerate(zip(items, results)):
            if result is None:
                continue  # dense or empty (device path)
            if on_device:
                self._ever_active[id(item.masked_weight.mask)] = _DeviceEverActive(
                    int(np.prod(item.masked_weight.mask.shape)), result.n_ever_active, self._compiled_update, position
                )
            else:
                self._record_active(item.masked_weight)
            rows.append(
                {
                    "step": int(step),
                    "layer": item.layer.layer.name,
                    "weight": item.masked_weight.name,
                    "drop_fraction": fraction,
                    "n_active": result.n_active,
                    "n_dropped": result.n_dropped,
                    "n_moved": result.n_moved,
                    "sparsity": 1.0 - result.n_active / int(np.prod(item.masked_weight.mask.shape)),
                }
            )
        self._rows.extend(rows)
        if self._writer is not None:
            self._writer.write(step, rows)
        return rows

    def _drop_and_grow_all(self, items, fraction, step, optimizer=None):
        """THE SEAM: drop and grow in every item's weight, write masks, weights and optimizer state.

        Args:
            items: list of :class:`UpdateItem` (only weights that are neither
                dense nor empty), with the scores the method's hooks returned.
            fraction: the drop fraction of this update (the same for all).
            step: the optimizer step of this update.
            optimizer: the optimizer whose state of grown/dropped connections
                is reset (when ``reset_optimizer_state``), or None.

        Returns:
            one object per item with ``n_active``, ``n_dropped`` and
            ``n_moved`` (an :class:`keras_rigl.updates.UpdateResult`).

        On return the masks, the weights (grown ones initialised by
        ``grow_init``, removed ones 0) and the optimizer slots are written.
        This reference body runs :func:`keras_rigl.updates.drop_and_grow` in
        NumPy weight by weight. When the update runs compiled (see
        ``compiled``), the items carry no scores (the device makes them),
        include dense and empty weights, and the result of those is None.
        """
        if self._runs_compiled([item.layer for item in items]) is not None and all(
            item.grow_scores is None for item in items
        ):
            return self._drop_and_grow_all_compiled(items, fraction, optimizer)
        results = []
        progress = self.schedule.progress(step) if self.schedule is not None else None
        for item in items:
            mw = item.masked_weight
            # The layer's structure ranks and keeps its invariant (unstructured: updates.drop_and_grow).
            result = item.layer.structure.drop_and_grow(
                mw.weight,
                mw.mask,
                item.grow_scores,
                fraction,
                seed=item.seed,
                reinit_regrown=self.reinit_regrown,
                drop_scores=item.drop_scores,
                progress=progress,
            )
            updates.apply_update(mw.weight, mw.mask, result, self._grow_values(item.layer, mw, result, item.seed))
            if self.reset_optimizer_state and optimizer is not None:
                optimizer_state.reset_slots(optimizer, mw.weight, result.grown | result.removed)
            results.append(result)
        return results

    def _runs_compiled(self, layers):
        """:meth:`_compiled_grow_by`, and None when a layer's structure has no compiled update."""
        from keras_rigl import compiled_structure

        grow_by = self._compiled_grow_by()
        if grow_by is None:
            return None
        on_jax = keras.backend.backend() == "jax"  # the JAX update (compiled_update_jax) is unstructured only
        structured = [f"{layer.name} ({layer.structure.spec})" for layer in layers
                      if not compiled_structure.supported(layer.structure)
                      or (on_jax and not isinstance(layer.structure, Unstructured))]
        if not structured:
            return grow_by
        if self.compiled:
            raise ValueError(
                f"{type(self).__name__}(compiled=True) cannot run compiled: the structures of layers "
                f"{structured[:3]} have no compiled update. Pass compiled=None (compiled when possible) or False."
            )
        if not self._structure_logged:
            logger.info("%s: layers %s have structures without a compiled update: the mask update runs in NumPy "
                        "(structure.drop_and_grow).",
                        type(self).__name__, structured[:3])
            self._structure_logged = True
        return None

    def _compiled_grow_by(self):
        """``"gradient"``/``"random"`` when this update runs compiled, else None (NumPy)."""
        if self.compiled is False:
            return None
        if self.compiled is None and keras.backend.backend() == "jax":
            import jax

            # The JAX update sorts every entry of every weight (static shapes): a
            # fraction of a step on a GPU, but measured 5-8x slower than NumPy on a CPU.
            if jax.default_backend() == "cpu":
                return None
        cls = type(self)
        reasons = []
        if not (gradient_capture.available() or keras.backend.backend() == "jax"):
            reasons.append(f"backend {keras.backend.backend()!r} (needs tensorflow or jax)")
        if cls.drop_scores is not SparseTraining.drop_scores:
            reasons.append("a drop_scores hook of its own")
        if cls.grow_scores is RigL.grow_scores:
            grow_by = "gradient"
        elif cls.grow_scores is SET.grow_scores:
            grow_by = "random"
        else:
            grow_by = None
            reasons.append("a grow_scores hook of its own")
        if self.grow_init != "zeros":
            reasons.append(f"grow_init={self.grow_init!r}")
        if reasons:
            if self.compiled:
                raise ValueError(
                    f"{cls.__name__}(compiled=True) cannot run compiled: {', '.join(reasons)}. "
                    "Pass compiled=None (compiled when possible) or False."
                )
            return None
        return grow_by

    def _drop_and_grow_all_compiled(self, items, fraction, optimizer):
        from keras_rigl import compiled_update

        weights = [item.masked_weight for item in items]
        layer_structures = [item.layer.structure for item in items]
        structured = any(not isinstance(s, Unstructured) for s in layer_structures)
        key = (tuple(id(mw.mask) for mw in weights), id(optimizer), self._compiled_grow_by(), self.reinit_regrown,
               self.reset_optimizer_state, tuple(s.spec for s in layer_structures))
        if self._compiled_update is None or self._compiled_key != key:
            # Kept on the model: a new callback (every fit, every benchmark round)
            # reuses the traced function instead of tracing it again.
            model = self._updating_model
            cache = getattr(model, "_keras_rigl_compiled_updates", None)
            if cache is None:
                cache = {}
                object.__setattr__(model, "_keras_rigl_compiled_updates", cache)
            if key not in cache:
                from keras_rigl import compiled_structure

                kind = compiled_update.CompiledUpdate
                extra = {}
                if keras.backend.backend() == "jax":  # unstructured only (see _runs_compiled)
                    from keras_rigl.compiled_update_jax import CompiledUpdateJax as kind
                elif structured:  # the structures' own selections; unstructured weights as before
                    kind, extra = compiled_structure.StructuredCompiledUpdate, {"structures": layer_structures}
                cache[key] = kind(
                    weights,
                    **extra,
                    grow_by=self._compiled_grow_by(),
                    reinit_regrown=self.reinit_regrown,
                    optimizer=optimizer,
                    reset_optimizer_state=self.reset_optimizer_state,
                    track_ever_active=True,
                )
            self._compiled_update = cache[key]
            self._compiled_key = key
            self._compiled_update.reset_ever_active([self._ever_active_value(mw) for mw in weights])
        counts = self._compiled_update(fraction, [item.seed for item in items])
        # every masked weight is an item here, and an update keeps each one's count: the sparsity log for free
        sizes = [int(np.prod(item.masked_weight.mask.shape)) for item in items]
        self._counted = (int(counts.n_active.sum()), sum(sizes))
        results = []
        for i, size in enumerate(sizes):
            if counts.n_active[i] in (0, size):
                results.append(None)
                continue
            results.append(
                updates.UpdateCounts(
                    n_active=int(counts.n_active[i]),
                    n_dropped=int(counts.n_dropped[i]),
                    n_moved=int(counts.n_moved[i]),
                    n_ever_active=int(counts.n_ever_active[i]),
                )
            )
        return results

    def _ever_active_value(self, mw):
        """The ever-active record of ``mw`` as a device array (bool), or None."""
        value = self._ever_active.get(id(mw.mask))
        return value.value() if isinstance(value, _DeviceEverActive) else value

    def _float_fraction(self):
        if callable(self.drop_fraction):
            raise ValueError(
                "update_masks() outside a plan needs a float drop_fraction; call attach(model, ...) first."
            )
        return self.drop_fraction

    def _grow_values(self, layer, mw, result, seed):
        if self.grow_init == "zeros":
            return None
        owner, attr = mw.ref.owner, mw.name.rsplit("/", 1)[-1]
        initializer = getattr(owner, _INITIALIZER_ATTRS.get(attr, "kernel_initializer"), None)
        shape = tuple(mw.weight.shape)
        if initializer is not None:
            config = initializer.get_config()
            if "seed" in config:
                config["seed"] = seed % 2**31
            return keras.initializers.get({"class_name": initializer.__class__.__name__, "config": config})(shape, dtype=mw.weight.dtype)
        w = ops.convert_to_numpy(mw.weight)
        std = float(w[ops.convert_to_numpy(mw.mask) != 0].std() or 0.01)
        return np.random.default_rng(seed).normal(0, std, shape).astype(w.dtype)

    def _record_active(self, mw):
        # On the device: a fit start or an update reads no mask to the host.
        current = ops.not_equal(mw.mask.value, 0)
        previous = self._ever_active_value(mw)
        self._ever_active[id(mw.mask)] = current if previous is None else ops.logical_or(previous, current)

    # -------------------------------------------------------------- reports
    @property
    def updates(self):
        """One row per masked weight per mask update (pandas DataFrame)."""
        import pandas as pd

        return pd.DataFrame(self._rows, columns=UPDATE_COLUMNS)

    def current_sparsity(self, model):
        """Sparsity over the masked weights of ``model`` (counted by :func:`keras_rigl.count_active`)."""
        counted = self._count_active_on_device(model)
        if counted is None:  # no masks, or one holding a value other than 0 and 1: count_active says which
            counted = counting.count_active(model)
        active, total = counted
        return 1.0 - active / total if total else 0.0

    @staticmethod
    def _count_active_on_device(model):
        """``(active, total)`` as :func:`keras_rigl.count_active`, reading two numbers instead of every mask.

        None when a mask holds a value other than 0 and 1: ``count_active`` then says which.
        """
        masks = [mw.mask.value for layer in masked_layers(model) for mw in layer.masked_weights]
        if not masks:
            return None
        active = bad = 0
        for mask in masks:
            active = ops.add(active, ops.sum(ops.cast(ops.not_equal(mask, 0), "int32")))
            bad = ops.add(bad, ops.sum(ops.cast(ops.logical_and(ops.not_equal(mask, 0), ops.not_equal(mask, 1)), "int32")))
        active, bad = ops.convert_to_numpy(ops.stack([active, bad])).tolist()
        if bad:
            return None
        return int(active), sum(int(np.prod(mask.shape)) for mask in masks)

    def itop_rate(self):
        """In-time over-parameterisation: share of masked weights ever active so far."""
        records = list(self._ever_active.values())
        total = sum(m.size if isinstance(m, _DeviceEverActive) else int(np.prod(m.shape)) for m in records)
        if not total:
            return 0.0
        # the compiled update's records know their count; the others are summed on the device and read once
        host = sum(m.sum() for m in records if isinstance(m, _DeviceEverActive))
        on_device = [ops.sum(ops.cast(m, "int32")) for m in records if not isinstance(m, _DeviceEverActive)]
        if on_device:
            host += int(ops.convert_to_numpy(ops.sum(ops.stack(on_device))))
        return float(host / total)

    def _log_values(self, model):
        step = self.step or 0
        return {
            "sparsity": self._sparsity if self._sparsity is not None else self.current_sparsity(model),
            "drop_fraction": self.drop_fraction_at(step),
            "itop": self._itop,
        }

    # --------------------------------------------------- keras callback API
    def on_train_begin(self, logs=None):
        model = self.model
        steps_per_execution = int(getattr(model, "steps_per_execution", 1) or 1)
        if steps_per_execution > 1 and self.changes_masks:
            # The callback sees one batch hook per execution: an update step
            # inside an execution would be missed or made late.
            raise ValueError(
                f"{type(self).__name__} updates masks between optimizer steps and needs "
                f"steps_per_execution=1 in model.compile (got {steps_per_execution})."
            )
        accumulation = _accumulation_steps(model.optimizer)
        if accumulation and self.changes_masks and self.gradient_mode != gradient_capture.MODE_OFF \
                and backend_capture.available():
            # Keras accumulates the probes (overwrite_with_gradient variables) by an element-wise maximum (with 0) over
            # the micro-batches, not a sum: the grow score would be silently wrong.
            raise ValueError(
                f"gradient_accumulation_steps is not supported with RigL/SNFS on {keras.backend.backend()} "
                f"(got {accumulation}); drop it and raise batch_size instead, or train on TensorFlow "
                "(which grows from the update step's last micro-batch)."
            )
        # JAX counts batches instead of reading optimizer.iterations: only right when a batch is a step.
        self._batch_is_step = not accumulation
        self._steps_per_batch = steps_per_execution  # > 1 only for callbacks that never change masks (Static)
        self._planned = False
        self._plain_function = None
        self._start_counting(self._optimizer_step(model))

    def on_epoch_begin(self, epoch, logs=None):
        if self._planned:
            return
        # Planned here, not in on_train_begin: the first epoch of this fit is
        # its initial_epoch, which the plan of a resumed run needs.
        model = self.model
        params = self.params or {}
        epochs, steps = params.get("epochs"), params.get("steps")
        total = epochs * steps if epochs and steps else None
        step = self._optimizer_step(model)
        plan_start = step - epoch * steps if steps else step
        self.attach(model, total_steps=total, step=step, plan_start=plan_start)
        self._planned = True
        self._begin_fit_capture(model)
        self._sparsity = self.current_sparsity(model)
        self._itop = self.itop_rate()
        if self.schedule is not None:
            last = step + (epochs - epoch) * steps if epochs and steps else None
            if (last is not None and not self.schedule.update_steps(last, step + 1)) or self.schedule.end_step <= step:
                plan = self.schedule
                first = plan.plan_start + (plan.begin_step or plan.update_freq)
                warnings.warn(
                    f"{type(self).__name__}: no mask update in this fit (optimizer steps {step + 1}.."
                    f"{last if last is not None else '?'}; updates every {plan.update_freq} steps from step "
                    f"{first} up to end_step {plan.end_step}): the masks stay as they are. Lower update_freq, "
                    "raise end_step/end_fraction, or train longer.",
                    stacklevel=2,
                )

    def _model_at(self, step):
        """The model for the hooks of ``step``: on JAX synced only when the step reads or writes variables."""
        if keras.backend.backend() != "jax" or self.is_update_step(step) or self.gradient_mode == gradient_capture.MODE_EMA:
            return self.model
        return _compat.model_without_state_sync(self)

    def on_train_batch_begin(self, batch, logs=None):
        model = self._model_at(self.step + 1)
        self.before_step(model, self.step + 1)
        if self._plain_function is not None and self.gradient_mode == gradient_capture.MODE_STORE:
            if self.is_update_step(self.step + 1):
                self._use_step_function(model, gradient_capture.TRACE_STORE)

    def on_train_batch_end(self, batch, logs=None):
        if self._plain_function is not None and self.gradient_mode == gradient_capture.MODE_STORE:
            self._use_step_function(self.model, gradient_capture.TRACE_OFF)
        if keras.backend.backend() == "jax" and getattr(self, "_batch_is_step", True):
            # Batches: reading optimizer.iterations would sync every variable each batch
            # (see _compat.model_without_state_sync); steps_per_execution is 1 here.
            step = self.step + 1
        elif keras.backend.backend() == "tensorflow":
            step = self._step_after_batch()
            if step is None:
                step = self.step  # read: every step since the last read was skipped (nothing happened)
        else:
            # Optimizer steps, not batches: a step skipped by a LossScaleOptimizer
            # does not advance the plan (and never updates twice).
            step = self._optimizer_step(self.model)
        if step != self.step:
            self.step = step
            model = self._model_at(step)
            if self.after_step(model, step, model.optimizer):
                counted = self._counted
                self._sparsity = self.current_sparsity(model) if counted is None else 1.0 - counted[0] / counted[1]
                self._itop = self.itop_rate()
        if logs is not None:
            logs.update(self._log_values(_compat.model_without_state_sync(self)))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self._log_values(self.model))

    def on_train_end(self, logs=None):
        if self.gradient_mode != gradient_capture.MODE_OFF:
            if self._plain_function is not None:
                self._use_step_function(self.model, gradient_capture.TRACE_OFF)
                self._plain_function = None
            for layer in masked_layers(self.model):
                layer.set_capture_mode(gradient_capture.MODE_OFF)

    # ------------------------------------------- capture without a per-step branch
    # In model.fit the dense gradient is captured by step functions of their
    # own: ordinary steps run the model's step traced with plain W * M (no
    # custom gradient, no tf.cond), RigL's update steps a second one that
    # always stores the gradient, SNFS every step one that always updates the
    # moving average. Each is traced once per compiled model and kept on it.
    def _begin_fit_capture(self, model):
        self._plain_function = None
        if self.gradient_mode == gradient_capture.MODE_OFF or not self.changes_masks:
            return
        if not gradient_capture.available():
            return  # JAX/PyTorch: the probes capture in the model's own step (backend_capture)
        current = _compat.current_train_function(model)
        cache = getattr(model, "_keras_rigl_step_functions", None)
        if cache is not None and any(current is f for f in cache[1].values()):
            current = cache[0]  # a fit interrupted inside a capture step left that step in place
        self._plain_function = current
        trace = gradient_capture.TRACE_EMA if self.gradient_mode == gradient_capture.MODE_EMA else gradient_capture.TRACE_OFF
        self._use_step_function(model, trace)

    def _use_step_function(self, model, trace):
        """Run the following steps with the step function traced with capture ``trace``."""
        for layer in masked_layers(model):
            layer.set_capture_trace(trace)
        if trace == gradient_capture.TRACE_OFF:
            _compat.set_train_function(model, self._plain_function)
            return
        cache = getattr(model, "_keras_rigl_step_functions", None)
        if cache is None or cache[0] is not self._plain_function:  # recompiled: new functions
            cache = (self._plain_function, {})
            object.__setattr__(model, "_keras_rigl_step_functions", cache)
        if trace not in cache[1]:
            cache[1][trace] = _compat.new_train_function(model)
        _compat.set_train_function(model, cache[1][trace])

    @staticmethod
    def _optimizer_step(model):
        return int(ops.convert_to_numpy(model.optimizer.iterations))

    def _start_counting(self, step):
        self.step = self._read_step = int(step)
        self._unread = 0

    def _step_after_batch(self):
        """The optimizer step after a batch, reading ``optimizer.iterations`` only where it matters (TensorFlow).

        A read waits for the step to finish, which costs a step's overlap of
        host and device every batch. A batch advances the step by at most one
        (a LossScaleOptimizer skips some), so ``last read + batches since`` is
        an upper bound: while no update step can lie before the next batch's
        step, the bound is used (exact unless steps were skipped, and then only
        the logs' drop_fraction lags); otherwise the step is read, so updates
        and the capture switch of the step before them happen at exact
        optimizer steps. With ``steps_per_execution > 1`` (allowed for Static
        only) a batch is several steps, and every batch reads. Returns None
        where a read shows no step was taken.
        """
        self._unread += 1
        upper = self._read_step + self._unread
        following = self.schedule.next_update_after(self._read_step) if self.schedule is not None else None
        if self._steps_per_batch == 1 and (following is None or following > upper + 1):
            return upper
        actual = self._optimizer_step(self.model)
        progressed = actual > self._read_step
        self._read_step, self._unread = actual, 0
        if not progressed:
            self.step = actual
            return None
        return actual

    # -------------------------------------------------------- serialization
    def get_config(self):
        drop_fraction = self.drop_fraction
        if callable(drop_fraction):
            drop_fraction = keras.saving.serialize_keras_object(drop_fraction)
        return {
            "update_freq": self.update_freq,
            "drop_fraction": drop_fraction,
            "decay": self.decay,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "end_fraction": self.end_fraction,
            "grow_init": self.grow_init,
            "seed": self.seed,
            "reset_optimizer_state": self.reset_optimizer_state,
            "log_dir": self.log_dir,
            "compiled": self.compiled,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("drop_fraction"), (dict, str)):
            config["drop_fraction"] = keras.saving.deserialize_keras_object(config["drop_fraction"])
        return cls(**config)


class Static(SparseTraining):
    """Static sparse training: the masks drawn by ``sparsify`` never change.

    Takes the base's arguments (for a uniform interface); only ``log_dir``
    matters. Logs ``sparsity``, ``drop_fraction`` (0) and ``itop``.
    """

    changes_masks = False


class SET(SparseTraining):
    """Sparse Evolutionary Training: drop the smallest |w|, grow at random."""

    def grow_scores(self, layer, masked_weight, seed):
        return updates.random_scores(masked_weight.weight.shape, seed)


class RigL(SET):
    """RigL: grow the connections with the largest |dense gradient| on the current batch.

    A connection dropped and regrown in the same update keeps its weight and
    optimizer state.
    """

    gradient_mode = gradient_capture.MODE_STORE
    reinit_regrown = False

    def grow_scores(self, layer, masked_weight, seed):
        # The buffer holds what gradient_mode asks for: this step's gradient
        # (RigL) or its moving average (SNFS).
        return ops.abs(masked_weight.capture.read())


class SNFS(RigL):
    """Sparse momentum (Dettmers & Zettlemoyer, 2019) without redistribution.

    Grows by |exponential moving average of the dense gradient|, updated on
    every step (decay ``momentum``, 0.9 by default). The moving average is not
    saved with the model: a model loaded from a file starts it again from 0.
    """

    gradient_mode = gradient_capture.MODE_EMA

    def __init__(self, *args, momentum=0.9, **kwargs):
        super().__init__(*args, **kwargs)
        self.ema_decay = validation.check_number(
            "momentum", momentum, 0.0, 1.0, high_open=True, hint=" (decay of the gradient's moving average)"
        )

    @property
    def momentum(self):
        return self.ema_decay

    def get_config(self):
        return {**super().get_config(), "momentum": self.ema_decay}
