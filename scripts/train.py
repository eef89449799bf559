#!/usr/bin/env python
"""Train a sparse network from scratch (RigL by default) and save everything about the run.

    python scripts/train.py                       # CNN on MNIST-5k, 90 % sparse (ERK), RigL
    python scripts/train.py --method set --sparsity 0.95 --model mlp
    python scripts/train.py --structure 1x4       # blocks of 4 inputs (or 2:4, fan_in); conv1 is left dense
    python scripts/train.py --dataset digits --method prune      # TFMOT (pip install -e .[tfmot])
    python scripts/train.py --dataset my.npz --model mobilenet_v2 --weights pretrained.weights.h5

Prints the per-layer sparsity report, held-out accuracy, training and
inference FLOPs against dense (the RigL paper's accounting, see
``keras_rigl.counting``), and writes into ``<out>/<run>/`` (``--out``
defaults to ``runs/``, which git ignores; an existing run folder is replaced only
with ``--overwrite``, and then only once the new run is complete):
``model.keras``, ``model.tflite`` (sparse), ``steps.csv`` (per-step logs:
loss, accuracy, learning rate, sparsity, drop fraction, ITOP),
``epochs.csv`` (keras CSVLogger, with held-out metrics), ``mask_updates.csv``,
``sparsity_report.csv``, ``metrics.json`` and ``curves.png``.

Optimiser: SGD with momentum 0.9, ``--lr`` with a cosine (default), step
(x0.1 at 50 % and 75 %) or constant schedule over all steps.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import warnings  # noqa: E402

from rigl_harness import datasets  # noqa: E402  (scripts/ is on sys.path when this file runs)
from rigl_harness.atomic import RunFolder  # noqa: E402
from rigl_harness.cli import HelpFormatter, layer_names_arg, ranged, structure_arg  # noqa: E402
from rigl_harness.runner import (  # noqa: E402
    DISTRIBUTIONS, INITS, LR_SCHEDULES, METHODS, MODELS, Config, check_config, check_layer_names, run,
)

warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
warnings.filterwarnings("ignore", message=".*tf.function retracing.*")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--dataset", default="mnist5k", help="mnist5k | digits | synthetic | PATH.npz (x_train, y_train, x_test, y_test)")
    p.add_argument("--model", default="cnn", choices=MODELS, help="architecture (rigl_harness.zoo)")
    p.add_argument("--weights", default=None, help="pretrained weights (.weights.h5 or .keras of the same architecture); masks by magnitude")
    p.add_argument("--method", default="rigl", choices=METHODS,
                   help="sparse training method; dense: no masks; prune: TFMOT gradual magnitude pruning")
    p.add_argument("--sparsity", type=ranged(float, 0.0, 1.0, hi_open=True, what=" (must be in [0, 1))"), default=0.9,
                   help="share of masked weights that are zero (ignored by dense)")
    p.add_argument("--distribution", default="erk", choices=DISTRIBUTIONS, help="how the sparsity is spread over the layers")
    p.add_argument("--structure", type=structure_arg, default="none",
                   help="structure of the masks (rigl, set, snfs, static): none, 1xk (e.g. 1x4), N:M (e.g. 2:4) or "
                        "fan_in; layers that cannot carry it (e.g. a first conv with 1 input channel under 1x4: fewer "
                        "inputs than k; more inputs than k need not be a multiple of it) "
                        "are left dense and named, and the sparsity target applies to the other layers")
    p.add_argument("--unstructured-layers", type=layer_names_arg, default=(),
                   help="comma-separated layer names kept sparse but unstructured under --structure (e.g. fc1: "
                        "the first layer, where a structure costs the most accuracy on the MLP)")
    p.add_argument("--update-freq", type=ranged(int, 1, what=" (steps between mask updates, >= 1)"), default=50,
                   help="ΔT: optimizer steps between mask updates (updates stop at 75%% of training)")
    p.add_argument("--drop-fraction", type=ranged(float, 0.0, 1.0, lo_open=True, what=" (must be in (0, 1])"), default=0.3,
                   help="share of active connections moved at an update, cosine-decayed")
    p.add_argument("--epochs", type=ranged(int, 1, what=" (>= 1)"), default=10, help="epochs of a 1x run")
    p.add_argument("--multiplier", type=ranged(float, 0.0, lo_open=True, what=" (training-length multiplier, > 0)"), default=1.0,
                   help="train epochs x multiplier epochs (the paper's 2x, 5x runs)")
    p.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES,
                   help="cosine decay, step (x0.1 at 50%% and 75%%) or constant")
    p.add_argument("--init", default="scaled", choices=INITS,
                   help="scaled: rescale each unit's active weights by sqrt(dense fan-in / active fan-in) "
                        "after the masks are drawn, so a sparse layer starts with the dense layer's output variance "
                        "(the 'sparse init' of Evci et al. 2022); dense: keep the layer initializer's values")
    p.add_argument("--lr", type=ranged(float, 0.0, lo_open=True, what=" (> 0)"), default=0.05,
                   help="SGD (momentum 0.9) learning rate")
    p.add_argument("--batch-size", type=ranged(int, 1, what=" (>= 1)"), default=64, help="examples per step")
    p.add_argument("--seed", type=ranged(int, 0, what=" (--seed must be an integer >= 0)"), default=0,
                   help="seed of the initialisation, masks and batch order (the train/test split is fixed)")
    p.add_argument("--out", default="runs",
                   help="parent folder of the run folder (runs/ is gitignored; the committed example is "
                        "regenerated with --out saved_models --overwrite)")
    p.add_argument("--run-name", default=None, help="run folder name; None: made from the settings, e.g. mnist5k_cnn_rigl_s0.9_seed0")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run folder; the new run is written aside and swapped in only when "
                        "complete, so a killed run leaves the old one intact")
    p.add_argument("--input-scale", default="auto", choices=datasets.INPUT_SCALES,
                   help=".npz inputs: auto divides both splits by 255 when the training split holds 0..255 "
                        "pixels and leaves [0, 1] or standardised (negative) data alone; none; 255")
    p.add_argument("--no-tflite", action="store_true", help="skip the .tflite export")
    p.add_argument("--quiet", action="store_true",
                   help="no Keras progress and no per-layer table; the final result lines are still printed")
    return p


def parse_config(argv=None):
    args = build_parser().parse_args(argv)
    return Config(
        dataset=args.dataset, model=args.model, method=args.method, sparsity=args.sparsity,
        distribution=args.distribution, structure=args.structure,
        unstructured_layers=args.unstructured_layers, update_freq=args.update_freq,
        drop_fraction=args.drop_fraction,
        epochs=args.epochs, multiplier=args.multiplier, lr_schedule=args.lr_schedule, lr=args.lr,
        batch_size=args.batch_size, seed=args.seed, weights=args.weights, out=args.out,
        run_name=args.run_name, init=args.init, tflite=not args.no_tflite, verbose=1 if args.quiet else 2,
        overwrite=args.overwrite, input_scale=args.input_scale,
    )


def main(argv=None):
    """Parse, check everything before training (exit 2 with a one-line error), train; exit 1 if it failed."""
    parser = build_parser()
    cfg = parse_config(argv)
    try:
        check_config(cfg)
        RunFolder(cfg.out, cfg.run_name or cfg.default_run_name(), overwrite=cfg.overwrite).check()
        data = datasets.load_dataset(cfg.dataset, seed=0, input_scale=cfg.input_scale)
        check_layer_names(cfg, data)
    except (ValueError, ImportError) as err:
        parser.error(str(err))
    result = run(cfg, data)
    if result["status"] != "ok":
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
