"""RigL / SET / SNFS / Static inside model.fit: invariants, schedule, resume, errors."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pandas as pd
import pytest

import keras_rigl
from keras_rigl import optimizer_state


def _data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, size=n)
    return x, y


def _model(seed=0, sparsity=0.8):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inp)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(32, activation="relu", name="hidden")(x)
    out = keras.layers.Dense(10, name="out")(x)
    return keras_rigl.sparsify(keras.Model(inp, out), sparsity, seed=seed)


def _masks(model):
    return {
        f"{l.layer.name}/{mw.name}": keras.ops.convert_to_numpy(mw.mask).copy()
        for l in keras_rigl.masked_layers(model)
        for mw in l.masked_weights
    }


class InvariantProbe(keras.callbacks.Callback):
    """Placed after the sparse-training callback: checks the state after every step."""

    def __init__(self, algo):
        super().__init__()
        self.algo = algo
        self.checked_updates = 0

    def on_train_begin(self, logs=None):
        self.before = _masks(self.model)
        self.counts = {k: int(m.sum()) for k, m in self.before.items()}

    def on_train_batch_end(self, batch, logs=None):
        opt = self.model.optimizer
        now = _masks(self.model)
        for layer in keras_rigl.masked_layers(self.model):
            for mw in layer.masked_weights:
                key = f"{layer.layer.name}/{mw.name}"
                w = keras.ops.convert_to_numpy(mw.weight)
                m = now[key]
                assert int(m.sum()) == self.counts[key], "active count changed"
                assert np.all(w[m == 0] == 0), "masked weight is not 0"
                for slot, reset in optimizer_state.slot_variables(opt, mw.weight):
                    s = keras.ops.convert_to_numpy(slot)
                    assert np.all(s[m == 0] == reset), f"optimizer state at masked positions: {slot.path}"
                grown = (m == 1) & (self.before[key] == 0)
                if self.algo.is_update_step(self.algo.step) and grown.any():
                    assert np.all(w[grown] == 0), "grown weights must start at 0"
                    for slot, reset in optimizer_state.slot_variables(opt, mw.weight):
                        assert np.all(keras.ops.convert_to_numpy(slot)[grown] == reset)
                    self.checked_updates += 1
        self.before = now


@pytest.mark.parametrize("algo_cls", [keras_rigl.RigL, keras_rigl.SET, keras_rigl.SNFS])
@pytest.mark.parametrize(
    "optimizer",
    [lambda: keras.optimizers.SGD(0.05, momentum=0.9), lambda: keras.optimizers.Adam(1e-3)],
    ids=["sgd_momentum", "adam"],
)
def test_updates_keep_invariants_in_fit(algo_cls, optimizer):
    model = _model()
    model.compile(optimizer(), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    algo = algo_cls(update_freq=3, drop_fraction=0.5, seed=0)
    probe = InvariantProbe(algo)
    start = _masks(model)
    x, y = _data()
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[algo, probe], verbose=0)
    assert probe.checked_updates > 0
    assert any(not np.array_equal(start[k], v) for k, v in _masks(model).items())
    # 16 steps, end at 0.75 -> 12: updates at 3, 6, 9, 12 on every weight that is not dense
    table = algo.updates
    assert sorted(table["step"].unique()) == [3, 6, 9, 12]
    sparse_weights = [k for k, m in start.items() if not m.all()]
    assert len(sparse_weights) == 2  # ERK made the small conv dense
    assert len(table) == 4 * len(sparse_weights)
    assert (table["n_moved"] <= table["n_dropped"]).all()
    expected = [0.25 * (1 + np.cos(np.pi * s / 12)) for s in (3, 6, 9, 12)]
    np.testing.assert_allclose(table.groupby("step")["drop_fraction"].first().values, expected)


def test_static_never_changes_masks_and_logs(tmp_path):
    model = _model()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start = _masks(model)
    csv = tmp_path / "log.csv"
    x, y = _data()
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[keras_rigl.Static(), keras.callbacks.CSVLogger(str(csv))], verbose=0)
    for k, v in _masks(model).items():
        np.testing.assert_array_equal(start[k], v)
    log = pd.read_csv(csv)
    assert {"sparsity", "drop_fraction", "itop"} <= set(log.columns)
    assert log["sparsity"].iloc[-1] == pytest.approx(0.8, abs=1e-3)
    assert log["itop"].iloc[-1] == pytest.approx(0.2, abs=1e-3)


def test_rigl_logs_and_itop_grows(tmp_path):
    model = _model()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rigl = keras_rigl.RigL(update_freq=2, seed=0, log_dir=str(tmp_path / "tb"))
    x, y = _data()
    hist = model.fit(x, y, batch_size=16, epochs=2, callbacks=[rigl], verbose=0)
    assert hist.history["itop"][-1] > 0.2 + 1e-3
    assert hist.history["sparsity"][-1] == pytest.approx(0.8, abs=1e-3)
    assert list((tmp_path / "tb").iterdir()), "TensorBoard events were written"


def test_rigl_grows_where_the_dense_gradient_is_largest():
    model = _model()
    model.compile(keras.optimizers.SGD(0.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # lr 0: the weights do not move, so the update is fully determined by the captured gradient
    rigl = keras_rigl.RigL(update_freq=1, drop_fraction=0.3, decay="constant", end_step=1, seed=0)
    layer = keras_rigl.masked_layers(model)[1]
    mw = layer.masked_weights[0]
    before = keras.ops.convert_to_numpy(mw.mask).copy()
    x, y = _data(16)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[rigl], verbose=0)
    grad = np.abs(keras.ops.convert_to_numpy(mw.capture.read()))
    after = keras.ops.convert_to_numpy(mw.mask)
    new = (after == 1) & (before == 0)
    still_out = (after == 0)
    assert new.any()
    assert grad[new].min() >= grad[still_out].max()


def test_resume_gives_the_same_masks_as_an_uninterrupted_run(tmp_path):
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()
    x, y = _data()

    def run(epochs, initial_epoch=0, model=None):
        model = model or _model(seed=1)
        if not model.compiled:
            model.compile(keras.optimizers.SGD(0.05, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        rigl = keras_rigl.RigL(update_freq=3, drop_fraction=0.3, end_step=28, seed=7)
        model.fit(x, y, batch_size=16, epochs=epochs, initial_epoch=initial_epoch, shuffle=False, callbacks=[rigl], verbose=0)
        return model, rigl

    full, full_rigl = run(4)
    half, _ = run(2)
    half.save(tmp_path / "half.keras")
    again = keras.models.load_model(tmp_path / "half.keras")
    resumed, resumed_rigl = run(4, initial_epoch=2, model=again)
    assert int(resumed.optimizer.iterations) == int(full.optimizer.iterations) == 32
    for k, v in _masks(full).items():
        np.testing.assert_array_equal(v, _masks(resumed)[k])
    for a, b in zip(full.weights, resumed.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    assert resumed_rigl.updates["step"].min() == 18


@pytest.mark.parametrize("jit", [True, False])
def test_jit_compile(jit):
    model = _model()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    rigl = keras_rigl.RigL(update_freq=2, seed=0)
    probe = InvariantProbe(rigl)
    x, y = _data(64)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[rigl, probe], verbose=0)
    assert probe.checked_updates > 0
    assert rigl.updates["n_moved"].sum() > 0


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_rigl(policy):
    keras.mixed_precision.set_global_policy(policy)
    model = _model()
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rigl = keras_rigl.RigL(update_freq=2, seed=0)
    probe = InvariantProbe(rigl)
    x, y = _data(64)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[rigl, probe], verbose=0)
    assert probe.checked_updates > 0


def test_grow_init_random_draws_from_the_initializer():
    model = _model()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rigl = keras_rigl.RigL(update_freq=1, end_step=1, decay="constant", grow_init="random", seed=0)
    before = _masks(model)
    x, y = _data(32)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[rigl], verbose=0)
    layer = keras_rigl.masked_layers(model)[1]
    mw = layer.masked_weights[0]
    w, m = keras.ops.convert_to_numpy(mw.weight), keras.ops.convert_to_numpy(mw.mask)
    grown = (m == 1) & (before["hidden/kernel"] == 0)
    assert grown.any() and np.count_nonzero(w[grown]) == grown.sum()


def test_custom_gradient_tape_loop():
    import tensorflow as tf

    model = _model()
    opt = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rigl = keras_rigl.RigL(update_freq=2, drop_fraction=0.3, end_step=6, seed=0)
    rigl.attach(model)
    x, y = _data(64)
    start = _masks(model)

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    for step in range(1, 9):
        xb, yb = x[(step - 1) * 8 : step * 8], y[(step - 1) * 8 : step * 8]
        rigl.before_step(model, step)
        train_step(xb, yb)
        rigl.after_step(model, step, opt)
    assert sorted(rigl.updates["step"].unique()) == [2, 4, 6]
    assert any(not np.array_equal(start[k], v) for k, v in _masks(model).items())
    for k, v in _masks(model).items():
        assert v.sum() == start[k].sum()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(drop_fraction=0.0), "drop_fraction"),
        (dict(drop_fraction=1.2), "drop_fraction"),
        (dict(update_freq=0), "update_freq"),
        (dict(begin_step=10, end_step=5), "end_step"),
        (dict(grow_init="ones"), "grow_init"),
        (dict(decay="exp"), "decay"),
    ],
)
def test_bad_settings_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_rigl.RigL(**kwargs)


def test_errors_before_training_starts():
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    dense.compile("sgd", "mse")
    with pytest.raises(ValueError, match="sparsify"):
        dense.fit(np.zeros((4, 4)), np.zeros((4, 2)), callbacks=[keras_rigl.RigL()], verbose=0)

    import tensorflow as tf

    model = _model()
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data(32)
    infinite = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat()
    with pytest.raises(ValueError, match="end_step"):
        model.fit(infinite, steps_per_epoch=None, epochs=1, callbacks=[keras_rigl.RigL()], verbose=0)
    with pytest.raises(NotImplementedError, match="Adafactor"):
        model.compile(keras.optimizers.Adafactor(), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=8, epochs=1, callbacks=[keras_rigl.RigL(update_freq=1)], verbose=0)


MIRRORED = textwrap.dedent(
    """
    import os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np, keras_rigl
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        inp = keras.Input((6,))
        out = keras.layers.Dense(4)(keras.layers.Dense(16, activation="relu")(inp))
        model = keras_rigl.sparsify(keras.Model(inp, out), 0.7, seed=0)
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(128, 6)).astype("float32"), rng.normal(size=(128, 4)).astype("float32")
    start = {mw.mask.path: mw.mask.numpy().copy() for l in keras_rigl.masked_layers(model) for mw in l.masked_weights}
    rigl = keras_rigl.RigL(update_freq=2, drop_fraction=0.5, seed=0)
    model.fit(x, y, batch_size=32, epochs=3, callbacks=[rigl], verbose=0)
    changed = False
    for l in keras_rigl.masked_layers(model):
        for mw in l.masked_weights:
            replicas = [v.numpy() for v in mw.mask.value._values] if hasattr(mw.mask.value, "_values") else None
            assert replicas is not None and len(replicas) == 2, "masks are mirrored on 2 replicas"
            assert np.array_equal(replicas[0], replicas[1]), "replicas differ"
            w = [v.numpy() for v in mw.weight.value._values]
            assert np.array_equal(w[0], w[1])
            assert np.all(w[0][replicas[0] == 0] == 0)
            assert replicas[0].sum() == start[mw.mask.path].sum()
            changed |= not np.array_equal(replicas[0], start[mw.mask.path])
    assert changed and len(rigl.updates) > 0
    print("MIRRORED_OK", len(rigl.updates))
    """
)


def test_mirrored_strategy_replicas_end_with_identical_masks(tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert "MIRRORED_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
