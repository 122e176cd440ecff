"""The evaluation suite (ft_keras.evaluation): key scheme, values against ft_keras.metrics, cost."""

import keras
import numpy as np
import pytest

import ft_keras as ftk
from ft_keras.harness import evaluation
from ft_keras.harness import metrics

N, K, M = 40, 3, 2
CORRUPTIONS = ("gaussian_noise", "contrast")
SEVERITIES = (1, 3)


def _softmax(logits):
    return metrics.logits_to_probs(np.asarray(logits, np.float64))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, 6, 6, 1), dtype=np.uint8)
    labels = rng.integers(0, K, N)
    ood = rng.integers(0, 256, (30, 6, 6, 1), dtype=np.uint8)
    return evaluation.make_data(images, labels, ood={"noise": ood}, corruptions=CORRUPTIONS,
                                severities=SEVERITIES, corruption_examples=25)


@pytest.fixture(scope="module")
def predictions(data):
    """Hand-made member logits on every set (no model)."""
    rng = np.random.default_rng(1)

    def logits(n):
        return rng.normal(size=(n, K)).astype(np.float32) * 2

    return [evaluation.Predictions(logits(N), {"noise": logits(30)},
                                   tuple(logits(25) for _ in range(4)),
                                   forward_macs=100 * (i + 1), dense_forward_macs=500,
                                   num_params=600, num_active_params=150 + i)
            for i in range(M)]


def _expected_keys(num_members, ood=("noise",), corrupted=True):
    keys = {f"test/{s}" for s in ("accuracy", "nll", "ece", "brier", "predictive_entropy")}
    if num_members >= 2:
        keys |= {"test/disagreement", "test/kl_diversity", "test/mutual_information"}
    for stat in ("accuracy", "nll", "ece", "brier"):
        keys |= {f"test/{stat}_member_{i}" for i in range(num_members)}
        keys.add(f"test/{stat}_member_mean")
    for stat in ("accuracy", "nll", "ece"):
        keys |= {f"test/{stat}_first_{k}" for k in range(1, num_members + 1)}
    scores = ["max_prob", "entropy"] + (["mutual_information"] if num_members >= 2 else [])
    for name in ood:
        keys |= {f"ood/{name}/{stat}_{score}" for stat in ("auroc", "aupr_in", "aupr_out",
                                                            "fpr95") for score in scores}
        keys.add(f"info/ood_examples/{name}")
    if corrupted:
        for stat in ("accuracy", "nll", "ece", "brier"):
            keys |= {f"corrupt/{c}/{s}/{stat}" for c in CORRUPTIONS for s in SEVERITIES}
            keys |= {f"corrupt/mean/{s}/{stat}" for s in SEVERITIES}
            keys.add(f"corrupt/mean/{stat}")
        keys.add("info/corruption_examples")
    keys |= {"info/num_members", "info/combine", "info/ece_bins", "info/test_examples"}
    return keys


def test_key_scheme_and_values(data, predictions):
    result = evaluation.evaluate(predictions, data, training_macs=3000, dense_training_macs=1000)
    got = result.metrics
    cost = {"cost/inference_macs", "cost/dense_inference_macs", "cost/inference_macs_relative",
            "cost/active_params", "cost/dense_params", "cost/active_params_relative",
            "cost/active_params_member_0", "cost/active_params_member_1", "cost/training_macs",
            "cost/dense_training_macs", "cost/training_macs_relative"}
    assert set(got) == _expected_keys(M) | cost
    assert list(got) == sorted(got)

    labels = data.test_labels
    member_probs = np.stack([_softmax(p.test) for p in predictions])
    probs = member_probs.mean(axis=0)
    np.testing.assert_allclose(result.probs, probs, rtol=1e-12)
    assert got["test/accuracy"] == metrics.accuracy(labels, probs)
    assert got["test/nll"] == pytest.approx(metrics.nll(labels, probs), rel=1e-12)
    assert got["test/ece"] == pytest.approx(metrics.ece(labels, probs, 15), rel=1e-12)
    assert got["test/brier"] == pytest.approx(metrics.brier(labels, probs), rel=1e-12)
    assert got["test/disagreement"] == metrics.disagreement(member_probs)
    assert got["test/kl_diversity"] == pytest.approx(metrics.kl_diversity(member_probs))
    for i in range(M):
        assert got[f"test/accuracy_member_{i}"] == metrics.accuracy(labels, member_probs[i])
        assert got[f"test/nll_member_{i}"] == pytest.approx(metrics.nll(labels, member_probs[i]))
    assert got["test/accuracy_member_mean"] == pytest.approx(
        np.mean([got[f"test/accuracy_member_{i}"] for i in range(M)]))
    for stat in ("accuracy", "nll", "ece"):
        assert got[f"test/{stat}_first_1"] == pytest.approx(got[f"test/{stat}_member_0"])
        assert got[f"test/{stat}_first_{M}"] == got[f"test/{stat}"]

    ood_probs = np.mean([_softmax(p.ood["noise"]) for p in predictions], axis=0)
    assert got["ood/noise/auroc_max_prob"] == metrics.ood_auroc(
        metrics.max_prob_score(probs), metrics.max_prob_score(ood_probs))
    assert got["ood/noise/aupr_out_entropy"] == metrics.ood_aupr(
        metrics.neg_entropy_score(probs), metrics.neg_entropy_score(ood_probs), positive="out")
    assert got["info/ood_examples/noise"] == 30

    corrupted_labels = data.corrupted_labels
    sets = [(c, s) for c in CORRUPTIONS for s in SEVERITIES]
    accuracies = {}
    for index, (name, severity) in enumerate(sets):
        corrupted = np.mean([_softmax(p.corrupted[index]) for p in predictions], axis=0)
        accuracies[name, severity] = metrics.accuracy(corrupted_labels, corrupted)
        assert got[f"corrupt/{name}/{severity}/accuracy"] == accuracies[name, severity]
    assert got["corrupt/mean/accuracy"] == pytest.approx(np.mean(list(accuracies.values())))
    assert got["corrupt/mean/3/accuracy"] == pytest.approx(
        (accuracies["gaussian_noise", 3] + accuracies["contrast", 3]) / 2)
    assert got["info/corruption_examples"] == 25 and got["info/test_examples"] == N

    assert got["cost/inference_macs"] == 300 and got["cost/dense_inference_macs"] == 500
    assert got["cost/inference_macs_relative"] == 0.6
    assert got["cost/active_params"] == 301 and got["cost/active_params_member_1"] == 151
    assert got["cost/training_macs_relative"] == 3.0
    assert result.reliability["counts"].sum() == N


def test_combine_logits_and_one_member(data, predictions):
    result = evaluation.evaluate(predictions, data, combine="LOGITS")
    mean_logits = np.mean([p.test.astype(np.float64) for p in predictions], axis=0)
    probs = _softmax(mean_logits)
    assert result.metrics["test/accuracy"] == metrics.accuracy(data.test_labels, probs)
    assert result.metrics["test/nll"] == pytest.approx(metrics.nll(data.test_labels, probs))
    assert result.metrics["info/combine"] == "logits"

    single = evaluation.evaluate(predictions[:1], data).metrics
    assert set(single) == _expected_keys(1) | {
        "cost/inference_macs", "cost/dense_inference_macs", "cost/inference_macs_relative",
        "cost/active_params", "cost/dense_params", "cost/active_params_relative",
        "cost/active_params_member_0"}
    assert single["test/accuracy"] == single["test/accuracy_member_0"]

    plain = evaluation.evaluate(predictions, (data.test_images, data.test_labels)).metrics
    assert not any(k.startswith(("ood/", "corrupt/")) for k in plain)
    assert plain["test/accuracy"] == evaluation.evaluate(predictions, data).metrics[
        "test/accuracy"]


def _model(seed, sparsity=None):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(8, activation="relu", name="fc1"),
                              keras.layers.Dense(K, name="out")])
    return ftk.sparsify(model, sparsity, distribution="uniform", seed=seed) if sparsity else model


def _assert_same_metrics(got, expected):
    """The same keys and values; predictions made in other batch sizes differ in the last bits of
    float32 logits, so values agree to 1e-6 relative."""
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
        else:
            assert got[key] == value, key


def test_models_ensembles_and_predictions_agree(data):
    models = [_model(0), _model(1, sparsity=0.5)]
    from_models = evaluation.evaluate(models, data).metrics
    predicted = evaluation.predict(models, data, batch_size=7)
    assert len(predicted) == 2 and len(predicted[0].corrupted) == 4
    _assert_same_metrics(evaluation.evaluate(predicted, data).metrics, from_models)
    mixed = evaluation.evaluate([predicted[0], models[1]], data).metrics
    _assert_same_metrics(mixed, from_models)
    ensemble = ftk.Ensemble(models, combine="probs")
    _assert_same_metrics(evaluation.evaluate(ensemble, data).metrics, from_models)
    logits = models[0](data.test_images.astype(np.float32) / 255.0).numpy()
    np.testing.assert_allclose(predicted[0].test, logits, rtol=1e-5, atol=1e-6)
    assert from_models["test/accuracy_member_0"] == metrics.accuracy(data.test_labels,
                                                                     _softmax(logits))
    dense_macs = 36 * 8 + 8 * K
    assert from_models["cost/dense_inference_macs"] == dense_macs
    assert from_models["cost/inference_macs"] == dense_macs + round(0.5 * 36 * 8) + round(
        0.5 * 8 * K)
    assert from_models["cost/active_params_member_0"] == dense_macs + 8 + K
    assert from_models["cost/dense_params"] == dense_macs + 8 + K


def test_make_data_subset_and_lazy_corruptions(data):
    assert len(data.corruption_subset) == 25 and len(set(data.corruption_subset)) == 25
    np.testing.assert_array_equal(data.corrupted_labels, data.test_labels[data.corruption_subset])
    lazy = evaluation.make_data(data.test_images, data.test_labels, corruptions=CORRUPTIONS,
                                severities=SEVERITIES, corruption_examples=25,
                                keep_corrupted=False)
    assert lazy.corrupted is None
    for (n1, s1, a), (n2, s2, b) in zip(data.corrupted_sets(), lazy.corrupted_sets()):
        assert (n1, s1) == (n2, s2)
        np.testing.assert_array_equal(a, b)
    assert [(n, s) for n, s, _ in data.corrupted] == [
        ("gaussian_noise", 1), ("gaussian_noise", 3), ("contrast", 1), ("contrast", 3)]
    everything = evaluation.make_data(data.test_images, data.test_labels,
                                      corruptions=["Contrast"], severities=[2])
    assert len(everything.corruption_subset) == N and everything.corruptions == ("contrast",)


def test_bad_arguments(data, predictions):
    images, labels = data.test_images, data.test_labels
    cases = [
        (ValueError, "combine='mean'",
         lambda: evaluation.evaluate(predictions, data, combine="mean")),
        (TypeError, "data must be",
         lambda: evaluation.evaluate(predictions, images)),
        (ValueError, "members is empty", lambda: evaluation.evaluate([], data)),
        (TypeError, r"members\[1\]", lambda: evaluation.evaluate([predictions[0], "m"], data)),
        (ValueError, "num_bins=0", lambda: evaluation.evaluate(predictions, data, num_bins=0)),
        (ValueError, "other data sets",
         lambda: evaluation.evaluate(predictions, evaluation.make_data(
             images, labels, corruptions=("contrast",), severities=(1,)))),
        (ValueError, "other data sets",
         lambda: evaluation.evaluate(predictions, (images[:-1], labels[:-1]))),
        (ValueError, "corruptions='fire'",
         lambda: evaluation.make_data(images, labels, corruptions=("fire",))),
        (ValueError, "severities=6",
         lambda: evaluation.make_data(images, labels, corruptions=CORRUPTIONS, severities=(6,))),
        (TypeError, "uint8",
         lambda: evaluation.make_data(images / 255.0, labels, corruptions=CORRUPTIONS)),
        (ValueError, "ood",
         lambda: evaluation.make_data(images, labels, ood={"x": images[:, :3]})),
        (ValueError, "test_labels", lambda: evaluation.make_data(images, labels[:-1])),
        (TypeError, "test_images", lambda: evaluation.make_data(list(images), labels)),
        (ValueError, "corruption_examples=-1",
         lambda: evaluation.make_data(images, labels, corruptions=CORRUPTIONS,
                                      corruption_examples=-1)),
        (TypeError, "batch_size", lambda: evaluation.predict(_model(0), data, batch_size=2.5)),
    ]
    for error, pattern, call in cases:
        with pytest.raises(error, match=pattern):
            call()


if __name__ == "__main__":  # bazel test / python tests/test_evaluation.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
