"""Evaluation metrics in numpy: accuracy, NLL, ECE, Brier, ensemble diversity and OoD detection.

The functions (``accuracy``, ``nll``, ``ece``, ``brier``, ``disagreement``, ``ood_auroc``, ...)
take numpy arrays, lists or eager tensors and return Python floats or numpy arrays. They compute
in float64 and validate their input: a wrong type raises ``TypeError``, a bad shape or value
``ValueError``, each naming the argument, what it got and what is allowed. This module needs
only numpy (it imports neither Keras nor TensorFlow); the streaming Keras metrics for
``model.compile(metrics=[...])`` are in `ft_keras.keras_metrics`.

The metrics are defined in docs/method.md, section 8; the ensemble's prediction in section 7.

Conventions:

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
>>> from ft_keras.harness import metrics
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

import numpy as np

from ft_keras import _checks

__all__ = [
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
    except ValueError as err:  # numpy refuses nested sequences of different lengths
        ragged = _ragged_entries(value, name)
        if ragged is not None:
            raise ValueError(ragged) from err
        raise TypeError(
            f"{name} must be array-like (numpy array, list or eager tensor); "
            f"got {type(value).__name__} that numpy cannot convert ({err})."
        ) from err
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


def _ragged_entries(value, name, _depth=0):
    """For a nested sequence whose entries have different shapes (e.g. ensemble members with
    different numbers of examples), a message naming two entries and their shapes; else None."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or _depth > 8:
        return None
    try:
        entries = list(value)
    except TypeError:
        return None
    shapes = []
    for index, entry in enumerate(entries):
        try:
            shapes.append(np.shape(entry))
        except ValueError:  # the entry is ragged itself: look inside it
            return _ragged_entries(entry, f"{name}[{index}]", _depth + 1)
    for index, shape in enumerate(shapes[1:], start=1):
        if shape != shapes[0]:
            if name == "member_probs":
                rule = "every member must have the same shape (N, K): the same examples and classes"
                what = "members"
            else:
                rule = "every entry along the first axis must have the same shape"
                what = "entries"
            return (
                f"{name} holds {what} of different shapes: {name}[0] has shape {shapes[0]} "
                f"but {name}[{index}] has shape {shape}; {rule}."
            )
    return None


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
    return _checks.check_positive_int("num_bins", num_bins)


def _check_eps(eps):
    return _checks.check_real("eps", eps, low=0.0, high=1.0, high_open=True)


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
    axis = _checks.check_int("axis", axis, minimum=-array.ndim, maximum=array.ndim - 1)
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
        num_bins: number of bins (15 in the paper's evaluation; docs/method.md, section 8).

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
    """Mean of the members' probabilities, the ensemble's prediction (docs/method.md, section 7).

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
    """All the metrics of docs/method.md, section 8 for an ensemble, with uncertainty-baselines
    style keys.

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
    prefix = _checks.check_str("prefix", prefix, allow_empty=True)
    num_bins = _check_num_bins(num_bins)
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
    positive = _checks.check_choice("positive", positive, ("in", "out"))
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
    tpr = _checks.check_fraction("tpr", tpr)
    scores_in = _check_scores(scores_in, "scores_in")
    scores_out = _check_scores(scores_out, "scores_out")
    # The small tolerance keeps e.g. 0.95 * 20 = 19.000000000000004 at k = 19.
    k = int(np.ceil(tpr * scores_in.size - 1e-9))
    k = min(max(k, 1), scores_in.size)
    threshold = np.sort(scores_in)[::-1][k - 1]
    return float(np.mean(scores_out >= threshold))
