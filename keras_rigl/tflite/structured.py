"""Block-sparse FULLY_CONNECTED weights: which Dense layers TFLite runs on its sparse kernels.

What the TF 2.21 converter does on its own with ``Optimize.EXPERIMENTAL_SPARSITY``
(tensorflow/compiler/mlir/lite/transforms/dense_to_sparse.cc, FullyConnectedOp's
``GetFloatBlockSize`` / ``GetQuantizedBlockSize``):

* a FULLY_CONNECTED weight with >= 30 % zeros is stored sparse;
* a float32 weight is stored in **1x4** blocks (4 consecutive inputs of one
  output unit), an int8 weight (``quantize="dynamic"`` or ``"int8"``) in
  **1x16** blocks, when the sparsity counted in whole blocks is more than 0.9
  (float) / 0.8 (int8) of the element sparsity -- i.e. when the zeros really
  come in such blocks;
* otherwise it is stored CSR and a DENSIFY op expands it at load time.

No converter option asks for blocks: the masks decide. Masks in 1x4 blocks give
1x4 float weights; int8 needs masks in 1x16 blocks (1x4 masks leave int8
weights CSR + DENSIFY). The file's encoding is what counts, so everything here is
read back from the written flatbuffer.

Which kernel runs a block-sparse FULLY_CONNECTED (LiteRT 2.3, builtin ops):

* float32 1x4 -> ``FullyConnectedSparseWeight1x4``; XNNPACK leaves the op to it;
* full int8 1x16 -> ``FullyConnectedSparseWeight1x16``; XNNPACK leaves the op to it;
* dynamic range (float input, int8 weight) 1x16 -> the sparse hybrid kernel, but
  only without XNNPACK: the XNNPACK delegate takes the op and reads the
  compressed block values as a dense matrix (wrong outputs, or a bus error when
  it reads past the buffer), seen with ai-edge-litert 2.3.
  :func:`xnnpack_misread_ops` finds such ops; :class:`~keras_rigl.tflite.TFLiteRunner`
  and ``export_tflite`` run those files without XNNPACK.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from keras_rigl.tflite.flatbuffer import (
    densify_tensor,
    op_name,
    producers,
    read_tflite_model,
    sparsity_info,
    tensor_shape,
    tensor_type_name,
)

__all__ = [
    "FLOAT_FC_BLOCK",
    "INT8_FC_BLOCK",
    "kernel_block_size",
    "fully_connected_ops",
    "xnnpack_misread_ops",
    "block_sparse_layers",
    "pad_dense_inputs",
    "check_block_shapes",
]

#: block size (consecutive inputs of one output unit) of TFLite's float sparse FC kernel
FLOAT_FC_BLOCK = 4
#: block size of TFLite's int8 sparse FC kernels (full int8 and dynamic range)
INT8_FC_BLOCK = 16
_CANDIDATE_BLOCKS = (16, 8, 4, 2)


def kernel_block_size(mask, candidates=_CANDIDATE_BLOCKS) -> int:
    """Largest k in ``candidates`` such that ``mask`` is made of 1xk blocks, else 1.

    ``mask`` is a Keras Dense kernel mask of shape ``(inputs, outputs)`` (or a
    conv kernel ``(..., inputs, outputs)``): a 1xk block is k consecutive inputs
    of one output unit, starting at a multiple of k -- TFLite's layout of the
    transposed ``(outputs, inputs)`` FULLY_CONNECTED weight. A last, shorter
    group (inputs not a multiple of k) must be all on or all off as well.
    """
    mask = np.asarray(mask) != 0
    if mask.ndim < 2:
        return 1
    n_in = mask.shape[-2]
    for k in sorted(candidates, reverse=True):
        if k < 2 or k > n_in:
            continue
        pad = (-n_in) % k
        grid = mask
        if pad:  # repeat the last input so a partial group compares with itself
            grid = np.concatenate([mask, np.repeat(mask[..., -1:, :], pad, axis=-2)], axis=-2)
        grouped = grid.reshape(mask.shape[:-2] + ((n_in + pad) // k, k, mask.shape[-1]))
        if np.all(grouped == grouped[..., :1, :]):
            return k
    return 1


def _input_type(subgraph, op) -> str:
    return tensor_type_name(subgraph.tensors[int(op.inputs[0])])


def _weight_source(model, subgraph, op, makers):
    """(weight tensor index holding the stored values, ops between it and the FC)."""
    index = int(op.inputs[1])
    via = []
    while index in makers:
        maker = subgraph.operators[makers[index]]
        name = op_name(model, maker)
        if name not in ("DENSIFY", "DEQUANTIZE"):
            break
        via.append(name)
        index = int(maker.inputs[0])
    return index, tuple(via)


def _kernel(weight_type: str, input_type: str, block: str, via: tuple) -> tuple[str, bool]:
    """(which builtin kernel runs the op, whether XNNPACK misreads it)."""
    if "DENSIFY" in via:
        return "dense (DENSIFY expands the weight at load)", False
    if not block:
        return "dense", False
    if weight_type == "float32":
        return f"sparse FC {block} (float)", False
    if weight_type == "int8" and input_type == "FLOAT32":
        return f"sparse hybrid FC {block} (dynamic range; without XNNPACK only)", True
    return f"sparse FC {block} (int8)", False


def fully_connected_ops(path_or_bytes) -> pd.DataFrame:
    """One row per FULLY_CONNECTED op of a ``.tflite`` file: how its weight is stored and run.

    Columns: ``op`` (operator index), ``tensor`` (the stored weight tensor),
    ``shape`` ``(outputs, inputs)``, ``dtype`` (stored weight type),
    ``input_dtype``, ``block`` (e.g. ``"1x4"``, read from the file's sparsity
    parameters; ``""`` when dense or CSR), ``block_size`` (inputs per block,
    1 when not blocked), ``densify`` (a DENSIFY op expands it at load),
    ``kernel`` (which builtin kernel computes it) and ``xnnpack_misread``
    (True for a block-sparse dynamic-range weight, which the XNNPACK delegate
    reads as if it were dense).
    """
    model, raw = read_tflite_model(path_or_bytes)
    rows = []
    for sg_index, subgraph in enumerate(model.subgraphs):
        makers = producers(subgraph)
        for op_index, op in enumerate(subgraph.operators):
            if op_name(model, op) != "FULLY_CONNECTED" or op.inputs is None or len(op.inputs) < 2:
                continue
            source, via = _weight_source(model, subgraph, op, makers)
            tensor = subgraph.tensors[source]
            info = sparsity_info(tensor)
            block_size = int(np.prod(info["block_size"])) if info and info["block_size"] else 1
            block = "x".join(map(str, info["block_shape"])) if block_size > 1 else ""
            weight_type = tensor_type_name(tensor).lower()
            input_type = _input_type(subgraph, op)
            kernel, misread = _kernel(weight_type, input_type, block, via)
            rows.append({"subgraph": sg_index, "op": op_index, "tensor": source, "shape": tensor_shape(tensor),
                         "dtype": weight_type, "input_dtype": input_type.lower(), "format":
                         ("sparse" if info else "dense"), "block": block, "block_size": block_size,
                         "densify": "DENSIFY" in via, "kernel": kernel, "xnnpack_misread": misread})
    return pd.DataFrame(rows, columns=["subgraph", "op", "tensor", "shape", "dtype", "input_dtype", "format",
                                       "block", "block_size", "densify", "kernel", "xnnpack_misread"])


def xnnpack_misread_ops(path_or_bytes) -> list[str]:
    """FULLY_CONNECTED ops that the XNNPACK delegate would compute wrongly, as short descriptions.

    A dynamic-range (float input, int8 weight) FULLY_CONNECTED whose weight is
    stored in blocks: XNNPACK (ai-edge-litert 2.3) takes the op and reads the
    compressed values as a dense matrix, giving wrong outputs or a bus error.
    Empty for every other file.
    """
    ops = fully_connected_ops(path_or_bytes)
    bad = ops[ops["xnnpack_misread"]] if len(ops) else ops
    return [f"FULLY_CONNECTED op {r.op} weight {'x'.join(map(str, r.shape))} int8 block {r.block}"
            for r in bad.itertuples()]


def _dense_masks(model):
    """``[(layer name, mask (inputs, outputs))]`` of the masked 2-D (Dense) kernels of ``model``."""
    import keras

    from keras_rigl.sparsify import masked_layers

    out = []
    for layer in masked_layers(model):
        for mw in layer.masked_weights:
            mask = keras.ops.convert_to_numpy(mw.mask)
            if mask.ndim == 2 and isinstance(layer.layer, keras.layers.Dense):
                out.append((layer.layer.name, mask != 0))
    return out


def _match(mask_t: np.ndarray, candidates: list[tuple[int, np.ndarray]], used: set) -> int | None:
    """Row of the FC op whose stored non-zeros fit ``mask_t`` (outputs, inputs) best; None if none fits."""
    best, best_score = None, -1.0
    for row, nonzero in candidates:
        if row in used or nonzero.shape[0] != mask_t.shape[0] or nonzero.shape[1] < mask_t.shape[1]:
            continue
        if nonzero[:, mask_t.shape[1]:].any():  # only zero padding (pad_dense_inputs) may be wider
            continue
        nonzero = nonzero[:, :mask_t.shape[1]]
        outside = np.count_nonzero(nonzero & ~mask_t)  # a stored non-zero where the mask is off: not this layer
        if outside:
            continue
        score = np.count_nonzero(nonzero & mask_t) / max(np.count_nonzero(mask_t), 1)
        if score > best_score:
            best, best_score = row, score
    return best


def _why_not_blocked(mask_block: int, need: int, density: float, quantized: bool, n_in: int) -> str:
    if 1.0 - density < 0.3:
        return f"{1 - density:.0%} zeros < the converter's 30 % threshold: stored dense"
    if mask_block % need:
        kind = "int8" if quantized else "float"
        return (f"masks are {'1x' + str(mask_block) if mask_block > 1 else 'unstructured'}; the {kind} sparse "
                f"FC kernel needs 1x{need} blocks (sparsify with structure='1x{need}')")
    if n_in % need:
        return f"{n_in} inputs is not a multiple of {need}: the converter stored it CSR"
    return "the converter did not pick blocks (zero weights inside active blocks?)"


def block_sparse_layers(model, path_or_bytes, quantize=None) -> pd.DataFrame:
    """Per masked Dense layer of ``model``: its mask's block size, and how ``path_or_bytes`` stores and runs it.

    ``path_or_bytes`` is the ``.tflite`` file exported from ``model``; rows are
    matched to FULLY_CONNECTED weights by shape and non-zero pattern. Columns:
    ``layer``, ``shape`` (Keras ``(inputs, outputs)``), ``density``,
    ``mask_block`` (1xk blocks the mask is made of, 1 if none; see
    :func:`kernel_block_size`), ``file_block`` (e.g. ``"1x4"`` read from the
    file; ``""`` if not blocked), ``kernel`` (which TFLite kernel runs it) and
    ``note`` (why it is not on a sparse kernel). ``quantize`` is the export's
    mode, used for the note only.
    """
    model_fb, raw = read_tflite_model(path_or_bytes)
    ops = fully_connected_ops(raw)
    candidates = []
    for row in ops.itertuples():
        values = densify_tensor(model_fb, raw, int(row.tensor), int(row.subgraph))
        if values.ndim == 2:
            candidates.append((row.Index, values != 0))
    quantized = quantize in ("dynamic", "int8")
    need = INT8_FC_BLOCK if quantized else FLOAT_FC_BLOCK
    rows, used = [], set()
    for name, mask in _dense_masks(model):
        density = float(mask.mean()) if mask.size else 1.0
        mask_block = kernel_block_size(mask)
        match = _match(mask.T, candidates, used)
        if match is None:
            rows.append({"layer": name, "shape": mask.shape, "density": density, "mask_block": mask_block,
                         "file_block": "", "kernel": "", "note": "no FULLY_CONNECTED weight in the file matches"})
            continue
        used.add(match)
        op = ops.loc[match]
        note = "" if op["block"] else _why_not_blocked(mask_block, need, density, quantized, mask.shape[0])
        if op["xnnpack_misread"]:
            note = "XNNPACK misreads this op: run the file without XNNPACK"
        rows.append({"layer": name, "shape": mask.shape, "density": density, "mask_block": mask_block,
                     "file_block": op["block"], "kernel": op["kernel"], "note": note})
    return pd.DataFrame(rows, columns=["layer", "shape", "density", "mask_block", "file_block", "kernel", "note"])



# ---------------------------------------------------------------------------
# int8 1x16 blocks and input counts that are not a multiple of 16
# ---------------------------------------------------------------------------
# The TF 2.21 converter encodes an int8 FULLY_CONNECTED weight whose input count
# is not a multiple of 16 in 1x16 blocks all the same, and drops the inputs of
# the last, partial block: a (100, 300) weight loses inputs 288..299 and the file
# computes a different function (float 1x4 blocks with a partial block are
# stored correctly). Padding such a Dense layer's input with zeros to a multiple
# of 16 (one PAD op) gives the converter whole blocks.


def _padded_dense_class():
    import keras

    class InputPaddedDense(keras.layers.Layer):
        """Dense whose input gets ``pad`` zero features appended (and the kernel ``pad`` zero rows)."""

        def __init__(self, units, pad, activation=None, use_bias=True, **kwargs):
            super().__init__(**kwargs)
            self.units, self.pad = int(units), int(pad)
            self.activation = keras.activations.get(activation)
            self.use_bias = bool(use_bias)

        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(int(input_shape[-1]) + self.pad, self.units), name="kernel",
                                          initializer="zeros")
            self.bias = (self.add_weight(shape=(self.units,), name="bias", initializer="zeros")
                         if self.use_bias else None)

        def call(self, inputs):
            widths = [(0, 0)] * (len(inputs.shape) - 1) + [(0, self.pad)]
            outputs = keras.ops.matmul(keras.ops.pad(inputs, widths), self.kernel)
            if self.bias is not None:
                outputs = outputs + self.bias
            return self.activation(outputs)

        def compute_output_shape(self, input_shape):
            return tuple(input_shape[:-1]) + (self.units,)

    return InputPaddedDense


def pad_dense_inputs(model, multiple: int = INT8_FC_BLOCK, min_sparsity: float = 0.3):
    """A copy of ``model`` (no ``Masked`` layers) whose sparse Dense layers get inputs padded to ``multiple``.

    Every ``Dense`` layer with at least ``min_sparsity`` zero kernel weights
    (the converter's threshold for storing it sparse) and an input count that
    is not a multiple of ``multiple`` becomes a layer that appends zero
    features to its input (a PAD op in TFLite) and zero rows to its kernel:
    the same outputs, and whole 1x16 blocks for the int8 converter. Returns
    ``model`` itself when no layer needs it.
    """
    import keras

    from keras_rigl.sparsify import all_layers

    targets = {}
    for layer in all_layers(model):
        if (type(layer) is not keras.layers.Dense or not layer.built or getattr(layer, "lora_rank", None)
                or getattr(layer, "quantization_mode", None)):
            continue
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        pad = (-kernel.shape[0]) % multiple
        if pad and np.mean(kernel == 0) >= min_sparsity:
            targets[id(layer)] = (layer, pad)
    if not targets:
        return model
    padded_class = _padded_dense_class()

    def clone(layer):
        if id(layer) not in targets:
            return layer  # shared: same weights
        dense, pad = targets[id(layer)]
        new = padded_class(dense.units, pad, activation=dense.activation, use_bias=dense.use_bias,
                           name=dense.name, dtype=dense.dtype_policy)
        new.build((None, dense.kernel.shape[0]))
        kernel = keras.ops.convert_to_numpy(dense.kernel)
        new.kernel.assign(np.concatenate([kernel, np.zeros((pad, kernel.shape[1]), kernel.dtype)]))
        if dense.use_bias:
            new.bias.assign(keras.ops.convert_to_numpy(dense.bias))
        return new

    return keras.models.clone_model(model, clone_function=clone, recursive=True)


def check_block_shapes(path_or_bytes) -> None:
    """Refuse a file with an int8 block-sparse FULLY_CONNECTED whose inputs are not whole blocks.

    The converter drops the inputs of such a weight's last, partial block
    (see :func:`pad_dense_inputs`), so the file computes something else.
    """
    ops = fully_connected_ops(path_or_bytes)
    for row in ops.itertuples():
        if row.block and row.dtype == "int8" and row.shape[1] % row.block_size:
            raise ValueError(f"the converter stored a ({row.shape[0]}, {row.shape[1]}) int8 FULLY_CONNECTED weight "
                             f"in {row.block} blocks and dropped its last {row.shape[1] % row.block_size} inputs "
                             "(nothing was written); use a Dense layer with a multiple of 16 inputs, or export "
                             "with quantize=None or sparse=False")
