"""The keras_rigl functions the harness needs, by the names of the library's API.

``count_nonzero_params``, ``training_flops_summary``, ``masks_from_weights`` and
``tflite_parity`` are library functions (a library user needs them as much as
the scripts do). Why a fallback here: they are being added to keras_rigl on
parallel branches; until a keras_rigl that has them is installed, the
equivalent below keeps the scripts working with the same contract. Each
fallback is used only when ``keras_rigl`` lacks the name.
"""

from __future__ import annotations

import math

import numpy as np

import keras_rigl

# compare.py's baselines are dense training as far as FLOPs go: the library only knows its own methods
FLOPS_METHOD = {"dense_flops": "dense", "dense_long": "dense", "small_dense": "dense"}


def flops_method(method):
    """The keras_rigl training-FLOPs method of a harness method (its dense baselines count as ``dense``)."""
    return FLOPS_METHOD.get(method, method)


def _count_nonzero_params(model):
    import keras

    total = int(sum(math.prod(w.shape) for w in model.trainable_weights))
    for layer in keras_rigl.masked_layers(model):
        for mw in layer.masked_weights:
            mask = keras.ops.convert_to_numpy(mw.mask)
            total -= int(mask.size - np.count_nonzero(mask))
    return total


def _training_flops_summary(model, method, examples, update_freq=100, update_examples=None):
    from keras_rigl import training_flops

    mf = training_flops.model_flops(model)
    dense_train = 3.0 * mf.dense * float(examples)
    if method == "rigl" and update_examples is not None:
        # dense gradient (2 f_S + f_D) only on the update steps' examples, 3 f_S on the others
        train = (3.0 * mf.sparse * (float(examples) - float(update_examples))
                 + (2.0 * mf.sparse + mf.dense) * float(update_examples))
    else:
        train = training_flops.training_flops(method, mf.sparse, mf.dense, examples, update_freq)
    return {
        "f_sparse": mf.sparse,
        "f_dense": mf.dense,
        "train_flops": float(train),
        "train_flops_dense": float(dense_train),
        "train_flops_ratio": float(train) / dense_train if dense_train else 1.0,
        "inference_flops": mf.sparse,
        "inference_flops_dense": mf.dense,
    }


def _masks_from_weights(model):
    import keras

    for layer in keras_rigl.masked_layers(model):
        layer.set_masks({mw.name: keras.ops.convert_to_numpy(mw.weight) != 0 for mw in layer.masked_weights})


def _tflite_parity(model, tflite_path, x):
    logits = np.asarray(model.predict(x, verbose=0, batch_size=256))
    lite = np.asarray(keras_rigl.tflite_predict(tflite_path, x))
    if not (np.all(np.isfinite(logits)) and np.all(np.isfinite(lite))):
        raise ValueError("the Keras or TFLite outputs are not finite (NaN/inf); the model diverged, retrain it.")
    return {
        "agreement": float(np.mean(lite.argmax(-1) == logits.argmax(-1))),
        "max_abs_diff": float(np.max(np.abs(lite - logits))),
        "n": int(len(x)),
    }


count_nonzero_params = getattr(keras_rigl, "count_nonzero_params", _count_nonzero_params)
training_flops_summary = getattr(keras_rigl, "training_flops_summary", _training_flops_summary)
masks_from_weights = getattr(keras_rigl, "masks_from_weights", _masks_from_weights)
tflite_parity = getattr(keras_rigl, "tflite_parity", _tflite_parity)
