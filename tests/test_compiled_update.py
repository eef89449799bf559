"""The compiled (device) drop-and-grow against the NumPy reference: bit-identical masks."""

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_rigl
from conftest import sparse_cnn
from keras_rigl import compiled_update, optimizer_state, updates


def _select(w, m, scores, fraction, seed, reinit):
    """Eager keras.ops path on one weight, k as the reference computes it."""
    k = int(np.floor(float(fraction) * int((m != 0).sum())))
    new_active, grown, removed, n_moved = compiled_update.select(
        keras.ops.convert_to_tensor(w), keras.ops.convert_to_tensor(m), keras.ops.convert_to_tensor(scores),
        keras.ops.convert_to_tensor(k, "int32"), keras.ops.convert_to_tensor(seed, "int64"), reinit,
    )
    as_np = lambda t: keras.ops.convert_to_numpy(t).reshape(m.shape)  # noqa: E731
    return as_np(new_active), as_np(grown), as_np(removed), int(keras.ops.convert_to_numpy(n_moved))


def _select_by_index(w, m, scores, fraction, seed, reinit, sample_above, sample_stride, margin=None):
    """select_indices on one weight, turned into the reference's boolean sets."""
    k = int(np.floor(float(fraction) * int((m != 0).sum())))
    t = keras.ops.convert_to_tensor
    dropped, grown_all, was_active, n_active = compiled_update.select_indices(
        t(w), t(m), t(scores), t(k, "int32"), t(seed, "int64"), reinit, sample_above=sample_above,
        sample_stride=sample_stride, margin=margin)
    as_np = keras.ops.convert_to_numpy
    dropped, grown_all, was_active = as_np(dropped), as_np(grown_all), as_np(was_active)
    assert len(dropped) == len(grown_all) == k and int(as_np(n_active)) == int((m != 0).sum())
    new_active = (m != 0).reshape(-1).copy()
    new_active[dropped] = False
    new_active[grown_all] = True
    grown = np.zeros(m.size, bool)
    grown[grown_all if reinit else grown_all[~was_active]] = True
    removed = (m != 0).reshape(-1) & ~new_active
    return new_active.reshape(m.shape), grown.reshape(m.shape), removed.reshape(m.shape), int((~was_active).sum())


def _assert_same(w, m, scores, fraction, seed, reinit=False):
    ref = updates.drop_and_grow(w, m, scores, fraction, seed=seed, reinit_regrown=reinit)
    new_active, grown, removed, n_moved = _select(w, m, scores, fraction, seed, reinit)
    np.testing.assert_array_equal(new_active, ref.new_mask != 0)
    np.testing.assert_array_equal(grown, ref.grown)
    np.testing.assert_array_equal(removed, ref.removed)
    assert n_moved == ref.n_moved
    return ref


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=3),
    density=st.floats(0.0, 1.0),
    fraction=st.sampled_from([0.0, 0.01, 0.3, 0.5, 0.999, 1.0]) | st.floats(0.0, 1.0),
    levels=st.sampled_from([1, 2, 3, 1000]),  # 1: every score equal; few levels: many ties
    seed=st.integers(0, 2**32 - 1),
    reinit=st.booleans(),
    special=st.sampled_from([None, np.nan, np.inf, -np.inf, -0.0]),
)
def test_device_selection_is_bit_identical_to_the_reference(shape, density, fraction, levels, seed, reinit, special):
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    m = (rng.random(shape) < density).astype("float32")
    w = (rng.integers(0, levels, shape) - levels // 2).astype("float32") * m
    scores = rng.integers(0, levels, shape).astype("float32")
    if special is not None:
        scores.reshape(-1)[rng.integers(0, scores.size)] = special
    ref = _assert_same(w, m, scores, fraction, seed, reinit)
    assert ref.new_mask.sum() == m.sum()
    # by index, without (size below) and with the sampled bracket (stride 2 or 3 on these tiny weights; a margin
    # of 0 or 1 sample ranks makes the bracket miss often, so both its hit and its fallback are exercised)
    for sample_above, stride, margin in ((10**9, 61, None), (0, 2, None), (0, 3, 1), (0, 2, 0)):
        got = _select_by_index(w, m, scores, fraction, seed, reinit, sample_above, stride, margin)
        for a, b in zip(got[:3], (ref.new_mask != 0, ref.grown, ref.removed)):
            np.testing.assert_array_equal(a, b)
        assert got[3] == ref.n_moved


def test_the_sampled_floor_never_changes_the_selection():
    """Scores built so that the strided sample sees only low values (the largest scores lie between the
    sampled positions): the floor admits too few entries and the update must fall back to every entry."""
    size, stride = 4000, 7
    m = np.zeros(size, "float32")
    m[:400] = 1.0
    w = np.linspace(1, 2, size).astype("float32") * m
    scores = np.full(size, 1.0, "float32")
    off_sample = np.arange(size) % stride != 0
    scores[off_sample & (m == 0)] = 5.0 + np.arange(size)[off_sample & (m == 0)] / size  # never in the sample
    for sample_above in (10**9, 0):
        new_active, grown, removed, n_moved = _select_by_index(w, m, scores, 0.5, 3, False, sample_above, stride)
        # by hand: the 200 smallest |w| are entries 0..199; the 200 largest scores are the last 200 off-sample
        # inactive entries
        expected_grow = np.flatnonzero(off_sample & (m == 0))[-200:]
        np.testing.assert_array_equal(np.flatnonzero(removed), np.arange(200))
        np.testing.assert_array_equal(np.flatnonzero(grown), expected_grow)
        assert n_moved == 200 and new_active.sum() == 400


def test_the_sampled_drop_bracket_never_changes_the_selection():
    """|w| built so that the sample of the active entries sees only large values: more than k active entries lie
    below the bracket, and the drop must fall back to ranking every active entry."""
    size, stride = 4000, 7
    m = np.zeros(size, "float32")
    m[:400] = 1.0
    sampled = np.arange(size) % stride == 0  # positions 0..399 are also the active entries' ranks
    w = np.where(sampled, 1.0, 1e-3 * (1 + np.arange(size))).astype("float32") * m
    scores = np.linspace(0, 1, size).astype("float32")
    for margin in (1, None):
        new_active, grown, removed, n_moved = _select_by_index(w, m, scores, 0.5, 3, False, 0, stride, margin)
        # by hand: the 200 smallest |w| are the first 200 active entries off the sample
        np.testing.assert_array_equal(np.flatnonzero(removed), np.flatnonzero(~sampled[:400])[:200])
        assert new_active.sum() == 400 and n_moved == 200


def test_edge_cases_k_zero_everything_dropped_all_equal():
    m = np.array([1, 1, 1, 0, 0, 0, 0, 0], "float32")
    w = np.ones(8, "float32") * m
    zeros = np.zeros(8, "float32")
    ref = _assert_same(w, m, zeros, 0.0, 3)  # k = 0: nothing moves
    np.testing.assert_array_equal(ref.new_mask, m)
    ref = _assert_same(w, m, zeros, 1.0, 3)  # every active connection dropped
    assert ref.new_mask.sum() == 3
    ref = _assert_same(w, m, np.ones(8, "float32"), 1.0, 4)
    # all grow scores equal: the three grown are among the eight by the hash, dropped ones included
    assert ref.new_mask.sum() == 3


def test_ties_do_not_follow_the_index():
    """All-equal scores pick different positions for different seeds, not the first ones."""
    m = np.r_[np.ones(50), np.zeros(50)].astype("float32")
    picks = [_select(m, m, np.zeros(100, "float32"), 0.5, seed, False)[0] for seed in (1, 2)]
    assert not np.array_equal(picks[0], picks[1])
    assert picks[0].sum() == 50 and picks[0][50:].any()


def test_random_scores_are_the_reference_numbers():
    for shape, seed in [((3, 4), 0), ((5,), 2**32 - 1), ((2, 3, 4, 5), 12345)]:
        ref = updates.random_scores(shape, seed)
        dev = keras.ops.convert_to_numpy(compiled_update.random_scores(shape, keras.ops.convert_to_tensor(seed, "int64")))
        np.testing.assert_array_equal(dev, ref)
        assert ref.dtype == np.float32 and 0 <= ref.min() and ref.max() < 1
    draws = updates.random_scores((100_000,), 7)
    assert abs(draws.mean() - 0.5) < 0.01 and len(np.unique(draws)) > 99_000  # uniform, no repeats to speak of


def test_hash_is_the_published_lowbias32():
    # lowbias32(0) = 0 and lowbias32(1) = 0x1ea5aae1... computed by the reference C code of C. Wellons
    # (x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16), by hand in Python ints:
    def by_hand(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    xs = np.array([0, 1, 2, 12345, 2**31, 2**32 - 1], dtype=np.uint32)
    np.testing.assert_array_equal(updates.hash32(xs), [by_hand(int(x)) for x in xs])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(compiled_update.hash32(xs.astype(np.int64))),
                                  [by_hand(int(x)) for x in xs])


def _model(seed=0):
    model = sparse_cnn(seed)
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _assert_update_equals_numpy(update, model, seeds, fraction):
    """Run ``update`` and check every mask, weight and Adam moment against the NumPy reference."""
    expected = []
    for mw, seed in zip(update.masked_weights, seeds):
        w, m = keras.ops.convert_to_numpy(mw.weight), keras.ops.convert_to_numpy(mw.mask)
        n_active = int(m.sum())
        scores = (np.abs(keras.ops.convert_to_numpy(mw.capture.read())) if update.grow_by == "gradient"
                  else updates.random_scores(m.shape, seed))
        f = fraction if 0 < n_active < m.size else 0.0  # the NumPy callback skips dense weights
        r = updates.drop_and_grow(w, m, scores, f, seed=seed, reinit_regrown=update.reinit_regrown)
        new_w = np.where(r.grown, 0, w) * r.new_mask
        slots = [np.where(r.grown | r.removed, reset, keras.ops.convert_to_numpy(s))
                 for s, reset in optimizer_state.slot_variables(model.optimizer, mw.weight)]
        expected.append((r, new_w, slots))
    assert any(r.n_moved > 0 for r, _, _ in expected)

    counts = update(fraction, seeds)
    for i, (mw, (r, new_w, slots)) in enumerate(zip(update.masked_weights, expected)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mw.mask), r.new_mask)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mw.weight), new_w)
        got = [keras.ops.convert_to_numpy(s) for s, _ in optimizer_state.slot_variables(model.optimizer, mw.weight)]
        assert len(got) == len(slots) == 2  # Adam: two moments
        for a, b in zip(got, slots):
            np.testing.assert_array_equal(a, b)
        assert counts.n_active[i] == r.n_active and counts.n_moved[i] == r.n_moved
    return counts


@pytest.mark.parametrize("fuse_keys,by_index", [(True, True), (True, False), (False, False)],
                         ids=["by_index", "xla_keys", "plain"])
@pytest.mark.parametrize("grow_by,reinit", [("gradient", False), ("random", True), ("gradient", True)])
def test_whole_model_update_equals_the_numpy_path(grow_by, reinit, fuse_keys, by_index):
    model = _model()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 8, 8, 1)).astype("float32"), rng.integers(0, 10, 32)
    layers = keras_rigl.masked_layers(model)
    for layer in layers:
        layer.set_capture_mode(1)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # Adam moments and the captured gradient are non-zero
    weights = [mw for layer in layers for mw in layer.masked_weights]
    seeds = [updates.update_seed(5, 100, i + 1) for i in range(len(weights))]
    update = compiled_update.CompiledUpdate(weights, grow_by=grow_by, reinit_regrown=reinit,
                                            optimizer=model.optimizer, fuse_keys=fuse_keys, by_index=by_index)
    counts = _assert_update_equals_numpy(update, model, seeds, 0.3)
    # a second call reuses the traced function (no retrace per step)
    update(0.1, [updates.update_seed(5, 200, i + 1) for i in range(len(weights))])
    assert update._function.experimental_get_tracing_count() == 1
    assert (counts.n_ever_active == -1).all()  # not tracked unless asked


def _dense_stack(widths):
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,))
    x = inp
    for width in widths:
        x = keras.layers.Dense(width, activation="relu")(x)
    model = keras_rigl.sparsify(keras.Model(inp, keras.layers.Dense(10)(x)), 0.8, seed=0)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    layers = keras_rigl.masked_layers(model)
    for layer in layers:
        layer.set_capture_mode(1)
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(32, 16)).astype("float32"), rng.normal(size=(32, 10)).astype("float32"),
              batch_size=16, epochs=1, verbose=0)
    return model, [mw for layer in layers for mw in layer.masked_weights]


def test_weights_of_every_shape_share_one_traced_update(monkeypatch):
    # Traced once per weight, the by-index update of ResNet50 was a graph of 40,000 operations
    # (~470 per weight here) that held ~700 MiB while built: every weight must call one shared function.
    monkeypatch.setattr(compiled_update, "SAMPLE_ABOVE", 600)  # the larger weights select near a sampled bracket
    graph_ops = {}
    for widths in ((24, 40), (24, 40, 20, 36, 28, 44, 32, 48)):
        model, weights = _dense_stack(widths)
        assert len({tuple(mw.mask.shape) for mw in weights}) == len(weights)
        assert {int(np.prod(mw.mask.shape)) > 600 for mw in weights} == {True, False}
        update = compiled_update.CompiledUpdate(weights, grow_by="gradient", optimizer=model.optimizer)
        _assert_update_equals_numpy(update, model, [updates.update_seed(5, 100, i + 1)
                                                    for i in range(len(weights))], 0.3)
        graph = update._function.get_concrete_function(np.float64(0.3), np.zeros(len(weights), np.int64)).graph
        graph_ops[len(weights)] = len(graph.get_operations())
    (few, few_ops), (many, many_ops) = sorted(graph_ops.items())
    # per weight: read and flatten 5 tensors, one call, reshape and assign 4 results (40 measured)
    assert (many_ops - few_ops) / (many - few) <= 60, graph_ops
    assert len(update._flat_updates) == 2  # one for float32 with two Adam moments, plain and bracketed


def test_compiled_update_refuses_weights_without_capture():
    model = _model()
    weights = [mw for layer in keras_rigl.masked_layers(model) for mw in layer.masked_weights]
    object.__setattr__(weights[0], "capture", None)
    with pytest.raises(ValueError, match="capture_gradients=True"):
        compiled_update.CompiledUpdate(weights, grow_by="gradient")
    with pytest.raises(ValueError, match="grow_by"):
        compiled_update.CompiledUpdate(weights, grow_by="magnitude")


FIT_BOTH_WAYS = textwrap.dedent(
    """
    import os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np, tensorflow as tf, keras_rigl
    tf.config.experimental.enable_op_determinism()  # in this process only: both runs must train identically

    def model():
        keras.utils.set_random_seed(0)
        inp = keras.Input((8, 8, 1))
        x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inp)
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(32, activation="relu", name="hidden")(x)
        out = keras.layers.Dense(10, name="out")(x)
        m = keras_rigl.sparsify(keras.Model(inp, out), 0.8, seed=0)
        m.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(96, 8, 8, 1)).astype("float32"), rng.integers(0, 10, 96)
    for cls in (keras_rigl.RigL, keras_rigl.SET, keras_rigl.SNFS):
        runs = {}
        for compiled in (False, True):
            m = model()
            algo = cls(update_freq=2, drop_fraction=0.5, seed=3, compiled=compiled)
            hist = m.fit(x, y, batch_size=16, epochs=2, callbacks=[algo], verbose=0, shuffle=False)
            runs[compiled] = ([v.numpy() for v in m.weights] + [v.numpy() for v in m.optimizer.variables],
                              algo.updates, hist.history["itop"], algo._compiled_update)
        assert runs[False][3] is None and runs[True][3] is not None, "each path ran as asked"
        assert runs[True][1]["n_moved"].sum() > 0
        for a, b in zip(runs[False][0], runs[True][0]):
            assert np.array_equal(a, b), cls.__name__
        assert runs[False][1].equals(runs[True][1]), (runs[False][1], runs[True][1])
        assert runs[False][2] == runs[True][2], "ITOP kept on the device matches the host count"
        print("SAME", cls.__name__, len(runs[True][1]))
    """
)


def test_fit_with_the_compiled_update_equals_fit_with_the_numpy_one(tmp_path):
    """Weights, optimizer slots, update table and ITOP of RigL, SET and SNFS, bit for bit."""
    script = tmp_path / "both.py"
    script.write_text(FIT_BOTH_WAYS)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert proc.stdout.count("SAME") == 3, proc.stdout[-3000:] + proc.stderr[-5000:]


FIT_BOTH_WAYS_PARTIAL_BLOCKS = textwrap.dedent(
    """
    import os
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np, tensorflow as tf, keras_rigl
    from keras_rigl import compiled_structure
    tf.config.experimental.enable_op_determinism()

    def model():
        keras.utils.set_random_seed(0)
        inp = keras.Input((8, 8, 6))
        x = keras.layers.Conv2D(6, 3, activation="relu", name="conv")(inp)  # (3, 3, 6, 6): 1x4 + a last 2
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(10, activation="relu", name="hidden")(x)
        out = keras.layers.Dense(10, name="out")(x)  # (10, 10): 2 x 4 + a last 2
        m = keras_rigl.sparsify(keras.Model(inp, out), 0.8, structure="1x4", seed=0)
        m.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(96, 8, 8, 6)).astype("float32"), rng.integers(0, 10, 96)
    for cls in (keras_rigl.RigL, keras_rigl.SET):
        runs = {}
        for compiled in (False, True):
            m = model()
            algo = cls(update_freq=2, drop_fraction=0.5, seed=3, compiled=compiled)
            m.fit(x, y, batch_size=16, epochs=2, callbacks=[algo], verbose=0, shuffle=False)
            runs[compiled] = ([v.numpy() for v in m.weights] + [v.numpy() for v in m.optimizer.variables],
                              algo.updates, algo._compiled_update)
        assert runs[False][2] is None
        assert isinstance(runs[True][2], compiled_structure.StructuredCompiledUpdate)
        assert runs[True][1]["n_moved"].sum() > 0
        for a, b in zip(runs[False][0], runs[True][0]):
            assert np.array_equal(a, b), cls.__name__
        assert runs[False][1].equals(runs[True][1]), (runs[False][1], runs[True][1])
        print("SAME", cls.__name__, len(runs[True][1]))
    """
)


def test_fit_with_partial_1x4_blocks_compiled_equals_numpy(tmp_path):
    """Inputs not a multiple of k (a last, shorter block per row): the compiled structured update trains
    exactly as the NumPy one (weights, optimizer slots, update table)."""
    script = tmp_path / "partial.py"
    script.write_text(FIT_BOTH_WAYS_PARTIAL_BLOCKS)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert proc.stdout.count("SAME") == 2, proc.stdout[-3000:] + proc.stderr[-5000:]


def test_compiled_true_refuses_what_it_cannot_compile():
    class DropByGradient(keras_rigl.RigL):
        def drop_scores(self, layer, masked_weight, seed):
            return keras.ops.abs(masked_weight.weight * masked_weight.capture.read())

    model = _model()
    x, y = np.zeros((16, 8, 8, 1), "float32"), np.zeros(16, int)
    for algo in (DropByGradient(update_freq=1, compiled=True), keras_rigl.RigL(update_freq=1, grow_init="random", compiled=True)):
        with pytest.raises(ValueError, match="cannot run compiled"):
            model.fit(x, y, batch_size=8, epochs=1, callbacks=[algo], verbose=0)
    auto = DropByGradient(update_freq=1, end_step=100)  # default: falls back to NumPy
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[auto], verbose=0)
    assert auto._compiled_update is None and len(auto.updates) > 0


class _FakeMaskedWeight:
    def __init__(self, path, capture):
        self.path, self.capture = path, capture


def test_check_grow_by_names_the_weights_without_a_capture():
    # shared by the TensorFlow and the JAX compiled update
    from keras_rigl.compiled_update import check_grow_by

    with pytest.raises(ValueError, match=r"\['d/kernel'\].*capture_gradients=True"):
        check_grow_by("gradient", [_FakeMaskedWeight("d/kernel", None), _FakeMaskedWeight("e/kernel", object())])
    assert check_grow_by("random", [_FakeMaskedWeight("d/kernel", None)]) == "random"
    with pytest.raises(ValueError, match="grow_by must be one of"):
        check_grow_by("magnitude", [])
