"""The ``Masked`` wrapper: a layer whose main weights are multiplied by masks.

How the mask reaches the wrapped layer: during ``call`` the attribute of the
wrapped layer that holds the weight (``Dense._kernel``, ``Conv2D._kernel``,
``LSTMCell.recurrent_kernel``...) is swapped for the tensor ``W * M`` and put
back afterwards. The layer's own code then computes with the effective
weight, gradients reach ``W`` through the product (so masked entries get a
zero gradient and stay exactly 0 under every optimizer), and the dense
gradient dL/d(W*M) can be captured on the way (TensorFlow: ``gradient_capture``;
JAX and PyTorch: ``backend_capture``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping

import keras
import numpy as np

from keras_rigl import _compat, backend_capture, gradient_capture, maskable
from keras_rigl import structure as structures


@dataclasses.dataclass(frozen=True)
class MaskedWeight:
    """One masked weight of a :class:`Masked` layer."""

    name: str  # relative to the wrapped layer, e.g. "kernel"
    weight: keras.Variable
    mask: keras.Variable
    ref: maskable.WeightRef
    # TensorFlow: a GradientCapture, made when a gradient method first needs it (Masked.set_capture_mode /
    # set_capture_trace, which RigL's and SNFS's attach call), None before. JAX/PyTorch: a
    # backend_capture.ProbeCapture, made with the mask (capture_gradients=False: None).
    capture: object = None

    @property
    def path(self):
        return f"{self.ref.owner.path}/{self.ref.name.rsplit('/', 1)[-1]}"


@keras.saving.register_keras_serializable(package="keras_rigl")
class Masked(keras.layers.Wrapper):
    """Wrap ``layer`` so that its maskable weights are multiplied by masks.

    Args:
        layer: the layer to wrap (Dense, Conv*, Embedding, LSTM/GRU/SimpleRNN,
            Bidirectional/TimeDistributed of those, or any layer made maskable
            with :class:`keras_rigl.MaskableLayer` / :func:`keras_rigl.register_maskable`).
        mask_depthwise: also mask depthwise kernels (DepthwiseConv layers, the
            depthwise part of SeparableConv). Off by default, as in the paper.
        capture_gradients: allow a buffer per masked weight for the dense
            gradient that RigL and SNFS grow by. On TensorFlow the buffers
            are made when RigL or SNFS first attaches (or
            :meth:`set_capture_mode` / :meth:`set_capture_trace` asks), so a
            model trained without them holds none. On JAX and PyTorch each
            masked weight gets a gradient probe when the layer is built
            (:mod:`keras_rigl.backend_capture`); pass False for a model that
            never grows by the gradient.
        structure: the structure every masked weight of this layer keeps
            (:mod:`keras_rigl.structure`): None (unstructured), ``"1xk"``
            (e.g. ``"1x4"``), ``"N:M"`` (e.g. ``"2:4"``) or a
            ``keras_rigl.structure.Structure``. A weight that cannot carry it is
            refused when the masks are made; masks set later must hold it.

    The masks start all ones (dense); :func:`keras_rigl.sparsify` or
    :func:`keras_rigl.initialize_masks` set them. Masks are non-trainable
    weights of this layer, in the dtype of the weight they mask, and are saved
    with the model.
    """

    def __init__(self, layer, mask_depthwise=False, capture_gradients=True, structure=None, **kwargs):
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(f"Masked expects a keras.layers.Layer, got {layer!r}.")
        if isinstance(layer, Masked):
            raise ValueError(f"Layer {layer.name!r} is already Masked; wrap it only once.")
        if isinstance(layer, keras.Model):
            raise ValueError(
                f"Masked wraps single layers, not the model {layer.name!r}. "
                "Use keras_rigl.sparsify(model, ...) to wrap every maskable layer of a model."
            )
        if not maskable.is_maskable(layer, depthwise=mask_depthwise):
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) has no weight that keras_rigl "
                "knows how to mask. Make it maskable by implementing "
                "get_maskable_weights() (keras_rigl.MaskableLayer) or with "
                "keras_rigl.register_maskable(LayerClass, ['kernel'])."
            )
        kwargs.setdefault("name", f"masked_{layer.name}")
        super().__init__(layer, **kwargs)
        self.mask_depthwise = bool(mask_depthwise)
        self.capture_gradients = bool(capture_gradients)
        object.__setattr__(self, "_structure", structures.get(structure))
        self.supports_masking = getattr(layer, "supports_masking", False)
        object.__setattr__(self, "_masked_weights", [])
        # Which capture the graphs traced from now on contain (gradient_capture.TRACE_*).
        object.__setattr__(self, "_capture_trace", gradient_capture.TRACE_OFF)

    # ------------------------------------------------------------------ build
    def _inner_builds_from_one_shape(self):
        """False for layers whose build() needs several shapes (MultiHeadAttention)."""
        import inspect

        params = [
            p
            for p in inspect.signature(self.layer.build).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        return len(params) <= 1

    def build(self, input_shape=None):
        if not self.layer.built:
            if not self._inner_builds_from_one_shape():
                # Built by its first call instead (see call()); masks follow.
                self.built = True
                return
            self.layer.build(input_shape)
        self._create_masks()
        self.built = True

    def _create_masks(self):
        # After a deferred build Keras has locked this layer's state; the masks
        # are still part of building it.
        with _compat.unlocked_state(self):
            self._create_masks_unlocked()

    def _create_masks_unlocked(self):
        refs = maskable.maskable_weights(self.layer, depthwise=self.mask_depthwise)
        capture_on = self.capture_gradients and gradient_capture.available()
        if capture_on:
            # Switches shared by every masked weight of this layer (kept out of Keras' tracking).
            mode, decay = gradient_capture.make_switches()
            object.__setattr__(self, "_capture_mode", mode)
            object.__setattr__(self, "_capture_decay", decay)
            object.__setattr__(self, "_capture_strategy", gradient_capture.current_strategy())
        for ref in refs:  # before any weight is added: a refused layer is left as it was
            self._structure.check_shape(tuple(ref.variable.shape), f"{self.name}/{ref.name}")
        masked = []
        for ref in refs:
            mask = self.add_weight(
                name=ref.name.replace("/", "_") + "_mask",
                shape=ref.variable.shape,
                dtype=ref.variable.dtype,
                initializer="ones",
                trainable=False,
            )
            capture = None
            if self.capture_gradients and backend_capture.available():
                # JAX/PyTorch: the dense gradient leaves the step through a probe (see backend_capture).
                probe = backend_capture.make_probe(self, ref.name.replace("/", "_"), ref.variable.shape,
                                                   ref.variable.dtype)
                capture = backend_capture.ProbeCapture(probe)
            masked.append(MaskedWeight(ref.name, ref.variable, mask, ref, capture))
        # Keep our own bookkeeping out of Keras' attribute tracking.
        object.__setattr__(self, "_masked_weights", masked)

    def _ensure_captures(self):
        """Make the dense-gradient buffers on first need: a model that never grows by the
        gradient (Static, SET, inference) never holds a second copy of its masked weights."""
        for mw in self._masked_weights:
            if mw.capture is None:
                capture = gradient_capture.GradientCapture(
                    mw.weight.shape,
                    mw.weight.dtype,
                    mw.ref.name.replace("/", "_"),
                    self._capture_mode,
                    self._capture_decay,
                    self._capture_strategy,
                )
                object.__setattr__(mw, "capture", capture)  # in place: callers may hold this MaskedWeight

    def get_build_config(self):
        config = super().get_build_config() or {}
        if self.layer.built and not self._inner_builds_from_one_shape():
            config["inner_build_config"] = self.layer.get_build_config()
        return config

    def build_from_config(self, config):
        inner = config.get("inner_build_config")
        if inner and not self.layer.built:
            self.layer.build_from_config(inner)
        self.build(config.get("input_shape"))
        if self.layer.built and not self._masked_weights:
            self._create_masks()

    @property
    def structure(self):
        """The :class:`keras_rigl.structure.Structure` every masked weight of this layer keeps."""
        return self._structure

    @property
    def masked_weights(self):
        """The list of :class:`MaskedWeight` of this layer (after build)."""
        return list(self._masked_weights)

    # ------------------------------------------------------------------- call
    def _effective(self, mw):
        if isinstance(mw.capture, backend_capture.ProbeCapture):
            value = backend_capture.probed_value(mw.weight, mw.mask, mw.capture.probe)
        elif mw.capture is not None:
            value = mw.capture.masked_value(mw.weight, mw.mask, self._capture_trace)
        else:
            value = keras.ops.multiply(mw.weight, keras.ops.cast(mw.mask, mw.weight.dtype))
        compute_dtype = mw.ref.owner.compute_dtype
        if mw.weight.dtype != compute_dtype and keras.backend.is_float_dtype(mw.weight.dtype):
            # The wrapped layer would have autocast the variable itself
            # (mixed precision); a plain tensor must be cast by us.
            value = keras.ops.cast(value, compute_dtype)
        return value

    @contextlib.contextmanager
    def _effective_weights(self):
        swapped = []
        try:
            for mw in self._masked_weights:
                owner, attr = mw.ref.owner, mw.ref.attr
                object.__setattr__(owner, attr, self._effective(mw))
                swapped.append((owner, attr, mw.weight))
            yield
        finally:
            for owner, attr, variable in reversed(swapped):
                object.__setattr__(owner, attr, variable)

    def call(self, inputs, *args, training=None, mask=None, **kwargs):
        if _compat.call_accepts(self.layer, "training"):
            kwargs["training"] = training
        if mask is not None and _compat.call_accepts(self.layer, "mask"):
            kwargs["mask"] = mask
        if not self._masked_weights:
            # Deferred build: the first call builds the wrapped layer, then the masks.
            self.layer(inputs, *args, **kwargs)
            self._create_masks()
        with self._effective_weights():
            return self.layer(inputs, *args, **kwargs)

    def compute_mask(self, inputs, mask=None):
        return self.layer.compute_mask(inputs, mask)

    # ----------------------------------------------------------- capture API
    def set_capture_mode(self, mode, ema_decay=None):
        """Switch dense-gradient capture: ``gradient_capture.MODE_OFF`` (0), ``MODE_STORE`` (1, this
        step's gradient) or ``MODE_EMA`` (2, moving average with decay ``ema_decay``).

        Switching to store or EMA clears each buffer's ``written`` flag, so
        that reading it before a training step has captured is an error.
        On JAX/PyTorch the probes capture on every step; this only chooses
        what ``capture.read()`` returns (see :mod:`keras_rigl.backend_capture`).
        """
        if self.uses_probes:
            for mw in self._masked_weights:
                mw.capture.set_mode(int(mode), ema_decay)
            return
        if not self.capture_gradients or not gradient_capture.available():
            raise RuntimeError(
                f"Layer {self.name!r} does not capture gradients (capture_gradients=False "
                f"or backend {keras.backend.backend()!r} is not tensorflow)."
            )
        if int(mode) != gradient_capture.MODE_OFF:
            self._ensure_captures()
        gradient_capture.set_switches(self._capture_mode, self._capture_decay, int(mode), ema_decay)
        if int(mode) != gradient_capture.MODE_OFF and self._capture_trace == gradient_capture.TRACE_OFF:
            # Graphs traced from now on (and eager calls) obey the switch.
            self.set_capture_trace(gradient_capture.TRACE_SWITCH)
        if int(mode) != gradient_capture.MODE_OFF:
            for mw in self._masked_weights:
                mw.capture.clear_written()

    @property
    def uses_probes(self):
        """True when this layer captures the dense gradient through probes (JAX/PyTorch)."""
        return any(isinstance(mw.capture, backend_capture.ProbeCapture) for mw in self._masked_weights)

    @property
    def can_capture_gradients(self):
        """True when RigL and SNFS can grow this layer by its dense gradient on this backend."""
        return self.capture_gradients and (gradient_capture.available() or self.uses_probes)

    @property
    def capture_trace(self):
        """Which capture the graphs traced from now on contain (``gradient_capture.TRACE_*``)."""
        return self._capture_trace

    def set_capture_trace(self, trace):
        """Choose what a graph traced from now on computes for the dense gradient.

        ``"off"`` (the default): plain ``W * M``, nothing captured, no
        per-step cost beyond the product. ``"switch"``: capture behind a
        ``tf.cond`` on :meth:`set_capture_mode` (custom training loops; the
        callbacks' ``attach`` sets it). ``"store"`` / ``"ema"``: always capture,
        no branch (the step functions ``model.fit`` swaps in). Graphs traced
        earlier keep what they were traced with.
        """
        if trace not in gradient_capture.TRACES:
            raise ValueError(f"Unknown capture trace {trace!r}; use one of {gradient_capture.TRACES}.")
        if self.uses_probes:
            return  # probes need no trace of their own
        if trace != gradient_capture.TRACE_OFF and (not self.capture_gradients or not gradient_capture.available()):
            raise RuntimeError(
                f"Layer {self.name!r} does not capture gradients (capture_gradients=False "
                f"or backend {keras.backend.backend()!r} is not tensorflow)."
            )
        if trace != gradient_capture.TRACE_OFF:
            self._ensure_captures()
        object.__setattr__(self, "_capture_trace", trace)

    # --------------------------------------------------------------- masks IO
    def get_masks(self):
        """``{name: numpy mask}`` for every masked weight."""
        return {mw.name: keras.ops.convert_to_numpy(mw.mask) for mw in self._masked_weights}

    def set_masks(self, masks, zero_weights=True):
        """Set masks from ``{name: array}``; masked weights are set to 0 (unless ``zero_weights=False``).

        Each mask has the weight's shape and holds only 0 and 1 (bool, or
        numbers that are exactly 0 or 1). Every mask is checked before any is
        set, so a bad one leaves the layer as it was.
        """
        by_name = {mw.name: mw for mw in self._masked_weights}
        if not isinstance(masks, Mapping):
            example = next(iter(by_name), "kernel")
            raise ValueError(
                f"masks must be a dict {{weight name: mask}}, e.g. {{{example!r}: mask}} for layer "
                f"{self.name!r}; got {type(masks).__name__}."
            )
        unknown = set(masks) - set(by_name)
        if unknown:
            raise ValueError(f"Unknown masked weight(s) {sorted(unknown)} for layer {self.name!r}; "
                             f"known: {sorted(by_name)}.")
        checked = {name: self._checked_mask(name, by_name[name], value) for name, value in masks.items()}
        for name, value in checked.items():
            mw = by_name[name]
            mw.mask.assign(value.astype(mw.mask.dtype))
            if zero_weights:
                w = keras.ops.convert_to_numpy(mw.weight)
                mw.weight.assign(np.where(value, w, 0).astype(w.dtype))

    def _checked_mask(self, name, mw, value):
        """``value`` as a bool array, or a one-line ValueError: masks are 0/1 of the weight's shape."""
        value = np.asarray(value)
        if value.shape != tuple(mw.mask.shape):
            raise ValueError(f"Mask for {self.name}/{name} has shape {value.shape}, "
                             f"expected {tuple(mw.mask.shape)}.")
        if value.dtype == bool:
            return self._checked_structure(name, value)
        numeric = np.issubdtype(value.dtype, np.integer) or np.issubdtype(value.dtype, np.floating)
        bad = value[(value != 0) & (value != 1)] if numeric else value.reshape(-1)
        if bad.size:
            raise ValueError(
                f"Mask for {self.name}/{name} must hold only 0 and 1 (or False/True), got "
                f"{np.unique(bad)[:3].tolist()} (dtype {value.dtype}); pass e.g. (scores > threshold) "
                "or a 0/1 array."
            )
        return self._checked_structure(name, value != 0)

    def _checked_structure(self, name, value):
        if not self._structure.holds(value):
            raise ValueError(
                f"Mask for {self.name}/{name} does not hold the layer's structure {self._structure.spec!r}; "
                f"draw masks that do with keras_rigl.initialize_masks(model, ...) or "
                f"layer.structure.initial_mask(shape, n_active, rng)."
            )
        return value

    # ---------------------------------------------------------- serialization
    def save_own_variables(self, store):
        """The masks only: a gradient probe (JAX/PyTorch) is no state, and a ``.keras`` file
        is then the same on every backend (the masks at ``"0"``, ``"1"``... as Keras writes them)."""
        if not self.uses_probes:
            return super().save_own_variables(store)
        for index, mw in enumerate(self._masked_weights):
            store[str(index)] = mw.mask

    def load_own_variables(self, store):
        if not self.uses_probes:
            return super().load_own_variables(store)
        if len(store.keys()) != len(self._masked_weights):
            raise ValueError(
                f"Layer {self.name!r} expects {len(self._masked_weights)} masks in the saved file, found "
                f"{len(store.keys())}; the file was saved from a different model."
            )
        for index, mw in enumerate(self._masked_weights):
            mw.mask.assign(store[str(index)])

    def get_config(self):
        config = super().get_config()
        config.update(mask_depthwise=self.mask_depthwise, capture_gradients=self.capture_gradients)
        structure = structures.serialize(self._structure)
        if structure is not None:  # unstructured layers keep the config they always had
            config["structure"] = structure
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"), custom_objects=custom_objects)
        return cls(layer, **config)
