"""The "fan_in" structure in Keras: sparsify, every callback in model.fit, save/load, then condense."""

import keras
import numpy as np
import pytest
from rigl_harness import zoo

import keras_rigl
from keras_rigl import fan_in, structure


def _example_cnn(seed=0, sparsity=0.9, structure_spec="fan_in", distribution="erk"):
    keras.utils.set_random_seed(seed)
    model = zoo.cnn((8, 8, 1), 10)
    return keras_rigl.sparsify(model, sparsity, distribution=distribution, seed=seed, structure=structure_spec)


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8, 8, 1)).astype("float32"), rng.integers(0, 10, size=n)


def _masks(model):
    return {layer.layer.name: layer.get_masks()["kernel"] for layer in keras_rigl.masked_layers(model)}


def test_structure_names_parse_and_configs_round_trip():
    assert structure.get("fan_in") == keras_rigl.FanIn() and keras_rigl.FanIn().ablation_threshold == 0.3
    assert structure.get(" Fan_In(0.5) ") == keras_rigl.FanIn(0.5)
    assert keras_rigl.FanIn(0.5).spec == "fan_in(0.5)" and structure.get(keras_rigl.FanIn(0.5).spec) == keras_rigl.FanIn(0.5)
    config = structure.serialize(keras_rigl.FanIn(0.25))
    assert structure.get(config) == keras_rigl.FanIn(0.25)
    with pytest.raises(ValueError, match="'fan_in'"):
        structure.get("fanin")  # the error lists it
    for bad in (1.5, -0.1, "0.3", None):
        with pytest.raises(ValueError, match="ablation_threshold"):
            keras_rigl.FanIn(bad)


def test_a_weight_without_input_axes_is_refused_by_name():
    with pytest.raises(ValueError, match="layer/bias .*'fan_in'.*exclude"):
        keras_rigl.FanIn().check_shape((4,), "layer/bias")


@pytest.mark.parametrize("distribution", ["erk", "er", "uniform"])
def test_sparsify_draws_constant_fan_in_and_turns_ablation_off_at_the_logits(distribution):
    sparse = _example_cnn(distribution=distribution)
    for layer in keras_rigl.masked_layers(sparse):
        mask = layer.get_masks()["kernel"]
        counts = fan_in.unit_counts(mask)
        assert np.all(counts == counts[0]) and counts[0] >= 1, layer.name
        want = keras_rigl.FanIn(0.0) if layer.layer.name == "logits" else keras_rigl.FanIn()
        assert layer.structure == want, layer.name
    if distribution == "uniform":
        return  # the first layer stays dense: the total is above the target by design
    active, total = keras_rigl.count_active(sparse)
    units = sum(layer.layer.kernel.shape[-1] for layer in keras_rigl.masked_layers(sparse))
    assert abs(active - 0.1 * total) <= units / 2  # each count a whole number of units, nearest to the target


class _CheckEveryUpdate(keras.callbacks.Callback):
    """Placed after the sparse-training callback: checks every mask after every batch (so after every update)."""

    def __init__(self, model):
        super().__init__()
        self.budgets = {name: int(mask.sum()) for name, mask in _masks(model).items()}
        self.ablated_seen = 0
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        for name, mask in _masks(self.model).items():
            counts = fan_in.unit_counts(mask)
            alive = int(np.count_nonzero(counts))
            budget = self.budgets[name]
            assert fan_in.holds(mask), (name, np.unique(counts))
            assert np.all(counts[counts > 0] == budget // alive), name
            assert int(mask.sum()) == alive * (budget // alive), name  # the count rule, exactly
            self.ablated_seen = max(self.ablated_seen, mask.shape[-1] - alive)


@pytest.mark.parametrize("method", ["RigL", "SET", "Static", "SNFS"])
def test_every_update_keeps_constant_fan_in_and_the_budget(method):
    sparse = _example_cnn(sparsity=0.9, structure_spec=keras_rigl.FanIn(0.9))
    sparse.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    callback = getattr(keras_rigl, method)(update_freq=2, drop_fraction=0.5, seed=0)
    check = _CheckEveryUpdate(sparse)
    sparse.fit(x, y, batch_size=16, epochs=2, callbacks=[callback, check], verbose=0)
    assert check.batches == 8
    if method != "Static":
        assert len(callback.updates) > 0
        assert (callback.updates["n_moved"] > 0).any()
    if method == "RigL":
        assert check.ablated_seen > 0  # gamma_sal 0.9 ablates at this sparsity (the logits never)
    logits = _masks(sparse)["logits"]
    assert np.all(fan_in.unit_counts(logits) > 0)


def test_rigl_fan_in_then_condense_gives_the_same_outputs_with_fewer_parameters():
    sparse = _example_cnn(sparsity=0.9, structure_spec=keras_rigl.FanIn(0.9))
    sparse.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    sparse.fit(x, y, batch_size=16, epochs=2, callbacks=[keras_rigl.RigL(update_freq=2, drop_fraction=0.5, seed=0)],
               verbose=0)
    masks = _masks(sparse)

    small, report = keras_rigl.condense(sparse, return_report=True)

    probe = np.random.default_rng(5).normal(size=(32, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(small.predict(probe, verbose=0), keras_rigl.strip(sparse).predict(probe, verbose=0),
                               atol=1e-5, rtol=1e-5)
    # fc1's units feed only the logits (Dense): every ablated unit goes, and every unit the logits do not read
    fc1_gone = fan_in.ablated_units(masks["fc1"]) | ~masks["logits"].any(axis=1)
    assert fc1_gone.any()
    assert report.removed["fc1"] == np.flatnonzero(fc1_gone).tolist()
    # conv3 is read through Flatten by fc1 (a Dense): its ablated channels go whatever their constant
    conv3_ablated = np.flatnonzero(fan_in.ablated_units(masks["conv3"])).tolist()
    assert set(conv3_ablated) <= set(report.removed.get("conv3", []))
    # conv1 and conv2 are read by "same"-padded convolutions: all their ablated channels go but one carrier
    ablated = 0
    for name in ("conv1", "conv2"):
        channels = set(np.flatnonzero(fan_in.ablated_units(masks[name])).tolist())
        assert len(channels - set(report.removed.get(name, []))) <= 1, (name, str(report))
        ablated += len(channels)
    assert ablated + len(conv3_ablated) > 0, str(report)  # gamma_sal 0.9 ablates channels here
    assert small.count_params() < keras_rigl.strip(sparse).count_params()
    assert small.get_layer("fc1").units == 64 - int(fc1_gone.sum())


def test_save_and_load_keep_the_structure(tmp_path):
    sparse = _example_cnn(structure_spec=keras_rigl.FanIn(0.6))
    sparse.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data(32)
    sparse.fit(x, y, batch_size=16, epochs=1, callbacks=[keras_rigl.RigL(update_freq=1, seed=0)], verbose=0)
    path = tmp_path / "fan_in.keras"
    sparse.save(path)
    again = keras.models.load_model(path)
    for before, after in zip(keras_rigl.masked_layers(sparse), keras_rigl.masked_layers(again)):
        assert after.structure == before.structure
        np.testing.assert_array_equal(after.get_masks()["kernel"], before.get_masks()["kernel"])
    assert keras_rigl.masked_layers(again)[0].structure == keras_rigl.FanIn(0.6)
    assert keras_rigl.masked_layers(again)[-1].structure == keras_rigl.FanIn(0.0)
    # a loaded model keeps updating under its structure
    check = _CheckEveryUpdate(again)
    again.fit(x, y, batch_size=16, epochs=1, callbacks=[keras_rigl.RigL(update_freq=1, seed=1), check], verbose=0)
    assert check.batches == 2


def test_unit_sparsity_parses_and_round_trips():
    target = keras_rigl.FanIn(unit_sparsity=0.5)
    assert structure.get("fan_in(unit_sparsity=0.5)") == target and target.spec == "fan_in(unit_sparsity=0.5)"
    both = keras_rigl.FanIn(0.2, unit_sparsity=0.25)
    assert both.spec == "fan_in(0.2,unit_sparsity=0.25)" and structure.get(" fan_in(0.2, unit_sparsity=0.25)") == both
    assert structure.get(structure.serialize(both)) == both
    assert structure.get({"class_name": "keras_rigl>FanIn", "config": {"ablation_threshold": 0.3}}) == keras_rigl.FanIn()
    assert target.at_model_output() == keras_rigl.FanIn(0.0)
    for bad in (1.0, -0.1, "0.5"):
        with pytest.raises(ValueError, match="unit_sparsity"):
            keras_rigl.FanIn(unit_sparsity=bad)
    for bad in ("fan_in()", "fan_in(unit_sparsity=)", "fan_in(units=0.5)"):
        with pytest.raises(ValueError, match="Unknown structure"):
            structure.get(bad)


def test_unit_sparsity_in_fit_ablates_the_target_and_condense_removes_it():
    # 0.8 sparse (ERK): conv1 is dense (no unit can go), the other hidden layers have room to lose half
    sparse = _example_cnn(sparsity=0.8, structure_spec="fan_in(0,unit_sparsity=0.5)")
    sparse.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data()
    before = keras_rigl.count_active(sparse)[0]
    rigl = keras_rigl.RigL(update_freq=2, drop_fraction=0.3, seed=0)
    check = _CheckEveryUpdate(sparse)
    dead_after = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: dead_after.append(
        int(fan_in.ablated_units(_masks(sparse)["conv2"]).sum())))
    sparse.fit(x, y, batch_size=16, epochs=4, callbacks=[rigl, check, record], verbose=0)  # 16 steps, end_step 12
    # the plan's progress reaches the structure: the first update (step 2 of 12) ablates
    # round(0.5 * 32 * (1 - (10/12)^3)) = 7 of conv2's channels, not the whole target of 16
    assert dead_after[1] == 7 and dead_after[-1] == 16, dead_after
    masks = _masks(sparse)
    for name, mask in masks.items():
        units = mask.shape[-1]
        dead = int(fan_in.ablated_units(mask).sum())
        full = int(np.prod(mask.shape[:-1]))
        if name == "logits":
            assert dead == 0
            continue
        budget = fan_in.budget(mask.shape, mask.sum())
        assert dead == max(0, min(units // 2, units - budget // full - 1)), (name, dead)
        assert (dead == 0) == (name == "conv1"), name
    # the budget goes to the living units: the model's active count moves by less than one unit per layer
    assert abs(keras_rigl.count_active(sparse)[0] - before) <= sum(m.shape[-1] for m in masks.values())

    small, report = keras_rigl.condense(sparse, return_report=True)
    probe = np.random.default_rng(5).normal(size=(32, 8, 8, 1)).astype("float32")
    np.testing.assert_allclose(small.predict(probe, verbose=0), keras_rigl.strip(sparse).predict(probe, verbose=0),
                               atol=1e-5, rtol=1e-5)
    for name in ("conv1", "conv2", "conv3", "fc1"):
        dead = int(fan_in.ablated_units(masks[name]).sum())
        # conv1/conv2 feed "same"-padded convolutions: one ablated channel may stay as the carrier of constants
        assert len(report.removed.get(name, [])) >= dead - (1 if name in ("conv1", "conv2") else 0), str(report)
    assert small.count_params() < 0.5 * keras_rigl.strip(sparse).count_params()
