"""Schedules of dynamic sparse training: pure functions of the optimizer step.

Each schedule is a function of the step that works both on Python numbers (for reports and
tests) and on scalar tensors (inside the compiled train step). The step is the optimizer step
*being taken*, counted from 1: the update that runs while ``optimizer.iterations`` goes from
``t - 1`` to ``t`` belongs to step ``t``. So after the callback has seen ``t`` steps, every
update with ``step <= t`` has happened.

Example:

>>> drop_fraction(50, initial=0.3, decay="cosine", end_step=100)
0.15000000000000002
>>> is_update_step(200, update_every=100, end_step=1000)
True
"""

import math

import tensorflow as tf

DECAYS = ("constant", "cosine")


def check_decay(decay):
    """Returns the normalised decay name or raises ValueError naming ``decay``."""
    if not isinstance(decay, str) or decay.lower() not in DECAYS:
        raise ValueError(f"decay={decay!r} is not supported; allowed values are {DECAYS}.")
    return decay.lower()


def drop_fraction(step, initial, decay="cosine", end_step=None, final=0.0):
    """Drop fraction p_t at ``step``.

    constant: ``initial``. cosine: ``final + (initial - final) / 2 * (1 + cos(pi * t / end))``
    with t clipped to ``[0, end_step]`` (RigL's schedule when ``final`` = 0; FreeTickets anneals
    0.5 towards 0.005).

    Args:
        step: int or scalar tensor.
        initial: p_0 in (0, 1].
        decay: "constant" or "cosine".
        end_step: the step where the cosine reaches ``final``; required for cosine.
        final: the cosine's floor.
    """
    decay = check_decay(decay)
    if decay == "constant":
        return initial if not tf.is_tensor(step) else tf.constant(initial, tf.float64)
    if end_step is None or end_step <= 0:
        raise ValueError(f"end_step={end_step!r}: the cosine decay needs a positive end_step.")
    if tf.is_tensor(step):
        t = tf.clip_by_value(tf.cast(step, tf.float64), 0.0, float(end_step))
        cosine = 0.5 * (1.0 + tf.cos(math.pi * t / float(end_step)))
        return final + (initial - final) * cosine
    t = min(max(float(step), 0.0), float(end_step))
    return final + (initial - final) * 0.5 * (1.0 + math.cos(math.pi * t / end_step))


def is_update_step(step, update_every, end_step=None, start_step=0):
    """True when a mask update happens at ``step``: a multiple of ``update_every`` in
    ``(start_step, end_step)`` (``end_step`` None: no end)."""
    if tf.is_tensor(step):
        step = tf.cast(step, tf.int64)
        ok = tf.logical_and(tf.equal(step % update_every, 0), step > start_step)
        if end_step is not None:
            ok = tf.logical_and(ok, step < end_step)
        return ok
    ok = step % update_every == 0 and step > start_step
    return ok and (end_step is None or step < end_step)


def update_steps(total_steps, update_every, end_step=None, start_step=0):
    """All update steps in ``[1, total_steps]`` as a Python list (for reports and FLOP counts)."""
    return [
        t
        for t in range(update_every, total_steps + 1, update_every)
        if is_update_step(t, update_every, end_step, start_step)
    ]
