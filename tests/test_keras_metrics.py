"""Tests for ft_keras.keras_metrics: streaming Keras metrics (equal to the numpy metrics of
ft_keras.metrics on the same data), their declared directions and `metric_direction`."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from ft_keras.harness import keras_metrics
from ft_keras.harness import metrics
from ft_keras.harness.keras_metrics import BrierScore
from ft_keras.harness.keras_metrics import ExpectedCalibrationError
from ft_keras.harness.keras_metrics import NegativeLogLikelihood


def _random_probs(rng, shape):
    return metrics.logits_to_probs(rng.normal(scale=2.0, size=shape))


# ----------------------------------------------------------------------------- streaming metrics
def _stream(metric, batches):
    for labels, values, weights in batches:
        metric.update_state(labels, values, sample_weight=weights)
    return float(metric.result())


def test_streaming_metrics_match_numpy_over_several_batches():
    rng = np.random.default_rng(8)
    probs = _random_probs(rng, (103, 6)).astype(np.float32)
    labels = rng.integers(0, 6, size=103)
    cuts = [0, 10, 47, 48, 103]
    batches = [(labels[a:b], probs[a:b], None) for a, b in zip(cuts[:-1], cuts[1:])]
    assert _stream(ExpectedCalibrationError(), batches) == pytest.approx(
        metrics.ece(labels, probs), abs=1e-6
    )
    assert _stream(ExpectedCalibrationError(num_bins=7), batches) == pytest.approx(
        metrics.ece(labels, probs, num_bins=7), abs=1e-6
    )
    assert _stream(BrierScore(), batches) == pytest.approx(metrics.brier(labels, probs), abs=1e-6)
    assert _stream(NegativeLogLikelihood(), batches) == pytest.approx(
        metrics.nll(labels, probs), abs=1e-6
    )


def test_streaming_ece_hand_case_and_edge():
    metric = ExpectedCalibrationError(num_bins=4)
    metric.update_state([0, 1, 0], [[0.9, 0.1], [0.8, 0.2], [0.6, 0.4]])
    metric.update_state(np.array([[1], [1]]), [[0.3, 0.7], [0.5, 0.5]])
    assert float(metric.result()) == pytest.approx(0.38, abs=1e-6)


def test_streaming_metrics_from_logits_and_label_formats():
    rng = np.random.default_rng(9)
    logits = rng.normal(scale=3.0, size=(40, 4)).astype(np.float32)
    labels = rng.integers(0, 4, size=40)
    probs = metrics.logits_to_probs(logits.astype(np.float64))
    for label_format in (labels, labels[:, None], np.eye(4)[labels].astype(np.float32)):
        batches = [(label_format[:25], logits[:25], None), (label_format[25:], logits[25:], None)]
        ece_metric = ExpectedCalibrationError(from_logits=True)
        assert _stream(ece_metric, batches) == pytest.approx(metrics.ece(labels, probs), abs=1e-6)
        brier_metric = BrierScore(from_logits=True)
        assert _stream(brier_metric, batches) == pytest.approx(
            metrics.brier(labels, probs), abs=1e-6
        )
        nll_metric = NegativeLogLikelihood(from_logits=True)
        assert _stream(nll_metric, batches) == pytest.approx(metrics.nll(labels, probs), abs=1e-6)


def test_streaming_nll_eps_clipping():
    metric = NegativeLogLikelihood()
    metric.update_state([1, 0], [[1.0, 0.0], [0.5, 0.5]])
    assert float(metric.result()) == pytest.approx(metrics.nll([1, 0], [[1.0, 0.0], [0.5, 0.5]]))
    logit_metric = NegativeLogLikelihood(from_logits=True, eps=1e-6)
    logit_metric.update_state([1], [[100.0, 0.0]])  # log p(1) = -100, clipped at log(1e-6)
    assert float(logit_metric.result()) == pytest.approx(-math.log(1e-6), rel=1e-6)


def test_streaming_sample_weight_equals_repeated_examples():
    rng = np.random.default_rng(10)
    probs = _random_probs(rng, (30, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=30)
    weights = rng.integers(0, 4, size=30)
    repeated = np.repeat(np.arange(30), weights)
    for metric, fn in (
        (ExpectedCalibrationError(), metrics.ece),
        (BrierScore(), metrics.brier),
        (NegativeLogLikelihood(), metrics.nll),
    ):
        metric.update_state(labels, probs, sample_weight=weights[:, None])
        assert float(metric.result()) == pytest.approx(
            fn(labels[repeated], probs[repeated]), abs=1e-6
        )


def test_streaming_reset_state():
    for metric in (ExpectedCalibrationError(), BrierScore(), NegativeLogLikelihood()):
        metric.update_state([0], [[0.2, 0.8]])
        metric.reset_state()
        assert float(metric.result()) == 0.0
        metric.update_state([0], [[0.9, 0.1]])
        expected = {"ece": 0.1, "brier": 0.02, "nll": -math.log(0.9)}[metric.name]
        assert float(metric.result()) == pytest.approx(expected, abs=1e-6)


def test_streaming_metric_config_round_trip():
    for metric in (
        ExpectedCalibrationError(num_bins=10, from_logits=True, name="cal"),
        BrierScore(from_logits=True),
        NegativeLogLikelihood(eps=1e-6),
    ):
        clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
        assert type(clone) is type(metric)
        assert clone.get_config() == metric.get_config()
    assert ExpectedCalibrationError(num_bins=10).get_config()["num_bins"] == 10
    assert NegativeLogLikelihood(eps=1e-6).get_config()["eps"] == 1e-6


def test_streaming_metric_argument_and_shape_errors():
    with pytest.raises(TypeError, match="from_logits"):
        BrierScore(from_logits="yes")
    with pytest.raises(ValueError, match="eps"):
        NegativeLogLikelihood(eps=-1.0)
    with pytest.raises(ValueError, match="y_pred"):
        BrierScore().update_state([0, 1], [0.5, 0.5])
    with pytest.raises(ValueError, match="one-hot y_true"):
        BrierScore().update_state([[1.0, 0.0, 0.0]], [[0.5, 0.5]])
    with pytest.raises(ValueError, match="y_true"):
        BrierScore().update_state([[[0]]], [[0.5, 0.5]])


@pytest.mark.parametrize("from_logits", [False, True])
def test_streaming_metrics_in_model_evaluate(from_logits):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(100, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=100)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dense(3, activation=None if from_logits else "softmax"),
        ]
    )
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
        metrics=[
            ExpectedCalibrationError(from_logits=from_logits),
            BrierScore(from_logits=from_logits),
            NegativeLogLikelihood(from_logits=from_logits),
        ],
    )
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)  # runs the metrics in the train step
    logs = model.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)  # 7 batches
    outputs = model.predict(x, batch_size=64, verbose=0).astype(np.float64)
    probs = metrics.logits_to_probs(outputs) if from_logits else outputs
    assert logs["ece"] == pytest.approx(metrics.ece(y, probs), abs=1e-5)
    assert logs["brier"] == pytest.approx(metrics.brier(y, probs), abs=1e-5)
    assert logs["nll"] == pytest.approx(metrics.nll(y, probs), abs=1e-5)


@pytest.mark.parametrize("num_bins", [0, -3])
def test_streaming_ece_rejects_bad_num_bins(num_bins):
    with pytest.raises(ValueError, match=f"num_bins={num_bins} is not allowed"):
        ExpectedCalibrationError(num_bins=num_bins)


@pytest.mark.parametrize("num_bins", [2.5, "15", True, None])
def test_streaming_ece_rejects_num_bins_of_wrong_type(num_bins):
    # A TypeError since the argument checks were unified (it was a ValueError).
    with pytest.raises(TypeError, match="num_bins must be an int"):
        ExpectedCalibrationError(num_bins=num_bins)


def test_streaming_metrics_accept_numpy_arguments():
    assert ExpectedCalibrationError(num_bins=np.int64(7)).num_bins == 7
    assert BrierScore(from_logits=np.bool_(True)).from_logits is True
    with pytest.raises(TypeError, match="eps must be a finite number"):
        NegativeLogLikelihood(eps="1e-12")


# ----------------------------------------------------------------------------- direction
class _UserMetric(keras.metrics.Metric):
    """A user's metric: the sum of the predictions, declaring a direction or not."""

    def __init__(self, name="user", direction=None, **kwargs):
        super().__init__(name=name, **kwargs)
        if direction is not None:
            self._direction = direction
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        del y_true, sample_weight
        self.total.assign_add(tf.cast(tf.reduce_sum(y_pred), self.dtype))

    def result(self):
        return self.total


def test_ft_keras_metrics_declare_lower_is_better():
    for metric in (NegativeLogLikelihood(), BrierScore(), ExpectedCalibrationError()):
        assert metric._direction == "down"  # pylint: disable=protected-access


def _compiled_model(metric_list):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metric_list,
    )
    return model


_MONITORS = {
    "loss": "min",
    "val_loss": "min",
    "val_nll": "min",
    "brier": "min",
    "val_ece": "min",
    "val_my_nll": "min",
    "accuracy": "max",  # Keras's own accuracy metric declares "up"
    "val_auc_like": "max",  # a user metric declaring "up"
    "val_plain": None,  # a user metric declaring nothing
    "val_no_such_metric": None,
}


def _direction_model():
    return _compiled_model([
        "accuracy",
        NegativeLogLikelihood(from_logits=True),
        BrierScore(from_logits=True),
        ExpectedCalibrationError(from_logits=True),
        NegativeLogLikelihood(from_logits=True, name="my_nll"),
        _UserMetric(name="auc_like", direction="up"),
        _UserMetric(name="plain"),
    ])


def _directions(model):
    return {monitor: keras_metrics.metric_direction(model, monitor) for monitor in _MONITORS}


def test_metric_direction_before_during_and_after_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=16)
    model = _direction_model()
    # Compiled, not run: Keras has not built its compiled metrics yet (it does so when the train
    # step is traced, after on_train_begin); the direction comes from the compile arguments.
    assert _directions(model) == _MONITORS
    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["train_begin"] = _directions(self.model)

        def on_epoch_end(self, epoch, logs=None):
            seen["epoch_end"] = _directions(self.model)
            seen["logs"] = sorted(logs)

    model.fit(x, y, validation_data=(x, y), epochs=1, batch_size=8, verbose=0,
              callbacks=[Probe()])
    assert seen["train_begin"] == _MONITORS
    assert seen["epoch_end"] == _MONITORS
    assert _directions(model) == _MONITORS
    # The monitors that name a metric are the names in the logs.
    for monitor in _MONITORS:
        if monitor != "val_no_such_metric":
            assert monitor in seen["logs"], monitor


def test_metric_direction_of_string_metrics():
    model = _compiled_model(["acc", "sparse_categorical_accuracy", "mse", "kl_divergence"])
    assert keras_metrics.metric_direction(model, "val_acc") == "max"
    assert keras_metrics.metric_direction(model, "sparse_categorical_accuracy") == "max"
    assert keras_metrics.metric_direction(model, "val_mse") == "min"
    assert keras_metrics.metric_direction(model, "kl_divergence") == "min"
    # A model that is not compiled knows only the loss.
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    assert keras_metrics.metric_direction(plain, "val_loss") == "min"
    assert keras_metrics.metric_direction(plain, "val_accuracy") is None


def test_metric_direction_of_a_multi_output_model():
    inputs = keras.Input((4,))
    outputs = {"a": keras.layers.Dense(3, name="a")(inputs),
               "b": keras.layers.Dense(2, name="b")(inputs)}
    model = keras.Model(inputs, outputs)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile("sgd", loss={"a": loss, "b": loss},
                  metrics={"a": [NegativeLogLikelihood(from_logits=True)], "b": ["accuracy"]})
    expected = {"val_a_nll": "min", "b_accuracy": "max", "val_b_nll": None}
    assert {m: keras_metrics.metric_direction(model, m) for m in expected} == expected
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 4)).astype(np.float32)
    y = {"a": rng.integers(0, 3, size=8), "b": rng.integers(0, 2, size=8)}
    history = model.fit(x, y, validation_data=(x, y), epochs=1, verbose=0)
    assert "val_a_nll" in history.history and "b_accuracy" in history.history
    assert {m: keras_metrics.metric_direction(model, m) for m in expected} == expected


def test_keras_callbacks_read_the_same_direction():
    # Keras's own callbacks in mode="auto" read the declared direction too: EarlyStopping on
    # val_nll must minimise (before the metrics declared it, Keras refused the monitor).
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=16)
    model = _compiled_model([NegativeLogLikelihood(from_logits=True), "accuracy"])
    stop = keras.callbacks.EarlyStopping(monitor="val_nll", mode="auto", patience=5)
    model.fit(x, y, validation_data=(x, y), epochs=1, verbose=0, callbacks=[stop])
    assert stop.monitor_op is keras.ops.less


def test_metric_direction_argument_errors():
    model = _direction_model()
    with pytest.raises(TypeError, match="model must be a keras.Model"):
        keras_metrics.metric_direction("model", "val_nll")
    with pytest.raises(TypeError, match="monitor must be a str"):
        keras_metrics.metric_direction(model, None)
    with pytest.raises(ValueError, match="monitor='' is not allowed"):
        keras_metrics.metric_direction(model, "")


if __name__ == "__main__":  # bazel test / python tests/test_keras_metrics.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
