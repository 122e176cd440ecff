"""Tests for ft_keras.metrics (numpy): hand-computed values, brute-force checks, input checks.

The streaming Keras metrics are tested in tests/test_keras_metrics.py."""

import itertools
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from ft_keras.harness import metrics

# Three examples, three classes (used for accuracy / NLL / Brier by hand).
HAND_PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
HAND_LABELS = np.array([0, 1, 0])


def _random_probs(rng, shape):
    return metrics.logits_to_probs(rng.normal(scale=2.0, size=shape))


# ----------------------------------------------------------------------------- softmax
def test_logits_to_probs_is_stable_and_normalised():
    probs = metrics.logits_to_probs([[1000.0, 0.0, -1000.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(probs, [[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], atol=1e-12)
    logits = np.random.default_rng(0).normal(size=(5, 4))
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(metrics.logits_to_probs(logits), expected, rtol=1e-12)
    np.testing.assert_allclose(metrics.logits_to_probs([[-np.inf, 0.0]]), [[0.0, 1.0]])


def test_logits_to_probs_keeps_float32_and_takes_tensors():
    out = metrics.logits_to_probs(tf.constant([[0.0, 0.0]], tf.float32))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.5, 0.5]])


@pytest.mark.parametrize("bad", [[[np.nan, 0.0]], [[np.inf, 0.0]], [[-np.inf, -np.inf]], 3.0])
def test_logits_to_probs_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="logits"):
        metrics.logits_to_probs(bad)


# ----------------------------------------------------------------------------- accuracy, NLL, Brier
def test_accuracy_hand_case():
    # argmaxes 0, 1, 2 against labels 0, 1, 0 -> 2 of 3 right.
    assert metrics.accuracy(HAND_LABELS, HAND_PROBS) == pytest.approx(2 / 3)


def test_nll_hand_case():
    # p(y) = 0.7, 0.8, 0.3.
    expected = -(math.log(0.7) + math.log(0.8) + math.log(0.3)) / 3
    assert metrics.nll(HAND_LABELS, HAND_PROBS) == pytest.approx(expected, rel=1e-12)


def test_brier_hand_case():
    # (0.3^2 + 0.2^2 + 0.1^2) = 0.14; (0.1^2 + 0.2^2 + 0.1^2) = 0.06;
    # (0.7^2 + 0.3^2 + 0.4^2) = 0.74; mean = 0.94 / 3.
    assert metrics.brier(HAND_LABELS, HAND_PROBS) == pytest.approx(0.94 / 3, rel=1e-12)


def test_nll_clips_zero_probability_at_eps():
    probs = [[1.0, 0.0], [0.5, 0.5]]
    # -(log 1e-12 + log 0.5) / 2
    assert metrics.nll([1, 0], probs) == pytest.approx(-(math.log(1e-12) + math.log(0.5)) / 2)
    assert metrics.nll([1, 0], probs, eps=1e-6) == pytest.approx(
        -(math.log(1e-6) + math.log(0.5)) / 2
    )
    assert math.isfinite(metrics.nll([1], [[1.0, 0.0]]))
    assert metrics.nll([1], [[1.0, 0.0]], eps=0.0) == math.inf


def test_label_formats_agree():
    onehot = np.eye(3)[HAND_LABELS]
    column = HAND_LABELS[:, None]
    as_float = HAND_LABELS.astype(np.float32)
    as_tensor = tf.constant(HAND_LABELS)
    for labels in (onehot, column, as_float, as_tensor, HAND_LABELS.tolist()):
        assert metrics.nll(labels, HAND_PROBS) == pytest.approx(
            metrics.nll(HAND_LABELS, HAND_PROBS)
        )
    assert metrics.brier(HAND_LABELS, tf.constant(HAND_PROBS)) == pytest.approx(0.94 / 3)


# ----------------------------------------------------------------------------- ECE
def test_ece_hand_case_with_value_on_a_bin_edge():
    # num_bins=4: bins (0, .25], (.25, .5], (.5, .75], (.75, 1]   (edges exact in binary)
    #   ex  probs       label  conf  pred  correct  bin
    #   1   [.9, .1]    0      .9    0     yes      3
    #   2   [.8, .2]    1      .8    0     no       3
    #   3   [.6, .4]    0      .6    0     yes      2
    #   4   [.3, .7]    1      .7    1     yes      2
    #   5   [.5, .5]    1      .5    0     no       1   (exactly on the edge .5 -> lower bin)
    # bin 3: n=2 acc .5 conf .85 -> 2/5 * .35 = .14
    # bin 2: n=2 acc 1. conf .65 -> 2/5 * .35 = .14
    # bin 1: n=1 acc 0. conf .5  -> 1/5 * .5  = .10
    # ECE = .38 (had .5 gone to bin 2 instead: bin 2 gap |2/3 - .6| * 3/5 = .04, ECE .18)
    probs = [[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]]
    labels = [0, 1, 0, 1, 1]
    assert metrics.ece(labels, probs, num_bins=4) == pytest.approx(0.38, abs=1e-12)
    data = metrics.reliability_diagram_data(labels, probs, num_bins=4)
    assert data["counts"].tolist() == [0, 1, 2, 2]
    np.testing.assert_allclose(data["accuracy"], [np.nan, 0.0, 1.0, 0.5])
    np.testing.assert_allclose(data["confidence"], [np.nan, 0.5, 0.65, 0.85])
    np.testing.assert_allclose(data["edges"], [0.0, 0.25, 0.5, 0.75, 1.0])
    assert data["ece"] == pytest.approx(0.38, abs=1e-12)


def test_ece_bin_edges_are_right_closed():
    # (lo, hi]: 0 -> first bin, .25 -> bin 0, just above .25 -> bin 1, 1 -> last bin,
    # round-off above 1 -> last bin.
    bins = metrics._bin_indices(np.array([0.0, 0.25, 0.25 + 1e-12, 0.5, 0.75, 1.0, 1.0 + 1e-9]), 4)
    assert bins.tolist() == [0, 0, 1, 1, 2, 3, 3]
    data = metrics.reliability_diagram_data([0, 1], [[1.0, 0.0], [0.0, 1.0]], num_bins=15)
    assert data["counts"][-1] == 2 and data["counts"][:-1].sum() == 0


def test_ece_is_zero_when_perfectly_calibrated():
    # Confidence .75 with 3 of 4 right, and confidence 1 with all right.
    probs = [[0.75, 0.25]] * 4 + [[0.0, 1.0]] * 2
    labels = [0, 0, 0, 1, 1, 1]
    assert metrics.ece(labels, probs) == pytest.approx(0.0, abs=1e-12)


def test_ece_single_bin_is_gap_between_accuracy_and_mean_confidence():
    rng = np.random.default_rng(1)
    probs = _random_probs(rng, (50, 4))
    labels = rng.integers(0, 4, size=50)
    expected = abs(metrics.accuracy(labels, probs) - probs.max(axis=1).mean())
    assert metrics.ece(labels, probs, num_bins=1) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("num_bins", [0, -3])
def test_ece_rejects_bad_num_bins(num_bins):
    with pytest.raises(ValueError, match=f"num_bins={num_bins} is not allowed"):
        metrics.ece([0], [[0.6, 0.4]], num_bins=num_bins)
    with pytest.raises(ValueError, match=f"num_bins={num_bins} is not allowed"):
        metrics.summary([0], [[0.6, 0.4]], num_bins=num_bins)


@pytest.mark.parametrize("num_bins", [2.5, "15", True, None])
def test_ece_rejects_num_bins_of_wrong_type(num_bins):
    # A TypeError since the argument checks were unified (it was a ValueError).
    with pytest.raises(TypeError, match="num_bins must be an int"):
        metrics.ece([0], [[0.6, 0.4]], num_bins=num_bins)


def test_ece_accepts_numpy_integer_num_bins():
    assert metrics.ece([0], [[0.6, 0.4]], num_bins=np.int64(5)) == pytest.approx(0.4)


# ----------------------------------------------------------------------------- ensembles
def _one_hot_members(predictions, num_classes=2):
    """(M, N) argmax classes -> (M, N, K) confident probabilities with those argmaxes."""
    eye = np.full((num_classes, num_classes), 0.1 / (num_classes - 1)) + np.eye(num_classes) * (
        0.9 - 0.1 / (num_classes - 1)
    )
    return eye[np.asarray(predictions)]


def test_ensemble_probs_is_member_mean():
    member_probs = [[[1.0, 0.0], [0.2, 0.8]], [[0.0, 1.0], [0.4, 0.6]]]
    np.testing.assert_allclose(metrics.ensemble_probs(member_probs), [[0.5, 0.5], [0.3, 0.7]])


def test_disagreement_hand_case():
    # Member argmaxes: a0 = 0000, a1 = 0001, a2 = 0010.
    # Pairs: (0,1) differ on 1/4, (0,2) on 1/4, (1,2) on 2/4 -> mean (1/4 + 1/4 + 2/4) / 3 = 1/3.
    member_probs = _one_hot_members([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])
    assert metrics.disagreement(member_probs) == pytest.approx(1 / 3, abs=1e-12)


def test_disagreement_identical_members_is_zero():
    probs = _random_probs(np.random.default_rng(2), (20, 5))
    assert metrics.disagreement(np.stack([probs] * 4)) == 0.0


def test_disagreement_matches_pairwise_definition():
    rng = np.random.default_rng(3)
    member_probs = _random_probs(rng, (5, 40, 3))
    argmax = member_probs.argmax(axis=2)
    pairs = itertools.combinations(range(5), 2)
    expected = np.mean([np.mean(argmax[i] != argmax[j]) for i, j in pairs])
    assert metrics.disagreement(member_probs) == pytest.approx(expected, abs=1e-12)


def test_kl_diversity_identical_members_is_zero():
    probs = _random_probs(np.random.default_rng(4), (10, 3))
    assert metrics.kl_diversity(np.stack([probs] * 3)) == 0.0


def test_kl_diversity_two_class_hand_case():
    # p = [.5, .5], q = [.9, .1], one example.
    # KL(p||q) = .5 log(.5/.9) + .5 log(.5/.1) = .5 log(25/9) = log(5/3)
    # KL(q||p) = .9 log(1.8) + .1 log(.2); the ordered-pair mean averages both.
    kl_pq = math.log(5 / 3)
    kl_qp = 0.9 * math.log(1.8) + 0.1 * math.log(0.2)
    member_probs = [[[0.5, 0.5]], [[0.9, 0.1]]]
    assert metrics.kl_diversity(member_probs) == pytest.approx((kl_pq + kl_qp) / 2, rel=1e-12)


def test_kl_diversity_with_zero_probabilities_uses_eps():
    # KL([1, 0] || [0, 1]) = 1 * (log 1 - log eps); the zero term contributes 0. Symmetric here.
    value = metrics.kl_diversity([[[1.0, 0.0]], [[0.0, 1.0]]], eps=1e-6)
    assert value == pytest.approx(-math.log(1e-6), rel=1e-12)


def test_predictive_entropy_and_scores():
    probs = [[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]]
    h3 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    np.testing.assert_allclose(metrics.predictive_entropy(probs), [math.log(2), 0.0, h3])
    np.testing.assert_allclose(metrics.neg_entropy_score(probs), [-math.log(2), 0.0, -h3])
    np.testing.assert_allclose(metrics.max_prob_score(probs), [0.5, 1.0, 0.75])


def test_mutual_information_hand_cases():
    # Two opposite one-hot members: H(mean) = H([.5, .5]) = log 2, members' entropies 0.
    np.testing.assert_allclose(
        metrics.mutual_information([[[1.0, 0.0]], [[0.0, 1.0]]]), [math.log(2)], rtol=1e-12
    )
    probs = _random_probs(np.random.default_rng(5), (8, 4))
    assert np.all(metrics.mutual_information(np.stack([probs] * 3)) == 0.0)
    mi = metrics.mutual_information(_random_probs(np.random.default_rng(6), (4, 30, 5)))
    assert mi.shape == (30,) and np.all(mi >= 0.0)


def test_member_metrics_and_summary_keys():
    member_probs = np.stack([HAND_PROBS, HAND_PROBS[:, [1, 0, 2]]])
    out = metrics.member_metrics(HAND_LABELS, member_probs)
    assert set(out) == {"nll_member_0", "accuracy_member_0", "nll_member_1", "accuracy_member_1"}
    assert out["nll_member_0"] == pytest.approx(metrics.nll(HAND_LABELS, HAND_PROBS))
    assert out["accuracy_member_1"] == pytest.approx(0.0)  # argmaxes 1, 0, 2 vs 0, 1, 0

    summary = metrics.summary(HAND_LABELS, member_probs)
    mean = member_probs.mean(axis=0)
    assert set(summary) == {
        "test/accuracy", "test/nll", "test/ece", "test/brier", "test/disagreement",
        "test/kl_diversity", "test/nll_member_0", "test/accuracy_member_0",
        "test/nll_member_1", "test/accuracy_member_1",
    }
    assert summary["test/nll"] == pytest.approx(metrics.nll(HAND_LABELS, mean))
    assert summary["test/ece"] == pytest.approx(metrics.ece(HAND_LABELS, mean))
    assert summary["test/brier"] == pytest.approx(metrics.brier(HAND_LABELS, mean))
    assert summary["test/disagreement"] == pytest.approx(2 / 3)
    assert all(isinstance(value, float) for value in summary.values())


def test_summary_single_model_and_prefix():
    out = metrics.summary(HAND_LABELS, HAND_PROBS, prefix="ood/")
    assert set(out) == {
        "ood/accuracy", "ood/nll", "ood/ece", "ood/brier", "ood/nll_member_0",
        "ood/accuracy_member_0",
    }
    with pytest.raises(TypeError, match="prefix"):
        metrics.summary(HAND_LABELS, HAND_PROBS, prefix=None)


# ----------------------------------------------------------------------------- OoD
def test_auroc_extremes_and_ties():
    assert metrics.ood_auroc([3, 4, 5], [0, 1, 2]) == 1.0
    assert metrics.ood_auroc([0, 1, 2], [3, 4, 5]) == 0.0
    assert metrics.ood_auroc([1, 1, 1], [1, 1]) == 0.5


def test_auroc_hand_case_with_tie():
    # in = [3, 2, 1], out = [2, 0]; pairs (in, out):
    # (3,2)=1 (3,0)=1 (2,2)=.5 (2,0)=1 (1,2)=0 (1,0)=1 -> 4.5 / 6 = .75
    assert metrics.ood_auroc([3, 2, 1], [2, 0]) == pytest.approx(0.75, abs=1e-12)


def test_auroc_matches_brute_force_pair_count():
    rng = np.random.default_rng(7)
    scores_in = rng.integers(0, 10, size=57).astype(float)  # many ties
    scores_out = rng.integers(0, 8, size=43).astype(float)
    diff = scores_in[:, None] - scores_out[None, :]
    expected = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
    assert metrics.ood_auroc(scores_in, scores_out) == pytest.approx(expected, abs=1e-12)
    continuous_in, continuous_out = rng.normal(1.0, size=200), rng.normal(size=150)
    diff = continuous_in[:, None] - continuous_out[None, :]
    assert metrics.ood_auroc(continuous_in, continuous_out) == pytest.approx(
        np.mean(diff > 0), abs=1e-12
    )


def test_aupr_hand_cases():
    # Sorted by score: .9 in, .8 in, .7 out, .4 in, .3 out.
    # Precision at each positive (in): 1/1, 2/2, 3/4 -> AP = (1 + 1 + .75) / 3.
    assert metrics.ood_aupr([0.9, 0.8, 0.4], [0.7, 0.3]) == pytest.approx(2.75 / 3)
    # positive="out": lowest scores first: .3 out, .4 in, .7 out, .8 in, .9 in.
    # Precision at each positive (out): 1/1, 2/3 -> AP = (1 + 2/3) / 2.
    assert metrics.ood_aupr([0.9, 0.8, 0.4], [0.7, 0.3], positive="out") == pytest.approx(5 / 6)
    # Ties enter together: threshold 1 -> tp 1, fp 1 (P .5, R .5); threshold 0 -> P 2/3, R 1.
    # AP = .5 * .5 + .5 * 2/3.
    assert metrics.ood_aupr([1, 0], [1]) == pytest.approx(0.25 + 1 / 3)
    assert metrics.ood_aupr([5, 6], [1, 2]) == 1.0


def test_fpr_at_tpr_hand_case():
    # in = 1..10. tpr .95 -> k = ceil(9.5) = 10 -> threshold 1 -> out >= 1: {1, 2, 11} = 3/4.
    # tpr .8 -> k = 8 -> threshold 3 -> out >= 3: {11} = 1/4.
    scores_in = np.arange(1, 11)
    scores_out = [0.5, 1.0, 2.0, 11.0]
    assert metrics.fpr_at_tpr(scores_in, scores_out) == pytest.approx(0.75)
    assert metrics.fpr_at_tpr(scores_in, scores_out, tpr=0.8) == pytest.approx(0.25)
    # 0.95 * 20 = 19 exactly: k = 19 -> threshold 2 (in = 1..20) -> out >= 2: {2, 11} = 2/4.
    assert metrics.fpr_at_tpr(np.arange(1, 21), scores_out, tpr=0.95) == pytest.approx(0.5)
    assert metrics.fpr_at_tpr([5, 6], [1, 2]) == 0.0


@pytest.mark.parametrize("tpr", [0.0, 1.5, -0.1, np.nan])
def test_fpr_at_tpr_rejects_bad_tpr(tpr):
    with pytest.raises(ValueError, match=r"tpr=.* is not allowed.*\(0.0, 1.0\]"):
        metrics.fpr_at_tpr([1.0], [0.0], tpr=tpr)


@pytest.mark.parametrize("tpr", ["0.95", True, None])
def test_fpr_at_tpr_rejects_tpr_of_wrong_type(tpr):
    with pytest.raises(TypeError, match="tpr must be a finite number"):
        metrics.fpr_at_tpr([1.0], [0.0], tpr=tpr)


@pytest.mark.parametrize(
    "scores_in, scores_out, name",
    [([], [1.0], "scores_in"), ([[1.0]], [1.0], "scores_in"), ([1.0], [np.nan], "scores_out")],
)
def test_ood_rejects_bad_scores(scores_in, scores_out, name):
    for fn in (metrics.ood_auroc, metrics.ood_aupr, metrics.fpr_at_tpr):
        with pytest.raises(ValueError, match=name):
            fn(scores_in, scores_out)


def test_aupr_rejects_bad_positive():
    with pytest.raises(ValueError, match="positive='ood' is not supported"):
        metrics.ood_aupr([1.0], [0.0], positive="ood")
    with pytest.raises(TypeError, match="positive must be one of"):
        metrics.ood_aupr([1.0], [0.0], positive=1)
    # Choices are case-insensitive.
    assert metrics.ood_aupr([0.9, 0.8], [0.7], positive="OUT") == metrics.ood_aupr(
        [0.9, 0.8], [0.7], positive="out")


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "labels, probs, match",
    [
        ([0, 1], [0.5, 0.5], r"probs must have shape \(N, K\)"),
        ([0, 1], np.zeros((0, 2)), "probs must not be empty"),
        ([0], [[0.5, 0.6]], "sum to 1"),
        ([0], [[2.0, -1.0]], r"probabilities in \[0, 1\]"),
        ([0], [[np.nan, 1.0]], "finite"),
        ([0, 1], [[0.5, 0.5]], "one entry per example"),
        ([0, 2], [[0.5, 0.5], [0.5, 0.5]], r"class indices in \[0, 2\)"),
        ([0, -1], [[0.5, 0.5], [0.5, 0.5]], r"class indices in \[0, 2\)"),
        ([0.5, 1], [[0.5, 0.5], [0.5, 0.5]], "integer class indices"),
        ([[[0]], [[1]]], [[0.5, 0.5], [0.5, 0.5]], "labels must be class indices"),
    ],
)
def test_bad_inputs_raise_value_error(labels, probs, match):
    for fn in (metrics.accuracy, metrics.nll, metrics.brier, metrics.ece):
        with pytest.raises(ValueError, match=match):
            fn(labels, probs)


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError, match="probs"):
        metrics.accuracy([0], [["a", "b"]])
    with pytest.raises(TypeError, match="labels"):
        metrics.accuracy(object(), [[0.5, 0.5]])


@pytest.mark.parametrize("eps", [-1e-3, 1.0, np.nan])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps=.* is not allowed"):
        metrics.nll([0], [[0.5, 0.5]], eps=eps)
    with pytest.raises(ValueError, match="eps=.* is not allowed"):
        metrics.kl_diversity([[[0.5, 0.5]], [[0.5, 0.5]]], eps=eps)


@pytest.mark.parametrize("eps", ["1e-12", None, True])
def test_eps_of_wrong_type(eps):
    # A TypeError since the argument checks were unified (it was a ValueError).
    with pytest.raises(TypeError, match="eps must be a finite number"):
        metrics.nll([0], [[0.5, 0.5]], eps=eps)


def test_ensemble_functions_validate_member_shape():
    for fn in (metrics.disagreement, metrics.kl_diversity, metrics.ensemble_probs,
               metrics.mutual_information):
        with pytest.raises(ValueError, match=r"member_probs must have shape \(M, N, K\)"):
            fn([[0.5, 0.5]])
    for fn in (metrics.disagreement, metrics.kl_diversity):
        with pytest.raises(ValueError, match="at least 2 members"):
            fn([[[0.5, 0.5]]])
    with pytest.raises(ValueError, match="member_probs rows must sum to 1"):
        metrics.disagreement([[[0.5, 0.6]], [[0.5, 0.5]]])


def test_members_of_different_shapes_are_named():
    three = metrics.logits_to_probs(np.zeros((3, 2)))
    four = metrics.logits_to_probs(np.zeros((4, 2)))
    three_classes = metrics.logits_to_probs(np.zeros((3, 3)))
    for fn in (metrics.disagreement, metrics.kl_diversity, metrics.ensemble_probs,
               metrics.mutual_information):
        with pytest.raises(ValueError, match=r"member_probs holds members of different shapes: "
                           r"member_probs\[0\] has shape \(3, 2\) but member_probs\[1\] has "
                           r"shape \(4, 2\)"):
            fn([three, four])
        with pytest.raises(ValueError, match=r"member_probs\[2\] has shape \(3, 3\)"):
            fn([three, three, three_classes])
    with pytest.raises(ValueError, match="members of different shapes"):
        metrics.summary([0, 1, 0], [three, tf.constant(four)])
    with pytest.raises(ValueError, match="members of different shapes"):
        metrics.member_metrics([0, 1, 0], [three, four])
    # Nested raggedness is reported where it is.
    with pytest.raises(ValueError, match=r"member_probs\[0\] has shape \(2, 2\) but "
                       r"member_probs\[1\] has shape \(1, 2\)"):
        metrics.disagreement([[three[0], three[1]], [three[0]]])


# ----------------------------------------------------------------------------- no Keras
def test_metrics_module_imports_neither_keras_nor_tensorflow():
    # Load ft_keras.harness.metrics without the package's __init__ (which imports Keras for the rest of
    # the library): the module and what it imports must need numpy only.
    package_dir = os.path.dirname(os.path.dirname(metrics.__file__))
    code = textwrap.dedent(
        f"""
        import sys, types
        package = types.ModuleType("ft_keras")
        package.__path__ = [{package_dir!r}]
        sys.modules["ft_keras"] = package
        import ft_keras.harness.metrics as m
        assert m.accuracy([0, 1], [[0.9, 0.1], [0.2, 0.8]]) == 1.0
        print(sorted(n for n in sys.modules
                     if n.split(".")[0] in ("keras", "tensorflow", "tf_keras", "jax", "torch")))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


if __name__ == "__main__":  # bazel test / python tests/test_metrics.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
