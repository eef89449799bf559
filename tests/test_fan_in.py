"""keras_rigl.fan_in: constant fan-in masks and SRigL's update with neuron ablation, on tiny arrays."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keras_rigl import fan_in


def _columns(mask):
    """Active rows of every unit, as sets: how the hand cases state their expectations."""
    mask = np.asarray(mask)
    return [set(np.flatnonzero(mask[:, u]).tolist()) for u in range(mask.shape[1])]


def _mask(shape, rows_per_unit):
    mask = np.zeros(shape, "float32")
    for unit, rows in enumerate(rows_per_unit):
        mask[list(rows), unit] = 1
    return mask


def test_fan_in_count_rounds_to_the_nearest_multiple_of_the_units():
    assert fan_in.fan_in_count((10, 4), 13) == 12  # 3.25 per unit -> 3
    assert fan_in.fan_in_count((10, 4), 14) == 16  # 3.5 -> 4
    assert fan_in.fan_in_count((10, 4), 0) == 4  # at least one input per unit
    assert fan_in.fan_in_count((10, 4), 100) == 40  # at most dense
    assert fan_in.fan_in_count((3, 3, 2, 5), 40) == 40  # conv: 18 inputs per unit, 8 each


def test_check_shape_refuses_a_weight_without_input_axes():
    with pytest.raises(ValueError, match="rank >= 2"):
        fan_in.check_shape((7,))


@pytest.mark.parametrize("shape,n_active", [((6, 4), 9), ((3, 3, 2, 5), 40), ((20, 3), 1)])
def test_initial_mask_gives_every_unit_the_same_fan_in(shape, n_active):
    count = fan_in.fan_in_count(shape, n_active)
    mask = fan_in.initial_mask(shape, count, np.random.default_rng(3))
    units = shape[-1]
    assert mask.shape == shape
    np.testing.assert_array_equal(fan_in.unit_counts(mask), np.full(units, count // units))
    np.testing.assert_array_equal(mask, fan_in.initial_mask(shape, count, np.random.default_rng(3)))
    assert fan_in.holds(mask)


def test_initial_mask_depends_on_the_rng_and_keeps_the_largest_scores():
    a = fan_in.initial_mask((50, 4), 40, np.random.default_rng(0))
    b = fan_in.initial_mask((50, 4), 40, np.random.default_rng(1))
    assert not np.array_equal(a, b)
    scores = np.zeros((6, 2))
    scores[[1, 4], 0] = [-3, 2]  # |score|: the largest two of unit 0 are rows 1 and 4
    scores[[0, 5], 1] = [1, 5]
    mask = fan_in.initial_mask((6, 2), 4, np.random.default_rng(0), scores=scores)
    assert _columns(mask) == [{1, 4}, {0, 5}]


def test_initial_mask_refuses_a_count_that_is_not_a_multiple_of_the_units():
    with pytest.raises(ValueError, match="multiple of the 4 units"):
        fan_in.initial_mask((5, 4), 7, np.random.default_rng(0))


@given(units=st.integers(1, 9), full=st.integers(1, 9), per_unit=st.integers(1, 9), alive=st.integers(1, 9))
def test_the_budget_comes_back_from_any_ablated_count(units, full, per_unit, alive):
    per_unit, alive = min(per_unit, full), min(alive, units)
    shape = (full, units)
    budget = units * per_unit
    count = alive * (budget // alive)
    assert fan_in.budget(shape, count) == budget


def test_holds_checks_equal_fan_in_and_the_counting_rule():
    assert fan_in.holds(_mask((4, 3), [{0, 1}, {1, 2}, {0, 3}]))
    assert not fan_in.holds(_mask((4, 3), [{0, 1}, {1}, {0, 3}]))  # unequal
    assert fan_in.holds(_mask((4, 3), [{0, 1, 2}, {1, 2, 3}, set()]))  # B = 6, 2 alive, fan-in 3
    # 2 alive with fan-in 1: B would be 3 = 3 units x 1, and 3 // 2 = 1: holds
    assert fan_in.holds(_mask((4, 3), [{0}, {1}, set()]))
    # 4 units, 2 alive with fan-in 3: 6 active means B = 8, which gives 4 each: not a state the rule reaches
    assert not fan_in.holds(_mask((4, 4), [{0, 1, 2}, {1, 2, 3}, set(), set()]))
    assert fan_in.holds(_mask((4, 4), [{0, 1}, {1, 2}, set(), set()]))  # B = 4: 2 each


def test_a_unit_without_salient_weights_is_ablated_and_its_budget_given_to_the_others():
    # 3 units of 4 inputs, fan-in 2 (B = 6). drop_fraction 0.5: n_prune = 3, n_keep = 3.
    mask = _mask((4, 3), [{0, 1}, {0, 1}, {0, 1}])
    weight = np.array([[5, 3, 0.1], [4, 2, 0.2], [0, 0, 0], [0, 0, 0]], "float32")
    grow = np.zeros((4, 3), "float32")
    grow[2, 0], grow[2, 1], grow[3, 1] = 9, 8, 7
    # salient: kept by |w| = 5, 4 (unit 0), 3 (unit 1); grown by score = (2,0), (2,1), (3,1)
    # counts [3, 3, 0]; threshold max(1, int(0.3 * 2)) = 1: unit 2 is ablated, fan-in 6 // 2 = 3
    result = fan_in.drop_and_grow(weight, mask, grow, 0.5, seed=0)
    assert _columns(result.new_mask) == [{0, 1, 2}, {0, 2, 3}, set()]
    np.testing.assert_array_equal(result.ablated, [False, False, True])
    assert result.fan_in == 3 and result.n_active == 6
    assert _columns(result.grown) == [{2}, {2, 3}, set()]
    assert _columns(result.removed) == [set(), {1}, {0, 1}]
    assert result.n_moved == 3 and result.n_dropped == 3


def test_ablation_off_keeps_every_unit():
    mask = _mask((4, 3), [{0, 1}, {0, 1}, {0, 1}])
    weight = np.array([[5, 3, 0.1], [4, 2, 0.2], [0, 0, 0], [0, 0, 0]], "float32")
    grow = np.zeros((4, 3), "float32")
    grow[2, 0], grow[2, 1], grow[3, 1], grow[3, 2], grow[2, 2] = 9, 8, 7, 0.6, 0.5
    result = fan_in.drop_and_grow(weight, mask, grow, 0.5, seed=0, ablation_threshold=0)
    # keep 5, 4, 3; unit 1 grows its best (row 2), unit 2 its two best (rows 3, 2)
    assert _columns(result.new_mask) == [{0, 1}, {0, 2}, {2, 3}]
    assert not result.ablated.any() and result.n_active == 6


def test_threshold_is_lowered_so_that_the_living_units_can_hold_the_budget():
    # 4 units of 2 inputs, fan-in 1 (B = 4): at least 4 // 2 + 1 = 3 units must live.
    mask = _mask((2, 4), [{0}, {0}, {0}, {0}])
    weight = np.array([[1, 0.001, 0.002, 0.003], [0, 0, 0, 0]], "float32")
    grow = np.zeros((2, 4), "float32")
    grow[1, 0], grow[1, 1], grow[0, 1], grow[1, 2], grow[0, 3] = 9, 8, 7, 0.5, 0.5
    # f = 0.75: n_keep 1 (unit 0, row 0), n_prune 3 -> (1,0), (1,1), (0,1): salient counts [2, 2, 0, 0]
    # gamma_sal = 1 asks for 1 salient entry; the third largest count (0) lowers the threshold to 0
    result = fan_in.drop_and_grow(weight, mask, grow, 0.75, seed=0, ablation_threshold=1.0)
    assert not result.ablated.any()
    assert _columns(result.new_mask) == [{0}, {1}, {1}, {0}]
    assert fan_in.holds(result.new_mask) and result.n_active == 4


def test_an_ablated_unit_with_salient_gradients_comes_back():
    mask = _mask((4, 3), [{0, 1, 2}, {0, 1, 2}, set()])  # B = 6: unit 2 ablated, fan-in 3
    weight = np.array([[5, 3, 0], [4, 0.2, 0], [0.1, 0.3, 0], [0, 0, 0]], "float32")
    grow = np.zeros((4, 3), "float32")
    grow[0, 2], grow[1, 2], grow[3, 2], grow[3, 1] = 9, 8, 7, 0.7
    # n_keep 3 (5, 4 in unit 0; 3 in unit 1), n_prune 3 (all in unit 2): counts [2, 1, 3], none below 1
    result = fan_in.drop_and_grow(weight, mask, grow, 0.5, seed=0)
    assert not result.ablated.any() and result.fan_in == 2
    assert _columns(result.new_mask) == [{0, 1}, {0, 3}, {0, 1}]


def test_a_mask_without_constant_fan_in_is_refused():
    with pytest.raises(ValueError, match="constant fan-in"):
        fan_in.drop_and_grow(np.ones((4, 3)), _mask((4, 3), [{0}, {0, 1}, {2}]), np.zeros((4, 3)), 0.3)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.sampled_from([(5, 3), (8, 4), (3, 3, 2, 4), (12, 1), (2, 6)]),
    density=st.floats(0.05, 1.0),
    fractions=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5),
    gamma=st.sampled_from([0.0, 0.3, 0.9]),
    seed=st.integers(0, 2**31),
    reinit=st.booleans(),
    unit_sparsity=st.sampled_from([0.0, 0.5]),
    progress=st.floats(0.0, 1.0),
)
def test_every_update_keeps_constant_fan_in_and_the_budget(shape, density, fractions, gamma, seed, reinit,
                                                            unit_sparsity, progress):
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    budget = fan_in.fan_in_count(shape, int(density * size))
    mask = fan_in.initial_mask(shape, budget, np.random.default_rng(seed)).astype("float32")
    assert int(mask.sum()) == budget
    for step, fraction in enumerate(fractions):
        weight = (rng.normal(size=shape) * mask).astype("float32")
        grow = np.abs(rng.normal(size=shape)).astype("float32") * (rng.random(shape) < 0.7)
        result = fan_in.drop_and_grow(weight, mask, grow, fraction, seed=step, reinit_regrown=reinit,
                                      ablation_threshold=gamma, unit_sparsity=unit_sparsity, progress=progress)
        new = result.new_mask
        counts = fan_in.unit_counts(new)
        alive = int(np.count_nonzero(counts))
        assert alive == shape[-1] - int(result.ablated.sum())
        np.testing.assert_array_equal(counts == 0, result.ablated)
        assert np.all(counts[~result.ablated] == budget // alive) and result.fan_in == budget // alive
        assert int(new.sum()) == result.n_active == alive * (budget // alive)
        assert fan_in.budget(shape, new.sum()) == budget and fan_in.holds(new)
        assert not (result.grown & ~(new > 0)).any()
        np.testing.assert_array_equal(result.removed, (mask > 0) & ~(new > 0))
        if gamma == 0 and unit_sparsity == 0:
            assert alive == shape[-1]
        if unit_sparsity:
            spare = shape[-1] - (budget // int(np.prod(shape[:-1])) + 1)  # units the budget lets go
            assert int(result.ablated.sum()) >= min(fan_in.units_to_ablate(unit_sparsity, progress, shape[-1]), spare)
            assert not (fan_in.ablated_units(mask) & ~result.ablated).any()  # ablated by the schedule: for good
        mask = new


# ---------------------------------------------------- unit sparsity (Chase-style channel ablation)
def test_the_unit_schedule_ramps_up_by_a_cubic_to_the_target():
    # required ablated units = round(s * units * (1 - (1 - progress)^3)), as gradual pruning schedules do
    assert fan_in.units_to_ablate(0.5, 0.0, 16) == 0
    assert fan_in.units_to_ablate(0.5, 0.5, 16) == 7  # 8 * 0.875
    assert fan_in.units_to_ablate(0.5, 0.953, 16) == 8  # the last update of a plan reaches the target
    assert fan_in.units_to_ablate(0.5, 1.0, 16) == 8
    assert fan_in.units_to_ablate(0.5, None, 16) == 8  # outside a plan: the target
    assert fan_in.units_to_ablate(0.0, 1.0, 16) == 0
    assert fan_in.units_to_ablate(0.25, 2.0, 10) == 3  # progress is clipped to [0, 1]; 2.5 rounds to 3 (half up)


def _four_units():
    # 4 units of 6 inputs, fan-in 2 (B = 8); |w| sums per unit: 9, 1, 5, 0.5
    mask = _mask((6, 4), [{0, 1}, {0, 1}, {0, 1}, {0, 1}])
    weight = np.zeros((6, 4), "float32")
    weight[[0, 1], 0] = [5, -4]
    weight[[0, 1], 1] = [0.6, -0.4]
    weight[[0, 1], 2] = [3, 2]
    weight[[0, 1], 3] = [-0.3, 0.2]
    grow = np.zeros((6, 4), "float32")
    grow[[4, 5], 0] = [9, 8]
    grow[[2, 3], 2] = [7, 6]
    grow[[2, 3], 1] = [0.5, 0.4]
    return weight, mask, grow


@pytest.mark.parametrize("gamma", [0.0, 0.3])
def test_unit_sparsity_ablates_the_units_of_least_magnitude_and_gives_their_budget_to_the_others(gamma):
    weight, mask, grow = _four_units()
    # drop_fraction 0.25: n_prune 2, n_keep 6. The schedule wants 0.5 * 4 = 2 units ablated: the two of the
    # smallest |w| sum (units 1 and 3). With gamma 0.3 SRigL's rule ablates unit 3 (no salient entry) first.
    result = fan_in.drop_and_grow(weight, mask, grow, 0.25, seed=0, ablation_threshold=gamma,
                                  unit_sparsity=0.5, progress=1.0)
    np.testing.assert_array_equal(result.ablated, [False, True, False, True])
    assert result.fan_in == 4 and result.n_active == 8  # B = 8 over 2 living units
    assert _columns(result.new_mask) == [{0, 1, 4, 5}, set(), {0, 1, 2, 3}, set()]
    assert fan_in.holds(result.new_mask)


def test_unit_sparsity_follows_the_progress_of_the_plan():
    weight, mask, grow = _four_units()
    early = fan_in.drop_and_grow(weight, mask, grow, 0.25, seed=0, ablation_threshold=0.0, unit_sparsity=0.5,
                                 progress=0.1)  # 2 * (1 - 0.9^3) = 0.54 -> 1 unit
    np.testing.assert_array_equal(early.ablated, [False, False, False, True])
    none_yet = fan_in.drop_and_grow(weight, mask, grow, 0.25, seed=0, ablation_threshold=0.0, unit_sparsity=0.5,
                                    progress=0.0)
    assert not none_yet.ablated.any()


def test_a_unit_ablated_by_the_schedule_stays_ablated():
    # unit 3 is ablated already (B = 8: 3 living units of fan-in 2); its grow scores are the largest of all
    mask = _mask((6, 4), [{0, 1}, {0, 1}, {0, 1}, set()])
    weight = np.zeros((6, 4), "float32")
    weight[[0, 1], 0], weight[[0, 1], 1], weight[[0, 1], 2] = [5, 4], [0.6, 0.4], [3, 2]
    grow = np.zeros((6, 4), "float32")
    grow[:, 3] = 100
    kept = fan_in.drop_and_grow(weight, mask, grow, 0.5, seed=0, ablation_threshold=0.0, unit_sparsity=0.25,
                                progress=1.0)
    np.testing.assert_array_equal(kept.ablated, [False, False, False, True])
    # without a unit target the same gradients bring it back (SRigL lets ablated units return)
    back = fan_in.drop_and_grow(weight, mask, grow, 0.5, seed=0, ablation_threshold=0.0)
    assert not back.ablated[3]


def test_unit_sparsity_never_ablates_more_units_than_the_budget_can_spare():
    # 4 units of 2 inputs, fan-in 1 (B = 4): at least 4 // 2 + 1 = 3 units must live, whatever the target
    mask = _mask((2, 4), [{0}, {0}, {0}, {0}])
    weight = np.array([[1, 0.5, 0.25, 0.125], [0, 0, 0, 0]], "float32")
    result = fan_in.drop_and_grow(weight, mask, np.zeros((2, 4), "float32"), 0.5, seed=0, ablation_threshold=0.0,
                                  unit_sparsity=0.9, progress=1.0)
    np.testing.assert_array_equal(result.ablated, [False, False, False, True])
    assert fan_in.holds(result.new_mask) and result.n_active == 3


def test_srigl_rule_on_top_of_the_units_ablated_before_never_leaves_too_few_alive():
    # 4 units of 2 inputs, B = 4: 3 must live. Unit 3 was ablated by the target; SRigL's rule (gamma 1) would
    # ablate unit 2 (no salient entry) too: unit 2 lives on instead
    mask = _mask((2, 4), [{0}, {0}, {0}, set()])
    weight = np.array([[1, 0.5, 0.25, 0], [0, 0, 0, 0]], "float32")
    grow = np.zeros((2, 4), "float32")
    grow[1, 3] = 9
    result = fan_in.drop_and_grow(weight, mask, grow, 0.5, seed=0, ablation_threshold=1.0, unit_sparsity=0.25,
                                  progress=1.0)
    np.testing.assert_array_equal(result.ablated, [False, False, False, True])
    assert fan_in.holds(result.new_mask) and result.n_active == 3
