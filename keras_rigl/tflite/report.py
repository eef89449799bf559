"""Read a written ``.tflite`` flatbuffer back and describe its constant tensors.

Everything here is computed from the bytes of the file (parsed by
:mod:`keras_rigl.tflite.flatbuffer`), never from our own bookkeeping, so the
report says what a device will actually load:

* one row per constant tensor (weights, biases, other constants) with its
  name, the op that consumes it, shape, dtype, storage format (``dense`` or
  ``sparse`` with the per-dimension format such as ``D,CSR`` or a block
  size), bytes stored (value buffer + sparsity index arrays), non-zeros and
  the bytes the same tensor would take dense;
* a ``note`` column saying why a tensor stayed dense (below the converter's
  sparsity threshold, rank not 2/4, op not sparsifiable, ...) and how a
  sparse one is executed (expanded once by a DENSIFY op, or consumed
  directly by a sparse kernel);
* file totals in ``df.attrs["totals"]`` (also printed with the table), and
  the quantization the file really holds in ``df.attrs["file_quantize"]``.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from keras_rigl.tflite.flatbuffer import (
    TYPE_INFO,
    buffer_bytes,
    consumers,
    op_name,
    quant_params,
    read_tflite_model,
    sparsity_info,
    tensor_name,
    tensor_shape,
    tensor_type_name,
)

__all__ = ["CONVERTER_MIN_SPARSITY", "TFLiteReport", "tflite_weight_report", "file_quantization", "format_report"]

# tensorflow/compiler/mlir/lite/transforms/dense_to_sparse.cc:
#   constexpr float kMinSparsityLevel = 0.3;
# ("If sparsity level is below this threshold, keep the tensor in dense
# format.")  Only constants of rank 2 or 4 feeding an op that implements the
# sparse-op interface (CONV_2D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV,
# FULLY_CONNECTED) are considered at all.
CONVERTER_MIN_SPARSITY = 0.3

_WEIGHT_OPS = {
    # op name: (weight input index, bias input index)
    "CONV_2D": (1, 2),
    "DEPTHWISE_CONV_2D": (1, 2),
    "FULLY_CONNECTED": (1, 2),
    "TRANSPOSE_CONV": (1, 3),
    "CONV_3D": (1, 2),
}
_SPARSIFIABLE_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"}
_PASS_THROUGH_OPS = {"DENSIFY", "DEQUANTIZE"}
_REPORT_COLUMNS = ["name", "op", "role", "shape", "dtype", "format", "dim_format", "block", "bytes", "nnz",
                   "dense_bytes", "density", "note"]


class TFLiteReport(pd.DataFrame):
    """A DataFrame that also prints the file totals kept in ``attrs``."""

    @property
    def _constructor(self):
        return TFLiteReport

    def _is_full_report(self) -> bool:
        return set(_REPORT_COLUMNS).issubset(self.columns) and self.index.is_unique

    def __repr__(self) -> str:  # pragma: no cover - formatting only
        if not self._is_full_report():
            return pd.DataFrame(self).__repr__()
        return format_report(self)

    def __str__(self) -> str:  # pragma: no cover - formatting only
        return self.__repr__()


_COLUMNS = ["subgraph", "tensor", "name", "op", "role", "shape", "dtype", "format", "dim_format", "block",
            "quantization", "size", "nnz", "density", "bytes", "index_bytes", "dense_bytes", "ratio",
            "densify", "note"]


def _final_use(model, subgraph, uses, tensor_index: int, via: tuple[str, ...] = ()):
    """(op name, input position, pass-through ops on the way) of the op that really reads a tensor."""
    if not uses.get(tensor_index):
        return None, None, via
    op_index, position = uses[tensor_index][0]
    op = subgraph.operators[op_index]
    name = op_name(model, op)
    if name in _PASS_THROUGH_OPS and op.outputs is not None and len(op.outputs):
        return _final_use(model, subgraph, uses, int(op.outputs[0]), via + (name,))
    return name, position, via


def _role(op, position) -> str:
    if op not in _WEIGHT_OPS:
        return "const"
    weight, bias = _WEIGHT_OPS[op]
    return "weight" if position == weight else ("bias" if position == bias else "const")


def _sparse_note(block, op, via, nbytes, dense_bytes, density) -> str:
    kind = f"block {block}" if block else "CSR (random)"
    if "DENSIFY" in via:
        note = f"{kind}; expanded once to dense by a DENSIFY op at load time (compute stays dense)"
    else:
        note = f"{kind}; read directly by the sparse {op} kernel"
    if nbytes > dense_bytes:
        note += (f"; {nbytes - dense_bytes:,} bytes LARGER than dense: at {density:.0%} density the "
                 "index arrays cost more than the zeros save (the converter only checks >= 30% zeros)")
    return note


def _dense_note(op, role, shape, sparsity) -> str:
    """Why the converter kept this tensor dense."""
    if role != "weight":
        return "not a conv/fc weight: the converter only encodes conv/fc weights"
    if len(shape) not in (2, 4):
        return f"rank {len(shape)}: the converter only encodes rank-2/4 weights"
    if op not in _SPARSIFIABLE_OPS:
        return f"{op} weights are not sparsified by the converter"
    if sparsity < CONVERTER_MIN_SPARSITY:
        note = (f"kept dense: {sparsity:.0%} zeros < converter threshold "
                f"{CONVERTER_MIN_SPARSITY:.0%} (kMinSparsityLevel)")
        if op == "DEPTHWISE_CONV_2D" and sparsity == 0:
            note += "; depthwise kernels are not masked unless sparsify(..., mask_depthwise=True)"
        return note
    return (f"kept dense although {sparsity:.0%} zeros >= {CONVERTER_MIN_SPARSITY:.0%}: "
            "exported without EXPERIMENTAL_SPARSITY")


def _tensor_row(model, raw, subgraph, uses, subgraph_index, tensor_index):
    tensor = subgraph.tensors[tensor_index]
    data = buffer_bytes(model, raw, tensor.buffer)
    if not data:
        return None
    type_name = tensor_type_name(tensor)
    dtype, itemsize = TYPE_INFO.get(type_name, (np.uint8, 1))
    shape = tensor_shape(tensor)
    size = int(np.prod(shape)) if shape else 1
    info = sparsity_info(tensor)
    # packed int4 / strings do not divide into elements: count bytes
    stored = np.frombuffer(data, dtype=dtype if len(data) % itemsize == 0 else np.uint8)
    params = quant_params(tensor)
    zero_value = int(params[1][0]) if params is not None and params[0].size == 1 else 0
    nnz = int(np.count_nonzero(stored != zero_value))
    index_bytes = info["index_bytes"] if info else 0
    nbytes = len(data) + index_bytes
    dense_bytes = size * itemsize
    op, position, via = _final_use(model, subgraph, uses, tensor_index)
    role = _role(op, position)
    if info is not None:
        fmt, dim_format = "sparse", ",".join(d["format"] for d in info["dims"])
        block = "x".join(str(b) for b in info["block_shape"]) if info["block_size"] else ""
        note = _sparse_note(block, op, via, nbytes, dense_bytes, nnz / size if size else 0.0)
    else:
        fmt, dim_format, block = "dense", "", ""
        note = _dense_note(op, role, shape, 1.0 - nnz / size if size else 0.0)
    if params is None:
        quantization = ""
    else:
        quantization = "per-tensor" if params[0].size == 1 else f"per-channel(axis {params[2]}, {params[0].size})"
    return {
        "subgraph": subgraph_index, "tensor": tensor_index, "name": tensor_name(tensor), "op": op or "",
        "role": role, "shape": shape, "dtype": type_name.lower(), "format": fmt, "dim_format": dim_format,
        "block": block, "quantization": quantization, "size": size, "nnz": nnz,
        "density": (nnz / size) if size else 0.0, "bytes": int(nbytes), "index_bytes": int(index_bytes),
        "dense_bytes": int(dense_bytes), "ratio": (nbytes / dense_bytes) if dense_bytes else 1.0,
        "densify": "DENSIFY" in via, "note": note,
    }


def _totals(model, raw, df) -> dict:
    weights = df[df["role"] == "weight"] if len(df) else df

    def total(frame, column):
        return int(frame[column].sum()) if len(frame) else 0

    totals = {
        "file_bytes": len(raw),
        "const_tensors": int(len(df)),
        "sparse_tensors": int((df["format"] == "sparse").sum()) if len(df) else 0,
        "dense_tensors": int((df["format"] == "dense").sum()) if len(df) else 0,
        "const_bytes": total(df, "bytes"),
        "const_dense_bytes": total(df, "dense_bytes"),
        "index_bytes": total(df, "index_bytes"),
        "weight_size": total(weights, "size"),
        "weight_nnz": total(weights, "nnz"),
        "weight_bytes": total(weights, "bytes"),
        "weight_dense_bytes": total(weights, "dense_bytes"),
        "densify_ops": sum(1 for sg in model.subgraphs for op in sg.operators if op_name(model, op) == "DENSIFY"),
    }
    totals["other_bytes"] = totals["file_bytes"] - totals["const_bytes"]
    # per-channel quantization parameters (float32 scale + int64 zero point per
    # channel, on every quantized tensor incl. DENSIFY outputs) are a fixed
    # cost that does not shrink with sparsity
    totals["quant_param_bytes"] = int(sum(
        12 * len(t.quantization.scale)
        for sg in model.subgraphs for t in sg.tensors
        if t.quantization is not None and t.quantization.scale is not None))
    totals["weight_density"] = (totals["weight_nnz"] / totals["weight_size"]) if totals["weight_size"] else 0.0
    return totals


def file_quantization(model, df) -> str | None:
    """The ``quantize`` mode a file holds, read from its tensor types (``df``: its weight report).

    ``"int8"`` when the main graph's inputs and outputs are int8 and every
    conv/fc weight is int8; ``"dynamic"`` when float inputs meet int8 weights
    (small weights may stay float32); ``"float16"`` when every conv/fc weight
    is float16; ``None`` (float32) when every weight is float32; ``"mixed"``
    for anything else.
    """
    graph = model.subgraphs[0]
    io_types = {tensor_type_name(graph.tensors[t]) for t in list(graph.inputs) + list(graph.outputs)}
    weight_types = set(df.loc[df["role"] == "weight", "dtype"]) if len(df) else set()
    if io_types == {"INT8"} and weight_types <= {"int8"}:
        return "int8"
    if io_types & {"INT8", "UINT8"}:
        return "mixed"
    if weight_types <= {"float32"}:
        return None
    if weight_types <= {"float16"}:
        return "float16"
    if "int8" in weight_types and weight_types <= {"int8", "float32"}:
        return "dynamic"
    return "mixed"


def tflite_weight_report(path_or_bytes: str | os.PathLike | bytes) -> TFLiteReport:
    """Per-constant-tensor storage table read back from a ``.tflite`` file.

    Columns: ``subgraph, tensor, name, op, role, shape, dtype, format,
    dim_format, block, quantization, size, nnz, density, bytes,
    index_bytes, dense_bytes, ratio, densify, note``.  ``bytes`` is what the
    file stores for the tensor (value buffer + sparsity index arrays),
    ``dense_bytes`` what the same tensor takes stored dense in its dtype.
    File totals are in ``df.attrs["totals"]``; the quantization the file
    holds (:func:`file_quantization`) in ``df.attrs["file_quantize"]``.
    A file that is not a complete TFLite flatbuffer raises ``ValueError``.
    """
    model, raw = read_tflite_model(path_or_bytes)
    rows = []
    for subgraph_index, subgraph in enumerate(model.subgraphs):
        uses = consumers(subgraph)
        for tensor_index in range(len(subgraph.tensors)):
            row = _tensor_row(model, raw, subgraph, uses, subgraph_index, tensor_index)
            if row is not None:
                rows.append(row)
    df = TFLiteReport(rows, columns=_COLUMNS)
    df.attrs["totals"] = _totals(model, raw, df)
    df.attrs["converter_min_sparsity"] = CONVERTER_MIN_SPARSITY
    df.attrs["file_quantize"] = file_quantization(model, df)
    if not isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        df.attrs["path"] = os.fspath(path_or_bytes)
    return df


def format_report(df: pd.DataFrame, max_name: int = 40, max_rows: int | None = None) -> str:
    """Human-readable table (shortened names) followed by the file totals."""
    if len(df):
        view = pd.DataFrame(df).copy()
        view["name"] = view["name"].map(lambda s: s if len(s) <= max_name else "..." + s[-(max_name - 3):])
        view["shape"] = view["shape"].map(lambda s: "x".join(map(str, s)) if s else "scalar")
        view["format"] = [f if not d else f"{f} {d}" + (f" [{b}]" if b else "")
                          for f, d, b in zip(view["format"], view["dim_format"], view["block"])]
        view["density"] = view["density"].map(lambda v: f"{v:.3f}")
        cols = ["name", "op", "role", "shape", "dtype", "format", "bytes", "nnz", "dense_bytes", "density", "note"]
        with pd.option_context("display.max_rows", max_rows if max_rows else len(view) + 1,
                               "display.max_colwidth", 110, "display.width", 250):
            table = view[cols].to_string(index=False)
    else:
        table = "(no constant tensors)"
    t = df.attrs.get("totals")
    if not t:
        return table
    lines = [table, "",
             f"file: {t['file_bytes']:,} bytes | constants: {t['const_bytes']:,} bytes stored "
             f"({t['index_bytes']:,} of them sparsity indices) vs {t['const_dense_bytes']:,} dense | "
             f"graph/metadata: {t['other_bytes']:,} bytes"
             + (f" (quantization params ~{t['quant_param_bytes']:,})" if t.get("quant_param_bytes") else ""),
             f"weights: {t['weight_nnz']:,}/{t['weight_size']:,} non-zero ({t['weight_density']:.3f}); "
             f"{t['weight_bytes']:,} bytes stored vs {t['weight_dense_bytes']:,} dense | "
             f"sparse tensors: {t['sparse_tensors']}, dense: {t['dense_tensors']}, DENSIFY ops: {t['densify_ops']}"]
    extra = {k: v for k, v in df.attrs.items() if k in ("quantize", "sparse", "target", "path")}
    if "xnnpack_delegate" in df.attrs:
        lines.append(f"XNNPACK delegate on this file: {df.attrs['xnnpack_delegate'][:200]}")
    if extra:
        lines.append("export: " + ", ".join(f"{k}={v}" for k, v in extra.items()))
    return "\n".join(lines)
