"""The gradient probe of JAX/PyTorch (keras_rigl.backend_capture), checked with TensorFlow's tape.

The probe's algebra is backend-free keras.ops; tests/test_backends.py runs it for real under
JAX and PyTorch through model.fit.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_rigl import backend_capture


def test_probed_value_is_exactly_the_masked_weight_and_routes_the_dense_gradient_to_the_probe():
    rng = np.random.default_rng(0)
    w = tf.Variable(rng.normal(size=(5, 7)).astype("float32"))
    m = tf.constant((rng.random((5, 7)) < 0.4).astype("float32"))
    # the probe holds the last step's gradient: any finite values, large ones too
    p = tf.Variable((rng.normal(size=(5, 7)) * 1e6).astype("float32"))
    upstream = tf.constant(rng.normal(size=(5, 7)).astype("float32"))
    with tf.GradientTape() as tape:
        value = backend_capture.probed_value(w, m, p)
        loss = tf.reduce_sum(value * upstream)
    grad_w, grad_p = tape.gradient(loss, [w, p])
    np.testing.assert_array_equal(value.numpy(), w.numpy() * m.numpy())
    np.testing.assert_array_equal(grad_p.numpy(), upstream.numpy())  # dense: also where m == 0
    np.testing.assert_array_equal(grad_w.numpy(), upstream.numpy() * m.numpy())  # masked: W stays 0 there


def test_every_optimizer_overwrites_the_probe_with_its_gradient():
    layer = keras.layers.Layer()
    for optimizer in (keras.optimizers.SGD(0.1, momentum=0.9), keras.optimizers.Adam(0.1, weight_decay=0.5),
                      keras.optimizers.RMSprop(0.1, clipnorm=1e-3)):
        probe = backend_capture.make_probe(layer, f"w{id(optimizer)}", (3, 2), "float32")
        weight = keras.Variable(np.ones((3, 2), "float32"))
        assert backend_capture.is_probe(probe) and not backend_capture.is_probe(weight)
        gradient = np.arange(6, dtype="float32").reshape(3, 2) - 2.5
        optimizer.apply([gradient, gradient], [probe, weight])
        # assigned as it is: no learning rate, momentum, weight decay or clipping
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(probe), gradient)
        assert not np.array_equal(keras.ops.convert_to_numpy(weight), np.ones((3, 2)))  # trained as usual


def test_probe_capture_reads_the_last_gradient_or_its_moving_average():
    layer = keras.layers.Layer()
    capture = backend_capture.ProbeCapture(backend_capture.make_probe(layer, "k", (2,), "float32"))
    capture.probe.assign(np.array([4.0, -2.0], "float32"))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(capture.read()), [4.0, -2.0])
    capture.set_mode(2, ema_decay=0.75)  # MODE_EMA, as SNFS sets it
    capture.accumulate()  # 0.75 * 0 + 0.25 * g
    capture.probe.assign(np.array([0.0, 2.0], "float32"))
    capture.accumulate()  # 0.75 * (1, -0.5) + 0.25 * (0, 2)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(capture.read()), [0.75, 0.125])
