#!/usr/bin/env python
"""The fair-comparison harness: sparse training methods against dense baselines at equal cost.

    python scripts/compare.py                                   # the full default grid (hours on a CPU)
    python scripts/compare.py --model mlp --epochs 5 --sparsities 0.9,0.95 --seeds 0,1,2 \\
        --methods dense,dense_flops,small_dense,static,set,snfs,rigl --out results/mnist_mlp

Methods (``--methods``):

* ``dense``: the dense network, cosine learning rate. At a multiplier m > 1
  this is the dense network trained m times longer.
* ``dense_flops``: the dense network trained for fewer steps, so that its
  training FLOPs equal those of the RigL run at the same sparsity and
  multiplier (the paper's "same training FLOPs" baseline).
* ``small_dense``: a narrower dense network (every hidden width scaled) with
  about the sparse network's number of non-zero parameters.
* ``static``, ``set``, ``snfs``, ``rigl``: sparse from scratch, ERK (``--distribution``).
* ``prune``: TFMOT gradual magnitude pruning (needs ``pip install -e .[tfmot]``;
  dropped from the default list with a note when missing).

Structures (``--structures none,1x4,2:4,fan_in``): ``static``, ``set``, ``snfs``
and ``rigl`` run once per structure (``keras_rigl.sparsify(..., structure=)``);
the dense baselines (``dense_flops`` is planned from unstructured RigL) and
``prune`` run once, unstructured. Layers that cannot carry a structure (the
CNN's first convolution, 1 input channel, under 1x4 and 2:4) are left dense and
named in a printed note; the sparsity target then applies to the other layers.
``1xk`` takes inputs that are not a multiple of k (each output unit ends in a
shorter block): the MLP's 300- and 100-input layers are masked under 1x16.
``--unstructured-layers fc1`` keeps the named layers sparse but unstructured in
every structured run (``sparsify(..., per_layer_structure=)``): where the
structure costs the most (the MLP's first layer), or a layer that cannot carry
it (the CNN's conv1, sparse instead of dense).
A structured run's id has ``method@structure`` (``...|rigl@1x4|s0.9|...``;
``rigl@2:4+plain-fc1`` with ``--unstructured-layers fc1``), its summary row
``RigL (2:4, fc1 unstructured)``; unstructured ids are unchanged.

Grid: methods x ``--structures`` x ``--sparsities`` x ``--seeds`` x ``--multipliers``
(dense runs once per seed and multiplier). Training FLOPs follow the paper's accounting
(``keras_rigl.counting``; pruning is charged as dense throughout).

Output in ``--out``: ``results.csv`` (one row per run, written after each run
with a temp file + ``os.replace``, keyed by a run id made of the data, model, epochs,
hyperparameters, method, sparsity, multiplier and seed; a restarted comparison with the same
arguments skips the runs already in it), ``summary.md`` (mean ± std over
seeds), ``accuracy_vs_flops.png`` and ``accuracy_vs_sparsity.png``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from rigl_harness import atomic, datasets, runner  # noqa: E402  (scripts/ is on sys.path when this file runs)
from rigl_harness.cli import HelpFormatter, layer_names_arg, ranged, structures_arg  # noqa: E402
from rigl_harness.comparison import ALL_METHODS, run_comparison  # noqa: E402


def _float_list(text, lo, hi, what):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers ({what})") from None
    if not values:
        raise argparse.ArgumentTypeError(f"empty list ({what})")
    for v in values:
        if not lo(v) or not hi(v):
            raise argparse.ArgumentTypeError(f"{v:g} is out of range ({what})")
    return sorted(set(values))


def _sparsities(text):
    return _float_list(text, lambda v: v > 0, lambda v: v < 1, "sparsities must be in (0, 1)")


def _multipliers(text):
    return _float_list(text, lambda v: v > 0, lambda v: True, "multipliers must be > 0")


def _seeds(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integer seeds") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one seed")
    if min(values) < 0:
        raise argparse.ArgumentTypeError(f"seeds must be >= 0, got {min(values)}")
    return sorted(set(values))


def _methods(text):
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in ALL_METHODS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    return list(dict.fromkeys(values))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--methods", type=_methods, default=None, help=f"comma-separated, from {','.join(ALL_METHODS)}")
    p.add_argument("--sparsities", type=_sparsities, default=[0.8, 0.9, 0.95], help="comma-separated, in (0, 1)")
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated integers")
    p.add_argument("--multipliers", "--multiplier", type=_multipliers, default=[1.0],
                   help="training-length multipliers (epochs x m); dense at m > 1 is 'dense trained m times longer'")
    p.add_argument("--epochs", type=ranged(int, 1, what=" (>= 1)"), default=10, help="epochs of a 1x run")
    p.add_argument("--model", default="cnn", choices=runner.MODELS, help="architecture (rigl_harness.zoo)")
    p.add_argument("--dataset", default="mnist5k", help="mnist5k | digits | synthetic | PATH.npz")
    p.add_argument("--structures", type=structures_arg, default=["none"],
                   help="comma-separated mask structures of static, set, snfs and rigl: none (unstructured), 1xk "
                        "(e.g. 1x4), N:M (e.g. 2:4), fan_in; each sparse method runs once per structure, the dense "
                        "baselines and prune once, unstructured")
    p.add_argument("--unstructured-layers", type=layer_names_arg, default=(),
                   help="comma-separated layer names kept sparse but unstructured in every structured run (e.g. "
                        "fc1: the MLP's first layer, where a structure costs the most accuracy)")
    p.add_argument("--distribution", default="erk", choices=runner.DISTRIBUTIONS, help="how the sparsity is spread over the layers")
    p.add_argument("--update-freq", type=ranged(int, 1, what=" (>= 1)"), default=50, help="ΔT, steps between mask updates")
    p.add_argument("--drop-fraction", type=ranged(float, 0.0, 1.0, lo_open=True, what=" (in (0, 1])"), default=0.3, help="share of active connections moved at an update")
    p.add_argument("--lr", type=ranged(float, 0.0, lo_open=True, what=" (> 0)"), default=0.05, help="SGD learning rate, cosine-decayed")
    p.add_argument("--batch-size", type=ranged(int, 1, what=" (>= 1)"), default=64, help="examples per step")
    p.add_argument("--no-tflite", action="store_true", help="skip the per-run sparse TFLite export (its size column stays empty)")
    p.add_argument("--out", default="compare_results", help="folder for results.csv, summary.md and the plots")
    p.add_argument("--input-scale", default="auto", choices=datasets.INPUT_SCALES,
                   help=".npz inputs: decided from the training split (auto), none, or 255; applied to both splits")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def prepare(argv=None):
    """Parse and validate everything (data set, methods, TFMOT) before any training; returns (args, data, notes)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    notes = []
    try:
        atomic.check_out_folder(args.out)
        data = datasets.load_dataset(args.dataset, seed=0, input_scale=args.input_scale)
        if args.methods is None:
            args.methods = list(ALL_METHODS)
            try:
                runner.check_tfmot()
            except ImportError:
                args.methods.remove("prune")
                notes.append(f"TFMOT is not installed: pruning left out ({runner.TFMOT_HINT}).")
        elif "prune" in args.methods:
            runner.check_tfmot()
        if args.unstructured_layers:
            if all(st == "none" for st in args.structures):
                raise ValueError(f"--unstructured-layers {','.join(args.unstructured_layers)} needs a structure in "
                                 "--structures for the other layers (e.g. --structures none,2:4): add one or drop it.")
            runner.check_layer_names(runner.Config(model=args.model, unstructured_layers=args.unstructured_layers),
                                     data)
        if "prune" in args.methods and any(st != "none" for st in args.structures):
            notes.append("prune (TFMOT) has no structured variant: it runs unstructured only, like the dense "
                         "baselines.")
    except (ValueError, ImportError) as err:
        parser.error(str(err))
    return args, data, notes


def main(argv=None):
    args, data, notes = prepare(argv)
    return run_comparison(args, data, notes)


if __name__ == "__main__":
    main()
