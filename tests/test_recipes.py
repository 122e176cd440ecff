"""The recipes of ft_keras.recipes on small synthetic data: tickets, seeds, selection and costs."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import ft_keras as ftk
from ft_keras import distribute
from ft_keras import flops
from ft_keras import schedules
from ft_keras.harness import recipes
from ft_keras.harness import training_cost

NUM_TRAIN, NUM_VAL, BATCH = 256, 64, 32
STEPS_PER_EPOCH = NUM_TRAIN // BATCH
SHAPES = {"fc1": (784, 16), "out": (16, 10)}


@pytest.fixture(scope="module")
def data():
    """256 training and 64 validation 28x28 images with a learnable label (brightest quadrant
    pair), floats in [0, 1]."""
    rng = np.random.default_rng(0)
    x = rng.random((NUM_TRAIN + NUM_VAL, 28, 28, 1)).astype("float32")
    y = (x[:, :14, :14, 0].mean(axis=(1, 2)) > x[:, 14:, 14:, 0].mean(axis=(1, 2))).astype(
        "int64") + 2 * (x[:, :14, 14:, 0].mean(axis=(1, 2)) > 0.5).astype("int64")
    return (x[:NUM_TRAIN], y[:NUM_TRAIN]), (x[NUM_TRAIN:], y[NUM_TRAIN:])


def _build():
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(16, activation="relu", name="fc1"),
        keras.layers.Dense(10, name="out"),
    ])


def _compile(model):
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)
    return model


class History(keras.callbacks.Callback):
    """Per fit: val accuracy, weights and learning rate at every epoch end."""

    def __init__(self):
        super().__init__()
        self.runs = []

    def on_train_begin(self, logs=None):
        self.runs.append({"val_accuracy": [], "weights": [], "lr": []})

    def on_epoch_end(self, epoch, logs=None):
        run = self.runs[-1]
        run["val_accuracy"].append(logs["val_accuracy"])
        run["weights"].append([np.array(w) for w in self.model.get_weights()])
        run["lr"].append(float(np.asarray(self.model.optimizer.learning_rate)))


def _common(data, tmp_path, name, **kwargs):
    (x, y), validation = data
    out = dict(validation_data=validation, ticket_dir=str(tmp_path / name), compile_fn=_compile,
               batch_size=BATCH, fit_kwargs=dict(verbose=0))
    out.update(kwargs)
    return (x, y), out


def _assert_ticket_is_best_epoch(path, run, member=None):
    model, meta = ftk.read_ticket(path)
    best = int(np.argmax(run["val_accuracy"]))
    assert meta["epoch"] == best
    assert meta["monitor_value"] == pytest.approx(run["val_accuracy"][best])
    for saved, recorded in zip(model.get_weights(), run["weights"][best]):
        np.testing.assert_array_equal(saved, recorded)
    if member is not None:
        assert meta["member"] == member
    return model, meta


def test_dense_and_deep_ensemble(data, tmp_path):
    train, kwargs = _common(data, tmp_path, "deep", seed=5, metadata={"dataset": "synthetic"})
    history = History()
    result = recipes.train_deep_ensemble(_build, 2, train, epochs=2, callbacks=[history],
                                         **kwargs)
    assert result.method == "deep_ensemble" and result.num_members == 2
    assert [os.path.basename(p) for p in result.tickets] == ["ticket_0", "ticket_1"]
    assert result.member_seeds == (5, 6)
    assert result.steps == 2 * 2 * STEPS_PER_EPOCH and result.reference_steps == 16
    dense_run = 3 * flops.forward_macs(_build()) * BATCH * 16
    assert result.member_training_macs == (dense_run, dense_run)
    assert result.dense_training_macs == dense_run and result.training_macs_relative == 2.0
    assert result.cumulative_training_macs == (dense_run, 2 * dense_run)
    assert len(result.fit_wall_time_s) == 2 and result.wall_time_s == pytest.approx(
        sum(result.fit_wall_time_s))
    for member, path in enumerate(result.tickets):
        _, meta = _assert_ticket_is_best_epoch(path, history.runs[member], member)
        assert meta["method"] == "deep_ensemble" and meta["seed"] == 5 + member
        assert meta["dataset"] == "synthetic" and meta["num_members"] == 2
        assert meta["density"] == 1.0
    json.dumps(result.as_dict())  # JSON-friendly

    # monitor=None: the ticket is the state after the last epoch
    history = History()
    dense = recipes.train_dense(_build, train, epochs=2, monitor=None, callbacks=[history],
                                **dict(kwargs, ticket_dir=str(tmp_path / "dense")))
    model, meta = ftk.read_ticket(dense.tickets[0])
    assert meta["method"] == "dense" and meta["epoch"] == 1 and meta["step"] == 16
    for saved, recorded in zip(model.get_weights(), history.runs[0]["weights"][-1]):
        np.testing.assert_array_equal(saved, recorded)
    assert dense.training_macs == dense_run and dense.member_seeds == (5,)


def test_dst_ensemble_members(data, tmp_path):
    train, kwargs = _common(data, tmp_path, "dst", seed=10)
    history = History()
    result = recipes.train_dst_ensemble(
        _build, 3, train, epochs=3, sparsity=0.8, callbacks=[history],
        dst_kwargs=dict(update_every=4, grow="random"), **kwargs)
    assert [os.path.basename(p) for p in result.tickets] == ["ticket_0", "ticket_1", "ticket_2"]
    counts = ftk.densities.active_counts(SHAPES, ftk.layer_densities(SHAPES, 0.8, "erk"))
    models = []
    for member, path in enumerate(result.tickets):
        model, meta = _assert_ticket_is_best_epoch(path, history.runs[member], member)
        models.append(model)
        assert meta["method"] == "dst_ensemble" and meta["seed"] == 10 + member
        assert meta["sparsity"] == 0.8 and meta["num_members"] == 3
        report = ftk.sparsity_report(model)
        assert {r.name: r.active for r in report.layers} == counts  # exact, after training
    masks = [ftk.masked_layers(m)[0].kernel_mask.numpy() for m in models]
    assert (masks[0] != masks[1]).any() and (masks[1] != masks[2]).any()
    # random growth: no dense gradient, 3 x sparse forward per example and step
    sparse = sum(counts.values())
    assert result.member_training_macs == (3 * sparse * BATCH * 24,) * 3
    assert result.dense_training_macs == 3 * (784 * 16 + 16 * 10) * BATCH * 24


def test_dst_ensemble_gradient_growth_cost(data, tmp_path):
    train, kwargs = _common(data, tmp_path, "rigl")
    result = recipes.train_dst_ensemble(_build, 1, train, epochs=2,
                                        dst_kwargs=dict(update_every=5), **kwargs)
    model, _ = ftk.read_ticket(result.tickets[0])
    assert result.training_macs == training_cost.training_macs(
        model, 16, BATCH, grow="gradient", update_steps=training_cost.dst_update_steps(16, 5))
    f_s, f_d = flops.forward_macs(model), flops.forward_macs(model, dense=True)
    assert result.training_macs == 3 * f_s * BATCH * 16 + 3 * (f_d - f_s) * BATCH  # 5, 10, 15


def test_static_sparse_ensemble_keeps_its_masks(data, tmp_path):
    train, kwargs = _common(data, tmp_path, "static", seed=3)
    result = recipes.train_static_sparse_ensemble(_build, 2, train, epochs=2, sparsity=0.9,
                                                  distribution="uniform", **kwargs)
    for member, path in enumerate(result.tickets):
        model, meta = ftk.read_ticket(path)
        assert meta["method"] == "static_sparse_ensemble" and meta["seed"] == 3 + member
        initial = ftk.sparsify(_build(), 0.9, distribution="uniform", seed=3 + member)
        for layer, first in zip(ftk.masked_layers(model), ftk.masked_layers(initial)):
            np.testing.assert_array_equal(layer.kernel_mask.numpy(), first.kernel_mask.numpy())
            assert not layer.masked_kernel.numpy()[~layer.kernel_mask.numpy()].any()
        assert result.member_training_macs[member] == 3 * flops.forward_macs(model) * BATCH * 16
    assert flops.forward_macs(model) == round(0.1 * 784 * 16) + round(0.1 * 160)


def test_edst_tickets_and_cumulative_cost(data, tmp_path):
    train, kwargs = _common(data, tmp_path, "edst", seed=4)
    history = History()
    result = recipes.train_edst(_build, 2, train, exploration_epochs=1, refine_epochs=2,
                                exploration_lr=0.01, refine_lr=(0.005, 0.001),
                                callbacks=[history], dst_kwargs=dict(update_every=4), **kwargs)
    run = history.runs[0]
    assert run["lr"] == pytest.approx([0.01, 0.005, 0.001, 0.005, 0.001])
    assert result.steps == result.reference_steps == 5 * STEPS_PER_EPOCH
    assert result.member_seeds == (4, 4)
    for i, path in enumerate(result.tickets):
        model, meta = ftk.read_ticket(path)
        window = [1 + 2 * i, 3 + 2 * i]
        best = window[0] + int(np.argmax(run["val_accuracy"][window[0]:window[1]]))
        assert meta["method"] == "edst" and meta["phase"] == i + 1 and meta["epoch"] == best
    # the tickets are complete at the ends of epochs 3 and 5; EDST's updates include the
    # global exploration at the first step of epoch 4
    updates = training_cost.edst_update_steps(1, 2, 2, STEPS_PER_EPOCH, 4)
    assert STEPS_PER_EPOCH * 3 + 1 in updates
    cumulative = training_cost.training_macs(model, 40, BATCH, grow="gradient",
                                             update_steps=updates,
                                             at=[3 * STEPS_PER_EPOCH, 5 * STEPS_PER_EPOCH])
    assert list(result.cumulative_training_macs) == cumulative
    assert result.dense_training_macs == 3 * flops.forward_macs(model, dense=True) * BATCH * 40
    with pytest.raises(ValueError, match="monitor=None"):
        recipes.train_edst(_build, 2, train, exploration_epochs=1, refine_epochs=1,
                           **dict(kwargs, monitor=None))


def test_checkpoint_ensemble_snapshots_one_run(data, tmp_path):
    train, kwargs = _common(data, tmp_path, "checkpoints", seed=4)
    history = History()
    names = []

    def callbacks(name):
        names.append(name)
        return [history]

    result = recipes.train_checkpoint_ensemble(
        _build, 2, train, exploration_epochs=1, refine_epochs=2, exploration_lr=0.01,
        refine_lr=(0.005, 0.001), callbacks=callbacks, dst_kwargs=dict(update_every=4),
        **kwargs)
    assert names == ["checkpoint_ensemble"] and len(history.runs) == 1  # ONE run
    run = history.runs[0]
    assert run["lr"] == pytest.approx([0.01, 0.005, 0.001, 0.005, 0.001])  # EDST's plan
    for i, path in enumerate(result.tickets):
        start = 1 + 2 * i
        best = start + int(np.argmax(run["val_accuracy"][start:start + 2]))
        model, meta = ftk.read_ticket(path)
        assert meta["method"] == "checkpoint_ensemble" and meta["phase"] == i + 1
        assert meta["epoch"] == best and meta["member"] == i
        for saved, recorded in zip(model.get_weights(), run["weights"][best]):
            np.testing.assert_array_equal(saved, recorded)
    cumulative = training_cost.training_macs(
        model, 40, BATCH, grow="gradient", update_steps=training_cost.dst_update_steps(40, 4),
        at=[3 * STEPS_PER_EPOCH, 5 * STEPS_PER_EPOCH])  # regular updates only, one run
    assert list(result.cumulative_training_macs) == cumulative

    # monitor=None: the last epoch of each window; no learning-rate control with
    # exploration_lr=None
    history = History()
    result = recipes.train_checkpoint_ensemble(
        _build, 2, train, exploration_epochs=0, refine_epochs=1, exploration_lr=None,
        callbacks=[history], **dict(kwargs, monitor=None, ticket_dir=str(tmp_path / "last")))
    assert history.runs[0]["lr"] == pytest.approx([3e-3, 3e-3])
    for i, path in enumerate(result.tickets):
        model, meta = ftk.read_ticket(path)
        assert meta["epoch"] == i and meta["step"] == (i + 1) * STEPS_PER_EPOCH
        for saved, recorded in zip(model.get_weights(), history.runs[0]["weights"][i]):
            np.testing.assert_array_equal(saved, recorded)


def test_pf_ensemble_shares_the_global_magnitude_mask(data, tmp_path):
    train, kwargs = _common(data, tmp_path, "pf", seed=7)
    seeds = []

    def train_data(seed):
        seeds.append(seed)
        return tf.data.Dataset.from_tensor_slices(train).shuffle(NUM_TRAIN, seed=seed).batch(
            BATCH, drop_remainder=True)

    result = recipes.train_pf_ensemble(
        _build, 2, train_data, dense_epochs=2, finetune_epochs=1, sparsity=0.8,
        dense_dir=str(tmp_path / "pf_dense"), finetune_compile_fn=recipes.make_compile_fn(
            "adam", 1e-3, jit_compile=False), **dict(kwargs, batch_size=None))
    assert seeds == [7, 8, 9] and result.member_seeds == (8, 9)
    assert result.extra["dense_ticket"] == str(tmp_path / "pf_dense" / "ticket_0")
    parent, meta = ftk.read_ticket(result.extra["dense_ticket"])
    assert meta["method"] == "pf_dense"
    kernels = {layer.name: layer.get_weights()[0] for layer in parent.layers
               if layer.get_weights()}
    expected = recipes.global_magnitude_masks(kernels, round(0.2 * (784 * 16 + 160)))
    members = [ftk.read_ticket(p)[0] for p in result.tickets]
    for member in members:
        masks = {layer.name: layer.kernel_mask.numpy() for layer in ftk.masked_layers(member)}
        assert sorted(masks) == sorted(expected)
        for name in masks:
            np.testing.assert_array_equal(masks[name], expected[name])
    assert any(not np.array_equal(a, b)
               for a, b in zip(members[0].get_weights(), members[1].get_weights()))
    f_s, f_d = flops.forward_macs(members[0]), 784 * 16 + 160
    assert f_s == round(0.2 * f_d)
    dense, finetune = 3 * f_d * BATCH * 16, 3 * f_s * BATCH * 8
    assert result.member_training_macs == (dense + finetune, finetune)
    assert result.reference_steps == 16 and result.dense_training_macs == dense
    assert len(result.fit_wall_time_s) == 3

    # without dense_dir the dense ticket is not kept
    result = recipes.train_pf_ensemble(_build, 1, train, dense_epochs=1, finetune_epochs=1,
                                       **dict(kwargs, ticket_dir=str(tmp_path / "pf2")))
    assert result.extra["dense_ticket"] is None


def test_global_magnitude_masks_exact():
    kernels = {"a": np.array([[0.5, -3.0], [1.0, 0.0]]), "b": np.array([2.0, -1.0, 0.1])}
    masks = recipes.global_magnitude_masks(kernels, 2)  # |-3.0| and |2.0|
    np.testing.assert_array_equal(masks["a"], [[False, True], [False, False]])
    np.testing.assert_array_equal(masks["b"], [True, False, False])
    # a tie at |1.0|: the earlier position (in kernels order) wins
    masks = recipes.global_magnitude_masks(kernels, 3)
    np.testing.assert_array_equal(masks["a"], [[False, True], [True, False]])
    np.testing.assert_array_equal(masks["b"], [True, False, False])
    masks = recipes.global_magnitude_masks(kernels, 4)
    assert masks["a"][1, 0] and masks["b"][1]
    assert sum(int(m.sum()) for m in recipes.global_magnitude_masks(kernels, 0).values()) == 0
    with pytest.raises(ValueError, match="num_active=8"):
        recipes.global_magnitude_masks(kernels, 8)


def test_prune_global_magnitude_counts_and_keep_dense():
    keras.utils.set_random_seed(0)
    dense = _build()
    sparse = recipes.prune_global_magnitude(dense, 0.9, keep_dense=("out",))
    assert [layer.name for layer in ftk.masked_layers(sparse)] == ["fc1"]
    assert int(ftk.masked_layers(sparse)[0].kernel_mask.numpy().sum()) == round(
        0.1 * (784 * 16 + 160)) - 160
    with pytest.raises(ValueError, match="keep_dense"):
        recipes.prune_global_magnitude(dense, 0.999, keep_dense=("out",))


def test_make_compile_fn():
    model = recipes.make_compile_fn("sgd", 0.1, "cosine", decay_steps=100, momentum=0.5,
                                    weight_decay=1e-4)(_build())
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    assert model.optimizer.momentum == 0.5
    schedule = recipes.learning_rate_schedule("step", 1.0, 8)
    assert [float(schedule(s)) for s in (0, 4, 5, 6, 7)] == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01])
    assert recipes.learning_rate_schedule("Constant", 0.5) == 0.5
    with pytest.raises(ValueError, match="optimizer='rmsprop'"):
        recipes.make_compile_fn("rmsprop")
    with pytest.raises(TypeError, match="decay_steps"):
        recipes.make_compile_fn("adam", 1e-3, "cosine")


def test_bad_arguments(data, tmp_path):
    (x, y), (xv, yv) = data
    common = dict(epochs=1, ticket_dir=str(tmp_path / "t"))
    cases = [
        (ValueError, "num_members=0",
         lambda: recipes.train_dst_ensemble(_build, 0, (x, y), validation_data=(xv, yv),
                                            **common)),
        (TypeError, "num_members",
         lambda: recipes.train_deep_ensemble(_build, 2.0, (x, y), validation_data=(xv, yv),
                                             **common)),
        (ValueError, "validation_data",
         lambda: recipes.train_dst_ensemble(_build, 2, (x, y), validation_data=None, **common)),
        (TypeError, "build_fn",
         lambda: recipes.train_dst_ensemble("lenet", 2, (x, y), validation_data=(xv, yv),
                                            **common)),
        (ValueError, "sparsity=1.0",
         lambda: recipes.train_static_sparse_ensemble(_build, 2, (x, y), sparsity=1.0,
                                                      validation_data=(xv, yv), **common)),
        (ValueError, "distribution='erkk'",
         lambda: recipes.train_dst_ensemble(_build, 2, (x, y), distribution="erkk",
                                            validation_data=(xv, yv), **common)),
        (ValueError, "fit_kwargs sets 'epochs'",
         lambda: recipes.train_dense(_build, (x, y), validation_data=(xv, yv),
                                     fit_kwargs={"epochs": 3}, **common)),
        (TypeError, "callbacks",
         lambda: recipes.train_dense(_build, (x, y), validation_data=(xv, yv),
                                     callbacks=["tb"], **common)),
        (TypeError, "seed",
         lambda: recipes.train_dense(_build, (x, y), validation_data=(xv, yv), seed=1.5,
                                     **common)),
        (ValueError, "refine_epochs=0",
         lambda: recipes.train_edst(_build, 2, (x, y), validation_data=(xv, yv),
                                    exploration_epochs=1, refine_epochs=0,
                                    ticket_dir=str(tmp_path / "e"))),
        (TypeError, "refine_lr",
         lambda: recipes.train_checkpoint_ensemble(
             _build, 2, (x, y), validation_data=(xv, yv), exploration_epochs=1,
             refine_epochs=1, refine_lr=0.1, ticket_dir=str(tmp_path / "c"))),
        (ValueError, "explore_fraction=0",
         lambda: recipes.train_edst(_build, 2, (x, y), validation_data=(xv, yv),
                                    exploration_epochs=1, refine_epochs=1, explore_fraction=0,
                                    ticket_dir=str(tmp_path / "e"))),
        (ValueError, "finetune_epochs=0",
         lambda: recipes.train_pf_ensemble(_build, 2, (x, y), validation_data=(xv, yv),
                                           dense_epochs=1, finetune_epochs=0,
                                           ticket_dir=str(tmp_path / "p"))),
    ]
    for error, pattern, call in cases:
        with pytest.raises(error, match=pattern):
            call()
    assert not os.path.exists(tmp_path / "t")  # refused before anything was written
    with pytest.raises(TypeError, match="train_data"):
        recipes.train_dense(_build, [1, 2, 3], validation_data=(xv, yv), **common)
    os.makedirs(tmp_path / "full" / "ticket_0")
    with open(tmp_path / "full" / "ticket_0" / "metadata.json", "w") as handle:
        handle.write("{}")
    with pytest.raises(ValueError, match="overwrite"):
        recipes.train_dense(_build, (x, y), validation_data=(xv, yv), epochs=1,
                            ticket_dir=str(tmp_path / "full"))


def test_recipes_install_the_multiworker_fix_only_under_a_multi_worker_strategy(
        data, tmp_path, monkeypatch):
    train, kwargs = _common(data, tmp_path, "mw")
    was_installed = distribute.multiworker_fix_installed()
    distribute.remove_multiworker_fix()
    try:
        # one device: the recipe leaves Keras alone (refused later, on its sparsity)
        with pytest.raises(ValueError, match="sparsity=2.0"):
            recipes.train_pf_ensemble(_build, 2, train, dense_epochs=1, finetune_epochs=1,
                                      sparsity=2.0, **kwargs)
        assert not distribute.multiworker_fix_installed()
        # a multi-worker strategy: the shared arguments are checked, the fix goes in, and PF
        # then refuses the strategy
        monkeypatch.setattr(distribute, "is_multi_worker", lambda strategy: True)
        with pytest.raises(ValueError, match="multi-worker"):
            recipes.train_pf_ensemble(_build, 2, train, dense_epochs=1, finetune_epochs=1,
                                      **kwargs)
        assert distribute.multiworker_fix_installed() == distribute.multiworker_fix_applies()
    finally:
        if was_installed:
            distribute.install_multiworker_fix()
        else:
            distribute.remove_multiworker_fix()


if __name__ == "__main__":  # bazel test / python tests/test_recipes.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))


def test_edst_tickets_carry_the_callers_metadata(data, tmp_path):
    train, kwargs = _common(data, tmp_path, "edst_meta", seed=1)
    result = recipes.train_edst(_build, 2, train, exploration_epochs=0, refine_epochs=1,
                                metadata={"dataset": "synthetic", "model": "mlp"}, **kwargs)
    for path in result.tickets:
        meta = ftk.tickets.read_metadata(path)
        assert (meta["dataset"], meta["model"], meta["method"]) == ("synthetic", "mlp", "edst")
        assert meta["sparsity"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="metadata"):
        ftk.FreeTickets(str(tmp_path / "u"), exploration_epochs=1, refine_epochs=1,
                        metadata={"phase": 3})
