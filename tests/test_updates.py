"""Drop-and-grow math on tiny tensors, against hand-computed masks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keras import ops

from keras_rigl import updates

pytestmark = pytest.mark.any_backend  # no TensorFlow: also run on JAX and PyTorch


def _np(x):
    return ops.convert_to_numpy(x)


def test_rigl_update_by_hand():
    w = np.array([[0.9, -0.1, 0.0, 0.5], [0.0, 0.05, -0.7, 0.0]], "float32")
    m = np.array([[1, 1, 0, 1], [0, 1, 1, 0]], "float32")  # 5 active
    g = np.array([[0.0, 0.0, 3.0, 0.0], [0.2, 0.0, 0.0, 5.0]], "float32")
    # drop_fraction 0.4 -> k = floor(0.4*5) = 2: drop |w| smallest among active: 0.05, -0.1
    # grow 2 largest |g| among the not kept: (1,3)=5.0 and (0,2)=3.0
    r = updates.drop_and_grow(w, m, np.abs(g), 0.4, seed=0)
    expected = np.array([[1, 0, 1, 1], [0, 0, 1, 1]], "float32")
    np.testing.assert_array_equal(_np(r.new_mask), expected)
    np.testing.assert_array_equal(_np(r.grown), expected.astype(bool) & ~m.astype(bool))
    np.testing.assert_array_equal(_np(r.removed), np.array([[0, 1, 0, 0], [0, 1, 0, 0]], bool))
    assert r.n_moved == 2 and r.n_active == 5


def test_dropped_connection_can_regrow_and_keeps_its_weight_in_rigl():
    w = np.array([0.1, 0.9, 0.0, 0.0], "float32")
    m = np.array([1, 1, 0, 0], "float32")
    scores = np.array([9.0, 0.0, 1.0, 0.0], "float32")  # the dropped one has the top gradient
    r = updates.drop_and_grow(w, m, scores, 0.5, seed=0)  # k = 1, drops index 0, regrows it
    np.testing.assert_array_equal(_np(r.new_mask), m)
    assert not _np(r.grown).any() and r.n_moved == 0
    # SET-style re-initialisation treats it as new
    r = updates.drop_and_grow(w, m, scores, 0.5, seed=0, reinit_regrown=True)
    np.testing.assert_array_equal(_np(r.grown), [True, False, False, False])


def test_apply_update_zeroes_grown_and_removed():
    import keras

    w = keras.Variable(np.array([0.1, 0.9, 0.0, 0.0], "float32"))
    m = keras.Variable(np.array([1, 1, 0, 0], "float32"), trainable=False)
    r = updates.drop_and_grow(w, m, np.array([0, 0, 1.0, 0], "float32"), 0.5, seed=0)
    updates.apply_update(w, m, r)
    np.testing.assert_array_equal(_np(m), [0, 1, 1, 0])
    np.testing.assert_array_equal(_np(w), np.array([0, 0.9, 0, 0], "float32"))  # grown at 0, dropped at 0


def test_ties_follow_the_seed_not_the_index():
    w = np.ones(100, "float32")
    m = np.r_[np.ones(50), np.zeros(50)].astype("float32")
    zeros = np.zeros(100, "float32")
    a = _np(updates.drop_and_grow(w, m, zeros, 0.5, seed=1).new_mask)
    b = _np(updates.drop_and_grow(w, m, zeros, 0.5, seed=1).new_mask)
    c = _np(updates.drop_and_grow(w, m, zeros, 0.5, seed=2).new_mask)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.sum() == 50


def test_nan_gradients_never_win():
    w = np.array([1.0, 2.0, 0, 0], "float32")
    m = np.array([1, 1, 0, 0], "float32")
    scores = np.array([0, 0, np.nan, 1.0], "float32")
    r = updates.drop_and_grow(w, m, scores, 0.5, seed=0)
    np.testing.assert_array_equal(_np(r.new_mask), [0, 1, 0, 1])


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 6),
    st.integers(1, 6),
    st.floats(0.0, 1.0),
    st.floats(0.01, 1.0),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_count_is_conserved_and_kept_are_the_largest(rows, cols, density, fraction, seed, reinit):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(rows, cols)).astype("float32")
    m = (rng.random((rows, cols)) < density).astype("float32")
    scores = rng.random((rows, cols)).astype("float32")
    r = updates.drop_and_grow(w * m, m, scores, fraction, seed=seed, reinit_regrown=reinit)
    new = _np(r.new_mask)
    assert new.sum() == m.sum()  # exactly conserved
    assert set(np.unique(new)) <= {0.0, 1.0}
    k = int(np.floor(fraction * m.sum()))
    active = m.astype(bool)
    assert (new.astype(bool) & ~active).sum() == r.n_moved <= k
    assert _np(r.grown).sum() <= k
    removed = _np(r.removed)
    np.testing.assert_array_equal(removed, active & ~new.astype(bool))
    if removed.any() and active.sum() > k:
        # what was dropped (and not regrown) is never larger than what was kept by magnitude
        threshold = np.sort(np.abs(w[active]))[::-1][int(active.sum()) - k - 1]
        assert np.abs(w[removed]).max() <= threshold
