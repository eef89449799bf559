"""One training run of scripts/train.py: configuration, training, metrics and the run directory.

``run(Config(...))`` trains one configuration and returns a dict of results;
scripts/train.py is its command line and scripts/compare.py calls it per grid cell.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

from rigl_harness import datasets, library, zoo

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


# --------------------------------------------------------------------- train
def _train_keras(cfg, data, total_steps, steps_per_epoch, epochs, run_dir):
    import keras

    import keras_rigl
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
    library.masks_from_weights(model)
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
    flops = library.training_flops_summary(model, library.flops_method(cfg.method), examples,
                                           update_freq=cfg.update_freq)
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
        "f_sparse": flops["f_sparse"],
        "f_dense": flops["f_dense"],
        "train_flops": float(flops["train_flops"]),
        "train_flops_dense": float(flops["train_flops_dense"]),
        "inference_flops": flops["inference_flops"],
        "params": library.count_nonzero_params(model),
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
