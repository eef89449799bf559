"""Export (sparse) Keras models to TFLite and TF SavedModel.

``export_tflite`` strips the ``Masked`` wrappers, converts with
``tf.lite.Optimize.EXPERIMENTAL_SPARSITY`` so that masked (zero) weights are
stored in TFLite's sparse format, writes the file atomically and returns a
per-tensor storage report read back from the written flatbuffer
(:func:`keras_rigl.tflite.report.tflite_weight_report`).

What the converter does with sparse weights (tensorflow/compiler/mlir/lite/
transforms/dense_to_sparse.cc): a rank-2/4 constant feeding CONV_2D,
DEPTHWISE_CONV_2D, TRANSPOSE_CONV or FULLY_CONNECTED with at least 30 %
zeros (``kMinSparsityLevel``) is stored sparse; unless it matches a block
configuration the consuming kernel supports (1x4 for FULLY_CONNECTED, only
when the zeros really come in such blocks), it is stored as random-sparsity
CSR and a DENSIFY op expands it once when the interpreter prepares the
model.  So the *file* shrinks, but compute stays dense unless a delegate
(XNNPACK's sparse path, see ``keras_rigl.tflite.xnnpack``) uses the sparsity.
Masks in 1x4 blocks (float32) or 1x16 blocks (int8) make the converter store
FULLY_CONNECTED weights block-sparse, run by TFLite's builtin sparse FC kernels
(``report.attrs["block_sparse"]``; :mod:`keras_rigl.tflite.structured`).
Two exceptions, both visible in the returned report:

* a FULLY_CONNECTED weight whose zeros leave almost every 1x4 block empty
  (e.g. an ERK-sparsified classifier at ~3 % density) is stored in 1x4
  blocks and run by TFLite's builtin sparse FC kernel, which does skip the
  empty blocks (``densify`` False in the report);
* with TF 2.21 / LiteRT 2.3, sparse *int8* weights (``"dynamic"`` and
  ``"int8"``) make the XNNPACK delegate fail to prepare, so those files run
  on the builtin kernels (slower than the dense int8 file under XNNPACK);
  ``report.attrs["xnnpack_delegate"]`` records this for every export.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Iterable

import numpy as np

from keras_rigl.sparsify import check_built, masked_layers, strip
from keras_rigl.tflite.report import tflite_weight_report

__all__ = ["export_tflite", "export_saved_model", "QUANTIZE_MODES", "representative_dataset"]

QUANTIZE_MODES = (None, "dynamic", "float16", "int8")
TARGETS = (None, "xnnpack_sparse")
_MAX_REPRESENTATIVE = 200


# ---------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------
def _check_quantize(quantize) -> Any:
    if isinstance(quantize, str) and quantize.lower() in ("none", "float32", "fp32"):
        quantize = None
    if isinstance(quantize, str):
        quantize = quantize.lower()
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"unsupported quantize={quantize!r}; use one of None, 'dynamic', 'float16', 'int8'")
    return quantize


def _check_target(target) -> Any:
    if target not in TARGETS:
        raise ValueError(f"unsupported target={target!r}; use None or 'xnnpack_sparse'")
    return target


def _check_output_location(path) -> str:
    """Absolute ``path`` whose directory exists and is writable (one-line errors otherwise)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise ValueError(f"cannot write {path!r}: directory {directory!r} does not exist; "
                         f"create it first (os.makedirs({directory!r}, exist_ok=True))")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path!r}: directory {directory!r} is not writable; "
                         "choose another output path or fix its permissions")
    return path


def _check_output_file(path) -> str:
    path = _check_output_location(path)
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; give a file path such as {os.path.join(path, 'model.tflite')!r}")
    return path


def _check_xnnpack_runtime() -> None:
    """target='xnnpack_sparse' is checked and run with LiteRT, an optional extra."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        raise ImportError("target='xnnpack_sparse' needs the LiteRT interpreter: pip install ai-edge-litert "
                          "(or export with target=None)") from None


# ---------------------------------------------------------------------------
# representative data
# ---------------------------------------------------------------------------
def _input_specs(model) -> list[tuple[tuple, str]] | None:
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):  # subclassed model: shapes unknown here
        return None
    if not inputs:
        return None
    specs = []
    for t in inputs:
        specs.append((tuple(t.shape), str(getattr(t.dtype, "name", t.dtype))))
    return specs


def _as_samples(data, n_inputs: int) -> Iterable[list[np.ndarray]]:
    """Yield lists of arrays (one per model input), each possibly batched."""
    import tensorflow as tf

    if callable(data) and not isinstance(data, tf.data.Dataset):
        data = data()
    if isinstance(data, np.ndarray):
        yield [data]
        return
    if (isinstance(data, (list, tuple)) and n_inputs > 1 and len(data) == n_inputs
            and all(isinstance(d, np.ndarray) for d in data)):
        yield [np.asarray(d) for d in data]  # one array per input
        return
    if isinstance(data, tf.data.Dataset):
        data = data.as_numpy_iterator()
    for item in data:
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, tuple) and len(item) in (2, 3) and n_inputs == 1:
            item = item[0]  # (x, y) or (x, y, sample_weight)
        if isinstance(item, (list, tuple)):
            yield [np.asarray(v) for v in item]
        else:
            yield [np.asarray(item)]


def _fit_to_inputs(xs: list[np.ndarray], specs) -> list[np.ndarray]:
    """float32 arrays with a batch axis, checked against the model's input shapes."""
    if specs is None:
        return [np.asarray(x, dtype=np.float32) for x in xs]
    if len(xs) != len(specs):
        raise ValueError(f"representative_data gives {len(xs)} input(s) per sample, the model has {len(specs)}")
    fixed = []
    for x, (shape, _) in zip(xs, specs):
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == len(shape) - 1:
            x = x[None]
        if x.ndim != len(shape) or any(s is not None and s != v for s, v in zip(shape[1:], x.shape[1:])):
            raise ValueError(f"representative_data sample has shape {x.shape[1:]} per example but the model "
                             f"input is {tuple(shape[1:])}; resize/reshape the data to the model's input")
        fixed.append(x)
    return fixed


def representative_dataset(data, model, max_samples: int = _MAX_REPRESENTATIVE):
    """A converter ``representative_dataset`` callable from an array / Dataset / generator.

    Checks every sample against the model's input shapes and raises a
    ``ValueError`` saying what was expected, and refuses NaN / inf values
    (one of them ruins the calibrated ranges of the whole int8 model).
    Samples are fed one at a time (batch 1), at most ``max_samples``.
    """
    specs = _input_specs(model)
    samples: list[list[np.ndarray]] = []
    for xs in _as_samples(data, len(specs) if specs else 1):
        fixed = _fit_to_inputs(xs, specs)
        for i in range(fixed[0].shape[0]):
            sample = [f[i:i + 1] for f in fixed]
            if not all(np.isfinite(v).all() for v in sample):
                raise ValueError(f"representative_data sample {len(samples)} holds NaN or inf values; int8 "
                                 "calibration needs finite inputs: drop or repair those samples")
            samples.append(sample)
            if len(samples) >= max_samples:
                break
        if len(samples) >= max_samples:
            break
    if not samples:
        raise ValueError("representative_data is empty; give at least a few (ideally ~100) real input samples")

    def gen():
        yield from samples

    return gen


# ---------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------
def _strip(model):
    return strip(model) if masked_layers(model) else model


@contextlib.contextmanager
def _quiet():
    """Silence the SavedModel/converter chatter printed on stdout."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield buf


def _saved_model(model, directory: str) -> None:
    with _quiet():
        model.export(directory, format="tf_saved_model", verbose=False)


def _convert(model, quantize, representative, sparse: bool) -> bytes:
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="keras_rigl_tflite_") as tmp:
        sm = os.path.join(tmp, "saved_model")
        _saved_model(model, sm)
        conv = tf.lite.TFLiteConverter.from_saved_model(sm)
        opts = []
        if quantize is not None:
            opts.append(tf.lite.Optimize.DEFAULT)
        if sparse:
            opts.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
        conv.optimizations = opts
        if quantize == "float16":
            conv.target_spec.supported_types = [tf.float16]
        elif quantize == "int8":
            conv.representative_dataset = representative
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
        with _quiet():
            return conv.convert()


def _file_mode(path: str) -> int:
    """Mode for the new file: the replaced file's, else 0o666 minus the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or unknowable): leave its file alone
    return True


def _temp_pattern(path: str):
    return re.compile(r"^\." + re.escape(os.path.basename(path)) + r"\.(\d+)-[0-9a-f]{8}\.tmp$")


def _remove_stale_temps(path: str) -> None:
    """Delete temp files of earlier writes to ``path`` whose writing process is gone (killed)."""
    directory, pattern = os.path.dirname(path), _temp_pattern(path)
    for entry in os.listdir(directory):
        match = pattern.match(entry)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, entry))


def _write_atomic(data: bytes, path: str) -> None:
    """Write ``path`` through ``.<name>.<pid>-<token>.tmp`` in its directory, fsync, rename.

    A killed write leaves its temp file; the pid in its name lets the next
    write to the same path recognise it as stale and remove it.
    """
    directory = os.path.dirname(path)
    mode = _file_mode(path)
    _remove_stale_temps(path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_file_matches(data: bytes, quantize) -> Any:
    """The report of the converted bytes, refusing a file that is not what ``quantize`` asked for."""
    report = tflite_weight_report(data)
    got = report.attrs["file_quantize"]
    if got != quantize:
        held = {None: "float32", "mixed": "a mix of types"}.get(got, got)
        raise ValueError(f"asked for quantize={quantize!r} but the converter produced a file holding {held} "
                         "weights/inputs (nothing was written); check the representative data and the model, "
                         "or export with the quantize mode the model supports")
    return report


def export_tflite(model, path, quantize=None, representative_data=None, sparse: bool = True, target=None,
                  check_runtime: bool = True):
    """Export ``model`` to a ``.tflite`` file and report what the file stores.

    Args:
        model: a built Keras model, with or without ``Masked`` wrappers
            (they are stripped; masked weights are exactly 0).
        path: output file. Written atomically (temp file in the same
            directory + ``os.replace``): a failed export leaves no partial
            file and never replaces an existing one.
        quantize: ``None`` (float32), ``"dynamic"`` (int8 weights, float
            activations), ``"float16"`` (fp16 weights) or ``"int8"`` (full
            integer incl. int8 input/output; needs ``representative_data``).
        representative_data: for ``"int8"``: an array ``(N, ...)`` of real
            inputs, a ``tf.data.Dataset`` (of x or (x, y)) or a generator /
            callable yielding them; ~100 samples are used.
        sparse: store masked weights in TFLite's sparse format
            (``EXPERIMENTAL_SPARSITY``). ``False`` gives the dense baseline.
        target: ``None`` or ``"xnnpack_sparse"`` (rewrite the model so
            XNNPACK's sparse inference path can take it, and attach its
            per-op verdict, a DataFrame, as ``report.attrs["xnnpack"]``;
            pop it before ``pd.concat`` of several reports, as pandas
            compares attrs when concatenating).
        check_runtime: load the written file in the interpreter with the
            default XNNPACK delegate and run it once on zeros; the outcome
            (``"ok"`` or ``"refused: ..."``) is ``report.attrs["xnnpack_delegate"]``.
            Sparse int8 weights (``"dynamic"``/``"int8"``) are refused by
            XNNPACK in TF 2.21 / LiteRT 2.3, so such files run on the slower
            builtin kernels -- the report says so instead of hiding it.

    Returns:
        A DataFrame (``keras_rigl.tflite.TFLiteReport``) with one row
        per constant tensor read back from the converted flatbuffer (see
        :func:`~keras_rigl.tflite.tflite_weight_report`), file totals
        in ``.attrs["totals"]`` and the export settings in ``.attrs``;
        ``.attrs["quantize"]`` is read from the file's tensor types, and a
        conversion that did not give the asked-for types raises
        ``ValueError`` before anything is written. For a model with
        ``Masked`` layers, ``.attrs["block_sparse"]`` is a list of dicts (one
        per masked Dense layer, ``pd.DataFrame(...)`` of it prints a table; see
        :func:`keras_rigl.tflite.structured.block_sparse_layers`) saying
        which layers TFLite runs on its sparse fully-connected kernels:
        float32 needs masks in 1x4 blocks, ``"int8"``/``"dynamic"`` 1x16
        blocks (4 or 16 consecutive inputs of one output unit).
    """
    quantize = _check_quantize(quantize)
    target = _check_target(target)
    check_built(model)
    path = _check_output_file(path)
    if target == "xnnpack_sparse":
        _check_xnnpack_runtime()
    if quantize == "int8" and representative_data is None:
        raise ValueError("quantize='int8' needs representative_data: ~100 real input samples as an array "
                         "(N, ...), a tf.data.Dataset or a generator, to calibrate activation ranges; "
                         "or use quantize='dynamic' (int8 weights, float activations), which needs none")
    if quantize != "int8" and representative_data is not None:
        raise ValueError(f"representative_data is only used with quantize='int8' (got quantize={quantize!r})")

    plain = _strip(model)
    if target == "xnnpack_sparse":
        from keras_rigl.tflite.xnnpack_rewrite import rewrite_for_xnnpack_sparse

        plain = rewrite_for_xnnpack_sparse(plain)
    if sparse and quantize in ("dynamic", "int8"):
        from keras_rigl.tflite.structured import INT8_FC_BLOCK, pad_dense_inputs

        # whole 1x16 blocks: the converter drops the inputs of a partial int8 block
        plain = pad_dense_inputs(plain, INT8_FC_BLOCK)
    representative = representative_dataset(representative_data, plain) if quantize == "int8" else None

    data = _convert(plain, quantize, representative, sparse)
    report = _check_file_matches(data, quantize)
    if sparse:
        from keras_rigl.tflite.structured import check_block_shapes

        check_block_shapes(data)
    _write_atomic(data, path)

    report.attrs.update({"path": path, "quantize": report.attrs["file_quantize"], "sparse": bool(sparse),
                         "target": target})
    if masked_layers(model):
        from keras_rigl.tflite.structured import block_sparse_layers

        # records, not a DataFrame: pandas compares attrs in pd.concat and copies them on every slice
        report.attrs["block_sparse"] = block_sparse_layers(model, data, quantize=report.attrs["quantize"]).to_dict(
            "records")
    if check_runtime:
        from keras_rigl.tflite.runtime import xnnpack_delegate_status

        report.attrs["xnnpack_delegate"] = xnnpack_delegate_status(path)
    if target == "xnnpack_sparse":
        from keras_rigl.tflite.xnnpack_report import xnnpack_sparse_report

        report.attrs["xnnpack"] = xnnpack_sparse_report(path)
    return report


def export_saved_model(model, path):
    """Export a stripped model as a TF SavedModel for TF Serving.

    The directory gets a ``serving_default`` signature (and ``serve``
    endpoint) taking the model's inputs. It is written to a temporary
    sibling directory first and moved into place, so a failed export leaves
    ``path`` as it was. An existing SavedModel at ``path`` is replaced; any
    other existing path is an error. Returns the absolute path.
    """
    check_built(model)
    path = _check_output_location(path)
    parent = os.path.dirname(path)
    if os.path.exists(path) and not (os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb"))):
        raise ValueError(f"{path!r} exists and is not a SavedModel directory; remove it or choose another path")
    plain = _strip(model)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", dir=parent)
    old = None
    try:
        target = os.path.join(tmp, "m")
        _saved_model(plain, target)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".old.", dir=parent)
            os.replace(path, os.path.join(old, "m"))
        os.replace(target, path)
    except BaseException:
        if old is not None and not os.path.exists(path):
            os.replace(os.path.join(old, "m"), path)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path
