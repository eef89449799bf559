#!/usr/bin/env python3
"""XNNPACK sparse (NCHW) inference: 1x1 CONV_2D after a keepdims MEAN returns zeros.

Self-contained reproducer (no keras_rigl needed).

  python repro.py make      # needs tensorflow: writes the .tflite files here
  python repro.py run       # needs only ai-edge-litert + numpy: compares
                            # XNNPACK (default delegate) vs the builtin kernels
  python repro.py           # both, if tensorflow is importable

XNNPACK only uses its sparse path on ARM/aarch64 or on x86 *without* AVX, so
run the "run" step on such a machine, e.g. under user-mode emulation:
  qemu-aarch64-static -L <arm64 root> <root>/usr/bin/python3.11 repro.py run
  qemu-x86_64-static -cpu Nehalem python repro.py run
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> head built on top of the shared NCHW-eligible body
CASES = [
    # failing: 1x1 conv on the [1,1,1,C] output of MEAN(keepdims=True)
    ("bad_mean_keepdims_conv1x1", "conv"),
    ("bad_mean_keepdims_conv1x1_reshape", "conv_reshape"),
    # fine: same math, the conv replaced by FULLY_CONNECTED / nothing
    ("ok_mean_fc", "fc"),
    ("ok_mean_keepdims_reshape_fc", "reshape_fc"),
    ("ok_mean_only", "none"),
]
PX = 16


def make():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    import keras
    L = keras.layers
    rng = np.random.default_rng(0)
    for name, head in CASES:
        inp = keras.Input((PX, PX, 3))
        # NHWC->NCHW entry XNNPACK accepts: 3x3 stride-2 conv, 3 input
        # channels, explicit zero padding 1 on every side
        x = L.ZeroPadding2D(1)(inp)
        x = L.Conv2D(8, 3, strides=2, padding="valid", activation="relu")(x)
        x = L.Conv2D(32, 1, activation="relu")(x)          # sparse 1x1 (SpMM)
        if head == "conv":
            y = L.Conv2D(10, 1)(L.GlobalAveragePooling2D(keepdims=True)(x))
        elif head == "conv_reshape":
            y = L.Reshape((10,))(L.Conv2D(10, 1)(L.GlobalAveragePooling2D(keepdims=True)(x)))
        elif head == "fc":
            y = L.Dense(10)(L.GlobalAveragePooling2D()(x))
        elif head == "reshape_fc":
            y = L.Dense(10)(L.Reshape((32,))(L.GlobalAveragePooling2D(keepdims=True)(x)))
        else:
            y = L.GlobalAveragePooling2D()(x)
        m = keras.Model(inp, y)
        for layer in m.layers:
            ws = layer.get_weights()
            if not ws:
                continue
            w = rng.standard_normal(ws[0].shape).astype("float32") * 0.3
            if len(ws[0].shape) == 4 and ws[0].shape[:2] == (1, 1) or len(ws[0].shape) == 2:
                w *= rng.random(w.shape) >= 0.9               # 90% zeros: > 2/3 needed
            ws = [w] + [np.full_like(b, 0.05) for b in ws[1:]]
            layer.set_weights(ws)
        conv = tf.lite.TFLiteConverter.from_keras_model(m)
        conv.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
        with open(os.path.join(HERE, name + ".tflite"), "wb") as f:
            f.write(conv.convert())
    print("wrote", len(CASES), "models to", HERE)


def run():
    import platform
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    try:
        import importlib.metadata as md
        ver = md.version("ai-edge-litert")
    except Exception:
        ver = "?"
    print(f"machine={platform.machine()} ai-edge-litert={ver}")
    x = np.random.default_rng(1).standard_normal((1, PX, PX, 3)).astype("float32")
    bad = 0
    for name, _ in CASES:
        path = os.path.join(HERE, name + ".tflite")
        outs = {}
        for label, kw in (("xnnpack", {}),
                          ("builtin", {"experimental_op_resolver_type":
                                       OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES})):
            try:
                it = Interpreter(model_path=path, num_threads=1, **kw)
                it.allocate_tensors()
                it.set_tensor(it.get_input_details()[0]["index"], x)
                it.invoke()
                outs[label] = it.get_tensor(it.get_output_details()[0]["index"]).copy()
            except Exception as e:  # noqa: BLE001
                outs[label] = e
        a, b = outs["xnnpack"], outs["builtin"]
        if isinstance(a, Exception) or isinstance(b, Exception):
            msg = f"ERROR xnnpack: {str(a).splitlines()[0] if isinstance(a, Exception) else 'ok'}"
            ok = False
        else:
            d = float(np.abs(a - b).max())
            ok = d <= 1e-4
            msg = f"max|xnnpack-builtin|={d:.3g} max|builtin|={float(np.abs(b).max()):.3g} xnnpack all zero={bool(np.all(a == 0))}"
        bad += (not ok) and name.startswith("ok_")
        print(f"{'PASS' if ok else 'FAIL'} {name:36s} {msg}")
    return bad


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "all"
    if cmd in ("make", "all"):
        try:
            make()
        except ImportError:
            if cmd == "make":
                raise
    if cmd in ("run", "all"):
        run()
