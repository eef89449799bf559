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
