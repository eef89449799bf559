"""scripts/train.py and scripts/compare.py on tiny synthetic data: outputs, schema, resume, errors."""

import json
import os
import sys

import numpy as np
import pandas as pd
import pytest

import compare  # scripts/ is on sys.path (tests/conftest.py)
import train
from rigl_harness import comparison, datasets, runner, zoo


@pytest.fixture
def no_training(monkeypatch):
    """Fail loudly if anything starts training."""

    def boom(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(runner, "_train_keras", boom)
    monkeypatch.setattr(runner, "_train_prune", boom)
    monkeypatch.setattr(comparison, "run_job", boom)


# ---------------------------------------------------------------- train.py
def test_train_writes_everything(tmp_path):
    result = train.main([
        "--dataset", "synthetic", "--epochs", "1", "--update-freq", "2", "--out", str(tmp_path),
        "--run-name", "run", "--quiet",
    ])
    run_dir = tmp_path / "run"
    for name in ("model.keras", "model.tflite", "steps.csv", "epochs.csv", "mask_updates.csv",
                 "sparsity_report.csv", "metrics.json", "curves.png"):
        assert (run_dir / name).stat().st_size > 0, name
    steps = pd.read_csv(run_dir / "steps.csv")
    assert len(steps) == result["steps"] == 8  # 512 examples / 64
    for col in ("loss", "accuracy", "sparsity", "drop_fraction", "itop", "learning_rate"):
        assert col in steps.columns, col
    updates = pd.read_csv(run_dir / "mask_updates.csv")
    assert sorted(updates["step"].unique()) == [2, 4, 6]  # every 2 steps until 0.75 x 8
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert result["tflite_agreement"] == 1.0
    assert 0 < result["train_flops"] < result["train_flops_dense"]
    assert result["inference_flops"] < result["f_dense"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["config"]["method"] == "rigl"


@pytest.mark.parametrize("method", ["dense", "static"])
def test_train_other_methods(tmp_path, method):
    r = runner.run(runner.Config(dataset="synthetic", model="mlp", method=method, epochs=1, save=False,
                               tflite=False, verbose=0))
    assert r["steps"] == 8 and 0.0 <= r["accuracy"] <= 1.0
    if method == "dense":
        assert r["sparsity"] == 0.0 and r["train_flops"] == r["train_flops_dense"]
    else:
        assert r["train_flops"] == pytest.approx(3 * r["inference_flops"] * r["examples"])


def test_train_fixed_steps_and_width():
    r = runner.run(runner.Config(dataset="synthetic", model="mlp", method="dense", steps=3, width=0.5, save=False,
                               tflite=False, verbose=0))
    assert r["steps"] == 3 and r["examples"] == 3 * 64
    assert r["params_total"] < 50_000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sparsity", "1.5"], "--sparsity"),
        (["--method", "magic"], "invalid choice"),
        (["--model", "vgg"], "invalid choice"),
        (["--epochs", "0"], "--epochs"),
        (["--drop-fraction", "0"], "--drop-fraction"),
        (["--multiplier", "-1"], "--multiplier"),
        (["--update-freq", "x"], "--update-freq"),
        (["--dataset", "nope.npz"], "does not exist"),
        (["--dataset", "cifar"], "unknown dataset"),
        (["--method", "rigl", "--sparsity", "0"], r"must be in \(0, 1\)"),
        (["--weights", "missing.weights.h5"], "does not exist"),
    ],
)
def test_train_bad_flags_fail_before_training(no_training, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    assert exc.value.code == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)


def test_train_malformed_npz(no_training, capsys, tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((4, 6, 6)), y_train=np.zeros(4))
    with pytest.raises(SystemExit):
        train.main(["--dataset", str(path)])
    err = capsys.readouterr().err
    assert "lacks arrays" in err and "numpy.savez" in err


def test_prune_without_tfmot_names_the_install(no_training, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_model_optimization", None)
    with pytest.raises(SystemExit):
        train.main(["--dataset", "synthetic", "--method", "prune"])
    assert "pip install -e .[tfmot]" in capsys.readouterr().err


# -------------------------------------------------------------- compare.py
TINY = ["--dataset", "synthetic", "--model", "mlp", "--epochs", "1", "--sparsities", "0.9", "--seeds", "0",
        "--update-freq", "2", "--no-progress"]


def test_compare_tiny_grid_schema_and_resume(tmp_path, monkeypatch):
    out = str(tmp_path / "cmp")
    first = compare.main(TINY + ["--methods", "dense,dense_flops,small_dense,rigl", "--out", out])
    df = pd.read_csv(os.path.join(out, "results.csv"))
    assert list(df.columns) == comparison.COLUMNS
    assert len(df) == 4 and df["run_id"].is_unique and first["ran"] == 4
    assert set(df["method"]) == {"dense", "dense_flops", "small_dense", "rigl"}
    row = df.set_index("method")
    # dense at sparsity 0; the FLOPs-matched dense run takes fewer steps and spends about RigL's FLOPs
    assert row.loc["dense", "sparsity"] == 0
    assert row.loc["dense_flops", "steps"] < row.loc["dense", "steps"]
    assert row.loc["dense_flops", "train_flops"] == pytest.approx(row.loc["rigl", "train_flops"], rel=0.3)
    # small-dense has about the sparse net's parameter count
    assert row.loc["small_dense", "params"] == pytest.approx(row.loc["rigl", "params"], rel=0.1)
    assert row.loc["rigl", "tflite_bytes"] > 0
    assert row.loc["rigl", "inference_flops"] < row.loc["dense", "inference_flops"]
    for name in ("summary.md", "accuracy_vs_flops.png", "accuracy_vs_sparsity.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    assert "± " in open(os.path.join(out, "summary.md")).read() or "| RigL |" in open(os.path.join(out, "summary.md")).read()

    # the same arguments again: nothing is retrained, no duplicate rows
    calls = []
    monkeypatch.setattr(comparison, "run_job", lambda *a, **k: calls.append(a) or pytest.fail("retrained"))
    again = compare.main(TINY + ["--methods", "dense,dense_flops,small_dense,rigl", "--out", out])
    assert again["ran"] == 0 and not calls
    assert len(pd.read_csv(os.path.join(out, "results.csv"))) == 4


def test_compare_resumes_a_partial_grid(tmp_path, monkeypatch):
    out = str(tmp_path / "cmp")
    compare.main(TINY + ["--methods", "dense", "--out", out, "--no-tflite"])
    ran = []
    real = comparison.run_job
    monkeypatch.setattr(comparison, "run_job", lambda job, *a: ran.append(job.method) or real(job, *a))
    result = compare.main(TINY + ["--methods", "dense,static", "--out", out, "--no-tflite"])
    assert ran == ["static"] and result["ran"] == 1
    df = pd.read_csv(os.path.join(out, "results.csv"))
    assert sorted(df["method"]) == ["dense", "static"] and df["run_id"].is_unique
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # atomic writes leave no temp files


def test_compare_grid_shape():
    jobs = comparison.grid(["dense", "rigl", "set"], [0.8, 0.9], [0, 1, 2], [1.0, 2.0])
    assert len(jobs) == 3 * 2 * (1 + 2 * 2)
    assert jobs[0].seed == 0 and jobs[-1].seed == 2  # seed-major


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sparsities", "0.9,1.2"], "out of range"),
        (["--methods", "rigl,magic"], "unknown method"),
        (["--seeds", "a,b"], "integer seeds"),
        (["--multipliers", "0"], "multipliers must be > 0"),
        (["--epochs", "0"], "--epochs"),
        (["--dataset", "nope.npz"], "does not exist"),
    ],
)
def test_compare_bad_flags_fail_before_training(no_training, capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exc:
        compare.main(argv + ["--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "results.csv")


def test_compare_refuses_a_foreign_csv(tmp_path):
    (tmp_path / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a results file"):
        compare.main(TINY + ["--methods", "dense", "--out", str(tmp_path)])


def test_summary_mean_std():
    df = pd.DataFrame({
        "method": ["dense", "dense", "rigl", "rigl"], "sparsity": [0, 0, 0.9, 0.9], "multiplier": [1.0] * 4,
        "accuracy": [0.9, 0.8, 0.7, 0.5], "loss": [1.0] * 4, "train_flops": [10.0, 10.0, 2.0, 2.0],
        "inference_flops": [5, 5, 1, 1], "f_dense": [5] * 4, "params": [100, 100, 10, 10], "steps": [8] * 4,
        "wall_time_s": [1.0] * 4, "tflite_bytes": [np.nan] * 4,
    })
    s = comparison.summarize(df).set_index("method")
    assert s.loc["rigl", "acc_mean"] == pytest.approx(0.6)
    assert s.loc["rigl", "acc_std"] == pytest.approx(np.std([0.7, 0.5], ddof=1))
    assert s.loc["rigl", "train_flops_rel"] == pytest.approx(0.2)
    assert s.loc["rigl", "inference_flops_rel"] == pytest.approx(0.2)
    md = comparison.to_markdown(comparison.summarize(df))
    assert "| RigL | 0.9 | 1× | 2 | 60.00 ± 14.14 |" in md


def test_train_from_pretrained_weights_uses_magnitude_masks(tmp_path):
    import keras

    data = datasets.load_dataset("synthetic")
    pretrained = zoo.build_model("mlp", data.input_shape, data.num_classes)
    path = str(tmp_path / "mlp.weights.h5")
    pretrained.save_weights(path)
    kernel = pretrained.get_layer("fc1").kernel.numpy()
    r = train.main(["--dataset", "synthetic", "--model", "mlp", "--method", "static", "--weights", path,
                    "--epochs", "1", "--lr", "1e-9", "--out", str(tmp_path), "--run-name", "ft", "--no-tflite",
                    "--quiet"])
    assert r["sparsity"] == pytest.approx(0.9, abs=1e-3)
    model = keras.models.load_model(str(tmp_path / "ft" / "model.keras"))
    import keras_rigl

    fc1 = [layer for layer in keras_rigl.masked_layers(model) if layer.layer.name == "fc1"][0]
    mask = keras.ops.convert_to_numpy(fc1.masked_weights[0].mask) != 0
    # magnitude masks: every kept weight is at least as large as every dropped one
    assert np.abs(kernel[mask]).min() >= np.abs(kernel[~mask]).max()


def test_compare_other_hyperparameters_are_other_runs(tmp_path):
    out = str(tmp_path / "cmp")
    compare.main(TINY + ["--methods", "dense", "--out", out, "--no-tflite"])
    again = compare.main(TINY + ["--methods", "dense", "--out", out, "--no-tflite", "--lr", "0.01"])
    assert again["ran"] == 1
    df = pd.read_csv(os.path.join(out, "results.csv"))
    assert len(df) == 2 and df["run_id"].is_unique
    assert len(again["summary"]) == 1  # the summary covers only the runs of this study


# ------------------------------------------------------------------- zoo
@pytest.mark.parametrize("name", ["cnn", "mlp", "lstm", "mobilenet_v1"])
def test_zoo_builds_and_narrows(name):
    full = zoo.build_model(name, (8, 8, 1), 10)
    narrow = zoo.build_model(name, (8, 8, 1), 10, width=0.5)
    assert full.output_shape == (None, 10)
    assert zoo.count_params(narrow) < zoo.count_params(full)
    assert full.predict(np.zeros((2, 8, 8, 1), np.float32), verbose=0).shape == (2, 10)


def test_zoo_width_for_params_and_errors():
    target = 5_000
    width = zoo.width_for_params("mlp", (8, 8, 1), 10, target)
    got = zoo.count_params(zoo.build_model("mlp", (8, 8, 1), 10, width))
    assert abs(got - target) / target < 0.05
    with pytest.raises(ValueError, match="unknown model"):
        zoo.build_model("vgg", (8, 8, 1), 10)
    with pytest.raises(ValueError, match="width must be > 0"):
        zoo.build_model("mlp", (8, 8, 1), 10, width=0)


def test_train_lstm_exports_to_tflite(tmp_path):
    r = runner.run(runner.Config(dataset="synthetic", model="lstm", epochs=1, save=False, verbose=0))
    assert r["tflite_bytes"] > 0 and r["tflite_agreement"] == 1.0
