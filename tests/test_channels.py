"""Channel-level DST (DynamicSparsity's channel_sparsity): schedule, counts, zeros, replicas."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tensorflow.python.framework import config as tf_config

import ft_keras as ftk
from ft_keras import channels

# Tiny MLP: groups a (16 channels, BN, consumer b) and b (12 channels, consumer out): 28.
_TOTAL = 28
# target_removed(t, 0, 10, 0.5, 28) by hand: s(t) = 0.5 * (1 - (1 - t / 10)^3), x 28, rounded.
#   t=2: 0.5 * 0.488 * 28 = 6.832 -> 7;  t=4: 0.5 * 0.784 * 28 = 10.976 -> 11;
#   t=6: 0.5 * 0.936 * 28 = 13.104 -> 13; t=8: 0.5 * 0.992 * 28 = 13.888 -> 14; t=10: 14.
_REMOVED_BY = {2: 7, 4: 11, 6: 13, 8: 14, 10: 14}


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _tiny(seed=0, b_scale=1.0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((10,)),
        keras.layers.Dense(16, activation="relu", bias_initializer="ones", name="a"),
        keras.layers.BatchNormalization(name="bn", beta_initializer="ones"),
        keras.layers.Dense(12, activation="relu", bias_initializer="ones", name="b"),
        keras.layers.Dense(3, name="out"),
    ])
    layer = model.get_layer("b")
    layer.set_weights([layer.get_weights()[0] * b_scale, layer.get_weights()[1]])
    return ftk.sparsify(model, 0.5, distribution="uniform", seed=seed)


def _data(n=64):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 10)).astype("float32"), rng.integers(0, 3, n)


def _compile(model, optimizer=None, **kwargs):
    kwargs.setdefault("jit_compile", False)
    model.compile(optimizer or keras.optimizers.SGD(0.05, momentum=0.9), _loss(), **kwargs)
    return model


def _alive(callback):
    """{producer name: bool vector of surviving channels} (first replica)."""
    result = {}
    for state in callback._engine.channel_groups:  # pylint: disable=protected-access
        value = state.alive.value
        if hasattr(value, "values"):
            value = value.values[0]
        result[state.group.name] = np.asarray(value.numpy()) > 0.5
    return result


def _np(variable):
    return keras.ops.convert_to_numpy(variable)


class _Checker(keras.callbacks.Callback):
    """After every step: channel counts, zeros downstream of removed channels, masks inside
    the allowed region with exact counts, survivors never coming back."""

    def __init__(self, callback, removed_by, budgets):
        super().__init__()
        self.callback = callback
        self.removed_by = removed_by  # {update step: channels removed in total}
        self.budgets = budgets
        self.previous = None
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        alive = _alive(self.callback)
        due = [t for t in self.removed_by if t <= step]
        removed = self.removed_by[max(due)] if due else 0
        assert sum(int(v.sum()) for v in alive.values()) == _TOTAL - removed, step
        if self.previous is not None:
            for name, live in alive.items():
                assert not (live & ~self.previous[name]).any()  # no channel comes back
        self.previous = alive
        model = self.model
        a, b, out, bn = (model.get_layer(n) for n in ("a", "b", "out", "bn"))
        dead_a, dead_b = ~alive["a"], ~alive["b"]
        assert not _np(a.masked_kernel)[:, dead_a].any() and not _np(a.bias)[dead_a].any()
        assert not _np(bn.beta)[dead_a].any() and not _np(bn.moving_mean)[dead_a].any()
        assert not _np(b.masked_kernel)[dead_a, :].any()
        assert not _np(b.masked_kernel)[:, dead_b].any() and not _np(b.bias)[dead_b].any()
        assert not _np(out.masked_kernel)[dead_b, :].any()
        regions = {
            "a": np.ones((10, 1), bool) & alive["a"][None, :],
            "b": alive["a"][:, None] & alive["b"][None, :],
            "out": np.broadcast_to(alive["b"][:, None], (12, 3)),
        }
        for name, region in regions.items():
            mask = _np(model.get_layer(name).kernel_mask)
            assert not (mask & ~region).any(), (name, step)
            assert mask.sum() == min(self.budgets[name], region.sum()), (name, step)
        self.seen.append({name: int(v.sum()) for name, v in alive.items()})


def test_cubic_ramp_by_hand():
    got = {t: channels.target_removed(t, 0, 10, 0.5, _TOTAL) for t in (0, 2, 4, 6, 8, 10, 12)}
    assert got == {0: 0, **_REMOVED_BY, 12: 14}
    tensor = [int(channels.target_removed(tf.constant(t, tf.int64), 0, 10, 0.5, _TOTAL))
              for t in (2, 4, 6, 8, 10)]
    assert tensor == [7, 11, 13, 14, 14]
    assert channels.protected_count(0.05, 16) == 1 and channels.protected_count(0.25, 12) == 3
    assert channels.protected_count(0.0, 5) == 1


def test_remove_channels_global_threshold_ties_and_protection():
    scores = [tf.constant([0.5, 0.1, 0.1, 0.9]), tf.constant([0.05, 0.2, 0.05])]
    alive = [tf.constant([True, True, True, True]), tf.constant([True, True, False])]
    # layer 1: protect 1 (0.2 wins over the dead 0.05); layer 0: protect 1 (0.9).
    got = channels.remove_channels(scores, alive, [1, 1], 3)
    # candidates by score: l1[0]=0.05, l0[1]=0.1, l0[2]=0.1 (tie: lower index first), l0[0]=0.5
    assert [g.numpy().tolist() for g in got] == [[True, False, False, True],
                                                 [False, True, False]]
    more = channels.remove_channels(scores, alive, [1, 1], 10)  # clipped to the candidates
    assert [m.numpy().tolist() for m in more] == [[False, False, False, True],
                                                  [False, True, False]]


def test_update_mask_in_region_by_hand():
    mask = tf.constant([[True, True, False, False],
                        [True, False, True, False],
                        [False, False, False, True]])
    weights = tf.constant([[0.9, 0.1, 0.0, 0.0],
                           [0.5, 0.0, 0.7, 0.0],
                           [0.0, 0.0, 0.0, 0.3]])
    scores = tf.constant([[0.0, 0.0, 0.8, 0.6],
                          [0.0, 0.9, 0.0, 0.5],
                          [0.4, 0.2, 0.1, 0.0]])
    allowed = tf.constant([[True, True, True, False]] * 3)  # column 3 removed
    # (2, 3) leaves the region; the refill grows the best inside: (1, 1) 0.9. Then drop
    # ceil(0.2 * 5) = 1 by |w| among the 5 ((1, 1) at 0 goes) and grow 1: (1, 1) again.
    new, keep, count = ftk.masks.update_mask_in_region(mask, weights, scores, 0.2, 5, allowed)
    assert int(count) == 5
    np.testing.assert_array_equal(new.numpy(), [[True, True, False, False],
                                                [True, True, True, False],
                                                [False, False, False, False]])
    np.testing.assert_array_equal(keep.numpy(), mask.numpy() & allowed.numpy() & (
        weights.numpy() != 0))
    # a region smaller than the budget: dense inside it
    small = tf.constant([[True, False, False, False]] * 3)
    new, keep, count = ftk.masks.update_mask_in_region(mask, weights, scores, 0.5, 5, small)
    assert int(count) == 3
    np.testing.assert_array_equal(new.numpy(), small.numpy())


@pytest.mark.parametrize("grow, optimizer_state", [
    ("gradient", "masked"), ("random", "masked"), ("momentum", "masked"),
    ("gradient", "dense")])
def test_counts_zeros_and_regions_after_every_step(grow, optimizer_state):
    model = _compile(_tiny())
    budgets = {layer.name: layer.num_active for layer in ftk.masked_layers(model)}
    assert budgets == {"a": 80, "b": 96, "out": 18}  # round(0.5 * size)
    callback = ftk.DynamicSparsity(update_every=2, drop_fraction=0.3, grow=grow,
                                   optimizer_state=optimizer_state, channel_sparsity=0.5,
                                   channel_end_step=10, channel_min_keep=0.05)
    checker = _Checker(callback, _REMOVED_BY, budgets)
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[callback, checker])
    assert len(checker.seen) == 16
    assert [u["step"] for u in callback.updates] == [8, 14]
    assert sum(callback.updates[-1]["channels"].values()) == _TOTAL - 14
    # the budget of `a` fits its region (10 rows x >= 5 channels); b and out became dense
    # inside theirs when their region got smaller than their budget
    assert ftk.masked_layers(model)[0].num_active == 80
    compacted = ftk.compact(model)
    kept = {name: int(v.sum()) for name, v in _alive(callback).items()}
    assert compacted.get_layer("a").units == kept["a"]
    assert compacted.get_layer("b").units == kept["b"]
    for training in (False, True):  # BN in both modes: removed channels are exactly zero
        np.testing.assert_allclose(np.asarray(compacted(x, training=training)),
                                   np.asarray(model(x, training=training)), rtol=1e-5,
                                   atol=1e-5)
    report = {row.name: row.channels for row in ftk.sparsity_report(model).layers}
    assert report["a"] == (kept["a"], 16) and report["b"] == (kept["b"], 12)


def test_per_layer_minimum_is_respected():
    """`b`'s channels score far below `a`'s: the global threshold would take them all, the
    minimum keeps ceil(0.25 * 12) = 3 of them; the rest of the 14 come from `a`."""
    model = _compile(_tiny(b_scale=1e-4), keras.optimizers.SGD(1e-4))
    callback = ftk.DynamicSparsity(update_every=2, drop_fraction=0.3, channel_sparsity=0.5,
                                   channel_end_step=10, channel_min_keep=0.25)
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
    assert {k: int(v.sum()) for k, v in _alive(callback).items()} == {"a": 11, "b": 3}


def test_layerwise_allocation_removes_each_layers_own_fraction():
    """`b`'s channels score far below `a`'s (a global threshold would take b's first); with
    "layerwise" each layer follows its own ramp: by hand, 0.5 * (1 - (1 - t / 10)^3) x 16 / x 12
    rounded: t=2: 3.904 -> 4, 2.928 -> 3; t=4: 6.272 -> 6, 4.704 -> 5; t=6: 7.488 -> 7,
    5.616 -> 6; t=8: 7.936 -> 8, 5.952 -> 6; t=10: 8, 6 (totals 7, 11, 13, 14, 14 as globally)."""
    by_hand = {2: (4, 3), 4: (6, 5), 6: (7, 6), 8: (8, 6), 10: (8, 6)}
    model = _compile(_tiny(b_scale=1e-4), keras.optimizers.SGD(1e-4))
    budgets = {layer.name: layer.num_active for layer in ftk.masked_layers(model)}
    callback = ftk.DynamicSparsity(update_every=2, drop_fraction=0.3, channel_sparsity=0.5,
                                   channel_end_step=10, channel_allocation="layerwise")
    checker = _Checker(callback, _REMOVED_BY, budgets)
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[callback, checker])
    for step, seen in enumerate(checker.seen, start=1):
        due = [t for t in by_hand if t <= step]
        removed = by_hand[max(due)] if due else (0, 0)
        assert seen == {"a": 16 - removed[0], "b": 12 - removed[1]}, step
    global_ = _compile(_tiny(b_scale=1e-4), keras.optimizers.SGD(1e-4))
    other = ftk.DynamicSparsity(update_every=2, drop_fraction=0.3, channel_sparsity=0.5,
                                channel_end_step=10)
    global_.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[other])
    # globally: b loses all but its protected channel (11), a the other 3 of the 14
    assert {k: int(v.sum()) for k, v in _alive(other).items()} == {"a": 13, "b": 1}


def test_layerwise_target_must_be_reachable_in_every_layer():
    """At 0.8 a 2-unit layer would lose floor(1.6 + 0.5) = 2 units; the minimum keeps 1."""
    keras.utils.set_random_seed(0)
    model = ftk.sparsify(keras.Sequential([
        keras.Input((10,)), keras.layers.Dense(16, activation="relu", name="a"),
        keras.layers.Dense(2, activation="relu", name="b"), keras.layers.Dense(3, name="out"),
    ]), 0.5, distribution="uniform")
    x, y = _data(32)
    fit = dict(x=x, y=y, batch_size=8, epochs=1, verbose=0)
    _compile(model).fit(callbacks=[ftk.DynamicSparsity(  # globally: 14 of 18, 16 removable
        channel_sparsity=0.8, channel_end_step=2, update_every=1)], **fit)
    with pytest.raises(ValueError, match=r"removes 2 of the 2 prunable channels of \[\('b', 2\)"):
        _compile(model).fit(callbacks=[ftk.DynamicSparsity(
            channel_sparsity=0.8, channel_allocation="layerwise")], **fit)


def _traced(function, seen=None):
    """The tf.functions reachable from Keras's train function (through closures)."""
    seen = set() if seen is None else seen
    if id(function) in seen:
        return []
    seen.add(id(function))
    if hasattr(function, "_list_all_concrete_functions"):
        return [function]
    found = []
    for cell in getattr(function, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        if callable(value):
            found += _traced(value, seen)
    return found


def _graph_ops(function):
    ops = set()
    traced = _traced(function)
    assert traced
    for fn in traced:
        for concrete in fn._list_all_concrete_functions():  # pylint: disable=protected-access
            graph_def = concrete.graph.as_graph_def()
            ops |= {node.op for node in graph_def.node}
            ops |= {node.op for f in graph_def.library.function for node in f.node_def}
    assert "MatMul" in ops  # the train step is in it
    return ops


@pytest.mark.parametrize("channel_sparsity", [0.0, 0.3])
def test_no_channel_code_without_channel_sparsity(channel_sparsity):
    model = _compile(_tiny())
    callback = ftk.DynamicSparsity(update_every=2, channel_sparsity=channel_sparsity)
    x, y = _data(32)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[callback])
    (config, *_), function = callback._engine.train_functions[-1]  # pylint: disable=W0212
    has_channels = channel_sparsity > 0
    assert bool(config.channels) is has_channels
    assert any("ftk_channels" in v.path for v in model.optimizer.variables) is has_channels
    assert ("InvertPermutation" in _graph_ops(function)) is has_channels


def test_resume_with_backup_and_restore_is_exact(tmp_path):
    tf_config.enable_op_determinism()
    try:
        x, y = _data()

        def callback():
            return ftk.DynamicSparsity(update_every=2, drop_fraction=0.3, channel_sparsity=0.5,
                                       channel_end_step=20)

        fit_args = dict(x=x, y=y, batch_size=8, epochs=3, shuffle=False, verbose=0)
        reference = _compile(_tiny())
        reference_cb = callback()
        reference.fit(callbacks=[reference_cb], **fit_args)

        class Crash(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if int(self.model.optimizer.iterations.numpy()) == 13:
                    raise RuntimeError("simulated crash")

        backup = str(tmp_path / "backup")
        with pytest.raises(RuntimeError, match="simulated crash"):
            _compile(_tiny()).fit(callbacks=[callback(), keras.callbacks.BackupAndRestore(backup),
                                             Crash()], **fit_args)
        resumed = _compile(_tiny())
        resumed_cb = callback()
        resumed.fit(callbacks=[keras.callbacks.BackupAndRestore(backup), resumed_cb], **fit_args)
        assert int(resumed.optimizer.iterations.numpy()) == 24
        want, got = _alive(reference_cb), _alive(resumed_cb)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
        for w_ref, w_res in zip(reference.weights, resumed.weights):
            np.testing.assert_array_equal(_np(w_res), _np(w_ref))
    finally:
        tf_config.disable_op_determinism()


def test_mirrored_replicas_stay_identical(two_cpus):
    with two_cpus.scope():
        model = _compile(_tiny())
    callback = ftk.DynamicSparsity(update_every=2, drop_fraction=0.3, channel_sparsity=0.5,
                                   channel_end_step=10)
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
    states = callback._engine.channel_groups  # pylint: disable=protected-access
    for state in states:
        values = [v.numpy() for v in state.alive.value.values]
        np.testing.assert_array_equal(values[0], values[1])
    assert sum(int(v.sum()) for v in _alive(callback).values()) == _TOTAL - 14
    for weight in model.trainable_weights + [l.kernel_mask for l in ftk.masked_layers(model)]:
        values = [v.numpy() for v in weight.value.values]
        np.testing.assert_array_equal(values[0], values[1])
    dead = ~_alive(callback)["a"]
    bn = model.get_layer("bn")
    for weight in (bn.beta, bn.moving_mean):  # BN statistics are per replica; dead ones zero
        assert not any(v.numpy()[dead].any() for v in weight.value.values)


def test_xla_on_one_replica_trains_as_without():
    x, y = _data()
    results = {}
    for jit_compile, spe in ((False, 1), (True, 4)):
        model = _compile(_tiny(), jit_compile=jit_compile, steps_per_execution=spe)
        callback = ftk.DynamicSparsity(update_every=2, drop_fraction=0.3, channel_sparsity=0.5,
                                       channel_end_step=10)
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
        assert callback._split is jit_compile  # pylint: disable=protected-access
        results[jit_compile] = (_alive(callback), model)
    (alive, plain), (xla_alive, xla) = results[False], results[True]
    for name in alive:
        np.testing.assert_array_equal(xla_alive[name], alive[name])
    for layer in ftk.masked_layers(plain):
        np.testing.assert_array_equal(_np(xla.get_layer(layer.name).kernel_mask),
                                      _np(layer.kernel_mask))
    for w, w_xla in zip(plain.weights, xla.weights):
        np.testing.assert_allclose(_np(w_xla), _np(w), rtol=0, atol=1e-5)


def test_mixed_float16_keeps_removed_channels_zero():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _compile(_tiny())
        callback = ftk.DynamicSparsity(update_every=2, drop_fraction=0.3, channel_sparsity=0.5,
                                       channel_end_step=10)
        budgets = {layer.name: layer.num_active for layer in ftk.masked_layers(model)}
        x, y = _data()
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                  callbacks=[callback, _Checker(callback, _REMOVED_BY, budgets)])
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_conv_model_and_compact():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(h)
    h = keras.layers.Conv2D(6, 1, activation="relu", name="c2")(h)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.Flatten(name="flat")(h)
    outputs = keras.layers.Dense(3, name="out")(h)
    model = ftk.sparsify(keras.Model(inputs, outputs), 0.5, distribution="uniform")
    _compile(model)
    callback = ftk.DynamicSparsity(update_every=2, channel_sparsity=0.4, channel_end_step=6)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(32, 6, 6, 2)).astype("float32"), rng.integers(0, 3, 32)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
    alive = _alive(callback)
    assert set(alive) == {"dw", "c2"}  # c1 feeds a depthwise layer; out is the model output
    assert sum(int(v.sum()) for v in alive.values()) == 22 - 9  # 16 + 6; 0.4 * 22 = 8.8
    dw = _np(model.get_layer("dw").masked_kernel).reshape(9, 16)
    assert not dw[:, ~alive["dw"]].any()
    out_rows = _np(model.get_layer("out").masked_kernel).reshape(9, 6, 3)
    assert not out_rows[:, ~alive["c2"], :].any()  # Flatten: row p * 6 + c
    compacted = ftk.compact(model)
    assert compacted.get_layer("c2").filters == int(alive["c2"].sum())
    np.testing.assert_allclose(np.asarray(compacted(x)), np.asarray(model(x)), rtol=1e-5,
                               atol=1e-5)


def test_plain_producer_loses_channels_and_stays_dense_inside():
    """A layer sparsify left dense (keep_dense, or density 1 under ERK) is a producer too: its
    kernel's removed columns and bias are exactly zero after every step (gradient masked,
    re-zeroed), its surviving columns stay dense, and compact slices them out."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, activation="relu", bias_initializer="ones", name="c1")(inputs)
    h = keras.layers.MaxPooling2D(name="pool")(h)
    h = keras.layers.Conv2D(6, 3, activation="relu", name="c2")(h)
    h = keras.layers.Flatten(name="flat")(h)
    outputs = keras.layers.Dense(3, name="out")(h)
    model = ftk.sparsify(keras.Model(inputs, outputs), 0.5, distribution="uniform",
                         keep_dense=("c1",))
    assert [layer.name for layer in ftk.masked_layers(model)] == ["c2", "out"]
    _compile(model)
    callback = ftk.DynamicSparsity(update_every=2, channel_sparsity=0.5, channel_end_step=6,
                                   channel_allocation="layerwise")

    class Zeros(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            dead = ~_alive(callback)["c1"]
            c1 = self.model.get_layer("c1")
            assert not _np(c1.kernel)[..., dead].any() and not _np(c1.bias)[dead].any()
            assert (_np(c1.kernel)[..., ~dead] != 0).all()  # dense inside

    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(32, 8, 8, 1)).astype("float32"), rng.integers(0, 3, 32)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[callback, Zeros()])
    alive = _alive(callback)
    # floor(0.5 * 8 + 0.5) = 4 of c1's 8, floor(0.5 * 6 + 0.5) = 3 of c2's 6
    assert {k: int(v.sum()) for k, v in alive.items()} == {"c1": 4, "c2": 3}
    c2 = _np(model.get_layer("c2").kernel_mask)
    assert not c2[:, :, ~alive["c1"], :].any() and not c2[..., ~alive["c2"]].any()
    compacted = ftk.compact(model)
    assert compacted.get_layer("c1").filters == 4
    assert compacted.get_layer("c2").filters <= 3  # (a survivor may have no active rows in out)
    np.testing.assert_allclose(np.asarray(compacted(x)), np.asarray(model(x)), rtol=1e-5,
                               atol=1e-5)


def test_free_tickets_share_their_removed_channels(tmp_path):
    x, y = _data()
    model = _compile(_tiny())
    callback = ftk.FreeTickets(str(tmp_path / "tickets"), num_tickets=2, exploration_epochs=1,
                               refine_epochs=1, update_every=2, channel_sparsity=0.5,
                               monitor="val_loss")
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[callback],
              validation_data=(x[:16], y[:16]))
    steps = [u["step"] for u in callback.updates]
    assert steps and all(sum(u["channels"].values()) == _TOTAL - 14 for u in callback.updates)
    removed = []
    for path in ftk.list_tickets(str(tmp_path / "tickets")):
        ticket, _ = ftk.read_ticket(path)
        report = {row.name: row.channels for row in ftk.sparsity_report(ticket).layers}
        assert report["a"][0] + report["b"][0] == _TOTAL - 14
        kernels = {n: _np(ticket.get_layer(n).masked_kernel) for n in ("a", "b")}
        removed.append((~kernels["a"].any(axis=0), ~kernels["b"].any(axis=0)))
        compacted = ftk.compact(ticket)  # a ticket read back from its .keras file
        assert compacted.get_layer("a").units == report["a"][0]
        np.testing.assert_allclose(np.asarray(compacted(x)), np.asarray(ticket(x)), rtol=1e-5,
                                   atol=1e-5)
    assert len(removed) == 2
    for first, second in zip(*removed):
        np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(channel_sparsity=1.0), ValueError, "channel_sparsity=1.0"),
    (dict(channel_sparsity=-0.1), ValueError, "channel_sparsity"),
    (dict(channel_sparsity="0.5"), TypeError, "channel_sparsity"),
    (dict(channel_min_keep=1.5), ValueError, "channel_min_keep=1.5"),
    (dict(channel_end_step=0), ValueError, "channel_end_step=0"),
    (dict(channel_allocation="uniform"), ValueError, "channel_allocation='uniform'.*layerwise"),
])
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ftk.DynamicSparsity(**kwargs)


def test_refused_at_fit_start():
    x, y = _data(32)
    fit = dict(x=x, y=y, batch_size=8, epochs=1, verbose=0)
    keras.utils.set_random_seed(0)
    lonely = ftk.sparsify(keras.Sequential([keras.Input((10,)), keras.layers.Dense(3)]), 0.5)
    with pytest.raises(ValueError, match="no.*model output"):
        _compile(lonely).fit(callbacks=[ftk.DynamicSparsity(channel_sparsity=0.5)], **fit)
    with pytest.raises(ValueError, match="channel_min_keep=0.9"):
        _compile(_tiny()).fit(callbacks=[ftk.DynamicSparsity(
            channel_sparsity=0.5, channel_min_keep=0.9)], **fit)
    with pytest.raises(ValueError, match=r"no mask update in \(0, 1\]"):
        _compile(_tiny()).fit(callbacks=[ftk.DynamicSparsity(
            update_every=2, channel_sparsity=0.5, channel_end_step=1)], **fit)


def test_free_tickets_needs_an_exploration_phase_for_channels(tmp_path):
    with pytest.raises(ValueError, match="exploration_epochs=0"):
        ftk.FreeTickets(str(tmp_path), exploration_epochs=0, refine_epochs=1,
                        channel_sparsity=0.5)


def test_xla_on_several_replicas_is_refused(two_cpus):
    with two_cpus.scope():
        model = _compile(_tiny(), jit_compile=True)
    x, y = _data(32)
    with pytest.raises(ValueError, match="jit_compile=True on several replicas"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                  callbacks=[ftk.DynamicSparsity(channel_sparsity=0.5)])

