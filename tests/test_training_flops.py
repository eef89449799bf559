"""Training / inference FLOPs by the RigL paper's accounting, against numbers computed by hand."""

import keras
import numpy as np
import pytest

import keras_rigl
from keras_rigl import training_flops


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
    mf = training_flops.model_flops(two_layer())
    assert (mf.sparse, mf.dense) == (F_S, F_D)
    assert mf.ratio == pytest.approx(0.25)
    dense = training_flops.model_flops(two_layer(sparse=False))
    assert (dense.sparse, dense.dense) == (F_D, F_D)


def test_unmasked_layers_count_dense():
    inp = keras.Input((8,))
    x = keras.layers.Dense(6, name="a")(inp)
    out = keras.layers.Dense(4, name="b")(x)
    model = keras_rigl.sparsify(keras.Model(inp, out), 0.5, exclude="b", seed=0)
    mf = training_flops.model_flops(model)
    assert mf.dense == F_D
    assert mf.sparse == 2 * 24 + 2 * 24  # a: 24 of 48 active; b dense (48 FLOPs)


def test_conv_positions_by_hand():
    inp = keras.Input((5, 5, 2))
    x = keras.layers.Conv2D(3, 3, name="c")(inp)  # 3x3 output, kernel 3*3*2*3 = 54
    model = keras.Model(inp, keras.layers.Flatten()(x))
    mf = training_flops.model_flops(model)
    assert mf.dense == 2 * 54 * 9


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
    assert training_flops.train_flops_per_example(method, F_S, F_D, update_freq=10) == pytest.approx(expected)


def test_totals_multiply_by_examples_seen():
    steps, batch = 7, 5
    got = training_flops.training_flops("rigl", F_S, F_D, steps * batch, update_freq=10)
    assert got == pytest.approx(steps * batch * (3 * F_S * 10 + 2 * F_S + F_D) / 11)
    # by hand for this model: (3*36*10 + 2*36 + 144)/11 = 1296/11 per example
    assert got == pytest.approx(35 * 1296 / 11)


def test_rigl_tends_to_static_as_updates_get_rare():
    big = training_flops.train_flops_per_example("rigl", F_S, F_D, update_freq=10**9)
    assert big == pytest.approx(3 * F_S, rel=1e-6)
    every = training_flops.train_flops_per_example("rigl", F_S, F_D, update_freq=1)
    assert every == pytest.approx((3 * F_S + 2 * F_S + F_D) / 2)


def test_summary_and_equal_flops_steps():
    model = two_layer()
    s = training_flops.summary(model, "set", examples=100)
    assert s["f_sparse"] == F_S and s["f_dense"] == F_D
    assert s["train_flops"] == pytest.approx(300 * F_S)
    assert s["train_flops_ratio"] == pytest.approx(0.25)
    assert s["inference_flops"] == F_S
    assert training_flops.inference_flops(model) == F_S
    # a dense run spending RigL's FLOPs: steps = FLOPs / (3 f_D batch)
    target = training_flops.training_flops("rigl", F_S, F_D, 1000, update_freq=10)
    steps = training_flops.equal_flops_steps(target, F_D, batch_size=10)
    assert steps == round(target / (3 * F_D * 10))
    assert training_flops.equal_flops_steps(1.0, F_D, 10) == 1


def test_errors():
    with pytest.raises(ValueError, match="unknown method"):
        training_flops.train_flops_per_example("magic", 1, 2)
    with pytest.raises(ValueError, match="update_freq"):
        training_flops.train_flops_per_example("rigl", 1, 2, update_freq=0)
