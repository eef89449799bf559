"""scripts/train.py and scripts/compare.py on tiny synthetic data: outputs, schema, resume, errors."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import keras

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
    r = runner.run(runner.Config(dataset="synthetic", model="mlp", method=method, epochs=3, save=False,
                               tflite=False, verbose=0))
    assert r["steps"] == 24
    assert r["accuracy"] > 0.5  # learnable data, 10 classes: chance is 0.1
    if method == "dense":
        assert r["sparsity"] == 0.0 and r["train_flops"] == r["train_flops_dense"]
    else:
        assert r["train_flops"] == 3 * r["inference_flops"] * r["examples"]


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
    assert re.search(message, capsys.readouterr().err)


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
    # by hand: RigL's paper accounting at ΔT=2 over 8 steps of 64, f_S from the sparse net's active weights
    import keras_rigl

    sparse = keras_rigl.sparsify(zoo.build_model("mlp", (8, 8, 1), 10), 0.9, distribution="erk", seed=0)
    f_s = 2 * sum(int(np.count_nonzero(keras.ops.convert_to_numpy(mw.mask)))
                  for layer in keras_rigl.masked_layers(sparse) for mw in layer.masked_weights)
    f_d = 2 * (64 * 300 + 300 * 100 + 100 * 10)
    rigl_budget = (3 * f_s * 2 + 2 * f_s + f_d) / 3 * (8 * 64)
    expected_steps = max(1, round(rigl_budget / (3 * f_d * 64)))
    assert row.loc["dense_flops", "steps"] == expected_steps
    assert row.loc["dense_flops", "train_flops"] == 3 * f_d * expected_steps * 64
    # small-dense has about the sparse net's parameter count
    assert row.loc["small_dense", "params"] == pytest.approx(row.loc["rigl", "params"], rel=0.1)
    assert row.loc["rigl", "tflite_bytes"] > 0
    assert row.loc["rigl", "inference_flops"] < row.loc["dense", "inference_flops"]
    for name in ("summary.md", "accuracy_vs_flops.png", "accuracy_vs_sparsity.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    md = open(os.path.join(out, "summary.md")).read()
    rigl_line = [line for line in md.splitlines() if line.startswith("| RigL | 0.9 | 1× | 1 |")]
    assert len(rigl_line) == 1, md  # one seed: the accuracy is a plain number
    assert f"| {100 * row.loc['rigl', 'accuracy']:.2f} |" in rigl_line[0]

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
        (["--seeds", "0,-1"], "seeds must be >= 0"),
        (["--input-scale", "log"], "--input-scale"),
    ],
)
def test_compare_bad_flags_fail_before_training(no_training, capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exc:
        compare.main(argv + ["--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "results.csv")


def test_compare_out_that_is_a_file(no_training, capsys, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as exc:
        compare.main(TINY + ["--methods", "dense", "--out", str(tmp_path / "afile")])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err.strip().splitlines()[-1]


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


# ------------------------------------------------- issue 10: scripts/train.py
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "scripts", "train.py")
FAST = ["--dataset", "synthetic", "--model", "mlp", "--epochs", "1", "--no-tflite"]


def _snapshot(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_rerun_into_an_existing_run_refuses_without_overwrite(tmp_path, capsys):
    train.main(FAST + ["--out", str(tmp_path), "--run-name", "r", "--quiet"])
    before = _snapshot(tmp_path / "r")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train.main(FAST + ["--out", str(tmp_path), "--run-name", "r", "--quiet", "--seed", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "already exists" in err and "--overwrite" in err
    assert _snapshot(tmp_path / "r") == before


def test_overwrite_replaces_the_whole_run(tmp_path):
    train.main(FAST + ["--out", str(tmp_path), "--run-name", "r", "--quiet"])
    (tmp_path / "r" / "stale.txt").write_text("from an older run")
    r = train.main(FAST + ["--out", str(tmp_path), "--run-name", "r", "--quiet", "--seed", "1", "--overwrite"])
    assert not (tmp_path / "r" / "stale.txt").exists()  # the new run does not mix with the old one
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["seed"] == 1 == r["seed"]
    assert sorted(os.listdir(tmp_path)) == ["r"]  # no temp folders left behind


def test_sigkill_during_an_overwrite_leaves_the_previous_run_intact(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    argv = FAST + ["--out", str(tmp_path), "--run-name", "r", "--quiet"]
    args = [sys.executable, TRAIN] + argv
    # Only the run that is killed needs a process of its own; the runs before and after it are
    # train.main in this process (each subprocess would import TensorFlow again, ~5-10 s).
    train.main(argv)
    before = _snapshot(tmp_path / "r")
    start = time.time()
    proc = subprocess.Popen(args + ["--seed", "1", "--overwrite"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed = False
    try:
        while proc.poll() is None and time.time() - start < 600:
            # the moment the new run starts writing its model (anywhere under --out), kill it
            new_models = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files
                          if f.startswith("model") or f.startswith(".model")
                          if os.path.getmtime(os.path.join(d, f)) >= start]
            written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files
                       if os.path.getmtime(os.path.join(d, f)) >= start]
            if new_models or (written and not os.path.exists(tmp_path / "r" / "metrics.json")):
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert killed, "the run finished before anything was seen being written"
    assert _snapshot(tmp_path / "r") == before
    # the next run cleans up what the killed one left and completes
    train.main(argv + ["--overwrite"])
    assert sorted(os.listdir(tmp_path)) == ["r"]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from rigl_harness import atomic

    path = tmp_path / "metrics.json"
    path.write_text("old")

    def broken(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic.write_file(str(path), broken)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]
    seen = []
    atomic.write_file(str(tmp_path / "model.keras"), lambda tmp: seen.append(tmp) or open(tmp, "w").write("x"))
    assert seen[0].endswith(".keras") and os.path.dirname(seen[0]) == str(tmp_path)
    assert (tmp_path / "model.keras").read_text() == "x"


def test_default_run_writes_nothing_under_saved_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = train.main(FAST + ["--quiet"])
    assert not (tmp_path / "saved_models").exists()
    assert os.path.dirname(os.path.abspath(r["run_dir"])) == str(tmp_path / "runs")
    assert runner.Config().out == "runs"


@pytest.mark.parametrize(
    "make_argv, message",
    [
        (lambda p: ["--out", str(p / "afile")], "--out"),
        (lambda p: ["--out", str(p / "afile" / "sub")], "--out"),
        (lambda p: ["--seed", "-1"], "--seed"),
        (lambda p: ["--weights", str(p / "truncated.keras")], "truncated.keras"),
        (lambda p: ["--input-scale", "log"], "--input-scale"),
    ],
)
def test_bad_out_seed_weights_are_one_line_errors(tmp_path, capsys, no_training, make_argv, message):
    (tmp_path / "afile").write_text("not a folder")
    whole = tmp_path / "whole.keras"
    zoo.build_model("mlp", (8, 8, 1), 10).save(str(whole))
    (tmp_path / "truncated.keras").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train.main(FAST + ["--run-name", "x"] + make_argv(tmp_path))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and ": error: " in err[-1], err
    assert "Traceback" not in "\n".join(err)


def test_weights_from_a_model_keras_that_train_wrote(tmp_path):
    first = train.main(FAST + ["--method", "static", "--out", str(tmp_path), "--run-name", "a", "--quiet"])
    source = keras.models.load_model(str(tmp_path / "a" / "model.keras"))
    import keras_rigl

    masks_a = {layer.layer.name: keras.ops.convert_to_numpy(layer.masked_weights[0].mask)
               for layer in keras_rigl.masked_layers(source)}
    second = train.main(FAST + ["--method", "static", "--weights", str(tmp_path / "a" / "model.keras"),
                                "--lr", "1e-9", "--out", str(tmp_path), "--run-name", "b", "--quiet"])
    model_b = keras.models.load_model(str(tmp_path / "b" / "model.keras"))
    for layer in keras_rigl.masked_layers(model_b):
        # magnitude masks at the same sparsity pick exactly the connections the first run kept
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.masked_weights[0].mask),
                                      masks_a[layer.layer.name])
    assert second["accuracy"] == pytest.approx(first["accuracy"], abs=0.02)


def _metrics(run_dir):
    return json.loads(open(os.path.join(run_dir, "metrics.json")).read())


def test_rigl_without_a_mask_update_is_reported(tmp_path, capsys):
    # 8 steps, updates stop at 0.75 x 8 = 6 < update_freq 10: no update happens
    r = train.main(FAST + ["--update-freq", "10", "--out", str(tmp_path), "--run-name", "r", "--quiet"])
    out = capsys.readouterr()
    assert r["mask_updates"] == 0 == _metrics(r["run_dir"])["mask_updates"]
    assert "no mask update" in (out.out + out.err)
    # charged as the static sparse training it was: 3 f_S per example
    assert r["train_flops"] == 3 * r["inference_flops"] * r["examples"]


def test_rigl_flops_count_the_updates_that_happened(tmp_path):
    r = train.main(FAST + ["--update-freq", "2", "--out", str(tmp_path), "--run-name", "r", "--quiet"])
    assert r["mask_updates"] == 3  # steps 2, 4, 6
    f_s, f_d, examples = r["inference_flops"], r["f_dense"], r["examples"]
    update_examples = 3 * 64
    expected = 3 * f_s * (examples - update_examples) + (2 * f_s + f_d) * update_examples
    assert r["train_flops"] == pytest.approx(expected, rel=1e-12)


def test_a_diverged_run_is_reported_as_failed(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--dataset", "synthetic", "--model", "mlp", "--epochs", "1", "--lr", "1e8", "--out",
                    str(tmp_path), "--run-name", "nan"])
    assert exc.value.code == 1
    out = capsys.readouterr()
    assert "agrees" not in out.out and "failed" in (out.out + out.err).lower()
    metrics = _metrics(tmp_path / "nan")
    assert metrics["status"] == "failed" and "non-finite" in metrics["failure"]
    assert not (tmp_path / "nan" / "model.tflite").exists()


def test_help_shows_defaults_and_quiet_keeps_the_result(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag_default in ("(default: 0.9)", "(default: runs)", "(default: rigl)", "(default: 50)"):
        assert flag_default in text, flag_default
    quiet_help = text.split("--quiet", 1)[1].split("--", 1)[0]
    assert len(quiet_help.strip()) > 10, quiet_help
    train.main(FAST + ["--out", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert "Held-out accuracy" in out and "Training FLOPs" in out
    assert "Per-kernel sparsity" not in out  # quiet: no table, no Keras progress
    train.main(FAST + ["--out", str(tmp_path), "--run-name", "loud"])
    loud = capsys.readouterr().out
    assert "Per-kernel sparsity" in loud and "Held-out accuracy" in loud and "loss:" in loud


def test_npz_errors_exit_2(tmp_path, capsys, no_training):
    import zipfile

    path = tmp_path / "bad.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            zf.writestr(f"{key}.npy", b"not an array")
    with pytest.raises(SystemExit) as exc:
        train.main(["--dataset", str(path)])
    assert exc.value.code == 2
    assert "not a .npy array" in capsys.readouterr().err


def test_prune_runs_for_real(tmp_path):
    import tensorflow_model_optimization  # noqa: F401  (the "test" extra installs it: no skip)

    r = train.main(["--dataset", "synthetic", "--model", "mlp", "--method", "prune", "--sparsity", "0.8",
                    "--epochs", "6", "--update-freq", "2", "--out", str(tmp_path), "--run-name", "p", "--quiet"])
    assert r["status"] == "ok"
    assert r["sparsity"] == pytest.approx(0.8, abs=0.01)  # TFMOT reached its target; masks = its zeros
    assert r["params"] < 0.3 * r["params_total"]
    assert r["accuracy"] > 0.8  # dense reaches about 0.98 here; chance is 0.1
    assert r["train_flops"] == r["train_flops_dense"]  # pruning is charged as dense
    assert r["tflite_agreement"] == 1.0
    import keras_rigl

    model = keras.models.load_model(str(tmp_path / "p" / "model.keras"))
    for layer in keras_rigl.masked_layers(model):
        for mw in layer.masked_weights:  # the masks are exactly where TFMOT left non-zero weights
            weight = keras.ops.convert_to_numpy(mw.weight)
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(mw.mask) != 0, weight != 0)


@pytest.mark.parametrize("broken", ["summary.csv", "accuracy_vs_flops.png", "results.csv"])
def test_compare_outputs_survive_a_failed_rewrite(tmp_path, monkeypatch, broken):
    out = tmp_path / "cmp"
    compare.main(TINY + ["--methods", "dense", "--out", str(out), "--no-tflite"])
    before = (out / broken).read_bytes()
    import matplotlib.figure

    real_csv, real_fig = pd.DataFrame.to_csv, matplotlib.figure.Figure.savefig

    def half_then_fail(real):
        def write(self, path, *args, **kwargs):
            if os.path.basename(str(path)).replace(".tmp", "").startswith(os.path.splitext(broken)[0]) or \
                    os.path.splitext(broken)[0] in os.path.basename(str(path)):
                with open(path, "wb") as fh:
                    fh.write(b"half")
                raise OSError("disk full")
            return real(self, path, *args, **kwargs)
        return write

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail(real_csv))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_fail(real_fig))
    if broken == "results.csv":  # rewritten after each run: give it one to run
        args = TINY + ["--methods", "dense,static", "--out", str(out), "--no-tflite"]
    else:
        args = TINY + ["--methods", "dense", "--out", str(out), "--no-tflite"]
    with pytest.raises(OSError, match="disk full"):
        compare.main(args)
    assert (out / broken).read_bytes() == before
    assert not [f for f in os.listdir(out) if "tmp" in f]


def test_compare_keeps_a_diverged_run_out_of_the_summary(tmp_path, capsys):
    out = tmp_path / "cmp"
    result = compare.main(TINY + ["--methods", "dense", "--out", str(out), "--no-tflite", "--lr", "1e8"])
    df = pd.read_csv(out / "results.csv")
    assert df["status"].tolist() == ["failed"]  # recorded, so a restart does not retrain it
    assert result["summary"].empty and "(no runs)" in (out / "summary.md").read_text()
    assert "failed" in capsys.readouterr().out
