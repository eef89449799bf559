"""RigL at scale: cost of one mask update (NumPy vs compiled), RigL fit vs dense fit, peak memory.

For each model (small CNN 28x28x1 batch 128; MobileNetV2 alpha 1.0 at 96 px
batch 32; ResNet50 at 64 px batch 16; synthetic data, 10 classes, ERK at
--sparsity), in one process, interleaved round by round (the order reverses
every round, so that machine noise and drift hit every variant alike):

  dense fit      the plain Keras model, --steps steps
  masked fit     sparsify()'d, no callback (cost of the masks alone)
  rigl fit       sparsify()'d + RigL(update_freq=--update-freq), compiled update
  update numpy   one RigL.update_masks through the NumPy reference path
  update compiled one RigL.update_masks through the compiled path

and reports min and median over --rounds rounds, the fits as ratios to the
dense fit and the updates in training steps (update time / median dense
step of the same rounds). Every function is traced in a warm-up first.

Peak memory (--memory, default on) is measured in a fresh process per
variant (dense fit; RigL fit with the NumPy update; with the compiled
update), each running --steps // 4 steps with an update every --steps // 8:
on a GPU the allocator's peak (tf.config.experimental.get_memory_info), on
CPU the process's peak resident set (VmHWM of the child itself: ru_maxrss would
carry this benchmark's own peak over into the child; includes the
Python/TensorFlow baseline).

Run on a quiet machine (~2.5 min for cnn; ResNet50 with 100-step fits ~17 min,
MobileNetV2 ~30 min on 2 CPU cores):
    python benchmarks/update_scale.py --rounds 7 --steps 200 --models cnn
    python benchmarks/update_scale.py --rounds 7 --steps 100 --update-freq 100 --models resnet50,mobilenetv2
Peak memory only (a few minutes), and where an update's memory goes (RSS after a fit, then after each of 3 updates):
    python benchmarks/update_scale.py --no-timing --steps 100 --models cnn,mobilenetv2,resnet50
    python benchmarks/update_scale.py --no-timing --no-memory --memory-phases --models mobilenetv2,resnet50
Check that it runs (seconds):
    python benchmarks/update_scale.py --rounds 1 --steps 2 --models cnn --update-freq 1 --no-memory
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_rigl  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/_models.py, also when loaded by path
from _models import small_cnn  # noqa: E402

MODELS = {
    # name: (input shape, batch)
    "cnn": ((28, 28, 1), 128),
    "mobilenetv2": ((96, 96, 3), 32),
    "resnet50": ((64, 64, 3), 16),
}


def build(name):
    shape, _ = MODELS[name]
    if name == "cnn":
        return small_cnn(keras)
    if name == "mobilenetv2":
        return keras.applications.MobileNetV2(input_shape=shape, alpha=1.0, weights=None, classes=10, classifier_activation=None)
    return keras.applications.ResNet50(input_shape=shape, weights=None, classes=10, classifier_activation=None)


def compile_model(model):
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def data(name, steps, seed=0):
    shape, batch = MODELS[name]
    rng = np.random.default_rng(seed)
    n = max(steps, 1) * batch
    return rng.random((n,) + shape, dtype=np.float32), rng.integers(0, 10, n), batch


def stats(values):
    return min(values), statistics.median(values)


_T0 = time.perf_counter()


def progress(message):
    """A line on stderr with the elapsed time: a ResNet50 run takes many minutes before its first result."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {message}", file=sys.stderr, flush=True)


def masked_entries(model):
    return sum(int(np.prod(mw.mask.shape)) for l in keras_rigl.masked_layers(model) for mw in l.masked_weights)


# ------------------------------------------------------------------ timing
def time_model(name, args):
    x, y, batch = data(name, args.steps)
    keras.utils.set_random_seed(0)
    base = build(name)
    dense = compile_model(keras.models.clone_model(base))
    masked = compile_model(keras_rigl.sparsify(base, args.sparsity, seed=0))
    rigl_model = compile_model(keras_rigl.sparsify(base, args.sparsity, seed=0))
    fit = dict(batch_size=batch, epochs=1, verbose=0, shuffle=False)

    def rigl(seed):  # end_step far away: every ΔT-th step of a timed fit is an update
        return keras_rigl.RigL(update_freq=args.update_freq, end_step=10**9, seed=seed, compiled=True)

    # warm-up: trace every train function, both step functions of RigL and both update paths
    progress(f"{name}: warm-up (tracing the train functions)")
    dense.fit(x[: 2 * batch], y[: 2 * batch], **fit)
    masked.fit(x[: 2 * batch], y[: 2 * batch], **fit)
    # ΔT = 2 over 2 steps: the plain step function (step 1) and the capturing one (step 2) are both traced here
    rigl_model.fit(x[: 2 * batch], y[: 2 * batch], callbacks=[keras_rigl.RigL(update_freq=2, end_step=10**9, compiled=True)], **fit)
    paths = {}
    for label, compiled in (("numpy", False), ("compiled", True)):
        algo = keras_rigl.RigL(update_freq=1, end_step=10**9, seed=0, compiled=compiled)
        algo.attach(rigl_model, step=0)
        algo.update_masks(rigl_model, 1, rigl_model.optimizer)
        paths[label] = algo
    # the attach above switched the layers to the custom-loop trace; fit switches back

    times = {k: [] for k in ("dense fit", "masked fit", "rigl fit", "update numpy", "update compiled")}
    cpu = {k: [] for k in times}  # process CPU time (all threads): the work done, whatever the wall clock does
    progress(f"{name}: warm-up done")
    for r in range(args.rounds):
        order = list(times) if r % 2 == 0 else list(reversed(times))
        for variant in order:
            t0, c0 = time.perf_counter(), time.process_time()
            if variant == "dense fit":
                dense.fit(x, y, **fit)
            elif variant == "masked fit":
                masked.fit(x, y, **fit)
            elif variant == "rigl fit":
                rigl_model.fit(x, y, callbacks=[rigl(r)], **fit)
            else:
                algo = paths[variant.split()[1]]
                algo.update_masks(rigl_model, 1000 + r, rigl_model.optimizer)
                keras.ops.convert_to_numpy(rigl_model.weights[0])  # wait for the device
            times[variant].append(time.perf_counter() - t0)
            cpu[variant].append(time.process_time() - c0)
        progress(f"{name}: round {r + 1}/{args.rounds}: "
                 + ", ".join(f"{k} {v[-1]:.2f} s (cpu {cpu[k][-1]:.2f} s)" for k, v in times.items()))

    print(f"\n{name}: input {MODELS[name][0]}, batch {batch}, {args.steps} steps per fit, sparsity {args.sparsity} "
          f"(ERK), ΔT={args.update_freq}, {masked_entries(rigl_model):,} masked entries, {args.rounds} interleaved rounds")
    result = {"model": name, "dense_step_s": statistics.median(times["dense fit"]) / args.steps}
    # Wall time is what a user waits; process CPU time (all threads) is the work done, which a machine
    # that throttles its CPU (fits pinned at exactly 41.0 or 82.0 s were seen here) does not change.
    for clock, values in (("wall", times), ("cpu", cpu)):
        result[clock] = report_times(values, args.steps, f"{clock} time" if clock == "wall" else
                                     "process CPU time (all threads)")
    result.update(result["wall"])  # the wall-time figures at the top level, as before
    return result


def report_times(times, steps, label):
    """Print min / median of every variant: fits as ratios to the dense fit, updates in dense steps."""
    dense_min, dense_med = stats(times["dense fit"])
    step_med = dense_med / steps
    print(f"  {label}:")
    print(f"  {'variant':16s} {'min s':>9s} {'median s':>9s} {'min/dense':>10s} {'median/dense':>13s} {'in steps (med)':>15s}")
    result = {}
    for variant, ts in times.items():
        lo, med = stats(ts)
        if variant.endswith("fit"):
            print(f"  {variant:16s} {lo:9.4f} {med:9.4f} {lo / dense_min:10.3f} {med / dense_med:13.3f} {'':>15s}")
            result[variant] = {"min_ratio": lo / dense_min, "median_ratio": med / dense_med}
        else:
            print(f"  {variant:16s} {lo:9.4f} {med:9.4f} {'':>10s} {'':>13s} {med / step_med:15.2f}")
            result[variant] = {"min_s": lo, "median_s": med, "min_steps": lo / step_med, "median_steps": med / step_med}
    ratio = result["update numpy"]["median_s"] / result["update compiled"]["median_s"]
    print(f"  compiled update is {ratio:.1f}x the speed of the NumPy one (medians); dense step {step_med * 1e3:.2f} ms")
    return result


# ------------------------------------------------------------------ memory
def _proc_status_bytes(field):
    """A ``kB`` field of /proc/self/status (``VmHWM``, ``VmRSS``) in bytes; None where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes():
    """This process's peak resident set, in bytes.

    Linux's ``ru_maxrss`` survives fork + exec: a child started by this
    benchmark (which holds gigabytes after its timed fits) would report the
    parent's peak whatever it did. ``VmHWM`` is the high-water mark of the
    process's own address space, which exec replaces.
    """
    import resource

    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def resident_bytes():
    """This process's resident set now (VmRSS), in bytes; 0 where /proc is missing."""
    return _proc_status_bytes("VmRSS") or 0


PHASE_UPDATES = 3


def memory_phases_child(name, path, sparsity):
    """Runs in a fresh process: RSS after a fit without updates, then after each of PHASE_UPDATES updates.

    SET updates (random grow scores), so that ``update_masks`` can be called
    outside a training step; ``path`` is "compiled" or "numpy". Prints JSON.
    """
    x, y, batch = data(name, 8)
    keras.utils.set_random_seed(0)
    model = keras_rigl.sparsify(build(name), sparsity, seed=0)
    compile_model(model)
    algo = keras_rigl.SET(update_freq=10**6, end_step=10**9, seed=0, compiled=path == "compiled")
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False, callbacks=[algo])
    rows = [{"after": "fit", "rss": resident_bytes(), "peak": peak_rss_bytes()}]
    for i in range(PHASE_UPDATES):
        algo.update_masks(model, step=10**5 + i)
        rows.append({"after": f"update {i + 1}", "rss": resident_bytes(), "peak": peak_rss_bytes()})
    print("PHASES " + json.dumps(rows))


def _run_child(tag, what, *argv):
    """Run this file with ``argv`` in a fresh process; the JSON it prints after ``tag``, or None (said why)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, argv)], capture_output=True, text=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith(tag + " ")]
    if proc.returncode or not line:
        print(f"  {what}: failed\n{proc.stderr[-2000:]}")
        return None
    return json.loads(line[0][len(tag) + 1:])


def memory_phases(name, args):
    """Where an update's memory goes: RSS around the first and later updates, NumPy vs compiled (fresh processes)."""
    result = {}
    for path in ("numpy", "compiled"):
        rows = _run_child("PHASES", f"memory phases {path}", "--memory-phases-child", name, path, args.sparsity)
        if rows is not None:
            result[path] = rows
    print(f"  {name}: resident set around SET updates (VmRSS / VmHWM, MiB; a fit of 8 steps first, no update in it):")
    for path, rows in result.items():
        cells = ", ".join(f"{r['after']} {r['rss'] / 2**20:,.0f} / {r['peak'] / 2**20:,.0f}" for r in rows)
        print(f"    {path:9s} {cells}")
    return result


def memory_child(name, variant, steps, sparsity, update_freq):
    """Runs in a fresh process: one fit of ``steps`` steps, prints the peak memory as JSON."""
    import tensorflow as tf

    x, y, batch = data(name, steps)
    keras.utils.set_random_seed(0)
    gpu = bool(tf.config.list_physical_devices("GPU"))
    model = build(name)
    callbacks = []
    if variant != "dense":
        model = keras_rigl.sparsify(model, sparsity, seed=0)
        callbacks = [keras_rigl.RigL(update_freq=update_freq, end_step=10**9, compiled=variant == "rigl compiled")]
    compile_model(model)
    if gpu:
        tf.config.experimental.reset_memory_stats("GPU:0")
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False, callbacks=callbacks)
    if gpu:
        peak, kind = tf.config.experimental.get_memory_info("GPU:0")["peak"], "GPU allocator peak"
    else:
        peak, kind = peak_rss_bytes(), "process peak RSS (VmHWM)"
    weights = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.trainable_weights)
    print("MEMORY " + json.dumps({"peak": int(peak), "kind": kind, "weights_bytes": weights}))


def memory_model(name, args):
    steps = max(2, args.steps // 4)
    freq = max(1, steps // 2)
    rows = {}
    for variant in ("dense", "rigl numpy", "rigl compiled"):
        row = _run_child("MEMORY", f"memory {variant}", "--memory-child", name, variant, steps, args.sparsity, freq)
        if row is not None:
            rows[variant] = row
    if not rows:
        return {}
    kind = next(iter(rows.values()))["kind"]
    print(f"  peak memory ({kind}; {steps} steps, an update every {freq}):")
    base = rows.get("dense", {}).get("peak")
    for variant, row in rows.items():
        extra = f"  {row['peak'] / base:.2f}x dense, +{(row['peak'] - base) / 2**20:,.0f} MiB" if base else ""
        print(f"    {variant:14s} {row['peak'] / 2**20:10,.0f} MiB{extra}")
    if "dense" in rows:
        print(f"    (trainable weights of the dense model: {rows['dense']['weights_bytes'] / 2**20:,.0f} MiB)")
    return rows


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        name, variant, steps, sparsity, freq = sys.argv[2:7]
        return memory_child(name, variant, int(steps), float(sparsity), int(freq))
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--memory-phases-child":
        return memory_phases_child(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cnn,mobilenetv2,resnet50", help="comma-separated: " + ", ".join(MODELS))
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (>= 7 for figures you report)")
    p.add_argument("--steps", type=int, default=200, help="training steps per timed fit")
    p.add_argument("--update-freq", type=int, default=100, help="ΔT of the timed RigL fit")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure peak memory, one fresh process per variant")
    p.add_argument("--memory-phases", action="store_true",
                   help="also the resident set after a fit and after each of 3 updates (NumPy vs compiled)")
    p.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True,
                   help="the timed rounds (--no-timing: peak memory only)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        p.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    if not (args.timing or args.memory or args.memory_phases):
        p.error("--no-timing --no-memory measures nothing (add --memory-phases, or drop one of them)")
    if args.rounds < 1 or args.steps < 1 or args.update_freq < 1:
        p.error("--rounds, --steps and --update-freq must be >= 1")
    if not 0.0 < args.sparsity < 1.0:
        p.error("--sparsity must be in (0, 1)")
    import tensorflow as tf

    print(f"devices: {[d.name for d in tf.config.list_logical_devices()]}; keras {keras.__version__}, tf {tf.__version__}")
    results = []
    for name in names:
        result = time_model(name, args) if args.timing else {"model": name}
        keras.backend.clear_session()
        if args.memory:
            result["memory"] = memory_model(name, args)
        if args.memory_phases:
            result["memory_phases"] = memory_phases(name, args)
        results.append(result)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.json)
    return results


if __name__ == "__main__":
    main()
