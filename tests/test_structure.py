"""Structured sparsity ("1xk" blocks, "N:M" groups): parsing, masks, the update, distributions, training.

Expected masks are written by hand or computed by the slow reference loops
below, which index the kernel directly (``w[..., b*k:(b+1)*k, j]``) instead of
going through the module's row layout.
"""

import logging
import os

import keras
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import keras_rigl
from keras_rigl import distributions, updates
from keras_rigl import structure as S


# ------------------------------------------------------------ references
def groups_of(shape, size):
    """Index tuples of every block/group of ``size`` consecutive inputs of one output unit, one position;
    with inputs not a multiple of ``size``, the last, shorter block of every row too."""
    *spatial, n_in, n_out = shape
    out = []
    for position in np.ndindex(*spatial):
        for j in range(n_out):
            for b in range(-(-n_in // size)):
                out.append([position + (i, j) for i in range(b * size, min((b + 1) * size, n_in))])
    return out


def blocks_hold(mask, k):
    return all(len({bool(mask[i]) for i in block}) == 1 for block in groups_of(mask.shape, k))


def n_of_m_holds(mask, n, m):
    return all(sum(bool(mask[i]) for i in group) <= n for group in groups_of(mask.shape, m))


def reference_blocks_update(w, mask, grow, fraction, k, blocks=None):
    """Drop the floor(f * active blocks) active blocks of smallest sum |w|, grow as many of the largest
    sum grow score among the rest (distinct sums assumed)."""
    blocks = groups_of(w.shape, k) if blocks is None else blocks
    active = [b for b in blocks if mask[b[0]]]
    n_drop = int(np.floor(fraction * len(active)))
    dropped = sorted(active, key=lambda b: sum(abs(float(w[i])) for i in b))[:n_drop]
    kept = [b for b in active if b not in dropped]
    candidates = [b for b in blocks if b not in kept]
    grown = sorted(candidates, key=lambda b: -sum(float(grow[i]) for i in b))[:n_drop]
    new = np.zeros(w.shape, bool)
    for b in kept + grown:
        for i in b:
            new[i] = True
    return new


def reference_partial_blocks_update(w, mask, grow, fraction, k):
    """Inputs not a multiple of k: the whole blocks and the last, shorter blocks are two pools, each updated
    as above on its own (a pool whose blocks are all on, or all off, is left alone)."""
    new = np.zeros(w.shape, bool)
    for pool in ([b for b in groups_of(w.shape, k) if len(b) == k], [b for b in groups_of(w.shape, k) if len(b) < k]):
        n_on = sum(bool(mask[b[0]]) for b in pool)
        if 0 < n_on < len(pool):
            new |= reference_blocks_update(w, mask, grow, fraction, k, blocks=pool)
        else:
            for b in pool:
                for i in b:
                    new[i] = bool(mask[b[0]])
    return new


def reference_n_of_m_update(w, mask, grow, fraction, n, m):
    """Drop the k active entries of smallest |w|; grow greedily by grow score while the group has room."""
    group_of = {i: g for g, group in enumerate(groups_of(w.shape, m)) for i in group}
    active = [i for i in group_of if mask[i]]
    k = int(np.floor(fraction * len(active)))
    dropped = sorted(active, key=lambda i: abs(float(w[i])))[:k]
    new = {i for i in active if i not in dropped}
    room = {g: n for g in set(group_of.values())}
    for i in new:
        room[group_of[i]] -= 1
    for i in sorted((i for i in group_of if i not in new), key=lambda i: -float(grow[i])):
        if len(new) == len(active):
            break
        if room[group_of[i]] > 0:
            new.add(i)
            room[group_of[i]] -= 1
    out = np.zeros(w.shape, bool)
    for i in new:
        out[i] = True
    return out


# --------------------------------------------------------------- parsing
def test_get_parses_specs():
    assert isinstance(S.get(None), S.Unstructured) and isinstance(S.get("unstructured"), S.Unstructured)
    assert S.get("1x4") == S.Blocks(4) and S.get(" 1X16 ") == S.Blocks(16)
    assert S.get("2:4") == S.NofM(2, 4) and S.get("1:8").spec == "1:8"
    blocks = S.Blocks(4)
    assert S.get(blocks) is blocks
    assert S.get(keras.saving.serialize_keras_object(S.NofM(2, 4))) == S.NofM(2, 4)


@pytest.mark.parametrize(
    "spec, fix",
    [("1x0", "'1x4'"), ("5:4", "'2:4'"), ("4:4", "structure=None"), ("abc", "'1x4'"), ("0:4", "'2:4'"),
     ("1x", "'1x4'")],
)
def test_bad_specs_give_one_line_errors_naming_the_fix(spec, fix):
    with pytest.raises(ValueError) as info:
        S.get(spec)
    assert "\n" not in str(info.value) and fix in str(info.value)


def test_non_string_spec_is_a_type_error():
    with pytest.raises(TypeError, match="'1x4'"):
        S.get(4)


def test_register_structure_by_name_and_by_parser():
    class Every(S.Unstructured):
        name = "every_test"

    S.register_structure("every_test", Every)
    assert type(S.get("every_test")) is Every

    class Stripes(S.Blocks):
        pass

    S.register_structure(lambda spec: {"k": int(spec[7:])} if spec.startswith("stripes") else None, Stripes)
    got = S.get("stripes8")
    assert type(got) is Stripes and got.k == 8
    with pytest.raises(TypeError):
        S.register_structure("x", int)


# ------------------------------------------------------------ shapes
@pytest.mark.parametrize("spec, shape", [("1x4", (3, 3)), ("1x4", (3, 3, 1, 16)), ("2:4", (3, 3, 6, 8)),
                                         ("1x4", (8,))])
def test_kernel_that_cannot_carry_the_structure_is_refused_naming_exclude(spec, shape):
    with pytest.raises(ValueError) as info:
        S.get(spec).check_shape(shape, "dense/kernel")
    message = str(info.value)
    assert "\n" not in message and "dense/kernel" in message and "exclude" in message


@pytest.mark.parametrize("spec, shape, message", [
    ("1x4", (3, 5), "dense/kernel has 3 inputs (shape (3, 5)), fewer than the block size of structure '1x4' "
                    "(whole blocks and then a shorter last one are fine); leave the layer dense with "
                    "sparsify(..., exclude=[...]) or choose a k of at most 3."),
    ("2:4", (3, 3, 6, 8), "dense/kernel has 6 inputs (shape (3, 3, 6, 8)), not a multiple of the group size M of "
                          "structure '2:4'; leave the layer dense with sparsify(..., exclude=[...]) or choose an M "
                          "that divides 6."),
    ("1x4", (8,), "dense/kernel has shape (8,): structure '1x4' needs a kernel with input and output axes; "
                  "leave the layer dense with sparsify(..., exclude=[...])."),
    ("fan_in", (8,), "dense/kernel has shape (8,): structure 'fan_in' needs a kernel with input and output axes; "
                     "leave the layer dense with sparsify(..., exclude=[...])."),
])
def test_shape_errors_are_worded_as_before_the_shared_check(spec, shape, message):
    import keras_rigl.fan_in  # noqa: F401  (registers "fan_in")

    with pytest.raises(ValueError) as info:
        S.get(spec).check_shape(shape, "dense/kernel")
    assert str(info.value) == message


@pytest.mark.parametrize("k, shape", [(4, (6, 3)), (4, (10, 2)), (16, (300, 100)), (16, (100, 10)), (4, (3, 3, 6, 8)),
                                      (4, (5, 1)), (16, (784, 300))])
def test_blocks_take_inputs_that_are_not_a_multiple_of_k(k, shape):
    S.Blocks(k).check_shape(shape, "dense/kernel")  # no error: the last block of every row is shorter


def test_unit_and_capacity():
    assert S.Blocks(4).unit((8, 3)) == 4 and S.Blocks(4).max_active((8, 3)) == 24
    # 6 inputs = a whole block of 4 and a last one of 2: counts are 4a + 2b, all of it at most
    assert S.Blocks(4).unit((6, 3)) == 2 and S.Blocks(4).max_active((6, 3)) == 18
    assert S.Blocks(16).unit((300, 100)) == 4 and S.Blocks(16).max_active((300, 100)) == 30000
    assert S.NofM(2, 4).unit((8, 3)) == 1 and S.NofM(2, 4).max_active((8, 3)) == 12
    assert S.NofM(1, 4).max_density((3, 3, 4, 2)) == 0.25


def test_row_layout_is_consecutive_inputs_of_one_output_unit():
    w = np.arange(2 * 4 * 3).reshape(2, 4, 3)  # (position, in, out)
    rows = S.to_rows(w)
    np.testing.assert_array_equal(rows[0], w[0, :, 0])  # position 0, output 0: its 4 inputs
    np.testing.assert_array_equal(rows[4], w[1, :, 1])
    np.testing.assert_array_equal(S.from_rows(rows, w.shape), w)


# ------------------------------------------------------------ by hand
def test_blocks_update_by_hand_ranks_block_sums():
    # Dense kernel (in=4, out=2), 1x2: blocks A=(0:2, out 0), D=(2:4, out 0), B=(0:2, out 1), C=(2:4, out 1).
    w = np.array([[0.9, 0.1], [0.8, 0.2], [0.0, 0.3], [0.0, 0.05]], "float32")
    mask = np.array([[1, 1], [1, 1], [0, 1], [0, 1]], "float32")  # A, B, C active
    # |w| sums: A 1.7, B 0.3, C 0.35 -> k = floor(0.5 * 3) = 1 block: B is dropped.
    # Grow sums among B and D: B = 5 + 0 = 5, D = 3 + 3 = 6 -> D grows, although B holds the largest entry.
    grow = np.array([[0, 5], [0, 0], [3, 0], [3, 0]], "float32")
    r = S.Blocks(2).drop_and_grow(w, mask, grow, 0.5, seed=0)
    np.testing.assert_array_equal(r.new_mask, [[1, 0], [1, 0], [1, 1], [1, 1]])
    np.testing.assert_array_equal(r.grown, [[0, 0], [0, 0], [1, 0], [1, 0]])
    np.testing.assert_array_equal(r.removed, [[0, 1], [0, 1], [0, 0], [0, 0]])
    assert (r.n_active, r.n_dropped, r.n_moved) == (6, 2, 2)
    assert r.new_mask.dtype == mask.dtype


def test_blocks_update_takes_the_drop_scores_hook_summed():
    w = np.array([[0.9, 0.1], [0.8, 0.2], [0.0, 0.3], [0.0, 0.05]], "float32")
    mask = np.array([[1, 1], [1, 1], [0, 1], [0, 1]], "float32")
    keep = np.array([[-1, 1], [0.5, 1], [9, 2], [9, -5]], "float32")  # sums: A -0.5, B 2, C -3 -> C dropped
    grow = np.array([[0, 0], [0, 0], [1, 0], [1, 0]], "float32")  # D grows
    r = S.Blocks(2).drop_and_grow(w, mask, grow, 0.5, seed=0, drop_scores=keep)
    np.testing.assert_array_equal(r.new_mask, [[1, 1], [1, 1], [1, 0], [1, 0]])


def test_n_of_m_update_respects_group_capacity_by_hand():
    # One output unit, 8 inputs, 2:4: groups g0 = 0..3, g1 = 4..7.
    w = np.array([0.9, 0.8, 0, 0, 0.1, 0, 0, 0], "float32").reshape(8, 1)
    mask = np.array([1, 1, 0, 0, 1, 0, 0, 0], "float32").reshape(8, 1)
    grow = np.array([0, 0, 9, 8, 1, 2, 3, 0], "float32").reshape(8, 1)
    # k = floor(0.34 * 3) = 1: drop input 4 (|w| 0.1). g0 is full (2 of 2), so 2 and 3 (scores 9, 8)
    # cannot grow; the best of g1 is input 6.
    r = S.NofM(2, 4).drop_and_grow(w, mask, grow, 0.34, seed=0)
    np.testing.assert_array_equal(r.new_mask.reshape(-1), [1, 1, 0, 0, 0, 0, 1, 0])
    assert (r.n_active, r.n_dropped, r.n_moved) == (3, 1, 1)
    # k = floor(0.67 * 3) = 2: drop 4 and 1; g0 has room for one (input 2, not 3), g1 for two (6, 5):
    # the two best eligible are 2 (9) and 6 (3); input 3 (8) is second overall but not eligible.
    r = S.NofM(2, 4).drop_and_grow(w, mask, grow, 0.67, seed=0)
    np.testing.assert_array_equal(r.new_mask.reshape(-1), [1, 0, 1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(r.removed.reshape(-1), [0, 1, 0, 0, 1, 0, 0, 0])


def test_n_of_m_magnitude_initial_mask_by_hand():
    scores = np.array([[0.1, 5], [0.4, 6], [0.3, 7], [0.2, 8]], "float32")  # (in=4, out=2), 2:4, 3 active
    # the two best of each group: out 0 -> inputs 1, 2 (0.4, 0.3); out 1 -> inputs 2, 3 (7, 8);
    # the 3 best of those: 8, 7, 0.4.
    mask = S.NofM(2, 4).initial_mask((4, 2), 3, np.random.default_rng(0), scores=scores)
    np.testing.assert_array_equal(mask, [[0, 0], [1, 0], [0, 1], [0, 1]])


def test_blocks_magnitude_initial_mask_by_hand():
    scores = np.array([[1, 0], [1, 0], [0, 3], [0, -3]], "float32")  # |.| sums: A 2, D 0, B 0, C 6
    mask = S.Blocks(2).initial_mask((4, 2), 4, np.random.default_rng(0), scores=scores)
    np.testing.assert_array_equal(mask, [[1, 0], [1, 0], [0, 1], [0, 1]])


def _partial_example():
    """Dense kernel (in=6, out=3) under 1x4: whole blocks F_j = inputs 0..3 and last blocks P_j = inputs 4, 5
    of output j. F0, F1 and P0 are on."""
    w = np.zeros((6, 3), "float32")
    w[0:4, 0] = [0.9, 0.8, 0.7, 0.6]  # F0: |w| sum 3.0
    w[0:4, 1] = 0.1  # F1: 0.4
    w[4:6, 0] = 0.05  # P0
    mask = np.zeros((6, 3), "float32")
    mask[0:4, 0] = mask[0:4, 1] = mask[4:6, 0] = 1
    grow = np.zeros((6, 3), "float32")
    grow[0:4, 2] = 1  # F2: 4
    grow[0, 0] = 0.5  # F0: 0.5
    grow[4:6, 1] = 9  # P1: 18, more than any whole block, but it competes with the last blocks only
    return w, mask, grow


def _blocks_on(mask):
    """The on blocks of a (6, 3) 1x4 mask by name."""
    names = [f"F{j}" for j in range(3) if mask[0:4, j].all()] + [f"P{j}" for j in range(3) if mask[4:6, j].all()]
    assert int(np.asarray(mask).sum()) == sum(4 if n[0] == "F" else 2 for n in names)
    return names


def test_partial_blocks_update_by_hand_two_pools():
    w, mask, grow = _partial_example()
    # f = 0.5: floor(0.5 * 2) = 1 whole block moves (F1, the smaller |w| sum, to F2, the larger grow sum);
    # floor(0.5 * 1) = 0 last blocks move, so P1's large grow score does not matter.
    r = S.Blocks(4).drop_and_grow(w, mask, grow, 0.5, seed=0)
    assert _blocks_on(r.new_mask) == ["F0", "F2", "P0"]
    assert (r.n_active, r.n_dropped, r.n_moved) == (10, 4, 4)
    assert _blocks_on(r.grown) == ["F2"] and _blocks_on(r.removed) == ["F1"]
    # f = 1: both whole blocks dropped, the two best grow back (F2 4, F0 0.5: F0 keeps its weight);
    # the last block P0 dropped and P1 grown
    r = S.Blocks(4).drop_and_grow(w, mask, grow, 1.0, seed=0)
    assert _blocks_on(r.new_mask) == ["F0", "F2", "P1"]
    assert (r.n_active, r.n_dropped, r.n_moved) == (10, 4 + 4 + 2, 4 + 2)
    assert _blocks_on(r.grown) == ["F2", "P1"] and _blocks_on(r.removed) == ["F1", "P0"]
    r = S.Blocks(4).drop_and_grow(w, mask, grow, 1.0, seed=0, reinit_regrown=True)
    assert _blocks_on(r.grown) == ["F0", "F2", "P1"]
    # the drop_scores hook, summed the same way: F0 -4 and F1 4 -> F0 dropped at f = 0.5
    keep = np.where(np.arange(3) == 0, -1.0, 1.0).astype("float32") * np.ones((6, 1), "float32")
    r = S.Blocks(4).drop_and_grow(w, mask, grow, 0.5, seed=0, drop_scores=keep)
    assert _blocks_on(r.new_mask) == ["F1", "F2", "P0"]


def test_partial_blocks_a_full_pool_is_left_alone():
    w, mask, grow = _partial_example()
    mask[4:6, :] = 1  # every last block on: nothing to move among them, as for a dense weight
    r = S.Blocks(4).drop_and_grow(w, mask, grow, 1.0, seed=0, reinit_regrown=True)
    assert _blocks_on(r.new_mask) == ["F0", "F2", "P0", "P1", "P2"]
    assert (r.n_active, r.n_dropped, r.n_moved) == (14, 8, 4)
    assert _blocks_on(r.grown) == ["F0", "F2"]


def test_partial_blocks_counts_magnitude_init_and_holds_by_hand():
    structure = S.Blocks(4)
    # (6, 2): 2 whole blocks and 2 last blocks of 2; the blocks are split between the two in proportion
    # to their numbers (2:2; an odd one goes to the whole blocks): 0, 1+0, 1+1, 2+1, 2+2 blocks
    steps = structure.count_steps((6, 2))
    assert [steps.floor(n) for n in range(13)] == [0, 0, 0, 0, 4, 4, 6, 6, 6, 6, 10, 10, 12]
    assert [steps.next(n) for n in (0, 4, 6, 10, 12)] == [4, 6, 10, 12, None]
    scores = np.array([[1, 3], [1, 3], [0, 0], [0, 0], [1, 0.5], [0, 0]], "float32")  # F0 2, F1 6; P0 1, P1 0.5
    mask = structure.initial_mask((6, 2), 6, np.random.default_rng(0), scores=scores)
    np.testing.assert_array_equal(mask, [[0, 1], [0, 1], [0, 1], [0, 1], [1, 0], [1, 0]])
    assert structure.holds(mask) and blocks_hold(mask, 4)
    broken = mask.copy()
    broken[5, 0] = False  # half a last block
    assert not structure.holds(broken) and not blocks_hold(broken, 4)
    with pytest.raises(ValueError) as info:
        structure.initial_mask((6, 2), 8, np.random.default_rng(0))  # 2 whole blocks, no last one: not a step
    assert "\n" not in str(info.value) and "6 or 10" in str(info.value)
    # a weight with more whole blocks: (10, 1) has 2 of 4 and 1 of 2 -> 0, 4, 6 (1+1), 10 (2+1)
    assert [structure.count_steps((10, 1)).floor(n) for n in (3, 4, 5, 6, 9, 10)] == [0, 4, 4, 6, 6, 10]


def test_initial_mask_refuses_a_count_that_does_not_fit():
    with pytest.raises(ValueError, match="multiple of 4"):
        S.Blocks(4).initial_mask((8, 2), 6, np.random.default_rng(0))
    with pytest.raises(ValueError, match="at most 8"):
        S.NofM(2, 4).initial_mask((8, 2), 9, np.random.default_rng(0))


def test_update_refuses_a_mask_that_breaks_the_structure():
    mask = np.array([[1, 0], [0, 0], [0, 0], [0, 0]], "float32")
    with pytest.raises(ValueError, match="does not hold structure '1x2'"):
        S.Blocks(2).drop_and_grow(np.ones((4, 2), "float32"), mask, np.zeros((4, 2)), 0.5)


def test_block_ties_follow_the_seed_not_the_index():
    w = np.ones((16, 4), "float32")
    mask = np.zeros((16, 4), "float32")
    mask[:8] = 1
    zeros = np.zeros((16, 4), "float32")
    a = S.Blocks(4).drop_and_grow(w, mask, zeros, 0.5, seed=1).new_mask
    b = S.Blocks(4).drop_and_grow(w, mask, zeros, 0.5, seed=1).new_mask
    c = S.Blocks(4).drop_and_grow(w, mask, zeros, 0.5, seed=2).new_mask
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert (a[8:] != 0).any()  # grown blocks are not simply the next rows


# ------------------------------------------------------- properties
shapes = st.tuples(
    st.sampled_from([(), (2,), (1, 2)]), st.integers(1, 3), st.integers(1, 3)
)


@settings(max_examples=60, deadline=None)
@given(shapes, st.sampled_from([1, 2, 4]), st.floats(0, 1), st.integers(0, 2**31), st.integers(0, 10**6))
def test_blocks_properties(shape_parts, k, fraction, seed, draw):
    spatial, n_blocks, n_out = shape_parts
    shape = spatial + (n_blocks * k, n_out)
    structure = S.Blocks(k)
    rng = np.random.default_rng(draw)
    total_blocks = int(np.prod(shape)) // k
    n_active = int(rng.integers(0, total_blocks + 1)) * k
    mask = structure.initial_mask(shape, n_active, rng)
    assert mask.dtype == bool and mask.sum() == n_active and blocks_hold(mask, k) and structure.holds(mask)
    w = (rng.random(shape).astype("float32") + 0.01) * mask
    grow = rng.random(shape).astype("float32")
    r = structure.drop_and_grow(w, mask.astype("float32"), grow, fraction, seed=seed)
    new = r.new_mask != 0
    assert new.sum() == n_active == r.n_active and blocks_hold(new, k)
    np.testing.assert_array_equal(new, reference_blocks_update(w, mask, grow, fraction, k))
    np.testing.assert_array_equal(r.removed, mask & ~new)
    np.testing.assert_array_equal(r.grown, new & ~mask)  # RigL-style: regrown blocks are not new


def partial_shape(spatial, k, whole, extra, n_out):
    """``spatial + (n_in, n_out)`` with ``n_in = whole * k + r``, ``0 < r < k``."""
    return spatial + (whole * k + 1 + extra % (k - 1), n_out)


def random_block_mask(shape, k, rng):
    """Any mask of whole and last blocks (not only the counts ``initial_mask`` draws)."""
    mask = np.zeros(shape, bool)
    for block in groups_of(shape, k):
        if rng.random() < 0.5:
            for i in block:
                mask[i] = True
    return mask


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([(), (2,), (3, 3)]), st.sampled_from([2, 4, 16]), st.integers(1, 3), st.integers(0, 14),
       st.integers(1, 3), st.floats(0, 1), st.integers(0, 2**31), st.integers(0, 10**6), st.booleans(),
       st.booleans())
def test_partial_blocks_properties(spatial, k, whole, extra, n_out, fraction, seed, draw, any_mask, reinit):
    shape = partial_shape(spatial, k, whole, extra, n_out)
    structure = S.Blocks(k)
    structure.check_shape(shape)
    rng = np.random.default_rng(draw)
    if any_mask:
        mask = random_block_mask(shape, k, rng)
        n_active = int(mask.sum())
    else:
        n_active = structure.count_steps(shape).floor(int(rng.integers(0, int(np.prod(shape)) + 1)))
        mask = structure.initial_mask(shape, n_active, rng)
    assert mask.dtype == bool and mask.sum() == n_active and blocks_hold(mask, k) and structure.holds(mask)
    w = (rng.random(shape).astype("float32") + 0.01) * mask
    grow = rng.random(shape).astype("float32")
    r = structure.drop_and_grow(w, mask.astype("float32"), grow, fraction, seed=seed, reinit_regrown=reinit)
    new = r.new_mask != 0
    assert new.sum() == n_active == r.n_active and blocks_hold(new, k) and structure.holds(new)
    np.testing.assert_array_equal(new, reference_partial_blocks_update(w, mask, grow, fraction, k))
    np.testing.assert_array_equal(r.removed, mask & ~new)
    if not reinit:
        np.testing.assert_array_equal(r.grown, new & ~mask)
    assert r.n_moved == int((new & ~mask).sum())


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(), (2,), (1, 2)]), st.sampled_from([2, 4, 16]), st.integers(1, 3), st.integers(0, 14),
       st.integers(1, 3), st.integers(0, 10**6), st.booleans())
def test_partial_blocks_initial_masks_hold_and_count(spatial, k, whole, extra, n_out, draw, magnitude):
    shape = partial_shape(spatial, k, whole, extra, n_out)
    structure = S.Blocks(k)
    steps = structure.count_steps(shape)
    rng = np.random.default_rng(draw)
    size = int(np.prod(shape))
    n_active = steps.floor(int(rng.integers(0, size + 1)))
    scores = rng.normal(size=shape).astype("float32") if magnitude else None
    mask = structure.initial_mask(shape, n_active, rng, scores=scores)
    assert mask.shape == shape and mask.sum() == n_active and blocks_hold(mask, k) and structure.holds(mask)
    # the steps: every count from 0 to the whole weight, one block (whole or last) at a time
    count, seen = 0, [0]
    while steps.next(count) is not None:
        assert steps.next(count) - count in (k, shape[-2] % k)
        count = steps.next(count)
        seen.append(count)
    assert count == size == structure.max_active(shape)
    assert all(steps.floor(c) == c and steps.floor(c + 0.5) == c for c in seen)
    if magnitude:  # the largest |score| sums first, in each pool
        blocks = groups_of(shape, k)
        for pool in ([b for b in blocks if len(b) == k], [b for b in blocks if len(b) < k]):
            sums = [sum(abs(float(scores[i])) for i in b) for b in pool]
            on = [bool(mask[b[0]]) for b in pool]
            if any(on) and not all(on):
                assert min(x for x, o in zip(sums, on) if o) >= max(x for x, o in zip(sums, on) if not o)


@settings(max_examples=60, deadline=None)
@given(shapes, st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4)]), st.floats(0, 1), st.integers(0, 2**31),
       st.integers(0, 10**6))
def test_n_of_m_properties(shape_parts, nm, fraction, seed, draw):
    spatial, n_groups, n_out = shape_parts
    n, m = nm
    shape = spatial + (n_groups * m, n_out)
    structure = S.NofM(n, m)
    rng = np.random.default_rng(draw)
    n_active = int(rng.integers(0, structure.max_active(shape) + 1))
    mask = structure.initial_mask(shape, n_active, rng)
    assert mask.sum() == n_active and n_of_m_holds(mask, n, m) and structure.holds(mask)
    w = (rng.random(shape).astype("float32") + 0.01) * mask
    grow = rng.random(shape).astype("float32")
    r = structure.drop_and_grow(w, mask.astype("float32"), grow, fraction, seed=seed, reinit_regrown=True)
    new = r.new_mask != 0
    assert new.sum() == n_active == r.n_active and n_of_m_holds(new, n, m)
    np.testing.assert_array_equal(new, reference_n_of_m_update(w, mask, grow, fraction, n, m))
    assert r.n_moved == int((new & ~mask).sum())


def test_unstructured_is_the_plain_update():
    rng = np.random.default_rng(3)
    w, grow = rng.random((6, 5)).astype("float32"), rng.random((6, 5)).astype("float32")
    mask = S.Unstructured().initial_mask((6, 5), 11, rng)
    a = S.Unstructured().drop_and_grow(w * mask, mask.astype("float32"), grow, 0.4, seed=9)
    b = updates.drop_and_grow(w * mask, mask.astype("float32"), grow, 0.4, seed=9)
    np.testing.assert_array_equal(a.new_mask, b.new_mask)


# ----------------------------------------------------- distributions
def test_active_counts_in_whole_blocks_by_hand():
    shapes = {"a": (10, 4), "b": (8, 4)}
    # exact 20.8 and 19.2 (total 40): floors in blocks of 4 are 20 and 16, and the last block goes to
    # the larger remainder (b: 3.2 of 4), so both are within one block and the total is exact.
    counts = distributions.active_counts(shapes, {"a": 0.52, "b": 0.6}, units={"a": 4, "b": 4})
    assert counts == {"a": 20, "b": 20}
    # exact 20 + 12.8 = 32.8 -> 33, which is 8.25 blocks: the total is rounded to 8 blocks.
    assert distributions.active_counts(shapes, {"a": 0.5, "b": 0.4}, units={"a": 4, "b": 4}) == {"a": 20, "b": 12}


def test_active_counts_with_partial_blocks_by_hand():
    shapes = {"a": (6, 2), "b": (8, 2)}
    steps = {"a": S.Blocks(4).count_steps((6, 2)), "b": S.Blocks(4).count_steps((8, 2))}  # a: 0, 4, 6, 10, 12
    # exact 8.4 and 7.2 (total 15.6 -> 16): floors 6 and 4; 6 missing go by remainder in the next step
    # (b: 3.2 of 4, a: 2.4 of 4): b +4, then a +4 as a tie rounds up (2 missing, step 4).
    assert distributions.active_counts(shapes, {"a": 0.7, "b": 0.45}, steps=steps) == {"a": 10, "b": 8}
    # exact 6 and 4: on the steps already
    assert distributions.active_counts(shapes, {"a": 0.5, "b": 0.25}, steps=steps) == {"a": 6, "b": 4}
    # exact 7.2 alone: 6, as the next step (10) is further from the target
    assert distributions.active_counts({"a": (6, 2)}, {"a": 0.6}, steps={"a": steps["a"]}) == {"a": 6}
    # the steps of a weight whose inputs are a multiple of k are the units: the same counts as units=
    assert distributions.active_counts(shapes, {"a": 0.52, "b": 0.6}, units={"a": 2, "b": 4}) == \
        distributions.active_counts(shapes, {"a": 0.52, "b": 0.6}, steps={"a": distributions.UnitSteps(2, 12),
                                                                          "b": steps["b"]})


def test_erk_caps_at_n_over_m_and_redistributes():
    shapes = {"a": (4, 100), "b": (100, 100)}
    # raw ERK densities 0.26 and 0.02: a wants 1 (dense); capped at 0.5 (200 of 400) the target of
    # 0.4 * 10400 = 4160 leaves 3960 of 10000 for b.
    densities = distributions.layer_densities(shapes, 0.6, "erk", max_densities={"a": 0.5, "b": 0.5})
    assert densities == pytest.approx({"a": 0.5, "b": 0.396})
    with pytest.raises(ValueError, match="sparsity >= 0.5"):
        distributions.layer_densities(shapes, 0.4, "erk", max_densities={"a": 0.5, "b": 0.5})


def test_uniform_with_a_cap():
    shapes = {"a": (4, 8), "b": (8, 8)}
    assert distributions.layer_densities(shapes, 0.6, "uniform", max_densities={"a": 0.5, "b": 0.5}) == {
        "a": 0.5, "b": pytest.approx(0.4)}
    with pytest.raises(ValueError, match="at least 0.5"):
        distributions.layer_densities(shapes, 0.3, "uniform", max_densities={"a": 0.5, "b": 0.5})


# -------------------------------------------------------------- models
def lenet_300_100():
    inp = keras.Input((784,))
    x = keras.layers.Dense(300, activation="relu", name="fc1")(inp)
    x = keras.layers.Dense(100, activation="relu", name="fc2")(x)
    return keras.Model(inp, keras.layers.Dense(10, name="fc3")(x))


def small_cnn():
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(inp)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv2")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inp, keras.layers.Dense(10, name="out")(x))


def kernel_masks(model):
    return {layer.layer.name: layer.get_masks()["kernel"] for layer in keras_rigl.masked_layers(model)}


def check_invariant(model, spec, layers=None):
    k_or_nm = [int(v) for v in spec.replace("1x", "").split(":")]
    for name, mask in kernel_masks(model).items():
        if layers is not None and name not in layers:
            continue
        if ":" in spec:
            assert n_of_m_holds(mask, *k_or_nm), name
        else:
            assert blocks_hold(mask, k_or_nm[0]), name


@pytest.mark.parametrize("spec", ["1x4", "2:4"])
def test_sparsify_lenet_counts_exact_in_units(spec):
    model = keras_rigl.sparsify(lenet_300_100(), 0.9, structure=spec, seed=0)
    masks = kernel_masks(model)
    check_invariant(model, spec)
    # 784*300 + 300*100 + 100*10 = 266200 masked weights, 10% = 26620 active (6655 whole blocks of 4)
    assert sum(int(m.sum()) for m in masks.values()) == 26620
    if spec == "1x4":
        assert all(int(m.sum()) % 4 == 0 for m in masks.values())
    for layer in keras_rigl.masked_layers(model):
        assert layer.structure == S.get(spec)


def test_sparsify_1x16_counts_whole_blocks():
    inp = keras.Input((64,))
    model = keras.Model(inp, keras.layers.Dense(5, name="b")(keras.layers.Dense(32, name="a")(inp)))
    sparse = keras_rigl.sparsify(model, 0.8, structure="1x16", seed=0)
    masks = kernel_masks(sparse)
    # 64*32 + 32*5 = 2208 weights, 20% = 441.6 -> 442 = 27.6 blocks of 16 -> 28 blocks = 448
    assert sum(int(m.sum()) for m in masks.values()) == 448
    assert all(int(m.sum()) % 16 == 0 for m in masks.values())
    check_invariant(sparse, "1x16")


def test_sparsify_refuses_a_kernel_that_cannot_carry_it_and_exclude_fixes_it():
    with pytest.raises(ValueError) as info:
        keras_rigl.sparsify(small_cnn(), 0.8, structure="1x4")
    assert "\n" not in str(info.value) and "conv1" in str(info.value) and "exclude" in str(info.value)
    sparse = keras_rigl.sparsify(small_cnn(), 0.8, structure="1x4", exclude=["conv1"], seed=0)
    assert sorted(kernel_masks(sparse)) == ["conv2", "out"]
    check_invariant(sparse, "1x4")


def test_per_layer_structure_leaves_named_layers_unstructured_and_sparse():
    model = keras_rigl.sparsify(lenet_300_100(), 0.9, structure="2:4", per_layer_structure={"fc1": None}, seed=0)
    assert [(l.layer.name, l.structure) for l in keras_rigl.masked_layers(model)] == [
        ("fc1", S.Unstructured()), ("fc2", S.NofM(2, 4)), ("fc3", S.NofM(2, 4))]
    masks = kernel_masks(model)
    assert sum(int(m.sum()) for m in masks.values()) == 26620  # the total stays exact
    assert n_of_m_holds(masks["fc2"], 2, 4) and n_of_m_holds(masks["fc3"], 2, 4)
    # drawn unstructured: at 10% density ~200 of fc1's 58,800 groups of 4 hold 3 or 4 active entries
    assert not n_of_m_holds(masks["fc1"], 2, 4)


def test_per_layer_structure_gives_a_layer_a_structure_it_can_carry():
    # conv1 (one input channel) cannot carry 1x4 blocks: unstructured instead of dense
    sparse = keras_rigl.sparsify(small_cnn(), 0.8, structure="1x4", per_layer_structure={"conv1": None}, seed=0)
    assert sorted(kernel_masks(sparse)) == ["conv1", "conv2", "out"]
    assert {l.layer.name: l.structure.spec for l in keras_rigl.masked_layers(sparse)} == {
        "conv1": "unstructured", "conv2": "1x4", "out": "1x4"}
    plain = keras_rigl.sparsify(lenet_300_100(), 0.9, per_layer_structure={"fc2": "1x4"}, seed=0)
    assert [l.structure.spec for l in keras_rigl.masked_layers(plain)] == ["unstructured", "1x4", "unstructured"]
    assert blocks_hold(kernel_masks(plain)["fc2"], 4)


@pytest.mark.parametrize("per_layer_structure, fragment", [
    ({"fc9": None}, "per_layer_structure name 'fc9' matches no masked layer. Masked layers are: ['fc1', 'fc2', 'fc3']"),
    ({"fc1": "3x"}, "Unknown structure '3x'"),
    (["fc1"], "per_layer_structure must be a dict {layer name: structure}"),
])
def test_per_layer_structure_bad_input_is_one_line_naming_the_fix(per_layer_structure, fragment):
    with pytest.raises((ValueError, TypeError)) as info:
        keras_rigl.sparsify(lenet_300_100(), 0.9, per_layer_structure=per_layer_structure, seed=0)
    assert "\n" not in str(info.value) and fragment in str(info.value)
    with pytest.raises(ValueError) as info:  # a layer that cannot carry its own structure is named
        keras_rigl.sparsify(small_cnn(), 0.8, per_layer_structure={"conv1": "1x4"})
    assert "conv1" in str(info.value) and "\n" not in str(info.value)


def test_per_layer_structure_survives_save_load_and_rigl_fit(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras_rigl.sparsify(lenet_300_100(), 0.9, structure="2:4", per_layer_structure={"fc1": None}, seed=0)
    x, y = teacher_data((784,), 128)
    before = kernel_masks(model)
    callback = keras_rigl.RigL(update_freq=2, end_step=16)
    _fit(model, callback, "2:4", x, y, epochs=1, check_layers=("fc2", "fc3"))
    after = kernel_masks(model)
    assert callback.updates["n_moved"].sum() > 0 and not np.array_equal(before["fc1"], after["fc1"])
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [l.structure.spec for l in keras_rigl.masked_layers(loaded)] == ["unstructured", "2:4", "2:4"]
    for name, mask in kernel_masks(loaded).items():
        np.testing.assert_array_equal(mask, after[name])


def test_sparsify_magnitude_init_keeps_the_structure():
    sparse = keras_rigl.sparsify(lenet_300_100(), 0.9, structure="2:4", mask_init="magnitude", seed=0)
    check_invariant(sparse, "2:4")


def test_initialize_masks_sets_a_structure_on_masked_layers():
    inp = keras.Input((16,))
    layer = keras_rigl.Masked(keras.layers.Dense(8))
    model = keras.Model(inp, layer(inp))
    keras_rigl.initialize_masks(model, 0.75, structure="1x4", seed=0)
    assert layer.structure == S.Blocks(4)
    assert blocks_hold(layer.get_masks()["kernel"], 4) and int(layer.get_masks()["kernel"].sum()) == 32


def test_masked_refuses_a_kernel_that_cannot_carry_it():
    layer = keras_rigl.Masked(keras.layers.Dense(3), structure="2:4")
    with pytest.raises(ValueError, match="exclude"):
        layer.build((None, 6))


def test_set_masks_refuses_a_mask_breaking_the_structure():
    layer = keras_rigl.Masked(keras.layers.Dense(2), structure="2:4")
    layer.build((None, 4))
    with pytest.raises(ValueError, match="does not hold the layer's structure '2:4'"):
        layer.set_masks({"kernel": np.array([[1, 0], [1, 0], [1, 0], [0, 0]])})
    layer.set_masks({"kernel": np.array([[1, 0], [1, 0], [0, 1], [0, 0]])})


def test_config_and_save_load_keep_the_structure(tmp_path):
    model = keras_rigl.sparsify(lenet_300_100(), 0.9, structure="2:4", seed=0)
    layer = keras_rigl.masked_layers(model)[0]
    config = layer.get_config()
    assert config["structure"]["config"] == {"n": 2, "m": 4}
    assert keras_rigl.Masked.from_config(config).structure == S.NofM(2, 4)
    plain = keras_rigl.sparsify(lenet_300_100(), 0.9, seed=0)
    assert "structure" not in keras_rigl.masked_layers(plain)[0].get_config()  # old files stay as they were
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [l.structure for l in keras_rigl.masked_layers(loaded)] == [S.NofM(2, 4)] * 3
    for name, mask in kernel_masks(loaded).items():
        np.testing.assert_array_equal(mask, kernel_masks(model)[name])


def test_strip_keeps_the_function():
    model = keras_rigl.sparsify(lenet_300_100(), 0.9, structure="1x4", seed=0)
    x = np.random.default_rng(0).random((4, 784)).astype("float32")
    stripped = keras_rigl.strip(model)
    assert not keras_rigl.masked_layers(stripped)
    np.testing.assert_allclose(stripped.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    kernel = stripped.get_layer("fc1").kernel.numpy()
    assert blocks_hold(kernel != 0, 4)


def test_sparsify_lenet_1x16_masks_the_300_and_100_input_layers():
    model = keras_rigl.sparsify(lenet_300_100(), 0.9, structure="1x16", seed=0)
    masks = kernel_masks(model)
    assert sorted(masks) == ["fc1", "fc2", "fc3"]  # 784 = 49 x 16; 300 = 18 x 16 + 12; 100 = 6 x 16 + 4
    check_invariant(model, "1x16")
    assert all(layer.structure == S.Blocks(16) for layer in keras_rigl.masked_layers(model))
    sizes = {"fc1": 784 * 300, "fc2": 300 * 100, "fc3": 100 * 10}
    densities = distributions.layer_densities({n + "/kernel": (s // o, o) for n, s, o in
                                               [("fc1", sizes["fc1"], 300), ("fc2", sizes["fc2"], 100),
                                                ("fc3", sizes["fc3"], 10)]}, 0.9)
    for name, mask in masks.items():
        steps = S.Blocks(16).count_steps(mask.shape)
        count = int(mask.sum())
        assert steps.floor(count) == count  # a count the structure can hold (whole and last blocks in proportion)
        assert abs(count - densities[name + "/kernel"] * sizes[name]) <= 16  # within one block of its share
    # 10 % of 266200 = 26620 active: the total is the target to within half a block
    assert abs(sum(int(m.sum()) for m in masks.values()) - 26620) <= 8
    # the last, shorter blocks are used: fc2's last 12 inputs are on for about as many output units as a
    # whole block's (the two pools get the same density)
    fc2 = masks["fc2"]
    assert 0 < fc2[288:].any(axis=0).sum() < 100
    whole = fc2[:288].reshape(18, 16, 100).any(axis=1).mean()
    assert abs(fc2[288:].any(axis=0).mean() - whole) <= 0.02
    # magnitude init holds it too
    check_invariant(keras_rigl.sparsify(lenet_300_100(), 0.9, structure="1x16", mask_init="magnitude", seed=0),
                    "1x16")


def test_partial_blocks_save_load_and_strip_round_trip(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras_rigl.sparsify(lenet_300_100(), 0.9, structure="1x16", seed=0)
    assert keras_rigl.masked_layers(model)[1].get_config()["structure"]["config"] == {"k": 16}
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert [layer.structure for layer in keras_rigl.masked_layers(loaded)] == [S.Blocks(16)] * 3
    for name, mask in kernel_masks(loaded).items():
        np.testing.assert_array_equal(mask, kernel_masks(model)[name])
    x = np.random.default_rng(0).random((4, 784)).astype("float32")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    stripped = keras_rigl.strip(loaded)
    assert not keras_rigl.masked_layers(stripped)
    np.testing.assert_allclose(stripped.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    for name in ("fc1", "fc2", "fc3"):
        kernel = stripped.get_layer(name).kernel.numpy()
        assert blocks_hold(kernel != 0, 16) and S.Blocks(16).holds(kernel != 0)
        np.testing.assert_array_equal(kernel != 0, kernel_masks(model)[name])


# ------------------------------------------------------------ training
class InvariantEveryBatch(keras.callbacks.Callback):
    """Runs after the sparse callback: the structure and every weight's active count hold after each step."""

    def __init__(self, spec, layers=None):
        super().__init__()
        self.spec, self.layers, self.counts, self.checked = spec, layers, None, 0

    def on_train_batch_end(self, batch, logs=None):
        check_invariant(self.model, self.spec, self.layers)
        counts = {name: int(mask.sum()) for name, mask in kernel_masks(self.model).items()}
        if self.counts is None:
            self.counts = counts
        assert counts == self.counts
        self.checked += 1


def teacher_data(shape, n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n,) + shape).astype("float32")
    y = (x.reshape(n, -1) @ rng.normal(size=(int(np.prod(shape)), 10))).argmax(1)
    return x, y


def _fit(model, callback, spec, x, y, epochs=2, check_layers=None):
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    check = InvariantEveryBatch(spec, check_layers)
    history = model.fit(x, y, batch_size=32, epochs=epochs, callbacks=[callback, check], verbose=0)
    assert check.checked == epochs * len(x) // 32
    return history


@pytest.mark.parametrize("method", [keras_rigl.RigL, keras_rigl.SET, keras_rigl.SNFS, keras_rigl.Static])
@pytest.mark.parametrize("spec", ["1x4", "2:4"])
def test_every_method_keeps_the_structure_at_every_update(method, spec):
    keras.utils.set_random_seed(0)
    model = keras_rigl.sparsify(small_cnn(), 0.8, structure=spec, exclude=["conv1"], seed=0)
    before = {name: int(m.sum()) for name, m in kernel_masks(model).items()}
    start = kernel_masks(model)
    callback = method(update_freq=2, drop_fraction=0.5)
    _fit(model, callback, spec, *teacher_data((8, 8, 1), 128))
    rows = callback.updates
    if method is keras_rigl.Static:
        assert rows.empty
        for name, mask in kernel_masks(model).items():
            np.testing.assert_array_equal(mask, start[name])
        return
    assert len(rows) > 0 and rows["n_moved"].sum() > 0
    for _, row in rows.iterrows():
        assert row["n_active"] == before[row["layer"]]
        if spec == "1x4":
            assert row["n_dropped"] % 4 == 0 and row["n_moved"] % 4 == 0


def partial_cnn():
    """Every kernel but one has a last, shorter 1x4 block: conv1 (3, 3, 6, 6), conv2 (3, 3, 6, 10), out (10, 10)."""
    inp = keras.Input((8, 8, 6))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv1")(inp)
    x = keras.layers.Conv2D(10, 3, activation="relu", name="conv2")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(10, activation="relu", name="hidden")(x)  # (160, 10): whole blocks
    return keras.Model(inp, keras.layers.Dense(10, name="out")(x))


@pytest.mark.parametrize("method, compiled", [(keras_rigl.RigL, None), (keras_rigl.RigL, False),
                                              (keras_rigl.SET, None), (keras_rigl.SNFS, None)])
def test_partial_blocks_keep_the_structure_and_the_count_at_every_update(method, compiled):
    keras.utils.set_random_seed(0)
    model = keras_rigl.sparsify(partial_cnn(), 0.7, structure="1x4", seed=0)
    before = {name: int(m.sum()) for name, m in kernel_masks(model).items()}
    assert sorted(before) == ["conv1", "conv2", "hidden", "out"]
    callback = method(update_freq=2, drop_fraction=0.5, compiled=compiled)
    _fit(model, callback, "1x4", *teacher_data((8, 8, 6), 128))
    from keras_rigl import compiled_structure

    assert isinstance(callback._compiled_update, compiled_structure.StructuredCompiledUpdate) == (compiled is None)
    rows = callback.updates
    assert len(rows) > 0
    for _, row in rows.iterrows():
        assert row["n_active"] == before[row["layer"]]
    moved = rows.groupby("layer")["n_moved"].sum()
    assert (moved[["conv1", "conv2", "out"]] > 0).all()


@pytest.mark.parametrize("compiled", [None, False])
def test_rigl_fit_lenet_1x16_keeps_blocks_and_counts(compiled):
    keras.utils.set_random_seed(0)
    model = keras_rigl.sparsify(lenet_300_100(), 0.9, structure="1x16", seed=0)
    keras_rigl.rescale_active_weights(model)
    before = {name: int(m.sum()) for name, m in kernel_masks(model).items()}
    callback = keras_rigl.RigL(update_freq=2, compiled=compiled)
    _fit(model, callback, "1x16", *teacher_data((784,), 128), epochs=2)
    rows = callback.updates
    assert set(rows["layer"]) == {"fc1", "fc2"}  # fc3 is dense under ERK at 0.9: nothing to move
    for _, row in rows.iterrows():
        assert row["n_active"] == before[row["layer"]]
    assert rows.groupby("layer")["n_moved"].sum()["fc2"] > 0
    assert {name: int(m.sum()) for name, m in kernel_masks(model).items()} == before


@keras.saving.register_keras_serializable(package="keras_rigl_tests")
class PlainBlocks(S.Blocks):
    """A structure the compiled update does not know: the callbacks must fall back to NumPy."""


def test_structure_without_compiled_update_refuses_true_and_falls_back_once(caplog):
    model = keras_rigl.sparsify(small_cnn(), 0.8, structure=PlainBlocks(4), exclude=["conv1"], seed=0)
    x, y = teacher_data((8, 8, 1), 64)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError) as info:
        model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[keras_rigl.SET(update_freq=1, compiled=True)])
    assert "compiled=None" in str(info.value) and "\n" not in str(info.value)
    callback = keras_rigl.SET(update_freq=1, drop_fraction=0.5)
    with caplog.at_level(logging.INFO, logger="keras_rigl"):
        _fit(model, callback, "1x4", x, y, epochs=2)
    assert callback._compiled_update is None and callback.updates["n_moved"].sum() > 0
    lines = [r for r in caplog.records if "runs in NumPy" in r.getMessage()]
    assert len(lines) == 1


@pytest.mark.parametrize("spec", ["1x4", "2:4"])
def test_rigl_numpy_path_keeps_the_structure(spec):
    keras.utils.set_random_seed(0)
    model = keras_rigl.sparsify(small_cnn(), 0.8, structure=spec, exclude=["conv1"], seed=0)
    callback = keras_rigl.RigL(update_freq=2, drop_fraction=0.5, compiled=False)
    _fit(model, callback, spec, *teacher_data((8, 8, 1), 128))
    assert callback._compiled_update is None and callback.updates["n_moved"].sum() > 0


# ------------------------------------------------------ compiled == NumPy
special_values = st.sampled_from(["none", "nan", "inf", "zeros"])


@settings(max_examples=40, deadline=None)
@given(shapes, st.sampled_from(["1x2", "1x4", "2:4", "1:2", "3:4"]), st.floats(0, 1), st.integers(0, 2**32 - 1),
       st.integers(0, 10**6), st.sampled_from([1, 3, 1000]), st.booleans(), special_values)
def test_compiled_selection_is_bit_identical_to_numpy(shape_parts, spec, fraction, seed, draw, levels, reinit,
                                                      special):
    from keras_rigl import compiled_structure, compiled_update

    structure = S.get(spec)
    spatial, n_units, n_out = shape_parts
    unit = structure.k if isinstance(structure, S.Blocks) else structure.m
    shape = spatial + (n_units * unit, n_out)
    rng = np.random.default_rng(draw)
    n_active = int(rng.integers(0, structure.max_active(shape) // structure.unit(shape) + 1)) * structure.unit(shape)
    mask = structure.initial_mask(shape, n_active, rng).astype("float32")
    w = (rng.integers(-levels, levels + 1, shape) / levels).astype("float32") * mask  # ties when levels is small
    grow = (rng.integers(0, levels + 1, shape) / levels).astype("float32")
    if special != "none":
        flat = grow.reshape(-1)
        flat[rng.integers(0, flat.size, 2)] = {"nan": np.nan, "inf": np.inf, "zeros": 0.0}[special]
    size = int(np.prod(shape))
    f = fraction if 0 < n_active < size else 0.0  # both paths leave dense and empty weights alone
    expected = structure.drop_and_grow(w, mask, grow, f, seed=seed, reinit_regrown=reinit)
    seed_tensor = keras.ops.convert_to_tensor(seed, "int64")
    fraction_tensor = keras.ops.convert_to_tensor(fraction, "float64")
    if isinstance(structure, S.Blocks):
        got = compiled_structure.select_blocks(w, mask, grow, fraction_tensor, seed_tensor, reinit, structure.k,
                                               compiled_update.candidate_keys)
    else:
        got = compiled_structure.select_n_of_m(w, mask, grow, fraction_tensor, seed_tensor, reinit, structure.n,
                                               structure.m)
    new_active, grown, removed, (n, k, moved) = [keras.ops.convert_to_numpy(x) if not isinstance(x, tuple) else
                                                 tuple(int(keras.ops.convert_to_numpy(v)) for v in x) for x in got]
    np.testing.assert_array_equal(new_active, expected.new_mask != 0)
    np.testing.assert_array_equal(grown, expected.grown)
    np.testing.assert_array_equal(removed, expected.removed)
    assert (n, moved) == (expected.n_active, expected.n_moved)
    assert k == (expected.n_dropped if 0 < n_active < size else 0)


def test_compiled_selection_by_hand():
    from keras_rigl import compiled_structure, compiled_update

    tensor = keras.ops.convert_to_tensor
    # the hand-written N:M example above: full groups cannot grow
    w = np.array([0.9, 0.8, 0, 0, 0.1, 0, 0, 0], "float32").reshape(8, 1)
    mask = np.array([1, 1, 0, 0, 1, 0, 0, 0], "float32").reshape(8, 1)
    grow = np.array([0, 0, 9, 8, 1, 2, 3, 0], "float32").reshape(8, 1)
    for fraction, expected in [(0.34, [1, 1, 0, 0, 0, 0, 1, 0]), (0.67, [1, 0, 1, 0, 0, 0, 1, 0])]:
        got = compiled_structure.select_n_of_m(w, mask, grow, tensor(fraction, "float64"), tensor(0, "int64"),
                                               False, 2, 4)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(got[0]).reshape(-1), expected)
    # the hand-written 1x2 example above: block sums, not the largest entry
    w = np.array([[0.9, 0.1], [0.8, 0.2], [0.0, 0.3], [0.0, 0.05]], "float32")
    mask = np.array([[1, 1], [1, 1], [0, 1], [0, 1]], "float32")
    grow = np.array([[0, 5], [0, 0], [3, 0], [3, 0]], "float32")
    got = compiled_structure.select_blocks(w, mask, grow, tensor(0.5, "float64"), tensor(0, "int64"), False, 2,
                                           compiled_update.candidate_keys)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(got[0]), [[1, 0], [1, 0], [1, 1], [1, 1]])
    assert tuple(int(keras.ops.convert_to_numpy(v)) for v in got[3]) == (6, 2, 2)


def _compare_partial_selection(shape, k, fraction, seed, rng, levels, reinit, special="none", any_mask=True):
    """select_blocks against Blocks.drop_and_grow on one weight with a last, shorter block."""
    from keras_rigl import compiled_structure, compiled_update

    structure = S.Blocks(k)
    if any_mask:
        mask = random_block_mask(shape, k, rng).astype("float32")
    else:
        n_active = structure.count_steps(shape).floor(int(rng.integers(0, int(np.prod(shape)) + 1)))
        mask = structure.initial_mask(shape, n_active, rng).astype("float32")
    w = (rng.integers(-levels, levels + 1, shape) / levels).astype("float32") * mask  # ties when levels is small
    grow = (rng.integers(0, levels + 1, shape) / levels).astype("float32")
    if special != "none":
        flat = grow.reshape(-1)
        flat[rng.integers(0, flat.size, 2)] = {"nan": np.nan, "inf": np.inf, "zeros": 0.0}[special]
    expected = structure.drop_and_grow(w, mask, grow, fraction, seed=seed, reinit_regrown=reinit)
    tensor = keras.ops.convert_to_tensor
    for static_k in (False, True):
        got = compiled_structure.select_blocks(w, mask, grow, tensor(fraction, "float64"), tensor(seed, "int64"),
                                               reinit, k, compiled_update.candidate_keys, static_k=static_k)
        new_active, grown, removed = [keras.ops.convert_to_numpy(x) for x in got[:3]]
        np.testing.assert_array_equal(new_active, expected.new_mask != 0)
        np.testing.assert_array_equal(grown, expected.grown)
        np.testing.assert_array_equal(removed, expected.removed)
        counts = tuple(int(keras.ops.convert_to_numpy(v)) for v in got[3])
        assert counts == (expected.n_active, expected.n_dropped, expected.n_moved)
    return expected


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(), (2,), (3, 3)]), st.sampled_from([2, 4, 16]), st.integers(1, 3), st.integers(0, 14),
       st.integers(1, 3), st.floats(0, 1), st.integers(0, 2**32 - 1), st.integers(0, 10**6),
       st.sampled_from([1, 3, 1000]), st.booleans(), special_values, st.booleans())
def test_compiled_partial_blocks_are_bit_identical_to_numpy(spatial, k, whole, extra, n_out, fraction, seed, draw,
                                                            levels, reinit, special, any_mask):
    shape = partial_shape(spatial, k, whole, extra, n_out)
    _compare_partial_selection(shape, k, fraction, seed, np.random.default_rng(draw), levels, reinit, special,
                               any_mask)


@pytest.mark.parametrize("k, shape", [(4, (6, 5)), (4, (10, 7)), (16, (300, 100)), (16, (100, 10)),
                                      (4, (3, 3, 6, 8)), (16, (3, 3, 20, 4))])
def test_compiled_partial_blocks_on_the_named_shapes(k, shape):
    rng = np.random.default_rng(sum(shape))
    moved = 0
    for trial in range(4):
        r = _compare_partial_selection(shape, k, [0.3, 0.5, 1.0, 0.1][trial], trial, rng, [1000, 3, 1000, 1][trial],
                                       trial % 2 == 1, any_mask=trial < 2)
        moved += r.n_moved
    assert moved > 0


def test_compiled_partial_blocks_by_hand():
    from keras_rigl import compiled_structure, compiled_update

    w, mask, grow = _partial_example()
    tensor = keras.ops.convert_to_tensor
    got = compiled_structure.select_blocks(w, mask, grow, tensor(1.0, "float64"), tensor(0, "int64"), False, 4,
                                           compiled_update.candidate_keys)
    assert _blocks_on(keras.ops.convert_to_numpy(got[0])) == ["F0", "F2", "P1"]
    assert tuple(int(keras.ops.convert_to_numpy(v)) for v in got[3]) == (10, 10, 6)


@pytest.mark.parametrize("grow_by,reinit", [("gradient", False), ("random", True)])
def test_whole_model_structured_update_equals_the_numpy_path(grow_by, reinit):
    from keras_rigl import compiled_structure, optimizer_state

    inp = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inp)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    model = keras.Model(inp, keras.layers.Dense(10, name="out")(x))
    keras.utils.set_random_seed(0)
    model = keras_rigl.sparsify(model, 0.8, structure="1x4", seed=0, exclude=["out"])
    # one layer of each kind: 1x4 conv, 2:4 dense, unstructured output
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    layers = keras_rigl.masked_layers(model)
    object.__setattr__(layers[1], "_structure", S.get("2:4"))
    layers[1].set_masks({"kernel": S.get("2:4").initial_mask((288, 16), 500, np.random.default_rng(1))})
    rng = np.random.default_rng(0)
    xs, ys = rng.normal(size=(32, 8, 8, 4)).astype("float32"), rng.integers(0, 10, 32)
    for layer in layers:
        layer.set_capture_mode(1)
    model.fit(xs, ys, batch_size=16, epochs=1, verbose=0)
    weights = [mw for layer in layers for mw in layer.masked_weights]
    structures_ = [layer.structure for layer in layers for _ in layer.masked_weights]
    seeds = [updates.update_seed(5, 100, i + 1) for i in range(len(weights))]
    expected = []
    for mw, structure, seed in zip(weights, structures_, seeds):
        w, m = keras.ops.convert_to_numpy(mw.weight), keras.ops.convert_to_numpy(mw.mask)
        scores = (np.abs(keras.ops.convert_to_numpy(mw.capture.read())) if grow_by == "gradient"
                  else updates.random_scores(m.shape, seed))
        r = structure.drop_and_grow(w, m, scores, 0.3, seed=seed, reinit_regrown=reinit)
        slots = [np.where(r.grown | r.removed, reset, keras.ops.convert_to_numpy(s))
                 for s, reset in optimizer_state.slot_variables(model.optimizer, mw.weight)]
        expected.append((r, np.where(r.grown, 0, w) * r.new_mask, slots))
    assert all(r.n_moved > 0 for r, _, _ in expected)
    update = compiled_structure.StructuredCompiledUpdate(weights, structures=structures_, grow_by=grow_by,
                                                         reinit_regrown=reinit, optimizer=model.optimizer)
    counts = update(0.3, seeds)
    for i, (mw, (r, new_w, slots)) in enumerate(zip(weights, expected)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mw.mask), r.new_mask)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mw.weight), new_w)
        got = [keras.ops.convert_to_numpy(s) for s, _ in optimizer_state.slot_variables(model.optimizer, mw.weight)]
        for a, b in zip(got, slots):
            np.testing.assert_array_equal(a, b)
        assert (counts.n_active[i], counts.n_dropped[i], counts.n_moved[i]) == (r.n_active, r.n_dropped, r.n_moved)


@pytest.mark.parametrize("build, spec, sparsity", [(partial_cnn, "1x4", 0.7), (lenet_300_100, "1x16", 0.9)])
@pytest.mark.parametrize("grow_by,reinit", [("gradient", False), ("random", True)])
def test_whole_model_partial_blocks_update_equals_the_numpy_path(build, spec, sparsity, grow_by, reinit):
    from keras_rigl import compiled_structure, optimizer_state

    keras.utils.set_random_seed(0)
    model = keras_rigl.sparsify(build(), sparsity, structure=spec, seed=0)
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    layers = keras_rigl.masked_layers(model)
    rng = np.random.default_rng(0)
    shape = tuple(model.inputs[0].shape[1:])
    xs, ys = rng.normal(size=(32,) + shape).astype("float32"), rng.integers(0, 10, 32)
    for layer in layers:
        layer.set_capture_mode(1)
    model.fit(xs, ys, batch_size=16, epochs=1, verbose=0)
    weights = [mw for layer in layers for mw in layer.masked_weights]
    structures_ = [layer.structure for layer in layers for _ in layer.masked_weights]
    seeds = [updates.update_seed(5, 100, i + 1) for i in range(len(weights))]
    expected = []
    for mw, structure, seed in zip(weights, structures_, seeds):
        w, m = keras.ops.convert_to_numpy(mw.weight), keras.ops.convert_to_numpy(mw.mask)
        scores = (np.abs(keras.ops.convert_to_numpy(mw.capture.read())) if grow_by == "gradient"
                  else updates.random_scores(m.shape, seed))
        f = 0.3 if 0 < m.sum() < m.size else 0.0  # both paths leave dense and empty weights alone
        r = structure.drop_and_grow(w, m, scores, f, seed=seed, reinit_regrown=reinit)
        slots = [np.where(r.grown | r.removed, reset, keras.ops.convert_to_numpy(s))
                 for s, reset in optimizer_state.slot_variables(model.optimizer, mw.weight)]
        expected.append((r, np.where(r.grown, 0, w) * r.new_mask, slots, f))
    assert all(r.n_moved > 0 for r, _, _, f in expected if f)
    update = compiled_structure.StructuredCompiledUpdate(weights, structures=structures_, grow_by=grow_by,
                                                         reinit_regrown=reinit, optimizer=model.optimizer)
    counts = update(0.3, seeds)
    for i, (mw, (r, new_w, slots, f)) in enumerate(zip(weights, expected)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mw.mask), r.new_mask)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mw.weight), new_w)
        got = [keras.ops.convert_to_numpy(s) for s, _ in optimizer_state.slot_variables(model.optimizer, mw.weight)]
        for a, b in zip(got, slots):
            np.testing.assert_array_equal(a, b)
        assert (counts.n_active[i], counts.n_dropped[i], counts.n_moved[i]) == (r.n_active, r.n_dropped, r.n_moved)
        assert S.Blocks(int(spec[2:])).holds(keras.ops.convert_to_numpy(mw.mask))


def test_fit_takes_the_compiled_structured_path_by_default():
    keras.utils.set_random_seed(0)
    model = keras_rigl.sparsify(small_cnn(), 0.8, structure="2:4", exclude=["conv1"], seed=0)
    callback = keras_rigl.RigL(update_freq=2, drop_fraction=0.5)
    _fit(model, callback, "2:4", *teacher_data((8, 8, 1), 64))
    from keras_rigl import compiled_structure

    assert isinstance(callback._compiled_update, compiled_structure.StructuredCompiledUpdate)


def test_grow_scores_hook_is_reduced_by_the_structure():
    class GrowLast(keras_rigl.SET):
        """Grows the last inputs first: with 1x4 the last block of every output unit."""

        def grow_scores(self, layer, masked_weight, seed):
            shape = tuple(masked_weight.weight.shape)
            return np.broadcast_to(np.arange(shape[-2], dtype="float32")[:, None], shape)

    inp = keras.Input((8,))
    layer = keras_rigl.Masked(keras.layers.Dense(1, kernel_initializer="ones"), structure="1x4")
    model = keras.Model(inp, layer(inp))
    layer.set_masks({"kernel": np.array([1, 1, 1, 1, 0, 0, 0, 0]).reshape(8, 1)}, zero_weights=True)
    model.compile("sgd", "mse")
    callback = GrowLast(update_freq=1, drop_fraction=1.0, decay="constant", end_step=10)
    callback.attach(model)
    callback.update_masks(model, 1)
    np.testing.assert_array_equal(layer.get_masks()["kernel"].reshape(-1), [0, 0, 0, 0, 1, 1, 1, 1])


def test_resume_from_a_saved_file_keeps_the_structure(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras_rigl.sparsify(lenet_300_100(), 0.9, structure="2:4", seed=0)
    x, y = teacher_data((784,), 128)
    _fit(model, keras_rigl.RigL(update_freq=2, end_step=16), "2:4", x, y, epochs=1)
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    check = InvariantEveryBatch("2:4")
    callback = keras_rigl.RigL(update_freq=2, end_step=16)
    loaded.fit(x, y, batch_size=32, epochs=2, initial_epoch=1, callbacks=[callback, check], verbose=0)
    assert check.checked == 4 and callback.updates["n_moved"].sum() > 0


@pytest.mark.parametrize("spec", ["1x4", "2:4"])
def test_rigl_fit_learns_lenet_300_100(spec):
    keras.utils.set_random_seed(0)
    model = keras_rigl.sparsify(lenet_300_100(), 0.9, structure=spec, seed=0)
    keras_rigl.rescale_active_weights(model)
    x, y = teacher_data((784,), 512)
    history = _fit(model, keras_rigl.RigL(update_freq=4), spec, x, y, epochs=4)
    losses = history.history["loss"]
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("spec", ["1x4", "2:4"])
def test_rigl_fit_learns_a_cnn(spec):
    keras.utils.set_random_seed(0)
    model = keras_rigl.sparsify(small_cnn(), 0.8, structure=spec, exclude=["conv1"], seed=0)
    x, y = teacher_data((8, 8, 1), 512)
    history = _fit(model, keras_rigl.RigL(update_freq=4), spec, x, y, epochs=4)
    losses = history.history["loss"]
    assert losses[-1] < 0.8 * losses[0]


def test_initialize_masks_refused_leaves_the_layers_as_they_were():
    inp = keras.Input((16,))
    layer = keras_rigl.Masked(keras.layers.Dense(8))
    model = keras.Model(inp, layer(inp))
    keras_rigl.initialize_masks(model, 0.3, distribution="erk", seed=0)
    before = layer.get_masks()["kernel"]
    with pytest.raises(ValueError, match="sparsity >= 0.5"):
        keras_rigl.initialize_masks(model, 0.3, structure="2:4", seed=0)  # 2:4 allows at most half
    assert isinstance(layer.structure, S.Unstructured)
    np.testing.assert_array_equal(layer.get_masks()["kernel"], before)
