"""Wall-time overhead of RigL inside model.fit against the same network trained dense.

Variants, interleaved round by round so that machine noise hits all alike:
  dense      - the plain Keras model
  masked     - sparsify()'d model, no callback (static sparse: cost of the masks alone,
               W * M with no capture: ordinary steps of a RigL fit run the same graph)
  rigl       - sparsify()'d model + keras_rigl.RigL(update_freq=ΔT)
Each round runs one `fit` of the same number of steps per variant; reported
are the minimum and median over rounds and the ratios to dense.
Also measured: the cost of one mask update (RigL.update_masks, compiled path), in training steps.
benchmarks/update_scale.py compares the NumPy and compiled updates and larger models.

Run:  python benchmarks/overhead.py [--rounds 7] [--steps 200] [--batch 128] [--update-freq 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_rigl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_models.py, also when loaded by path
from _models import small_cnn  # noqa: E402


def compiled(model):
    model.compile(
        keras.optimizers.SGD(0.01, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=200, help="training steps per timed fit")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--update-freq", type=int, default=100)
    p.add_argument("--sparsity", type=float, default=0.9)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    n = args.steps * args.batch
    x = rng.random((n, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, n)

    keras.utils.set_random_seed(0)
    base = small_cnn()
    models = {
        "dense": compiled(keras.models.clone_model(base)),
        "masked": compiled(keras_rigl.sparsify(base, args.sparsity, seed=0)),
        "rigl": compiled(keras_rigl.sparsify(base, args.sparsity, seed=0)),
    }
    # warm-up: trace and compile every train function once
    for name, model in models.items():
        cbs = [keras_rigl.RigL(update_freq=1, end_step=10**9, seed=0)] if name == "rigl" else []
        model.fit(x[: 2 * args.batch], y[: 2 * args.batch], batch_size=args.batch, epochs=1, verbose=0, callbacks=cbs)

    times = {name: [] for name in models}
    losses = {}
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            # end_step far away so that every ΔT-th step in the timed fit is an update
            cbs = [keras_rigl.RigL(update_freq=args.update_freq, end_step=10**9, seed=r)] if name == "rigl" else []
            t0 = time.perf_counter()
            hist = models[name].fit(x, y, batch_size=args.batch, epochs=1, verbose=0, callbacks=cbs, shuffle=False)
            times[name].append(time.perf_counter() - t0)
            losses[name] = hist.history["loss"][-1]

    # one mask update alone
    rigl = keras_rigl.RigL(update_freq=1, end_step=10**9, seed=0)
    rigl.attach(models["rigl"])
    models["rigl"].fit(x[: args.batch], y[: args.batch], batch_size=args.batch, epochs=1, verbose=0, callbacks=[rigl])
    update_times = []
    for i in range(args.rounds):
        t0 = time.perf_counter()
        rigl.update_masks(models["rigl"], step=i + 1, optimizer=models["rigl"].optimizer)
        update_times.append(time.perf_counter() - t0)

    # the alternative design: an extra tf.function forward/backward pass on the update batch
    import tensorflow as tf

    model = models["rigl"]
    loss_fn = model.loss

    @tf.function
    def extra_gradient_pass(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True))
        return tape.gradient(loss, model.trainable_variables)

    xb, yb = tf.constant(x[: args.batch]), tf.constant(y[: args.batch])
    extra_gradient_pass(xb, yb)
    extra_times = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        extra_gradient_pass(xb, yb)
        extra_times.append(time.perf_counter() - t0)

    dense_min, dense_med = min(times["dense"]), statistics.median(times["dense"])
    print(f"small CNN (28x28x1, conv32-conv64-dense128), batch {args.batch}, {args.steps} steps per fit, "
          f"sparsity {args.sparsity}, ΔT={args.update_freq}, {args.rounds} interleaved rounds")
    print(f"{'variant':8s} {'min s':>8s} {'median s':>9s} {'min/dense':>10s} {'median/dense':>13s} {'last loss':>10s}")
    for name, ts in times.items():
        print(f"{name:8s} {min(ts):8.3f} {statistics.median(ts):9.3f} {min(ts) / dense_min:10.3f} "
              f"{statistics.median(ts) / dense_med:13.3f} {losses[name]:10.4f}")
    step_med = dense_med / args.steps
    upd_med = statistics.median(update_times)
    print(f"one mask update (all layers): min {min(update_times) * 1e3:.1f} ms, median {upd_med * 1e3:.1f} ms "
          f"= {upd_med / step_med:.2f} dense training steps (median step {step_med * 1e3:.2f} ms)")
    extra_med = statistics.median(extra_times)
    print(f"alternative, an extra gradient pass per update: median {extra_med * 1e3:.1f} ms "
          f"= {extra_med / step_med:.2f} training steps per update, on top of the update itself; "
          f"the capture runs in a second step function on update steps only (no per-step branch)")
    return times


if __name__ == "__main__":
    main()
