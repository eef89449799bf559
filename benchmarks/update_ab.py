#!/usr/bin/env python
"""A change to the compiled mask update against an earlier revision's, in one process: same masks, which is faster.

Loads ``keras_rigl/compiled_update.py`` as it was at ``--against`` (a git
revision of this repository) beside the working tree's, builds one sparse
model (update_scale.py's models: small CNN, MobileNetV2 at 96 px, ResNet50 at
64 px; 90% ERK, SGD with momentum, a captured dense gradient from 2 steps),
and then:

* checks that both produce the same masks, weights and optimizer slots from
  the same state and seeds (exit 1 where they differ: a faster update that
  changes the result is not an optimization);
* times one update of every masked weight through each, interleaved (the
  order reverses every round), ``--rounds`` rounds, wall and process CPU time,
  min and median, and prints working tree / ``--against`` as ratios.

Both run in the same process on the same weights, so the host's speed on the
day (this machine's wall clock is quantized and its CPU throttled: separate
runs of update_scale.py differ by more than most changes) hits both alike.

    python benchmarks/update_ab.py --against HEAD --model resnet50      # ~4 min on 2 cores
    python benchmarks/update_ab.py --against HEAD~3 --model cnn --rounds 7
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_rigl  # noqa: E402
from keras_rigl import compiled_update, optimizer_state, updates  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import update_scale  # noqa: E402  (its models, data and compile settings)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE = "keras_rigl/compiled_update.py"


def load_revision(rev):
    """``keras_rigl.compiled_update`` as of git revision ``rev``, as a module of the keras_rigl package."""
    shown = subprocess.run(["git", "-C", REPO, "show", f"{rev}:{MODULE}"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"update_ab.py: git has no {MODULE} at --against {rev!r} ({shown.stderr.strip()}); "
                         "give a revision of this repository that has it, e.g. HEAD or HEAD~1.")
    folder = tempfile.mkdtemp(prefix="update_ab_")
    path = os.path.join(folder, "compiled_update_against.py")
    with open(path, "w") as f:
        f.write(shown.stdout)
    spec = importlib.util.spec_from_file_location("keras_rigl._compiled_update_against", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sparse_model(name, sparsity):
    keras.utils.set_random_seed(0)
    model = update_scale.compile_model(keras_rigl.sparsify(update_scale.build(name), sparsity, seed=0))
    layers = keras_rigl.masked_layers(model)
    for layer in layers:
        layer.set_capture_mode(1)  # every step keeps the dense gradient, which the updates read
    x, y, batch = update_scale.data(name, 2)
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
    return model, [mw for layer in layers for mw in layer.masked_weights]


def state(model, weights):
    """Every variable an update writes: masks, weights, optimizer slots (NumPy copies)."""
    variables = [v for mw in weights for v in
                 [mw.mask, mw.weight] + [s for s, _ in optimizer_state.slot_variables(model.optimizer, mw.weight)]]
    return variables, [keras.ops.convert_to_numpy(v) for v in variables]


def same_result(model, weights, updates_by_name, fraction, seeds):
    """Run each update from the same state; the names of the variables where they differ (empty: none)."""
    variables, start = state(model, weights)
    results = {}
    for name, update in updates_by_name.items():
        for v, value in zip(variables, start):
            v.assign(value)
        update(fraction, seeds)
        results[name] = state(model, weights)[1]
    first, *others = results.values()
    differ = [v.path for other in others for v, a, b in zip(variables, first, other) if not np.array_equal(a, b)]
    for v, value in zip(variables, start):
        v.assign(value)
    return differ


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--against", default="HEAD", help="git revision whose compiled_update.py is the baseline")
    p.add_argument("--model", default="resnet50", choices=sorted(update_scale.MODELS))
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (>= 7 for a figure to quote)")
    p.add_argument("--fraction", type=float, default=0.3, help="drop fraction of every timed update")
    p.add_argument("--sparsity", type=float, default=0.9)
    args = p.parse_args(argv)
    if args.rounds < 1 or not 0 < args.fraction <= 1 or not 0 < args.sparsity < 1:
        p.error("--rounds must be >= 1, --fraction in (0, 1], --sparsity in (0, 1)")

    against = load_revision(args.against)
    model, weights = sparse_model(args.model, args.sparsity)
    candidates = {
        "working tree": compiled_update.CompiledUpdate(weights, grow_by="gradient", optimizer=model.optimizer),
        args.against: against.CompiledUpdate(weights, grow_by="gradient", optimizer=model.optimizer),
    }
    seeds = lambda r: [updates.update_seed(r, 100, i + 1) for i in range(len(weights))]  # noqa: E731
    differ = same_result(model, weights, candidates, args.fraction, seeds(0))
    entries = sum(int(np.prod(mw.mask.shape)) for mw in weights)
    print(f"{args.model}: {len(weights)} masked weights, {entries:,} entries, drop fraction {args.fraction:g}; "
          f"working tree against {args.against}")
    if differ:
        print(f"  DIFFERENT results from the same state and seeds in {len(differ)} variables, e.g. {differ[:3]}")
        return 1
    print("  same masks, weights and optimizer slots from the same state and seeds")
    for update in candidates.values():  # warm-up: traced and compiled
        update(args.fraction, seeds(1))
    wall = {name: [] for name in candidates}
    cpu = {name: [] for name in candidates}
    for r in range(args.rounds):
        order = list(candidates) if r % 2 == 0 else list(reversed(list(candidates)))
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            candidates[name](args.fraction, seeds(r + 2))
            keras.ops.convert_to_numpy(weights[0].mask)  # wait for the device
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    result = {}
    for clock, times in (("wall", wall), ("cpu", cpu)):
        (new, old) = (times["working tree"], times[args.against])
        result[clock] = {"min_ratio": min(new) / min(old), "median_ratio": statistics.median(new) / statistics.median(old)}
        print(f"  {clock:4s} time, {args.rounds} rounds: working tree min {min(new):.4f} s median "
              f"{statistics.median(new):.4f} s; {args.against} min {min(old):.4f} s median "
              f"{statistics.median(old):.4f} s; ratio min {result[clock]['min_ratio']:.3f} "
              f"median {result[clock]['median_ratio']:.3f}")
    return result


if __name__ == "__main__":
    out = main()
    sys.exit(out if isinstance(out, int) else 0)
