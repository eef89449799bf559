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
GPU (ResNet50 at 224 px, bf16 mixed precision, one synthetic batch repeated):
      python benchmarks/backend_overhead.py --backends jax --model resnet50 --batch 64 --steps 100 \
          --mixed-precision --variants dense,masked,rigl --update-paths
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_models.py, also when loaded by path
from _models import small_cnn  # noqa: E402  (takes the keras module: imported after the backend is set)

VARIANTS = ("dense", "no_probe", "masked", "rigl")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(keras, args):
    if args.model == "cnn":
        return small_cnn(keras)
    shape = (args.image_size, args.image_size, 3)
    return keras.applications.ResNet50(input_shape=shape, weights=None, classes=10, classifier_activation=None)


def input_shape(args):
    return (28, 28, 1) if args.model == "cnn" else (args.image_size, args.image_size, 3)


def one_batch_repeated(x, y, steps):
    """A generator of the same batch ``steps`` times: big inputs without a big array in host memory."""
    for _ in range(steps):
        yield x, y


def child(args):
    """Time the variants on the backend of this process; print one JSON line."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, ROOT)
    import keras
    import numpy as np

    import keras_rigl

    if args.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    rng = np.random.default_rng(0)
    n = args.steps * args.batch if args.model == "cnn" else args.batch
    x = rng.normal(size=(n,) + input_shape(args)).astype("float32")
    y = rng.integers(0, 10, n)

    def compiled(model):
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    keras.utils.set_random_seed(0)
    models = {
        "dense": compiled(build(keras, args)),
        "no_probe": compiled(keras_rigl.sparsify(build(keras, args), args.sparsity, seed=0, capture_gradients=False)),
        "masked": compiled(keras_rigl.sparsify(build(keras, args), args.sparsity, seed=0)),
        "rigl": compiled(keras_rigl.sparsify(build(keras, args), args.sparsity, seed=0)),
    }

    def run(name):
        callbacks = []
        if name == "rigl":
            # end_step past the fit: every update_freq-th step of every timed fit updates
            callbacks = [keras_rigl.RigL(update_freq=args.update_freq, drop_fraction=0.3, decay="constant",
                                         end_step=10**9, seed=0)]
        start = time.perf_counter()
        if args.model == "cnn":
            models[name].fit(x, y, batch_size=args.batch, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        else:
            models[name].fit(one_batch_repeated(x, y, args.steps), steps_per_epoch=args.steps, epochs=1, verbose=0,
                             callbacks=callbacks)
        keras.ops.convert_to_numpy(models[name].weights[0])  # wait for the device
        return time.perf_counter() - start

    def update_seconds(compiled):
        """One RigL update of the "rigl" model (its last fit left the gradient in place)."""
        algo = keras_rigl.RigL(update_freq=1, end_step=10**9, seed=0, compiled=compiled)
        algo.attach(models["rigl"], step=0)
        algo.update_masks(models["rigl"], 1, models["rigl"].optimizer)  # warm-up: traces
        start = time.perf_counter()
        algo.update_masks(models["rigl"], 2, models["rigl"].optimizer)
        keras.ops.convert_to_numpy(models["rigl"].weights[0])
        return time.perf_counter() - start

    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    for name in variants:
        run(name)  # warm-up: compiles the step
    times = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in (variants if r % 2 == 0 else variants[::-1]):  # reversed every round: drift hits all alike
            times[name].append(run(name))
    updates_s = {}
    if "rigl" in variants and args.update_paths:
        for compiled in (True, False):
            try:
                updates_s["compiled" if compiled else "numpy"] = [update_seconds(compiled) for _ in range(3)]
            except ValueError as error:  # no compiled path on this backend
                updates_s["compiled" if compiled else "numpy"] = str(error)
    print("RESULT " + json.dumps({"backend": keras.backend.backend(), "times": times, "updates": updates_s}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", default="tensorflow,jax,torch")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=200, help="training steps per timed fit")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--update-freq", type=int, default=100)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--model", default="cnn", choices=("cnn", "resnet50"),
                   help="cnn (28x28, the default) or resnet50 (--image-size, one synthetic batch repeated)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--mixed-precision", action="store_true", help="mixed_bfloat16 policy")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--update-paths", action="store_true",
                   help="also time one RigL update, compiled and NumPy, in training steps")
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
                 f"--update-freq={args.update_freq}", f"--sparsity={args.sparsity}", f"--model={args.model}",
                 f"--image-size={args.image_size}", f"--variants={args.variants}"]
    forwarded += ["--mixed-precision"] * args.mixed_precision + ["--update-paths"] * args.update_paths
    print(f"{args.steps} steps of batch {args.batch} per fit, {args.rounds} interleaved rounds, "
          f"RigL update every {args.update_freq} steps, sparsity {args.sparsity}")
    print(f"{'backend':<11} {'variant':<9} {'min s':>8} {'median s':>9} {'min/dense':>10} {'median/dense':>13}")
    for backend in backends:
        python = sys.executable if backend == "tensorflow" else (args.python or sys.executable)
        env = {**os.environ, "KERAS_BACKEND": backend,
               "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        done = subprocess.run([python, os.path.abspath(__file__), "--child", *forwarded], env=env,
                              capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"{backend:<11} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        result = json.loads(lines[-1][len("RESULT "):])
        times = result["times"]
        dense_min, dense_median = min(times["dense"]), statistics.median(times["dense"])
        for name in times:
            low, mid = min(times[name]), statistics.median(times[name])
            print(f"{backend:<11} {name:<9} {low:>8.3f} {mid:>9.3f} {low / dense_min:>10.3f} {mid / dense_median:>13.3f}")
        step = dense_median / args.steps
        for path, values in result.get("updates", {}).items():
            if isinstance(values, str):
                print(f"{backend:<11} update {path}: not available ({values})")
            else:
                print(f"{backend:<11} update {path}: min {min(values):.3f} s = {min(values) / step:.2f} dense steps "
                      f"(median {statistics.median(values):.3f} s; dense step {step * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
