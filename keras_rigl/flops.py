"""Forward FLOPs of masked weights, dense and sparse.

Convention (the RigL paper's): one multiply-add is 2 FLOPs, and only the
multiply-adds with the masked weight are counted (biases, activations and
normalisation are left out). A weight with ``active`` non-zeros used at
``positions`` output positions per example costs ``2 * active * positions``;
dense uses the full weight size instead of ``active``.

* Dense / EinsumDense / Conv*: positions = number of output "pixels" (product
  of the output dims except batch and channels / last dim). For transposed
  convs the kernel is applied at every *input* position.
* RNN kernels: applied once per time step.
* Embedding: a lookup, 0 FLOPs.
* Depthwise kernels: positions = output pixels (each output channel uses
  one input channel).
"""

from __future__ import annotations

import math

import keras


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


def weight_positions(wrapper_layer, owner):
    """How many times per example the weight of ``owner`` is applied, or None if unknown.

    ``wrapper_layer`` is the layer that was called in the graph (the Masked
    wrapper or the plain layer) whose input/output shapes are known.
    """
    if isinstance(owner, keras.layers.Embedding):
        return 0
    if isinstance(owner, keras.layers.EinsumDense):
        return _einsum_positions(owner, wrapper_layer)
    in_shape, out_shape = _layer_shapes(wrapper_layer)
    rnn_cell = isinstance(owner, (keras.layers.LSTMCell, keras.layers.GRUCell, keras.layers.SimpleRNNCell))
    if rnn_cell:
        if in_shape is None or len(in_shape) < 3:
            return None
        return int(in_shape[1])  # time steps
    transposed = isinstance(
        owner, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
    )
    shape = in_shape if transposed else out_shape
    if shape is None:
        return None
    data_format = getattr(owner, "data_format", "channels_last")
    if data_format == "channels_first" and len(shape) > 2:
        spatial = shape[2:]
    else:
        spatial = shape[1:-1]
    positions = int(math.prod(spatial)) if spatial else 1
    if isinstance(wrapper_layer, keras.layers.TimeDistributed) or isinstance(
        getattr(wrapper_layer, "layer", None), keras.layers.TimeDistributed
    ):
        positions = positions  # spatial already includes the time axis
    return positions


def _einsum_positions(owner, wrapper_layer):
    """How often an EinsumDense kernel is applied per example.

    The product of the output's non-batch dims that do not come from the
    kernel: "ab,bc->ac" gives 1 per example, "abc,cde->abde" gives b. The
    input shape is the one the layer was built with (so EinsumDense inside
    MultiHeadAttention works); an unknown dim (MultiHeadAttention builds its
    output projection for any length) is taken from the wrapper's output.
    """
    build_shapes = getattr(owner, "_build_shapes_dict", None) or {}
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
            _, wrapper_out = _layer_shapes(wrapper_layer)
            if wrapper_out is None or len(wrapper_out) < 3:
                return None
            return int(math.prod(wrapper_out[1:-1]))
        positions *= int(dim)
    return positions


def forward_flops(size_or_active, positions):
    if positions is None:
        return None
    return 2 * int(size_or_active) * int(positions)
