"""ft_keras.export: compact storage, sparse kernels, fusion, load-time caches, size bound."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import ft_keras as ftk
from ft_keras import export
from ft_keras import tickets

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
    return ftk.sparsify(model, sparsity=sparsity, distribution=distribution, seed=seed)


def _conv_nets(seed):
    """One small model per convolution kind, each with masked convolutions and Dense layers."""
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


@pytest.mark.parametrize("kernels", ["auto", "dense", "csr", "coo"])
@pytest.mark.parametrize("sparsity, encoding", [(0.97, "rows"), (0.7, "bitmask"), (0.0, "full")])
def test_dense_layers_every_kernel_and_encoding(tmp_path, kernels, sparsity, encoding):
    members = [_dense_net(seed, sparsity) for seed in range(3)]
    plan = export.kernel_plan(members, sparse_kernels=kernels, fuse="never")
    assert [p.layer for p in plan] == ["fc1", "fc2", "logits"]
    assert plan[0].storage == (encoding,) * 3
    if kernels != "auto" and sparsity > 0:
        assert {p.kernels for p in plan} == {kernels}
    x = RNG.random((9, 6, 5)).astype(np.float32)
    for fuse in ("never", "auto"):
        serve, _ = _serve(members, tmp_path, name=fuse, sparse_kernels=kernels, fuse=fuse)
        got = serve(inputs=tf.constant(x))["member_logits"].numpy()
        assert np.max(np.abs(got - _predict(members, x))) <= 1e-5


@pytest.mark.parametrize("kernels", ["auto", "dense", "csr", "coo"])
def test_convolutions_depthwise_batchnorm(tmp_path, kernels):
    for i, net in enumerate(_conv_nets(3)):
        _set_bn_statistics(net)
        sparse = ftk.sparsify(net, sparsity=0.6, distribution="uniform", seed=i)
        assert len(ftk.masked_layers(sparse)) >= 2
        twin = ftk.sparsify(net, sparsity=0.6, distribution="uniform", seed=i + 10)
        rows = export.kernel_plan([sparse, twin], sparse_kernels=kernels)
        assert {p.members for p in rows} == {2}  # aligned: one row per position
        plan = {p.layer: p.kernels for p in rows}
        # Conv2D runs as patches + a sparse product when asked; Conv1D/3D and depthwise
        # convolutions are always dense (their kernels still stored compactly).
        want_conv = kernels if kernels != "auto" else "dense"
        assert plan == ({"conv": want_conv, "logits": want_conv} if net.name == "conv2d"
                        else {"logits": want_conv})
        shape = (4,) + tuple(net.inputs[0].shape[1:])
        x = RNG.random(shape).astype(np.float32)
        serve, _ = _serve([sparse], tmp_path, name=f"{net.name}_{kernels}",
                          sparse_kernels=kernels)
        got = serve(inputs=tf.constant(x))["member_logits"].numpy()
        assert np.max(np.abs(got - _predict([sparse], x))) <= 1e-5, net.name


def test_unknown_input_dimensions(tmp_path):
    """A sequence model with a free length axis: the request check tests the known axes only."""
    keras.utils.set_random_seed(6)
    model = ftk.sparsify(keras.Sequential([
        keras.Input((None, 8)),
        keras.layers.Dense(16, activation="relu", name="fc"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(3, name="logits"),
    ]), sparsity=0.5, seed=6)
    serve, _ = _serve([model], tmp_path, sparse_kernels="csr")
    for length in (1, 7):
        x = RNG.random((2, length, 8)).astype(np.float32)
        got = serve(inputs=tf.constant(x))["member_logits"].numpy()
        assert np.max(np.abs(got - _predict([model], x))) <= 1e-5
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
    got = serve(inputs=tf.constant(x))["member_logits"].numpy()
    assert np.max(np.abs(got - _predict([model, model], x))) <= 1e-5
    stored = dict(tf.train.list_variables(os.path.join(path, "variables", "variables")))
    masked = ftk.masked_layers(model)
    num_values = sum(layer.num_active + layer.bias.shape[0] for layer in masked) + sum(
        int(np.prod(w.shape)) for layer in model.layers if layer not in masked
        for w in layer.weights)
    assert [s for n, s in stored.items() if n.startswith("stored_values")] == [[num_values]]


@pytest.mark.parametrize("fuse", ["never", "always", "auto"])
def test_fusion_and_repeated_members(tmp_path, fuse):
    members = [_dense_net(seed, 0.8) for seed in range(2)]
    models = [members[0], members[1], members[0]]
    x = RNG.random((6, 6, 5)).astype(np.float32)
    serve, _ = _serve(models, tmp_path, fuse=fuse, sparse_kernels="dense")
    got = serve(inputs=tf.constant(x))["member_logits"].numpy()
    assert got.shape == (3, 6, 7)
    assert np.max(np.abs(got - _predict(models, x))) <= 1e-5
    plan = export.kernel_plan(models, fuse=fuse, sparse_kernels="dense")
    assert all(p.members == 2 for p in plan)  # the repeated member is computed once
    if fuse == "always":
        assert {p.kernels for p in plan} == {"fused"}


def test_members_that_differ_are_not_fused(tmp_path):
    keras.utils.set_random_seed(5)
    other = ftk.sparsify(keras.Sequential([
        keras.Input((6, 5)), keras.layers.Flatten(), keras.layers.Dense(7, name="logits")]),
        sparsity=0.5, seed=5)
    models = [_dense_net(0, 0.8), other]
    plan = export.kernel_plan(models, fuse="always")
    assert [p.members for p in plan] == [1, 1, 1, 1]
    x = RNG.random((3, 6, 5)).astype(np.float32)
    serve, _ = _serve(models, tmp_path, fuse="always")
    got = serve(inputs=tf.constant(x))["member_logits"].numpy()
    assert np.max(np.abs(got - _predict(models, x))) <= 1e-5


def test_kernel_schedule_follows_the_cost_model(monkeypatch):
    monkeypatch.setattr(export, "_MAX_MODELLED_BATCH", 64)
    # dense = 100 us; csr = 16 us per active weight and row; coo never.
    monkeypatch.setattr(export, "KERNEL_COST_US", {
        "dense": (100.0, 0.0, 0.0), "csr": (0.0, 0.0, 16.0, 0.0), "coo": (1e9, 0.0, 0.0)})
    # 16 * B <= 0.8 * 100 up to B = 5 (SPARSE_MARGIN 0.8).
    assert export.kernel_schedule(10, 10, 1) == [(1, "csr"), (6, "dense")]
    assert export.kernel_schedule(10, 10, 1, "coo") == [(1, "coo")]
    monkeypatch.setattr(export, "KERNEL_COST_US", {
        "dense": (0.0, 0.0, 1.0), "csr": (1e9, 0.0, 0.0, 0.0), "coo": (50.0, 0.0, 0.0)})
    # dense = 100 B; coo = 50: coo from B = 1 (100 * 0.8 >= 50) up to COO_MAX_BATCH only.
    assert export.COO_MAX_BATCH == 8
    assert export.kernel_schedule(10, 10, 1) == [(1, "coo"), (9, "dense")]


def test_auto_switches_kernels_on_the_batch_size(tmp_path, monkeypatch):
    """One SavedModel serves batches below 6 rows with CSR and larger ones densely."""
    monkeypatch.setattr(export, "_best_kernel",
                        lambda n_in, n_out, nnz, batch: "csr" if batch < 6 else "dense")
    monkeypatch.setattr(export, "_MAX_MODELLED_BATCH", 64)
    model = _dense_net(1, 0.9)
    assert {p.kernels for p in export.kernel_plan([model])} == {"csr<6<=dense"}
    serve, _ = _serve([model], tmp_path)
    for batch in (1, 5, 6, 40):
        x = RNG.random((batch, 6, 5)).astype(np.float32)
        got = serve(inputs=tf.constant(x))["member_logits"].numpy()
        assert np.max(np.abs(got - _predict([model], x))) <= 1e-5, batch


def test_conv_schedule():
    # LeNet-5's conv2 (5x5x6 -> 16, 10x10 outputs) stays dense at every batch size.
    assert export.conv_schedule(150, 16, 240, 100) == [(1, "dense")]
    assert export.conv_schedule(150, 16, 240, 100, "csr") == [(1, "csr")]
    assert export.conv_schedule(150, 16, 240, None) == [(1, "dense")]


def test_kernel_schedule_from_the_cost_model():
    # A small layer is served dense at every batch size.
    assert export.kernel_schedule(784, 300, 47_040) == [(1, "dense")]
    # A wide, very sparse layer uses a sparse kernel at batch 64.
    schedule = export.kernel_schedule(4096, 4096, 168_000)
    kernel_at_64 = [k for start, k in schedule if start <= 64][-1]
    assert kernel_at_64 in ("csr", "coo")
    assert [start for start, _ in schedule] == sorted({start for start, _ in schedule})
    assert export.kernel_schedule(4096, 4096, 168_000, "dense") == [(1, "dense")]
    with pytest.raises(ValueError, match="sparse_kernels='sparse'"):
        export.kernel_schedule(4, 4, 2, "sparse")


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
    legacy = ftk.Ensemble(members).export(str(tmp_path / "legacy"), storage="dense")
    assert export.saved_model_bytes(legacy) > 3 * weights_bytes


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
    with pytest.raises(ValueError, match="sparse_kernels='fast'"):
        export.export_models([model], str(tmp_path / "a"), _head, sparse_kernels="fast")
    with pytest.raises(ValueError, match="storage='tiny'"):
        export.export_models([model], str(tmp_path / "a"), _head, storage="tiny")
    with pytest.raises(ValueError, match="fuse='sometimes'"):
        export.export_models([model], str(tmp_path / "a"), _head, fuse="sometimes")
    with pytest.raises(TypeError, match=r"models\[1\] must be a keras.Model"):
        export.export_models([model, "x"], str(tmp_path / "a"), _head)
    with pytest.raises(ValueError, match="sparse_kernels='fast'"):
        ftk.Ensemble([model]).export(str(tmp_path / "b"), sparse_kernels="fast")
    with pytest.raises(ValueError, match="sparse_kernels='fast'"):
        tickets.write_ticket(model, str(tmp_path / "c"), 0, sparse_kernels="fast")
    assert not os.listdir(tmp_path) or sorted(os.listdir(tmp_path)) == ["b", "c"]


if __name__ == "__main__":  # bazel test / python tests/test_export.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
