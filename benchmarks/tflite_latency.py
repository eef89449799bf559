#!/usr/bin/env python
"""Dense vs sparse TFLite latency of the same MobileNet, side by side.

    python benchmarks/tflite_latency.py --version v2 --alpha 1.0 --size 160 --sparsity 0.9

Builds ``keras.applications.MobileNet``/``MobileNetV2`` (weights=None),
sparsifies it (ERK, 90 % by default) with keras_rigl, exports the *same*
weights twice -- dense (no EXPERIMENTAL_SPARSITY) and sparse -- and times
both files with and without XNNPACK, at 1 thread and at all threads.  The
variants are interleaved (every repeat runs each variant once, in a
shuffled order) so drifts in machine load hit them alike; each variant gets
``--repeats`` (>= 7) rounds of ``--invokes`` timed invokes after warm-up,
and min and median per invoke are reported with the sparse/dense ratio.

It also prints the CPU (architecture, model, AVX yes/no from
/proc/cpuinfo) and whether XNNPACK could use its sparse inference path
there, and which sparse weights run on a sparse kernel at all: the
converter stores a FULLY_CONNECTED weight in 1x4 blocks when nearly all
1x4 blocks are empty (e.g. an ERK-sparsified 1000-class classifier at ~3 %
density), and TFLite's builtin sparse FC kernel then computes only those
blocks -- that layer can really get faster, everything else cannot.  XNNPACK turns that path off on x86 CPUs with AVX
(``xnn_is_chw_compatible_config``): there the sparse weights are expanded
to dense once, at load time (DENSIFY), and every invoke runs the same dense
kernels -- expect a ratio of ~1.0, not a speed-up.  Only measured numbers
are printed; nothing is extrapolated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import numpy as np  # noqa: E402

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "model": "", "avx": False, "avx2": False, "avx512f": False,
            "neon": False, "logical_cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not info["model"]:
            info["model"] = value.strip()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
    info["avx"] = "avx" in flags
    info["avx2"] = "avx2" in flags
    info["avx512f"] = "avx512f" in flags
    info["neon"] = bool({"neon", "asimd"} & flags)
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        info["usable_cpus"] = os.cpu_count()
    return info


def sparse_path_verdict(cpu: dict) -> str:
    m = cpu["machine"].lower()
    if m in ("x86_64", "amd64", "i386", "i686", "x86"):
        if cpu["avx"]:
            return ("NO - x86 CPU with AVX: XNNPACK disables its sparse (NCHW/SpMM) path on AVX CPUs "
                    "(xnn_is_chw_compatible_config), so DENSIFY'd sparse weights are expanded at load time "
                    "and run with the same dense kernels as the dense model.")
        return ("POSSIBLY - x86 without AVX: XNNPACK's SSE SpMM kernels may be used if the graph meets its "
                "NCHW rules (see keras_rigl.tflite.xnnpack_sparse_report).")
    if m in ("aarch64", "arm64") or m.startswith("arm"):
        return ("POSSIBLY - ARM: XNNPACK's sparse path is enabled on this architecture, but only for graphs "
                "that meet its NCHW rules (see keras_rigl.tflite.xnnpack_sparse_report); the plain export "
                "usually does not (TF-SAME padding on stride-2 layers).")
    return "UNKNOWN architecture " + cpu["machine"]


def build_models(args) -> dict:
    import keras

    import keras_rigl
    from keras_rigl.tflite.export import export_tflite

    os.makedirs(CACHE, exist_ok=True)
    app = keras.applications.MobileNetV2 if args.version == "v2" else keras.applications.MobileNet
    model = app(weights=None, input_shape=(args.size, args.size, 3), alpha=args.alpha, classes=1000,
                classifier_activation=None)  # logits: a meaningful parity check
    sparse = keras_rigl.sparsify(model, args.sparsity, distribution=args.distribution, seed=args.seed)
    tag = f"mobilenet_{args.version}_a{args.alpha}_{args.size}_s{args.sparsity}_{args.quantize}"
    rng = np.random.default_rng(args.seed)
    calib = rng.random((16, args.size, args.size, 3), dtype=np.float32) if args.quantize == "int8" else None
    q = None if args.quantize == "none" else args.quantize
    files = {}
    for name, kw in (("dense", {"sparse": False}), ("sparse", {"sparse": True})):
        path = os.path.join(CACHE, f"{tag}_{name}.tflite")
        report = export_tflite(sparse, path, quantize=q, representative_data=calib, **kw)
        files[name] = (path, report.attrs["totals"])
        if name == "sparse":
            w = report[(report["role"] == "weight") & (report["format"] == "sparse")]
            native = w[~w["densify"]]
            built_info = {
                "sparse_weights": int(len(w)),
                "densified": int(w["densify"].sum()),
                "native_sparse": [f"{r.op} {'x'.join(map(str, r.shape))} block {r.block or 'CSR'} "
                                  f"(density {r.density:.3f})" for r in native.itertuples()],
                "xnnpack_delegate": report.attrs.get("xnnpack_delegate"),
            }
    if args.xnnpack_rewrite:
        try:
            path = os.path.join(CACHE, f"{tag}_sparse_xnnrw.tflite")
            report = export_tflite(sparse, path, quantize=q, representative_data=calib, target="xnnpack_sparse")
            files["sparse+rewrite"] = (path, report.attrs["totals"])
        except ImportError as e:
            print(f"(skipping --xnnpack-rewrite: {e})")
    x = rng.random((1, args.size, args.size, 3), dtype=np.float32)
    ref = sparse.predict(x, verbose=0)
    return {"files": files, "x": x, "ref": ref, "sparse_info": built_info}


def run(args) -> dict:
    from keras_rigl.tflite.runtime import TFLiteRunner, interpreter_backend

    cpu = cpu_info()
    built = build_models(args)
    all_threads = cpu["usable_cpus"] or 1
    thread_set = sorted({1, all_threads})
    variants = []
    for model_name, (path, totals) in built["files"].items():
        for xnn in (True, False):
            for th in thread_set:
                with warnings.catch_warnings():  # a refusal is reported in the table instead
                    warnings.simplefilter("ignore", RuntimeWarning)
                    runner = TFLiteRunner(path, num_threads=th, use_xnnpack=xnn)
                    runner.warmup(built["x"])  # applies the delegate (LiteRT does it at the first invoke)
                for _ in range(args.warmup):
                    runner.invoke()
                out = runner(built["x"])
                variants.append({
                    "model": model_name, "xnnpack": xnn, "threads": th, "runner": runner, "times": [],
                    "repeat_medians": [],
                    "bytes": totals["file_bytes"], "xnnpack_used": runner.use_xnnpack,
                    "delegate_error": runner.delegate_error,
                    "max_abs_diff_vs_keras": float(np.abs(out - built["ref"]).max()),
                    "max_rel_diff_vs_keras": float(np.abs(out - built["ref"]).max()
                                                   / max(float(np.abs(built["ref"]).max()), 1e-30)),
                })
    order = list(range(len(variants)))
    rnd = random.Random(args.seed)
    for _ in range(args.repeats):
        rnd.shuffle(order)
        for i in order:
            v = variants[i]
            r = v["runner"]
            ts = []
            for _ in range(args.invokes):
                t0 = time.perf_counter()
                r.invoke()
                ts.append(time.perf_counter() - t0)
            v["times"].extend(ts)
            v["repeat_medians"].append(statistics.median(ts))
    rows = []
    for v in variants:
        v["repeat_medians"] = [1e3 * t for t in v["repeat_medians"]]
        ts = v.pop("times")
        v.pop("runner")
        v["min_ms"] = 1e3 * min(ts)
        v["median_ms"] = 1e3 * statistics.median(ts)
        v["n"] = len(ts)
        rows.append(v)
    return {"cpu": cpu, "verdict": sparse_path_verdict(cpu), "backend": interpreter_backend(), "rows": rows,
            "args": vars(args), "sparse_info": built["sparse_info"]}


def print_result(res: dict) -> None:
    cpu = res["cpu"]
    a = res["args"]
    print(f"CPU: {cpu['model'] or '?'} | arch {cpu['machine']} | AVX {'yes' if cpu['avx'] else 'no'} "
          f"(AVX2 {'yes' if cpu['avx2'] else 'no'}, AVX-512F {'yes' if cpu['avx512f'] else 'no'}) | "
          f"{cpu['usable_cpus']} usable CPU(s)")
    print(f"interpreter: {res['backend']}")
    print(f"XNNPACK sparse inference path on this CPU: {res['verdict']}")
    print(f"model: MobileNet{a['version']} alpha {a['alpha']} {a['size']}x{a['size']} 1000 classes, "
          f"{a['distribution'].upper()} {a['sparsity']:.0%} sparse, export quantize={a['quantize']}; "
          f"{a['repeats']} interleaved repeats x {a['invokes']} invokes after {a['warmup']} warm-up invokes")
    si = res["sparse_info"]
    print(f"sparse export: {si['sparse_weights']} weight tensors stored sparse; {si['densified']} of them are "
          f"expanded to dense once at load (DENSIFY) and computed dense; "
          f"{len(si['native_sparse'])} run on TFLite's own sparse kernel (builtin, not XNNPACK)"
          + (": " + "; ".join(si["native_sparse"]) if si["native_sparse"] else ""))
    if si.get("xnnpack_delegate") and si["xnnpack_delegate"] != "ok":
        print(f"XNNPACK on the sparse file: {si['xnnpack_delegate'][:160]}")
    rows = res["rows"]
    sizes = {r["model"]: r["bytes"] for r in rows}
    print("file sizes: " + ", ".join(f"{k} {v:,} bytes" for k, v in sizes.items())
          + (f" (sparse/dense {sizes['sparse'] / sizes['dense']:.3f}x)" if "dense" in sizes else ""))
    print()
    print(f"{'model':<15}{'XNNPACK':<9}{'threads':>7}{'min ms':>10}{'median ms':>11}{'vs dense (median)':>19}  note")
    dense = {(r["xnnpack"], r["threads"]): r for r in rows if r["model"] == "dense"}
    for r in rows:
        d = dense.get((r["xnnpack"], r["threads"]))
        ratio = r["median_ms"] / d["median_ms"] if d and r["model"] != "dense" else None
        note = ""
        if r["xnnpack"] and not r["xnnpack_used"]:
            note = "XNNPACK refused the model; ran on builtin kernels: " + (r["delegate_error"] or "")[:80]
        rs = f"{ratio:.2f}x" if ratio is not None else "-"
        xs = "on" if r["xnnpack"] else "off"
        print(f"{r['model']:<15}{xs:<9}{r['threads']:>7}{r['min_ms']:>10.2f}{r['median_ms']:>11.2f}{rs:>19}  {note}")
    print()
    for r in rows:
        if r["model"] == "dense":
            continue
        d = dense.get((r["xnnpack"], r["threads"]))
        if not d:
            continue
        ratio = r["median_ms"] / d["median_ms"]
        # Interleaved repeats: compare sparse and dense repeat by repeat; only call it a
        # difference when every repeat, the overall median and the minimum agree.
        per_rep = [a / b for a, b in zip(r["repeat_medians"], d["repeat_medians"])]
        min_ratio = r["min_ms"] / d["min_ms"]
        lo, hi = min(per_rep), max(per_rep)
        if hi < 0.95 and ratio < 0.95 and min_ratio < 0.95:
            verdict = f"measured {1 / ratio:.2f}x faster (every repeat; per-repeat ratio {lo:.2f}-{hi:.2f})"
        elif lo > 1.05 and ratio > 1.05 and min_ratio > 1.05:
            verdict = f"measured {ratio:.2f}x slower (every repeat; per-repeat ratio {lo:.2f}-{hi:.2f})"
        else:
            verdict = (f"no consistent difference: median ratio {ratio:.2f}, min ratio {min_ratio:.2f}, "
                       f"per-repeat ratio {lo:.2f}-{hi:.2f}")
        print(f"{r['model']} vs dense, XNNPACK {'on' if r['xnnpack'] else 'off'}, {r['threads']} thread(s): "
              f"{verdict}")
    if si["native_sparse"]:
        print("(a measured gain can only come from the tensors run on TFLite's native sparse kernel listed above "
              "-- the converter picks a 1x4 block encoding for a FULLY_CONNECTED weight when almost all 1x4 "
              "blocks are empty, e.g. the ERK-sparsified classifier -- since everything DENSIFY'd runs dense)")
    else:
        print("(no tensor runs on a sparse kernel: any difference above is noise or memory layout, not sparsity)")
    worst = max(r["max_rel_diff_vs_keras"] for r in rows)
    expect = "float export: expect ~1e-6" if a["quantize"] == "none" else \
        "quantized export of an untrained net with tiny logits: large relative error is expected"
    print(f"\nmax |tflite - keras| / max |keras| over all variants ({expect}): {worst:.3g}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Dense vs sparse TFLite latency (same MobileNet).")
    p.add_argument("--version", choices=("v1", "v2"), default="v2")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--size", type=int, default=160)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--distribution", choices=("erk", "er", "uniform"), default="erk")
    p.add_argument("--quantize", choices=("none", "dynamic", "float16", "int8"), default="none")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--invokes", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--xnnpack-rewrite", action="store_true",
                   help="also time a sparse export rewritten for XNNPACK's sparse path (target='xnnpack_sparse')")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.repeats < 7:
        p.error("--repeats must be >= 7")
    if args.invokes < 1 or args.warmup < 0:
        p.error("--invokes must be >= 1 and --warmup >= 0")
    res = run(args)
    print_result(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


if __name__ == "__main__":
    main()
