"""Dynamic sparse training callbacks: SET, RigL, SNFS and Static.

One mechanism, small variations (as in jaxpruner): :class:`SET` owns the
whole schedule and drop-and-grow update; :class:`RigL` overrides only the
grow score (|dense gradient| of the current batch), :class:`SNFS` grows by
the gradient's moving average, :class:`Static` never updates.

The callback only decides *when*; the math is in :mod:`keras_rigl.updates`.
The same two hooks the callback uses, :meth:`SET.before_step` and
:meth:`SET.after_step`, drive a custom ``tf.GradientTape`` loop.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import keras
from keras import ops

from keras_rigl import gradient_capture, optimizer_state, schedule, updates
from keras_rigl.sparsify import masked_layers

GROW_INITS = ("zeros", "random")
UPDATE_COLUMNS = ["step", "layer", "weight", "drop_fraction", "n_active", "n_dropped", "n_moved", "sparsity"]

_INITIALIZER_ATTRS = {
    "recurrent_kernel": "recurrent_initializer",
    "embeddings": "embeddings_initializer",
    "pointwise_kernel": "pointwise_initializer",
    "depthwise_kernel": "depthwise_initializer",
}


class SET(keras.callbacks.Callback):
    """Sparse Evolutionary Training: drop the smallest |w|, grow at random.

    Args:
        update_freq: ΔT, optimizer steps between mask updates.
        drop_fraction: fraction of each layer's active connections moved at
            an update, before decay.
        decay: ``"cosine"`` (paper), ``"linear"`` or ``"constant"``.
        begin_step: first step at which updates may happen.
        end_step: last step of updates (inclusive). Default:
            ``end_fraction`` of the total steps of ``model.fit``.
        end_fraction: see ``end_step`` (0.75 as in the paper).
        grow_init: ``"zeros"`` (paper) or ``"random"`` (the layer's
            initializer) for grown connections.
        seed: int; masks depend only on (seed, step, layer), so a resumed run
            makes the same updates as an uninterrupted one.
        reset_optimizer_state: zero the optimizer state of grown and dropped
            connections (momentum, Adam moments, ...). Keep True unless your
            optimizer keeps factored state (Adafactor).
        log_dir: if given, a TensorBoard writer records per-layer sparsity and
            the number of connections moved at each update.
    """

    #: which gradient the grow score needs: off, this step's, or its EMA
    gradient_mode = gradient_capture.MODE_OFF
    #: a connection dropped and regrown in one update starts afresh
    reinit_regrown = True

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
    ):
        super().__init__()
        schedule.validate(update_freq, drop_fraction, decay, begin_step, end_step)
        if not 0.0 < float(end_fraction) <= 1.0:
            raise ValueError(f"end_fraction must be in (0, 1] (share of training with updates), got {end_fraction!r}.")
        if grow_init not in GROW_INITS:
            raise ValueError(f"Unknown grow_init {grow_init!r}; use 'zeros' (as in the paper) or 'random'.")
        self.update_freq = int(update_freq)
        self.drop_fraction = float(drop_fraction)
        self.decay = decay
        self.begin_step = int(begin_step)
        self.end_step = end_step
        self.end_fraction = float(end_fraction)
        self.grow_init = grow_init
        self.seed = int(seed if seed is not None else np.random.SeedSequence().entropy % 2**31)
        self.reset_optimizer_state = bool(reset_optimizer_state)
        self.log_dir = log_dir
        self.schedule = None
        self.step = None
        self._rows = []
        self._ever_active = {}
        self._writer = None
        self._sparsity = None
        self._itop = 0.0

    # ------------------------------------------------------------ variations
    def grow_scores(self, layer, masked_weight, seed):
        """Scores for growing; larger grows first. SET: uniform random."""
        return updates.random_scores(masked_weight.weight.shape, seed)

    # ------------------------------------------------------------- schedule
    def build_schedule(self, total_steps=None):
        """Fix ``end_step`` (from ``total_steps`` when not given) and return the schedule."""
        end_step = self.end_step
        if end_step is None:
            if not total_steps:
                raise ValueError(
                    f"{type(self).__name__} cannot tell when to stop updating masks: the number of training "
                    "steps is unknown (an infinite or unsized dataset). Pass end_step=... or steps_per_epoch "
                    "to model.fit."
                )
            end_step = max(self.begin_step + 1, int(self.end_fraction * total_steps))
        self.schedule = schedule.UpdateSchedule(
            self.update_freq, self.drop_fraction, end_step, self.begin_step, self.decay
        )
        return self.schedule

    def is_update_step(self, step):
        return self.schedule is not None and self.schedule.is_update_step(step)

    # ------------------------------------------------- hooks (callback / loop)
    def attach(self, model, total_steps=None, step=0):
        """Check ``model`` and set up; called by ``on_train_begin``."""
        layers = masked_layers(model)
        if not layers:
            raise ValueError(
                f"{type(self).__name__} found no keras_rigl.Masked layer in model {model.name!r}. "
                "Make the model sparse first: model = keras_rigl.sparsify(model, sparsity=...)."
            )
        if self.gradient_mode != gradient_capture.MODE_OFF:
            missing = [l.name for l in layers if not l.capture_gradients or not gradient_capture.available()]
            if missing:
                raise ValueError(
                    f"{type(self).__name__} grows by the dense gradient, which these layers do not capture: "
                    f"{missing}. Use the TensorFlow backend and Masked(..., capture_gradients=True) (the default)."
                )
        if self.schedule is None or self.end_step is None:
            self.build_schedule(total_steps)
        self.step = int(step)
        for layer in layers:
            for mw in layer.masked_weights:
                key = id(mw.mask)
                current = keras.ops.convert_to_numpy(mw.mask) != 0
                self._ever_active[key] = self._ever_active.get(key, current) | current
        if self.gradient_mode == gradient_capture.MODE_EMA:
            for layer in layers:
                layer.set_capture_mode(gradient_capture.MODE_EMA, ema_decay=self.ema_decay)
        if self.log_dir and self._writer is None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        return layers

    def before_step(self, model, step):
        """Call before optimizer step ``step`` (1-based): switches gradient capture on if needed."""
        if self.gradient_mode == gradient_capture.MODE_STORE and self.is_update_step(step):
            for layer in masked_layers(model):
                layer.set_capture_mode(gradient_capture.MODE_STORE)

    def after_step(self, model, step, optimizer=None):
        """Call after optimizer step ``step``: updates the masks if it is an update step."""
        if not self.is_update_step(step):
            return []
        rows = self.update_masks(model, step, optimizer)
        if self.gradient_mode == gradient_capture.MODE_STORE:
            for layer in masked_layers(model):
                layer.set_capture_mode(gradient_capture.MODE_OFF)
        return rows

    def update_masks(self, model, step, optimizer=None):
        """Drop and grow in every masked weight of ``model`` now (step ``step``)."""
        fraction = self.schedule.fraction(step) if self.schedule else self.drop_fraction
        rows = []
        index = 0
        for layer in masked_layers(model):
            for mw in layer.masked_weights:
                index += 1
                size = int(np.prod(mw.mask.shape))
                seed = int(np.random.SeedSequence([self.seed, int(step), index]).generate_state(1)[0])
                mask_np = keras.ops.convert_to_numpy(mw.mask)
                n_active = int(np.count_nonzero(mask_np))
                if n_active == size or n_active == 0:
                    continue  # a dense (or empty) weight has nothing to move
                scores = self.grow_scores(layer, mw, seed)
                result = updates.drop_and_grow(
                    mw.weight, mw.mask, scores, fraction, seed=seed, reinit_regrown=self.reinit_regrown
                )
                updates.apply_update(mw.weight, mw.mask, result, self._grow_values(layer, mw, result, seed))
                if self.reset_optimizer_state and optimizer is not None:
                    optimizer_state.reset_slots(optimizer, mw.weight, result.grown | result.removed)
                key = id(mw.mask)
                new_mask = result.new_mask != 0
                self._ever_active[key] = self._ever_active.get(key, new_mask) | new_mask
                rows.append(
                    {
                        "step": int(step),
                        "layer": layer.layer.name,
                        "weight": mw.name,
                        "drop_fraction": fraction,
                        "n_active": result.n_active,
                        "n_dropped": int(np.floor(fraction * result.n_active)),
                        "n_moved": result.n_moved,
                        "sparsity": 1.0 - result.n_active / size,
                    }
                )
        self._rows.extend(rows)
        if self._writer is not None and rows:
            import tensorflow as tf

            with self._writer.as_default(step=int(step)):
                for row in rows:
                    tag = f"{row['layer']}/{row['weight']}"
                    tf.summary.scalar(f"sparsity/{tag}", row["sparsity"])
                    tf.summary.scalar(f"moved/{tag}", row["n_moved"])
            self._writer.flush()
        return rows

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
        w = keras.ops.convert_to_numpy(mw.weight)
        std = float(w[keras.ops.convert_to_numpy(mw.mask) != 0].std() or 0.01)
        return np.random.default_rng(seed).normal(0, std, shape).astype(w.dtype)

    # -------------------------------------------------------------- reports
    @property
    def updates(self):
        """One row per masked weight per mask update (pandas DataFrame)."""
        return pd.DataFrame(self._rows, columns=UPDATE_COLUMNS)

    def current_sparsity(self, model):
        total = active = 0
        for layer in masked_layers(model):
            for mw in layer.masked_weights:
                m = keras.ops.convert_to_numpy(mw.mask)
                total += m.size
                active += int(np.count_nonzero(m))
        return 1.0 - active / total if total else 0.0

    def itop_rate(self):
        """In-time over-parameterisation: share of masked weights ever active so far."""
        total = sum(m.size for m in self._ever_active.values())
        return float(sum(int(m.sum()) for m in self._ever_active.values()) / total) if total else 0.0

    def _log_values(self, model):
        step = self.step or 0
        return {
            "sparsity": self._sparsity if self._sparsity is not None else self.current_sparsity(model),
            "drop_fraction": self.schedule.fraction(step) if self.schedule else 0.0,
            "itop": self._itop,
        }

    # --------------------------------------------------- keras callback API
    def on_train_begin(self, logs=None):
        model = self.model
        spe = getattr(model, "steps_per_execution", 1)
        if spe and int(spe) > 1 and self.gradient_mode == gradient_capture.MODE_STORE:
            raise ValueError(
                f"{type(self).__name__} needs steps_per_execution=1 in model.compile to capture the gradient of "
                f"the update step's batch (got {spe})."
            )
        params = self.params or {}
        epochs, steps = params.get("epochs"), params.get("steps")
        total = epochs * steps if epochs and steps else None
        self.attach(model, total_steps=total, step=int(keras.ops.convert_to_numpy(model.optimizer.iterations)))
        self._sparsity = self.current_sparsity(model)
        self._itop = self.itop_rate()

    def on_train_batch_begin(self, batch, logs=None):
        self.before_step(self.model, self.step + 1)

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.after_step(self.model, self.step, self.model.optimizer):
            self._sparsity = self.current_sparsity(self.model)
            self._itop = self.itop_rate()
        if logs is not None:
            logs.update(self._log_values(self.model))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update(self._log_values(self.model))

    def on_train_end(self, logs=None):
        if self.gradient_mode != gradient_capture.MODE_OFF:
            for layer in masked_layers(self.model):
                layer.set_capture_mode(gradient_capture.MODE_OFF)

    def get_config(self):
        return {
            "update_freq": self.update_freq,
            "drop_fraction": self.drop_fraction,
            "decay": self.decay,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "end_fraction": self.end_fraction,
            "grow_init": self.grow_init,
            "seed": self.seed,
            "reset_optimizer_state": self.reset_optimizer_state,
        }


class RigL(SET):
    """RigL: grow the connections with the largest |dense gradient| on the current batch.

    A connection dropped and regrown in the same update keeps its weight and
    optimizer state.
    """

    gradient_mode = gradient_capture.MODE_STORE
    reinit_regrown = False

    def grow_scores(self, layer, masked_weight, seed):
        return ops.abs(masked_weight.capture.read())


class SNFS(SET):
    """Sparse momentum (Dettmers & Zettlemoyer, 2019) without redistribution.

    Grows by |exponential moving average of the dense gradient|, updated on
    every step (decay ``momentum``, 0.9 by default). The moving average is not
    saved with the model: a resumed run starts it again from 0.
    """

    gradient_mode = gradient_capture.MODE_EMA
    reinit_regrown = False

    def __init__(self, *args, momentum=0.9, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
        self.ema_decay = float(momentum)

    def grow_scores(self, layer, masked_weight, seed):
        return ops.abs(masked_weight.capture.read())


class Static(SET):
    """Static sparse training: the masks drawn by ``sparsify`` never change."""

    def __init__(self, **kwargs):
        kwargs.setdefault("update_freq", 1)
        super().__init__(**kwargs)

    def is_update_step(self, step):
        return False

    def build_schedule(self, total_steps=None):
        self.schedule = None
        return None
