"""Tests for ft_keras.densities (hand-computed allocations and error cases)."""

import math

import numpy as np
import pytest

from ft_keras import densities as dist
from ft_keras.densities import (
    SUPPORTED_DISTRIBUTIONS,
    active_counts,
    layer_densities,
    total_density,
)

LENET = {"fc1": (784, 300), "fc2": (300, 100), "fc3": (100, 10)}
LENET_N = {"fc1": 235_200, "fc2": 30_000, "fc3": 1_000}
LENET_TOTAL = 266_200


def _weighted(shapes, densities):
    return math.fsum(densities[k] * math.prod(s) for k, s in shapes.items())


def _assert_total(shapes, densities, sparsity):
    n_total = sum(math.prod(s) for s in shapes.values())
    assert _weighted(shapes, densities) == pytest.approx((1 - sparsity) * n_total, rel=1e-10)
    assert total_density(shapes, densities) == pytest.approx(1 - sparsity, rel=1e-10)


def test_supported_distributions():
    assert SUPPORTED_DISTRIBUTIONS == ("uniform", "er", "erk")


def test_lenet_erk_s09_hand_computed():
    budget = 0.1 * LENET_TOTAL  # 26,620 active weights
    raw = {"fc1": 1084 / 235_200, "fc2": 400 / 30_000, "fc3": 110 / 1_000}
    # First solve: raw_l * N_l = sum(shape) for 2-D kernels.
    eps0 = budget / (1084 + 400 + 110)
    assert eps0 * raw["fc3"] > 1  # 16.70 * 0.11 = 1.84: the rule must make fc3 dense
    assert eps0 * raw["fc2"] < 1
    eps1 = (budget - 1_000) / (1084 + 400)
    assert eps1 * raw["fc2"] < 1  # no further layer is capped

    got = layer_densities(LENET, 0.9, "erk")
    assert list(got) == ["fc1", "fc2", "fc3"]
    assert got["fc3"] == 1.0
    assert got["fc1"] == pytest.approx(eps1 * raw["fc1"], rel=1e-12)
    assert got["fc2"] == pytest.approx(eps1 * raw["fc2"], rel=1e-12)
    assert got["fc1"] == pytest.approx(0.0795677705, rel=1e-8)
    assert got["fc2"] == pytest.approx(0.2301886792, rel=1e-8)
    _assert_total(LENET, got, 0.9)
    # Default distribution is erk.
    assert layer_densities(LENET, 0.9) == got


def test_lenet_erk_high_sparsity_no_cap():
    got = layer_densities(LENET, 0.99)
    eps = 0.01 * LENET_TOTAL / (1084 + 400 + 110)
    assert eps * 0.11 < 1
    assert got["fc1"] == pytest.approx(eps * 1084 / 235_200, rel=1e-12)
    assert got["fc2"] == pytest.approx(eps * 400 / 30_000, rel=1e-12)
    assert got["fc3"] == pytest.approx(eps * 0.11, rel=1e-12)
    _assert_total(LENET, got, 0.99)


def test_uniform():
    got = layer_densities(LENET, 0.9, "uniform")
    for value in got.values():
        assert value == pytest.approx(0.1, rel=1e-12)
    _assert_total(LENET, got, 0.9)

    kept = layer_densities(LENET, 0.9, "uniform", keep_dense="fc3")
    expected = (0.1 * LENET_TOTAL - 1_000) / (235_200 + 30_000)
    assert kept["fc3"] == 1.0
    assert kept["fc1"] == pytest.approx(expected, rel=1e-12)
    assert kept["fc2"] == pytest.approx(expected, rel=1e-12)
    _assert_total(LENET, kept, 0.9)


def test_er_differs_from_erk_on_conv():
    shapes = {"conv": (3, 3, 16, 32), "fc": (512, 10)}
    n_conv, n_fc = 4608, 5120
    budget = 0.2 * (n_conv + n_fc)  # S = 0.8
    raw_er = {"conv": 48 / 512, "fc": 522 / 5120}
    eps_er = budget / (raw_er["conv"] * n_conv + raw_er["fc"] * n_fc)
    assert max(raw_er.values()) * eps_er < 1
    er = layer_densities(shapes, 0.8, "er")
    assert er["conv"] == pytest.approx(eps_er * raw_er["conv"], rel=1e-12)
    assert er["fc"] == pytest.approx(eps_er * raw_er["fc"], rel=1e-12)
    _assert_total(shapes, er, 0.8)

    raw_erk = {"conv": 54 / 4608, "fc": 522 / 5120}
    eps_erk = budget / (54 + 522)
    assert max(raw_erk.values()) * eps_erk < 1
    erk = layer_densities(shapes, 0.8, "erk")
    assert erk["conv"] == pytest.approx(eps_erk * raw_erk["conv"], rel=1e-12)
    assert erk["fc"] == pytest.approx(eps_erk * raw_erk["fc"], rel=1e-12)
    _assert_total(shapes, erk, 0.8)
    # ERK's kernel term gives the 3x3 conv a much lower density than ER does.
    assert erk["conv"] < er["conv"]


def test_er_and_erk_match_on_dense_only_models():
    assert layer_densities(LENET, 0.95, "er") == pytest.approx(
        layer_densities(LENET, 0.95, "erk"), rel=1e-12
    )


def test_iterative_rule_fires_twice():
    shapes = {"tiny1": (2, 2), "big": (1000, 1000), "tiny2": (4, 4)}
    # raw: tiny1 = 4/4 = 1, tiny2 = 8/16 = 0.5, big = 2000/1e6 = 0.002
    budget = 0.5 * (4 + 1_000_000 + 16)
    eps0 = budget / (4 + 2000 + 8)
    assert eps0 * 1.0 > 1  # tiny1 made dense first (largest raw)
    eps1 = (budget - 4) / (2000 + 8)
    assert eps1 * 0.5 > 1  # then tiny2
    eps2 = (budget - 4 - 16) / 2000
    assert eps2 * 0.002 < 1  # big stays sparse
    got = layer_densities(shapes, 0.5, "erk")
    assert list(got) == ["tiny1", "big", "tiny2"]
    assert got["tiny1"] == 1.0
    assert got["tiny2"] == 1.0
    assert got["big"] == pytest.approx(eps2 * 0.002, rel=1e-12)
    _assert_total(shapes, got, 0.5)


def test_tied_largest_scores_become_dense_together():
    shapes = {"a": (2, 2), "b": (2, 2), "big": (500, 500)}
    got = layer_densities(shapes, 0.5, "erk")
    assert got["a"] == got["b"] == 1.0
    assert got["big"] == pytest.approx((0.5 * 250_008 - 8) / 250_000, rel=1e-12)
    _assert_total(shapes, got, 0.5)


def test_keep_dense_moves_layer_to_fixed_side():
    # fc2 is sparse under plain ERK at S=0.8; keeping it dense moves its 30,000
    # weights to the fixed side and fc1 absorbs the rest of the budget.
    free = layer_densities(LENET, 0.8, "erk")
    assert free["fc2"] < 1.0
    kept = layer_densities(LENET, 0.8, "erk", keep_dense=["fc2"])
    assert kept["fc2"] == 1.0 and kept["fc3"] == 1.0
    assert kept["fc1"] == pytest.approx((0.2 * LENET_TOTAL - 31_000) / 235_200, rel=1e-12)
    _assert_total(LENET, kept, 0.8)
    # fc1 alone (235,200 weights) exceeds 5% of 266,200.
    with pytest.raises(ValueError, match=r"keep_dense.*'fc1'"):
        layer_densities(LENET, 0.95, "erk", keep_dense=["fc1"])

    shapes = {"stem": (3, 3, 3, 16), "body": (3, 3, 64, 64), "head": (64, 10)}
    got = layer_densities(shapes, 0.7, "erk", keep_dense=("stem", "head"))
    assert got["stem"] == 1.0 and got["head"] == 1.0
    n_body = 3 * 3 * 64 * 64
    n_total = 432 + n_body + 640
    assert got["body"] == pytest.approx((0.3 * n_total - 432 - 640) / n_body, rel=1e-12)
    _assert_total(shapes, got, 0.7)
    # A single string names one layer; duplicates and sets are fine.
    one = layer_densities(shapes, 0.7, "uniform", keep_dense="head")
    assert one["head"] == 1.0
    assert layer_densities(shapes, 0.7, "uniform", keep_dense={"head"}) == one
    assert layer_densities(shapes, 0.7, "uniform", keep_dense=["head", "head"]) == one
    _assert_total(shapes, one, 0.7)


def test_keep_dense_lenet_fc3():
    got = layer_densities(LENET, 0.9, "erk", keep_dense="fc3")
    # fc3 would have been capped anyway, so the result is unchanged.
    assert got == layer_densities(LENET, 0.9, "erk")


def test_erk_power_scale_ratio():
    raw1, raw2, raw3 = 1084 / 235_200, 400 / 30_000, 110 / 1_000
    got = layer_densities(LENET, 0.99, "erk", erk_power_scale=0.5)
    assert all(v < 1 for v in got.values())
    assert got["fc1"] / got["fc2"] == pytest.approx((raw1 / raw2) ** 0.5, rel=1e-12)
    assert got["fc2"] / got["fc3"] == pytest.approx((raw2 / raw3) ** 0.5, rel=1e-12)
    eps = 0.01 * LENET_TOTAL / (raw1**0.5 * 235_200 + raw2**0.5 * 30_000 + raw3**0.5 * 1_000)
    assert got["fc1"] == pytest.approx(eps * raw1**0.5, rel=1e-12)
    _assert_total(LENET, got, 0.99)
    # A smaller power flattens the allocation towards uniform.
    base = layer_densities(LENET, 0.99, "erk")
    assert got["fc3"] / got["fc1"] < base["fc3"] / base["fc1"]
    # The power is ignored by uniform/er.
    assert layer_densities(LENET, 0.99, "er", erk_power_scale=0.5) == layer_densities(
        LENET, 0.99, "er"
    )


def test_zero_sparsity_is_all_dense():
    shapes = {"a": (3, 3, 3, 8), "b": (8, 8), "c": (100, 7)}
    for name in SUPPORTED_DISTRIBUTIONS:
        got = layer_densities(shapes, 0.0, name)
        assert got == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0}, rel=1e-12)
        assert all(v <= 1.0 for v in got.values())


def test_distribution_name_is_case_insensitive_and_shapes_accept_numpy():
    shapes = {"a": (np.int64(5), np.int32(3)), "b": [3, 4]}
    assert layer_densities(shapes, 0.5, "ERK") == layer_densities(
        {"a": (5, 3), "b": (3, 4)}, 0.5, "erk"
    )
    assert layer_densities(shapes, np.float32(0.5), "Uniform") == pytest.approx(
        {"a": 0.5, "b": 0.5}
    )


def test_active_counts():
    dens = layer_densities(LENET, 0.9)
    counts = active_counts(LENET, dens)
    assert list(counts) == list(LENET)
    for name, value in counts.items():
        assert isinstance(value, int)
        assert value == round(dens[name] * LENET_N[name])
    assert counts["fc3"] == 1_000
    assert abs(sum(counts.values()) - round(0.1 * LENET_TOTAL)) <= len(LENET)

    # At least one weight per layer when the density is positive, zero for zero.
    tiny = {"a": (10, 10), "b": (1000, 1000)}
    assert active_counts(tiny, {"a": 0.001, "b": 0.0}) == {"a": 1, "b": 0}
    assert active_counts(tiny, {"a": 1.0, "b": 1.0}) == {"a": 100, "b": 1_000_000}


def test_active_counts_and_total_density_errors():
    with pytest.raises(ValueError, match="densities"):
        active_counts(LENET, {"fc1": 0.1})
    with pytest.raises(ValueError, match="densities"):
        active_counts(LENET, {"fc1": 0.1, "fc2": 1.5, "fc3": 1.0})
    with pytest.raises(TypeError, match="densities"):
        total_density(LENET, [0.1, 0.1, 0.1])


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"sparsity": 1.0}, ValueError, r"sparsity=1\.0.*\[0\.0, 1\.0\)"),
        ({"sparsity": -0.1}, ValueError, r"sparsity.*-0\.1"),
        ({"sparsity": float("nan")}, ValueError, "sparsity"),
        ({"sparsity": "0.5"}, TypeError, r"sparsity.*finite number.*'0\.5'"),
        ({"sparsity": True}, TypeError, "sparsity"),
        ({"sparsity": None}, TypeError, "sparsity"),
        ({"distribution": "gaussian"}, ValueError,
         r"distribution='gaussian'.*'uniform', 'er', 'erk'"),
        ({"distribution": 3}, TypeError, "distribution"),
        ({"keep_dense": "fc9"}, ValueError, r"keep_dense.*'fc9'.*known layers.*'fc1'"),
        ({"keep_dense": ["fc1", "nope"]}, ValueError, r"keep_dense.*'nope'"),
        ({"keep_dense": [1]}, TypeError, "keep_dense"),
        ({"keep_dense": 5}, TypeError, "keep_dense"),
        ({"erk_power_scale": 0}, ValueError, r"erk_power_scale=0.*\(0\.0, inf\]"),
        ({"erk_power_scale": -1.0}, ValueError, "erk_power_scale"),
        ({"erk_power_scale": "1"}, TypeError, "erk_power_scale"),
    ],
)
def test_argument_errors(kwargs, exc, pattern):
    args = {"shapes": LENET, "sparsity": 0.9, **kwargs}
    with pytest.raises(exc, match=pattern):
        layer_densities(**args)


@pytest.mark.parametrize(
    "shapes, exc, pattern",
    [
        ({}, ValueError, r"shapes.*empty"),
        ({"a": (784, 0)}, ValueError, r"shapes\['a'\].*non-positive.*\(784, 0\)"),
        ({"a": (3, 3, -1, 8)}, ValueError, r"shapes\['a'\].*non-positive"),
        ({"a": (10,)}, ValueError, r"shapes\['a'\]"),
        ({"a": (2.5, 3)}, TypeError, r"shapes\['a'\]"),
        ({"a": 7}, TypeError, r"shapes\['a'\]"),
        ([(3, 4)], TypeError, "shapes"),
    ],
)
def test_shape_errors(shapes, exc, pattern):
    with pytest.raises(exc, match=pattern):
        layer_densities(shapes, 0.5)


def test_keep_dense_over_budget_error():
    shapes = {"a": (10, 10), "b": (100, 100)}
    # b alone holds 10,000 of 10,100 weights: sparsity must stay below 1 - 10000/10100.
    with pytest.raises(ValueError, match=r"keep_dense.*\['b'\].*0\.990099") as info:
        layer_densities(shapes, 0.5, keep_dense="b")
    assert "sparsity" in str(info.value)
    assert "0.00990099" in str(info.value)  # the achievable sparsity bound
    # Just below the bound is fine.
    got = layer_densities(shapes, 0.009, keep_dense="b")
    assert got["b"] == 1.0 and 0 < got["a"] < 1
    _assert_total(shapes, got, 0.009)
    # Keeping every layer dense only works at sparsity 0.
    assert layer_densities(shapes, 0.0, keep_dense=["a", "b"]) == {"a": 1.0, "b": 1.0}
    with pytest.raises(ValueError, match="keep_dense"):
        layer_densities(shapes, 0.1, keep_dense=["a", "b"])


def test_random_property_loop():
    rng = np.random.default_rng(1234)
    checked = 0
    for trial in range(400):
        n_layers = int(rng.integers(1, 7))
        shapes = {}
        for i in range(n_layers):
            rank = int(rng.integers(2, 6))
            hi = 6 if rank > 3 else 300
            shapes[f"layer{i}"] = tuple(int(x) for x in rng.integers(1, hi, size=rank))
        sparsity = float(rng.uniform(0.0, 0.999)) if trial % 10 else 0.0
        name = SUPPORTED_DISTRIBUTIONS[trial % 3]
        power = float(rng.choice([1.0, 0.5, 2.0]))
        keep = [k for k in shapes if rng.random() < 0.2]
        numel = {k: math.prod(s) for k, s in shapes.items()}
        n_total = sum(numel.values())
        fixed = sum(numel[k] for k in keep)
        budget = (1 - sparsity) * n_total
        all_kept = len(set(keep)) == len(shapes)
        if keep and (fixed > budget if all_kept else fixed >= budget * (1 - 1e-9)):
            with pytest.raises(ValueError, match="keep_dense"):
                layer_densities(shapes, sparsity, name, keep, power)
            continue
        got = layer_densities(shapes, sparsity, name, keep, power)
        checked += 1
        assert list(got) == list(shapes)
        assert all(0.0 < v <= 1.0 for v in got.values())
        assert all(got[k] == 1.0 for k in keep)
        _assert_total(shapes, got, sparsity)
        # Sparse (free) layers share one eps: density / raw is constant, and every
        # capped layer has a raw score at least as large as any sparse layer's.
        raw = {k: dist._raw_score(s, name, power) for k, s in shapes.items()}
        sparse = [k for k in shapes if got[k] < 1.0]
        if sparse:
            ratios = [got[k] / raw[k] for k in sparse]
            assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)
            capped = [k for k in shapes if got[k] == 1.0 and k not in keep]
            for k in capped:
                assert raw[k] >= max(raw[j] for j in sparse) * (1 - 1e-12)
        counts = active_counts(shapes, got)
        assert all(1 <= counts[k] <= numel[k] for k in shapes)
        assert abs(sum(counts.values()) - round((1 - sparsity) * n_total)) <= len(shapes)
    assert checked > 300


if __name__ == "__main__":  # bazel test / python tests/test_distributions.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
