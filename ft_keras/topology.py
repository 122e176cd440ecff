"""Prune and grow on tensors: the mask algebra of dynamic sparse training.

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

import math

import tensorflow as tf

# Scores of positions that must never be chosen. Every real score is >= 0.
_EXCLUDED = -1.0
# Large odd multiplier that separates the user seed from the layer index in the RNG key.
_SEED_STRIDE = 1_000_003
# Relative slack of the ceil in num_to_drop: absorbs float32 rounding of the drop fraction.
_CEIL_TOLERANCE = 1e-6


def rng_seed(seed, step, layer_index):
    """Returns the stateless RNG key for one layer at one step: an int64 tensor of shape (2,).

    Args:
        seed: Python int, the user's seed.
        step: int (or scalar int tensor), the optimizer step; use a negative value for
            draws that are not tied to a training step (initial masks).
        layer_index: Python int, the position of the layer among the masked layers.
    """
    first = tf.constant(int(seed) * _SEED_STRIDE + int(layer_index), tf.int64)
    second = tf.cast(step, tf.int64)
    return tf.stack([first, second])


def num_to_drop(drop_fraction, num_active):
    """``ceil(drop_fraction * num_active)`` clipped to ``[0, num_active]``, as an int32 tensor.

    Computed in float64 with a relative tolerance of 1e-6, so that e.g. 0.3 * 1000 gives 300,
    also when the fraction arrives as a float32 tensor (float32(0.3) * 1000 = 300.0000119).
    """
    if tf.is_tensor(drop_fraction):
        p = tf.cast(drop_fraction, tf.float64)
    else:
        p = tf.constant(float(drop_fraction), tf.float64)
    exact = p * float(num_active)
    k = tf.math.ceil(exact - _CEIL_TOLERANCE * tf.maximum(exact, 1.0))
    k = tf.clip_by_value(k, 0.0, float(num_active))
    return tf.cast(k, tf.int32)


def num_to_drop_py(drop_fraction, num_active):
    """Python twin of `num_to_drop` (for tests, reports and FLOP counts)."""
    exact = float(drop_fraction) * num_active
    k = math.ceil(exact - _CEIL_TOLERANCE * max(exact, 1.0))
    return int(min(max(k, 0), num_active))


def _top_positions(scores, count, num_selected):
    """Boolean vector (same length as ``scores``) that is True at the ``num_selected`` best scores.

    ``count`` is a static Python int >= every value ``num_selected`` can take; ties are broken
    towards the lower index (``tf.math.top_k`` is stable).
    """
    size = scores.shape[0]
    _, indices = tf.math.top_k(scores, k=count, sorted=True)
    chosen = tf.range(count) < num_selected
    hits = tf.scatter_nd(indices[:, None], tf.cast(chosen, tf.int32), [size])
    return hits > 0


def random_mask(shape, num_active, seed):
    """A boolean mask of ``shape`` with exactly ``num_active`` True entries, uniformly at random.

    Args:
        shape: the kernel shape (tuple of ints).
        num_active: Python int in ``[0, prod(shape)]``.
        seed: an int64 tensor of shape (2,), e.g. from `rng_seed`.
    """
    size = math.prod(shape)
    if not 0 <= num_active <= size:
        raise ValueError(
            f"num_active={num_active} is outside [0, {size}] for a kernel of shape {shape}."
        )
    if num_active == 0:
        return tf.zeros(shape, tf.bool)
    scores = tf.random.stateless_uniform([size], seed=seed, dtype=tf.float32)
    return tf.reshape(_top_positions(scores, num_active, num_active), shape)


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
    flat_mask = tf.reshape(mask, [-1])
    magnitude = tf.abs(tf.cast(tf.reshape(weights, [-1]), tf.float32))
    scores = tf.where(flat_mask, magnitude, _EXCLUDED)
    keep = _top_positions(scores, num_active, num_active - num_drop)
    return tf.reshape(keep, tf.shape(mask))


def grow_by_score(keep, scores, num_grow, num_active):
    """Activates the ``num_grow`` positions outside ``keep`` with the largest score.

    Positions that were just pruned are allowed. ``scores`` must be >= 0 (|gradient|,
    |momentum| or uniform noise).

    Returns:
        The new mask: ``keep`` plus exactly ``num_grow`` new positions.
    """
    flat_keep = tf.reshape(keep, [-1])
    flat_scores = tf.cast(tf.reshape(scores, [-1]), tf.float32)
    candidates = tf.where(flat_keep, _EXCLUDED, flat_scores)
    grown = _top_positions(candidates, num_active, num_grow)
    return tf.reshape(tf.logical_or(flat_keep, grown), tf.shape(keep))


def update_mask(mask, weights, grow_scores, drop_fraction, num_active):
    """One prune-and-grow step on one layer (SPEC.md section 3, steps 2, 3 and 5).

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
