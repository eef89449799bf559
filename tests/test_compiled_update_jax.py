"""The JAX compiled update (keras_rigl.compiled_update_jax) against the NumPy reference, in a JAX subprocess.

Same masks (bit-identical), weights and optimizer slots as
:func:`keras_rigl.updates.drop_and_grow` for the same scores and seeds, on
tiny weights with many ties and on a small CNN after real ``model.fit`` steps;
and RigL inside ``model.fit`` on JAX takes the compiled path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent(
    r"""
    import os
    import keras, numpy as np
    assert keras.backend.backend() == "jax"
    import keras_rigl
    from keras_rigl import compiled_update_jax as cj, optimizer_state, updates

    # 1) one weight: every selection equals the reference's, ties and specials included
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(80):
        shape = tuple(rng.integers(1, 7, rng.integers(1, 4)))
        m = (rng.random(shape) < rng.random()).astype("float32")
        levels = int(rng.choice([1, 2, 3, 1000]))
        w = (rng.integers(0, levels, shape) - levels // 2).astype("float32") * m
        scores = rng.integers(0, levels, shape).astype("float32")
        special = rng.choice([None, np.nan, np.inf, -np.inf, -0.0])
        if special is not None:
            scores.reshape(-1)[rng.integers(0, scores.size)] = special
        fraction = float(rng.choice([0.0, 0.01, 0.3, 0.5, 1.0, rng.random()]))
        seed = int(rng.integers(0, 2**32))
        reinit = bool(rng.integers(0, 2))
        ref = updates.drop_and_grow(w, m, scores, fraction, seed=seed, reinit_regrown=reinit)
        n = int(m.sum())
        k = int(np.floor(fraction * n))
        # the full sorts (n_active=None) and the partial selection (the active count, static;
        # CompiledUpdateJax leaves dense and empty weights alone, with k = 0 and n_active = 0)
        for n_active in (None, n) if 0 < n < m.size else (None,):
            new_active, grown, removed, n_moved = cj.select(
                w, m, np.abs(scores), k, np.uint32(updates.stream_key(seed, updates.STREAM_DROP)),
                np.uint32(updates.stream_key(seed, updates.STREAM_GROW)), reinit, n_active=n_active)
            assert np.array_equal(np.asarray(new_active).reshape(shape), ref.new_mask != 0), (trial, n_active)
            assert np.array_equal(np.asarray(grown).reshape(shape), ref.grown), (trial, n_active)
            assert np.array_equal(np.asarray(removed).reshape(shape), ref.removed), (trial, n_active)
            assert int(n_moved) == ref.n_moved, (trial, n_active)
        checked += 1

    # 1b) where a threshold of the partial selection misses: ties at the k-th score larger than
    # the ties wanted, all scores equal, k = every active entry, and the tie whose hash is 0
    # (index == grow key: its low half is the top_k sentinel value)
    def partial_vs_full(w, m, scores, k, drop_key, grow_key):
        n = int(m.sum())
        full = cj.select(w, m, scores, k, np.uint32(drop_key), np.uint32(grow_key), False)
        part = cj.select(w, m, scores, k, np.uint32(drop_key), np.uint32(grow_key), False, n_active=n)
        for a, b in zip(full, part):
            assert np.array_equal(np.asarray(a), np.asarray(b)), (k, drop_key, grow_key, np.asarray(a), np.asarray(b))
        return np.asarray(part[0])
    m = np.zeros(40, "float32"); m[::4] = 1  # 10 active
    w = np.linspace(-1, 1, 40).astype("float32") * m
    for grow_key in (0, 3, 17, 2**32 - 1):
        for scores in (np.zeros(40, "float32"), np.ones(40, "float32"),
                       np.where(np.arange(40) % 3 == 0, 1.0, 0.0).astype("float32"),
                       np.where(np.arange(40) < 5, 2.0, 1.0).astype("float32")):
            for k in (0, 1, 4, 9, 10):
                got = partial_vs_full(w, m, scores, k, 5, grow_key)
                assert got.sum() == 10
                checked += 1
    # 1c) a weight large enough for a strided sample (stride 2): all-zero scores (the floor is
    # reached by more entries than the gathered set holds), a sample that sees only the large
    # scores (the floor is reached by fewer than k), and normal scores (the floor holds)
    size = 40000
    m = (np.arange(size) % 13 == 0).astype("float32")
    w = rng.normal(size=size).astype("float32") * m
    n = int(m.sum())
    for scores in (np.zeros(size, "float32"), np.where(np.arange(size) % 2 == 0, 10.0, 1.0).astype("float32"),
                   np.abs(rng.normal(size=size)).astype("float32")):
        for k in (1, n // 3, n):
            ref = updates.drop_and_grow(w, m, scores, k / n, seed=9)
            assert int(np.floor(k / n * n)) == k
            got = partial_vs_full(w, m, scores, k, updates.stream_key(9, updates.STREAM_DROP),
                                  updates.stream_key(9, updates.STREAM_GROW))
            assert np.array_equal(got, ref.new_mask != 0), k
            checked += 1
    # SET's random scores: the reference's numbers
    key = updates.stream_key(77, updates.STREAM_RANDOM)
    assert np.array_equal(np.asarray(cj.random_scores((5, 7), np.uint32(key))), updates.random_scores((5, 7), 77))

    # 2) a whole model after real fit steps: masks, weights and both Adam moments as the NumPy path
    def model():
        keras.utils.set_random_seed(0)
        inp = keras.Input((8, 8, 1))
        x = keras.layers.Conv2D(8, 3, activation="relu")(inp)
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(32, activation="relu")(x)
        m = keras_rigl.sparsify(keras.Model(inp, keras.layers.Dense(10)(x)), 0.8, seed=0)
        m.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return m
    x, y = rng.normal(size=(32, 8, 8, 1)).astype("float32"), rng.integers(0, 10, 32)
    for grow_by, reinit in (("gradient", False), ("random", True)):
        mdl = model()
        layers = keras_rigl.masked_layers(mdl)
        for layer in layers:
            layer.set_capture_mode(1)
        mdl.fit(x, y, batch_size=16, epochs=1, verbose=0)
        weights = [mw for layer in layers for mw in layer.masked_weights]
        seeds = [updates.update_seed(5, 100, i + 1) for i in range(len(weights))]
        expected = []
        for mw, seed in zip(weights, seeds):
            w, m = keras.ops.convert_to_numpy(mw.weight), keras.ops.convert_to_numpy(mw.mask)
            scores = (np.abs(keras.ops.convert_to_numpy(mw.capture.read())) if grow_by == "gradient"
                      else updates.random_scores(m.shape, seed))
            f = 0.3 if 0 < m.sum() < m.size else 0.0
            r = updates.drop_and_grow(w, m, scores, f, seed=seed, reinit_regrown=reinit)
            slots = [np.where(r.grown | r.removed, reset, keras.ops.convert_to_numpy(s))
                     for s, reset in optimizer_state.slot_variables(mdl.optimizer, mw.weight)]
            expected.append((r, np.where(r.grown, 0, w) * r.new_mask, slots))
        assert any(r.n_moved > 0 for r, _, _ in expected)
        counts = cj.CompiledUpdateJax(weights, grow_by=grow_by, reinit_regrown=reinit, optimizer=mdl.optimizer)(0.3, seeds)
        for i, (mw, (r, new_w, slots)) in enumerate(zip(weights, expected)):
            assert np.array_equal(keras.ops.convert_to_numpy(mw.mask), r.new_mask)
            assert np.array_equal(keras.ops.convert_to_numpy(mw.weight), new_w)
            got = [keras.ops.convert_to_numpy(s) for s, _ in optimizer_state.slot_variables(mdl.optimizer, mw.weight)]
            assert len(got) == 2 and all(np.array_equal(a, b) for a, b in zip(got, slots))
            assert counts.n_active[i] == r.n_active and counts.n_moved[i] == r.n_moved

    # 3) RigL in model.fit on JAX runs compiled and keeps the sparsity exact
    mdl = model()
    before = [int(keras.ops.convert_to_numpy(mw.mask).sum()) for l in keras_rigl.masked_layers(mdl) for mw in l.masked_weights]
    rigl = keras_rigl.RigL(update_freq=2, seed=3, compiled=True)
    mdl.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[rigl])
    assert any(type(u).__name__ == "CompiledUpdateJax" for u in mdl._keras_rigl_compiled_updates.values())
    after = [int(keras.ops.convert_to_numpy(mw.mask).sum()) for l in keras_rigl.masked_layers(mdl) for mw in l.masked_weights]
    assert before == after and len(rigl.updates) > 0 and int(rigl.updates["n_moved"].sum()) > 0, rigl.updates.head()
    print("JAX_COMPILED_OK", checked)
    """
)


def test_jax_compiled_update_equals_the_numpy_reference(tmp_path):
    python = os.environ.get("KERAS_RIGL_BACKEND_PYTHON", sys.executable)
    probe = subprocess.run([python, "-c", "import jax"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"jax is not importable by {python}: pip install -e '.[jax]' (or set KERAS_RIGL_BACKEND_PYTHON)")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([python, str(script)], capture_output=True, text=True, timeout=600, env=env)
    assert "JAX_COMPILED_OK 169" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]
