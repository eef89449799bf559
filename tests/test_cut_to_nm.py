"""scripts/experiments/cut_to_nm.py: unstructured RigL, cut to N:M after the last mask update."""
import keras
import numpy as np
import pytest

import keras_rigl
from conftest import load_script


def test_cut_mask_keeps_the_n_largest_of_every_group_of_inputs():
    cut = load_script("scripts/experiments/cut_to_nm.py")
    # 8 inputs, 2 units; unit 0: group (inputs 0-3) has 3 active, group (4-7) has 1; unit 1: all 4 active in 0-3
    w = np.array([[0.5, 1.0], [-2.0, 2.0], [0.1, -3.0], [0.0, 4.0],
                  [0.0, 0.0], [9.0, 0.0], [0.0, 0.0], [0.0, 0.0]], "float32")
    m = (w != 0).astype("float32")
    m[3, 0] = 1.0  # active with |w| = 0: never kept over a larger one
    got = cut.cut_mask(w, m, 2, 4)
    expected = np.zeros_like(m)
    expected[[0, 1], 0] = 1  # |0.5|, |-2.0| beat |0.1| and the active zero
    expected[5, 0] = 1  # a group with one active keeps it
    expected[[2, 3], 1] = 1  # |-3|, |4| beat |1|, |2|
    np.testing.assert_array_equal(got, expected)
    with pytest.raises(ValueError, match="multiple of 4"):
        cut.cut_mask(w[:6], m[:6], 2, 4)


def test_training_ends_2_of_4_in_the_cut_layers_only(tmp_path, capsys):
    from rigl_harness import runner

    plain = runner.method_callback
    cut = load_script("scripts/experiments/cut_to_nm.py")
    result = cut.main(["--cut-layers", "fc1,fc2", "--nm", "2:4", "--", "--dataset", "synthetic", "--model", "mlp",
                       "--epochs", "2", "--update-freq", "2", "--out", str(tmp_path), "--quiet", "--no-tflite"])
    assert result["mask_updates"] > 0
    assert [row["layer"] for row in result["cuts"]] == ["fc1", "fc2"]
    model = keras.models.load_model(tmp_path / result["run"] / "model.keras")
    masks = {layer.layer.name: keras.ops.convert_to_numpy(layer.masked_weights[0].mask)
             for layer in keras_rigl.masked_layers(model)}
    for name in ("fc1", "fc2"):
        groups = masks[name].T.reshape(masks[name].shape[1], -1, 4).sum(-1)
        assert groups.max() <= 2, name
        row = next(r for r in result["cuts"] if r["layer"] == name)
        assert int(masks[name].sum()) == row["active"]  # fixed after the cut: no update moved them again
    groups = masks["logits"].T.reshape(masks["logits"].shape[1], -1, 4).sum(-1)
    assert groups.max() > 2  # logits were not cut (ERK makes them dense)
    assert "cut to 2:4 after step" in capsys.readouterr().out
    assert runner.method_callback is plain  # later runs in this process train as train.py does


def test_a_structure_flag_or_a_bad_nm_exits_2(capsys):
    cut = load_script("scripts/experiments/cut_to_nm.py")
    for argv in (["--cut-layers", "fc1", "--", "--structure", "2:4"], ["--cut-layers", "fc1", "--structure=1x4"],
                 ["--cut-layers", "fc1", "--nm", "4:2"]):
        with pytest.raises(SystemExit) as exc:
            cut.main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "drop it" in err and "0 < N < M" in err
