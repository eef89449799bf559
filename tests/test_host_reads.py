"""RigL ``model.fit`` reads no mask to the host: ordinary steps read nothing, updates a few scalars.

On a GPU every device->host read waits for the device and crosses the bus.
The worker counts reads where every one goes through: on JAX
``ArrayImpl._value`` (``jax.transfer_guard`` does not see reads on the CPU
backend, where the array is already in host memory), on TensorFlow
``EagerTensor._numpy`` (``.numpy()``, ``np.asarray``, ``int()``,
``keras.ops.convert_to_numpy``; a variable is read through a tensor). On
TensorFlow a step also reads the optimizer's step counter (one number), which
the plan counts steps by. Runs in a subprocess per backend, like
tests/test_compiled_update_jax.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent(
    r"""
    import collections
    import keras, numpy as np
    import keras_rigl

    reads = collections.defaultdict(list)  # (hook, step) -> sizes of the arrays read to the host
    phase = [None]
    if keras.backend.backend() == "jax":
        from jax._src import array as jax_array

        original = jax_array.ArrayImpl._value

        def counted(self):
            if phase[0] is not None:
                reads[phase[0]].append(int(self.size))
            return original.fget(self)

        jax_array.ArrayImpl._value = property(counted)
        step_reads = 0  # steps are counted by batch
    else:
        from tensorflow.python.framework import ops as tf_ops

        original = tf_ops._EagerTensorBase._numpy

        def counted(self):
            if phase[0] is not None:
                reads[phase[0]].append(int(np.prod(self.shape)))
            return original(self)

        tf_ops._EagerTensorBase._numpy = counted
        step_reads = 1  # optimizer.iterations, one number, in the step before an update step only

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu")(inp)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(32, activation="relu")(x)
    model = keras_rigl.sparsify(keras.Model(inp, keras.layers.Dense(10)(x)), 0.8, seed=0)
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    n_weights = sum(len(l.masked_weights) for l in keras_rigl.masked_layers(model))
    smallest_mask = min(int(np.prod(mw.mask.shape)) for l in keras_rigl.masked_layers(model) for mw in l.masked_weights)
    scalars = 4 * n_weights  # "a few scalars per weight": the counts the logs need
    assert smallest_mask > scalars

    rigl = keras_rigl.RigL(update_freq=3, seed=3, compiled=True)
    for hook in ("on_train_begin", "on_epoch_begin", "on_train_batch_begin", "on_train_batch_end",
                 "on_epoch_end", "on_train_end"):
        def wrapped(*args, _hook=hook, _method=getattr(rigl, hook), **kwargs):
            phase[0] = (_hook, rigl.step)
            try:
                return _method(*args, **kwargs)
            finally:
                phase[0] = None
        setattr(rigl, hook, wrapped)

    rng = np.random.default_rng(0)
    data = rng.normal(size=(64, 8, 8, 1)).astype("float32"), rng.integers(0, 10, 64)
    for fit in range(2):  # a second fit: a new plan over the same compiled update and ever-active record
        model.fit(*data, batch_size=8, epochs=2, verbose=0, callbacks=[rigl])
    update_steps = {int(s) for s in rigl.updates["step"]}
    assert len(update_steps) >= 4 and int(rigl.updates["n_moved"].sum()) > 0, rigl.updates
    problems = []
    for (hook, step), sizes in sorted(reads.items(), key=lambda kv: str(kv[0])):
        updating = hook == "on_train_batch_end" and step is not None and step + 1 in update_steps
        before_update = hook == "on_train_batch_end" and step is not None and step + 2 in update_steps
        if hook in ("on_train_batch_begin", "on_train_batch_end") and not updating:
            # an ordinary step reads nothing (on TensorFlow: the step counter, before an update step only)
            limit_each = limit_total = step_reads if before_update else 0
        else:
            limit_each, limit_total = scalars, 2 * scalars
        if max(sizes) > limit_each or sum(sizes) > limit_total:
            problems.append(f"{hook} after step {step}: read {len(sizes)} arrays of sizes {sizes[:12]}")
    assert not problems, "\n".join(problems)
    # the figures the logs show still come out right (from the device counts)
    active = sum(int(keras.ops.convert_to_numpy(mw.mask).sum()) for l in keras_rigl.masked_layers(model)
                 for mw in l.masked_weights)
    total = sum(int(np.prod(mw.mask.shape)) for l in keras_rigl.masked_layers(model) for mw in l.masked_weights)
    assert abs(rigl._sparsity - (1 - active / total)) < 1e-12, (rigl._sparsity, active, total)
    assert active / total < rigl.itop_rate() <= 1.0  # connections moved: more ever active than active now
    print("HOST_READS_OK", len(update_steps))
    """
)


def _run_worker(tmp_path, backend, python):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([python, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert "HOST_READS_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.any_backend
def test_rigl_fit_on_jax_reads_no_mask_to_the_host(tmp_path):
    python = os.environ.get("KERAS_RIGL_BACKEND_PYTHON", sys.executable)
    probe = subprocess.run([python, "-c", "import jax"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"jax is not importable by {python}: pip install -e '.[jax]' (or set KERAS_RIGL_BACKEND_PYTHON)")
    _run_worker(tmp_path, "jax", python)


def test_rigl_fit_on_tensorflow_reads_no_mask_to_the_host(tmp_path):
    _run_worker(tmp_path, "tensorflow", sys.executable)
