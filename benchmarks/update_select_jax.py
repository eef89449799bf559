"""The JAX compiled mask update: partial selection (top_k / active-only sort) vs the full sort of every entry.

Both selections give the same masks (tests/test_compiled_update_jax.py); this
times them, interleaved round by round (the order reverses every round), one
``CompiledUpdateJax`` call each (traced in a warm-up first, synchronised by
the counts it reads back), and prints min and median per variant and the
ratio full / partial.

  --case one-layer  one Conv2D 3x3x512x512 kernel at 2% density (--density)
  --case resnet50   keras.applications.ResNet50 (--image-size), ERK at --sparsity

The dense gradient is a random normal written into the gradient probes (the
scores a real step leaves there; all-zero probes would be one big tie).
Run on a quiet machine (JAX on CPU or GPU):
    KERAS_BACKEND=jax python benchmarks/update_select_jax.py --case one-layer --rounds 7
    KERAS_BACKEND=jax python benchmarks/update_select_jax.py --case resnet50 --rounds 7
Check that it runs (seconds):
    KERAS_BACKEND=jax python benchmarks/update_select_jax.py --case one-layer --rounds 1 --channels 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import keras
import numpy as np

import keras_rigl
from keras_rigl.compiled_update_jax import CompiledUpdateJax


def build(args):
    keras.utils.set_random_seed(0)
    if args.case == "one-layer":
        inp = keras.Input((8, 8, args.channels))
        model = keras.Model(inp, keras.layers.Conv2D(args.channels, 3, use_bias=False)(inp))
        return keras_rigl.sparsify(model, 1.0 - args.density, distribution="erk", seed=0)  # one weight: its density
    model = keras.applications.ResNet50(weights=None, input_shape=(args.image_size, args.image_size, 3), classes=10)
    return keras_rigl.sparsify(model, args.sparsity, seed=0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=("one-layer", "resnet50"), default="one-layer")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--channels", type=int, default=512, help="one-layer: in and out channels of the 3x3 kernel")
    p.add_argument("--density", type=float, default=0.02, help="one-layer: share of active entries")
    p.add_argument("--sparsity", type=float, default=0.9, help="resnet50: ERK sparsity")
    p.add_argument("--image-size", type=int, default=64, help="resnet50: input size")
    p.add_argument("--fraction", type=float, default=0.3, help="drop fraction of the timed update")
    args = p.parse_args(argv)
    if keras.backend.backend() != "jax":
        p.error("run with KERAS_BACKEND=jax")
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if not 0.0 < args.density < 1.0:
        p.error("--density must be in (0, 1)")
    model = build(args)
    weights = [mw for layer in keras_rigl.masked_layers(model) for mw in layer.masked_weights]
    rng = np.random.default_rng(0)
    for mw in weights:
        mw.capture.probe.assign(rng.normal(size=mw.capture.probe.shape).astype("float32"))
    seeds = list(range(1, len(weights) + 1))
    variants = {"partial": CompiledUpdateJax(weights, grow_by="gradient"),
                "full sort": CompiledUpdateJax(weights, grow_by="gradient", full_sort=True)}
    size = sum(int(np.prod(mw.mask.shape)) for mw in weights)
    print(f"{args.case}: {len(weights)} masked weights, {size} entries; backend {keras.backend.backend()}, "
          f"device {__import__('jax').default_backend()}")
    for update in variants.values():
        update(args.fraction, seeds)  # trace
    times = {name: [] for name in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in order:
            start = time.perf_counter()
            variants[name](args.fraction, seeds)  # reads the counts back: synchronised
            times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:10s} min {min(values):.4f} s  median {statistics.median(values):.4f} s")
    print(f"full sort / partial: min {min(times['full sort']) / min(times['partial']):.2f}x  "
          f"median {statistics.median(times['full sort']) / statistics.median(times['partial']):.2f}x")


if __name__ == "__main__":
    main()
