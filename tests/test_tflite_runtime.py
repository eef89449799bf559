"""tflite_predict: interpreter choice, batching, XNNPACK on/off, int8 I/O."""

import keras
import numpy as np
import pytest

from keras_rigl.tflite import TFLiteRunner, export_tflite, interpreter_backend, make_interpreter, tflite_predict


def _cnn(rng):
    inp = keras.Input((10, 10, 2))
    x = keras.layers.Conv2D(8, 3, activation="relu")(inp)
    x = keras.layers.Conv2D(16, 1, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(5)(x)
    model = keras.Model(inp, out)
    for layer in model.layers:
        if hasattr(layer, "kernel"):
            k = layer.kernel.numpy()
            k[rng.random(k.shape) < 0.8] = 0
            layer.kernel.assign(k)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.backend.clear_session()
    rng = np.random.default_rng(3)
    model = _cnn(rng)
    d = tmp_path_factory.mktemp("rt")
    x = rng.normal(size=(20, 10, 10, 2)).astype("float32")
    f32 = str(d / "f32.tflite")
    i8 = str(d / "i8.tflite")
    export_tflite(model, f32)
    export_tflite(model, i8, quantize="int8", representative_data=x)
    return model, x, f32, i8


def test_backend_is_litert():
    assert interpreter_backend() == "ai_edge_litert"


def test_batch_xnnpack_threads_agree(exported):
    model, x, f32, _ = exported
    ref = model.predict(x, verbose=0)
    y = tflite_predict(f32, x)
    np.testing.assert_allclose(y, ref, atol=1e-5)
    assert y.shape == ref.shape
    np.testing.assert_allclose(tflite_predict(f32, x, use_xnnpack=False), ref, atol=1e-5)
    np.testing.assert_allclose(tflite_predict(f32, x, num_threads=2), ref, atol=1e-5)
    np.testing.assert_allclose(tflite_predict(f32, x, batch_size=7), ref, atol=1e-5)
    with open(f32, "rb") as f:  # bytes work as well as paths
        np.testing.assert_allclose(tflite_predict(f.read(), x[:3]), ref[:3], atol=1e-5)


def test_int8_io_is_quantized_and_dequantized(exported):
    model, x, _, i8 = exported
    runner = TFLiteRunner(i8)
    assert runner.input_details[0]["dtype"] == np.int8
    assert runner.output_details[0]["dtype"] == np.int8
    ref = model.predict(x, verbose=0)
    y = runner(x)
    assert y.dtype == np.float32
    # Error budget in steps of the output scale read from the file: half a step to round the output,
    # plus the rounding of the int8 weights and of the three int8 intermediate activations (conv,
    # conv, pooling) carried forward. Measured 1.1-2.1 steps on the calibration data (seeds 3-5);
    # a wrong scale or zero point is off by tens of steps (the output range spans 255).
    output_scale = runner.output_details[0]["quantization"][0]
    assert 0 < output_scale
    assert np.abs(y - ref).max() <= 4 * output_scale, np.abs(y - ref).max() / output_scale
    raw = tflite_predict(i8, x, dequantize=False)
    assert raw.dtype == np.int8


def test_bad_inputs(exported, tmp_path):
    _, x, f32, _ = exported
    with pytest.raises(ValueError, match="expects shape"):
        tflite_predict(f32, x[:, :5])
    with pytest.raises(ValueError, match="expects shape"):
        tflite_predict(f32, x[0])  # no batch dimension
    with pytest.raises(FileNotFoundError):
        make_interpreter(str(tmp_path / "missing.tflite"))
    with pytest.raises(ValueError, match="num_threads"):
        make_interpreter(f32, num_threads=0)


def test_interpreter_messages_joined_with_separators():
    from keras_rigl.tflite.runtime import _one_line

    # as LiteRT 2.3 reports a refused sparse int8 conv: two messages glued together
    raw = "failed to delegate CONV_2D node #2Node number 6 (TfLiteXNNPackDelegate) failed to prepare.\n"
    assert _one_line(raw) == ("failed to delegate CONV_2D node #2; "
                              "Node number 6 (TfLiteXNNPackDelegate) failed to prepare.")
    assert _one_line("first line.\n  second line\n") == "first line.; second line"
    assert _one_line("Didn't find op for builtin opcode 'CONV_2D' version '9'") == \
        "Didn't find op for builtin opcode 'CONV_2D' version '9'"
