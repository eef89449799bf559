"""Fingerprints of a model's masks and weights: do all processes of a distributed run hold the same model?

Each process of a multi-worker run (``tf.distribute.MultiWorkerMirroredStrategy``,
``keras.distribution.DataParallel`` on JAX) keeps its own copy of every
variable. keras_rigl computes each mask update from values that are the same
in every process (the all-reduced dense gradient, the replicated weights, the
seed), so the copies must stay bit-identical; :func:`model_digests` lets a
process print one short string per kind of state that the others can be
compared with, instead of shipping the arrays.
"""

from __future__ import annotations

import hashlib

import numpy as np
from keras import ops

from keras_rigl.sparsify import masked_layers


def _update(digest, position, value):
    array = np.ascontiguousarray(ops.convert_to_numpy(value))
    # Position, dtype and shape are hashed with the bytes (a reshaped or
    # retyped array is a different model), not the variable's path: the path
    # depends on how the model was built (a loaded model names the wrapped
    # layers' weights differently from the sparsify'd one it was saved from).
    digest.update(f"{position}|{array.dtype.str}|{array.shape}|".encode())
    digest.update(array.tobytes())


def model_digests(model):
    """``{"masks": sha256 hex, "weights": sha256 hex}`` of ``model``'s state in this process.

    ``masks`` covers the mask of every masked weight (in the order of
    :func:`keras_rigl.masked_layers`), ``weights`` every variable in
    ``model.weights`` (trainable and not, masks included), each with its
    position, dtype and shape. Equal digests in two processes mean
    bit-identical state; a model saved and loaded again has the digests it
    was saved with.
    """
    masks = hashlib.sha256()
    all_masks = [mw.mask for layer in masked_layers(model) for mw in layer.masked_weights]
    for position, mask in enumerate(all_masks):
        _update(masks, position, mask)
    weights = hashlib.sha256()
    for position, variable in enumerate(model.weights):
        _update(weights, position, variable)
    return {"masks": masks.hexdigest(), "weights": weights.hexdigest()}
