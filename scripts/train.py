#!/usr/bin/env python
"""Train a sparse network from scratch (RigL by default) and save everything about the run.

    python scripts/train.py                       # CNN on MNIST-5k, 90 % sparse (ERK), RigL
    python scripts/train.py --method set --sparsity 0.95 --model mlp
    python scripts/train.py --dataset digits --method prune      # TFMOT (pip install -e .[tfmot])
    python scripts/train.py --dataset my.npz --model mobilenet_v2 --weights pretrained.weights.h5

Prints the per-layer sparsity report, held-out accuracy, training and
inference FLOPs against dense (the RigL paper's accounting, see
``keras_rigl.counting``), and writes into ``<out>/<run>/``:
``model.keras``, ``model.tflite`` (sparse), ``steps.csv`` (per-step logs:
loss, accuracy, learning rate, sparsity, drop fraction, ITOP),
``epochs.csv`` (keras CSVLogger, with held-out metrics), ``mask_updates.csv``,
``sparsity_report.csv``, ``metrics.json`` and ``curves.png``.

Optimiser: SGD with momentum 0.9, ``--lr`` with a cosine (default), step
(x0.1 at 50 % and 75 %) or constant schedule over all steps.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import warnings  # noqa: E402

import numpy as np  # noqa: E402

warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
warnings.filterwarnings("ignore", message=".*tf.function retracing.*")

METHODS = ("rigl", "set", "snfs", "static", "dense", "prune")
SPARSE_METHODS = ("rigl", "set", "snfs", "static")
DISTRIBUTIONS = ("erk", "er", "uniform")
LR_SCHEDULES = ("cosine", "step", "constant")
INITS = ("scaled", "dense")
MODELS = ("cnn", "mlp", "mobilenet_v1", "mobilenet_v2", "resnet50", "lstm")
TFMOT_HINT = "pip install -e .[tfmot]  (installs tf_keras and tensorflow-model-optimization)"


@dataclasses.dataclass
class Config:
    dataset: str = "mnist5k"
    model: str = "cnn"
    method: str = "rigl"
    sparsity: float = 0.9
    distribution: str = "erk"
    update_freq: int = 50
    drop_fraction: float = 0.3
    epochs: int = 10
    multiplier: float = 1.0
    lr_schedule: str = "cosine"
    lr: float = 0.05
    batch_size: int = 64
    seed: int = 0
    weights: str | None = None
    out: str = "saved_models"
    run_name: str | None = None
    steps: int | None = None  # total optimizer steps (overrides epochs x multiplier)
    width: float = 1.0  # hidden-size multiplier (small-dense baseline)
    init: str = "scaled"  # "scaled": sparse-aware init of masked weights; "dense": the layer's own init
    save: bool = True  # write the model, logs and plots
    tflite: bool = True  # export the sparse .tflite
    verbose: int = 1

    @property
    def sparse(self):
        return self.method in SPARSE_METHODS or self.method == "prune"

    def default_run_name(self):
        data = os.path.splitext(os.path.basename(self.dataset))[0]
        name = f"{data}_{self.model}_{self.method}"
        if self.sparse:
            name += f"_s{self.sparsity:g}"
        if self.width != 1.0:
            name += f"_w{self.width:.3g}"
        if self.steps is not None:
            name += f"_steps{self.steps}"
        elif self.multiplier != 1:
            name += f"_x{self.multiplier:g}"
        return name + f"_seed{self.seed}"


# ----------------------------------------------------------------- arguments
def _ranged(kind, lo=None, hi=None, lo_open=False, hi_open=False, what=""):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}{what}") from None
        if lo is not None and (value < lo or (lo_open and value == lo)):
            raise argparse.ArgumentTypeError(f"{text} is out of range{what}")
        if hi is not None and (value > hi or (hi_open and value == hi)):
            raise argparse.ArgumentTypeError(f"{text} is out of range{what}")
        return value

    return parse


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist5k", help="mnist5k | digits | synthetic | PATH.npz (x_train, y_train, x_test, y_test)")
    p.add_argument("--model", default="cnn", choices=MODELS)
    p.add_argument("--weights", default=None, help="pretrained weights (.weights.h5 or .keras of the same architecture); masks by magnitude")
    p.add_argument("--method", default="rigl", choices=METHODS)
    p.add_argument("--sparsity", type=_ranged(float, 0.0, 1.0, hi_open=True, what=" (must be in [0, 1))"), default=0.9)
    p.add_argument("--distribution", default="erk", choices=DISTRIBUTIONS)
    p.add_argument("--update-freq", type=_ranged(int, 1, what=" (steps between mask updates, >= 1)"), default=50)
    p.add_argument("--drop-fraction", type=_ranged(float, 0.0, 1.0, lo_open=True, what=" (must be in (0, 1])"), default=0.3)
    p.add_argument("--epochs", type=_ranged(int, 1, what=" (>= 1)"), default=10)
    p.add_argument("--multiplier", type=_ranged(float, 0.0, lo_open=True, what=" (training-length multiplier, > 0)"), default=1.0,
                   help="train epochs x multiplier epochs (the paper's 2x, 5x runs)")
    p.add_argument("--lr-schedule", default="cosine", choices=LR_SCHEDULES)
    p.add_argument("--init", default="scaled", choices=INITS,
                   help="scaled (default): rescale each unit's active weights by sqrt(dense fan-in / active fan-in) "
                        "after the masks are drawn, so a sparse layer starts with the dense layer's output variance "
                        "(the 'sparse init' of Evci et al. 2022); dense: keep the layer initializer's values")
    p.add_argument("--lr", type=_ranged(float, 0.0, lo_open=True, what=" (> 0)"), default=0.05)
    p.add_argument("--batch-size", type=_ranged(int, 1, what=" (>= 1)"), default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="saved_models", help="parent folder of the run folder")
    p.add_argument("--run-name", default=None, help="run folder name (default: from the settings)")
    p.add_argument("--no-tflite", action="store_true", help="skip the .tflite export")
    p.add_argument("--quiet", action="store_true")
    return p


def parse_config(argv=None):
    args = build_parser().parse_args(argv)
    return Config(
        dataset=args.dataset, model=args.model, method=args.method, sparsity=args.sparsity,
        distribution=args.distribution, update_freq=args.update_freq, drop_fraction=args.drop_fraction,
        epochs=args.epochs, multiplier=args.multiplier, lr_schedule=args.lr_schedule, lr=args.lr,
        batch_size=args.batch_size, seed=args.seed, weights=args.weights, out=args.out,
        run_name=args.run_name, init=args.init, tflite=not args.no_tflite, verbose=0 if args.quiet else 1,
    )


def check_config(cfg):
    """Errors that argparse cannot catch, raised before any data is loaded or model trained."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; use one of {', '.join(METHODS)}.")
    if cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; use one of {', '.join(MODELS)}.")
    if cfg.sparse and not 0.0 < cfg.sparsity < 1.0:
        raise ValueError(f"--sparsity must be in (0, 1) for method {cfg.method!r}, got {cfg.sparsity}.")
    if cfg.weights is not None and not os.path.exists(cfg.weights):
        raise ValueError(f"--weights file {cfg.weights!r} does not exist.")
    if cfg.steps is not None and cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}.")
    if cfg.method == "prune":
        check_tfmot()


def check_tfmot():
    try:
        import tensorflow_model_optimization  # noqa: F401
        import tf_keras  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"--method prune uses TFMOT gradual magnitude pruning, which needs tf_keras and "
            f"tensorflow-model-optimization ({err}). Install them: {TFMOT_HINT}"
        ) from None


# ------------------------------------------------------------------- helpers
def lr_schedule(kind, lr, total_steps, module=None):
    import keras

    schedules = (module or keras).optimizers.schedules
    total_steps = max(1, int(total_steps))
    if kind == "cosine":
        return schedules.CosineDecay(lr, decay_steps=total_steps, alpha=0.0)
    if kind == "step":
        bounds = [max(1, int(0.5 * total_steps)), max(2, int(0.75 * total_steps))]
        return schedules.PiecewiseConstantDecay(bounds, [lr, lr * 0.1, lr * 0.01])
    return lr


def method_callback(cfg):
    import keras_rigl

    cls = {"rigl": keras_rigl.RigL, "set": keras_rigl.SET, "snfs": keras_rigl.SNFS}.get(cfg.method)
    if cfg.method == "static":
        return keras_rigl.Static(seed=cfg.seed)
    if cls is None:
        return None
    return cls(update_freq=cfg.update_freq, drop_fraction=cfg.drop_fraction, seed=cfg.seed)


def _step_logger(base):
    class StepLogger(base):
        """Per-step logs (the batch-level logs of keras plus the learning rate) into a list of dicts."""

        def __init__(self):
            super().__init__()
            self.rows = []
            self.epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            row = {"step": len(self.rows) + 1, "epoch": self.epoch}
            for key, value in (logs or {}).items():
                with contextlib.suppress(TypeError, ValueError):
                    row[key] = float(np.asarray(value))
            opt = self.model.optimizer
            with contextlib.suppress(Exception):
                lr = opt.learning_rate
                row["learning_rate"] = float(np.asarray(lr(opt.iterations) if callable(lr) else lr))
            self.rows.append(row)

    return StepLogger()


def nonzero_params(model):
    """Trainable parameters that can be non-zero: masked weights count their active entries."""
    import keras

    import keras_rigl

    total = int(sum(math.prod(w.shape) for w in model.trainable_weights))
    for layer in keras_rigl.masked_layers(model):
        for mw in layer.masked_weights:
            mask = keras.ops.convert_to_numpy(mw.mask)
            total -= int(mask.size - np.count_nonzero(mask))
    return total


# --------------------------------------------------------------------- train
def _train_keras(cfg, data, total_steps, steps_per_epoch, epochs, run_dir):
    import keras

    import keras_rigl
    from keras_rigl import zoo

    keras.utils.set_random_seed(cfg.seed)
    model = zoo.build_model(cfg.model, data.input_shape, data.num_classes, width=cfg.width)
    if cfg.weights:
        zoo.load_weights_file(model, cfg.weights)
    if cfg.method in SPARSE_METHODS:
        model = keras_rigl.sparsify(
            model, cfg.sparsity, distribution=cfg.distribution,
            mask_init="magnitude" if cfg.weights else "random", seed=cfg.seed,
        )
        if cfg.init == "scaled" and not cfg.weights:
            keras_rigl.rescale_active_weights(model)
    model.compile(
        optimizer=keras.optimizers.SGD(lr_schedule(cfg.lr_schedule, cfg.lr, total_steps), momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    callback = method_callback(cfg)
    logger = _step_logger(keras.callbacks.Callback)
    callbacks = [c for c in (callback, logger) if c is not None]
    if cfg.save:
        callbacks.append(keras.callbacks.CSVLogger(os.path.join(run_dir, "epochs.csv")))
    fit = _fit_args(cfg, data, steps_per_epoch, epochs)
    model.fit(**fit, callbacks=callbacks, verbose=2 if cfg.verbose else 0,
              validation_data=(data.x_test, data.y_test) if cfg.save else None)
    updates = callback.updates if callback is not None else None
    return model, logger.rows, updates


def _fit_args(cfg, data, steps_per_epoch, epochs):
    if cfg.steps is None:
        return dict(x=data.x_train, y=data.y_train, batch_size=cfg.batch_size, epochs=epochs, shuffle=True)
    import tensorflow as tf

    ds = (tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train))
          .shuffle(len(data.x_train), seed=cfg.seed, reshuffle_each_iteration=True)
          .repeat().batch(cfg.batch_size, drop_remainder=True))
    return dict(x=ds, epochs=epochs, steps_per_epoch=steps_per_epoch, shuffle=False)


def _train_prune(cfg, data, total_steps, steps_per_epoch, epochs, run_dir):
    """TFMOT gradual magnitude pruning on the tf_keras twin; weights copied back into a Keras 3 Masked model."""
    import keras
    import tensorflow_model_optimization as tfmot
    import tf_keras

    import keras_rigl
    from keras_rigl import zoo

    tf_keras.utils.set_random_seed(cfg.seed)
    keras.utils.set_random_seed(cfg.seed)
    twin = zoo.build_model(cfg.model, data.input_shape, data.num_classes, width=cfg.width, keras_module=tf_keras)
    if cfg.weights:
        reference = zoo.load_weights_file(zoo.build_model(cfg.model, data.input_shape, data.num_classes, width=cfg.width), cfg.weights)
        twin.set_weights(reference.get_weights())
    end = max(1, int(0.75 * total_steps))
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0, final_sparsity=float(cfg.sparsity), begin_step=0, end_step=end,
        frequency=max(1, min(cfg.update_freq, end)),
    )
    pruned = tfmot.sparsity.keras.prune_low_magnitude(twin, pruning_schedule=schedule)
    pruned.compile(
        optimizer=tf_keras.optimizers.SGD(lr_schedule(cfg.lr_schedule, cfg.lr, total_steps, tf_keras), momentum=0.9),
        loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    logger = _step_logger(tf_keras.callbacks.Callback)
    callbacks = [tfmot.sparsity.keras.UpdatePruningStep(), logger]
    if cfg.save:
        callbacks.append(tf_keras.callbacks.CSVLogger(os.path.join(run_dir, "epochs.csv")))
    pruned.fit(**_fit_args(cfg, data, steps_per_epoch, epochs), callbacks=callbacks, verbose=2 if cfg.verbose else 0,
               validation_data=(data.x_test, data.y_test) if cfg.save else None)
    for row in logger.rows:  # the schedule's target sparsity at that step
        row["sparsity"] = float(schedule(row["step"])[1]) if row["step"] <= end else float(cfg.sparsity)
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    # the Keras 3 twin, masks = where TFMOT left non-zero weights
    model = zoo.build_model(cfg.model, data.input_shape, data.num_classes, width=cfg.width)
    model.set_weights(stripped.get_weights())
    model = keras_rigl.sparsify(model, cfg.sparsity, distribution="uniform", mask_init="magnitude", seed=cfg.seed)
    for layer in keras_rigl.masked_layers(model):
        layer.set_masks({mw.name: keras.ops.convert_to_numpy(mw.weight) != 0 for mw in layer.masked_weights})
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model, logger.rows, None


def plot_curves(steps, epochs_csv, path, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(steps)
    ep = pd.read_csv(epochs_csv) if epochs_csv and os.path.exists(epochs_csv) else None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    spe = int(df["step"].max() / (df["epoch"].max() + 1)) if len(df) else 1
    for ax, key, label in ((axes[0, 0], "loss", "loss"), (axes[0, 1], "accuracy", "accuracy")):
        if key in df:
            ax.plot(df["step"], df[key], lw=0.8, label="train (running mean in epoch)")
        if ep is not None and f"val_{key}" in ep:
            ax.plot((ep["epoch"] + 1) * spe, ep[f"val_{key}"], "o-", label="held-out test")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    ax = axes[1, 0]
    if "sparsity" in df:
        ax.plot(df["step"], df["sparsity"], label="sparsity")
    if "itop" in df:
        ax.plot(df["step"], df["itop"], label="ITOP (share ever active)")
    ax.set_title("sparsity / ITOP")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    if "drop_fraction" in df:
        ax.plot(df["step"], df["drop_fraction"], label="drop fraction")
    if "learning_rate" in df:
        ax.plot(df["step"], df["learning_rate"] / max(df["learning_rate"].max(), 1e-12), "--", label="learning rate (scaled)")
    ax.set_title("drop fraction / learning rate")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _quiet_tf():
    import logging

    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)  # retracing notes when many models are trained in one process


def run(cfg, data=None):
    """Train one configuration; returns a dict of results (see ``main``). ``data``: a preloaded Dataset."""
    import keras
    import pandas as pd

    import keras_rigl
    from keras_rigl import counting, datasets

    check_config(cfg)
    _quiet_tf()
    if data is None:
        data = datasets.load_dataset(cfg.dataset, seed=0)  # the split is fixed; --seed varies the training
    steps_per_epoch = math.ceil(len(data.x_train) / cfg.batch_size)
    if cfg.steps is not None:
        total_steps, epochs, spe = int(cfg.steps), 1, int(cfg.steps)
    else:
        epochs = max(1, int(round(cfg.epochs * cfg.multiplier)))
        total_steps, spe = epochs * steps_per_epoch, steps_per_epoch
    run_name = cfg.run_name or cfg.default_run_name()
    run_dir = os.path.join(cfg.out, run_name)
    if cfg.save:
        os.makedirs(run_dir, exist_ok=True)

    start = time.perf_counter()
    trainer = _train_prune if cfg.method == "prune" else _train_keras
    model, step_rows, updates = trainer(cfg, data, total_steps, spe, epochs, run_dir)
    train_time = time.perf_counter() - start
    loss, accuracy = model.evaluate(data.x_test, data.y_test, verbose=0, batch_size=256)

    steps_done = int(keras.ops.convert_to_numpy(model.optimizer.iterations)) if cfg.method != "prune" else len(step_rows)
    if steps_done == 0:
        steps_done = len(step_rows)
    examples = steps_done * cfg.batch_size
    mf = counting.model_flops(model)
    flop_method = "dense" if cfg.method == "dense" else cfg.method
    train_flops = counting.training_flops(flop_method, mf.sparse, mf.dense, examples, cfg.update_freq)
    dense_train_flops = counting.training_flops("dense", mf.sparse, mf.dense, examples)
    report = keras_rigl.sparsity_report(model) if keras_rigl.masked_layers(model) else None
    result = {
        "run": run_name,
        "method": cfg.method,
        "model": cfg.model,
        "dataset": data.name,
        "sparsity_target": cfg.sparsity if cfg.sparse else 0.0,
        "sparsity": float(report.attrs["sparsity"]) if report is not None else 0.0,
        "seed": cfg.seed,
        "multiplier": cfg.multiplier,
        "width": cfg.width,
        "epochs": epochs,
        "steps": steps_done,
        "batch_size": cfg.batch_size,
        "examples": examples,
        "accuracy": float(accuracy),
        "loss": float(loss),
        "f_sparse": mf.sparse,
        "f_dense": mf.dense,
        "train_flops": float(train_flops),
        "train_flops_dense": float(dense_train_flops),
        "inference_flops": mf.sparse,
        "params": nonzero_params(model),
        "params_total": int(sum(math.prod(w.shape) for w in model.trainable_weights)),
        "wall_time_s": train_time,
        "tflite_bytes": None,
        "mask_updates": int(updates["step"].nunique()) if updates is not None and len(updates) else 0,
    }
    if cfg.save:
        model.save(os.path.join(run_dir, "model.keras"))
    if cfg.tflite:
        tfl_path = os.path.join(run_dir if cfg.save else _tmpdir(), "model.tflite")
        try:
            keras_rigl.export_tflite(model, tfl_path)
            result["tflite_bytes"] = os.path.getsize(tfl_path)
        except Exception as err:  # a model the converter cannot take: keep the run, say why
            print(f"warning: TFLite export failed, no .tflite written ({type(err).__name__}: {str(err)[:300]})",
                  file=sys.stderr)
        else:
            logits = np.asarray(model.predict(data.x_test, verbose=0, batch_size=256))
            lite = np.asarray(keras_rigl.tflite_predict(tfl_path, data.x_test))
            result["tflite_agreement"] = float(np.mean(lite.argmax(-1) == logits.argmax(-1)))
            result["tflite_max_abs_diff"] = float(np.max(np.abs(lite - logits)))
            if not cfg.save:
                os.unlink(tfl_path)

    if cfg.save:
        pd.DataFrame(step_rows).to_csv(os.path.join(run_dir, "steps.csv"), index=False)
        if updates is not None:
            updates.to_csv(os.path.join(run_dir, "mask_updates.csv"), index=False)
        if report is not None:
            report.to_csv(os.path.join(run_dir, "sparsity_report.csv"), index=False)
        with open(os.path.join(run_dir, "metrics.json"), "w") as fh:
            json.dump({**result, "config": dataclasses.asdict(cfg)}, fh, indent=2, default=str)
        plot_curves(step_rows, os.path.join(run_dir, "epochs.csv"), os.path.join(run_dir, "curves.png"),
                    title=f"{run_name}: held-out accuracy {accuracy:.4f}")
    if cfg.verbose:
        _print_summary(result, report, run_dir if cfg.save else None)
    result["run_dir"] = run_dir if cfg.save else None
    return result


_TMP = None


def _tmpdir():
    global _TMP
    if _TMP is None:
        import tempfile

        _TMP = tempfile.mkdtemp(prefix="keras_rigl_train_")
    return _TMP


def _print_summary(r, report, run_dir):
    import pandas as pd

    if report is not None:
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            print("\nPer-layer sparsity (masked weights):")
            print(report.to_string(index=False))
            print(f"total: {report.attrs['active']:,} of {report.attrs['params']:,} masked weights active "
                  f"(sparsity {report.attrs['sparsity']:.4f})")
    print(f"\nHeld-out accuracy: {r['accuracy']:.4f}   loss: {r['loss']:.4f}   ({r['dataset']} test split)")
    print(f"Parameters (non-zero): {r['params']:,} of {r['params_total']:,}")
    print(f"Inference FLOPs / example: {r['inference_flops']:,} vs dense {r['f_dense']:,} "
          f"({r['inference_flops'] / r['f_dense']:.3f}x)")
    print(f"Training FLOPs: {r['train_flops']:.4g} vs dense {r['train_flops_dense']:.4g} "
          f"({r['train_flops'] / r['train_flops_dense']:.3f}x) over {r['steps']} steps x {r['batch_size']}")
    if r.get("tflite_bytes"):
        print(f"Sparse TFLite: {r['tflite_bytes']:,} bytes; agrees with Keras on "
              f"{100 * r['tflite_agreement']:.2f}% of test predictions (max |diff| {r['tflite_max_abs_diff']:.2e})")
    print(f"Wall time (training): {r['wall_time_s']:.1f} s")
    if run_dir:
        print(f"Saved to {run_dir}/")


def main(argv=None):
    parser = build_parser()
    cfg = parse_config(argv)
    try:
        check_config(cfg)
        from keras_rigl import datasets

        data = datasets.load_dataset(cfg.dataset, seed=0)
    except (ValueError, ImportError) as err:
        parser.error(str(err))
    return run(cfg, data)


if __name__ == "__main__":
    main()
