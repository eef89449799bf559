"""One training run of scripts/train.py: configuration, training, metrics and the run directory.

``run(Config(...))`` trains one configuration and returns a dict of results;
scripts/train.py is its command line and scripts/compare.py calls it per grid cell.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import time

import numpy as np

from rigl_harness import atomic, datasets, zoo

METHODS = ("rigl", "set", "snfs", "static", "dense", "prune")
SPARSE_METHODS = ("rigl", "set", "snfs", "static")
DYNAMIC_METHODS = ("rigl", "set", "snfs")  # methods whose masks change during training
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
    out: str = "runs"  # gitignored; the committed example in saved_models/ only by an explicit --out
    run_name: str | None = None
    overwrite: bool = False  # replace an existing run folder (swapped in only when the new run completes)
    input_scale: str = "auto"  # .npz inputs: auto | none | 255 (decided from the training split)
    steps: int | None = None  # total optimizer steps (overrides epochs x multiplier)
    width: float = 1.0  # hidden-size multiplier (small-dense baseline)
    init: str = "scaled"  # "scaled": sparse-aware init of masked weights; "dense": the layer's own init
    structure: str = "none"  # keras_rigl structure of the masks ("1x4", "2:4", "fan_in"); "none": unstructured
    unstructured_layers: tuple = ()  # layers sparse but without the structure (sparsify's per_layer_structure)
    save: bool = True  # write the model, logs and plots
    tflite: bool = True  # export the sparse .tflite
    verbose: int = 2  # 2: Keras progress, sparsity table and results; 1: the result lines only; 0: silent

    @property
    def sparse(self):
        return self.method in SPARSE_METHODS or self.method == "prune"

    def default_run_name(self):
        data = os.path.splitext(os.path.basename(self.dataset))[0]
        name = f"{data}_{self.model}_{self.method}"
        if self.structure != "none":  # "2:4" -> "2of4", "fan_in(unit_sparsity=0.5)" -> "fan_in-unit_sparsity-0.5"
            plain = re.sub(r"[^A-Za-z0-9._]+", "-", self.structure.replace(":", "of"))
            name += "_" + plain.strip("-")
        if self.unstructured_layers:
            name += "_plain-" + "-".join(self.unstructured_layers)
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
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, (int, np.integer)) or cfg.seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {cfg.seed!r}.")
    if cfg.weights is not None:
        zoo.check_weights_file(cfg.weights)
    if cfg.structure != "none":
        cfg.structure = canonical_structure(cfg.structure)
        if cfg.method not in SPARSE_METHODS:
            raise ValueError(f"--structure {cfg.structure} needs a sparse-from-scratch method "
                             f"({', '.join(SPARSE_METHODS)}); {cfg.method} cannot keep a structure: "
                             "drop --structure or change --method.")
    if cfg.unstructured_layers and cfg.structure == "none":
        raise ValueError(f"--unstructured-layers {','.join(cfg.unstructured_layers)} needs a --structure for the "
                         "other layers (every layer is unstructured without one): add --structure or drop it.")
    if cfg.steps is not None and cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}.")
    if cfg.method == "prune":
        check_tfmot()


def check_layer_names(cfg, data):
    """``--unstructured-layers`` names layers of the model, or a one-line ValueError listing the ones it has.

    Needs the data's shapes (the model is built to read its layer names), so it runs after the data loads
    and before a run folder or training starts; whether a named layer is masked is sparsify's check.
    """
    if not cfg.unstructured_layers:
        return
    import keras

    model = zoo.build_model(cfg.model, data.input_shape, data.num_classes, width=cfg.width)
    names = [layer.name for layer in model.layers if layer.weights]
    del model
    keras.backend.clear_session()  # the real build starts from the same state as without this check
    unknown = [name for name in cfg.unstructured_layers if name not in names]
    if unknown:
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        raise ValueError(f"--unstructured-layers {','.join(unknown)}: the {cfg.model} model has no layer of "
                         f"that name; its layers with weights: {shown}.")


STRUCTURE_FORMS = "none (unstructured), 1xk (e.g. 1x4), N:M (e.g. 2:4) or fan_in"


def canonical_structure(text):
    """The structure's own spelling (``"1X4"`` -> ``"1x4"``, ``"unstructured"`` -> ``"none"``), or a
    ValueError naming the accepted forms; the library decides what a structure is."""
    if not isinstance(text, str) or text.strip().lower() in ("", "none"):
        return "none"
    from keras_rigl import structure as structures

    try:
        spec = structures.get(text).spec
    except (TypeError, ValueError) as err:
        raise ValueError(f"unknown structure {text.strip()!r}; use {STRUCTURE_FORMS} "
                         f"(keras_rigl: {str(err).splitlines()[0]})") from None
    return "none" if spec == structures.Unstructured.name else spec


def structure_exclusions(model, structure, unstructured_layers=()):
    """``{layer name: reason}`` of the maskable layers whose weights cannot carry ``structure``.

    Asked of the structure itself (``check_shape``, the test ``keras_rigl.sparsify`` applies before it
    refuses a layer), so the harness leaves exactly those layers dense, e.g. a first convolution with 1
    or 3 input channels under "1x4" or "2:4". Layers in ``unstructured_layers`` are not among them: they
    are sparse without the structure (``--unstructured-layers``), not dense.
    """
    if canonical_structure(structure) == "none":
        return {}
    import keras

    from keras_rigl import maskable
    from keras_rigl import structure as structures
    from keras_rigl.sparsify import all_layers

    spec = structures.get(structure)
    refused = {}
    for layer in all_layers(model):
        if isinstance(layer, keras.Model) or not maskable.is_maskable(layer):
            continue
        for ref in maskable.maskable_weights(layer):
            try:
                spec.check_shape(tuple(ref.variable.shape), f"Layer {layer.name!r} weight {ref.name!r}")
            except ValueError as err:
                refused.setdefault(layer.name, str(err).split("; leave the layer dense")[0])
    return {name: why for name, why in refused.items() if name not in unstructured_layers}


def exclusion_note(structure, refused, sparsity=None):
    """The line printed when layers are left dense for a structure (None when none is)."""
    if not refused:
        return None
    target = f"the {sparsity:g} sparsity target" if sparsity is not None else "the sparsity target"
    return (f"note: structure {structure} cannot be carried by {', '.join(sorted(refused))} "
            f"({'; '.join(refused[name] for name in sorted(refused))}): left dense; {target} applies "
            "to the remaining masked layers.")


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
    refused = {}
    if cfg.method in SPARSE_METHODS:
        refused = structure_exclusions(model, cfg.structure, cfg.unstructured_layers)
        note = exclusion_note(cfg.structure, refused, cfg.sparsity)
        if note and cfg.verbose:
            print(note)
        model = keras_rigl.sparsify(
            model, cfg.sparsity, distribution=cfg.distribution,
            mask_init="magnitude" if cfg.weights else "random", seed=cfg.seed,
            structure=None if cfg.structure == "none" else cfg.structure, exclude=sorted(refused) or None,
            per_layer_structure={name: None for name in cfg.unstructured_layers} or None,
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
    # a non-finite loss stops training: the run is then reported as failed, not as a result
    callbacks = [c for c in (callback, logger, keras.callbacks.TerminateOnNaN()) if c is not None]
    if cfg.save:
        callbacks.append(keras.callbacks.CSVLogger(os.path.join(run_dir, "epochs.csv")))
    fit = _fit_args(cfg, data, steps_per_epoch, epochs)
    model.fit(**fit, callbacks=callbacks, verbose=2 if cfg.verbose >= 2 else 0,
              validation_data=(data.x_test, data.y_test) if cfg.save else None)
    updates = callback.updates if callback is not None else None
    return model, logger.rows, updates, sorted(refused) if cfg.method in SPARSE_METHODS else []


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
    callbacks = [tfmot.sparsity.keras.UpdatePruningStep(), logger, tf_keras.callbacks.TerminateOnNaN()]
    if cfg.save:
        callbacks.append(tf_keras.callbacks.CSVLogger(os.path.join(run_dir, "epochs.csv")))
    pruned.fit(**_fit_args(cfg, data, steps_per_epoch, epochs), callbacks=callbacks,
               verbose=2 if cfg.verbose >= 2 else 0,
               validation_data=(data.x_test, data.y_test) if cfg.save else None)
    for row in logger.rows:  # the schedule's target sparsity at that step
        row["sparsity"] = float(schedule(row["step"])[1]) if row["step"] <= end else float(cfg.sparsity)
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    # the Keras 3 twin, masks = where TFMOT left non-zero weights
    model = zoo.build_model(cfg.model, data.input_shape, data.num_classes, width=cfg.width)
    model.set_weights(stripped.get_weights())
    model = keras_rigl.sparsify(model, cfg.sparsity, distribution="uniform", mask_init="magnitude", seed=cfg.seed)
    keras_rigl.masks_from_weights(model)
    # the optimizer the twin trained with, built, so the saved model.keras loads without an optimizer mismatch
    model.compile(optimizer=keras.optimizers.SGD(cfg.lr, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.optimizer.build(model.trainable_variables)
    return model, logger.rows, None, []


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

    import keras

    if keras.backend.backend() != "tensorflow":
        return  # JAX/PyTorch runs need no TensorFlow installed
    import tensorflow as tf

    tf.get_logger().setLevel(logging.ERROR)  # retracing notes when many models are trained in one process


def _plan(cfg, data):
    """(total_steps, epochs, steps per epoch) of a configuration."""
    steps_per_epoch = math.ceil(len(data.x_train) / cfg.batch_size)
    if cfg.steps is not None:
        return int(cfg.steps), 1, int(cfg.steps)
    epochs = max(1, int(round(cfg.epochs * cfg.multiplier)))
    return epochs * steps_per_epoch, epochs, steps_per_epoch


def _failure(step_rows, loss, model):
    """Why a finished fit is not a result (non-finite loss or weights), or None."""
    import keras

    losses = [row.get("loss") for row in step_rows if "loss" in row]
    if losses and not all(math.isfinite(v) for v in losses):
        bad = next(row["step"] for row in step_rows if "loss" in row and not math.isfinite(row["loss"]))
        return f"non-finite training loss at step {bad}; training stopped (lower --lr)"
    if not math.isfinite(loss):
        return "non-finite held-out loss; the model diverged (lower --lr)"
    for w in model.weights:
        if not np.all(np.isfinite(keras.ops.convert_to_numpy(w))):
            return f"non-finite weights in {w.path}; the model diverged (lower --lr)"
    return None


def run(cfg, data=None):
    """Train one configuration; returns a dict of results (see ``scripts/train.py``).

    ``data``: a preloaded :class:`rigl_harness.datasets.Dataset`. With ``cfg.save`` the run is written into
    a staged folder swapped in as ``cfg.out/<run>`` only when complete (:class:`rigl_harness.atomic.RunFolder`).
    A run whose loss went non-finite comes back with ``status == "failed"`` and a ``failure`` reason.
    """
    check_config(cfg)
    _quiet_tf()
    if data is None:  # the split is fixed (seed 0); --seed varies the training
        data = datasets.load_dataset(cfg.dataset, seed=0, input_scale=cfg.input_scale)
    total_steps, epochs, spe = _plan(cfg, data)
    run_name = cfg.run_name or cfg.default_run_name()
    folder = atomic.RunFolder(cfg.out, run_name, overwrite=cfg.overwrite) if cfg.save else None
    stage = folder.begin() if folder else None
    try:
        result, report = _train_and_measure(cfg, data, total_steps, spe, epochs, run_name, stage,
                                            folder.final if folder else None)
        if folder:
            folder.commit()
    except BaseException:
        if folder:
            folder.abandon()
        raise
    if cfg.verbose:
        _print_summary(result, report if cfg.verbose >= 2 else None, result["run_dir"])
    return result


def _train_and_measure(cfg, data, total_steps, spe, epochs, run_name, stage, run_dir):
    import keras

    import keras_rigl

    start = time.perf_counter()
    trainer = _train_prune if cfg.method == "prune" else _train_keras
    model, step_rows, updates, dense_layers = trainer(cfg, data, total_steps, spe, epochs, stage)
    train_time = time.perf_counter() - start
    loss, accuracy = model.evaluate(data.x_test, data.y_test, verbose=0, batch_size=256)

    steps_done = int(keras.ops.convert_to_numpy(model.optimizer.iterations)) if cfg.method != "prune" else len(step_rows)
    if steps_done == 0:
        steps_done = len(step_rows)
    examples = steps_done * cfg.batch_size
    mask_updates = int(updates["step"].nunique()) if updates is not None and len(updates) else 0
    # the dense gradient was computed only on the steps where RigL really updated the masks
    update_examples = mask_updates * cfg.batch_size if cfg.method == "rigl" else None
    flops = keras_rigl.training_flops_summary(model, cfg.method, examples, update_freq=cfg.update_freq,
                                              update_examples=update_examples)
    report = keras_rigl.sparsity_report(model) if keras_rigl.masked_layers(model) else None
    failure = _failure(step_rows, float(loss), model)
    result = {
        "run": run_name,
        "status": "failed" if failure else "ok",
        "failure": failure,
        "method": cfg.method,
        "structure": cfg.structure,
        "unstructured_layers": list(cfg.unstructured_layers),
        # maskable layers left dense because they cannot carry the structure (structure_exclusions)
        "dense_layers": dense_layers,
        "model": cfg.model,
        "dataset": data.name,
        "input_scale": data.input_scale,
        "sparsity_target": cfg.sparsity if cfg.sparse else 0.0,
        # of the masked weights (what --sparsity aims at); every kernel counted: sparsity_all_kernels
        "sparsity": float(report.attrs.get("masked_sparsity", report.attrs["sparsity"])) if report is not None else 0.0,
        "sparsity_all_kernels": float(report.attrs["sparsity"]) if report is not None else 0.0,
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
        "params": keras_rigl.count_nonzero_params(model),
        # not the gradient probes of JAX/PyTorch (keras_rigl.backend_capture): no parameters
        "params_total": int(sum(math.prod(w.shape) for w in model.trainable_weights
                                if not keras_rigl.backend_capture.is_probe(w))),
        "wall_time_s": train_time,
        "tflite_bytes": None,
        "mask_updates": mask_updates,
        "run_dir": run_dir,  # where the staged folder will be swapped in
    }
    if cfg.method in DYNAMIC_METHODS and mask_updates == 0 and not failure:
        result["warning"] = (f"{cfg.method} made no mask update during training (the first update step, "
                             f"{cfg.update_freq}, is past the end of updates at 75% of {steps_done} steps): "
                             "this run was static sparse training; lower --update-freq or train longer.")
        if cfg.verbose:
            print(f"warning: {result['warning']}", file=sys.stderr)
    if stage and not failure:
        atomic.write_file(os.path.join(stage, "model.keras"), model.save)
    if cfg.tflite and not failure:
        _export_and_compare(cfg, model, data, result, stage)
    if stage:
        import pandas as pd

        atomic.write_csv(os.path.join(stage, "steps.csv"), pd.DataFrame(step_rows))
        if updates is not None:
            atomic.write_csv(os.path.join(stage, "mask_updates.csv"), updates)
        if report is not None:
            atomic.write_csv(os.path.join(stage, "sparsity_report.csv"), report)
        atomic.write_json(os.path.join(stage, "metrics.json"), {**result, "config": dataclasses.asdict(cfg)})
        title = f"{run_name}: " + (f"FAILED ({failure})" if failure else f"held-out accuracy {accuracy:.4f}")
        atomic.write_file(os.path.join(stage, "curves.png"),
                          lambda tmp: plot_curves(step_rows, os.path.join(stage, "epochs.csv"), tmp, title=title))
    return result, report


def _export_and_compare(cfg, model, data, result, stage):
    import tempfile

    import keras

    import keras_rigl

    if keras.backend.backend() != "tensorflow":
        # TFLite conversion traces the model with TensorFlow: export the saved model.keras there.
        where = os.path.join(cfg.out, cfg.run_name or cfg.default_run_name(), "model.keras") if stage else "model.keras"
        print(f"note: no .tflite on the {keras.backend.backend()} backend; export under TensorFlow: "
              f"python scripts/export.py {where}", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory(prefix="rigl_harness_") as scratch:
        tfl_path = os.path.join(stage or scratch, "model.tflite")
        try:
            keras_rigl.export_tflite(model, tfl_path)
        except Exception as err:  # a model the converter cannot take: keep the run, say why
            print(f"warning: TFLite export failed, no .tflite written ({type(err).__name__}: {str(err)[:300]})",
                  file=sys.stderr)
            return
        result["tflite_bytes"] = os.path.getsize(tfl_path)
        try:
            parity = keras_rigl.tflite_parity(model, tfl_path, data.x_test)
        except ValueError as err:  # non-finite outputs: no agreement to report
            print(f"warning: Keras/TFLite parity not measured ({err})", file=sys.stderr)
            return
        result["tflite_agreement"] = parity["agreement"]
        result["tflite_max_abs_diff"] = parity["max_abs_diff"]


def _print_summary(r, report, run_dir):
    if report is not None:
        print("\nPer-kernel sparsity:")
        print(report)
    if r["status"] != "ok":
        print(f"\nRun FAILED: {r['failure']}")
        if run_dir:
            print(f"Logs saved to {run_dir}/")
        return
    if r.get("structure", "none") != "none":
        print(f"\nStructure: {r['structure']}" + (f" (left dense: {', '.join(r['dense_layers'])})"
                                                   if r["dense_layers"] else ""))
    print(f"\nHeld-out accuracy: {r['accuracy']:.4f}   loss: {r['loss']:.4f}   ({r['dataset']} test split)")
    print(f"Parameters (non-zero): {r['params']:,} of {r['params_total']:,}")
    print(f"Inference FLOPs / example: {r['inference_flops']:,} vs dense {r['f_dense']:,} "
          f"({r['inference_flops'] / r['f_dense']:.3f}x)")
    print(f"Training FLOPs: {r['train_flops']:.4g} vs dense {r['train_flops_dense']:.4g} "
          f"({r['train_flops'] / r['train_flops_dense']:.3f}x) over {r['steps']} steps x {r['batch_size']}"
          + (f", {r['mask_updates']} mask updates" if r["method"] in DYNAMIC_METHODS else ""))
    if r.get("tflite_bytes"):
        print(f"Sparse TFLite: {r['tflite_bytes']:,} bytes; agrees with Keras on "
              f"{100 * r['tflite_agreement']:.2f}% of test predictions (max |diff| {r['tflite_max_abs_diff']:.2e})")
    print(f"Wall time (training): {r['wall_time_s']:.1f} s")
    if run_dir:
        print(f"Saved to {run_dir}/")
