"""Counting active weights, forward FLOPs and training FLOPs (keras_rigl.counting), against hand computations."""

import keras
import numpy as np
import pytest

import keras_rigl
from keras_rigl import counting


def two_layer(sparse=True):
    """Dense(8 -> 6) then Dense(6 -> 4); masks set by hand."""
    inp = keras.Input((8,))
    x = keras.layers.Dense(6, name="a")(inp)
    out = keras.layers.Dense(4, name="b")(x)
    model = keras.Model(inp, out)
    if not sparse:
        return model
    model = keras_rigl.sparsify(model, 0.5, distribution="uniform", seed=0)
    layers = {layer.layer.name: layer for layer in keras_rigl.masked_layers(model)}
    mask_a = np.zeros((8, 6), bool)
    mask_a.reshape(-1)[:12] = True  # 12 of 48 active
    mask_b = np.zeros((6, 4), bool)
    mask_b.reshape(-1)[:6] = True  # 6 of 24 active
    layers["a"].set_masks({"kernel": mask_a})
    layers["b"].set_masks({"kernel": mask_b})
    return model


# by hand: 2 FLOPs per multiply-add, biases not counted
F_D = 2 * 48 + 2 * 24  # 144
F_S = 2 * 12 + 2 * 6  # 36


def test_model_flops_two_layers_by_hand():
    mf = counting.model_flops(two_layer())
    assert (mf.sparse, mf.dense) == (F_S, F_D)
    assert mf.ratio == pytest.approx(0.25)
    dense = counting.model_flops(two_layer(sparse=False))
    assert (dense.sparse, dense.dense) == (F_D, F_D)


def test_unmasked_layers_count_dense():
    inp = keras.Input((8,))
    x = keras.layers.Dense(6, name="a")(inp)
    out = keras.layers.Dense(4, name="b")(x)
    model = keras_rigl.sparsify(keras.Model(inp, out), 0.5, exclude="b", seed=0)
    mf = counting.model_flops(model)
    assert mf.dense == F_D
    assert mf.sparse == 2 * 24 + 2 * 24  # a: 24 of 48 active; b dense (48 FLOPs)


def test_conv_positions_by_hand():
    inp = keras.Input((5, 5, 2))
    x = keras.layers.Conv2D(3, 3, name="c")(inp)  # 3x3 output, kernel 3*3*2*3 = 54
    model = keras.Model(inp, keras.layers.Flatten()(x))
    mf = counting.model_flops(model)
    assert mf.dense == 2 * 54 * 9


def test_count_active_and_nonzero_params_by_hand():
    model = two_layer()
    # masked: a 12 of 48, b 6 of 24
    assert keras_rigl.count_active(model) == (18, 72)
    # trainable: the active kernel entries + the biases (6 + 4), which count in full
    assert keras_rigl.count_nonzero_params(model) == 12 + 6 + 6 + 4
    dense = two_layer(sparse=False)
    assert keras_rigl.count_active(dense) == (0, 0)
    assert keras_rigl.count_nonzero_params(dense) == 48 + 6 + 24 + 4


def test_count_nonzero_params_leaves_out_frozen_weights():
    model = two_layer()
    keras_rigl.masked_layers(model)[1].trainable = False  # b: kernel and bias frozen
    assert keras_rigl.count_nonzero_params(model) == 12 + 6


def test_masks_from_weights_takes_the_non_zeros():
    model = two_layer()
    layer = {l.layer.name: l for l in keras_rigl.masked_layers(model)}["a"]
    kernel = np.zeros((8, 6), "float32")
    kernel[[0, 3, 7], [1, 2, 5]] = [0.5, -2.0, 1e-30]  # a denormal-small weight is non-zero too
    layer.layer.kernel.assign(kernel)
    densities = keras_rigl.masks_from_weights(model)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.masked_weights[0].mask), kernel != 0)
    assert densities["a/kernel"] == pytest.approx(3 / 48)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.layer.kernel), kernel)  # weights untouched
    with pytest.raises(ValueError, match="no Masked layer.*sparsify"):
        keras_rigl.masks_from_weights(two_layer(sparse=False))


@pytest.mark.parametrize(
    "method, expected",
    [
        ("dense", 3 * F_D),
        ("prune", 3 * F_D),  # charged as dense over its whole schedule
        ("static", 3 * F_S),
        ("set", 3 * F_S),
        ("snfs", 2 * F_S + F_D),
        ("rigl", (3 * F_S * 10 + 2 * F_S + F_D) / 11),
    ],
)
def test_per_example_formulas(method, expected):
    assert counting.train_flops_per_example(method, F_S, F_D, update_freq=10) == pytest.approx(expected)


def test_totals_multiply_by_examples_seen():
    steps, batch = 7, 5
    got = counting.training_flops("rigl", F_S, F_D, steps * batch, update_freq=10)
    assert got == pytest.approx(steps * batch * (3 * F_S * 10 + 2 * F_S + F_D) / 11)
    # by hand for this model: (3*36*10 + 2*36 + 144)/11 = 1296/11 per example
    assert got == pytest.approx(35 * 1296 / 11)


def test_rigl_tends_to_static_as_updates_get_rare():
    big = counting.train_flops_per_example("rigl", F_S, F_D, update_freq=10**9)
    assert big == pytest.approx(3 * F_S, rel=1e-6)
    every = counting.train_flops_per_example("rigl", F_S, F_D, update_freq=1)
    assert every == pytest.approx((3 * F_S + 2 * F_S + F_D) / 2)


def test_summary_and_equal_flops_steps():
    model = two_layer()
    s = keras_rigl.training_flops_summary(model, "set", examples=100)
    assert s == {
        "f_sparse": F_S,
        "f_dense": F_D,
        "train_flops": 300 * F_S,
        "train_flops_dense": 300 * F_D,
        "train_flops_ratio": pytest.approx(0.25),
        "inference_flops": F_S,
        "inference_flops_dense": F_D,
    }
    assert counting.inference_flops(model) == F_S
    # a dense run spending RigL's FLOPs: steps = FLOPs / (3 f_D batch)
    target = counting.training_flops("rigl", F_S, F_D, 1000, update_freq=10)
    steps = counting.equal_flops_steps(target, F_D, batch_size=10)
    assert steps == round(target / (3 * F_D * 10))
    assert counting.equal_flops_steps(1.0, F_D, 10) == 1


def test_rigl_counts_the_updates_that_happened():
    model = two_layer()
    # 100 examples, 10 of them on steps with a dense gradient: those cost 2 f_S + f_D, the rest 3 f_S
    s = keras_rigl.training_flops_summary(model, "rigl", examples=100, update_freq=10, update_examples=10)
    assert s["train_flops"] == 90 * 3 * F_S + 10 * (2 * F_S + F_D)  # 9720 + 2160 = 11880
    assert s["train_flops"] == 11880
    # no update inside training: RigL costs what static sparse training costs
    none = keras_rigl.training_flops_summary(model, "rigl", examples=100, update_examples=0)
    assert none["train_flops"] == 300 * F_S
    # without update_examples: the paper's amortised rate
    paper = keras_rigl.training_flops_summary(model, "rigl", examples=110, update_freq=10)
    assert paper["train_flops"] == pytest.approx(110 * 1296 / 11)
    # SET's updates need no dense gradient
    set_ = keras_rigl.training_flops_summary(model, "set", examples=100, update_examples=10)
    assert set_["train_flops"] == 300 * F_S


def test_errors():
    with pytest.raises(ValueError, match="Unknown method 'magic'.*'rigl'"):
        counting.train_flops_per_example("magic", 1, 2)
    for name in ("dense_flops", "small_dense", "dense_long"):  # the example scripts' run names are not methods
        with pytest.raises(ValueError, match="Unknown method"):
            keras_rigl.training_flops_summary(two_layer(), name, 10)
    with pytest.raises(ValueError, match="update_freq must be an integer >= 1"):
        counting.train_flops_per_example("rigl", 1, 2, update_freq=0)
    with pytest.raises(ValueError, match=r"update_examples must be an integer in \[0, 10\]"):
        counting.training_flops("rigl", 1, 2, examples=10, update_examples=11)
    with pytest.raises(ValueError, match="examples must be an integer >= 0"):
        counting.training_flops("rigl", 1, 2, examples=-1)
    assert counting.training_flops("rigl", 1, 2, np.int64(10), np.int64(5), np.int64(2)) == 3 * 10 + 2
