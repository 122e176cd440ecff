"""The bad-input catalogue: one parametrised test over the whole public API.

Every entry is a bad input (a wrong type, a bad value, a call that cannot work) and what the
library must answer: the exact exception type (``TypeError`` for a wrong type, ``ValueError``
for a bad value) and a message that names the argument, and where practical shows the value
(a regex matched with ``re.search``). Errors that can only be seen when ``fit`` starts (an
uncompiled model, a monitor without validation data, ...) are entries too: they must arrive
before the first training step.

Entries are ``(call, error, pattern)`` with ``call(env)`` doing the bad thing; ``env`` (the
`Env` fixture) builds tiny synthetic models and data (a 2-layer MLP on 16 features) and gives a
temporary folder, so collecting the catalogue builds nothing. Recipe entries pass a ``build_fn``
that fails the test when called: a recipe must refuse its arguments before it builds a model.

The entries of `ft_keras.tickets` and `ft_keras.Ensemble` are a separate group
(`TICKETS_AND_ENSEMBLE`): those modules are being reworked, and the group holds what is true of
them today.
"""

import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import ft_keras as ftk
from ft_keras import distribute
from ft_keras import flops
from ft_keras import layers
from ft_keras import masks
from ft_keras import schedules
from ft_keras import tickets
from ft_keras import training
from ft_keras.harness import corruptions
from ft_keras.harness import data
from ft_keras.harness import evaluation
from ft_keras.harness import keras_metrics
from ft_keras.harness import metrics
from ft_keras.harness import models
from ft_keras.harness import recipes
from ft_keras.harness import training_cost

NUM_FEATURES = 16
NUM_CLASSES = 3


class Env:
    """Builds what the entries need, on demand: tiny models, data and temporary paths."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(32, NUM_FEATURES)).astype("float32")
        self.y = (np.arange(32) % NUM_CLASSES).astype("int64")
        self.probs = np.full((4, NUM_CLASSES), 1.0 / NUM_CLASSES)
        self.labels = np.array([0, 1, 2, 0])

    # ------------------------------------------------------------------------------ models
    @staticmethod
    def mlp(name="mlp", outputs=NUM_CLASSES):
        return keras.Sequential([
            keras.Input((NUM_FEATURES,)),
            keras.layers.Dense(8, activation="relu", name="hidden"),
            keras.layers.Dense(outputs, name="logits"),
        ], name=name)

    def sparse(self, **kwargs):
        return ftk.sparsify(self.mlp(), sparsity=0.5, seed=0, **kwargs)

    def compiled_sparse(self, optimizer=None, metrics_=("accuracy",)):
        model = self.sparse()
        model.compile(optimizer or keras.optimizers.SGD(0.01),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=list(metrics_))
        return model

    def fit(self, model, callbacks, epochs=1, validation=True, **kwargs):
        if validation:
            kwargs.setdefault("validation_data", (self.x[:8], self.y[:8]))
        return model.fit(self.x, self.y, batch_size=8, epochs=epochs, verbose=0,
                         callbacks=list(callbacks), **kwargs)

    def unknown_length_dataset(self):
        ds = tf.data.Dataset.from_tensor_slices((self.x, self.y)).batch(8)
        return ds.filter(lambda x, y: True)  # cardinality UNKNOWN: fit cannot count steps

    # ------------------------------------------------------------------------------ paths
    def path(self, name):
        return str(self.tmp / name)

    def file(self, name="a_file.txt"):
        path = self.tmp / name
        path.write_text("not a folder")
        return str(path)

    def folder(self, name="folder", with_file=False):
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        if with_file:
            (path / "something.txt").write_text("x")
        return str(path)

    def images(self, n=2, size=8, channels=1, dtype="uint8"):
        return np.zeros((n, size, size, channels), dtype)


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


def case(case_id, error, pattern, call):
    return pytest.param(call, error, pattern, id=case_id)


def _never_called():
    raise AssertionError("build_fn was called: the recipe must check its arguments before it "
                         "builds a model")


def _recipe_kwargs(env, **overrides):
    """Valid keyword arguments of an independent-members recipe, with ``overrides``."""
    kwargs = dict(validation_data=(env.x[:8], env.y[:8]), epochs=1,
                  ticket_dir=env.path("recipe_tickets"))
    kwargs.update(overrides)
    return kwargs


def _edst_kwargs(env, **overrides):
    kwargs = dict(validation_data=(env.x[:8], env.y[:8]), exploration_epochs=1,
                  refine_epochs=1, ticket_dir=env.path("edst_tickets"))
    kwargs.update(overrides)
    return kwargs


def _train(env):
    return (env.x, env.y)


class _PlainOptimizer(keras.optimizers.Optimizer):
    """An optimizer ft_keras does not know (no registered per-weight state)."""

    def update_step(self, gradient, variable, learning_rate):
        variable.assign_sub(tf.cast(learning_rate, variable.dtype) * gradient)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)

    def call(self, inputs):
        return self.dense(inputs)


def _uncompiled_fit_start(env, callback):
    """What ``fit`` does first with a callback, on a model without an optimizer."""
    callback.set_model(env.sparse())
    callback.on_train_begin()


def _no_direction_metric(y_true, y_pred):
    return keras.ops.mean(keras.ops.argmax(y_pred, axis=-1) == keras.ops.cast(y_true, "int64"))


def _free_tickets(env, **kwargs):
    kwargs = dict(dict(num_tickets=2, exploration_epochs=1, refine_epochs=1, update_every=2),
                  **kwargs)
    return ftk.FreeTickets(env.path("ft_tickets"), **kwargs)


# ================================================================================== sparsify
SPARSIFY = [
    case("sparsify/model_not_a_model", TypeError, r"model must be a keras\.Model.*str",
         lambda e: ftk.sparsify("mlp", sparsity=0.5)),
    case("sparsify/subclassed_model", TypeError, r"model=.* is a subclassed keras\.Model",
         lambda e: ftk.sparsify(_Subclassed(), sparsity=0.5)),
    case("sparsify/unbuilt_model", ValueError, r"model='unbuilt' is not built",
         lambda e: ftk.sparsify(keras.Sequential([keras.layers.Dense(3)], name="unbuilt"))),
    case("sparsify/sparsity_one", ValueError, r"sparsity=1\.0 is not allowed.*\[0\.0, 1\.0\)",
         lambda e: ftk.sparsify(e.mlp(), sparsity=1.0)),
    case("sparsify/sparsity_negative", ValueError, r"sparsity=-0\.1 is not allowed",
         lambda e: ftk.sparsify(e.mlp(), sparsity=-0.1)),
    case("sparsify/sparsity_str", TypeError, r"sparsity must be .*'0\.9' \(str\)",
         lambda e: ftk.sparsify(e.mlp(), sparsity="0.9")),
    case("sparsify/distribution_unknown", ValueError, r"distribution='gaussian' is not supported",
         lambda e: ftk.sparsify(e.mlp(), sparsity=0.5, distribution="gaussian")),
    case("sparsify/distribution_not_str", TypeError, r"distribution must be one of .*\(int\)",
         lambda e: ftk.sparsify(e.mlp(), sparsity=0.5, distribution=1)),
    case("sparsify/keep_dense_unknown_layer", ValueError, r"keep_dense=\['nope'\] names no "
         r"prunable layer", lambda e: ftk.sparsify(e.mlp(), sparsity=0.5, keep_dense="nope")),
    case("sparsify/keep_dense_not_names", TypeError, r"keep_dense must be a str or an iterable",
         lambda e: ftk.sparsify(e.mlp(), sparsity=0.5, keep_dense=3)),
    case("sparsify/seed_float", TypeError, r"seed must be an int; got 1\.5 \(float\)",
         lambda e: ftk.sparsify(e.mlp(), sparsity=0.5, seed=1.5)),
    case("sparsify/erk_power_scale_zero", ValueError, r"erk_power_scale=0\.0 is not allowed",
         lambda e: ftk.sparsify(e.mlp(), sparsity=0.5, erk_power_scale=0.0)),
    case("sparsify/already_sparse", ValueError, r"model='mlp' is already sparsified",
         lambda e: ftk.sparsify(e.sparse(), sparsity=0.5)),
    case("sparsify/no_prunable_layer", ValueError, r"model='flat' has no prunable layer",
         lambda e: ftk.sparsify(keras.Sequential([keras.Input((4,)), keras.layers.Flatten()],
                                                 name="flat"), sparsity=0.5)),
    case("strip/model_not_a_model", TypeError, r"model must be a keras\.Model.*list",
         lambda e: ftk.strip([e.sparse()])),
    case("strip/subclassed_model", TypeError, r"model=.* is a subclassed keras\.Model",
         lambda e: ftk.strip(_Subclassed())),
    case("sparsity_report/model_not_a_model", TypeError, r"model must be a keras\.Model.*str",
         lambda e: ftk.sparsity_report("mlp")),
    case("masked_layers/model_not_a_model", TypeError, r"model must be a keras\.Model.*str",
         lambda e: ftk.masked_layers("mlp")),
    case("layer_densities/shapes_not_a_mapping", TypeError, r"shapes",
         lambda e: ftk.layer_densities([(4, 4)], 0.5)),
    case("layer_densities/shapes_empty", ValueError, r"shapes must name at least one layer",
         lambda e: ftk.layer_densities({}, 0.5)),
    case("layer_densities/negative_dimension", ValueError, r"shapes\['a'\]",
         lambda e: ftk.layer_densities({"a": (4, -1)}, 0.5)),
    case("layer_densities/sparsity_above_one", ValueError, r"sparsity=1\.5 is not allowed",
         lambda e: ftk.layer_densities({"a": (4, 4)}, 1.5)),
    case("layer_densities/distribution_unknown", ValueError, r"distribution='erk2'",
         lambda e: ftk.layer_densities({"a": (4, 4)}, 0.5, distribution="erk2")),
    case("layer_densities/keep_dense_unknown", ValueError, r"keep_dense.*'b'",
         lambda e: ftk.layer_densities({"a": (4, 4)}, 0.5, keep_dense="b")),
]

# ============================================================ DynamicSparsity, StaticSparsity
DYNAMIC = [
    case("dynamic_sparsity/update_every_zero", ValueError,
         r"update_every=0 is not allowed; it must be an int >= 1",
         lambda e: ftk.DynamicSparsity(update_every=0)),
    case("dynamic_sparsity/update_every_float", TypeError,
         r"update_every must be an int >= 1; got 2\.5 \(float\)",
         lambda e: ftk.DynamicSparsity(update_every=2.5)),
    case("dynamic_sparsity/update_every_bool", TypeError, r"update_every must be an int.*True",
         lambda e: ftk.DynamicSparsity(update_every=True)),
    case("dynamic_sparsity/drop_fraction_zero", ValueError, r"drop_fraction=0 is not allowed",
         lambda e: ftk.DynamicSparsity(drop_fraction=0)),
    case("dynamic_sparsity/drop_fraction_above_one", ValueError,
         r"drop_fraction=1\.5 is not allowed", lambda e: ftk.DynamicSparsity(drop_fraction=1.5)),
    case("dynamic_sparsity/drop_fraction_nan", ValueError, r"drop_fraction=nan",
         lambda e: ftk.DynamicSparsity(drop_fraction=float("nan"))),
    case("dynamic_sparsity/decay_unknown", ValueError, r"decay='linear' is not supported",
         lambda e: ftk.DynamicSparsity(decay="linear")),
    case("dynamic_sparsity/grow_unknown", ValueError,
         r"grow='largest' is not supported; allowed values are \(",
         lambda e: ftk.DynamicSparsity(grow="largest")),
    case("dynamic_sparsity/prune_unknown", ValueError, r"prune='random' is not supported",
         lambda e: ftk.DynamicSparsity(prune="random")),
    case("dynamic_sparsity/start_after_end", ValueError,
         r"start_step=6 must be smaller than end_step=4",
         lambda e: ftk.DynamicSparsity(update_every=1, start_step=6, end_step=4)),
    case("dynamic_sparsity/end_step_leaves_no_update", ValueError,
         r"end_step=50 leaves no mask update",
         lambda e: ftk.DynamicSparsity(update_every=100, end_step=50)),
    case("dynamic_sparsity/end_step_zero", ValueError, r"end_step=0 is not allowed",
         lambda e: ftk.DynamicSparsity(end_step=0)),
    case("dynamic_sparsity/start_step_negative", ValueError, r"start_step=-1 is not allowed",
         lambda e: ftk.DynamicSparsity(start_step=-1)),
    case("dynamic_sparsity/final_above_initial", ValueError,
         r"final_drop_fraction=0\.5 must not exceed drop_fraction=0\.3",
         lambda e: ftk.DynamicSparsity(drop_fraction=0.3, final_drop_fraction=0.5)),
    case("dynamic_sparsity/seed_str", TypeError, r"seed must be an int; got '0' \(str\)",
         lambda e: ftk.DynamicSparsity(seed="0")),
    case("dynamic_sparsity/optimizer_state_unknown", ValueError,
         r"optimizer_state='sparse' is not supported",
         lambda e: ftk.DynamicSparsity(optimizer_state="sparse")),
    case("dynamic_sparsity/log_dir_int", TypeError, r"log_dir must be a path.*\(int\)",
         lambda e: ftk.DynamicSparsity(log_dir=3)),
    case("dynamic_sparsity/verbose_negative", ValueError, r"verbose=-1 is not allowed",
         lambda e: ftk.DynamicSparsity(verbose=-1)),
    case("dynamic_sparsity/grown_weight_scale_negative", ValueError,
         r"grown_weight_scale=-0\.1 is not allowed",
         lambda e: ftk.DynamicSparsity(grown_weight_scale=-0.1)),
    case("dynamic_sparsity/unknown_keyword", TypeError, r"update_evry",
         lambda e: ftk.DynamicSparsity(update_evry=10)),
    case("dynamic_sparsity/set_global_explorations_fraction", ValueError,
         r"fraction=2\.0 is not allowed",
         lambda e: ftk.DynamicSparsity().set_global_explorations(1, 1, 1, 2.0)),
    # errors seen when fit starts
    case("dynamic_sparsity/fit_uncompiled_model", ValueError, r"model='mlp' .*compile",
         lambda e: _uncompiled_fit_start(e, ftk.DynamicSparsity())),
    case("dynamic_sparsity/fit_model_without_masked_layers", ValueError,
         r"model='dense', which has no masked layer",
         lambda e: ftk.DynamicSparsity().set_model(e.mlp(name="dense"))),
    case("dynamic_sparsity/fit_model_sparsified_at_zero", ValueError,
         r"which has no masked layer.*sparsity 0\.0 .*masks nothing",
         lambda e: ftk.DynamicSparsity().set_model(ftk.sparsify(e.mlp(name="dense"), 0.0))),
    case("dynamic_sparsity/fit_momentum_growth_without_momentum", ValueError,
         r"grow='momentum' needs an optimizer with momentum.*SGD",
         lambda e: e.fit(e.compiled_sparse(keras.optimizers.SGD(0.01)),
                         [ftk.DynamicSparsity(grow="momentum", update_every=2)])),
    case("dynamic_sparsity/fit_unknown_optimizer_class", ValueError,
         r"optimizer _PlainOptimizer is unknown to ft_keras.*register_optimizer_slots",
         lambda e: e.fit(e.compiled_sparse(_PlainOptimizer(0.01)),
                         [ftk.DynamicSparsity(update_every=2)])),
    case("dynamic_sparsity/fit_cosine_on_dataset_of_unknown_length", ValueError,
         r"end_step=None: the cosine decay needs the number of training steps",
         lambda e: e.compiled_sparse().fit(e.unknown_length_dataset(), epochs=1, verbose=0,
                                           callbacks=[ftk.DynamicSparsity(update_every=2)])),
]

STATIC = [
    case("static_sparsity/optimizer_state_unknown", ValueError,
         r"optimizer_state='zero' is not supported",
         lambda e: ftk.StaticSparsity(optimizer_state="zero")),
    case("static_sparsity/optimizer_state_not_str", TypeError,
         r"optimizer_state must be one of .*\(NoneType\)",
         lambda e: ftk.StaticSparsity(optimizer_state=None)),
    case("static_sparsity/log_dir_bytes", TypeError, r"log_dir must be a path.*\(bytes\)",
         lambda e: ftk.StaticSparsity(log_dir=b"logs")),
    case("static_sparsity/verbose_float", TypeError, r"verbose must be an int >= 0; got 0\.5",
         lambda e: ftk.StaticSparsity(verbose=0.5)),
    case("static_sparsity/dst_argument", TypeError, r"update_every",
         lambda e: ftk.StaticSparsity(update_every=10)),
    case("static_sparsity/fit_uncompiled_model", ValueError, r"model='mlp' .*compile",
         lambda e: _uncompiled_fit_start(e, ftk.StaticSparsity())),
    case("static_sparsity/fit_model_without_masked_layers", ValueError,
         r"model='dense', which has no masked layer",
         lambda e: ftk.StaticSparsity().set_model(e.mlp(name="dense"))),
    case("static_sparsity/fit_unknown_optimizer_class", ValueError,
         r"optimizer _PlainOptimizer is unknown to ft_keras",
         lambda e: e.fit(e.compiled_sparse(_PlainOptimizer(0.01)), [ftk.StaticSparsity()])),
]

# ================================================================ FreeTickets, TicketCheckpoint
FREE_TICKETS = [
    case("free_tickets/ticket_dir_none", TypeError, r"ticket_dir must be a path.*None",
         lambda e: ftk.FreeTickets(None, exploration_epochs=1, refine_epochs=1)),
    case("free_tickets/ticket_dir_empty", ValueError, r"ticket_dir='' is not allowed",
         lambda e: ftk.FreeTickets("", exploration_epochs=1, refine_epochs=1)),
    case("free_tickets/plan_missing", ValueError,
         r"exploration_epochs and refine_epochs are required",
         lambda e: ftk.FreeTickets(e.path("t"))),
    case("free_tickets/num_tickets_zero", ValueError, r"num_tickets=0 is not allowed",
         lambda e: _free_tickets(e, num_tickets=0)),
    case("free_tickets/refine_epochs_zero", ValueError, r"refine_epochs=0 is not allowed",
         lambda e: _free_tickets(e, refine_epochs=0)),
    case("free_tickets/exploration_epochs_float", TypeError,
         r"exploration_epochs must be an int >= 0; got 1\.5",
         lambda e: _free_tickets(e, exploration_epochs=1.5)),
    case("free_tickets/explore_fraction_zero", ValueError, r"explore_fraction=0 is not allowed",
         lambda e: _free_tickets(e, explore_fraction=0)),
    case("free_tickets/monitor_empty", ValueError, r"monitor='' is not allowed",
         lambda e: _free_tickets(e, monitor="")),
    case("free_tickets/mode_unknown", ValueError, r"mode='up' is not supported",
         lambda e: _free_tickets(e, mode="up")),
    case("free_tickets/exploration_lr_negative", ValueError, r"exploration_lr=-0\.1",
         lambda e: _free_tickets(e, exploration_lr=-0.1)),
    case("free_tickets/refine_lr_not_a_pair", TypeError, r"refine_lr must be a pair.*0\.01",
         lambda e: _free_tickets(e, refine_lr=0.01)),
    case("free_tickets/refine_lr_three_values", ValueError, r"refine_lr must be a pair",
         lambda e: _free_tickets(e, refine_lr=(0.1, 0.01, 0.001))),
    case("free_tickets/refine_lr_switch_above_one", ValueError,
         r"refine_lr_switch=1\.5 is not allowed",
         lambda e: _free_tickets(e, refine_lr_switch=1.5)),
    case("free_tickets/jump_lr_zero", ValueError, r"jump_lr=0\.0 is not allowed",
         lambda e: _free_tickets(e, jump_lr=0.0)),
    case("free_tickets/control_learning_rate_str", TypeError,
         r"control_learning_rate must be True or False; got 'yes'",
         lambda e: _free_tickets(e, control_learning_rate="yes")),
    case("free_tickets/overwrite_int", TypeError, r"overwrite must be True or False; got 1",
         lambda e: _free_tickets(e, overwrite=1)),
    case("free_tickets/dst_argument_bad", ValueError, r"update_every=0 is not allowed",
         lambda e: _free_tickets(e, update_every=0)),
    # errors seen when fit starts
    case("free_tickets/fit_without_validation_data", ValueError,
         r"monitor='val_accuracy' needs validation data, but fit\(\) got none \(no validation "
         r"ran in epoch 0\)",
         lambda e: e.fit(e.compiled_sparse(), [_free_tickets(e)], epochs=3, validation=False)),
    case("free_tickets/fit_epochs_do_not_cover_plan", ValueError,
         r"fit\(epochs=1\) does not match the FreeTickets plan.*= 3 epochs\. Pass epochs=3",
         lambda e: e.fit(e.compiled_sparse(), [_free_tickets(e)], epochs=1)),
    case("free_tickets/fit_epochs_longer_than_plan", ValueError,
         r"fit\(epochs=4\) does not match the FreeTickets plan.*train past the last ticket.*"
         r"Pass epochs=3",
         lambda e: e.fit(e.compiled_sparse(), [_free_tickets(e)], epochs=4)),
    case("free_tickets/fit_initial_epoch_on_a_fresh_folder", ValueError,
         r"fit starts at epoch 2 \(initial_epoch=2\) but ticket_dir=.* holds no FreeTickets "
         r"run to resume: a fresh run starts at epoch 0",
         lambda e: e.fit(e.compiled_sparse(), [_free_tickets(e)], epochs=3, initial_epoch=2)),
    case("free_tickets/fit_initial_epoch_into_a_folder_without_run_record", ValueError,
         r"fit starts at epoch 1, but ticket_dir=.* holds 1 other entries.*no FreeTickets run "
         r"record.*Use another ticket_dir",
         lambda e: (e.folder("ft_tickets", with_file=True),
                    e.fit(e.compiled_sparse(), [_free_tickets(e)], epochs=3, initial_epoch=1))),
    case("free_tickets/fit_validation_data_with_nan", ValueError,
         r"fit\(\)'s validation data holds non-finite inputs \(nan in batch 0\)",
         lambda e: e.fit(e.compiled_sparse(), [_free_tickets(e)], epochs=3, validation_data=(
             np.where(np.arange(NUM_FEATURES) == 3, np.nan, e.x[:8]), e.y[:8]))),
    case("free_tickets/fit_validation_data_with_inf", ValueError,
         r"fit\(\)'s validation data holds non-finite inputs \(inf in batch 0\)",
         lambda e: e.fit(e.compiled_sparse(), [_free_tickets(e)], epochs=3, validation_data=(
             np.where(np.arange(NUM_FEATURES) == 3, np.inf, e.x[:8]), e.y[:8]))),
    case("free_tickets/fit_validation_labels_out_of_range", ValueError,
         r"fit\(\)'s validation data holds label 5 \(batch 0\), outside \[0, 3\)",
         lambda e: e.fit(e.compiled_sparse(), [_free_tickets(e)], epochs=3,
                         validation_data=(e.x[:8], np.full(8, 5)))),
    case("free_tickets/fit_validation_data_empty", ValueError,
         r"fit\(\)'s validation data is empty \(0 rows\)",
         lambda e: e.fit(e.compiled_sparse(), [_free_tickets(e)], epochs=3,
                         validation_data=(e.x[:0], e.y[:0]))),
    case("free_tickets/fit_data_runs_out", ValueError,
         r"epoch 0 ended at step 4 of the run, not 5 \(steps_per_epoch=5\): the data ran out",
         lambda e: e.compiled_sparse().fit(
             tf.data.Dataset.from_tensor_slices((e.x, e.y)).batch(8), steps_per_epoch=5,
             epochs=3, validation_data=(e.x[:8], e.y[:8]), verbose=0,
             callbacks=[_free_tickets(e)])),
    case("free_tickets/fit_monitor_direction_unknown", ValueError,
         r"monitor='val__no_direction_metric': cannot tell whether",
         lambda e: e.fit(e.compiled_sparse(metrics_=[_no_direction_metric]),
                         [_free_tickets(e, monitor="val__no_direction_metric")], epochs=3)),
    case("free_tickets/fit_monitor_not_logged", ValueError,
         r"monitor='val_auc' will not be in the epoch logs",
         lambda e: e.fit(e.compiled_sparse(), [_free_tickets(e, monitor="val_auc", mode="max")],
                         epochs=3)),
    case("free_tickets/fit_learning_rate_schedule", ValueError, r"control_learning_rate=False",
         lambda e: e.fit(e.compiled_sparse(keras.optimizers.SGD(
             keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5))), [_free_tickets(e)],
             epochs=3)),
    case("free_tickets/fit_dataset_of_unknown_length", ValueError, r"steps_per_epoch",
         lambda e: e.compiled_sparse().fit(e.unknown_length_dataset(), epochs=3, verbose=0,
                                           callbacks=[_free_tickets(e, monitor="accuracy")])),
    case("free_tickets/fit_ticket_dir_not_empty", ValueError,
         r"ticket_dir='.*folder' is not empty.*overwrite=True",
         lambda e: e.fit(e.compiled_sparse(), [ftk.FreeTickets(
             e.folder(with_file=True), num_tickets=2, exploration_epochs=1, refine_epochs=1)],
             epochs=3)),
]

TICKET_CHECKPOINT = [
    case("ticket_checkpoint/ticket_dir_int", TypeError, r"ticket_dir must be a path.*\(int\)",
         lambda e: ftk.TicketCheckpoint(7, 0)),
    case("ticket_checkpoint/index_negative", ValueError, r"index=-1 is not allowed",
         lambda e: ftk.TicketCheckpoint(e.path("t"), -1)),
    case("ticket_checkpoint/index_float", TypeError, r"index must be an int >= 0; got 1\.0",
         lambda e: ftk.TicketCheckpoint(e.path("t"), 1.0)),
    case("ticket_checkpoint/monitor_not_str", TypeError, r"monitor must be a str; got 5",
         lambda e: ftk.TicketCheckpoint(e.path("t"), 0, monitor=5)),
    case("ticket_checkpoint/mode_unknown", ValueError, r"mode='maximum' is not supported",
         lambda e: ftk.TicketCheckpoint(e.path("t"), 0, mode="maximum")),
    case("ticket_checkpoint/method_empty", ValueError, r"method='' is not allowed",
         lambda e: ftk.TicketCheckpoint(e.path("t"), 0, method="")),
    case("ticket_checkpoint/metadata_list", TypeError, r"metadata must be a dict or None; got .*list",
         lambda e: ftk.TicketCheckpoint(e.path("t"), 0, metadata=[("a", 1)])),
    case("ticket_checkpoint/overwrite_str", TypeError, r"overwrite must be True or False",
         lambda e: ftk.TicketCheckpoint(e.path("t"), 0, overwrite="no")),
    # errors seen when fit starts
    case("ticket_checkpoint/metadata_computed_key", ValueError,
         r"metadata sets \['index'\], which ft_keras sets itself",
         lambda e: ftk.TicketCheckpoint(e.path("t"), 0, metadata={"index": 3})),
    case("ticket_checkpoint/metadata_sets_method", ValueError, r"metadata sets \['method'\]",
         lambda e: ftk.TicketCheckpoint(e.path("t"), 0, metadata={"method": "edst"})),
    case("ticket_checkpoint/metadata_not_json", TypeError,
         r"metadata must be JSON-serialisable: object is not JSON-serialisable",
         lambda e: ftk.TicketCheckpoint(e.path("t"), 0, metadata={"note": object()})),
    case("ticket_checkpoint/fit_without_validation_data", ValueError,
         r"monitor='val_accuracy' needs validation data",
         lambda e: e.fit(e.compiled_sparse(), [ftk.TicketCheckpoint(e.path("t"), 0)],
                         validation=False)),
    case("ticket_checkpoint/fit_monitor_direction_unknown", ValueError,
         r"monitor='val_score': cannot tell whether",
         lambda e: e.fit(e.compiled_sparse(), [ftk.TicketCheckpoint(e.path("t"), 0,
                                                                    monitor="val_score")])),
    case("ticket_checkpoint/fit_monitor_not_logged", ValueError,
         r"monitor='val_score' will not be in the epoch logs",
         lambda e: e.fit(e.compiled_sparse(), [ftk.TicketCheckpoint(e.path("t"), 0,
                                                                    monitor="val_score",
                                                                    mode="max")])),
    case("ticket_checkpoint/fit_ticket_dir_is_a_file", ValueError,
         r"ticket_dir='.*a_file\.txt' exists and is not a folder",
         lambda e: e.fit(e.compiled_sparse(), [ftk.TicketCheckpoint(e.file(), 0)])),
]

# ================================================================================= schedules
SCHEDULES = [
    case("schedules/constant_drop_update_every_zero", ValueError, r"update_every=0 is not allowed",
         lambda e: schedules.ConstantDrop(update_every=0)),
    case("schedules/constant_drop_fraction_str", TypeError, r"drop_fraction must be .*'0\.3'",
         lambda e: schedules.ConstantDrop(drop_fraction="0.3")),
    case("schedules/cosine_drop_final_above_initial", ValueError,
         r"final_drop_fraction=0\.9 must not exceed drop_fraction=0\.3",
         lambda e: schedules.CosineDrop(final_drop_fraction=0.9)),
    case("schedules/cosine_drop_without_end_step", ValueError, r"end_step=None",
         lambda e: schedules.CosineDrop().drop_fraction_at(5)),
    case("schedules/cosine_drop_start_after_end", ValueError,
         r"start_step=10 must be smaller than end_step=10",
         lambda e: schedules.CosineDrop(update_every=1, start_step=10, end_step=10)),
    case("schedules/edst_plan_class_refine_epochs_zero", ValueError,
         r"refine_epochs=0 is not allowed", lambda e: schedules.EDSTPlan(1, 0)),
    case("schedules/edst_plan_class_refine_lr_one_value", ValueError, r"refine_lr.*\(0\.1,\)",
         lambda e: schedules.EDSTPlan(1, 1, refine_lr=(0.1,))),
    case("schedules/edst_plan_class_jump_lr_epochs_negative", ValueError,
         r"jump_lr_epochs=-1 is not allowed", lambda e: schedules.EDSTPlan(1, 2, jump_lr_epochs=-1)),
    case("schedules/edst_plan_num_tickets_zero", ValueError, r"num_tickets=0 is not allowed",
         lambda e: schedules.edst_plan(1, 1, 0)),
    case("schedules/edst_plan_exploration_float", TypeError,
         r"exploration_epochs must be an int >= 0; got 2\.0",
         lambda e: schedules.edst_plan(2.0, 1, 3)),
    case("schedules/edst_plan_learning_rate_epoch_negative", ValueError,
         r"epoch=-1 is not allowed", lambda e: schedules.EDSTPlan(1, 1, 2).learning_rate(-1)),
    case("schedules/phase_at_epoch_str", TypeError, r"epoch must be an int >= 0; got '1'",
         lambda e: schedules.EDSTPlan(1, 1, 2).phase_at("1")),
    case("schedules/update_steps_update_every_zero", ValueError,
         r"update_every=0 is not allowed", lambda e: schedules.update_steps(10, 0)),
    case("schedules/is_update_step_update_every_zero", ValueError,
         r"update_every=0 is not allowed", lambda e: schedules.is_update_step(10, 0)),
    case("schedules/drop_fraction_decay_unknown", ValueError, r"decay='exp' is not supported",
         lambda e: schedules.drop_fraction(5, 0.3, decay="exp")),
    case("schedules/drop_fraction_cosine_without_end_step", ValueError, r"end_step=None",
         lambda e: schedules.drop_fraction(5, 0.3, decay="cosine")),
    case("schedules/drop_fraction_end_step_str", TypeError, r"end_step must be .*'100' \(str\)",
         lambda e: schedules.drop_fraction(5, 0.3, end_step="100")),
    case("schedules/drop_fraction_initial_above_one", ValueError, r"initial=1\.5 is not allowed",
         lambda e: schedules.drop_fraction(5, 1.5, decay="constant")),
    case("schedules/get_unknown_class_name", ValueError, r"identifier=.*'LinearDrop'",
         lambda e: schedules.get({"class_name": "LinearDrop", "config": {}})),
    case("schedules/get_without_config", ValueError, r"identifier=\{'class_name': 'CosineDrop'\}",
         lambda e: schedules.get({"class_name": "CosineDrop"})),
    case("schedules/get_wrong_type", TypeError, r"identifier must be .*'cosine' \(str\)",
         lambda e: schedules.get("cosine")),
    case("schedules/serialize_not_a_schedule", TypeError, r"schedule must be a DropSchedule",
         lambda e: schedules.serialize("cosine")),
]

# ===================================================================== masks, layers, training
MASKS_LAYERS_TRAINING = [
    case("masks/random_mask_too_many_active", ValueError, r"num_active=20 is outside \[0, 16\]",
         lambda e: masks.random_mask((4, 4), 20, masks.rng_seed(0, 0, 0))),
    case("masks/random_mask_negative_active", ValueError, r"num_active=-1",
         lambda e: masks.random_mask((4, 4), -1, masks.rng_seed(0, 0, 0))),
    case("masks/random_mask_float_active", TypeError, r"num_active must be an int.*2\.5",
         lambda e: masks.random_mask((4, 4), 2.5, masks.rng_seed(0, 0, 0))),
    case("masks/random_mask_shape_not_ints", TypeError, r"shape.*'4x4'",
         lambda e: masks.random_mask("4x4", 2, masks.rng_seed(0, 0, 0))),
    case("layers/register_maskable_not_a_class", TypeError,
         r"layer_class must be a subclass of keras\.layers\.Layer",
         lambda e: layers.register_maskable(keras.layers.Dense(3))),
    case("layers/register_maskable_already_masked", ValueError,
         r"layer_class=MaskedDense is already a masked layer class",
         lambda e: layers.register_maskable(layers.MaskedDense)),
    case("layers/register_maskable_kernel_attribute_empty", ValueError,
         r"kernel_attribute='' is not allowed",
         lambda e: layers.register_maskable(keras.layers.Embedding, kernel_attribute="")),
    case("layers/register_maskable_kernel_attribute_int", TypeError,
         r"kernel_attribute must be .*str.*; got 0",
         lambda e: layers.register_maskable(keras.layers.Embedding, kernel_attribute=0)),
    case("layers/register_maskable_masked_class_unrelated", TypeError,
         r"masked_class must subclass both MaskedKernelMixin and Embedding",
         lambda e: layers.register_maskable(keras.layers.Embedding,
                                            masked_class=layers.MaskedDense)),
    case("training/register_optimizer_slots_not_a_class", TypeError,
         r"optimizer_class must be a subclass of keras\.optimizers\.Optimizer",
         lambda e: training.register_optimizer_slots(keras.optimizers.SGD(), ("momentums",))),
    case("training/register_optimizer_slots_attributes_str", TypeError,
         r"attributes must be a sequence of attribute names; got '_momentums'",
         lambda e: training.register_optimizer_slots(_PlainOptimizer, "_momentums")),
    case("training/register_optimizer_slots_attributes_int", TypeError,
         r"attributes must be a sequence of attribute names; got 3",
         lambda e: training.register_optimizer_slots(_PlainOptimizer, 3)),
]

# ==================================================================================== metrics
METRICS = [
    case("metrics/accuracy_label_out_of_range", ValueError,
         r"labels must be class indices in \[0, 3\); got values in \[0, 7\]",
         lambda e: metrics.accuracy([0, 1, 2, 7], e.probs)),
    case("metrics/accuracy_label_count", ValueError, r"labels must have one entry per example",
         lambda e: metrics.accuracy([0, 1], e.probs)),
    case("metrics/accuracy_probs_1d", ValueError, r"probs must have shape \(N, K\)",
         lambda e: metrics.accuracy(e.labels, [0.5, 0.5, 0.2, 0.8])),
    case("metrics/accuracy_probs_strings", TypeError, r"probs must hold numbers",
         lambda e: metrics.accuracy(e.labels, [["a", "b", "c"]] * 4)),
    case("metrics/accuracy_labels_fractional", ValueError,
         r"labels must hold integer class indices.*0\.5",
         lambda e: metrics.accuracy([0.5, 1, 2, 0], e.probs)),
    case("metrics/nll_rows_do_not_sum_to_one", ValueError, r"probs rows must sum to 1",
         lambda e: metrics.nll(e.labels, e.probs * 2)),
    case("metrics/nll_eps_above_one", ValueError, r"eps=1\.5 is not allowed",
         lambda e: metrics.nll(e.labels, e.probs, eps=1.5)),
    case("metrics/brier_probs_nan", ValueError, r"probs must be finite",
         lambda e: metrics.brier(e.labels, np.where(e.probs > 0, np.nan, 0.0))),
    case("metrics/ece_num_bins_zero", ValueError, r"num_bins=0 is not allowed",
         lambda e: metrics.ece(e.labels, e.probs, num_bins=0)),
    case("metrics/ece_num_bins_float", TypeError, r"num_bins must be an int >= 1; got 2\.5",
         lambda e: metrics.ece(e.labels, e.probs, num_bins=2.5)),
    case("metrics/disagreement_members_of_different_shapes", ValueError,
         r"member_probs holds members of different shapes: member_probs\[0\] has shape \(4, 3\) "
         r"but member_probs\[1\] has shape \(2, 3\)",
         lambda e: metrics.disagreement([e.probs, e.probs[:2]])),
    case("metrics/disagreement_one_member", ValueError,
         r"member_probs must hold at least 2 members",
         lambda e: metrics.disagreement([e.probs])),
    case("metrics/kl_diversity_2d", ValueError, r"member_probs must have shape \(M, N, K\)",
         lambda e: metrics.kl_diversity(e.probs)),
    case("metrics/ood_auroc_empty_scores", ValueError, r"scores_out must be a non-empty 1-D",
         lambda e: metrics.ood_auroc([0.1, 0.2], [])),
    case("metrics/ood_auroc_nan_scores", ValueError, r"scores_in must not contain NaN",
         lambda e: metrics.ood_auroc([0.1, np.nan], [0.3])),
    case("metrics/ood_aupr_positive_unknown", ValueError, r"positive='both' is not supported",
         lambda e: metrics.ood_aupr([0.1], [0.2], positive="both")),
    case("metrics/fpr_at_tpr_zero", ValueError, r"tpr=0 is not allowed",
         lambda e: metrics.fpr_at_tpr([0.1], [0.2], tpr=0)),
    case("metrics/logits_to_probs_nan", ValueError, r"logits must not contain NaN",
         lambda e: metrics.logits_to_probs([[np.nan, 1.0]])),
    case("metrics/logits_to_probs_axis_out_of_range", ValueError,
         r"axis=5 is not allowed; it must be an int in \[-2, 1\]",
         lambda e: metrics.logits_to_probs([[1.0, 2.0]], axis=5)),
    case("metrics/logits_to_probs_axis_str", TypeError, r"axis must be an int .*'last'",
         lambda e: metrics.logits_to_probs([[1.0, 2.0]], axis="last")),
    case("metrics/summary_prefix_not_str", TypeError, r"prefix must be a str; got 5",
         lambda e: metrics.summary(e.labels, np.stack([e.probs] * 2), prefix=5)),
    case("metrics/member_probs_not_array_like", TypeError, r"member_probs must ",
         lambda e: metrics.ensemble_probs(object())),
]

KERAS_METRICS = [
    case("keras_metrics/nll_from_logits_str", TypeError,
         r"from_logits must be True or False; got 'yes'",
         lambda e: keras_metrics.NegativeLogLikelihood(from_logits="yes")),
    case("keras_metrics/nll_eps_negative", ValueError, r"eps=-1\.0 is not allowed",
         lambda e: keras_metrics.NegativeLogLikelihood(eps=-1.0)),
    case("keras_metrics/brier_from_logits_int", TypeError, r"from_logits must be True or False",
         lambda e: keras_metrics.BrierScore(from_logits=1)),
    case("keras_metrics/ece_num_bins_zero", ValueError, r"num_bins=0 is not allowed",
         lambda e: keras_metrics.ExpectedCalibrationError(num_bins=0)),
    case("keras_metrics/brier_name_int", TypeError, r"name must be a str; got 5",
         lambda e: keras_metrics.BrierScore(name=5)),
    case("keras_metrics/nll_update_rank_one_predictions", ValueError,
         r"y_pred must have shape \(batch, \.\.\., K\)",
         lambda e: keras_metrics.NegativeLogLikelihood().update_state([0, 1], [0.5, 0.5])),
    case("keras_metrics/metric_direction_model_not_a_model", TypeError,
         r"model must be a keras\.Model; got str",
         lambda e: keras_metrics.metric_direction("mlp", "val_loss")),
    case("keras_metrics/metric_direction_monitor_not_str", TypeError,
         r"monitor must be a str; got 5", lambda e: keras_metrics.metric_direction(e.mlp(), 5)),
    case("keras_metrics/metric_direction_monitor_empty", ValueError,
         r"monitor='' is not allowed", lambda e: keras_metrics.metric_direction(e.mlp(), "")),
]

# ================================================================================= evaluation
EVALUATION = [
    case("evaluation/make_data_images_list", TypeError, r"test_images must be a numpy array",
         lambda e: evaluation.make_data([[0]], [0])),
    case("evaluation/make_data_images_empty", ValueError, r"test_images has shape \(0, 8, 8, 1\)",
         lambda e: evaluation.make_data(e.images(n=0), np.zeros(0, "int64"))),
    case("evaluation/make_data_label_count", ValueError, r"test_labels must be 2 integer labels",
         lambda e: evaluation.make_data(e.images(), [0, 1, 2])),
    case("evaluation/make_data_ood_not_dict", TypeError, r"ood must be a dict",
         lambda e: evaluation.make_data(e.images(), [0, 1], ood=[e.images()])),
    case("evaluation/make_data_ood_wrong_shape", ValueError, r"ood\['svhn'\] images have shape",
         lambda e: evaluation.make_data(e.images(), [0, 1], ood={"svhn": e.images(size=4)})),
    case("evaluation/make_data_corruption_unknown", ValueError, r"corruptions='smoke'",
         lambda e: evaluation.make_data(e.images(), [0, 1], corruptions=["smoke"])),
    case("evaluation/make_data_severity_six", ValueError, r"severities=6 is not allowed",
         lambda e: evaluation.make_data(e.images(), [0, 1], corruptions=["fog"],
                                        severities=(6,))),
    case("evaluation/make_data_severities_empty", ValueError, r"severities is empty",
         lambda e: evaluation.make_data(e.images(), [0, 1], corruptions=["fog"],
                                        severities=())),
    case("evaluation/make_data_corruption_seed_float", TypeError,
         r"corruption_seed must be an int; got 0\.5",
         lambda e: evaluation.make_data(e.images(), [0, 1], corruption_seed=0.5)),
    case("evaluation/make_data_keep_corrupted_str", TypeError,
         r"keep_corrupted must be True or False; got 'no'",
         lambda e: evaluation.make_data(e.images(), [0, 1], keep_corrupted="no")),
    case("evaluation/predict_model_not_a_model", TypeError, r"models\[0\] must be a keras\.Model",
         lambda e: evaluation.predict(["mlp"], evaluation.make_data(e.images(), [0, 1]))),
    case("evaluation/predict_data_not_evaluation_data", TypeError,
         r"data must be an EvaluationData", lambda e: evaluation.predict([e.mlp()], e.images())),
    case("evaluation/predict_batch_size_zero", ValueError, r"batch_size=0 is not allowed",
         lambda e: evaluation.predict([e.mlp()], evaluation.make_data(e.images(), [0, 1]),
                                      batch_size=0)),
    case("evaluation/predict_model_input_shape_differs", ValueError,
         r"models\[0\]='mlp' takes inputs of shape \(None, 16\); the images of data have "
         r"shape \(None, 8, 8, 1\)",
         lambda e: evaluation.predict([e.mlp()], evaluation.make_data(e.images(), [0, 1]))),
    case("evaluation/evaluate_members_empty", ValueError, r"members is empty",
         lambda e: evaluation.evaluate([], (e.images(), [0, 1]))),
    case("evaluation/evaluate_members_str", TypeError, r"members must be",
         lambda e: evaluation.evaluate("tickets", (e.images(), [0, 1]))),
    case("evaluation/evaluate_combine_unknown", ValueError, r"combine='median' is not supported",
         lambda e: evaluation.evaluate([e.mlp()], (e.images(), [0, 1]), combine="median")),
    case("evaluation/evaluate_num_bins_zero", ValueError, r"num_bins=0 is not allowed",
         lambda e: evaluation.evaluate([e.mlp()], (e.images(), [0, 1]), num_bins=0)),
    case("evaluation/evaluate_training_macs_negative", ValueError,
         r"training_macs=-1 is not allowed",
         lambda e: evaluation.evaluate([_raise_if_predicted()], (e.images(), [0, 1]),
                                       training_macs=-1)),
]


def _raise_if_predicted():
    """A model whose prediction fails the test: arguments must be checked before predicting."""

    class _NeverPredict(keras.Model):
        def call(self, inputs):
            raise AssertionError("evaluate predicted before checking its arguments")

    model = _NeverPredict(name="never_predict")
    model.built = True
    return model


# ==================================================================================== recipes
RECIPES = [
    case("recipes/train_dense_build_fn_not_callable", TypeError,
         r"build_fn must be a callable returning a keras\.Model; got 'mlp' \(str\)",
         lambda e: recipes.train_dense("mlp", _train(e), **_recipe_kwargs(e))),
    case("recipes/train_dense_build_fn_is_a_model", TypeError,
         r"build_fn must be a callable returning a keras\.Model .*got the model 'mlp' itself",
         lambda e: recipes.train_dense(e.mlp(), _train(e), **_recipe_kwargs(e))),
    case("recipes/train_dense_train_data_none", ValueError, r"train_data=None",
         lambda e: recipes.train_dense(_never_called, None, **_recipe_kwargs(e))),
    case("recipes/train_dense_train_data_str", TypeError, r"train_data must be .*got str",
         lambda e: recipes.train_dense(_never_called, "mnist", **_recipe_kwargs(e))),
    case("recipes/train_dense_val_monitor_without_validation", ValueError,
         r"validation_data=None: .*monitor='val_accuracy'",
         lambda e: recipes.train_dense(_never_called, _train(e),
                                       **_recipe_kwargs(e, validation_data=None))),
    case("recipes/train_dense_validation_data_str", TypeError,
         r"validation_data must be an \(x, y\) tuple.*got str",
         lambda e: recipes.train_dense(_never_called, _train(e),
                                       **_recipe_kwargs(e, validation_data="val"))),
    case("recipes/train_dense_validation_data_one_item", ValueError,
         r"validation_data must be \(x, y\) or \(x, y, sample_weight\); got a tuple of 1",
         lambda e: recipes.train_dense(_never_called, _train(e),
                                       **_recipe_kwargs(e, validation_data=(e.x,)))),
    case("recipes/train_dense_epochs_zero", ValueError, r"epochs=0 is not allowed",
         lambda e: recipes.train_dense(_never_called, _train(e), **_recipe_kwargs(e, epochs=0))),
    case("recipes/train_dense_batch_size_zero", ValueError, r"batch_size=0 is not allowed",
         lambda e: recipes.train_dense(_never_called, _train(e), batch_size=0,
                                       **_recipe_kwargs(e))),
    case("recipes/train_dense_strategy_str", TypeError, r"strategy must be a tf\.distribute",
         lambda e: recipes.train_dense(_never_called, _train(e), strategy="mirrored",
                                       **_recipe_kwargs(e))),
    case("recipes/train_dense_callbacks_not_callbacks", TypeError,
         r"callbacks must hold keras\.callbacks\.Callback objects",
         lambda e: recipes.train_dense(_never_called, _train(e), callbacks=["tensorboard"],
                                       **_recipe_kwargs(e))),
    case("recipes/train_dense_fit_kwargs_sets_epochs", ValueError,
         r"fit_kwargs sets 'epochs'",
         lambda e: recipes.train_dense(_never_called, _train(e), fit_kwargs={"epochs": 3},
                                       **_recipe_kwargs(e))),
    case("recipes/train_dense_overwrite_str", TypeError, r"overwrite must be True or False",
         lambda e: recipes.train_dense(_never_called, _train(e), overwrite="yes",
                                       **_recipe_kwargs(e))),
    case("recipes/train_dense_metadata_list", TypeError,
         r"metadata must be a dict or None; got .*list",
         lambda e: recipes.train_dense(_never_called, _train(e), metadata=["mnist"],
                                       **_recipe_kwargs(e))),
    case("recipes/train_dense_metadata_reserved_keys", ValueError,
         r"metadata sets \['index', 'seed'\], which ft_keras sets itself",
         lambda e: recipes.train_dense(_never_called, _train(e), metadata={"seed": 1, "index": 0},
                                       **_recipe_kwargs(e))),
    case("recipes/train_dense_metadata_not_json", TypeError,
         r"metadata must be JSON-serialisable",
         lambda e: recipes.train_dense(_never_called, _train(e), metadata={"model": e.mlp()},
                                       **_recipe_kwargs(e))),
    case("recipes/train_deep_ensemble_num_members_zero", ValueError,
         r"num_members=0 is not allowed",
         lambda e: recipes.train_deep_ensemble(_never_called, 0, _train(e), **_recipe_kwargs(e))),
    case("recipes/train_deep_ensemble_num_members_float", TypeError,
         r"num_members must be an int >= 1; got 2\.0",
         lambda e: recipes.train_deep_ensemble(_never_called, 2.0, _train(e),
                                               **_recipe_kwargs(e))),
    case("recipes/train_dst_ensemble_sparsity_one", ValueError, r"sparsity=1\.0 is not allowed",
         lambda e: recipes.train_dst_ensemble(_never_called, 2, _train(e), sparsity=1.0,
                                              **_recipe_kwargs(e))),
    case("recipes/train_dst_ensemble_distribution_unknown", ValueError,
         r"distribution='random' is not supported",
         lambda e: recipes.train_dst_ensemble(_never_called, 2, _train(e), distribution="random",
                                              **_recipe_kwargs(e))),
    case("recipes/train_dst_ensemble_dst_kwargs_list", TypeError,
         r"dst_kwargs must be a dict or None; got list",
         lambda e: recipes.train_dst_ensemble(_never_called, 2, _train(e), dst_kwargs=[],
                                              **_recipe_kwargs(e))),
    case("recipes/train_dst_ensemble_dst_kwargs_bad_value", ValueError,
         r"update_every=0 is not allowed",
         lambda e: recipes.train_dst_ensemble(_never_called, 2, _train(e),
                                              dst_kwargs={"update_every": 0},
                                              **_recipe_kwargs(e))),
    case("recipes/train_static_sparse_ensemble_keep_dense_int", TypeError,
         r"keep_dense must be a str or an iterable",
         lambda e: recipes.train_static_sparse_ensemble(_never_called, 2, _train(e),
                                                        keep_dense=1, **_recipe_kwargs(e))),
    case("recipes/train_edst_monitor_none", ValueError, r"monitor=None",
         lambda e: recipes.train_edst(_never_called, 2, _train(e), monitor=None,
                                      **_edst_kwargs(e))),
    case("recipes/train_edst_refine_epochs_zero", ValueError, r"refine_epochs=0 is not allowed",
         lambda e: recipes.train_edst(_never_called, 2, _train(e),
                                      **_edst_kwargs(e, refine_epochs=0))),
    case("recipes/train_edst_refine_lr_scalar", TypeError, r"refine_lr must be two learning rates",
         lambda e: recipes.train_edst(_never_called, 2, _train(e), refine_lr=0.01,
                                      **_edst_kwargs(e))),
    case("recipes/train_edst_explore_fraction_above_one", ValueError,
         r"explore_fraction=2 is not allowed",
         lambda e: recipes.train_edst(_never_called, 2, _train(e), explore_fraction=2,
                                      **_edst_kwargs(e))),
    case("recipes/train_edst_dst_kwargs_bad_value", ValueError,
         r"grow='largest' is not supported",
         lambda e: recipes.train_edst(_never_called, 2, _train(e),
                                      dst_kwargs={"grow": "largest"}, **_edst_kwargs(e))),
    case("recipes/train_edst_dst_kwargs_sets_num_tickets", ValueError,
         r"dst_kwargs sets \['num_tickets'\], which train_edst sets",
         lambda e: recipes.train_edst(_never_called, 2, _train(e), dst_kwargs={"num_tickets": 3},
                                      **_edst_kwargs(e))),
    case("recipes/train_checkpoint_ensemble_num_members_zero", ValueError,
         r"num_members=0 is not allowed",
         lambda e: recipes.train_checkpoint_ensemble(_never_called, 0, _train(e),
                                                     **_edst_kwargs(e))),
    case("recipes/train_checkpoint_ensemble_dst_kwargs_bad_value", ValueError,
         r"drop_fraction=0 is not allowed",
         lambda e: recipes.train_checkpoint_ensemble(_never_called, 2, _train(e),
                                                     dst_kwargs={"drop_fraction": 0},
                                                     **_edst_kwargs(e))),
    case("recipes/train_pf_ensemble_finetune_epochs_zero", ValueError,
         r"finetune_epochs=0 is not allowed",
         lambda e: recipes.train_pf_ensemble(
             _never_called, 2, _train(e), validation_data=(e.x, e.y), dense_epochs=1,
             finetune_epochs=0, ticket_dir=e.path("pf"))),
    case("recipes/train_pf_ensemble_finetune_compile_fn_not_callable", TypeError,
         r"finetune_compile_fn must be",
         lambda e: recipes.train_pf_ensemble(
             _never_called, 2, _train(e), validation_data=(e.x, e.y), dense_epochs=1,
             finetune_epochs=1, ticket_dir=e.path("pf"), finetune_compile_fn="sgd")),
    case("recipes/make_compile_fn_optimizer_unknown", ValueError,
         r"optimizer='rmsprop' is not supported",
         lambda e: recipes.make_compile_fn(optimizer="rmsprop")),
    case("recipes/make_compile_fn_momentum_one", ValueError, r"momentum=1\.0 is not allowed",
         lambda e: recipes.make_compile_fn(momentum=1.0)),
    case("recipes/make_compile_fn_unknown_keyword", TypeError,
         r"make_compile_fn got \['colour'\], which model\.compile does not take",
         lambda e: recipes.make_compile_fn(colour="red")),
    case("recipes/learning_rate_schedule_learning_rate_zero", ValueError,
         r"learning_rate=0 is not allowed",
         lambda e: recipes.learning_rate_schedule("cosine", 0, decay_steps=10)),
    case("recipes/prune_global_magnitude_sparsity_one", ValueError,
         r"sparsity=1\.0 is not allowed",
         lambda e: recipes.prune_global_magnitude(e.mlp(), 1.0)),
]

# ====================================================================================== flops
FLOPS = [
    case("flops/forward_macs_model_not_a_model", TypeError, r"model must be a keras\.Model",
         lambda e: flops.forward_macs("mlp")),
    case("flops/forward_macs_unbuilt_model", ValueError, r"model='unbuilt' is not built",
         lambda e: flops.forward_macs(keras.Sequential([keras.layers.Dense(3)], name="unbuilt"))),
    case("flops/forward_macs_dense_str", TypeError, r"dense must be True or False; got 'yes'",
         lambda e: flops.forward_macs(e.mlp(), dense="yes")),
    case("flops/macs_to_flops_negative", ValueError, r"macs=-1 is not allowed",
         lambda e: flops.macs_to_flops(-1)),
    case("flops/macs_to_flops_str", TypeError, r"macs must be an int >= 0; got '10'",
         lambda e: flops.macs_to_flops("10")),
    case("flops/layer_forward_macs_not_a_layer", TypeError, r"layer must be",
         lambda e: flops.layer_forward_macs("dense")),
    case("flops/layer_forward_macs_density_above_one", ValueError, r"density=1\.5 is not allowed",
         lambda e: flops.layer_forward_macs(e.mlp().layers[0], density=1.5)),
    case("training_cost/training_macs_steps_negative", ValueError, r"steps=-1 is not allowed",
         lambda e: training_cost.training_macs(e.mlp(), -1, 8, sparse=False)),
    case("training_cost/training_macs_batch_size_zero", ValueError,
         r"batch_size=0 is not allowed",
         lambda e: training_cost.training_macs(e.mlp(), 10, 0, sparse=False)),
    case("training_cost/training_macs_grow_unknown", ValueError,
         r"grow='largest' is not supported",
         lambda e: training_cost.training_macs(e.sparse(), 10, 8, grow="largest")),
    case("training_cost/training_macs_sparse_str", TypeError,
         r"sparse must be True or False; got 'yes'",
         lambda e: training_cost.training_macs(e.sparse(), 10, 8, sparse="yes")),
    case("training_cost/dst_update_steps_update_every_float", TypeError,
         r"update_every must be an int >= 1; got 2\.5",
         lambda e: training_cost.dst_update_steps(10, 2.5)),
    case("training_cost/dst_update_steps_start_after_end", ValueError,
         r"start_step=20 must be smaller than end_step=10",
         lambda e: training_cost.dst_update_steps(100, 5, end_step=10, start_step=20)),
    case("training_cost/edst_update_steps_num_tickets_zero", ValueError,
         r"num_tickets=0 is not allowed",
         lambda e: training_cost.edst_update_steps(1, 1, 0, 10, 5)),
    case("flops/inference_macs_ensemble_empty", ValueError, r"members_or_macs is empty",
         lambda e: flops.inference_macs_ensemble([])),
    case("flops/inference_macs_ensemble_negative", ValueError, r"members_or_macs\[0\]=-1",
         lambda e: flops.inference_macs_ensemble([-1])),
    case("flops/inference_macs_ensemble_str", TypeError, r"members_or_macs",
         lambda e: flops.inference_macs_ensemble("mlp")),
    case("flops/relative_cost_reference_zero", ValueError, r"dense_reference=0 is not allowed",
         lambda e: flops.relative_cost(10, 0)),
]

# ============================================================================ data, corruptions
DATA = [
    case("data/load_name_unknown", ValueError, r"name='imagenet' is not supported",
         lambda e: data.load("imagenet")),
    case("data/load_numpy_name_not_str", TypeError, r"name must be one of .*\(int\)",
         lambda e: data.load_numpy(10)),
    case("data/load_numpy_data_dir_missing", ValueError, r"data_dir='.*nowhere' does not exist",
         lambda e: data.load_numpy("mnist", "test", data_dir=e.path("nowhere"))),
    case("data/load_data_dir_is_a_file", ValueError, r"data_dir='.*a_file\.txt' is a file",
         lambda e: data.load("mnist", "test", data_dir=e.file())),
    case("data/load_data_dir_int", TypeError, r"data_dir must be a path.*\(int\)",
         lambda e: data.load("mnist", "test", data_dir=5)),
    case("data/load_numpy_empty_slice", ValueError, r"split='train\[50:10\]' selects no examples",
         lambda e: data.load_numpy("mnist", "train[50:10]")),
    case("data/load_split_bad_syntax", ValueError, r"split='train\[::2\]'",
         lambda e: data.load("mnist", "train[::2]")),
    case("data/load_split_unknown_name", ValueError, r"split='validation'.*unknown split name",
         lambda e: data.load("mnist", "validation")),
    case("data/load_split_not_str", TypeError, r"split must be a str.*\(int\)",
         lambda e: data.load("mnist", 5)),
    case("data/load_as_supervised_str", TypeError, r"as_supervised must be True or False",
         lambda e: data.load("mnist", "test", as_supervised="yes")),
    case("data/scale_image_dtype_int", ValueError, r"dtype='int8' is not allowed",
         lambda e: data.scale_image(tf.zeros((2, 2, 1), tf.uint8), dtype="int8")),
    case("data/scale_image_dtype_unknown", ValueError, r"dtype='float17' is not allowed",
         lambda e: data.scale_image(tf.zeros((2, 2, 1), tf.uint8), dtype="float17")),
    case("data/normalize_not_a_dataset", TypeError, r"ds must be a tf\.data\.Dataset; got list",
         lambda e: data.normalize([1, 2])),
]

CORRUPTIONS = [
    case("corruptions/corrupt_name_unknown", ValueError, r"name='snow' is not supported",
         lambda e: corruptions.corrupt(e.images(), "snow", 1)),
    case("corruptions/corrupt_severity_zero", ValueError, r"severity=0 is not allowed",
         lambda e: corruptions.corrupt(e.images(), "fog", 0)),
    case("corruptions/corrupt_severity_float", TypeError, r"severity must be an int.*2\.0",
         lambda e: corruptions.corrupt(e.images(), "fog", 2.0)),
    case("corruptions/corrupt_images_float", TypeError, r"images must have dtype uint8",
         lambda e: corruptions.corrupt(e.images(dtype="float32"), "fog", 1)),
    case("corruptions/corrupt_images_2d", ValueError, r"images.*shape",
         lambda e: corruptions.corrupt(np.zeros((8, 8), "uint8"), "fog", 1)),
    case("corruptions/corrupt_seed_negative", ValueError, r"seed=-1 is not allowed",
         lambda e: corruptions.corrupt(e.images(), "fog", 1, seed=-1)),
    case("corruptions/suite_severity_nine", ValueError, r"severities\[1\]=9 is not allowed",
         lambda e: corruptions.suite(e.images(), severities=(1, 9))),
    case("corruptions/suite_names_str", TypeError, r"names must be a sequence.*'fog'",
         lambda e: corruptions.suite(e.images(), names="fog")),
    case("corruptions/corrupt_dataset_not_a_dataset", TypeError, r"ds must be a tf\.data\.Dataset",
         lambda e: corruptions.corrupt_dataset(e.images(), "fog", 1)),
    case("corruptions/corrupt_dataset_batch_size_zero", ValueError, r"batch_size=0 is not allowed",
         lambda e: corruptions.corrupt_dataset(
             tf.data.Dataset.from_tensor_slices((e.images(), [0, 1])), "fog", 1, batch_size=0)),
]

# ============================================================================ models, distribute
MODELS = [
    case("models/get_name_unknown", ValueError, r"name='vgg16' is not supported",
         lambda e: models.get("vgg16")),
    case("models/get_name_not_str", TypeError, r"name must be a model name.*\(int\)",
         lambda e: models.get(20)),
    case("models/get_conflicting_depth", ValueError, r"fixes .*'depth'.*conflicting",
         lambda e: models.get("resnet20", depth=32)),
    case("models/get_unknown_keyword", TypeError, r"colour",
         lambda e: models.get("mlp", colour="red")),
    case("models/mlp_hidden_str", TypeError, r"hidden",
         lambda e: models.mlp(hidden="wide")),
    case("models/mlp_num_classes_zero", ValueError, r"num_classes=0 is not allowed",
         lambda e: models.mlp(hidden=(4,), num_classes=0)),
    case("models/lenet_300_100_input_dimension_negative", ValueError,
         r"input_shape\[1\]=-1 is not allowed",
         lambda e: models.lenet_300_100(input_shape=(28, -1))),
    case("models/lenet5_input_too_small", ValueError, r"input_shape must be at least 12x12",
         lambda e: models.lenet5(input_shape=(8, 8, 1))),
    case("models/small_cnn_width_zero", ValueError, r"width=0 is not allowed",
         lambda e: models.small_cnn(width=0)),
    case("models/resnet_depth_21", ValueError, r"depth=21",
         lambda e: models.resnet(depth=21)),
    case("models/wide_resnet_dropout_one", ValueError, r"dropout_rate=1\.0 is not allowed",
         lambda e: models.wide_resnet(depth=10, width_multiplier=1, dropout_rate=1.0)),
]

DISTRIBUTE = [
    case("distribute/worker_log_dir_none", TypeError, r"log_dir must be a path.*None",
         lambda e: distribute.worker_log_dir(None)),
    case("distribute/worker_log_dir_empty", ValueError, r"log_dir='' is not allowed",
         lambda e: distribute.worker_log_dir("")),
    case("distribute/worker_log_dir_strategy_str", TypeError,
         r"strategy must be a tf\.distribute\.Strategy or None; got str",
         lambda e: distribute.worker_log_dir(e.path("logs"), strategy="mirrored")),
    case("distribute/is_chief_strategy_str", TypeError,
         r"strategy must be a tf\.distribute\.Strategy or None; got str",
         lambda e: distribute.is_chief("chief")),
    case("distribute/check_steps_per_execution_not_a_model", TypeError,
         r"model must be a keras\.Model; got str",
         lambda e: distribute.check_steps_per_execution("mlp")),
]

# ===================================================== ft_keras.tickets and ft_keras.Ensemble
# Ticket I/O, the Ensemble and the serving export (ft_keras/export.py).
TICKETS_AND_ENSEMBLE = [
    case("tickets/write_ticket_model_not_a_model", TypeError, r"model must be a keras\.Model",
         lambda e: ftk.write_ticket("mlp", e.path("t"), 0)),
    case("tickets/write_ticket_ticket_dir_int", TypeError, r"ticket_dir must be a path",
         lambda e: ftk.write_ticket(e.sparse(), 3, 0)),
    case("tickets/write_ticket_index_negative", ValueError, r"index=-1 is not allowed",
         lambda e: ftk.write_ticket(e.sparse(), e.path("t"), -1)),
    case("tickets/write_ticket_index_float", TypeError, r"index must be an int",
         lambda e: ftk.write_ticket(e.sparse(), e.path("t"), 0.0)),
    case("tickets/write_ticket_version_negative", ValueError, r"version=-1 is not allowed",
         lambda e: ftk.write_ticket(e.sparse(), e.path("t"), 0, version=-1)),
    case("tickets/write_ticket_metadata_list", TypeError, r"metadata must be a dict or None",
         lambda e: ftk.write_ticket(e.sparse(), e.path("t"), 0, metadata=["edst"])),
    case("tickets/write_ticket_metadata_computed_key", ValueError,
         r"metadata sets \['index'\], which write_ticket computes itself",
         lambda e: ftk.write_ticket(e.sparse(), e.path("t"), 0, metadata={"index": 4})),
    case("tickets/write_ticket_ticket_dir_is_a_file", ValueError,
         r"ticket_dir='.*a_file\.txt' exists and is not a folder",
         lambda e: ftk.write_ticket(e.sparse(), e.file(), 0)),
    case("tickets/write_ticket_overwrite_str", TypeError, r"overwrite must be True or False",
         lambda e: ftk.write_ticket(e.sparse(), e.path("t"), 0, overwrite="yes")),
    case("tickets/prepare_ticket_dir_not_empty", ValueError,
         r"ticket_dir='.*folder' is not empty.*overwrite=True",
         lambda e: ftk.prepare_ticket_dir(e.folder(with_file=True))),
    case("tickets/prepare_ticket_dir_is_a_file", ValueError,
         r"ticket_dir='.*a_file\.txt' exists and is not a folder",
         lambda e: ftk.prepare_ticket_dir(e.file())),
    case("tickets/list_tickets_missing_folder", ValueError,
         r"ticket_dir='.*nowhere' does not exist",
         lambda e: ftk.list_tickets(e.path("nowhere"))),
    case("tickets/list_tickets_no_ticket", ValueError,
         r"ticket_dir='.*folder' holds no complete ticket",
         lambda e: ftk.list_tickets(e.folder())),
    case("tickets/read_ticket_path_int", TypeError, r"path must be a path",
         lambda e: ftk.read_ticket(0)),
    case("tickets/read_ticket_missing_folder", ValueError,
         r"path='.*nowhere': the ticket folder does not exist",
         lambda e: ftk.read_ticket(e.path("nowhere"))),
    case("tickets/read_ticket_empty_folder", ValueError, r"ticket folder '.*folder' is empty",
         lambda e: ftk.read_ticket(e.folder())),
    case("tickets/write_ticket_softmax_output", ValueError,
         r"model='soft' ends in a softmax \(layer 'probs'\): a ticket must output logits",
         lambda e: ftk.write_ticket(keras.Sequential(
             [keras.Input((NUM_FEATURES,)), keras.layers.Dense(3, activation="softmax",
                                                              name="probs")], name="soft"),
             e.path("t"), 0)),
    case("tickets/prepare_ticket_dir_with_tickets_names_them", ValueError,
         r"is not empty \(1 incomplete ticket folder\(s\)\): new tickets are not mixed.*"
         r"another \(empty\) ticket_dir",
         lambda e: (os.makedirs(e.path("td/ticket_0")), ftk.prepare_ticket_dir(e.path("td")))),
    case("ensemble/members_softmax_output", ValueError,
         r"members\[0\] 'soft' ends in a softmax \(layer 'probs'\): members must output logits",
         lambda e: ftk.Ensemble([keras.Sequential(
             [keras.Input((NUM_FEATURES,)), keras.layers.Dense(3, activation="softmax",
                                                              name="probs")], name="soft")])),
    case("ensemble/members_empty", ValueError, r"members=\[\] is empty",
         lambda e: ftk.Ensemble([])),
    case("ensemble/members_one_model", TypeError, r"members must be a non-empty list",
         lambda e: ftk.Ensemble(e.mlp())),
    case("ensemble/members_not_models", TypeError, r"members\[1\] must be a keras\.Model",
         lambda e: ftk.Ensemble([e.mlp(), "mlp"])),
    case("ensemble/members_of_different_output_shapes", ValueError,
         r"members must all have the same input shape and the same output shape",
         lambda e: ftk.Ensemble([e.mlp(), e.mlp(name="wide", outputs=5)])),
    case("ensemble/combine_unknown", ValueError, r"combine='median' is not supported",
         lambda e: ftk.Ensemble([e.mlp()], combine="median")),
    case("ensemble/return_members_str", TypeError, r"return_members must be True or False",
         lambda e: ftk.Ensemble([e.mlp()], return_members="yes")),
    case("ensemble/metadata_wrong_length", ValueError, r"metadata must be None or a list of 1",
         lambda e: ftk.Ensemble([e.mlp()], metadata=[{}, {}])),
    case("ensemble/from_directory_missing_folder", ValueError,
         r"ticket_dir='.*nowhere' does not exist",
         lambda e: ftk.Ensemble.from_directory(e.path("nowhere"))),
    case("ensemble/from_directory_combine_unknown", ValueError, r"combine='mean' is not supported",
         lambda e: ftk.Ensemble.from_directory(e.path("nowhere"), combine="mean")),
    case("ensemble/ensemble_outputs_integer_logits", TypeError,
         r"member_logits must be floating point",
         lambda e: ftk.ensemble_outputs(np.zeros((2, 4, 3), "int32"))),
    case("ensemble/ensemble_outputs_rank_two", ValueError, r"member_logits must have shape",
         lambda e: ftk.ensemble_outputs(np.zeros((4, 3), "float32"))),
    case("ensemble/export_version_negative", ValueError, r"version=-1 is not allowed",
         lambda e: ftk.Ensemble([e.mlp()]).export(e.path("export"), version=-1)),
    case("tickets/list_tickets_allow_empty_str", TypeError, r"allow_empty must be True or False",
         lambda e: ftk.list_tickets(e.folder(), allow_empty="x")),
    case("ensemble/combine_int", TypeError, r"combine must be one of .*got 5",
         lambda e: ftk.Ensemble([e.mlp()], combine=5)),
    case("ensemble/metadata_str", TypeError, r"metadata must be None or a list of 1 dicts",
         lambda e: ftk.Ensemble([e.mlp()], metadata="x")),
    case("ensemble/from_directory_return_members_str", TypeError,
         r"return_members must be True or False",
         lambda e: ftk.Ensemble.from_directory(e.folder(), return_members="x")),
    case("ensemble/from_directory_allow_partial_str", TypeError,
         r"allow_partial must be True or False",
         lambda e: ftk.Ensemble.from_directory(e.folder(), allow_partial="x")),
    case("ensemble/export_sparse_kernels_unknown", ValueError, r"sparse_kernels='fast'",
         lambda e: ftk.Ensemble([e.mlp()]).export(e.path("export"), sparse_kernels="fast")),
    case("ensemble/export_input_range_reversed", ValueError, r"input_range=\(1, 0\)",
         lambda e: ftk.Ensemble([e.mlp()]).export(e.path("export"), input_range=(1, 0))),
    case("export/export_models_not_models", TypeError, r"models\[0\] must be a keras\.Model",
         lambda e: ftk.export.export_models(["mlp"], e.path("export"),
                                            lambda logits: {"logits": logits})),
]

CATALOGUE = (SPARSIFY + DYNAMIC + STATIC + FREE_TICKETS + TICKET_CHECKPOINT + SCHEDULES
             + MASKS_LAYERS_TRAINING + METRICS + KERAS_METRICS + EVALUATION + RECIPES + FLOPS
             + DATA + CORRUPTIONS + MODELS + DISTRIBUTE + TICKETS_AND_ENSEMBLE)


@pytest.mark.parametrize("call, error, pattern", CATALOGUE)
def test_bad_input_is_refused_with_a_message_naming_it(env, call, error, pattern):
    with pytest.raises(Exception) as info:
        call(env)
    assert type(info.value) is error, (
        f"expected {error.__name__}, got {type(info.value).__name__}: {info.value}")
    assert re.search(pattern, str(info.value)), (
        f"message does not match {pattern!r}: {info.value}")


def test_catalogue_ids_are_unique_and_cover_every_public_module():
    ids = [param.id for param in CATALOGUE]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 80
    groups = {case_id.split("/")[0] for case_id in ids}
    assert {"sparsify", "strip", "sparsity_report", "masked_layers", "layer_densities",
            "dynamic_sparsity", "static_sparsity", "free_tickets", "ticket_checkpoint",
            "schedules", "masks", "layers", "training", "metrics", "keras_metrics",
            "evaluation", "recipes", "flops", "data", "corruptions", "models", "distribute",
            "tickets", "ensemble"} <= groups
