"""Make sparse Keras models run on XNNPACK's sparse (NCHW / SpMM) inference path.

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

TF "SAME" padding of a 3x3 stride-2 layer on an *even* input is (0 before,
1 after), which XNNPACK cannot express.  :func:`rewrite_for_xnnpack_sparse`
therefore, when needed, runs the network on spatially flipped feature maps:
it flips the input (H and W), flips every spatial kernel, swaps
before/after padding (which turns (0, 1) into (1, 0) == the symmetric
padding-1 XNNPACK wants, with an unused extra row/column), and flips back
where a non-equivariant layer (Flatten, Reshape, ...) or a spatial model
output needs it.  Global pooling is flip-invariant, so classification nets
need no flip back.  The result is mathematically identical (same products,
only zeros added; float summation order over kernel taps may differ, ~1e-8),
and is verified against the original in Keras.

:func:`xnnpack_sparse_report` reads a ``.tflite`` file and applies the same
rules to say, op by op, whether XNNPACK will run it on its sparse path and
why not.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import keras

__all__ = [
    "SpatialFlip",
    "rewrite_for_xnnpack_sparse",
    "xnnpack_sparse_report",
    "same_padding",
    "SPARSE_PATH_MIN_ZERO_FRACTION",
]

#: XNNPACK only switches to sparse inference when more than 2/3 of the 1x1
#: convolution / fully-connected weights of the NCHW cluster are zero.
SPARSE_PATH_MIN_ZERO_FRACTION = 2.0 / 3.0


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def same_padding(in_size: int, kernel: int, stride: int, dilation: int = 1) -> Tuple[int, int]:
    """TensorFlow SAME padding (before, after) for one spatial dimension."""
    eff_k = (kernel - 1) * dilation + 1
    out = -(-in_size // stride)
    total = max((out - 1) * stride + eff_k - in_size, 0)
    return total // 2, total - total // 2


def _valid_out(in_size: int, kernel: int, stride: int, before: int, after: int, dilation: int = 1) -> int:
    eff_k = (kernel - 1) * dilation + 1
    return (in_size + before + after - eff_k) // stride + 1


@keras.saving.register_keras_serializable(package="keras_rigl")
class SpatialFlip(keras.layers.Layer):
    """Reverse the two spatial axes of an NHWC tensor (its own inverse)."""

    def call(self, x):
        return keras.ops.flip(x, axis=(1, 2))

    def compute_output_shape(self, input_shape):
        return input_shape


_SPATIAL_CONV = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
_POOL = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)
_INVARIANT = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D)
# Layers that act per position (or per channel) and so commute with a flip.
_EQUIVARIANT = (
    keras.layers.BatchNormalization, keras.layers.ReLU, keras.layers.Activation,
    keras.layers.Dropout, keras.layers.LeakyReLU, keras.layers.PReLU,
    keras.layers.ELU, keras.layers.Softmax, keras.layers.Add,
    keras.layers.Multiply, keras.layers.Subtract, keras.layers.Maximum,
    keras.layers.Minimum, keras.layers.Average, keras.layers.Rescaling,
    keras.layers.SpatialDropout2D, keras.layers.GaussianNoise,
    keras.layers.LayerNormalization,
)


def _is_plain_conv(layer) -> bool:
    return isinstance(layer, _SPATIAL_CONV) and not isinstance(
        layer, (keras.layers.SeparableConv2D, keras.layers.Conv2DTranspose))


def _pads_for(layer, in_hw: Sequence[int]) -> List[Tuple[int, int]]:
    """Explicit (before, after) padding per spatial dim equal to the layer's padding."""
    ks = layer.kernel_size if hasattr(layer, "kernel_size") else layer.pool_size
    st = layer.strides
    dil = getattr(layer, "dilation_rate", (1, 1))
    if layer.padding == "same":
        return [same_padding(in_hw[i], ks[i], st[i], dil[i]) for i in range(2)]
    return [(0, 0), (0, 0)]


def _is_head_conv(layer, ins) -> bool:
    """A 1x1 stride-1 Conv2D on a 1x1-spatial input (classifier after GAP keepdims)."""
    return (isinstance(layer, keras.layers.Conv2D)
            and not isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
                                       keras.layers.Conv2DTranspose))
            and len(ins) == 1 and len(ins[0].shape) == 4
            and tuple(ins[0].shape[1:3]) == (1, 1) and tuple(layer.kernel_size) == (1, 1)
            and tuple(layer.strides) == (1, 1) and getattr(layer, "groups", 1) == 1
            and tuple(layer.dilation_rate) == (1, 1))


def _needs_flip(model) -> bool:
    """True if some stride-2+ SAME conv/pool sees asymmetric SAME padding."""
    for layer in model.layers:
        if (_is_plain_conv(layer) or isinstance(layer, _POOL)) and layer.padding == "same":
            if max(layer.strides) > 1:
                in_shape = layer.input.shape
                pads = _pads_for(layer, in_shape[1:3])
                if any(b != a for b, a in pads):
                    return True
    return False


def _layer_config_without(layer, **overrides):
    cfg = layer.get_config()
    cfg.pop("name", None)
    cfg.update(overrides)
    return cfg


def _explicit_pad_layers(layer, in_hw, flipped: bool, name: str, pre_pad=None):
    """Replace a SAME/VALID conv or pool by [ZeroPadding2D/Cropping2D] + VALID layer.

    Returns (pre_layers, new_layer, kernel_flip) where pre_layers are
    applied before new_layer.  When ``flipped`` the before/after padding is
    swapped (the layer then runs on spatially flipped maps).
    """
    ks = layer.kernel_size if hasattr(layer, "kernel_size") else layer.pool_size
    st = layer.strides
    dil = getattr(layer, "dilation_rate", (1, 1))
    pads = []
    for i in range(2):
        eff_k = (ks[i] - 1) * dil[i] + 1
        if pre_pad is not None:  # ZeroPadding2D(pre_pad) followed by this VALID layer
            zb, za = pre_pad[i]
            b = zb
            out = (in_hw[i] + zb + za - eff_k) // st[i] + 1
            a = (out - 1) * st[i] + eff_k - in_hw[i] - b
        elif layer.padding == "same":
            b, a = same_padding(in_hw[i], ks[i], st[i], dil[i])
            out = -(-in_hw[i] // st[i])
        else:
            b, a = 0, 0
            out = (in_hw[i] - eff_k) // st[i] + 1
            a = (out - 1) * st[i] + eff_k - in_hw[i]  # <= 0: unused trailing rows
        if flipped:
            b, a = a, b
        # XNNPACK wants symmetric padding; padding rows that no window reaches
        # are free, so grow the smaller side when it keeps the output size.
        # (never grow the leading side: that would shift the windows)
        if b >= 0 and a >= 0 and a < b and _valid_out(in_hw[i], ks[i], st[i], b, b, dil[i]) == out:
            a = b
        pads.append((b, a))
    pre = []
    crop = [(max(-b, 0), max(-a, 0)) for b, a in pads]
    padp = [(max(b, 0), max(a, 0)) for b, a in pads]
    if any(c for cc in crop for c in cc):
        pre.append(keras.layers.Cropping2D(tuple(crop), name=name + "_xnn_crop"))
    if any(p for pp in padp for p in pp):
        if isinstance(layer, keras.layers.MaxPooling2D):
            return None  # zero padding is wrong for max pooling of negatives
        if isinstance(layer, keras.layers.AveragePooling2D):
            return None  # SAME avg-pool excludes padding from the count
        pre.append(keras.layers.ZeroPadding2D(tuple(padp), name=name + "_xnn_pad"))
    new = layer.__class__.from_config(_layer_config_without(layer, padding="valid", name=name))
    return pre, new


def _copy_weights(old, new, flip: bool):
    ws = old.get_weights()
    if flip and ws and _is_plain_conv(old):
        ws = [ws[0][::-1, ::-1].copy()] + ws[1:]
    new.set_weights(ws)


# --------------------------------------------------------------------------
# rewrite
# --------------------------------------------------------------------------
def rewrite_for_xnnpack_sparse(
    model: keras.Model,
    *,
    flip: Any = "auto",
    verify: bool = True,
    atol: float = 1e-4,
    apply_sparse_path_workaround: bool = True,
    return_info: bool = False,
    seed: int = 0,
):
    """Rewrite a plain (stripped) Keras model so XNNPACK's sparse path accepts it.

    * every SAME/VALID convolution with a kernel larger than 1x1 gets an
      explicit ``ZeroPadding2D`` (or ``Cropping2D``) + ``padding="valid"``
      computing exactly TF's padding amounts;
    * if some stride-2 layer has asymmetric SAME padding (even input size),
      and ``flip`` is ``"auto"`` or True, the network runs on spatially
      flipped maps (see module doc) so that padding becomes XNNPACK's
      symmetric padding-1/2;
    * weights are copied (spatial kernels flipped when flipping);
    * ``apply_sparse_path_workaround`` (default True): work around the
      XNNPACK sparse-path bug found in benchmarks/xnnpack_repro: a 1x1
      ``Conv2D`` applied to the 1x1 output of global average pooling (the
      MobileNet classifier) is replaced by ``Reshape -> Dense -> Reshape``
      (identical math).  Without it XNNPACK's sparse path returns all-zero
      logits (ai-edge-litert <= 2.1.0) or fails in ``allocate_tensors``
      (>= 2.1.6).
    * ``verify``: run both models on a random batch and raise if the outputs
      differ by more than ``atol``.

    Returns the new model (``(model, info)`` if ``return_info``), where
    ``info`` is a dict with ``flipped``, ``changed_layers`` and
    ``max_abs_diff``.
    """
    if isinstance(model, keras.Sequential):
        model = model._functional if getattr(model, "_functional", None) is not None else model
    do_flip = _needs_flip(model) if flip == "auto" else bool(flip)

    new_inputs = [keras.Input(shape=t.shape[1:], dtype=t.dtype, name=getattr(t, "name", None))
                  for t in model.inputs]
    tmap: Dict[int, Any] = {}
    fmap: Dict[int, bool] = {}  # tensor id -> is spatially flipped
    for old, new in zip(model.inputs, new_inputs):
        if do_flip and len(old.shape) == 4:
            tmap[id(old)] = SpatialFlip(name=(getattr(old, "name", "input") + "_xnn_flip"))(new)
            fmap[id(old)] = True
        else:
            tmap[id(old)] = new
            fmap[id(old)] = False
    changed: List[str] = []
    workaround: List[str] = []
    gap_out = set()  # tensors produced by a keepdims global pooling (maybe via Dropout)
    zpad_src: Dict[int, Any] = {}
    n_consumers: Dict[int, int] = {}
    for op in model.operations:
        for node in op._inbound_nodes:
            for t in node.input_tensors:
                n_consumers[id(t)] = n_consumers.get(id(t), 0) + 1
    for t in model.outputs:
        n_consumers[id(t)] = n_consumers.get(id(t), 0) + 1

    def unflip(t_old):
        t = tmap[id(t_old)]
        if fmap[id(t_old)]:
            return SpatialFlip()(t)
        return t

    for op in model.operations:
        if isinstance(op, keras.layers.InputLayer):
            continue
        for node in op._inbound_nodes:
            if not all(id(t) in tmap for t in node.input_tensors):
                continue
            if not node.output_tensors or id(node.output_tensors[0]) in tmap:
                continue
            ins = node.input_tensors
            in_flipped = any(fmap[id(t)] for t in ins)
            out_flipped = False
            if isinstance(op, keras.layers.ZeroPadding2D) and len(ins) == 1:
                (pt, pb), (pl, pr) = op.padding
                if fmap[id(ins[0])]:
                    pt, pb, pl, pr = pb, pt, pr, pl
                y = keras.layers.ZeroPadding2D(((pt, pb), (pl, pr)), name=op.name)(tmap[id(ins[0])])
                tmap[id(node.output_tensors[0])] = y
                fmap[id(node.output_tensors[0])] = fmap[id(ins[0])]
                zpad_src[id(node.output_tensors[0])] = (ins[0], op.padding)
                continue
            if isinstance(op, _INVARIANT) and getattr(op, "keepdims", False):
                gap_out.add(id(node.output_tensors[0]))
            elif isinstance(op, (keras.layers.Dropout, keras.layers.SpatialDropout2D,
                                 keras.layers.GaussianNoise)) and id(ins[0]) in gap_out:
                gap_out.add(id(node.output_tensors[0]))
            if (apply_sparse_path_workaround and _is_head_conv(op, ins)
                    and id(ins[0]) in gap_out):
                # XNNPACK sparse-path bug (benchmarks/xnnpack_repro): a 1x1
                # CONV_2D fed by the global-average-pool must not be a conv.
                x = unflip(ins[0]) if fmap[id(ins[0])] else tmap[id(ins[0])]
                cin = int(ins[0].shape[-1])
                x = keras.layers.Reshape((cin,), name=op.name + "_xnn_flat")(x)
                dense = keras.layers.Dense(op.filters, activation=op.activation,
                                           use_bias=op.use_bias, name=op.name)
                y = dense(x)
                ws = op.get_weights()
                dense.set_weights([ws[0].reshape(cin, op.filters)] + ws[1:])
                y = keras.layers.Reshape((1, 1, op.filters), name=op.name + "_xnn_unflat")(y)
                tmap[id(node.output_tensors[0])] = y
                fmap[id(node.output_tensors[0])] = False
                workaround.append(op.name)
                continue
            if (_is_plain_conv(op) or isinstance(op, _POOL)) and len(ins) == 1:
                ks = op.kernel_size if hasattr(op, "kernel_size") else op.pool_size
                x = tmap[id(ins[0])]
                in_hw = ins[0].shape[1:3]
                pre_pad = None
                src = zpad_src.get(id(ins[0]))
                if (src is not None and op.padding == "valid" and _is_plain_conv(op)
                        and n_consumers.get(id(ins[0]), 0) == 1):
                    # fold ZeroPadding2D -> VALID conv into one explicit padding
                    pre_pad = src[1]
                    x = tmap[id(src[0])]
                    in_hw = src[0].shape[1:3]
                res = None
                if max(ks) > 1 or max(op.strides) > 1 or pre_pad is not None:
                    res = _explicit_pad_layers(op, in_hw, in_flipped, op.name, pre_pad)
                if res is None:
                    if in_flipped and isinstance(op, _POOL) and (op.padding == "same" or max(op.strides) > 1):
                        x = unflip(ins[0])
                        in_flipped = False
                    new = op.__class__.from_config(_layer_config_without(op, name=op.name))
                    y = new(x)
                    _copy_weights(op, new, in_flipped)
                    out_flipped = in_flipped
                else:
                    pre, new = res
                    for p in pre:
                        x = p(x)
                    y = new(x)
                    _copy_weights(op, new, in_flipped)
                    out_flipped = in_flipped
                    if pre or in_flipped:
                        changed.append(op.name)
            else:
                equivariant = isinstance(op, _EQUIVARIANT + _INVARIANT) or (
                    isinstance(op, keras.layers.Concatenate) and op.axis in (-1, 3))
                if in_flipped and not equivariant:
                    args, kwargs = node.arguments.fill_in(
                        {id(t): unflip(t) for t in ins})
                    in_flipped = False
                else:
                    args, kwargs = node.arguments.fill_in({id(t): tmap[id(t)] for t in ins})
                if in_flipped and not all(fmap[id(t)] for t in ins if len(t.shape) == 4):
                    args, kwargs = node.arguments.fill_in({id(t): unflip(t) for t in ins})
                    in_flipped = False
                new = op.__class__.from_config(op.get_config())
                y = new(*args, **kwargs)
                if op.weights:
                    new.set_weights(op.get_weights())
                out_flipped = in_flipped and not isinstance(op, _INVARIANT)
                if isinstance(op, _INVARIANT) and getattr(op, "keepdims", False):
                    out_flipped = False  # 1x1 spatial: flip is a no-op
            ys = y if isinstance(y, (list, tuple)) else [y]
            for t_old, t_new in zip(node.output_tensors, ys):
                tmap[id(t_old)] = t_new
                fmap[id(t_old)] = out_flipped and len(t_old.shape) == 4
    outs = [unflip(t) for t in model.outputs]
    new_model = keras.Model(new_inputs, outs if len(outs) > 1 else outs[0],
                            name=model.name + "_xnnpack_sparse")
    info = {"flipped": do_flip, "changed_layers": changed, "max_abs_diff": None,
            "workaround_layers": workaround}
    if verify:
        rng = np.random.default_rng(seed)
        xs = [rng.standard_normal((2,) + tuple(t.shape[1:])).astype("float32") for t in model.inputs]
        xs_in = xs if len(xs) > 1 else xs[0]
        ya = model.predict(xs_in, verbose=0)
        yb = new_model.predict(xs_in, verbose=0)
        ya = ya if isinstance(ya, list) else [ya]
        yb = yb if isinstance(yb, list) else [yb]
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(ya, yb))
        info["max_abs_diff"] = diff
        if not diff <= atol:
            raise AssertionError(
                f"rewrite_for_xnnpack_sparse changed the model's outputs: max |diff| = {diff:.3g} > {atol}")
    return (new_model, info) if return_info else new_model




# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------
def xnnpack_sparse_report(tflite_path: str):
    """Per-op table: will XNNPACK run this op on its sparse (NCHW) path, and why not.

    Applies XNNPACK's rules (module docstring) to the TFLite graph as the
    XNNPACK delegate would see it (PAD feeding a conv fused into the conv's
    padding, DENSIFY'd weights treated as static).  Columns: ``index, op,
    input_shape, output_shape, kernel, stride, padding, weight_sparsity,
    nchw_role, sparse_path, reason``.  ``sparse_path`` is the final answer
    for each op; ``DataFrame.attrs`` holds the cluster-level verdict
    (``sparse_path``, ``reason``, ``zero_fraction_1x1``, ``hazards``: op
    indices hit by the XNNPACK sparse-path bug).
    Static only: it cannot see CPU features (x86+AVX disables the path).
    """
    import pandas as pd
    from ai_edge_litert import schema_py_generated as S

    buf = open(tflite_path, "rb").read()
    m = S.ModelT.InitFromObj(S.Model.GetRootAsModel(buf, 0))
    g = m.subgraphs[0]
    names = {v: k for k, v in vars(S.BuiltinOperator).items() if not k.startswith("_")}

    def opname(op):
        oc = m.operatorCodes[op.opcodeIndex]
        return names.get(max(oc.builtinCode, oc.deprecatedBuiltinCode), "CUSTOM")

    def shape(t):
        return tuple(int(s) for s in g.tensors[t].shape) if t >= 0 and g.tensors[t].shape is not None else ()

    producers: Dict[int, int] = {}
    consumers: Dict[int, List[int]] = {}
    for i, op in enumerate(g.operators):
        for t in op.outputs:
            producers[t] = i
        for t in op.inputs:
            if t >= 0:
                consumers.setdefault(t, []).append(i)
    graph_outputs = set(int(t) for t in g.outputs)

    def const_data(t):
        """Weights: buffer data, or the input of the DENSIFY that produced it."""
        if t < 0:
            return None
        if t in producers and opname(g.operators[producers[t]]) == "DENSIFY":
            src = g.operators[producers[t]].inputs[0]
            return _densify(g.tensors[src], m.buffers[g.tensors[src].buffer])
        tb = m.buffers[g.tensors[t].buffer]
        if g.tensors[t].sparsity is not None and g.tensors[t].type == 0:
            return _densify(g.tensors[t], tb)
        dt = {0: np.float32, 1: np.float16, 2: np.int32, 4: np.int64}.get(g.tensors[t].type)
        if dt is not None and tb.data is not None and len(tb.data):
            return np.frombuffer(bytes(bytearray(tb.data)), dtype=dt).reshape(shape(t))
        return None

    def is_static(t):
        return t < 0 or t not in producers or opname(g.operators[producers[t]]) == "DENSIFY"

    rows = []
    role = {}
    zeros = params = 0
    for i, op in enumerate(g.operators):
        name = opname(op)
        o = op.builtinOptions
        row = dict(index=i, op=name, input_shape=shape(op.inputs[0]) if len(op.inputs) else (),
                   output_shape=shape(op.outputs[0]) if len(op.outputs) else (),
                   kernel=None, stride=None, padding=None, weight_sparsity=None,
                   nchw_role="", sparse_path=False, reason="")
        fp = all(g.tensors[t].type in (0, 1) for t in list(op.inputs[:1]) + list(op.outputs) if t >= 0)
        r, why = "", ""
        if name in ("DENSIFY",):
            r, why = "weights", "weight densification (static, folded by the delegate)"
        elif not fp:
            why = "not fp32/fp16 (quantized ops never use the sparse path)"
        elif name == "PAD" or name == "PADV2":
            cons = consumers.get(op.outputs[0], [])
            if (len(cons) == 1 and opname(g.operators[cons[0]]) in ("CONV_2D", "DEPTHWISE_CONV_2D")
                    and g.operators[cons[0]].builtinOptions.padding == 1):
                r, why = "fused", "zero PAD fused into the following convolution's padding"
            else:
                why = "PAD not fused into a VALID convolution: no NCHW PAD"
        elif name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            w = const_data(op.inputs[1])
            kh, kw = (int(shape(op.inputs[1])[1]), int(shape(op.inputs[1])[2]))
            sh, sw = o.strideH, o.strideW
            dh, dw = o.dilationHFactor, o.dilationWFactor
            ih, iw = shape(op.inputs[0])[1:3]
            x_in = op.inputs[0]
            pt = pb = pl = pr = 0
            # fused PAD (delegate fuses PAD -> VALID conv when PAD has one consumer)
            if x_in in producers and opname(g.operators[producers[x_in]]) in ("PAD", "PADV2") \
                    and len(consumers.get(x_in, [])) == 1 and o.padding == 1:
                pop = g.operators[producers[x_in]]
                pv = const_data(pop.inputs[1])
                if pv is None:
                    pv = np.zeros((4, 2))
                pv = np.asarray(pv).reshape(4, 2).astype(int)
                pt, pb, pl, pr = int(pv[1, 0]), int(pv[1, 1]), int(pv[2, 0]), int(pv[2, 1])
                ih, iw = shape(pop.inputs[0])[1:3]
            same = o.padding == 0
            if same:
                a = same_padding(ih, kh, sh, dh)
                b = same_padding(iw, kw, sw, dw)
                pad_desc = f"SAME{(a[0], a[1], b[0], b[1])}"
            else:
                pad_desc = f"explicit(t={pt},b={pb},l={pl},r={pr})"
            row.update(kernel=(kh, kw), stride=(sh, sw), padding=pad_desc)
            if w is not None:
                row["weight_sparsity"] = float(np.mean(w == 0))
            if name == "CONV_2D":
                cin = shape(op.inputs[1])[3]
                if (dh, dw) != (1, 1):
                    why = "dilated convolution"
                elif (kh, kw) == (1, 1):
                    if same and (sh, sw) == (1, 1):
                        pt = pb = pl = pr = 0
                    if (sh, sw) != (1, 1):
                        why = "1x1 convolution with stride != 1"
                    elif pt | pb | pl | pr:
                        why = "1x1 convolution with padding"
                    else:
                        r = "nchw"
                        if w is not None:
                            zeros += int(np.sum(w == 0)); params += int(w.size)
                elif (kh, kw) == (3, 3):
                    if same:
                        why = ("3x3 convolution with TF SAME padding: XNNPACK needs explicit "
                               "padding 1 on every side (use rewrite_for_xnnpack_sparse)")
                    elif (pt, pb, pl, pr) != (1, 1, 1, 1):
                        why = f"3x3 convolution padding (t={pt},b={pb},l={pl},r={pr}) != 1 on every side"
                    elif (sh, sw) != (2, 2):
                        why = "3x3 full convolution must have stride 2 (NHWC->NCHW entry)"
                    elif cin != 3:
                        why = f"3x3 full convolution must have 3 input channels (has {cin})"
                    else:
                        r = "entry"
                else:
                    why = f"{kh}x{kw} full convolution (only 1x1, or 3x3 s2 with 3 input channels)"
            else:
                mult = shape(op.outputs[0])[3] // max(shape(op.inputs[0])[3], 1)
                if (dh, dw) != (1, 1):
                    why = "dilated depthwise convolution"
                elif same and (sh, sw) != (1, 1):
                    why = ("stride-2 depthwise convolution with TF SAME padding "
                           "(XNN_FLAG_TENSORFLOW_SAME_PADDING): use rewrite_for_xnnpack_sparse")
                elif mult != 1:
                    why = "depth multiplier != 1"
                elif sh != sw or sh not in (1, 2):
                    why = f"stride {(sh, sw)} (needs equal stride 1 or 2)"
                elif kh != kw or kh not in (3, 5):
                    why = f"{kh}x{kw} kernel (needs 3x3 or 5x5)"
                else:
                    need = kh // 2
                    if same:
                        a = same_padding(ih, kh, 1); b = same_padding(iw, kw, 1)
                        pt, pb, pl, pr = a[0], a[1], b[0], b[1]
                    if (pt, pb, pl, pr) == (need,) * 4:
                        r = "nchw"
                    else:
                        why = f"{kh}x{kw} depthwise padding (t={pt},b={pb},l={pl},r={pr}) != {need} on every side"
        elif name in ("MEAN", "SUM"):
            if len(row["input_shape"]) == 4:
                r = "exit"
            else:
                why = "reduction of a non-4D tensor"
        elif name in ("ADD", "MUL"):
            shapes = [shape(t) for t in op.inputs]
            if any(len(s) != 4 for s in shapes):
                why = "binary op on non-4D tensors"
            elif any(is_static(t) and sum(d != 1 for d in shape(t)) > 1 for t in op.inputs):
                why = "static operand is not a scalar or a vector"
            else:
                r = "nchw"
        elif name in ("RELU", "RELU6", "RELU_N1_TO_1", "TANH", "LOGISTIC", "HARD_SWISH",
                      "ABS", "NEG", "SQUARE", "SQRT", "ELU", "LEAKY_RELU", "GELU", "ROUND",
                      "CEIL", "FLOOR", "EXP"):
            if len(row["input_shape"]) == 4:
                r = "nchw"
            else:
                why = "elementwise op on a non-4D tensor"
        elif name == "RESIZE_BILINEAR":
            s = row["input_shape"]
            r, why = ("nchw", "") if len(s) == 4 and s[1] > 1 and s[2] > 1 else ("", "1-pixel input")
        elif name == "FULLY_CONNECTED":
            r = "nchw"
            w = const_data(op.inputs[1])
            if w is not None:
                row["weight_sparsity"] = float(np.mean(w == 0))
        elif name == "DEPTH_TO_SPACE":
            r = "exit"
        else:
            why = f"{name} has no NCHW implementation in XNNPACK"
        role[i] = r
        row["nchw_role"] = r
        row["reason"] = why
        rows.append(row)

    # cluster connectivity: an NCHW op must be fed (through fused PADs /
    # DENSIFY) by the entry conv or other NCHW ops, and its outputs must only
    # feed cluster ops; the cluster must end in an exit op.
    def feeder(t):
        while t in producers:
            j = producers[t]
            if role.get(j) == "fused":
                t = g.operators[j].inputs[0]
                continue
            return j
        return None

    in_cluster = {i: role[i] in ("entry", "nchw", "exit") for i in role}
    changed = True
    while changed:
        changed = False
        for i, op in enumerate(g.operators):
            if not in_cluster.get(i) or role[i] == "entry":
                continue
            for t in op.inputs:
                if t < 0 or is_static(t):
                    continue
                j = feeder(t)
                if j is None or not in_cluster.get(j):
                    in_cluster[i] = False
                    changed = True
                    rows[i]["reason"] = rows[i]["reason"] or (
                        "input comes from outside the NCHW cluster "
                        f"({'graph input' if j is None else g.operators[j] and opname(g.operators[j])})")
                    break
        # XNNPACK also rejects a cluster whose *input* values have consumers
        # outside the cluster (e.g. a skip connection read by a non-NCHW op).
        for i, op in enumerate(g.operators):
            if not in_cluster.get(i) or role[i] == "entry":
                continue
            for t in op.inputs:
                if t < 0 or is_static(t):
                    continue
                for c in consumers.get(t, []):
                    if not in_cluster.get(c) and role.get(c) != "fused":
                        in_cluster[i] = False
                        changed = True
                        rows[i]["reason"] = rows[i]["reason"] or (
                            f"its input is also read outside the NCHW cluster ({opname(g.operators[c])})")
                        break
    # Hazard (XNNPACK bug, benchmarks/xnnpack_repro): a cluster node that is
    # not an NCHW->NHWC exit but whose output leaves the cluster keeps an NHWC
    # output while its input is NCHW; for CONV_2D this gives all-zero outputs
    # or a failed allocate_tensors.
    hazards = []
    for i, op in enumerate(g.operators):
        rows[i]["hazard"] = ""
        if not in_cluster.get(i) or role[i] in ("exit", "entry"):
            continue
        def c_in(c):
            if role.get(c) == "fused":
                return all(in_cluster.get(cc) for cc in consumers.get(g.operators[c].outputs[0], []))
            return bool(in_cluster.get(c))
        leaves = any(t in graph_outputs or any(not c_in(c) for c in consumers.get(t, []))
                     for t in op.outputs)
        if leaves and opname(op) != "FULLY_CONNECTED":
            rows[i]["hazard"] = ("output leaves the NCHW cluster without an NCHW->NHWC op: "
                                 "XNNPACK sparse-path bug (zero outputs or failed allocate_tensors); "
                                 "rewrite_for_xnnpack_sparse(apply_sparse_path_workaround=True) avoids it")
            hazards.append(i)
    has_entry = any(in_cluster.get(i) and role[i] == "entry" for i in role)
    has_exit = any(in_cluster.get(i) and role[i] == "exit" for i in role)
    zf = zeros / params if params else 0.0
    if not has_entry:
        verdict = ("no NHWC->NCHW entry: needs a 3x3 stride-2 convolution with 3 input "
                   "channels and explicit padding 1 on every side")
    elif not has_exit:
        verdict = "no NCHW->NHWC exit (global average pooling / mean) reachable inside the cluster"
    elif params == 0:
        verdict = "cluster has no 1x1 convolutions"
    elif not zeros * 3 > params * 2:
        verdict = f"1x1 convolutions are only {zf:.1%} zeros (XNNPACK needs > 66.7%)"
    else:
        verdict = ""
    ok = verdict == ""
    for i, rw in enumerate(rows):
        rw["sparse_path"] = bool(ok and in_cluster.get(i) and role[i] in ("entry", "nchw", "exit"))
        if role[i] == "fused":
            rw["sparse_path"] = bool(ok and rw["reason"].startswith("zero PAD"))
        if in_cluster.get(i) and not ok:
            rw["reason"] = "cluster rejected: " + verdict
    df = pd.DataFrame(rows)
    df.attrs.update(hazards=hazards if ok else [], sparse_path=ok, reason=verdict or "XNNPACK will switch to sparse inference "
                    "(on ARM/aarch64 or x86 without AVX)", zero_fraction_1x1=zf)
    return df


def _densify(tensor, buffer):
    """Decode a TFLite sparse (CSR-like) constant into a dense float array."""
    sp = tensor.sparsity
    data = np.frombuffer(bytes(bytearray(buffer.data)), dtype=np.float32) if buffer.data is not None else np.zeros(0, np.float32)
    shape = [int(s) for s in tensor.shape]
    if sp is None:
        return data.reshape(shape)
    order = list(sp.traversalOrder)
    dims = sp.dimMetadata
    nd = len(order)
    block_map = list(sp.blockMap) if sp.blockMap is not None else []
    vals = data

    def arr(x):
        for attr in ("values",):
            if hasattr(x, attr):
                return np.asarray(getattr(x, attr))
        return np.asarray(x)

    # walk the dimension tree
    idx = [[]]
    for k in range(nd):
        dm = dims[k]
        new = []
        if dm.format == 0:  # dense
            for pos, path in enumerate(idx):
                for c in range(dm.denseSize):
                    new.append(path + [c])
        else:  # CSR
            seg = arr(dm.arraySegments)
            ind = arr(dm.arrayIndices)
            for pos, path in enumerate(idx):
                for q in range(int(seg[pos]), int(seg[pos + 1])):
                    new.append(path + [int(ind[q])])
        idx = new
    dense = np.zeros(shape, np.float32)
    nb = len(block_map)
    orig_nd = nd - nb
    block_sizes = [dims[orig_nd + b].denseSize for b in range(nb)]
    for v, path in zip(vals, idx):
        coord = [0] * orig_nd
        for k in range(orig_nd):
            coord[order[k]] = path[k]
        for b in range(nb):
            d = block_map[b]
            coord[d] = coord[d] * block_sizes[b] + path[orig_nd + b]
        dense[tuple(coord)] = v
    return dense
