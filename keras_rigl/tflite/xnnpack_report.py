"""Will XNNPACK run a ``.tflite`` file on its sparse (NCHW / SpMM) inference path, and why not?

XNNPACK (the default TFLite CPU delegate) only switches to its sparse path
(``XNN_FLAG_HINT_SPARSE_INFERENCE``; TFLite sets it when the model contains
sparse weights / DENSIFY ops) when a whole *cluster* of nodes is
NCHW-compatible.  The rules, as read from ``xnn_check_nchw_compatibility`` and
``xnn_subgraph_rewrite_for_nchw`` in XNNPACK's ``src/subgraph.c`` (commit
75db3c0, Aug 2026):

* fp32/fp16 only (no quantized tensors);
* the cluster must be entered by a **3x3 stride-2 full convolution with exactly
  3 input channels, dilation 1, groups 1 and padding exactly 1 on every side**
  (the only NHWC->NCHW node; XNNPACK's ``conv2d_hwc2chw`` kernel);
* inside: 1x1 convolutions (stride 1, no padding, groups 1) -> SpMM; depthwise
  3x3 (padding 1 on every side) or 5x5 (padding 2 on every side), stride 1 or
  2, depth multiplier 1, dilation 1, *not* TF-SAME-flagged; add/multiply of
  4-D tensors (a static operand must be a scalar or vector); 4-D unary
  elementwise ops (ReLU, clamp, ...); resize-bilinear; fully connected;
* the cluster must be left through a global average pool / static mean or sum
  over 4-D (or depth-to-space);
* every value produced inside the cluster must be consumed only by cluster
  nodes;
* the 1x1 convolutions (and fully-connected) of the cluster together must be
  more than 2/3 zeros (``num_zeroes * 3 > num_params * 2``);
* x86 builds turn the path off on any CPU with AVX
  (``xnn_is_chw_compatible_config``); ARM/aarch64 keep it on.
* A zero-valued PAD feeding a (depthwise) convolution with a single consumer
  is fused into the convolution's explicit padding *before* this check, so an
  explicit ``ZeroPadding2D(1)`` + ``padding="valid"`` is what makes a stride-2
  3x3 layer acceptable.  The TFLite converter folds a PAD that equals TF SAME
  padding back into ``padding=SAME`` (which XNNPACK rejects for stride-2
  depthwise), so only pads that *differ* from SAME survive conversion.

:func:`xnnpack_sparse_report` applies these rules to the graph as the XNNPACK
delegate sees it: one rule per operator type (``_OP_RULES``, each a small
function returning the op's role in an NCHW cluster or why it has none), then
the cluster analysis (connectivity, exit, zero fraction, the head-conv bug).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from keras_rigl.tflite.flatbuffer import (
    buffer_bytes,
    consumers,
    densify_tensor,
    op_name,
    producers,
    read_tflite_model,
    tensor_shape,
    tensor_type_name,
)
from keras_rigl.tflite.xnnpack_rewrite import same_padding

__all__ = ["xnnpack_sparse_report", "SPARSE_PATH_MIN_ZERO_FRACTION"]

#: XNNPACK only switches to sparse inference when more than 2/3 of the 1x1
#: convolution weights of the NCHW cluster are zero (``num_zeroes * 3 > num_params * 2``).
SPARSE_PATH_MIN_ZERO_FRACTION = 2.0 / 3.0

# Roles of an op in an NCHW cluster ("" = none).
ENTRY, NCHW, EXIT, FUSED, WEIGHTS = "entry", "nchw", "exit", "fused", "weights"
_CLUSTER_ROLES = (ENTRY, NCHW, EXIT)
_PADDING_SAME = 0  # schema Padding enum: SAME = 0, VALID = 1
_UNARY_OPS = ("RELU", "RELU6", "RELU_N1_TO_1", "TANH", "LOGISTIC", "HARD_SWISH", "ABS", "NEG", "SQUARE",
              "SQRT", "ELU", "LEAKY_RELU", "GELU", "ROUND", "CEIL", "FLOOR", "EXP")


class _Graph:
    """Subgraph 0 of a flatbuffer, with the look-ups the rules need."""

    def __init__(self, model, raw):
        self.model, self.raw = model, raw
        self.subgraph = model.subgraphs[0]
        self.operators = self.subgraph.operators
        self.producers = producers(self.subgraph)
        self.consumers = {t: [op_index for op_index, _ in uses]
                          for t, uses in consumers(self.subgraph).items()}
        self.outputs = {int(t) for t in self.subgraph.outputs}
        self.names = [op_name(model, op) for op in self.operators]

    def shape(self, tensor_index) -> tuple[int, ...]:
        return tensor_shape(self.subgraph.tensors[tensor_index]) if tensor_index >= 0 else ()

    def producer_name(self, tensor_index):
        op_index = self.producers.get(tensor_index)
        return None if op_index is None else self.names[op_index]

    def is_static(self, tensor_index) -> bool:
        """A constant, or weights expanded by DENSIFY (which the delegate folds)."""
        return (tensor_index < 0 or tensor_index not in self.producers
                or self.producer_name(tensor_index) == "DENSIFY")

    def constant(self, tensor_index):
        """Values of a constant tensor (through a DENSIFY), else None."""
        if tensor_index < 0:
            return None
        if self.producer_name(tensor_index) == "DENSIFY":
            tensor_index = self.operators[self.producers[tensor_index]].inputs[0]
        tensor = self.subgraph.tensors[tensor_index]
        if not buffer_bytes(self.model, self.raw, tensor.buffer):
            return None
        return densify_tensor(self.model, self.raw, tensor_index)

    def is_float(self, op) -> bool:
        tensors = [t for t in list(op.inputs[:1]) + list(op.outputs) if t >= 0]
        return all(tensor_type_name(self.subgraph.tensors[t]) in ("FLOAT32", "FLOAT16") for t in tensors)


@dataclass
class _Verdict:
    """What a rule says about one op: its cluster role, or why it has none, and what it saw."""

    role: str = ""
    reason: str = ""
    details: dict = field(default_factory=dict)
    zeros: int = 0  # zero / total 1x1-convolution weights it adds to the cluster's count
    params: int = 0


def _no(reason, **details) -> _Verdict:
    return _Verdict("", reason, details)


# --------------------------------------------------------------------------
# per-op rules
# --------------------------------------------------------------------------
def _densify_rule(graph, op) -> _Verdict:
    return _Verdict(WEIGHTS, "weight densification (static, folded by the delegate)")


def _pad_rule(graph, op) -> _Verdict:
    readers = graph.consumers.get(op.outputs[0], [])
    if (len(readers) == 1 and graph.names[readers[0]] in ("CONV_2D", "DEPTHWISE_CONV_2D")
            and graph.operators[readers[0]].builtinOptions.padding != _PADDING_SAME):
        return _Verdict(FUSED, "zero PAD fused into the following convolution's padding")
    return _no("PAD not fused into a VALID convolution: no NCHW PAD")


def _conv_geometry(graph, op) -> dict:
    """Kernel, stride, dilation, input size and padding (t, b, l, r) of a (depthwise) convolution.

    A PAD with this convolution as its only reader is fused into the padding,
    as the delegate does, and the input size is then the PAD's input's.
    """
    options = op.builtinOptions
    weight_shape = graph.shape(op.inputs[1])
    geometry = {
        "kernel": (int(weight_shape[1]), int(weight_shape[2])),
        "stride": (options.strideH, options.strideW),
        "dilation": (options.dilationHFactor, options.dilationWFactor),
        "in_hw": graph.shape(op.inputs[0])[1:3],
        "pads": (0, 0, 0, 0),
        "same": options.padding == _PADDING_SAME,
    }
    source = op.inputs[0]
    if (not geometry["same"] and graph.producer_name(source) in ("PAD", "PADV2")
            and len(graph.consumers.get(source, [])) == 1):
        pad_op = graph.operators[graph.producers[source]]
        amounts = graph.constant(pad_op.inputs[1])
        amounts = np.zeros((4, 2), int) if amounts is None else np.asarray(amounts).reshape(4, 2).astype(int)
        geometry["pads"] = (int(amounts[1, 0]), int(amounts[1, 1]), int(amounts[2, 0]), int(amounts[2, 1]))
        geometry["in_hw"] = graph.shape(pad_op.inputs[0])[1:3]
    return geometry


def _describe_padding(geometry) -> str:
    if geometry["same"]:
        (kh, kw), (sh, sw), (dh, dw) = geometry["kernel"], geometry["stride"], geometry["dilation"]
        height = same_padding(geometry["in_hw"][0], kh, sh, dh)
        width = same_padding(geometry["in_hw"][1], kw, sw, dw)
        return f"SAME{(height[0], height[1], width[0], width[1])}"
    top, bottom, left, right = geometry["pads"]
    return f"explicit(t={top},b={bottom},l={left},r={right})"


def _conv_details(graph, op, geometry) -> dict:
    weights = graph.constant(op.inputs[1])
    return {"kernel": geometry["kernel"], "stride": geometry["stride"], "padding": _describe_padding(geometry),
            "weight_sparsity": None if weights is None else float(np.mean(weights == 0))}


def _pads_text(pads) -> str:
    return "(t={},b={},l={},r={})".format(*pads)


def _conv_rule(graph, op) -> _Verdict:
    """1x1 stride-1 unpadded convolutions run as SpMM; the 3x3 s2 3-channel one enters the cluster."""
    geometry = _conv_geometry(graph, op)
    details = _conv_details(graph, op, geometry)
    kernel, stride, pads = geometry["kernel"], geometry["stride"], geometry["pads"]
    in_channels = graph.shape(op.inputs[1])[3]
    if geometry["dilation"] != (1, 1):
        return _no("dilated convolution", **details)
    if kernel == (1, 1):
        if stride != (1, 1):
            return _no("1x1 convolution with stride != 1", **details)
        if any(pads):
            return _no("1x1 convolution with padding", **details)
        weights = graph.constant(op.inputs[1])
        verdict = _Verdict(NCHW, "", details)
        if weights is not None:
            verdict.zeros, verdict.params = int(np.sum(weights == 0)), int(weights.size)
        return verdict
    if kernel == (3, 3):
        if geometry["same"]:
            return _no("3x3 convolution with TF SAME padding: XNNPACK needs explicit padding 1 on every side "
                       "(use rewrite_for_xnnpack_sparse)", **details)
        if pads != (1, 1, 1, 1):
            return _no(f"3x3 convolution padding {_pads_text(pads)} != 1 on every side", **details)
        if stride != (2, 2):
            return _no("3x3 full convolution must have stride 2 (NHWC->NCHW entry)", **details)
        if in_channels != 3:
            return _no(f"3x3 full convolution must have 3 input channels (has {in_channels})", **details)
        return _Verdict(ENTRY, "", details)
    return _no(f"{kernel[0]}x{kernel[1]} full convolution (only 1x1, or 3x3 s2 with 3 input channels)", **details)


def _depthwise_rule(graph, op) -> _Verdict:
    """Depthwise 3x3 / 5x5, stride 1 or 2, multiplier 1, symmetric padding kernel // 2."""
    geometry = _conv_geometry(graph, op)
    details = _conv_details(graph, op, geometry)
    kernel, stride = geometry["kernel"], geometry["stride"]
    multiplier = graph.shape(op.outputs[0])[3] // max(graph.shape(op.inputs[0])[3], 1)
    if geometry["dilation"] != (1, 1):
        return _no("dilated depthwise convolution", **details)
    if geometry["same"] and stride != (1, 1):
        return _no("stride-2 depthwise convolution with TF SAME padding (XNN_FLAG_TENSORFLOW_SAME_PADDING): "
                   "use rewrite_for_xnnpack_sparse", **details)
    if multiplier != 1:
        return _no("depth multiplier != 1", **details)
    if stride[0] != stride[1] or stride[0] not in (1, 2):
        return _no(f"stride {stride} (needs equal stride 1 or 2)", **details)
    if kernel[0] != kernel[1] or kernel[0] not in (3, 5):
        return _no(f"{kernel[0]}x{kernel[1]} kernel (needs 3x3 or 5x5)", **details)
    pads = geometry["pads"]
    if geometry["same"]:  # stride 1 here
        height = same_padding(geometry["in_hw"][0], kernel[0], 1)
        width = same_padding(geometry["in_hw"][1], kernel[1], 1)
        pads = (height[0], height[1], width[0], width[1])
    need = kernel[0] // 2
    if pads != (need,) * 4:
        return _no(f"{kernel[0]}x{kernel[1]} depthwise padding {_pads_text(pads)} != {need} on every side",
                   **details)
    return _Verdict(NCHW, "", details)


def _reduction_rule(graph, op) -> _Verdict:
    if len(graph.shape(op.inputs[0])) == 4:
        return _Verdict(EXIT)
    return _no("reduction of a non-4D tensor")


def _binary_rule(graph, op) -> _Verdict:
    if any(len(graph.shape(t)) != 4 for t in op.inputs):
        return _no("binary op on non-4D tensors")
    if any(graph.is_static(t) and sum(d != 1 for d in graph.shape(t)) > 1 for t in op.inputs):
        return _no("static operand is not a scalar or a vector")
    return _Verdict(NCHW)


def _unary_rule(graph, op) -> _Verdict:
    if len(graph.shape(op.inputs[0])) == 4:
        return _Verdict(NCHW)
    return _no("elementwise op on a non-4D tensor")


def _resize_rule(graph, op) -> _Verdict:
    shape = graph.shape(op.inputs[0])
    if len(shape) == 4 and shape[1] > 1 and shape[2] > 1:
        return _Verdict(NCHW)
    return _no("1-pixel input")


def _fully_connected_rule(graph, op) -> _Verdict:
    weights = graph.constant(op.inputs[1])
    return _Verdict(NCHW, "", {"weight_sparsity": None if weights is None else float(np.mean(weights == 0))})


def _depth_to_space_rule(graph, op) -> _Verdict:
    return _Verdict(EXIT)


_OP_RULES = {
    "DENSIFY": _densify_rule,
    "PAD": _pad_rule,
    "PADV2": _pad_rule,
    "CONV_2D": _conv_rule,
    "DEPTHWISE_CONV_2D": _depthwise_rule,
    "MEAN": _reduction_rule,
    "SUM": _reduction_rule,
    "ADD": _binary_rule,
    "MUL": _binary_rule,
    "RESIZE_BILINEAR": _resize_rule,
    "FULLY_CONNECTED": _fully_connected_rule,
    "DEPTH_TO_SPACE": _depth_to_space_rule,
    **{name: _unary_rule for name in _UNARY_OPS},
}


def _judge(graph, op_index) -> _Verdict:
    name, op = graph.names[op_index], graph.operators[op_index]
    if name != "DENSIFY" and not graph.is_float(op):
        return _no("not fp32/fp16 (quantized ops never use the sparse path)")
    rule = _OP_RULES.get(name)
    if rule is None:
        return _no(f"{name} has no NCHW implementation in XNNPACK")
    return rule(graph, op)


# --------------------------------------------------------------------------
# cluster analysis
# --------------------------------------------------------------------------
def _feeder(graph, roles, tensor_index):
    """The op that really produces a tensor, looking through fused PADs (None for a graph input)."""
    while tensor_index in graph.producers:
        op_index = graph.producers[tensor_index]
        if roles[op_index] != FUSED:
            return op_index
        tensor_index = graph.operators[op_index].inputs[0]
    return None


def _outside_input(graph, roles, in_cluster, op_index):
    """Why an op's dynamic inputs tie it to ops outside the cluster, or None."""
    for t in graph.operators[op_index].inputs:
        if t < 0 or graph.is_static(t):
            continue
        feeder = _feeder(graph, roles, t)
        if feeder is None or not in_cluster[feeder]:
            source = "graph input" if feeder is None else graph.names[feeder]
            return f"input comes from outside the NCHW cluster ({source})"
        # XNNPACK also rejects a cluster whose input values are read outside it (a skip connection)
        for reader in graph.consumers.get(t, []):
            if not in_cluster[reader] and roles[reader] != FUSED:
                return f"its input is also read outside the NCHW cluster ({graph.names[reader]})"
    return None


def _cluster(graph, roles, reasons) -> list[bool]:
    """Which ops stay in the NCHW cluster: fed only by cluster ops, their inputs read only there."""
    in_cluster = [role in _CLUSTER_ROLES for role in roles]
    changed = True
    while changed:
        changed = False
        for op_index, role in enumerate(roles):
            if not in_cluster[op_index] or role == ENTRY:
                continue
            why = _outside_input(graph, roles, in_cluster, op_index)
            if why is not None:
                in_cluster[op_index] = False
                reasons[op_index] = reasons[op_index] or why
                changed = True
    return in_cluster


_HAZARD = ("output leaves the NCHW cluster without an NCHW->NHWC op: XNNPACK sparse-path bug (zero outputs or "
           "failed allocate_tensors); rewrite_for_xnnpack_sparse(apply_sparse_path_workaround=True) avoids it")


def _hazards(graph, roles, in_cluster) -> list[int]:
    """Cluster ops (not exits) whose output leaves the cluster: the bug of benchmarks/xnnpack_repro.

    Such a node keeps an NHWC output while its input is NCHW; for CONV_2D
    this gives all-zero outputs or a failed ``allocate_tensors``.
    """
    def reader_in_cluster(reader):
        if roles[reader] == FUSED:
            return all(in_cluster[r] for r in graph.consumers.get(graph.operators[reader].outputs[0], []))
        return in_cluster[reader]

    found = []
    for op_index, op in enumerate(graph.operators):
        if not in_cluster[op_index] or roles[op_index] in (EXIT, ENTRY) or graph.names[op_index] == "FULLY_CONNECTED":
            continue
        if any(t in graph.outputs or not all(reader_in_cluster(r) for r in graph.consumers.get(t, []))
               for t in op.outputs):
            found.append(op_index)
    return found


def _cluster_verdict(roles, in_cluster, zeros, params) -> str:
    """Why the cluster as a whole is rejected ("" when XNNPACK takes it)."""
    if not any(in_cluster[i] and role == ENTRY for i, role in enumerate(roles)):
        return ("no NHWC->NCHW entry: needs a 3x3 stride-2 convolution with 3 input channels and explicit "
                "padding 1 on every side")
    if not any(in_cluster[i] and role == EXIT for i, role in enumerate(roles)):
        return "no NCHW->NHWC exit (global average pooling / mean) reachable inside the cluster"
    if params == 0:
        return "cluster has no 1x1 convolutions"
    if not zeros * 3 > params * 2:  # SPARSE_PATH_MIN_ZERO_FRACTION, in XNNPACK's integer form
        return (f"1x1 convolutions are only {zeros / params:.1%} zeros "
                f"(XNNPACK needs > {SPARSE_PATH_MIN_ZERO_FRACTION:.1%})")
    return ""


_COLUMNS = ["index", "op", "input_shape", "output_shape", "kernel", "stride", "padding", "weight_sparsity",
            "nchw_role", "sparse_path", "reason", "hazard"]


def xnnpack_sparse_report(tflite_file: str | os.PathLike | bytes):
    """Per-op table: will XNNPACK run this op on its sparse (NCHW) path, and why not.

    Applies XNNPACK's rules (module docstring) to the TFLite graph as the
    XNNPACK delegate would see it (PAD feeding a conv fused into the conv's
    padding, DENSIFY'd weights treated as static).  Columns: ``index, op,
    input_shape, output_shape, kernel, stride, padding, weight_sparsity,
    nchw_role, sparse_path, reason, hazard``.  ``sparse_path`` is the final
    answer for each op; ``DataFrame.attrs`` holds the cluster-level verdict
    (``sparse_path``, ``reason``, ``zero_fraction_1x1``, ``hazards``: op
    indices hit by the XNNPACK sparse-path bug).
    Static only: it cannot see CPU features (x86+AVX disables the path).
    """
    import pandas as pd

    graph = _Graph(*read_tflite_model(tflite_file))
    verdicts = [_judge(graph, i) for i in range(len(graph.operators))]
    roles = [v.role for v in verdicts]
    reasons = [v.reason for v in verdicts]
    zeros = sum(v.zeros for v in verdicts if v.role == NCHW)
    params = sum(v.params for v in verdicts if v.role == NCHW)
    in_cluster = _cluster(graph, roles, reasons)
    hazards = _hazards(graph, roles, in_cluster)
    rejected = _cluster_verdict(roles, in_cluster, zeros, params)
    accepted = rejected == ""
    rows = []
    for i, (op, verdict) in enumerate(zip(graph.operators, verdicts)):
        on_path = in_cluster[i] and roles[i] in _CLUSTER_ROLES
        if roles[i] == FUSED:
            on_path = reasons[i].startswith("zero PAD")
        row = {"index": i, "op": graph.names[i],
               "input_shape": graph.shape(op.inputs[0]) if len(op.inputs) else (),
               "output_shape": graph.shape(op.outputs[0]) if len(op.outputs) else (),
               "kernel": None, "stride": None, "padding": None, "weight_sparsity": None,
               "nchw_role": roles[i], "sparse_path": bool(accepted and on_path),
               "reason": ("cluster rejected: " + rejected) if in_cluster[i] and not accepted else reasons[i],
               "hazard": _HAZARD if i in hazards else ""}
        row.update(verdict.details)
        rows.append(row)
    df = pd.DataFrame(rows, columns=_COLUMNS)
    df.attrs.update(hazards=hazards if accepted else [], sparse_path=accepted,
                    reason=rejected or "XNNPACK will switch to sparse inference (on ARM/aarch64 or x86 without AVX)",
                    zero_fraction_1x1=zeros / params if params else 0.0)
    return df
