"""Callback behaviour that issue 10 found untested, each against a hand computation.

Only public behaviour is used: keras_rigl.RigL / SET / SNFS, Masked (its
``masked_weights``' ``.weight`` / ``.mask`` and ``set_masks``), ``sparsify``,
``masked_layers``, the ``updates`` table and ``model.fit``. Expected values are
computed here, never by the code under test:

* the dense gradient by a ``tf.GradientTape`` on a *dense twin* (same layers,
  no wrapper, weights W*M) on the same batch;
* the expected mask by the rule the README documents: keep the
  ``n_active - k`` largest |w| of the active connections, ``k = floor(f *
  n_active)``, then grow the ``k`` largest scores among the connections not
  kept. Each test checks first that its data leaves no tie at either cut, so
  the expected mask is unique.

The optimizer's learning rate is 0 where a test needs the weights of the
update step to equal the weights before training (the update then depends
only on the gradients, which the twin reproduces exactly).
"""

import math

import keras
import numpy as np
import pytest

import keras_rigl

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
CLASSES = 3


# --------------------------------------------------------------------------- models


def conv_net(wrap):
    inp = keras.Input((5, 5, 2))
    h = wrap(keras.layers.Conv2D(4, 3, name="conv"))(inp)
    h = keras.layers.Flatten(name="flat")(h)
    return keras.Model(inp, keras.layers.Dense(CLASSES, name="head")(h))


def lstm_net(wrap):
    inp = keras.Input((4, 3))
    h = wrap(keras.layers.LSTM(4, name="lstm"))(inp)
    return keras.Model(inp, keras.layers.Dense(CLASSES, name="head")(h))


def embedding_net(wrap):
    inp = keras.Input((5,), dtype="int32")
    h = wrap(keras.layers.Embedding(8, 4, name="emb"))(inp)
    h = keras.layers.Flatten(name="flat")(h)
    return keras.Model(inp, keras.layers.Dense(CLASSES, name="head")(h))


def dense_net(wrap):
    inp = keras.Input((6,))
    h = wrap(keras.layers.Dense(12, activation="tanh", name="hidden"))(inp)
    return keras.Model(inp, wrap(keras.layers.Dense(CLASSES, name="out"))(h))


def conv_data(n, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5, 5, 2)).astype("float32"), rng.integers(0, CLASSES, n)


def lstm_data(n, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4, 3)).astype("float32"), rng.integers(0, CLASSES, n)


def embedding_data(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 8, size=(n, 5)).astype("int32"), rng.integers(0, CLASSES, n)


def dense_data(n, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6)).astype("float32"), rng.integers(0, CLASSES, n)


def sparse_model(builder, density=0.5, seed=0):
    """``builder`` with every maskable layer wrapped in Masked, masks of exactly ``density`` drawn here."""
    keras.utils.set_random_seed(seed)
    model = builder(keras_rigl.Masked)
    rng = np.random.default_rng(seed + 100)
    for layer in keras_rigl.masked_layers(model):
        masks = {}
        for mw in layer.masked_weights:
            size = int(np.prod(mw.mask.shape))
            flat = np.zeros(size, dtype="float32")
            flat[rng.permutation(size)[: int(round(density * size))]] = 1.0
            masks[mw.name] = flat.reshape(tuple(mw.mask.shape))
        layer.set_masks(masks)
    return model


def dense_twin(builder, sparse):
    """The same architecture without wrappers, holding the sparse model's effective weights."""
    twin = builder(lambda layer: layer)
    inner = {}
    for layer in sparse.layers:
        if isinstance(layer, keras_rigl.Masked):
            for mw in layer.masked_weights:
                w, m = np.asarray(mw.weight.numpy()), np.asarray(mw.mask.numpy())
                assert np.all(w[m == 0] == 0), "precondition: masked weights are 0, so W == W*M"
            inner[layer.layer.name] = layer.layer
        else:
            inner[layer.name] = layer
    for layer in twin.layers:
        if layer.weights:
            layer.set_weights(inner[layer.name].get_weights())
    return twin


def twin_variable(twin, masked_weight):
    """The twin's variable for a masked weight: same path below the wrapper."""
    wanted = masked_weight.weight.path.split("/", 1)[1]  # drop "masked_<name>/"
    found = [v for v in twin.trainable_variables if v.path == wanted]
    assert len(found) == 1, (wanted, [v.path for v in twin.trainable_variables])
    return found[0]


def dense_gradients(twin, variables, x, y):
    """dL/dW of ``twin`` on batch (x, y), as NumPy (IndexedSlices of an Embedding made dense)."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = LOSS(y, twin(x, training=True))
    return [np.asarray(tf.convert_to_tensor(g).numpy(), dtype=np.float64) for g in tape.gradient(loss, variables)]


def masks_of(model):
    return {
        f"{layer.layer.name}/{mw.name}": np.asarray(mw.mask.numpy()).copy()
        for layer in keras_rigl.masked_layers(model)
        for mw in layer.masked_weights
    }


def expected_mask(weight, mask, scores, fraction, margin=1e-3):
    """Hand computation of one drop-and-grow; asserts there is no tie at either cut."""
    w = np.abs(np.asarray(weight, dtype=np.float64)).ravel()
    active = np.asarray(mask).ravel() > 0
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_active = int(active.sum())
    k = int(math.floor(fraction * n_active))
    assert 0 < k < n_active
    active_idx = np.flatnonzero(active)
    by_magnitude = active_idx[np.argsort(-w[active_idx], kind="stable")]
    kept = by_magnitude[: n_active - k]
    w_sorted = w[by_magnitude]
    assert w_sorted[n_active - k - 1] > w_sorted[n_active - k] * (1 + margin), "tie at the drop cut"
    candidates = np.setdiff1d(np.arange(w.size), kept)
    by_score = candidates[np.argsort(-scores[candidates], kind="stable")]
    s_sorted = scores[by_score]
    assert s_sorted[k - 1] > s_sorted[k] * (1 + margin) + 1e-12, "tie at the grow cut"
    new = np.zeros(w.size, dtype=bool)
    new[kept] = True
    new[by_score[:k]] = True
    return new.reshape(np.shape(weight))


# ------------------------------------------------------- RigL grows by the dense gradient

GROWTH_CASES = {
    "conv2d_kernel": (conv_net, conv_data),
    "lstm_kernels": (lstm_net, lstm_data),
    "embedding": (embedding_net, embedding_data),
}


@pytest.mark.parametrize("case", list(GROWTH_CASES))
def test_rigl_grows_the_largest_dense_gradient_of_the_update_batch(case):
    builder, data = GROWTH_CASES[case]
    model = sparse_model(builder)
    # lr 0: the update at step 2 sees the initial weights, so the twin reproduces its gradient.
    model.compile(keras.optimizers.SGD(0.0), LOSS)
    x, y = data(16, seed=1)
    if case == "embedding":
        assert set(np.unique(x[8:])) == set(range(8)), "precondition: the update batch uses every token"
    twin = dense_twin(builder, model)
    weights = [mw for layer in keras_rigl.masked_layers(model) for mw in layer.masked_weights]
    assert len(weights) == (2 if case == "lstm_kernels" else 1)
    variables = [twin_variable(twin, mw) for mw in weights]
    # Step 2 trains on the second batch (shuffle=False): RigL must use *that* batch's gradient.
    grads_batch1 = dense_gradients(twin, variables, x[:8], y[:8])
    grads_batch2 = dense_gradients(twin, variables, x[8:], y[8:])
    before = [(mw.weight.numpy().copy(), mw.mask.numpy().copy()) for mw in weights]
    expected = [expected_mask(w, m, np.abs(g), 0.25) for (w, m), g in zip(before, grads_batch2)]
    stale = [expected_mask(w, m, np.abs(g), 0.25) for (w, m), g in zip(before, grads_batch1)]
    assert any(not np.array_equal(e, s) for e, s in zip(expected, stale)), "precondition: the batches disagree"

    rigl = keras_rigl.RigL(update_freq=2, drop_fraction=0.25, decay="constant", end_step=2, seed=0)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[rigl], verbose=0)

    assert list(rigl.updates["step"].unique()) == [2]
    assert int(rigl.updates["n_moved"].sum()) == sum(int((e & (m0 == 0)).sum()) for e, (_, m0) in zip(expected, before))
    for mw, (w0, m0), want in zip(weights, before, expected):
        got = mw.mask.numpy() != 0
        np.testing.assert_array_equal(got, want, err_msg=f"{mw.name}: grown positions are not the top-k |grad|")
        assert (want & (m0 == 0)).any(), "the update grew new connections"
        # Kept and regrown connections keep their weight (lr 0), new ones start at 0.
        w = mw.weight.numpy()
        np.testing.assert_array_equal(w[want & (m0 != 0)], w0[want & (m0 != 0)])
        assert np.all(w[want & (m0 == 0)] == 0) and np.all(w[~want] == 0)


# ------------------------------------------------------------------ SNFS's moving average


@pytest.mark.parametrize("momentum,data_seed", [(0.6, 4), (None, 6)], ids=["momentum_0.6", "default_momentum_0.9"])
def test_snfs_moving_average_matches_the_hand_computation_and_drives_growth(momentum, data_seed):
    n = 3
    kwargs = {} if momentum is None else {"momentum": momentum}
    momentum = 0.9 if momentum is None else momentum  # the documented default
    model = sparse_model(dense_net, seed=3)
    model.compile(keras.optimizers.SGD(0.0), LOSS)  # weights fixed: g_i is batch i's gradient
    x, y = dense_data(8 * n, seed=data_seed)
    twin = dense_twin(dense_net, model)
    weights = [mw for layer in keras_rigl.masked_layers(model) for mw in layer.masked_weights]
    variables = [twin_variable(twin, mw) for mw in weights]
    grads = [dense_gradients(twin, variables, x[8 * i : 8 * (i + 1)], y[8 * i : 8 * (i + 1)]) for i in range(n)]
    # EMA after n steps from 0: sum_i (1 - m) m^(n - i) g_i, i = 1..n
    ema = [sum((1 - momentum) * momentum ** (n - 1 - i) * grads[i][j] for i in range(n)) for j in range(len(weights))]
    before = [(mw.weight.numpy().copy(), mw.mask.numpy().copy()) for mw in weights]
    expected = [expected_mask(w, m, np.abs(e), 0.3) for (w, m), e in zip(before, ema)]
    # The test can tell the EMA from the last gradient and from the plain mean of the gradients.
    last = [expected_mask(w, m, np.abs(grads[-1][j]), 0.3) for j, (w, m) in enumerate(before)]
    mean = [expected_mask(w, m, np.abs(sum(g[j] for g in grads)), 0.3) for j, (w, m) in enumerate(before)]
    assert any(not np.array_equal(a, b) for a, b in zip(expected, last)), "precondition: EMA != last gradient"
    assert any(not np.array_equal(a, b) for a, b in zip(expected, mean)), "precondition: EMA != mean gradient"

    snfs = keras_rigl.SNFS(update_freq=n, drop_fraction=0.3, decay="constant", end_step=n, seed=0, **kwargs)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[snfs], verbose=0)

    for mw, want, e in zip(weights, expected, ema):
        # The buffer the README describes ("a custom gradient on the product writes it into a buffer").
        np.testing.assert_allclose(np.asarray(mw.capture.read()), e, rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(mw.mask.numpy() != 0, want, err_msg=f"{mw.name}: growth does not follow the EMA")
    assert sorted(snfs.updates["step"].unique()) == [n]


# ---------------------------------------------------------------------------------- resume


def _resume_model():
    keras.utils.set_random_seed(5)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inp)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(16, activation="relu", name="hidden")(h)
    model = keras_rigl.sparsify(keras.Model(inp, keras.layers.Dense(10, name="out")(h)), 0.8, seed=5)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS)
    return model


class StopAfterEpoch(keras.callbacks.Callback):
    """Ends fit after epoch ``last`` (0-based): a run planned for N epochs, interrupted."""

    def __init__(self, last):
        super().__init__()
        self.last = last

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.last:
            self.model.stop_training = True


def _resume_matches(algo_cls, tmp_path):
    """Uninterrupted 4 epochs vs 4 planned epochs stopped after 2, saved, loaded, resumed at epoch 2.

    The conditions of the README's resume claim: the same planned ``epochs`` (the default
    end_step is 0.75 of the planned steps), ``shuffle=False``, a fresh callback with the same
    settings, ``initial_epoch``.
    """
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(64, 8, 8, 1)).astype("float32"), rng.integers(0, 10, 64)
    fit = dict(batch_size=16, epochs=4, shuffle=False, verbose=0)
    make = lambda: algo_cls(update_freq=2, drop_fraction=0.3, seed=3)  # default end_step: 0.75 * 16 = 12

    full = _resume_model()
    full_algo = make()
    full.fit(x, y, callbacks=[full_algo], **fit)

    half = _resume_model()
    half.fit(x, y, callbacks=[make(), StopAfterEpoch(1)], **fit)
    assert int(half.optimizer.iterations) == 8
    half.save(tmp_path / "half.keras")
    resumed = keras.models.load_model(tmp_path / "half.keras")
    resumed_algo = make()
    resumed.fit(x, y, initial_epoch=2, callbacks=[resumed_algo], **fit)

    assert int(resumed.optimizer.iterations) == int(full.optimizer.iterations) == 16
    # The resumed run made exactly the uninterrupted run's updates after step 8.
    assert sorted(full_algo.updates["step"].unique()) == [2, 4, 6, 8, 10, 12]
    assert sorted(resumed_algo.updates["step"].unique()) == [10, 12]
    full_masks, resumed_masks = masks_of(full), masks_of(resumed)
    assert full_masks.keys() == resumed_masks.keys()
    # Guard: the resumed updates moved connections, so equal masks are not trivially equal.
    assert resumed_algo.updates["n_moved"].sum() > 0
    return all(np.array_equal(full_masks[k], resumed_masks[k]) for k in full_masks)


def test_set_resume_with_default_end_step_gives_the_uninterrupted_masks(tmp_path):
    assert _resume_matches(keras_rigl.SET, tmp_path)


@pytest.mark.xfail(
    strict=True,
    reason="SNFS's moving average of the gradient is not saved with the model: a resumed run restarts it "
    "from 0, so its grow scores (and masks) differ from an uninterrupted run",
)
def test_snfs_resume_with_default_end_step_gives_the_uninterrupted_masks(tmp_path):
    assert _resume_matches(keras_rigl.SNFS, tmp_path)


def test_snfs_without_gradient_history_resumes_exactly(tmp_path):
    """momentum=0: the average is this step's gradient, nothing to lose on resume. Passing here while
    the test above fails pins the difference on the unsaved moving average."""
    assert _resume_matches(lambda **kw: keras_rigl.SNFS(momentum=0.0, **kw), tmp_path)


# ------------------------------------------------------------------- optimizer-slot reset


class Snapshot(keras.callbacks.Callback):
    """Records masks, weights and the optimizer slots of every masked weight at the end of ``step``."""

    def __init__(self, step, slot_names):
        super().__init__()
        self.step, self.slot_names, self.seen = step, slot_names, 0
        self.state = None

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen != self.step:
            return
        by_name = {v.name: v for v in self.model.optimizer.variables}
        self.state = {}
        for layer in keras_rigl.masked_layers(self.model):
            for mw in layer.masked_weights:
                prefix = mw.weight.path.replace("/", "_")
                missing = [s for s in self.slot_names if f"{prefix}_{s}" not in by_name]
                assert not missing, f"optimizer has no slot {missing} for {mw.weight.path}: {sorted(by_name)}"
                self.state[mw.weight.path] = dict(
                    mask=mw.mask.numpy().copy(),
                    weight=mw.weight.numpy().copy(),
                    slots={s: np.asarray(by_name[f"{prefix}_{s}"].numpy()).copy() for s in self.slot_names},
                )


def _update_with_snapshots(optimizer, slot_names, reset=True):
    """One RigL update at step 3; snapshots of the state just before and just after it."""
    model = sparse_model(dense_net, seed=7)
    model.compile(optimizer, LOSS)
    x, y = dense_data(32, seed=8)
    rigl = keras_rigl.RigL(
        update_freq=3, drop_fraction=0.5, decay="constant", end_step=3, seed=0, reset_optimizer_state=reset
    )
    # Callbacks run in list order: `pre` sees step 3 before RigL updates, `post` after.
    pre, post = Snapshot(3, slot_names), Snapshot(3, slot_names)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[pre, rigl, post], verbose=0)
    assert list(rigl.updates["step"].unique()) == [3]
    return model, pre.state, post.state


SLOT_CASES = {
    # optimizer, {slot: value of a fresh slot}
    "adagrad": (lambda: keras.optimizers.Adagrad(0.05, initial_accumulator_value=0.1), {"accumulator": 0.1}),
    "rmsprop": (
        lambda: keras.optimizers.RMSprop(0.01, momentum=0.5, centered=True),
        {"velocity": 0.0, "momentum": 0.0, "average_gradient": 0.0},
    ),
    "lion": (lambda: keras.optimizers.Lion(0.01), {"momentum": 0.0}),
    # use_ema's average is created as 0 (add_variable_from_reference) and the first step overwrites it.
    "sgd_use_ema": (lambda: keras.optimizers.SGD(0.05, momentum=0.9, use_ema=True), {"momentum": 0.0, "average": 0.0}),
}


@pytest.mark.parametrize("case", list(SLOT_CASES))
def test_update_resets_the_slots_of_grown_and_dropped_connections(case):
    make_optimizer, fresh = SLOT_CASES[case]
    model, pre, post = _update_with_snapshots(make_optimizer(), list(fresh))
    moved = 0
    for path, before in pre.items():
        after = post[path]
        was, now = before["mask"] != 0, after["mask"] != 0
        grown, removed, kept = now & ~was, was & ~now, was & now
        assert grown.any() and removed.any()
        moved += int(grown.sum())
        for slot, value in fresh.items():
            s0, s1 = before["slots"][slot], after["slots"][slot]
            # The check can fail: before the update the dropped connections' state was not fresh.
            assert np.any(s0[removed] != np.float32(value)), f"precondition: {path} {slot} already fresh"
            assert np.all(s1[grown] == np.float32(value)), f"{path} {slot}: grown connections not reset"
            assert np.all(s1[removed] == np.float32(value)), f"{path} {slot}: dropped connections not reset"
            np.testing.assert_array_equal(s1[kept], s0[kept], err_msg=f"{path} {slot}: kept connections touched")
    assert moved > 0
    if case == "sgd_use_ema":
        # fit ends by copying the averages into the weights: masked weights must still be exactly 0.
        for layer in keras_rigl.masked_layers(model):
            for mw in layer.masked_weights:
                assert np.all(mw.weight.numpy()[mw.mask.numpy() == 0] == 0), mw.weight.path


def test_reset_optimizer_state_false_keeps_every_slot():
    model, pre, post = _update_with_snapshots(keras.optimizers.Adam(0.01), ["momentum", "velocity"], reset=False)
    for path, before in pre.items():
        after = post[path]
        removed = (before["mask"] != 0) & (after["mask"] == 0)
        assert removed.any() and ((after["mask"] != 0) & (before["mask"] == 0)).any()
        for slot in ("momentum", "velocity"):
            assert np.any(before["slots"][slot][removed] != 0), "precondition: dropped connections had state"
            np.testing.assert_array_equal(after["slots"][slot], before["slots"][slot], err_msg=f"{path} {slot}")


# ---------------------------------------------------------------------------- begin_step


class MaskLog(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.masks = []

    def on_train_begin(self, logs=None):
        self.initial = masks_of(self.model)

    def on_train_batch_end(self, batch, logs=None):
        self.masks.append(masks_of(self.model))


@pytest.mark.parametrize("end_step", [9, None], ids=["end_step_9", "default_end_step"])
def test_begin_step_delays_the_first_update(end_step):
    model = sparse_model(dense_net, seed=9)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS)
    x, y = dense_data(96, seed=10)  # 12 steps of 8; default end_step = floor(0.75 * 12) = 9
    log = MaskLog()
    # constant decay: the cosine fraction is 0 at end_step, and that update would move nothing
    rigl = keras_rigl.RigL(update_freq=2, drop_fraction=0.3, decay="constant", begin_step=3, end_step=end_step, seed=0)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[rigl, log], verbose=0)
    # Updates at begin_step + k * update_freq up to end_step: 3, 5, 7, 9.
    assert sorted(rigl.updates["step"].unique()) == [3, 5, 7, 9]
    changed_at = [
        step
        for step in range(1, 13)
        if any(not np.array_equal(log.masks[step - 1][k], (log.masks[step - 2] if step > 1 else log.initial)[k]) for k in log.initial)
    ]
    assert changed_at == [3, 5, 7, 9]
    assert (rigl.updates.groupby("step")["n_moved"].sum() > 0).all()
