"""sparsify on keras.applications models built with weights=None."""

import keras
import numpy as np
import pytest

import keras_rigl

APPS = {
    "mobilenet": lambda: keras.applications.MobileNet(weights=None, input_shape=(32, 32, 3), alpha=0.25, classes=10),
    "mobilenet_v2": lambda: keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, classes=10),
    "resnet50": lambda: keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10),
}


@pytest.mark.parametrize("name", list(APPS))
def test_sparsify_keras_applications(name, rng, tmp_path):
    model = APPS[name]()
    sparse = keras_rigl.sparsify(model, 0.9, distribution="erk", seed=0)
    report = keras_rigl.sparsity_report(sparse)
    convs = [l.name for l in model.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense))
             and not isinstance(l, keras.layers.DepthwiseConv2D)]
    depthwise = [l.name for l in model.layers if isinstance(l, keras.layers.DepthwiseConv2D)]
    assert list(report.loc[report["masked"], "layer"]) == convs
    # depthwise kernels stay dense (the default) and are listed as such
    assert list(report.loc[~report["masked"], "layer"]) == depthwise
    assert (report.loc[~report["masked"], "active"] == report.loc[~report["masked"], "params"]).all()
    assert report.attrs["masked_sparsity"] == pytest.approx(0.9, abs=1e-3)
    kernels = [v for l in model.layers for v in (getattr(l, "kernel", None), getattr(l, "depthwise_kernel", None)) if v is not None]
    assert report.attrs["params"] == sum(int(np.prod(v.shape)) for v in kernels)
    # the total counts every kernel entry that can be non-zero: the masks' active entries plus every
    # entry of the dense (depthwise) kernels; counted here from the masks themselves
    masks = [keras.ops.convert_to_numpy(mw.mask) for l in keras_rigl.masked_layers(sparse) for mw in l.masked_weights]
    dense_sizes = sum(int(np.prod(l.kernel.shape)) for l in model.layers if l.name in depthwise)
    assert report.attrs["active"] == sum(int(np.count_nonzero(m)) for m in masks) + dense_sizes
    # ...which is the stripped model's non-zero kernel entries, less the active weights that happen to be
    # exactly 0.0 (ResNet50's 23.5 M glorot draws hold about one)
    plain = keras_rigl.strip(sparse)
    plain_kernels = [v for l in plain.layers for v in (getattr(l, "kernel", None),) if v is not None]
    exact_zeros = sum(
        int(np.sum((keras.ops.convert_to_numpy(mw.mask) != 0) & (keras.ops.convert_to_numpy(mw.weight) == 0)))
        for l in keras_rigl.masked_layers(sparse) for mw in l.masked_weights
    ) + sum(int(np.sum(keras.ops.convert_to_numpy(l.kernel) == 0)) for l in model.layers if l.name in depthwise)
    assert report.attrs["active"] - exact_zeros == sum(
        int(np.count_nonzero(keras.ops.convert_to_numpy(v))) for v in plain_kernels
    )
    assert report["dense_flops"].notna().all()
    assert report.attrs["dense_flops"] == keras_rigl.model_flops(sparse).dense
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(plain(x), sparse(x), atol=1e-5)
    if name == "mobilenet_v2":
        sparse.save(tmp_path / "m.keras")
        again = keras.models.load_model(tmp_path / "m.keras")
        np.testing.assert_array_equal(again(x), sparse(x))


def test_nested_application_backbone(rng):
    backbone = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), alpha=0.35, include_top=False)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(backbone(inp))
    model = keras.Model(inp, keras.layers.Dense(5, name="head")(x))
    sparse = keras_rigl.sparsify(model, 0.8, seed=0)
    names = [l.layer.name for l in keras_rigl.masked_layers(sparse)]
    assert names[-1] == "head" and "Conv1" in names
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(keras_rigl.strip(sparse)(x), sparse(x), atol=1e-5)
