"""Models shared by the benchmarks (imported as ``_models``: each benchmark puts its own folder on sys.path)."""

from __future__ import annotations

#: the small CNN's input shape (MNIST-sized)
SMALL_CNN_INPUT = (28, 28, 1)


def small_cnn(keras=None):
    """Two conv + pool blocks and two Dense layers, 10 logits; ``keras``: the module, for scripts that
    import it only after choosing the backend (default: import it here)."""
    if keras is None:
        import keras
    inp = keras.Input(SMALL_CNN_INPUT)
    x = keras.layers.Conv2D(32, 3, activation="relu")(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    return keras.Model(inp, keras.layers.Dense(10)(x))
