"""Capture of the dense gradient in the normal backward pass (TensorFlow only).

RigL grows connections by |dL/dW_eff|, the gradient of the loss with respect
to the *effective* (masked) weight, including the positions that are masked.
The optimizer must only see the masked gradient (so that masked weights stay
exactly 0), but the dense one is computed anyway by the backward pass of
``W_eff = W * M``: ``dL/dW = M * dL/dW_eff``. We put a custom gradient on that
product that, when asked, writes ``dL/dW_eff`` into a buffer.

Why in the backward pass and not an extra ``tf.function`` on a batch: the
callback never sees the training batch inside ``model.fit``, and an extra
forward/backward pass would cost a full training step per update. Here the
cost on ordinary steps is one ``tf.cond`` per masked weight; on capture steps
one write of the gradient (see ``benchmarks/overhead.py``).

Modes: 0 = off, 1 = store the gradient of this step, 2 = exponential moving
average (SNFS's momentum of the gradient).

Each buffer has a ``written`` flag that its capture sets and that switching
the mode to store (or EMA) clears: :meth:`GradientCapture.read` refuses a
buffer that was not written since, which is what a custom training loop
that forgets ``before_step`` would otherwise grow from (all zeros).

The buffer is a sync-on-read variable with MEAN aggregation: each replica of
a ``tf.distribute`` strategy writes its own gradient without communication
and reading it from the callback (cross-replica context) averages them, which
is the gradient of the global batch.
"""

from __future__ import annotations

import keras

MODE_OFF, MODE_STORE, MODE_EMA = 0, 1, 2

# What a traced graph contains (read when a layer is traced, not when it runs):
#   TRACE_OFF    plain W * M, no custom gradient: what ordinary steps need.
#   TRACE_SWITCH the capture behind a tf.cond on the mode variable (one per
#                masked weight): custom training loops, where one traced step
#                must serve update and ordinary steps alike.
#   TRACE_STORE  always store, no branch: the step function model.fit runs on
#                update steps only (the callbacks swap it in).
#   TRACE_EMA    always update the moving average, no branch (SNFS in fit).
TRACE_OFF, TRACE_SWITCH, TRACE_STORE, TRACE_EMA = "off", "switch", "store", "ema"
TRACES = (TRACE_OFF, TRACE_SWITCH, TRACE_STORE, TRACE_EMA)


def available():
    return keras.backend.backend() == "tensorflow"


def make_switches(ema_decay=0.9):
    """``(mode, ema_decay)`` variables shared by the captures of one layer.

    Plain ``tf.Variable``s so that Keras neither saves nor reports them;
    made in ``init_scope`` since the layer may be built inside a symbolic call.
    """
    import tensorflow as tf

    with tf.init_scope():
        mode = tf.Variable(MODE_OFF, trainable=False, dtype=tf.int32, name="capture_mode")
        decay = tf.Variable(float(ema_decay), trainable=False, dtype=tf.float32, name="capture_decay")
    return mode, decay


def current_strategy():
    """The ``tf.distribute`` strategy in scope now: buffers made later must be made under it."""
    import tensorflow as tf

    return tf.distribute.get_strategy()


def set_switches(mode_variable, decay_variable, mode, ema_decay=None):
    if mode not in (MODE_OFF, MODE_STORE, MODE_EMA):
        raise ValueError(f"Unknown capture mode {mode!r}; use MODE_OFF (0), MODE_STORE (1) or MODE_EMA (2).")
    mode_variable.assign(int(mode))
    if ema_decay is not None:
        decay_variable.assign(float(ema_decay))


class GradientCapture:
    """Buffer and switch for the dense gradient of one masked weight."""

    def __init__(self, shape, dtype, name, mode_variable, ema_decay_variable, strategy=None):
        import contextlib

        import tensorflow as tf

        # Under the strategy the layer was built in, so that each replica has its buffer.
        with strategy.scope() if strategy is not None else contextlib.nullcontext(), tf.init_scope():
            self.buffer = tf.Variable(
                tf.zeros(shape, dtype=dtype),
                trainable=False,
                name=f"{name}_dense_grad",
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.MEAN,
            )
            # 1 once the capture wrote the buffer; each replica sets its own, MEAN reads 1 when all did.
            self.written = tf.Variable(
                0.0,
                trainable=False,
                name=f"{name}_dense_grad_written",
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.MEAN,
            )
        self.mode = mode_variable
        self.ema_decay = ema_decay_variable

    def _record(self, grad, trace=TRACE_SWITCH):
        import tensorflow as tf

        grad = tf.cast(grad, self.buffer.dtype)

        def store():
            with tf.control_dependencies([self.buffer.assign(grad)]):
                return tf.identity(self.written.assign(1.0) > 0)

        def ema():
            decay = tf.cast(self.ema_decay, grad.dtype)
            with tf.control_dependencies([self.buffer.assign(decay * self.buffer + (1.0 - decay) * grad)]):
                return tf.identity(self.written.assign(1.0) > 0)

        def off():
            return tf.constant(False)

        if trace == TRACE_STORE:
            return store()
        if trace == TRACE_EMA:
            return ema()
        mode = tf.convert_to_tensor(self.mode)
        return tf.cond(
            mode == MODE_OFF,
            off,
            lambda: tf.cond(mode == MODE_STORE, store, ema),
        )

    def masked_value(self, weight, mask, trace=TRACE_SWITCH):
        """``weight * mask`` whose backward pass records dL/d(weight*mask) as ``trace`` says."""
        import tensorflow as tf

        if trace not in TRACES:
            raise ValueError(f"Unknown capture trace {trace!r}; use one of {TRACES}.")
        w = tf.convert_to_tensor(weight)
        m = tf.cast(tf.convert_to_tensor(mask), w.dtype)
        if trace == TRACE_OFF:
            return w * m

        @tf.custom_gradient
        def _masked(w_):
            def grad(upstream):
                recorded = self._record(upstream, trace)
                with tf.control_dependencies([recorded]):
                    return tf.identity(upstream * m)

            return w_ * m, grad

        return _masked(w)

    def value(self):
        """The buffer (averaged over replicas) as a tensor, unchecked: for use inside a traced function."""
        return self.buffer.read_value()

    def was_written(self):
        return bool(float(self.written.read_value()) > 0)

    def clear_written(self):
        self.written.assign(0.0)

    def read(self):
        """The captured gradient (averaged over replicas) as a tensor.

        Raises RuntimeError when nothing was captured since capture was last
        switched on: the buffer would be zeros, or a stale gradient.
        """
        if not self.was_written():
            raise RuntimeError(
                f"No dense gradient was captured for {self.buffer.name.split(':')[0]!r} since capture was switched "
                "on: in a custom training loop call algo.before_step(model, step) before every training step "
                "(it switches capture on for update steps) and algo.after_step(model, step, optimizer) after it."
            )
        return self.value()

    def reset(self):
        import tensorflow as tf

        self.buffer.assign(tf.zeros_like(self.buffer))
        self.clear_written()
