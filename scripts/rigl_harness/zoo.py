"""Model builders for scripts/train.py and scripts/compare.py: small CNN, MLP, LSTM and keras.applications.

``build_model(name, input_shape, num_classes, width=1.0)`` returns a built,
uncompiled functional model. ``width`` scales every hidden layer's units /
channels (``alpha`` for MobileNets): the "small-dense" baseline of the
comparison is a narrower dense net (:func:`width_for_params` finds the width
that gives a target parameter count).

``keras_module`` (default ``keras``) lets the same builder make the
``tf_keras`` twin of a model, which TFMOT's pruning API needs
(``cnn``, ``mlp``, ``lstm`` and the applications all have twins).

The ``keras.applications`` models get ``weights=None`` (or pretrained weights
from a file via :func:`load_weights_file`), an input resized to at least
``min_size`` pixels (32) and grayscale repeated to 3 channels, global
average pooling and a new ``Dense`` classifier.
"""

from __future__ import annotations

import math
import os

MODELS = ("cnn", "mlp", "mobilenet_v1", "mobilenet_v2", "resnet50", "lstm")
APPLICATIONS = {
    "mobilenet_v1": "MobileNet",
    "mobilenet_v2": "MobileNetV2",
    "resnet50": "ResNet50",
}


def _keras(keras_module):
    if keras_module is None:
        import keras

        return keras
    return keras_module


def _units(n, width):
    return max(1, int(round(n * width)))


def cnn(input_shape, num_classes, width=1.0, keras_module=None):
    """Three 3x3 conv blocks (16, 32, 64 channels, 2x2 max-pool while the map is >= 4 pixels), a 64-unit Dense.

    About 61k parameters on 28x28x1 (kept small so that the committed example
    model, dense weights + masks + optimizer state, stays under 1 MB).
    """
    K = _keras(keras_module)
    L = K.layers
    inp = K.Input(shape=tuple(input_shape), name="image")
    x = inp
    if len(input_shape) == 2:
        x = L.Reshape(tuple(input_shape) + (1,), name="add_channel")(x)
    size = min(int(input_shape[0]), int(input_shape[1]))
    for i, channels in enumerate((16, 32, 64), start=1):
        x = L.Conv2D(_units(channels, width), 3, padding="same", activation="relu", name=f"conv{i}")(x)
        if size >= 4:
            x = L.MaxPooling2D(2, name=f"pool{i}")(x)
            size //= 2
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(_units(64, width), activation="relu", name="fc1")(x)
    out = L.Dense(num_classes, name="logits")(x)
    return K.Model(inp, out, name="cnn")


def mlp(input_shape, num_classes, width=1.0, keras_module=None):
    """LeNet-300-100."""
    K = _keras(keras_module)
    L = K.layers
    inp = K.Input(shape=tuple(input_shape), name="image")
    x = L.Flatten(name="flatten")(inp)
    x = L.Dense(_units(300, width), activation="relu", name="fc1")(x)
    x = L.Dense(_units(100, width), activation="relu", name="fc2")(x)
    out = L.Dense(num_classes, name="logits")(x)
    return K.Model(inp, out, name="mlp")


def lstm(input_shape, num_classes, width=1.0, keras_module=None):
    """An LSTM reading the image row by row (rows = time steps), unrolled (fixed length) so TFLite takes it."""
    K = _keras(keras_module)
    L = K.layers
    inp = K.Input(shape=tuple(input_shape), name="image")
    steps = int(input_shape[0])
    features = int(math.prod(input_shape[1:]))
    x = L.Reshape((steps, features), name="rows")(inp)
    x = L.LSTM(_units(64, width), unroll=True, name="lstm")(x)
    out = L.Dense(num_classes, name="logits")(x)
    return K.Model(inp, out, name="lstm")


def application(name, input_shape, num_classes, width=1.0, keras_module=None, min_size=32):
    """A ``keras.applications`` backbone (``weights=None``) with a new classifier."""
    K = _keras(keras_module)
    L = K.layers
    h, w = int(input_shape[0]), int(input_shape[1])
    channels = int(input_shape[2]) if len(input_shape) > 2 else 1
    size = (max(h, min_size), max(w, min_size))
    inp = K.Input(shape=tuple(input_shape), name="image")
    x = inp
    if len(input_shape) == 2:
        x = L.Reshape((h, w, 1), name="add_channel")(x)
    if (h, w) != size:
        x = L.Resizing(size[0], size[1], name="resize")(x)
    if channels == 1:
        x = L.Concatenate(name="to_rgb")([x, x, x])
    elif channels != 3:
        x = L.Conv2D(3, 1, name="to_rgb")(x)
    kwargs = dict(include_top=False, weights=None, input_shape=size + (3,), pooling="avg")
    cls = getattr(K.applications, APPLICATIONS[name])
    if name in ("mobilenet_v1", "mobilenet_v2"):
        kwargs["alpha"] = float(width)
    elif width != 1.0:
        raise ValueError(f"{name} has no width multiplier; use width=1.0 (or mobilenet_v1/v2, cnn, mlp, lstm).")
    backbone = cls(**kwargs)
    x = backbone(x)
    out = L.Dense(num_classes, name="logits")(x)
    return K.Model(inp, out, name=name)


def build_model(name, input_shape, num_classes, width=1.0, keras_module=None, seed=None):
    """A built model by name (one of :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; use one of {', '.join(MODELS)}.")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}.")
    K = _keras(keras_module)
    if seed is not None:
        if hasattr(K, "utils") and hasattr(K.utils, "set_random_seed"):
            K.utils.set_random_seed(int(seed))
    if name == "cnn":
        return cnn(input_shape, num_classes, width, K)
    if name == "mlp":
        return mlp(input_shape, num_classes, width, K)
    if name == "lstm":
        return lstm(input_shape, num_classes, width, K)
    return application(name, input_shape, num_classes, width, K)


def count_params(model):
    return int(sum(math.prod(w.shape) for w in model.weights if w.trainable))


def width_for_params(name, input_shape, num_classes, target_params, lo=0.02, hi=1.0, iters=14):
    """The width (hidden-size multiplier) whose dense model has about ``target_params`` trainable parameters."""
    def params(width):
        return count_params(build_model(name, input_shape, num_classes, width))

    if params(hi) <= target_params:
        return hi
    best = lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        if params(mid) > target_params:
            hi = mid
        else:
            lo = best = mid
    # pick whichever of lo / hi is nearer
    return lo if abs(params(lo) - target_params) <= abs(params(hi) - target_params) else hi


def check_weights_file(path):
    """ValueError naming ``--weights`` unless ``path`` is a readable ``.keras`` or ``.weights.h5`` file.

    Checked before any training: a ``.keras`` file must be an intact zip archive holding a model config
    (a truncated copy is not), a ``.weights.h5`` file must start with the HDF5 signature.
    """
    import zipfile

    if not os.path.exists(path):
        raise ValueError(f"--weights file {path!r} does not exist.")
    if path.endswith(".keras"):
        try:
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
                names = set(zf.namelist())
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise ValueError(f"--weights file {path!r} is not a readable .keras archive ({err}); "
                             "it is truncated or damaged, save the model again with model.save().") from None
        if bad is not None or "config.json" not in names:
            raise ValueError(f"--weights file {path!r} is damaged ({'bad CRC in ' + bad if bad else 'no config.json'}); "
                             "save the model again with model.save().")
    elif path.endswith(".weights.h5"):
        with open(path, "rb") as fh:
            if fh.read(8) != b"\x89HDF\r\n\x1a\n":
                raise ValueError(f"--weights file {path!r} is not an HDF5 file; save the weights with "
                                 "model.save_weights('x.weights.h5').")
    else:
        raise ValueError(f"--weights file {path!r} must end in .weights.h5 (model.save_weights) or .keras.")


def load_weights_file(model, path):
    """Load pretrained weights from ``path`` (``.weights.h5`` or a whole ``.keras`` model) into ``model``.

    A ``.keras`` model with ``keras_rigl.Masked`` layers (what scripts/train.py writes) is stripped first:
    its masked-out weights are zero, so the sparse network's weights become the pretrained dense ones.
    """
    check_weights_file(path)
    import keras

    if path.endswith(".keras"):
        import keras_rigl  # registers Masked, so a sparse model written by train.py loads

        try:
            source = keras.models.load_model(path, compile=False)
        except Exception as err:
            raise ValueError(f"could not load the model in {path!r} ({type(err).__name__}: {err}); "
                             "save it again with model.save().") from None
        if keras_rigl.masked_layers(source):
            source = keras_rigl.strip(source)
        try:
            model.set_weights(source.get_weights())
        except ValueError as err:
            raise ValueError(
                f"the model in {path!r} does not match this architecture ({err}); build it with the same "
                "--model and data shape."
            ) from None
        return model
    try:
        model.load_weights(path)
    except Exception as err:
        raise ValueError(
            f"could not load {path!r} into the {model.name!r} model ({err}); save the weights of the same "
            "architecture with model.save_weights('x.weights.h5')."
        ) from None
    return model
