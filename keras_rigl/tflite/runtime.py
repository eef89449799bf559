"""Run ``.tflite`` files: one interpreter choice and one predict helper.

LiteRT (``ai_edge_litert.interpreter.Interpreter``) is used where it is
installed, otherwise ``tf.lite.Interpreter``.  ``use_xnnpack=False`` selects
the builtin kernels without the default (XNNPACK) delegate.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Sequence

import numpy as np

__all__ = [
    "xnnpack_delegate_status",
    "interpreter_backend",
    "make_interpreter",
    "tflite_predict",
    "TFLiteRunner",
]


# TFLite's error reporter appends messages without a separator ("... node #2Node number 6 ...");
# a new message starts where a lower-case letter, digit, '.' or ')' meets a capitalised word.
_MESSAGE_START = re.compile(r"(?<=[0-9a-z.)])(?=[A-Z][a-z]+ )")


def _one_line(error_text: str) -> str:
    """The interpreter's error messages on one line, each separated by "; "."""
    parts = []
    for line in error_text.splitlines():
        parts.extend(p.strip() for p in _MESSAGE_START.split(line))
    return "; ".join(p for p in parts if p)


def _interpreter_module():
    try:
        from ai_edge_litert import interpreter as litert

        return "ai_edge_litert", litert
    except Exception:  # pragma: no cover - depends on the environment
        import tensorflow as tf

        return "tf.lite", tf.lite


def interpreter_backend() -> str:
    """``"ai_edge_litert"`` or ``"tf.lite"``: which interpreter is used."""
    return _interpreter_module()[0]


def make_interpreter(model: str | os.PathLike | bytes, num_threads: int | None = None,
                     use_xnnpack: bool = True):
    """An interpreter for a ``.tflite`` path or its bytes (not yet allocated)."""
    name, mod = _interpreter_module()
    if name == "ai_edge_litert":
        Interpreter = mod.Interpreter
        resolver = mod.OpResolverType
    else:  # pragma: no cover - fallback
        Interpreter = mod.Interpreter
        resolver = mod.experimental.OpResolverType
    kwargs: dict[str, Any] = {}
    if isinstance(model, (bytes, bytearray, memoryview)):
        kwargs["model_content"] = bytes(model)
    else:
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no TFLite file at {path!r}")
        kwargs["model_path"] = path
    if num_threads is not None:
        if int(num_threads) < 1 and int(num_threads) != -1:
            raise ValueError(f"num_threads must be >= 1 (or -1 for the default), got {num_threads}")
        kwargs["num_threads"] = int(num_threads)
    kwargs["experimental_op_resolver_type"] = (
        resolver.AUTO if use_xnnpack else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    return Interpreter(**kwargs)


def _quantize_input(x: np.ndarray, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(np.asarray(x).dtype, np.integer):
        scale, zero_point = detail["quantization"]
        if not scale:
            raise ValueError(f"input {detail['name']!r} is {dtype} without quantization parameters; "
                             "pass already-quantized integers")
        info = np.iinfo(dtype)
        q = np.round(np.asarray(x, dtype=np.float64) / scale + zero_point)
        return np.clip(q, info.min, info.max).astype(dtype)
    return np.asarray(x).astype(dtype, copy=False)


def _dequantize_output(y: np.ndarray, detail: dict, dequantize: bool) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dequantize and np.issubdtype(dtype, np.integer):
        scale, zero_point = detail["quantization"]
        if scale:
            return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)
    return y


class TFLiteRunner:
    """A loaded interpreter with batch handling and int8 I/O scaling.

    ``runner(x)`` returns the outputs for a batch ``x`` (an array, or a
    list/tuple of arrays for multi-input models).  Batches are run in one
    invoke by resizing the input when the model allows a dynamic batch;
    otherwise sample by sample.  ``runner.invoke()`` runs one invoke on
    whatever is set (used by the latency benchmark).
    """

    def __init__(self, model: str | os.PathLike | bytes, num_threads: int | None = None,
                 use_xnnpack: bool = True, fallback: bool = True):
        self.num_threads = num_threads
        self.use_xnnpack = use_xnnpack
        #: why XNNPACK could not take the model (None if it could / was not asked)
        self.delegate_error = None
        self._model = model
        self._fallback = fallback
        if use_xnnpack:
            self._avoid_xnnpack_misread()
        self.interpreter = make_interpreter(self._model, num_threads=num_threads, use_xnnpack=self.use_xnnpack)
        try:
            self.interpreter.allocate_tensors()
        except RuntimeError as e:
            if not (use_xnnpack and fallback):
                raise
            self._drop_xnnpack(e)
        self._batch = None
        self._can_resize = None

    def _avoid_xnnpack_misread(self) -> None:
        # XNNPACK takes a dynamic-range FULLY_CONNECTED whose int8 weight is stored in
        # blocks and reads the compressed values as a dense matrix: wrong outputs, or a
        # bus error that kills the process (ai-edge-litert 2.3). Never hand it such a file.
        from keras_rigl.tflite.flatbuffer import read_tflite_model
        from keras_rigl.tflite.structured import xnnpack_misread_ops

        if not isinstance(self._model, (bytes, bytearray, memoryview)):
            path = os.fspath(self._model)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no TFLite file at {path!r}")
            _, raw = read_tflite_model(path)
        else:
            raw = bytes(self._model)
        misread = xnnpack_misread_ops(raw)
        if not misread:
            return
        why = ("XNNPACK misreads block-sparse dynamic-range weights (" + "; ".join(misread[:3])
               + "): wrong outputs or a crash")
        if not self._fallback:
            raise RuntimeError(why + "; run this file with use_xnnpack=False")
        self.delegate_error = why
        warnings.warn("running without XNNPACK: " + why, RuntimeWarning, stacklevel=4)
        self.use_xnnpack = False

    def _drop_xnnpack(self, error: Exception) -> None:
        # e.g. int8 weights stored sparse (dynamic-range or full-integer FC):
        # the XNNPACK delegate refuses the densified int8 filters ("failed to
        # delegate CONV_2D node"). Run on the builtin kernels instead, and say so.
        self.delegate_error = _one_line(str(error))
        warnings.warn("XNNPACK could not prepare this model, running it without XNNPACK: "
                      + self.delegate_error[:300], RuntimeWarning, stacklevel=4)
        self.interpreter = make_interpreter(self._model, num_threads=self.num_threads, use_xnnpack=False)
        self.interpreter.allocate_tensors()
        self.use_xnnpack = False
        self._batch = None
        self._can_resize = None

    @property
    def input_details(self):
        return self.interpreter.get_input_details()

    @property
    def output_details(self):
        return self.interpreter.get_output_details()

    def _set_batch(self, batch: int) -> None:
        for d in self.interpreter.get_input_details():
            shape = list(d["shape"])
            shape[0] = batch
            self.interpreter.resize_tensor_input(d["index"], shape, strict=False)
        self.interpreter.allocate_tensors()

    def _resize(self, batch: int) -> bool:
        """Make the inputs take ``batch`` samples; False if the model cannot."""
        if self._batch == batch:
            return True
        if self._can_resize is False:
            if batch != 1:
                return False
        for attempt in (0, 1):
            try:
                self._set_batch(batch)
                self._batch = batch
                if batch != 1:
                    self._can_resize = True
                return True
            except RuntimeError as e:
                if attempt == 0 and self.use_xnnpack and self._fallback and "delegate" in str(e).lower():
                    self._drop_xnnpack(e)
                    continue
                if batch == 1:
                    raise
                break
        self._can_resize = False
        self._set_batch(1)  # the per-sample loop runs at batch 1
        self._batch = 1
        return False

    def set_inputs(self, xs: Sequence[np.ndarray]) -> None:
        details = self.interpreter.get_input_details()
        for d, x in zip(details, xs):
            self.interpreter.set_tensor(d["index"], _quantize_input(x, d))

    def invoke(self) -> None:
        self.interpreter.invoke()

    def _run(self, xs: Sequence[np.ndarray], dequantize: bool) -> list[np.ndarray]:
        """Set inputs, invoke (dropping XNNPACK if it fails to prepare), copy outputs."""
        batch = xs[0].shape[0]
        for attempt in (0, 1):
            if not self._resize(batch):
                return None
            self.set_inputs(xs)
            try:
                self.invoke()
            except RuntimeError as e:
                # LiteRT applies the default XNNPACK delegate lazily, at the first invoke.
                if attempt or not (self.use_xnnpack and self._fallback and "delegate" in str(e).lower()):
                    raise
                self._drop_xnnpack(e)
                continue
            return [o.copy() for o in self.get_outputs(dequantize)]
        return None  # pragma: no cover

    def warmup(self, x=None) -> None:
        """One invoke on zeros (or ``x``): applies the delegate, so ``delegate_error`` is known."""
        if x is None:
            xs = [np.zeros([1] + [int(s) for s in d["shape"][1:]], dtype=np.float32) for d in self.input_details]
        else:
            xs = [np.asarray(v) for v in (x if isinstance(x, (list, tuple)) else [x])]
        out = self._run(xs, True)
        if out is None:
            for i in range(xs[0].shape[0]):
                self._run([v[i:i + 1] for v in xs], True)

    def get_outputs(self, dequantize: bool = True) -> list[np.ndarray]:
        return [_dequantize_output(self.interpreter.get_tensor(d["index"]), d, dequantize)
                for d in self.interpreter.get_output_details()]

    def __call__(self, x, dequantize: bool = True, batch_size: int | None = None):
        details = self.interpreter.get_input_details()
        multi = isinstance(x, (list, tuple))
        xs = [np.asarray(v) for v in (x if multi else [x])]
        if len(xs) != len(details):
            raise ValueError(f"the model has {len(details)} input(s), got {len(xs)}")
        for d, v in zip(details, xs):
            want = tuple(int(s) for s in d["shape_signature"][1:]) if len(d["shape_signature"]) else ()
            if v.ndim != len(d["shape_signature"]) or any(w not in (-1, s) for w, s in zip(want, v.shape[1:])):
                raise ValueError(f"input {d['name']!r} expects shape (batch, {', '.join(map(str, want))}), "
                                 f"got {v.shape}; add the batch dimension / resize the data")
        n = xs[0].shape[0]
        if n == 0:
            raise ValueError("empty batch")
        step = batch_size or n
        chunks = []
        for start in range(0, n, step):
            part = [v[start:start + step] for v in xs]
            out = self._run(part, dequantize)
            if out is not None:
                chunks.append(out)
                continue
            for i in range(part[0].shape[0]):  # batch cannot be resized: one sample at a time
                out = self._run([v[i:i + 1] for v in part], dequantize)
                chunks.append(out)
        outs = [np.concatenate([c[k] for c in chunks], axis=0) for k in range(len(chunks[0]))]
        return outs if len(outs) > 1 else outs[0]


def tflite_predict(path: str | os.PathLike | bytes, x, num_threads: int | None = None,
                   use_xnnpack: bool = True, batch_size: int | None = None, dequantize: bool = True,
                   fallback: bool = True):
    """Outputs of a ``.tflite`` model for the batch ``x``.

    * ``x``: array with a leading batch dimension (or a list of arrays for
      several inputs).  The whole batch runs in one invoke when the input's
      batch dimension can be resized, else sample by sample;
      ``batch_size`` caps the batch per invoke.
    * int8/uint8 inputs are quantized with the input tensor's scale and
      zero point (float data) and int8/uint8 outputs are dequantized to
      float32 (``dequantize=False`` returns the raw integers).
    * Interpreter: LiteRT if installed, else ``tf.lite.Interpreter``;
      ``use_xnnpack=False`` runs the builtin kernels without XNNPACK. If
      XNNPACK refuses the model (sparse dynamic-range int8 weights do), it
      falls back to the builtin kernels with a ``RuntimeWarning`` unless
      ``fallback=False``.
    """
    runner = TFLiteRunner(path, num_threads=num_threads, use_xnnpack=use_xnnpack, fallback=fallback)
    return runner(x, dequantize=dequantize, batch_size=batch_size)


def xnnpack_delegate_status(model: str | os.PathLike | bytes) -> str:
    """``"ok"`` if the default XNNPACK delegate prepares and runs the model, else ``"refused: <why>"``.

    One invoke on zeros (LiteRT applies the delegate lazily, at the first
    invoke). Seen with TF 2.21 / LiteRT 2.3: sparse int8 weights (dynamic
    range or full integer) make the delegate fail, so such files run on the
    builtin kernels; float32 / float16 sparse files are accepted.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        runner = TFLiteRunner(model, num_threads=1, use_xnnpack=True, fallback=True)
        runner.warmup()
    if runner.delegate_error is None:
        return "ok"
    return "refused: " + runner.delegate_error
