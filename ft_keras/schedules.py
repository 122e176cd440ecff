"""Schedules of dynamic sparse training: when masks change, by how much, and the EDST plan.

Two layers, both pure (no Keras objects):

* functions of the step (`drop_fraction`, `is_update_step`, `update_steps`) that work on Python
  numbers (reports, tests, FLOP counts) and on scalar tensors (inside the compiled train step),
  with Python or tensor parameters;
* serialisable schedule objects (`ConstantDrop`, `CosineDrop`, like tfmot's
  ``PruningSchedule``): ``schedule(step) -> (is_update_step, drop_fraction)``, ``get_config`` /
  ``from_config``, and `EDSTPlan`, the phase plan of an EDST run. `ft_keras.DynamicSparsity`
  evaluates its `DropSchedule` inside the compiled train step; a subclass of `DropSchedule`
  is a user schedule (see there for the contract).

The step is the optimizer step *being taken*, counted from 1: the update that runs while
``optimizer.iterations`` goes from ``t - 1`` to ``t`` belongs to step ``t``. So after the
callback has seen ``t`` steps, every update with ``step <= t`` has happened. See docs/method.md
for the method these implement.

Example:

>>> drop_fraction(50, initial=0.3, decay="cosine", end_step=100)
0.15
>>> is_update_step(200, update_every=100, end_step=1000)
True
>>> schedule = CosineDrop(update_every=100, drop_fraction=0.3, end_step=1000)
>>> schedule(500)
(True, 0.15)
>>> CosineDrop.from_config(schedule.get_config()) == schedule
True
"""

import abc
import math

import tensorflow as tf

from ft_keras import _checks

DECAYS = ("constant", "cosine")


def check_decay(decay):
    """Returns the normalised decay name; TypeError / ValueError naming ``decay`` otherwise."""
    return _checks.check_choice("decay", decay, DECAYS)


def _float64(value):
    """A float64 tensor of ``value`` (a Python float is converted without float32 rounding)."""
    if tf.is_tensor(value):
        return tf.cast(value, tf.float64)
    return tf.constant(float(value), tf.float64)


def drop_fraction(step, initial, decay="cosine", end_step=None, final=0.0):
    """Drop fraction p_t at ``step``.

    constant: ``initial``. cosine: ``final + (initial - final) / 2 * (1 + cos(pi * t / end))``
    with t clipped to ``[0, end_step]`` (RigL's schedule when ``final`` = 0; FreeTickets anneals
    0.5 towards 0.005).

    Args:
        step: int or scalar tensor.
        initial: p_0 in (0, 1] (a float, or a scalar tensor when ``step`` is a tensor).
        decay: "constant" or "cosine".
        end_step: the step where the cosine reaches ``final``; required for cosine (a positive
            int, or a scalar tensor when ``step`` is a tensor).
        final: the cosine's floor.
    """
    decay = check_decay(decay)
    if not tf.is_tensor(initial):
        initial = _checks.check_fraction("initial", initial)
    if not tf.is_tensor(final):
        final = _checks.check_fraction("final", final, low_open=False)
    if decay == "constant":
        return initial if not tf.is_tensor(step) else _float64(initial)
    if end_step is None:
        raise ValueError(f"end_step={end_step!r}: the cosine decay needs a positive end_step.")
    if not tf.is_tensor(end_step):
        end_step = _checks.check_positive_int("end_step", end_step)
    if tf.is_tensor(step):
        end = tf.maximum(tf.cast(end_step, tf.float64), 1.0)
        t = tf.clip_by_value(tf.cast(step, tf.float64), 0.0, end)
        cosine = 0.5 * (1.0 + tf.cos(math.pi * t / end))
        initial = _float64(initial)
        final = _float64(final)
        return final + (initial - final) * cosine
    t = min(max(float(step), 0.0), float(end_step))
    return final + (initial - final) * 0.5 * (1.0 + math.cos(math.pi * t / end_step))


def is_update_step(step, update_every, end_step=None, start_step=0):
    """True when a mask update happens at ``step``: a multiple of ``update_every`` in
    ``(start_step, end_step)`` (``end_step`` None: no end).

    With a tensor ``step`` the parameters may be tensors too (an ``end_step`` tensor < 0 means
    no end), so a compiled train step can read them from variables.
    """
    if tf.is_tensor(step):
        step = tf.cast(step, tf.int64)
        every = tf.cast(update_every, tf.int64)
        ok = tf.logical_and(tf.equal(step % every, 0), step > tf.cast(start_step, tf.int64))
        if end_step is not None:
            end = tf.cast(end_step, tf.int64)
            ok = tf.logical_and(ok, tf.logical_or(step < end, end < 0))
        return ok
    update_every = _checks.check_positive_int("update_every", update_every)
    ok = step % update_every == 0 and step > start_step
    return ok and (end_step is None or step < end_step)


def update_steps(total_steps, update_every, end_step=None, start_step=0):
    """All update steps in ``[1, total_steps]`` as a Python list (for reports and FLOP counts)."""
    total_steps = _checks.check_int("total_steps", total_steps, minimum=0)
    update_every = _checks.check_positive_int("update_every", update_every)
    return [
        t
        for t in range(update_every, total_steps + 1, update_every)
        if is_update_step(t, update_every, end_step, start_step)
    ]


# ------------------------------------------------------------------------- schedule objects
class _Configurable:
    """Objects defined by ``get_config()``: rebuilt by ``from_config``, equal when their configs
    are, printed as their constructor call."""

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self).__name__,
                     tuple(sorted((k, str(v)) for k, v in self.get_config().items()))))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class DropSchedule(_Configurable, abc.ABC):
    """When the masks change and by how much: ``schedule(step) -> (is_update, drop_fraction)``.

    The base of `ConstantDrop`, `CosineDrop` and user schedules. A mask update happens at every
    multiple of ``update_every`` in ``(start_step, end_step)``; ``end_step=None`` means "no end"
    (or, for `ft_keras.DynamicSparsity`, "the end of the current fit", filled in with
    `with_end_step`). Objects are immutable, compare equal by configuration, and serialise with
    ``get_config()`` / ``from_config(config)`` (or `ft_keras.schedules.get`).

    In the train step. `ft_keras.DynamicSparsity(schedule=...)` evaluates the schedule inside
    the compiled train step, from variables: each entry of `numbers` (an int or a float) is kept
    in a scalar variable (int64 or float64), and `drop_fraction_in_graph` and
    `is_update_step_in_graph` get the step and a dict of those variables' values. A later fit
    with a schedule of the same class and the same `numbers` names writes its numbers into the
    same variables and reuses the traced train step, so the ``*_in_graph`` methods must take
    every number from ``values``, never from ``self`` (a number read from ``self`` is frozen
    into the traced step at its first fit).

    A user schedule subclasses `DropSchedule` and implements `drop_fraction_in_graph` in
    TensorFlow ops; a schedule with numbers of its own adds them to ``__init__``,
    `get_config` and `numbers`; one whose drop fraction needs the end step sets
    ``needs_end_step = True``. Python evaluation (``schedule(step)``, `drop_fraction_at`) runs
    the same TensorFlow ops eagerly unless the subclass overrides `drop_fraction_at`.

    >>> class HalvingDrop(DropSchedule):
    ...     # p_t = p_0 / 2 ** (number of updates before t)
    ...     def drop_fraction_in_graph(self, step, values):
    ...         done = (step - values["start_step"] - 1) // values["update_every"]
    ...         return values["drop_fraction"] * tf.pow(tf.constant(0.5, tf.float64),
    ...                                                 tf.cast(done, tf.float64))
    >>> HalvingDrop(update_every=100, drop_fraction=0.4)(300)
    (True, 0.1)

    Args:
        update_every: optimizer steps between mask updates (dT), an int >= 1.
        drop_fraction: the (initial) drop fraction p_0 in (0, 1].
        end_step: last step (exclusive) with updates, an int >= 1, or None.
        start_step: no update at or before this step, an int >= 0.

    Raises:
        TypeError / ValueError: a bad argument; ``start_step >= end_step``; or an ``end_step``
            that leaves no update step in ``(start_step, end_step)`` (the masks would never
            change).
    """

    #: The name of the decay (`DECAYS`), None for a user schedule.
    decay = None
    #: Whether the drop fraction depends on ``end_step`` (`ft_keras.DynamicSparsity` then needs
    #: an end step: explicit, or the end of a fit of known length).
    needs_end_step = False

    def __init__(self, update_every=100, drop_fraction=0.3, end_step=None, start_step=0):
        self.update_every = _checks.check_positive_int("update_every", update_every)
        self.drop_fraction = _checks.check_fraction("drop_fraction", drop_fraction)
        self.end_step = _checks.check_positive_int("end_step", end_step, allow_none=True)
        self.start_step = _checks.check_int("start_step", start_step, minimum=0)
        if self.end_step is not None:
            if self.start_step >= self.end_step:
                raise ValueError(
                    f"start_step={start_step!r} must be smaller than end_step={end_step!r}: "
                    "with start_step >= end_step the masks never change."
                )
            first = (self.start_step // self.update_every + 1) * self.update_every
            if first >= self.end_step:
                raise ValueError(
                    f"end_step={end_step!r} leaves no mask update: the first multiple of "
                    f"update_every={self.update_every} after start_step={self.start_step} is "
                    f"{first}. Use a larger end_step or a smaller update_every."
                )

    def is_update_step(self, step):
        """Whether a mask update happens at ``step`` (Python int or scalar tensor)."""
        return is_update_step(step, self.update_every, self.end_step, self.start_step)

    def drop_fraction_at(self, step):
        """p_t at ``step`` (float, or float64 tensor for a tensor ``step``).

        By default `drop_fraction_in_graph` with this schedule's own `numbers`."""
        values = {name: tf.constant(value, _dtype_of(self, name, value))
                  for name, value in self.numbers().items()}
        fraction = self.drop_fraction_in_graph(tf.cast(step, tf.int64), values)
        return fraction if tf.is_tensor(step) else float(fraction)

    def numbers(self):
        """The numbers the train step reads from variables: ``{name: int or float}``.

        The base's: ``update_every``, ``start_step``, ``end_step`` (-1 for None; an end step is
        filled in before training) and ``drop_fraction``. A subclass with numbers of its own
        returns ``dict(super().numbers(), name=value, ...)``.
        """
        return {
            "update_every": self.update_every,
            "start_step": self.start_step,
            "end_step": -1 if self.end_step is None else self.end_step,
            "drop_fraction": float(self.drop_fraction),
        }

    def is_update_step_in_graph(self, step, values):
        """Whether ``step`` (an int64 scalar tensor) has a mask update, a bool scalar tensor,
        from ``values`` (`numbers`' names -> int64 / float64 scalar tensors). The base: every
        multiple of ``update_every`` in ``(start_step, end_step)``."""
        return is_update_step(step, values["update_every"], values["end_step"],
                              values["start_step"])

    @abc.abstractmethod
    def drop_fraction_in_graph(self, step, values):
        """The drop fraction at ``step`` (an int64 scalar tensor), a float64 scalar tensor in
        (0, 1], computed with TensorFlow ops from ``values`` (`numbers`' names -> int64 /
        float64 scalar tensors) only."""

    def graph_signature(self):
        """What the traced train step depends on: the class and the names and dtypes of
        `numbers` (schedules with the same signature share variables and traced steps)."""
        return (type(self),) + tuple(
            (name, _dtype_of(self, name, value).name)
            for name, value in sorted(self.numbers().items()))

    def __call__(self, step):
        return self.is_update_step(step), self.drop_fraction_at(step)

    def update_steps(self, total_steps):
        """The update steps in ``[1, total_steps]`` (a list of ints)."""
        return update_steps(total_steps, self.update_every, self.end_step, self.start_step)

    def with_end_step(self, end_step):
        """A copy with ``end_step`` set (e.g. to the end of a fit)."""
        config = self.get_config()
        config["end_step"] = end_step
        return type(self).from_config(config)

    def get_config(self):
        return {
            "update_every": self.update_every,
            "drop_fraction": self.drop_fraction,
            "end_step": self.end_step,
            "start_step": self.start_step,
        }


class ConstantDrop(DropSchedule):
    """A constant drop fraction: p_t = ``drop_fraction`` at every update step.

    >>> ConstantDrop(update_every=100, drop_fraction=0.5)(300)
    (True, 0.5)
    """

    decay = "constant"

    def drop_fraction_at(self, step):
        return drop_fraction(step, self.drop_fraction, "constant")

    def drop_fraction_in_graph(self, step, values):
        return drop_fraction(step, values["drop_fraction"], "constant")


class CosineDrop(DropSchedule):
    """Cosine decay of the drop fraction from ``drop_fraction`` to ``final_drop_fraction``.

    p_t = final + (p_0 - final) / 2 * (1 + cos(pi * t / end_step)) (RigL with final = 0;
    FreeTickets: 0.5 towards 0.005). ``end_step`` is needed to evaluate it; None leaves it to be
    filled in (`with_end_step`).

    >>> CosineDrop(update_every=100, drop_fraction=0.5, end_step=1000)(1000)
    (False, 0.0)
    """

    decay = "cosine"
    needs_end_step = True

    def __init__(self, update_every=100, drop_fraction=0.3, end_step=None, start_step=0,
                 final_drop_fraction=0.0):
        super().__init__(update_every, drop_fraction, end_step, start_step)
        self.final_drop_fraction = _checks.check_fraction(
            "final_drop_fraction", final_drop_fraction, low_open=False)
        if self.final_drop_fraction > self.drop_fraction:
            raise ValueError(
                f"final_drop_fraction={final_drop_fraction!r} must not exceed "
                f"drop_fraction={drop_fraction!r}."
            )

    def drop_fraction_at(self, step):
        if self.end_step is None:
            raise ValueError(
                "end_step=None: the cosine decay needs an end step; build the schedule with "
                "end_step=... or use with_end_step()."
            )
        return drop_fraction(step, self.drop_fraction, "cosine", self.end_step,
                             self.final_drop_fraction)

    def numbers(self):
        return dict(super().numbers(), final_drop_fraction=float(self.final_drop_fraction))

    def drop_fraction_in_graph(self, step, values):
        return drop_fraction(step, values["drop_fraction"], "cosine", values["end_step"],
                             values["final_drop_fraction"])

    def get_config(self):
        return dict(super().get_config(), final_drop_fraction=self.final_drop_fraction)


_SCHEDULES = {"ConstantDrop": ConstantDrop, "CosineDrop": CosineDrop}


def _dtype_of(schedule, name, value):
    """int64 for an int number of a schedule, float64 for a float; TypeError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{type(schedule).__name__}.numbers()[{name!r}]={value!r} "
            f"({type(value).__name__}): a schedule's numbers must be Python ints or floats.")
    return tf.int64 if isinstance(value, int) else tf.float64


def make_drop_schedule(decay, update_every=100, drop_fraction=0.3, end_step=None, start_step=0,
                       final_drop_fraction=0.0):
    """The schedule object for a ``decay`` name ("constant" or "cosine")."""
    decay = check_decay(decay)
    if decay == "constant":
        return ConstantDrop(update_every, drop_fraction, end_step, start_step)
    return CosineDrop(update_every, drop_fraction, end_step, start_step, final_drop_fraction)


def serialize(schedule):
    """``{"class_name": ..., "config": ...}`` of a schedule object."""
    if not isinstance(schedule, DropSchedule):
        raise TypeError(f"schedule must be a DropSchedule; got {type(schedule).__name__}.")
    return {"class_name": type(schedule).__name__, "config": schedule.get_config()}


def get(identifier):
    """A schedule from a schedule object (returned as is) or a `serialize` dict."""
    if isinstance(identifier, DropSchedule):
        return identifier
    if not isinstance(identifier, dict):
        raise TypeError(
            f"identifier must be a DropSchedule or a dict {{'class_name': one of "
            f"{sorted(_SCHEDULES)}, 'config': {{...}}}}; got {identifier!r} "
            f"({type(identifier).__name__})."
        )
    if identifier.get("class_name") in _SCHEDULES and isinstance(identifier.get("config"), dict):
        return _SCHEDULES[identifier["class_name"]].from_config(dict(identifier["config"]))
    raise ValueError(
        f"identifier={identifier!r} is not a schedule: pass a DropSchedule or a dict "
        f"{{'class_name': one of {sorted(_SCHEDULES)}, 'config': {{...}}}}."
    )


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


def edst_plan(exploration_epochs, refine_epochs, num_tickets):
    """The EDST phases (docs/method.md): exploration, then ``num_tickets`` refinement phases.

    >>> [tuple(p) for p in edst_plan(2, 3, 2)]
    [('exploration', 0, 0, 2), ('refinement', 1, 2, 5), ('refinement', 2, 5, 8)]
    """
    num_tickets = _checks.check_positive_int("num_tickets", num_tickets)
    exploration_epochs = _checks.check_int("exploration_epochs", exploration_epochs, minimum=0)
    refine_epochs = _checks.check_positive_int("refine_epochs", refine_epochs)
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
    epoch = _checks.check_int("epoch", epoch, minimum=0)
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


class EDSTPlan(_Configurable):
    """The plan of an EDST run: its phases and learning rates (docs/method.md), serialisable.

    >>> plan = EDSTPlan(exploration_epochs=2, refine_epochs=4, num_tickets=2)
    >>> plan.total_epochs, plan.global_exploration_epochs
    (10, [6])
    >>> [plan.learning_rate(e) for e in (0, 2, 4, 6)]
    [0.1, 0.01, 0.001, 0.01]

    Args:
        exploration_epochs: t_ex >= 0.
        refine_epochs: t_re >= 1.
        num_tickets: M >= 1.
        exploration_lr: the constant learning rate of the exploration phase (> 0).
        refine_lr: two learning rates (> 0) of each refinement phase: the first until
            ``refine_lr_switch`` of the phase, the second after.
        refine_lr_switch: fraction of a refinement phase in (0, 1] run at ``refine_lr[0]``.
        jump_lr: None (default: the phase's own rate), or the learning rate of the first
            ``jump_lr_epochs`` epochs right after each global exploration (phases 2..M): a knob
            for how far the tickets move apart.
        jump_lr_epochs: how many epochs ``jump_lr`` lasts (0..refine_epochs).
    """

    def __init__(self, exploration_epochs, refine_epochs, num_tickets=3, exploration_lr=0.1,
                 refine_lr=(0.01, 0.001), refine_lr_switch=0.5, jump_lr=None, jump_lr_epochs=1):
        self.phases = edst_plan(exploration_epochs, refine_epochs, num_tickets)
        self.exploration_epochs = int(exploration_epochs)
        self.refine_epochs = int(refine_epochs)
        self.num_tickets = int(num_tickets)
        self.exploration_lr = _checks.check_real("exploration_lr", exploration_lr, low=0.0,
                                                 low_open=True)
        if not isinstance(refine_lr, (list, tuple)):
            raise TypeError(f"refine_lr must be a pair (tuple or list) of learning rates; got "
                            f"{refine_lr!r}.")
        if len(refine_lr) != 2:
            raise ValueError(f"refine_lr must be a pair of learning rates; got {refine_lr!r} "
                             f"({len(refine_lr)} values).")
        self.refine_lr = tuple(
            _checks.check_real(f"refine_lr[{i}]", value, low=0.0, low_open=True)
            for i, value in enumerate(refine_lr)
        )
        self.refine_lr_switch = _checks.check_fraction("refine_lr_switch", refine_lr_switch)
        self.jump_lr = _checks.check_real("jump_lr", jump_lr, low=0.0, low_open=True,
                                          allow_none=True)
        self.jump_lr_epochs = _checks.check_int("jump_lr_epochs", jump_lr_epochs, minimum=0,
                                                maximum=self.refine_epochs)

    @property
    def total_epochs(self):
        return plan_epochs(self.phases)

    @property
    def global_exploration_epochs(self):
        """Start epochs of refinement phases 2..M (where the global exploration happens)."""
        return global_exploration_epochs(self.phases)

    def phase_at(self, epoch):
        return phase_at(self.phases, epoch)

    def learning_rate(self, epoch):
        """The learning rate of ``epoch``: `edst_learning_rate`, except that with ``jump_lr``
        the first ``jump_lr_epochs`` epochs after each global exploration use ``jump_lr``."""
        phase = self.phase_at(epoch)
        if (self.jump_lr is not None and phase is not None and phase.kind == "refinement"
                and phase.index >= 2 and epoch - phase.start_epoch < self.jump_lr_epochs):
            return self.jump_lr
        return edst_learning_rate(self.phases, epoch, self.exploration_lr, self.refine_lr,
                                  self.refine_lr_switch)

    def get_config(self):
        return {
            "exploration_epochs": self.exploration_epochs,
            "refine_epochs": self.refine_epochs,
            "num_tickets": self.num_tickets,
            "exploration_lr": self.exploration_lr,
            "refine_lr": list(self.refine_lr),
            "refine_lr_switch": self.refine_lr_switch,
            "jump_lr": self.jump_lr,
            "jump_lr_epochs": self.jump_lr_epochs,
        }
