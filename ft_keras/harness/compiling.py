"""How the training recipes compile their models: the optimizer, its learning-rate schedule
and the loss.

`ft_keras.harness.recipes` takes a ``compile_fn(model)`` for every model it trains (its module
doc, "compile_fn"); `default_compile` is the default and `make_compile_fn` builds the usual ones
(SGD with momentum or Adam, constant / cosine / step learning rate, decoupled weight decay).
The names are also ``ftk.recipes.make_compile_fn`` etc.

Example:

>>> compile_fn = make_compile_fn("sgd", 0.05, "cosine", decay_steps=4690, weight_decay=5e-4)
>>> model = compile_fn(ftk.sparsify(ftk.models.lenet_300_100(), sparsity=0.8))
"""

import inspect

import keras

from ft_keras import _checks

OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine", "step")


def default_compile(model):
    """Adam(1e-3), sparse categorical cross-entropy on logits, accuracy."""
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def learning_rate_schedule(schedule, learning_rate, decay_steps=None):
    """A learning rate for ``optimizer(learning_rate=...)``.

    Args:
        schedule: "constant" (the float ``learning_rate``), "cosine" (cosine decay to 0 over
            ``decay_steps``) or "step" (divided by 10 at 50% and again at 75% of
            ``decay_steps``).
        learning_rate: the peak learning rate, > 0.
        decay_steps: optimizer steps of the run (needed by "cosine" and "step").
    """
    schedule = _checks.check_choice("schedule", schedule, LR_SCHEDULES)
    learning_rate = _checks.check_real("learning_rate", learning_rate, low=0.0, low_open=True)
    if schedule == "constant":
        return learning_rate
    steps = _checks.check_positive_int("decay_steps", decay_steps)
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps)
    boundaries = [max(steps // 2, 1), max((3 * steps) // 4, 2)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries, [learning_rate, learning_rate / 10.0, learning_rate / 100.0])


def make_compile_fn(optimizer="sgd", learning_rate=0.05, schedule="constant", decay_steps=None,
                    momentum=0.9, weight_decay=None, **compile_kwargs):
    """A ``compile_fn`` for the recipes: a new optimizer for every model it compiles.

    Args:
        optimizer: "sgd" (with ``momentum``) or "adam".
        learning_rate, schedule, decay_steps: see `learning_rate_schedule`. EDST and the
            checkpoint ensemble set the learning rate every epoch: use "constant" for them.
        momentum: SGD momentum.
        weight_decay: decoupled weight decay (None or 0: none).
        **compile_kwargs: more ``model.compile`` arguments (``steps_per_execution``,
            ``jit_compile``, ``metrics``, ...).

    Returns:
        ``compile_fn(model)``: compiles ``model`` with sparse categorical cross-entropy on
        logits (and accuracy, unless ``metrics`` is given) and returns it.
    """
    optimizer = _checks.check_choice("optimizer", optimizer, OPTIMIZERS)
    learning_rate_schedule(schedule, learning_rate, decay_steps)  # checks the arguments
    momentum = _checks.check_real("momentum", momentum, low=0.0, high=1.0, high_open=True)
    weight_decay = _checks.check_real("weight_decay", weight_decay, low=0.0, allow_none=True)
    allowed = set(inspect.signature(keras.Model.compile).parameters) - {"self", "optimizer",
                                                                         "loss"}
    unknown = sorted(set(compile_kwargs) - allowed)
    if unknown:
        raise TypeError(f"make_compile_fn got {unknown}, which model.compile does not take here; "
                        f"allowed: {sorted(allowed)} (the optimizer and the loss are set by the "
                        "compile_fn).")
    compile_kwargs.setdefault("metrics", ["accuracy"])

    def compile_fn(model):
        rate = learning_rate_schedule(schedule, learning_rate, decay_steps)
        if optimizer == "sgd":
            opt = keras.optimizers.SGD(rate, momentum=momentum, weight_decay=weight_decay or None)
        else:
            opt = keras.optimizers.Adam(rate, weight_decay=weight_decay or None)
        model.compile(optimizer=opt,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      **compile_kwargs)
        return model

    return compile_fn
