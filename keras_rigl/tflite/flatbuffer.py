"""Read a ``.tflite`` flatbuffer: the one parser every other module of this package uses.

The schema comes from one source, ``tensorflow.lite.python.schema_py_generated``
(TensorFlow is an install requirement; ``ai_edge_litert`` is optional). What
this module offers, all computed from the bytes of the file:

* :func:`read_tflite_model` -- parse a path or bytes into the object API
  (``ModelT``), refusing files that are not complete TFLite flatbuffers;
* :func:`op_name` -- ``"CONV_2D"``, ``"CUSTOM:Name"``, ...;
* :func:`tensor_shape`, :func:`tensor_type_name`, :func:`buffer_bytes`,
  :func:`quant_params`, :func:`sparsity_info`;
* :func:`densify_tensor` -- decode TFLite's sparse format (traversal order,
  block map, dense / CSR dimension metadata) to a dense array of the stored
  dtype, vectorised;
* :func:`tflite_tensor_values` -- the same, dequantized to real numbers;
* :func:`producers` / :func:`consumers` -- the graph's edges.
"""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

__all__ = [
    "TYPE_INFO",
    "read_tflite_model",
    "schema",
    "op_name",
    "tensor_name",
    "tensor_shape",
    "tensor_type_name",
    "buffer_bytes",
    "quant_params",
    "sparsity_info",
    "densify_tensor",
    "tflite_tensor_values",
    "producers",
    "consumers",
]

# TensorType names that decode to a NumPy dtype of the same (lower-case) name.
_NUMPY_TYPES = ("FLOAT32", "FLOAT16", "FLOAT64", "INT32", "UINT32", "INT64", "UINT64", "INT16", "UINT16", "INT8",
                "UINT8", "BOOL")
#: TensorType name -> (numpy dtype, bytes per element)
TYPE_INFO = {name: (np.dtype(name.lower()).type, np.dtype(name.lower()).itemsize) for name in _NUMPY_TYPES}
# DimensionMetadata index vectors (SparseIndexVector union): Int32Vector, Uint16Vector, Uint8Vector
_INDEX_DTYPES = {1: np.int32, 2: np.uint16, 3: np.uint8}


def schema():
    """The flatbuffer schema module (``tensorflow.lite.python.schema_py_generated``)."""
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


def _enum_names(enum_cls) -> dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


_NAMES: dict[str, dict[int, str]] = {}


def _names(enum: str) -> dict[int, str]:
    if enum not in _NAMES:
        _NAMES[enum] = _enum_names(getattr(schema(), enum))
    return _NAMES[enum]


def _describe(source) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "the given bytes"
    return repr(os.fspath(source))


def read_tflite_model(path_or_bytes: str | os.PathLike | bytes):
    """Parse a ``.tflite`` file (or its bytes) into the flatbuffer object API.

    Returns ``(model, raw_bytes)`` where ``model`` is a ``schema.ModelT``.
    Raises a one-line ``ValueError`` for bytes that are not a TFLite
    flatbuffer or are cut short (an interrupted copy or write).
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        raw = bytes(path_or_bytes)
    else:
        with open(os.fspath(path_or_bytes), "rb") as f:
            raw = f.read()
    where = _describe(path_or_bytes)
    if len(raw) < 8 or raw[4:8] != b"TFL3":
        raise ValueError(f"{where} is not a TFLite flatbuffer (missing the 'TFL3' identifier); "
                         "export it with keras_rigl.export_tflite")
    try:
        model = schema().ModelT.InitFromPackedBuf(raw, 0)
    except (struct.error, IndexError, ValueError, TypeError) as e:
        raise ValueError(f"{where} is not a complete .tflite flatbuffer ({len(raw):,} bytes, cut short or "
                         f"corrupted: {type(e).__name__}); re-export it") from None
    for index, buf in enumerate(model.buffers or []):
        # Large models keep buffers after the flatbuffer (offset/size); a cut file loses them.
        if getattr(buf, "offset", 0) and buf.offset > 1 and buf.offset + buf.size > len(raw):
            raise ValueError(f"{where} is not a complete .tflite flatbuffer (buffer {index} ends at byte "
                             f"{buf.offset + buf.size:,} of {len(raw):,}); re-export it")
    return model, raw


def op_name(model, op) -> str:
    """Builtin operator name of ``op`` (``"CONV_2D"``), or ``"CUSTOM:<code>"``."""
    code = model.operatorCodes[op.opcodeIndex]
    builtin = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
    if builtin == schema().BuiltinOperator.CUSTOM:
        custom = code.customCode
        return "CUSTOM:" + (custom.decode() if isinstance(custom, bytes) else str(custom))
    return _names("BuiltinOperator").get(builtin, str(builtin))


def tensor_name(tensor) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def tensor_shape(tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in (tensor.shape if tensor.shape is not None else []))


def tensor_type_name(tensor) -> str:
    """``"FLOAT32"``, ``"INT8"``, ... (the schema's TensorType name)."""
    return _names("TensorType").get(tensor.type, str(tensor.type))


def buffer_bytes(model, raw: bytes, buffer_index: int | None) -> bytes:
    """The bytes stored for buffer ``buffer_index`` (empty for none / buffer 0)."""
    if buffer_index is None or buffer_index <= 0 or buffer_index >= len(model.buffers):
        return b""
    buf = model.buffers[buffer_index]
    if buf.data is not None and len(buf.data):
        return np.asarray(buf.data, dtype=np.uint8).tobytes()
    if getattr(buf, "offset", 0) and buf.offset > 1 and buf.size:
        return raw[buf.offset: buf.offset + buf.size]
    return b""


def quant_params(tensor):
    """``(scale, zero_point, axis)`` arrays of a quantized tensor, else None."""
    q = tensor.quantization
    if q is None or q.scale is None or len(q.scale) == 0:
        return None
    scale = np.asarray(q.scale, dtype=np.float64)
    zero_point = np.asarray(q.zeroPoint if q.zeroPoint is not None else np.zeros_like(scale), dtype=np.int64)
    return scale, zero_point, int(q.quantizedDimension)


def _index_vector(vec_type: int, vec) -> np.ndarray:
    if vec is None or vec_type == 0:
        return np.zeros((0,), dtype=np.int32)
    values = vec.values if vec.values is not None else []
    return np.asarray(values, dtype=_INDEX_DTYPES[vec_type])


def sparsity_info(tensor) -> dict[str, Any] | None:
    """Decoded sparsity metadata of a tensor stored sparse, else None.

    Keys: ``rank`` (of the dense tensor), ``traversal_order``, ``block_map``,
    ``block_size``, ``block_shape`` (per dense dimension, 1 where unblocked),
    ``dims`` (per stored level: ``{"format": "D", "size"}`` or ``{"format":
    "CSR", "segments", "indices"}``) and ``index_bytes``.
    """
    sp = tensor.sparsity
    if sp is None:
        return None
    traversal = [int(v) for v in (sp.traversalOrder if sp.traversalOrder is not None else [])]
    block_map = [int(v) for v in (sp.blockMap if sp.blockMap is not None else [])]
    dims = []
    index_bytes = 0
    for meta in sp.dimMetadata or []:
        if meta.format == 0:  # DENSE
            dims.append({"format": "D", "size": int(meta.denseSize)})
        else:
            segments = _index_vector(meta.arraySegmentsType, meta.arraySegments)
            indices = _index_vector(meta.arrayIndicesType, meta.arrayIndices)
            index_bytes += segments.nbytes + indices.nbytes
            dims.append({"format": "CSR", "segments": segments, "indices": indices})
    rank = len(traversal) - len(block_map)
    # Block dimensions come after the ``rank`` outer dimensions, in traversal order.
    block_size = [int(dims[traversal.index(rank + k)].get("size", 1)) for k in range(len(block_map))]
    block_shape = [1] * rank
    for dim, size in zip(block_map, block_size):
        block_shape[dim] = size
    return {"block_shape": block_shape, "traversal_order": traversal, "block_map": block_map,
            "block_size": block_size, "dims": dims, "index_bytes": int(index_bytes), "rank": rank}


def _stored_values(model, raw: bytes, tensor) -> np.ndarray:
    type_name = tensor_type_name(tensor)
    if type_name not in TYPE_INFO:
        raise ValueError(f"tensor {tensor_name(tensor)!r} has type {type_name}, which cannot be decoded to an array")
    return np.frombuffer(buffer_bytes(model, raw, tensor.buffer), dtype=TYPE_INFO[type_name][0])


def _walk_levels(info: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Storage position and per-level coordinate of every stored value.

    Walks the stored levels, keeping for every partial path its position in
    storage and its coordinates in the expanded (blocked) index space -- the
    algorithm of TFLite's ``FormatConverter::SparseToDense``, on arrays.
    """
    pos = np.zeros((1,), dtype=np.int64)
    coords = np.zeros((len(info["traversal_order"]), 1), dtype=np.int64)
    for level, dim in enumerate(info["dims"]):
        if dim["format"] == "D":
            size = dim["size"]
            new_pos = (pos[:, None] * size + np.arange(size)[None, :]).reshape(-1)
            new_coords = np.repeat(coords, size, axis=1)
            new_coords[level] = np.tile(np.arange(size), len(pos))
        else:
            segments = dim["segments"].astype(np.int64)
            indices = dim["indices"].astype(np.int64)
            starts, ends = segments[pos], segments[pos + 1]
            counts = ends - starts
            parent = np.repeat(np.arange(len(pos)), counts)
            offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            new_pos = np.repeat(starts, counts) + offsets
            new_coords = coords[:, parent]
            new_coords[level] = indices[new_pos]
        pos, coords = new_pos, new_coords
    return pos, coords


def densify_tensor(model, raw: bytes, tensor_index: int, subgraph: int = 0) -> np.ndarray:
    """Decode a (possibly sparse) constant tensor to a dense array of its stored dtype.

    Dense tensors are returned reshaped. Quantized integers stay integers and
    float16 stays float16; :func:`tflite_tensor_values` maps them to reals.
    """
    tensor = model.subgraphs[subgraph].tensors[tensor_index]
    data = _stored_values(model, raw, tensor)
    shape = tensor_shape(tensor)
    info = sparsity_info(tensor)
    if info is None:
        return data.reshape(shape).copy()
    pos, coords = _walk_levels(info)
    rank, traversal, block_map = info["rank"], info["traversal_order"], info["block_map"]
    expanded = np.zeros_like(coords)  # coords[level] is the coordinate of expanded dim traversal[level]
    for level, expanded_dim in enumerate(traversal):
        expanded[expanded_dim] = coords[level]
    dense_index = []
    for dim in range(rank):
        index = expanded[dim]
        if dim in block_map:
            k = block_map.index(dim)
            index = index * info["block_size"][k] + expanded[rank + k]
        dense_index.append(index)
    out = np.zeros(shape, dtype=data.dtype)
    out[tuple(dense_index)] = data[pos]
    return out


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
    tensor = model.subgraphs[subgraph].tensors[tensor_index]
    values = densify_tensor(model, raw, tensor_index, subgraph)
    params = quant_params(tensor)
    if dequantize and params is not None and np.issubdtype(values.dtype, np.integer):
        scale, zero_point, axis = params
        if scale.size > 1 and values.ndim:
            shape = [1] * values.ndim
            shape[axis] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        return ((values.astype(np.float64) - zero_point) * scale).astype(np.float32)
    if dequantize and values.dtype == np.float16:
        return values.astype(np.float32)
    return values


def producers(subgraph) -> dict[int, int]:
    """``{tensor index: index of the operator that writes it}``."""
    return {int(t): op_index for op_index, op in enumerate(subgraph.operators)
            for t in (op.outputs if op.outputs is not None else [])}


def consumers(subgraph) -> dict[int, list[tuple[int, int]]]:
    """``{tensor index: [(operator index, input position), ...]}``."""
    out: dict[int, list[tuple[int, int]]] = {}
    for op_index, op in enumerate(subgraph.operators):
        for position, t in enumerate(op.inputs if op.inputs is not None else []):
            if t >= 0:
                out.setdefault(int(t), []).append((op_index, position))
    return out
