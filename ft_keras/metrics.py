"""Evaluation metrics: accuracy, NLL, ECE, Brier, ensemble diversity and OoD detection.

Two kinds of objects live here:

* numpy functions (``accuracy``, ``nll``, ``ece``, ``brier``, ``disagreement``, ``ood_auroc``,
  ...) that take numpy arrays, lists or eager tensors and return Python floats or numpy arrays.
  They compute in float64 and validate their input: a bad shape or value raises ``ValueError``
  (or ``TypeError``) naming the argument, what it got and what is allowed.
* streaming Keras metrics (``ExpectedCalibrationError``, ``BrierScore``,
  ``NegativeLogLikelihood``) for ``model.compile(metrics=[...])``. They accumulate sufficient
  statistics in float64 variables, run inside the compiled ``fit`` / ``evaluate`` steps, and their
  ``result()`` equals the numpy function on all the data seen since the last ``reset_state()``.

Conventions (SPEC section 7):

* ``labels`` are integer class indices shaped ``(N,)`` (``(N, 1)`` is squeezed; one-hot rows
  shaped ``(N, K)`` are reduced to their argmax). ``probs`` are probabilities shaped ``(N, K)``;
  turn logits into probabilities with ``logits_to_probs`` first.
* An ensemble's prediction is the mean of its members' probabilities (``ensemble_probs``); the
  ensemble metrics take ``member_probs`` shaped ``(M, N, K)``.
* The predicted class is ``argmax`` over classes; on ties the lowest class index wins.
* ECE uses ``num_bins`` equal-width confidence bins with edges ``np.linspace(0, 1, num_bins + 1)``
  (float64). Bin ``b`` holds the confidences in ``(edges[b], edges[b + 1]]``: a confidence exactly
  on an inner edge belongs to the lower bin, a confidence of exactly 0 to the first bin and one of
  exactly 1 (or above, by round-off) to the last bin.
* OoD scores follow "higher = more in-distribution" (``max_prob_score``, ``neg_entropy_score``);
  the in-distribution set is the positive class of AUROC.
* Logarithms are natural: entropies, NLL and KL are in nats.

Example:

>>> import numpy as np
>>> from ft_keras import metrics
>>> member_probs = np.array([[[0.9, 0.1], [0.4, 0.6]],
...                          [[0.7, 0.3], [0.6, 0.4]]])      # M=2 members, N=2, K=2
>>> labels = np.array([0, 1])
>>> probs = metrics.ensemble_probs(member_probs)              # [[0.8, 0.2], [0.5, 0.5]]
>>> metrics.accuracy(labels, probs)
0.5
>>> metrics.disagreement(member_probs)
0.5
>>> sorted(metrics.summary(labels, member_probs))[:3]
['test/accuracy', 'test/accuracy_member_0', 'test/accuracy_member_1']
"""

import numbers

import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "BrierScore",
    "ExpectedCalibrationError",
    "NegativeLogLikelihood",
    "accuracy",
    "brier",
    "disagreement",
    "ece",
    "ensemble_probs",
    "fpr_at_tpr",
    "kl_diversity",
    "logits_to_probs",
    "max_prob_score",
    "member_metrics",
    "mutual_information",
    "neg_entropy_score",
    "nll",
    "ood_aupr",
    "ood_auroc",
    "predictive_entropy",
    "reliability_diagram_data",
    "summary",
]

# Probabilities may carry float32 / float16 round-off: rows must sum to 1 within this tolerance
# and values must lie in [-_PROB_ATOL, 1 + _PROB_ATOL].
_PROB_ATOL = 1e-3


# ------------------------------------------------------------------------------ input checking
def _as_array(value, name):
    """Converts a list, numpy array or eager tensor to a numpy array; TypeError otherwise."""
    if hasattr(value, "numpy") and callable(value.numpy):
        try:
            value = value.numpy()
        except Exception as err:  # symbolic tensors have no value
            raise TypeError(
                f"{name} must be a numpy array, a list or an eager tensor; got a symbolic "
                f"{type(value).__name__}. Use the streaming Keras metrics inside graphs."
            ) from err
    try:
        array = np.asarray(value)
    except Exception as err:
        raise TypeError(
            f"{name} must be array-like (numpy array, list or eager tensor); "
            f"got {type(value).__name__}."
        ) from err
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)
    ):
        raise TypeError(f"{name} must hold numbers; got an array of dtype {array.dtype}.")
    return array


def _check_probs(probs, name="probs", ndim=2):
    """Returns ``probs`` as float64, shaped ``ndim`` with classes last, rows summing to 1."""
    array = _as_array(probs, name).astype(np.float64)
    if array.ndim != ndim:
        want = "(N, K)" if ndim == 2 else "(M, N, K)"
        raise ValueError(
            f"{name} must have shape {want} ({ndim} dimensions); got shape {array.shape}."
        )
    if 0 in array.shape:
        raise ValueError(f"{name} must not be empty; got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite; got NaN or infinite values.")
    low, high = array.min(), array.max()
    if low < -_PROB_ATOL or high > 1.0 + _PROB_ATOL:
        raise ValueError(
            f"{name} must hold probabilities in [0, 1]; got values in [{low:.4g}, {high:.4g}]. "
            "Convert logits with logits_to_probs(logits)."
        )
    sums = array.sum(axis=-1)
    worst = np.max(np.abs(sums - 1.0))
    if worst > _PROB_ATOL:
        raise ValueError(
            f"{name} rows must sum to 1 over the last (class) axis; one sums to "
            f"{sums.flat[np.argmax(np.abs(sums - 1.0))]:.6g}. "
            "Convert logits with logits_to_probs(logits)."
        )
    return array


def _check_labels(labels, num_examples, num_classes, name="labels"):
    """Returns integer labels shaped ``(N,)`` in ``[0, num_classes)``."""
    array = _as_array(labels, name)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    elif array.ndim == 2 and array.shape[1] == num_classes:
        array = np.argmax(array, axis=1)
    if array.ndim != 1:
        raise ValueError(
            f"{name} must be class indices shaped (N,) (or (N, 1), or one-hot (N, K={num_classes}))"
            f"; got shape {array.shape}."
        )
    if array.shape[0] != num_examples:
        raise ValueError(
            f"{name} must have one entry per example: probs have N={num_examples} rows, "
            f"{name} has shape {array.shape}."
        )
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.bool_)):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise ValueError(
                f"{name} must hold integer class indices; got non-integer values such as "
                f"{array[array != np.round(array)][:3].tolist() or 'NaN/inf'}."
            )
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(
            f"{name} must be class indices in [0, {num_classes}); got values in "
            f"[{array.min()}, {array.max()}]."
        )
    return array


def _check_num_bins(num_bins):
    if isinstance(num_bins, bool) or not isinstance(num_bins, numbers.Integral) or num_bins < 1:
        raise ValueError(f"num_bins={num_bins!r} must be an integer >= 1 (default 15).")
    return int(num_bins)


def _check_eps(eps):
    if (
        isinstance(eps, bool)
        or not isinstance(eps, numbers.Real)
        or not np.isfinite(eps)
        or not 0.0 <= eps < 1.0
    ):
        raise ValueError(f"eps={eps!r} must be a float in [0, 1) (default 1e-12).")
    return float(eps)


def _check_from_logits(from_logits):
    if not isinstance(from_logits, (bool, np.bool_)):
        raise TypeError(f"from_logits={from_logits!r} must be a bool.")
    return bool(from_logits)


def _check_scores(scores, name):
    array = _as_array(scores, name).astype(np.float64)
    if array.ndim != 1 or array.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty 1-D array of scores; got shape {array.shape}."
        )
    if np.any(np.isnan(array)):
        raise ValueError(f"{name} must not contain NaN scores.")
    return array


# ------------------------------------------------------------------------------ basic functions
def logits_to_probs(logits, axis=-1):
    """Numerically stable softmax in numpy.

    Args:
        logits: array-like of logits; ``-inf`` is allowed (probability 0) as long as each row has
            a finite maximum.
        axis: the class axis.

    Returns:
        A float array of the same shape (float32 stays float32, everything else is float64).

    Example:

    >>> logits_to_probs([[0.0, 0.0], [1000.0, 0.0]]).round(3).tolist()
    [[0.5, 0.5], [1.0, 0.0]]
    """
    array = _as_array(logits, "logits")
    if array.ndim == 0:
        raise ValueError(f"logits must have a class axis; got a scalar of shape {array.shape}.")
    out_dtype = np.float32 if array.dtype == np.float32 else np.float64
    array = array.astype(np.float64)
    if np.any(np.isnan(array)) or np.any(array == np.inf):
        raise ValueError("logits must not contain NaN or +inf.")
    top = np.max(array, axis=axis, keepdims=True)
    if np.any(top == -np.inf):
        raise ValueError("logits has a row whose entries are all -inf; its softmax is undefined.")
    exp = np.exp(array - top)
    return (exp / np.sum(exp, axis=axis, keepdims=True)).astype(out_dtype)


def accuracy(labels, probs):
    """Fraction of examples whose argmax class equals the label.

    Args:
        labels: class indices ``(N,)``.
        probs: probabilities ``(N, K)`` (or any scores: only the argmax matters, but they are
            validated as probabilities).

    Returns:
        A Python float in [0, 1].

    Example:

    >>> accuracy([0, 1], [[0.9, 0.1], [0.8, 0.2]])
    0.5
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs.shape[0], probs.shape[1])
    return float(np.mean(np.argmax(probs, axis=1) == labels))


def nll(labels, probs, eps=1e-12):
    """Negative log-likelihood ``-mean_n log p_n(y_n)`` in nats.

    For an ensemble pass the averaged probabilities (``ensemble_probs``), not the members' NLLs.

    Args:
        labels: class indices ``(N,)``.
        probs: probabilities ``(N, K)``.
        eps: probabilities below ``eps`` count as ``eps``, so a zero probability on the true
            class costs ``-log(eps)`` (27.6 for 1e-12) instead of infinity.

    Returns:
        A Python float >= 0.

    Example:

    >>> round(nll([0], [[0.5, 0.5]]), 4)
    0.6931
    """
    eps = _check_eps(eps)
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs.shape[0], probs.shape[1])
    true_probs = probs[np.arange(probs.shape[0]), labels]
    with np.errstate(divide="ignore"):  # eps=0 and p(y)=0 give +inf, not a warning
        return float(-np.mean(np.log(np.maximum(true_probs, eps))))


def brier(labels, probs):
    """Brier score: mean over examples of ``sum_k (p_k - onehot(y)_k) ** 2`` (in [0, 2]).

    Args:
        labels: class indices ``(N,)``.
        probs: probabilities ``(N, K)``.

    Returns:
        A Python float.

    Example:

    >>> round(brier([0], [[0.7, 0.3]]), 4)    # 0.3 ** 2 + 0.3 ** 2
    0.18
    """
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs.shape[0], probs.shape[1])
    onehot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def _bin_indices(confidences, num_bins):
    """Bin index of each confidence: bin ``b`` holds ``(edges[b], edges[b + 1]]``.

    The index is the number of inner edges strictly below the confidence, so 0 (and anything
    below) lands in bin 0 and 1 (and anything above) in bin ``num_bins - 1``. The streaming
    metric computes the very same count in TensorFlow.
    """
    inner = np.linspace(0.0, 1.0, num_bins + 1)[1:-1]
    return np.sum(np.asarray(confidences, np.float64)[:, None] > inner[None, :], axis=1)


def reliability_diagram_data(labels, probs, num_bins=15):
    """Per-bin statistics of a reliability diagram (and the ECE they add up to).

    Args:
        labels: class indices ``(N,)``.
        probs: probabilities ``(N, K)``; confidence = max probability.
        num_bins: number of equal-width confidence bins on [0, 1] (see the module doc for the
            edge convention).

    Returns:
        A dict of numpy arrays: ``edges`` ``(num_bins + 1,)``, ``counts`` ``(num_bins,)`` int,
        ``accuracy`` and ``confidence`` ``(num_bins,)`` (NaN for empty bins, which plotting
        libraries skip), and ``ece`` (a Python float).

    Example:

    >>> data = reliability_diagram_data([0, 1], [[0.9, 0.1], [0.6, 0.4]], num_bins=2)
    >>> data["counts"].tolist(), data["accuracy"].tolist(), data["ece"]
    ([0, 2], [nan, 0.5], 0.25)
    """
    num_bins = _check_num_bins(num_bins)
    probs = _check_probs(probs)
    labels = _check_labels(labels, probs.shape[0], probs.shape[1])
    confidences = np.max(probs, axis=1)
    correct = (np.argmax(probs, axis=1) == labels).astype(np.float64)
    bins = _bin_indices(confidences, num_bins)
    counts = np.bincount(bins, minlength=num_bins)
    correct_sums = np.bincount(bins, weights=correct, minlength=num_bins)
    confidence_sums = np.bincount(bins, weights=confidences, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        bin_accuracy = np.where(counts > 0, correct_sums / counts, np.nan)
        bin_confidence = np.where(counts > 0, confidence_sums / counts, np.nan)
    # sum_b (n_b / N) |acc_b - conf_b| = sum_b |sum correct_b - sum conf_b| / N
    ece_value = float(np.sum(np.abs(correct_sums - confidence_sums)) / probs.shape[0])
    return {
        "edges": np.linspace(0.0, 1.0, num_bins + 1),
        "counts": counts.astype(np.int64),
        "accuracy": bin_accuracy,
        "confidence": bin_confidence,
        "ece": ece_value,
    }


def ece(labels, probs, num_bins=15):
    """Expected calibration error ``sum_b (n_b / N) |acc_b - conf_b|``.

    Confidence is the max probability; ``num_bins`` equal-width bins on [0, 1], each holding
    ``(lo, hi]`` (a confidence exactly on an inner edge goes to the lower bin; 0 goes to the
    first bin).

    Args:
        labels: class indices ``(N,)``.
        probs: probabilities ``(N, K)``.
        num_bins: number of bins (SPEC: 15).

    Returns:
        A Python float in [0, 1].

    Example:

    >>> round(ece([0, 0], [[0.9, 0.1], [0.9, 0.1]]), 4)    # conf 0.9, accuracy 1
    0.1
    """
    return reliability_diagram_data(labels, probs, num_bins)["ece"]


# ------------------------------------------------------------------------------ ensembles
def _entropy(probs):
    """Entropy in nats over the last axis, with 0 log 0 = 0 (no validation)."""
    logs = np.log(np.where(probs > 0, probs, 1.0))
    return 0.0 - np.sum(probs * logs, axis=-1)  # 0.0 - x turns -0.0 into 0.0


def ensemble_probs(member_probs):
    """Mean of the members' probabilities, the ensemble's prediction (SPEC section 7).

    Args:
        member_probs: ``(M, N, K)`` probabilities of M members.

    Returns:
        A float64 array ``(N, K)``.

    Example:

    >>> ensemble_probs([[[1.0, 0.0]], [[0.0, 1.0]]]).tolist()
    [[0.5, 0.5]]
    """
    return np.mean(_check_probs(member_probs, "member_probs", ndim=3), axis=0)


def _check_members(member_probs, minimum=2):
    array = _check_probs(member_probs, "member_probs", ndim=3)
    if array.shape[0] < minimum:
        raise ValueError(
            f"member_probs must hold at least {minimum} members along axis 0 to compare them; "
            f"got shape {array.shape}."
        )
    return array


def disagreement(member_probs):
    """Prediction disagreement: mean over member pairs ``i < j`` of the fraction of examples
    where the members' argmax classes differ.

    Args:
        member_probs: ``(M, N, K)`` probabilities, ``M >= 2``.

    Returns:
        A Python float in [0, 1].

    Example:

    >>> disagreement([[[0.9, 0.1], [0.9, 0.1]], [[0.9, 0.1], [0.2, 0.8]]])
    0.5
    """
    array = _check_members(member_probs)
    num_members, num_examples, num_classes = array.shape
    predictions = np.argmax(array, axis=2)  # (M, N)
    # Per example, count the members voting for each class; agreeing pairs = sum_k C(c_k, 2).
    votes = np.zeros((num_examples, num_classes), np.int64)
    np.add.at(votes, (np.broadcast_to(np.arange(num_examples), predictions.shape), predictions), 1)
    pairs = num_members * (num_members - 1) // 2
    agreeing = np.sum(votes * (votes - 1) // 2, axis=1)
    return float(np.sum(pairs - agreeing) / (pairs * num_examples))


def kl_diversity(member_probs, eps=1e-12):
    """Mean over ordered member pairs ``i != j`` of ``mean_n KL(p_i(x_n) || p_j(x_n))`` (nats).

    Args:
        member_probs: ``(M, N, K)`` probabilities, ``M >= 2``.
        eps: probabilities below ``eps`` count as ``eps`` inside the logarithms (terms with
            ``p_i = 0`` contribute 0).

    Returns:
        A Python float (>= 0 up to the eps clipping).

    Example:

    >>> round(kl_diversity([[[0.5, 0.5]], [[0.5, 0.5]]]), 6)
    0.0
    """
    eps = _check_eps(eps)
    array = _check_members(member_probs)
    num_members = array.shape[0]
    logs = np.log(np.maximum(array, eps))
    total = 0.0
    for i in range(num_members):
        for j in range(num_members):
            if i != j:
                kl = np.sum(np.where(array[i] > 0, array[i] * (logs[i] - logs[j]), 0.0), axis=1)
                total += float(np.mean(kl))
    return total / (num_members * (num_members - 1))


def predictive_entropy(probs):
    """Entropy ``-sum_k p_k log p_k`` of each example's predictive distribution, in nats.

    Args:
        probs: probabilities ``(N, K)`` (for an ensemble, ``ensemble_probs(member_probs)``).

    Returns:
        A float64 array ``(N,)`` in ``[0, log K]``.

    Example:

    >>> predictive_entropy([[0.5, 0.5], [1.0, 0.0]]).round(4).tolist()
    [0.6931, 0.0]
    """
    return _entropy(_check_probs(probs))


def mutual_information(member_probs):
    """Per-example mutual information ``H(mean_m p_m) - mean_m H(p_m)`` (epistemic part of the
    ensemble's uncertainty, in nats).

    Negative round-off is clipped to 0. One member gives zeros.

    Args:
        member_probs: ``(M, N, K)`` probabilities.

    Returns:
        A float64 array ``(N,)`` of values >= 0.

    Example:

    >>> mutual_information([[[1.0, 0.0]], [[0.0, 1.0]]]).round(4).tolist()   # log 2
    [0.6931]
    """
    array = _check_probs(member_probs, "member_probs", ndim=3)
    value = _entropy(np.mean(array, axis=0)) - np.mean(_entropy(array), axis=0)
    return np.maximum(value, 0.0)


def member_metrics(labels, member_probs):
    """Each member's NLL and accuracy.

    Args:
        labels: class indices ``(N,)``.
        member_probs: ``(M, N, K)`` probabilities.

    Returns:
        ``{"nll_member_<i>": float, "accuracy_member_<i>": float}`` for ``i`` in ``range(M)``.

    Example:

    >>> member_metrics([0], [[[1.0, 0.0]], [[0.0, 1.0]]])["accuracy_member_1"]
    0.0
    """
    array = _check_probs(member_probs, "member_probs", ndim=3)
    labels = _check_labels(labels, array.shape[1], array.shape[2])
    out = {}
    for i, probs in enumerate(array):
        out[f"nll_member_{i}"] = nll(labels, probs)
        out[f"accuracy_member_{i}"] = accuracy(labels, probs)
    return out


def summary(labels, member_probs, prefix="test/", num_bins=15):
    """All SPEC section 7 metrics of an ensemble, with uncertainty-baselines style keys.

    The ensemble's accuracy, NLL, ECE and Brier score are computed on the mean of the members'
    probabilities; ``disagreement`` and ``kl_diversity`` only appear with two or more members.

    Args:
        labels: class indices ``(N,)``.
        member_probs: ``(M, N, K)`` member probabilities, or ``(N, K)`` for a single model.
        prefix: prepended to every key, e.g. ``"test/"`` or ``"cifar10_c/"``.
        num_bins: ECE bins.

    Returns:
        A dict of Python floats with keys ``<prefix>accuracy``, ``<prefix>nll``,
        ``<prefix>ece``, ``<prefix>brier``, ``<prefix>disagreement``, ``<prefix>kl_diversity``,
        ``<prefix>nll_member_<i>`` and ``<prefix>accuracy_member_<i>``.

    Example:

    >>> out = summary([0], [[[0.9, 0.1]], [[0.7, 0.3]]])
    >>> round(out["test/accuracy"], 2), round(out["test/disagreement"], 2)
    (1.0, 0.0)
    """
    if not isinstance(prefix, str):
        raise TypeError(f"prefix={prefix!r} must be a str such as 'test/'.")
    array = _as_array(member_probs, "member_probs")
    if array.ndim == 2:
        array = array[None]
    array = _check_probs(array, "member_probs", ndim=3)
    labels = _check_labels(labels, array.shape[1], array.shape[2])
    probs = np.mean(array, axis=0)
    out = {
        "accuracy": accuracy(labels, probs),
        "nll": nll(labels, probs),
        "ece": ece(labels, probs, num_bins),
        "brier": brier(labels, probs),
    }
    if array.shape[0] >= 2:
        out["disagreement"] = disagreement(array)
        out["kl_diversity"] = kl_diversity(array)
    out.update(member_metrics(labels, array))
    return {prefix + key: value for key, value in out.items()}


# ------------------------------------------------------------------------------ OoD detection
def max_prob_score(probs):
    """OoD score ``max_k p_k`` per example (higher = more in-distribution).

    Example:

    >>> max_prob_score([[0.9, 0.1], [0.5, 0.5]]).tolist()
    [0.9, 0.5]
    """
    return np.max(_check_probs(probs), axis=1)


def neg_entropy_score(probs):
    """OoD score ``-H(p)`` per example in nats (higher = more in-distribution).

    Example:

    >>> neg_entropy_score([[1.0, 0.0], [0.5, 0.5]]).round(4).tolist()
    [0.0, -0.6931]
    """
    return 0.0 - predictive_entropy(probs)


def _midranks(values):
    """1-based ranks of ``values`` with tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    return (last_rank - (counts - 1) / 2.0)[inverse.reshape(-1)]


def ood_auroc(scores_in, scores_out):
    """Area under the ROC curve for telling in-distribution (positive) from OoD examples.

    Equals ``P(s_in > s_out) + 0.5 * P(s_in == s_out)`` over all (in, out) pairs, computed
    exactly from mid-ranks (the Mann-Whitney U statistic) in ``O(n log n)``.

    Args:
        scores_in: 1-D scores of in-distribution examples (higher = more in-distribution).
        scores_out: 1-D scores of OoD examples. ``-inf`` / ``+inf`` are allowed, NaN is not.

    Returns:
        A Python float in [0, 1]: 1 is perfect separation, 0.5 chance, 0 reversed.

    Example:

    >>> ood_auroc([3, 2, 1], [2, 0])    # pairs won: 1 + 1 + 0.5 + 1 + 0 + 1 = 4.5 of 6
    0.75
    """
    scores_in = _check_scores(scores_in, "scores_in")
    scores_out = _check_scores(scores_out, "scores_out")
    n_in, n_out = scores_in.size, scores_out.size
    ranks = _midranks(np.concatenate([scores_in, scores_out]))
    wins = np.sum(ranks[:n_in]) - n_in * (n_in + 1) / 2.0
    return float(wins / (n_in * n_out))


def ood_aupr(scores_in, scores_out, positive="in"):
    """Area under the precision-recall curve as step-wise average precision.

    ``AP = sum_t (R_t - R_{t-1}) * P_t`` over the distinct score thresholds ``t`` taken from
    the most to the least confident, where an example is predicted positive when its score is
    ``>= t`` (tied examples enter together) and ``R_0 = 0``.

    Args:
        scores_in: 1-D scores of in-distribution examples (higher = more in-distribution).
        scores_out: 1-D scores of OoD examples.
        positive: ``"in"`` (AUPR-In: in-distribution examples are the positives, high scores
            first) or ``"out"`` (AUPR-Out: OoD examples are the positives, low scores first).

    Returns:
        A Python float in (0, 1].

    Example:

    >>> round(ood_aupr([0.9, 0.8, 0.4], [0.7, 0.3]), 4)   # (1/1 + 2/2 + 3/4) / 3
    0.9167
    """
    if positive not in ("in", "out"):
        raise ValueError(f"positive={positive!r} is not supported; allowed values are 'in', 'out'.")
    scores_in = _check_scores(scores_in, "scores_in")
    scores_out = _check_scores(scores_out, "scores_out")
    if positive == "in":
        pos, neg = scores_in, scores_out
    else:
        pos, neg = -scores_out, -scores_in
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="stable")
    scores, is_pos = scores[order], is_pos[order]
    # The last example of each group of equal scores closes a threshold.
    group_end = np.append(scores[1:] != scores[:-1], True)
    true_pos = np.cumsum(is_pos)[group_end]
    predicted = (np.arange(scores.size) + 1.0)[group_end]
    precision = true_pos / predicted
    recall = true_pos / pos.size
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def fpr_at_tpr(scores_in, scores_out, tpr=0.95):
    """Fraction of OoD examples accepted at the threshold that keeps ``tpr`` of the
    in-distribution examples (FPR@95 for the default).

    The threshold ``t`` is the ``k``-th largest in-distribution score with
    ``k = ceil(tpr * n_in)``, i.e. the largest threshold for which at least ``tpr`` of the
    in-distribution examples have a score ``>= t``. The result is the fraction of OoD scores
    ``>= t``. (With ties at ``t`` the achieved true-positive rate may exceed ``tpr``.)

    Args:
        scores_in: 1-D scores of in-distribution examples (higher = more in-distribution).
        scores_out: 1-D scores of OoD examples.
        tpr: the true-positive rate to keep, in (0, 1].

    Returns:
        A Python float in [0, 1]; lower is better.

    Example:

    >>> fpr_at_tpr(list(range(1, 11)), [0.5, 1.0, 2.0, 11.0], tpr=0.8)   # t = 3
    0.25
    """
    if (
        isinstance(tpr, bool)
        or not isinstance(tpr, numbers.Real)
        or not np.isfinite(tpr)
        or not 0.0 < tpr <= 1.0
    ):
        raise ValueError(f"tpr={tpr!r} must be a float in (0, 1] (default 0.95).")
    scores_in = _check_scores(scores_in, "scores_in")
    scores_out = _check_scores(scores_out, "scores_out")
    # The small tolerance keeps e.g. 0.95 * 20 = 19.000000000000004 at k = 19.
    k = int(np.ceil(tpr * scores_in.size - 1e-9))
    k = min(max(k, 1), scores_in.size)
    threshold = np.sort(scores_in)[::-1][k - 1]
    return float(np.mean(scores_out >= threshold))


# ------------------------------------------------------------------------------ Keras metrics
class _ProbabilityMetric(keras.metrics.Metric):
    """Shared plumbing: label / prediction / sample-weight handling of the streaming metrics.

    ``y_true`` holds class indices shaped like ``y_pred`` without its class axis (a trailing
    axis of size 1 is squeezed) or one-hot rows shaped like ``y_pred`` (reduced to their
    argmax). ``y_pred`` holds probabilities (or logits with ``from_logits=True``) with classes on
    the last axis; leading axes are flattened. Label ranges are not checked inside the graph:
    labels outside ``[0, K)`` count as wrong with probability 0.
    """

    def __init__(self, from_logits=False, name=None, dtype=None):
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
    """Streaming Brier score; equals ``brier(labels, probs)`` on all seen data.

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

    def _per_example(self, probs, log_probs, labels):
        onehot = tf.one_hot(labels, tf.shape(probs)[-1], dtype=tf.float64)
        return tf.reduce_sum(tf.square(probs - onehot), axis=-1)


@keras.saving.register_keras_serializable(package="ft_keras")
class ExpectedCalibrationError(_ProbabilityMetric):
    """Streaming ECE with ``num_bins`` equal-width confidence bins.

    Accumulates, per bin, the (weighted) number of examples, of correct predictions and the sum
    of confidences; ``result()`` is ``sum_b |correct_b - confidence_b| / N``, which equals
    ``ece(labels, probs, num_bins)`` on the concatenation of all batches since the last reset
    (same ``(lo, hi]`` bin convention).

    Args:
        num_bins: number of bins on [0, 1] (SPEC: 15).
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
