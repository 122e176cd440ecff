"""ftk.compact and the channel topology (ft_keras.channels): widths, weights and equal outputs."""

import keras
import numpy as np
import pytest

import ft_keras as ftk
from ft_keras import channels


def _mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, activation="relu", bias_initializer="ones", name="d1"),
        keras.layers.BatchNormalization(name="bn", beta_initializer="ones"),
        keras.layers.Dropout(0.1, name="drop"),
        keras.layers.Dense(5, activation="tanh", bias_initializer="ones", name="d2"),
        keras.layers.Dense(3, name="out"),
    ], name="mlp")


def _convnet():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(6, 3, activation="relu", bias_initializer="ones", name="c1")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(h)
    h = keras.layers.Conv2D(5, 1, activation="relu", bias_initializer="ones", name="c2")(h)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(7, activation="relu", bias_initializer="ones", name="d1")(h)
    outputs = keras.layers.Dense(3, name="out")(h)
    model = keras.Model(inputs, outputs, name="convnet")
    model(np.zeros((1, 8, 8, 3), "float32"))
    return model


def _set(layer, **changes):
    """Sets some of a layer's weights by name (e.g. kernel=..., bias=...)."""
    values = []
    for weight in layer.weights:
        value = keras.ops.convert_to_numpy(weight).copy()
        if weight.name in changes:
            value = changes[weight.name](value)
        values.append(value)
    layer.set_weights(values)


def _zero_channels(index, axis=-1):
    def change(value):
        value = np.moveaxis(value, axis, -1).copy()
        value[..., index] = 0
        return np.moveaxis(value, -1, axis)
    return change


def _assert_close(a, b, x):
    ya, yb = np.asarray(a(x, training=False)), np.asarray(b(x, training=False))
    np.testing.assert_allclose(ya, yb, rtol=1e-5, atol=1e-5 * np.abs(ya).max())


def test_topology_of_a_convnet():
    groups, reasons = channels.analyse(_convnet())
    found = {g.name: (g.num_channels, [n.name for n in g.norms],
                      [(c.layer.name, c.tile) for c in g.consumers], g.zero_safe)
             for g in groups}
    assert found == {
        "dw": (12, [], [("c2", 1)], True),
        "c2": (5, [], [("d1", 9)], True),  # Flatten over 3 x 3 positions
        "d1": (7, [], [("out", 1)], True),
    }
    assert "DepthwiseConv2D" in reasons["c1"]  # c1 feeds a depthwise layer: not a group
    assert "model output" in reasons["out"]


def test_topology_refuses_residual_and_flags_nonzero_activations():
    inputs = keras.Input((4,))
    a = keras.layers.Dense(4, name="a")(inputs)
    b = keras.layers.Dense(4, activation="sigmoid", name="b")(a)
    s = keras.layers.Add(name="add")([a, b])
    c = keras.layers.Dense(3, activation="relu", name="c")(s)
    d = keras.layers.Activation("softplus", name="sp")(c)
    outputs = keras.layers.Dense(2, name="out")(d)
    groups, reasons = channels.analyse(keras.Model(inputs, outputs))
    assert [(g.name, g.zero_safe) for g in groups] == [("c", False)]  # softplus(0) != 0
    assert "add (Add)" in reasons["a"] and "add (Add)" in reasons["b"]


def test_compact_sequential_removes_zero_units_and_rows():
    model = _mlp()
    model(np.zeros((2, 6), "float32"))
    # d1 units 1 and 6: zero kernel column, bias and BN beta / moving mean: provably zero.
    _set(model.get_layer("d1"), kernel=_zero_channels([1, 6]), bias=_zero_channels([1, 6]))
    _set(model.get_layer("bn"), beta=_zero_channels([1, 6]))
    # unit 3: zero kernel and bias but BN beta = 1 -> it is not zero downstream: kept.
    _set(model.get_layer("d1"), kernel=_zero_channels([3]), bias=_zero_channels([3]))
    # d2 (tanh: 0 -> 0): unit 4 has zero outgoing weights in `out`, whatever it computes.
    _set(model.get_layer("out"), kernel=_zero_channels([4], axis=0))
    compacted = ftk.compact(model)
    assert isinstance(compacted, keras.Sequential)
    assert not ftk.masked_layers(compacted)
    assert compacted.get_layer("d1").units == 6
    assert compacted.get_layer("d2").units == 4
    assert compacted.get_layer("bn").gamma.shape == (6,)
    assert compacted.get_layer("d2").kernel.shape == (6, 4)
    assert compacted.get_layer("out").kernel.shape == (4, 3)
    kept = [0, 2, 3, 4, 5, 7]
    np.testing.assert_array_equal(compacted.get_layer("bn").moving_variance.numpy(),
                                  model.get_layer("bn").moving_variance.numpy()[kept])
    x = np.random.default_rng(0).normal(size=(16, 6)).astype("float32")
    _assert_close(model, compacted, x)
    report = {row.name: row.channels for row in ftk.sparsity_report(model).layers}
    assert report["d1"] == (6, 8) and report["d2"] == (4, 5) and report["out"] is None


def test_compact_functional_conv_flatten_and_sparse_model(tmp_path):
    model = _convnet()
    _set(model.get_layer("c2"), kernel=_zero_channels([0, 3]), bias=_zero_channels([0, 3]))
    _set(model.get_layer("d1"), kernel=_zero_channels([2]), bias=_zero_channels([2]))
    sparse = ftk.sparsify(model, sparsity=0.5, seed=0)
    path = str(tmp_path / "sparse.keras")
    sparse.save(path)
    loaded = keras.models.load_model(path)
    compacted = ftk.compact(loaded)
    assert compacted.get_layer("c2").filters == 3
    assert compacted.get_layer("d1").kernel.shape[0] == 27  # 3 x 3 positions x 3 channels
    assert compacted.get_layer("d1").units <= 6
    assert compacted.get_layer("dw").kernel.shape == (3, 3, 6, 2)  # left as it is
    x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")
    _assert_close(sparse, compacted, x)


def test_compact_keeps_dense_and_unstructured_models_equivalent():
    model = _convnet()
    compacted = ftk.compact(model)
    assert [w.shape for w in compacted.weights] == [w.shape for w in model.weights]
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(compacted(x)))


def test_compact_keeps_one_channel_and_refuses_subclassed_models():
    model = _mlp()
    model(np.zeros((1, 6), "float32"))
    _set(model.get_layer("out"), kernel=lambda k: np.zeros_like(k))
    compacted = ftk.compact(model)
    assert compacted.get_layer("d2").units == 1
    _assert_close(model, compacted, np.ones((2, 6), "float32"))

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="subclassed"):
        ftk.compact(Sub())


def test_compact_nested_model_and_layers_it_leaves():
    keras.utils.set_random_seed(4)
    block = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(6, activation="relu", name="inner1"),
                              keras.layers.Dense(4, name="inner2")], name="block")
    inputs = keras.Input((5,))
    h = block(inputs)
    h = keras.layers.Dense(7, activation="softmax", name="soft")(h)  # mixes its units
    h = keras.layers.Dense(4, name="pre")(h)
    h = keras.layers.Add(name="add")([h, h])
    outputs = keras.layers.Dense(2, name="out")(h)
    model = keras.Model(inputs, outputs)
    _set(block.get_layer("inner1"), kernel=_zero_channels([0, 5]), bias=_zero_channels([0, 5]))
    _set(model.get_layer("soft"), kernel=_zero_channels([1]), bias=_zero_channels([1]))
    _set(model.get_layer("pre"), kernel=_zero_channels([2]), bias=_zero_channels([2]))
    _, reasons = channels.analyse(model)
    assert "softmax" in reasons["soft"] and "add (Add)" in reasons["pre"]
    compacted = ftk.compact(model)
    assert compacted.get_layer("block").get_layer("inner1").units == 4
    assert compacted.get_layer("soft").units == 7 and compacted.get_layer("pre").units == 4
    _assert_close(model, compacted, np.random.default_rng(3).normal(size=(8, 5)).astype("f"))
