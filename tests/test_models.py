"""Tests for ft_keras.models (shapes, parameter counts, validation, registry)."""

import math

import keras
import numpy as np
import pytest

from ft_keras.harness import models


def _forward(model, input_shape, batch=2):
    x = np.random.default_rng(0).random((batch, *input_shape), dtype=np.float32)
    return keras.ops.convert_to_numpy(model(x, training=False))


def _kernel_layers(model):
    return [
        layer
        for layer in model.layers
        if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))
    ]


def _assert_logits(model):
    last = model.layers[-1]
    assert isinstance(last, keras.layers.Dense)
    assert last.name == "logits"
    assert last.activation is keras.activations.linear


def test_lenet_300_100_counts_and_forward():
    model = models.lenet_300_100()
    assert model.name == "lenet_300_100"
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.name for layer in dense] == ["fc1", "fc2", "logits"]
    assert [tuple(layer.kernel.shape) for layer in dense] == [(784, 300), (300, 100), (100, 10)]
    assert sum(math.prod(layer.kernel.shape) for layer in dense) == 266_200
    assert model.count_params() == 266_610
    _assert_logits(model)
    out = _forward(model, (28, 28, 1), batch=3)
    assert out.shape == (3, 10)
    assert out.dtype == np.float32
    # Logits: rows are not constrained to sum to one and can be negative.
    assert not np.allclose(out.sum(axis=1), 1.0)


def test_lenet_300_100_num_classes_and_input_shape():
    model = models.lenet_300_100(input_shape=(8, 8, 3), num_classes=5, name="tiny")
    assert model.name == "tiny"
    assert tuple(model.get_layer("fc1").kernel.shape) == (192, 300)
    assert _forward(model, (8, 8, 3)).shape == (2, 5)


def test_mlp():
    model = models.mlp(hidden=(64, 32, 16), input_shape=(4, 4, 1), num_classes=3)
    shapes = [tuple(layer.kernel.shape) for layer in _kernel_layers(model)]
    assert shapes == [(16, 64), (64, 32), (32, 16), (16, 3)]
    assert [layer.name for layer in _kernel_layers(model)] == ["fc1", "fc2", "fc3", "logits"]
    _assert_logits(model)
    assert _forward(model, (4, 4, 1)).shape == (2, 3)
    default = models.mlp()
    assert [tuple(layer.kernel.shape) for layer in _kernel_layers(default)] == [
        (784, 1024),
        (1024, 1024),
        (1024, 10),
    ]
    with pytest.raises(ValueError, match=r"hidden\[1\]=0 is not allowed"):
        models.mlp(hidden=(64, 0))
    with pytest.raises(TypeError, match=r"hidden\[0\] must be an int"):
        models.mlp(hidden=(64.0,))
    with pytest.raises(TypeError, match="hidden must be a sequence"):
        models.mlp(hidden="64")
    assert models.mlp(hidden=np.int64(8)).get_layer("fc1").units == 8


def test_lenet5():
    model = models.lenet5()
    shapes = [tuple(layer.kernel.shape) for layer in _kernel_layers(model)]
    assert shapes == [(5, 5, 1, 6), (5, 5, 6, 16), (400, 120), (120, 84), (84, 10)]
    assert model.get_layer("conv1").padding == "same"
    assert model.get_layer("conv2").padding == "valid"
    assert model.count_params() == 156 + 2_416 + 48_120 + 10_164 + 850
    _assert_logits(model)
    assert _forward(model, (28, 28, 1)).shape == (2, 10)
    assert _forward(models.lenet5((32, 32, 3), 4), (32, 32, 3)).shape == (2, 4)


def test_small_cnn_and_train_step():
    model = models.small_cnn(input_shape=(16, 16, 1), num_classes=4, width=8)
    shapes = [tuple(layer.kernel.shape) for layer in _kernel_layers(model)]
    assert shapes == [(3, 3, 1, 8), (3, 3, 8, 16), (4 * 4 * 16, 128), (128, 4)]
    _assert_logits(model)
    assert _forward(model, (16, 16, 1), batch=5).shape == (5, 4)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(1)
    x = rng.random((8, 16, 16, 1), dtype=np.float32)
    y = rng.integers(0, 4, size=(8,))
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_resnet_structure_and_forward():
    model = models.resnet(depth=20, width=4, input_shape=(16, 16, 3), num_classes=7)
    assert model.name == "resnet20"
    kernels = _kernel_layers(model)
    convs3 = [layer for layer in kernels if layer.kernel.shape[0] == 3]
    projections = [layer for layer in kernels if layer.name.endswith("_proj")]
    # depth counts the 3x3 convs plus the dense layer.
    assert len(convs3) + 1 == 20
    assert [layer.name for layer in projections] == ["stage2_block1_proj", "stage3_block1_proj"]
    assert [tuple(layer.kernel.shape) for layer in projections] == [(1, 1, 4, 8), (1, 1, 8, 16)]
    assert all(not layer.use_bias for layer in kernels if isinstance(layer, keras.layers.Conv2D))
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers) == 21
    assert tuple(model.get_layer("logits").kernel.shape) == (16, 7)
    _assert_logits(model)
    assert _forward(model, (16, 16, 3)).shape == (2, 7)


@pytest.mark.parametrize("depth", [21, 19, 2, 0, -4])
def test_resnet_depth_validation(depth):
    with pytest.raises(ValueError, match=f"depth={depth} is not allowed.*6n \\+ 2"):
        models.resnet(depth=depth, width=4)


@pytest.mark.parametrize("depth", [20.0, "20", True])
def test_resnet_depth_of_wrong_type(depth):
    # A TypeError since the argument checks were unified (it was a ValueError).
    with pytest.raises(TypeError, match="depth must be an int"):
        models.resnet(depth=depth, width=4)


def test_wide_resnet_structure_and_forward():
    model = models.wide_resnet(
        depth=10, width_multiplier=2, input_shape=(16, 16, 3), num_classes=6, base_width=4
    )
    assert model.name == "wrn10_2"
    kernels = _kernel_layers(model)
    convs = [layer for layer in kernels if isinstance(layer, keras.layers.Conv2D)]
    assert all(not layer.use_bias for layer in convs)
    convs3 = [layer for layer in convs if layer.kernel.shape[0] == 3]
    assert len(convs3) == 1 + 6  # stem + 2 convs x 1 block x 3 stages
    proj = [tuple(layer.kernel.shape) for layer in convs if layer.name.endswith("_proj")]
    assert proj == [(1, 1, 4, 8), (1, 1, 8, 16), (1, 1, 16, 32)]
    assert tuple(model.get_layer("logits").kernel.shape) == (32, 6)
    _assert_logits(model)
    assert _forward(model, (16, 16, 3)).shape == (2, 6)

    dropped = models.wide_resnet(depth=10, width_multiplier=1, base_width=2, dropout_rate=0.3,
                                 input_shape=(8, 8, 3))
    assert any(isinstance(layer, keras.layers.Dropout) for layer in dropped.layers)
    assert _forward(dropped, (8, 8, 3)).shape == (2, 10)


@pytest.mark.parametrize("depth", [26, 20, 4])
def test_wide_resnet_depth_validation(depth):
    with pytest.raises(ValueError, match=f"depth={depth} is not allowed.*6n \\+ 4"):
        models.wide_resnet(depth=depth, width_multiplier=1, base_width=2)


@pytest.mark.parametrize("depth", [28.5, "28"])
def test_wide_resnet_depth_of_wrong_type(depth):
    with pytest.raises(TypeError, match="depth must be an int"):
        models.wide_resnet(depth=depth, width_multiplier=1, base_width=2)


@pytest.mark.parametrize(
    "builder, kwargs, arg",
    [
        (models.lenet_300_100, {"num_classes": 0}, "num_classes"),
        (models.small_cnn, {"width": -1}, "width"),
        (models.small_cnn, {"input_shape": (28, 28)}, "input_shape"),
        (models.resnet, {"width": 0}, "width"),
        (models.wide_resnet, {"width_multiplier": 0}, "width_multiplier"),
        (models.wide_resnet, {"dropout_rate": 1.0}, "dropout_rate"),
        (models.lenet5, {"input_shape": (8, 8, 1)}, "input_shape"),
    ],
)
def test_argument_validation(builder, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        builder(**kwargs)


@pytest.mark.parametrize(
    "builder, kwargs, match",
    [
        (models.lenet_300_100, {"num_classes": 2.0}, "num_classes must be an int"),
        (models.small_cnn, {"width": True}, "width must be an int"),
        (models.small_cnn, {"input_shape": 28}, "input_shape must be a tuple"),
        (models.small_cnn, {"input_shape": (28, 28.0, 1)}, r"input_shape\[1\] must be an int"),
        (models.wide_resnet, {"dropout_rate": "0.1"}, "dropout_rate must be a finite number"),
    ],
)
def test_argument_types(builder, kwargs, match):
    # Wrong types are TypeErrors since the argument checks were unified (they were ValueErrors).
    with pytest.raises(TypeError, match=match):
        builder(**kwargs)


def test_numpy_integers_are_accepted():
    model = models.small_cnn(input_shape=(np.int64(8), 8, 1), num_classes=np.int32(3),
                             width=np.int64(2))
    assert model.output_shape == (None, 3)


def test_registry():
    names = models.available()
    for required in ("lenet_300_100", "mlp", "lenet5", "small_cnn", "resnet20", "wrn28_10",
                     "resnet", "wide_resnet"):
        assert required in names

    lenet = models.get("lenet_300_100")
    assert lenet.count_params() == 266_610
    assert models.get("LeNet-300-100", num_classes=3).output_shape == (None, 3)
    assert models.get("mlp", hidden=(8,), name="custom").name == "custom"

    r20 = models.get("resnet20", width=2, input_shape=(8, 8, 3))
    assert r20.name == "resnet20"
    assert sum(
        isinstance(layer, keras.layers.Conv2D) and layer.kernel.shape[0] == 3
        for layer in r20.layers
    ) == 19
    assert models.get("resnet20", depth=20, width=2, input_shape=(8, 8, 3)).name == "resnet20"
    with pytest.raises(ValueError, match="depth"):
        models.get("resnet20", depth=32)
    assert models.get("resnet", depth=8, width=2, input_shape=(8, 8, 3)).name == "resnet8"

    wrn = models.get("wrn28_10", base_width=1, input_shape=(8, 8, 3), num_classes=4)
    assert wrn.name == "wrn28_10"
    assert wrn.get_layer("logits").kernel.shape[0] == 40  # 4 * base_width * k
    assert _forward(wrn, (8, 8, 3)).shape == (2, 4)

    with pytest.raises(ValueError, match=r"name='vgg16' is not supported.*'resnet20'") as info:
        models.get("vgg16")
    assert "vgg16" in str(info.value)
    for required in ("lenet_300_100", "lenet5", "small_cnn", "wrn28_10"):
        assert required in str(info.value)
    with pytest.raises(TypeError, match="name must be a model name"):
        models.get(None)


if __name__ == "__main__":  # bazel test / python tests/test_models.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
