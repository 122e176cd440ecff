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

Multi-worker users install the fix with :func:`install_multiworker_fix` before the first
``fit`` (the recipes of ``ft_keras.recipes`` install it themselves when their ``strategy`` is
multi-worker); ``import ft_keras`` does not touch Keras. It cannot be installed later or from a
callback: both functions run before Keras calls any callback (the build at the start of ``fit``)
or outside their reach (every step's logs). :func:`install_multiworker_fix` acts only when the
installed Keras is in the affected range (:data:`AFFECTED_KERAS_VERSIONS`) and has the two
functions with the expected names (the code that touches Keras's trainer lives in
``ft_keras/_keras_compat.py``), and not when the environment variable
``FT_KERAS_MULTIWORKER_FIX=0`` is set; :func:`remove_multiworker_fix` puts Keras's functions
back. Each fixed function behaves exactly like the original unless the strategy is a
multi-worker ``MultiWorkerMirroredStrategy`` (the condition Keras itself uses for its
multi-worker branch), so single-device and ``MirroredStrategy`` training are untouched.

Results are written once: :func:`is_chief` tells the worker that writes tickets, exports and
TensorBoard files (``FreeTickets`` and ``DynamicSparsity(log_dir=...)`` already use it), and
:func:`worker_log_dir` gives a throw-away folder to the other workers for callbacks such as
``keras.callbacks.TensorBoard`` that write on every worker.

Example (run the same script on every host, each with its own ``TF_CONFIG``)::

    import ft_keras as ftk
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    ftk.distribute.install_multiworker_fix()  # before the first fit
    with strategy.scope():
        model = ftk.sparsify(build_model(), sparsity=0.9)
        model.compile(...)                    # steps_per_execution must stay 1 here
    model.fit(dataset, epochs=..., callbacks=[
        ftk.DynamicSparsity(update_every=100),
        keras.callbacks.TensorBoard(ftk.distribute.worker_log_dir("logs", strategy)),
    ])
"""

import tempfile

from absl import logging
import keras
import tensorflow as tf

from ft_keras import _checks
from ft_keras import _keras_compat

#: Keras versions ``[low, high)`` whose ``model.fit`` has the multi-worker bugs fixed here.
AFFECTED_KERAS_VERSIONS = _keras_compat.MULTIWORKER_FIX_KERAS
#: Set to ``0`` (or ``false`` / ``no`` / ``off``) to keep stock Keras under multi-worker strategies.
ENV_VAR = _keras_compat.MULTIWORKER_FIX_ENV

is_multi_worker = _keras_compat.is_multi_worker
multiworker_fix_applies = _keras_compat.multiworker_fix_applies
multiworker_fix_installed = _keras_compat.multiworker_fix_installed
install_multiworker_fix = _keras_compat.install_multiworker_fix
remove_multiworker_fix = _keras_compat.remove_multiworker_fix


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
    log_dir = _checks.check_path("log_dir", log_dir)
    if is_chief(strategy):
        return log_dir
    return tempfile.mkdtemp(prefix="ftk_worker_")


def check_steps_per_execution(model):
    """Raises ``ValueError`` where stock Keras cannot run ``steps_per_execution > 1``.

    Keras 3 (up to 3.15) fails under any ``tf.distribute`` strategy on CPU devices (one-process
    ``MirroredStrategy`` over logical CPUs, or multi-worker) with ``steps_per_execution > 1``,
    deep inside the train loop ("You must feed a value for placeholder tensor ... while/cond").
    On accelerators it is only warned about (not measured on these machines).
    """
    _checks.check_model("model", model, built=False)
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
