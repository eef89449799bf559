import os
import sys

# the scripts' helper package (scripts/rigl_harness), imported as scripts/train.py imports it
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import gc  # noqa: E402

import keras  # noqa: E402  (imports TensorFlow: ~385,000 objects the garbage collector would scan)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Every test starts with keras.backend.clear_session(), which runs a full gc.collect(): ~0.22 s of CPU
# scanning the objects of the imported modules, ~80 s over the suite. Those live as long as the process,
# so they move to the permanent generation once; each collection then scans only what tests created
# since (~0.04 s), and still frees it.
gc.collect()
gc.freeze()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running check, run with `pytest -m slow`")


def pytest_ignore_collect(collection_path, config):
    """On JAX or PyTorch, test files with no ``any_backend`` test are not even imported (they may
    import TensorFlow, which a JAX or PyTorch environment need not have)."""
    if keras.backend.backend() == "tensorflow" or collection_path.suffix != ".py":
        return None
    if not collection_path.name.startswith("test_"):
        return None
    return True if "mark.any_backend" not in collection_path.read_text(encoding="utf-8") else None


def pytest_collection_modifyitems(config, items):
    """On JAX or PyTorch run only the tests marked ``any_backend`` (the rest use TensorFlow itself)."""
    if keras.backend.backend() == "tensorflow":
        return
    kept = [item for item in items if item.get_closest_marker("any_backend")]
    deselected = [item for item in items if not item.get_closest_marker("any_backend")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


def small_cnn(input_shape=(8, 8, 1), classes=10):
    inp = keras.Input(input_shape)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(classes, name="dense")(x)
    return keras.Model(inp, out, name="small_cnn")


def sparse_cnn(seed=0, sparsity=0.8, **sparsify_kwargs):
    """The sparse conv + two-Dense test model shared by the callback, capture, compiled-update and condense
    tests; ``sparsify_kwargs`` go to ``sparsify`` (e.g. ``distribution="uniform"``)."""
    import keras_rigl

    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inp)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(32, activation="relu", name="hidden")(x)
    out = keras.layers.Dense(10, name="out")(x)
    return keras_rigl.sparsify(keras.Model(inp, out), sparsity, seed=seed, **sparsify_kwargs)


class UpdateSteps(keras.callbacks.Callback):
    """Put after a sparse-training callback: ``seen`` gets (the update's step, optimizer.iterations) per update."""

    def __init__(self, algo):
        super().__init__()
        self.algo, self.seen, self.rows = algo, [], 0

    def on_train_batch_end(self, batch, logs=None):
        if len(self.algo.updates) > self.rows:
            self.rows = len(self.algo.updates)
            self.seen.append((int(self.algo.updates["step"].iloc[-1]), int(self.model.optimizer.iterations)))


def tf_train_step(model, loss_fn, optimizer):
    """A custom-loop training step (tf.function over a GradientTape) returning the loss; TensorFlow only."""
    import tensorflow as tf

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return train_step


def load_script(relative_path):
    """A script of this repository (``benchmarks/x.py``, ``scripts/x.py``) imported from its file, anew."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), relative_path)
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def built_subclassed_model():
    """A built subclassed (not functional) model with one Dense(2) on 3 inputs: what sparsify/condense refuse."""

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    sub = Sub()
    sub(np.zeros((1, 3), "float32"))
    return sub


@pytest.fixture
def cnn():
    return small_cnn()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
