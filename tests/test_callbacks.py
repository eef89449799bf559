"""RigL / SET / SNFS / Static inside model.fit: invariants, schedule, resume, errors."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pandas as pd
import pytest

import keras_rigl
from conftest import UpdateSteps, sparse_cnn, tf_train_step
from keras_rigl import optimizer_state


def _data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, size=n)
    return x, y


def _model(seed=0, sparsity=0.8):
    return sparse_cnn(seed, sparsity)


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
                    expected = w if reset == optimizer_state.FOLLOW_WEIGHT else np.full_like(s, reset)
                    assert np.all(s[m == 0] == expected[m == 0]), f"optimizer state at masked positions: {slot.path}"
                grown = (m == 1) & (self.before[key] == 0)
                if self.algo.is_update_step(self.algo.step) and grown.any():
                    assert np.all(w[grown] == 0), "grown weights must start at 0"
                    for slot, reset in optimizer_state.slot_variables(opt, mw.weight):
                        s = keras.ops.convert_to_numpy(slot)
                        assert np.all(s[grown] == (0.0 if reset == optimizer_state.FOLLOW_WEIGHT else reset))
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
    model = _model()
    opt = keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rigl = keras_rigl.RigL(update_freq=2, drop_fraction=0.3, end_step=6, seed=0)
    rigl.attach(model)
    x, y = _data(64)
    start = _masks(model)

    train_step = tf_train_step(model, loss_fn, opt)

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


# The two subprocess checks of this file (MirroredStrategy, resume) run in ONE subprocess (see
# subprocess_output below): it imports TensorFlow once instead of twice (~5-10 s). SUBPROCESS_SETUP
# runs first, then each script in a namespace of its own.
SUBPROCESS_SETUP = textwrap.dedent(
    """
    import os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import tensorflow as tf
    # two logical CPUs for MirroredStrategy: only possible before TensorFlow initialises its devices
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    """
)

MIRRORED = textwrap.dedent(
    """
    import tensorflow as tf
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


def test_mirrored_strategy_replicas_end_with_identical_masks(subprocess_output):
    stdout, stderr = subprocess_output
    assert "MIRRORED_OK" in stdout, stdout[-3000:] + stderr[-5000:]


# ----------------------------------------------------------------- resume
# Run in a subprocess: op determinism is process-wide and TensorFlow has no
# public switch to turn it off again, so it must not leak into later tests. It is switched on
# after MIRRORED has run, so the MirroredStrategy check runs without it, as a user would.
RESUME = textwrap.dedent(
    """
    import json, os, sys, tempfile
    import tensorflow as tf
    tf.config.experimental.enable_op_determinism()
    import keras, numpy as np, keras_rigl

    def data():
        rng = np.random.default_rng(0)
        return rng.normal(size=(128, 8, 8, 1)).astype("float32"), rng.integers(0, 10, size=128)

    def model_(seed=1):
        keras.utils.set_random_seed(seed)
        inp = keras.Input((8, 8, 1))
        x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inp)
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(32, activation="relu", name="hidden")(x)
        out = keras.layers.Dense(10, name="out")(x)
        m = keras_rigl.sparsify(keras.Model(inp, out), 0.8, seed=seed)
        m.compile(keras.optimizers.SGD(0.05, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m

    def masks(m):
        return [keras.ops.convert_to_numpy(mw.mask) for l in keras_rigl.masked_layers(m) for mw in l.masked_weights]

    class StopAfter(keras.callbacks.Callback):
        def __init__(self, epochs):
            super().__init__()
            self.epochs = epochs

        def on_epoch_end(self, epoch, logs=None):
            if epoch + 1 == self.epochs:
                self.model.stop_training = True

    cases = {
        "rigl_end_step": (keras_rigl.RigL, dict(update_freq=3, drop_fraction=0.3, end_step=28, seed=7), True),
        "rigl_default_end_step": (keras_rigl.RigL, dict(update_freq=3, seed=7), True),
        "set_default_end_step": (keras_rigl.SET, dict(update_freq=3, seed=7), True),
        "snfs_default_end_step": (keras_rigl.SNFS, dict(update_freq=3, seed=7), False),
    }
    x, y = data()
    out = {}
    tmp = tempfile.mkdtemp()
    for name, (cls, kwargs, reload) in cases.items():
        full = model_()
        full_cb = cls(**kwargs)
        full.fit(x, y, batch_size=16, epochs=4, shuffle=False, callbacks=[full_cb], verbose=0)
        half = model_()
        half_cb = cls(**kwargs)
        # the interrupted run was planned for 4 epochs and stopped (killed) after 2
        half.fit(x, y, batch_size=16, epochs=4, shuffle=False, callbacks=[half_cb, StopAfter(2)], verbose=0)
        if reload:
            path = os.path.join(tmp, name + ".keras")
            half.save(path)
            half = keras.models.load_model(path)
        resumed_cb = cls(**kwargs)
        half.fit(x, y, batch_size=16, epochs=4, initial_epoch=2, shuffle=False, callbacks=[resumed_cb], verbose=0)
        out[name] = dict(
            iterations=[int(full.optimizer.iterations), int(half.optimizer.iterations)],
            masks_equal=all(np.array_equal(a, b) for a, b in zip(masks(full), masks(half))),
            weights_equal=all(
                np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
                for a, b in zip(full.weights, half.weights)
            ),
            full_steps=sorted(set(full_cb.updates["step"])),
            resumed_steps=sorted(set(half_cb.updates["step"]) | set(resumed_cb.updates["step"])),
            resumed_first=int(resumed_cb.updates["step"].min()),
            fractions_equal=bool(np.allclose(
                full_cb.updates.groupby("step")["drop_fraction"].first().loc[18:].values,
                resumed_cb.updates.groupby("step")["drop_fraction"].first().values,
            )),
            moved=int(resumed_cb.updates["n_moved"].sum()),
        )
    print("RESUME_JSON " + json.dumps(out))
    """
)


# Each script runs in a fresh namespace; one that fails prints its traceback to stderr and the next
# still runs, so each test reports its own script's failure. MIRRORED runs first: RESUME switches
# op determinism on for the rest of the process.
SUBPROCESS_RUNNER = textwrap.dedent(
    """
    import json, sys, traceback
    scripts = json.load(open(sys.argv[1], encoding="utf-8"))
    exec(compile(scripts.pop("setup"), "<setup>", "exec"), {"__name__": "__main__"})
    for name, source in scripts.items():
        try:
            exec(compile(source, f"<{name}>", "exec"), {"__name__": "__main__"})
        except BaseException:
            print(f"{name} failed:", traceback.format_exc(), file=sys.stderr, flush=True)
        finally:
            sys.stdout.flush()
            import keras
            keras.backend.clear_session()
    """
)


@pytest.fixture(scope="module")
def subprocess_output(tmp_path_factory):
    """(stdout, stderr) of one subprocess that runs MIRRORED, then RESUME."""
    import json
    import os

    work = tmp_path_factory.mktemp("subprocess")
    (work / "scripts.json").write_text(json.dumps({"setup": SUBPROCESS_SETUP, "mirrored": MIRRORED, "resume": RESUME}))
    (work / "runner.py").write_text(SUBPROCESS_RUNNER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(__import__("pathlib").Path(keras_rigl.__file__).parents[1]), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(work / "runner.py"), str(work / "scripts.json")], capture_output=True,
                          text=True, timeout=1200, env=env, cwd=work)
    return proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def resume_results(subprocess_output):
    import json

    stdout, stderr = subprocess_output
    lines = [l for l in stdout.splitlines() if l.startswith("RESUME_JSON ")]
    assert lines, stdout[-3000:] + stderr[-5000:]
    return json.loads(lines[0][len("RESUME_JSON "):])


@pytest.mark.parametrize(
    "case", ["rigl_end_step", "rigl_default_end_step", "set_default_end_step", "snfs_default_end_step"]
)
def test_resume_gives_the_same_masks_as_an_uninterrupted_run(resume_results, case):
    """Same planned epochs, shuffle=False, optimizer state saved: resumed masks == uninterrupted masks."""
    r = resume_results[case]
    assert r["iterations"] == [32, 32]
    # 8 steps per epoch, 32 planned: default end_step = 0.75 * 32 = 24, explicit 28
    expected_steps = list(range(3, 29, 3)) if case == "rigl_end_step" else list(range(3, 25, 3))
    assert r["full_steps"] == expected_steps
    assert r["resumed_steps"] == expected_steps  # the resumed plan is the uninterrupted plan
    assert r["resumed_first"] == 18
    assert r["fractions_equal"]
    assert r["moved"] > 0
    assert r["masks_equal"] and r["weights_equal"]


def test_op_determinism_is_not_left_switched_on():
    # TensorFlow exports enable_op_determinism but neither its reader nor a way back
    from tensorflow.python.framework import config as tf_config

    assert not tf_config.is_op_determinism_enabled()


# ------------------------------------------------------------ structure
def test_methods_are_subclasses_of_a_neutral_base():
    assert not issubclass(keras_rigl.Static, keras_rigl.SET)
    for cls in (keras_rigl.Static, keras_rigl.SET, keras_rigl.RigL, keras_rigl.SNFS):
        assert issubclass(cls, keras_rigl.SparseTraining)
    # SNFS grows by the same score code as RigL (the buffer holds the EMA)
    assert keras_rigl.SNFS.grow_scores is keras_rigl.RigL.grow_scores
    assert keras_rigl.SET.drop_scores is keras_rigl.SparseTraining.drop_scores


def test_callbacks_module_imports_no_tensorflow():
    import ast
    import inspect

    from keras_rigl import callbacks

    tree = ast.parse(inspect.getsource(callbacks))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "tensorflow" not in imported


@pytest.mark.parametrize(
    "cb",
    [
        lambda: keras_rigl.Static(log_dir="tb_static"),
        lambda: keras_rigl.SET(update_freq=7, drop_fraction=0.2, decay="linear", begin_step=3, end_step=90,
                               end_fraction=0.5, grow_init="random", seed=11, reset_optimizer_state=False,
                               log_dir="tb_set"),
        lambda: keras_rigl.RigL(update_freq=np.int64(10), drop_fraction=keras_rigl.DecayedFraction(0.4, 500, "linear"),
                                log_dir="tb_rigl", seed=None),
        lambda: keras_rigl.SNFS(update_freq=5, momentum=0.5, log_dir="tb_snfs"),
    ],
    ids=["static", "set", "rigl", "snfs"],
)
def test_config_round_trips(cb):
    cb = cb()
    config = cb.get_config()
    again = type(cb).from_config(config)
    assert again.get_config() == config
    assert again.log_dir == cb.log_dir is not None
    assert again.drop_fraction == cb.drop_fraction
    if isinstance(cb, keras_rigl.SNFS):
        assert config["momentum"] == 0.5 and again.ema_decay == 0.5
    # through JSON, as a saved config would travel
    import json

    assert type(cb).from_config(json.loads(json.dumps(config))).get_config() == config


# ------------------------------------------------------------- drop_scores
class DropByWeightTimesGradient(keras_rigl.RigL):
    """Drop the connections with the smallest |w * g| (g: the dense gradient of the update batch)."""

    def drop_scores(self, layer, masked_weight, seed):
        return keras.ops.abs(masked_weight.weight * masked_weight.capture.read())


def test_drop_scores_hook_drops_by_a_user_score():
    model = _model()
    model.compile(keras.optimizers.SGD(0.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # lr 0: the weights do not move, so the update is determined by w and the captured gradient
    algo = DropByWeightTimesGradient(update_freq=1, drop_fraction=0.3, decay="constant", end_step=1, seed=0)
    mw = keras_rigl.masked_layers(model)[1].masked_weights[0]
    before = keras.ops.convert_to_numpy(mw.mask).astype(bool)
    w = keras.ops.convert_to_numpy(mw.weight).copy()
    x, y = _data(16)
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[algo], verbose=0)
    g = np.abs(keras.ops.convert_to_numpy(mw.capture.read()))
    after = keras.ops.convert_to_numpy(mw.mask).astype(bool)
    # by hand: keep the n - k largest |w g| of the active, grow the k largest |g| of the rest
    n = int(before.sum())
    k = int(np.floor(0.3 * n))
    wg = np.where(before, np.abs(w * g), -1.0).ravel()
    keep = np.zeros(wg.size, bool)
    keep[np.argsort(-wg, kind="stable")[: n - k]] = True
    grow_score = np.where(keep, -1.0, g.ravel())
    grow = np.zeros(wg.size, bool)
    grow[np.argsort(-grow_score, kind="stable")[:k]] = True
    np.testing.assert_array_equal(after.ravel(), keep | grow)
    # and the |w| rule would have kept another set: the hook really decided
    by_w = np.zeros(wg.size, bool)
    by_w[np.argsort(-np.where(before, np.abs(w), -1.0).ravel(), kind="stable")[: n - k]] = True
    assert not np.array_equal(by_w, keep)
    hidden = algo.updates[algo.updates["layer"] == "hidden"]
    assert hidden["n_dropped"].tolist() == [k]


def test_drop_and_grow_takes_drop_scores():
    from keras_rigl import updates

    weight = np.array([5.0, 4.0, 3.0, 2.0, 0.0, 0.0])
    mask = np.array([1, 1, 1, 1, 0, 0], dtype="float32")
    drop = np.array([1.0, 9.0, 8.0, 7.0, 0.0, 0.0])  # keeps 4, 3, 2: drops the largest |w|
    grow = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 2.0])
    result = updates.drop_and_grow(weight, mask, grow, 0.25, seed=0, drop_scores=drop)
    np.testing.assert_array_equal(result.new_mask, [0, 1, 1, 1, 0, 1])
    assert (result.n_dropped, result.n_moved, result.n_active) == (1, 1, 4)
    default = updates.drop_and_grow(weight, mask, grow, 0.25, seed=0)
    np.testing.assert_array_equal(default.new_mask, [1, 1, 1, 0, 0, 1])
    with pytest.raises(ValueError, match="drop_scores"):
        updates.drop_and_grow(weight, mask, grow, 0.25, drop_scores=np.zeros(5))


# ----------------------------------------------------------- drop_fraction
def _fit_16_steps(algo, optimizer="adam"):
    model = _model()
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[algo], verbose=0)
    return model


def test_drop_fraction_callable():
    algo = keras_rigl.SET(update_freq=3, drop_fraction=lambda step: 0.5 if step < 6 else 0.25, end_step=12, seed=0)
    _fit_16_steps(algo)
    table = algo.updates
    per_step = table.groupby("step")["drop_fraction"].first()
    assert per_step.index.tolist() == [3, 6, 9, 12]
    assert per_step.tolist() == [0.5, 0.25, 0.25, 0.25]
    assert (table["n_dropped"] == np.floor(table["drop_fraction"] * table["n_active"]).astype(int)).all()


def test_drop_fraction_schedule_object():
    algo = keras_rigl.RigL(update_freq=4, drop_fraction=keras_rigl.DecayedFraction(0.4, 20), seed=0)
    _fit_16_steps(algo)
    per_step = algo.updates.groupby("step")["drop_fraction"].first()
    # default end_step 0.75 * 16 = 12; the schedule object decays to its own end step 20
    assert per_step.index.tolist() == [4, 8, 12]
    np.testing.assert_allclose(per_step.values, [0.2 * (1 + np.cos(np.pi * s / 20)) for s in (4, 8, 12)])


def test_drop_fraction_callable_out_of_range_is_refused():
    algo = keras_rigl.SET(update_freq=3, drop_fraction=lambda step: 1.5, end_step=12, seed=0)
    with pytest.raises(ValueError, match=r"^drop_fraction\(\d+\) must be a number in \[0, 1\]"):
        _fit_16_steps(algo)


@keras.saving.register_keras_serializable(package="keras_rigl_tests")
def half_then_quarter(step):
    return 0.5 if step < 100 else 0.25


def test_registered_function_drop_fraction_round_trips():
    cb = keras_rigl.SET(drop_fraction=half_then_quarter)
    again = keras_rigl.SET.from_config(cb.get_config())
    assert again.drop_fraction is half_then_quarter


# ------------------------------------------------------- schedules in fit
def test_warns_when_no_mask_update_falls_inside_fit():
    # 16 steps, default end_step 12 < update_freq 50: static training in disguise
    with pytest.warns(UserWarning, match="no mask update"):
        _fit_16_steps(keras_rigl.RigL(update_freq=50, seed=0))


def test_no_warning_when_updates_happen(recwarn):
    algo = keras_rigl.SET(update_freq=5, seed=0)
    _fit_16_steps(algo)
    assert not [w for w in recwarn if "no mask update" in str(w.message)]
    assert sorted(algo.updates["step"].unique()) == [5, 10]


def test_repeated_fit_replans_from_the_current_step():
    model = _model()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    algo = keras_rigl.SET(update_freq=3, seed=0)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[algo], verbose=0)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[algo], verbose=0)
    per_step = algo.updates.groupby("step")["drop_fraction"].first()
    # each fit: 16 steps planned, updates up to 0.75 * 16 = 12 steps after its start, cosine from its start
    assert per_step.index.tolist() == [3, 6, 9, 12, 19, 22, 25, 28]
    expected = [0.15 * (1 + np.cos(np.pi * t / 12)) for t in (3, 6, 9, 12)] * 2
    np.testing.assert_allclose(per_step.values, expected)


def test_repeated_fit_with_explicit_end_step_is_absolute_and_warns():
    model = _model()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    algo = keras_rigl.SET(update_freq=3, end_step=12, seed=0)
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[algo], verbose=0)
    with pytest.warns(UserWarning, match="no mask update"):
        model.fit(x, y, batch_size=16, epochs=2, callbacks=[algo], verbose=0)
    assert sorted(algo.updates["step"].unique()) == [3, 6, 9, 12]


def test_begin_step_delays_the_first_update():
    algo = keras_rigl.SET(update_freq=3, begin_step=4, seed=0)
    _fit_16_steps(algo)
    # updates at begin_step + k * update_freq up to the default end_step 12
    assert sorted(algo.updates["step"].unique()) == [4, 7, 10]


@pytest.mark.parametrize("cls", [keras_rigl.SET, keras_rigl.RigL, keras_rigl.SNFS])
def test_steps_per_execution_above_one_is_refused(cls):
    model = _model()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), steps_per_execution=2)
    x, y = _data(32)
    with pytest.raises(ValueError, match="steps_per_execution=1"):
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[cls(update_freq=1, seed=0)], verbose=0)


def test_static_accepts_steps_per_execution():
    model = _model()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), steps_per_execution=2)
    start = _masks(model)
    x, y = _data(64)
    static = keras_rigl.Static()
    model.fit(x, y, batch_size=16, epochs=1, callbacks=[static], verbose=0)
    for k, v in _masks(model).items():
        np.testing.assert_array_equal(start[k], v)
    # two optimizer steps per batch hook: the callback's step is the optimizer's, not the count of hooks
    assert static.step == int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 4


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(end_fraction="x"), "end_fraction"),
        (dict(end_fraction=0.0), "end_fraction"),
        (dict(seed="abc"), "seed"),
        (dict(seed=-1), "seed"),
        (dict(update_freq=2.5), "update_freq"),
        (dict(begin_step="3"), "begin_step"),
        (dict(end_step=10.5), "end_step"),
        (dict(reset_optimizer_state="yes"), "reset_optimizer_state"),
        (dict(drop_fraction="0.3"), "drop_fraction"),
        (dict(log_dir=3), "log_dir"),
    ],
)
def test_argument_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError) as err:
        keras_rigl.SET(**kwargs)
    message = str(err.value)
    assert message.startswith(name) or f" {name} " in message or f"{name} " in message
    assert "\n" not in message


def test_snfs_momentum_error_names_the_argument():
    with pytest.raises(ValueError, match="^momentum"):
        keras_rigl.SNFS(momentum="high")


def test_numpy_integers_are_accepted():
    algo = keras_rigl.RigL(update_freq=np.int64(10), begin_step=np.int32(0), end_step=np.int64(50), seed=np.int64(3))
    assert (algo.update_freq, algo.end_step, algo.seed) == (10, 50, 3)
    assert type(algo.update_freq) is int


# ------------------------------------------------------ optimizer state
def _slot_setup(optimizer):
    var = keras.Variable(np.linspace(-1, 1, 12).reshape(3, 4).astype("float32"), name="w")
    optimizer.build([var])
    rng = np.random.default_rng(0)
    for _ in range(3):
        optimizer.apply_gradients([(keras.ops.convert_to_tensor(rng.normal(size=(3, 4)).astype("float32")), var)])
    return var


@pytest.mark.parametrize(
    "make,kinds",
    [
        (lambda: keras.optimizers.SGD(0.1, momentum=0.9), [0.0]),
        (lambda: keras.optimizers.Adam(0.1), [0.0, 0.0]),
        (lambda: keras.optimizers.Adam(0.1, amsgrad=True), [0.0, 0.0, 0.0]),
        (lambda: keras.optimizers.Adagrad(0.1, initial_accumulator_value=0.25), [0.25]),
        (lambda: keras.optimizers.RMSprop(0.1, momentum=0.5, centered=True), [0.0, 0.0, 0.0]),
        (lambda: keras.optimizers.Lion(0.1), [0.0]),
        (lambda: keras.optimizers.Adam(0.1, use_ema=True), [0.0, 0.0, optimizer_state.FOLLOW_WEIGHT]),
    ],
    ids=["sgd_momentum", "adam", "adam_amsgrad", "adagrad", "rmsprop_centered", "lion", "adam_use_ema"],
)
def test_reset_slots(make, kinds):
    optimizer = make()
    var = _slot_setup(optimizer)
    slots = optimizer_state.slot_variables(optimizer, var)
    assert sorted(map(str, (r for _, r in slots))) == sorted(map(str, kinds))
    before = [keras.ops.convert_to_numpy(s).copy() for s, _ in slots]
    assert all(np.count_nonzero(b) == b.size for b in before)  # state is non-trivial everywhere
    positions = np.zeros((3, 4), bool)
    positions[0, 1] = positions[2, 3] = True
    # a grown connection drawn at a non-zero value (grow_init="random"): the EMA restarts there
    new_weight = keras.ops.convert_to_numpy(var).copy()
    new_weight[0, 1], new_weight[2, 3] = 0.5, 0.0
    var.assign(new_weight)
    optimizer_state.reset_slots(optimizer, var, positions)
    for (slot, reset), old in zip(slots, before):
        now = keras.ops.convert_to_numpy(slot)
        np.testing.assert_array_equal(now[~positions], old[~positions])
        if reset == optimizer_state.FOLLOW_WEIGHT:
            np.testing.assert_array_equal(now[positions], [0.5, 0.0])
        else:
            np.testing.assert_array_equal(now[positions], [reset, reset])


def test_adafactor_state_is_refused_naming_the_fix():
    optimizer = keras.optimizers.Adafactor()
    var = _slot_setup(optimizer)
    with pytest.raises(NotImplementedError, match="reset_optimizer_state=False"):
        optimizer_state.slot_variables(optimizer, var)


def test_unknown_per_variable_state_is_refused():
    class KeepsStateInADict(keras.optimizers.SGD):
        def build(self, variables):
            super().build(variables)
            self.extra = {id(v): self.add_variable_from_reference(v, "extra") for v in variables}

    optimizer = KeepsStateInADict(0.1, momentum=0.9)
    var = _slot_setup(optimizer)
    with pytest.raises(NotImplementedError, match="reset_optimizer_state=False"):
        optimizer_state.slot_variables(optimizer, var)


def test_reset_optimizer_state_false_keeps_the_state_of_dropped_connections():
    class Probe(keras.callbacks.Callback):
        def __init__(self, algo):
            super().__init__()
            self.algo, self.dropped_momentum = algo, []

        def on_train_batch_begin(self, batch, logs=None):
            self.masks = _masks(self.model)

        def on_train_batch_end(self, batch, logs=None):
            if not self.algo.is_update_step(self.algo.step):
                return
            layer = keras_rigl.masked_layers(self.model)[1]
            mw = layer.masked_weights[0]
            dropped = (self.masks["hidden/kernel"] == 1) & (keras.ops.convert_to_numpy(mw.mask) == 0)
            (slot, _), = optimizer_state.slot_variables(self.model.optimizer, mw.weight)
            self.dropped_momentum.append(np.abs(keras.ops.convert_to_numpy(slot)[dropped]).max())

    results = {}
    for reset in (True, False):
        algo = keras_rigl.SET(
            update_freq=4, drop_fraction=0.5, decay="constant", end_step=8, seed=0, reset_optimizer_state=reset
        )
        probe = Probe(algo)
        model = _model()
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x, y = _data(128)
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[algo, probe], verbose=0)
        results[reset] = probe.dropped_momentum
    assert len(results[True]) == len(results[False]) == 2
    assert max(results[True]) == 0.0
    assert min(results[False]) > 0.0


def test_use_ema_in_fit_keeps_invariants():
    model = _model()
    model.compile(keras.optimizers.Adam(1e-3, use_ema=True), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    algo = keras_rigl.SET(update_freq=3, drop_fraction=0.5, seed=0)
    probe = InvariantProbe(algo)
    x, y = _data()
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[algo, probe], verbose=0)
    assert probe.checked_updates > 0


def test_steps_are_optimizer_steps_not_batches():
    # gradient accumulation over 2 batches: 16 batches are 8 optimizer steps
    algo = keras_rigl.SET(update_freq=2, end_step=6, seed=0)
    probe = UpdateSteps(algo)
    model = _model()
    model.compile(keras.optimizers.SGD(0.05, gradient_accumulation_steps=2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    model.fit(x, y, batch_size=16, epochs=2, callbacks=[algo, probe], verbose=0)
    assert int(model.optimizer.iterations) == 8
    assert probe.seen == [(2, 2), (4, 4), (6, 6)]


@pytest.mark.parametrize("kwargs,name", [(dict(total_steps="100"), "total_steps"), (dict(step=1.5), "step")])
def test_attach_arguments_are_checked(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be an integer"):
        keras_rigl.RigL(update_freq=2).attach(_model(), **{"total_steps": 100, **kwargs})


def test_steps_skipped_by_the_loss_scale_do_not_move_the_updates():
    """Updates happen at optimizer steps, not batches, even while the step is not read every batch."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model()
        # 2**40 overflows the float16 gradients: the first steps are skipped while the scale halves
        opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05), initial_scale=2.0**40)
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        rigl = keras_rigl.RigL(update_freq=5, end_step=40, seed=0)

        class AtUpdates(keras.callbacks.Callback):
            seen = []

            def on_train_batch_end(self, batch, logs=None):
                done = 0 if rigl.updates is None or len(rigl.updates) == 0 else rigl.updates["step"].nunique()
                self.seen.append((int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)), done))

        x, y = _data(16 * 40)
        model.fit(x, y, batch_size=16, epochs=1, callbacks=[rigl, AtUpdates()], verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    iterations = [it for it, _ in AtUpdates.seen]
    assert iterations[-1] < len(iterations) - 5, "no step was skipped: the test needs a larger initial_scale"
    # after every batch: as many updates as update steps reached by the optimizer, at exactly those steps
    for it, done in AtUpdates.seen:
        assert done == len([s for s in range(5, 41, 5) if s <= it]), (it, done)
    assert sorted(rigl.updates["step"].unique()) == [s for s in range(5, 41, 5) if s <= iterations[-1]]
