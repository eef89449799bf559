"""Flatbuffer read-back: formats, thresholds, densify round trip, totals."""

import os

import keras
import numpy as np
import pytest

from keras_rigl.tflite import (
    CONVERTER_MIN_SPARSITY,
    densify_tensor,
    export_tflite,
    format_report,
    read_tflite_model,
    tflite_tensor_values,
    tflite_weight_report,
)


def _zero(kernel, frac, rng):
    k = kernel.copy()
    k[rng.random(k.shape) < frac] = 0.0
    return k


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """One small model whose layers sit on both sides of the converter's rules."""
    keras.backend.clear_session()
    rng = np.random.default_rng(1)
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(16, 3, padding="same", name="conv_sparse")(inp)      # 90 % zeros -> CSR
    x = keras.layers.Conv2D(16, 1, name="conv_below")(x)                        # 20 % zeros -> dense
    x = keras.layers.Conv2D(16, 1, name="conv_above")(x)                        # 40 % zeros -> CSR
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw_dense")(x)     # dense depthwise
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(32, name="fc_block")(x)                               # 1x4 blocks
    out = keras.layers.Dense(10, name="fc_random")(x)                            # random 90 %
    model = keras.Model(inp, out)
    layers = {l.name: l for l in model.layers}
    layers["conv_sparse"].kernel.assign(_zero(layers["conv_sparse"].kernel.numpy(), 0.9, rng))
    # exact zero fractions for the threshold probes
    for name, frac in (("conv_below", 0.2), ("conv_above", 0.4)):
        k = layers[name].kernel.numpy()
        flat = k.reshape(-1)
        flat[rng.permutation(flat.size)[: int(round(frac * flat.size))]] = 0.0
        layers[name].kernel.assign(flat.reshape(k.shape))
    # Dense kernel (in=16, out=32) -> TFLite weights (32, 16); zero 1x4 blocks along `in`.
    k = layers["fc_block"].kernel.numpy()
    keep = rng.random((16 // 4, 32)) < 0.2
    k = k * np.repeat(keep, 4, axis=0)
    layers["fc_block"].kernel.assign(k)
    layers["fc_random"].kernel.assign(_zero(layers["fc_random"].kernel.numpy(), 0.9, rng))
    path = str(tmp_path_factory.mktemp("report") / "probe.tflite")
    report = export_tflite(model, path)
    return model, path, report


# TFLite names fused tensors after whatever op the converter kept (the last
# FC becomes "StatefulPartitionedCall..."), so rows are found by name when it
# survives and by shape otherwise.
_SHAPES = {"fc_random": (10, 32), "fc_block": (32, 16)}


def _row(report, needle):
    w = report[report["role"] == "weight"]
    if needle in _SHAPES:
        rows = w[w["shape"] == _SHAPES[needle]]
    else:
        rows = w[w["name"].str.contains(needle, regex=False)]
    assert len(rows) == 1, (needle, list(report["name"]))
    return rows.iloc[0]


def test_formats_and_threshold_notes(probe):
    model, path, report = probe
    assert CONVERTER_MIN_SPARSITY == pytest.approx(0.3)
    sparse = _row(report, "conv_sparse")
    assert sparse["format"] == "sparse" and sparse["dim_format"] == "D,D,D,CSR"
    assert sparse["densify"] and "DENSIFY" in sparse["note"]
    below = _row(report, "conv_below")
    assert below["format"] == "dense" and "threshold" in below["note"]
    assert _row(report, "conv_above")["format"] == "sparse"
    dw = report[(report["op"] == "DEPTHWISE_CONV_2D") & (report["role"] == "weight")].iloc[0]
    assert dw["format"] == "dense" and "threshold" in dw["note"]
    block = _row(report, "fc_block")
    assert block["format"] == "sparse" and block["block"] == "1x4", block.to_dict()
    assert not block["densify"] and "FULLY_CONNECTED" in block["note"]
    rnd = _row(report, "fc_random")
    assert rnd["format"] == "sparse" and rnd["block"] == "" and rnd["densify"]
    # bytes = values + index arrays, and smaller than dense for the sparse ones
    for row in (sparse, block, rnd):
        assert row["bytes"] < row["dense_bytes"]
        assert row["index_bytes"] > 0
        assert row["nnz"] == row["bytes"] - row["index_bytes"] or row["dtype"] != "float32" or \
            row["nnz"] <= (row["bytes"] - row["index_bytes"]) // 4


def test_densify_round_trip_matches_keras(probe):
    model, path, report = probe
    fb, raw = read_tflite_model(path)
    layers = {l.name: l for l in model.layers}
    for name in ("conv_sparse", "conv_above", "conv_below"):
        got = densify_tensor(fb, raw, int(_row(report, name)["tensor"]))
        want = np.transpose(layers[name].kernel.numpy(), (3, 0, 1, 2))  # HWIO -> OHWI
        np.testing.assert_array_equal(got, want)
    for name in ("fc_block", "fc_random"):
        got = tflite_tensor_values(path, int(_row(report, name)["tensor"]))
        np.testing.assert_array_equal(got, layers[name].kernel.numpy().T)
    dw = report[(report["op"] == "DEPTHWISE_CONV_2D") & (report["role"] == "weight")].iloc[0]
    want = layers["dw_dense"].kernel.numpy()  # (3, 3, 16, 1) -> (1, 3, 3, 16)
    np.testing.assert_array_equal(densify_tensor(fb, raw, int(dw["tensor"])), np.transpose(want, (3, 0, 1, 2)))


def test_totals_and_nnz(probe):
    model, path, report = probe
    t = report.attrs["totals"]
    assert t["file_bytes"] == os.path.getsize(path)
    assert t["const_bytes"] == report["bytes"].sum()
    assert t["sparse_tensors"] == (report["format"] == "sparse").sum() == 4
    assert t["densify_ops"] == 3  # block-sparse FC needs none
    layers = {l.name: l for l in model.layers}
    for name in ("conv_sparse", "conv_above", "fc_block", "fc_random"):
        assert _row(report, name)["nnz"] == np.count_nonzero(layers[name].kernel.numpy())
    text = format_report(report)
    assert "file:" in text and "weights:" in text
    assert "file:" in repr(report)
    # derived frames print as plain DataFrames
    assert "file:" not in repr(report[["name", "bytes"]])


def test_rejects_non_tflite(tmp_path):
    bad = tmp_path / "x.tflite"
    bad.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(ValueError, match="TFL3"):
        tflite_weight_report(str(bad))
