"""keras_rigl.condense: a smaller dense model with the stripped sparse model's outputs."""

import keras
import numpy as np
import pytest

import keras_rigl
from conftest import built_subclassed_model, sparse_cnn
from keras_rigl.condense import NO_INPUTS, NO_OUTPUTS


def _params(model):
    return int(sum(np.prod(v.shape) for v in model.weights))


def _random_inputs(model, n=16, seed=1):
    shape = (n,) + tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _assert_same_outputs(sparse, small, n=16):
    x = _random_inputs(sparse, n)
    want = keras_rigl.strip(sparse).predict(x, verbose=0) if keras_rigl.masked_layers(sparse) else sparse.predict(x, verbose=0)
    got = small.predict(x, verbose=0)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def _masked(model, name):
    return next(layer for layer in keras_rigl.masked_layers(model) if layer.layer.name == name)


def _set_mask(model, name, mask):
    _masked(model, name).set_masks({"kernel": mask})


def _randomize_biases(model, seed=2):
    """Non-zero biases, so that a unit with no inputs outputs a non-zero constant that must be folded."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        inner = layer.layer if isinstance(layer, keras_rigl.Masked) else layer
        if getattr(inner, "bias", None) is not None:
            inner.bias.assign(rng.uniform(0.2, 1.0, size=inner.bias.shape).astype("float32"))


def _mlp():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(5, activation="relu", name="h1"),
            keras.layers.Dense(4, activation="tanh", name="h2"),
            keras.layers.Dense(3, name="out"),
        ]
    )
    sparse = keras_rigl.sparsify(model, 0.0, distribution="uniform", seed=0)
    _randomize_biases(sparse)
    return sparse


def test_mlp_removes_exactly_the_hand_made_dead_units():
    sparse = _mlp()
    h1 = np.ones((6, 5))
    h1[:, [1, 3]] = 0  # h1 units 1 and 3: no active inputs, output relu(bias) > 0
    h2 = np.ones((5, 4))
    h2[:, 0] = 0  # h2 unit 0: no active inputs, output tanh(bias)
    out = np.ones((4, 3))
    out[2, :] = 0  # h2 unit 2: nothing reads it
    _set_mask(sparse, "h1", h1)
    _set_mask(sparse, "h2", h2)
    _set_mask(sparse, "out", out)

    small, report = keras_rigl.condense(sparse, return_report=True)

    assert not keras_rigl.masked_layers(small)
    _assert_same_outputs(sparse, small)
    assert report.removed == {"h1": [1, 3], "h2": [0, 2]}
    assert report.reasons == {"h1": {1: NO_INPUTS, 3: NO_INPUTS}, "h2": {0: NO_INPUTS, 2: NO_OUTPUTS}}
    # by hand: 6*5+5 + 5*4+4 + 4*3+3 = 74 before; h1 keeps 3 units, h2 3 inputs x 2 units, out 2 inputs
    assert report.params_before == 74 == _params(keras_rigl.strip(sparse))
    assert _params(small) == report.params_after == (6 * 3 + 3) + (3 * 2 + 2) + (2 * 3 + 3)
    assert [layer.units for layer in small.layers] == [3, 2, 3]


def test_unit_made_unread_by_a_removal_goes_in_a_second_pass():
    sparse = _mlp()
    h1 = np.ones((6, 5))
    h2 = np.ones((5, 4))
    h2[4, :] = 0  # h1 unit 4 is read only by h2 unit 3 ...
    h2[4, 3] = 1
    h2[:, 3] = 0  # ... and h2 unit 3 has no inputs: once it is gone, h1 unit 4 is unread
    _set_mask(sparse, "h1", h1)
    _set_mask(sparse, "h2", h2)

    small, report = keras_rigl.condense(sparse, return_report=True)

    _assert_same_outputs(sparse, small)
    assert report.removed == {"h1": [4], "h2": [3]}
    assert _params(small) == (6 * 4 + 4) + (4 * 3 + 3) + (3 * 3 + 3)


def _cnn_with_batch_norm():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, name="c1")(inp)  # valid: 6x6
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(5, 3, padding="same", name="c2")(x)  # same: 6x6
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)  # 3x3
    x = keras.layers.Dropout(0.5)(x)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(4, name="head")(x)
    sparse = keras_rigl.sparsify(keras.Model(inp, out), 0.0, distribution="uniform", seed=0)
    _randomize_biases(sparse)
    rng = np.random.default_rng(3)
    for name in ("bn1", "bn2"):
        bn = sparse.get_layer(name)
        width = bn.gamma.shape[0]
        bn.gamma.assign(rng.uniform(0.5, 2, width).astype("float32"))
        bn.beta.assign(rng.uniform(-0.5, 0.5, width).astype("float32"))
        bn.moving_mean.assign(rng.uniform(-0.5, 0.5, width).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.5, 2, width).astype("float32"))
    return sparse


def test_cnn_with_batch_norm_folds_through_bn_pooling_and_flatten():
    sparse = _cnn_with_batch_norm()
    bn1 = sparse.get_layer("bn1")
    # c1 channel 4: no inputs and, through bn1 and ReLU, the constant exactly 0: c2's zero padding sees 0 too
    beta = keras.ops.convert_to_numpy(bn1.beta).copy()
    beta[[0, 2]] = 1.0  # ... while channels 0 and 2 reach c2 as non-zero constants
    beta[4] = -100.0
    bn1.beta.assign(beta)
    # c1 channels 0 and 2: no inputs, non-zero constants read by c2 with "same" padding: not a bias (the border
    # taps see zeros), so channel 0 stays and carries channel 2's constant in its kernel slice of c2
    c1 = np.ones((3, 3, 3, 6))
    c1[..., [0, 2, 4]] = 0
    c2 = np.ones((3, 3, 6, 5))
    c2[..., 1] = 0  # c2 channel 1: no inputs, its constant reaches head through bn2, ReLU, pool, Flatten
    _set_mask(sparse, "c1", c1)
    _set_mask(sparse, "c2", c2)

    small, report = keras_rigl.condense(sparse, return_report=True)

    _assert_same_outputs(sparse, small)
    assert report.removed == {"c1": [2, 4], "c2": [1]}
    assert "unit 0 carries" in report.kept["c1"]
    before = (27 * 6 + 6) + 4 * 6 + (54 * 5 + 5) + 4 * 5 + (45 * 4 + 4)
    after = (27 * 4 + 4) + 4 * 4 + (36 * 4 + 4) + 4 * 4 + (36 * 4 + 4)
    assert _params(keras_rigl.strip(sparse)) == before
    assert _params(small) == after
    assert small.get_layer("bn1").gamma.shape == (4,)
    assert small.get_layer("head").kernel.shape == (36, 4)


def test_valid_padding_convolution_takes_a_non_zero_constant_channel():
    keras.utils.set_random_seed(0)
    inp = keras.Input((9, 3))
    x = keras.layers.Conv1D(4, 3, activation="sigmoid", name="c1")(inp)
    x = keras.layers.Conv1D(3, 2, strides=2, name="c2")(x)
    out = keras.layers.GlobalAveragePooling1D()(x)
    sparse = keras_rigl.sparsify(keras.Model(inp, out), 0.0, distribution="uniform", seed=0)
    _randomize_biases(sparse)
    mask = np.ones((3, 3, 4))
    mask[..., 0] = 0  # sigmoid(bias) != 0, read by a valid convolution: a constant per output position
    _set_mask(sparse, "c1", mask)

    small, report = keras_rigl.condense(sparse, return_report=True)

    _assert_same_outputs(sparse, small)
    assert report.removed == {"c1": [0]}
    assert small.get_layer("c2").kernel.shape == (2, 3, 3)


def test_a_one_by_one_convolution_with_same_padding_takes_constants_into_its_bias():
    keras.utils.set_random_seed(0)
    inp = keras.Input((5, 5, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="c1")(inp)
    out = keras.layers.Conv2D(3, 1, padding="same", name="pointwise")(x)  # 1x1: no padding is ever read
    sparse = keras_rigl.sparsify(keras.Model(inp, out), 0.0, distribution="uniform", seed=0)
    _randomize_biases(sparse)
    mask = np.ones((3, 3, 2, 4))
    mask[..., [1, 2]] = 0  # relu(bias) > 0: two non-zero constants, no carrier needed
    _set_mask(sparse, "c1", mask)

    small, report = keras_rigl.condense(sparse, return_report=True)

    _assert_same_outputs(sparse, small)
    assert report.removed == {"c1": [1, 2]} and report.kept == {}
    assert small.get_layer("pointwise").kernel.shape == (1, 1, 2, 3)


def _depthwise_block(padding):
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 1, name="pw0")(inp)
    x = keras.layers.BatchNormalization(name="bn0")(x)
    x = keras.layers.ReLU(6.0)(x)
    if padding == "pad":
        x = keras.layers.ZeroPadding2D(1)(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="valid", name="dw")(x)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    out = keras.layers.Conv2D(3, 1, name="pw1")(x)
    sparse = keras_rigl.sparsify(keras.Model(inp, out), 0.0, distribution="uniform", seed=0)
    _randomize_biases(sparse)
    rng = np.random.default_rng(4)
    for name, width in (("bn0", 4), ("bn1", 8)):
        bn = sparse.get_layer(name)
        bn.moving_mean.assign(rng.uniform(-0.5, 0.5, width).astype("float32"))
        bn.moving_variance.assign(rng.uniform(0.5, 2, width).astype("float32"))
    beta = np.full(4, 0.5, "float32")
    beta[1] = -100.0  # pw0 channel 1 reaches the depthwise convolution as exactly 0
    sparse.get_layer("bn0").beta.assign(beta)
    mask = np.ones((1, 1, 2, 4))
    mask[..., [1, 2]] = 0  # channel 2 reaches it as a non-zero constant
    _set_mask(sparse, "pw0", mask)
    return sparse


def test_depthwise_convolution_passes_constants_it_keeps_constant():
    # ZeroPadding before the depthwise convolution: a 0 channel stays 0 (then its bias), a non-zero one does not
    sparse = _depthwise_block("pad")
    small, report = keras_rigl.condense(sparse, return_report=True)
    _assert_same_outputs(sparse, small)
    assert report.removed == {"pw0": [1]} and "zero padding" in report.kept["pw0"]
    assert small.get_layer("dw").kernel.shape == (3, 3, 3, 2) and small.get_layer("dw").bias.shape == (6,)
    assert small.get_layer("pw1").kernel.shape == (1, 1, 6, 3)
    # no padding anywhere: both constants stay constants through the depthwise convolution into pw1's bias
    sparse = _depthwise_block("valid")
    small, report = keras_rigl.condense(sparse, return_report=True)
    _assert_same_outputs(sparse, small)
    assert report.removed == {"pw0": [1, 2]} and report.kept == {}
    assert small.get_layer("dw").kernel.shape == (3, 3, 2, 2) and small.get_layer("pw1").kernel.shape == (1, 1, 4, 3)


def test_functional_branches_fold_into_every_reader_and_keep_what_an_add_reads():
    keras.utils.set_random_seed(0)
    inp = keras.Input((5,))
    a = keras.layers.Dense(6, activation="relu", name="a")(inp)
    b = keras.layers.Dense(4, activation="relu", name="b")(a)
    c = keras.layers.Dense(4, use_bias=False, name="c")(a)
    added = keras.layers.Add()([b, c])
    out = keras.layers.Dense(2, name="out")(added)
    sparse = keras_rigl.sparsify(keras.Model(inp, out), 0.0, distribution="uniform", seed=0)
    _randomize_biases(sparse)
    a_mask = np.ones((5, 6))
    a_mask[:, [0, 5]] = 0  # read by b and by c (which has no bias: it gets one)
    b_mask = np.ones((6, 4))
    b_mask[:, 2] = 0  # b unit 2 feeds the Add: it must stay
    _set_mask(sparse, "a", a_mask)
    _set_mask(sparse, "b", b_mask)

    small, report = keras_rigl.condense(sparse, return_report=True)

    _assert_same_outputs(sparse, small)
    assert report.removed == {"a": [0, 5]}
    assert "Add" in report.kept["b"]
    assert small.get_layer("c").use_bias
    assert _params(small) == (5 * 4 + 4) + (4 * 4 + 4) + (4 * 4 + 4) + (4 * 2 + 2)


def test_model_output_and_nothing_removable_give_an_equal_copy():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d1"), keras.layers.Dense(2, name="d2")])
    small, report = keras_rigl.condense(model, return_report=True)
    assert small is not model and report.n_removed == 0 and report.removed == {}
    for got, want in zip(small.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)
    _assert_same_outputs(model, small)

    sparse = keras_rigl.sparsify(model, 0.0, distribution="uniform", seed=0)
    mask = np.ones((3, 2))
    mask[:, 1] = 0  # d2 unit 1 has no inputs, but it is a model output
    _set_mask(sparse, "d2", mask)
    small, report = keras_rigl.condense(sparse, return_report=True)
    assert report.removed == {} and "model output" in report.kept["d2"]
    assert _params(small) == _params(model)


def test_a_plain_model_with_zero_weights_is_condensed_too():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d1"), keras.layers.Dense(2, name="d2")])
    kernel = keras.ops.convert_to_numpy(model.get_layer("d1").kernel).copy()
    kernel[:, 1] = 0
    model.get_layer("d1").kernel.assign(kernel)
    small, report = keras_rigl.condense(model, return_report=True)
    assert report.removed == {"d1": [1]}
    _assert_same_outputs(model, small)


def test_condensed_model_saves_and_loads(tmp_path):
    sparse = _mlp()
    mask = np.ones((6, 5))
    mask[:, 0] = 0
    _set_mask(sparse, "h1", mask)
    small = keras_rigl.condense(sparse)
    path = tmp_path / "small.keras"
    small.save(path)
    again = keras.models.load_model(path)  # a plain Keras model: no custom objects needed
    x = _random_inputs(small)
    np.testing.assert_array_equal(again.predict(x, verbose=0), small.predict(x, verbose=0))
    assert _params(again) == _params(small) < _params(keras_rigl.strip(sparse))


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(TypeError, match="return_report"):
        keras_rigl.condense(_mlp(), return_report="yes")
    sub = built_subclassed_model()
    with pytest.raises(ValueError, match="functional"):
        keras_rigl.condense(sub)


def test_condense_after_rigl_in_model_fit():
    sparse = sparse_cnn(seed=0, sparsity=0.9, distribution="uniform")
    sparse.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 10, size=64)
    rigl = keras_rigl.RigL(update_freq=2, drop_fraction=0.3, seed=0)
    sparse.fit(x, y, batch_size=16, epochs=2, callbacks=[rigl], verbose=0)
    assert len(rigl.updates)  # masks really moved during fit

    small, report = keras_rigl.condense(sparse, return_report=True)

    _assert_same_outputs(sparse, small, n=32)
    hidden_in = _masked(sparse, "hidden").get_masks()["kernel"]
    out_mask = _masked(sparse, "out").get_masks()["kernel"]
    dead = ~hidden_in.any(axis=0) | ~out_mask.any(axis=1)  # at 90% about a third of the rows of out are empty
    assert dead.sum() > 0
    assert report.removed["hidden"] == np.flatnonzero(dead).tolist()
    assert _params(small) < _params(keras_rigl.strip(sparse))
