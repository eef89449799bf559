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

The buffer is a sync-on-read variable with MEAN aggregation: each replica of
a ``tf.distribute`` strategy writes its own gradient without communication
and reading it from the callback (cross-replica context) averages them, which
is the gradient of the global batch.
"""

from __future__ import annotations

import keras

MODE_OFF, MODE_STORE, MODE_EMA = 0, 1, 2


def available():
    return keras.backend.backend() == "tensorflow"


class GradientCapture:
    """Buffer and switch for the dense gradient of one masked weight."""

    def __init__(self, shape, dtype, name, mode_variable, ema_decay_variable):
        import tensorflow as tf

        self.buffer = tf.Variable(
            tf.zeros(shape, dtype=dtype),
            trainable=False,
            name=f"{name}_dense_grad",
            synchronization=tf.VariableSynchronization.ON_READ,
            aggregation=tf.VariableAggregation.MEAN,
        )
        self.mode = mode_variable
        self.ema_decay = ema_decay_variable

    def _record(self, grad):
        import tensorflow as tf

        grad = tf.cast(grad, self.buffer.dtype)

        def store():
            self.buffer.assign(grad)
            return tf.constant(True)

        def ema():
            decay = tf.cast(self.ema_decay, grad.dtype)
            self.buffer.assign(decay * self.buffer + (1.0 - decay) * grad)
            return tf.constant(True)

        def off():
            return tf.constant(False)

        mode = tf.convert_to_tensor(self.mode)
        return tf.cond(
            mode == MODE_OFF,
            off,
            lambda: tf.cond(mode == MODE_STORE, store, ema),
        )

    def masked_value(self, weight, mask):
        """``weight * mask`` whose backward pass may record dL/d(weight*mask)."""
        import tensorflow as tf

        w = tf.convert_to_tensor(weight)
        m = tf.cast(tf.convert_to_tensor(mask), w.dtype)

        @tf.custom_gradient
        def _masked(w_):
            def grad(upstream):
                recorded = self._record(upstream)
                with tf.control_dependencies([recorded]):
                    return tf.identity(upstream * m)

            return w_ * m, grad

        return _masked(w)

    def read(self):
        """The captured gradient (averaged over replicas) as a tensor."""
        return self.buffer.read_value()

    def reset(self):
        import tensorflow as tf

        self.buffer.assign(tf.zeros_like(self.buffer))
