"""Read a written ``.tflite`` flatbuffer back and describe its constant tensors.

Everything here is computed from the bytes of the file (parsed with
``tensorflow.lite.python.schema_py_generated``), never from our own
bookkeeping, so the report says what a device will actually load:

* one row per constant tensor (weights, biases, other constants) with its
  name, the op that consumes it, shape, dtype, storage format (``dense`` or
  ``sparse`` with the per-dimension format such as ``D,CSR`` or a block
  size), bytes stored (value buffer + sparsity index arrays), non-zeros and
  the bytes the same tensor would take dense;
* a ``note`` column saying why a tensor stayed dense (below the converter's
  sparsity threshold, rank not 2/4, op not sparsifiable, ...) and how a
  sparse one is executed (expanded once by a DENSIFY op, or consumed
  directly by a sparse kernel);
* file totals in ``df.attrs["totals"]`` (also printed with the table).

``densify_tensor`` decodes TFLite's sparse format (traversal order, block
map, dense / CSR dimension metadata) back to a dense numpy array so tests
can compare what reached the file with the Keras kernels.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "CONVERTER_MIN_SPARSITY",
    "TFLiteReport",
    "read_tflite_model",
    "tflite_weight_report",
    "tflite_tensor_values",
    "densify_tensor",
    "format_report",
]

# tensorflow/compiler/mlir/lite/transforms/dense_to_sparse.cc:
#   constexpr float kMinSparsityLevel = 0.3;
# ("If sparsity level is below this threshold, keep the tensor in dense
# format.")  Only constants of rank 2 or 4 feeding an op that implements the
# sparse-op interface (CONV_2D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV,
# FULLY_CONNECTED) are considered at all.
CONVERTER_MIN_SPARSITY = 0.3
# Block configurations are only chosen when block sparsity / random sparsity
# exceeds 0.9 (0.8 for quantized constants); otherwise the tensor is stored
# as plain CSR and a DENSIFY op is inserted in front of its consumer.
CONVERTER_BLOCK_RATIO = 0.9
CONVERTER_BLOCK_RATIO_QUANT = 0.8

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


def _schema():
    from tensorflow.lite.python import schema_py_generated as schema

    return schema


def _enum_names(enum_cls) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


_TYPE_INFO = {
    # TensorType name: (numpy dtype, bytes per element)
    "FLOAT32": (np.float32, 4),
    "FLOAT16": (np.float16, 2),
    "FLOAT64": (np.float64, 8),
    "INT32": (np.int32, 4),
    "UINT32": (np.uint32, 4),
    "INT64": (np.int64, 8),
    "UINT64": (np.uint64, 8),
    "INT16": (np.int16, 2),
    "UINT16": (np.uint16, 2),
    "INT8": (np.int8, 1),
    "UINT8": (np.uint8, 1),
    "BOOL": (np.bool_, 1),
}


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


def read_tflite_model(path_or_bytes: str | os.PathLike | bytes):
    """Parse a ``.tflite`` file (or its bytes) into the flatbuffer object API.

    Returns ``(model, raw_bytes)`` where ``model`` is a ``schema.ModelT``.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        raw = bytes(path_or_bytes)
    else:
        with open(os.fspath(path_or_bytes), "rb") as f:
            raw = f.read()
    schema = _schema()
    if len(raw) < 8 or raw[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (missing the 'TFL3' identifier)")
    return schema.ModelT.InitFromPackedBuf(raw, 0), raw


def _buffer_bytes(model, raw: bytes, buffer_index: int) -> bytes:
    if buffer_index is None or buffer_index <= 0 or buffer_index >= len(model.buffers):
        return b""
    buf = model.buffers[buffer_index]
    if buf.data is not None and len(buf.data):
        return np.asarray(buf.data, dtype=np.uint8).tobytes()
    # Large models keep buffers outside the flatbuffer (offset/size > 1).
    if getattr(buf, "offset", 0) and buf.offset > 1 and buf.size:
        return raw[buf.offset : buf.offset + buf.size]
    return b""


def _index_vector(vec_type: int, vec) -> np.ndarray:
    if vec is None or vec_type == 0:
        return np.zeros((0,), dtype=np.int32)
    dtype = {1: np.int32, 2: np.uint16, 3: np.uint8}[vec_type]
    values = vec.values if vec.values is not None else []
    return np.asarray(values, dtype=dtype)


def _sparsity_info(tensor) -> dict[str, Any] | None:
    sp = tensor.sparsity
    if sp is None:
        return None
    traversal = [int(v) for v in (sp.traversalOrder if sp.traversalOrder is not None else [])]
    block_map = [int(v) for v in (sp.blockMap if sp.blockMap is not None else [])]
    dims = []
    index_bytes = 0
    for dm in sp.dimMetadata or []:
        if dm.format == 0:  # DENSE
            dims.append({"format": "D", "size": int(dm.denseSize)})
        else:
            seg = _index_vector(dm.arraySegmentsType, dm.arraySegments)
            idx = _index_vector(dm.arrayIndicesType, dm.arrayIndices)
            index_bytes += seg.nbytes + idx.nbytes
            dims.append({"format": "CSR", "segments": seg, "indices": idx})
    rank = len(traversal) - len(block_map)
    block_size = []
    for k in range(len(block_map)):
        # Block dimensions come after the ``rank`` outer dimensions in the
        # metadata list, in traversal order.
        level = traversal.index(rank + k)
        block_size.append(int(dims[level].get("size", 1)))
    block_shape = [1] * rank
    for d, b in zip(block_map, block_size):
        block_shape[d] = b
    return {
        "block_shape": block_shape,
        "traversal_order": traversal,
        "block_map": block_map,
        "block_size": block_size,
        "dims": dims,
        "index_bytes": int(index_bytes),
        "rank": rank,
    }


def densify_tensor(model, raw: bytes, tensor_index: int, subgraph: int = 0) -> np.ndarray:
    """Decode a (possibly sparse) constant tensor to a dense numpy array.

    Sparse tensors are expanded from their traversal order / block map /
    CSR segment+index arrays (the same algorithm as TFLite's
    ``FormatConverter::SparseToDense``); dense tensors are returned as-is.
    The values are the stored ones (quantized integers stay integers; use
    ``tflite_tensor_values(..., dequantize=True)`` for real numbers).
    """
    schema = _schema()
    types = _enum_names(schema.TensorType)
    t = model.subgraphs[subgraph].tensors[tensor_index]
    dtype, _ = _TYPE_INFO[types[t.type]]
    data = np.frombuffer(_buffer_bytes(model, raw, t.buffer), dtype=dtype)
    shape = tuple(int(s) for s in (t.shape if t.shape is not None else []))
    info = _sparsity_info(t)
    if info is None:
        return data.reshape(shape).copy()
    rank = info["rank"]
    traversal = info["traversal_order"]
    block_map = info["block_map"]
    n_levels = len(traversal)
    # Walk the levels, keeping for every partial path its storage position
    # and its coordinates in the expanded (blocked) index space.
    pos = np.zeros((1,), dtype=np.int64)
    coords = np.zeros((n_levels, 1), dtype=np.int64)
    for level, dim in enumerate(info["dims"]):
        if dim["format"] == "D":
            size = dim["size"]
            new_pos = (pos[:, None] * size + np.arange(size)[None, :]).reshape(-1)
            new_coords = np.repeat(coords, size, axis=1)
            new_coords[level] = np.tile(np.arange(size), len(pos))
        else:
            seg = dim["segments"].astype(np.int64)
            idx = dim["indices"].astype(np.int64)
            starts, ends = seg[pos], seg[pos + 1]
            counts = ends - starts
            total = int(counts.sum())
            parent = np.repeat(np.arange(len(pos)), counts)
            offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            new_pos = np.repeat(starts, counts) + offsets
            new_coords = coords[:, parent]
            new_coords[level] = idx[new_pos]
        pos, coords = new_pos, new_coords
    # coords[level] is the coordinate of expanded dim traversal[level].
    expanded = np.zeros((n_levels, coords.shape[1]), dtype=np.int64)
    for level, edim in enumerate(traversal):
        expanded[edim] = coords[level]
    dense_idx = []
    for d in range(rank):
        c = expanded[d].copy()
        if d in block_map:
            k = block_map.index(d)
            c = c * info["block_size"][k] + expanded[rank + k]
        dense_idx.append(c)
    out = np.zeros(shape, dtype=dtype)
    out[tuple(dense_idx)] = data[pos]
    return out


def _quant_params(tensor):
    q = tensor.quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        return None
    scale = np.asarray(q.scale, dtype=np.float64)
    zp = np.asarray(q.zeroPoint if q.zeroPoint is not None else np.zeros_like(scale), dtype=np.int64)
    return scale, zp, int(q.quantizedDimension)


def tflite_tensor_values(path_or_model, tensor_index: int, dequantize: bool = True, raw: bytes | None = None,
                         subgraph: int = 0) -> np.ndarray:
    """Dense values of a constant tensor read from the flatbuffer.

    ``path_or_model`` is a path / bytes, or a ``ModelT`` together with ``raw``.
    Quantized tensors are mapped to real numbers with their (per-channel)
    scale and zero point when ``dequantize`` is true; float16 becomes float32.
    """
    if raw is None:
        model, raw = read_tflite_model(path_or_model)
    else:
        model = path_or_model
    t = model.subgraphs[subgraph].tensors[tensor_index]
    values = densify_tensor(model, raw, tensor_index, subgraph)
    qp = _quant_params(t)
    if dequantize and qp is not None and np.issubdtype(values.dtype, np.integer):
        scale, zp, axis = qp
        if scale.size > 1 and values.ndim:
            bshape = [1] * values.ndim
            bshape[axis] = -1
            scale, zp = scale.reshape(bshape), zp.reshape(bshape)
        return ((values.astype(np.float64) - zp) * scale).astype(np.float32)
    if dequantize and values.dtype == np.float16:
        return values.astype(np.float32)
    return values


def _consumers(subgraph) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = {}
    for op_i, op in enumerate(subgraph.operators):
        for in_i, t in enumerate(op.inputs if op.inputs is not None else []):
            if t >= 0:
                out.setdefault(int(t), []).append((op_i, in_i))
    return out


def tflite_weight_report(path_or_bytes: str | os.PathLike | bytes) -> TFLiteReport:
    """Per-constant-tensor storage table read back from a ``.tflite`` file.

    Columns: ``subgraph, tensor, name, op, role, shape, dtype, format,
    dim_format, block, quantization, size, nnz, density, bytes,
    index_bytes, dense_bytes, ratio, densify, note``.  ``bytes`` is what the
    file stores for the tensor (value buffer + sparsity index arrays),
    ``dense_bytes`` what the same tensor takes stored dense in its dtype.
    File totals are in ``df.attrs["totals"]``.
    """
    model, raw = read_tflite_model(path_or_bytes)
    schema = _schema()
    types = _enum_names(schema.TensorType)
    op_names = _enum_names(schema.BuiltinOperator)

    def op_name(op) -> str:
        code = model.operatorCodes[op.opcodeIndex]
        bc = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        if bc == schema.BuiltinOperator.CUSTOM:
            cc = code.customCode
            return "CUSTOM:" + (cc.decode() if isinstance(cc, bytes) else str(cc))
        return op_names.get(bc, str(bc))

    rows = []
    for sg_i, sg in enumerate(model.subgraphs):
        consumers = _consumers(sg)

        def final_use(t_index: int, via: tuple[str, ...] = ()):
            """(op name, input index, pass-through ops) of the real consumer."""
            uses = consumers.get(t_index, [])
            if not uses:
                return None, None, via
            op_i, in_i = uses[0]
            op = sg.operators[op_i]
            name = op_name(op)
            if name in _PASS_THROUGH_OPS and op.outputs is not None and len(op.outputs):
                return final_use(int(op.outputs[0]), via + (name,))
            return name, in_i, via

        for t_i, t in enumerate(sg.tensors):
            data = _buffer_bytes(model, raw, t.buffer)
            if not data:
                continue
            tname = t.name.decode() if isinstance(t.name, bytes) else str(t.name)
            type_name = types.get(t.type, str(t.type))
            dtype, itemsize = _TYPE_INFO.get(type_name, (np.uint8, 1))
            shape = tuple(int(s) for s in (t.shape if t.shape is not None else []))
            size = int(np.prod(shape)) if shape else 1
            info = _sparsity_info(t)
            if len(data) % itemsize == 0:
                stored = np.frombuffer(data, dtype=dtype)
            else:  # e.g. packed int4 / strings
                stored = np.frombuffer(data, dtype=np.uint8)
            qp = _quant_params(t)
            zero_val = 0
            if qp is not None and qp[0].size == 1:
                zero_val = int(qp[1][0])
            nnz = int(np.count_nonzero(stored != zero_val))
            index_bytes = info["index_bytes"] if info else 0
            nbytes = len(data) + index_bytes
            dense_bytes = size * itemsize
            op, in_i, via = final_use(t_i)
            role = "const"
            if op in _WEIGHT_OPS:
                w_i, b_i = _WEIGHT_OPS[op]
                role = "weight" if in_i == w_i else ("bias" if in_i == b_i else "const")
            if info is not None:
                fmt = "sparse"
                dim_format = ",".join(d["format"] for d in info["dims"])
                block = "x".join(str(b) for b in info["block_shape"]) if info["block_size"] else ""
                kind = f"block {block}" if block else "CSR (random)"
                if "DENSIFY" in via:
                    note = f"{kind}; expanded once to dense by a DENSIFY op at load time (compute stays dense)"
                else:
                    note = f"{kind}; read directly by the sparse {op} kernel"
                if nbytes > dense_bytes:
                    note += (f"; {nbytes - dense_bytes:,} bytes LARGER than dense: at {nnz / size:.0%} density the "
                             "index arrays cost more than the zeros save (the converter only checks >= 30% zeros)")
            else:
                fmt = "dense"
                dim_format = ""
                block = ""
                sparsity = 1.0 - nnz / size if size else 0.0
                if role != "weight":
                    note = "not a conv/fc weight: the converter only encodes conv/fc weights"
                elif len(shape) not in (2, 4):
                    note = f"rank {len(shape)}: the converter only encodes rank-2/4 weights"
                elif op not in _SPARSIFIABLE_OPS:
                    note = f"{op} weights are not sparsified by the converter"
                elif sparsity < CONVERTER_MIN_SPARSITY:
                    note = (f"kept dense: {sparsity:.0%} zeros < converter threshold "
                            f"{CONVERTER_MIN_SPARSITY:.0%} (kMinSparsityLevel)")
                    if op == "DEPTHWISE_CONV_2D" and sparsity == 0:
                        note += "; depthwise kernels are not masked unless sparsify(..., mask_depthwise=True)"
                else:
                    note = (f"kept dense although {sparsity:.0%} zeros >= {CONVERTER_MIN_SPARSITY:.0%}: "
                            "exported without EXPERIMENTAL_SPARSITY")
            if qp is None:
                quant = ""
            else:
                quant = "per-tensor" if qp[0].size == 1 else f"per-channel(axis {qp[2]}, {qp[0].size})"
            rows.append({
                "subgraph": sg_i,
                "tensor": t_i,
                "name": tname,
                "op": op or "",
                "role": role,
                "shape": shape,
                "dtype": type_name.lower(),
                "format": fmt,
                "dim_format": dim_format,
                "block": block,
                "quantization": quant,
                "size": size,
                "nnz": nnz,
                "density": (nnz / size) if size else 0.0,
                "bytes": int(nbytes),
                "index_bytes": int(index_bytes),
                "dense_bytes": int(dense_bytes),
                "ratio": (nbytes / dense_bytes) if dense_bytes else 1.0,
                "densify": "DENSIFY" in via,
                "note": note,
            })
    columns = ["subgraph", "tensor", "name", "op", "role", "shape", "dtype", "format", "dim_format", "block",
               "quantization", "size", "nnz", "density", "bytes", "index_bytes", "dense_bytes", "ratio",
               "densify", "note"]
    df = TFLiteReport(rows, columns=columns)
    weights = df[df["role"] == "weight"] if len(df) else df
    totals = {
        "file_bytes": len(raw),
        "const_tensors": int(len(df)),
        "sparse_tensors": int((df["format"] == "sparse").sum()) if len(df) else 0,
        "dense_tensors": int((df["format"] == "dense").sum()) if len(df) else 0,
        "const_bytes": int(df["bytes"].sum()) if len(df) else 0,
        "const_dense_bytes": int(df["dense_bytes"].sum()) if len(df) else 0,
        "index_bytes": int(df["index_bytes"].sum()) if len(df) else 0,
        "weight_size": int(weights["size"].sum()) if len(weights) else 0,
        "weight_nnz": int(weights["nnz"].sum()) if len(weights) else 0,
        "weight_bytes": int(weights["bytes"].sum()) if len(weights) else 0,
        "weight_dense_bytes": int(weights["dense_bytes"].sum()) if len(weights) else 0,
        "densify_ops": int(sum(1 for sg in model.subgraphs for op in sg.operators if op_name(op) == "DENSIFY")),
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
    df.attrs["totals"] = totals
    df.attrs["converter_min_sparsity"] = CONVERTER_MIN_SPARSITY
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
