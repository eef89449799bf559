#!/usr/bin/env python
"""Experiment, not a library feature: unstructured RigL, then N:M cut in after the last mask update.

Trains exactly as ``scripts/train.py`` (every flag of it is accepted) with
unstructured masks. At the first step after RigL's last mask update (75% of
training by default), the masks of the ``--cut-layers`` are cut to N:M: in
every group of M consecutive inputs of one output unit only the N largest |w|
stay active (Dense kernels). The rest of training fine-tunes with the masks
fixed, so the model ends N:M in those layers, with fewer active weights than
the sparsity target (the cut ones are not regrown; the count is printed).

Why: on the MLP, 2:4 RigL from scratch costs 0.84 points against unstructured
RigL, but only ~6% of the unstructured model's fc1 weights break 2:4, and
cutting them after training costs little (docs/results.md, "Structured
sparsity"). The patch point is ``rigl_harness.runner.method_callback`` (the
callback train.py builds); nothing of keras_rigl changes.

    python scripts/experiments/cut_to_nm.py --cut-layers fc1,fc2,logits --nm 2:4 -- --model mlp --seed 0 --quiet --no-tflite
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # scripts/: train, rigl_harness

import numpy as np  # noqa: E402

import train  # noqa: E402
from rigl_harness import runner  # noqa: E402


def cut_mask(weight, mask, n, m):
    """The mask with only the ``n`` largest |w| of every ``m`` consecutive inputs of one unit active.

    ``weight`` and ``mask`` are Dense kernels ``(inputs, units)``; inputs must be a multiple of ``m``.
    Inactive entries never become active; ties go to the lower input index.
    """
    n_in, n_out = mask.shape
    if n_in % m:
        raise ValueError(f"a kernel with {n_in} inputs cannot be cut to {n}:{m}: its inputs must be a multiple of {m}.")
    scores = np.abs(weight * mask).T.reshape(n_out, n_in // m, m)
    rank = np.argsort(np.argsort(-scores, axis=2, kind="stable"), axis=2, kind="stable")
    return ((rank < n) & (scores > 0)).reshape(n_out, n_in).T.astype(mask.dtype)


def with_cut(make_callback, layer_names, n, m, log):
    """``runner.method_callback`` whose sparse-training callback cuts ``layer_names`` after its last update."""

    def method_callback(cfg):
        base = make_callback(cfg)
        if base is None or not hasattr(base, "schedule"):
            raise SystemExit(f"cut_to_nm.py needs a mask-updating method (rigl, set, snfs), not {cfg.method!r}.")

        class CutAfterUpdates(type(base)):
            def on_train_batch_end(self, batch, logs=None):
                super().on_train_batch_end(batch, logs)
                import keras

                import keras_rigl

                step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
                if log or step <= self.schedule.end_step:
                    return
                masked = {layer.layer.name: layer for layer in keras_rigl.masked_layers(self.model)}
                missing = sorted(set(layer_names) - set(masked))
                if missing:
                    raise SystemExit(f"--cut-layers {','.join(missing)}: no masked layer of that name; "
                                     f"the masked layers: {', '.join(masked)}.")
                for name in layer_names:
                    mw = masked[name].masked_weights[0]
                    w, mask = keras.ops.convert_to_numpy(mw.weight), keras.ops.convert_to_numpy(mw.mask)
                    cut = cut_mask(w, mask, n, m)
                    mw.mask.assign(cut)
                    mw.weight.assign((w * cut).astype(w.dtype))
                    log.append({"layer": name, "step": step, "cut": int(mask.sum() - cut.sum()),
                                "active": int(cut.sum())})

        return CutAfterUpdates(update_freq=cfg.update_freq, drop_fraction=cfg.drop_fraction, seed=cfg.seed)

    return method_callback


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="After --: scripts/train.py's flags.")
    p.add_argument("--cut-layers", required=True, help="comma-separated Dense layer names, e.g. fc1,fc2,logits")
    p.add_argument("--nm", default="2:4", help="N:M, e.g. 2:4")
    args, rest = p.parse_known_args(argv)
    rest = [a for a in rest if a != "--"]
    try:
        n, m = (int(v) for v in args.nm.split(":"))
        assert 0 < n < m
    except (ValueError, AssertionError):
        p.error(f"--nm {args.nm!r}: give N:M with 0 < N < M, e.g. 2:4")
    if any(a == "--structure" or a.startswith("--structure=") for a in rest):
        p.error("--structure: this experiment trains unstructured and cuts to --nm after the last update; drop it")
    layer_names = [name for name in args.cut_layers.split(",") if name]
    log = []
    plain = runner.method_callback
    runner.method_callback = with_cut(plain, layer_names, n, m, log)
    try:
        result = train.main(rest)
    finally:  # the patch is this run's only: later runs in the same process (tests) train as train.py does
        runner.method_callback = plain
    result["cuts"] = log
    for row in log:
        print(f"cut to {n}:{m} after step {row['step'] - 1}: {row['layer']} lost {row['cut']} weights, "
              f"{row['active']} active")
    return result


if __name__ == "__main__":
    main()
