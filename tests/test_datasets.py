"""rigl_harness.datasets (scripts/ helper package): the built-in data sets and the validation of user .npz files."""

import numpy as np
import pytest

from rigl_harness import datasets


def test_mnist5k_split_is_stratified_and_fixed():
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


# ------------------------------------------------------------ input scaling
def _float_arrays(n=20, test_n=5):
    rng = np.random.default_rng(1)
    return dict(
        x_train=rng.random((n, 6, 6)).astype(np.float32),
        y_train=np.arange(n) % 3,
        x_test=rng.random((test_n, 6, 6)).astype(np.float32),
        y_test=np.arange(test_n) % 3,
    )


def test_one_test_pixel_above_one_does_not_rescale_the_test_split(tmp_path):
    arrays = _float_arrays()
    arrays["x_test"][0, 0, 0] = 1.01  # data in [0, 1] with one slightly bright test pixel
    d = datasets.load_dataset(_save(tmp_path, **arrays))
    np.testing.assert_array_equal(d.x_test[..., 0], arrays["x_test"])
    np.testing.assert_array_equal(d.x_train[..., 0], arrays["x_train"])


def test_z_scored_data_keeps_its_values(tmp_path):
    rng = np.random.default_rng(2)
    arrays = _float_arrays()
    arrays["x_train"] = (3.0 * rng.standard_normal((20, 6, 6))).astype(np.float32)  # max > 1, min < 0
    arrays["x_test"] = (3.0 * rng.standard_normal((5, 6, 6))).astype(np.float32)
    d = datasets.load_dataset(_save(tmp_path, **arrays))
    np.testing.assert_array_equal(d.x_train[..., 0], arrays["x_train"])
    np.testing.assert_array_equal(d.x_test[..., 0], arrays["x_test"])


def test_scale_is_decided_from_the_training_split_and_applied_to_both(tmp_path):
    arrays = good_arrays()
    arrays["x_train"] = np.minimum(arrays["x_train"], 200)  # train max 200: 0..255 pixels, /255
    arrays["x_test"] = np.full((5, 6, 6), 255, np.uint8)
    d = datasets.load_dataset(_save(tmp_path, **arrays))
    np.testing.assert_allclose(d.x_train[..., 0], arrays["x_train"] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(d.x_test, 1.0)  # 255 / 255, not 255 / its own max
    assert d.input_scale == 255.0


@pytest.mark.parametrize("flag, divisor", [("none", 1.0), ("255", 255.0)])
def test_explicit_input_scale(tmp_path, flag, divisor):
    arrays = good_arrays()
    d = datasets.load_dataset(_save(tmp_path, **arrays), input_scale=flag)
    np.testing.assert_allclose(d.x_train[..., 0], arrays["x_train"] / divisor, rtol=1e-6)
    np.testing.assert_allclose(d.x_test[..., 0], arrays["x_test"] / divisor, rtol=1e-6)


def test_unknown_input_scale_is_refused(tmp_path):
    with pytest.raises(ValueError, match="input_scale"):
        datasets.load_dataset(_save(tmp_path, **good_arrays()), input_scale="log")


# ------------------------------------------------------------------- labels
@pytest.mark.parametrize("big", [2**32, 2**31])
def test_labels_that_do_not_fit_int32_are_refused(tmp_path, big):
    arrays = good_arrays()
    arrays["y_train"] = arrays["y_train"].astype(np.int64)
    arrays["y_train"][3] = big  # 2**32 wrapped to 0 in int32; 2**31 crashed in fit
    with pytest.raises(ValueError, match=str(big)):
        datasets.load_dataset(_save(tmp_path, **arrays))


def test_uint64_label_above_int64_is_refused(tmp_path):
    arrays = good_arrays()
    arrays["y_train"] = arrays["y_train"].astype(np.uint64)
    arrays["y_train"][0] = np.uint64(2**63 + 1)  # a cast to int64 would make it negative
    with pytest.raises(ValueError, match=str(2**63 + 1)):
        datasets.load_dataset(_save(tmp_path, **arrays))


def test_one_stray_label_is_refused(tmp_path):
    arrays = dict(good_arrays(100))
    arrays["y_train"] = np.arange(100) % 10
    arrays["y_test"] = np.arange(5) % 10
    arrays["y_train"][7] = 20000  # would build a 20,001-way classifier
    with pytest.raises(ValueError, match=r"20000.*20001 classes.*11 distinct"):
        datasets.load_dataset(_save(tmp_path, **arrays))


def test_unused_classes_within_reason_are_accepted(tmp_path):
    arrays = good_arrays()
    arrays["y_train"] = np.where(arrays["y_train"] == 2, 3, arrays["y_train"])  # labels 0, 1, 3
    d = datasets.load_dataset(_save(tmp_path, **arrays))
    assert d.num_classes == 4


@pytest.mark.parametrize(
    "labels",
    [
        np.array([[0.2, 0.8, 0.0]] * 20),  # probabilities, not one-hot
        np.array([[1, 1, 0]] * 20),  # two ones in a row
        np.array([[0, 0, 0]] * 20),  # no one
        np.array([[2, 0, 0]] * 20),  # not 0/1
    ],
)
def test_two_d_labels_must_really_be_one_hot(tmp_path, labels):
    arrays = good_arrays()
    arrays["y_train"] = labels
    with pytest.raises(ValueError, match="one-hot"):
        datasets.load_dataset(_save(tmp_path, **arrays))


# --------------------------------------------------------- damaged archives
def _member_data_offset(path, member):
    import struct
    import zipfile

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.compress_size


def test_bad_crc_member_is_one_clear_error(tmp_path):
    path = _save(tmp_path, **good_arrays())
    start, size = _member_data_offset(path, "x_train.npy")
    with open(path, "r+b") as fh:  # flip a byte of the array payload (not its header)
        fh.seek(start + size - 3)
        byte = fh.read(1)
        fh.seek(start + size - 3)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match=r"x_train.*(CRC|corrupt)"):
        datasets.load_dataset(path)


def _write_npz_members(path, members):
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)


def _npy_bytes(array):
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_huge_declared_shape_is_refused_without_allocating(tmp_path):
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (2_000_000, 3_000_000)})  # 22 TiB declared
    arrays = good_arrays()
    members = {f"{k}.npy": _npy_bytes(v) for k, v in arrays.items()}
    members["x_train.npy"] = header.getvalue() + b"\0" * 64
    path = str(tmp_path / "huge.npz")
    _write_npz_members(path, members)
    with pytest.raises(ValueError, match=r"x_train.*declares shape \(2000000, 3000000\)"):
        datasets.load_dataset(path)


def test_member_that_is_not_npy_is_refused(tmp_path):
    arrays = good_arrays()
    members = {f"{k}.npy": _npy_bytes(v) for k, v in arrays.items()}
    members["x_train.npy"] = b"this is a text file, not an array"
    path = str(tmp_path / "text.npz")
    _write_npz_members(path, members)
    with pytest.raises(ValueError, match=r"x_train.*not a \.npy array"):
        datasets.load_dataset(path)
    members.pop("x_train.npy")
    members["x_train"] = b"raw bytes under the array's name"
    _write_npz_members(path, members)
    with pytest.raises(ValueError, match=r"x_train.*not a \.npy array"):
        datasets.load_dataset(path)
