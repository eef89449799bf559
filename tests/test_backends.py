"""keras_rigl on JAX and PyTorch through model.fit, checked from the TensorFlow test run.

Each backend runs tests/backend_worker.py in a subprocess with KERAS_BACKEND
set (a process has one Keras backend), from the same data, weights and masks.
The Python that runs JAX and PyTorch is ``KERAS_RIGL_BACKEND_PYTHON`` if set
(a venv with ``pip install -e ".[jax,torch]"``), else this one; a backend whose
package that Python cannot import is skipped with the install line.
"""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_rigl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "backend_worker.py")
LAYERS = ("conv", "hidden", "out")
METHODS = ("static", "set", "rigl", "snfs")


def backend_python(backend):
    if backend == "tensorflow":
        return sys.executable
    return os.environ.get("KERAS_RIGL_BACKEND_PYTHON", sys.executable)


def _inputs():
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(64, 8, 8, 1)).astype("float32"), "y": rng.integers(0, 10, 64),
            "x_test": rng.normal(size=(8, 8, 8, 1)).astype("float32"),
            "mlp_x": rng.normal(size=(48, 16)).astype("float32"), "mlp_y": rng.integers(0, 4, 48)}
    shapes = {"conv": ((3, 3, 1, 8), 8), "hidden": ((288, 32), 32), "out": ((32, 10), 10)}
    for name, (shape, units) in shapes.items():
        data[f"cnn:{name}/kernel"] = (rng.normal(size=shape) * 0.3).astype("float32")
        data[f"cnn:{name}/bias"] = (rng.normal(size=units) * 0.1).astype("float32")
        data[f"cnn:{name}/mask"] = (rng.random(shape) < 0.2).astype("float32")
    for name, (shape, units) in {"hidden": ((16, 32), 32), "out": ((32, 4), 4)}.items():
        data[f"mlp:{name}/kernel"] = (rng.normal(size=shape) * 0.5).astype("float32")
        data[f"mlp:{name}/bias"] = (rng.normal(size=units) * 0.1).astype("float32")
        data[f"mlp:{name}/mask"] = (rng.random(shape) < 0.3).astype("float32")
    return data


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{backend: (result dict, out dir)}`` for TensorFlow and every backend installed."""
    folder = tmp_path_factory.mktemp("backends")
    inputs = folder / "inputs.npz"
    np.savez(inputs, **_inputs())
    results, missing = {}, {}
    for backend in ("tensorflow", "jax", "torch"):
        python = backend_python(backend)
        module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[backend]
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True)
        if probe.returncode != 0:
            missing[backend] = f"{python} cannot import {module}"
            continue
        out = folder / backend
        out.mkdir()
        env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run([python, WORKER, str(inputs), str(out)], env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"{backend} worker failed:\n{done.stderr[-4000:]}"
        with np.load(out / "result.npz") as result:
            results[backend] = ({k: result[k] for k in result.files}, out)
    return results, missing, _inputs()


def _backend(runs, backend):
    results, missing, _ = runs
    if backend in missing:
        pytest.skip(f"{backend}: {missing[backend]}; pip install -e \".[{backend}]\" or set KERAS_RIGL_BACKEND_PYTHON")
    return results[backend][0]


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_every_callback_fits_with_exact_sparsity(runs, backend):
    result = _backend(runs, backend)
    _, _, inputs = runs
    assert str(result["backend"]) == backend
    initial_active = sum(int(inputs[f"cnn:{n}/mask"].sum()) for n in LAYERS)
    total = sum(inputs[f"cnn:{n}/mask"].size for n in LAYERS)
    for method in METHODS:
        assert tuple(result[f"{method}/count_active"]) == (initial_active, total), method
        moved = 0
        for name in LAYERS:
            mask, kernel = result[f"{method}/{name}/mask"], result[f"{method}/{name}/kernel"]
            assert set(np.unique(mask)) <= {0.0, 1.0}
            assert np.all(kernel[mask == 0] == 0), f"{method}/{name}: a masked weight is not exactly 0"
            assert mask.sum() == inputs[f"cnn:{name}/mask"].sum(), f"{method}/{name}: active count changed"
            moved += int((mask != inputs[f"cnn:{name}/mask"]).sum())
        if method == "static":
            assert moved == 0 and int(result["static/n_updates"]) == 0
        else:
            assert moved > 0 and int(result[f"{method}/n_updates"]) > 0, f"{method} never moved a connection"
        biases = sum(inputs[f"cnn:{n}/bias"].size for n in LAYERS)
        assert int(result[f"{method}/nonzero_params"]) == initial_active + biases  # gradient probes not counted
    assert float(result["rigl/report_masked_sparsity"]) == pytest.approx(1 - initial_active / total)
    np.testing.assert_allclose(result["rigl/stripped_predict"], result["rigl/predict"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_same_masks_as_tensorflow_for_equal_scores(runs, backend):
    """SET at learning rate 0 ranks equal weights and the same hashed random scores on every backend."""
    reference = _backend(runs, "tensorflow")
    result = _backend(runs, backend)
    _, _, inputs = runs
    changed = 0
    for name in LAYERS:
        np.testing.assert_array_equal(result[f"set_lr0/{name}/mask"], reference[f"set_lr0/{name}/mask"])
        changed += int((reference[f"set_lr0/{name}/mask"] != inputs[f"cnn:{name}/mask"]).sum())
    assert changed > 0  # the masks did move: equal because the update is the same, not because none ran


def _dense_gradients(inputs):
    """dL/d(W*M) of the MLP's mean softmax cross-entropy on the whole batch, by hand in NumPy."""
    x, y = inputs["mlp_x"].astype("float64"), inputs["mlp_y"]
    w1 = inputs["mlp:hidden/kernel"] * inputs["mlp:hidden/mask"]
    w2 = inputs["mlp:out/kernel"] * inputs["mlp:out/mask"]
    pre = x @ w1 + inputs["mlp:hidden/bias"]
    h = np.maximum(pre, 0)
    logits = h @ w2 + inputs["mlp:out/bias"]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dlogits = (p - np.eye(4)[y]) / len(x)
    dh = dlogits @ w2.T * (pre > 0)
    return {"hidden": x.T @ dh, "out": h.T @ dlogits}


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_rigl_grows_where_the_dense_gradient_is_largest(runs, backend):
    result = _backend(runs, backend)
    _, _, inputs = runs
    assert int(result["rigl_grad/n_updates"]) == 2
    for name, grad in _dense_gradients(inputs).items():
        old, new = inputs[f"mlp:{name}/mask"] != 0, result[f"rigl_grad/{name}/mask"] != 0
        grown = new & ~old
        # Every connection inactive now was a grow candidate (never active, or just dropped); a grown one
        # has a |gradient| at least as large as each of them (ties at 0: ReLU units dead on this batch).
        assert grown.sum() > 0, name
        score = np.abs(grad)
        assert score[grown].max() > 0, name
        assert score[grown].min() >= score[~new].max() * (1 - 1e-5), (  # float32 vs float64
            f"{backend}/{name}: grew |g| down to {score[grown].min()} but left {score[~new].max()} inactive")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_saved_on_backend_loads_and_exports_to_tflite_under_tensorflow(runs, backend):
    """The documented export path: save .keras on JAX/PyTorch, load and export under TensorFlow."""
    result = _backend(runs, backend)
    results, _, inputs = runs
    assert keras.backend.backend() == "tensorflow"
    path = results[backend][1] / "model.keras"
    # compile=False: a PyTorch model saves its optimizer as a torch-only class, which TensorFlow cannot
    # rebuild; export needs no optimizer (scripts/export.py loads the same way).
    loaded = keras.models.load_model(path, compile=False)
    for layer in keras_rigl.masked_layers(loaded):
        np.testing.assert_array_equal(layer.get_masks()["kernel"], result[f"rigl/{layer.layer.name}/mask"])
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.layer.kernel),
                                      result[f"rigl/{layer.layer.name}/kernel"])
    np.testing.assert_allclose(loaded.predict(inputs["x_test"], verbose=0), result["rigl/predict"],
                               rtol=1e-4, atol=1e-5)
    tflite = results[backend][1] / "model.tflite"
    keras_rigl.export_tflite(loaded, str(tflite))
    np.testing.assert_allclose(keras_rigl.tflite_predict(str(tflite), inputs["x_test"]), result["rigl/predict"],
                               rtol=1e-4, atol=1e-4)
