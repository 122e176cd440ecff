"""Schedules of dynamic sparse training: pure functions of the optimizer step.

Each schedule is a function of the step that works both on Python numbers (for reports and
tests) and on scalar tensors (inside the compiled train step). The step is the optimizer step
*being taken*, counted from 1: the update that runs while ``optimizer.iterations`` goes from
``t - 1`` to ``t`` belongs to step ``t``. So after the callback has seen ``t`` steps, every
update with ``step <= t`` has happened.

Example:

>>> drop_fraction(50, initial=0.3, decay="cosine", end_step=100)
0.15
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


# ------------------------------------------------------------------------------ EDST phase plan
class Phase(tuple):
    """One phase of an EDST run: ``(kind, index, start_epoch, end_epoch)``; end is exclusive.

    ``kind`` is "exploration" (index 0) or "refinement" (index 1..M; refinement phase i yields
    ticket i - 1).
    """

    __slots__ = ()

    def __new__(cls, kind, index, start_epoch, end_epoch):
        return super().__new__(cls, (kind, index, start_epoch, end_epoch))

    kind = property(lambda self: self[0])
    index = property(lambda self: self[1])
    start_epoch = property(lambda self: self[2])
    end_epoch = property(lambda self: self[3])

    @property
    def num_epochs(self):
        return self.end_epoch - self.start_epoch

    def __repr__(self):
        return (
            f"Phase({self.kind!r}, index={self.index}, epochs=[{self.start_epoch}, "
            f"{self.end_epoch}))"
        )


def _positive_int(argument, value, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        allowed = "an integer >= 0" if allow_zero else "a positive integer"
        raise ValueError(f"{argument}={value!r} must be {allowed}.")
    return value


def edst_plan(exploration_epochs, refine_epochs, num_tickets):
    """The EDST phases (SPEC.md section 5): exploration, then ``num_tickets`` refinement phases.

    >>> [tuple(p) for p in edst_plan(2, 3, 2)]
    [('exploration', 0, 0, 2), ('refinement', 1, 2, 5), ('refinement', 2, 5, 8)]
    """
    _positive_int("num_tickets", num_tickets)
    _positive_int("exploration_epochs", exploration_epochs, allow_zero=True)
    _positive_int("refine_epochs", refine_epochs)
    phases = []
    if exploration_epochs:
        phases.append(Phase("exploration", 0, 0, exploration_epochs))
    for i in range(num_tickets):
        start = exploration_epochs + i * refine_epochs
        phases.append(Phase("refinement", i + 1, start, start + refine_epochs))
    return tuple(phases)


def plan_epochs(plan):
    """Total epochs of a plan."""
    return plan[-1].end_epoch


def phase_at(plan, epoch):
    """The phase that contains ``epoch`` (0-based); None past the plan's end."""
    for phase in plan:
        if phase.start_epoch <= epoch < phase.end_epoch:
            return phase
    return None


def global_exploration_epochs(plan):
    """Start epochs of refinement phases 2..M: where the large mask jump happens."""
    return [p.start_epoch for p in plan if p.kind == "refinement" and p.index >= 2]


def edst_learning_rate(plan, epoch, exploration_lr=0.1, refine_lr=(0.01, 0.001), switch=0.5):
    """Learning rate of ``epoch`` under the EDST plan.

    Exploration: ``exploration_lr`` (constant, large). Refinement: ``refine_lr[0]`` for the first
    ``switch`` fraction of the phase's epochs, then ``refine_lr[1]`` (FreeTickets: 0.01 then
    0.001 from the middle of the phase). Past the plan: the last refinement rate.

    >>> plan = edst_plan(2, 4, 2)
    >>> [edst_learning_rate(plan, e) for e in range(10)]
    [0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.01, 0.01, 0.001, 0.001]
    """
    phase = phase_at(plan, epoch)
    if phase is None:
        return float(refine_lr[-1])
    if phase.kind == "exploration":
        return float(exploration_lr)
    into = epoch - phase.start_epoch
    return float(refine_lr[0] if into < switch * phase.num_epochs else refine_lr[1])
