"""Training and inference FLOPs by the RigL paper's accounting (Evci et al., 2020, appendix H).

Per example, with ``f_D`` the dense and ``f_S`` the sparse forward FLOPs:

* dense training, and TFMOT pruning (counted as dense over its whole
  schedule; an upper bound: the paper integrates the decreasing density, we
  charge pruning as dense throughout): ``3 f_D`` (forward + two backward
  products);
* static sparse and SET: ``3 f_S``;
* SNFS (needs the dense gradient every step): ``2 f_S + f_D``;
* RigL (dense gradient only at the mask updates, every ``ΔT`` steps):
  ``(3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)``.

Training FLOPs = per-example FLOPs x examples seen (steps x batch size).
Inference FLOPs per example = ``f_S`` (``f_D`` for a dense model).

``f_S`` / ``f_D`` come from the model (:func:`model_flops`): masked weights
count their active / full size (``keras_rigl.sparsity_report``); every other
weight matrix (unmasked Dense/Conv/RNN kernels, excluded layers, depthwise
kernels, weights of a dense model) counts dense in both. As in
``keras_rigl.flops``: 2 FLOPs per multiply-add, biases, normalisation and
activations not counted.
"""

from __future__ import annotations

import dataclasses
import math

METHODS = ("dense", "prune", "static", "set", "snfs", "rigl")
_DENSE_LIKE = {"dense", "prune", "dense_flops", "dense_long", "small_dense"}


@dataclasses.dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs per example of a model: ``sparse`` (f_S) and ``dense`` (f_D)."""

    sparse: int
    dense: int
    unknown: tuple = ()  # weights whose positions could not be told (left out)

    @property
    def ratio(self):
        return self.sparse / self.dense if self.dense else 1.0


def _plain_weight_flops(layer, wrapper=None, skip=()):
    """Dense forward FLOPs of the kernels of ``layer`` (depthwise included), except the names in ``skip``."""
    from keras_rigl import flops, maskable

    total, unknown = 0, []
    try:
        refs = maskable.maskable_weights(layer, depthwise=True)
    except ValueError:
        refs = []
    for ref in refs:
        if ref.name in skip:
            continue
        positions = flops.weight_positions(wrapper or layer, ref.owner)
        if positions is None:
            unknown.append(f"{layer.name}/{ref.name}")
            continue
        total += flops.forward_flops(int(math.prod(ref.variable.shape)), positions)
    return total, unknown


def model_flops(model):
    """:class:`ModelFlops` of ``model`` (Masked layers sparse, every other weight layer dense)."""
    import keras

    from keras_rigl.masked import Masked
    from keras_rigl.report import sparsity_report

    report = sparsity_report(model)
    unknown = [f"{r.layer}/{r.weight}" for r in report.itertuples() if r.dense_flops is None or r.dense_flops != r.dense_flops]
    sparse = int(report.attrs["sparse_flops"])
    dense = int(report.attrs["dense_flops"])

    def visit(layer):
        nonlocal sparse, dense
        if isinstance(layer, Masked):
            # weights of a wrapped layer left unmasked (e.g. a SeparableConv's depthwise kernel)
            f, unk = _plain_weight_flops(layer.layer, wrapper=layer, skip={mw.name for mw in layer.masked_weights})
            sparse += f
            dense += f
            unknown.extend(unk)
            return
        if isinstance(layer, keras.Model):
            for child in layer.layers:
                visit(child)
            return
        f, unk = _plain_weight_flops(layer)
        sparse += f
        dense += f
        unknown.extend(unk)

    for layer in model.layers:
        visit(layer)
    return ModelFlops(int(sparse), int(dense), tuple(unknown))


def train_flops_per_example(method, f_sparse, f_dense, update_freq=100):
    """Training FLOPs per example seen for ``method`` (see the module docstring)."""
    method = method.lower()
    if method in _DENSE_LIKE:
        return 3.0 * f_dense
    if method in ("static", "set"):
        return 3.0 * f_sparse
    if method == "snfs":
        return 2.0 * f_sparse + f_dense
    if method == "rigl":
        dt = int(update_freq)
        if dt < 1:
            raise ValueError(f"update_freq must be >= 1, got {update_freq!r}.")
        return (3.0 * f_sparse * dt + 2.0 * f_sparse + f_dense) / (dt + 1)
    raise ValueError(f"unknown method {method!r}; use one of {', '.join(sorted(set(METHODS) | _DENSE_LIKE))}.")


def training_flops(method, f_sparse, f_dense, examples, update_freq=100):
    """Total training FLOPs: per-example FLOPs x ``examples`` seen (steps x batch size)."""
    return train_flops_per_example(method, f_sparse, f_dense, update_freq) * float(examples)


def inference_flops(model):
    """Inference FLOPs per example of ``model``: f_S (equal to f_D for a model without masks)."""
    return model_flops(model).sparse


def equal_flops_steps(target_flops, f_dense, batch_size):
    """Optimizer steps a dense run may take to spend ``target_flops`` (at least 1)."""
    per_step = 3.0 * f_dense * batch_size
    return max(1, int(round(target_flops / per_step)))


def summary(model, method, examples, update_freq=100):
    """Dict of f_S, f_D, training FLOPs (and the dense equivalent) and inference FLOPs of a run."""
    mf = model_flops(model)
    train = training_flops(method, mf.sparse, mf.dense, examples, update_freq)
    dense_train = training_flops("dense", mf.sparse, mf.dense, examples)
    return {
        "f_sparse": mf.sparse,
        "f_dense": mf.dense,
        "train_flops": train,
        "train_flops_dense": dense_train,
        "train_flops_ratio": train / dense_train if dense_train else 1.0,
        "inference_flops": mf.sparse,
        "inference_flops_dense": mf.dense,
    }
