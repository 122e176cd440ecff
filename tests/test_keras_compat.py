"""Canary tests: one per private Keras internal that ft_keras/_keras_compat.py uses.

Each test fails the day Keras changes the internal it names (see the module docstring of
ft_keras/_keras_compat.py for the list and what each is used for).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import ft_keras as ftk
from ft_keras import _keras_compat as compat


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, name="a"),
                              keras.layers.Dense(2, name="b")])
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)
    return model


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(8, 6)).astype("float32"), rng.integers(0, 2, 8)


def test_keras_version_is_supported():
    low, high = compat.SUPPORTED_KERAS
    assert low <= compat.keras_version() < high
    assert compat.keras_version("3.15.1") == (3, 15)
    assert compat.keras_version("3.16.0.dev2026") == (3, 16)


def test_1_update_step_is_called_once_per_variable_with_the_reduced_gradient():
    model = _model()
    x, y = _data()
    calls = []
    optimizer = model.optimizer
    original = compat.original_update_step(optimizer)

    def hook(gradient, variable, learning_rate):
        calls.append(compat.variable_key(optimizer, variable))
        return original(gradient, variable, learning_rate)

    compat.install_update_step(optimizer, hook)
    try:
        model.train_on_batch(x, y)
    finally:
        compat.remove_update_step(optimizer, hook)
    keys = [compat.variable_key(optimizer, v) for v in model.trainable_variables]
    assert set(calls) == set(keys) and len(calls) % len(keys) == 0  # once per trace
    assert "update_step" not in optimizer.__dict__


def test_2_variable_key_and_index():
    model = _model()
    optimizer = model.optimizer
    optimizer.build(model.trainable_variables)
    keys = {compat.variable_key(optimizer, v) for v in model.trainable_variables}
    assert len(keys) == len(model.trainable_variables)
    for i, variable in enumerate(model.trainable_variables):
        assert compat.variable_index(optimizer, variable) == i


_OPTIMIZERS = {
    "SGD": dict(momentum=0.9), "Adam": dict(amsgrad=True), "AdamW": dict(amsgrad=True), "Adamax": {},
    "Adagrad": {}, "Adadelta": {}, "Adafactor": {}, "Ftrl": {}, "Lamb": {}, "Lion": {},
    "Nadam": {}, "RMSprop": dict(momentum=0.9, centered=True), "ScheduleFreeAdamW": {},
}


@pytest.mark.parametrize("name", sorted(compat.SLOT_ATTRIBUTES))
def test_3_slot_attributes_of_every_known_optimizer(name):
    """Every attribute listed for an optimizer exists after build with one entry per variable,
    and every kernel-shaped per-variable list of the optimizer is listed (none is missed)."""
    optimizer = getattr(keras.optimizers, name)(**_OPTIMIZERS[name])
    kernel = keras.Variable(np.ones((3, 4), "float32"))
    bias = keras.Variable(np.ones((4,), "float32"))
    optimizer.build([kernel, bias])
    listed = compat.SLOT_ATTRIBUTES[name]
    for attribute in listed:
        assert len(getattr(optimizer, attribute)) == 2, attribute
    per_variable = {k for k, v in vars(optimizer).items()
                    if isinstance(v, (list, tuple)) and len(v) == 2
                    and any(isinstance(e, keras.Variable) and tuple(e.shape) == (3, 4)
                            for e in v)}
    assert per_variable - {"_trainable_variables"} <= set(listed)
    slots = compat.optimizer_slots(optimizer, kernel)
    assert slots and all(tuple(s.shape) == (3, 4) for s in slots)


def test_3_unknown_and_non_elementwise_optimizers_are_refused():
    class Mine(keras.optimizers.Optimizer):
        def update_step(self, gradient, variable, learning_rate):
            variable.assign_sub(learning_rate * gradient)

    kernel = keras.Variable(np.ones((3, 4), "float32"))
    mine = Mine(0.1)
    mine.build([kernel])
    with pytest.raises(ValueError, match="Mine is unknown to ft_keras"):
        compat.optimizer_slots(mine, kernel)
    muon = keras.optimizers.Muon()
    muon.build([kernel])
    with pytest.raises(ValueError, match="Muon is not supported with masked optimizer state"):
        compat.optimizer_slots(muon, kernel)


def test_4_learning_rate_attribute():
    assert not compat.learning_rate_is_schedule(keras.optimizers.SGD(0.1))
    schedule = keras.optimizers.schedules.CosineDecay(0.1, 100)
    assert compat.learning_rate_is_schedule(keras.optimizers.SGD(schedule))


@pytest.mark.parametrize("layer", [keras.layers.Dense(3), keras.layers.Conv2D(2, 3)])
def test_5_kernel_variable_behind_the_kernel_property(layer):
    layer.build((None, 5, 5, 4) if isinstance(layer, keras.layers.Conv2D) else (None, 4))
    kernel = compat.kernel_variable(layer)
    assert isinstance(kernel, keras.Variable) and kernel is layer._kernel  # pylint: disable=W0212
    assert kernel in layer.trainable_variables


def test_6_own_variables_in_saving_order():
    layer = ftk.layers.MaskedDense(3)
    layer.build((None, 4))
    own = compat.own_variables(layer)
    assert [v.name for v in own] == ["kernel", "bias", "kernel_mask"]


def test_7_layer_graph_of_sequential_and_functional():
    model = _model()
    graph = compat.layer_graph(model)
    layers = [node.operation.name for depth in sorted(compat.nodes_by_depth(graph), reverse=True)
              for node in compat.nodes_by_depth(graph)[depth]]
    assert [n for n in layers if n in ("a", "b")] == ["a", "b"]
    assert compat.is_graph_model(model)

    class Sub(keras.Model):
        def call(self, x):
            return x

    assert compat.layer_graph(Sub()) is None
    with pytest.raises(ValueError, match="not built"):
        compat.layer_graph(keras.Sequential([keras.layers.Dense(2)]))


def test_8_trainer_functions_the_multiworker_fix_replaces():
    trainer = compat._trainer_module()  # pylint: disable=protected-access
    assert "_maybe_symbolic_build" in trainer.TensorFlowTrainer.__dict__
    assert callable(trainer.reduce_per_replica)


def test_9_in_multi_worker_mode():
    assert not compat.is_multi_worker(tf.distribute.get_strategy())
    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # no TF_CONFIG: one worker
    assert callable(strategy.extended._in_multi_worker_mode)  # pylint: disable=W0212
    assert not compat.is_multi_worker(strategy)


def test_10_compile_token_changes_with_compile_and_metric_arguments():
    model = _model()
    token = compat.compile_token(model)
    assert all(a is b for a, b in zip(token, compat.compile_token(model)))
    model.compile(model.optimizer, "mse", jit_compile=False)
    assert compat.compile_token(model)[0] is not token[0]
    model = _model()
    metrics, weighted = compat.compiled_metric_arguments(model)
    assert metrics == ["accuracy"] and weighted is None


def test_11_fit_validation_data_seen_from_a_callback():
    model = _model()
    x, y = _data()
    seen = []

    class Look(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.append(compat.fit_validation_data(self.model))

        def on_test_begin(self, logs=None):
            seen.append(list(compat.fit_validation_data(self.model)))

    model.fit(x, y, batch_size=4, epochs=1, verbose=0, validation_data=(x[:6], y[:6]),
              callbacks=[Look()])
    assert seen[0] is None  # before the first validation
    assert [len(batch[0]) for batch in seen[1]] == [4, 2]
    np.testing.assert_array_equal(np.concatenate([batch[0] for batch in seen[1]]), x[:6])
    np.testing.assert_array_equal(np.concatenate([batch[1] for batch in seen[1]]), y[:6])
    assert compat.fit_validation_data(model) is None  # after fit


def test_12_train_function_made_around_another_step_without_xla():
    model = _model()
    model.compile(model.optimizer, model.loss, jit_compile=True)
    x, y = _data()
    runs = []

    def step(data):
        # numpy_function cannot be compiled by XLA: fit fails if Keras compiled this step.
        tf.numpy_function(lambda: runs.append(1) or np.int64(0), [], tf.int64)
        return model.train_step(data)

    made = compat.make_train_function_around(model, step)
    assert model.train_function is made
    assert model.jit_compile is True and "train_step" not in model.__dict__
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    assert len(runs) == 4
    assert model.train_function is made  # fit kept the function made before it
