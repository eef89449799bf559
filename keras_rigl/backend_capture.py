"""The dense gradient on JAX and PyTorch: a gradient probe the optimizer overwrites.

On TensorFlow the dense gradient dL/d(W*M) is written into a buffer by a
custom gradient (:mod:`keras_rigl.gradient_capture`). JAX traces the whole
training step into one pure function (``stateless_call`` / ``stateless_apply``):
a side effect in a backward pass does not survive it, and only model,
optimizer and metric variables come out of the step. So on the other backends
the gradient leaves the step the way every other result does, through a model
variable:

* every masked weight ``W`` gets a *probe* ``P``: a trainable variable of
  ``W``'s shape, zeros, with ``overwrite_with_gradient=True``;
* the effective weight is ``W * M + (P - stop_gradient(P))``. Its value is
  exactly ``W * M`` (``P - P`` is exactly 0 for every finite ``P``), the
  gradient reaching ``W`` is ``M * dL/d(W*M)`` as before (masked entries stay
  0 under every optimizer), and the gradient reaching ``P`` is the dense
  ``dL/d(W*M)`` itself, which the backward pass computes anyway;
* every Keras optimizer assigns the gradient of an ``overwrite_with_gradient``
  variable to it instead of applying an update (the mechanism float8 training
  uses for its scales), inside the compiled step, after the gradients were
  reduced across devices, and leaves it out of clipping, weight decay and
  slot creation.

So after every training step each probe holds the dense gradient of that
step's batch (the global batch under ``keras.distribution``), with no extra
forward or backward pass and no change to ``compile()`` or the optimizer: the
same ``model.fit(..., callbacks=[keras_rigl.RigL()])`` as on TensorFlow. The
cost is the probe's memory (one weight-sized variable per masked weight) and
one weight-sized write per step (``benchmarks/backend_overhead.py``).

Under ``optimizer.gradient_accumulation_steps`` Keras assigns such a variable
the element-wise maximum of 0 and its micro-batches' gradients, not their sum,
so RigL and SNFS refuse gradient accumulation on these backends at fit start
(``SparseTraining.on_train_begin``; tests/test_gradient_accumulation.py).

Probes are not part of the saved model (``Masked`` saves its masks only, so a
``.keras`` file is the same on every backend), and they are not counted as
parameters by :func:`keras_rigl.count_nonzero_params`. SNFS's moving average
is kept here, outside the model, and updated after every step by the callback.
"""

from __future__ import annotations

import keras

from keras_rigl import gradient_capture

PROBE_SUFFIX = "_grad_probe"


def available():
    """True on the backends that capture through probes (every backend but TensorFlow)."""
    return keras.backend.backend() in ("jax", "torch")


def is_probe(variable):
    """True for a gradient probe made by :func:`make_probe` (not a model parameter)."""
    return bool(getattr(variable, "_keras_rigl_probe", False))


def make_probe(layer, name, shape, dtype):
    """A probe for one masked weight of ``layer`` (a ``Masked``), made with the layer's other weights."""
    probe = layer.add_weight(name=name + PROBE_SUFFIX, shape=shape, dtype=dtype, initializer="zeros", trainable=True)
    # Public Variable property: every Keras optimizer assigns this variable its gradient.
    probe.overwrite_with_gradient = True
    probe._keras_rigl_probe = True  # our own marker attribute, read by is_probe
    return probe


def probed_value(weight, mask, probe):
    """``weight * mask`` whose gradient with respect to ``probe`` is dL/d(weight * mask)."""
    ops = keras.ops
    masked = ops.multiply(weight, ops.cast(mask, weight.dtype))
    probe = ops.convert_to_tensor(probe)
    return ops.add(masked, ops.subtract(probe, ops.stop_gradient(probe)))


class ProbeCapture:
    """The dense gradient of one masked weight on JAX/PyTorch: what a ``GradientCapture`` is on TensorFlow.

    ``read()`` is the gradient of the last training step (``MODE_STORE``) or
    its moving average (``MODE_EMA``, updated by :meth:`accumulate` after
    every step).
    """

    def __init__(self, probe):
        self.probe = probe
        self.mode = gradient_capture.MODE_OFF
        self.ema_decay = 0.9
        self.average = None  # made on first MODE_EMA use: models without SNFS hold none

    def set_mode(self, mode, ema_decay=None):
        if mode not in (gradient_capture.MODE_OFF, gradient_capture.MODE_STORE, gradient_capture.MODE_EMA):
            raise ValueError(
                f"Unknown capture mode {mode!r}; use MODE_OFF (0), MODE_STORE (1) or MODE_EMA (2)."
            )
        if ema_decay is not None:
            self.ema_decay = float(ema_decay)
        if mode == gradient_capture.MODE_EMA and self.average is None:
            self.average = keras.Variable(
                keras.ops.zeros(self.probe.shape, self.probe.dtype), trainable=False, name=self.probe.name + "_ema"
            )
        self.mode = int(mode)

    def accumulate(self):
        """After a training step: fold the probe (this step's gradient) into the moving average."""
        if self.mode != gradient_capture.MODE_EMA:
            return
        decay = self.ema_decay
        self.average.assign(keras.ops.add(keras.ops.multiply(self.average, decay),
                                          keras.ops.multiply(self.probe, 1.0 - decay)))

    def value(self):
        return self.average.value if self.mode == gradient_capture.MODE_EMA else self.probe.value

    def read(self):
        """The dense gradient (or its moving average) as a tensor."""
        return self.value()

    def was_written(self):
        return True

    def clear_written(self):
        pass

    def reset(self):
        self.probe.assign(keras.ops.zeros_like(self.probe))
        if self.average is not None:
            self.average.assign(keras.ops.zeros_like(self.average))


def accumulate(layers):
    """After a training step: fold every probe of the masked ``layers`` in MODE_EMA into its moving average.

    Takes the layers, not the model: finding them is sparsify's (which builds on this module's probes).
    """
    if not available():
        return
    for layer in layers:
        for mw in layer.masked_weights:
            if isinstance(mw.capture, ProbeCapture):
                mw.capture.accumulate()
