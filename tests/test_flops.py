"""Tests of ft_keras.flops: forward MACs against hand counts and ensemble inference cost (the
training cost is tested in tests/test_training_cost.py)."""

import keras
import numpy as np
import pytest

import ft_keras as ftk
from ft_keras import flops
from ft_keras import layers as masked_layers
from tests.conftest import LENET_DENSE
from tests.conftest import LENET_SPARSE

L = keras.layers


def _conv_model():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, padding="valid", name="c_valid")(inputs)           # 8x8x3 -> 6x6x4
    x = L.Conv2D(5, 3, strides=2, padding="same", name="c_same_s2")(x)    # -> 3x3x5
    x = L.Conv2D(2, 1, strides=2, padding="valid", name="c_1x1_s2")(x)    # -> 2x2x2
    x = L.BatchNormalization(name="bn")(x)
    x = L.MaxPooling2D(1, name="pool")(x)
    x = L.Flatten(name="flat")(x)                                         # -> 8
    outputs = L.Dense(3, name="fc")(x)
    return keras.Model(inputs, outputs, name="conv_model")


CONV_HAND = {
    "c_valid": 6 * 6 * (3 * 3 * 3 * 4),
    "c_same_s2": 3 * 3 * (3 * 3 * 4 * 5),
    "c_1x1_s2": 2 * 2 * (1 * 1 * 5 * 2),
    "fc": 8 * 3,
}


# ---------------------------------------------------------------------------- forward, dense
def test_lenet_dense_anchor(lenet):
    assert flops.forward_macs(lenet) == 266_200 == LENET_DENSE
    assert flops.forward_macs_by_layer(lenet) == {
        "fc1": (235_200, 235_200), "fc2": (30_000, 30_000), "logits": (1_000, 1_000)
    }
    assert flops.macs_to_flops(flops.forward_macs(lenet)) == 532_400


def test_lenet_sparse_is_sum_of_active_weights(lenet_sparse):
    report = ftk.sparsity_report(lenet_sparse)
    assert flops.forward_macs(lenet_sparse) == report.total_active == LENET_SPARSE
    assert flops.forward_macs(lenet_sparse, dense=True) == LENET_DENSE
    by_layer = flops.forward_macs_by_layer(lenet_sparse)
    for row in report.layers:
        assert by_layer[row.name] == (row.size, row.active)
    dense_view = flops.forward_macs_by_layer(lenet_sparse, dense=True)
    assert all(d == s for d, s in dense_view.values())


def test_conv2d_padding_and_strides():
    model = _conv_model()
    by_layer = flops.forward_macs_by_layer(model)
    assert list(by_layer) == list(CONV_HAND)  # BN, pooling, flatten are not listed
    assert {k: v[0] for k, v in by_layer.items()} == CONV_HAND
    assert flops.forward_macs(model) == sum(CONV_HAND.values()) == 3888 + 1620 + 40 + 24
    for name, macs in CONV_HAND.items():
        assert flops.layer_forward_macs(model.get_layer(name)) == macs
    assert flops.layer_forward_macs(model.get_layer("bn")) == 0
    assert flops.layer_forward_macs(model.get_layer("pool")) == 0


def test_same_padding_odd_size_and_channels_first():
    inputs = keras.Input((7, 7, 2))
    x = L.Conv2D(3, 3, strides=2, padding="same", name="odd")(inputs)  # ceil(7 / 2) = 4
    model = keras.Model(inputs, x)
    assert flops.forward_macs(model) == 4 * 4 * (3 * 3 * 2 * 3)
    inputs = keras.Input((3, 8, 8))
    x = L.Conv2D(4, 3, data_format="channels_first", name="cf")(inputs)  # -> (4, 6, 6)
    assert flops.forward_macs(keras.Model(inputs, x)) == 6 * 6 * 3 * 3 * 3 * 4


def test_conv1d_conv3d_depthwise_and_groups():
    inputs = keras.Input((10, 2))
    a = L.Conv1D(3, 3, padding="valid", name="valid")(inputs)                    # length 8
    b = L.Conv1D(3, 3, padding="causal", dilation_rate=2, name="causal")(inputs)  # length 10
    c = L.Conv1D(3, 3, strides=2, padding="same", name="same_s2")(inputs)        # length 5
    model = keras.Model(inputs, [a, b, c])
    k = 3 * 2 * 3
    assert flops.forward_macs_by_layer(model) == {
        "valid": (8 * k, 8 * k), "causal": (10 * k, 10 * k), "same_s2": (5 * k, 5 * k)
    }

    inputs = keras.Input((4, 5, 6, 2))
    x = L.Conv3D(3, (2, 3, 3), name="c3")(inputs)  # -> 3 x 3 x 4 x 3
    assert flops.forward_macs(keras.Model(inputs, x)) == (3 * 3 * 4) * (2 * 3 * 3 * 2 * 3)

    inputs = keras.Input((6, 6, 3))
    x = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(inputs)  # -> 4 x 4 x 6
    assert flops.forward_macs(keras.Model(inputs, x)) == 4 * 4 * (3 * 3 * 3 * 2)

    inputs = keras.Input((5, 5, 4))
    x = L.Conv2D(6, 3, groups=2, name="grouped")(inputs)  # -> 3 x 3 x 6, 2 in-channels per group
    assert flops.forward_macs(keras.Model(inputs, x)) == 3 * 3 * (3 * 3 * (4 // 2) * 6)


def test_dense_on_sequences_counts_every_position():
    inputs = keras.Input((7, 5))
    x = L.Dense(4, name="per_step")(inputs)
    model = keras.Model(inputs, x)
    assert flops.forward_macs(model) == 7 * 5 * 4
    inputs = keras.Input((2, 3, 5))
    x = L.Dense(4, name="per_pixel")(inputs)
    assert flops.forward_macs(keras.Model(inputs, x)) == 2 * 3 * 5 * 4
    layer = model.get_layer("per_step")
    assert flops.layer_forward_macs(layer, input_shape=(None, 9, 5)) == 9 * 5 * 4


def test_nested_sequential_in_functional_and_repeated_calls():
    inner = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(4, 3, name="conv")], name="inner")
    lazy = keras.Sequential([L.Dense(2, name="head")], name="lazy")  # built by the outer call
    inputs = keras.Input((8, 8, 3))
    x = L.Flatten()(inner(inputs))
    model = keras.Model(inputs, lazy(x), name="outer")
    conv, head = 6 * 6 * 3 * 3 * 3 * 4, 6 * 6 * 4 * 2
    assert flops.forward_macs(model) == conv + head
    assert flops.forward_macs_by_layer(model) == {"conv": (conv, conv), "head": (head, head)}
    assert flops.layer_forward_macs(inner.layers[0]) == conv

    # the same nested model applied to two inputs costs twice
    a, b = keras.Input((8, 8, 3)), keras.Input((8, 8, 3))
    twice = keras.Model([a, b], L.Add()([inner(a), inner(b)]))
    assert flops.forward_macs(twice) == 2 * conv
    assert flops.flops_report(twice).layers[0].calls == 2

    # two different layers with one name are keyed by their paths
    other = keras.Sequential([keras.Input((8, 8, 3)), L.Conv2D(1, 1, name="conv")], name="other")
    both = keras.Model(inputs, [inner(inputs), other(inputs)])
    assert list(flops.forward_macs_by_layer(both)) == ["inner/conv", "other/conv"]

    sparse = ftk.sparsify(model, 0.5, distribution="uniform")
    active = sum(layer.num_active * (36 if layer.name == "conv" else 1)
                 for layer in ftk.masked_layers(sparse))
    assert flops.forward_macs(sparse) == active


def test_subclassed_model_uses_build_shapes():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = L.Dense(3)

        def call(self, x):
            return self.fc(x)

    model = Sub()
    model(np.zeros((2, 7, 5), "float32"))
    assert flops.forward_macs(model) == 7 * 5 * 3


# ---------------------------------------------------------------------------- masked layers
def test_masked_conv_uses_the_mask_density():
    model = ftk.sparsify(_conv_model(), 0.5, distribution="uniform", seed=1)
    by_layer = flops.forward_macs_by_layer(model)
    positions = {"c_valid": 36, "c_same_s2": 9, "c_1x1_s2": 4, "fc": 1}
    for layer in ftk.masked_layers(model):
        dense, sparse = by_layer[layer.name]
        assert dense == CONV_HAND[layer.name]
        assert sparse == positions[layer.name] * layer.num_active
        assert flops.layer_forward_macs(layer) == sparse
    # a hand-made mask: 27 of the 108 weights of the first conv
    layer = model.get_layer("c_valid")
    mask = np.zeros(layer.masked_kernel.shape, bool)
    mask[..., 0] = True
    layer.set_mask(mask)
    assert flops.layer_forward_macs(layer) == 36 * 27 == CONV_HAND["c_valid"] // 4
    assert flops.layer_forward_macs(layer, density=1.0) == CONV_HAND["c_valid"]
    assert flops.layer_forward_macs(layer, density=0.1) == round(0.1 * CONV_HAND["c_valid"])
    assert isinstance(layer, masked_layers.MaskedConv2D)


def test_report_rows_totals_and_text(lenet_sparse):
    report = flops.flops_report(lenet_sparse)
    assert [row.name for row in report.layers] == ["fc1", "fc2", "logits"]
    assert report.dense_macs == LENET_DENSE and report.sparse_macs == LENET_SPARSE
    assert report.relative == pytest.approx(0.1)
    assert report.layers[0].kind == "MaskedDense" and report.layers[0].density == 0.1
    text = str(report)
    assert "266,200" in text and "26,620" in text and "multiply-adds" in text
    as_dict = report.as_dict()
    assert as_dict["sparse_macs"] == LENET_SPARSE and len(as_dict["layers"]) == 3

    inputs = keras.Input((4,), dtype="int32")
    x = L.Embedding(10, 3, name="emb")(inputs)
    uncounted = keras.Model(inputs, L.Dense(2, name="fc")(x))
    report = flops.flops_report(uncounted)
    assert report.uncounted == ("emb",) and report.sparse_macs == 4 * 3 * 2
    assert "emb" in str(report)


# ---------------------------------------------------------------------------- ensembles
def test_inference_macs_of_ensembles(lenet, lenet_sparse):
    f_d, f_s = LENET_DENSE, LENET_SPARSE
    other = ftk.sparsify(lenet, 0.8, distribution="uniform", seed=1)
    assert flops.inference_macs_ensemble([lenet_sparse, other, lenet]) == (
        f_s + flops.forward_macs(other) + f_d
    )
    assert flops.inference_macs_ensemble([f_s, f_s, 10]) == 2 * f_s + 10
    ensemble = ftk.Ensemble([lenet_sparse, lenet_sparse, other])
    assert flops.inference_macs_ensemble(ensemble) == 2 * f_s + flops.forward_macs(other)
    assert flops.relative_cost(f_s, f_d) == pytest.approx(0.1)


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda m: flops.forward_macs(m.get_layer("fc1")), TypeError, "model"),
        (lambda m: flops.flops_report(None), TypeError, "model"),
        (lambda m: flops.layer_forward_macs(m), TypeError, "layer"),
        (lambda m: flops.layer_forward_macs("fc1"), TypeError, "layer"),
        (lambda m: flops.layer_forward_macs(m.get_layer("fc1"), 1.5), ValueError, "density"),
        (lambda m: flops.inference_macs_ensemble([]), ValueError, "members_or_macs"),
        (lambda m: flops.inference_macs_ensemble(m), TypeError, "members_or_macs"),
        (lambda m: flops.inference_macs_ensemble([m, "x"]), TypeError, r"members_or_macs\[1\]"),
        (lambda m: flops.inference_macs_ensemble([-1]), ValueError, r"members_or_macs\[0\]"),
        (lambda m: flops.relative_cost(1, 0), ValueError, "dense_reference"),
        (lambda m: flops.relative_cost("1", 2), TypeError, "x"),
        (lambda m: flops.layer_forward_macs(m.get_layer("fc1"), "0.5"), TypeError, "density"),
    ],
)
def test_argument_validation(lenet, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(lenet)


def test_unknown_or_unbuilt_shapes_are_refused():
    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, L.Conv2D(2, 3, name="conv")(inputs))
    with pytest.raises(ValueError, match="conv"):
        flops.forward_macs(model)
    with pytest.raises(ValueError, match="not built"):
        flops.forward_macs(keras.Sequential([L.Dense(2)]))
    with pytest.raises(ValueError, match="not built"):
        flops.layer_forward_macs(L.Dense(2))


if __name__ == "__main__":  # bazel test / python tests/test_flops.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
