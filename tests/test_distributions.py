"""ER / ERK / uniform densities against hand-computed values."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_rigl import distributions

pytestmark = pytest.mark.any_backend  # no TensorFlow: also run on JAX and PyTorch

# conv (3,3,1,4): 36 params, ERK raw = 11/36, ER raw = (1+4)/(1*4)
# dense (144,10): 1440 params, ERK raw = ER raw = 154/1440
SHAPES = {"conv/kernel": (3, 3, 1, 4), "dense/kernel": (144, 10)}


def test_erk_uncapped_matches_hand_computation():
    d = distributions.layer_densities(SHAPES, 0.9, "erk")
    eps = 0.1 * 1476 / (11 + 154)  # sum raw * size = 11 + 154
    assert d["conv/kernel"] == pytest.approx(eps * 11 / 36)
    assert d["dense/kernel"] == pytest.approx(eps * 154 / 1440)
    assert d["conv/kernel"] == pytest.approx(0.2733333, abs=1e-6)


def test_erk_caps_dense_layer_and_resolves_the_rest():
    d = distributions.layer_densities(SHAPES, 0.5, "erk")
    # first solve gives conv 738/165*11/36 = 1.37 > 1 -> conv dense
    assert d["conv/kernel"] == 1.0
    assert d["dense/kernel"] == pytest.approx((738 - 36) / 1440)


def test_er_uses_last_two_dimensions():
    d = distributions.layer_densities(SHAPES, 0.9, "er")
    eps = 147.6 / (1.25 * 36 + 154)
    assert d["conv/kernel"] == pytest.approx(1.25 * eps)
    assert d["dense/kernel"] == pytest.approx(154 / 1440 * eps)


def test_uniform_keeps_first_layer_dense():
    d = distributions.layer_densities(SHAPES, 0.8, "uniform")
    assert d == {"conv/kernel": 1.0, "dense/kernel": pytest.approx(0.2)}


def test_per_layer_is_honoured_and_the_rest_make_up_the_total():
    d = distributions.layer_densities(SHAPES, 0.9, "erk", per_layer={"conv/kernel": 0.5})
    assert d["conv/kernel"] == 0.5
    assert d["dense/kernel"] * 1440 + 18 == pytest.approx(147.6)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        distributions.layer_densities(SHAPES, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        distributions.layer_densities(SHAPES, -0.1)
    with pytest.raises(ValueError, match="Unknown distribution"):
        distributions.layer_densities(SHAPES, 0.5, "gaussian")
    with pytest.raises(ValueError, match="not among"):
        distributions.layer_densities(SHAPES, 0.5, per_layer={"nope": 0.1})
    with pytest.raises(ValueError, match="more than"):
        distributions.layer_densities(SHAPES, 0.99, per_layer={"dense/kernel": 0.0})


# uniform with per_layer: 36 (first, dense) + 1440 + 100 + 200 = 1776 weights
SHAPES4 = {"first/kernel": (3, 3, 1, 4), "mid/kernel": (144, 10), "a/kernel": (10, 10), "b/kernel": (20, 10)}


def test_uniform_per_layer_others_share_the_remainder_equally():
    d = distributions.layer_densities(SHAPES4, 0.9, "uniform", per_layer={"mid/kernel": 0.95})
    # target 0.1 * 1776 = 177.6 active; first dense 36, mid 0.05 * 1440 = 72; a and b share 69.6 of 300
    assert d["first/kernel"] == 1.0
    assert d["mid/kernel"] == pytest.approx(0.05)
    assert d["a/kernel"] == pytest.approx(0.232) and d["b/kernel"] == pytest.approx(0.232)
    sizes = {"first/kernel": 36, "mid/kernel": 1440, "a/kernel": 100, "b/kernel": 200}
    assert sum(d[n] * sizes[n] for n in sizes) == pytest.approx(177.6)
    # fixing the first layer too: the first is no longer kept dense
    d = distributions.layer_densities(SHAPES4, 0.9, "uniform", per_layer={"first/kernel": 0.5, "mid/kernel": 0.95})
    assert d["first/kernel"] == 0.5
    assert d["a/kernel"] == pytest.approx((177.6 - 18 - 72) / 300)


def test_uniform_per_layer_refuses_what_the_others_cannot_make_up():
    with pytest.raises(ValueError, match="more than the 178 that sparsity=0.9 allows"):
        distributions.layer_densities(SHAPES4, 0.9, "uniform", per_layer={"mid/kernel": 0.5})
    with pytest.raises(ValueError, match="even with every other layer dense"):
        distributions.layer_densities(SHAPES4, 0.2, "uniform", per_layer={"mid/kernel": 0.99})


@pytest.mark.parametrize("distribution", ["erk", "er", "uniform"])
def test_per_layer_for_every_weight_must_agree_with_sparsity(distribution):
    both = {"conv/kernel": 0.5, "dense/kernel": 0.5}
    with pytest.raises(ValueError, match=r"overall sparsity of 0.5, not sparsity=0.9.*sparsity=0.5"):
        distributions.layer_densities(SHAPES, 0.9, distribution, per_layer=both)
    d = distributions.layer_densities(SHAPES, 0.5, distribution, per_layer=both)
    assert d == {"conv/kernel": 0.5, "dense/kernel": 0.5}


def test_uniform_per_layer_for_every_weight_but_the_first_must_agree_with_sparsity():
    # the first stays dense: 36 + 0.1 * 1440 = 180 of 1476 active, sparsity 0.878
    with pytest.raises(ValueError, match=r"first.*dense.*overall sparsity of 0.878, not sparsity=0.9"):
        distributions.layer_densities(SHAPES, 0.9, "uniform", per_layer={"dense/kernel": 0.9})


def test_per_layer_must_be_a_dict():
    with pytest.raises(ValueError, match=r"per_layer must be a dict.*\{'conv/kernel': 0.5\}"):
        distributions.layer_densities(SHAPES, 0.5, per_layer=["conv/kernel"])
    with pytest.raises(ValueError, match=r"per_layer\['conv/kernel'\] must be a number in \[0, 1\)"):
        distributions.layer_densities(SHAPES, 0.5, per_layer={"conv/kernel": "half"})


shape_st = st.lists(st.integers(1, 40), min_size=1, max_size=4).map(tuple)


@settings(max_examples=60, deadline=None)
@given(st.lists(shape_st, min_size=1, max_size=6), st.floats(0.0, 0.99), st.sampled_from(["erk", "er"]))
def test_er_erk_total_active_equals_target(shapes, sparsity, dist):
    named = {f"w{i}": s for i, s in enumerate(shapes)}
    d = distributions.layer_densities(named, sparsity, dist)
    sizes = {n: math.prod(s) for n, s in named.items()}
    assert all(0 < v <= 1.0 + 1e-12 for v in d.values())
    total = sum(d[n] * sizes[n] for n in named)
    assert total == pytest.approx((1 - sparsity) * sum(sizes.values()), rel=1e-9, abs=1e-6)
    counts = distributions.active_counts(named, d)
    assert sum(counts.values()) == round(sum(d[n] * sizes[n] for n in named))
    assert all(abs(counts[n] - d[n] * sizes[n]) < 1 for n in named)
    # ERK ordering: a weight with larger raw density never gets a smaller density
    raws = {n: distributions.raw_density(s, dist) for n, s in named.items()}
    for a in named:
        for b in named:
            if raws[a] > raws[b]:
                assert d[a] >= d[b] - 1e-12


def test_uniform_refuses_a_single_weight_it_would_keep_dense():
    with pytest.raises(ValueError, match=r"only masked weight.*distribution='erk'.*per_layer=\{'dense/kernel': 0.9\}"):
        distributions.layer_densities({"dense/kernel": (144, 10)}, 0.9, "uniform")
    assert distributions.layer_densities({"dense/kernel": (144, 10)}, 0.0, "uniform") == {"dense/kernel": 1.0}
    fixed = distributions.layer_densities({"dense/kernel": (144, 10)}, 0.9, "uniform", per_layer={"dense/kernel": 0.9})
    assert fixed == {"dense/kernel": pytest.approx(0.1)}


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([2, 4, 16]), st.integers(1, 30), st.integers(1, 20), st.integers(0, 15),
                          st.floats(0.0, 1.0)), min_size=1, max_size=5))
def test_block_steps_counts_are_steps_near_their_share(layers):
    """1xk over inputs that are not a multiple of k ("1x16" on a 300-input layer): ``rows`` rows of ``q`` whole
    blocks of k and one last block of r; every count is a step, within one block of its share, and the total
    within half a block of the target."""
    shapes, densities, steps = {}, {}, {}
    for i, (k, q, rows, extra, density) in enumerate(layers):
        r = 1 + extra % (k - 1)
        name = f"w{i}"
        shapes[name], densities[name] = (q * k + r, rows), density
        steps[name] = distributions.BlockSteps(k, q * rows, r, rows)
        # the steps: 0 to the whole weight, one block (k or r entries) at a time, pools in proportion
        count, n = 0, 0
        while steps[name].next(count) is not None:
            after = steps[name].next(count)
            assert after - count in (k, r) and steps[name].floor(after) == after
            assert steps[name].floor(after - 0.5) == count
            count, n = after, n + 1
            whole, last = steps[name].split(n)
            assert abs(whole / (q * rows) - last / rows) <= 1 / rows + 1e-12  # about the same density
        assert count == (q * k + r) * rows and n == (q + 1) * rows
    counts = distributions.active_counts(shapes, densities, steps=steps)
    k_max = max(k for k, *_ in layers)
    for name in shapes:
        size = math.prod(shapes[name])
        assert steps[name].blocks_of(counts[name]) is not None
        assert abs(counts[name] - densities[name] * size) <= steps[name].k  # a tie rounds up, as in units
    target = sum(densities[n] * math.prod(shapes[n]) for n in shapes)
    assert abs(sum(counts.values()) - round(target)) <= k_max / 2
