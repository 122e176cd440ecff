"""Multi-worker training with ``model.fit``: chief helpers and a narrow fix for two Keras bugs.

Stock Keras 3 (checked up to 3.15) cannot run ``model.fit`` under
``tf.distribute.MultiWorkerMirroredStrategy`` with more than one worker:

1. ``TensorFlowTrainer._maybe_symbolic_build`` builds the model from the first distributed
   batch by reducing that batch eagerly across the workers (a collective mean of the *inputs*),
   which fails (or hangs) in multi-worker mode. Only the batch's shapes and dtypes are needed,
   so the fix takes the first *local* replica's part of the batch instead.
2. ``reduce_per_replica`` reduces the per-replica logs (scalar losses and metrics) with
   ``strategy.reduce("MEAN", value, axis=0)``; ``axis=0`` is not valid for a scalar. The fix
   reduces with ``axis=None`` (the mean across replicas, which is what the single-worker branch
   of the same function computes).

``import ft_keras`` installs both fixes when the installed Keras is in the affected range
(:data:`AFFECTED_KERAS_VERSIONS`) and has the two functions with the expected names. Each fixed
function behaves exactly like the original unless the strategy is a multi-worker
``MultiWorkerMirroredStrategy`` (the condition Keras itself uses for its multi-worker branch),
so single-device and ``MirroredStrategy`` training are untouched. To turn the fixes off, set
the environment variable ``FT_KERAS_MULTIWORKER_FIX=0`` before importing ft_keras, or call
:func:`remove_multiworker_fix`.

Results are written once: :func:`is_chief` tells the worker that writes tickets, exports and
TensorBoard files (``FreeTickets`` and ``DynamicSparsity(log_dir=...)`` already use it), and
:func:`worker_log_dir` gives a throw-away folder to the other workers for callbacks such as
``keras.callbacks.TensorBoard`` that write on every worker.

Example (run the same script on every host, each with its own ``TF_CONFIG``)::

    import ft_keras as ftk
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = ftk.sparsify(build_model(), sparsity=0.9)
        model.compile(...)                    # steps_per_execution must stay 1 here
    model.fit(dataset, epochs=..., callbacks=[
        ftk.DynamicSparsity(update_every=100),
        keras.callbacks.TensorBoard(ftk.distribute.worker_log_dir("logs", strategy)),
    ])
"""

import os
import tempfile

from absl import logging
import keras
import tensorflow as tf

#: Keras versions ``[low, high)`` whose ``model.fit`` has the multi-worker bugs fixed here.
AFFECTED_KERAS_VERSIONS = ((3, 0), (3, 16))
#: Set to ``0`` (or ``false`` / ``no`` / ``off``) to keep stock Keras under multi-worker strategies.
ENV_VAR = "FT_KERAS_MULTIWORKER_FIX"

_state = {"originals": None, "logged": False}


def _keras_version(text=None):
    text = keras.version() if text is None else text
    parts = []
    for piece in str(text).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 2:
        parts.append(0)
    return tuple(parts)


def _env_allows():
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    return value not in ("0", "false", "no", "off")


def is_multi_worker(strategy):
    """True for a ``MultiWorkerMirroredStrategy`` that really spans several workers."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    in_multi_worker_mode = getattr(strategy.extended, "_in_multi_worker_mode", None)
    return bool(in_multi_worker_mode()) if callable(in_multi_worker_mode) else False


def is_chief(strategy=None):
    """True on the one worker that should write results (any single-worker setup is its chief).

    Args:
        strategy: a ``tf.distribute.Strategy``; ``None`` means the current one.
    """
    strategy = tf.distribute.get_strategy() if strategy is None else strategy
    if not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(
            f"strategy must be a tf.distribute.Strategy or None; got {type(strategy).__name__}"
        )
    return bool(getattr(strategy.extended, "should_checkpoint", True))


def worker_log_dir(log_dir, strategy=None):
    """``log_dir`` on the chief; a fresh temporary folder on every other worker.

    For callbacks that write on every worker (``keras.callbacks.TensorBoard``,
    ``keras.callbacks.CSVLogger``): pass them this instead of ``log_dir`` so that only the chief
    writes where users look.
    """
    if not isinstance(log_dir, (str, os.PathLike)) or not os.fspath(log_dir):
        raise ValueError(f"log_dir must be a non-empty path; got {log_dir!r}")
    if is_chief(strategy):
        return os.fspath(log_dir)
    return tempfile.mkdtemp(prefix="ftk_worker_")


def check_steps_per_execution(model):
    """Raises ``ValueError`` where stock Keras cannot run ``steps_per_execution > 1``.

    Keras 3 (up to 3.15) fails under any ``tf.distribute`` strategy on CPU devices (one-process
    ``MirroredStrategy`` over logical CPUs, or multi-worker) with ``steps_per_execution > 1``,
    deep inside the train loop ("You must feed a value for placeholder tensor ... while/cond").
    On accelerators it is only warned about (not measured on these machines).
    """
    spe = int(getattr(model, "steps_per_execution", 1) or 1)
    strategy = model.distribute_strategy
    if spe <= 1 or _is_default(strategy):
        return
    devices = list(getattr(strategy.extended, "worker_devices", ()) or ())
    on_cpu = all(tf.DeviceSpec.from_string(d).device_type == "CPU" for d in devices)
    message = (
        f"steps_per_execution={spe} under {type(strategy).__name__}: Keras "
        f"{keras.version()} cannot run steps_per_execution > 1 under a tf.distribute strategy "
        "on CPU devices (it fails inside its train loop). Compile with steps_per_execution=1 "
        "when training under a strategy; it works on one device."
    )
    if on_cpu:
        raise ValueError(message)
    logging.warning("%s (Devices %s are not all CPUs: trying anyway.)", message, devices)


def _is_default(strategy):
    """True for TF's default (no-op) strategy, which every model without a scope reports."""
    return "Default" in type(strategy).__name__


# ------------------------------------------------------------------------------ the Keras fix
def _trainer_module():
    from keras.src.backend.tensorflow import trainer  # pylint: disable=import-outside-toplevel

    return trainer


def _log_once():
    if not _state["logged"]:
        _state["logged"] = True
        logging.info(
            "ft_keras: multi-worker fix for Keras %s model.fit is active (set %s=0 to disable)",
            keras.version(), ENV_VAR,
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
        _log_once()
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
        _log_once()
        return tf.nest.map_structure(
            lambda v: strategy.reduce("MEAN", v, axis=None), values
        )

    reduce_per_replica.ftk_original = original
    return reduce_per_replica


def multiworker_fix_applies(version=None):
    """True if the Keras ``version`` (default: installed) is one the fix is meant for."""
    low, high = AFFECTED_KERAS_VERSIONS
    return low <= _keras_version(version) < high


def multiworker_fix_installed():
    """True while the fixed functions are in place."""
    return _state["originals"] is not None


def install_multiworker_fix(force=False):
    """Installs the fix (``import ft_keras`` does this); returns True if it is in place.

    Does nothing (returns False) when the Keras version is outside
    :data:`AFFECTED_KERAS_VERSIONS` or lacks the patched functions, or when the environment
    variable ``FT_KERAS_MULTIWORKER_FIX`` is ``0``, unless ``force`` is set (then only the
    presence of the functions is required).
    """
    if _state["originals"] is not None:
        return True
    if not force and (not _env_allows() or not multiworker_fix_applies()):
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
    cls._maybe_symbolic_build = _make_symbolic_build(build)
    trainer.reduce_per_replica = _make_reduce_per_replica(reduce_fn)
    _state["originals"] = (build, reduce_fn)
    return True


def remove_multiworker_fix():
    """Puts Keras's own functions back; returns True if the fix was installed."""
    originals = _state["originals"]
    if originals is None:
        return False
    build, reduce_fn = originals
    trainer = _trainer_module()
    trainer.TensorFlowTrainer._maybe_symbolic_build = build
    trainer.reduce_per_replica = reduce_fn
    _state["originals"] = None
    return True
