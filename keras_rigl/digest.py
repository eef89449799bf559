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


def _update(digest, name, value):
    array = np.ascontiguousarray(ops.convert_to_numpy(value))
    # Name, dtype and shape are hashed with the bytes: a reshaped or retyped
    # array with the same bytes is a different model.
    digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
    digest.update(array.tobytes())


def model_digests(model):
    """``{"masks": sha256 hex, "weights": sha256 hex}`` of ``model``'s state in this process.

    ``masks`` covers the mask of every masked weight (in the order of
    :func:`keras_rigl.masked_layers`), ``weights`` every variable in
    ``model.weights`` (trainable and not, masks included), each with its
    path, dtype and shape. Equal digests in two processes mean bit-identical
    state; the digest of one array is independent of the backend.
    """
    masks = hashlib.sha256()
    for layer in masked_layers(model):
        for mw in layer.masked_weights:
            _update(masks, mw.mask.path, mw.mask)
    weights = hashlib.sha256()
    for variable in model.weights:
        _update(weights, variable.path, variable)
    return {"masks": masks.hexdigest(), "weights": weights.hexdigest()}
