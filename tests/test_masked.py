"""The Masked wrapper on every supported layer type: forward, training, dtypes."""

import keras
import numpy as np
import pytest

import keras_rigl
from keras_rigl import Masked

LAYER_CASES = [
    ("dense", lambda: keras.layers.Dense(6), (5,), ["kernel"]),
    ("einsum", lambda: keras.layers.EinsumDense("ab,bc->ac", output_shape=6), (5,), ["kernel"]),
    ("conv1d", lambda: keras.layers.Conv1D(4, 3), (7, 3), ["kernel"]),
    ("conv2d", lambda: keras.layers.Conv2D(4, 3), (6, 6, 3), ["kernel"]),
    ("conv3d", lambda: keras.layers.Conv3D(2, 2), (4, 4, 4, 2), ["kernel"]),
    ("conv1dT", lambda: keras.layers.Conv1DTranspose(3, 3), (5, 2), ["kernel"]),
    ("conv2dT", lambda: keras.layers.Conv2DTranspose(3, 3, strides=2), (4, 4, 2), ["kernel"]),
    ("conv3dT", lambda: keras.layers.Conv3DTranspose(2, 2), (3, 3, 3, 2), ["kernel"]),
    ("sep1d", lambda: keras.layers.SeparableConv1D(4, 3), (7, 3), ["pointwise_kernel"]),
    ("sep2d", lambda: keras.layers.SeparableConv2D(4, 3), (6, 6, 3), ["pointwise_kernel"]),
    ("embedding", lambda: keras.layers.Embedding(20, 6), (4,), ["embeddings"]),
    ("lstm", lambda: keras.layers.LSTM(5), (4, 3), ["lstm_cell/kernel", "lstm_cell/recurrent_kernel"]),
    ("gru", lambda: keras.layers.GRU(5), (4, 3), ["gru_cell/kernel", "gru_cell/recurrent_kernel"]),
    ("rnn", lambda: keras.layers.SimpleRNN(5), (4, 3), ["simple_rnn_cell/kernel", "simple_rnn_cell/recurrent_kernel"]),
    (
        "bidir",
        lambda: keras.layers.Bidirectional(keras.layers.LSTM(4)),
        (4, 3),
        [
            "forward_lstm/lstm_cell/kernel",
            "forward_lstm/lstm_cell/recurrent_kernel",
            "backward_lstm/lstm_cell/kernel",
            "backward_lstm/lstm_cell/recurrent_kernel",
        ],
    ),
    ("timedist", lambda: keras.layers.TimeDistributed(keras.layers.Dense(3)), (4, 5), ["dense/kernel"]),
]


def _inputs(shape, name, rng):
    if name == "embedding":
        return rng.integers(0, 20, size=(3, *shape))
    return rng.normal(size=(3, *shape)).astype("float32")


def _build(factory, shape, name):
    keras.utils.set_random_seed(1)
    layer = factory()
    dtype = "int32" if name == "embedding" else "float32"
    inp = keras.Input(shape, dtype=dtype)
    return keras.Model(inp, Masked(layer)(inp))


@pytest.mark.parametrize("name,factory,shape,weights", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_masked_forward_equals_layer_with_zeroed_weights(name, factory, shape, weights, rng):
    model = _build(factory, shape, name)
    layer = keras_rigl.masked_layers(model)[0]
    assert [mw.name for mw in layer.masked_weights] == weights
    masks = {mw.name: (rng.random(mw.mask.shape) < 0.5).astype("float32") for mw in layer.masked_weights}
    # set masks without zeroing the weights: the forward pass must still ignore them
    layer.set_masks(masks, zero_weights=False)
    x = _inputs(shape, name, rng)
    got = keras.ops.convert_to_numpy(model(x))
    plain = layer.layer
    originals = {id(mw.weight): keras.ops.convert_to_numpy(mw.weight) for mw in layer.masked_weights}
    for mw in layer.masked_weights:
        mw.weight.assign(originals[id(mw.weight)] * masks[mw.name])
    expected = keras.ops.convert_to_numpy(plain(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # the bias / other weights are never masked
    masked_ids = {id(mw.weight) for mw in layer.masked_weights}
    assert all(("bias" not in v.path) for v in plain.weights if id(v) in masked_ids)


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam", "adamw", "rmsprop", "adagrad", "lion"])
def test_masked_weights_stay_exactly_zero_through_training(optimizer, rng):
    opt = {
        "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
        "adam": lambda: keras.optimizers.Adam(0.01),
        "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
        "rmsprop": lambda: keras.optimizers.RMSprop(0.01, momentum=0.5),
        "adagrad": lambda: keras.optimizers.Adagrad(0.1),
        "lion": lambda: keras.optimizers.Lion(0.01),
    }[optimizer]()
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)])
    model = keras_rigl.sparsify(base, 0.7, seed=0)
    model.compile(opt, "mse")
    x, y = rng.normal(size=(64, 6)), rng.normal(size=(64, 3))
    masked = [mw for layer in keras_rigl.masked_layers(model) for mw in layer.masked_weights]
    masks_before = {mw.path: keras.ops.convert_to_numpy(mw.mask).copy() for mw in masked}
    weights_before = {mw.path: keras.ops.convert_to_numpy(mw.weight).copy() for mw in masked}
    moved = {mw.path: np.zeros(mw.weight.shape, bool) for mw in masked}

    class RecordMoves(keras.callbacks.Callback):  # Lion's ±lr steps can come back to the start: look at every step
        def on_train_batch_end(self, batch, logs=None):
            for mw in masked:
                moved[mw.path] |= keras.ops.convert_to_numpy(mw.weight) != weights_before[mw.path]

    model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[RecordMoves()])
    first, second = (keras.ops.convert_to_numpy(mw.mask) != 0 for mw in masked)
    # A hidden unit whose outgoing weights are all masked passes no gradient back: its incoming
    # weights cannot train (except under AdamW's decoupled weight decay). Every other active weight must.
    reaches_output = second.any(axis=1)
    can_train = [first & (reaches_output[None, :] | (optimizer == "adamw")), second]
    for mw, expected_changed in zip(masked, can_train):
        w = keras.ops.convert_to_numpy(mw.weight)
        mask = keras.ops.convert_to_numpy(mw.mask)
        np.testing.assert_array_equal(mask, masks_before[mw.path])
        assert np.all(w[mask == 0] == 0.0)  # masked: exactly 0, not merely small
        assert expected_changed.sum() > 0.5 * mask.sum()
        # active weights did train: exactly those with a gradient moved from their initial value
        np.testing.assert_array_equal(moved[mw.path], expected_changed)


@pytest.mark.parametrize(
    "bad",
    [np.full((4, 3), 0.5), np.full((4, 3), np.nan), np.full((4, 3), 2), np.full((4, 3), -1.0), np.full((4, 3), "1")],
    ids=["half", "nan", "two", "minus_one", "strings"],
)
def test_set_masks_refuses_anything_but_zeros_and_ones(bad):
    model = keras_rigl.sparsify(keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]), 0.5, seed=0)
    layer = keras_rigl.masked_layers(model)[0]
    before = layer.get_masks()["kernel"].copy()
    weight_before = keras.ops.convert_to_numpy(layer.layer.kernel).copy()
    with pytest.raises(ValueError, match=r"^Mask for masked_dense/kernel must hold only 0 and 1 \(or False/True\)") as err:
        layer.set_masks({"kernel": bad})
    assert "\n" not in str(err.value)
    np.testing.assert_array_equal(layer.get_masks()["kernel"], before)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.layer.kernel), weight_before)
    assert keras_rigl.sparsity_report(model)["sparsity"][0] == pytest.approx(0.5)


def test_set_masks_takes_bool_and_numeric_zero_one_and_checks_all_before_setting_any():
    model = keras_rigl.sparsify(keras.Sequential([keras.Input((3, 2)), keras.layers.SimpleRNN(2)]), 0.5, seed=0)
    layer = keras_rigl.masked_layers(model)[0]
    names = [mw.name for mw in layer.masked_weights]  # kernel (2, 2), recurrent_kernel (2, 2)
    pattern = np.array([[1, 0], [0, 1]])
    for value in (pattern.astype(bool), pattern.astype("int64"), pattern.astype("float16")):
        layer.set_masks({names[0]: value})
        np.testing.assert_array_equal(layer.get_masks()[names[0]], pattern)
    before = layer.get_masks()
    with pytest.raises(ValueError, match="only 0 and 1"):
        layer.set_masks({names[0]: 1 - pattern, names[1]: np.full((2, 2), 0.5)})
    for name in names:  # the good mask was not applied either
        np.testing.assert_array_equal(layer.get_masks()[name], before[name])
    with pytest.raises(ValueError, match=r"shape \(3, 2\), expected \(2, 2\)"):
        layer.set_masks({names[0]: np.ones((3, 2))})
    with pytest.raises(ValueError, match=r"masks must be a dict .*\{'simple_rnn_cell/kernel': mask\}"):
        layer.set_masks(np.ones((2, 2)))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_masks_follow_variable_dtype(policy, rng):
    keras.mixed_precision.set_global_policy(policy)
    base = keras.Sequential(
        [keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(), keras.layers.Dense(3, dtype="float32")]
    )
    model = keras_rigl.sparsify(base, 0.5, seed=0)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(rng.normal(size=(16, 6, 6, 2)), rng.normal(size=(16, 3)), epochs=1, verbose=0)
    for layer in keras_rigl.masked_layers(model):
        for mw in layer.masked_weights:
            assert mw.mask.dtype == mw.weight.dtype == "float32"
            w, m = keras.ops.convert_to_numpy(mw.weight), keras.ops.convert_to_numpy(mw.mask)
            assert np.all(w[m == 0] == 0)
    conv = keras_rigl.masked_layers(model)[0]
    assert conv.compute_dtype == policy.split("_")[1]


def test_dense_gradient_capture_equals_tape_gradient(rng):
    import tensorflow as tf

    base = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4)])
    model = keras_rigl.sparsify(base, 0.5, seed=0)
    layer = keras_rigl.masked_layers(model)[0]
    mw = layer.masked_weights[0]
    x = tf.constant(rng.normal(size=(8, 5)), tf.float32)
    # reference: gradient w.r.t. the effective weight W*M, computed by hand
    w_eff = tf.Variable(mw.weight * mw.mask)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(x @ w_eff + layer.layer.bias))
    expected = tape.gradient(loss, w_eff).numpy()
    layer.set_capture_mode(1)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(model(x)))
    grad_w = tape.gradient(loss, mw.weight).numpy()
    captured = mw.capture.read().numpy()
    np.testing.assert_allclose(captured, expected, rtol=1e-5, atol=1e-5)
    mask = mw.mask.numpy()
    assert np.abs(expected[mask == 0]).sum() > 0  # the dense gradient is dense
    np.testing.assert_allclose(grad_w, expected * mask, rtol=1e-5, atol=1e-5)  # the optimizer's is masked
    layer.set_capture_mode(0)
    mw.capture.reset()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.square(model(x)))
    tape.gradient(loss, mw.weight)
    assert np.all(mw.capture.value().numpy() == 0)  # capture off: nothing written
    assert not mw.capture.was_written()
    with pytest.raises(RuntimeError, match="before_step"):
        mw.capture.read()


def test_custom_layer_made_maskable_by_protocol_and_by_registration(rng):
    class Scale(keras.layers.Layer, keras_rigl.MaskableLayer):
        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], 3), name="w")
            self.b = self.add_weight(shape=(3,), name="b", initializer="ones")

        def call(self, x):
            return x @ self.w + self.b

        def get_maskable_weights(self):
            return ["w"]

    class Other(keras.layers.Layer):
        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(input_shape[-1], 2))

        def call(self, x):
            return x @ self.kernel

    keras_rigl.register_maskable(Other, ["kernel"])
    inp = keras.Input((4,))
    model = keras.Model(inp, Other()(Scale()(inp)))
    sparse = keras_rigl.sparsify(model, 0.5, distribution="er", seed=0)
    names = [(l.layer.__class__.__name__, mw.name) for l in keras_rigl.masked_layers(sparse) for mw in l.masked_weights]
    assert names == [("Scale", "w"), ("Other", "kernel")]
    x = rng.normal(size=(2, 4)).astype("float32")
    np.testing.assert_allclose(sparse(x), keras_rigl.strip(sparse)(x), atol=1e-6)


def test_unknown_layers_are_left_dense_with_one_warning():
    class Mystery(keras.layers.Layer):
        def build(self, input_shape):
            self.m = self.add_weight(shape=(input_shape[-1], 3))

        def call(self, x):
            return x @ self.m

    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2)(Mystery(name="mystery")(inp)))
    with pytest.warns(UserWarning, match=r"left these layers dense.*mystery \(Mystery\)") as record:
        sparse = keras_rigl.sparsify(model, 0.5)
    assert len([w for w in record if "left these layers dense" in str(w.message)]) == 1
    assert [l.layer.name for l in keras_rigl.masked_layers(sparse)] == ["dense"]


def test_masked_rejects_what_it_cannot_wrap():
    with pytest.raises(ValueError, match="register_maskable"):
        Masked(keras.layers.BatchNormalization())
    with pytest.raises(ValueError, match="sparsify"):
        Masked(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="already Masked"):
        Masked(Masked(keras.layers.Dense(2)))
    with pytest.raises(TypeError):
        Masked("dense")


def test_depthwise_is_dense_unless_asked():
    base = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.DepthwiseConv2D(3), keras.layers.SeparableConv2D(4, 3)])
    default = keras_rigl.sparsify(base, 0.5, seed=0)
    assert [(l.layer.name, mw.name) for l in keras_rigl.masked_layers(default) for mw in l.masked_weights] == [
        ("separable_conv2d", "pointwise_kernel")
    ]
    asked = keras_rigl.sparsify(base, 0.5, seed=0, mask_depthwise=True)
    assert [mw.name for l in keras_rigl.masked_layers(asked) for mw in l.masked_weights] == [
        "kernel",
        "pointwise_kernel",
        "depthwise_kernel",
    ]


def test_multi_head_attention_projections_are_masked(rng):
    inp = keras.Input((6, 8))
    out = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")(inp, inp)
    model = keras.Model(inp, out)
    sparse = keras_rigl.sparsify(model, 0.5, distribution="uniform", seed=0)
    layer = keras_rigl.masked_layers(sparse)[0]
    assert [mw.name for mw in layer.masked_weights] == [
        "query/kernel",
        "key/kernel",
        "value/kernel",
        "attention_output/kernel",
    ]
    x = rng.normal(size=(2, 6, 8)).astype("float32")
    np.testing.assert_allclose(keras_rigl.strip(sparse)(x), sparse(x), atol=1e-5)
    report = keras_rigl.sparsity_report(sparse).set_index("weight")
    # query kernel (8, 2, 4) "abc,cde->abde": applied at each of the 6 positions
    assert report.loc["query/kernel", "dense_flops"] == 2 * 64 * 6
    # output kernel (2, 4, 8) "abcd,cde->abe": applied at each of the 6 positions
    assert report.loc["attention_output/kernel", "dense_flops"] == 2 * 64 * 6


def test_multi_head_attention_trains_with_rigl_and_round_trips(tmp_path, rng):
    inp = keras.Input((6, 8))
    x = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(inp, inp)
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(x))
    sparse = keras_rigl.sparsify(keras.Model(inp, out), 0.6, seed=0)
    sparse.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rigl = keras_rigl.RigL(update_freq=2, seed=0)
    xs, ys = rng.normal(size=(32, 6, 8)).astype("float32"), rng.integers(0, 3, 32)
    sparse.fit(xs, ys, batch_size=8, epochs=2, callbacks=[rigl], verbose=0)
    assert (rigl.updates["layer"] == "multi_head_attention").any()
    assert rigl.updates["n_moved"].sum() > 0
    sparse.save(tmp_path / "mha.keras")
    again = keras.models.load_model(tmp_path / "mha.keras")
    np.testing.assert_array_equal(again(xs[:2]), sparse(xs[:2]))
    for a, b in zip(keras_rigl.masked_layers(sparse), keras_rigl.masked_layers(again)):
        for name, mask in a.get_masks().items():
            np.testing.assert_array_equal(mask, b.get_masks()[name])
