#!/usr/bin/env python
"""Structured sparsity on x86: sparse vs dense TFLite time for each structure, batch 1, 1 thread.

    python benchmarks/structured_speed.py                      # everything (slow: run on a quiet machine)
    python benchmarks/structured_speed.py --quick              # LeNet only, 90 %, short timing: does it work?
    python benchmarks/structured_speed.py --models lenet --structures 1x4 1x16-int8 --sparsities 0.9
    python benchmarks/structured_speed.py --models cnn --structures fan_in --unit-sparsity 0.5

For every model (LeNet-300-100, the example CNN of scripts/rigl_harness/zoo.py,
MobileNet v1/v2 at alpha 0.5, 96 px, weights=None), structure and sparsity it

1. sparsifies the model (ERK layer densities) and sets masks of the structure.
   All structures but ``fan_in`` get masks made here with small local functions
   (random masks, the same for every structure's rounding; ``sparsify(...,
   structure="1x16")`` now takes LeNet's 300- and 100-input layers too, with a
   shorter last block, but the timed masks stay these, so the figures in
   docs/sparse_speed.md keep their meaning); a partial last block is fine for the
   export (``export_tflite`` pads such int8 layers to whole blocks). ``fan_in``
   gets the library's own masks, what a user has at the end of training with
   ``fan_in(unit_sparsity=U)``: ``keras_rigl.sparsify(model, sparsity,
   structure=keras_rigl.FanIn(unit_sparsity=U), seed=seed)`` (``--unit-sparsity``,
   default 0.5; 0 gives plain ``fan_in``) and one mask update through the public
   path outside a training plan, ``keras_rigl.SET(drop_fraction=0.3,
   seed=seed).update_masks(sparse, step=1)``: outside a plan the unit target is
   reached at once, so every hidden layer has ``units_to_ablate(U, None, units)``
   units ablated, or as many as its budget allows (a layer whose living units would
   need more than their dense fan-in keeps more, e.g. a dense first conv), and the
   output layer none (SRigL's threshold, on by default, could ablate more; on these
   untrained models at 80-95 % it ablates none beyond the target);
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

``fan_in`` also measures what ``condense`` gives (the columns right of ``|``;
empty for the other structures): ``small = keras_rigl.condense(sparse)`` is
exported as a plain dense float32 file (``export_tflite(small, path,
sparse=False)``), checked against the stripped sparse Keras model
(``tflite_parity``: argmax agreement and max |diff|, also relative to the
largest |output|; a mismatch is printed loudly, flagged in the row and makes the
script exit 1), and timed in the same interleaved repeats as the dense float32
file of the masked weights (batch 1, 1 thread, XNNPACK on and off: condensed /
dense median and min). Keras ``predict_on_batch`` of ``small`` and of the dense
model is timed at ``--predict-batch`` (default 256, after a warm-up; interleaved,
``--repeats`` repeats of ``--predict-calls`` calls, TensorFlow's default
threads). The row also holds the parameter counts after/before and the units
kept / total of every layer that lost units or holds ablated ones (condense's
report; ``*``: ablated units kept, ``condensed_kept_why`` says why: in
MobileNetV2 the projections read by a residual Add keep theirs).

Structures: ``unstructured`` (random masks, float), ``1x4`` (blocks of 4
consecutive inputs of one output unit, float: TFLite's float sparse FC kernel),
``1x16-int8`` (1x16 blocks, full int8: the int8 sparse FC kernel),
``1x16-dynamic`` (1x16 blocks, dynamic-range int8 weights: the sparse hybrid FC
kernel, which XNNPACK misreads, so its "XNNPACK on" row runs without it),
``2:4`` (2 of every 4 consecutive inputs: fixed 50 % sparsity, no TFLite
kernel), ``fan_in`` (same number of active inputs per output unit, with
``unit_sparsity`` ablation, then ``condense``: see above).

Convolutions get masks of the same structure along the input-channel axis;
TFLite has no sparse convolution kernel (on x86 with AVX XNNPACK's sparse path
is off), so only Dense layers can get faster here, and CNNs only through
``condense`` (fewer channels). The weights are untrained (random init): the
MobileNets' sparse logits are tiny, hence the relative difference. Timing
numbers mean something only on a quiet machine.
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


def structure_mask(structure, shape, density, rng):
    if structure == "unstructured":
        mask = np.zeros(math.prod(shape), bool)
        mask[rng.permutation(mask.size)[:int(round(density * mask.size))]] = True
        return mask.reshape(shape)
    if structure == "2:4":
        return n_of_m_mask(shape, 2, 4, rng)
    return block_mask(shape, _EXPORT[structure][0], density, rng)


def sparse_model(model, structure, sparsity, seed=0, unit_sparsity=0.5):
    """``model`` wrapped in Masked layers with masks of ``structure`` at ERK densities (2:4: its own 50 %).

    ``fan_in``: the library's own masks, :func:`fan_in_model`; the other structures get the random masks of
    :func:`structure_mask`.
    """
    import keras_rigl

    if structure == "fan_in":
        return fan_in_model(model, sparsity, unit_sparsity, seed)
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
            masks[mw.name] = np.ones(shape, bool) if density >= 1.0 else structure_mask(structure, shape, density, rng)
        layer.set_masks(masks)
    return sparse


def fan_in_model(model, sparsity, unit_sparsity, seed=0):
    """What a user gets from ``fan_in(unit_sparsity=U)`` at the end of training, without the training.

    ``keras_rigl.sparsify(model, sparsity, structure=FanIn(unit_sparsity=U))`` (ERK, constant fan-in per
    output unit), then one mask update through the public path outside a training plan
    (``SET(...).update_masks(sparse, step=1)``: no fit, no callback attached). Outside a plan the update's
    progress is None, so the unit target (:func:`keras_rigl.fan_in.units_to_ablate`) is reached at once, as
    at the last update of a plan: every hidden layer ablates ``round(U * units)`` units, or as many as its
    budget allows (the living units must fit their dense fan-in), never the model's output layer.
    """
    import keras_rigl

    structure = keras_rigl.FanIn(unit_sparsity=unit_sparsity)
    sparse = keras_rigl.sparsify(model, sparsity, structure=structure, seed=seed)
    keras_rigl.SET(drop_fraction=0.3, seed=seed).update_masks(sparse, step=1)
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
UNITS_WIDTH = 100  # the printed table's units-kept column (the CSV and the per-case lines have all)
CONDENSED_TOLERANCE = 1e-4  # max |diff| (absolute, or relative to the largest |output|) of a float32 file
CONDENSED_COLUMNS = ("unit_sparsity", "condensed_median_ms", "condensed_min_ms", "condensed_ratio_median",
                     "condensed_ratio_min", "xnnpack_used_condensed", "predict_batch", "predict_dense_median_ms",
                     "predict_condensed_median_ms", "predict_ratio_median", "predict_ratio_min",
                     "condensed_agreement", "condensed_max_abs_diff", "condensed_rel_diff", "condensed_mismatch",
                     "params_before", "params_after", "units_kept", "condensed_kept_why")


def run_case(model_name, structure, sparsity, args, workdir, log=print):
    import keras_rigl
    from keras_rigl.tflite.structured import block_sparse_layers

    block, quantize = _EXPORT[structure]
    model = build_model(model_name, args.seed)
    sparse = sparse_model(model, structure, sparsity, args.seed, unit_sparsity=args.unit_sparsity)
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
    condensed = None
    if structure == "fan_in":
        condensed = condense_case(model, sparse, x, args, workdir, tag, log)
        paths_timed = dict(paths, condensed=condensed.pop("path"))  # timed interleaved with dense and sparse
    else:
        paths_timed = paths
    timed = {}
    for xnnpack in (True, False):
        timed[xnnpack] = time_pair(paths_timed, x[:1], xnnpack, args.repeats, args.invokes)
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
        }
        row.update({column: None for column in CONDENSED_COLUMNS})
        row["units_kept"] = "n/a"
        note = runners["sparse"].delegate_error or ""
        if condensed is not None:
            cond_med, cond_min = statistics.median(times["condensed"]), min(times["condensed"])
            row.update(condensed)
            row.update({
                "condensed_median_ms": cond_med, "condensed_min_ms": cond_min,
                "condensed_ratio_median": cond_med / dense_med, "condensed_ratio_min": cond_min / dense_min,
                "xnnpack_used_condensed": runners["condensed"].use_xnnpack,
            })
            if condensed["condensed_mismatch"]:
                note = "CONDENSED MISMATCH; " + note
        row["note"] = note[:80]
        rows.append(row)
    if args.verbose:
        log(layers.to_string(index=False))
    return rows


def condense_case(model, sparse, x, args, workdir, tag, log=print):
    """``keras_rigl.condense(sparse)``: exported as a plain float32 file, checked, Keras predict timed.

    Returns the row's condensed columns (all but the TFLite times) and ``"path"``: the condensed file, timed
    by the caller interleaved with the dense file of the same masked weights. The file is checked against
    the stripped sparse model (``tflite_parity``: argmax agreement and max |diff|, also relative to the
    largest |output|: the untrained sparse MobileNets' logits are tiny); a mismatch is printed loudly and
    flagged in the row (``condensed_mismatch``, ``note``). Keras ``predict_on_batch`` of the condensed model
    and of the dense ``model`` are timed at ``--predict-batch``, interleaved.
    """
    import keras_rigl

    small, report = keras_rigl.condense(sparse, return_report=True)
    path = os.path.join(workdir, f"{tag}_condensed.tflite")
    keras_rigl.export_tflite(small, path, sparse=False)  # plain dense float32
    stripped = keras_rigl.strip(sparse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        parity = keras_rigl.tflite_parity(stripped, path, x)
    scale = float(np.max(np.abs(stripped.predict(x, verbose=0))))
    diff = parity["max_abs_diff"]
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    mismatch = parity["agreement"] < 1.0 or (diff > CONDENSED_TOLERANCE and rel > CONDENSED_TOLERANCE)
    if mismatch:
        message = (f"!!! CONDENSED MISMATCH {tag}: the condensed file disagrees with the stripped sparse model "
                   f"(argmax agreement {parity['agreement']:.3f}, max |diff| {diff:.3g}, relative {rel:.3g})")
        log(message)
        print(message, file=sys.stderr)
    xb = input_batch(model, args.predict_batch, args.seed + 2)
    predict = predict_times({"dense": model, "condensed": small}, xb, args.repeats, args.predict_calls)
    units, why = units_kept(sparse, stripped, report)
    return {
        "path": path, "unit_sparsity": args.unit_sparsity, "predict_batch": args.predict_batch,
        "predict_dense_median_ms": statistics.median(predict["dense"]),
        "predict_condensed_median_ms": statistics.median(predict["condensed"]),
        "predict_ratio_median": statistics.median(predict["condensed"]) / statistics.median(predict["dense"]),
        "predict_ratio_min": min(predict["condensed"]) / min(predict["dense"]),
        "condensed_agreement": parity["agreement"], "condensed_max_abs_diff": diff, "condensed_rel_diff": rel,
        "condensed_mismatch": bool(mismatch),
        "params_before": report.params_before, "params_after": report.params_after,
        "units_kept": units, "condensed_kept_why": why,
    }


def predict_times(models, xb, repeats, calls):
    """Interleaved Keras ``predict_on_batch`` times (ms per call) of several models on one batch."""
    runs = {name: (lambda m=m: m.predict_on_batch(xb)) for name, m in models.items()}
    for run in runs.values():  # warm-up: builds the compiled predict function, then one more call
        run()
        run()
    times = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            run = runs[name]
            t0 = time.perf_counter()
            for _ in range(calls):
                run()
            times[name].append(1e3 * (time.perf_counter() - t0) / calls)
    return times


def units_kept(sparse, stripped, report):
    """``"conv2 16/32, conv3 32/64*"``: units kept / total of every layer that lost units or holds ablated ones.

    From condense's report; ``*``: the layer keeps units with no active inputs (why: the second value, the
    report's reasons with the layer names left out, e.g. "10x read by Add, which merges tensors").
    """
    import collections
    import re

    import keras

    from keras_rigl import fan_in

    ablated = {}
    for layer in _masked(sparse):
        mask = keras.ops.convert_to_numpy(layer.get_masks()["kernel"])
        ablated[layer.layer.name] = int(fan_in.ablated_units(mask).sum())
    items = []
    for name, total in _units(stripped):
        removed = len(report.removed.get(name, ()))
        if removed or ablated.get(name) or name in report.kept:
            items.append(f"{name} {total - removed}/{total}{'*' if name in report.kept else ''}")
    reasons = collections.Counter()
    for why in report.kept.values():
        why = re.sub(r"^\d+ units with no active inputs: ", "", why)
        why = re.sub(r"\S+ \((\w+)\)", r"\1", why)  # "read by block_7_add (Add)" -> "read by Add"
        reasons[re.sub(r"unit \d+ ", "one unit ", why)] += 1
    return ", ".join(items) or "none", "; ".join(f"{n}x {why}" for why, n in reasons.items())


def _masked(sparse):
    import keras_rigl

    return [layer for layer in keras_rigl.masked_layers(sparse) if "kernel" in layer.get_masks()]


def _units(stripped):
    """``(name, units)`` of every Dense/Conv layer of the stripped model, in model order (condense's names)."""
    out = []
    for layer in stripped.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is not None and len(kernel.shape) >= 2 and type(layer).__name__ in (
                "Dense", "Conv1D", "Conv2D", "Conv3D"):
            out.append((layer.name, int(kernel.shape[-1])))
    return out


def _cell(value, fmt, width):
    return f"{'-' if value is None else format(value, fmt):>{width}}"


def _short_units(text, width):
    if text == "n/a":
        return ""
    return text if width is None or len(text) <= width else text[:width].rsplit(", ", 1)[0] + ", ... (all in the CSV)"


def format_rows(rows, units_width=None):
    """The table; ``units_width``: cut the units-kept column to about that many characters."""
    head = (f"{'model':<13}{'structure':<14}{'quant':<9}{'sparsity':>8} {'XNNPACK':<8}{'dense med ms':>13}"
            f"{'sparse med ms':>14}{'ratio med':>10}{'ratio min':>10}{'vs fp32':>10} {'sparse FC':>9}"
            f"{'agree':>7}{'max|diff|':>10} |{'cond med ms':>12}{'cond min ms':>12}{'c/d med':>8}{'c/d min':>8}"
            f"{'pred med':>9}{'pred min':>9}{'c agree':>8}{'c |diff|':>9}{'params after/before':>22}  units kept")
    lines = [head]
    for r in rows:
        vs_float = f"{r['ratio_vs_best_fp32']:.2f}"
        xnn = r["xnnpack"] + ("" if r["xnnpack"] == "off" or r["xnnpack_used_sparse"] else "*")
        params = "-" if r["params_after"] is None else f"{r['params_after']:,}/{r['params_before']:,}"
        lines.append(f"{r['model']:<13}{r['structure']:<14}{r['quantize']:<9}{r['sparsity']:>8.2f} {xnn:<8}"
                     f"{r['dense_median_ms']:>13.4f}{r['sparse_median_ms']:>14.4f}{r['ratio_median']:>10.2f}"
                     f"{r['ratio_min']:>10.2f}{vs_float:>10} {r['sparse_fc_layers']:>9}{r['agreement']:>7.2f}"
                     f"{r['max_abs_diff']:>10.2g} |{_cell(r['condensed_median_ms'], '.4f', 12)}"
                     f"{_cell(r['condensed_min_ms'], '.4f', 12)}{_cell(r['condensed_ratio_median'], '.2f', 8)}"
                     f"{_cell(r['condensed_ratio_min'], '.2f', 8)}{_cell(r['predict_ratio_median'], '.2f', 9)}"
                     f"{_cell(r['predict_ratio_min'], '.2f', 9)}{_cell(r['condensed_agreement'], '.2f', 8)}"
                     f"{_cell(r['condensed_max_abs_diff'], '.2g', 9)}{params:>22}  "
                     f"{'MISMATCH ' if r['condensed_mismatch'] else ''}{_short_units(r['units_kept'], units_width)}")
    batches = sorted({r["predict_batch"] for r in rows if r["predict_batch"] is not None})
    lines.append("ratio = sparse / dense time of the same weights in the same quantization (median and min over "
                 "repeats); vs fp32 = sparse median / the faster (XNNPACK on or off) dense float32 median; sparse FC = Dense "
                 "layers run on a TFLite sparse kernel / masked Dense layers; on* = XNNPACK asked for but the "
                 "sparse file ran without it (delegate refused or misreads it).")
    lines.append("fan_in only, right of |: cond = keras_rigl.condense(sparse) exported as plain float32 TFLite, "
                 "timed interleaved with the dense file (c/d = condensed / dense, median and min); pred = Keras "
                 f"predict_on_batch at batch {'/'.join(str(b) for b in batches) or '-'}, condensed / dense model "
                 "(median, min); c agree, c |diff| = condensed file vs the stripped sparse Keras model; units kept = "
                 "kept/total of the layers that lost units or hold ablated ones (* = ablated units kept, "
                 "condensed_kept_why in the CSV says why).")
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
    p.add_argument("--quick", action="store_true",
                   help="LeNet, 1x4, 1x16-int8 and fan_in, 90 %%, short timing (a smoke run)")
    p.add_argument("--unit-sparsity", type=float, default=0.5,
                   help="fan_in: the structure is keras_rigl.FanIn(unit_sparsity=U): that share of every hidden "
                        "layer's units ablated (as the budget allows), then removed by condense; 0 gives plain "
                        "fan_in (default 0.5)")
    p.add_argument("--predict-batch", type=int, default=256,
                   help="fan_in: batch of the Keras predict_on_batch timing, condensed vs dense (default 256)")
    p.add_argument("--predict-calls", type=int, default=None,
                   help="fan_in: predict_on_batch calls per repeat (default 3; --quick 1)")
    p.add_argument("--parity-samples", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the .tflite files go (default: a temporary directory)")
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    p.add_argument("--verbose", action="store_true", help="print the per-layer block-sparse table of every case")
    args = p.parse_args(argv)
    if args.quick:
        args.models = args.models or ["lenet"]
        args.structures = args.structures or ["1x4", "1x16-int8", "fan_in"]
        args.sparsities = args.sparsities or [0.9]
        args.repeats = args.repeats or 7
        args.invokes = args.invokes or 5
        args.predict_calls = args.predict_calls or 1
    args.models = args.models or list(MODELS)
    args.structures = args.structures or list(DEFAULT_STRUCTURES)
    args.sparsities = args.sparsities or list(SPARSITIES)
    args.repeats = 15 if args.repeats is None else args.repeats
    args.invokes = 200 if args.invokes is None else args.invokes
    args.predict_calls = 3 if args.predict_calls is None else args.predict_calls
    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"unknown --models {bad}; choose from {', '.join(MODELS)}")
    bad = [s for s in args.structures if s not in STRUCTURES]
    if bad:
        p.error(f"unknown --structures {bad}; choose from {', '.join(STRUCTURES)}")
    if any(not 0.0 < s < 1.0 for s in args.sparsities):
        p.error("--sparsities must be in (0, 1), e.g. 0.8 0.9 0.95")
    if not 0.0 <= args.unit_sparsity < 1.0:
        p.error("--unit-sparsity must be in [0, 1)")
    if args.repeats < 7:
        p.error("--repeats must be >= 7 (min and median need that many interleaved repeats)")
    if min(args.invokes, args.parity_samples, args.predict_batch, args.predict_calls) < 1:
        p.error("--invokes, --parity-samples, --predict-batch and --predict-calls must be >= 1")
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
    if "fan_in" in args.structures:
        import tensorflow as tf

        threads = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
        print(f"fan_in: keras_rigl.FanIn(unit_sparsity={args.unit_sparsity:g}) + one SET update, condensed; "
              f"Keras predict_on_batch at batch {args.predict_batch}, {args.repeats} interleaved repeats x "
              f"{args.predict_calls} calls, TensorFlow intra-op threads {threads}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="structured_speed_") as tmp:
        workdir = args.workdir or tmp
        for model_name in args.models:
            for structure in args.structures:
                sparsities = [NM_SPARSITY] if structure == "2:4" else args.sparsities
                for sparsity in sparsities:
                    rows.extend(run_case(model_name, structure, sparsity, args, workdir))
                    print("\n".join(format_rows(rows[-2:], UNITS_WIDTH).splitlines()[1:3]))
                    if rows[-1]["structure"] == "fan_in":
                        print(f"    units kept / total: {rows[-1]['units_kept']}")
                    if rows[-1]["condensed_kept_why"]:
                        print(f"    ablated units kept because: {rows[-1]['condensed_kept_why']}")
    print()
    print(format_rows(rows, UNITS_WIDTH))
    if args.csv:
        _write_csv(rows, args.csv)
    bad = sorted({f"{r['model']} {r['structure']} {r['sparsity']:g}" for r in rows if r["condensed_mismatch"]})
    if bad:
        print(f"!!! CONDENSED MISMATCH (the condensed file does not compute what the sparse model does): "
              f"{', '.join(bad)}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    sys.exit(1 if any(row["condensed_mismatch"] for row in main()) else 0)
