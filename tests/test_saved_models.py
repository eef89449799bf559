"""The trained example committed under saved_models/: masks, sparsity, and Keras vs TFLite agreement."""

import json
import os

import keras
import numpy as np
import pytest

import keras_rigl

RUN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "saved_models",
                   "mnist5k_cnn_rigl_s0.9_seed0")


@pytest.fixture(scope="module")
def model():
    return keras.models.load_model(os.path.join(RUN, "model.keras"))


def test_small_enough_to_commit():
    size = os.path.getsize(os.path.join(RUN, "model.keras")) + os.path.getsize(os.path.join(RUN, "model.tflite"))
    assert size <= 1.05 * 2**20


def test_masks_binary_sparse_and_masked_weights_zero(model):
    layers = keras_rigl.masked_layers(model)
    assert [layer.layer.name for layer in layers] == ["conv1", "conv2", "conv3", "fc1", "logits"]
    total = active = 0
    for layer in layers:
        for mw in layer.masked_weights:
            mask = keras.ops.convert_to_numpy(mw.mask)
            weight = keras.ops.convert_to_numpy(mw.weight)
            assert set(np.unique(mask)) <= {0.0, 1.0}
            assert np.all(weight[mask == 0] == 0)
            total += mask.size
            active += int(mask.sum())
    assert 1 - active / total == pytest.approx(0.9, abs=0.002)
    report = keras_rigl.sparsity_report(model)
    assert report.attrs["sparsity"] == pytest.approx(0.9, abs=0.002)


def _test_images(n=200):
    from rigl_harness import datasets

    data = datasets.load_dataset("mnist5k")
    return data.x_test[:n], data.y_test[:n]


def test_keras_accuracy_matches_the_record(model):
    x, y = _test_images(1000)
    logits = model.predict(x, verbose=0)
    accuracy = float(np.mean(logits.argmax(-1) == y))
    recorded = json.load(open(os.path.join(RUN, "metrics.json")))["accuracy"]
    assert accuracy == pytest.approx(recorded, abs=1e-6)
    assert accuracy > 0.93


def test_keras_and_tflite_agree(model):
    x, _ = _test_images(200)
    logits = model.predict(x, verbose=0)
    lite = np.asarray(keras_rigl.tflite_predict(os.path.join(RUN, "model.tflite"), x))
    np.testing.assert_allclose(lite, logits, atol=1e-3, rtol=1e-3)
    assert np.all(lite.argmax(-1) == logits.argmax(-1))


def test_stripped_model_is_the_same_function(model):
    x, _ = _test_images(64)
    plain = keras_rigl.strip(model)
    assert not keras_rigl.masked_layers(plain)
    np.testing.assert_allclose(plain.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
