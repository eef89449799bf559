"""RigL ``fit`` against dense ``fit`` on each Keras backend (TensorFlow, JAX, PyTorch).

A process has one Keras backend, so each backend runs in a subprocess of this
script (``--child``) with KERAS_BACKEND set. In it, the variants run
interleaved, round by round, so that machine noise hits all alike:

  dense        the plain Keras model
  no_probe     sparsify(..., capture_gradients=False), no callback: the cost of the masks alone
  masked       sparsify()'d model, no callback (on JAX/PyTorch: with the gradient probes,
               which the optimizer overwrites on every step; on TensorFlow: plain W * M)
  rigl         sparsify()'d model + keras_rigl.RigL(update_freq=ΔT) (NumPy update on JAX/PyTorch)

Each round runs one ``fit`` of ``--steps`` steps per variant (after a warm-up
fit that compiles); printed are the minimum and median seconds over
``--rounds`` (>= 7 for a reported figure) and their ratios to dense.

Run:  python benchmarks/backend_overhead.py [--backends tensorflow,jax,torch] [--rounds 7] [--steps 200]
      [--batch 128] [--update-freq 100] [--python PATH]   (PATH: a Python with jax/torch installed)
Check it runs:  python benchmarks/backend_overhead.py --rounds 1 --steps 4 --batch 8 --update-freq 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

VARIANTS = ("dense", "no_probe", "masked", "rigl")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_cnn(keras):
    inp = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(32, 3, activation="relu")(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(128, activation="relu")(x)
    return keras.Model(inp, keras.layers.Dense(10)(x))


def child(args):
    """Time the variants on the backend of this process; print one JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, ROOT)
    import keras
    import numpy as np

    import keras_rigl

    rng = np.random.default_rng(0)
    n = args.steps * args.batch
    x = rng.normal(size=(n, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, n)

    def compiled(model):
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    keras.utils.set_random_seed(0)
    models = {
        "dense": compiled(small_cnn(keras)),
        "no_probe": compiled(keras_rigl.sparsify(small_cnn(keras), args.sparsity, seed=0, capture_gradients=False)),
        "masked": compiled(keras_rigl.sparsify(small_cnn(keras), args.sparsity, seed=0)),
        "rigl": compiled(keras_rigl.sparsify(small_cnn(keras), args.sparsity, seed=0)),
    }

    def run(name):
        callbacks = []
        if name == "rigl":
            # end_step past the fit: every update_freq-th step of every timed fit updates
            callbacks = [keras_rigl.RigL(update_freq=args.update_freq, drop_fraction=0.3, decay="constant",
                                         end_step=10**9, seed=0)]
        start = time.perf_counter()
        models[name].fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        return time.perf_counter() - start

    for name in VARIANTS:
        run(name)  # warm-up: compiles the step
    times = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            times[name].append(run(name))
    print("RESULT " + json.dumps({"backend": keras.backend.backend(), "times": times}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="tensorflow,jax,torch")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=200, help="training steps per timed fit")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--update-freq", type=int, default=100)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--python", default=None, help="Python for jax/torch (default: this one)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("rounds", "steps", "batch", "update_freq"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be an integer >= 1, got {getattr(args, name)}")
    if not 0 < args.sparsity < 1:
        p.error(f"--sparsity must be in (0, 1), got {args.sparsity}")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - {"tensorflow", "jax", "torch"})
    if unknown:
        p.error(f"--backends: unknown {unknown}; use tensorflow, jax, torch (comma-separated)")
    if args.child:
        child(args)
        return

    forwarded = [f"--rounds={args.rounds}", f"--steps={args.steps}", f"--batch={args.batch}",
                 f"--update-freq={args.update_freq}", f"--sparsity={args.sparsity}"]
    print(f"{args.steps} steps of batch {args.batch} per fit, {args.rounds} interleaved rounds, "
          f"RigL update every {args.update_freq} steps, sparsity {args.sparsity}")
    print(f"{'backend':<11} {'variant':<9} {'min s':>8} {'median s':>9} {'min/dense':>10} {'median/dense':>13}")
    for backend in backends:
        python = sys.executable if backend == "tensorflow" else (args.python or sys.executable)
        env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": ROOT}
        done = subprocess.run([python, os.path.abspath(__file__), "--child", *forwarded], env=env,
                              capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"{backend:<11} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        times = json.loads(lines[-1][len("RESULT "):])["times"]
        dense_min, dense_median = min(times["dense"]), statistics.median(times["dense"])
        for name in VARIANTS:
            low, mid = min(times[name]), statistics.median(times[name])
            print(f"{backend:<11} {name:<9} {low:>8.3f} {mid:>9.3f} {low / dense_min:>10.3f} {mid / dense_median:>13.3f}")


if __name__ == "__main__":
    main()
