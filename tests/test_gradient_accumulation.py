"""The callbacks under ``optimizer.gradient_accumulation_steps`` on every backend.

Keras accumulates an ``overwrite_with_gradient`` variable (the JAX/PyTorch
gradient probe) by an element-wise *maximum* over the micro-batches and 0,
not a sum, so a probe-based grow score would be silently wrong there: RigL and
SNFS refuse it at fit start. TensorFlow's capture is written by every backward
pass, so RigL grows from the update step's last micro-batch (tested here).
"""

import keras
import numpy as np
import pytest

import keras_rigl
from conftest import UpdateSteps

pytestmark = pytest.mark.any_backend  # no TensorFlow import at module level: also run on JAX and PyTorch

BATCH = 8


def _mlp():
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,))
    x = keras.layers.Dense(32, activation="relu", name="hidden")(inp)
    out = keras.layers.Dense(4, name="out")(x)
    return keras.Model(inp, out)


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(64, 16)).astype("float32"), rng.integers(0, 4, 64)


def _compiled(model, steps=2):
    model.compile(keras.optimizers.SGD(0.05, gradient_accumulation_steps=steps),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def test_steps_are_optimizer_steps_not_micro_batches():
    # 16 batches of 8, accumulated by 2: 8 optimizer steps; on JAX the callback counted batches
    algo = keras_rigl.SET(update_freq=2, end_step=6, seed=0)
    probe = UpdateSteps(algo)
    model = _compiled(keras_rigl.sparsify(_mlp(), 0.5, seed=0))
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, callbacks=[algo, probe], verbose=0)
    assert int(model.optimizer.iterations) == 8
    assert probe.seen == [(2, 2), (4, 4), (6, 6)]


@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="JAX/PyTorch gradient probes only")
@pytest.mark.parametrize("method", [keras_rigl.RigL, keras_rigl.SNFS])
def test_gradient_methods_refuse_accumulation_on_jax_and_pytorch(method):
    model = _compiled(keras_rigl.sparsify(_mlp(), 0.5, seed=0))
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.weights]
    x, y = _data()
    with pytest.raises(ValueError, match="gradient_accumulation_steps is not supported with RigL/SNFS on") as err:
        model.fit(x, y, batch_size=BATCH, epochs=1, callbacks=[method(update_freq=2, seed=0)], verbose=0)
    assert "\n" not in str(err.value) and "batch_size" in str(err.value)
    for old, new in zip(before, model.weights):  # refused before the first step
        np.testing.assert_array_equal(old, keras.ops.convert_to_numpy(new))


@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="JAX/PyTorch gradient probes only")
def test_set_and_static_still_accumulate_on_jax_and_pytorch():
    # no gradient is read: nothing to refuse
    for algo in (keras_rigl.SET(update_freq=2, seed=0), keras_rigl.Static()):
        model = _compiled(keras_rigl.sparsify(_mlp(), 0.5, seed=0))
        x, y = _data()
        model.fit(x, y, batch_size=BATCH, epochs=1, callbacks=[algo], verbose=0)
        assert int(model.optimizer.iterations) == 4


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's gradient capture")
def test_tensorflow_rigl_grows_from_the_last_micro_batch_gradient():
    import tensorflow as tf

    model = _compiled(keras_rigl.sparsify(_mlp(), 0.5, seed=0))
    layers = {l.layer.name: l for l in keras_rigl.masked_layers(model)}

    class Recorder(keras.callbacks.Callback):
        """Before RigL's hooks: the weights each batch starts from, the capture after each update step."""

        def __init__(self):
            super().__init__()
            self.effective, self.captured = {}, {}

        def on_train_batch_begin(self, batch, logs=None):
            self.effective[batch] = {
                name: [keras.ops.convert_to_numpy(mw.weight) * keras.ops.convert_to_numpy(mw.mask)
                       if mw.name == "kernel" else None for mw in l.masked_weights]
                for name, l in layers.items()}
            self.effective[batch] = {name: (kernels[0], keras.ops.convert_to_numpy(layers[name].layer.bias))
                                     for name, kernels in self.effective[batch].items()}

        def on_train_batch_end(self, batch, logs=None):
            step = int(self.model.optimizer.iterations)
            if step in (2, 4) and step not in self.captured:
                self.captured[step] = (batch, {name: keras.ops.convert_to_numpy(l.masked_weights[0].capture.read())
                                               for name, l in layers.items()})

    def dense_gradient(effective, batch):
        """dL/d(W*M) of one micro-batch, from a dense copy of the model: no keras_rigl code involved."""
        dense = _mlp()
        for name, (kernel, bias) in effective.items():
            dense.get_layer(name).set_weights([kernel, bias])
        x, y = _data()
        xb, yb = x[batch * BATCH:(batch + 1) * BATCH], y[batch * BATCH:(batch + 1) * BATCH]
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        kernels = [dense.get_layer(name).kernel for name in effective]
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, dense(xb, training=True))
        return dict(zip(effective, (g.numpy() for g in tape.gradient(loss, kernels))))

    recorder = Recorder()
    x, y = _data()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False,
              callbacks=[recorder, keras_rigl.RigL(update_freq=2, drop_fraction=0.3, seed=0)], verbose=0)
    assert sorted(recorder.captured) == [2, 4]
    for step, (batch, captured) in recorder.captured.items():
        assert batch == 2 * step - 1  # the step's second micro-batch
        # the weights do not move between the micro-batches of one optimizer step
        last = dense_gradient(recorder.effective[batch], batch)
        first = dense_gradient(recorder.effective[batch], batch - 1)
        for name in layers:
            np.testing.assert_allclose(captured[name], last[name], rtol=1e-5, atol=1e-7)
            mean = (first[name] + last[name]) / 2
            assert not np.allclose(captured[name], mean, rtol=1e-3, atol=1e-5)  # not the accumulated gradient


def test_keras_accumulates_a_probe_by_its_maximum_not_its_sum():
    # Why RigL/SNFS refuse accumulation on JAX/PyTorch: should Keras ever sum (or average) an
    # overwrite_with_gradient variable's micro-batch gradients, this fails and the refusal can go.
    from keras_rigl import backend_capture

    probe = backend_capture.make_probe(keras.layers.Layer(), "k", (3,), "float32")
    optimizer = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    first, second = np.array([3.0, -1.0, -2.0], "float32"), np.array([1.0, -4.0, 5.0], "float32")
    optimizer.apply([first], [probe])
    optimizer.apply([second], [probe])
    held = keras.ops.convert_to_numpy(probe)
    # the accumulator starts at 0: max(0, first, second), negative gradients are lost as well
    np.testing.assert_array_equal(held, [3.0, 0.0, 5.0])
    assert not np.allclose(held, first + second) and not np.allclose(held, (first + second) / 2)
