"""Streaming Keras metrics of calibration and likelihood, for ``model.compile(metrics=[...])``.

`NegativeLogLikelihood`, `BrierScore` and `ExpectedCalibrationError` accumulate sufficient
statistics in float64 variables, run inside the compiled ``fit`` / ``evaluate`` steps, and their
``result()`` equals the numpy function of `ft_keras.metrics` (``nll``, ``brier``, ``ece``) on all
the data seen since the last ``reset_state()``. The conventions (labels, bins, logarithms) are
those of `ft_keras.metrics`; the metrics themselves are defined in docs/method.md, section 8.

Each metric declares whether lower or higher is better the way Keras's own metrics do (a
``_direction`` of ``"down"`` or ``"up"``), so Keras callbacks in ``mode="auto"``
(``ModelCheckpoint``, ``EarlyStopping``) and `metric_direction` pick the right direction for
``monitor="val_nll"``.

Example:

>>> model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
...               metrics=["accuracy", NegativeLogLikelihood(from_logits=True),
...                        BrierScore(from_logits=True),
...                        ExpectedCalibrationError(from_logits=True)])
>>> model.fit(x, y, validation_data=(x_val, y_val), epochs=2)          # doctest: +SKIP
>>> metric_direction(model, "val_nll")                                   # doctest: +SKIP
'min'
"""

import keras
import numpy as np
import tensorflow as tf

from ft_keras import _checks
from ft_keras._keras_compat import metric_direction

__all__ = [
    "BrierScore",
    "ExpectedCalibrationError",
    "NegativeLogLikelihood",
    "metric_direction",
]

def _check_from_logits(from_logits):
    return _checks.check_bool("from_logits", from_logits)


def _check_eps(eps):
    return _checks.check_real("eps", eps, low=0.0, high=1.0, high_open=True)


def _check_num_bins(num_bins):
    return _checks.check_positive_int("num_bins", num_bins)


# ------------------------------------------------------------------------------ metrics
class _ProbabilityMetric(keras.metrics.Metric):
    """Shared plumbing: label / prediction / sample-weight handling of the streaming metrics.

    ``y_true`` holds class indices shaped like ``y_pred`` without its class axis (a trailing
    axis of size 1 is squeezed) or one-hot rows shaped like ``y_pred`` (reduced to their
    argmax). ``y_pred`` holds probabilities (or logits with ``from_logits=True``) with classes on
    the last axis; leading axes are flattened. Label ranges are not checked inside the graph:
    labels outside ``[0, K)`` count as wrong with probability 0.
    """

    def __init__(self, from_logits=False, name=None, dtype=None):
        if name is not None:
            _checks.check_str("name", name)
        super().__init__(name=name, dtype=dtype)
        self.from_logits = _check_from_logits(from_logits)

    def _prepare(self, y_true, y_pred, sample_weight):
        """Returns float64 probs (N, K), log-probs (N, K), int labels (N,), weights (N,)."""
        y_pred = tf.convert_to_tensor(y_pred)
        y_true = tf.convert_to_tensor(y_true)
        rank = y_pred.shape.rank
        num_classes = y_pred.shape[-1] if rank else None
        if rank is None or rank < 2:
            raise ValueError(
                f"{self.name}: y_pred must have shape (batch, ..., K) with classes last; "
                f"got shape {y_pred.shape}."
            )
        y_pred = tf.cast(y_pred, tf.float64)
        if y_true.shape.rank is None:  # unknown rank: take it as class indices
            pass
        elif y_true.shape.rank == rank and y_true.shape[-1] == 1 and num_classes != 1:
            y_true = tf.squeeze(y_true, axis=-1)
        elif y_true.shape.rank == rank:
            if y_true.shape[-1] is not None and num_classes is not None:
                if y_true.shape[-1] != num_classes:
                    raise ValueError(
                        f"{self.name}: one-hot y_true must have K={num_classes} columns like "
                        f"y_pred; got y_true shape {y_true.shape}, y_pred shape {y_pred.shape}."
                    )
            y_true = tf.argmax(y_true, axis=-1)
        elif y_true.shape.rank != rank - 1:
            raise ValueError(
                f"{self.name}: y_true must be class indices shaped {y_pred.shape[:-1]} (or with "
                f"a trailing 1, or one-hot like y_pred); got shape {y_true.shape}."
            )
        if y_true.dtype.is_floating:
            y_true = tf.round(y_true)
        labels = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        flat_logits_or_probs = tf.reshape(y_pred, [-1, tf.shape(y_pred)[-1]])
        if self.from_logits:
            log_probs = tf.nn.log_softmax(flat_logits_or_probs, axis=-1)
            probs = tf.exp(log_probs)
        else:
            probs = flat_logits_or_probs
            log_probs = None
        weights = self._weights(sample_weight, y_pred)
        return probs, log_probs, labels, weights

    @staticmethod
    def _weights(sample_weight, y_pred):
        lead_shape = tf.shape(y_pred)[:-1]
        if sample_weight is None:
            return tf.ones([tf.reduce_prod(lead_shape)], tf.float64)
        weights = tf.cast(tf.convert_to_tensor(sample_weight), tf.float64)
        lead_rank = y_pred.shape.rank - 1
        if weights.shape.rank is not None:
            while weights.shape.rank > lead_rank and weights.shape[-1] == 1:
                weights = tf.squeeze(weights, axis=-1)
            while weights.shape.rank < lead_rank:
                weights = tf.expand_dims(weights, axis=-1)
        return tf.reshape(tf.broadcast_to(weights, lead_shape), [-1])

    def get_config(self):
        config = super().get_config()
        config["from_logits"] = self.from_logits
        return config


class _WeightedMean(_ProbabilityMetric):
    """Weighted mean of a per-example quantity, accumulated in float64."""

    def __init__(self, from_logits=False, name=None, dtype=None):
        super().__init__(from_logits=from_logits, name=name, dtype=dtype)
        self.total = self.add_variable(shape=(), initializer="zeros", dtype="float64", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", dtype="float64", name="count")

    def _per_example(self, probs, log_probs, labels):
        """The per-example quantity to average; every subclass defines it."""
        raise TypeError(f"{type(self).__name__} must define _per_example().")

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds a batch: ``y_true`` labels, ``y_pred`` probabilities (or logits)."""
        probs, log_probs, labels, weights = self._prepare(y_true, y_pred, sample_weight)
        values = self._per_example(probs, log_probs, labels)
        self.total.assign_add(tf.reduce_sum(values * weights))
        self.count.assign_add(tf.reduce_sum(weights))

    def result(self):
        return tf.cast(tf.math.divide_no_nan(self.total, self.count), self.dtype)

    def reset_state(self):
        self.total.assign(tf.zeros_like(self.total))
        self.count.assign(tf.zeros_like(self.count))


@keras.saving.register_keras_serializable(package="ft_keras")
class NegativeLogLikelihood(_WeightedMean):
    """Streaming NLL ``-mean log p(y)``; equals ``nll(labels, probs, eps)`` on all seen data.

    Lower is better (the metric declares ``_direction = "down"``, see `metric_direction`).

    Args:
        from_logits: ``y_pred`` holds logits (log-softmax is used, clipped at ``log(eps)``).
        eps: probabilities below ``eps`` count as ``eps``.
        name: metric name in the logs.
        dtype: dtype of ``result()``; the state is float64.

    Example:

    >>> metric = NegativeLogLikelihood()
    >>> metric.update_state([0, 1], [[0.5, 0.5], [0.5, 0.5]])
    >>> round(float(metric.result()), 4)
    0.6931

    In a model (all three metrics run inside the compiled train / test steps)::

        model.compile("sgd", "sparse_categorical_crossentropy",
                      metrics=[NegativeLogLikelihood(), BrierScore(), ExpectedCalibrationError()])
    """

    def __init__(self, from_logits=False, eps=1e-12, name="nll", dtype=None):
        super().__init__(from_logits=from_logits, name=name, dtype=dtype)
        self._direction = "down"  # lower is better (Keras's convention; see metric_direction)
        self.eps = _check_eps(eps)

    def _per_example(self, probs, log_probs, labels):
        floor = np.log(self.eps) if self.eps > 0 else -np.inf
        if log_probs is None:
            log_probs = tf.math.log(tf.maximum(probs, self.eps))
        else:
            log_probs = tf.maximum(log_probs, floor)
        onehot = tf.one_hot(labels, tf.shape(probs)[-1], dtype=tf.float64)
        true_log_prob = tf.reduce_sum(tf.where(onehot > 0, log_probs, 0.0), axis=-1)
        # A label outside [0, K) has an all-zero one-hot row: count it as probability eps.
        return -tf.where(tf.reduce_sum(onehot, axis=-1) > 0, true_log_prob, floor)

    def get_config(self):
        config = super().get_config()
        config["eps"] = self.eps
        return config


@keras.saving.register_keras_serializable(package="ft_keras")
class BrierScore(_WeightedMean):
    """Streaming Brier score; equals ``brier(labels, probs)`` on all seen data. Lower is better.

    Args:
        from_logits: ``y_pred`` holds logits.
        name: metric name in the logs.
        dtype: dtype of ``result()``; the state is float64.

    Example:

    >>> metric = BrierScore()
    >>> metric.update_state([0], [[0.7, 0.3]])
    >>> round(float(metric.result()), 4)
    0.18
    """

    def __init__(self, from_logits=False, name="brier", dtype=None):
        super().__init__(from_logits=from_logits, name=name, dtype=dtype)
        self._direction = "down"  # lower is better

    def _per_example(self, probs, log_probs, labels):
        onehot = tf.one_hot(labels, tf.shape(probs)[-1], dtype=tf.float64)
        return tf.reduce_sum(tf.square(probs - onehot), axis=-1)


@keras.saving.register_keras_serializable(package="ft_keras")
class ExpectedCalibrationError(_ProbabilityMetric):
    """Streaming ECE with ``num_bins`` equal-width confidence bins. Lower is better.

    Accumulates, per bin, the (weighted) number of examples, of correct predictions and the sum
    of confidences; ``result()`` is ``sum_b |correct_b - confidence_b| / N``, which equals
    ``ece(labels, probs, num_bins)`` on the concatenation of all batches since the last reset
    (same ``(lo, hi]`` bin convention).

    Args:
        num_bins: number of bins on [0, 1] (15, as in the paper's evaluation; see
            docs/method.md, section 8).
        from_logits: ``y_pred`` holds logits.
        name: metric name in the logs.
        dtype: dtype of ``result()``; the state is float64.

    Example:

    >>> metric = ExpectedCalibrationError(num_bins=15)
    >>> metric.update_state([0, 0], [[0.9, 0.1], [0.9, 0.1]])
    >>> round(float(metric.result()), 4)
    0.1
    """

    def __init__(self, num_bins=15, from_logits=False, name="ece", dtype=None):
        super().__init__(from_logits=from_logits, name=name, dtype=dtype)
        self._direction = "down"  # lower is better
        self.num_bins = _check_num_bins(num_bins)
        self._inner_edges = np.linspace(0.0, 1.0, self.num_bins + 1)[1:-1]
        shape = (self.num_bins,)
        self.bin_counts = self.add_variable(shape, "zeros", dtype="float64", name="bin_counts")
        self.bin_correct = self.add_variable(shape, "zeros", dtype="float64", name="bin_correct")
        self.bin_confidence = self.add_variable(
            shape, "zeros", dtype="float64", name="bin_confidence"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds a batch: ``y_true`` labels, ``y_pred`` probabilities (or logits)."""
        probs, _, labels, weights = self._prepare(y_true, y_pred, sample_weight)
        confidences = tf.reduce_max(probs, axis=-1)
        predictions = tf.cast(tf.argmax(probs, axis=-1), tf.int32)
        correct = tf.cast(tf.equal(predictions, labels), tf.float64)
        inner = tf.constant(self._inner_edges, tf.float64)
        bins = tf.reduce_sum(
            tf.cast(confidences[:, None] > inner[None, :], tf.int32), axis=-1
        )
        self.bin_counts.assign_add(tf.math.unsorted_segment_sum(weights, bins, self.num_bins))
        self.bin_correct.assign_add(
            tf.math.unsorted_segment_sum(weights * correct, bins, self.num_bins)
        )
        self.bin_confidence.assign_add(
            tf.math.unsorted_segment_sum(weights * confidences, bins, self.num_bins)
        )

    def result(self):
        gaps = tf.reduce_sum(tf.abs(self.bin_correct - self.bin_confidence))
        return tf.cast(tf.math.divide_no_nan(gaps, tf.reduce_sum(self.bin_counts)), self.dtype)

    def reset_state(self):
        for variable in (self.bin_counts, self.bin_correct, self.bin_confidence):
            variable.assign(tf.zeros_like(variable))

    def get_config(self):
        config = super().get_config()
        config["num_bins"] = self.num_bins
        return config
