"""EDST Ensemble end to end on a small slice of real Fashion-MNIST: phases, jumps, tickets."""

import itertools
import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from tensorflow.python.framework import config as tf_config

import ft_keras as ftk
from ft_keras import schedules
from tests.conftest import masked_state

EPOCH_STEPS = 32  # 2,048 images / batch 64


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    base = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu", name="fc1"),
            keras.layers.Dense(10, name="out"),
        ]
    )
    sparse = ftk.sparsify(base, 0.8, distribution="uniform", seed=seed)
    sparse.compile(
        keras.optimizers.SGD(0.1, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=False,
    )
    return sparse


class Recorder(keras.callbacks.Callback):
    """Masks after every step, weights and logs after every epoch, the learning rate per epoch."""

    def __init__(self):
        super().__init__()
        self.masks = {}
        self.epoch_weights = {}
        self.epoch_logs = {}
        self.lrs = {}

    def on_epoch_begin(self, epoch, logs=None):
        self.lrs[epoch] = float(self.model.optimizer.learning_rate)

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        self.masks[step] = masked_state(self.model)["fc1"]  # (mask, kernel)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_weights[epoch] = [np.array(w) for w in self.model.get_weights()]
        self.epoch_logs[epoch] = dict(logs)


@pytest.fixture(scope="module")
def edst_run(fashion_mnist_small, tmp_path_factory):
    (x, y), (xv, yv) = fashion_mnist_small
    ticket_dir = str(tmp_path_factory.mktemp("edst") / "tickets")
    model = _model()
    initial = {name: mask for name, (mask, _) in masked_state(model).items()}
    callback = ftk.FreeTickets(
        ticket_dir, num_tickets=3, exploration_epochs=1, refine_epochs=2, update_every=8,
        grow="gradient",
    )
    recorder = Recorder()
    model.fit(x, y, batch_size=64, epochs=7, validation_data=(xv, yv), shuffle=False, verbose=0,
              callbacks=[callback, recorder])
    return dict(model=model, callback=callback, recorder=recorder, ticket_dir=ticket_dir,
                initial=initial, xv=xv, yv=yv)


def test_tickets_written_with_metadata(edst_run):
    ticket_dir = edst_run["ticket_dir"]
    paths = ftk.list_tickets(ticket_dir)
    assert [os.path.basename(p) for p in paths] == ["ticket_0", "ticket_1", "ticket_2"]
    assert edst_run["callback"].tickets == paths
    assert not [n for n in os.listdir(ticket_dir) if n.startswith(".")]  # no leftovers
    for i, path in enumerate(paths):
        meta = json.load(open(os.path.join(path, "metadata.json")))
        assert meta["method"] == "edst" and meta["phase"] == i + 1
        assert meta["monitor"] == "val_accuracy"
        assert os.path.isdir(os.path.join(path, "saved_model", "1"))


def test_each_ticket_is_the_best_epoch_of_its_phase(edst_run):
    recorder = edst_run["recorder"]
    plan = schedules.edst_plan(1, 2, 3)
    for i, path in enumerate(ftk.list_tickets(edst_run["ticket_dir"])):
        phase = plan[i + 1]
        epochs = list(range(phase.start_epoch, phase.end_epoch))
        values = [recorder.epoch_logs[e]["val_accuracy"] for e in epochs]
        best_epoch = epochs[int(np.argmax(values))]  # first best wins ties
        model, meta = ftk.read_ticket(path)
        assert meta["epoch"] == best_epoch
        assert meta["step"] == (best_epoch + 1) * EPOCH_STEPS
        assert meta["monitor_value"] == pytest.approx(max(values))
        for saved, recorded in zip(model.get_weights(), recorder.epoch_weights[best_epoch]):
            np.testing.assert_array_equal(saved, recorded)
        # exactly the density of the run
        for layer in ftk.masked_layers(model):
            assert layer.num_active == edst_run["initial"][layer.name].sum()
            assert not layer.masked_kernel.numpy()[~layer.kernel_mask.numpy()].any()


def test_tickets_are_diverse(edst_run):
    xv, yv = edst_run["xv"], edst_run["yv"]
    models = [ftk.read_ticket(p)[0] for p in ftk.list_tickets(edst_run["ticket_dir"])]
    preds = [m.predict(xv, verbose=0).argmax(-1) for m in models]
    for a, b in itertools.combinations(range(3), 2):
        mask_a = ftk.masked_layers(models[a])[0].kernel_mask.numpy()
        mask_b = ftk.masked_layers(models[b])[0].kernel_mask.numpy()
        assert (mask_a != mask_b).sum() > 0, (a, b)
        assert (preds[a] != preds[b]).mean() > 0, (a, b)
    ensemble = ftk.Ensemble.from_directory(edst_run["ticket_dir"], combine="probs")
    accuracy = (ensemble.predict(xv, verbose=0).argmax(-1) == yv).mean()
    assert accuracy > 0.6  # it learned something on 2,048 images


def test_learning_rate_plan(edst_run):
    lrs = edst_run["recorder"].lrs
    expected = [0.1, 0.01, 0.001, 0.01, 0.001, 0.01, 0.001]
    assert [round(lrs[e], 6) for e in range(7)] == expected


def test_global_exploration_jumps(edst_run):
    masks = edst_run["recorder"].masks
    jumps = [e * EPOCH_STEPS + 1 for e in schedules.global_exploration_epochs(
        schedules.edst_plan(1, 2, 3))]
    assert jumps == [97, 161]
    n = int(edst_run["initial"]["fc1"].sum())
    total = 7 * EPOCH_STEPS
    for step in range(2, total + 1):
        (before, _), (after, kernel) = masks[step - 1], masks[step]
        assert after.sum() == n
        regrown = int((after & (kernel == 0)).sum())  # grown (or regrown) weights restart at 0
        if step in jumps:
            # global exploration: ceil(0.8 n) dropped by magnitude, as many grown by gradient
            assert regrown == ftk.masks.num_to_drop_py(0.8, n), step
            assert (before != after).any()
        elif step % 8 == 0 and step < total:
            p = schedules.drop_fraction(step, 0.5, "cosine", total, final=0.005)
            assert regrown == ftk.masks.num_to_drop_py(p, n), step
        else:
            np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(num_tickets=0, exploration_epochs=1, refine_epochs=1), "num_tickets"),
        (dict(exploration_epochs=-1, refine_epochs=1), "exploration_epochs"),
        (dict(exploration_epochs=1, refine_epochs=0), "refine_epochs"),
        (dict(exploration_epochs=1), "refine_epochs"),
        (dict(exploration_epochs=1, refine_epochs=1, explore_fraction=0.0), "explore_fraction"),
        (dict(exploration_epochs=1, refine_epochs=1, explore_fraction=1.2), "explore_fraction"),
        (dict(exploration_epochs=1, refine_epochs=1, refine_lr=(0.1,)), "refine_lr"),
        (dict(exploration_epochs=1, refine_epochs=1, mode="up"), "mode"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ftk.FreeTickets(str(tmp_path), **kwargs)


def test_fit_must_cover_the_plan(fashion_mnist_small, tmp_path):
    (x, y), (xv, yv) = fashion_mnist_small
    callback = ftk.FreeTickets(str(tmp_path / "t"), num_tickets=2, exploration_epochs=1,
                               refine_epochs=2)
    with pytest.raises(ValueError, match=r"fit\(epochs=4\) does not match the FreeTickets plan.*= 5 epochs\. Pass epochs=5"):
        _model().fit(x[:128], y[:128], epochs=4, validation_data=(xv, yv), verbose=0,
                     callbacks=[callback])


def test_monitor_needs_validation_data(fashion_mnist_small, tmp_path):
    (x, y), _ = fashion_mnist_small
    callback = ftk.FreeTickets(str(tmp_path / "t"), num_tickets=1, exploration_epochs=0,
                               refine_epochs=1)
    with pytest.raises(ValueError, match="val_accuracy"):
        _model().fit(x[:128], y[:128], epochs=1, verbose=0, callbacks=[callback])


def test_learning_rate_schedule_is_refused(fashion_mnist_small, tmp_path):
    (x, y), (xv, yv) = fashion_mnist_small
    model = _model()
    model.compile(keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.9)),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = ftk.FreeTickets(str(tmp_path / "t"), num_tickets=1, exploration_epochs=0,
                               refine_epochs=1)
    with pytest.raises(ValueError, match="learning rate"):
        model.fit(x[:128], y[:128], epochs=1, validation_data=(xv, yv), verbose=0,
                  callbacks=[callback])


def test_non_empty_ticket_dir_is_refused(fashion_mnist_small, tmp_path):
    (x, y), (xv, yv) = fashion_mnist_small
    ticket_dir = tmp_path / "t"
    (ticket_dir / "ticket_0").mkdir(parents=True)
    (ticket_dir / "ticket_0" / "metadata.json").write_text("{}")
    callback = ftk.FreeTickets(str(ticket_dir), num_tickets=1, exploration_epochs=0,
                               refine_epochs=1)
    with pytest.raises(ValueError, match="overwrite"):
        _model().fit(x[:128], y[:128], epochs=1, validation_data=(xv, yv), verbose=0,
                     callbacks=[callback])


def test_edst_under_mirrored_strategy(fashion_mnist_small, two_cpus, tmp_path):
    (x, y), (xv, yv) = fashion_mnist_small
    with two_cpus.scope():
        model = _model(seed=4)
    callback = ftk.FreeTickets(str(tmp_path / "t"), num_tickets=2, exploration_epochs=1,
                               refine_epochs=1, update_every=8, grow="gradient")
    model.fit(x[:1024], y[:1024], batch_size=64, epochs=3, validation_data=(xv, yv), verbose=0,
              callbacks=[callback])
    paths = ftk.list_tickets(str(tmp_path / "t"))
    assert len(paths) == 2
    for layer in ftk.masked_layers(model):
        replicas = [v.numpy() for v in layer.kernel_mask.value.values]
        kernels = [v.numpy() for v in layer.masked_kernel.value.values]
        np.testing.assert_array_equal(replicas[0], replicas[1])
        np.testing.assert_array_equal(kernels[0], kernels[1])
    last, _ = ftk.read_ticket(paths[-1])
    final = {layer.name: layer for layer in ftk.masked_layers(model)}
    for layer in ftk.masked_layers(last):  # the last phase has one epoch: its ticket = final state
        np.testing.assert_array_equal(layer.kernel_mask.numpy(),
                                      final[layer.name].kernel_mask.numpy())


class _Crash(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == 4 * EPOCH_STEPS + 10:
            raise RuntimeError("simulated crash")  # inside epoch 4: refinement phase 2


def test_resume_inside_a_phase_gives_the_same_tickets(fashion_mnist_small, tmp_path):
    (x, y), (xv, yv) = fashion_mnist_small
    tf_config.enable_op_determinism()
    try:
        fit_args = dict(x=x, y=y, batch_size=64, epochs=7, validation_data=(xv, yv),
                        shuffle=False, verbose=0)

        def callback(folder):
            return ftk.FreeTickets(str(tmp_path / folder), num_tickets=3, exploration_epochs=1,
                                   refine_epochs=2, update_every=8, grow="random", seed=3)

        _model().fit(callbacks=[callback("reference")], **fit_args)
        backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
        with pytest.raises(RuntimeError, match="simulated crash"):
            _model().fit(callbacks=[callback("resumed"), backup, _Crash()], **fit_args)
        assert [os.path.basename(p) for p in ftk.list_tickets(str(tmp_path / "resumed"))] == [
            "ticket_0"]
        recorder = Recorder()
        _model().fit(callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
                                callback("resumed"), recorder], **fit_args)
        assert sorted(recorder.lrs) == [4, 5, 6]  # resumed at epoch 4 ...
        assert [round(recorder.lrs[e], 6) for e in (4, 5, 6)] == [0.001, 0.01, 0.001]  # ... on plan
        want = ftk.list_tickets(str(tmp_path / "reference"))
        got = ftk.list_tickets(str(tmp_path / "resumed"))
        assert len(want) == len(got) == 3
        for a, b in zip(want, got):
            (model_a, meta_a), (model_b, meta_b) = ftk.read_ticket(a), ftk.read_ticket(b)
            assert (meta_a["epoch"], meta_a["step"]) == (meta_b["epoch"], meta_b["step"])
            for wa, wb in zip(model_a.get_weights(), model_b.get_weights()):
                np.testing.assert_array_equal(wa, wb)
    finally:
        tf_config.disable_op_determinism()


# ---------------------------------------------------------------------- crash recovery
class _CrashAtEpochEnd(keras.callbacks.Callback):
    """Raises at the end of ``epoch`` (placed between BackupAndRestore and FreeTickets: the
    epoch is saved as done, FreeTickets never sees it)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("simulated crash")


def _small_edst(folder, **kwargs):
    return ftk.FreeTickets(str(folder), num_tickets=2, exploration_epochs=1, refine_epochs=2,
                           update_every=4, grow="gradient", seed=1, **kwargs)


def _same_tickets(want_dir, got_dir):
    want, got = ftk.list_tickets(str(want_dir)), ftk.list_tickets(str(got_dir))
    assert [os.path.basename(p) for p in want] == [os.path.basename(p) for p in got]
    for a, b in zip(want, got):
        (model_a, meta_a), (model_b, meta_b) = ftk.read_ticket(a), ftk.read_ticket(b)
        assert (meta_a["epoch"], meta_a["step"], meta_a["monitor_value"]) == (
            meta_b["epoch"], meta_b["step"], meta_b["monitor_value"])
        for wa, wb in zip(model_a.get_weights(), model_b.get_weights()):
            np.testing.assert_array_equal(wa, wb)


@pytest.mark.parametrize("crash", ["between_callbacks", "during_ticket_write"])
def test_ticket_of_a_phase_that_ended_before_the_crash_is_written_on_resume(
        fashion_mnist_small, tmp_path, monkeypatch, crash):
    """[BackupAndRestore, FreeTickets] (the natural order): FreeTickets selects and writes a
    phase's ticket at the validation of its last epoch, before any on_epoch_end (where
    BackupAndRestore saves the epoch). A crash between the callbacks' on_epoch_end finds the
    ticket written; a crash during the ticket write finds the epoch not saved, and the resumed
    run re-runs it and writes the ticket from the progress file, which already holds it."""
    (x, y), (xv, yv) = fashion_mnist_small
    fit_args = dict(x=x[:512], y=y[:512], batch_size=64, epochs=5,
                    validation_data=(xv[:256], yv[:256]), shuffle=False, verbose=0)
    tf_config.enable_op_determinism()
    try:
        _model().fit(callbacks=[_small_edst(tmp_path / "reference")], **fit_args)
        backup = str(tmp_path / "backup")
        if crash == "between_callbacks":
            crash_callbacks = [_CrashAtEpochEnd(2)]
        else:
            real_write = ftk.tickets.write_ticket

            def failing_write(model, ticket_dir, index, *args, **kwargs):
                os.makedirs(os.path.join(ticket_dir, f".tmp-ticket_{index}-dead"))  # leftover
                raise RuntimeError("simulated crash")

            monkeypatch.setattr(ftk.tickets, "write_ticket", failing_write)
            crash_callbacks = []
        with pytest.raises(RuntimeError, match="simulated crash"):
            _model().fit(callbacks=[keras.callbacks.BackupAndRestore(backup), *crash_callbacks,
                                    _small_edst(tmp_path / "resumed")], **fit_args)
        if crash == "during_ticket_write":
            monkeypatch.setattr(ftk.tickets, "write_ticket", real_write)
            assert not os.path.exists(tmp_path / "resumed" / "ticket_0")
            assert os.path.exists(tmp_path / "resumed" / ".progress-0.npz")
        else:
            assert os.path.exists(tmp_path / "resumed" / "ticket_0")
        ftk.tickets.unlock_ticket_dir(str(tmp_path / "resumed"))  # the process did not end
        recorder = Recorder()
        _model().fit(callbacks=[keras.callbacks.BackupAndRestore(backup),
                                _small_edst(tmp_path / "resumed"), recorder], **fit_args)
        # resumed after phase 1 (crash after BackupAndRestore saved epoch 2), or at its last
        # epoch (the crash came before that epoch counted as done)
        assert sorted(recorder.lrs) == ([3, 4] if crash == "between_callbacks" else [2, 3, 4])
        _same_tickets(tmp_path / "reference", tmp_path / "resumed")
        leftovers = [n for n in os.listdir(tmp_path / "resumed") if n.startswith(".")]
        assert leftovers == []
    finally:
        tf_config.disable_op_determinism()


# ---------------------------------------------------------------------- monitor direction
def _model_with_metrics(metrics, seed=0):
    model = _model(seed)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=metrics, jit_compile=False)
    return model


def test_auto_mode_minimises_ftk_metrics(fashion_mnist_small, tmp_path):
    """monitor="val_nll" selects each phase's epoch of lowest NLL (the metric says "down")."""
    (x, y), (xv, yv) = fashion_mnist_small
    model = _model_with_metrics(["accuracy", ftk.keras_metrics.NegativeLogLikelihood(
        from_logits=True)])
    callback = _small_edst(tmp_path / "t", monitor="val_nll")
    recorder = Recorder()
    model.fit(x[:512], y[:512], batch_size=64, epochs=5, validation_data=(xv, yv),
              shuffle=False, verbose=0, callbacks=[callback, recorder])
    for path, epochs in zip(ftk.list_tickets(str(tmp_path / "t")), ([1, 2], [3, 4])):
        meta = ftk.tickets.read_metadata(path)
        values = [recorder.epoch_logs[e]["val_nll"] for e in epochs]
        assert meta["epoch"] == epochs[int(np.argmin(values))]
        assert meta["monitor_value"] == pytest.approx(min(values))


@keras.saving.register_keras_serializable(package="ft_keras_tests")
class _NoDirection(keras.metrics.Mean):
    def __init__(self, name="mystery", **kwargs):
        super().__init__(name=name, **kwargs)

    def update_state(self, y_true, y_pred, sample_weight=None):
        return super().update_state(keras.ops.mean(y_pred))


@keras.saving.register_keras_serializable(package="ft_keras_tests")
class _HigherIsBetter(_NoDirection):
    def __init__(self, name="score", **kwargs):
        super().__init__(name=name, **kwargs)
        self._direction = "up"


@pytest.mark.parametrize("metric, monitor, mode, expected", [
    (_HigherIsBetter(), "val_score", "auto", "max"),
    (_NoDirection(), "val_mystery", "min", "min"),
    (_NoDirection(), "val_mystery", "auto", None),
    ("accuracy", "val_loss", "auto", "min"),
])
def test_monitor_direction_of_user_metrics(fashion_mnist_small, tmp_path, metric, monitor, mode,
                                           expected):
    (x, y), (xv, yv) = fashion_mnist_small
    model = _model_with_metrics([metric])
    callback = ftk.TicketCheckpoint(str(tmp_path / "t"), 0, monitor=monitor, mode=mode)
    fit = lambda: model.fit(x[:128], y[:128], batch_size=64, epochs=2,  # noqa: E731
                            validation_data=(xv[:64], yv[:64]), verbose=0, callbacks=[callback])
    if expected is None:
        with pytest.raises(ValueError, match="cannot tell whether it should be maximised"):
            fit()
        assert int(model.optimizer.iterations.numpy()) == 0  # refused before training
        return
    fit()
    assert callback._best.mode == expected  # pylint: disable=protected-access


def test_misspelt_monitor_is_refused_after_the_first_step(fashion_mnist_small, tmp_path):
    (x, y), (xv, yv) = fashion_mnist_small
    model = _model()
    callback = ftk.FreeTickets(str(tmp_path / "t"), num_tickets=1, exploration_epochs=3,
                               refine_epochs=1, monitor="val_acc", mode="max")
    with pytest.raises(ValueError, match=r"monitor='val_acc' will not be in the epoch logs.*"
                                         r"'accuracy'"):
        model.fit(x[:256], y[:256], batch_size=64, epochs=4, validation_data=(xv, yv),
                  verbose=0, callbacks=[callback])
    assert int(model.optimizer.iterations.numpy()) == 1


def test_missing_validation_data_is_refused_after_the_first_epoch(fashion_mnist_small, tmp_path):
    (x, y), _ = fashion_mnist_small
    model = _model()
    callback = ftk.FreeTickets(str(tmp_path / "t"), num_tickets=1, exploration_epochs=3,
                               refine_epochs=1)
    with pytest.raises(ValueError, match=r"needs validation data, but fit\(\) got none \(no "
                                         r"validation ran in epoch 0\)"):
        model.fit(x[:128], y[:128], batch_size=32, epochs=4, verbose=0, callbacks=[callback])
    assert int(model.optimizer.iterations.numpy()) == 4  # refused at the end of the first epoch


def test_non_finite_weights_are_never_selected(fashion_mnist_small, tmp_path):
    model = _model()
    best = ftk.free_tickets._BestSnapshot(str(tmp_path), 0, "val_accuracy", "max")  # pylint: disable=W0212
    assert best.offer(model, 0.5, {"epoch": 0}, persist=True)
    layer = ftk.masked_layers(model)[0]
    layer.masked_kernel.assign(np.full(layer.masked_kernel.shape, np.nan, "float32"))
    assert not best.offer(model, 0.9, {"epoch": 1}, persist=True)
    assert best.value == 0.5 and best.info["epoch"] == 0
    again = ftk.free_tickets._BestSnapshot(str(tmp_path), 0, "val_accuracy", "max")  # pylint: disable=W0212
    assert again.restore(len(model.get_weights())) and again.value == 0.5
    assert again.last_epoch == 1


# ---------------------------------------------------------------------- one run per ticket_dir
def _edst_fit_args(edst_run, fashion_mnist_small, **kwargs):
    (x, y), _ = fashion_mnist_small
    return dict(dict(x=x, y=y, batch_size=64, epochs=7,
                     validation_data=(edst_run["xv"], edst_run["yv"]), shuffle=False,
                     verbose=0), **kwargs)


def _edst_callback(ticket_dir):  # the configuration of the edst_run fixture
    return ftk.FreeTickets(ticket_dir, num_tickets=3, exploration_epochs=1, refine_epochs=2,
                           update_every=8, grow="gradient")


def test_rerunning_a_finished_run_is_refused_without_advice_to_delete(
        edst_run, fashion_mnist_small, tmp_path):
    ticket_dir = str(tmp_path / "tickets")
    shutil.copytree(edst_run["ticket_dir"], ticket_dir)
    model = _model()
    with pytest.raises(ValueError, match=r"is not empty \(3 complete ticket\(s\): \['ticket_0', "
                                         r"'ticket_1', 'ticket_2'\]\): new tickets are not mixed "
                                         r"with old ones\. Write them to another \(empty\) "
                                         r"ticket_dir"):
        model.fit(callbacks=[_edst_callback(ticket_dir)],
                  **_edst_fit_args(edst_run, fashion_mnist_small))
    assert int(model.optimizer.iterations.numpy()) == 0
    assert len(ftk.list_tickets(ticket_dir)) == 3


def test_a_later_start_into_another_runs_tickets_is_refused(edst_run, fashion_mnist_small,
                                                           tmp_path):
    """Issue 20: fit(initial_epoch=3) into a folder holding another run's tickets was accepted
    and mixed the two runs."""
    ticket_dir = str(tmp_path / "tickets")
    shutil.copytree(edst_run["ticket_dir"], ticket_dir)
    model = _model(seed=5)
    with pytest.raises(ValueError, match=r"fit starts at epoch 3, but ticket_dir=.* holds 3 "
                                         r"complete ticket\(s\).* and no FreeTickets run record: "
                                         r"this fit cannot prove it continues the run"):
        model.fit(callbacks=[_edst_callback(ticket_dir)],
                  **_edst_fit_args(edst_run, fashion_mnist_small, initial_epoch=3))
    assert int(model.optimizer.iterations.numpy()) == 0


def test_a_later_start_into_a_fresh_folder_is_refused(fashion_mnist_small, tmp_path):
    """Issue 20: initial_epoch=2 on a fresh run was taken as a resume (exploration skipped)."""
    (x, y), (xv, yv) = fashion_mnist_small
    model = _model()
    with pytest.raises(ValueError, match=r"fit starts at epoch 2 \(initial_epoch=2\) but "
                                         r"ticket_dir=.* holds no FreeTickets run to resume: a "
                                         r"fresh run starts at epoch 0"):
        model.fit(x[:128], y[:128], epochs=3, initial_epoch=2, validation_data=(xv, yv),
                  verbose=0, callbacks=[ftk.FreeTickets(str(tmp_path / "t"), num_tickets=2,
                                                        exploration_epochs=1, refine_epochs=1)])
    assert int(model.optimizer.iterations.numpy()) == 0


def test_a_second_writer_is_refused_naming_the_first(fashion_mnist_small, tmp_path):
    """Issue 20: two runs on one ticket_dir started together both finished, one overwriting
    the other's tickets."""
    (x, y), (xv, yv) = fashion_mnist_small
    ticket_dir = tmp_path / "t"
    ticket_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; "
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
         "os.write(fd, b'{\"writer\": \"FreeTickets\", \"pid\": 4242}'); "
         "print('locked', flush=True); time.sleep(60)",
         str(ticket_dir / ftk.tickets.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        model = _model()
        with pytest.raises(ValueError, match=r"ticket_dir=.* is being written by another run "
                                             r"\(\{\"writer\": \"FreeTickets\", \"pid\": 4242\}"
                                             r"\); two runs cannot write into one ticket_dir"):
            model.fit(x[:128], y[:128], epochs=2, validation_data=(xv, yv), verbose=0,
                      callbacks=[ftk.FreeTickets(str(ticket_dir), num_tickets=1,
                                                 exploration_epochs=1, refine_epochs=1)])
        assert int(model.optimizer.iterations.numpy()) == 0
    finally:
        holder.kill()
        holder.wait()


def test_a_read_only_ticket_dir_is_refused_before_training(fashion_mnist_small, tmp_path,
                                                           monkeypatch):
    (x, y), (xv, yv) = fashion_mnist_small
    ticket_dir = str(tmp_path / "t")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if path == ticket_dir
                        else real_access(path, mode))  # as root, chmod would not stop writes
    model = _model()
    with pytest.raises(ValueError, match=r"ticket_dir=.* cannot be written \(Permission denied\)"):
        model.fit(x[:128], y[:128], epochs=4, validation_data=(xv, yv), verbose=0,
                  callbacks=[ftk.FreeTickets(ticket_dir, num_tickets=1, exploration_epochs=3,
                                             refine_epochs=1)])
    assert int(model.optimizer.iterations.numpy()) == 0


# ---------------------------------------------------------------------- progress files
def test_a_foreign_start_or_a_missing_progress_file_at_resume_is_refused(fashion_mnist_small, tmp_path):
    """Issue 20: a .progress-<i>.npz missing at resume was accepted (the ticket became the
    wrong epoch)."""
    (x, y), (xv, yv) = fashion_mnist_small
    fit_args = dict(x=x[:256], y=y[:256], batch_size=64, epochs=3, validation_data=(xv, yv),
                    shuffle=False, verbose=0)
    ticket_dir = tmp_path / "t"

    def callbacks(*extra):
        return [keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
                ftk.FreeTickets(str(ticket_dir), num_tickets=1, exploration_epochs=1,
                                refine_epochs=2, update_every=2), *extra]

    with pytest.raises(RuntimeError, match="simulated crash"):
        _model().fit(callbacks=callbacks(_CrashAtEpochEnd(1)), **fit_args)
    other = _model(seed=5)  # not restored by BackupAndRestore: another run's weights
    with pytest.raises(ValueError, match=r"fit starts at epoch 2, but ticket_dir=.* holds run "
                                         r"[0-9a-f]{16} started .*, which ended epoch 1 with other "
                                         r"weights than this fit starts from: this fit is not "
                                         r"that run resumed"):
        other.fit(initial_epoch=2, callbacks=callbacks()[1:], **fit_args)
    os.remove(ticket_dir / ".progress-0.npz")
    model = _model()
    with pytest.raises(ValueError, match=r"resumed at epoch 2, inside refinement phase 1 \(epochs "
                                         r"1-2\), but the progress file '.*\.progress-0\.npz' of "
                                         r"ticket 0 is missing: the epochs 1-1 it recorded are "
                                         r"lost"):
        model.fit(callbacks=callbacks(), **fit_args)
    assert int(model.optimizer.iterations.numpy()) == 8  # restored, nothing trained
    assert not os.path.exists(ticket_dir / "ticket_0")


def test_update_every_longer_than_the_run_warns(fashion_mnist_small, tmp_path, caplog):
    (x, y), (xv, yv) = fashion_mnist_small
    callback = ftk.FreeTickets(str(tmp_path / "t"), num_tickets=1, exploration_epochs=1,
                               refine_epochs=1, update_every=100)
    with caplog.at_level("WARNING"):
        _model().fit(x[:256], y[:256], batch_size=64, epochs=2, validation_data=(xv, yv),
                     verbose=0, callbacks=[callback])
    assert any("FreeTickets(update_every=100): the whole run is 8 steps (2 epochs x 4), so no "
               "mask update runs" in record.getMessage() for record in caplog.records)
    assert callback.updates == []


def test_progress_file_holds_weights_and_record_together(tmp_path):
    model = _model()
    best = ftk.free_tickets._BestSnapshot(str(tmp_path), 1, "val_accuracy", "max", "run1")  # pylint: disable=W0212
    assert best.offer(model, 0.5, {"epoch": 4}, persist=True)
    assert sorted(os.listdir(tmp_path)) == [".progress-1.npz"]
    assert not best.offer(model, 0.9, {"epoch": 4}, persist=True)  # epoch 4 already seen
    again = ftk.free_tickets._BestSnapshot(str(tmp_path), 1, "val_accuracy", "max", "run1")  # pylint: disable=W0212
    assert again.restore(len(model.get_weights()))
    assert (again.value, again.last_epoch, again.info["epoch"]) == (0.5, 4, 4)
    for a, b in zip(again.weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    other = ftk.free_tickets._BestSnapshot(str(tmp_path), 1, "val_accuracy", "max", "run2")  # pylint: disable=W0212
    with pytest.raises(ValueError, match=r"\.progress-1\.npz' of ticket 1 belongs to run 'run1', "
                                         r"not to the run 'run2'"):
        other.restore(len(model.get_weights()))


@pytest.mark.parametrize("damage", ["truncated", "bit_flip", "not_npz"])
def test_a_damaged_progress_file_is_named(tmp_path, damage):
    """Issue 20: truncated or bit-flipped progress files gave raw JSONDecodeError / BadZipFile /
    AttributeError without the file's name."""
    model = _model()
    best = ftk.free_tickets._BestSnapshot(str(tmp_path), 0, "val_accuracy", "max")  # pylint: disable=W0212
    best.offer(model, 0.5, {"epoch": 1}, persist=True)
    path = tmp_path / ".progress-0.npz"
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "bit_flip":
        path.write_bytes(data[:-30] + bytes([data[-30] ^ 0xFF]) + data[-29:])
    else:
        path.write_text('{"info": {}}')
    again = ftk.free_tickets._BestSnapshot(str(tmp_path), 0, "val_accuracy", "max")  # pylint: disable=W0212
    with pytest.raises(ValueError, match=r"progress file '.*\.progress-0\.npz' of ticket 0 is "
                                         r"damaged.*new ticket_dir"):
        again.restore(len(model.get_weights()))


if __name__ == "__main__":  # bazel test / python tests/test_free_tickets.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))


def test_edst_under_xla_matches_without(fashion_mnist_small, tmp_path):
    """Under XLA (one replica: ordinary steps compiled, update steps and jumps uncompiled) the
    EDST run makes the same mask updates and jumps, and the same tickets, as without XLA."""
    (x, y), (xv, yv) = fashion_mnist_small
    runs = {}
    for jit_compile in (False, True):
        model = _model()
        model.compile(model.optimizer, model.loss, metrics=["accuracy"], jit_compile=jit_compile)
        ticket_dir = str(tmp_path / f"xla_{jit_compile}")
        callback = ftk.FreeTickets(
            ticket_dir, num_tickets=2, exploration_epochs=1,
            refine_epochs=1, update_every=8, grow="gradient")
        recorder = Recorder()
        model.fit(x[:1024], y[:1024], batch_size=64, epochs=3, validation_data=(xv, yv),
                  shuffle=False, verbose=0, callbacks=[callback, recorder])
        assert callback._split is jit_compile  # pylint: disable=protected-access
        runs[jit_compile] = (recorder.masks, [u["step"] for u in callback.updates],
                             [ftk.read_ticket(p)[0] for p in ftk.list_tickets(ticket_dir)])
    (masks, steps, tickets), (xla_masks, xla_steps, xla_tickets) = runs[False], runs[True]
    assert xla_steps == steps and len(xla_tickets) == len(tickets) == 2
    jump = masks[33][0] != masks[32][0]  # the global exploration between the two phases
    assert jump.sum() >= 0.5 * masks[32][0].sum()
    assert sorted(xla_masks) == sorted(masks)
    for step, (mask, kernel) in masks.items():
        np.testing.assert_array_equal(xla_masks[step][0], mask)
        np.testing.assert_allclose(xla_masks[step][1], kernel, rtol=0, atol=1e-5)
    for ticket, xla_ticket in zip(tickets, xla_tickets):
        for name, (mask, _) in masked_state(ticket).items():
            np.testing.assert_array_equal(masked_state(xla_ticket)[name][0], mask)


def test_a_schedule_object_replaces_the_default_drop_fractions(tmp_path):
    schedule = ftk.schedules.ConstantDrop(update_every=7, drop_fraction=0.25)
    callback = ftk.FreeTickets(str(tmp_path / "t"), num_tickets=2, exploration_epochs=1,
                               refine_epochs=1, schedule=schedule)
    assert callback.schedule == schedule
    assert (callback.update_every, callback.drop_fraction, callback.decay) == (7, 0.25,
                                                                               "constant")
    with pytest.raises(ValueError, match="drop_fraction"):
        ftk.FreeTickets(str(tmp_path / "u"), num_tickets=2, exploration_epochs=1,
                        refine_epochs=1, schedule=schedule, drop_fraction=0.5)
