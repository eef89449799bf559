"""Run keras_rigl on the backend named by KERAS_BACKEND and write what tests/test_backends.py checks.

Usage: KERAS_BACKEND=jax python tests/backend_worker.py INPUTS.npz OUT_DIR

Started in a subprocess by tests/test_backends.py (a process has one Keras
backend). INPUTS.npz holds the data and the initial weights, so every backend
starts from the same numbers. Writes OUT_DIR/result.npz and OUT_DIR/model.keras.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_rigl  # noqa: E402


def cnn(weights):
    """The small sparse CNN with the given initial weights and masks (``weights``: name -> array)."""
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inp)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(32, activation="relu", name="hidden")(x)
    out = keras.layers.Dense(10, name="out")(x)
    model = keras_rigl.sparsify(keras.Model(inp, out), 0.8, seed=0)
    set_state(model, weights)
    return model


def mlp(weights):
    inp = keras.Input((16,))
    h = keras.layers.Dense(32, activation="relu", name="hidden")(inp)
    out = keras.layers.Dense(4, name="out")(h)
    model = keras_rigl.sparsify(keras.Model(inp, out), 0.8, seed=0)
    set_state(model, weights)
    return model


def set_state(model, weights):
    """Kernels, biases and masks from ``weights`` ("<layer>/kernel", "<layer>/bias", "<layer>/mask")."""
    for layer in keras_rigl.masked_layers(model):
        name = layer.layer.name
        layer.layer.kernel.assign(weights[f"{name}/kernel"])
        layer.layer.bias.assign(weights[f"{name}/bias"])
        layer.set_masks({"kernel": weights[f"{name}/mask"]}, zero_weights=True)


def get_state(model, prefix, out):
    for layer in keras_rigl.masked_layers(model):
        name = layer.layer.name
        out[f"{prefix}/{name}/kernel"] = keras.ops.convert_to_numpy(layer.layer.kernel)
        out[f"{prefix}/{name}/mask"] = layer.get_masks()["kernel"]


def compile_sgd(model, learning_rate):
    model.compile(keras.optimizers.SGD(learning_rate, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def main(inputs_path, out_dir):
    data = dict(np.load(inputs_path))
    weights = {k[len("cnn:"):]: v for k, v in data.items() if k.startswith("cnn:")}
    mlp_weights = {k[len("mlp:"):]: v for k, v in data.items() if k.startswith("mlp:")}
    x, y = data["x"], data["y"]
    out = {}

    # 1. Every callback through model.fit on the CNN.
    for name, make in [("static", lambda: keras_rigl.Static()),
                       ("set", lambda: keras_rigl.SET(update_freq=2, drop_fraction=0.3, seed=3)),
                       ("rigl", lambda: keras_rigl.RigL(update_freq=2, drop_fraction=0.3, seed=3)),
                       ("snfs", lambda: keras_rigl.SNFS(update_freq=2, drop_fraction=0.3, seed=3))]:
        model = cnn(weights)
        compile_sgd(model, 0.05)
        callback = make()
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
        get_state(model, name, out)
        out[f"{name}/n_updates"] = np.asarray(len(callback.updates))
        out[f"{name}/count_active"] = np.asarray(keras_rigl.count_active(model))
        out[f"{name}/nonzero_params"] = np.asarray(keras_rigl.count_nonzero_params(model))
        if name == "rigl":
            model.save(os.path.join(out_dir, "model.keras"))
            out["rigl/predict"] = keras.ops.convert_to_numpy(model.predict(data["x_test"], verbose=0))
            out["rigl/stripped_predict"] = keras.ops.convert_to_numpy(
                keras_rigl.strip(model).predict(data["x_test"], verbose=0))
            report = keras_rigl.sparsity_report(model)
            out["rigl/report_masked_sparsity"] = np.asarray(report.attrs["masked_sparsity"])

    # 2. SET at learning rate 0: equal weights, so equal scores on every backend.
    model = cnn(weights)
    compile_sgd(model, 0.0)
    callback = keras_rigl.SET(update_freq=2, drop_fraction=0.3, seed=5)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    get_state(model, "set_lr0", out)

    # 3. RigL's one update, on the whole batch at learning rate 0: the grow score is the dense
    #    gradient at exactly the weights the test computes it at.
    model = mlp(mlp_weights)
    compile_sgd(model, 0.0)
    callback = keras_rigl.RigL(update_freq=1, drop_fraction=0.3, decay="constant", end_step=1, seed=0)
    model.fit(data["mlp_x"], data["mlp_y"], batch_size=len(data["mlp_x"]), epochs=1, shuffle=False, verbose=0,
              callbacks=[callback])
    get_state(model, "rigl_grad", out)
    out["rigl_grad/n_updates"] = np.asarray(len(callback.updates))

    out["backend"] = np.asarray(keras.backend.backend())
    np.savez(os.path.join(out_dir, "result.npz"), **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
