"""Masked layers: mask variable, exact zeros, serialization round trips."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ft_keras import layers as ml

LAYER_CASES = [
    (ml.MaskedDense, keras.layers.Dense, dict(units=5), (None, 7), (3, 7)),
    (ml.MaskedConv1D, keras.layers.Conv1D, dict(filters=4, kernel_size=3), (None, 9, 2), (3, 9, 2)),
    (
        ml.MaskedConv2D,
        keras.layers.Conv2D,
        dict(filters=4, kernel_size=3, padding="same"),
        (None, 6, 6, 2),
        (3, 6, 6, 2),
    ),
    (ml.MaskedConv3D, keras.layers.Conv3D, dict(filters=2, kernel_size=2), (None, 4, 4, 4, 1),
     (2, 4, 4, 4, 1)),
    (
        ml.MaskedDepthwiseConv2D,
        keras.layers.DepthwiseConv2D,
        dict(kernel_size=3, depth_multiplier=2),
        (None, 5, 5, 3),
        (2, 5, 5, 3),
    ),
]


def _random_mask(shape, density, seed):
    rng = np.random.default_rng(seed)
    return rng.random(shape) < density


@pytest.mark.parametrize("masked_cls,plain_cls,kwargs,input_shape,batch_shape", LAYER_CASES)
def test_mask_variable_and_exact_zeros(masked_cls, plain_cls, kwargs, input_shape, batch_shape):
    layer = masked_cls(**kwargs)
    layer.build(input_shape)
    assert isinstance(layer, plain_cls)
    assert layer.kernel_mask.dtype == "bool"
    assert not layer.kernel_mask.trainable
    assert tuple(layer.kernel_mask.shape) == tuple(layer.masked_kernel.shape)
    assert any(w is layer.kernel_mask for w in layer.non_trainable_weights)
    assert not any(w is layer.kernel_mask for w in layer.trainable_weights)
    # all-ones mask at build: nothing changes
    assert layer.num_active == layer.kernel_size_total

    # negative weights so that a multiply by 0 would give -0.0
    layer.masked_kernel.assign(-np.abs(layer.masked_kernel.numpy()) - 0.1)
    mask = _random_mask(tuple(layer.masked_kernel.shape), 0.3, 0)
    layer.set_mask(mask)
    kernel = layer.masked_kernel.numpy()
    assert layer.num_active == int(mask.sum())
    np.testing.assert_array_equal(kernel[~mask], 0.0)
    assert not np.signbit(kernel[~mask]).any(), "off-mask zeros must be +0.0"
    assert (kernel[mask] < 0).all()

    # forward pass equals the plain layer with the same (sparse) weights
    plain = plain_cls(**kwargs)
    plain.build(input_shape)
    plain.set_weights([w for w in layer.get_weights() if w.dtype != bool])
    x = np.random.default_rng(1).normal(size=batch_shape).astype("float32")
    np.testing.assert_array_equal(layer(x).numpy(), plain(x).numpy())


def test_kernel_gradient_is_dense():
    """The forward pass does not multiply by the mask, so dL/dW is the dense gradient."""
    layer = ml.MaskedDense(4, use_bias=False)
    layer.build((None, 3))
    mask = np.zeros((3, 4), bool)
    mask[0, 0] = True
    layer.set_mask(mask)
    x = tf.ones((2, 3))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(x))
    grad = tape.gradient(loss, layer.masked_kernel.value).numpy()
    np.testing.assert_allclose(grad, np.full((3, 4), 2.0))


def test_set_mask_rejects_wrong_shape():
    layer = ml.MaskedDense(4)
    layer.build((None, 3))
    with pytest.raises(ValueError, match="mask has shape"):
        layer.set_mask(np.ones((4, 3), bool))


@pytest.mark.parametrize("masked_cls,plain_cls,kwargs,input_shape,batch_shape", LAYER_CASES)
def test_config_round_trip(masked_cls, plain_cls, kwargs, input_shape, batch_shape):
    del batch_shape
    layer = masked_cls(name="x", **kwargs)
    layer.build(input_shape)
    config = layer.get_config()
    plain = plain_cls(name="x", **kwargs)
    assert config == plain.get_config()
    clone = masked_cls.from_config(config)
    assert type(clone) is masked_cls
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == f"ft_keras>{masked_cls.__name__}"
    again = keras.saving.deserialize_keras_object(serialized)
    assert type(again) is masked_cls


def _model_with_all_layers():
    inputs = keras.Input((8, 8, 2))
    h = ml.MaskedConv2D(4, 3, padding="same", name="c2")(inputs)
    h = ml.MaskedDepthwiseConv2D(3, padding="same", name="dw")(h)
    h = keras.layers.Reshape((64, 4))(h)
    h = ml.MaskedConv1D(3, 3, name="c1")(h)
    h = keras.layers.Flatten()(h)
    outputs = ml.MaskedDense(5, name="d")(h)
    model = keras.Model(inputs, outputs)
    for i, layer in enumerate(l for l in model.layers if ml.is_masked(l)):
        layer.set_mask(_random_mask(tuple(layer.masked_kernel.shape), 0.4, i))
    return model


def test_keras_file_round_trip_is_bit_exact(tmp_path):
    model = _model_with_all_layers()
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    for old, new in zip(model.layers, loaded.layers):
        assert type(old) is type(new)
        for w_old, w_new in zip(old.weights, new.weights):
            assert w_old.name == w_new.name
            a, b = w_old.numpy(), w_new.numpy()
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 2)).astype("float32")
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))


def test_weights_file_round_trip(tmp_path):
    model = _model_with_all_layers()
    path = str(tmp_path / "m.weights.h5")
    model.save_weights(path)
    other = _model_with_all_layers()  # different random masks and weights
    other.load_weights(path)
    for old, new in zip(model.layers, other.layers):
        for w_old, w_new in zip(old.weights, new.weights):
            np.testing.assert_array_equal(w_old.numpy(), w_new.numpy())


def test_loading_zeroes_kernel_off_mask():
    """A store whose kernel is dense off-mask (hand-edited file) is re-masked on load."""
    layer = ml.MaskedDense(2, use_bias=False)
    layer.build((None, 2))
    mask = np.array([[True, False], [False, True]])
    store = {"0": np.full((2, 2), 3.0, np.float32), "1": mask}
    layer.load_own_variables(store)
    np.testing.assert_array_equal(layer.masked_kernel.numpy(), [[3.0, 0.0], [0.0, 3.0]])
    np.testing.assert_array_equal(layer.kernel_mask.numpy(), mask)


def test_load_with_wrong_variable_count_fails():
    layer = ml.MaskedDense(2)
    layer.build((None, 2))
    with pytest.raises(ValueError, match="kernel_mask"):
        layer.load_own_variables({"0": np.zeros((2, 2)), "1": np.ones((2, 2), bool)})


def test_class_registry():
    assert ml.MASKED_CLASSES[keras.layers.Dense] is ml.MaskedDense
    assert ml.PLAIN_CLASSES[ml.MaskedConv2D] is keras.layers.Conv2D
    assert ml.is_prunable(keras.layers.Dense(2))
    assert not ml.is_prunable(keras.layers.Conv2DTranspose(2, 3))
    assert ml.is_masked(ml.MaskedDense(2))
    assert not ml.is_masked(keras.layers.Dense(2))


if __name__ == "__main__":  # bazel test / python tests/test_layers.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
