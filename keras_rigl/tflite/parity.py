"""Does a ``.tflite`` file compute what its Keras model computes?"""

from __future__ import annotations

import os

import numpy as np

from keras_rigl.tflite.runtime import tflite_predict
from keras_rigl.validation import check_int


def tflite_parity(model, tflite_path: str | os.PathLike | bytes, x, batch_size: int = 256) -> dict:
    """Compare ``model``'s outputs on ``x`` with the ``.tflite`` file's.

    Returns ``{"agreement", "max_abs_diff", "n"}``: the fraction of the ``n``
    examples whose argmax (over the flattened output) is the same in both,
    and the largest absolute difference of any output value (int8 outputs are
    dequantized first). Raises ``ValueError`` when either side's outputs hold
    NaN or inf: an agreement computed from them means nothing.
    """
    batch_size = check_int("batch_size", batch_size, 1)
    if isinstance(x, (list, tuple)):
        inputs = [np.asarray(v) for v in x]
    else:
        inputs = [np.asarray(x)]
    n = int(inputs[0].shape[0]) if inputs[0].ndim else 0
    if n == 0:
        raise ValueError("x is empty; pass at least one example (with a leading batch dimension).")
    batch = inputs if len(inputs) > 1 else inputs[0]
    keras_out = model.predict(batch, batch_size=batch_size, verbose=0)
    if isinstance(keras_out, (list, tuple, dict)):
        raise ValueError("tflite_parity compares single-output models; call tflite_predict and compare "
                         "each output yourself for a model with several outputs.")
    keras_out = np.asarray(keras_out, dtype=np.float64)
    lite_out = np.asarray(tflite_predict(tflite_path, batch, batch_size=batch_size), dtype=np.float64)
    name = os.fspath(tflite_path) if isinstance(tflite_path, (str, os.PathLike)) else "the TFLite model"
    for side, out in (("Keras", keras_out), (f"TFLite ({name})", lite_out)):
        if not np.all(np.isfinite(out)):
            raise ValueError(f"{side} outputs are not finite (NaN or inf): the model diverged or the file is "
                             "broken; retrain with a smaller learning rate or re-export before comparing.")
    if keras_out.shape != lite_out.shape:
        raise ValueError(f"Keras outputs have shape {keras_out.shape}, TFLite outputs {lite_out.shape}: "
                         "the file was not exported from this model; re-export it.")
    keras_top = keras_out.reshape(n, -1).argmax(axis=1)
    lite_top = lite_out.reshape(n, -1).argmax(axis=1)
    return {
        "agreement": float(np.mean(keras_top == lite_top)),
        "max_abs_diff": float(np.max(np.abs(keras_out - lite_out))),
        "n": n,
    }
