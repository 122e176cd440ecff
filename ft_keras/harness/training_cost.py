"""Training cost in multiply-accumulates (MACs) of the runs the recipes make.

RigL (Evci et al. 2020, section 4 / appendix H) and FreeTickets count the cost of training a
sparse network from its forward cost; the formulas are derived in docs/method.md. With ``f_s``
the sparse and ``f_d`` the dense forward MACs per example (`ft_keras.flops.forward_macs`),
``B`` the batch size and ``T`` the number of optimizer steps:

- dense training: ``3 * f_d * B * T`` (forward, backward to the activations, backward to the
  weights, each about one forward);
- sparse training with fixed masks (`ft_keras.StaticSparsity`): ``3 * f_s * B * T``;
- dynamic sparse training (`ft_keras.DynamicSparsity`, `ft_keras.FreeTickets`):

  - ``grow="gradient"`` (RigL): ``3 * f_s * B`` per step, plus ``(f_d - f_s) * B`` at each mask
    update step (the update needs the *dense* weight gradient);
  - ``grow="momentum"`` (SNFS): the dense gradient at every step, ``(2 * f_s + f_d) * B``;
  - ``grow="random"`` (SET): ``3 * f_s * B`` per step.

The prune/grow selection itself (sorting magnitudes) is not counted. Active counts per layer are
constant during DST, so ``f_s`` is the same at every step; pass the sparsified model.

Two functions hold the whole accounting: `training_macs` costs a run described by its kind of
training and its update steps, and `fit_macs` costs one ``fit`` from the sparsity callback it ran
with (none, `StaticSparsity`, `DynamicSparsity` or `FreeTickets`). The recipes of
`ft_keras.recipes` cost every fit they make with `fit_macs`, so a new recipe needs no change
here as long as it trains with these callbacks.

Example:

>>> sparse = ftk.sparsify(ftk.models.lenet_300_100(), 0.9, distribution="uniform")
>>> training_macs(sparse, steps=10, batch_size=4, sparse=False)     # dense: 3 * 266200 * 4 * 10
31944000
>>> training_macs(sparse, 10, 4, grow="gradient", update_steps=dst_update_steps(10, 5))
4152720
"""

from ft_keras import _checks
from ft_keras import flops
from ft_keras import schedules
from ft_keras.free_tickets import FreeTickets
from ft_keras.masks import GROW_MODES
from ft_keras.training import SparseTraining

__all__ = [
    "dst_update_steps",
    "edst_update_steps",
    "fit_macs",
    "training_macs",
]


def dst_update_steps(steps, update_every, end_step=None, start_step=0):
    """The mask-update steps of a `ft_keras.DynamicSparsity` run of ``steps`` optimizer steps.

    Steps count from 1. Updates happen at multiples of ``update_every`` in
    ``(start_step, end_step)``, ``end_step`` exclusive. ``end_step=None`` means the end of
    training, as in the callback (``end_step = steps``), so the last step never updates: 10 steps
    with ``update_every=5`` update at step 5 only; ``end_step=11`` gives ``[5, 10]``.
    """
    steps = _checks.check_int("steps", steps, minimum=0)
    update_every = _checks.check_int("update_every", update_every, minimum=1)
    if end_step is not None:
        end_step = _checks.check_int("end_step", end_step, minimum=1)
    start_step = _checks.check_int("start_step", start_step, minimum=0)
    if end_step is not None and start_step >= end_step:
        raise ValueError(f"start_step={start_step} must be smaller than end_step={end_step}: with "
                         "start_step >= end_step the masks never change.")
    return schedules.update_steps(
        steps, update_every, steps if end_step is None else end_step, start_step
    )


def edst_update_steps(exploration_epochs, refine_epochs, num_tickets, steps_per_epoch,
                      update_every, end_step=None, start_step=0):
    """The mask-update steps of a `ft_keras.FreeTickets` (EDST) run, in increasing order.

    The regular DST updates over the whole plan (`dst_update_steps` with
    ``steps = plan epochs * steps_per_epoch``) plus one global exploration at the first step of
    each refinement phase after the first (step ``epoch * steps_per_epoch + 1``); a step that is
    both counts once.
    """
    plan = schedules.edst_plan(exploration_epochs, refine_epochs, num_tickets)
    steps_per_epoch = _checks.check_int("steps_per_epoch", steps_per_epoch, minimum=1)
    total = schedules.plan_epochs(plan) * steps_per_epoch
    regular = dst_update_steps(total, update_every, end_step, start_step)
    jumps = [e * steps_per_epoch + 1 for e in schedules.global_exploration_epochs(plan)]
    return sorted(set(regular) | set(jumps))


def training_macs(model, steps, batch_size, *, sparse=True, grow=None, update_steps=(), at=None):
    """Training MACs of one run of ``steps`` optimizer steps (the formulas of the module doc).

    Args:
        model: a built `keras.Model`; the sparsified one for sparse training (its masks give
            ``f_s``; ``f_d`` ignores them).
        steps: optimizer steps T, >= 0.
        batch_size: examples per step B, >= 1.
        sparse: False: dense training (the masks ignored). True: sparse training.
        grow: None: fixed masks. "gradient", "random" or "momentum": dynamic sparse training
            with that growth (only with ``sparse=True``).
        update_steps: the steps (1-based) that update the masks (`dst_update_steps`,
            `edst_update_steps`); they cost extra with ``grow="gradient"`` only.
        at: None, or steps ``<= steps`` at which to read the cost spent so far (e.g. where each
            ticket of an EDST run is complete).

    Returns:
        An int, or with ``at`` a list of ints: the cost of the first ``at[i]`` steps.

    Raises:
        TypeError: a non-int count, a non-bool ``sparse``, a non-model ``model``.
        ValueError: a count out of range, an unknown ``grow``, ``grow`` with ``sparse=False``,
            an ``at`` step beyond ``steps``.
    """
    _checks.check_model("model", model)
    steps = _checks.check_int("steps", steps, minimum=0)
    batch_size = _checks.check_int("batch_size", batch_size, minimum=1)
    sparse = _checks.check_bool("sparse", sparse)
    if grow is not None:
        grow = _checks.check_choice("grow", grow, GROW_MODES)
        if not sparse:
            raise ValueError(f"grow={grow!r} with sparse=False: dense training has no growth; "
                             "pass sparse=True or grow=None.")
    updates = [_checks.check_int(f"update_steps[{i}]", u, minimum=1)
               for i, u in enumerate(update_steps)]
    boundaries = [steps] if at is None else [
        _checks.check_int(f"at[{i}]", a, minimum=0, maximum=steps) for i, a in enumerate(at)]
    f_d = flops.forward_macs(model, dense=True)
    f_s = flops.forward_macs(model) if sparse else f_d
    extra = 0
    if grow == "momentum":
        step = (2 * f_s + f_d) * batch_size
    else:
        step = 3 * f_s * batch_size
        if grow == "gradient":
            extra = (f_d - f_s) * batch_size
    costs = [step * end + extra * sum(1 for u in updates if u <= end) for end in boundaries]
    return costs[0] if at is None else costs


def fit_macs(model, callback, steps, batch_size, *, steps_per_epoch=None, at=None):
    """Training MACs of one ``fit`` of ``steps`` steps that ran with the sparsity ``callback``.

    What the fit ran decides the formula: no callback is dense training; `StaticSparsity` fixed
    masks; `DynamicSparsity` its growth and the update steps of its schedule
    (`dst_update_steps`); `FreeTickets` also its global explorations (`edst_update_steps`).

    Args:
        model: the model the fit trained.
        callback: None or the `ft_keras.SparseTraining` callback of the fit.
        steps, batch_size, at: as in `training_macs`.
        steps_per_epoch: optimizer steps per epoch (needed for `FreeTickets`).

    Returns:
        An int, or with ``at`` a list of ints.
    """
    if callback is None:
        return training_macs(model, steps, batch_size, sparse=False, at=at)
    if not isinstance(callback, SparseTraining):
        raise TypeError(f"callback must be None or an ft_keras sparsity callback "
                        f"(StaticSparsity, DynamicSparsity, FreeTickets); got "
                        f"{type(callback).__name__}.")
    if not callback.updates_masks:
        return training_macs(model, steps, batch_size, at=at)
    if isinstance(callback, FreeTickets):
        updates = edst_update_steps(callback.exploration_epochs, callback.refine_epochs,
                                    callback.num_tickets, steps_per_epoch, callback.update_every,
                                    callback.end_step, callback.start_step)
    else:
        updates = dst_update_steps(steps, callback.update_every, callback.end_step,
                                   callback.start_step)
    return training_macs(model, steps, batch_size, grow=callback.grow, update_steps=updates,
                         at=at)
