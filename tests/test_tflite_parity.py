"""tflite_parity: Keras-vs-TFLite agreement, and a refusal when either side is not finite."""

import keras
import numpy as np
import pytest

import keras_rigl


def _mlp(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((6,))
    x = keras.layers.Dense(16, activation="relu")(inp)
    out = keras.layers.Dense(4)(x)
    return keras.Model(inp, out)


def test_float32_file_agrees_with_its_model(tmp_path):
    model = _mlp()
    path = str(tmp_path / "m.tflite")
    keras_rigl.export_tflite(model, path)
    x = np.random.default_rng(0).normal(size=(37, 6)).astype("float32")
    got = keras_rigl.tflite_parity(model, path, x, batch_size=8)
    assert got["n"] == 37
    assert got["agreement"] == 1.0
    assert got["max_abs_diff"] < 1e-5  # float32 file of the same weights: rounding only


def test_agreement_counts_disagreeing_examples(tmp_path):
    # the file holds a model whose last layer is negated: argmax flips wherever the top logit
    # is not also the bottom one, so agreement must be the fraction computed by hand below.
    model = _mlp()
    flipped = _mlp()
    flipped.set_weights(model.get_weights())
    last = flipped.layers[-1]
    last.set_weights([-w for w in last.get_weights()])
    path = str(tmp_path / "flipped.tflite")
    keras_rigl.export_tflite(flipped, path)
    x = np.random.default_rng(1).normal(size=(50, 6)).astype("float32")
    ref = model.predict(x, verbose=0)
    expected = float(np.mean(ref.argmax(1) == (-ref).argmax(1)))
    got = keras_rigl.tflite_parity(model, path, x)
    assert got["agreement"] == pytest.approx(expected)
    assert got["agreement"] < 1.0
    assert got["max_abs_diff"] == pytest.approx(float(np.max(np.abs(2 * ref))), rel=1e-4)


def test_nan_model_is_refused_not_reported_as_agreeing(tmp_path):
    model = _mlp()
    model.layers[-1].set_weights([np.full_like(w, np.nan) for w in model.layers[-1].get_weights()])
    path = str(tmp_path / "nan.tflite")
    keras_rigl.export_tflite(model, path)
    x = np.ones((5, 6), "float32")
    with pytest.raises(ValueError, match=r"outputs are not finite \(NaN or inf\): the model diverged"):
        keras_rigl.tflite_parity(model, path, x)


def test_bad_arguments(tmp_path):
    model = _mlp()
    path = str(tmp_path / "m.tflite")
    keras_rigl.export_tflite(model, path)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        keras_rigl.tflite_parity(model, path, np.ones((2, 6), "float32"), batch_size=0)
    with pytest.raises(ValueError, match="x is empty"):
        keras_rigl.tflite_parity(model, path, np.ones((0, 6), "float32"))
