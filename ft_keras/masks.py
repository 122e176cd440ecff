"""Prune and grow on tensors: the mask algebra of dynamic sparse training (docs/method.md).

Pure TensorFlow functions over tensors; no Keras objects. Every function keeps exact counts
(a mask with ``n`` active positions before an update has ``n`` after it) and uses only ops with
static shapes, so it runs inside ``tf.function``, under ``jit_compile=True`` and on every replica
of a ``tf.distribute`` strategy. Randomness is stateless and keyed by ``(seed, step, layer)``,
so replicas and workers draw the same numbers without talking to each other.

Example:

>>> mask = random_mask((4, 5), num_active=6, seed=rng_seed(0, 0, 0))
>>> weights = tf.where(mask, tf.random.normal((4, 5)), 0.0)
>>> new_mask, keep = update_mask(mask, weights, tf.abs(tf.random.normal((4, 5))),
...                              drop_fraction=0.5, num_active=6)
>>> int(tf.reduce_sum(tf.cast(new_mask, tf.int32)))
6
"""

import collections
import math

import tensorflow as tf

from ft_keras import _checks

#: How active weights are chosen for removal: the smallest |w| ("magnitude").
PRUNE_MODES = ("magnitude",)
#: How inactive positions are chosen for growth: "random" (SET), "gradient" (RigL: largest
#: |dense gradient|), "momentum" (SNFS: largest |moving average of the dense gradient|).
GROW_MODES = ("random", "gradient", "momentum")

# Large odd multiplier that separates the user seed from the layer index in the RNG key.
_SEED_STRIDE = 1_000_003
# Relative slack of the ceil in num_to_drop: absorbs float32 rounding of the drop fraction.
_CEIL_TOLERANCE = 1e-6


def rng_seed(seed, step, layer_index):
    """Returns the stateless RNG key for one layer at one step: an int64 tensor of shape (2,).

    Args:
        seed: int (Python, or a scalar integer tensor), the user's seed.
        step: int (or scalar int tensor), the optimizer step; use a negative value for
            draws that are not tied to a training step (initial masks).
        layer_index: Python int, the position of the layer among the masked layers.
    """
    if tf.is_tensor(seed):
        first = tf.cast(seed, tf.int64) * _SEED_STRIDE + int(layer_index)
    else:
        first = tf.constant(int(seed) * _SEED_STRIDE + int(layer_index), tf.int64)
    second = tf.cast(step, tf.int64)
    return tf.stack([first, second])


def num_to_drop(drop_fraction, num_active):
    """``ceil(drop_fraction * num_active)`` clipped to ``[0, num_active]``, as an int32 tensor.

    ``num_active`` is a Python int or an integer scalar tensor.

    Computed in float64 with a relative tolerance of 1e-6, so that e.g. 0.3 * 1000 gives 300,
    also when the fraction arrives as a float32 tensor (float32(0.3) * 1000 = 300.0000119).
    """
    if tf.is_tensor(drop_fraction):
        p = tf.cast(drop_fraction, tf.float64)
    else:
        p = tf.constant(float(drop_fraction), tf.float64)
    n = tf.cast(num_active, tf.float64) if tf.is_tensor(num_active) else float(num_active)
    exact = p * n
    k = tf.math.ceil(exact - _CEIL_TOLERANCE * tf.maximum(exact, 1.0))
    k = tf.clip_by_value(k, 0.0, n)
    return tf.cast(k, tf.int32)


def num_to_drop_py(drop_fraction, num_active):
    """Python twin of `num_to_drop` (for tests, reports and FLOP counts)."""
    exact = float(drop_fraction) * num_active
    k = math.ceil(exact - _CEIL_TOLERANCE * max(exact, 1.0))
    return int(min(max(k, 0), num_active))


# Digit widths of the radix selection (they add up to the 31 bits of a non-negative float32
# pattern). Big vectors: two passes with 2**16-bin histograms; small ones: three passes with
# 2**11 bins, so that a small layer does not pay for zeroing and scanning 65,536 bins twice.
_WIDE_DIGITS = (15, 16)
_NARROW_DIGITS = (11, 10, 10)
_NARROW_BELOW = 1 << 17


def _histogram(digits, valid, bins):
    """Counts of each value of ``digits`` (ints in [0, bins)) over the ``valid`` positions."""
    index = tf.where(valid, digits, bins)  # invalid positions go to an overflow bin
    counts = tf.raw_ops.DenseBincount(
        input=index,
        size=tf.constant(bins + 1, tf.int32),  # a constant size keeps it XLA-compilable
        weights=tf.constant([], tf.int32),
        binary_output=False,
    )
    return counts[:bins]


def _select_digit(histogram, rank):
    """For the ``rank``-th largest value (1-based) of a histogram: ``(digit, count above it)``."""
    at_or_above = tf.cumsum(histogram, reverse=True)  # non-increasing in the digit
    digit = tf.reduce_sum(tf.cast(at_or_above >= rank, tf.int32)) - 1
    above = tf.gather(tf.concat([at_or_above, [0]], 0), digit + 1)
    return digit, above


def _keys(scores):
    """Non-negative int32 sort keys: float32 bit patterns order like the (clamped >= 0) numbers."""
    keys = tf.bitcast(tf.cast(scores, tf.float32) + 0.0, tf.int32)  # + 0.0 turns -0.0 into +0.0
    return tf.maximum(keys, 0)


def _magnitude_keys(values):
    """int32 sort keys of ``|values|`` in one pass: the float32 bit pattern without its sign."""
    return tf.bitwise.bitwise_and(tf.bitcast(tf.cast(values, tf.float32), tf.int32), 0x7FFFFFFF)


def _widths(size):
    return _NARROW_DIGITS if size is not None and size < _NARROW_BELOW else _WIDE_DIGITS


def _select_keys(keys, candidates, num_selected, widths):
    """`select_largest` on int32 keys >= 0 with the given radix digit widths."""
    remaining = tf.cast(num_selected, tf.int32)
    wanted = remaining
    threshold = tf.constant(0, tf.int32)
    prefix = candidates  # candidates whose leading digits equal the threshold's so far
    shift = 31
    for width in widths:
        shift -= width
        bins = 1 << width
        digits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(keys, shift), bins - 1)
        digit, above = _select_digit(_histogram(digits, prefix, bins), remaining)
        remaining -= above
        threshold = tf.bitwise.bitwise_or(threshold, tf.bitwise.left_shift(digit, shift))
        prefix = tf.logical_and(prefix, tf.equal(digits, digit))
    greater = tf.logical_and(candidates, keys > threshold)
    ties = prefix  # candidates equal to the threshold
    num_ties = tf.reduce_sum(tf.cast(ties, tf.int32))
    chosen_ties = tf.cond(
        remaining >= num_ties,
        lambda: ties,
        lambda: tf.logical_and(ties, tf.cumsum(tf.cast(ties, tf.int32)) <= remaining),
    )
    return tf.logical_and(tf.logical_or(greater, chosen_ties), wanted > 0)


def select_largest(scores, candidates, num_selected):
    """Exactly ``num_selected`` of the ``candidates`` with the largest scores, as a bool vector.

    An exact top-k by radix selection: scores (>= 0; negative ones count as 0) are compared by
    their float32 bit patterns, which order like the numbers; two or three histogram passes over
    the digits of the patterns find the ``num_selected``-th largest one, everything above it is
    taken, and ties at it are broken towards the lower index. A dozen or so elementwise passes
    and no sort, so it costs a fraction of ``tf.math.top_k`` with a large k (docs/benchmarks.md),
    with static shapes only (XLA-compilable) and
    deterministic results.

    Args:
        scores: float vector.
        candidates: bool vector of the same length; only these can be selected.
        num_selected: int scalar (tensor or Python) in ``[0, count of candidates]``.
    """
    return _select_keys(_keys(scores), candidates, num_selected, _widths(scores.shape[0]))


_NON_FINITE_KEY = 0x7F800000  # magnitude keys at or above this are Inf or NaN


def largest_indices(scores, candidates, num_selected):
    """The positions `select_largest` selects by ``|scores|``, as an ascending int64 vector.

    Ranks by magnitude (for scores >= 0, exactly `select_largest`'s choice: same ties rule),
    with few passes over a long vector: one 2**16-bin histogram of the keys' leading 16 bits
    over all candidates finds the bin of the ``num_selected``-th largest score; only the
    candidates in that bin or above (about ``num_selected`` plus one bin's worth) are gathered,
    and the exact selection runs on them. Dynamic shapes: not for XLA (use `select_largest`).

    (A sampled estimate of the cut followed by one comparison pass is no faster: the cost is in
    the full-length passes TensorFlow makes; docs/benchmarks.md has the measurements.)
    """
    bins = 1 << _WIDE_DIGITS[0]
    # One full-length int32 temporary at a time: the leading digits, with non-candidates moved
    # to an overflow bin; the keys of the few positions near the cut are recomputed after.
    digits = tf.where(
        candidates,
        tf.bitwise.right_shift(_magnitude_keys(scores), 31 - _WIDE_DIGITS[0]),
        bins,
    )
    histogram = tf.raw_ops.DenseBincount(
        input=digits, size=tf.constant(bins + 1, tf.int32), weights=tf.constant([], tf.int32),
        binary_output=False)[:bins]
    digit, _ = _select_digit(histogram, tf.cast(num_selected, tf.int32))
    near = tf.reshape(tf.where(tf.logical_and(digits >= digit, digits < bins)), [-1])
    sub_keys = _magnitude_keys(tf.gather(scores, near))
    chosen = _select_keys(sub_keys, tf.ones_like(sub_keys, tf.bool), num_selected,
                          _NARROW_DIGITS)
    return tf.boolean_mask(near, chosen)


def random_mask(shape, num_active, seed):
    """A boolean mask of ``shape`` with exactly ``num_active`` True entries, uniformly at random.

    Args:
        shape: the kernel shape (tuple of ints).
        num_active: Python int in ``[0, prod(shape)]``.
        seed: an int64 tensor of shape (2,), e.g. from `rng_seed`.
    """
    if isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"shape must be a tuple of ints; got {shape!r} ({type(shape).__name__}).")
    shape = tuple(_checks.check_int(f"shape[{i}]", d, minimum=0) for i, d in enumerate(shape))
    size = math.prod(shape)
    num_active = _checks.check_int("num_active", num_active)
    if not 0 <= num_active <= size:
        raise ValueError(
            f"num_active={num_active} is outside [0, {size}] for a kernel of shape {shape}."
        )
    if num_active == 0:
        return tf.zeros(shape, tf.bool)
    scores = tf.random.stateless_uniform([size], seed=seed, dtype=tf.float32)
    return tf.reshape(select_largest(scores, tf.ones([size], tf.bool), num_active), shape)


def prune_by_magnitude(mask, weights, num_drop, num_active):
    """Drops the ``num_drop`` active weights of smallest ``|w|``; returns the kept positions.

    Args:
        mask: bool tensor, the current mask, with exactly ``num_active`` True entries.
        weights: float tensor of the same shape.
        num_drop: int scalar (tensor or Python) in ``[0, num_active]``.
        num_active: Python int.

    Returns:
        A bool tensor with exactly ``num_active - num_drop`` True entries, all inside ``mask``.
    """
    del num_active  # the mask's count; kept in the signature for callers and docs
    flat_mask = tf.reshape(mask, [-1])
    magnitude = tf.abs(tf.cast(tf.reshape(weights, [-1]), tf.float32))
    keep = select_largest(magnitude, flat_mask, tf.reduce_sum(tf.cast(flat_mask, tf.int32)) -
                          tf.cast(num_drop, tf.int32))
    return tf.reshape(keep, tf.shape(mask))


def grow_by_score(keep, scores, num_grow, num_active):
    """Activates the ``num_grow`` positions outside ``keep`` with the largest score.

    Positions that were just pruned are allowed. ``scores`` must be >= 0 (|gradient|,
    |momentum| or uniform noise).

    Returns:
        The new mask: ``keep`` plus exactly ``num_grow`` new positions.
    """
    del num_active
    flat_keep = tf.reshape(keep, [-1])
    flat_scores = tf.reshape(scores, [-1])
    grown = select_largest(flat_scores, tf.logical_not(flat_keep), num_grow)
    return tf.reshape(tf.logical_or(flat_keep, grown), tf.shape(keep))


def update_mask(mask, weights, grow_scores, drop_fraction, num_active):
    """One prune-and-grow step on one layer (docs/method.md: prune, grow, exact counts).

    Args:
        mask: bool tensor with exactly ``num_active`` True entries.
        weights: the kernel, same shape (off-mask entries are ignored).
        grow_scores: float tensor >= 0, same shape: |dense gradient|, |momentum| or noise.
        drop_fraction: float scalar in [0, 1].
        num_active: Python int, the layer's active count.

    Returns:
        ``(new_mask, keep)``: the new mask (exactly ``num_active`` True entries) and the positions
        that stayed active without interruption. Positions in ``new_mask`` but not in ``keep`` are
        the grown ones (including pruned-and-regrown ones): their weights and optimizer state
        must restart from zero.
    """
    k = num_to_drop(drop_fraction, num_active)
    keep = prune_by_magnitude(mask, weights, k, num_active)
    new_mask = grow_by_score(keep, grow_scores, k, num_active)
    return new_mask, keep


def update_mask_in_region(mask, weights, grow_scores, drop_fraction, num_active, allowed):
    """`update_mask` confined to a region: the mask update of channel-level DST.

    Active positions outside ``allowed`` are dropped and as many inactive positions inside it
    are grown by ``grow_scores`` (by magnitude), up to ``min(num_active, |allowed|)`` active
    positions: the layer keeps its budget while the region has room, and is dense inside the
    region when it has not. Then the regular prune-and-grow runs on that count, growing inside
    the region only. Static shapes and dynamic counts (the count is a tensor).

    Args:
        mask, weights, grow_scores: as in `update_mask` (``grow_scores`` ranked by magnitude).
        drop_fraction: float scalar in [0, 1].
        num_active: Python int, the layer's budget of active weights.
        allowed: bool tensor of the mask's shape.

    Returns:
        ``(new_mask, keep, count)``: the new mask, the positions that stayed active without
        interruption (inside the old mask) and the new mask's count (int32 scalar tensor).
    """
    shape = tf.shape(mask)
    flat_mask = tf.reshape(mask, [-1])
    flat_allowed = tf.reshape(allowed, [-1])
    scores = tf.abs(tf.cast(tf.reshape(grow_scores, [-1]), tf.float32))
    inside = tf.logical_and(flat_mask, flat_allowed)
    count = tf.minimum(tf.constant(num_active, tf.int32), count_active(flat_allowed))
    refill = select_largest(scores, tf.logical_and(flat_allowed, tf.logical_not(inside)),
                            count - count_active(inside))
    budget = tf.logical_or(inside, refill)
    k = num_to_drop(drop_fraction, count)
    magnitude = tf.abs(tf.cast(tf.reshape(weights, [-1]), tf.float32))
    keep = select_largest(magnitude, budget, count - k)
    grown = select_largest(scores, tf.logical_and(flat_allowed, tf.logical_not(keep)), k)
    new_mask = tf.logical_or(keep, grown)
    return (tf.reshape(new_mask, shape), tf.reshape(tf.logical_and(keep, flat_mask), shape),
            count)


class SparseUpdate(collections.namedtuple(
        "SparseUpdate", ["new_mask", "keep", "dropped", "grown", "num_nonfinite"])):
    """What `update_mask_compacted` returns (see there)."""

    __slots__ = ()


def update_mask_compacted(mask, weights, grow_scores, drop_fraction, num_active):
    """`update_mask` computed on compacted vectors, with the changed positions.

    The prune step gathers the ``num_active`` active weights and selects among them only; the
    grow step finds the candidates near the cut with one histogram pass (`largest_indices`).
    ``grow_scores`` are ranked by magnitude, so a raw gradient can be passed as it is; for
    scores >= 0 the result equals `update_mask`'s (same ties rule).
    Dynamic shapes: not for XLA.

    Returns:
        A `SparseUpdate`: ``new_mask`` and ``keep`` (bool, the shape of ``mask``), ``dropped``
        and ``grown`` (the flat int64 positions that were dropped and grown, each
        ``num_to_drop`` long, ascending; a position can be in both) and ``num_nonfinite`` (how
        many active weights were NaN or Inf, read from the keys the prune step computes anyway).
    """
    k = num_to_drop(drop_fraction, num_active)
    flat_mask = tf.reshape(mask, [-1])
    active = tf.reshape(tf.where(flat_mask), [-1])
    keys = _magnitude_keys(tf.gather(tf.reshape(weights, [-1]), active))
    kept = _select_keys(keys, tf.ones_like(active, tf.bool), num_active - k, _widths(num_active))
    dropped = tf.boolean_mask(active, tf.logical_not(kept))
    flat_keep = tf.tensor_scatter_nd_update(
        flat_mask, dropped[:, None], tf.zeros_like(dropped, tf.bool))
    grown = largest_indices(tf.reshape(grow_scores, [-1]), tf.logical_not(flat_keep), k)
    new_mask = tf.tensor_scatter_nd_update(
        flat_keep, grown[:, None], tf.ones_like(grown, tf.bool))
    shape = tf.shape(mask)
    num_nonfinite = tf.reduce_sum(tf.cast(keys >= _NON_FINITE_KEY, tf.int32))
    return SparseUpdate(tf.reshape(new_mask, shape), tf.reshape(flat_keep, shape), dropped,
                        grown, num_nonfinite)


def update_mask_sparse(mask, weights, grow_scores, drop_fraction, num_active):
    """`update_mask_compacted` as a tuple ``(new_mask, keep, dropped, grown)``."""
    return tuple(update_mask_compacted(mask, weights, grow_scores, drop_fraction,
                                       num_active)[:4])


def zero_off_mask(mask, values):
    """``values`` where ``mask`` is True, exactly +0.0 elsewhere (a scalar zero broadcasts, so no
    zeros tensor is materialised; unlike a multiply it never yields -0.0 or NaN * 0)."""
    return tf.where(mask, values, tf.zeros([], values.dtype))


def random_scores(shape, seed):
    """Uniform [0, 1) scores for random (SET) growth, keyed by a stateless seed."""
    return tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32)


def count_active(mask):
    """Number of True entries of a bool mask, as an int32 scalar tensor."""
    return tf.reduce_sum(tf.cast(mask, tf.int32))


def changed_positions(old_mask, new_mask):
    """Number of positions whose bit flipped between two masks (int32 scalar tensor)."""
    return count_active(tf.not_equal(old_mask, new_mask))
