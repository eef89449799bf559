"""Counting, in one place: active weights, forward FLOPs, training FLOPs.

Everything in keras_rigl that counts weights or FLOPs reads it from here
(``sparsity_report``, the callbacks' sparsity, the example scripts).

Weights
    :func:`kernel_counts` lists every *kernel* of a model (every weight the
    maskable registry knows, depthwise kernels included, masked or not) with
    its size, active count and forward FLOPs. A masked kernel's active count
    is its mask's non-zeros; an unmasked kernel counts as dense.
    :func:`count_active` counts the masked weights only (what ``sparsify``'s
    ``sparsity`` refers to); :func:`count_nonzero_params` counts every
    trainable parameter (biases and normalisation too) that can be non-zero.

Forward FLOPs (the RigL paper's convention)
    One multiply-add is 2 FLOPs and only the multiply-adds with kernels are
    counted (biases, activations and normalisation are left out). A kernel
    with ``active`` non-zeros applied at ``positions`` places per example
    costs ``2 * active * positions``; dense uses the kernel's full size.

    * Dense / EinsumDense / Conv*: positions = output "pixels" (product of the
      output dims except batch and channels). Transposed convs apply the
      kernel at every *input* position.
    * Depthwise kernels: output pixels (each output channel reads one input
      channel, so the kernel's size already is the multiply-adds per pixel).
    * RNN kernels: once per time step. Embedding: a lookup, 0 FLOPs.

Training FLOPs (Evci et al., 2020, appendix H), per example, with ``f_D`` the
dense and ``f_S`` the sparse forward FLOPs:

* ``dense``, and ``prune`` (TFMOT pruning, charged as dense over its whole
  schedule: an upper bound): ``3 f_D`` (forward + two backward products);
* ``static`` and ``set``: ``3 f_S``;
* ``snfs`` (dense gradient every step): ``2 f_S + f_D``;
* ``rigl`` (dense gradient only on mask-update steps): a step with the dense
  gradient costs ``2 f_S + f_D``, any other ``3 f_S``. Given the examples
  seen on update steps (``update_examples``), the total is
  ``3 f_S * examples + (f_D - f_S) * update_examples``: the updates that
  really happened. Without it, the paper's amortised rate for one update
  every ``update_freq`` steps: ``(3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)``.

Inference FLOPs per example = ``f_S`` (``f_D`` for a dense model).
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from keras_rigl import _compat, backend_capture, maskable, validation
from keras_rigl.masked import Masked
from keras_rigl.sparsify import all_layers, masked_layers

METHODS = ("dense", "prune", "static", "set", "snfs", "rigl")


# ----------------------------------------------------------------- weights
@dataclasses.dataclass(frozen=True)
class KernelCount:
    """One kernel of a model: its size, active entries and where it is applied."""

    layer: str  # the layer called in the model (the wrapped layer's name for Masked)
    weight: str  # relative to that layer, e.g. "kernel", "forward_lstm/lstm_cell/kernel"
    shape: tuple
    masked: bool
    params: int
    active: int  # non-zeros of the mask; ``params`` for an unmasked kernel
    positions: int | None  # applications per example; None when the shapes are unknown

    @property
    def dense_flops(self):
        return forward_flops(self.params, self.positions)

    @property
    def sparse_flops(self):
        return forward_flops(self.active, self.positions)


def mask_array(layer, masked_weight):
    """The mask of ``masked_weight`` (of the Masked ``layer``) as NumPy, checked to hold only 0 and 1.

    ``Masked.set_masks`` refuses anything else, but a mask variable can be
    assigned directly; a 0.5 would be counted as active and mask nothing.
    """
    mask = keras.ops.convert_to_numpy(masked_weight.mask)
    bad = mask[(mask != 0) & (mask != 1)]
    if bad.size:
        raise ValueError(
            f"The mask {layer.name}/{masked_weight.name} holds values other than 0 and 1 "
            f"({', '.join(f'{v:g}' for v in np.unique(bad)[:3])}); set masks through "
            "Masked.set_masks, which takes only 0/1."
        )
    return mask


def _kernel_refs(layer):
    """Every kernel the registry knows on ``layer``, depthwise ones included."""
    try:
        return maskable.maskable_weights(layer, depthwise=True)
    except ValueError:  # a custom layer naming a weight it does not hold: nothing to count
        return []


def kernel_counts(model):
    """A :class:`KernelCount` per kernel of ``model``, masked or not, in layer order.

    Masked layers list their masked weights first, then any kernel they leave
    dense (e.g. a SeparableConv's depthwise kernel); every other layer lists
    the kernels the maskable registry knows (excluded Dense/Conv layers,
    DepthwiseConv kernels, ...), all dense.
    """
    if isinstance(model, keras.Model):
        layers = all_layers(model)
    elif isinstance(model, keras.layers.Layer):
        layers = [model]
    else:
        raise TypeError(
            f"Expected a keras.Model or a layer, got {type(model).__name__}; load a saved model with "
            "keras.models.load_model first."
        )
    rows = []
    for layer in layers:
        if isinstance(layer, keras.Model):
            continue
        if isinstance(layer, Masked):
            name, inner = layer.layer.name, layer.layer
            for mw in layer.masked_weights:
                mask = mask_array(layer, mw)
                rows.append(_row(name, mw.name, layer, mw.ref.owner, mask.shape, int(np.count_nonzero(mask)), True))
            skip = {mw.name for mw in layer.masked_weights}
        else:
            name, inner, skip = layer.name, layer, set()
        for ref in _kernel_refs(inner):
            if ref.name not in skip:
                shape = tuple(ref.variable.shape)
                rows.append(_row(name, ref.name, layer, ref.owner, shape, math.prod(shape), False))
    return rows


def _row(layer_name, weight_name, called_layer, owner, shape, active, masked):
    shape = tuple(int(d) for d in shape)
    return KernelCount(
        layer=layer_name,
        weight=weight_name,
        shape=shape,
        masked=masked,
        params=int(math.prod(shape)),
        active=int(active),
        positions=weight_positions(called_layer, owner),
    )


def count_active(model):
    """``(active, total)`` entries over the masked weights of ``model``.

    ``1 - active / total`` is the sparsity that ``sparsify(model, sparsity)``
    aims at; kernels left dense are not included (see :func:`kernel_counts`).
    """
    active = total = 0
    for layer in masked_layers(model):
        for mw in layer.masked_weights:
            mask = mask_array(layer, mw)
            active += int(np.count_nonzero(mask))
            total += int(mask.size)
    return active, total


def count_nonzero_params(model):
    """Trainable parameters of ``model`` that can be non-zero.

    Every trainable weight counts in full (biases and normalisation too),
    except masked weights, which count only their active entries.
    """
    masks = {id(mw.weight): (layer, mw) for layer in masked_layers(model) for mw in layer.masked_weights}
    total = 0
    for variable in model.trainable_weights:
        if backend_capture.is_probe(variable):
            continue  # a gradient probe (JAX/PyTorch) holds the last gradient, no parameter
        if id(variable) in masks:
            total += int(np.count_nonzero(mask_array(*masks[id(variable)])))
        else:
            total += int(math.prod(variable.shape))
    return total


# ------------------------------------------------------------ forward FLOPs
def _static(shape):
    if shape is None:
        return None
    dims = list(shape)
    if any(d is None for d in dims[1:]):
        return None
    return dims


def _layer_shapes(layer):
    def first(s):
        if isinstance(s, (list, tuple)) and s and isinstance(s[0], (list, tuple)):
            return s[0]
        return s

    try:
        in_shape = first(layer.input.shape) if hasattr(layer, "input") else None
    except (AttributeError, ValueError):
        in_shape = None
    try:
        out_shape = first(layer.output.shape) if hasattr(layer, "output") else None
    except (AttributeError, ValueError):
        out_shape = None
    return _static(in_shape), _static(out_shape)


def weight_positions(called_layer, owner):
    """How many times per example the kernel of ``owner`` is applied, or None if unknown.

    ``called_layer`` is the layer called in the graph (the Masked wrapper or
    the plain layer), whose input/output shapes are known.
    """
    if isinstance(owner, keras.layers.Embedding):
        return 0
    if isinstance(owner, keras.layers.EinsumDense):
        return _einsum_positions(owner, called_layer)
    in_shape, out_shape = _layer_shapes(called_layer)
    if isinstance(owner, (keras.layers.LSTMCell, keras.layers.GRUCell, keras.layers.SimpleRNNCell)):
        if in_shape is None or len(in_shape) < 3:
            return None
        return int(in_shape[1])  # time steps
    transposed = isinstance(
        owner, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
    )
    shape = in_shape if transposed else out_shape
    if shape is None:
        return None
    if getattr(owner, "data_format", "channels_last") == "channels_first" and len(shape) > 2:
        spatial = shape[2:]
    else:
        # under TimeDistributed the time axis is one of these dims
        spatial = shape[1:-1]
    return int(math.prod(spatial)) if spatial else 1


def _einsum_positions(owner, called_layer):
    """How often an EinsumDense kernel is applied per example.

    The product of the output's non-batch dims that do not come from the
    kernel: "ab,bc->ac" gives 1 per example, "abc,cde->abde" gives b. The
    input shape is the one the layer was built with (so EinsumDense inside
    MultiHeadAttention works); an unknown dim (MultiHeadAttention builds its
    output projection for any length) is taken from the called layer's output.
    """
    build_shapes = _compat.build_input_shapes(owner)
    if not build_shapes:
        return None
    input_shape = list(next(iter(build_shapes.values())))
    inputs, out = owner.equation.split("->")
    in_letters, kernel_letters = inputs.split(",")
    positions = 1
    for letter in out[1:]:
        if letter in kernel_letters:
            continue
        dim = input_shape[in_letters.index(letter)] if letter in in_letters else None
        if dim is None:
            _, called_out = _layer_shapes(called_layer)
            if called_out is None or len(called_out) < 3:
                return None
            return int(math.prod(called_out[1:-1]))
        positions *= int(dim)
    return positions


def forward_flops(size_or_active, positions):
    """``2 * size_or_active * positions``; None when ``positions`` is unknown."""
    if positions is None:
        return None
    return 2 * int(size_or_active) * int(positions)


@dataclasses.dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs per example of a model: ``sparse`` (f_S) and ``dense`` (f_D)."""

    sparse: int
    dense: int
    unknown: tuple = ()  # "layer/weight" of kernels whose positions could not be told (left out)

    @property
    def ratio(self):
        return self.sparse / self.dense if self.dense else 1.0


def model_flops(model):
    """:class:`ModelFlops` of ``model``: masked kernels count their active entries, every other kernel dense."""
    rows = kernel_counts(model)
    known = [r for r in rows if r.positions is not None]
    return ModelFlops(
        sparse=sum(r.sparse_flops for r in known),
        dense=sum(r.dense_flops for r in known),
        unknown=tuple(f"{r.layer}/{r.weight}" for r in rows if r.positions is None),
    )


def inference_flops(model):
    """Inference FLOPs per example of ``model``: f_S (equal to f_D for a model without masks)."""
    return model_flops(model).sparse


# ----------------------------------------------------------- training FLOPs
def train_flops_per_example(method, f_sparse, f_dense, update_freq=100):
    """Training FLOPs per example seen for ``method``; RigL at the paper's amortised rate."""
    method = validation.check_choice("method", method.lower() if isinstance(method, str) else method, METHODS)
    update_freq = validation.check_int("update_freq", update_freq, 1, hint=" (steps between mask updates)")
    if method in ("dense", "prune"):
        return 3.0 * f_dense
    if method in ("static", "set"):
        return 3.0 * f_sparse
    if method == "snfs":
        return 2.0 * f_sparse + f_dense
    return (3.0 * f_sparse * update_freq + 2.0 * f_sparse + f_dense) / (update_freq + 1)


def training_flops(method, f_sparse, f_dense, examples, update_freq=100, update_examples=None):
    """Total training FLOPs of ``method`` over ``examples`` seen (steps x batch size).

    ``update_examples``: examples seen on the steps where RigL computed the
    dense gradient (its mask-update steps). Given, RigL is charged for those
    updates exactly; None, at the paper's amortised rate for ``update_freq``.
    Other methods do not depend on it (SET's updates need no dense gradient).
    """
    examples = validation.check_int("examples", examples, 0, hint=" (optimizer steps x batch size)")
    update_examples = validation.check_optional_int(
        "update_examples", update_examples, 0, examples, hint=" (examples seen on mask-update steps, or None)"
    )
    per_example = train_flops_per_example(method, f_sparse, f_dense, update_freq)
    if method.lower() == "rigl" and update_examples is not None:
        return 3.0 * f_sparse * examples + float(f_dense - f_sparse) * update_examples
    return per_example * examples


def equal_flops_steps(target_flops, f_dense, batch_size):
    """Optimizer steps a dense run may take to spend ``target_flops`` (at least 1)."""
    per_step = 3.0 * f_dense * batch_size
    return max(1, int(round(target_flops / per_step)))


def training_flops_summary(model, method, examples, update_freq=100, update_examples=None):
    """FLOPs of one training run of ``model`` (after training: its final masks).

    Returns a dict: ``f_sparse``, ``f_dense`` (forward FLOPs per example),
    ``train_flops`` and ``train_flops_dense`` (the same examples trained
    dense), ``train_flops_ratio``, ``inference_flops`` and
    ``inference_flops_dense``. ``method`` is one of :data:`METHODS`; see
    :func:`training_flops` for ``update_examples``.
    """
    flops = model_flops(model)
    train = training_flops(method, flops.sparse, flops.dense, examples, update_freq, update_examples)
    dense_train = training_flops("dense", flops.sparse, flops.dense, examples)
    return {
        "f_sparse": flops.sparse,
        "f_dense": flops.dense,
        "train_flops": train,
        "train_flops_dense": dense_train,
        "train_flops_ratio": train / dense_train if dense_train else 1.0,
        "inference_flops": flops.sparse,
        "inference_flops_dense": flops.dense,
    }
