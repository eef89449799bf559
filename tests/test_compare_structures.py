"""Structured sparsity in scripts/compare.py and scripts/train.py: grid, run ids, CSV, masks, FLOPs, errors."""

import json
import os

import keras
import numpy as np
import pandas as pd
import pytest

import compare  # scripts/ is on sys.path (tests/conftest.py)
import train
from rigl_harness import comparison, runner

TINY = ["--dataset", "synthetic", "--model", "mlp", "--epochs", "1", "--sparsities", "0.9", "--seeds", "0",
        "--update-freq", "2", "--no-progress", "--no-tflite"]


@pytest.fixture
def no_training(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(runner, "_train_keras", boom)
    monkeypatch.setattr(runner, "_train_prune", boom)
    monkeypatch.setattr(comparison, "run_job", boom)


# ------------------------------------------------------------------ grid and run ids
def test_unstructured_run_ids_are_unchanged():
    # the id of the existing results/mnist5k_cnn rows: structured runs must not change it
    args = compare.build_parser().parse_args([])
    job = comparison.Job("rigl", 0.9, 0, 1.0)
    assert job.run_id(args) == "mnist5k|cnn|e10|b64|lr0.05|dt50|df0.3|erk|rigl|s0.9|x1|seed0"
    assert args.structures == ["none"]
    jobs = comparison.grid(["dense", "rigl"], [0.9], [0], [1.0], args.structures)
    assert [j.run_id(args) for j in jobs] == [
        "mnist5k|cnn|e10|b64|lr0.05|dt50|df0.3|erk|dense|s0|x1|seed0",
        "mnist5k|cnn|e10|b64|lr0.05|dt50|df0.3|erk|rigl|s0.9|x1|seed0",
    ]


def test_grid_has_one_row_per_structure_for_sparse_methods_only():
    args = compare.build_parser().parse_args(["--structures", "none,1X4,2:4,fan_in", "--model", "mlp"])
    assert args.structures == ["none", "1x4", "2:4", "fan_in"]  # canonical spellings
    jobs = comparison.grid(["dense", "dense_flops", "small_dense", "static", "rigl", "prune"], [0.9], [0], [1.0],
                           args.structures)
    ids = [j.run_id(args) for j in jobs]
    assert len(ids) == len(set(ids))
    prefix = "mnist5k|mlp|e10|b64|lr0.05|dt50|df0.3|erk|"
    for method in ("static", "rigl"):
        assert prefix + f"{method}|s0.9|x1|seed0" in ids
        for spec in ("1x4", "2:4", "fan_in"):
            assert prefix + f"{method}@{spec}|s0.9|x1|seed0" in ids
    # the baselines and TFMOT pruning run once, unstructured
    for method in ("dense_flops", "small_dense", "prune"):
        assert [j.structure for j in jobs if j.method == method] == ["none"]
    assert len(jobs) == 1 + 2 + 2 * 4 + 1


@pytest.mark.parametrize("script", ["compare", "train"])
def test_unknown_structure_exits_2_naming_the_accepted_forms(no_training, capsys, tmp_path, script):
    flag = "--structures" if script == "compare" else "--structure"
    main = compare.main if script == "compare" else train.main
    with pytest.raises(SystemExit) as exc:
        main(["--dataset", "synthetic", flag, "none,3x3" if script == "compare" else "3x3", "--out", str(tmp_path)])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    for form in ("none", "1x4", "2:4", "fan_in", "3x3"):
        assert form in last, last


def test_prune_with_structures_runs_unstructured_only_and_says_so(no_training, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "check_tfmot", lambda: None)
    args, _, notes = compare.prepare(TINY + ["--methods", "prune,rigl", "--structures", "1x4",
                                             "--out", str(tmp_path)])
    assert any("prune" in n and "unstructured" in n for n in notes), notes
    jobs = comparison.grid(args.methods, args.sparsities, args.seeds, args.multipliers, args.structures)
    assert sorted((j.method, j.structure) for j in jobs) == [("prune", "none"), ("rigl", "1x4")]


@pytest.mark.parametrize("method", ["prune", "dense"])
def test_train_refuses_a_structure_without_sparse_training(no_training, capsys, tmp_path, method):
    with pytest.raises(SystemExit) as exc:
        train.main(["--dataset", "synthetic", "--method", method, "--structure", "2:4", "--out", str(tmp_path)])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--structure" in last and "rigl" in last


# ------------------------------------------------------------------ layers the structure cannot take
@pytest.mark.parametrize("spec, left_dense", [("1x4", ["conv1"]), ("2:4", ["conv1"]), ("fan_in", []),
                                              ("none", [])])
def test_structure_exclusions_ask_the_structure(spec, left_dense):
    from rigl_harness import zoo

    model = zoo.build_model("cnn", (8, 8, 1), 10)
    found = runner.structure_exclusions(model, spec)
    assert sorted(found) == left_dense
    for name in left_dense:  # the reason is the library's own message
        assert "(3, 3, 1, 16)" in found[name]


@pytest.mark.parametrize("spec, left_dense", [("1x16", []), ("1x4", []), ("2:4", []),
                                              ("1x400", ["fc2", "logits"])])
def test_structure_exclusions_of_the_mlp(spec, left_dense):
    """1xk takes inputs that are not a multiple of k (300 and 100 under 1x16: a shorter last block; 784 under
    1x400: one block of 400 and one of 384), not fewer inputs than k (300 and 100 under 1x400)."""
    from rigl_harness import zoo

    model = zoo.build_model("mlp", (28, 28, 1), 10)
    assert sorted(runner.structure_exclusions(model, spec)) == left_dense


# ------------------------------------------------------------------ a trained structured run
def test_train_structure_1x4_cnn_masks_hold_and_counts_are_right(tmp_path, capsys):
    result = train.main(["--dataset", "synthetic", "--model", "cnn", "--epochs", "1", "--update-freq", "2",
                         "--structure", "1x4", "--out", str(tmp_path), "--run-name", "run", "--quiet", "--no-tflite"])
    printed = capsys.readouterr().out
    assert "conv1" in printed and "left dense" in printed and "remaining" in printed
    assert result["structure"] == "1x4" and result["dense_layers"] == ["conv1"]
    assert result["mask_updates"] == 3
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["structure"] == "1x4" and metrics["config"]["structure"] == "1x4"
    assert metrics["dense_layers"] == ["conv1"]

    import keras_rigl

    model = keras.models.load_model(tmp_path / "run" / "model.keras")
    masked = {layer.layer.name: layer for layer in keras_rigl.masked_layers(model)}
    assert sorted(masked) == ["conv2", "conv3", "fc1", "logits"]  # conv1 (1 input channel) stays dense
    active = {}
    for name, layer in masked.items():
        mask = np.asarray(layer.get_masks()["kernel"], dtype=bool)
        rows = np.moveaxis(mask, -1, -2).reshape(-1, mask.shape[-2])
        blocks = rows.reshape(rows.shape[0], -1, 4)
        assert (blocks.all(axis=-1) == blocks.any(axis=-1)).all(), name  # whole blocks of 4 inputs
        active[name] = int(mask.sum())
    sizes = {"conv2": 3 * 3 * 16 * 32, "conv3": 3 * 3 * 32 * 64, "fc1": 256 * 64, "logits": 64 * 10}
    # the 0.9 target applies to the masked (remaining) layers, exact up to whole blocks
    assert sum(active.values()) == round(0.1 * sum(sizes.values()) / 4) * 4
    assert result["sparsity"] == pytest.approx(1 - sum(active.values()) / sum(sizes.values()), abs=1e-9)
    conv1 = 3 * 3 * 1 * 16
    assert result["sparsity_all_kernels"] == pytest.approx(
        1 - (sum(active.values()) + conv1) / (sum(sizes.values()) + conv1), abs=1e-9)
    # forward FLOPs by hand: 2 x active x output positions (8x8 -> 4x4 -> 2x2 maps), conv1 dense
    expected = 2 * (conv1 * 64 + active["conv2"] * 16 + active["conv3"] * 4 + active["fc1"] + active["logits"])
    assert result["inference_flops"] == expected
    assert result["f_dense"] == 2 * (conv1 * 64 + sizes["conv2"] * 16 + sizes["conv3"] * 4 + sizes["fc1"]
                                     + sizes["logits"])
    # RigL's training FLOPs: 3 f_S per example plus (f_D - f_S) on the 3 update steps
    examples = result["steps"] * 64
    assert result["train_flops"] == 3 * expected * examples + (result["f_dense"] - expected) * 3 * 64


def test_train_unstructured_layers_keep_conv1_sparse_and_the_rest_in_blocks(tmp_path, capsys):
    result = train.main(["--dataset", "synthetic", "--model", "cnn", "--epochs", "1", "--update-freq", "2",
                         "--structure", "1x4", "--unstructured-layers", "conv1,fc1", "--out", str(tmp_path),
                         "--quiet", "--no-tflite"])
    assert result["run"] == "synthetic_cnn_rigl_1x4_plain-conv1-fc1_s0.9_seed0"
    assert result["dense_layers"] == [] and result["unstructured_layers"] == ["conv1", "fc1"]
    assert result["mask_updates"] == 3
    import keras_rigl

    model = keras.models.load_model(tmp_path / result["run"] / "model.keras")
    specs = {layer.layer.name: layer.structure.spec for layer in keras_rigl.masked_layers(model)}
    assert specs == {"conv1": "unstructured", "conv2": "1x4", "conv3": "1x4", "fc1": "unstructured",
                     "logits": "1x4"}


def test_unstructured_layers_without_a_structure_exit_2_naming_the_fix(no_training, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        train.main(["--dataset", "synthetic", "--unstructured-layers", "fc1", "--out", str(tmp_path)])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--unstructured-layers fc1" in last and "--structure" in last


def test_unstructured_layers_naming_no_layer_exit_2_before_training(no_training, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        train.main(["--dataset", "synthetic", "--model", "mlp", "--structure", "2:4",
                    "--unstructured-layers", "fc1,fc9", "--out", str(tmp_path)])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    # names the wrong layer only, and the layers it could have meant
    assert "fc9" in last and "fc1," not in last.split("layers with weights")[0]
    assert "layers with weights: fc1, fc2, logits" in last
    assert not any(tmp_path.iterdir())  # no run folder was started


def test_compare_unstructured_layers_go_with_the_structured_jobs_only():
    args = compare.build_parser().parse_args(["--model", "mlp", "--structures", "none,2:4",
                                              "--unstructured-layers", "fc1,fc2,fc1"])
    assert args.unstructured_layers == ("fc1", "fc2")
    jobs = comparison.grid(["dense", "static", "rigl"], [0.9], [0], [1.0], args.structures,
                           args.unstructured_layers)
    prefix = "mnist5k|mlp|e10|b64|lr0.05|dt50|df0.3|erk|"
    assert [j.run_id(args) for j in jobs] == [prefix + p + "|x1|seed0" for p in (
        "dense|s0", "static|s0.9", "static@2:4+plain-fc1-fc2|s0.9", "rigl|s0.9", "rigl@2:4+plain-fc1-fc2|s0.9")]
    assert [j.unstructured_layers for j in jobs] == [(), (), ("fc1", "fc2"), (), ("fc1", "fc2")]


@pytest.mark.parametrize("extra,expected", [
    (["--structures", "none"], ["--unstructured-layers fc1", "--structures"]),
    (["--structures", "2:4", "--unstructured-layers", "fc1,fc9"],
     ["--unstructured-layers fc9", "layers with weights: fc1, fc2, logits"]),
])
def test_compare_unstructured_layers_errors_exit_2_before_training(no_training, capsys, tmp_path, extra, expected):
    argv = ["--dataset", "synthetic", "--model", "mlp", "--out", str(tmp_path / "cmp")] + extra
    if "--unstructured-layers" not in extra:
        argv += ["--unstructured-layers", "fc1"]
    with pytest.raises(SystemExit) as exc:
        compare.main(argv)
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert all(part in last for part in expected), last
    assert not (tmp_path / "cmp").exists()


def test_compare_unstructured_layers_train_fc1_unstructured_and_have_their_own_row(tmp_path, monkeypatch):
    import keras_rigl

    specs = []
    real_sparsify = keras_rigl.sparsify

    def spy(*args, **kwargs):
        model = real_sparsify(*args, **kwargs)
        specs.append({layer.layer.name: layer.structure.spec for layer in keras_rigl.masked_layers(model)})
        return model

    monkeypatch.setattr(keras_rigl, "sparsify", spy)
    out = tmp_path / "cmp"
    result = compare.main(TINY + ["--methods", "rigl", "--structures", "2:4", "--unstructured-layers", "fc1",
                                  "--out", str(out)])
    assert specs == [{"fc1": "unstructured", "fc2": "2:4", "logits": "2:4"}]
    df = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert list(df.columns) == comparison.COLUMNS
    row = df.iloc[0]
    assert row["run_id"].endswith("|rigl@2:4+plain-fc1|s0.9|x1|seed0")
    assert (row["structure"], row["unstructured_layers"], row["dense_layers"]) == ("2:4", "fc1", "")
    assert float(row["sparsity_actual"]) == pytest.approx(0.9, abs=2e-3)
    assert list(result["summary"]["structure"]) == ["2:4, fc1 unstructured"]
    assert "| RigL (2:4, fc1 unstructured) | 0.9 | 1× | 1 |" in (out / "summary.md").read_text()


def _plan_cnn_1x4(monkeypatch, tmp_path, extra=()):
    """compare.py's planning of one CNN RigL 1x4 run, stopped at the run: the configs it would train."""
    rows = []

    def fake_run(cfg, data=None):
        rows.append(cfg)
        raise SystemExit(0)  # stop at the first run: only the planning is under test

    monkeypatch.setattr(comparison, "run", fake_run)
    with pytest.raises(SystemExit):
        compare.main(["--dataset", "synthetic", "--model", "cnn", "--epochs", "1", "--seeds", "0",
                      "--sparsities", "0.9", "--methods", "rigl", "--structures", "1x4", "--no-progress",
                      "--out", str(tmp_path), *extra])
    return rows


def test_compare_cnn_conv1_unstructured_is_not_reported_left_dense(tmp_path, capsys, monkeypatch):
    rows = _plan_cnn_1x4(monkeypatch, tmp_path, ["--unstructured-layers", "conv1"])
    printed = capsys.readouterr().out
    assert "left dense" not in printed, printed
    assert (rows[0].structure, rows[0].unstructured_layers) == ("1x4", ("conv1",))


# ------------------------------------------------------------------ compare.py end to end
def test_compare_structures_rows_csv_summary_and_old_csv(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    out.mkdir()
    # a results.csv written before the structure column existed: its row must be reused, not rerun
    args = compare.build_parser().parse_args(TINY + ["--out", str(out)])
    old_id = comparison.Job("rigl", 0.9, 0, 1.0).run_id(args)
    old_columns = [c for c in comparison.COLUMNS
                   if c not in ("structure", "unstructured_layers", "sparsity_all_kernels", "dense_layers")]
    old = {c: np.nan for c in old_columns}
    old.update(run_id=old_id, dataset="synthetic", model="mlp", method="rigl", sparsity=0.9, seed=0,
               multiplier=1.0, epochs=1, steps=8, batch_size=64, width=1.0, accuracy=0.5, loss=1.0,
               train_flops=1.0, inference_flops=1.0, f_dense=2.0, params=10, params_total=100,
               sparsity_actual=0.9, wall_time_s=1.0, mask_updates=0, status="ok")
    pd.DataFrame([old], columns=old_columns).to_csv(out / "results.csv", index=False)

    ran = []
    real = comparison.run_job
    monkeypatch.setattr(comparison, "run_job", lambda job, *a: ran.append((job.method, job.structure))
                        or real(job, *a))
    result = compare.main(TINY + ["--methods", "rigl", "--structures", "none,2:4", "--out", str(out)])
    assert ran == [("rigl", "2:4")]  # the old unstructured row is reused
    df = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert list(df.columns) == comparison.COLUMNS
    by_id = df.set_index("run_id")
    assert by_id.loc[old_id, "structure"] == "none" and by_id.loc[old_id, "accuracy"] == 0.5
    structured = by_id.loc[old_id.replace("|rigl|", "|rigl@2:4|")]
    assert structured["structure"] == "2:4" and structured["method"] == "rigl"
    assert structured["dense_layers"] == ""  # the MLP's layers all take 2:4
    assert float(structured["sparsity_actual"]) == pytest.approx(0.9, abs=2e-3)
    summary = result["summary"]
    assert list(zip(summary["method"], summary["structure"])) == [("rigl", "none"), ("rigl", "2:4")]
    md = (out / "summary.md").read_text()
    assert "| RigL (2:4) | 0.9 | 1× | 1 |" in md and "| RigL | 0.9 | 1× | 1 | 50.00 |" in md, md
    assert (out / "summary.csv").stat().st_size > 0 and (out / "accuracy_vs_sparsity.png").stat().st_size > 0


def test_compare_cnn_structure_prints_the_layers_left_dense(tmp_path, capsys, monkeypatch):
    rows = _plan_cnn_1x4(monkeypatch, tmp_path)
    printed = capsys.readouterr().out
    line = [ln for ln in printed.splitlines() if "1x4" in ln and "conv1" in ln]
    assert len(line) == 1 and "left dense" in line[0] and "remaining" in line[0], printed
    assert rows[0].structure == "1x4"


@pytest.mark.parametrize("spec,part", [("1x4", "_1x4_"), ("2:4", "_2of4_"), ("fan_in", "_fan_in_"),
                                       ("fan_in(unit_sparsity=0.5)", "_fan_in-unit_sparsity-0.5_"),
                                       ("fan_in(0.2,unit_sparsity=0.25)", "_fan_in-0.2-unit_sparsity-0.25_")])
def test_default_run_names_are_plain_folder_names(spec, part):
    name = runner.Config(method="rigl", structure=spec).default_run_name()
    assert part in name and name == f"mnist5k_cnn_rigl{part}s0.9_seed0"
    assert all(c.isalnum() or c in "._-" for c in name), name
