"""Block-sparse TFLite export: 1x4 (float) and 1x16 (int8) Dense masks reach TFLite's sparse FC kernels."""

import math
import os
import warnings

import keras
import numpy as np
import pytest

import keras_rigl
from conftest import load_script
from keras_rigl.tflite import export_tflite, read_tflite_model, tflite_predict
from keras_rigl.tflite.flatbuffer import op_name, sparsity_info, tflite_tensor_values
from keras_rigl.tflite.structured import (
    block_sparse_layers,
    fully_connected_ops,
    kernel_block_size,
    xnnpack_misread_ops,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def block_mask(shape, k, density, rng):
    """Random 1xk block mask of a Keras kernel (inputs, outputs): k consecutive inputs of one output unit."""
    n_in, n_out = shape
    blocks = np.zeros((-(-n_in // k)) * n_out, bool)
    blocks[rng.permutation(blocks.size)[:int(round(density * blocks.size))]] = True
    return np.repeat(blocks.reshape(-1, n_out), k, axis=0)[:n_in]


def masked_mlp(k, density=0.1, sizes=(64, 48, 32), classes=10, seed=0, structured_logits=True):
    """An MLP whose Dense kernels get 1xk block masks (k=1: unstructured), dense weights kept where on."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((sizes[0],))
    h = inp
    for units in sizes[1:]:
        h = keras.layers.Dense(units, activation="relu")(h)
    out = keras.layers.Dense(classes)(h)
    sparse = keras_rigl.sparsify(keras.Model(inp, out), 0.0)  # all-ones masks, the dense weights kept
    rng = np.random.default_rng(seed)
    layers = keras_rigl.masked_layers(sparse)
    for index, layer in enumerate(layers):
        shape = tuple(layer.get_masks()["kernel"].shape)
        kk = k if (structured_logits or index < len(layers) - 1) else 1
        layer.set_masks({"kernel": block_mask(shape, kk, density, rng)})
    return sparse


def _inputs(model, n=32, seed=1):
    return np.random.default_rng(seed).random((n,) + tuple(model.inputs[0].shape[1:]), dtype=np.float32)


def _fc_weights(path):
    """[(weight tensor, its sparsity info, whether a DENSIFY op feeds the FC)] of every FULLY_CONNECTED op."""
    model, raw = read_tflite_model(path)
    graph = model.subgraphs[0]
    makers = {int(t): op for op in graph.operators for t in op.outputs}
    out = []
    for op in graph.operators:
        if op_name(model, op) != "FULLY_CONNECTED":
            continue
        index, densify = int(op.inputs[1]), False
        if index in makers and op_name(model, makers[index]) == "DENSIFY":
            index, densify = int(makers[index].inputs[0]), True
        out.append((index, sparsity_info(graph.tensors[index]), densify))
    return model, raw, out


def _kernels(model):
    return [keras.ops.convert_to_numpy(layer.masked_weights[0].weight) for layer in keras_rigl.masked_layers(model)]


# ------------------------------------------------------------ block sizes ---
def test_kernel_block_size_reads_blocks_along_the_input_axis():
    rng = np.random.default_rng(0)
    assert kernel_block_size(block_mask((64, 8), 16, 0.3, rng)) == 16
    assert kernel_block_size(block_mask((64, 8), 4, 0.3, rng)) in (4, 8, 16)
    four = np.zeros((8, 2), bool)
    four[0:4, 0] = True
    four[4:8, 1] = True
    assert kernel_block_size(four) == 4
    # blocks along the *output* axis are not input blocks
    assert kernel_block_size(four.T.copy()) == 1
    # a block that starts off the 4-grid is not a 1x4 block
    shifted = np.zeros((8, 1), bool)
    shifted[2:6, 0] = True
    assert kernel_block_size(shifted) == 2
    # inputs not a multiple of k: the last, shorter group is one block
    partial = np.zeros((10, 1), bool)
    partial[8:10, 0] = True
    assert kernel_block_size(partial, candidates=(4,)) == 4
    partial[9, 0] = False
    assert kernel_block_size(partial, candidates=(4,)) == 1


# ------------------------------------------------------------- float 1x4 ---
def test_1x4_masks_export_block_sparse_fc_that_matches_keras(tmp_path):
    sparse = masked_mlp(4)
    path = tmp_path / "m.tflite"
    report = export_tflite(sparse, path)
    model, raw, weights = _fc_weights(path)
    assert len(weights) == 3
    for (index, info, densify), kernel in zip(weights, _kernels(sparse)):
        assert info is not None and not densify
        assert info["block_map"] == [1] and info["block_size"] == [4]  # 1x4: 4 inputs of one output
        assert info["block_shape"] == [1, 4]
        np.testing.assert_array_equal(tflite_tensor_values(model, index, raw=raw), kernel.T)
    ops = fully_connected_ops(path)
    assert ops["kernel"].tolist() == ["sparse FC 1x4 (float)"] * 3
    table = report.attrs["block_sparse"]
    assert [row["file_block"] for row in table] == ["1x4"] * 3
    assert [row["mask_block"] % 4 for row in table] == [0, 0, 0]
    assert report.attrs["xnnpack_delegate"] == "ok"
    x = _inputs(sparse)
    parity = keras_rigl.tflite_parity(sparse, path, x)
    assert parity["agreement"] == 1.0 and parity["max_abs_diff"] < 1e-5
    builtin = tflite_predict(path, x, use_xnnpack=False)
    np.testing.assert_allclose(builtin, sparse.predict(x, verbose=0), atol=1e-5)


def test_unstructured_masks_still_export_csr_with_densify(tmp_path):
    sparse = masked_mlp(1, density=0.2)
    path = tmp_path / "u.tflite"
    report = export_tflite(sparse, path)
    _, _, weights = _fc_weights(path)
    assert all(info is not None and not info["block_size"] and densify for _, info, densify in weights)
    table = report.attrs["block_sparse"]
    assert [row["file_block"] for row in table] == ["", "", ""]
    assert all("needs 1x4 blocks" in row["note"] for row in table)
    parity = keras_rigl.tflite_parity(sparse, path, _inputs(sparse))
    assert parity["agreement"] == 1.0 and parity["max_abs_diff"] < 1e-5


def test_1x4_masks_with_int8_stay_densified_and_say_why(tmp_path):
    sparse = masked_mlp(4, structured_logits=True)
    path = tmp_path / "q.tflite"
    x = _inputs(sparse, 64)
    report = export_tflite(sparse, path, quantize="int8", representative_data=x)
    notes = [row["note"] for row in report.attrs["block_sparse"] if not row["file_block"]]
    assert notes and all("1x16" in note for note in notes)


def test_model_without_masks_exports_as_before(tmp_path):
    keras.utils.set_random_seed(0)
    inp = keras.Input((16,))
    model = keras.Model(inp, keras.layers.Dense(4)(inp))
    report = export_tflite(model, tmp_path / "plain.tflite")
    assert "block_sparse" not in report.attrs
    assert (report["format"] == "dense").all()


def test_sparsify_structure_masks_reach_the_sparse_fc_kernels(tmp_path):
    """keras_rigl.sparsify(..., structure="1x4" / "1x16") masks -> block-sparse FC weights in the file."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((64,))
    h = keras.layers.Dense(48, activation="relu", name="fc1")(inp)
    model = keras.Model(inp, keras.layers.Dense(16, name="fc2")(h))
    x = _inputs(model, 32)
    for structure, quantize, kernel in (("1x4", None, "sparse FC 1x4 (float)"),
                                        ("1x16", "int8", "sparse FC 1x16 (int8)")):
        sparse = keras_rigl.sparsify(model, 0.9, structure=structure, seed=0)
        path = tmp_path / f"{structure}.tflite"
        report = export_tflite(sparse, path, quantize=quantize, representative_data=x if quantize else None)
        ops = fully_connected_ops(path)
        blocked = ops[ops["block"] != ""]
        assert len(blocked) >= 1 and set(blocked["kernel"]) == {kernel}
        assert set(blocked["block_size"]) == {int(structure[2:])}
        rows = [row for row in report.attrs["block_sparse"] if row["file_block"]]
        assert rows and all(row["mask_block"] % int(structure[2:]) == 0 for row in rows)
        parity = keras_rigl.tflite_parity(sparse, path, x)
        assert parity["agreement"] >= (1.0 if quantize is None else 0.9)


# ------------------------------------------------------------- int8 1x16 ---
def test_int8_1x16_masks_export_block_sparse_fc(tmp_path):
    sparse = masked_mlp(16, sizes=(64, 48, 32))
    x = _inputs(sparse, 64)
    paths = {name: tmp_path / f"{name}.tflite" for name in ("sparse", "dense")}
    report = export_tflite(sparse, paths["sparse"], quantize="int8", representative_data=x)
    export_tflite(sparse, paths["dense"], quantize="int8", representative_data=x, sparse=False)
    _, _, weights = _fc_weights(paths["sparse"])
    for _, info, densify in weights[:2]:  # 64 and 48 inputs: multiples of 16
        assert info["block_size"] == [16] and info["block_map"] == [1] and not densify
    assert fully_connected_ops(paths["sparse"])["kernel"].tolist()[:2] == ["sparse FC 1x16 (int8)"] * 2
    assert [row["file_block"] for row in report.attrs["block_sparse"]][:2] == ["1x16", "1x16"]
    # Same int8 weights, same arithmetic: the sparse kernel and the dense int8 kernel may differ only in
    # rounding, at most one output quantization step per value.
    out_scale = _output_scale(paths["sparse"])
    sparse_out = tflite_predict(paths["sparse"], x, use_xnnpack=False)
    dense_out = tflite_predict(paths["dense"], x, use_xnnpack=False)
    assert np.max(np.abs(sparse_out - dense_out)) <= out_scale * 1.001
    # Against Keras: int8 quantization of weights and activations; bound 3 % of the output range.
    keras_out = sparse.predict(x, verbose=0)
    assert np.max(np.abs(sparse_out - keras_out)) <= 0.03 * np.ptp(keras_out)


def _output_scale(path):
    from keras_rigl.tflite import make_interpreter

    interpreter = make_interpreter(os.fspath(path), use_xnnpack=False)
    return float(interpreter.get_output_details()[0]["quantization"][0])


def test_dynamic_1x16_file_runs_without_xnnpack_and_matches_keras(tmp_path):
    """XNNPACK reads block-sparse dynamic-range weights as dense: wrong outputs or a bus error (litert 2.3)."""
    sparse = masked_mlp(16, sizes=(64, 48, 32))
    path = tmp_path / "d.tflite"
    report = export_tflite(sparse, path, quantize="dynamic")
    assert report.attrs["xnnpack_delegate"].startswith("refused: XNNPACK misreads")
    assert xnnpack_misread_ops(path)
    assert [row["file_block"] for row in report.attrs["block_sparse"]][:2] == ["1x16", "1x16"]
    x = _inputs(sparse)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = tflite_predict(path, x)  # XNNPACK asked for (the default): must not be used
    assert any("without XNNPACK" in str(w.message) for w in caught)
    keras_out = sparse.predict(x, verbose=0)
    # dynamic range: int8 weights (per-channel) and inputs quantized per batch row; bound 2 % of the range
    assert np.max(np.abs(out - keras_out)) <= 0.02 * np.ptp(keras_out)
    with pytest.raises(RuntimeError, match="use_xnnpack=False"):
        tflite_predict(path, x, fallback=False)


# -------------------------------------------------------------- benchmark ---
def _load_benchmark():
    return load_script("benchmarks/structured_speed.py")


def test_benchmark_masks_have_their_structure():
    bench = _load_benchmark()
    rng = np.random.default_rng(0)
    mask = bench.block_mask((3, 3, 32, 8), 4, 0.25, rng)
    assert kernel_block_size(mask) % 4 == 0 and math.isclose(mask.mean(), 0.25, abs_tol=0.01)
    nm = bench.n_of_m_mask((32, 8), 2, 4, rng)
    assert (nm.reshape(8, 4, 8).sum(axis=1) == 2).all()
    assert not hasattr(bench, "fan_in_mask")  # fan_in masks come from keras_rigl.sparsify now


def test_benchmark_quick_run(tmp_path, capsys):
    bench = _load_benchmark()
    rows = bench.main(["--quick", "--models", "lenet", "--structures", "1x4", "--invokes", "1",
                       "--parity-samples", "8", "--workdir", str(tmp_path), "--csv", str(tmp_path / "r.csv")])
    assert [r["xnnpack"] for r in rows] == ["on", "off"]
    for r in rows:
        assert r["structure"] == "1x4" and r["sparsity"] == 0.9
        assert r["agreement"] == 1.0 and r["max_abs_diff"] < 1e-5
        assert r["sparse_fc_layers"].split("/")[0] != "0"
        assert r["sparse_median_ms"] > 0 and r["dense_median_ms"] > 0
        assert r["condensed_median_ms"] is None and r["units_kept"] == "n/a"  # fan_in only
    assert (tmp_path / "r.csv").exists()
    assert "ratio med" in capsys.readouterr().out


def test_benchmark_bad_arguments_exit_2():
    bench = _load_benchmark()
    for argv in (["--repeats", "3"], ["--models", "resnet"], ["--sparsities", "1.5"], ["--structures", "3:4"]):
        with pytest.raises(SystemExit) as exc:
            bench.parse_args(argv)
        assert exc.value.code == 2


@pytest.mark.parametrize("quantize", ["int8", "dynamic"])
def test_int8_1x16_with_inputs_not_a_multiple_of_16_keeps_every_input(quantize, tmp_path):
    """The converter drops the inputs of a partial int8 1x16 block (40 inputs: 32..39); export pads them."""
    sparse = masked_mlp(16, density=0.3, sizes=(64, 40, 32))  # second Dense: 40 inputs = 2.5 blocks
    x = _inputs(sparse, 64)
    calib = x if quantize == "int8" else None
    paths = {name: tmp_path / f"{name}.tflite" for name in ("sparse", "dense")}
    report = export_tflite(sparse, paths["sparse"], quantize=quantize, representative_data=calib)
    export_tflite(sparse, paths["dense"], quantize=quantize, representative_data=calib, sparse=False)
    ops = fully_connected_ops(paths["sparse"])
    assert ops["block"].tolist()[:2] == ["1x16", "1x16"]
    assert ops["shape"].tolist()[1] == (32, 48)  # 40 inputs padded with 8 zero features
    assert [row["file_block"] for row in report.attrs["block_sparse"]][:2] == ["1x16", "1x16"]
    sparse_out = tflite_predict(paths["sparse"], x, use_xnnpack=False)
    dense_out = tflite_predict(paths["dense"], x, use_xnnpack=False)
    keras_out = sparse.predict(x, verbose=0)
    # the dense file of the same weights is the reference for the quantization error
    dense_err = np.max(np.abs(dense_out - keras_out))
    assert np.max(np.abs(sparse_out - keras_out)) <= 1.5 * dense_err + 1e-6


def _expected_ablated(mask, unit_sparsity, at_output):
    """The library's unit target for one mask, capped by what its budget allows (fan_in.ablation_decision)."""
    from keras_rigl import fan_in

    units = mask.shape[-1]
    budget = fan_in.budget(mask.shape, int(mask.sum()))
    min_units = budget // fan_in.dense_fan_in(mask.shape)
    spare = 0 if min_units >= units else units - min_units - 1
    return 0 if at_output else min(fan_in.units_to_ablate(unit_sparsity, None, units), spare)


def _check_fan_in_case(bench, model_name, tmp_path, unit_sparsity=0.5):
    from keras_rigl import fan_in
    from keras_rigl.sparsify import _masked_at_model_output

    csv_path = tmp_path / f"{model_name}.csv"
    rows = bench.main(["--models", model_name, "--structures", "fan_in", "--sparsities", "0.9",
                       "--unit-sparsity", str(unit_sparsity), "--repeats", "7", "--invokes", "1",
                       "--predict-batch", "4", "--predict-calls", "1", "--parity-samples", "8",
                       "--workdir", str(tmp_path), "--csv", str(csv_path)])
    assert [r["xnnpack"] for r in rows] == ["on", "off"]
    # the masks the benchmark timed: the library's, rebuilt here from the same seed
    sparse = bench.sparse_model(bench.build_model(model_name, 0), "fan_in", 0.9, seed=0, unit_sparsity=unit_sparsity)
    layers = keras_rigl.masked_layers(sparse)
    outputs = {id(layer) for layer in _masked_at_model_output(sparse)}  # the logits: never ablated
    ablated_total = 0
    for layer in layers:
        mask = np.asarray(layer.get_masks()["kernel"])
        at_output = id(layer) in outputs
        ablated = int(fan_in.ablated_units(mask).sum())
        assert ablated == _expected_ablated(mask, unit_sparsity, at_output), layer.name
        assert fan_in.holds(mask), layer.name
        ablated_total += ablated
    assert ablated_total > 0
    small, report = keras_rigl.condense(sparse, return_report=True)
    for r in rows:
        assert r["structure"] == "fan_in" and r["unit_sparsity"] == unit_sparsity
        assert r["condensed_agreement"] == 1.0 and r["condensed_max_abs_diff"] <= 1e-4, r
        assert r["condensed_mismatch"] is False
        assert r["params_after"] == report.params_after < r["params_before"] == report.params_before
        assert r["condensed_median_ms"] > 0 and r["condensed_min_ms"] > 0
        np.testing.assert_allclose(r["condensed_ratio_median"], r["condensed_median_ms"] / r["dense_median_ms"])
        assert r["predict_ratio_median"] > 0 and r["predict_ratio_min"] > 0 and r["predict_batch"] == 4
    # units kept per layer: the condense report's, for every layer that lost units or holds ablated ones
    kept = dict(item.rstrip("*").rsplit(" ", 1) for item in rows[0]["units_kept"].split(", "))
    for name, units in report.removed.items():
        k, total = (int(v) for v in kept[name].split("/"))
        assert k == total - len(units), name
    for name in report.kept:
        assert name in kept, name
    import pandas as pd

    df = pd.read_csv(csv_path)
    for column in ("condensed_median_ms", "condensed_ratio_median", "condensed_ratio_min", "predict_ratio_median",
                   "condensed_agreement", "condensed_max_abs_diff", "params_before", "params_after", "units_kept"):
        assert df[column].notna().all(), column
    return rows, report


def test_benchmark_fan_in_condensed_cnn(tmp_path, capsys):
    """fan_in(unit_sparsity=0.5) masks from the library, one SET update: condense removes the units the rule
    ablates, and the condensed TFLite file computes what the stripped sparse model computes."""
    rows, report = _check_fan_in_case(_load_benchmark(), "cnn", tmp_path)
    assert set(report.removed) >= {"conv3", "fc1"}
    out = capsys.readouterr().out
    assert "c/d med" in out and "conv3 32/64" in out


def test_benchmark_fan_in_condensed_mobilenet_v1(tmp_path):
    """MobileNet v1 (~25 s): condense removes pointwise channels through BatchNorm, ReLU and depthwise convs."""
    rows, report = _check_fan_in_case(_load_benchmark(), "mobilenet_v1", tmp_path)
    assert "conv_pw_13" in report.removed and "conv_preds" not in report.removed
    assert rows[0]["params_after"] < 0.6 * rows[0]["params_before"]


@pytest.mark.slow  # ~45 s on a loaded 2-core box (four MobileNetV2 exports): pytest -m slow
def test_benchmark_fan_in_condensed_mobilenet_v2(tmp_path):
    """MobileNetV2: the projections read by a residual Add keep their ablated units (reported), the rest go."""
    rows, report = _check_fan_in_case(_load_benchmark(), "mobilenet_v2", tmp_path)
    assert any("Add" in why for why in report.kept.values())
    assert "Add" in rows[0]["condensed_kept_why"]
    assert rows[0]["params_after"] < 0.6 * rows[0]["params_before"]


# ----------------------------------------- 1x16 on LeNet: partial last blocks ---
def _lenet_300_100():
    inp = keras.Input((784,))
    h = keras.layers.Dense(300, activation="relu", name="fc1")(inp)
    h = keras.layers.Dense(100, activation="relu", name="fc2")(h)
    return keras.Model(inp, keras.layers.Dense(10, name="fc3")(h))


@pytest.mark.parametrize("per_layer, blocked", [(None, ["fc1", "fc2"]), ({"fc3": 0.8}, ["fc1", "fc2", "fc3"])])
def test_sparsify_lenet_1x16_trains_and_exports_int8_block_sparse(tmp_path, per_layer, blocked):
    """structure="1x16" masks LeNet's 300- and 100-input layers (last blocks of 12 and 4 inputs); after RigL
    updates every sparse Dense layer runs on the int8 sparse FC kernel and the file matches Keras."""
    from keras_rigl import structure as S

    keras.utils.set_random_seed(0)
    sparse = keras_rigl.sparsify(_lenet_300_100(), 0.9, structure="1x16", per_layer=per_layer, seed=0)
    masked = {layer.layer.name: layer for layer in keras_rigl.masked_layers(sparse)}
    assert sorted(masked) == ["fc1", "fc2", "fc3"]
    before = {name: int(layer.get_masks()["kernel"].sum()) for name, layer in masked.items()}
    x = _inputs(sparse, 128)
    y = np.random.default_rng(2).integers(0, 10, 128)
    sparse.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = keras_rigl.RigL(update_freq=2)
    sparse.fit(x, y, batch_size=32, epochs=1, callbacks=[callback], verbose=0)
    assert callback.updates["n_moved"].sum() > 0
    for name, layer in masked.items():
        mask = layer.get_masks()["kernel"]
        assert S.Blocks(16).holds(mask) and int(mask.sum()) == before[name], name
        assert (mask.mean() < 0.7) == (name in blocked), name  # the rest is dense under ERK

    path = tmp_path / "lenet16.tflite"
    report = export_tflite(sparse, path, quantize="int8", representative_data=x)
    table = {row["layer"]: row for row in report.attrs["block_sparse"]}
    assert sorted(table) == ["fc1", "fc2", "fc3"]
    for name in blocked:
        assert table[name]["file_block"] == "1x16" and table[name]["kernel"] == "sparse FC 1x16 (int8)", table[name]
        assert table[name]["mask_block"] == 16
    ops = fully_connected_ops(path)
    assert (ops["block"] == "1x16").sum() == len(blocked)
    padded = {(100, 304), (10, 112)}  # 300 and 100 inputs padded to whole blocks of 16
    assert {shape for shape, block in zip(ops["shape"], ops["block"]) if block} >= (padded if "fc3" in blocked
                                                                                   else {(100, 304)})
    parity = keras_rigl.tflite_parity(sparse, path, x)
    assert parity["agreement"] >= 0.9
    # the dense int8 file of the same weights is the reference for the quantization error
    dense_path = tmp_path / "dense.tflite"
    export_tflite(sparse, dense_path, quantize="int8", representative_data=x, sparse=False)
    keras_out = sparse.predict(x, verbose=0)
    sparse_err = np.max(np.abs(tflite_predict(path, x, use_xnnpack=False) - keras_out))
    dense_err = np.max(np.abs(tflite_predict(dense_path, x, use_xnnpack=False) - keras_out))
    assert sparse_err <= 1.5 * dense_err + 1e-6 and sparse_err <= 0.03 * np.ptp(keras_out)
