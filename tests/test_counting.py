"""Counting active weights, forward FLOPs and training FLOPs (keras_rigl.counting), against hand computations."""

import keras
import numpy as np
import pytest

import keras_rigl
from keras_rigl import counting

pytestmark = pytest.mark.any_backend  # no TensorFlow: also run on JAX and PyTorch


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


def _half_sparse_a_dense_b():
    """Dense(6) "a" at 50% sparsity feeding Dense(4) "b", excluded (left dense)."""
    inp = keras.Input((8,))
    x = keras.layers.Dense(6, name="a")(inp)
    out = keras.layers.Dense(4, name="b")(x)
    return keras_rigl.sparsify(keras.Model(inp, out), 0.5, exclude="b", seed=0)


def test_unmasked_layers_count_dense():
    model = _half_sparse_a_dense_b()
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


def depthwise_model():
    """DepthwiseConv2D (left dense by default) -> 1x1 Conv2D -> Dense; masks set by hand."""
    inp = keras.Input((5, 5, 2))
    x = keras.layers.DepthwiseConv2D(3, name="dw")(inp)  # kernel 3x3x2x1 = 18, output 3x3
    x = keras.layers.Conv2D(4, 1, name="pw")(x)  # kernel 1x1x2x4 = 8, output 3x3
    out = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(x))  # kernel 36x3 = 108
    model = keras_rigl.sparsify(keras.Model(inp, out), 0.5, seed=0)
    layers = {layer.layer.name: layer for layer in keras_rigl.masked_layers(model)}
    mask_pw = np.zeros((1, 1, 2, 4), bool)
    mask_pw.reshape(-1)[:4] = True  # 4 of 8
    mask_head = np.zeros((36, 3), bool)
    mask_head.reshape(-1)[::4] = True  # 27 of 108
    for layer in layers.values():  # sparsify zeroed its own masked entries; make every weight non-zero again
        layer.layer.kernel.assign(np.full(layer.layer.kernel.shape, 0.5, "float32"))
    layers["pw"].set_masks({"kernel": mask_pw})
    layers["head"].set_masks({"kernel": mask_head})
    return model


def test_report_lists_every_kernel_and_marks_the_dense_ones():
    model = depthwise_model()
    report = keras_rigl.sparsity_report(model)
    rows = [(r.layer, r.weight, r.shape, r.masked, r.params, r.active) for r in report.itertuples()]
    assert rows == [
        ("dw", "kernel", (3, 3, 2, 1), False, 18, 18),
        ("pw", "kernel", (1, 1, 2, 4), True, 8, 4),
        ("head", "kernel", (36, 3), True, 108, 27),
    ]
    # per example: dw 2*18*9, pw 2*8*9 (2*4*9 sparse), head 2*108 (2*27 sparse)
    assert list(report["dense_flops"]) == [324, 144, 216]
    assert list(report["sparse_flops"]) == [324, 72, 54]
    assert report.attrs["params"] == 134 and report.attrs["active"] == 49
    assert report.attrs["sparsity"] == pytest.approx(1 - 49 / 134)
    assert (report.attrs["masked_params"], report.attrs["masked_active"]) == (116, 31)
    assert report.attrs["masked_sparsity"] == pytest.approx(1 - 31 / 116)
    assert (report.attrs["dense_flops"], report.attrs["sparse_flops"]) == (684, 450)
    assert (counting.model_flops(model).sparse, counting.model_flops(model).dense) == (450, 684)
    # the totals describe the stripped model: its non-zero kernel entries
    plain = keras_rigl.strip(model)
    nonzero = sum(int(np.count_nonzero(keras.ops.convert_to_numpy(l.kernel))) for l in plain.layers if hasattr(l, "kernel"))
    assert nonzero == 49


def test_report_lists_the_dense_depthwise_kernel_of_a_masked_separable_conv():
    inp = keras.Input((6, 6, 3))
    out = keras.layers.SeparableConv2D(4, 3, name="sep")(inp)  # output 4x4
    model = keras_rigl.sparsify(keras.Model(inp, out), 0.5, seed=0)
    report = keras_rigl.sparsity_report(model)
    rows = [(r.layer, r.weight, r.masked, r.params, r.active) for r in report.itertuples()]
    assert rows == [("sep", "pointwise_kernel", True, 12, 6), ("sep", "depthwise_kernel", False, 27, 27)]
    assert list(report["dense_flops"]) == [2 * 12 * 16, 2 * 27 * 16]


def test_report_lists_excluded_layers_dense():
    model = _half_sparse_a_dense_b()
    report = keras_rigl.sparsity_report(model)
    assert [(r.layer, r.masked, r.params, r.active) for r in report.itertuples()] == [
        ("a", True, 48, 24),
        ("b", False, 24, 24),
    ]
    assert report.attrs["active"] == 48 and report.attrs["masked_active"] == 24


def test_printed_report_shows_key_columns_and_a_total_within_80_columns():
    inp = keras.Input((7, 300))
    x = keras.layers.Bidirectional(keras.layers.LSTM(256), name="a_rather_long_bidirectional_layer_name")(inp)
    out = keras.layers.Dense(1000, name="classifier")(x)
    model = keras_rigl.sparsify(keras.Model(inp, out), 0.9, seed=0)
    report = keras_rigl.sparsity_report(model)
    import pandas as pd

    # as pandas prints in an 80-column terminal
    with pd.option_context("display.width", 80, "display.max_columns", 0):
        text = str(report)
        assert repr(report) == text
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    assert "..." not in text
    assert lines[0].split() == ["layer", "weight", "shape", "masked", "active/params", "sparsity"]
    for r in report.itertuples():  # every row's key numbers are there
        assert f"{r.active:,}/{r.params:,}" in text and f"{100 * r.sparsity:.1f}%" in text
    total = [line for line in lines if line.startswith("total")]
    assert len(total) == 1
    a = report.attrs
    assert total[0].split()[1:] == [f"{a['active']:,}/{a['params']:,}", f"{100 * a['sparsity']:.1f}%"]
    # long names are shortened in the middle, keeping both ends, and the LSTM's four weights stay apart
    cells = [line.split()[:2] for line in lines[2:7]]
    assert all(layer.startswith("a_r") and "~" in layer and layer.endswith("name") for layer, _ in cells[:4])
    assert len({weight for _, weight in cells[:4]}) == 4
    assert cells[4] == ["classifier", "kernel"]


def test_report_of_one_masked_layer_and_refusal_of_other_objects():
    model = two_layer()
    layer = keras_rigl.masked_layers(model)[0]
    report = keras_rigl.sparsity_report(layer)
    assert [(r.layer, r.masked, r.params, r.active) for r in report.itertuples()] == [("a", True, 48, 12)]
    assert keras_rigl.count_active(layer) == (12, 48)
    with pytest.raises(TypeError, match="keras.Model or a layer.*got str"):
        keras_rigl.sparsity_report("model.keras")


def test_method_names_are_case_insensitive():
    assert counting.train_flops_per_example("RigL", F_S, F_D, update_freq=10) == pytest.approx(1296 / 11)


def test_counting_refuses_a_mask_written_around_set_masks():
    model = two_layer()
    layer = keras_rigl.masked_layers(model)[0]
    layer.masked_weights[0].mask.assign(np.full((8, 6), 0.5, "float32"))  # bypasses set_masks' check
    for count in (keras_rigl.sparsity_report, keras_rigl.count_active, keras_rigl.count_nonzero_params):
        with pytest.raises(ValueError, match=r"masked_a/kernel holds values other than 0 and 1 \(0.5\).*set_masks"):
            count(model)
