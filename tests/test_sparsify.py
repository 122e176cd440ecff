"""sparsify / strip / sparsity_report on Sequential, Functional and nested models."""

import keras
import numpy as np
import pytest

import ft_keras as ftk
from ft_keras import densities as distributions
from ft_keras import layers as ml
from ft_keras.sparsify import walk_layers


def _lenet():
    keras.utils.set_random_seed(0)
    return ftk.models.lenet_300_100()


def _conv_model():
    """Functional model with a nested Sequential and one layer of every prunable kind."""
    keras.utils.set_random_seed(1)
    inner = keras.Sequential(
        [
            keras.Input((8, 8, 8)),
            keras.layers.Conv2D(8, 3, padding="same", name="inner_conv"),
            keras.layers.DepthwiseConv2D(3, padding="same", name="inner_dw"),
        ],
        name="block",
    )
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stem")(inputs)
    h = inner(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Conv2DTranspose(4, 3, padding="same", name="deconv")(h)
    h = keras.layers.Reshape((64, 4))(h)
    h = keras.layers.Conv1D(8, 3, name="c1d")(h)
    h = keras.layers.Reshape((62, 8, 1, 1))(h)
    h = keras.layers.Conv3D(4, (3, 3, 1), name="c3d")(h)
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(10, name="head")(h)
    model = keras.Model(inputs, outputs, name="convnet")
    model(np.zeros((1, 8, 8, 3), "float32"))  # materialise BN statistics etc.
    return model


def _kernels(model):
    return {
        layer.name: layer.get_weights()[0]
        for layer in walk_layers(model)
        if ml.has_kernel(layer)
    }


def test_lenet_erk_counts_and_weights():
    model = _lenet()
    sparse = ftk.sparsify(model, sparsity=0.9, distribution="erk", seed=3)
    shapes = {"fc1": (784, 300), "fc2": (300, 100), "logits": (100, 10)}
    densities = distributions.layer_densities(shapes, 0.9, "erk")
    counts = distributions.active_counts(shapes, densities)
    assert densities["logits"] == 1.0  # the ERK cap fires for the classifier
    masked = {layer.name: layer for layer in ftk.masked_layers(sparse)}
    assert sorted(masked) == ["fc1", "fc2"]
    assert isinstance(sparse.get_layer("logits"), keras.layers.Dense)
    assert not ml.is_masked(sparse.get_layer("logits"))
    original = {layer.name: layer.get_weights() for layer in model.layers if layer.weights}
    for name, layer in masked.items():
        mask = layer.kernel_mask.numpy()
        kernel = layer.masked_kernel.numpy()
        assert mask.sum() == counts[name]
        np.testing.assert_array_equal(kernel[~mask], 0.0)
        np.testing.assert_array_equal(kernel[mask], original[name][0][mask])  # copied, not new
        np.testing.assert_array_equal(layer.bias.numpy(), original[name][1])
    np.testing.assert_array_equal(sparse.get_layer("logits").get_weights()[0], original["logits"][0])
    total = sum(counts.values())
    assert abs(total - round(0.1 * 266_200)) <= 3
    # the original model is untouched
    assert np.count_nonzero(model.get_layer("fc1").get_weights()[0]) == 784 * 300


def test_seeds_make_masks_reproducible():
    model = _lenet()
    a = ftk.sparsify(model, 0.8, seed=0)
    b = ftk.sparsify(model, 0.8, seed=0)
    c = ftk.sparsify(model, 0.8, seed=1)
    for la, lb, lc in zip(ftk.masked_layers(a), ftk.masked_layers(b), ftk.masked_layers(c)):
        np.testing.assert_array_equal(la.kernel_mask.numpy(), lb.kernel_mask.numpy())
        assert (la.kernel_mask.numpy() != lc.kernel_mask.numpy()).any()


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
def test_nested_functional_model(distribution):
    model = _conv_model()
    sparse = ftk.sparsify(model, sparsity=0.5, distribution=distribution, seed=0)
    names = [layer.name for layer in ftk.masked_layers(sparse)]
    prunable = ("stem", "inner_conv", "inner_dw", "c1d", "c3d", "head")
    shapes = {
        layer.name: tuple(layer.get_weights()[0].shape)
        for layer in walk_layers(model)
        if layer.name in prunable
    }
    densities = distributions.layer_densities(shapes, 0.5, distribution)
    assert names == [n for n in shapes if densities[n] < 1.0]  # in model order
    if distribution == "uniform":
        assert names == list(shapes)
    block = sparse.get_layer("block")
    assert isinstance(block, keras.Sequential)
    for name in ("inner_conv", "inner_dw"):
        assert ml.is_masked(block.get_layer(name)) == (densities[name] < 1.0)
    assert "deconv" not in names
    report = ftk.sparsity_report(sparse)
    assert [row.name for row in report.unsupported] == ["deconv"]
    prunable = [row for row in report.layers if row.name != "deconv"]
    total = sum(row.size for row in prunable)
    active = sum(row.active for row in prunable)
    assert abs(active - round(0.5 * total)) <= len(prunable)
    # BN statistics copied
    np.testing.assert_array_equal(
        sparse.get_layer("bn").get_weights()[2], model.get_layer("bn").get_weights()[2]
    )
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    assert sparse.predict(x, verbose=0).shape == (2, 10)


def test_keep_dense_layer_stays_plain():
    model = _lenet()
    sparse = ftk.sparsify(model, sparsity=0.8, distribution="uniform", keep_dense="logits")
    assert not ml.is_masked(sparse.get_layer("logits"))
    report = ftk.sparsity_report(sparse)
    rows = {r.name: r for r in report.layers}
    assert rows["logits"].status == "dense (not masked)" and rows["logits"].density == 1.0
    expected = (0.2 * 266_200 - 1000) / (266_200 - 1000)  # the rest share the budget evenly
    assert abs(rows["fc1"].density - expected) < 1e-5
    assert abs(rows["fc2"].density - expected) < 1e-4
    assert abs(report.total_active - round(0.2 * 266_200)) <= 3
    with pytest.raises(ValueError, match="keep_dense"):
        ftk.sparsify(model, sparsity=0.8, keep_dense="fc1")  # fc1 alone exceeds the budget


def test_strip_gives_plain_model_with_equal_predictions(fashion_mnist_small):
    (x, _), _ = fashion_mnist_small
    sparse = ftk.sparsify(_conv_model(), 0.7, seed=2)
    plain = ftk.strip(sparse)
    for layer in walk_layers(plain):
        assert not ml.is_masked(layer)
        assert not any(w.name == "kernel_mask" for w in layer.weights)
    assert type(plain.get_layer("stem")) is keras.layers.Conv2D
    images = np.random.default_rng(0).random((8, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(
        plain.predict(images, verbose=0), sparse.predict(images, verbose=0), rtol=0, atol=1e-6
    )
    lenet = ftk.sparsify(_lenet(), 0.9)
    np.testing.assert_array_equal(
        ftk.strip(lenet).predict(x[:64], verbose=0), lenet.predict(x[:64], verbose=0)
    )
    stripped_kernel = ftk.strip(lenet).get_layer("fc1").get_weights()[0]
    assert np.count_nonzero(stripped_kernel) <= ftk.masked_layers(lenet)[0].num_active


def test_report_numbers_and_text():
    sparse = ftk.sparsify(_lenet(), 0.9)
    report = ftk.sparsity_report(sparse)
    assert report.total_size == 266_200
    assert report.num_params == 266_610
    assert report.num_active_params == report.total_active + 410
    assert 0.0999 < report.density < 0.1001
    text = str(report)
    assert "fc1" in text and "MaskedDense" in text and "0.0796" in text
    assert report.as_dict()["total_active"] == report.total_active


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(sparsity=1.0), ValueError, "sparsity"),
        (dict(sparsity=-0.1), ValueError, "sparsity"),
        (dict(sparsity="0.5"), TypeError, "sparsity"),
        (dict(sparsity=0.5, distribution="gaussian"), ValueError, "distribution"),
        (dict(sparsity=0.5, keep_dense=["nope"]), ValueError, "keep_dense"),
        (dict(sparsity=0.5, keep_dense=[3]), TypeError, "keep_dense"),
        (dict(sparsity=0.5, seed="x"), TypeError, "seed"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ftk.sparsify(_lenet(), **kwargs)


def test_model_without_prunable_layer():
    model = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization()])
    with pytest.raises(ValueError, match="no prunable layer"):
        ftk.sparsify(model, 0.5)


def test_subclassed_model_and_non_model():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    sub = Sub()
    sub(np.zeros((1, 3), "float32"))
    with pytest.raises(TypeError, match="subclassed"):
        ftk.sparsify(sub, 0.5)
    with pytest.raises(TypeError, match="model"):
        ftk.sparsify(keras.layers.Dense(2), 0.5)


def test_already_sparsified():
    sparse = ftk.sparsify(_lenet(), 0.5)
    with pytest.raises(ValueError, match="already sparsified"):
        ftk.sparsify(sparse, 0.5)


def test_sparse_model_saves_and_loads(tmp_path):
    sparse = ftk.sparsify(_conv_model(), 0.6, seed=4)
    path = str(tmp_path / "sparse.keras")
    sparse.save(path)
    loaded = keras.models.load_model(path)
    for a, b in zip(ftk.masked_layers(sparse), ftk.masked_layers(loaded)):
        assert type(a) is type(b)
        np.testing.assert_array_equal(a.kernel_mask.numpy(), b.kernel_mask.numpy())
        np.testing.assert_array_equal(a.masked_kernel.numpy(), b.masked_kernel.numpy())


if __name__ == "__main__":  # bazel test / python tests/test_sparsify.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))


def test_report_lists_kept_channels_of_channel_prunable_layers():
    sparse = ftk.sparsify(_lenet(), sparsity=0.9, seed=0)
    rows = {row.name: row for row in ftk.sparsity_report(sparse).layers}
    # fc1 and fc2 feed Dense layers only; logits is the model output (not channel-prunable)
    assert rows["fc1"].channels[1] == 300 and rows["fc2"].channels[1] == 100
    assert rows["logits"].channels is None
    fc2 = sparse.get_layer("fc2")
    fc2.masked_kernel.assign(np.ones((300, 100), "float32"))
    mask = np.ones((300, 100), bool)
    mask[:, :7] = False  # seven units with an all-zero kernel slice (and zero bias)
    fc2.set_mask(mask)
    report = ftk.sparsity_report(sparse)
    assert {r.name: r.channels for r in report.layers}["fc2"] == (93, 100)
    assert "93/100" in str(report)
