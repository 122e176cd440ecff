"""Every use of private Keras API in ft_keras, in one place (private).

ft_keras relies on a few Keras internals that no public API offers. They are all here, each
behind a small function that names the internal, so that the day Keras changes one of them
exactly one function breaks, and ``tests/test_keras_compat.py`` (one canary test per internal)
says which. The supported range is :data:`SUPPORTED_KERAS` (``setup.py`` pins the same range).

Internals used (Keras 3, TensorFlow backend):

1. ``Optimizer.update_step(gradient, variable, learning_rate)`` is called once per trainable
   variable, inside the compiled train step, with the gradient already all-reduced across
   replicas (``TFOptimizer._backend_update_step``). ft_keras replaces the bound method on one
   optimizer instance (`install_update_step` / `remove_update_step`): this is where the masked
   update and the in-graph mask update run (see ``ft_keras/training.py``).
2. ``Optimizer._var_key(variable)`` (a stable key of a variable, mirrored or not) and
   ``Optimizer._get_variable_index(variable)`` (its position in the per-variable state lists).
3. The attribute names of each Keras optimizer's per-weight state (`optimizer_slots`): there is
   no public listing, so they are looked up by known optimizer class (:data:`SLOT_ATTRIBUTES`);
   an unknown optimizer class is refused with a clear error (or registered by the user with
   `register_optimizer_slots`).
4. ``Optimizer._learning_rate`` (a float variable or a ``LearningRateSchedule``).
5. ``Dense`` / ``Conv`` ``_kernel``: the kernel variable behind the public ``kernel`` property
   (which may return a computed tensor under LoRA or quantization).
6. ``Layer._trainable_variables`` / ``_non_trainable_variables``: a layer's own variables, in
   the order ``save_own_variables`` writes them.
7. Functional models' ``_nodes_by_depth`` and ``_operations`` and Sequential's ``_functional``:
   the layer graph, walked by ``ft_keras.flops``.
8. ``TensorFlowTrainer._maybe_symbolic_build`` and ``trainer.reduce_per_replica``: replaced by
   the multi-worker fix (`install_multiworker_fix`, see below).
9. ``strategy.extended._in_multi_worker_mode()`` (TensorFlow): whether a
   ``MultiWorkerMirroredStrategy`` really spans several workers.
10. ``model._compile_loss`` and ``model._compile_metrics``: identify one ``compile()`` call, so a
    train function traced for it can be reused by a later ``fit`` (`compile_token`); and
    ``_compile_metrics._user_metrics`` / ``_user_weighted_metrics``: the metrics given to
    ``compile`` before Keras builds them (`compiled_metric_arguments`, read by
    `metric_direction`, public as ``ft_keras.keras_metrics.metric_direction``).
11. ``Model._eval_epoch_iterator`` (the validation data ``fit`` caches before its first
    validation) and its ``data_adapter.get_numpy_iterator()``: read by `fit_validation_data`
    at the first ``on_test_begin`` of a fit, so that bad validation data (NaN / Inf inputs,
    labels out of range) is refused before any ticket is selected on it.
12. ``TensorFlowTrainer.make_train_function`` reads ``self.train_step`` and
    ``self.jit_compile`` when it makes the function, not when the function runs:
    `make_train_function_around` makes one around another step, uncompiled, and restores both.

The multi-worker fix (8) is installed by `install_multiworker_fix` only, never at import; when
and why to call it is said in ``ft_keras/distribute.py``.
"""

import os

import keras
import tensorflow as tf
from absl import logging

from ft_keras import _checks

#: Keras versions ``[low, high)`` ft_keras supports (setup.py pins the same range).
SUPPORTED_KERAS = ((3, 5), (3, 16))
#: Keras versions ``[low, high)`` whose ``model.fit`` has the multi-worker bugs fixed here.
MULTIWORKER_FIX_KERAS = ((3, 0), (3, 16))
#: Set to ``0`` (or ``false`` / ``no`` / ``off``) to keep stock Keras under multi-worker strategies.
MULTIWORKER_FIX_ENV = "FT_KERAS_MULTIWORKER_FIX"


def keras_version(text=None):
    """``(major, minor)`` of the installed Keras (or of ``text``)."""
    text = keras.version() if text is None else text
    parts = []
    for piece in str(text).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 2:
        parts.append(0)
    return tuple(parts)


# ------------------------------------------------------------------------- 1-4: optimizers
def base_optimizer(optimizer):
    """Unwraps ``LossScaleOptimizer`` (and similar wrappers) to the optimizer that updates."""
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


def install_update_step(optimizer, hook):
    """Makes ``hook(gradient, variable, learning_rate)`` the instance's ``update_step``."""
    optimizer.update_step = hook


def remove_update_step(optimizer, hook):
    """Undoes `install_update_step` (if ``hook`` is still the one installed)."""
    if optimizer.__dict__.get("update_step") is hook:
        del optimizer.__dict__["update_step"]


def original_update_step(optimizer):
    """The class's own ``update_step``, bound to ``optimizer`` (whatever is installed)."""
    return type(optimizer).update_step.__get__(optimizer)


def variable_key(optimizer, variable):
    """The optimizer's stable key of ``variable`` (the same for a mirrored variable's copies)."""
    return optimizer._var_key(variable)  # pylint: disable=protected-access


def variable_index(optimizer, variable):
    """The position of ``variable`` in the optimizer's per-variable state lists."""
    return optimizer._get_variable_index(variable)  # pylint: disable=protected-access


#: Per-weight state of each Keras optimizer: the attributes that hold one entry per trainable
#: variable. Entries that are None or not kernel-shaped (e.g. Adafactor's factored second
#: moments of a matrix) are not per-weight state and are skipped.
SLOT_ATTRIBUTES = {
    "SGD": ("momentums",),
    "Adam": ("_momentums", "_velocities", "_velocity_hats"),
    "AdamW": ("_momentums", "_velocities", "_velocity_hats"),
    "Adamax": ("_m", "_u"),
    "Adagrad": ("_accumulators",),
    "Adadelta": ("_accumulated_grads", "_accumulated_delta_vars"),
    "Adafactor": ("_r", "_c", "_v"),
    "Ftrl": ("_accumulators", "_linears"),
    "Lamb": ("_momentums", "_velocities"),
    "Lion": ("_momentums",),
    "Nadam": ("_momentums", "_velocities"),
    "RMSprop": ("_velocities", "_momentums", "_average_gradients"),
    "ScheduleFreeAdamW": ("_momentums", "_velocities"),
}
#: Per-variable state every Keras optimizer may add (``use_ema``, gradient accumulation).
BASE_SLOT_ATTRIBUTES = ("_model_variables_moving_average", "_accumulated_gradients")
#: Optimizers whose update is not elementwise in the gradient: a zero gradient does not keep a
#: zero weight at zero, so masked optimizer state cannot keep the weights sparse.
NOT_ELEMENTWISE = {"Muon": "its orthogonalised update mixes all entries of a kernel"}

_registered_slots = {}


def register_optimizer_slots(optimizer_class, attributes):
    """Declares the per-weight state attributes of a user's optimizer class.

    ``attributes`` name lists with one entry per trainable variable (like Keras's own
    ``self._momentums``). The optimizer's update must be elementwise in the gradient (a zero
    gradient with zero state leaves a zero weight at zero).
    """
    if not (isinstance(optimizer_class, type)
            and issubclass(optimizer_class, keras.optimizers.Optimizer)):
        raise TypeError(
            f"optimizer_class must be a subclass of keras.optimizers.Optimizer; got "
            f"{optimizer_class!r}."
        )
    names = None
    if not isinstance(attributes, (str, bytes)):
        try:
            names = tuple(attributes)
        except TypeError:  # not iterable
            pass
    if names is None or not all(isinstance(a, str) for a in names):
        raise TypeError(f"attributes must be a sequence of attribute names; got {attributes!r}.")
    _registered_slots[optimizer_class] = names


def _slot_attributes(optimizer):
    for cls in type(optimizer).__mro__:
        if cls in _registered_slots:
            return _registered_slots[cls]
        if cls.__module__.startswith("keras") and cls.__name__ in NOT_ELEMENTWISE:
            raise ValueError(
                f"optimizer {type(optimizer).__name__} is not supported with masked optimizer "
                f"state: {NOT_ELEMENTWISE[cls.__name__]}. Use optimizer_state='dense' (weights "
                "are re-masked after each update) or another optimizer."
            )
        if cls.__module__.startswith("keras") and cls.__name__ in SLOT_ATTRIBUTES:
            return SLOT_ATTRIBUTES[cls.__name__]
    raise ValueError(
        f"optimizer {type(optimizer).__name__} is unknown to ft_keras, which needs to know its "
        "per-weight state to keep it zero off-mask. Known: "
        f"{sorted(SLOT_ATTRIBUTES)} and their subclasses. Declare yours with "
        "ft_keras.training.register_optimizer_slots(YourOptimizer, ('_your_slots', ...)), or "
        "train with optimizer_state='dense'."
    )


def optimizer_slots(optimizer, variable):
    """The optimizer's per-weight state variables of ``variable`` (kernel-shaped ones only).

    Raises:
        ValueError: the optimizer class is unknown (see `register_optimizer_slots`) or its
            update is not elementwise.
    """
    index = variable_index(optimizer, variable)
    slots = []
    for name in _slot_attributes(optimizer) + BASE_SLOT_ATTRIBUTES:
        values = getattr(optimizer, name, None)
        if not isinstance(values, (list, tuple)) or index >= len(values):
            continue
        item = values[index]
        if (isinstance(item, keras.Variable) and item is not variable
                and tuple(item.shape) == tuple(variable.shape)
                and all(item is not s for s in slots)):
            slots.append(item)
    return slots


def learning_rate_is_schedule(optimizer):
    """True if the optimizer's learning rate is a ``LearningRateSchedule`` (not a float)."""
    return isinstance(
        optimizer._learning_rate,  # pylint: disable=protected-access
        keras.optimizers.schedules.LearningRateSchedule,
    )


# --------------------------------------------------------------------------- 5-7: layers
def kernel_variable(layer):
    """The kernel *variable* of a Dense / Conv layer (``kernel`` may be a computed tensor)."""
    kernel = getattr(layer, "_kernel", None)
    return kernel if kernel is not None else layer.kernel


def own_variables(layer):
    """A layer's own variables in the order ``save_own_variables`` stores them."""
    return list(layer._trainable_variables) + list(  # pylint: disable=protected-access
        layer._non_trainable_variables)  # pylint: disable=protected-access


def layer_graph(model):
    """The Functional graph of a model (itself, or a Sequential's inner graph), or None for a
    subclassed model. Raises ValueError for an unbuilt Sequential."""
    if isinstance(model, keras.Sequential):
        graph = getattr(model, "_functional", None)
        if graph is None:
            raise ValueError(
                f"model {model.name!r} is not built; give it an Input or call it on data first."
            )
        return graph
    if is_graph_model(model):
        return model
    return None


def is_graph_model(model):
    """True for Sequential and Functional models (the ones ``clone_model`` can rebuild)."""
    return isinstance(model, keras.Sequential) or (
        hasattr(model, "_nodes_by_depth") and hasattr(model, "_operations"))


def nodes_by_depth(graph):
    """``{depth: [node, ...]}`` of a Functional graph (node.operation, input/output tensors)."""
    return graph._nodes_by_depth  # pylint: disable=protected-access


# ------------------------------------------------------------------ 8-9: multi-worker fix
def is_multi_worker(strategy):
    """True for a ``MultiWorkerMirroredStrategy`` that really spans several workers."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    in_multi_worker_mode = getattr(strategy.extended, "_in_multi_worker_mode", None)
    return bool(in_multi_worker_mode()) if callable(in_multi_worker_mode) else False


_fix_state = {"originals": None, "logged": False}


def _trainer_module():
    from keras.src.backend.tensorflow import trainer  # pylint: disable=import-outside-toplevel

    return trainer


def _log_fix_once():
    if not _fix_state["logged"]:
        _fix_state["logged"] = True
        logging.info(
            "ft_keras: multi-worker fix for Keras %s model.fit is active (set %s=0 to disable)",
            keras.version(), MULTIWORKER_FIX_ENV,
        )


def _first_local(value, strategy):
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def _make_symbolic_build(original):
    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = getattr(self, "_distribute_strategy", None)
        if iterator is None or strategy is None or not is_multi_worker(strategy):
            return original(self, iterator=iterator, data_batch=data_batch)
        _log_fix_once()
        for _, _, batches in iterator:
            batch = next(batches)
            data_batch = tf.nest.map_structure(lambda v: _first_local(v, strategy), batch)
            break
        return original(self, iterator=None, data_batch=data_batch)

    _maybe_symbolic_build.ftk_original = original
    return _maybe_symbolic_build


def _make_reduce_per_replica(original):
    def reduce_per_replica(values, strategy, reduction):
        if reduction == "auto" and not isinstance(strategy, tf.distribute.TPUStrategy):
            reduction = "mean"
        if reduction != "mean" or not is_multi_worker(strategy):
            return original(values, strategy, reduction)
        _log_fix_once()
        return tf.nest.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)

    reduce_per_replica.ftk_original = original
    return reduce_per_replica


def multiworker_fix_env_allows():
    value = os.environ.get(MULTIWORKER_FIX_ENV, "1").strip().lower()
    return value not in ("0", "false", "no", "off")


def multiworker_fix_applies(version=None):
    """True if the Keras ``version`` (default: installed) is one the fix is meant for."""
    low, high = MULTIWORKER_FIX_KERAS
    return low <= keras_version(version) < high


def multiworker_fix_installed():
    """True while the fixed functions are in place."""
    return _fix_state["originals"] is not None


def install_multiworker_fix(force=False):
    """Installs the fix; returns True if it is in place (see the module docstring)."""
    if _fix_state["originals"] is not None:
        return True
    if not force and (not multiworker_fix_env_allows() or not multiworker_fix_applies()):
        return False
    try:
        trainer = _trainer_module()
        cls = trainer.TensorFlowTrainer
        build = cls.__dict__["_maybe_symbolic_build"]
        reduce_fn = trainer.reduce_per_replica
    except (ImportError, AttributeError, KeyError) as error:
        logging.warning("ft_keras: multi-worker fix not installed: Keras %s has no %s",
                        keras.version(), error)
        return False
    cls._maybe_symbolic_build = _make_symbolic_build(build)  # pylint: disable=protected-access
    trainer.reduce_per_replica = _make_reduce_per_replica(reduce_fn)
    _fix_state["originals"] = (build, reduce_fn)
    return True


def remove_multiworker_fix():
    """Puts Keras's own functions back; returns True if the fix was installed."""
    originals = _fix_state["originals"]
    if originals is None:
        return False
    build, reduce_fn = originals
    trainer = _trainer_module()
    trainer.TensorFlowTrainer._maybe_symbolic_build = build  # pylint: disable=protected-access
    trainer.reduce_per_replica = reduce_fn
    _fix_state["originals"] = None
    return True


# ------------------------------------------------------------------------ 10-11: trainer
def compile_token(model):
    """What identifies the model's current ``compile()``: its loss and metrics containers (which
    every ``compile`` call creates anew) and optimizer, compared by identity, and the settings a
    traced train function depends on."""
    return (
        getattr(model, "_compile_loss", None),
        getattr(model, "_compile_metrics", None),
        getattr(model, "optimizer", None),
        int(getattr(model, "steps_per_execution", 1) or 1),
        bool(getattr(model, "jit_compile", False)),
        bool(getattr(model, "run_eagerly", False)),
    )


def compiled_metric_arguments(model):
    """``(metrics, weighted_metrics)`` as given to ``compile`` (None where absent); Keras
    builds its metric objects only when a step is first traced."""
    compiled = getattr(model, "_compile_metrics", None)
    if compiled is None:
        return (None, None)
    return (getattr(compiled, "_user_metrics", None),
            getattr(compiled, "_user_weighted_metrics", None))




def fit_validation_data(model):
    """The validation batches of the running ``fit`` of ``model``, as numpy ``(x, y, ...)``
    tuples; None when there are none to see.

    Keras's ``fit`` caches its validation data as ``model._eval_epoch_iterator`` (an
    ``EpochIterator`` whose ``data_adapter`` yields the batches) just before its first
    validation, so a callback sees them from the first ``on_test_begin`` of the fit on (before
    that, and outside ``fit``, this returns None). The batches are those of one validation pass
    (``validation_steps`` of them when given).
    """
    iterator = model.__dict__.get("_eval_epoch_iterator")
    adapter = getattr(iterator, "data_adapter", None)
    if adapter is None:
        return None
    steps = getattr(iterator, "steps_per_epoch", None)

    def batches():
        for count, batch in enumerate(adapter.get_numpy_iterator()):
            if steps is not None and count >= steps:
                return
            yield batch if isinstance(batch, tuple) else (batch,)

    return batches()


def make_train_function_around(model, step):
    """Sets ``model.train_function`` to Keras's train function calling ``step`` instead of
    ``model.train_step``, not compiled by XLA (``step`` may compile parts itself).

    Keras makes the function (distribution, ``steps_per_execution`` loop, log reduction) from
    the ``train_step`` and ``jit_compile`` it reads at that moment; both are restored after.
    """
    own_step = model.__dict__.get("train_step")
    jit_compile = model.jit_compile
    model.train_step = step
    model.jit_compile = False
    try:
        model.make_train_function(force=True)
    finally:
        model.jit_compile = jit_compile
        if own_step is None:
            del model.train_step
        else:
            model.train_step = own_step
    return model.train_function


# What a metric's ``_direction`` (Keras's convention, read by its MonitorCallback) means for a
# best-value rule.
_DIRECTIONS = {"down": "min", "up": "max"}


# ------------------------------------------------------------------------ 10: metric direction
def _declared_direction(metric):
    """``"min"`` / ``"max"`` from a metric's declared ``_direction``, else None."""
    return _DIRECTIONS.get(getattr(metric, "_direction", None))


def _built_metrics(metrics):
    """``(name, metric)`` of the metric objects in ``metrics`` (``model.metrics``: the loss
    tracker, the compiled metrics once built, metrics of layers), Keras's containers opened."""
    for metric in metrics:
        inner = getattr(metric, "metrics", None)
        if isinstance(inner, (list, tuple)):
            yield from _built_metrics(inner)
        else:
            yield str(getattr(metric, "name", "")), metric


def _resolve_identifier(identifier):
    """``(name, direction)`` of a metric as ``compile(metrics=[...])`` will build it, or None."""
    if isinstance(identifier, keras.metrics.Metric):
        return identifier.name, _declared_direction(identifier)
    if isinstance(identifier, str) and identifier.lower() in ("accuracy", "acc"):
        # Keras picks BinaryAccuracy, CategoricalAccuracy or SparseCategoricalAccuracy from the
        # shapes when it builds the metrics; all three are higher-is-better.
        return identifier, "max"
    try:
        metric = keras.metrics.get(identifier)
        if isinstance(metric, type):
            metric = metric()
        if not isinstance(metric, keras.metrics.Metric):
            metric = keras.metrics.MeanMetricWrapper(metric)  # a function, as Keras wraps it
    except (ValueError, TypeError):
        return None
    name = identifier if isinstance(identifier, str) else metric.name
    return name, _declared_direction(metric)


def _resolve_user_metrics(structure, prefix=""):
    """``(log name, direction)`` of the metrics given to ``compile``: a list, or per output a
    dict of lists (log names ``<output>_<metric>``) or a list of lists."""
    if structure is None:
        return
    if isinstance(structure, dict):
        for output, value in structure.items():
            yield from _resolve_user_metrics(value, f"{output}_")
        return
    if not isinstance(structure, (list, tuple)):
        structure = [structure]
    for item in structure:
        if isinstance(item, (list, tuple, dict)):
            yield from _resolve_user_metrics(item, prefix)
        elif item is not None:
            resolved = _resolve_identifier(item)
            if resolved is not None:
                yield prefix + resolved[0], resolved[1]


def _compiled_metrics(model):
    """``(log name, direction)`` of the metrics given to ``compile``.

    Read from the ``compile`` arguments rather than from the metrics Keras builds, because Keras
    builds them only when the train or test step is first traced (after the callbacks'
    ``on_train_begin``), and its built list drops the output names of multi-output models.
    Private Keras API (`compiled_metric_arguments`), checked by
    tests/test_keras_metrics.py (`metric_direction` on a compiled model that has not run, and on
    a multi-output model).
    """
    for user in compiled_metric_arguments(model):
        yield from _resolve_user_metrics(user)


def metric_direction(model, monitor):
    """Whether lower (``"min"``) or higher (``"max"``) is better for ``monitor``, or None.

    The rule of Keras's callbacks in ``mode="auto"``: a ``"val_"`` prefix is dropped; ``"loss"``
    is ``"min"``; any other name is looked up among the model's metrics (the compiled metrics,
    Keras's and ft_keras's alike, and metrics added by layers), and the metric's declared
    direction decides. Keras's metrics and the metrics of `ft_keras.keras_metrics` declare one;
    a user metric declares one by setting ``self._direction = "down"`` (lower is better) or
    ``"up"`` in its ``__init__``. A name that
    is not found, or a metric that declares no direction, gives None: the caller should then
    ask for an explicit ``mode``. Unlike Keras's callbacks, this also knows the compiled metrics
    before the first step (e.g. in ``on_train_begin``) and the ``<output>_<metric>`` names of
    multi-output models.

    Args:
        model: a `keras.Model`, compiled for anything but ``"loss"``.
        monitor: an epoch log name such as ``"val_nll"``, ``"accuracy"`` or ``"val_loss"``.

    Returns:
        ``"min"``, ``"max"`` or None.

    Raises:
        TypeError: ``model`` is not a `keras.Model` or ``monitor`` is not a str.
        ValueError: ``monitor`` is empty.

    Example:

    >>> model.compile("sgd", "sparse_categorical_crossentropy",
    ...               metrics=["accuracy", ftk.keras_metrics.NegativeLogLikelihood()])
    >>> metric_direction(model, "val_nll"), metric_direction(model, "val_accuracy")
    ('min', 'max')
    """
    _checks.check_model("model", model, built=False)
    monitor = _checks.check_str("monitor", monitor)
    name = monitor[len("val_"):] if monitor.startswith("val_") else monitor
    if name == "loss":
        return "min"
    candidates = [(log_name, _declared_direction(metric))
                  for log_name, metric in _built_metrics(model.metrics)]
    candidates += list(_compiled_metrics(model))
    direction = None
    for log_name, declared in candidates:
        if log_name == name and declared is not None:
            direction = declared  # as in Keras: the last match that declares one decides
    return direction
