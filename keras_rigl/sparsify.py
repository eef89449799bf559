"""Turn a Keras model into a sparse one and back: ``sparsify``, ``strip``.

``sparsify`` clones the model (Sequential, functional, and models nested in
them such as ``keras.applications`` backbones), wraps every maskable layer in
:class:`~keras_rigl.Masked`, copies the existing weights, and draws masks with
the requested per-layer distribution. ``initialize_masks`` does the last step
alone, for models (e.g. subclassed ones) that hold ``Masked`` layers already;
``masks_from_weights`` takes the masks from weights pruned elsewhere.
``strip`` gives back a plain Keras model with the masked weights at 0.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np

from keras_rigl import _compat, distributions, maskable, validation
from keras_rigl import structure as structures
from keras_rigl.masked import Masked

MASK_INITS = ("random", "magnitude")


def masked_layers(model):
    """All :class:`Masked` layers of ``model``, nested models included, in order."""
    if isinstance(model, Masked):
        return [model]
    return [layer for layer in all_layers(model) if isinstance(layer, Masked)]


def all_layers(model):
    """Every layer of ``model`` (recursively into nested models), each once, in order."""
    out = []
    seen = set()

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        out.append(layer)
        if isinstance(layer, keras.Model):
            for child in layer.layers:
                visit(child)

    for layer in getattr(model, "layers", []):
        visit(layer)
    return out


def check_built(model):
    """Raise a ValueError naming the fix unless ``model`` and all its layers are built.

    Shared by everything that needs weights to exist (sparsify, strip, export).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"Expected a keras.Model, got {type(model).__name__}; wrap layers in a keras.Model "
            "(or load a saved model with keras.models.load_model first)."
        )
    unbuilt = [layer.name for layer in all_layers(model) if not layer.built]
    if not model.built or unbuilt:
        what = f"Layers {unbuilt[:5]} of model {model.name!r} are" if unbuilt else f"Model {model.name!r} is"
        raise ValueError(
            f"{what} not built (no weights yet). Build it first: give the first layer an input "
            "shape (keras.Input(shape=...)), call model.build(input_shape), or call the model "
            "on a batch of data."
        )


def _check_mask_arguments(sparsity, distribution, per_layer, mask_init, seed):
    """The checks shared by :func:`sparsify` and :func:`initialize_masks`, before any work is done."""
    validation.check_sparsity(sparsity)
    validation.check_choice("distribution", distribution, distributions.DISTRIBUTIONS)
    validation.check_per_layer(per_layer)
    validation.check_choice("mask_init", mask_init, MASK_INITS)
    validation.check_seed(seed)


def _exclusion_predicate(model, exclude):
    if exclude is None:
        return lambda layer: False
    if callable(exclude):
        return exclude
    names = {exclude} if isinstance(exclude, str) else set(exclude)
    known = {layer.name for layer in all_layers(model)}
    unknown = names - known
    if unknown:
        raise ValueError(
            f"exclude names {sorted(unknown)} match no layer of model {model.name!r}. "
            f"Layer names are: {sorted(known)}."
        )
    return lambda layer: layer.name in names


def sparsify(
    model,
    sparsity,
    distribution="erk",
    exclude=None,
    per_layer=None,
    mask_init="random",
    seed=None,
    mask_depthwise=False,
    capture_gradients=True,
    structure=None,
    per_layer_structure=None,
):
    """Clone ``model`` with every maskable layer wrapped in ``Masked`` and masks drawn.

    Args:
        model: a built Sequential or functional Keras model (nested models,
            e.g. ``keras.applications`` backbones used as layers, are cloned
            too). Subclassed models cannot be cloned: build them with
            ``keras_rigl.Masked`` around their layers and call
            :func:`initialize_masks`.
        sparsity: target fraction of zero weights over all masked weights, in [0, 1).
        distribution: ``"erk"`` (default), ``"er"`` or ``"uniform"`` (first
            masked layer kept dense).
        exclude: layer names (str or list) or a predicate ``layer -> bool``;
            those layers stay dense and unwrapped.
        per_layer: ``{layer name: sparsity}`` (or ``"layer/weight"`` for one
            weight of a multi-weight layer such as LSTM) fixed for those; the
            other weights make up the difference so that the total is
            ``sparsity`` (see :func:`keras_rigl.layer_densities`).
        mask_init: ``"random"`` (uniform at random, the sparse-from-scratch
            path) or ``"magnitude"`` (keep the largest |w|: the path for
            pretrained weights).
        seed: int for reproducible masks.
        mask_depthwise: also mask depthwise kernels (off, as in the paper).
        capture_gradients: see :class:`Masked`.
        structure: the structure of every masked weight (see
            :mod:`keras_rigl.structure`): None (unstructured), ``"1xk"`` (e.g.
            ``"1x4"``: blocks of k inputs of one output unit), ``"N:M"`` (e.g.
            ``"2:4"``) or a ``Structure``. Every masked weight must carry it
            (the error names the layer; leave it dense with ``exclude``, or
            give it another structure with ``per_layer_structure``).
        per_layer_structure: ``{layer name: structure}`` for those layers
            (None: unstructured); the others take ``structure``. E.g. a first
            layer that cannot carry ``"1x4"`` (one input channel) sparse but
            unstructured, or the one layer where a structure costs accuracy.

    Returns:
        A new model. The input model is not modified.
    """
    _check_mask_arguments(sparsity, distribution, per_layer, mask_init, seed)
    default_structure = structures.get(structure)
    check_built(model)
    if masked_layers(model):
        raise ValueError(
            f"Model {model.name!r} already has Masked layers; call keras_rigl.initialize_masks(model, ...) "
            "to redraw its masks, or keras_rigl.strip(model) first."
        )
    if not _compat.is_graph_model(model):
        raise ValueError(
            f"Model {model.name!r} is a subclassed model ({type(model).__name__}), which Keras cannot "
            "clone. Wrap its layers with keras_rigl.Masked(...) where you create them in __init__, "
            "build the model, then call keras_rigl.initialize_masks(model, sparsity=...)."
        )
    excluded = _exclusion_predicate(model, exclude)
    maskable_names = [layer.name for layer in all_layers(model) if not excluded(layer)
                      and not isinstance(layer, keras.Model) and maskable.is_maskable(layer, depthwise=mask_depthwise)]
    layer_structures = _layer_structures(per_layer_structure, maskable_names)

    def structure_of(layer):
        return layer_structures.get(layer.name, default_structure)

    for layer in all_layers(model):  # refuse before cloning: Keras would bury the message in its own
        if layer.name in maskable_names:
            for ref in maskable.maskable_weights(layer, depthwise=mask_depthwise):
                structure_of(layer).check_shape(tuple(ref.variable.shape), f"Layer {layer.name!r} weight {ref.name!r}")

    originals = {}  # id(new layer whose weights to fill) -> original layer
    unmaskable = []

    def clone_layer(layer):
        new = layer.__class__.from_config(layer.get_config())
        originals[id(new)] = layer
        if excluded(layer) or not maskable.is_maskable(layer, depthwise=mask_depthwise):
            if maskable.has_unmaskable_kernel(layer) and not excluded(layer):
                unmaskable.append(f"{layer.name} ({type(layer).__name__})")
            return new
        return Masked(new, mask_depthwise=mask_depthwise, capture_gradients=capture_gradients,
                      structure=structure_of(layer))

    try:
        clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    except ValueError as err:  # pragma: no cover - Keras refuses unusual graphs
        raise ValueError(
            f"Keras could not clone model {model.name!r} ({err}). Wrap its layers with "
            "keras_rigl.Masked directly and call keras_rigl.initialize_masks(model, ...)."
        ) from err
    _copy_weights(clone, originals)
    if unmaskable:
        warnings.warn(
            "keras_rigl left these layers dense (no known maskable weights; make them maskable "
            "with keras_rigl.MaskableLayer or keras_rigl.register_maskable): " + ", ".join(unmaskable),
            stacklevel=2,
        )
    if not masked_layers(clone):
        raise ValueError(
            f"Model {model.name!r} has no maskable layer (Dense, Conv, Embedding, RNN, ...) left "
            "after `exclude`; nothing to make sparse."
        )
    for layer in _masked_at_model_output(clone):  # e.g. no neuron ablation of the logits ("fan_in")
        object.__setattr__(layer, "_structure", layer.structure.at_model_output())
    initialize_masks(
        clone, sparsity, distribution=distribution, per_layer=per_layer, mask_init=mask_init, seed=seed
    )
    return clone


def _layer_structures(per_layer_structure, maskable_names):
    """``{layer name: Structure}`` from ``per_layer_structure``, or a one-line error naming the masked layers."""
    if per_layer_structure is None:
        return {}
    if not isinstance(per_layer_structure, dict):
        raise TypeError(
            f"per_layer_structure must be a dict {{layer name: structure}} (None for unstructured), got "
            f"{type(per_layer_structure).__name__}; e.g. per_layer_structure={{'conv1': None}}."
        )
    for name in per_layer_structure:
        if name not in maskable_names:
            raise ValueError(
                f"per_layer_structure name {name!r} matches no masked layer. Masked layers are: "
                f"{sorted(maskable_names)}."
            )
    return {name: structures.get(spec) for name, spec in per_layer_structure.items()}


def _masked_at_model_output(model):
    """Top-level Masked layers whose output reaches a model output through single-input layers only."""
    graph = _compat.graph_model(model)
    outputs = {id(t) for t in keras.tree.flatten(graph.outputs)}
    readers = {}
    for layer in graph.layers:
        try:
            inputs = keras.tree.flatten(layer.input)
        except (ValueError, AttributeError):  # shared layer: not followed
            continue
        for tensor in inputs:
            readers.setdefault(id(tensor), []).append((layer, len(inputs)))
    found = []
    for layer in graph.layers:
        if not isinstance(layer, Masked):
            continue
        try:
            pending = [layer.output]
        except (ValueError, AttributeError):
            continue
        seen = set()
        while pending:
            tensor = pending.pop()
            if id(tensor) in outputs:
                found.append(layer)
                break
            for reader, n_inputs in readers.get(id(tensor), []):
                if n_inputs == 1 and not isinstance(reader, Masked) and id(reader) not in seen:
                    seen.add(id(reader))
                    try:
                        pending.extend(keras.tree.flatten(reader.output))
                    except (ValueError, AttributeError):
                        pass
    return found


def _copy_weights(clone, originals):
    for layer in all_layers(clone):
        target = layer.layer if isinstance(layer, Masked) else layer
        source = originals.get(id(target))
        if source is None or isinstance(source, keras.Model):
            continue
        weights = source.get_weights()
        if weights:
            target.set_weights(weights)


def _weight_keys(layers):
    """``{"layer/weight": (Masked layer, MaskedWeight)}`` over all masked weights."""
    keys = {}
    for layer in layers:
        for mw in layer.masked_weights:
            keys[f"{layer.layer.name}/{mw.name}"] = (layer, mw)
    return keys


def _expand_per_layer(per_layer, keys):
    """Map user keys (a layer name, or "layer/weight") onto weight keys."""
    expanded = {}
    for name, value in (per_layer or {}).items():
        if name in keys:
            expanded[name] = value
            continue
        matches = [k for k in keys if k.split("/", 1)[0] == name]
        if not matches:
            layer_names = sorted({k.split("/", 1)[0] for k in keys})
            raise ValueError(
                f"per_layer name {name!r} matches no masked layer. Masked layers are: {layer_names}."
            )
        for k in matches:
            expanded[k] = value
    return expanded


def _draw_mask(weight, n_active, mask_init, rng, structure=None):
    """``structure.initial_mask``: uniformly at random, or the largest |w| first (``"magnitude"``)."""
    scores = None if mask_init == "random" else np.abs(weight)
    return structures.get(structure).initial_mask(weight.shape, n_active, rng, scores=scores)


def initialize_masks(model, sparsity, distribution="erk", per_layer=None, mask_init="random", seed=None,
                     structure=None):
    """Draw the masks of every ``Masked`` layer of ``model`` and zero the masked weights.

    ``structure``: None keeps each layer's own structure (``Masked(...,
    structure=)``); a structure (e.g. ``"1x4"``) is set on every Masked layer
    first (every masked weight must carry it). Densities are solved with the
    structures' caps and counts rounded to their steps (``count_steps``:
    whole units, or for "1xk" over inputs that are not a multiple of k whole
    and last blocks in proportion; see :mod:`keras_rigl.distributions`), so
    the total stays exact (in whole blocks for "1xk").

    Returns ``{"layer/weight": density}`` as solved (the drawn counts round it to whole units).
    """
    _check_mask_arguments(sparsity, distribution, per_layer, mask_init, seed)
    if structure is not None:
        structure = structures.get(structure)
    check_built(model)
    layers = masked_layers(model)
    if not layers:
        raise ValueError(
            f"Model {model.name!r} has no Masked layer. Use keras_rigl.sparsify(model, ...) or wrap "
            "layers with keras_rigl.Masked."
        )
    keys = _weight_keys(layers)
    shapes = {k: tuple(mw.weight.shape) for k, (_, mw) in keys.items()}
    if structure is not None:
        for key in keys:
            structure.check_shape(shapes[key], key)
    kept = {k: structure or layer.structure for k, (layer, _) in keys.items()}
    densities = distributions.layer_densities(
        shapes, sparsity, distribution, per_layer=_expand_per_layer(per_layer, keys),
        max_densities={k: kept[k].max_density(shapes[k]) for k in keys},
    )
    counts = distributions.active_counts(shapes, densities, steps={k: kept[k].count_steps(shapes[k]) for k in keys})
    if structure is not None:  # only now: a refused sparsity leaves the layers as they were
        for layer in layers:
            object.__setattr__(layer, "_structure", structure)
    rng = np.random.default_rng(seed)
    for index, (key, (layer, mw)) in enumerate(keys.items()):
        w = keras.ops.convert_to_numpy(mw.weight)
        mask = _draw_mask(w, counts[key], mask_init, np.random.default_rng(rng.integers(2**63)), kept[key])
        layer.set_masks({mw.name: mask})
    return densities


def masks_from_weights(model):
    """Set every mask of ``model`` to ``weight != 0``: the masks of a model pruned elsewhere (e.g. by TFMOT).

    Weights are left as they are. Returns ``{"layer/weight": density}``.
    """
    layers = masked_layers(model)
    if not layers:
        raise ValueError(
            f"Model {getattr(model, 'name', model)!r} has no Masked layer. Wrap it first with "
            "keras_rigl.sparsify(model, ...) (any sparsity: the masks are replaced)."
        )
    densities = {}
    for layer in layers:
        masks = {mw.name: keras.ops.convert_to_numpy(mw.weight) != 0 for mw in layer.masked_weights}
        layer.set_masks(masks, zero_weights=False)
        for name, mask in masks.items():
            densities[f"{layer.layer.name}/{name}"] = float(mask.mean()) if mask.size else 1.0
    return densities


def rescale_active_weights(model):
    """Rescale masked weights so every output unit keeps its dense fan-in variance.

    Each output unit j (last axis of the weight) with ``a_j`` of its ``n``
    inputs active gets its weights multiplied by ``sqrt(n / a_j)``. A layer
    initialised for a dense fan-in and then masked to density d starts with
    its signal shrunk by about sqrt(d); through several 90-95% sparse ReLU
    layers that is enough for training to sit at chance for epochs (seen on
    MNIST-5k, see docs/results.md). Embedding tables (no fan-in) are left
    alone. Call it after :func:`sparsify` for training from scratch, not for
    pretrained weights.
    """
    for layer in masked_layers(model):
        for mw in layer.masked_weights:
            if isinstance(mw.ref.owner, keras.layers.Embedding):
                continue
            mask = keras.ops.convert_to_numpy(mw.mask)
            if mask.ndim < 2:
                continue
            w = keras.ops.convert_to_numpy(mw.weight)
            columns = mask.reshape(-1, mask.shape[-1])
            active = columns.sum(axis=0)
            scale = np.sqrt(columns.shape[0] / np.maximum(active, 1.0)).astype(w.dtype)
            mw.weight.assign((w.reshape(-1, mask.shape[-1]) * scale).reshape(w.shape))


def strip(model):
    """A plain Keras model: ``Masked`` wrappers removed, masked weights exactly 0.

    The result computes the same function as ``model`` and needs nothing from
    keras_rigl to load.
    """
    if isinstance(model, Masked):
        raise TypeError("strip() takes a model; for one layer use `masked_layer.layer`.")
    check_built(model)
    if not masked_layers(model):
        return model
    if not _compat.is_graph_model(model):
        raise ValueError(
            f"Model {model.name!r} is a subclassed model, which Keras cannot clone; strip its "
            "Masked layers yourself (their `.layer`, with weights multiplied by the masks)."
        )
    sources = {}

    def clone_layer(layer):
        source = layer.layer if isinstance(layer, Masked) else layer
        new = source.__class__.from_config(source.get_config())
        sources[id(new)] = layer
        return new

    def call_layer(layer, *args, **kwargs):
        # The graph recorded the Masked wrapper's call, whose signature takes
        # `training` and `mask`; the plain layer may take neither.
        params = layer.call_signature_parameters
        accepts_any = "kwargs" in params
        kwargs = {k: v for k, v in kwargs.items() if k in params or accepts_any or k not in ("mask", "training")}
        return layer(*args, **kwargs)

    call_function = None if isinstance(model, keras.Sequential) else call_layer
    clone = keras.models.clone_model(
        model, clone_function=clone_layer, call_function=call_function, recursive=True
    )
    for layer in all_layers(clone):
        source = sources.get(id(layer))
        if source is None or isinstance(source, keras.Model):
            continue
        if isinstance(source, Masked):
            masks = {id(mw.weight): keras.ops.convert_to_numpy(mw.mask) for mw in source.masked_weights}
            weights = [
                np.where(masks[id(v)] != 0, keras.ops.convert_to_numpy(v), 0).astype(v.dtype)
                if id(v) in masks
                else keras.ops.convert_to_numpy(v)
                for v in source.layer.weights
            ]
        else:
            weights = source.get_weights()
        if weights:
            layer.set_weights(weights)
    return clone

