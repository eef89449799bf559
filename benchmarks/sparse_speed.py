#!/usr/bin/env python3
"""Where does a sparse model actually run faster?  Dense vs sparse, side by side.

Engines (each sparse run is checked against its dense twin: ``max_abs_diff``):

* ``tflite_xnnpack_host``   TFLite + XNNPACK on this machine (x86: XNNPACK
  turns its sparse path off on any CPU with AVX, so expect ratio ~1);
* ``tflite_xnnpack_aarch64`` the same .tflite files on the aarch64 build,
  under qemu user-mode emulation (``benchmarks/setup_aarch64.sh``); wall-time
  *ratios* only, emulated time is not ARM time;
* ``tflite_builtin_host``   TFLite builtin kernels, no delegate (its
  FULLY_CONNECTED has a native sparse-weights kernel) - Dense stack only;
* ``tf_sparse_dense_matmul`` / ``tf_csr_matmul``  TensorFlow's own sparse
  kernels (``tf.sparse.sparse_dense_matmul``, CSR ``SparseMatrixMatMul``)
  against dense ``tf.matmul`` - Dense stack only, batch 1 and 64.

Models: ``mobilenet_v1`` / ``mobilenet_v2`` (random unstructured masks on the
1x1 convolutions and the classifier), ``dense_stack`` (``--depth`` ReLU Dense
layers of ``--width``, unstructured masks), ``dense_stack_block4`` (same, 1x4
block masks; opt-in via ``--models``).

Dense = the pruned model converted normally; sparse = the same weights
converted with ``Optimize.EXPERIMENTAL_SPARSITY`` (and, for the CNNs, rewritten
with ``keras_rigl.tflite.rewrite_for_xnnpack_sparse`` - applied to both files
so they compute the same function).  Timing: warm-up, then ``--repeats``
rounds that alternate dense and sparse; each round times ``inner`` invokes;
min and median per invoke are reported.

  python benchmarks/sparse_speed.py --quick                  # small sweep
  python benchmarks/sparse_speed.py                          # full sweep
  python benchmarks/sparse_speed.py --merge a.csv b.csv      # combine runs
  python benchmarks/sparse_speed.py --worker jobs.json       # (internal:
        run under the emulated aarch64 python, no TensorFlow needed)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CSV_COLUMNS = ["engine", "model", "sparsity", "batch", "threads", "dense_ms", "sparse_ms",
               "ratio", "max_abs_diff", "dense_min_ms", "sparse_min_ms", "sparse_path", "note"]
FULL_SPARSITIES = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98]
QUICK_SPARSITIES = [0.0, 0.9]


# ---------------------------------------------------------------- timing ---
def _interleaved(fa, fb, repeats, inner, warmup=2):
    """Alternate fa/fb; return (median_a, min_a, median_b, min_b) in ms per call."""
    for _ in range(warmup):
        fa(); fb()
    ta, tb = [], []
    for r in range(repeats):
        order = (fa, fb) if r % 2 == 0 else (fb, fa)
        for f in order:
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            dt = 1000.0 * (time.perf_counter() - t0) / inner
            (ta if f is fa else tb).append(dt)
    return float(np.median(ta)), float(np.min(ta)), float(np.median(tb)), float(np.min(tb))


# ------------------------------------------------- tflite (no TF needed) ---
def _tflite_pair(dense_path, sparse_path, x, threads, repeats, builtin=False, budget_ms=300.0):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    kw = {}
    if builtin:
        kw["experimental_op_resolver_type"] = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    # Under qemu-aarch64 the sparse path's per-invoke time is bimodal (~57 ms
    # or ~520 ms for MobileNet v1 96px at 90 %, same interpreter, same input;
    # steady under qemu-x86_64 -cpu Nehalem), so emulated jobs run one process
    # each and both min and median are reported.
    its = [None, None]
    for k, p in ((1, sparse_path), (0, dense_path)):
        it = Interpreter(model_path=p, num_threads=threads, **kw)
        it.allocate_tensors()
        its[k] = it

    def mk(it):
        i = it.get_input_details()[0]["index"]

        def f():
            it.set_tensor(i, x)
            it.invoke()
        return f
    fa, fb = mk(its[0]), mk(its[1])
    t0 = time.perf_counter(); fa(); fb(); one = 1000 * (time.perf_counter() - t0) / 2
    inner = int(max(1, min(200, budget_ms / max(one, 1e-3))))
    md, mn_d, ms, mn_s = _interleaved(fa, fb, repeats, inner)
    ya = its[0].get_tensor(its[0].get_output_details()[0]["index"])
    yb = its[1].get_tensor(its[1].get_output_details()[0]["index"])
    return dict(dense_ms=md, dense_min_ms=mn_d, sparse_ms=ms, sparse_min_ms=mn_s,
                max_abs_diff=float(np.max(np.abs(ya - yb))))


def worker(jobs_path):
    """Run TFLite jobs (list of dicts) and print one JSON line per job."""
    jobs = json.load(open(jobs_path))
    for j in jobs:
        x = np.load(j["x"])
        try:
            r = _tflite_pair(j["dense"], j["sparse"], x, j["threads"], j["repeats"],
                             builtin=j.get("builtin", False))
            r.update(key=j["key"])
        except Exception as e:  # noqa: BLE001 - report, keep going
            r = dict(key=j["key"], error=str(e).splitlines()[0][:200])
        print("RESULT " + json.dumps(r), flush=True)


# ------------------------------------------------------------ models -------
def _prune(model, sparsity, seed=0, block=1):
    """Random mask on every 1x1 conv / Dense kernel (numpy).

    ``block=4``: prune Dense kernels in 1x4 blocks (4 consecutive inputs of one
    output), the pattern TFLite's builtin sparse FULLY_CONNECTED kernel uses.
    """
    import keras
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        ws = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            # non-trivial BN so the check is meaningful for untrained nets
            ws = [rng.uniform(0.5, 1.5, w.shape).astype("float32") if i in (0, 3)
                  else (0.1 * rng.standard_normal(w.shape)).astype("float32")
                  for i, w in enumerate(ws)]
            layer.set_weights(ws)
            continue
        is_pw = (isinstance(layer, keras.layers.Conv2D)
                 and not isinstance(layer, keras.layers.DepthwiseConv2D)
                 and tuple(layer.kernel_size) == (1, 1))
        if (is_pw or isinstance(layer, keras.layers.Dense)) and sparsity > 0:
            k = ws[0]
            if block > 1 and k.ndim == 2 and k.shape[0] % block == 0:
                mask = np.repeat(rng.random((k.shape[0] // block, k.shape[1])) >= sparsity,
                                 block, axis=0)
            else:
                mask = rng.random(k.shape) >= sparsity
            ws[0] = (k * mask).astype("float32")
            layer.set_weights(ws)
    return model


def build(name, px, alpha, width, depth):
    import keras
    keras.utils.set_random_seed(0)
    if name == "mobilenet_v1":
        return keras.applications.MobileNet(input_shape=(px, px, 3), alpha=alpha, weights=None,
                                            classifier_activation=None)
    if name == "mobilenet_v2":
        return keras.applications.MobileNetV2(input_shape=(px, px, 3), alpha=alpha, weights=None,
                                              classifier_activation=None)
    if name in ("dense_stack", "dense_stack_block4"):
        inp = keras.Input((width,))
        x = inp
        for _ in range(depth):
            x = keras.layers.Dense(width, activation="relu")(x)
        return keras.Model(inp, x)
    raise ValueError(name)


def to_tflite(model, path, sparse):
    import tensorflow as tf
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if sparse:
        conv.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    with open(path, "wb") as f:
        f.write(conv.convert())


# ---------------------------------------------------- TF sparse kernels ----
def tf_dense_stack(model, batch, repeats, threads):
    """Dense tf.matmul vs tf.sparse.sparse_dense_matmul vs CSR SparseMatrixMatMul."""
    import tensorflow as tf
    Ws, bs = [], []
    for layer in model.layers:
        if layer.weights:
            w, b = layer.get_weights()
            Ws.append(w); bs.append(b)
    x = np.random.default_rng(1).standard_normal((batch, Ws[0].shape[0])).astype("float32")
    xt = tf.constant(x.T)
    dW = [tf.constant(w) for w in Ws]
    bcol = [tf.constant(b[:, None]) for b in bs]
    spT = [tf.sparse.from_dense(tf.constant(w.T)) for w in Ws]
    from tensorflow.python.ops.linalg.sparse import sparse_csr_matrix_ops as csr_ops
    csrT = [csr_ops.CSRSparseMatrix(tf.constant(w.T)) for w in Ws]
    xd = tf.constant(x)

    @tf.function(autograph=False)
    def dense():
        h = xd
        for w, b in zip(dW, bs):
            h = tf.nn.relu(tf.matmul(h, w) + b)
        return h

    @tf.function(autograph=False)
    def sparse_dm():
        h = xt  # transposed layout: h^T = W^T @ x^T
        for s, b in zip(spT, bcol):
            h = tf.nn.relu(tf.sparse.sparse_dense_matmul(s, h) + b)
        return tf.transpose(h)

    @tf.function(autograph=False)
    def csr():
        h = xt
        for s, b in zip(csrT, bcol):
            h = tf.nn.relu(csr_ops.matmul(s, h) + b)
        return tf.transpose(h)

    y0 = dense().numpy()
    out = {}
    for eng, f in (("tf_sparse_dense_matmul", sparse_dm), ("tf_csr_matmul", csr)):
        y1 = f().numpy()
        fa = lambda: dense().numpy()  # noqa: E731 - include the sync
        fb = lambda: f().numpy()  # noqa: E731
        t0 = time.perf_counter(); fa(); fb(); one = 1000 * (time.perf_counter() - t0) / 2
        inner = int(max(1, min(200, 300.0 / max(one, 1e-3))))
        md, mnd, ms, mns = _interleaved(fa, fb, repeats, inner)
        out[eng] = dict(dense_ms=md, dense_min_ms=mnd, sparse_ms=ms, sparse_min_ms=mns,
                        max_abs_diff=float(np.max(np.abs(y1 - y0))))
    return out


# -------------------------------------------------------------- driver -----
def nehalem_runner():
    """x86-64 build of TFLite under qemu without AVX: XNNPACK's SSE sparse path."""
    import shutil
    q = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
    if q is None:
        return None, "qemu-x86_64-static not installed (apt-get install qemu-user-static)"
    run = [q, "-cpu", "Nehalem", sys.executable]
    r = subprocess.run(run + ["-c", "import ai_edge_litert.interpreter"], capture_output=True)
    if r.returncode != 0:
        return None, "host python under qemu-x86_64 failed: " + r.stderr.decode()[-200:]
    return run, ""


def aarch64_runner():
    run = os.path.join(HERE, ".cache", "aarch64", "run.sh")
    if not os.path.exists(run):
        return None, "benchmarks/setup_aarch64.sh has not been run (no benchmarks/.cache/aarch64/run.sh)"
    try:
        r = subprocess.run([run, "-c", "import ai_edge_litert.interpreter"], capture_output=True,
                           timeout=120)
        if r.returncode != 0:
            return None, "emulated aarch64 python cannot import ai_edge_litert: " + r.stderr.decode()[-200:]
    except Exception as e:  # noqa: BLE001
        return None, f"cannot start emulated aarch64 python: {e}"
    return [run], ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="sparsity 0 and 0.9 only, fewer repeats")
    ap.add_argument("--tiny", action="store_true", help="tiny models (tests)")
    ap.add_argument("--sparsities", type=float, nargs="*")
    ap.add_argument("--models", nargs="*", default=["mobilenet_v1", "mobilenet_v2", "dense_stack"])
    ap.add_argument("--engines", nargs="*",
                    default=["tflite_xnnpack_host", "tflite_xnnpack_aarch64",
                             "tflite_xnnpack_x86_nehalem", "tflite_builtin_host",
                             "tf_sparse_dense_matmul", "tf_csr_matmul"])
    ap.add_argument("--px", type=int, default=96)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None, help=">= 7 for reported numbers")
    ap.add_argument("--csv", default=os.path.join(ROOT, "docs", "sparse_speed.csv"))
    ap.add_argument("--png", default=os.path.join(ROOT, "docs", "sparse_speed.png"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--reuse", action="store_true",
                    help="reuse .tflite files already in --workdir (same arguments)")
    ap.add_argument("--merge", nargs="*", metavar="CSV",
                    help="only concatenate these result CSVs into --csv/--png (no runs)")
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    if a.merge:
        import pandas as pd
        df = pd.concat([pd.read_csv(f) for f in a.merge], ignore_index=True)[CSV_COLUMNS]
        df.to_csv(a.csv, index=False, float_format="%.6g")
        for k, v in break_even(df).items():
            print(f"break-even {k}: {v}")
        if a.png:
            plot(df, a.png)
        return df

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import pandas as pd
    sys.path.insert(0, ROOT)
    from keras_rigl.tflite import rewrite_for_xnnpack_sparse, xnnpack_sparse_report

    sps = a.sparsities or (QUICK_SPARSITIES if a.quick else FULL_SPARSITIES)
    repeats = a.repeats or (5 if a.quick else 11)
    if a.tiny:
        a.px, a.alpha, a.width, a.depth = 64, 0.25, 64, 2
    wd = a.workdir or tempfile.mkdtemp(prefix="sparse_speed_")
    os.makedirs(wd, exist_ok=True)
    rows, jobs_aarch64, jobs_nehalem, notes = [], [], [], {}

    def add(engine, model, s, batch, r, sparse_path="", note=""):
        row = dict(engine=engine, model=model, sparsity=s, batch=batch, threads=a.threads,
                   sparse_path=sparse_path, note=note)
        if r is None or "error" in r:
            row.update(dense_ms=np.nan, sparse_ms=np.nan, ratio=np.nan, max_abs_diff=np.nan,
                       dense_min_ms=np.nan, sparse_min_ms=np.nan,
                       note=(note + " " + (r or {}).get("error", "")).strip())
        else:
            row.update({k: r[k] for k in ("dense_ms", "sparse_ms", "max_abs_diff",
                                          "dense_min_ms", "sparse_min_ms")})
            row["ratio"] = r["sparse_ms"] / r["dense_ms"]
        rows.append(row)
        print(f"{engine:24s} {model:13s} s={s:<5} b={batch:<3} "
              f"dense={row['dense_ms']:.3f} sparse={row['sparse_ms']:.3f} ms ratio={row['ratio']:.3f} "
              f"diff={row['max_abs_diff']:.2g} {row['note']}", flush=True)

    for model_name in a.models:
        for s in sps:
            tag = f"{model_name}_s{int(round(s * 100)):02d}"
            dpath, spath = os.path.join(wd, tag + "_dense.tflite"), os.path.join(wd, tag + "_sparse.tflite")
            reuse = a.reuse and os.path.exists(dpath) and os.path.exists(spath)
            base = build(model_name, a.px, a.alpha, a.width, a.depth)
            _prune(base, s, block=4 if model_name == "dense_stack_block4" else 1)
            if model_name.startswith("mobilenet"):
                m = base if reuse else rewrite_for_xnnpack_sparse(base)
                shape = (1, a.px, a.px, 3)
                batches = [1]
            else:
                m = base
                shape = None
                batches = a.batches
            if not (a.reuse and os.path.exists(dpath) and os.path.exists(spath)):
                to_tflite(m, dpath, sparse=False)
                to_tflite(m, spath, sparse=True)
            try:
                rep = xnnpack_sparse_report(spath)
                sp_flag = bool(rep.attrs["sparse_path"])
            except Exception as e:  # noqa: BLE001 - the report must not stop the sweep
                print("xnnpack_sparse_report failed:", e)
                sp_flag = ""
            for batch in batches:
                if shape is None:
                    x = np.random.default_rng(1).standard_normal((1, a.width)).astype("float32")
                    if batch != 1:
                        continue  # TFLite models are exported with batch 1
                else:
                    x = np.random.default_rng(1).standard_normal(shape).astype("float32")
                xp = os.path.join(wd, tag + "_x.npy")
                np.save(xp, x)
                if "tflite_xnnpack_host" in a.engines:
                    add("tflite_xnnpack_host", model_name, s, 1,
                        _tflite_pair(dpath, spath, x, a.threads, repeats), sp_flag,
                        "x86+AVX: XNNPACK sparse path disabled")
                if "tflite_builtin_host" in a.engines and model_name.startswith("dense_stack"):
                    add("tflite_builtin_host", model_name, s, 1,
                        _tflite_pair(dpath, spath, x, a.threads, repeats, builtin=True), "")
                if "tflite_xnnpack_x86_nehalem" in a.engines:
                    jobs_nehalem.append(dict(key=[model_name, s, 1, sp_flag], dense=dpath, sparse=spath,
                                             x=xp, threads=a.threads, repeats=repeats))
                if "tflite_xnnpack_aarch64" in a.engines:
                    jobs_aarch64.append(dict(key=[model_name, s, 1, sp_flag], dense=dpath, sparse=spath,
                                             x=xp, threads=a.threads, repeats=repeats))
            if model_name.startswith("dense_stack"):
                for batch in a.batches:
                    if not {"tf_sparse_dense_matmul", "tf_csr_matmul"} & set(a.engines):
                        break
                    res = tf_dense_stack(base, batch, repeats, a.threads)
                    for eng, r in res.items():
                        if eng in a.engines:
                            add(eng, model_name, s, batch, r)

    for engine, jobs, (run, why), note in (
            ("tflite_xnnpack_aarch64", jobs_aarch64,
             aarch64_runner() if jobs_aarch64 else (None, ""), "qemu-aarch64 emulation: ratios only"),
            ("tflite_xnnpack_x86_nehalem", jobs_nehalem,
             nehalem_runner() if jobs_nehalem else (None, ""), "qemu-x86_64 -cpu Nehalem (no AVX): ratios only")):
        if not jobs:
            continue
        if run is None:
            notes[engine] = why
            print(engine + ": not run:", why)
            for j in jobs:
                add(engine, j["key"][0], j["key"][1], 1, {"error": "not run: " + why})
        else:
            jobs_aarch64 = jobs
            got = {}
            for n, j in enumerate(jobs_aarch64):
                # one emulated process per job (isolation; see _tflite_pair)
                jp = os.path.join(wd, f"job{n}.json")
                json.dump([j], open(jp, "w"))
                p = subprocess.run(list(run) + [os.path.abspath(__file__), "--worker", jp],
                                   capture_output=True, text=True)
                for line in p.stdout.splitlines():
                    if line.startswith("RESULT "):
                        r = json.loads(line[7:])
                        got[json.dumps(r["key"])] = r
                if json.dumps(j["key"]) not in got:
                    got[json.dumps(j["key"])] = {"error": "worker crashed: " + p.stderr[-200:]}
            for j in jobs_aarch64:
                r = got[json.dumps(j["key"])]
                add(engine, j["key"][0], j["key"][1], 1, r, j["key"][3], note)

    df = pd.DataFrame(rows)
    for c in CSV_COLUMNS:
        if c not in df:
            df[c] = np.nan
    df = df[CSV_COLUMNS]
    os.makedirs(os.path.dirname(os.path.abspath(a.csv)), exist_ok=True)
    df.to_csv(a.csv, index=False, float_format="%.6g")
    print("wrote", a.csv)
    be = break_even(df)
    for k, v in be.items():
        print(f"break-even {k}: {v}")
    if a.png:
        plot(df, a.png)
        print("wrote", a.png)
    return df


BREAK_EVEN_RATIO = 0.95


def break_even(df, threshold=BREAK_EVEN_RATIO):
    """Lowest measured sparsity from which sparse beats dense (median ratio <
    ``threshold``, i.e. >= 5% faster, so noise at ratio ~1 does not count) at
    that and every higher measured sparsity; per engine/model/batch."""
    out = {}
    for (eng, model, batch), g in df.groupby(["engine", "model", "batch"]):
        g = g.dropna(subset=["ratio"]).sort_values("sparsity")
        if g.empty:
            out[f"{eng}/{model}/b{batch}"] = "not measured"
            continue
        wins = (g["ratio"] < threshold).to_numpy()
        first = None
        for i in range(len(wins)):
            if wins[i:].all():
                first = g["sparsity"].iloc[i]
                break
        out[f"{eng}/{model}/b{batch}"] = (f"{first:g}" if first is not None
                                          else "never (in the measured range)")
    return out


def plot(df, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    engines = sorted(df["engine"].unique())
    ncol = min(3, len(engines))
    nrow = -(-len(engines) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.6 * nrow), squeeze=False)
    for ax in axes.flat[len(engines):]:
        ax.axis("off")
    for ax, eng in zip(axes.flat, engines):
        g = df[df["engine"] == eng]
        for (model, batch), gg in g.groupby(["model", "batch"]):
            gg = gg.sort_values("sparsity")
            ax.plot(gg["sparsity"], gg["dense_ms"] / gg["sparse_ms"], marker="o",
                    label=f"{model} b{batch}")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(eng, fontsize=9)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("speed-up (dense_ms / sparse_ms)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
