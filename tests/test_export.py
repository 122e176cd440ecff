"""ft_keras.export: compact storage, grouped and sparse kernels, load-time caches, size bound."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import ft_keras as ftk
from ft_keras import export
from ft_keras import tickets
from ft_keras.sparsify import compact_aligned

RNG = np.random.default_rng(0)


def _head(member_logits):
    return {"member_logits": member_logits}


def _serve(models, tmp_path, name="sm", **kwargs):
    path = str(tmp_path / name)
    export.export_models(models, path, _head, **kwargs)
    return tf.saved_model.load(path).signatures["serving_default"], path


def _predict(models, x):
    return np.stack([m.predict(x, verbose=0) for m in models])


# --------------------------------------------------------------------------------------------
# Compact storage


@pytest.mark.parametrize("shape, density, encoding", [
    ((64, 48), 0.3, "bitmask"),      # 4 nnz + N/8 bytes beats 6 nnz + 4 rows
    ((16, 400), 0.02, "rows"),       # very sparse, wide rows: row pointers + uint16 columns
    ((64, 48), 0.999, "full"),       # nothing to gain
    ((3, 3, 4, 8), 0.25, "bitmask"),  # a conv kernel, seen as (3*3*4) x 8
    ((1, 1, 64, 256), 0.01, "rows"),
])
def test_pack_kernel_is_exact_and_smallest(shape, density, encoding):
    kernel = RNG.normal(size=shape).astype(np.float32)
    mask = RNG.random(shape) < density
    packed = export.pack_kernel(kernel, mask)
    assert packed.encoding == encoding
    assert packed.nnz == (mask.sum() if encoding != "full" else mask.size)
    np.testing.assert_array_equal(packed.dense(), np.where(mask, kernel, 0.0))
    if encoding != "full":
        np.testing.assert_array_equal(packed.positions(), np.flatnonzero(mask))
        np.testing.assert_array_equal(packed.values, kernel[mask])
    size, nnz = mask.size, int(mask.sum())
    rows = size // shape[-1]
    expected = {"full": 4 * size, "bitmask": 4 * nnz + (size + 7) // 8,
                "rows": 6 * nnz + 4 * (rows + 1)}[encoding]
    assert packed.nbytes == expected


def test_pack_kernel_wide_rows_use_int32_columns():
    mask = np.zeros((2, 70000), bool)
    mask[0, [3, 69999]] = True
    kernel = np.ones((2, 70000), np.float32)
    packed = export.pack_kernel(kernel, mask)
    assert packed.encoding == "rows" and packed.col_index.dtype == np.int32
    np.testing.assert_array_equal(packed.dense(), np.where(mask, kernel, 0.0))


def test_pack_kernel_without_mask_is_full():
    kernel = RNG.normal(size=(5, 7)).astype(np.float32)
    packed = export.pack_kernel(kernel)
    assert packed.encoding == "full" and packed.nnz == 35
    np.testing.assert_array_equal(packed.dense(), kernel)


def test_pack_kernel_without_mask_finds_the_zeros_of_a_plain_kernel():
    """A plain kernel (e.g. of a compacted model) is stored by its nonzero values."""
    kernel = RNG.normal(size=(64, 48)).astype(np.float32)
    kernel[:, 10:] = 0.0  # channels pruned away
    kernel[3, 2] = -0.0
    packed = export.pack_kernel(kernel)
    assert packed.encoding == "bitmask" and packed.nnz == 64 * 10 - 1
    assert packed.nbytes == 4 * (64 * 10 - 1) + 64 * 48 // 8
    np.testing.assert_array_equal(packed.dense(), kernel)
    assert not np.signbit(packed.dense()[3, 2])


# --------------------------------------------------------------------------------------------
# Every layer kind, every storage encoding and every kernel: outputs equal the Keras model.


def _dense_net(seed, sparsity, distribution="uniform"):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((6, 5)),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu", name="fc1"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(24, activation="tanh", name="fc2"),
        keras.layers.Dense(7, name="logits"),
    ])
    if not sparsity:
        return model
    return ftk.sparsify(model, sparsity=sparsity, distribution=distribution, seed=seed)


def _conv_nets(seed):
    """One small model per convolution kind, each with convolutions and Dense layers."""
    keras.utils.set_random_seed(seed)
    conv2d = keras.Sequential([
        keras.Input((9, 9, 3)),
        keras.layers.Conv2D(6, 3, activation="relu", name="conv"),
        keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(5, name="logits"),
    ], name="conv2d")
    conv1d = keras.Sequential([
        keras.Input((12, 4)),
        keras.layers.Conv1D(8, 3, padding="causal", activation="relu", name="conv"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(5, name="logits"),
    ], name="conv1d")
    conv3d = keras.Sequential([
        keras.Input((5, 5, 5, 2)),
        keras.layers.Conv3D(4, 3, activation="relu", name="conv"),
        keras.layers.Flatten(),
        keras.layers.Dense(5, name="logits"),
    ], name="conv3d")
    return [conv2d, conv1d, conv3d]


def _set_bn_statistics(model):
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(RNG.normal(size=layer.moving_mean.shape).astype(np.float32))
            layer.moving_variance.assign(
                RNG.uniform(0.5, 2.0, size=layer.moving_variance.shape).astype(np.float32))


def _outputs(serve, x):
    return serve(inputs=tf.constant(x))["member_logits"].numpy()


@pytest.mark.parametrize("kernels", ["dense", "csr", "coo"])
@pytest.mark.parametrize("sparsity, encoding", [(0.97, "rows"), (0.7, "bitmask"), (0.0, "full")])
def test_dense_layers_every_kernel_and_encoding(tmp_path, kernels, sparsity, encoding):
    members = [_dense_net(seed, sparsity) for seed in range(3)]
    x = RNG.random((9, 6, 5)).astype(np.float32)
    want = _predict(members, x)
    got = {}
    for grouped in ("all", "none"):
        plan = export.kernel_plan(members, sparse_kernels=kernels, group_members=grouped)
        assert [p.layer for p in plan] == ["fc1", "fc2", "logits"]
        assert [p.members for p in plan] == [3, 3, 3]
        assert plan[0].storage == (encoding,) * 3
        # Sparse kernels only where the kernels hold zeros; otherwise grouped or dense.
        expected = kernels if sparsity and kernels != "dense" else (
            "grouped" if grouped == "all" else "dense")
        assert {p.kernels for p in plan} == {expected}
        serve, _ = _serve(members, tmp_path, name=f"g{grouped}", sparse_kernels=kernels,
                          group_members=grouped)
        got[grouped] = _outputs(serve, x)
        assert np.max(np.abs(got[grouped] - want)) <= 1e-5
    assert np.max(np.abs(got["all"] - got["none"])) <= 1e-5


def test_plain_members_with_zeros_are_stored_compactly_and_grouped(tmp_path):
    """Plain Keras members whose kernels hold exact zeros (as a compacted model's do)."""
    members = [_dense_net(seed, 0.0) for seed in range(3)]
    for member in members:
        for layer in member.layers:
            if isinstance(layer, keras.layers.Dense):
                kernel = layer.kernel.numpy()
                kernel[RNG.random(kernel.shape) < 0.9] = 0.0
                layer.kernel.assign(kernel)
    assert [p.kernels for p in export.kernel_plan(members)] == ["dense"] * 3  # the default
    plan = export.kernel_plan(members, group_members="all")
    assert [p.kernels for p in plan] == ["grouped"] * 3
    assert plan[0].storage == ("bitmask",) * 3
    # Served compacted: units left without outgoing weights are sliced out with their kernels.
    served = compact_aligned(members)
    nonzeros = [int(np.count_nonzero(layer.kernel.numpy())) for member in served
                for layer in member.layers if isinstance(layer, keras.layers.Dense)]
    assert sum(nonzeros) < sum(int(np.count_nonzero(layer.kernel.numpy())) for member in members
                               for layer in member.layers if isinstance(layer, keras.layers.Dense))
    assert sum(p.nnz for p in plan) == sum(nonzeros)
    x = RNG.random((5, 6, 5)).astype(np.float32)
    serve, path = _serve(members, tmp_path, group_members="all")
    assert np.max(np.abs(_outputs(serve, x) - _predict(members, x))) <= 1e-5
    stored = dict(tf.train.list_variables(os.path.join(path, "variables", "variables")))
    biases = sum(layer.bias.shape[0] for member in served for layer in member.layers
                 if isinstance(layer, keras.layers.Dense))
    assert [s for n, s in stored.items() if n.startswith("stored_values")] == [
        [sum(nonzeros) + biases]]


@pytest.mark.parametrize("kernels", ["dense", "csr"])
def test_convolutions_depthwise_batchnorm(tmp_path, kernels):
    # Conv2D and Conv3D of aligned members are grouped; a causal Conv1D and the depthwise
    # convolution run per member by Keras (kernels from the cache).
    grouped_convs = {"conv2d": ["conv"], "conv1d": [], "conv3d": ["conv"]}
    for i, net in enumerate(_conv_nets(3)):
        _set_bn_statistics(net)
        sparse = ftk.sparsify(net, sparsity=0.6, distribution="uniform", seed=i)
        assert len(ftk.masked_layers(sparse)) >= 2
        twin = ftk.sparsify(net, sparsity=0.6, distribution="uniform", seed=i + 10)
        rows = export.kernel_plan([sparse, twin], sparse_kernels=kernels)
        assert [(p.layer, p.members, p.kernels) for p in rows] == [
            (name, 2, "grouped") for name in grouped_convs[net.name]] + [("logits", 2, kernels)]
        shape = (4,) + tuple(net.inputs[0].shape[1:])
        x = RNG.random(shape).astype(np.float32)
        models = [sparse, twin, net]
        for grouped in ("convolutions", "all", "none"):
            serve, _ = _serve(models, tmp_path, name=f"{net.name}_{kernels}_{grouped}",
                              sparse_kernels=kernels, group_members=grouped)
            assert np.max(np.abs(_outputs(serve, x) - _predict(models, x))) <= 1e-5, net.name


def _conv_chain(seed, dims):
    """Convolutions whose members' channels stay side by side through pooling, leave that
    layout for batch normalisation (per member) and come back to it."""
    keras.utils.set_random_seed(seed)
    if dims == 1:
        return keras.Sequential([
            keras.Input((16, 3)),
            keras.layers.Conv1D(4, 3, activation="relu", name="c1"),
            keras.layers.AveragePooling1D(2),
            keras.layers.Conv1D(5, 3, padding="same", dilation_rate=2, name="c2"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="logits"),
        ])
    return keras.Sequential([
        keras.Input((12, 12, 2)),
        keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="c1"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(4, 3, strides=2, name="c2"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(),
        keras.layers.Conv2D(2, 1, use_bias=False, name="c3"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, name="logits"),
    ])


@pytest.mark.parametrize("dims", [1, 2])
def test_grouped_convolutions_equal_separate_ones(tmp_path, dims):
    members = [_conv_chain(seed, dims) for seed in range(3)]
    members[1] = ftk.sparsify(members[1], sparsity=0.5, seed=1)  # masked and plain mixed
    for member in members:
        _set_bn_statistics(member)
    x = RNG.random((5,) + tuple(members[0].inputs[0].shape[1:])).astype(np.float32)
    want = _predict(members, x)
    got = {}
    for grouped in ("convolutions", "all", "none"):
        serve, _ = _serve(members, tmp_path, name=f"g{grouped}", group_members=grouped)
        got[grouped] = _outputs(serve, x)
        assert np.max(np.abs(got[grouped] - want)) <= 1e-5
        assert np.max(np.abs(got[grouped] - got["convolutions"])) <= 1e-5
    convs = ["c1", "c2"] if dims == 1 else ["c1", "c2", "c3"]
    for grouped, logits in (("convolutions", "dense"), ("all", "grouped")):
        plan = export.kernel_plan(members, group_members=grouped)
        assert [(p.layer, p.kernels) for p in plan] == [(c, "grouped") for c in convs] + [
            ("logits", logits)]
    assert [p.layer for p in export.kernel_plan(members, group_members="none")] == ["logits"]


def _channel_ticket(seed):
    """A masked conv net whose conv1 channels 0-2 and fc1 units 0-9 are off (as channel-level
    sparsity leaves them): `ftk.compact` removes them, every ticket to the same widths."""
    keras.utils.set_random_seed(seed)
    model = ftk.sparsify(keras.Sequential([
        keras.Input((10, 10, 1)),
        keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv1"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(24, activation="relu", name="fc1"),
        keras.layers.Dense(4, name="logits"),
    ]), sparsity=0.5, distribution="uniform", seed=seed)
    for name, off in (("conv1", slice(0, 3)), ("fc1", slice(0, 10))):
        layer = model.get_layer(name)
        mask = layer.kernel_mask.numpy()
        mask[..., off] = False
        layer.kernel_mask.assign(mask)
        layer.masked_kernel.assign(np.where(mask, layer.masked_kernel.numpy(), 0.0))
        bias = layer.bias.numpy()
        bias[off] = 0.0
        layer.bias.assign(bias)
    logits = model.get_layer("logits")  # no fc1 unit loses all its outgoing weights by chance
    logits.kernel_mask.assign(np.ones(logits.kernel_mask.shape, bool))
    logits.masked_kernel.assign(RNG.normal(size=logits.kernel_mask.shape).astype(np.float32))
    return model


def test_compacted_tickets_are_grouped_and_stored_compactly(tmp_path):
    tickets_ = [_channel_ticket(seed) for seed in range(3)]
    members = [ftk.compact(ticket) for ticket in tickets_]
    assert [m.get_layer("conv1").filters for m in members] == [3, 3, 3]
    x = RNG.random((4, 10, 10, 1)).astype(np.float32)
    want = _predict(tickets_, x)
    for grouped in ("convolutions", "all"):
        plan = export.kernel_plan(members, group_members=grouped)
        assert [p.layer for p in plan] == ["conv1", "fc1", "logits"]
        assert plan[0].kernels == "grouped" and plan[1].kernels == (
            "grouped" if grouped == "all" else "dense")
        # The unstructured zeros left in the compacted kernels are stored compactly.
        assert plan[1].storage == ("bitmask",) * 3
        serve, _ = _serve(members, tmp_path, name=grouped, group_members=grouped)
        assert np.max(np.abs(_outputs(serve, x) - want)) <= 1e-5


def test_unknown_input_dimensions(tmp_path):
    """A sequence model with a free length axis: Dense layers on rank-3 inputs, grouped or not;
    the request check tests the known axes only."""
    keras.utils.set_random_seed(6)
    models = [ftk.sparsify(keras.Sequential([
        keras.Input((None, 8)),
        keras.layers.Dense(16, activation="relu", name="fc"),
        keras.layers.Dense(16, activation="relu", name="fc2"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(3, name="logits"),
    ]), sparsity=0.5, seed=seed) for seed in range(2)]
    for kernels, grouped in (("dense", "all"), ("dense", "none"), ("csr", "all")):
        serve, _ = _serve(models, tmp_path, name=f"{kernels}{grouped}", sparse_kernels=kernels,
                          group_members=grouped)
        for length in (1, 7):
            x = RNG.random((2, length, 8)).astype(np.float32)
            assert np.max(np.abs(_outputs(serve, x) - _predict(models, x))) <= 1e-5
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"\(None, None, 8\)"):
            serve(inputs=tf.zeros((2, 7, 9)))


def test_model_that_is_not_a_chain(tmp_path):
    """A residual (non-chain) model is served by its own Keras layers, kernels from the cache."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((12,))
    h = keras.layers.Dense(12, activation="relu", name="a")(inputs)
    h = keras.layers.Add()([h, keras.layers.Dense(12, name="b")(inputs)])
    outputs = keras.layers.Dense(3, name="logits")(h)
    model = ftk.sparsify(keras.Model(inputs, outputs), sparsity=0.5, seed=4)
    assert export.kernel_plan([model]) == []  # no Dense step: evaluated as a whole
    x = RNG.random((5, 12)).astype(np.float32)
    serve, path = _serve([model, model], tmp_path)
    assert np.max(np.abs(_outputs(serve, x) - _predict([model, model], x))) <= 1e-5
    stored = dict(tf.train.list_variables(os.path.join(path, "variables", "variables")))
    masked = ftk.masked_layers(model)
    num_values = sum(layer.num_active + layer.bias.shape[0] for layer in masked) + sum(
        int(np.prod(w.shape)) for layer in model.layers if layer not in masked
        for w in layer.weights)
    assert [s for n, s in stored.items() if n.startswith("stored_values")] == [[num_values]]


@pytest.mark.parametrize("grouped", ["all", "none"])
def test_repeated_members_are_computed_once(tmp_path, grouped):
    members = [_dense_net(seed, 0.8) for seed in range(2)]
    models = [members[0], members[1], members[0]]
    x = RNG.random((6, 6, 5)).astype(np.float32)
    serve, _ = _serve(models, tmp_path, group_members=grouped)
    got = _outputs(serve, x)
    assert got.shape == (3, 6, 7)
    assert np.max(np.abs(got - _predict(models, x))) <= 1e-5
    plan = export.kernel_plan(models, group_members=grouped)
    assert [(p.members, p.kernels) for p in plan] == [
        (2, "grouped" if grouped == "all" else "dense")] * 3


def test_members_that_differ_are_not_grouped(tmp_path):
    keras.utils.set_random_seed(5)
    other = ftk.sparsify(keras.Sequential([
        keras.Input((6, 5)), keras.layers.Flatten(), keras.layers.Dense(7, name="logits")]),
        sparsity=0.5, seed=5)
    wider = keras.Sequential([
        keras.Input((6, 5)), keras.layers.Flatten(),
        keras.layers.Dense(129, activation="relu", name="fc1"),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(24, activation="tanh", name="fc2"),
        keras.layers.Dense(7, name="logits")])
    models = [_dense_net(0, 0.8), other, wider]
    plan = export.kernel_plan(models, group_members="all")
    assert [(p.members, p.kernels) for p in plan] == [(1, "dense")] * 7
    x = RNG.random((3, 6, 5)).astype(np.float32)
    serve, _ = _serve(models, tmp_path)
    assert np.max(np.abs(_outputs(serve, x) - _predict(models, x))) <= 1e-5


# --------------------------------------------------------------------------------------------
# Size on disk


def _dense_and_members(build, sparsity, count=3):
    keras.utils.set_random_seed(0)
    dense = build()
    members = []
    for m in range(count):
        keras.utils.set_random_seed(10 + m)
        members.append(ftk.sparsify(build(), sparsity=sparsity, seed=m))
    return dense, members


@pytest.mark.parametrize("build", [ftk.models.lenet_300_100, ftk.models.lenet5],
                         ids=["lenet_300_100", "lenet5"])
def test_three_members_at_sparsity_08_are_smaller_than_one_dense_model(tmp_path, build):
    dense, members = _dense_and_members(build, 0.8)
    dense_path = tickets.write_ticket(dense, str(tmp_path / "dense"), 0)
    dense_bytes = export.saved_model_bytes(os.path.join(dense_path, "saved_model", "1"))
    weights_bytes = 4 * dense.count_params()
    assert dense_bytes > weights_bytes
    path = ftk.Ensemble(members, combine="probs").export(str(tmp_path / "ens"))
    ensemble_bytes = export.saved_model_bytes(path)
    assert ensemble_bytes <= dense_bytes, (ensemble_bytes, dense_bytes)


# --------------------------------------------------------------------------------------------
# Loading: caches filled at load time, as TF Serving loads


def test_cache_is_rebuilt_at_load_not_stored(tmp_path):
    model = _dense_net(2, 0.9, distribution="erk")
    serve, path = _serve([model], tmp_path, sparse_kernels="csr")
    stored = tf.train.list_variables(os.path.join(path, "variables", "variables"))
    stored_floats = sum(int(np.prod(shape)) for name, shape in stored
                        if name.startswith("stored_values"))
    kernel_floats = sum(int(np.prod(layer.masked_kernel.shape))
                        for layer in ftk.masked_layers(model))
    assert stored_floats < kernel_floats
    x = RNG.random((4, 6, 5)).astype(np.float32)
    want = _predict([model], x)
    again = tf.saved_model.load(path).signatures["serving_default"]  # a second load
    for fn in (serve, again):
        assert np.max(np.abs(fn(inputs=tf.constant(x))["member_logits"].numpy() - want)) <= 1e-5
    # Keras can wrap it (TFSMLayer tracks the stored variables only) and call it in a graph.
    inputs = keras.Input((6, 5))
    layer = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
    wrapped = keras.Model(inputs, layer(inputs)["member_logits"])
    assert np.max(np.abs(wrapped.predict(x, verbose=0) - want)) <= 1e-5


def test_tf1_session_loads_it_like_tf_serving(tmp_path):
    """TF Serving restores the variables, runs the init op, then feeds the signature's tensors."""
    members = [_dense_net(seed, 0.9) for seed in range(2)]
    _, path = _serve(members, tmp_path, sparse_kernels="coo")
    x = RNG.random((3, 6, 5)).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
        signature = meta.signature_def["serving_default"]
        got = session.run(signature.outputs["member_logits"].name,
                          {signature.inputs["inputs"].name: x})
    assert np.max(np.abs(got - _predict(members, x))) <= 1e-5


def test_in_process_serving_fn(tmp_path):
    members = [_dense_net(seed, 0.8) for seed in range(3)]
    ens = ftk.Ensemble(members, combine="probs")
    fn = ens.serving_fn(sparse_kernels="csr")
    assert [p.kernels for p in fn.plan] == ["csr"] * 3
    x = RNG.random((5, 6, 5)).astype(np.float32)
    got = fn(tf.constant(x))["probabilities"].numpy()
    assert np.max(np.abs(got - ens.predict(x, verbose=0))) <= 1e-5
    assert [p.layer for p in fn.plan] == ["fc1", "fc2", "logits"]


# --------------------------------------------------------------------------------------------
# Refusals


def test_non_finite_weights_are_refused_naming_layer_and_variable(tmp_path):
    model = _dense_net(0, 0.5)
    layer = ftk.masked_layers(model)[1]
    kernel = layer.masked_kernel.numpy()
    kernel[np.argwhere(layer.kernel_mask.numpy())[0][0], 0] = np.nan
    layer.masked_kernel.assign(kernel)
    with pytest.raises(ValueError, match=r"layer 'fc2', variable '.*kernel'.*1 non-finite"):
        export.check_finite_weights(model)
    with pytest.raises(ValueError, match="fc2"):
        tickets.write_ticket(model, str(tmp_path / "t"), 0)
    assert not os.path.exists(tmp_path / "t" / "ticket_0")
    with pytest.raises(ValueError, match=r"members\[1\].*fc2"):
        ftk.Ensemble([_dense_net(1, 0.5), model]).export(str(tmp_path / "e"))
    assert not os.path.exists(tmp_path / "e" / "1")
    other = _dense_net(2, 0.5)
    ftk.masked_layers(other)[0].bias.assign(np.full(128, np.inf, np.float32))
    with pytest.raises(ValueError, match=r"layer 'fc1', variable '.*bias'.*128 non-finite"):
        export.check_finite_weights(other, "member")


def test_argument_errors(tmp_path):
    model = _dense_net(0, 0.5)
    target = str(tmp_path / "a")
    with pytest.raises(ValueError, match="sparse_kernels='fast'"):
        export.export_models([model], target, _head, sparse_kernels="fast")
    # The cost model's per-request choice is gone.
    with pytest.raises(ValueError, match=r"sparse_kernels='auto'.*\('dense', 'csr', 'coo'\)"):
        export.export_models([model], target, _head, sparse_kernels="auto")
    with pytest.raises(ValueError, match=r"group_members='yes' is not supported; allowed values "
                                         r"are \('convolutions', 'all', 'none'\)"):
        export.export_models([model], target, _head, group_members="yes")
    with pytest.raises(TypeError, match="group_members must be one of .* got True"):
        ftk.Ensemble([model]).export(str(tmp_path / "b"), group_members=True)
    # The fusion and the legacy layout are gone: Python's own unknown-argument errors.
    with pytest.raises(TypeError, match="unexpected keyword argument 'fuse'"):
        export.export_models([model], target, _head, fuse="always")
    with pytest.raises(TypeError, match="unexpected keyword argument 'storage'"):
        ftk.Ensemble([model]).export(str(tmp_path / "b"), storage="dense")
    with pytest.raises(TypeError, match="unexpected keyword argument 'fuse'"):
        ftk.Ensemble([model]).serving_fn(fuse="never")
    with pytest.raises(TypeError, match=r"models\[1\] must be a keras.Model"):
        export.export_models([model, "x"], target, _head)
    with pytest.raises(ValueError, match="sparse_kernels='fast'"):
        ftk.Ensemble([model]).export(str(tmp_path / "b"), sparse_kernels="fast")
    with pytest.raises(ValueError, match="sparse_kernels='fast'"):
        tickets.write_ticket(model, str(tmp_path / "c"), 0, sparse_kernels="fast")
    assert not os.listdir(tmp_path) or sorted(os.listdir(tmp_path)) == ["b", "c"]
    for name in ("KERNEL_COST_US", "kernel_schedule", "conv_schedule", "FUSE_MIN_BATCH",
                 "check_fuse", "STORAGE_MODES"):
        assert not hasattr(export, name), name


@pytest.mark.parametrize("input_range, error, message", [
    ((1.0, 0.0), ValueError, r"input_range=\(1.0, 0.0\) is not allowed.*low < high"),
    ((0.0, 0.0), ValueError, "low < high"),
    ((0.0, float("nan")), ValueError, r"input_range\[1\]=nan is not allowed"),
    ((0.0, float("inf")), ValueError, r"input_range\[1\]=inf is not allowed"),
    ([0.0], TypeError, r"input_range must be None or a pair \(low, high\)"),
    ("0,1", TypeError, "input_range must be None or a pair"),
    ((0.0, "1"), TypeError, r"input_range\[1\] must be a finite number; got '1'"),
])
def test_input_range_argument_errors(tmp_path, input_range, error, message):
    model = _dense_net(0, 0.5)
    with pytest.raises(error, match=message):
        export.export_models([model], str(tmp_path / "a"), _head, input_range=input_range)
    with pytest.raises(error, match=message):
        ftk.Ensemble([model]).export(str(tmp_path / "b"), input_range=input_range)
    with pytest.raises(error, match=message):
        tickets.write_ticket(model, str(tmp_path / "c"), 0, input_range=input_range)
    assert os.listdir(tmp_path) == [] or not os.path.exists(tmp_path / "b" / "1")


if __name__ == "__main__":  # bazel test / python tests/test_export.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))


def test_members_are_served_compacted_with_equal_widths(tmp_path):
    """Units removed in every member (kernel column and bias zero) are not served; a unit dead in
    one member only is kept, so the members stay aligned."""
    members = [_dense_net(seed, 0.5) for seed in range(3)]
    for i, member in enumerate(members):
        fc1 = member.get_layer("fc1")
        dead = list(range(0, 96)) + [100 + i]  # units 0-95 in every member, one more per member
        mask = fc1.kernel_mask.numpy()
        mask[:, dead] = False
        fc1.set_mask(mask)
        bias = fc1.bias.numpy()
        bias[dead] = 0.0
        fc1.bias.assign(bias)
    plan = export.kernel_plan(members)
    assert [(p.layer, p.members, p.shape) for p in plan] == [
        ("fc1", 3, (30, 32)), ("fc2", 3, (32, 24)), ("logits", 3, (24, 7))]
    x = RNG.random((5, 6, 5)).astype(np.float32)
    serve, _ = _serve(members, tmp_path)
    assert np.max(np.abs(_outputs(serve, x) - _predict(members, x))) <= 1e-5
