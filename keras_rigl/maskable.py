"""Registry of maskable weights: which weights of which layer get a mask.

Like TFMOT's prunable registry, this module answers one question for any
layer: "which of your variables may be made sparse?". Biases, normalisation
parameters and every other weight are never masked.

Users make their own layers maskable in one of two ways:

* implement ``get_maskable_weights(self) -> list[str]`` on the layer (see
  :class:`MaskableLayer`), naming the attributes that hold the weights, or
* call :func:`register_maskable` for a layer class they do not own.
"""

from __future__ import annotations

import dataclasses

import keras

# Attribute names of the weights to mask, per built-in layer class. Order
# matters: subclasses are matched before their bases (checked by isinstance
# in this order).
_BUILTIN = [
    (keras.layers.EinsumDense, ("kernel",)),
    (keras.layers.Dense, ("kernel",)),
    (keras.layers.Embedding, ("embeddings",)),
    # Separable convs: the pointwise kernel is masked; the depthwise kernel
    # only when asked for (see ``depthwise``), as for DepthwiseConv layers.
    (keras.layers.SeparableConv1D, ("pointwise_kernel",)),
    (keras.layers.SeparableConv2D, ("pointwise_kernel",)),
    (keras.layers.DepthwiseConv1D, ()),
    (keras.layers.DepthwiseConv2D, ()),
    (keras.layers.Conv1DTranspose, ("kernel",)),
    (keras.layers.Conv2DTranspose, ("kernel",)),
    (keras.layers.Conv3DTranspose, ("kernel",)),
    (keras.layers.Conv1D, ("kernel",)),
    (keras.layers.Conv2D, ("kernel",)),
    (keras.layers.Conv3D, ("kernel",)),
    (keras.layers.LSTMCell, ("kernel", "recurrent_kernel")),
    (keras.layers.GRUCell, ("kernel", "recurrent_kernel")),
    (keras.layers.SimpleRNNCell, ("kernel", "recurrent_kernel")),
]
# Depthwise kernels stay dense by default (the paper keeps them dense: they
# hold few parameters and TFLite stores them dense anyway).
_DEPTHWISE = [
    (keras.layers.SeparableConv1D, ("depthwise_kernel",)),
    (keras.layers.SeparableConv2D, ("depthwise_kernel",)),
    (keras.layers.DepthwiseConv1D, ("kernel",)),
    (keras.layers.DepthwiseConv2D, ("kernel",)),
]
_USER_REGISTRY: dict[type, tuple[str, ...]] = {}


class MaskableLayer:
    """Mixin for custom layers that want some of their weights masked.

    Implement :meth:`get_maskable_weights` to return the *attribute names*
    under which the layer stores the variables to mask (the layer must read
    them through those attributes in ``call``)::

        class MyDense(keras.layers.Layer, keras_rigl.MaskableLayer):
            def build(self, input_shape):
                self.w = self.add_weight(shape=(input_shape[-1], 8))
            def call(self, x):
                return x @ self.w
            def get_maskable_weights(self):
                return ["w"]
    """

    def get_maskable_weights(self):  # pragma: no cover - interface
        raise NotImplementedError


def register_maskable(layer_class, weight_names):
    """Declare which attributes of ``layer_class`` hold weights to mask.

    For layer classes you cannot edit, e.g. from a third-party package::

        keras_rigl.register_maskable(ThirdPartyConv, ["kernel"])
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(
            f"register_maskable expects a keras.layers.Layer subclass, got {layer_class!r}."
        )
    if isinstance(weight_names, str):
        weight_names = [weight_names]
    _USER_REGISTRY[layer_class] = tuple(weight_names)


@dataclasses.dataclass(frozen=True)
class WeightRef:
    """Where a maskable variable lives: ``owner.<attr>`` is read in ``call``.

    ``name`` is the weight's name relative to the wrapped layer, e.g.
    ``"kernel"`` or ``"forward_lstm/recurrent_kernel"``.
    ``attr`` is the entry of ``owner.__dict__`` that holds the variable (for
    Dense that is ``_kernel`` behind the ``kernel`` property).
    """

    name: str
    owner: keras.layers.Layer
    attr: str
    variable: keras.Variable


def _names_for(layer, depthwise):
    if isinstance(layer, MaskableLayer) or hasattr(layer, "get_maskable_weights"):
        return tuple(layer.get_maskable_weights())
    for cls in type(layer).__mro__:
        if cls in _USER_REGISTRY:
            return _USER_REGISTRY[cls]
    names = ()
    for cls, attrs in _BUILTIN:
        if isinstance(layer, cls):
            names = attrs
            break
    if depthwise:
        for cls, attrs in _DEPTHWISE:
            if isinstance(layer, cls):
                names = names + attrs
                break
    return names


def _children(layer):
    """Sub-layers whose weights belong to this layer for masking purposes."""
    if isinstance(layer, keras.layers.Bidirectional):
        return [layer.forward_layer, layer.backward_layer]
    if isinstance(layer, keras.layers.RNN):
        return [layer.cell]
    if isinstance(layer, keras.layers.TimeDistributed):
        return [layer.layer]
    if isinstance(layer, keras.layers.MultiHeadAttention):
        # query/key/value/output projections are EinsumDense sub-layers
        names = ("_query_dense", "_key_dense", "_value_dense", "_output_dense")
        return [getattr(layer, n) for n in names if getattr(layer, n, None) is not None]
    return []


def _dict_attr_holding(owner, variable):
    for key, value in vars(owner).items():
        if value is variable:
            return key
    return None


def maskable_weights(layer, depthwise=False, _prefix=""):
    """The :class:`WeightRef` s of ``layer`` that may be masked (built layers only)."""
    refs = []
    for name in _names_for(layer, depthwise):
        variable = getattr(layer, name, None)
        if variable is None:
            continue
        attr = _dict_attr_holding(layer, variable)
        if attr is None:
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) names {name!r} as maskable, "
                "but no attribute of the layer holds that variable directly. Store the "
                f"variable as an attribute (self.{name} = self.add_weight(...)) and read it "
                "from there in call()."
            )
        refs.append(WeightRef(_prefix + name, layer, attr, variable))
    for child in _children(layer):
        refs.extend(maskable_weights(child, depthwise, _prefix=f"{_prefix}{child.name}/"))
    return refs


def is_maskable(layer, depthwise=False):
    """True when ``layer`` (built or not) has at least one weight to mask.

    For unbuilt layers only the class is looked at.
    """
    if isinstance(layer, keras.layers.MultiHeadAttention):
        return True  # its projections exist only once it is built
    if _names_for(layer, depthwise):
        return True
    return any(is_maskable(child, depthwise) for child in _children(layer))


def has_unmaskable_kernel(layer):
    """A layer with matrix-like trainable weights we do not know how to mask.

    Used to warn the user once about layers left dense.
    """
    if is_maskable(layer, depthwise=True) or isinstance(
        layer, (keras.Model, keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
    ):
        return False
    return any(len(w.shape) >= 2 for w in layer.trainable_weights)
