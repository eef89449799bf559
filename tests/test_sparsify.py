"""sparsify / initialize_masks / strip: invariants, round trips and errors."""

import keras
import numpy as np
import pytest

import keras_rigl
from keras_rigl import backend_capture, distributions

from conftest import built_subclassed_model, small_cnn

pytestmark = pytest.mark.any_backend  # no TensorFlow: also run on JAX and PyTorch


def _masks(model):
    return {
        f"{l.layer.name}/{mw.name}": keras.ops.convert_to_numpy(mw.mask)
        for l in keras_rigl.masked_layers(model)
        for mw in l.masked_weights
    }


def _out(model, x):
    # a NumPy array on every backend (PyTorch's eager outputs carry autograd state)
    return keras.ops.convert_to_numpy(model(x))


def _weights(model):
    # Not the gradient probes of JAX/PyTorch: they hold the last step's gradient, which is not saved.
    return [keras.ops.convert_to_numpy(v) for v in model.weights if not backend_capture.is_probe(v)]


def test_sparsify_invariants_and_exact_counts(cnn):
    dense_weights = {v.path: keras.ops.convert_to_numpy(v) for v in cnn.weights}
    sparse = keras_rigl.sparsify(cnn, 0.9, seed=0)
    shapes = {"conv/kernel": (3, 3, 1, 4), "dense/kernel": (144, 10)}
    expected = distributions.active_counts(shapes, distributions.layer_densities(shapes, 0.9, "erk"))
    for key, mask in _masks(sparse).items():
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert int(mask.sum()) == expected[key]
    total_active = sum(int(m.sum()) for m in _masks(sparse).values())
    assert total_active == round(0.1 * 1476)
    for layer in keras_rigl.masked_layers(sparse):
        for mw in layer.masked_weights:
            w, m = keras.ops.convert_to_numpy(mw.weight), keras.ops.convert_to_numpy(mw.mask)
            assert np.all(w[m == 0] == 0)
            # kept weights are the original ones, untouched
            original = cnn.get_layer(layer.layer.name)
            np.testing.assert_array_equal(w[m == 1], dense_weights[original.kernel.path][m == 1])
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(layer.layer.bias), dense_weights[original.bias.path]
        )
    # the input model is not modified
    for v in cnn.weights:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), dense_weights[v.path])


def test_numpy_scalars_are_accepted(cnn):
    a = _masks(keras_rigl.sparsify(cnn, np.float64(0.8), per_layer={"conv": np.float32(0.5)}, seed=np.int64(3)))
    b = _masks(keras_rigl.sparsify(cnn, 0.8, per_layer={"conv": 0.5}, seed=3))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_seed_makes_masks_reproducible(cnn):
    a, b, c = (keras_rigl.sparsify(cnn, 0.8, seed=s) for s in (3, 3, 4))
    for k in _masks(a):
        np.testing.assert_array_equal(_masks(a)[k], _masks(b)[k])
    assert any(not np.array_equal(_masks(a)[k], _masks(c)[k]) for k in _masks(a))


def test_magnitude_init_keeps_exactly_the_largest_weights(cnn):
    sparse = keras_rigl.sparsify(cnn, 0.7, mask_init="magnitude", seed=0)
    for layer in keras_rigl.masked_layers(sparse):
        for mw in layer.masked_weights:
            mask = keras.ops.convert_to_numpy(mw.mask).astype(bool)
            mags = np.abs(keras.ops.convert_to_numpy(cnn.get_layer(layer.layer.name).kernel))
            kept, dropped = mags[mask], mags[~mask]
            assert kept.min() >= dropped.max()
            n = mask.sum()
            assert set(np.argsort(-mags.ravel(), kind="stable")[:n]) == set(np.flatnonzero(mask.ravel()))


def test_magnitude_ties_are_broken_by_seed():
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(10, kernel_initializer="ones")])
    a = _masks(keras_rigl.sparsify(model, 0.5, mask_init="magnitude", seed=1))
    b = _masks(keras_rigl.sparsify(model, 0.5, mask_init="magnitude", seed=1))
    c = _masks(keras_rigl.sparsify(model, 0.5, mask_init="magnitude", seed=2))
    assert a["dense/kernel"].sum() == 50
    np.testing.assert_array_equal(a["dense/kernel"], b["dense/kernel"])
    assert not np.array_equal(a["dense/kernel"], c["dense/kernel"])


def test_exclude_and_per_layer(cnn):
    sparse = keras_rigl.sparsify(cnn, 0.5, exclude=["conv"])
    assert [l.layer.name for l in keras_rigl.masked_layers(sparse)] == ["dense"]
    sparse = keras_rigl.sparsify(cnn, 0.5, exclude=lambda layer: layer.name == "dense")
    assert [l.layer.name for l in keras_rigl.masked_layers(sparse)] == ["conv"]
    sparse = keras_rigl.sparsify(cnn, 0.9, per_layer={"conv": 0.25}, seed=0)
    masks = _masks(sparse)
    assert masks["conv/kernel"].sum() == 27
    assert masks["dense/kernel"].sum() == round(0.1 * 1476 - 27)


def test_per_layer_with_uniform_makes_the_total_match_the_target():
    inp = keras.Input((4,))
    x = inp
    for name, units in (("d1", 30), ("d2", 30), ("d3", 30), ("d4", 10)):  # kernels 120, 900, 900, 300
        x = keras.layers.Dense(units, name=name)(x)
    model = keras.Model(inp, x)
    sparse = keras_rigl.sparsify(model, 0.9, distribution="uniform", per_layer={"d2": 0.95}, seed=0)
    masks = _masks(sparse)
    # target 0.1 * 2220 = 222 active: d1 dense (120), d2 0.05 * 900 = 45, d3 and d4 share 57 of 1200
    assert masks["d1/kernel"].sum() == 120 and masks["d2/kernel"].sum() == 45
    assert masks["d3/kernel"].sum() + masks["d4/kernel"].sum() == 57
    assert keras_rigl.count_active(sparse) == (222, 2220)


def test_uniform_first_layer_dense(cnn):
    masks = _masks(keras_rigl.sparsify(cnn, 0.8, distribution="uniform", seed=0))
    assert masks["conv/kernel"].all()
    assert masks["dense/kernel"].sum() == round(0.2 * 1440)


def test_strip_gives_plain_model_with_same_predictions(cnn, rng):
    sparse = keras_rigl.sparsify(cnn, 0.8, seed=0)
    plain = keras_rigl.strip(sparse)
    assert not keras_rigl.masked_layers(plain)
    assert [l.name for l in plain.layers[1:]] == [l.name for l in cnn.layers[1:]]
    x = rng.normal(size=(4, 8, 8, 1)).astype("float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(plain(x)), keras.ops.convert_to_numpy(sparse(x)))
    kernel = keras.ops.convert_to_numpy(plain.get_layer("dense").kernel)
    assert np.count_nonzero(kernel) == _masks(sparse)["dense/kernel"].sum()


def test_strip_zeroes_weights_that_were_set_under_the_mask(cnn, rng):
    sparse = keras_rigl.sparsify(cnn, 0.8, seed=0)
    layer = keras_rigl.masked_layers(sparse)[1]
    mw = layer.masked_weights[0]
    mw.weight.assign(np.ones(mw.weight.shape, "float32"))  # a user poked the weights
    plain = keras_rigl.strip(sparse)
    kernel = keras.ops.convert_to_numpy(plain.get_layer("dense").kernel)
    np.testing.assert_array_equal(kernel, keras.ops.convert_to_numpy(mw.mask))
    x = rng.normal(size=(2, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(_out(plain, x), _out(sparse, x), atol=1e-6)


def test_keras_save_load_round_trip_is_exact(cnn, tmp_path, rng):
    sparse = keras_rigl.sparsify(cnn, 0.9, seed=0)
    sparse.compile(keras.optimizers.Adam(0.01), "mse")
    sparse.fit(rng.normal(size=(32, 8, 8, 1)), rng.normal(size=(32, 10)), verbose=0)
    path = tmp_path / "m.keras"
    sparse.save(path)
    again = keras.models.load_model(path)  # no custom_objects needed
    for (k, m) in _masks(sparse).items():
        np.testing.assert_array_equal(m, _masks(again)[k])
    for a, b in zip(_weights(sparse), _weights(again)):
        np.testing.assert_array_equal(a, b)
    x = rng.normal(size=(3, 8, 8, 1)).astype("float32")
    np.testing.assert_array_equal(_out(sparse, x), _out(again, x))
    # the optimizer state comes back too, so training resumes where it stopped
    assert int(again.optimizer.iterations) == int(sparse.optimizer.iterations)


def test_save_weights_load_weights_round_trip(cnn, tmp_path):
    a = keras_rigl.sparsify(cnn, 0.9, seed=0)
    b = keras_rigl.sparsify(cnn, 0.9, seed=1)
    path = tmp_path / "w.weights.h5"
    a.save_weights(path)
    b.load_weights(path)
    for k, m in _masks(a).items():
        np.testing.assert_array_equal(m, _masks(b)[k])
    for x, y in zip(_weights(a), _weights(b)):
        np.testing.assert_array_equal(x, y)


def test_nested_model_is_sparsified(rng):
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="inner_dense")], name="backbone")
    inp = keras.Input((6,))
    out = keras.layers.Dense(2, name="head")(inner(inp))
    model = keras.Model(inp, out)
    sparse = keras_rigl.sparsify(model, 0.5, seed=0)
    assert [l.layer.name for l in keras_rigl.masked_layers(sparse)] == ["inner_dense", "head"]
    x = rng.normal(size=(2, 6)).astype("float32")
    np.testing.assert_allclose(_out(sparse, x), _out(keras_rigl.strip(sparse), x), atol=1e-6)


def test_initialize_masks_on_a_subclassed_model(rng):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d1 = keras_rigl.Masked(keras.layers.Dense(16))
            self.d2 = keras_rigl.Masked(keras.layers.Dense(3))

        def call(self, x):
            return self.d2(keras.ops.relu(self.d1(x)))

    net = Net()
    net(np.zeros((1, 5), "float32"))
    densities = keras_rigl.initialize_masks(net, 0.8, seed=0)
    assert set(densities) == {"dense/kernel", "dense_1/kernel"}
    report = keras_rigl.sparsity_report(net)
    assert report["active"].sum() == round(0.2 * (5 * 16 + 16 * 3))


def test_errors_name_the_fix(cnn):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        keras_rigl.sparsify(cnn, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        keras_rigl.sparsify(cnn, "much")
    with pytest.raises(ValueError, match="Unknown distribution"):
        keras_rigl.sparsify(cnn, 0.5, distribution="normal")
    with pytest.raises(ValueError, match="exclude names .*nope"):
        keras_rigl.sparsify(cnn, 0.5, exclude=["nope"])
    with pytest.raises(ValueError, match="per_layer name 'nope'"):
        keras_rigl.sparsify(cnn, 0.5, per_layer={"nope": 0.5})
    with pytest.raises(ValueError, match="mask_init"):
        keras_rigl.sparsify(cnn, 0.5, mask_init="lottery")
    with pytest.raises(ValueError, match=r"per_layer must be a dict.*\{'conv': 0.5\}"):
        keras_rigl.sparsify(cnn, 0.5, per_layer=["conv"])
    with pytest.raises(ValueError, match=r"per_layer must be a dict.*\{'conv': 0.5\}"):
        keras_rigl.initialize_masks(keras_rigl.sparsify(cnn, 0.5), 0.5, per_layer=["conv"])
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0 \(or None\), got 'abc'"):
        keras_rigl.sparsify(cnn, 0.5, seed="abc")
    with pytest.raises(ValueError, match=r"sparsity must be a number"):
        keras_rigl.sparsify(cnn, float("nan"))
    no_kernel = keras.Sequential([keras.Input((4,)), keras.layers.ReLU()])
    with pytest.raises(ValueError, match="no maskable layer"):
        keras_rigl.sparsify(no_kernel, 0.5)
    with pytest.raises(ValueError, match="no maskable layer"):
        keras_rigl.sparsify(cnn, 0.5, exclude=["conv", "dense"])
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="not built.*model.build"):
        keras_rigl.sparsify(unbuilt, 0.5)
    sub = built_subclassed_model()
    with pytest.raises(ValueError, match="subclassed.*Masked.*initialize_masks"):
        keras_rigl.sparsify(sub, 0.5)
    with pytest.raises(ValueError, match="no Masked layer"):
        keras_rigl.initialize_masks(sub, 0.5)
    sparse = keras_rigl.sparsify(cnn, 0.5)
    with pytest.raises(ValueError, match="already has Masked"):
        keras_rigl.sparsify(sparse, 0.5)


def test_report_columns_and_flops(cnn):
    sparse = keras_rigl.sparsify(cnn, 0.9, seed=0)
    report = keras_rigl.sparsity_report(sparse)
    assert list(report.columns[:6]) == ["layer", "weight", "shape", "params", "active", "sparsity"]
    conv = report.set_index("layer").loc["conv"]
    # conv 3x3x1x4 on 8x8 valid -> 6x6 outputs; 2 FLOPs per multiply-add
    assert conv["dense_flops"] == 2 * 36 * 36
    assert conv["sparse_flops"] == 2 * conv["active"] * 36
    dense = report.set_index("layer").loc["dense"]
    assert dense["dense_flops"] == 2 * 1440 and dense["sparse_flops"] == 2 * dense["active"]
    assert report.attrs["sparsity"] == pytest.approx(1 - report["active"].sum() / 1476)


def test_rescale_active_weights_by_hand():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, kernel_initializer="ones")])
    sparse = keras_rigl.sparsify(model, 0.5, distribution="er", seed=0)
    layer = keras_rigl.masked_layers(sparse)[0]
    mask = np.array([[1, 1], [1, 0], [0, 0], [0, 0]], "float32")  # column 0: 2 of 4 active, column 1: 1 of 4
    layer.set_masks({"kernel": mask})
    layer.layer.kernel.assign(mask)  # active weights 1, masked 0
    keras_rigl.rescale_active_weights(sparse)
    kernel = keras.ops.convert_to_numpy(layer.layer.kernel)
    expected = mask * np.array([np.sqrt(4 / 2), np.sqrt(4 / 1)], "float32")
    np.testing.assert_allclose(kernel, expected, rtol=1e-6)
