"""Dense-gradient capture: the check that it was written, and its MEAN over replicas."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_rigl
from conftest import sparse_cnn, tf_train_step


def _model(seed=0):
    return sparse_cnn(seed)


def _custom_loop(model, rigl, call_before_step):
    opt = keras.optimizers.SGD(0.01)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, 32)

    train_step = tf_train_step(model, loss_fn, opt)

    rigl.attach(model)
    for step in range(1, 5):
        if call_before_step:
            rigl.before_step(model, step)
        train_step(x[(step - 1) * 8 : step * 8], y[(step - 1) * 8 : step * 8])
        rigl.after_step(model, step, opt)


def test_custom_loop_without_before_step_is_an_error_naming_it():
    model = _model()
    rigl = keras_rigl.RigL(update_freq=2, drop_fraction=0.3, end_step=4, seed=0)
    with pytest.raises(RuntimeError, match="before_step"):
        _custom_loop(model, rigl, call_before_step=False)


def test_custom_loop_with_before_step_updates():
    model = _model()
    rigl = keras_rigl.RigL(update_freq=2, drop_fraction=0.3, end_step=4, seed=0)
    _custom_loop(model, rigl, call_before_step=True)
    assert sorted(rigl.updates["step"].unique()) == [2, 4]
    assert rigl.updates["n_moved"].sum() > 0


MEAN_OVER_REPLICAS = textwrap.dedent(
    """
    import os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np, keras_rigl
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 2)).astype("float32")
    mask = np.array([[1, 0], [0, 1], [1, 1]], "float32")
    with strategy.scope():
        layer = keras_rigl.Masked(keras.layers.Dense(2, use_bias=False))
        layer.build((None, 3))
        mw = layer.masked_weights[0]
        mw.weight.assign(kernel * mask)
        mw.mask.assign(mask)
    # a different batch (and batch size) on each replica
    batches = [rng.normal(size=(4, 3)).astype("float32"), rng.normal(size=(2, 3)).astype("float32")]
    targets = [rng.normal(size=(4, 2)).astype("float32"), rng.normal(size=(2, 2)).astype("float32")]
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: (tf.constant(batches[ctx.replica_id_in_sync_group]), tf.constant(targets[ctx.replica_id_in_sync_group]))
    )
    layer.set_capture_mode(1)

    @tf.function
    def step(xy):
        def replica_fn(x, t):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(layer(x) - t)) / tf.cast(tf.shape(x)[0], tf.float32)
            return tape.gradient(loss, mw.weight.value)
        return strategy.run(replica_fn, args=xy)

    step(per_replica)
    # by hand: loss_r = sum((x_r W_eff - t_r)^2) / n_r  ->  dL/dW_eff = 2 x_r^T (x_r W_eff - t_r) / n_r
    w_eff = kernel * mask
    hand = [2 * x.T @ (x @ w_eff - t) / len(x) for x, t in zip(batches, targets)]
    expected = (hand[0] + hand[1]) / 2
    captured = mw.capture.read().numpy()
    assert not np.allclose(hand[0], hand[1], atol=1e-3), "the replicas must see different gradients"
    np.testing.assert_allclose(captured, expected, rtol=1e-5, atol=1e-6)
    print("MEAN_OK")
    """
)


def test_captured_gradient_is_the_mean_over_replicas(tmp_path):
    script = tmp_path / "mean.py"
    script.write_text(MEAN_OVER_REPLICAS)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert "MEAN_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


def _step_graph_ops(model, trace):
    """Op types of one traced training step (forward, backward, SGD) with capture ``trace``."""
    import tensorflow as tf

    for layer in keras_rigl.masked_layers(model):
        layer.set_capture_trace(trace)
    opt = keras.optimizers.SGD(0.01)
    opt.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

    graph = step.get_concrete_function(tf.TensorSpec((None, 8, 8, 1)), tf.TensorSpec((None,), tf.int64)).graph

    def walk(g):
        for op in g.get_operations():
            yield op.type
        for f in g._functions.values():  # bodies of tf.cond and custom gradients
            yield from walk(f.graph)

    return list(walk(graph))


def test_ordinary_steps_carry_no_branch_and_no_capture():
    model = _model()
    n_masked = sum(len(l.masked_weights) for l in keras_rigl.masked_layers(model))
    off, switch, store = (_step_graph_ops(model, t) for t in ("off", "switch", "store"))
    branches = lambda ops: sum(t in ("If", "StatelessIf") for t in ops)  # noqa: E731
    assert branches(off) == 0 and branches(store) == 0
    assert branches(switch) >= n_masked  # the custom-loop step: one tf.cond per masked weight
    assert "AssignVariableOp" not in off or off.count("AssignVariableOp") < store.count("AssignVariableOp")
    assert store.count("AssignVariableOp") >= off.count("AssignVariableOp") + 2 * n_masked  # buffer + written flag


def test_fit_captures_only_on_update_steps():
    """model.fit runs the branch-free plain step between updates and the storing step on them."""

    class Probe(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.written = []

        def on_train_batch_begin(self, batch, logs=None):
            for layer in keras_rigl.masked_layers(self.model):
                for mw in layer.masked_weights:
                    mw.capture.clear_written()

        def on_train_batch_end(self, batch, logs=None):
            mw = keras_rigl.masked_layers(self.model)[1].masked_weights[0]
            self.written.append(mw.capture.was_written())

    model = _model()
    model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rigl = keras_rigl.RigL(update_freq=3, end_step=100, seed=0)
    probe = Probe()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(128, 8, 8, 1)).astype("float32"), rng.integers(0, 10, 128)
    # the probe clears the flags after RigL switched capture on, and reads them after the step
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[rigl, probe], verbose=0)
    assert probe.written == [s % 3 == 0 for s in range(1, 9)]
    assert sorted(rigl.updates["step"].unique()) == [3, 6]
    assert all(l.capture_trace == "off" for l in keras_rigl.masked_layers(model))


def test_gradient_buffers_exist_only_once_a_gradient_method_needs_them():
    """Static / SET / plain sparse models hold no second copy of their masked weights."""
    model = _model()
    model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    weights = [mw for l in keras_rigl.masked_layers(model) for mw in l.masked_weights]
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 8, 8, 1)).astype("float32"), rng.integers(0, 10, 32)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[keras_rigl.SET(update_freq=1, end_step=2)])
    assert all(mw.capture is None for mw in weights)
    n_variables = len(model.variables)
    rigl = keras_rigl.RigL(update_freq=1, end_step=100)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[rigl])
    assert all(mw.capture is not None for mw in weights)  # the same objects the caller holds
    assert len(rigl.updates) > 0
    assert len(model.variables) == n_variables  # buffers stay out of the model's (saved) variables
