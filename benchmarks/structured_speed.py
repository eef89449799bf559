#!/usr/bin/env python
"""Structured sparsity on x86: sparse vs dense TFLite time for each structure, batch 1, 1 thread.

    python benchmarks/structured_speed.py                      # everything (slow: run on a quiet machine)
    python benchmarks/structured_speed.py --quick              # LeNet only, 90 %, short timing: does it work?
    python benchmarks/structured_speed.py --models lenet --structures 1x4 1x16-int8 --sparsities 0.9

For every model (LeNet-300-100, the example CNN of scripts/rigl_harness/zoo.py,
MobileNet v1/v2 at alpha 0.5, 96 px, weights=None), structure and sparsity it

1. sparsifies the model (ERK layer densities) and sets masks of the structure,
   made here with small local functions (random masks, the same for every
   structure's rounding; ``sparsify(..., structure="1x16")`` now takes LeNet's
   300- and 100-input layers too, with a shorter last block, but the timed
   masks stay these, so the figures in docs/sparse_speed.md keep their
   meaning); a partial last block is fine for the export (``export_tflite``
   pads such int8 layers to whole blocks);
2. exports the *same* masked weights twice with ``keras_rigl.export_tflite``:
   dense (``sparse=False``) and sparse, in the structure's quantization mode,
   plus the dense float32 file for int8 structures (the "vs fp32" column compares
   every sparse file with the faster of dense float32 with and without XNNPACK:
   what a user runs today);
3. checks both files against Keras (``tflite_parity``: agreement of the argmax
   and the largest absolute difference) and says which Dense layers TFLite runs on
   a sparse kernel (read back from the file: ``block_sparse_layers``);
4. times dense and sparse interleaved (every repeat runs both, alternating the
   order) with XNNPACK on and off, ``--repeats`` (>= 7) repeats of a fixed
   number of invokes each, and prints min and median sparse/dense ratios.

Structures: ``unstructured`` (random masks, float), ``1x4`` (blocks of 4
consecutive inputs of one output unit, float: TFLite's float sparse FC kernel),
``1x16-int8`` (1x16 blocks, full int8: the int8 sparse FC kernel),
``1x16-dynamic`` (1x16 blocks, dynamic-range int8 weights: the sparse hybrid FC
kernel, which XNNPACK misreads, so its "XNNPACK on" row runs without it),
``2:4`` (2 of every 4 consecutive inputs: fixed 50 % sparsity, no TFLite
kernel), ``fan_in`` (same number of active inputs per output unit; the "condensed"
column times Keras ``predict_on_batch`` of ``keras_rigl.condense(sparse)``
against the dense model, with ``--ablate`` of the hidden units off: without
training no unit is ablated and condense has nothing to remove).

Convolutions get masks of the same structure along the input-channel axis;
TFLite has no sparse convolution kernel (on x86 with AVX XNNPACK's sparse path
is off), so only Dense layers can get faster here. Timing numbers mean
something only on a quiet machine.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import numpy as np  # noqa: E402

MODELS = ("lenet", "cnn", "mobilenet_v1", "mobilenet_v2")
STRUCTURES = ("unstructured", "1x4", "1x16-int8", "1x16-dynamic", "2:4", "fan_in")
DEFAULT_STRUCTURES = ("unstructured", "1x4", "1x16-int8", "2:4", "fan_in")
SPARSITIES = (0.8, 0.9, 0.95)
# structure -> (block along the input axis, export quantize mode)
_EXPORT = {"unstructured": (1, None), "1x4": (4, None), "1x16-int8": (16, "int8"), "1x16-dynamic": (16, "dynamic"),
           "2:4": (1, None), "fan_in": (1, None)}
NM_SPARSITY = 0.5  # 2:4 keeps 2 of 4: its sparsity is fixed


# ------------------------------------------------------------------ masks ---
def block_mask(shape, k, density, rng):
    """Random mask of 1xk blocks (k consecutive inputs of one output), ``round(density * blocks)`` on.

    ``shape`` is a Keras kernel ``(..., inputs, outputs)``; a last group shorter
    than k (inputs not a multiple of k) is one block.
    """
    *lead, n_in, n_out = shape
    grid = (math.prod(lead), -(-n_in // k), n_out)
    on = np.zeros(math.prod(grid), bool)
    on[rng.permutation(on.size)[:int(round(density * on.size))]] = True
    return np.repeat(on.reshape(grid), k, axis=1)[:, :n_in].reshape(shape)


def n_of_m_mask(shape, n, m, rng):
    """``n`` active in every group of ``m`` consecutive inputs of each output (a last short group keeps min(n, len))."""
    *lead, n_in, n_out = shape
    flat = np.zeros((math.prod(lead), n_in, n_out), bool)
    for start in range(0, n_in, m):
        size = min(m, n_in - start)
        scores = rng.random((flat.shape[0], size, n_out))
        keep = np.argsort(-scores, axis=1)[:, :min(n, size)]
        group = np.zeros_like(scores, dtype=bool)
        np.put_along_axis(group, keep, True, axis=1)
        flat[:, start:start + size] = group
    return flat.reshape(shape)


def fan_in_mask(shape, density, rng):
    """Every output unit gets the same number ``max(1, round(density * fan_in))`` of active inputs."""
    fan_in = math.prod(shape[:-1])
    keep = max(1, int(round(density * fan_in)))
    scores = rng.random((fan_in, shape[-1]))
    order = np.argsort(-scores, axis=0)[:keep]
    mask = np.zeros((fan_in, shape[-1]), bool)
    np.put_along_axis(mask, order, True, axis=0)
    return mask.reshape(shape)


def structure_mask(structure, shape, density, rng):
    if structure == "unstructured":
        mask = np.zeros(math.prod(shape), bool)
        mask[rng.permutation(mask.size)[:int(round(density * mask.size))]] = True
        return mask.reshape(shape)
    if structure == "2:4":
        return n_of_m_mask(shape, 2, 4, rng)
    if structure == "fan_in":
        return fan_in_mask(shape, density, rng)
    return block_mask(shape, _EXPORT[structure][0], density, rng)


def sparse_model(model, structure, sparsity, seed=0, ablate=0.0):
    """``model`` wrapped in Masked layers with masks of ``structure`` at ERK densities (2:4: its own 50 %).

    ``ablate`` (fan_in only): that fraction of the output units of every masked
    layer but the last loses all its inputs, as SRigL's neuron ablation leaves
    them (training would move their budget to the other units; here they are
    simply off), so that ``condense`` has units to remove.
    """
    import keras_rigl

    sparse = keras_rigl.sparsify(model, 0.0)  # Masked wrappers, all-ones masks, the dense weights kept
    layers = keras_rigl.masked_layers(sparse)
    shapes = {f"{layer.name}/{mw.name}": tuple(mw.mask.shape) for layer in layers for mw in layer.masked_weights}
    if structure == "2:4":
        densities = {name: 1.0 - NM_SPARSITY for name in shapes}
    else:
        densities = keras_rigl.layer_densities(shapes, sparsity, "erk")
    rng = np.random.default_rng(seed)
    for layer in layers:
        masks = {}
        for mw in layer.masked_weights:
            shape = tuple(mw.mask.shape)
            density = densities[f"{layer.name}/{mw.name}"]
            mask = np.ones(shape, bool) if density >= 1.0 else structure_mask(structure, shape, density, rng)
            if structure == "fan_in" and ablate > 0 and layer is not layers[-1] and len(shape) >= 2:
                mask[..., rng.permutation(shape[-1])[:int(ablate * shape[-1])]] = False
            masks[mw.name] = mask
        layer.set_masks(masks)
    return sparse


# ----------------------------------------------------------------- models ---
def build_model(name, seed=0):
    import keras

    from rigl_harness import zoo

    keras.utils.set_random_seed(seed)
    if name == "lenet":
        return zoo.build_model("mlp", (28, 28, 1), 10)
    if name == "cnn":
        return zoo.build_model("cnn", (28, 28, 1), 10)
    app = {"mobilenet_v1": keras.applications.MobileNet, "mobilenet_v2": keras.applications.MobileNetV2}[name]
    return app(weights=None, input_shape=(96, 96, 3), alpha=0.5, classes=1000, classifier_activation=None)


def input_batch(model, n, seed=0):
    shape = tuple(int(s) for s in model.inputs[0].shape[1:])
    return np.random.default_rng(seed + 1).random((n,) + shape, dtype=np.float32)


# ----------------------------------------------------------------- timing ---
def _runner(path, xnnpack):
    from keras_rigl.tflite import TFLiteRunner

    with warnings.catch_warnings():  # a refused or unsafe delegate is reported in the table
        warnings.simplefilter("ignore", RuntimeWarning)
        runner = TFLiteRunner(path, num_threads=1, use_xnnpack=xnnpack)
        return runner


def time_pair(paths, x1, xnnpack, repeats, invokes, warmup=3):
    """Interleaved per-invoke times (ms) of several files: ``{name: [one value per repeat]}`` plus runners."""
    runners = {}
    for name, path in paths.items():
        runner = _runner(path, xnnpack)
        runner.warmup(x1)
        runner.set_inputs([x1])
        for _ in range(warmup):
            runner.invoke()
        runners[name] = runner
    times = {name: [] for name in paths}
    names = list(paths)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            invoke = runners[name].invoke
            t0 = time.perf_counter()
            for _ in range(invokes):
                invoke()
            times[name].append(1e3 * (time.perf_counter() - t0) / invokes)
    return times, runners


# -------------------------------------------------------------------- run ---
def run_case(model_name, structure, sparsity, args, workdir, log=print):
    import keras_rigl
    from keras_rigl.tflite.structured import block_sparse_layers

    block, quantize = _EXPORT[structure]
    model = build_model(model_name, args.seed)
    sparse = sparse_model(model, structure, sparsity, args.seed, ablate=args.ablate)
    x = input_batch(model, args.parity_samples, args.seed)
    tag = f"{model_name}_{structure.replace(':', 'of')}_{sparsity:g}"
    paths, reports = {}, {}
    kinds = [("dense", quantize, False), ("sparse", quantize, True)]
    if quantize is not None:  # the dense float32 file: what the user would run without this export
        kinds.append(("dense_float", None, False))
    for kind, q, sparse_storage in kinds:
        path = os.path.join(workdir, f"{tag}_{kind}.tflite")
        reports[kind] = keras_rigl.export_tflite(sparse, path, quantize=q, sparse=sparse_storage,
                                                 representative_data=x if q == "int8" else None)
        paths[kind] = path
    layers = block_sparse_layers(sparse, paths["sparse"], quantize=quantize)
    on_kernel = layers[layers["file_block"] != ""] if len(layers) else layers
    parity = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for kind, path in paths.items():
            parity[kind] = keras_rigl.tflite_parity(sparse, path, x)
    condensed = condensed_vs_dense(model, sparse, structure, x[:1], args)
    timed = {}
    for xnnpack in (True, False):
        timed[xnnpack] = time_pair(paths, x[:1], xnnpack, args.repeats, args.invokes)
    float_key = "dense_float" if "dense_float" in paths else "dense"
    best_float = min(statistics.median(timed[xnnpack][0][float_key]) for xnnpack in (True, False))
    rows = []
    for xnnpack in (True, False):
        times, runners = timed[xnnpack]
        dense_med, dense_min = statistics.median(times["dense"]), min(times["dense"])
        sparse_med, sparse_min = statistics.median(times["sparse"]), min(times["sparse"])
        row = {
            "model": model_name, "structure": structure, "quantize": quantize or "float32",
            "sparsity": NM_SPARSITY if structure == "2:4" else sparsity, "xnnpack": "on" if xnnpack else "off",
            "xnnpack_used_sparse": runners["sparse"].use_xnnpack,
            "dense_median_ms": dense_med, "dense_min_ms": dense_min,
            "sparse_median_ms": sparse_med, "sparse_min_ms": sparse_min,
            "ratio_median": sparse_med / dense_med, "ratio_min": sparse_min / dense_min,
            "ratio_vs_best_fp32": sparse_med / best_float,
            "sparse_fc_layers": f"{len(on_kernel)}/{len(layers)}",
            "agreement": parity["sparse"]["agreement"], "max_abs_diff": parity["sparse"]["max_abs_diff"],
            "dense_max_abs_diff": parity["dense"]["max_abs_diff"],
            "condensed_vs_dense": condensed,
            "note": (runners["sparse"].delegate_error or "")[:80],
        }
        rows.append(row)
    if args.verbose:
        log(layers.to_string(index=False))
    return rows


def condensed_vs_dense(model, sparse, structure, x1, args):
    """"ratio (params after/before)" of Keras predict_on_batch time, condensed vs dense; fan_in only."""
    if structure != "fan_in":
        return "n/a: fan_in only"
    if not _condense_available():
        return "n/a: condense not available"
    import keras_rigl

    small = keras_rigl.condense(sparse)
    runs = {"dense": lambda: model.predict_on_batch(x1), "condensed": lambda: small.predict_on_batch(x1)}
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for r in range(args.repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            t0 = time.perf_counter()
            for _ in range(max(1, args.invokes // 10)):
                runs[name]()
            times[name].append(time.perf_counter() - t0)
    ratio = statistics.median(times["condensed"]) / statistics.median(times["dense"])
    return f"{ratio:.2f} (params {small.count_params():,}/{model.count_params():,})"


def _condense_available():
    import keras_rigl

    return hasattr(keras_rigl, "condense")


def format_rows(rows):
    head = (f"{'model':<13}{'structure':<14}{'quant':<9}{'sparsity':>8} {'XNNPACK':<8}{'dense med ms':>13}"
            f"{'sparse med ms':>14}{'ratio med':>10}{'ratio min':>10}{'vs fp32':>10} {'sparse FC':>9}"
            f"{'agree':>7}{'max|diff|':>10}  condensed")
    lines = [head]
    for r in rows:
        vs_float = f"{r['ratio_vs_best_fp32']:.2f}"
        xnn = r["xnnpack"] + ("" if r["xnnpack"] == "off" or r["xnnpack_used_sparse"] else "*")
        lines.append(f"{r['model']:<13}{r['structure']:<14}{r['quantize']:<9}{r['sparsity']:>8.2f} {xnn:<8}"
                     f"{r['dense_median_ms']:>13.4f}{r['sparse_median_ms']:>14.4f}{r['ratio_median']:>10.2f}"
                     f"{r['ratio_min']:>10.2f}{vs_float:>10} {r['sparse_fc_layers']:>9}{r['agreement']:>7.2f}"
                     f"{r['max_abs_diff']:>10.2g}  {r['condensed_vs_dense']}")
    lines.append("ratio = sparse / dense time of the same weights in the same quantization (median and min over "
                 "repeats); vs fp32 = sparse median / the faster (XNNPACK on or off) dense float32 median; sparse FC = Dense "
                 "layers run on a TFLite sparse kernel / masked Dense layers; on* = XNNPACK asked for but the "
                 "sparse file ran without it (delegate refused or misreads it).")
    return "\n".join(lines)


def _write_csv(rows, path):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".structured_speed.", suffix=".csv", dir=directory)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sparse vs dense TFLite time per sparsity structure (batch 1, 1 thread).")
    p.add_argument("--models", nargs="+", default=None, help=f"any of {', '.join(MODELS)} (default: all)")
    p.add_argument("--structures", nargs="+", default=None,
                   help=f"any of {', '.join(STRUCTURES)} (default: {' '.join(DEFAULT_STRUCTURES)})")
    p.add_argument("--sparsities", nargs="+", type=float, default=None, help="default 0.8 0.9 0.95")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats, >= 7 (default 15; --quick 7)")
    p.add_argument("--invokes", type=int, default=None, help="invokes per repeat (default 200; --quick 5)")
    p.add_argument("--quick", action="store_true", help="LeNet, 1x4 and 1x16-int8, 90 %%, short timing (a smoke run)")
    p.add_argument("--ablate", type=float, default=0.0,
                   help="fan_in: fraction of hidden units switched off (as neuron ablation leaves them), so "
                        "condense has units to remove (default 0)")
    p.add_argument("--parity-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the .tflite files go (default: a temporary directory)")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    p.add_argument("--verbose", action="store_true", help="print the per-layer block-sparse table of every case")
    args = p.parse_args(argv)
    if args.quick:
        args.models = args.models or ["lenet"]
        args.structures = args.structures or ["1x4", "1x16-int8"]
        args.sparsities = args.sparsities or [0.9]
        args.repeats = args.repeats or 7
        args.invokes = args.invokes or 5
    args.models = args.models or list(MODELS)
    args.structures = args.structures or list(DEFAULT_STRUCTURES)
    args.sparsities = args.sparsities or list(SPARSITIES)
    args.repeats = 15 if args.repeats is None else args.repeats
    args.invokes = 200 if args.invokes is None else args.invokes
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"unknown --models {bad}; choose from {', '.join(MODELS)}")
    bad = [s for s in args.structures if s not in STRUCTURES]
    if bad:
        p.error(f"unknown --structures {bad}; choose from {', '.join(STRUCTURES)}")
    if any(not 0.0 < s < 1.0 for s in args.sparsities):
        p.error("--sparsities must be in (0, 1), e.g. 0.8 0.9 0.95")
    if not 0.0 <= args.ablate < 1.0:
        p.error("--ablate must be in [0, 1)")
    if args.repeats < 7:
        p.error("--repeats must be >= 7 (min and median need that many interleaved repeats)")
    if args.invokes < 1 or args.parity_samples < 1:
        p.error("--invokes and --parity-samples must be >= 1")
    if args.workdir is not None and not os.path.isdir(args.workdir):
        p.error(f"--workdir {args.workdir!r} does not exist; create it first")
    return args


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tflite_latency import cpu_info

    from keras_rigl.tflite.runtime import interpreter_backend

    cpu = cpu_info()
    print(f"CPU: {cpu['model'] or '?'} | arch {cpu['machine']} | AVX {'yes' if cpu['avx'] else 'no'} | "
          f"interpreter {interpreter_backend()} | batch 1, 1 thread, {args.repeats} interleaved repeats x "
          f"{args.invokes} invokes")
    if not _condense_available():
        print("condensed Keras predict vs dense: n/a: condense not available (keras_rigl.condense)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="structured_speed_") as tmp:
        workdir = args.workdir or tmp
        for model_name in args.models:
            for structure in args.structures:
                sparsities = [NM_SPARSITY] if structure == "2:4" else args.sparsities
                for sparsity in sparsities:
                    rows.extend(run_case(model_name, structure, sparsity, args, workdir))
                    print(format_rows(rows[-2:]).splitlines()[1:3][0])
                    print(format_rows(rows[-2:]).splitlines()[2])
    print()
    print(format_rows(rows))
    if args.csv:
        _write_csv(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
