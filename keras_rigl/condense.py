"""``condense``: a sparse model made physically smaller, as an ordinary dense Keras model.

A sparse layer can hold output units (Dense units, Conv output channels)
that compute nothing that depends on the input, or whose output nothing
reads. Removing them makes the model smaller and faster everywhere (no
sparse kernel needed), and ``condense`` does it without changing a single
output beyond float rounding:

* **no active inputs**: every incoming kernel entry of the unit is 0 (masked
  off, e.g. a unit ablated by the ``"fan_in"`` structure). The unit outputs
  the constant ``activation(bias)`` for every input; that constant, carried
  through what follows (BatchNormalization, activations, pooling, Flatten,
  Dropout), is folded into the bias of the layers that read it, and their
  input rows / channels for the unit are removed.
* **no active outputs**: every kernel entry that reads the unit downstream is
  0. Nothing depends on it; it is removed with those rows.

What lies between a unit and the layers that read it must keep the unit's
channel separate: BatchNormalization (on the last axis; its entries for the
unit are removed with it), elementwise activation layers, Dropout and noise
layers (identity at inference), pooling and Flatten (channels last), and
DepthwiseConv1D/2D (the unit's depthwise channels are removed with it) and
ZeroPadding. A constant stays a constant through a depthwise convolution
without padding; under zero padding (ZeroPadding, a "same" depthwise
convolution) only a constant that is exactly 0 does (the padding reads the
same 0), so a unit with a non-zero constant there is kept. The
readers must be Dense or Conv1D/2D/3D (channels last, ``groups=1``). A
constant channel read by a convolution with ``"same"``/``"causal"`` padding
is not a constant contribution at the borders (the padding reads zeros), so
it cannot go into a bias: one such unit stays as a "carrier" and that
convolution's kernel slice of every other one is added to the carrier's,
scaled by the ratio of their constants (exact: both are constant channels
under the same padding). A unit whose constant is 0 there goes. Anything else on the way (a residual Add,
Concatenate, Reshape, a nested model, a model output) keeps the unit: ``condense`` never changes what the model computes.
The report says what was removed and what was kept and why.

Removing one unit can make another removable (a unit whose only reader was
removed); ``condense`` repeats until nothing more can go.

The condensed model is built for inference: the constants hold with
Dropout/noise layers inactive and BatchNormalization in inference mode.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_rigl import _compat
from keras_rigl.sparsify import check_built, masked_layers, strip

# Activations that act on each entry alone: a constant channel stays a
# constant channel and the others do not see it. (softmax, glu... mix channels.)
_ELEMENTWISE_ACTIVATIONS = frozenset(
    "linear relu relu6 leaky_relu elu selu celu gelu silu swish hard_silu hard_swish sigmoid hard_sigmoid "
    "tanh hard_tanh softplus softsign exponential mish log_sigmoid sparse_plus squareplus tanh_shrink "
    "soft_shrink hard_shrink threshold".split()
)
_PRODUCERS = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_TRANSPOSED = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)
_IDENTITY_AT_INFERENCE = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
    keras.layers.ActivityRegularization,
)
_POOLING = (
    keras.layers.MaxPooling1D,
    keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D,
    keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D,
    keras.layers.AveragePooling3D,
    keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D,
    keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D,
)
_ELEMENTWISE_LAYERS = (keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU)
_ZERO_PADDING = (keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D)

NO_INPUTS = "no active inputs"
NO_OUTPUTS = "no active outputs"


@dataclasses.dataclass
class CondenseReport:
    """What :func:`condense` did.

    ``removed``: ``{layer name: [unit indices of the input model]}``;
    ``reasons``: ``{layer name: {unit: "no active inputs" | "no active outputs"}}``;
    ``kept``: ``{layer name: why units with no active inputs were kept}``;
    ``params_before`` / ``params_after``: the models' parameter counts.
    """

    removed: dict = dataclasses.field(default_factory=dict)
    reasons: dict = dataclasses.field(default_factory=dict)
    kept: dict = dataclasses.field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0

    @property
    def n_removed(self):
        return sum(len(units) for units in self.removed.values())

    def __str__(self):
        lines = [
            f"condense: {self.n_removed} units removed, parameters {self.params_before} -> {self.params_after}"
        ]
        for name, units in self.removed.items():
            lines.append(f"  {name}: removed {len(units)} {_short(units)}")
        for name, why in self.kept.items():
            lines.append(f"  {name}: kept {why}")
        return "\n".join(lines)


def _short(units, limit=12):
    text = ", ".join(str(u) for u in units[:limit])
    return f"[{text}{', ...' if len(units) > limit else ''}]"


class _Blocked(Exception):
    """A unit's channel reaches something that cannot lose it."""


@dataclasses.dataclass
class _Reader:
    """A Dense/Conv layer that reads the producer's units, with the features (last-axis indices) it reads them at."""

    layer: keras.layers.Layer
    features: list  # per candidate unit: int array of indices into the reader's input last axis
    values: np.ndarray  # the constant value at every index of the reader's input last axis
    fragile: np.ndarray  # per unit: a zero padding on the way saw a non-zero constant (no longer constant)


def _is_elementwise_activation(fn):
    name = getattr(fn, "__name__", None)
    try:
        return name in _ELEMENTWISE_ACTIVATIONS and keras.activations.get(name) is fn
    except (ValueError, TypeError):
        return False


def _channels_last(layer):
    return getattr(layer, "data_format", "channels_last") in (None, "channels_last")


def _is_producer(layer):
    if not isinstance(layer, _PRODUCERS) or isinstance(layer, _TRANSPOSED):
        return False
    if isinstance(layer, keras.layers.Dense):
        return type(layer) is keras.layers.Dense and _is_elementwise_activation(layer.activation)
    return (
        type(layer).__name__ in ("Conv1D", "Conv2D", "Conv3D")
        and _channels_last(layer)
        and getattr(layer, "groups", 1) == 1
        and _is_elementwise_activation(layer.activation)
    )


def _single_tensor(value):
    return value if isinstance(value, keras.KerasTensor) else None


class _Graph:
    """Who reads which tensor in a Sequential/functional model (public ``layer.input``/``layer.output``)."""

    def __init__(self, model):
        self.graph = _compat.graph_model(model)
        self.layers = list(self.graph.layers)
        self.outputs = {id(t) for t in keras.tree.flatten(self.graph.outputs)}
        self.readers = {}
        self.shared = set()
        for layer in self.layers:
            try:
                inputs = keras.tree.flatten(layer.input)
            except (ValueError, AttributeError):  # used more than once, or never called
                self.shared.add(id(layer))
                continue
            for tensor in inputs:
                self.readers.setdefault(id(tensor), []).append(layer)

    def output_of(self, layer):
        if id(layer) in self.shared:
            return None
        try:
            return _single_tensor(layer.output)
        except (ValueError, AttributeError):
            return None


def _through(layer, values, features, fragile):
    """Carry the units through a layer that keeps channels apart: (values, features, fragile), or raise _Blocked.

    ``fragile[u]``: the unit's channel met zero padding while non-zero, so past that point it is no longer
    a constant; such a unit can still go if nothing reads it, but its constant cannot be folded.
    """
    name = f"{layer.name} ({type(layer).__name__})"
    if isinstance(layer, _IDENTITY_AT_INFERENCE):
        return values, features, fragile
    if isinstance(layer, _POOLING):
        if not _channels_last(layer):
            raise _Blocked(f"{name} is channels_first")
        return values, features, fragile
    if isinstance(layer, _ZERO_PADDING):
        if not _channels_last(layer):
            raise _Blocked(f"{name} is channels_first")
        return values, features, fragile | _non_zero(values, features)
    if _is_depthwise(layer):
        return _through_depthwise(layer, values, features, fragile)
    if isinstance(layer, keras.layers.Flatten):
        if not _channels_last(layer):
            raise _Blocked(f"{name} is channels_first")
        shape = layer.input.shape
        positions = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
        width = values.shape[0]
        offsets = np.arange(positions) * width
        new_features = [(offsets[:, None] + f[None, :]).reshape(-1) for f in features]
        return np.tile(values, positions), new_features, fragile
    if isinstance(layer, keras.layers.BatchNormalization):
        rank = len(layer.input.shape)
        if layer.axis not in (-1, rank - 1):
            raise _Blocked(f"{name} normalises axis {layer.axis}, not the last")
        return _apply(layer, values, rank), features, fragile
    if isinstance(layer, _ELEMENTWISE_LAYERS) or (
        isinstance(layer, keras.layers.Activation) and _is_elementwise_activation(layer.activation)
    ):
        return _apply(layer, values, len(layer.input.shape)), features, fragile
    raise _Blocked(f"read by {name}")


def _is_depthwise(layer):
    return type(layer).__name__ in ("DepthwiseConv1D", "DepthwiseConv2D")


def _non_zero(values, features):
    return np.array([bool(np.any(values[f] != 0)) for f in features])


def _through_depthwise(layer, values, features, fragile):
    """A depthwise convolution maps input channel j to output channels ``j * multiplier + m``.

    A constant channel stays constant through it without padding (``valid``, or a 1x1 kernel), and a
    channel that is exactly 0 stays constant (its bias) under zero padding too, since the padding reads
    the same 0.
    """
    if not _channels_last(layer) or not _is_elementwise_activation(layer.activation):
        raise _Blocked(f"read by {layer.name} ({type(layer).__name__})")
    kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), dtype=np.float64)
    multiplier = kernel.shape[-1]
    taps = kernel.reshape(-1, kernel.shape[-2], multiplier).sum(axis=0)  # (channels, multiplier)
    out = (values[:, None] * taps).reshape(-1)
    if layer.use_bias:
        out = out + np.asarray(keras.ops.convert_to_numpy(layer.bias), dtype=np.float64)
    out = np.asarray(keras.ops.convert_to_numpy(layer.activation(keras.ops.convert_to_tensor(
        out.astype(layer.compute_dtype)))), dtype=np.float64)
    if not _exact_padding(layer):
        fragile = fragile | _non_zero(values, features)
    new_features = [(f[:, None] * multiplier + np.arange(multiplier)[None, :]).reshape(-1) for f in features]
    return out, new_features, fragile


def _apply(layer, values, rank):
    """The layer (in inference mode) on a constant tensor whose last axis holds ``values``."""
    x = values.reshape((1,) * (rank - 1) + (-1,)).astype(layer.input.dtype)
    kwargs = {"training": False} if _compat.call_accepts(layer, "training") else {}
    return np.asarray(keras.ops.convert_to_numpy(layer(x, **kwargs)), dtype=np.float64).reshape(-1)


def _trace(graph, producer, values, n_units):
    """The readers of ``producer``'s units and the channel-keeping layers between (raises _Blocked)."""
    readers, between = [], []
    start = graph.output_of(producer)
    if start is None:
        raise _Blocked("the layer is shared or has several outputs")
    pending = [(start, values, [np.array([u]) for u in range(n_units)], np.zeros(n_units, dtype=bool))]
    while pending:
        tensor, values, features, fragile = pending.pop()
        if id(tensor) in graph.outputs:
            raise _Blocked("its output is a model output")
        for layer in graph.readers.get(id(tensor), []):
            if id(layer) in graph.shared:
                raise _Blocked(f"read by the shared layer {layer.name}")
            if _is_reader(layer):
                readers.append(_Reader(layer, features, values, fragile))
                continue
            if len(keras.tree.flatten(layer.input)) != 1:
                raise _Blocked(f"read by {layer.name} ({type(layer).__name__}), which merges tensors")
            new_values, new_features, new_fragile = _through(layer, values, features, fragile)
            out = graph.output_of(layer)
            if out is None:
                raise _Blocked(f"read by {layer.name} with several outputs")
            between.append((layer, features))
            pending.append((out, new_values, new_features, new_fragile))
    return readers, between


def _is_reader(layer):
    if type(layer) is keras.layers.Dense:
        return True
    return type(layer).__name__ in ("Conv1D", "Conv2D", "Conv3D") and _channels_last(layer) and layer.groups == 1


class _Work:
    """Working copies of every weight the plan changes, and which rows/columns/features survive."""

    def __init__(self):
        self.arrays = {}  # layer name -> {variable name: float64 array}
        self.keep_in = {}  # reader name -> bool over its input features
        self.keep_out = {}  # producer name -> bool over its units
        self.keep_features = {}  # BatchNormalization name -> bool over its features
        self.add_bias = set()  # readers that had no bias and now need one

    def weights(self, layer):
        if layer.name not in self.arrays:
            self.arrays[layer.name] = {
                v.name: np.asarray(keras.ops.convert_to_numpy(v), dtype=np.float64) for v in layer.weights
            }
        return self.arrays[layer.name]

    def bias(self, layer):
        arrays = self.weights(layer)
        if "bias" not in arrays:
            units = arrays["kernel"].shape[-1]
            arrays["bias"] = np.zeros(units)
        return arrays["bias"]


def _constants(layer, work):
    """``activation(bias)`` for every unit: the output of a unit with no active inputs."""
    arrays = work.weights(layer)
    bias = arrays.get("bias", np.zeros(arrays["kernel"].shape[-1]))
    dtype = layer.compute_dtype
    out = layer.activation(keras.ops.convert_to_tensor(bias.astype(dtype)))
    return np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float64)


def _exact_padding(layer):
    """Whether a constant input channel gives the reader a constant output contribution (no zero padding)."""
    if isinstance(layer, keras.layers.Dense) or layer.padding == "valid":
        return True
    return all(int(k) == 1 for k in layer.kernel_size)  # a 1x1 kernel pads nothing under "same" either


def _rows(work, reader):
    """The reader's working kernel as ``(taps, inputs, outputs)``."""
    kernel = work.weights(reader.layer)["kernel"]
    return kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1])


def _plan_producer(graph, layer, work, report):
    """Decide which units of ``layer`` go and record the folds; returns the removed unit indices."""
    kernel = work.weights(layer)["kernel"]
    n_units = kernel.shape[-1]
    no_inputs = ~np.any(kernel.reshape(-1, n_units) != 0, axis=0)
    try:
        readers, between = _trace(graph, layer, _constants(layer, work), n_units)
    except _Blocked as why:
        if no_inputs.any():
            report.kept[layer.name] = f"{int(no_inputs.sum())} units with no active inputs: {why}"
        return {}
    no_outputs = np.ones(n_units, dtype=bool)
    for reader in readers:
        rows = _rows(work, reader)
        for u, features in enumerate(reader.features):
            no_outputs[u] &= not np.any(rows[:, features, :] != 0)
    # A non-zero constant that met zero padding on the way (ZeroPadding, a "same" depthwise convolution)
    # is no longer a constant: such a unit stays unless nothing reads it.
    fragile = np.zeros(n_units, dtype=bool)
    for reader in readers:
        fragile |= reader.fragile
    blocked = no_inputs & ~no_outputs & fragile
    # A constant channel read by a zero-padded convolution is not a constant at the borders, so it cannot
    # go into a bias. It can go into another constant channel: one "carrier" unit stays and its kernel slice
    # in that convolution takes the others' (scaled by the ratio of the constants): exact, one unit kept.
    padded = [r for r in readers if not _exact_padding(r.layer)]
    needs_carrier = np.zeros(n_units, dtype=bool)
    for reader in padded:
        for u, features in enumerate(reader.features):
            needs_carrier[u] |= bool(no_inputs[u] and not no_outputs[u] and not blocked[u]
                                     and np.any(reader.values[features] != 0))
    carrier = None
    if needs_carrier.any():
        wanted = [r for r in padded if any(np.any(r.values[r.features[u]] != 0) for u in np.flatnonzero(needs_carrier))]
        for u in np.flatnonzero(needs_carrier):
            if all(np.all(r.values[r.features[u]] != 0) for r in wanted):
                carrier = int(u)
                break
    remove = no_outputs | (no_inputs & ~blocked)
    if carrier is not None:
        remove[carrier] = False
    else:
        remove &= ~needs_carrier  # no unit can carry the others: keep them all
    if remove.all():  # a layer keeps at least one unit (a zero-width tensor is not a layer)
        remove[np.flatnonzero(remove)[0]] = False
    vetoed = no_inputs & ~remove
    if vetoed.any():
        why = []
        if blocked.any():
            why.append(f"{int(blocked.sum())} with a non-zero constant that meets zero padding (ZeroPadding, "
                       "a 'same' depthwise convolution) on the way")
        if carrier is not None:
            why.append(f"unit {carrier} carries the constants of the removed ones into zero-padded convolutions")
        elif needs_carrier.any():
            why.append("their non-zero constants are read by a zero-padded convolution")
        report.kept[layer.name] = f"{int(vetoed.sum())} units with no active inputs: {'; '.join(why) or 'last unit'}"
    if not remove.any():
        return {}
    for reader in readers:
        rkernel = work.weights(reader.layer)["kernel"]
        keep = work.keep_in.setdefault(reader.layer.name, np.ones(rkernel.shape[-2], dtype=bool))
        fold = np.zeros(rkernel.shape[-1])
        for u in np.flatnonzero(remove):
            features = reader.features[u]
            keep[features] = False
            if no_outputs[u] or not np.any(reader.values[features] != 0):
                continue  # nothing of it reaches the reader
            if _exact_padding(reader.layer):  # its constant contribution goes into the bias
                fold += reader.values[features] @ _rows(work, reader)[:, features, :].sum(axis=0)
            else:  # into the carrier's kernel slice (a single channel: one feature each)
                into = reader.features[carrier][0]
                scale = reader.values[features[0]] / reader.values[into]
                rkernel[..., into, :] += scale * rkernel[..., features[0], :]
        if np.any(fold != 0):
            if "bias" not in work.weights(reader.layer):
                work.add_bias.add(reader.layer.name)
            work.bias(reader.layer)[...] += fold
    for through, features in between:
        if isinstance(through, keras.layers.BatchNormalization) or _is_depthwise(through):
            width = through.input.shape[-1]
            keep = work.keep_features.setdefault(through.name, np.ones(width, dtype=bool))
            for u in np.flatnonzero(remove):
                keep[features[u]] = False
    work.keep_out[layer.name] = ~remove
    return {int(u): (NO_OUTPUTS if no_outputs[u] else NO_INPUTS) for u in np.flatnonzero(remove)}


def _rebuild(model, work):
    """A new model with the planned units, rows and features removed and the folded biases."""
    sources = {}

    def clone_layer(layer):
        if isinstance(layer, keras.Model):  # nested models are copied as they are
            new = keras.models.clone_model(layer)
            new.set_weights(layer.get_weights())
            return new
        config = layer.get_config()
        if layer.name in work.keep_out:
            config["units" if isinstance(layer, keras.layers.Dense) else "filters"] = int(work.keep_out[layer.name].sum())
        if layer.name in work.add_bias:
            config["use_bias"] = True
        new = layer.__class__.from_config(config)
        sources[id(new)] = layer
        return new

    clone = keras.models.clone_model(model, clone_function=clone_layer)
    for new in _compat.graph_model(clone).layers:
        source = sources.get(id(new))
        if source is None or not new.weights:
            continue
        if source.name not in work.arrays and source.name not in work.keep_features:
            new.set_weights(source.get_weights())
            continue
        arrays = work.weights(source)
        for variable in new.weights:
            value = arrays[variable.name]
            if variable.name in ("kernel", "bias") and source.name in work.keep_out:
                value = value[..., work.keep_out[source.name]]
            if variable.name == "kernel" and source.name in work.keep_in:
                value = value[..., work.keep_in[source.name], :]
            if source.name in work.keep_features:
                keep = work.keep_features[source.name]
                if _is_depthwise(source):  # kernel (..., channels, multiplier); bias per (channel, multiplier)
                    multiplier = arrays["kernel"].shape[-1]
                    value = value[..., keep, :] if variable.name == "kernel" else value[np.repeat(keep, multiplier)]
                else:
                    value = value[keep]
            variable.assign(value.astype(variable.dtype))
    return clone


def _parameter_count(model):
    return int(sum(int(np.prod(v.shape)) for v in model.weights))


def condense(model, return_report=False):
    """A smaller dense Keras model that computes what the (stripped) sparse ``model`` computes.

    Args:
        model: a built Sequential or functional model, with ``Masked`` layers
            (they are stripped first: masked-off weights count as 0) or
            without (zero weights count as inactive). It is not modified.
        return_report: also return a :class:`CondenseReport`.

    Returns:
        The condensed model (no ``Masked`` layers, not compiled), or
        ``(model, report)``. Its outputs equal the stripped model's up to
        float rounding, in inference mode. Units with no active inputs (their
        constant output folded into the next layer's bias) and units with no
        active outputs are removed from Dense and Conv layers, with the
        BatchNormalization entries and reader rows/channels that belong to
        them; a unit whose channel reaches a layer that cannot lose it is
        kept and named in ``report.kept``. With nothing to remove, the result
        is a copy of the stripped model.
    """
    if not isinstance(return_report, bool):
        raise TypeError(f"return_report must be True or False, got {return_report!r}.")
    check_built(model)
    if not _compat.is_graph_model(model):
        raise ValueError(
            f"condense needs a Sequential or functional model; {model.name!r} is subclassed "
            f"({type(model).__name__}). Build it as a functional model to condense it."
        )
    current = strip(model) if masked_layers(model) else model
    report = CondenseReport(params_before=_parameter_count(current))
    # Each layer's units as indices of the input model, to report across passes.
    original_units = {}
    while True:
        graph = _Graph(current)
        work = _Work()
        report.kept = {}  # what the last pass (the one that removes nothing more) could not remove
        removed = {}
        for layer in graph.layers:
            if _is_producer(layer) and id(layer) not in graph.shared:
                units = original_units.setdefault(layer.name, np.arange(layer.kernel.shape[-1]))
                gone = _plan_producer(graph, layer, work, report)
                if gone:
                    removed[layer.name] = gone
                    for u, why in gone.items():
                        report.reasons.setdefault(layer.name, {})[int(units[u])] = why
                    original_units[layer.name] = np.delete(units, list(gone))
        if not removed:
            break
        current = _rebuild(current, work)
    for name, reasons in report.reasons.items():
        report.removed[name] = sorted(reasons)
    if current is model:
        current = _rebuild(model, _Work())  # a copy: the caller's model is never shared
    report.params_after = _parameter_count(current)
    return (current, report) if return_report else current
