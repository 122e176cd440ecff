"""The evaluation suite of an ensemble: one function, one key naming scheme.

`evaluate` predicts every member once on the test set, the out-of-distribution (OoD) sets and the
corrupted test sets of an `EvaluationData` (`make_data`), and returns an `Evaluation` whose
``metrics`` is a flat dict of Python numbers. The numbers come from the numpy metrics of
`ft_keras.metrics`; the ensemble predicts with the mean of its members' softmax probabilities
(``combine="probs"``, the FreeTickets paper's evaluation) or the softmax of their mean logits
(``combine="logits"``).

Key scheme (uncertainty-baselines style: ``<part>/<statistic>``, parts separated by ``/``):

Test set, ``test/``:

* ``test/accuracy``, ``test/nll`` (nats), ``test/ece`` (``num_bins`` equal-width bins),
  ``test/brier``: the ensemble's prediction;
* ``test/predictive_entropy``: mean entropy of the ensemble's prediction (nats);
* with two or more members, diversity: ``test/disagreement``, ``test/kl_diversity``,
  ``test/mutual_information`` (mean over examples);
* ``test/<stat>_member_<i>`` with ``<stat>`` in accuracy, nll, ece, brier: member i alone;
  ``test/<stat>_member_mean``: their mean over the members;
* ``test/<stat>_first_<k>`` with ``<stat>`` in accuracy, nll, ece: the ensemble of the first k
  members, k = 1..M (``test/accuracy_first_<M>`` equals ``test/accuracy``).

OoD detection against each OoD set ``<name>`` (in-distribution examples are the positives),
``ood/<name>/``:

* ``ood/<name>/auroc_<score>``, ``ood/<name>/aupr_in_<score>`` (AUPR with the in-distribution
  set as positives), ``ood/<name>/aupr_out_<score>``, ``ood/<name>/fpr95_<score>`` (OoD examples
  accepted at 95% in-distribution recall);
* ``<score>``: ``max_prob`` (maximum probability), ``entropy`` (negative predictive entropy) and,
  with two or more members, ``mutual_information`` (negative mutual information), each computed
  from the ensemble's prediction (higher = more in-distribution).

Corrupted test sets (`ft_keras.corruptions`, this project's own, not CIFAR-10-C), ``corrupt/``:

* ``corrupt/<corruption>/<severity>/<stat>`` with ``<stat>`` in accuracy, nll, ece, brier;
* ``corrupt/mean/<severity>/<stat>``: the mean over the corruptions at one severity;
* ``corrupt/mean/<stat>``: the mean over every corrupted set.

Cost (multiply-accumulates, `ft_keras.flops`; FLOPs = 2 x MACs), ``cost/``:

* ``cost/inference_macs`` (forward MACs per example of all members), ``cost/dense_inference_macs``
  (one member's architecture dense), ``cost/inference_macs_relative``;
* ``cost/active_params`` (summed over members, biases included), ``cost/active_params_member_<i>``,
  ``cost/dense_params`` (one dense member), ``cost/active_params_relative``;
* ``cost/training_macs``, ``cost/dense_training_macs``, ``cost/training_macs_relative`` when the
  training cost is given (e.g. from a `ft_keras.recipes.RecipeResult`).

Description of the run, ``info/``: ``info/num_members``, ``info/combine``, ``info/ece_bins``,
``info/test_examples``, ``info/ood_examples/<name>``, ``info/corruption_examples``.

Example:

>>> data = ftk.evaluation.make_data(x_test, y_test, ood={"mnist": x_mnist},
...                                 corruptions=("gaussian_noise", "contrast"), severities=(1, 3))
>>> result = ftk.evaluation.evaluate(ftk.Ensemble.from_directory("out/tickets"), data)
>>> result.metrics["test/accuracy"], result.metrics["ood/mnist/auroc_max_prob"]   # doctest: +SKIP
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from ft_keras import _checks
from ft_keras import flops
from ft_keras.harness import corruptions as corruptions_lib
from ft_keras.harness import metrics as metrics_lib
from ft_keras.sparsify import sparsity_report

NUM_BINS = 15
"""ECE bins used unless ``num_bins`` says otherwise."""

COMBINE_MODES = ("probs", "logits")
OOD_SCORES = ("max_prob", "entropy", "mutual_information")
CORRUPTION_STATS = ("accuracy", "nll", "ece", "brier")
CORRUPTION_SUBSET_SEED = 0
"""Seed of the fixed random subset of the test set that is corrupted (`make_data`)."""


# -------------------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class EvaluationData:
    """The data sets an ensemble is evaluated on (build it with `make_data`).

    Attributes:
        test_images, test_labels: the test set (uint8 images are scaled to [0, 1] for
            prediction; float images are used as they are).
        ood: ``{name: images}`` OoD sets.
        corruptions, severities, corruption_seed: the corrupted test sets, generated from the
            test images at ``corruption_subset``.
        corruption_subset: indices of the corrupted test examples.
        corrupted: the corrupted sets ``((name, severity, images), ...)`` when kept in memory,
            else None (generated again, one at a time, by each `predict`).
    """

    test_images: np.ndarray
    test_labels: np.ndarray
    ood: dict
    corruptions: tuple
    severities: tuple
    corruption_seed: int
    corruption_subset: np.ndarray
    corrupted: tuple = None

    @property
    def corrupted_labels(self):
        return self.test_labels[self.corruption_subset]

    @property
    def num_corrupted_sets(self):
        return len(self.corruptions) * len(self.severities)

    def corrupted_sets(self):
        """Iterates over ``(name, severity, images)``, corruptions in the outer loop."""
        if self.corrupted is not None:
            return iter(self.corrupted)
        if not self.corruptions:
            return iter(())
        return corruptions_lib.suite(self.test_images[self.corruption_subset], self.severities,
                                     self.corruptions, seed=self.corruption_seed)


def _check_images(argument, images):
    if not isinstance(images, np.ndarray):
        raise TypeError(f"{argument} must be a numpy array of images (N, H, W, C); got "
                        f"{type(images).__name__}.")
    if images.ndim < 2 or not len(images):
        raise ValueError(f"{argument} has shape {images.shape}; expected a non-empty batch of "
                         "images (N, ...).")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"{argument} has dtype {images.dtype}; expected uint8 (scaled by 1/255) "
                        "or floats (used as they are).")
    return images


def make_data(test_images, test_labels, *, ood=None, corruptions=(),
              severities=corruptions_lib.SEVERITIES, corruption_examples=None, corruption_seed=0,
              keep_corrupted=True):
    """The `EvaluationData` of a test set, optional OoD sets and optional corruptions.

    Args:
        test_images: ``(N, H, W, C)`` uint8 (or float) test images.
        test_labels: ``(N,)`` integer labels.
        ood: ``{name: images}`` OoD sets of the same image shape (None: none).
        corruptions: names from `ft_keras.corruptions.CORRUPTIONS` (uint8 images only).
        severities: corruption severities, each in 1..5.
        corruption_examples: corrupt a fixed random subset of this many test examples (seed
            `CORRUPTION_SUBSET_SEED`); None or 0: all of them.
        corruption_seed: seed of the random corruptions.
        keep_corrupted: generate the corrupted sets now and keep them (for several ensembles);
            False: generate them again, one at a time, in every `predict` (less memory).
    """
    test_images = _check_images("test_images", test_images)
    labels = np.asarray(test_labels)
    if labels.shape != (len(test_images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"test_labels must be {len(test_images)} integer labels (one per test "
                         f"image); got shape {labels.shape}, dtype {labels.dtype}.")
    if ood is None:
        ood = {}
    if not isinstance(ood, dict):
        raise TypeError(f"ood must be a dict of name -> images or None; got "
                        f"{type(ood).__name__}.")
    for name, images in ood.items():
        _checks.check_str("ood name", name)
        _check_images(f"ood[{name!r}]", images)
        if images.shape[1:] != test_images.shape[1:]:
            raise ValueError(f"ood[{name!r}] images have shape {images.shape[1:]}; the test "
                             f"images {test_images.shape[1:]}.")
    names = tuple(_checks.check_choice("corruptions", c, corruptions_lib.CORRUPTIONS)
                  for c in _checks.check_names("corruptions", corruptions))
    severities = tuple(_checks.check_int("severities", s, minimum=1, maximum=5)
                       for s in severities)
    if names and not severities:
        raise ValueError("severities is empty; give at least one severity in 1..5.")
    if names and test_images.dtype != np.uint8:
        raise TypeError(f"corruptions need uint8 test images; got {test_images.dtype}.")
    count = _checks.check_int("corruption_examples", corruption_examples or 0, minimum=0)
    corruption_seed = _checks.check_seed("corruption_seed", corruption_seed)
    keep_corrupted = _checks.check_bool("keep_corrupted", keep_corrupted)
    subset = np.arange(len(labels))
    if count and count < len(labels):
        rng = np.random.default_rng(CORRUPTION_SUBSET_SEED)
        subset = np.sort(rng.choice(len(labels), count, replace=False))
    data = EvaluationData(test_images, labels, dict(ood), names, severities if names else (),
                          corruption_seed, subset)
    if names and keep_corrupted:
        data = dataclasses.replace(data, corrupted=tuple(data.corrupted_sets()))
    return data


# ------------------------------------------------------------------------------- prediction
@dataclasses.dataclass(frozen=True)
class Predictions:
    """One member's logits on every set of an `EvaluationData` (see `predict`), and its cost.

    Attributes:
        test: ``(N, K)`` float32 logits on the test set.
        ood: ``{name: logits}``.
        corrupted: logits on each corrupted set, in `EvaluationData.corrupted_sets` order.
        forward_macs, dense_forward_macs: forward MACs per example with the masks applied and
            with every kernel dense (None where they cannot be counted).
        num_params, num_active_params: trainable parameters, and those active (biases included).
    """

    test: np.ndarray
    ood: dict
    corrupted: tuple
    forward_macs: object = None
    dense_forward_macs: object = None
    num_params: object = None
    num_active_params: object = None


class _Logits:
    """Logits of a model on batches of images, one traced function for every set."""

    def __init__(self, model, batch_size):
        self._fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
        self._batch_size = batch_size

    def __call__(self, images):
        out = []
        for start in range(0, len(images), self._batch_size):
            batch = images[start:start + self._batch_size]
            batch = batch.astype(np.float32) / 255.0 if batch.dtype == np.uint8 else (
                batch.astype(np.float32))
            out.append(np.asarray(self._fn(tf.constant(batch)), np.float32))
        return np.concatenate(out)


def _cost_of(model):
    try:
        macs = flops.forward_macs(model)
        dense = flops.forward_macs(model, dense=True)
    except (TypeError, ValueError):
        macs = dense = None
    report = sparsity_report(model)
    return dict(forward_macs=macs, dense_forward_macs=dense, num_params=report.num_params,
                num_active_params=report.num_active_params)


def _input_shape(model):
    """The shape of a model's one input without the batch axis (None when it is not known)."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return None
    if not inputs or len(inputs) != 1:
        return None
    return tuple(inputs[0].shape[1:])


def predict(models, data, batch_size=1000):
    """Every model's logits on every set of ``data``, each corrupted set generated once.

    Args:
        models: a `keras.Model` or a sequence of them (logits outputs).
        data: an `EvaluationData`.
        batch_size: prediction batch size.

    Returns:
        A list of `Predictions`, one per model (a single one for a single model).
    """
    single = isinstance(models, keras.Model)
    models = [models] if single else list(models)
    for i, model in enumerate(models):
        _checks.check_model(f"models[{i}]", model, built=False)
    if not isinstance(data, EvaluationData):
        raise TypeError(f"data must be an EvaluationData (see make_data); got "
                        f"{type(data).__name__}.")
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    image_shape = tuple(data.test_images.shape[1:])
    for i, model in enumerate(models):
        expected = _input_shape(model)
        if expected is not None and (len(expected) != len(image_shape) or any(
                e is not None and e != d for e, d in zip(expected, image_shape))):
            raise ValueError(f"models[{i}]={model.name!r} takes inputs of shape "
                             f"{(None,) + expected}; the images of data have shape "
                             f"{(None,) + image_shape}.")
    logits = [_Logits(model, batch_size) for model in models]
    test = [fn(data.test_images) for fn in logits]
    ood = [{name: fn(images) for name, images in data.ood.items()} for fn in logits]
    corrupted = [[] for _ in models]
    for _, _, images in data.corrupted_sets():
        for i, fn in enumerate(logits):
            corrupted[i].append(fn(images))
    out = [Predictions(test[i], ood[i], tuple(corrupted[i]), **_cost_of(model))
           for i, model in enumerate(models)]
    return out[0] if single else out


# ------------------------------------------------------------------------------- evaluation
@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What `evaluate` returns.

    Attributes:
        metrics: the flat dict of numbers (keys: see the module doc), sorted by key.
        labels: the test labels.
        probs: ``(N, K)`` the ensemble's test probabilities.
        member_probs: ``(M, N, K)`` each member's test probabilities.
        reliability: `ft_keras.metrics.reliability_diagram_data` of the ensemble on the test set.
    """

    metrics: dict
    labels: np.ndarray
    probs: np.ndarray
    member_probs: np.ndarray
    reliability: dict


def _combined(member_logits, combine, k=None):
    """The ensemble's probabilities from its first ``k`` members' logits ``(M, N, K)``."""
    part = member_logits[:k]
    if combine == "logits":
        return metrics_lib.logits_to_probs(part.mean(axis=0))
    return metrics_lib.ensemble_probs(metrics_lib.logits_to_probs(part))


def _calibration(labels, probs, num_bins, stats=("accuracy", "nll", "ece", "brier")):
    fns = {"accuracy": metrics_lib.accuracy, "nll": metrics_lib.nll,
           "ece": lambda y, p: metrics_lib.ece(y, p, num_bins), "brier": metrics_lib.brier}
    return {stat: fns[stat](labels, probs) for stat in stats}


def _test_metrics(labels, member_logits, combine, num_bins):
    member_probs = metrics_lib.logits_to_probs(member_logits)
    probs = _combined(member_logits, combine)
    num_members = len(member_logits)
    out = {f"test/{k}": v for k, v in _calibration(labels, probs, num_bins).items()}
    out["test/predictive_entropy"] = float(np.mean(metrics_lib.predictive_entropy(probs)))
    if num_members >= 2:
        out["test/disagreement"] = metrics_lib.disagreement(member_probs)
        out["test/kl_diversity"] = metrics_lib.kl_diversity(member_probs)
        out["test/mutual_information"] = float(np.mean(
            metrics_lib.mutual_information(member_probs)))
    per_member = [_calibration(labels, p, num_bins) for p in member_probs]
    for stat in ("accuracy", "nll", "ece", "brier"):
        for i, values in enumerate(per_member):
            out[f"test/{stat}_member_{i}"] = values[stat]
        out[f"test/{stat}_member_mean"] = float(np.mean([v[stat] for v in per_member]))
    for k in range(1, num_members + 1):
        first = probs if k == num_members else _combined(member_logits, combine, k)
        for stat, value in _calibration(labels, first, num_bins,
                                        ("accuracy", "nll", "ece")).items():
            out[f"test/{stat}_first_{k}"] = value
    return out, member_probs, probs


def _scores(member_logits, combine):
    probs = _combined(member_logits, combine)
    scores = {"max_prob": metrics_lib.max_prob_score(probs),
              "entropy": metrics_lib.neg_entropy_score(probs)}
    if len(member_logits) >= 2:
        scores["mutual_information"] = 0.0 - metrics_lib.mutual_information(
            metrics_lib.logits_to_probs(member_logits))
    return scores


def _ood_metrics(name, in_scores, out_scores):
    out = {}
    for score, s_in in in_scores.items():
        s_out = out_scores[score]
        out[f"ood/{name}/auroc_{score}"] = metrics_lib.ood_auroc(s_in, s_out)
        out[f"ood/{name}/aupr_in_{score}"] = metrics_lib.ood_aupr(s_in, s_out, positive="in")
        out[f"ood/{name}/aupr_out_{score}"] = metrics_lib.ood_aupr(s_in, s_out, positive="out")
        out[f"ood/{name}/fpr95_{score}"] = metrics_lib.fpr_at_tpr(s_in, s_out, 0.95)
    return out


def _corruption_metrics(data, member_predictions, combine, num_bins):
    labels = data.corrupted_labels
    out, rows = {}, []
    names = [(n, s) for n in data.corruptions for s in data.severities]
    for index, (name, severity) in enumerate(names):
        logits = np.stack([p.corrupted[index] for p in member_predictions]).astype(np.float64)
        values = _calibration(labels, _combined(logits, combine), num_bins)
        rows.append((name, severity, values))
        for stat, value in values.items():
            out[f"corrupt/{name}/{severity}/{stat}"] = value
    for stat in CORRUPTION_STATS:
        out[f"corrupt/mean/{stat}"] = float(np.mean([v[stat] for _, _, v in rows]))
        for severity in data.severities:
            out[f"corrupt/mean/{severity}/{stat}"] = float(np.mean(
                [v[stat] for _, s, v in rows if s == severity]))
    return out


def _cost_metrics(member_predictions, training_macs, dense_training_macs):
    out = {}
    macs = [p.forward_macs for p in member_predictions]
    dense = member_predictions[0].dense_forward_macs
    if all(m is not None for m in macs):
        out["cost/inference_macs"] = int(sum(macs))
        if dense:
            out["cost/dense_inference_macs"] = int(dense)
            out["cost/inference_macs_relative"] = flops.relative_cost(sum(macs), dense)
    active = [p.num_active_params for p in member_predictions]
    params = member_predictions[0].num_params
    if all(a is not None for a in active):
        out["cost/active_params"] = int(sum(active))
        for i, value in enumerate(active):
            out[f"cost/active_params_member_{i}"] = int(value)
        if params:
            out["cost/dense_params"] = int(params)
            out["cost/active_params_relative"] = float(sum(active)) / params
    if training_macs is not None:
        out["cost/training_macs"] = int(_checks.check_int("training_macs", training_macs,
                                                          minimum=0))
        if dense_training_macs is not None:
            reference = _checks.check_int("dense_training_macs", dense_training_macs, minimum=1)
            out["cost/dense_training_macs"] = int(reference)
            out["cost/training_macs_relative"] = flops.relative_cost(training_macs, reference)
    return out


def _member_list(members):
    if hasattr(members, "members") and isinstance(members, keras.Model):  # an ft_keras.Ensemble
        members = members.members
    if isinstance(members, (keras.Model, Predictions)):
        return [members]
    if isinstance(members, (str, bytes)) or not hasattr(members, "__iter__"):
        raise TypeError(f"members must be an ft_keras.Ensemble, a keras.Model, Predictions or a "
                        f"sequence of them; got {type(members).__name__}.")
    members = list(members)
    if not members:
        raise ValueError("members is empty; an ensemble needs at least one member.")
    for i, member in enumerate(members):
        if not isinstance(member, (keras.Model, Predictions)):
            raise TypeError(f"members[{i}] must be a keras.Model or Predictions; got "
                            f"{type(member).__name__}.")
    return members


def evaluate(members, data, *, combine="probs", num_bins=NUM_BINS, batch_size=1000,
             training_macs=None, dense_training_macs=None):
    """The evaluation suite: test metrics, diversity, OoD detection, corruptions and cost.

    Args:
        members: an `ft_keras.Ensemble`, a `keras.Model`, or a sequence of models and/or
            `Predictions` (already predicted members, e.g. shared by two ensembles; made with
            `predict` on this ``data``, or on data with more OoD sets).
        data: an `EvaluationData` (`make_data`), or an ``(images, labels)`` test set.
        combine: "probs" (mean of member probabilities) or "logits" (softmax of mean logits).
        num_bins: ECE bins.
        batch_size: prediction batch size.
        training_macs, dense_training_macs: the ensemble's training cost and the reference (one
            dense run), for the ``cost/training_*`` keys (e.g. ``result.training_macs`` and
            ``result.dense_training_macs`` of a `ft_keras.recipes.RecipeResult`).

    Returns:
        An `Evaluation`; ``metrics`` holds the keys of the module doc.
    """
    members = _member_list(members)
    if isinstance(data, tuple) and len(data) == 2:
        data = make_data(*data)
    if not isinstance(data, EvaluationData):
        raise TypeError(f"data must be an EvaluationData (see make_data) or an (images, labels) "
                        f"tuple; got {type(data).__name__}.")
    combine = _checks.check_choice("combine", combine, COMBINE_MODES)
    num_bins = _checks.check_positive_int("num_bins", num_bins)
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    training_macs = _checks.check_int("training_macs", training_macs, minimum=0, allow_none=True)
    dense_training_macs = _checks.check_int("dense_training_macs", dense_training_macs, minimum=1,
                                            allow_none=True)
    models = [m for m in members if isinstance(m, keras.Model)]
    predicted = iter(predict(models, data, batch_size)) if models else iter(())
    predictions = [next(predicted) if isinstance(m, keras.Model) else m for m in members]
    for i, p in enumerate(predictions):
        if (len(p.test) != len(data.test_labels) or not set(data.ood) <= set(p.ood) or (
                data.corruptions and len(p.corrupted) != data.num_corrupted_sets)):
            raise ValueError(f"members[{i}] holds predictions of other data sets than data "
                             "(predict it on this EvaluationData).")

    labels = data.test_labels
    test_logits = np.stack([p.test for p in predictions]).astype(np.float64)
    metrics, member_probs, probs = _test_metrics(labels, test_logits, combine, num_bins)
    if data.ood:
        in_scores = _scores(test_logits, combine)
        for name in data.ood:
            ood_logits = np.stack([p.ood[name] for p in predictions]).astype(np.float64)
            metrics.update(_ood_metrics(name, in_scores, _scores(ood_logits, combine)))
            metrics[f"info/ood_examples/{name}"] = int(len(data.ood[name]))
    if data.corruptions:
        metrics.update(_corruption_metrics(data, predictions, combine, num_bins))
        metrics["info/corruption_examples"] = int(len(data.corruption_subset))
    metrics.update(_cost_metrics(predictions, training_macs, dense_training_macs))
    metrics.update({"info/num_members": len(predictions), "info/combine": combine,
                    "info/ece_bins": num_bins, "info/test_examples": int(len(labels))})
    reliability = metrics_lib.reliability_diagram_data(labels, probs, num_bins)
    return Evaluation(dict(sorted(metrics.items())), labels, probs, member_probs, reliability)
