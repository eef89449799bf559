"""Rewrite a sparse Keras model so XNNPACK's sparse (NCHW / SpMM) inference path takes it.

XNNPACK's rules for that path are listed in :mod:`keras_rigl.tflite.xnnpack_report`
(which checks a ``.tflite`` file against them). Two matter for the rewrite:
the cluster must be entered by a 3x3 stride-2 convolution with padding
exactly 1 on every side, and stride-2 depthwise convolutions must not carry
TF SAME padding. A zero-valued PAD feeding a convolution is fused into its
explicit padding, so an explicit ``ZeroPadding2D`` + ``padding="valid"`` is
what makes a stride-2 3x3 layer acceptable; the TFLite converter folds a PAD
that equals TF SAME padding back into ``padding=SAME``, so only pads that
*differ* from SAME survive conversion.

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
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import keras

from keras_rigl._compat import fill_in_arguments, graph_model, inbound_nodes

__all__ = ["SpatialFlip", "rewrite_for_xnnpack_sparse", "same_padding"]


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
        # One axis at a time: keras.ops.flip with a tuple of axes fails on TensorFlow in Keras 3.12.
        return keras.ops.flip(keras.ops.flip(x, axis=1), axis=2)

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
    model = graph_model(model)
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
        for node in inbound_nodes(op):
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
        for node in inbound_nodes(op):
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
                    args, kwargs = fill_in_arguments(node, {id(t): unflip(t) for t in ins})
                    in_flipped = False
                else:
                    args, kwargs = fill_in_arguments(node, {id(t): tmap[id(t)] for t in ins})
                if in_flipped and not all(fmap[id(t)] for t in ins if len(t.shape) == 4):
                    args, kwargs = fill_in_arguments(node, {id(t): unflip(t) for t in ins})
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
