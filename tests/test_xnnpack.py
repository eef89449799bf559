"""Tests for keras_rigl.tflite.xnnpack_rewrite / xnnpack_report (rewrite for XNNPACK's sparse path + report)."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_rigl.tflite import (  # noqa: E402
    rewrite_for_xnnpack_sparse, same_padding, xnnpack_sparse_report)

L = keras.layers


def _prune(model, sparsity=0.9, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        ws = layer.get_weights()
        if isinstance(layer, L.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") if i in (0, 3)
                               else (0.1 * rng.standard_normal(w.shape)).astype("float32")
                               for i, w in enumerate(ws)])
        elif (isinstance(layer, L.Conv2D) and not isinstance(layer, L.DepthwiseConv2D)
              and tuple(layer.kernel_size) == (1, 1)) or isinstance(layer, L.Dense):
            ws[0] = ws[0] * (rng.random(ws[0].shape) >= sparsity)
            layer.set_weights(ws)
    return model


def _tflite(model, path, sparse=True):
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if sparse:
        conv.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    with open(path, "wb") as f:
        f.write(conv.convert())
    return str(path)


def _run_tflite(path, x):
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=path, num_threads=1)
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def _no_same_stride2(df):
    conv = df[df.op.isin(["CONV_2D", "DEPTHWISE_CONV_2D"])]
    bad = conv[conv.stride.apply(lambda s: s is not None and max(s) > 1)
               & conv.padding.astype(str).str.startswith("SAME")]
    return bad.empty


def test_same_padding():
    assert same_padding(96, 3, 2) == (0, 1)
    assert same_padding(97, 3, 2) == (1, 1)
    assert same_padding(7, 3, 1) == (1, 1)
    assert same_padding(8, 1, 1) == (0, 0)
    assert same_padding(10, 5, 2) == (1, 2)


@pytest.fixture(scope="module")
def mobilenet():
    keras.utils.set_random_seed(0)
    m = keras.applications.MobileNet(input_shape=(64, 64, 3), alpha=0.25, weights=None,
                                     classifier_activation=None)
    return _prune(m)


def test_rewrite_mobilenet_same_outputs_and_sparse_path(mobilenet, tmp_path):
    m2, info = rewrite_for_xnnpack_sparse(mobilenet, return_info=True)
    assert info["flipped"]  # 64 px: SAME padding of the stride-2 layers is (0, 1)
    assert info["max_abs_diff"] <= 1e-5
    assert info["workaround_layers"] == ["conv_preds"]
    x = np.random.default_rng(3).standard_normal((3, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(m2.predict(x, verbose=0), mobilenet.predict(x, verbose=0), atol=1e-5)

    stock = xnnpack_sparse_report(_tflite(mobilenet, tmp_path / "stock.tflite"))
    assert not stock.attrs["sparse_path"]
    assert not _no_same_stride2(stock)

    path = _tflite(m2, tmp_path / "rw.tflite")
    df = xnnpack_sparse_report(path)
    assert _no_same_stride2(df)
    assert df.attrs["sparse_path"], df.attrs["reason"]
    assert df.attrs["hazards"] == []
    assert df.attrs["zero_fraction_1x1"] > 2 / 3
    assert {"op", "sparse_path", "reason", "hazard"} <= set(df.columns)
    # TFLite (host, dense path) agrees with Keras
    x1 = x[:1]
    np.testing.assert_allclose(_run_tflite(path, x1), mobilenet.predict(x1, verbose=0), atol=1e-4)


def test_report_flags_head_conv_hazard(mobilenet, tmp_path):
    m_bad = rewrite_for_xnnpack_sparse(mobilenet, apply_sparse_path_workaround=False)
    df = xnnpack_sparse_report(_tflite(m_bad, tmp_path / "bad.tflite"))
    assert df.attrs["sparse_path"]
    assert len(df.attrs["hazards"]) == 1
    assert df.loc[df.attrs["hazards"][0], "op"] == "CONV_2D"


def test_report_density_threshold(tmp_path):
    keras.utils.set_random_seed(1)
    m = keras.applications.MobileNet(input_shape=(64, 64, 3), alpha=0.25, weights=None)
    _prune(m, sparsity=0.5)
    df = xnnpack_sparse_report(_tflite(rewrite_for_xnnpack_sparse(m), tmp_path / "half.tflite"))
    assert not df.attrs["sparse_path"]
    assert "zeros" in df.attrs["reason"]


def test_rewrite_odd_input_and_residual_and_flatten():
    # odd input: SAME is symmetric, no flip needed; Add + Flatten tail
    keras.utils.set_random_seed(2)
    for px in (33, 32):
        inp = keras.Input((px, px, 3))
        x = L.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inp)
        y = L.DepthwiseConv2D(3, padding="same")(x)
        y = L.Conv2D(8, 1)(y)
        x = L.Add()([x, y])
        x = L.DepthwiseConv2D(3, strides=2, padding="same")(x)
        x = L.MaxPooling2D(2, padding="same")(x)
        out = L.Dense(4)(L.Flatten()(x))
        m = keras.Model(inp, out)
        m2, info = rewrite_for_xnnpack_sparse(m, return_info=True)
        assert info["flipped"]  # 32: even sizes; 33: the stride-2 pool sees 9 (pad (0, 1))
        assert info["max_abs_diff"] <= 1e-5
        m3 = keras.Model(inp, x)
        m4, info = rewrite_for_xnnpack_sparse(m3, return_info=True)
        assert info["max_abs_diff"] <= 1e-5


def test_rewrite_odd_sizes_need_no_flip():
    inp = keras.Input((33, 33, 3))
    x = L.Conv2D(8, 3, strides=2, padding="same")(inp)     # 33 -> 17, SAME (1, 1)
    x = L.DepthwiseConv2D(3, strides=2, padding="same")(x)  # 17 -> 9,  SAME (1, 1)
    m = keras.Model(inp, L.GlobalAveragePooling2D()(x))
    m2, info = rewrite_for_xnnpack_sparse(m, return_info=True)
    assert not info["flipped"]
    assert info["max_abs_diff"] <= 1e-5


def test_rewrite_sequential_dense_only():
    m = keras.Sequential([keras.Input((16,)), L.Dense(8, activation="relu"), L.Dense(3)])
    m2, info = rewrite_for_xnnpack_sparse(m, return_info=True)
    assert not info["flipped"]
    x = np.ones((2, 16), "float32")
    np.testing.assert_allclose(m2.predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-6)
