"""DynamicSparsity / StaticSparsity inside model.fit: exact counts, zeros, clocks, replicas."""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tensorflow.python.framework import config as tf_config

import ft_keras as ftk
from ft_keras import schedules
from tests.conftest import masked_state


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _sparse_lenet(sparsity=0.9, seed=0, distribution="erk", weight_seed=0):
    keras.utils.set_random_seed(weight_seed)
    return ftk.sparsify(ftk.models.lenet_300_100(), sparsity, distribution=distribution, seed=seed)


def _compile(model, optimizer=None, **kwargs):
    kwargs.setdefault("jit_compile", False)
    model.compile(optimizer or keras.optimizers.SGD(0.05, momentum=0.9), _loss(), **kwargs)
    return model


def _slots(model, layer):
    """Optimizer variables with the kernel's shape that belong to ``layer``."""
    optimizer = model.optimizer
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    prefix = layer.masked_kernel.path.replace("/", "_")
    return [
        v
        for v in optimizer.variables
        if tuple(v.shape) == tuple(layer.masked_kernel.shape)
        and prefix in v.path
        and "ftk_grad" not in v.path  # SNFS's dense-gradient momentum is dense by design
    ]


class Inspector(keras.callbacks.Callback):
    """Checks the invariants around every optimizer step (steps_per_execution must be 1)."""

    def __init__(self, update_every, end_step):
        super().__init__()
        self.update_every = update_every
        self.end_step = end_step
        self.before = None
        self.updates_seen = 0
        self.total_grown = 0

    def on_train_batch_begin(self, batch, logs=None):
        self.before = masked_state(self.model)

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        after = masked_state(self.model)
        for layer in ftk.masked_layers(self.model):
            old_mask, _ = self.before[layer.name]
            mask, kernel = after[layer.name]
            assert mask.sum() == old_mask.sum(), "active count changed"
            assert not kernel[~mask].any(), "nonzero weight off-mask"
            for slot in _slots(self.model, layer):
                assert not slot.numpy()[~mask].any(), f"optimizer state off-mask in {slot.path}"
            grown = mask & ~old_mask
            if step % self.update_every == 0 and step < self.end_step:
                self.updates_seen += 1
                self.total_grown += int(grown.sum())
                assert not kernel[grown].any(), "grown weights must start at zero"
                for slot in _slots(self.model, layer):
                    assert not slot.numpy()[grown].any()
            else:
                np.testing.assert_array_equal(mask, old_mask)


@pytest.mark.parametrize("grow", ["gradient", "random", "momentum"])
def test_invariants_around_every_step(fashion_mnist_small, grow):
    (x, y), _ = fashion_mnist_small
    model = _compile(_sparse_lenet(0.9, distribution="uniform"))
    initial = masked_state(model)
    inspector = Inspector(update_every=3, end_step=24)
    callback = ftk.DynamicSparsity(update_every=3, drop_fraction=0.5, grow=grow, seed=1)
    model.fit(x[:768], y[:768], batch_size=64, epochs=2, shuffle=False, verbose=0,
              callbacks=[callback, inspector])
    assert inspector.updates_seen == 7 * 3  # steps 3, 6, ..., 21 (24 ends training); 3 layers
    assert inspector.total_grown > 0
    final = masked_state(model)
    for name in initial:
        assert (initial[name][0] != final[name][0]).any(), f"{name}: mask never moved"


def _one_update_run(optimizer, grow, x, y):
    """One fit step at learning rate 0 with a mask update at step 1; returns before/after."""
    keras.utils.set_random_seed(3)
    base = keras.Sequential(
        [keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(20, name="fc"),
         keras.layers.Dense(10, name="out")]
    )
    model = ftk.sparsify(base, 0.5, distribution="uniform", keep_dense="out", seed=5)
    _compile(model, optimizer)
    layer = model.get_layer("fc")
    mask0 = layer.kernel_mask.numpy().copy()
    w0 = layer.masked_kernel.numpy().copy()
    with tf.GradientTape() as tape:
        loss = _loss()(y, model(x, training=True))
    grad = tape.gradient(loss, layer.masked_kernel.value).numpy()
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0,
              callbacks=[ftk.DynamicSparsity(update_every=1, drop_fraction=0.5,
                                             decay="constant", end_step=10, grow=grow)])
    return mask0, w0, grad, layer.kernel_mask.numpy(), layer.masked_kernel.numpy()


@pytest.mark.parametrize(
    "optimizer_fn,grow",
    [
        (lambda: keras.optimizers.SGD(0.0), "gradient"),
        (lambda: keras.optimizers.SGD(0.0, momentum=0.9), "momentum"),
        (lambda: keras.optimizers.Adam(0.0), "momentum"),
    ],
)
def test_prune_smallest_grow_largest_dense_gradient(fashion_mnist_small, optimizer_fn, grow):
    """At lr 0 the weights do not move, so the update is fully predictable from w and dL/dW."""
    (x, y), _ = fashion_mnist_small
    mask0, w0, grad, mask1, w1 = _one_update_run(optimizer_fn(), grow, x[:64], y[:64])
    n = int(mask0.sum())
    k = ftk.masks.num_to_drop_py(0.5, n)
    assert mask1.sum() == n
    keep = mask1 & (w1 != 0)  # survivors keep their weight; grown (and regrown) restart at 0
    np.testing.assert_array_equal(w1[keep], w0[keep])
    assert keep.sum() == n - k and not (keep & ~mask0).any()
    dropped = mask0 & ~keep
    assert np.abs(w0[keep]).min() >= np.abs(w0[dropped]).max()  # pruned = smallest |w|
    grown = mask1 & ~keep
    not_grown = ~mask1
    # grown = largest score among positions outside keep (dropped ones allowed): |dense
    # gradient|, or for Adam-like SNFS |m| / (sqrt(v) + eps) after one step, which is nearly
    # constant in |g| (its float32 values tie where |g| differ by less than ~1e-3)
    score = np.abs(grad)
    if grow == "momentum" and not isinstance(optimizer_fn(), keras.optimizers.SGD):
        score = (0.1 * score) / (np.sqrt(0.001 * np.square(score)) + 1e-7)
    assert score[grown].min() >= score[not_grown].max() * (1 - 1e-5)
    assert (grown & mask0).sum() < k  # not simply a re-growth of the same positions
    assert (grad[~mask0] != 0).any(), "the gradient off-mask must be the dense gradient"


def test_random_growth_is_seeded(fashion_mnist_small):
    (x, y), _ = fashion_mnist_small

    def run(seed):
        model = _compile(_sparse_lenet(0.9))
        model.fit(x[:512], y[:512], batch_size=64, epochs=1, shuffle=False, verbose=0,
                  callbacks=[ftk.DynamicSparsity(update_every=2, grow="random", seed=seed)])
        return masked_state(model)

    a, b, c = run(0), run(0), run(1)
    for name in a:
        np.testing.assert_array_equal(a[name][0], b[name][0])
        np.testing.assert_array_equal(a[name][1], b[name][1])
        assert (a[name][0] != c[name][0]).any()


@pytest.mark.parametrize("optimizer_state", ["masked", "dense"])
def test_steps_per_execution_gives_the_same_run(fashion_mnist_small, optimizer_state):
    (x, y), _ = fashion_mnist_small
    states, callbacks = [], []
    for spe in (1, 3):
        model = _compile(_sparse_lenet(0.9), steps_per_execution=spe)
        callback = ftk.DynamicSparsity(update_every=4, drop_fraction=0.5, grow="gradient",
                                       optimizer_state=optimizer_state)
        model.fit(x[:512], y[:512], batch_size=64, epochs=2, shuffle=False, verbose=0,
                  callbacks=[callback])
        states.append(masked_state(model))
        callbacks.append(callback)
        assert int(model.optimizer.iterations.numpy()) == 16
    for name in states[0]:
        np.testing.assert_array_equal(states[0][name][0], states[1][name][0])
        np.testing.assert_allclose(states[0][name][1], states[1][name][1], rtol=0, atol=1e-6)
    # the last update is at step 12 (16 is the end of training, exclusive)
    assert callbacks[0].updates[-1]["step"] == callbacks[1].updates[-1]["step"] == 12


@pytest.mark.parametrize("optimizer_state", ["masked", "dense"])
def test_xla_train_step(fashion_mnist_small, optimizer_state):
    (x, y), _ = fashion_mnist_small
    model = _compile(_sparse_lenet(0.8), jit_compile=True, steps_per_execution=4)
    before = masked_state(model)
    callback = ftk.DynamicSparsity(update_every=4, drop_fraction=0.3, grow="random",
                                   optimizer_state=optimizer_state)
    model.fit(x[:512], y[:512], batch_size=64, epochs=1, verbose=0, callbacks=[callback])
    after = masked_state(model)
    for name in before:
        assert after[name][0].sum() == before[name][0].sum()
        assert (after[name][0] != before[name][0]).any()
        assert not after[name][1][~after[name][0]].any()


def _assert_xla_trains_as_without(x, y, grow, split):
    """Trains the same model with and without XLA (steps_per_execution 4): same update steps,
    same masks, same weights up to XLA's rounding, zeros off-mask; checks which XLA path ran."""
    states = {}
    for jit_compile in (False, True):
        model = _compile(_sparse_lenet(0.8), keras.optimizers.SGD(0.05, momentum=0.9),
                         jit_compile=jit_compile, steps_per_execution=4)
        callback = ftk.DynamicSparsity(update_every=3, drop_fraction=0.5, grow=grow, seed=4)
        model.fit(x[:512], y[:512], batch_size=64, epochs=2, shuffle=False, verbose=0,
                  callbacks=[callback])
        # pylint: disable=protected-access
        assert callback._split is (jit_compile and split)
        assert callback._static_shapes is (jit_compile and not split)
        assert [u["step"] for u in callback.updates] == [6, 15]
        states[jit_compile] = masked_state(model)
    for name, (mask, kernel) in states[False].items():
        xla_mask, xla_kernel = states[True][name]
        np.testing.assert_array_equal(xla_mask, mask)
        np.testing.assert_allclose(xla_kernel, kernel, rtol=0, atol=1e-6)
        assert not xla_kernel[~xla_mask].any()


@pytest.mark.parametrize("grow", ["gradient", "random", "momentum"])
def test_xla_split_step_trains_as_without_xla(fashion_mnist_small, grow):
    """Under XLA on one replica the update steps run uncompiled and the ordinary steps
    compiled (`_split_train_step`): the same updates at the same steps as without XLA, the
    same masks, the same weights up to XLA's rounding, whatever steps_per_execution."""
    (x, y), _ = fashion_mnist_small
    _assert_xla_trains_as_without(x, y, grow, split=True)


def test_xla_update_inside_the_compiled_step(fashion_mnist_small, monkeypatch):
    """The path that several replicas take under XLA (the update compiled into every step,
    static shapes, writes outside the conditional), forced on one replica: the same updates
    and masks as without XLA."""
    from ft_keras import training  # pylint: disable=import-outside-toplevel

    monkeypatch.setattr(training, "_can_split", lambda model: False)
    (x, y), _ = fashion_mnist_small
    _assert_xla_trains_as_without(x, y, "gradient", split=False)


def _graph_nodes(function):
    """Nodes of every traced graph of a tf.function, nested functions included."""
    # Private TF API (test only): the concrete functions traced so far, without re-tracing.
    for concrete in function._list_all_concrete_functions():  # pylint: disable=protected-access
        graph_def = concrete.graph.as_graph_def()
        nodes = list(graph_def.node)
        nodes += [node for f in graph_def.library.function for node in f.node_def]
        yield concrete, nodes


def test_xla_ordinary_steps_write_no_mask(fashion_mnist_small):
    """The XLA-compiled step writes no mask (XLA would copy every mask at every step); only
    the uncompiled update step does, one write per masked layer."""
    (x, y), _ = fashion_mnist_small
    model = _compile(_sparse_lenet(0.8), jit_compile=True)
    callback = ftk.DynamicSparsity(update_every=3, drop_fraction=0.5)
    model.fit(x[:256], y[:256], batch_size=64, epochs=1, verbose=0, callbacks=[callback])
    step = callback._split_step  # pylint: disable=protected-access
    boolean = tf.bool.as_datatype_enum

    def mask_writes(nodes):
        return [n for n in nodes if n.op == "AssignVariableOp" and n.attr["dtype"].type == boolean]

    traced = {mode: list(_graph_nodes(getattr(step, mode))) for mode in ("plain", "update")}
    assert traced["plain"] and traced["update"]
    for concrete, nodes in traced["plain"]:
        assert concrete.function_def.attr["_XlaMustCompile"].b
        assert not mask_writes(nodes)
        assert any(n.op == "MatMul" for n in nodes)  # the forward pass is in it
    for concrete, nodes in traced["update"]:
        assert "_XlaMustCompile" not in concrete.function_def.attr
        assert len(mask_writes(nodes)) == len(ftk.masked_layers(model))


@pytest.mark.parametrize("junk", [0.5, -0.0])
def test_fit_starts_from_zeros_off_mask_after_user_writes(fashion_mnist_small, junk):
    """Off-mask values written by user code (even -0.0) are reset to +0.0 before training."""
    (x, y), _ = fashion_mnist_small
    model = _compile(_sparse_lenet(0.9))
    layer = ftk.masked_layers(model)[0]
    mask = layer.kernel_mask.numpy()
    layer.masked_kernel.assign(np.where(mask, layer.masked_kernel.numpy(), junk))
    other = ftk.masked_layers(model)[1]
    clean_before = other.masked_kernel.numpy()

    class Check(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            kernel = layer.masked_kernel.numpy()
            assert not np.signbit(kernel[~mask]).any() and not kernel[~mask].any()
            np.testing.assert_array_equal(other.masked_kernel.numpy(), clean_before)

    model.fit(x[:64], y[:64], batch_size=64, epochs=1, verbose=0,
              callbacks=[ftk.StaticSparsity(), Check()])


class _ForceStaticShapes(keras.callbacks.Callback):
    """Makes a sparsity callback take its XLA (static-shape) update path without XLA."""

    def __init__(self, sparsity_callback):
        super().__init__()
        self.sparsity_callback = sparsity_callback

    def on_train_begin(self, logs=None):
        self.sparsity_callback._static_shapes = True  # pylint: disable=protected-access


@pytest.mark.parametrize("grow, optimizer_state", [
    ("gradient", "masked"), ("random", "masked"), ("momentum", "masked"), ("gradient", "dense")])
def test_compacted_update_equals_static_shape_update(fashion_mnist_small, grow, optimizer_state):
    """The default (compacted, writes inside the conditional) update path and the XLA one
    (static shapes, writes outside the conditional) train identically."""
    (x, y), _ = fashion_mnist_small
    states = []
    for force_static in (False, True):
        model = _compile(_sparse_lenet(0.8), keras.optimizers.Adam(1e-3))
        callback = ftk.DynamicSparsity(update_every=3, drop_fraction=0.5, grow=grow, seed=4,
                                       optimizer_state=optimizer_state)
        extra = [_ForceStaticShapes(callback)] if force_static else []
        model.fit(x[:512], y[:512], batch_size=64, epochs=2, shuffle=False, verbose=0,
                  callbacks=[callback] + extra)
        assert callback._static_shapes is force_static  # pylint: disable=protected-access
        assert [u["step"] for u in callback.updates] == [6, 15]  # last seen per epoch
        states.append((masked_state(model), [np.array(v) for v in model.optimizer.variables],
                       callback.updates))
    (first, slots_a, updates_a), (second, slots_b, updates_b) = states
    for name in first:
        np.testing.assert_array_equal(first[name][0], second[name][0])
        np.testing.assert_array_equal(first[name][1], second[name][1])
    for a, b in zip(slots_a, slots_b):
        np.testing.assert_array_equal(a, b)
    assert updates_a == updates_b  # same per-layer churn and density records


def _events(log_dir):
    tags = {}
    for path in glob.glob(os.path.join(log_dir, "**", "events.out.tfevents*"), recursive=True):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor) if value.HasField("tensor") else value
                tags.setdefault(value.tag, []).append((event.step, float(tensor)))
    return tags


def test_schedule_end_step_and_tensorboard(fashion_mnist_small, tmp_path):
    (x, y), _ = fashion_mnist_small
    model = _compile(_sparse_lenet(0.9))
    callback = ftk.DynamicSparsity(update_every=2, drop_fraction=0.4, decay="cosine",
                                   end_step=11, log_dir=str(tmp_path))
    masks_at = {}

    class Snapshot(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step = int(self.model.optimizer.iterations.numpy())
            masks_at[step] = masked_state(self.model)

    model.fit(x[:1024], y[:1024], batch_size=64, epochs=1, shuffle=False, verbose=0,
              callbacks=[callback, Snapshot()])
    assert [u["step"] for u in callback.updates] == [2, 4, 6, 8, 10]
    for record in callback.updates:
        expected = schedules.drop_fraction(record["step"], 0.4, "cosine", 11)
        assert abs(record["drop_fraction"] - expected) < 1e-6
        for name, values in record["layers"].items():
            n = int(masks_at[10][name][0].sum())
            k = ftk.masks.num_to_drop_py(record["drop_fraction"], n)
            assert 0 < values["mask_churn"] <= k / n
            assert abs(values["density"] - masks_at[10][name][0].mean()) < 1e-12
    for step in range(11, 17):  # no update after end_step
        for name in masks_at[10]:
            np.testing.assert_array_equal(masks_at[step][name][0], masks_at[10][name][0])
    tags = _events(str(tmp_path))
    assert [s for s, _ in tags["sparsity/drop_fraction"]] == [2, 4, 6, 8, 10]
    assert "sparsity/fc1/density" in tags and "sparsity/fc2/mask_churn" in tags
    churn = dict(tags["sparsity/fc1/mask_churn"])
    assert abs(churn[4] - callback.updates[1]["layers"]["fc1"]["mask_churn"]) < 1e-6


OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.05),
    "nesterov": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(1e-3),
    "adamw": lambda: keras.optimizers.AdamW(1e-3, weight_decay=0.01),
    "adam_amsgrad": lambda: keras.optimizers.Adam(1e-3, amsgrad=True),
    "rmsprop": lambda: keras.optimizers.RMSprop(1e-3, momentum=0.5),
    "adagrad": lambda: keras.optimizers.Adagrad(0.05),
    "loss_scale_sgd": lambda: keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.05, momentum=0.9)
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_any_optimizer_keeps_zeros(fashion_mnist_small, name):
    (x, y), _ = fashion_mnist_small
    model = _compile(_sparse_lenet(0.9), OPTIMIZERS[name]())
    counts = {k: v[0].sum() for k, v in masked_state(model).items()}
    model.fit(x[:512], y[:512], batch_size=64, epochs=1, verbose=0,
              callbacks=[ftk.DynamicSparsity(update_every=3, drop_fraction=0.5)])
    for layer in ftk.masked_layers(model):
        mask = layer.kernel_mask.numpy()
        assert mask.sum() == counts[layer.name]
        assert not layer.masked_kernel.numpy()[~mask].any()
        slots = _slots(model, layer)
        if name != "sgd":
            assert slots, f"no optimizer state found for {name}"
        for slot in slots:
            assert not slot.numpy()[~mask].any(), slot.path


def test_static_sparsity_and_training_without_callback(fashion_mnist_small):
    (x, y), _ = fashion_mnist_small
    model = _compile(_sparse_lenet(0.9))
    before = masked_state(model)
    model.fit(x[:256], y[:256], batch_size=64, epochs=1, verbose=0,
              callbacks=[ftk.StaticSparsity()])
    after = masked_state(model)
    for name in before:
        np.testing.assert_array_equal(after[name][0], before[name][0])
        assert not after[name][1][~after[name][0]].any()
        assert (after[name][1] != before[name][1]).any()  # it did train
    # without a sparsity callback Keras trains the zeros too: that is why the callback exists
    model.fit(x[:256], y[:256], batch_size=64, epochs=1, verbose=0)
    layer = ftk.masked_layers(model)[0]
    assert layer.masked_kernel.numpy()[~layer.kernel_mask.numpy()].any()


def test_hook_is_removed_and_second_fit_continues(fashion_mnist_small):
    (x, y), _ = fashion_mnist_small
    model = _compile(_sparse_lenet(0.9))
    callback = ftk.DynamicSparsity(update_every=4, decay="constant")
    model.fit(x[:256], y[:256], batch_size=64, epochs=1, verbose=0, callbacks=[callback])
    assert "update_step" not in model.optimizer.__dict__
    model.fit(x[:256], y[:256], batch_size=64, epochs=3, verbose=0, callbacks=[callback])
    # clock = optimizer.iterations (4 at the start); this fit ends at step 16 (exclusive)
    assert [u["step"] for u in callback.updates] == [8, 12]
    assert "update_step" not in model.optimizer.__dict__


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(update_every=0), ValueError, "update_every"),
        (dict(update_every=2.5), TypeError, "update_every"),
        (dict(drop_fraction=0.0), ValueError, "drop_fraction"),
        (dict(drop_fraction=1.5), ValueError, "drop_fraction"),
        (dict(decay="linear"), ValueError, "decay"),
        (dict(prune="random"), ValueError, "prune"),
        (dict(grow="largest"), ValueError, "grow"),
        (dict(end_step=0), ValueError, "end_step"),
        (dict(final_drop_fraction=0.6, drop_fraction=0.5), ValueError, "final_drop_fraction"),
        (dict(seed="a"), TypeError, "seed"),
        (dict(seed=1.0), TypeError, "seed"),
        (dict(start_step=6, end_step=4), ValueError, "start_step=6.*end_step=4"),
        (dict(update_every=100, end_step=50), ValueError, "end_step=50 leaves no mask update"),
        (dict(optimizer_state="sparse"), ValueError, "optimizer_state"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ftk.DynamicSparsity(**kwargs)


def test_choices_are_case_insensitive_and_numpy_ints_accepted():
    callback = ftk.DynamicSparsity(update_every=np.int64(10), grow="Gradient", decay="COSINE",
                                   seed=np.int32(3))
    assert (callback.update_every, callback.grow, callback.decay, callback.seed) == (
        10, "gradient", "cosine", 3)
    assert type(callback.update_every) is int and type(callback.seed) is int


def test_model_that_was_not_sparsified(fashion_mnist_small):
    (x, y), _ = fashion_mnist_small
    model = _compile(ftk.models.lenet_300_100())
    with pytest.raises(ValueError, match="no masked layer"):
        model.fit(x[:64], y[:64], verbose=0, callbacks=[ftk.DynamicSparsity()])


def test_momentum_growth_needs_momentum(fashion_mnist_small):
    (x, y), _ = fashion_mnist_small
    model = _compile(_sparse_lenet(0.9), keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="momentum"):
        model.fit(x[:64], y[:64], verbose=0, callbacks=[ftk.DynamicSparsity(grow="momentum")])


def test_cosine_needs_known_length(fashion_mnist_small):
    (x, y), _ = fashion_mnist_small
    model = _compile(_sparse_lenet(0.9))
    ds = tf.data.Dataset.from_tensor_slices((x[:128], y[:128])).batch(32).repeat()
    ds = ds.apply(tf.data.experimental.assert_cardinality(tf.data.UNKNOWN_CARDINALITY))
    with pytest.raises(ValueError, match="end_step"):
        model.fit(ds, epochs=1, steps_per_epoch=None, verbose=0,
                  callbacks=[ftk.DynamicSparsity(decay="cosine")])


@pytest.mark.parametrize("grow, optimizer_state", [
    ("gradient", "masked"), ("random", "masked"), ("momentum", "masked"),
    ("gradient", "dense"), ("momentum", "dense")])
def test_mirrored_replicas_stay_identical(fashion_mnist_small, two_cpus, grow, optimizer_state):
    (x, y), _ = fashion_mnist_small
    with two_cpus.scope():
        model = _compile(_sparse_lenet(0.9, distribution="uniform"))
    initial = masked_state(model)
    callback = ftk.DynamicSparsity(update_every=3, drop_fraction=0.5, grow=grow, seed=2,
                                   optimizer_state=optimizer_state)
    model.fit(x[:768], y[:768], batch_size=64, epochs=1, verbose=0, callbacks=[callback])
    assert callback.updates and callback.updates[-1]["step"] == 9
    for layer in ftk.masked_layers(model):
        masks = [v.numpy() for v in layer.kernel_mask.value.values]
        kernels = [v.numpy() for v in layer.masked_kernel.value.values]
        assert len(masks) == 2
        np.testing.assert_array_equal(masks[0], masks[1])
        np.testing.assert_array_equal(kernels[0], kernels[1])
        assert masks[0].sum() == initial[layer.name][0].sum()
        assert (masks[0] != initial[layer.name][0]).any()
        assert not kernels[0][~masks[0]].any()
        for slot in _slots(model, layer):
            values = [v.numpy() for v in slot.value.values]
            np.testing.assert_array_equal(values[0], values[1])
            # masked state: zero off-mask; dense state: fed by the dense gradient
            assert values[0][~masks[0]].any() == (optimizer_state == "dense")


class _Crash(keras.callbacks.Callback):
    def __init__(self, at_step):
        super().__init__()
        self.at_step = at_step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.at_step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("grow", ["gradient", "momentum"])
def test_resume_with_backup_and_restore(fashion_mnist_small, tmp_path, grow):
    (x, y), _ = fashion_mnist_small
    tf_config.enable_op_determinism()
    try:
        def fresh():
            return _compile(_sparse_lenet(0.9, seed=7, weight_seed=7))

        def callback():
            return ftk.DynamicSparsity(update_every=3, drop_fraction=0.5, grow=grow)

        fit_args = dict(x=x[:640], y=y[:640], batch_size=64, epochs=3, shuffle=False, verbose=0)
        reference = fresh()
        reference.fit(callbacks=[callback()], **fit_args)

        backup = str(tmp_path / "backup")
        interrupted = fresh()
        with pytest.raises(RuntimeError, match="simulated crash"):
            interrupted.fit(callbacks=[callback(), keras.callbacks.BackupAndRestore(backup),
                                       _Crash(at_step=16)], **fit_args)  # mid-epoch 2
        resumed = fresh()  # a new process would rebuild the model the same way
        resumed.fit(callbacks=[keras.callbacks.BackupAndRestore(backup), callback()], **fit_args)
        assert int(resumed.optimizer.iterations.numpy()) == 30
        want, got = masked_state(reference), masked_state(resumed)
        for name in want:
            np.testing.assert_array_equal(got[name][0], want[name][0])
            np.testing.assert_array_equal(got[name][1], want[name][1])
    finally:
        tf_config.disable_op_determinism()  # no public API to undo


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_fused_sgd_path_matches_keras_sgd(fashion_mnist_small, monkeypatch, momentum, nesterov):
    """Masked kernels under stock SGD use TF's fused kernels; results equal Keras's own SGD."""
    (x, y), _ = fashion_mnist_small

    def run():
        model = _compile(_sparse_lenet(0.9), keras.optimizers.SGD(0.05, momentum=momentum,
                                                                  nesterov=nesterov))
        model.fit(x[:384], y[:384], batch_size=64, epochs=1, shuffle=False, verbose=0,
                  callbacks=[ftk.DynamicSparsity(update_every=3, drop_fraction=0.5)])
        return masked_state(model), [v.numpy() for v in model.optimizer.variables]

    fused_state, fused_slots = run()
    from ft_keras import training as callbacks_lib  # pylint: disable=import-outside-toplevel

    monkeypatch.setattr(callbacks_lib._OptimizerHook, "_apply",  # pylint: disable=W0212
                        lambda self, g, v, lr: self.original(g, v, lr))
    keras_state, keras_slots = run()
    for name in fused_state:
        np.testing.assert_array_equal(fused_state[name][0], keras_state[name][0])
        np.testing.assert_allclose(fused_state[name][1], keras_state[name][1], atol=1e-6)
    for a, b in zip(fused_slots, keras_slots):
        np.testing.assert_allclose(a, b, atol=1e-6)


class _TraceCounter(keras.callbacks.Callback):
    def __init__(self, sparsity_callback):
        super().__init__()
        self.sparsity_callback = sparsity_callback
        self.counts = []

    def on_epoch_end(self, epoch, logs=None):
        self.counts.append(self.sparsity_callback.trace_count)


@pytest.mark.parametrize("spe", [1, 4])
def test_train_function_traced_once_per_fit(fashion_mnist_small, spe):
    (x, y), _ = fashion_mnist_small
    model = _compile(_sparse_lenet(0.9), steps_per_execution=spe)
    callback = ftk.DynamicSparsity(update_every=5, drop_fraction=0.5)
    counter = _TraceCounter(callback)
    model.fit(x[:704], y[:704], batch_size=64, epochs=4, verbose=0, callbacks=[callback, counter])
    assert len(callback.updates) == 4  # updates ran in every epoch ...
    assert counter.counts[0] == 1
    assert counter.counts == [counter.counts[0]] * 4  # ... without a retrace after epoch 1


@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_mixed_bfloat16_keeps_masks_exact(fashion_mnist_small, grow):
    (x, y), _ = fashion_mnist_small
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = _compile(_sparse_lenet(0.9), keras.optimizers.Adam(1e-3))
        counts = {k: v[0].sum() for k, v in masked_state(model).items()}
        callback = ftk.DynamicSparsity(update_every=3, drop_fraction=0.5, grow=grow)
        model.fit(x[:512], y[:512], batch_size=64, epochs=1, verbose=0, callbacks=[callback])
        assert callback.updates
        for layer in ftk.masked_layers(model):
            assert layer.compute_dtype == "bfloat16" and layer.masked_kernel.dtype == "float32"
            mask = layer.kernel_mask.numpy()
            assert mask.dtype == bool and mask.sum() == counts[layer.name]
            assert not layer.masked_kernel.numpy()[~mask].any()
            for slot in _slots(model, layer):
                assert not slot.numpy()[~mask].any()
    finally:
        keras.mixed_precision.set_global_policy("float32")


if __name__ == "__main__":  # bazel test / python tests/test_callbacks.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))


# ------------------------------------------------------------------------- trace once
class _TrainFunctionProbe(keras.callbacks.Callback):
    """Records the model's train function (and its trace count) at each epoch end."""

    def __init__(self, sparsity_callback=None):
        super().__init__()
        self.sparsity_callback = sparsity_callback
        self.functions = []
        self.trace_counts = []

    def on_epoch_end(self, epoch, logs=None):
        self.functions.append(self.model.train_function)
        if self.sparsity_callback is not None:
            self.trace_counts.append(self.sparsity_callback.trace_count)


def test_a_second_fit_reuses_the_traced_train_function(fashion_mnist_small):
    (x, y), _ = fashion_mnist_small
    model = _compile(_sparse_lenet(0.9))
    fit_args = dict(x=x[:256], y=y[:256], batch_size=64, shuffle=False, verbose=0)

    first = ftk.DynamicSparsity(update_every=2, decay="constant", drop_fraction=0.3)
    probe = _TrainFunctionProbe(first)
    model.fit(epochs=1, callbacks=[first, probe], **fit_args)
    traced = probe.functions[0]
    assert probe.trace_counts == [1]
    assert [u["step"] for u in first.updates] == [2]  # step 4 ends the fit (exclusive)

    # Another instance of the same kind, other numbers: same graph, new schedule values.
    second = ftk.DynamicSparsity(update_every=3, decay="constant", drop_fraction=0.5, seed=9)
    probe = _TrainFunctionProbe(second)
    model.fit(epochs=2, callbacks=[second, probe], **fit_args)
    assert probe.functions == [traced, traced] and probe.trace_counts == [0, 0]
    # clock = optimizer.iterations (4 at the start); this fit ends at step 12 (exclusive)
    assert [u["step"] for u in second.updates] == [6, 9]
    assert all(u["drop_fraction"] == pytest.approx(0.5) for u in second.updates)
    for layer in ftk.masked_layers(model):
        mask, kernel = masked_state(model)[layer.name]
        assert mask.sum() == layer.num_active and not kernel[~mask].any()

    # Another kind (random growth) traces its own function.
    third = ftk.DynamicSparsity(update_every=4, grow="random")
    probe = _TrainFunctionProbe(third)
    model.fit(epochs=1, callbacks=[third, probe], **fit_args)
    assert probe.functions[0] is not traced and probe.trace_counts == [1]

    # A plain fit gets Keras's own train function: no hook, the zeros train too.
    probe = _TrainFunctionProbe()
    model.fit(epochs=1, callbacks=[probe], **fit_args)
    assert probe.functions[0] is not traced
    mask, kernel = masked_state(model)[ftk.masked_layers(model)[0].name]
    assert kernel[~mask].any()

    # Recompiling makes a new train step: no reuse of the old one.
    _compile(model)
    fourth = ftk.DynamicSparsity(update_every=4, decay="constant", drop_fraction=0.3)
    probe = _TrainFunctionProbe(fourth)
    model.fit(epochs=1, callbacks=[fourth, probe], **fit_args)
    assert probe.functions[0] is not traced and probe.trace_counts == [1]


# ------------------------------------------------------------------ optimizer state modes
def _tiny_sparse(seed=0):
    keras.utils.set_random_seed(seed)
    base = keras.Sequential([keras.Input((12,)), keras.layers.Dense(8, name="a"),
                             keras.layers.Dense(3, name="b")])
    return ftk.sparsify(base, 0.5, distribution="uniform", seed=seed)


def _tiny_data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(32, 12)).astype("float32"), rng.integers(0, 3, 32)


@pytest.mark.parametrize("optimizer_state", ["masked", "dense"])
def test_sgd_momentum_recurrence_by_hand(optimizer_state):
    """One full batch per step: the momentum slot and the kernel follow the hand recurrence.

    "masked": m = 0.9 m - 0.1 where(mask, g, 0); "dense": m = 0.9 m - 0.1 g (the dense
    gradient); both: w = where(mask, w + m, 0). No mask update happens (update_every=100).
    """
    x, y = _tiny_data()
    model = _tiny_sparse()
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), _loss(), jit_compile=False)
    layers = ftk.masked_layers(model)
    expected_m = {layer.name: np.zeros(layer.masked_kernel.shape, "float32") for layer in layers}
    for _ in range(4):
        with tf.GradientTape() as tape:
            loss = _loss()(y, model(x, training=True))
        grads = tape.gradient(loss, [layer.masked_kernel for layer in layers])
        expected_w = {}
        for layer, g in zip(layers, grads):
            mask = layer.kernel_mask.numpy()
            g = g.numpy() if optimizer_state == "dense" else np.where(mask, g.numpy(), 0.0)
            expected_m[layer.name] = 0.9 * expected_m[layer.name] - 0.1 * g
            expected_w[layer.name] = np.where(mask, layer.masked_kernel.numpy()
                                              + expected_m[layer.name], 0.0)
        model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[
            ftk.DynamicSparsity(update_every=100, optimizer_state=optimizer_state)])
        for layer in layers:
            momentum = _slots(model, layer)[0].numpy()
            np.testing.assert_allclose(momentum, expected_m[layer.name], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(layer.masked_kernel.numpy(), expected_w[layer.name],
                                       rtol=1e-5, atol=1e-6)
            off = ~layer.kernel_mask.numpy()
            assert not layer.masked_kernel.numpy()[off].any()
            if optimizer_state == "masked":
                assert not momentum[off].any()
            else:
                assert momentum[off].any()  # fed by the dense gradient


@pytest.mark.parametrize("grow", ["gradient", "random", "momentum"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_dense_optimizer_state_mode_keeps_masks_exact(fashion_mnist_small, grow, optimizer):
    """optimizer_state="dense": exact counts, zero weights off-mask and at grown positions,
    optimizer state dense and never reset."""
    (x, y), _ = fashion_mnist_small
    opt = (keras.optimizers.SGD(0.05, momentum=0.9) if optimizer == "sgd"
           else keras.optimizers.Adam(1e-3))
    model = _compile(_sparse_lenet(0.9), opt)

    class Check(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.before = masked_state(self.model)
            self.slots = {layer.name: [s.numpy() for s in _slots(self.model, layer)]
                          for layer in ftk.masked_layers(self.model)}

        def on_train_batch_end(self, batch, logs=None):
            after = masked_state(self.model)
            for layer in ftk.masked_layers(self.model):
                old_mask = self.before[layer.name][0]
                mask, kernel = after[layer.name]
                assert mask.sum() == old_mask.sum() == layer.num_active
                assert not kernel[~mask].any()
                grown = mask & ~old_mask
                assert not kernel[grown].any()
                if grown.any():  # the update did not reset the state at grown positions
                    first_slot = _slots(self.model, layer)[0].numpy()
                    assert np.abs(first_slot[grown]).max() > 0

    callback = ftk.DynamicSparsity(update_every=3, drop_fraction=0.5, grow=grow,
                                   optimizer_state="dense")
    model.fit(x[:384], y[:384], batch_size=64, epochs=1, shuffle=False, verbose=0,
              callbacks=[callback, Check()])
    assert [u["step"] for u in callback.updates] == [3] or len(callback.updates) >= 1
    churn = [v["mask_churn"] for u in callback.updates for v in u["layers"].values()]
    assert max(churn) > 0


# -------------------------------------------------------------------------- non-finite
def test_diverging_learning_rate_stops_training_naming_the_step(fashion_mnist_small):
    (x, y), _ = fashion_mnist_small
    model = _compile(_sparse_lenet(0.8), keras.optimizers.SGD(1e12, momentum=0.9))
    with pytest.raises(FloatingPointError, match=r"loss became non-finite .* at or before step \d+"):
        model.fit(x[:512], y[:512], batch_size=64, epochs=2, verbose=0,
                  callbacks=[ftk.DynamicSparsity(update_every=4)])


@keras.saving.register_keras_serializable(package="ft_keras_tests")
class _NanToZeroRelu(keras.layers.Layer):
    def call(self, inputs):
        return tf.where(tf.math.is_nan(inputs), tf.zeros_like(inputs), tf.nn.relu(inputs))


def _nan_hiding_model():
    """A sparse 784-64-10 MLP whose hidden activation maps NaN to 0 (as ReLU does on some CPUs
    and not on others): a NaN pixel then poisons fc1's kernel while the loss stays finite."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    hidden = keras.layers.Dense(64, name="fc1")(keras.layers.Flatten()(inputs))
    hidden = _NanToZeroRelu()(hidden)
    outputs = keras.layers.Dense(10, name="logits")(hidden)
    return ftk.sparsify(keras.Model(inputs, outputs), 0.8, distribution="uniform", seed=0)


def test_nan_input_example_stops_training(fashion_mnist_small, tmp_path):
    """A NaN pixel poisons one row of fc1 while the loss stays finite (ReLU maps NaN to 0):
    caught at the epoch end with fixed masks, at the next mask update with DST."""
    (x, y), _ = fashion_mnist_small
    x = np.array(x[:256])
    x[70, 3, 3, 0] = np.nan  # in the second batch of 64
    model = _compile(_nan_hiding_model())
    with pytest.raises(FloatingPointError, match=r"'fc1/kernel' holds NaN or Inf at the end "
                                                 r"of epoch 0 \(step 4\)"):
        model.fit(x, y[:256], batch_size=64, epochs=2, shuffle=False, verbose=0,
                  callbacks=[ftk.StaticSparsity()])
    model = _compile(_nan_hiding_model())
    with pytest.raises(FloatingPointError, match=r"fc1 holds \d+ NaN or Inf weights after the "
                                                 r"mask update of step 3"):
        model.fit(x, y[:256], batch_size=64, epochs=2, shuffle=False, verbose=0,
                  callbacks=[ftk.DynamicSparsity(update_every=3, log_dir=str(tmp_path))])


def test_non_finite_weights_are_caught_at_the_epoch_end(fashion_mnist_small):
    (x, y), _ = fashion_mnist_small
    model = _compile(_sparse_lenet(0.8))

    class Poison(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            bias = self.model.layers[-1].bias
            bias.assign(np.full(bias.shape, np.inf, "float32"))

    with pytest.raises(FloatingPointError, match=r"weight '.*bias' holds NaN or Inf .* epoch 0"):
        model.fit(x[:128], y[:128], batch_size=64, epochs=2, verbose=0,
                  callbacks=[Poison(), ftk.StaticSparsity()])


# ------------------------------------------------------------------------- user layers
@keras.saving.register_keras_serializable(package="ft_keras_tests")
class Bilinear(keras.layers.Layer):
    """A user's kernel layer: y = x @ w (the kernel is called ``w``)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], self.units), name="w",
                                 initializer="glorot_uniform")

    def call(self, inputs):
        return inputs @ self.w

    def get_config(self):
        return {**super().get_config(), "units": self.units}


MaskedBilinear = ftk.layers.register_maskable(Bilinear, kernel_attribute="w")


def test_user_layer_registered_as_maskable_trains_sparse(tmp_path):
    x, y = _tiny_data()
    keras.utils.set_random_seed(1)
    base = keras.Sequential([keras.Input((12,)), Bilinear(40, name="bil"),
                             keras.layers.Dense(3, name="out")])
    sparse = ftk.sparsify(base, 0.8, distribution="uniform", seed=1)
    layer = sparse.get_layer("bil")
    assert isinstance(layer, MaskedBilinear) and layer.masked_kernel is layer.w
    assert layer.num_active == round(0.2 * 12 * 40)
    _compile(sparse)
    callback = ftk.DynamicSparsity(update_every=2, drop_fraction=0.5, grow="gradient")
    sparse.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
    assert [u["step"] for u in callback.updates] == [4, 6]  # the last update of each epoch
    mask = layer.kernel_mask.numpy()
    assert mask.sum() == round(0.2 * 12 * 40) and not layer.w.numpy()[~mask].any()
    path = str(tmp_path / "user.keras")
    sparse.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.get_layer("bil").kernel_mask.numpy(), mask)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), sparse.predict(x, verbose=0))
    plain = ftk.strip(sparse)
    assert type(plain.get_layer("bil")) is Bilinear
    np.testing.assert_allclose(plain.predict(x, verbose=0), sparse.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)


def test_register_maskable_refuses_bad_classes():
    with pytest.raises(TypeError, match="layer_class"):
        ftk.layers.register_maskable(int)
    with pytest.raises(ValueError, match="already a masked layer"):
        ftk.layers.register_maskable(ftk.layers.MaskedDense)
    with pytest.raises(TypeError, match="masked_class"):
        ftk.layers.register_maskable(Bilinear, masked_class=ftk.layers.MaskedDense)
    with pytest.raises(ValueError, match="Dense is maskable already"):
        ftk.layers.register_maskable(keras.layers.Dense)
    assert ftk.layers.MASKED_CLASSES[keras.layers.Dense] is ftk.layers.MaskedDense


def test_unknown_optimizer_is_refused_with_a_way_out(fashion_mnist_small):
    (x, y), _ = fashion_mnist_small

    class MySGD(keras.optimizers.Optimizer):
        def update_step(self, gradient, variable, learning_rate):
            variable.assign_sub(gradient * learning_rate)

    model = _compile(_sparse_lenet(0.9), MySGD(0.01))
    with pytest.raises(ValueError, match="MySGD is unknown.*register_optimizer_slots"):
        model.fit(x[:64], y[:64], batch_size=64, epochs=1, verbose=0,
                  callbacks=[ftk.DynamicSparsity(update_every=4)])
    ftk.training.register_optimizer_slots(MySGD, ())
    model = _compile(_sparse_lenet(0.9), MySGD(0.01))
    model.fit(x[:64], y[:64], batch_size=64, epochs=1, verbose=0,
              callbacks=[ftk.DynamicSparsity(update_every=4)])
    # optimizer_state="dense" needs no slot list at all
    model = _compile(_sparse_lenet(0.9), keras.optimizers.Muon(0.01))
    model.fit(x[:64], y[:64], batch_size=64, epochs=1, verbose=0,
              callbacks=[ftk.DynamicSparsity(update_every=4, optimizer_state="dense")])
    for layer in ftk.masked_layers(model):
        mask, kernel = masked_state(model)[layer.name]
        assert not kernel[~mask].any()


def test_grown_weight_scale_starts_grown_weights_at_random_values(fashion_mnist_small):
    (x, y), _ = fashion_mnist_small
    model = _compile(_sparse_lenet(0.9), keras.optimizers.SGD(0.0))  # lr 0: only the update moves
    layer = ftk.masked_layers(model)[0]
    before_mask = layer.kernel_mask.numpy()
    before_kernel = layer.masked_kernel.numpy()
    callback = ftk.DynamicSparsity(update_every=2, drop_fraction=0.5, grow="random",
                                   grown_weight_scale=0.5, end_step=3)
    model.fit(x[:128], y[:128], batch_size=64, epochs=1, shuffle=False, verbose=0,
              callbacks=[callback])
    mask, kernel = layer.kernel_mask.numpy(), layer.masked_kernel.numpy()
    grown = mask & ~before_mask
    kept = mask & before_mask
    assert mask.sum() == before_mask.sum() and grown.sum() > 100
    assert not kernel[~mask].any() and np.all(kernel[grown] != 0)
    changed = kernel[kept] != before_kernel[kept]  # pruned and regrown (smallest |w|)
    assert changed.mean() < 0.01
    assert np.abs(before_kernel[kept][changed]).max() <= np.median(np.abs(before_kernel[kept]))
    fan_in, fan_out = layer.masked_kernel.shape
    assert ftk.training.glorot_std((fan_in, fan_out)) == pytest.approx(
        np.sqrt(2.0 / (fan_in + fan_out)))
    assert np.std(kernel[grown]) == pytest.approx(
        0.5 * np.sqrt(2.0 / (fan_in + fan_out)), rel=0.15)
    assert ftk.training.glorot_std((3, 3, 4, 8)) == pytest.approx(np.sqrt(2.0 / (36 + 72)))
    with pytest.raises(ValueError, match="grown_weight_scale=-1"):
        ftk.DynamicSparsity(grown_weight_scale=-1.0)
