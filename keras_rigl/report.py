"""``sparsity_report``: one row per masked weight, as a pandas DataFrame."""

from __future__ import annotations

import math

import keras
import numpy as np
import pandas as pd

from keras_rigl import flops
from keras_rigl.sparsify import masked_layers

COLUMNS = [
    "layer",
    "weight",
    "shape",
    "params",
    "active",
    "sparsity",
    "dense_flops",
    "sparse_flops",
]


def sparsity_report(model):
    """Per masked weight: shape, parameters, active count, sparsity and forward FLOPs.

    FLOPs are per example (2 per multiply-add, weights only; see
    ``keras_rigl.flops``) and ``None`` where the layer's output size is not
    known (e.g. a variable-length sequence). ``df.attrs`` holds the totals.
    """
    rows = []
    for layer in masked_layers(model):
        for mw in layer.masked_weights:
            mask = keras.ops.convert_to_numpy(mw.mask)
            params = int(math.prod(mask.shape))
            active = int(np.count_nonzero(mask))
            positions = flops.weight_positions(layer, mw.ref.owner)
            rows.append(
                {
                    "layer": layer.layer.name,
                    "weight": mw.name,
                    "shape": tuple(int(d) for d in mask.shape),
                    "params": params,
                    "active": active,
                    "sparsity": 1.0 - active / params if params else 0.0,
                    "dense_flops": flops.forward_flops(params, positions),
                    "sparse_flops": flops.forward_flops(active, positions),
                }
            )
    df = pd.DataFrame(rows, columns=COLUMNS)
    total_params = int(df["params"].sum()) if len(df) else 0
    total_active = int(df["active"].sum()) if len(df) else 0
    df.attrs["params"] = total_params
    df.attrs["active"] = total_active
    df.attrs["sparsity"] = 1.0 - total_active / total_params if total_params else 0.0
    known = df["dense_flops"].notna() if len(df) else []
    df.attrs["dense_flops"] = int(df.loc[known, "dense_flops"].sum()) if len(df) else 0
    df.attrs["sparse_flops"] = int(df.loc[known, "sparse_flops"].sum()) if len(df) else 0
    return df
