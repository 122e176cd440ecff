"""Tests for ft_keras.masks: the prune-and-grow mask algebra (hand-computed expectations)."""

import math
from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf

from ft_keras import masks as topology
from ft_keras.masks import (
    changed_positions,
    count_active,
    grow_by_score,
    num_to_drop,
    num_to_drop_py,
    prune_by_magnitude,
    random_mask,
    random_scores,
    rng_seed,
    update_mask,
)


def _np(x):
    return np.asarray(x.numpy() if tf.is_tensor(x) else x)


def _flat_true(mask):
    """Sorted list of the flat indices where ``mask`` is True."""
    return sorted(int(i) for i in np.flatnonzero(_np(mask).reshape(-1)))


def _bool(flat_bits, shape):
    return tf.constant(np.array(flat_bits, dtype=bool).reshape(shape))


# ----------------------------------------------------------------------------- rng_seed
def test_rng_seed_value_shape_and_dtype():
    key = rng_seed(3, 7, 2)
    assert key.dtype == tf.int64
    assert key.shape == (2,)
    assert _np(key).tolist() == [3 * 1_000_003 + 2, 7]


def test_rng_seed_accepts_tensor_step_and_negative_step():
    assert _np(rng_seed(1, tf.constant(5, tf.int32), 0)).tolist() == [1_000_003, 5]
    assert _np(rng_seed(0, -1, 4)).tolist() == [4, -1]


def test_rng_seed_distinct_for_all_combinations():
    keys = {
        tuple(_np(rng_seed(seed, step, layer)).tolist())
        for seed in range(4)
        for step in (-1, 0, 1, 2, 100)
        for layer in range(6)
    }
    assert len(keys) == 4 * 5 * 6


# ----------------------------------------------------------------------------- random_mask
@pytest.mark.parametrize(
    "shape, count",
    [
        ((5,), 0),
        ((5,), 1),
        ((5,), 5),
        ((1,), 1),
        ((3, 4), 7),
        ((4, 5), 20),
        ((4, 5), 1),
        ((2, 3, 4), 12),
        ((3, 3, 2, 4), 30),
        ((3, 3, 2, 4), 0),
    ],
)
def test_random_mask_exact_count_shape_dtype(shape, count):
    mask = random_mask(shape, count, rng_seed(0, -1, 0))
    assert mask.dtype == tf.bool
    assert tuple(mask.shape) == shape
    assert int(np.sum(_np(mask))) == count
    assert int(count_active(mask)) == count


def test_random_mask_full_and_empty_values():
    assert _np(random_mask((2, 3), 6, rng_seed(5, 0, 0))).all()
    assert not _np(random_mask((2, 3), 0, rng_seed(5, 0, 0))).any()


def test_random_mask_same_seed_is_identical():
    a = random_mask((10, 10), 50, rng_seed(7, -1, 3))
    b = random_mask((10, 10), 50, rng_seed(7, -1, 3))
    np.testing.assert_array_equal(_np(a), _np(b))


@pytest.mark.parametrize("other", [(8, -1, 3), (7, -1, 4), (7, 0, 3)])
def test_random_mask_differs_by_seed_layer_and_step(other):
    # Two independent draws of 50 out of 100 coincide with probability 1 / C(100, 50) ~ 1e-29.
    a = random_mask((10, 10), 50, rng_seed(7, -1, 3))
    b = random_mask((10, 10), 50, rng_seed(*other))
    assert int(np.sum(_np(a) != _np(b))) > 0
    assert int(np.sum(_np(b))) == 50


@pytest.mark.parametrize("count", [-1, 21, 100])
def test_random_mask_count_out_of_range(count):
    with pytest.raises(ValueError, match="num_active"):
        random_mask((4, 5), count, rng_seed(0, 0, 0))


def test_random_mask_roughly_uniform():
    shape, count, draws = (4, 5), 5, 400
    totals = np.zeros(shape)
    for seed in range(draws):
        mask = _np(random_mask(shape, count, rng_seed(seed, -1, 0)))
        assert mask.sum() == count
        totals += mask
    expected = draws * count / 20  # 100 hits per position
    assert (totals > 0).all()  # every position gets chosen
    assert totals.sum() == draws * count
    # 19 degrees of freedom: mean 19, P(chi2 > 60) < 1e-5. Loose, and the seeds are fixed.
    chi2 = float(((totals - expected) ** 2 / expected).sum())
    assert chi2 < 60.0, totals
    assert totals.min() > 55 and totals.max() < 145, totals


def test_random_scores_range_and_determinism():
    a = _np(random_scores((6, 7), rng_seed(1, 2, 3)))
    b = _np(random_scores((6, 7), rng_seed(1, 2, 3)))
    c = _np(random_scores((6, 7), rng_seed(1, 3, 3)))
    assert a.shape == (6, 7) and a.dtype == np.float32
    assert (a >= 0).all() and (a < 1).all()
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


# ----------------------------------------------------------------------------- num_to_drop
HAND_CASES = [
    (0.3, 1000, 300),
    (0.3, 10, 3),
    (0.31, 10, 4),
    (0.5, 7, 4),
    (1.0, 13, 13),
    (1.0, 1, 1),
    (0.0, 50, 0),
    (0.5, 0, 0),
    (0.1, 10, 1),
    (0.2, 5, 1),
    (0.001, 5, 1),  # any positive fraction drops at least one
    (0.8, 1000, 800),
    (0.005, 200, 1),
    (0.005, 201, 2),
]


@pytest.mark.parametrize("p, n, k", HAND_CASES)
def test_num_to_drop_py_hand_cases(p, n, k):
    assert num_to_drop_py(p, n) == k
    assert isinstance(num_to_drop_py(p, n), int)


@pytest.mark.parametrize("p, n, k", HAND_CASES)
def test_num_to_drop_tensor_hand_cases(p, n, k):
    result = num_to_drop(tf.constant(p, tf.float64), n)
    assert result.dtype == tf.int32
    assert int(result) == k


@pytest.mark.parametrize("p, n, k", [(0.5, 7, 4), (1.0, 13, 13), (0.0, 50, 0), (0.31, 10, 4)])
def test_num_to_drop_python_float_and_float32_where_exact(p, n, k):
    # Fractions whose float32 rounding does not cross an integer.
    assert int(num_to_drop(p, n)) == k
    assert int(num_to_drop(tf.constant(p, tf.float32), n)) == k


@pytest.mark.parametrize("p, n, k", [(1.5, 10, 10), (-0.2, 10, 0), (2.0, 0, 0)])
def test_num_to_drop_clipped(p, n, k):
    assert num_to_drop_py(p, n) == k
    assert int(num_to_drop(tf.constant(p, tf.float64), n)) == k


@pytest.mark.parametrize("p", ["0.1", "0.2", "0.3", "0.7", "0.05", "0.005", "0.45"])
def test_num_to_drop_py_float64_robust(p):
    exact = Fraction(p)
    for n in range(0, 3001):
        assert num_to_drop_py(float(p), n) == math.ceil(exact * n), (p, n)


@pytest.mark.parametrize("p", ["0.1", "0.2", "0.3", "0.7"])
def test_num_to_drop_tensor_float64_robust_and_agrees_with_py(p):
    exact = Fraction(p)
    fraction = tf.constant(float(p), tf.float64)
    for n in list(range(0, 101)) + [1000, 1010, 2000, 4096, 10_000, 235_200]:
        expected = math.ceil(exact * n)
        assert int(num_to_drop(fraction, n)) == expected, (p, n)
        assert num_to_drop_py(float(p), n) == expected, (p, n)


# Regression: a Python float or float32 fraction once went through float32 and gave k + 1.


@pytest.mark.parametrize("p, n", [(0.3, 10), (0.3, 1000), (0.1, 10), (0.2, 5), (0.8, 5)])
def test_num_to_drop_python_float_matches_py(p, n):
    assert int(num_to_drop(p, n)) == num_to_drop_py(p, n) == math.ceil(Fraction(str(p)) * n)


@pytest.mark.parametrize("p, n", [(0.3, 10), (0.3, 1000), (0.1, 10), (0.2, 5), (0.8, 5)])
def test_num_to_drop_float32_tensor_matches_py(p, n):
    assert int(num_to_drop(tf.constant(p, tf.float32), n)) == num_to_drop_py(p, n)


def test_update_mask_python_fraction_drops_ceil():
    mask = tf.ones((10,), tf.bool)
    weights = tf.range(1.0, 11.0)
    _, keep = update_mask(mask, weights, tf.zeros((10,)), 0.3, 10)
    assert int(count_active(keep)) == 7  # drops ceil(0.3 * 10) = 3


# ----------------------------------------------------------------------------- prune_by_magnitude
# 2 x 4 kernel; the off-mask entries (100, 50) are the largest weights and must never be kept.
PRUNE_W = tf.constant([[0.5, -3.0, 100.0, 0.1], [-0.2, 2.0, 50.0, -1.5]])
PRUNE_MASK = _bool([1, 1, 0, 1, 1, 1, 0, 1], (2, 4))  # active: 0,1,3,4,5,7 ; n = 6
# |w| among active, descending: idx1 3.0, idx5 2.0, idx7 1.5, idx0 0.5, idx4 0.2, idx3 0.1


@pytest.mark.parametrize(
    "k, kept",
    [
        (0, [0, 1, 3, 4, 5, 7]),
        (1, [0, 1, 4, 5, 7]),
        (2, [0, 1, 5, 7]),
        (4, [1, 5]),
        (5, [1]),
        (6, []),
    ],
)
def test_prune_by_magnitude_hand(k, kept):
    for num_drop in (k, tf.constant(k, tf.int32)):
        keep = prune_by_magnitude(PRUNE_MASK, PRUNE_W, num_drop, 6)
        assert keep.dtype == tf.bool
        assert tuple(keep.shape) == (2, 4)
        assert _flat_true(keep) == kept


def test_prune_keeps_active_zero_weights_over_large_inactive_ones():
    mask = _bool([1, 0, 1, 0, 1], (5,))
    weights = tf.constant([0.0, 9.0, 0.0, 8.0, 0.0])
    assert _flat_true(prune_by_magnitude(mask, weights, 0, 3)) == [0, 2, 4]
    assert _flat_true(prune_by_magnitude(mask, weights, 1, 3)) == [0, 2]  # tie: lower index


def test_prune_ties_broken_towards_lower_index():
    mask = _bool([1, 1, 1, 1, 1, 1], (2, 3))
    weights = tf.constant([[1.0, -1.0, 2.0], [1.0, 1.0, -1.0]])
    # |w| = 1 at 0, 1, 3, 4, 5; the single 2.0 at index 2 is always kept.
    assert _flat_true(prune_by_magnitude(mask, weights, 3, 6)) == [0, 1, 2]


def test_prune_random_trials_keep_top_magnitudes():
    rng = np.random.default_rng(0)
    for trial in range(20):
        shape = [(5, 6), (3, 3, 2, 4), (17,)][trial % 3]
        size = math.prod(shape)
        n = int(rng.integers(1, size + 1))
        k = int(rng.integers(0, n + 1))
        mask = _np(random_mask(shape, n, rng_seed(trial, -1, 0)))
        weights = rng.normal(size=shape).astype(np.float32) * 10
        keep = _np(prune_by_magnitude(tf.constant(mask), tf.constant(weights), k, n))
        assert keep.sum() == n - k
        assert not (keep & ~mask).any()  # keep is a subset of the mask
        dropped = mask & ~keep
        if keep.any() and dropped.any():
            assert np.abs(weights[keep]).min() >= np.abs(weights[dropped]).max()
        expected = np.zeros(size, bool)
        active_idx = np.flatnonzero(mask.reshape(-1))
        order = active_idx[np.argsort(-np.abs(weights.reshape(-1)[active_idx]), kind="stable")]
        expected[order[: n - k]] = True
        np.testing.assert_array_equal(keep.reshape(-1), expected)


# ----------------------------------------------------------------------------- grow_by_score
def test_grow_by_score_hand():
    keep = _bool([1, 0, 0, 1, 0, 0], (2, 3))
    scores = tf.constant([[9.0, 1.0, 5.0], [8.0, 3.0, 7.0]])
    # Outside keep: idx1 1.0, idx2 5.0, idx4 3.0, idx5 7.0; the large 9 and 8 are in keep.
    expected = {0: [0, 3], 1: [0, 3, 5], 2: [0, 2, 3, 5], 3: [0, 2, 3, 4, 5], 4: [0, 1, 2, 3, 4, 5]}
    for k, new in expected.items():
        for num_grow in (k, tf.constant(k)):
            result = grow_by_score(keep, scores, num_grow, 2 + k)
            assert result.dtype == tf.bool and tuple(result.shape) == (2, 3)
            assert _flat_true(result) == new, k


def test_grow_ties_broken_towards_lower_index():
    keep = _bool([0, 1, 0, 0, 0, 0, 0], (7,))
    scores = tf.constant([2.0, 5.0, 2.0, 2.0, 3.0, 2.0, 2.0])
    # idx4 (3.0) first, then the 2.0 ties in index order 0, 2, 3, ...
    assert _flat_true(grow_by_score(keep, scores, 1, 2)) == [1, 4]
    assert _flat_true(grow_by_score(keep, scores, 3, 4)) == [0, 1, 2, 4]
    zeros = tf.zeros((7,))
    assert _flat_true(grow_by_score(keep, zeros, 3, 4)) == [0, 1, 2, 3]


def test_grow_with_empty_keep_takes_global_top():
    keep = tf.zeros((2, 2), tf.bool)
    scores = tf.constant([[0.1, 0.4], [0.3, 0.2]])
    assert _flat_true(grow_by_score(keep, scores, 2, 2)) == [1, 2]


def test_grow_random_trials():
    rng = np.random.default_rng(1)
    for trial in range(15):
        shape = [(4, 7), (2, 3, 5), (11,)][trial % 3]
        size = math.prod(shape)
        n = int(rng.integers(1, size + 1))
        k = int(rng.integers(0, n + 1))
        keep = np.zeros(size, bool)
        keep[rng.choice(size, n - k, replace=False)] = True
        keep = keep.reshape(shape)
        scores = rng.random(shape).astype(np.float32)
        new = _np(grow_by_score(tf.constant(keep), tf.constant(scores), k, n))
        assert new.sum() == n
        assert not (keep & ~new).any()
        grown = new & ~keep
        assert grown.sum() == k
        rest = ~new
        if grown.any() and rest.any():
            assert scores[grown].min() >= scores[rest].max()


# ----------------------------------------------------------------------------- update_mask
def test_update_mask_hand_with_regrowth():
    mask = _bool([1, 1, 1, 0, 0, 0], (2, 3))
    weights = tf.constant([[0.1, 2.0, 0.3], [9.0, 9.0, 9.0]])  # off-mask 9s are ignored
    scores = tf.constant([[10.0, 0.0, 1.0], [4.0, 2.0, 3.0]])
    # n = 3, p = 0.5 -> k = ceil(1.5) = 2: prune idx0 (0.1) and idx2 (0.3), keep {1};
    # grow the top 2 outside keep: idx0 (10, just pruned: regrown) and idx3 (4).
    new_mask, keep = update_mask(mask, weights, scores, 0.5, 3)
    assert _flat_true(keep) == [1]
    assert _flat_true(new_mask) == [0, 1, 3]
    assert int(changed_positions(mask, new_mask)) == 2  # idx2 off, idx3 on


def test_update_mask_zero_fraction_is_identity():
    mask = _bool([1, 0, 1, 1, 0, 0], (6,))
    weights = tf.constant([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    new_mask, keep = update_mask(mask, weights, tf.ones((6,)) * 100.0, 0.0, 3)
    assert _flat_true(keep) == [0, 2, 3]
    assert _flat_true(new_mask) == [0, 2, 3]


def test_update_mask_zero_active():
    mask = tf.zeros((2, 3), tf.bool)
    new_mask, keep = update_mask(mask, tf.ones((2, 3)), tf.ones((2, 3)), 0.5, 0)
    assert not _np(new_mask).any() and not _np(keep).any()


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.3, 0.5, 1.0])
def test_update_mask_invariants(density, p):
    rng = np.random.default_rng(int(density * 100) * 7 + int(p * 10))
    for trial, shape in enumerate([(6, 8), (3, 3, 2, 3), (25,)]):
        size = math.prod(shape)
        n = max(1, int(round(density * size)))
        mask = random_mask(shape, n, rng_seed(trial, -1, int(p * 10)))
        weights = tf.constant(rng.normal(size=shape).astype(np.float32))
        scores = tf.constant(np.abs(rng.normal(size=shape)).astype(np.float32))
        new_mask, keep = update_mask(mask, weights, scores, tf.constant(p, tf.float64), n)
        old, new, kept = _np(mask), _np(new_mask), _np(keep)
        k = num_to_drop_py(p, n)
        assert k == math.ceil(Fraction(str(p)) * n)
        assert new.sum() == n
        assert kept.sum() == n - k
        assert not (kept & ~old).any()
        assert not (kept & ~new).any()
        assert (new & ~kept).sum() == k
        assert int(count_active(new_mask)) == n
        assert int(changed_positions(mask, new_mask)) == int((old != new).sum())


def test_update_mask_grow_by_pruned_magnitudes_restores_mask():
    rng = np.random.default_rng(3)
    for trial, (shape, n, p) in enumerate(
        [((6, 8), 20, 0.3), ((6, 8), 40, 0.5), ((3, 3, 2, 4), 10, 1.0), ((30,), 29, 0.7)]
    ):
        mask = random_mask(shape, n, rng_seed(trial, -1, 0))
        weights = rng.normal(size=shape).astype(np.float32)
        weights[weights == 0] = 1.0
        weights = tf.constant(weights)
        scores = tf.where(mask, tf.abs(weights), 0.0)  # the pruned ones are the only > 0 candidates
        new_mask, keep = update_mask(mask, weights, scores, tf.constant(p, tf.float64), n)
        np.testing.assert_array_equal(_np(new_mask), _np(mask))
        assert int(changed_positions(mask, new_mask)) == 0
        assert int(count_active(keep)) == n - num_to_drop_py(p, n)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_update_mask_jit_matches_eager(dtype):
    shape, n = (8, 9), 30

    @tf.function(jit_compile=True)
    def jitted(mask, weights, scores, fraction):
        return update_mask(mask, weights, scores, fraction, n)

    rng = np.random.default_rng(4)
    for trial, p in enumerate([0.5, 0.3, 0.1, 1.0, 0.0]):
        mask = random_mask(shape, n, rng_seed(trial, -1, 1))
        weights = tf.constant(rng.normal(size=shape).astype(np.float32))
        scores = tf.constant(np.abs(rng.normal(size=shape)).astype(np.float32))
        fraction = tf.constant(p, dtype)
        eager_new, eager_keep = update_mask(mask, weights, scores, fraction, n)
        jit_new, jit_keep = jitted(mask, weights, scores, fraction)
        np.testing.assert_array_equal(_np(jit_new), _np(eager_new))
        np.testing.assert_array_equal(_np(jit_keep), _np(eager_keep))
        assert int(count_active(jit_new)) == n


def test_update_mask_jit_ties_match_eager():
    @tf.function(jit_compile=True)
    def jitted(mask, weights, scores, fraction):
        return update_mask(mask, weights, scores, fraction, 4)

    mask = _bool([1, 1, 0, 1, 1, 0, 0, 0], (2, 4))
    weights = tf.ones((2, 4))
    scores = tf.zeros((2, 4))
    fraction = tf.constant(0.5, tf.float64)
    jit_new, jit_keep = jitted(mask, weights, scores, fraction)
    # keep the two lowest active indices (0, 1); grow the two lowest outside keep (2, 3).
    assert _flat_true(jit_keep) == [0, 1]
    assert _flat_true(jit_new) == [0, 1, 2, 3]


def test_update_mask_in_plain_tf_function():
    @tf.function
    def graph(mask, weights, scores, fraction):
        return update_mask(mask, weights, scores, fraction, 3)

    mask = _bool([1, 1, 1, 0, 0, 0], (2, 3))
    weights = tf.constant([[0.1, 2.0, 0.3], [9.0, 9.0, 9.0]])
    scores = tf.constant([[10.0, 0.0, 1.0], [4.0, 2.0, 3.0]])
    new_mask, keep = graph(mask, weights, scores, tf.constant(0.5, tf.float64))
    assert new_mask.shape == (2, 3)  # static shape survives tracing
    assert _flat_true(keep) == [1]
    assert _flat_true(new_mask) == [0, 1, 3]


# ----------------------------------------------------------------------------- counting helpers
def test_count_active_hand():
    assert int(count_active(_bool([1, 0, 1, 1, 0, 1], (2, 3)))) == 4
    assert int(count_active(tf.zeros((3, 3), tf.bool))) == 0
    assert int(count_active(tf.ones((3, 3), tf.bool))) == 9
    assert count_active(tf.ones((2,), tf.bool)).dtype == tf.int32


def test_changed_positions_hand():
    old = _bool([1, 0, 1, 0], (2, 2))
    new = _bool([0, 0, 1, 1], (2, 2))
    assert int(changed_positions(old, new)) == 2
    assert int(changed_positions(old, old)) == 0
    assert int(changed_positions(old, tf.logical_not(old))) == 4
    assert changed_positions(old, new).dtype == tf.int32


def test_module_docstring_example():
    mask = random_mask((4, 5), num_active=6, seed=rng_seed(0, 0, 0))
    weights = tf.where(mask, tf.random.stateless_normal((4, 5), seed=[1, 2]), 0.0)
    scores = tf.abs(tf.random.stateless_normal((4, 5), seed=[3, 4]))
    new_mask, _ = update_mask(mask, weights, scores, drop_fraction=0.5, num_active=6)
    assert int(count_active(new_mask)) == 6



# ------------------------------------------------------------------------------- select_largest
def _reference_select(scores, candidates, m):
    """numpy: the m candidates with the largest score, ties towards the lower index."""
    idx = np.flatnonzero(candidates)
    order = idx[np.lexsort((idx, -scores[idx]))]
    out = np.zeros(len(scores), bool)
    out[order[:m]] = True
    return out


@pytest.mark.parametrize("trial", range(12))
def test_select_largest_matches_reference(trial):
    rng = np.random.default_rng(trial)
    n = int(rng.integers(1, 5000))
    kind = trial % 4
    if kind == 0:  # distinct continuous scores
        scores = rng.random(n).astype(np.float32)
    elif kind == 1:  # heavy ties: few distinct values, many zeros
        scores = rng.integers(0, 4, n).astype(np.float32)
    elif kind == 2:  # wide dynamic range (different exponents, tiny and huge)
        scores = (10.0 ** rng.uniform(-30, 30, n)).astype(np.float32)
    else:  # values that share their high 16 bits (same bucket in the first pass)
        scores = (1.0 + rng.integers(0, 50, n) * 2.0 ** -23).astype(np.float32)
    candidates = rng.random(n) < rng.uniform(0.1, 1.0)
    if not candidates.any():
        candidates[0] = True
    for m in {0, 1, int(candidates.sum()), int(rng.integers(0, candidates.sum() + 1))}:
        got = topology.select_largest(tf.constant(scores), tf.constant(candidates), m).numpy()
        np.testing.assert_array_equal(got, _reference_select(scores, candidates, m))


@pytest.mark.parametrize("ties", [False, True])
def test_select_largest_wide_digits_path(ties):
    """Vectors of 2**17 or more use two 16-bit-ish passes; check that path against numpy too."""
    rng = np.random.default_rng(7)
    n = topology._NARROW_BELOW + 1001  # pylint: disable=protected-access
    if ties:
        scores = rng.integers(0, 6, n).astype(np.float32) * 0.25
    else:
        scores = np.abs(rng.normal(size=n)).astype(np.float32)
    candidates = rng.random(n) < 0.7
    for m in (0, 1, 12_345, int(candidates.sum())):
        got = topology.select_largest(tf.constant(scores), tf.constant(candidates), m).numpy()
        np.testing.assert_array_equal(got, _reference_select(scores, candidates, m))


def test_select_largest_signed_zero_and_xla():
    scores = tf.constant([0.0, -0.0, 3.0, -0.0, 1.0, 0.0])
    candidates = tf.constant([True] * 6)
    got = topology.select_largest(scores, candidates, 4).numpy()
    np.testing.assert_array_equal(got, [True, True, True, False, True, False])
    rng = np.random.default_rng(0)
    big = tf.constant(rng.integers(0, 100, 10_000).astype(np.float32))
    cand = tf.constant(rng.random(10_000) < 0.5)
    compiled = tf.function(topology.select_largest, jit_compile=True)
    for m in (0, 7, 2000, int(cand.numpy().sum())):
        np.testing.assert_array_equal(
            compiled(big, cand, tf.constant(m)).numpy(),
            _reference_select(big.numpy(), cand.numpy(), m),
        )


# ------------------------------------------------------------------- compacted (non-XLA) path
@pytest.mark.parametrize("trial", range(10))
def test_largest_indices_matches_select_largest(trial):
    rng = np.random.default_rng(100 + trial)
    n = int(rng.integers(1, 4000)) if trial < 7 else topology._NARROW_BELOW + 77  # pylint: disable=protected-access
    kind = trial % 3
    if kind == 0:
        scores = rng.normal(size=n).astype(np.float32)  # signed: ranked by magnitude
    elif kind == 1:
        scores = rng.integers(-3, 4, n).astype(np.float32) * 0.5  # heavy ties, +-0
    else:
        scores = (10.0 ** rng.uniform(-30, 30, n) * rng.choice([-1, 1], n)).astype(np.float32)
    candidates = rng.random(n) < rng.uniform(0.05, 1.0)
    candidates[0] = True
    for m in {0, 1, int(candidates.sum()), int(rng.integers(0, candidates.sum() + 1))}:
        got = topology.largest_indices(tf.constant(scores), tf.constant(candidates), m).numpy()
        want = np.flatnonzero(_reference_select(np.abs(scores), candidates, m))
        np.testing.assert_array_equal(got, want)


def test_largest_indices_negative_zero_ranks_as_zero():
    scores = tf.constant([-0.0, 2.0, 0.0, -3.0, -0.0])
    got = topology.largest_indices(scores, tf.constant([True] * 5), 4).numpy()
    np.testing.assert_array_equal(got, [0, 1, 2, 3])  # |-3|, 2, then the lower-index zeros


def test_update_mask_sparse_hand_with_regrowth():
    mask = _bool([1, 1, 1, 0, 0, 0], (2, 3))
    weights = tf.constant([[0.1, -2.0, 0.3], [9.0, 9.0, 9.0]])
    scores = tf.constant([[-10.0, 0.0, 1.0], [4.0, -2.0, 3.0]])  # ranked by |score|
    new_mask, keep, dropped, grown = topology.update_mask_sparse(mask, weights, scores, 0.5, 3)
    assert _flat_true(keep) == [1]
    assert _flat_true(new_mask) == [0, 1, 3]
    assert list(_np(dropped)) == [0, 2] and list(_np(grown)) == [0, 3]


@pytest.mark.parametrize("shape", [(6, 8), (3, 3, 2, 3), (25,), (1024, 130)])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
def test_update_mask_sparse_equals_update_mask(shape, p):
    rng = np.random.default_rng(math.prod(shape) + int(p * 10))
    size = math.prod(shape)
    for density in (0.05, 0.5, 1.0):
        n = max(1, int(round(density * size)))
        mask = random_mask(shape, n, rng_seed(3, -1, int(p * 10)))
        weights = rng.normal(size=shape).astype(np.float32)
        weights[rng.random(shape) < 0.2] = 0.0  # ties at zero, as right after growth
        gradient = rng.normal(size=shape).astype(np.float32)
        gradient[rng.random(shape) < 0.3] = 0.0
        want_mask, want_keep = update_mask(mask, tf.constant(weights),
                                           tf.constant(np.abs(gradient)), p, n)
        new_mask, keep, dropped, grown = topology.update_mask_sparse(
            mask, tf.constant(weights), tf.constant(gradient), tf.constant(p, tf.float64), n)
        np.testing.assert_array_equal(_np(new_mask), _np(want_mask))
        np.testing.assert_array_equal(_np(keep), _np(want_keep))
        old, new, kept = (_np(x).reshape(-1) for x in (mask, new_mask, keep))
        np.testing.assert_array_equal(_np(dropped), np.flatnonzero(old & ~kept))
        np.testing.assert_array_equal(_np(grown), np.flatnonzero(new & ~kept))
        assert len(_np(dropped)) == len(_np(grown)) == num_to_drop_py(p, n)


def test_update_mask_sparse_zero_active():
    mask = tf.zeros((2, 3), tf.bool)
    new_mask, keep, dropped, grown = topology.update_mask_sparse(
        mask, tf.ones((2, 3)), tf.ones((2, 3)), 0.5, 0)
    assert not _np(new_mask).any() and not _np(keep).any()
    assert _np(dropped).size == 0 and _np(grown).size == 0


if __name__ == "__main__":  # bazel test / python tests/test_topology.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))


# ------------------------------------------------------------ compacted selection, exact result
def _expected_indices(scores, candidates, k):
    chosen = topology.select_largest(tf.abs(scores), candidates, k)
    return tf.reshape(tf.where(chosen), [-1]).numpy()


@pytest.mark.parametrize("case", ["normal", "many_zeros", "ties", "periodic", "few_candidates"])
def test_largest_indices_equals_exact_selection(case):
    rng = np.random.default_rng(7)
    size = 40_000
    scores = rng.normal(size=size).astype("float32")
    candidates = rng.random(size) < 0.9
    if case == "many_zeros":
        scores[rng.random(size) < 0.7] = 0.0
    elif case == "ties":
        scores = np.round(scores, 1)
    elif case == "periodic":  # large values everywhere but at every 17th position
        scores = np.full(size, 1e-3, "float32")
        scores[np.arange(size) % 17 != 0] = rng.uniform(1.0, 2.0, size - size // 17 - 1)[
            : int(np.sum(np.arange(size) % 17 != 0))]
    elif case == "few_candidates":
        candidates = rng.random(size) < 0.01
    for k in (0, 1, 37, 1200, int(candidates.sum()) // 2, int(candidates.sum())):
        got = topology.largest_indices(tf.constant(scores), tf.constant(candidates), k).numpy()
        np.testing.assert_array_equal(got, _expected_indices(tf.constant(scores),
                                                             tf.constant(candidates), k))


def test_update_mask_compacted_counts_nonfinite_active_weights():
    mask = np.zeros((20, 10), bool)
    mask[:, :3] = True
    weights = np.where(mask, 1.0, 0.0).astype("float32")
    weights[0, 0], weights[1, 1], weights[2, 2] = np.nan, np.inf, -np.inf
    update = topology.update_mask_compacted(tf.constant(mask), tf.constant(weights),
                                            tf.ones((20, 10)), 0.5, 60)
    assert int(update.num_nonfinite) == 3
    assert int(tf.reduce_sum(tf.cast(update.new_mask, tf.int32))) == 60
