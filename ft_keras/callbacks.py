"""Keras callbacks that run dynamic sparse training inside ``model.fit``.

`DynamicSparsity` (DST: SET / RigL / SNFS) and `StaticSparsity` (fixed masks) are the thin glue
between ``model.fit`` and the pure pieces (`ft_keras.topology`, `ft_keras.schedules`).

Where the work happens. At ``on_train_begin`` the callback installs a hook on the optimizer's
``update_step`` (Keras 3 calls it once per variable, inside the compiled train step, with the
gradient already all-reduced across replicas). For every masked kernel the hook

1. masks the gradient (``tf.where(mask, g, 0)``) and runs the optimizer's own update, so weights
   and optimizer state stay exactly zero off-mask for any Keras optimizer;
2. at the steps where ``(optimizer.iterations + 1) % update_every == 0`` (see `ft_keras.schedules`
   for the clock), inside a ``tf.cond``, prunes the ``ceil(p_t * n)`` smallest-magnitude active
   weights and grows as many positions chosen by the *dense* gradient of this step (RigL), by
   stateless random numbers (SET), or by a dense-gradient momentum buffer (SNFS); grown weights
   and the optimizer state of dropped and grown positions are reset to zero.

So the update is exact at its step whatever ``steps_per_execution`` is, costs no extra backward
pass and no extra all-reduce, runs identically on every replica, and follows
``optimizer.iterations`` across ``BackupAndRestore`` resumes. At ``on_train_end`` the hook is
removed. Training a sparsified model *without* one of these callbacks trains its zeros too: use
`StaticSparsity` for fixed-mask fine-tuning.

Example:

>>> sparse = ftk.sparsify(model, sparsity=0.9)
>>> sparse.compile(keras.optimizers.SGD(0.01, momentum=0.9),
...                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
>>> sparse.fit(x, y, epochs=3, callbacks=[ftk.DynamicSparsity(update_every=100)])
"""

import dataclasses
import json
import numbers
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from ft_keras import distribute
from ft_keras import schedules
from ft_keras import sparsify as sparsify_lib
from ft_keras import topology

PRUNE_MODES = ("magnitude",)
GROW_MODES = ("random", "gradient", "momentum")

# Optimizer attributes that hold per-variable lists but are not per-weight state.
_NOT_SLOTS = ("_trainable_variables",)


@dataclasses.dataclass
class _MaskedKernel:
    """What the optimizer hook needs to know about one masked layer."""

    layer: keras.layers.Layer
    index: int  # position among the model's masked layers: keys the RNG
    num_active: int
    size: int
    slots: list  # optimizer per-weight state variables (keras Variables) of this kernel
    grad_m: object = None  # dense-gradient first moment (grow="momentum")
    grad_v: object = None  # dense-gradient second moment (Adam-like optimizers)
    stats: object = None  # tf.Variable [last update step, flipped positions, nnz, drop fraction]

    @property
    def mask(self):
        return self.layer.kernel_mask

    @property
    def kernel(self):
        return self.layer.masked_kernel


def _base_optimizer(optimizer):
    """Unwraps LossScaleOptimizer (and similar wrappers) to the optimizer that updates weights."""
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


def _slot_variables(optimizer, kernel):
    """The optimizer's per-weight state of ``kernel``: every per-variable list's entry for it."""
    index = optimizer._get_variable_index(kernel)  # pylint: disable=protected-access
    count = len(optimizer._trainable_variables)  # pylint: disable=protected-access
    slots = []
    for name, value in sorted(vars(optimizer).items()):
        if name in _NOT_SLOTS or not isinstance(value, (list, tuple)) or len(value) != count:
            continue
        item = value[index]
        if (
            isinstance(item, keras.Variable)
            and item is not kernel
            and tuple(item.shape) == tuple(kernel.shape)
            and all(item is not s for s in slots)
        ):
            slots.append(item)
    return slots


def _momentum_kind(optimizer):
    """("sgd", beta) or ("adam", beta_1, beta_2, epsilon) for SNFS growth, or None."""
    momentum = getattr(optimizer, "momentum", None)
    if isinstance(momentum, numbers.Real) and momentum > 0:
        return ("sgd", float(momentum))
    beta_1 = getattr(optimizer, "beta_1", None)
    if isinstance(beta_1, numbers.Real) and beta_1 > 0:
        beta_2 = getattr(optimizer, "beta_2", None)
        epsilon = getattr(optimizer, "epsilon", None) or 1e-7
        if isinstance(beta_2, numbers.Real) and beta_2 > 0:
            return ("adam", float(beta_1), float(beta_2), float(epsilon))
        return ("sgd_ema", float(beta_1))
    return None


def _check_choice(argument, value, allowed):
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ValueError(f"{argument}={value!r} is not supported; allowed values are {allowed}.")
    return value.lower()


def _check_positive_int(argument, value, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{argument}={value!r} must be a positive integer.")
    return int(value)


def _check_fraction(argument, value, low_open=True):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{argument}={value!r} must be a number in (0, 1].")
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{argument}={value!r} is outside the allowed range {interval}.")
    return float(value)


class _OptimizerHook:
    """Replaces ``update_step`` of one optimizer instance while training runs."""

    def __init__(self, callback, optimizer, kernels, trainable_keys):
        self.callback = callback
        self.optimizer = optimizer
        self.original = optimizer.update_step
        self.by_key = {optimizer._var_key(k.kernel): k for k in kernels}  # pylint: disable=W0212
        self.calls = 0  # Python calls = masked kernels x times the train step was traced
        # Masked kernels the optimizer updates (trainable ones); the last of them in a step
        # emits the step's conditional update of all of them.
        self.expected = len(trainable_keys & set(self.by_key))
        self.pending = {}  # (graph, device) -> [(kernel, variable, mask, gradient)] of this step

    def install(self):
        self.optimizer.update_step = self

    def _apply(self, gradient, variable, learning_rate):
        """The optimizer's update of a masked kernel with its (masked) gradient.

        For stock SGD on float32 kernels this is TensorFlow's fused training kernel
        (``ResourceApplyGradientDescent`` / ``ResourceApplyKerasMomentum``: the same formula as
        Keras's SGD, in one pass over the kernel instead of about five), which pays for the extra
        pass that masks the gradient. Every other optimizer runs its own ``update_step``.
        """
        optimizer = self.optimizer
        if type(optimizer) is not keras.optimizers.SGD or variable.dtype != tf.float32:
            return self.original(gradient, variable, learning_rate)
        lr = tf.cast(learning_rate, tf.float32)
        if optimizer.momentum == 0:
            return tf.raw_ops.ResourceApplyGradientDescent(
                var=variable.handle, alpha=lr, delta=gradient
            )
        slot = optimizer.momentums[optimizer._get_variable_index(variable)]  # pylint: disable=W0212
        return tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle,
            accum=slot.value.handle,
            lr=lr,
            grad=gradient,
            momentum=tf.cast(optimizer.momentum, tf.float32),
            use_nesterov=bool(optimizer.nesterov),
        )

    def uninstall(self):
        if self.optimizer.__dict__.get("update_step") is self:
            del self.optimizer.__dict__["update_step"]

    def __call__(self, gradient, variable, learning_rate):
        kernel = self.by_key.get(self.optimizer._var_key(variable))  # pylint: disable=W0212
        if kernel is None:
            return self.original(gradient, variable, learning_rate)
        self.calls += 1
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        mask = tf.convert_to_tensor(kernel.mask.value)
        callback = self.callback
        if callback.grow == "momentum":
            callback._accumulate_momentum(kernel, gradient)  # pylint: disable=protected-access
        self._apply(topology.zero_off_mask(mask, gradient), variable, learning_rate)
        if callback._never_updates:  # pylint: disable=protected-access
            return None
        # One conditional per step (and replica) for all masked layers, emitted with the last
        # one: per-layer conditionals cost a function call each at every step.
        key = (id(tf.compat.v1.get_default_graph()), variable.device)
        pending = self.pending.setdefault(key, [])
        pending.append((kernel, variable, mask, gradient))
        if len(pending) < self.expected:
            return None
        items = self.pending.pop(key)
        step = tf.cast(self.optimizer.iterations, tf.int64) + 1

        def update():
            fraction = callback._drop_fraction_at(step)  # pylint: disable=protected-access
            for kernel_, variable_, mask_, gradient_ in items:
                callback._update_layer(  # pylint: disable=protected-access
                    kernel_, variable_, mask_, gradient_, step, fraction)
            return tf.constant(True)

        # Only the predicate runs at ordinary steps; the schedule and the update run inside.
        tf.cond(callback._is_update_step(step), update, lambda: tf.constant(False))  # pylint: disable=W0212
        return None


class DynamicSparsity(keras.callbacks.Callback):
    """Dynamic sparse training (SET / RigL / SNFS) of a sparsified model inside ``model.fit``.

    Every ``update_every`` optimizer steps, in every masked layer: prune the ``ceil(p_t * n)``
    active weights of smallest magnitude and grow as many new ones (SPEC.md section 3). Grown
    weights start at 0; optimizer state at dropped and grown positions is reset; each layer keeps
    its active count.

    Args:
        update_every: optimizer steps between mask updates (dT). RigL uses 100; FreeTickets 1000 at
            batch 128 on CIFAR.
        drop_fraction: initial drop fraction p_0 in (0, 1] (RigL 0.3, FreeTickets 0.5).
        decay: "cosine" (p_t anneals from p_0 to ``final_drop_fraction`` at ``end_step``) or
            "constant".
        end_step: last step (exclusive) with mask updates. None: the end of this ``fit``
            (``epochs * steps_per_epoch``), as FreeTickets does.
        prune: "magnitude".
        grow: "gradient" (RigL, dense gradient of the update step), "random" (SET) or
            "momentum" (SNFS: a moving average of the dense gradient with the optimizer's
            momentum; Adam-like optimizers use m / (sqrt(v) + eps)).
        seed: int; random growth uses a stateless RNG keyed by (seed, step, layer index).
        log_dir: if given, TensorBoard scalars (per-layer density, mask churn, drop fraction)
            are written to ``log_dir/sparsity``.
        final_drop_fraction: the cosine's floor (FreeTickets: 0.005).
        start_step: no update at or before this step.
        verbose: log a line per mask update seen (absl logging).

    The masks of the model are updated in place; `updates` lists what the callback observed
    (step, drop fraction, per-layer churn and density).
    """

    def __init__(
        self,
        update_every=100,
        drop_fraction=0.3,
        decay="cosine",
        end_step=None,
        prune="magnitude",
        grow="gradient",
        seed=0,
        log_dir=None,
        final_drop_fraction=0.0,
        start_step=0,
        verbose=0,
    ):
        super().__init__()
        self.update_every = _check_positive_int("update_every", update_every)
        self.drop_fraction = _check_fraction("drop_fraction", drop_fraction)
        self.decay = schedules.check_decay(decay)
        self.end_step = _check_positive_int("end_step", end_step, allow_none=True)
        self.prune = _check_choice("prune", prune, PRUNE_MODES)
        self.grow = _check_choice("grow", grow, GROW_MODES)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ValueError(f"seed={seed!r} must be an int.")
        self.seed = int(seed)
        self.log_dir = log_dir
        self.final_drop_fraction = _check_fraction(
            "final_drop_fraction", final_drop_fraction, low_open=False
        )
        if self.final_drop_fraction > self.drop_fraction:
            raise ValueError(
                f"final_drop_fraction={final_drop_fraction!r} must not exceed "
                f"drop_fraction={drop_fraction!r}."
            )
        if isinstance(start_step, bool) or not isinstance(start_step, numbers.Integral) or (
            start_step < 0
        ):
            raise ValueError(f"start_step={start_step!r} must be an integer >= 0.")
        self.start_step = int(start_step)
        self.verbose = verbose
        self.updates = []
        self._never_updates = False
        self._kernels = []
        self._hook = None
        self._optimizer = None
        self._momentum = None
        self._resolved_end_step = None
        self._writer = None
        self._last_seen_step = 0
        self._static_shapes = True

    # ------------------------------------------------------------------ set-up
    def set_model(self, model):
        super().set_model(model)
        layers = sparsify_lib.masked_layers_of(model)
        if not layers:
            raise ValueError(
                f"{type(self).__name__} was given model={model.name!r}, which has no masked layer. "
                "Sparsify the model first: ft_keras.sparsify(model, sparsity=...)."
            )
        if getattr(model, "optimizer", None) is None:
            return  # e.g. predict() on an uncompiled model; checked again at on_train_begin.
        optimizer = _base_optimizer(model.optimizer)
        self._momentum = None
        if self.grow == "momentum" and not self._never_updates:
            self._momentum = _momentum_kind(optimizer)
            if self._momentum is None:
                raise ValueError(
                    f"grow='momentum' needs an optimizer with momentum (SGD with momentum > 0, "
                    f"Adam-like with beta_1 > 0); {type(optimizer).__name__} has none. Use "
                    "grow='gradient' or 'random', or give the optimizer momentum."
                )
        strategy = model.distribute_strategy
        with strategy.scope():
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            self._kernels = []
            for index, layer in enumerate(layers):
                kernel = _MaskedKernel(
                    layer=layer,
                    index=index,
                    num_active=layer.num_active,
                    size=layer.kernel_size_total,
                    slots=_slot_variables(optimizer, layer.masked_kernel),
                )
                kernel.stats = tf.Variable(
                    tf.zeros([4], tf.float32), trainable=False, name=f"ftk_stats_{index}"
                )
                if self._momentum is not None:
                    kernel.grad_m = self._buffer(optimizer, layer, "ftk_grad_m")
                    if self._momentum[0] == "adam":
                        kernel.grad_v = self._buffer(optimizer, layer, "ftk_grad_v")
                self._kernels.append(kernel)
        self._optimizer = optimizer

    @staticmethod
    def _buffer(optimizer, layer, name):
        """A dense-gradient buffer, kept with the optimizer's variables (so it is checkpointed)."""
        cache = optimizer.__dict__.setdefault("_ftk_buffers", {})
        key = (layer.masked_kernel.path, name)
        if key not in cache:
            cache[key] = optimizer.add_variable_from_reference(layer.masked_kernel, name=name)
        return cache[key]

    def _resolve_end_step(self, epoch):
        """The end step of this fit: explicit, or the step where the fit's last epoch ends.

        Called at the first ``on_epoch_begin``, after every callback's ``on_train_begin`` (so
        after ``BackupAndRestore`` restored ``iterations`` and the initial epoch) and before the
        train step is traced (the value is baked into the graph).
        """
        if self.end_step is not None:
            return self.end_step
        epochs = (self.params or {}).get("epochs")
        steps = (self.params or {}).get("steps")
        if epochs and steps:
            start = int(self._optimizer.iterations.numpy())
            return start + (int(epochs) - int(epoch)) * int(steps)
        if self.decay == "cosine" and not self._never_updates:
            raise ValueError(
                "end_step=None: the cosine decay needs the number of training steps, but fit() "
                "does not know it (a dataset of unknown length without steps_per_epoch). Pass "
                "end_step=..., steps_per_epoch=... to fit(), or decay='constant'."
            )
        return None

    def on_train_begin(self, logs=None):
        model = self.model
        if getattr(model, "optimizer", None) is None:
            raise ValueError("The model must be compiled (with an optimizer) before fit().")
        if self._optimizer is not _base_optimizer(model.optimizer) or not self._kernels:
            self.set_model(model)
        distribute.check_steps_per_execution(model)
        self._resolved_end_step = None
        self._sanitize()
        # Under XLA the update needs static shapes; otherwise it works on compacted positions.
        self._static_shapes = bool(getattr(model, "jit_compile", False))
        trainable = {self._optimizer._var_key(v) for v in model.trainable_variables}  # pylint: disable=W0212
        self._hook = _OptimizerHook(self, self._optimizer, self._kernels, trainable)
        self._hook.install()
        # fit() made its train function before calling us; make one that sees the hook.
        model.make_train_function(force=True)
        self._last_seen_step = int(self._optimizer.iterations.numpy())
        if self.log_dir and self._writer is None and _is_chief(model):
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "sparsity"))

    def on_epoch_begin(self, epoch, logs=None):
        if self._resolved_end_step is not None or self._hook is None:
            return
        self._resolved_end_step = self._resolve_end_step(epoch)
        if self._resolved_end_step is None:
            self._resolved_end_step = -1  # no end (constant decay, unknown length)
        if self._never_updates:
            logging.info("%s: %d masked layers, masks fixed", type(self).__name__,
                         len(self._kernels))
            return
        logging.info(
            "%s: %d masked layers, update_every=%d, drop_fraction=%.3g (%s), grow=%s, "
            "end_step=%s",
            type(self).__name__,
            len(self._kernels),
            self.update_every,
            self.drop_fraction,
            self.decay,
            self.grow,
            self._end_step_or_none(),
        )

    def _end_step_or_none(self):
        end = self._resolved_end_step
        return None if end is None or end < 0 else end

    def on_train_end(self, logs=None):
        self._collect()
        if self._hook is not None:
            self._hook.uninstall()
            self._hook = None
            self.model.train_function = None
        if self._writer is not None:
            self._writer.flush()

    def on_train_batch_end(self, batch, logs=None):
        if self._writer is not None:
            self._collect()

    def on_epoch_end(self, epoch, logs=None):
        self._collect()

    @property
    def trace_count(self):
        """How many times the current fit's train step was traced with the hook (0 outside fit).

        Python runs the hook only while TensorFlow traces the train step, so this counts traces;
        it stays at 1 for a whole fit unless something forces a retrace.
        """
        if self._hook is None or not self._kernels:
            return 0
        return self._hook.calls // len(self._kernels)

    def _sanitize(self):
        """Re-establishes the invariants before training: zeros off-mask in kernels and slots.

        Only variables that hold a nonzero off-mask (e.g. weights set by user code) are
        rewritten: checking takes bool temporaries, rewriting a full-size copy of each.
        """
        for kernel in self._kernels:
            mask = tf.convert_to_tensor(kernel.mask.value)
            for variable in [kernel.kernel] + kernel.slots:
                value = tf.convert_to_tensor(variable.value)
                if bool(_nonzero_off_mask(mask, value)):
                    variable.assign(topology.zero_off_mask(mask, value))

    # ------------------------------------------------------------ in the graph
    def _is_update_step(self, step):
        """Whether a mask update happens at ``step`` (a scalar int64 tensor counted from 1)."""
        return schedules.is_update_step(
            step, self.update_every, self._end_step_or_none(), self.start_step
        )

    def _drop_fraction_at(self, step):
        """The drop fraction at ``step``, a float64 scalar tensor (float64: exact ceil(p n))."""
        fraction = schedules.drop_fraction(
            step, self.drop_fraction, self.decay, self._end_step_or_none(),
            self.final_drop_fraction,
        )
        return tf.cast(fraction, tf.float64)

    def _accumulate_momentum(self, kernel, gradient):
        kind = self._momentum
        g = tf.cast(gradient, tf.float32)
        m = kernel.grad_m.value
        if kind[0] == "sgd":
            m.assign(kind[1] * m + g)
        else:
            m.assign(kind[1] * m + (1.0 - kind[1]) * g)
        if kind[0] == "adam":
            v = kernel.grad_v.value
            v.assign(kind[2] * v + (1.0 - kind[2]) * tf.square(g))

    def _grow_scores(self, kernel, gradient, step, signed=False):
        """Growth scores; with ``signed`` the caller ranks by magnitude and the abs is skipped."""
        absolute = (lambda x: x) if signed else tf.abs
        if self.grow == "gradient":
            return absolute(tf.cast(gradient, tf.float32))
        if self.grow == "random":
            seed = topology.rng_seed(self.seed, step, kernel.index)
            return topology.random_scores(tuple(kernel.kernel.shape), seed)
        m = tf.convert_to_tensor(kernel.grad_m.value)
        if self._momentum[0] == "adam":
            v = tf.convert_to_tensor(kernel.grad_v.value)
            return absolute(m) / (tf.sqrt(v) + self._momentum[3])
        return absolute(m)

    def _update_layer(self, kernel, variable, mask, gradient, step, fraction):
        """Prune and grow one layer; reset weights and optimizer state where the mask changed."""
        weights = tf.convert_to_tensor(variable)
        scores = self._grow_scores(kernel, gradient, step, signed=not self._static_shapes)
        if self._static_shapes:  # XLA: whole-kernel passes with static shapes
            new_mask, keep = topology.update_mask(
                mask, weights, scores, fraction, kernel.num_active)
            flipped = topology.changed_positions(mask, new_mask)
        else:  # the selections work on compacted positions (dynamic shapes)
            new_mask, keep, _, grown = topology.update_mask_sparse(
                mask, weights, scores, fraction, kernel.num_active)
            regrown = tf.reduce_sum(tf.cast(tf.gather(tf.reshape(mask, [-1]), grown), tf.int32))
            flipped = 2 * (tf.size(grown, out_type=tf.int32) - regrown)
        # Resets by a dense `where`, not a scatter into the variables: a scatter op switches a TF
        # resource variable to copy-on-read for good, which then costs a copy of the kernel at
        # every read (measured: +1 ms per MLP step).
        variable.assign(topology.zero_off_mask(keep, weights))
        for slot in kernel.slots:
            value = tf.convert_to_tensor(slot.value)
            slot.value.assign(topology.zero_off_mask(keep, value))
        kernel.mask.value.assign(new_mask)
        kernel.stats.assign(
            tf.stack(
                [
                    tf.cast(step, tf.float32),
                    tf.cast(flipped, tf.float32),
                    tf.cast(topology.count_active(new_mask), tf.float32),
                    tf.cast(fraction, tf.float32),
                ]
            )
        )

    # ----------------------------------------------------------------- logging
    def _collect(self):
        """Reads the per-layer statistics of the latest update; logs it once."""
        if not self._kernels:
            return
        stats = np.stack([_read(k.stats) for k in self._kernels])
        step = int(stats[:, 0].max())
        if step <= self._last_seen_step:
            return
        self._last_seen_step = step
        record = {"step": step, "drop_fraction": float(stats[0, 3]), "layers": {}}
        for kernel, row in zip(self._kernels, stats):
            record["layers"][kernel.layer.name] = {
                "density": float(row[2]) / kernel.size,
                "mask_churn": float(row[1]) / (2.0 * kernel.num_active),
            }
        self.updates.append(record)
        if self.verbose:
            logging.info(
                "mask update at step %d: drop fraction %.4f, churn %s",
                step,
                record["drop_fraction"],
                {k: round(v["mask_churn"], 4) for k, v in record["layers"].items()},
            )
        if self._writer is not None:
            with self._writer.as_default(step=step):
                tf.summary.scalar("sparsity/drop_fraction", record["drop_fraction"])
                for name, values in record["layers"].items():
                    tf.summary.scalar(f"sparsity/{name}/density", values["density"])
                    tf.summary.scalar(f"sparsity/{name}/mask_churn", values["mask_churn"])


_SAME_WIDTH_UINT = {2: tf.uint16, 4: tf.uint32, 8: tf.uint64}


@tf.function(autograph=False)
def _nonzero_off_mask(mask, value):
    """Whether any off-mask entry is not exactly +0.0 (bit patterns, so -0.0 counts)."""
    bits = tf.bitcast(value, _SAME_WIDTH_UINT[value.dtype.size])
    return tf.reduce_any(tf.logical_and(tf.logical_not(mask), tf.not_equal(bits, 0)))


def _read(variable):
    """Numpy value of a (possibly mirrored) variable: the first replica's copy."""
    value = variable
    if hasattr(value, "values") and isinstance(getattr(value, "values"), tuple):
        value = value.values[0]
    return np.asarray(value.numpy())


class StaticSparsity(DynamicSparsity):
    """Trains a sparsified model with its masks fixed (no prune-and-grow).

    Keeps the invariants of `DynamicSparsity` (zeros off-mask in weights and optimizer state)
    without ever changing a mask: for static sparse baselines and for fine-tuning a pruned
    network (PF Ensemble).
    """

    def __init__(self, log_dir=None):
        super().__init__(update_every=1, decay="constant", grow="gradient", log_dir=log_dir)
        self._never_updates = True


# ----------------------------------------------------------------------------- tickets: best-of
def _monitor_mode(monitor, mode):
    mode = _check_choice("mode", mode, ("auto", "min", "max"))
    if mode == "auto":
        mode = "min" if "loss" in monitor or "error" in monitor else "max"
    return mode


def _is_chief(model):
    """True on the worker that writes results (every single-worker strategy is its own chief)."""
    return distribute.is_chief(model.distribute_strategy)


class _BestSnapshot:
    """Keeps the best-so-far model state of one selection window (a phase, or a whole fit).

    The state is held in memory and mirrored to ``<ticket_dir>/.progress-<index>.*`` after each
    improvement (written atomically), so that a run resumed with ``BackupAndRestore`` inside the
    window still selects over the whole window.
    """

    def __init__(self, ticket_dir, index, monitor, mode):
        self.ticket_dir = ticket_dir
        self.index = index
        self.monitor = monitor
        self.mode = mode
        self.value = None
        self.weights = None
        self.info = {}

    @property
    def _paths(self):
        base = os.path.join(self.ticket_dir, f".progress-{self.index}")
        return base + ".json", base + ".npz"

    def better(self, value):
        if self.value is None:
            return True
        return value < self.value if self.mode == "min" else value > self.value

    def offer(self, model, value, info, persist):
        """Takes the model's state if ``value`` beats the best so far; returns True if taken."""
        if value is None or not np.isfinite(value) or not self.better(value):
            return False
        self.value = float(value)
        self.weights = [np.array(w) for w in model.get_weights()]
        self.info = dict(info, monitor=self.monitor, monitor_value=self.value)
        if persist:
            self._persist()
        return True

    def _persist(self):
        json_path, npz_path = self._paths
        os.makedirs(self.ticket_dir, exist_ok=True)
        for path, write in (
            (npz_path, lambda f: np.savez(f, *self.weights)),
            (json_path, lambda f: f.write(json.dumps(self.info).encode())),
        ):
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                write(f)
            os.replace(tmp, path)

    def restore(self, num_weights):
        """Loads a persisted best-so-far state, if one exists for this window."""
        json_path, npz_path = self._paths
        if not (os.path.exists(json_path) and os.path.exists(npz_path)):
            return False
        with open(json_path) as f:
            info = json.load(f)
        with np.load(npz_path) as data:
            weights = [data[f"arr_{i}"] for i in range(len(data.files))]
        if len(weights) != num_weights:
            logging.warning("ignoring %s: it holds %d arrays, the model %d", npz_path,
                            len(weights), num_weights)
            return False
        self.info, self.weights, self.value = info, weights, float(info["monitor_value"])
        return True

    def clear(self):
        for path in self._paths:
            if os.path.exists(path):
                os.remove(path)

    def write_ticket(self, model, method, extra, overwrite):
        """Writes the best state as ``ticket_<index>`` (atomically) and forgets the progress."""
        if self.weights is None:
            raise ValueError(
                f"No value of monitor={self.monitor!r} was seen for ticket {self.index}; "
                "nothing to save."
            )
        from ft_keras import tickets  # pylint: disable=import-outside-toplevel

        snapshot = keras.models.clone_model(model)
        snapshot.set_weights(self.weights)
        metadata = dict(self.info, method=method, **extra)
        path = tickets.write_ticket(snapshot, self.ticket_dir, self.index, metadata,
                                    overwrite=overwrite)
        self.clear()
        logging.info("ticket %d written to %s (%s = %.4f)", self.index, path, self.monitor,
                     self.value)
        return path


def _monitored(logs, monitor):
    logs = logs or {}
    if monitor not in logs:
        raise ValueError(
            f"monitor={monitor!r} is not in the epoch logs {sorted(logs)}. Pass validation_data "
            "to fit() (for 'val_*' metrics) or choose a monitor that is logged."
        )
    return float(logs[monitor])


class FreeTickets(DynamicSparsity):
    """EDST Ensemble (SPEC.md section 5): M tickets from one sparse run.

    The fit follows a phase plan (`ft_keras.schedules.edst_plan`): ``exploration_epochs`` of DST
    at a large constant learning rate, then ``num_tickets`` refinement phases of
    ``refine_epochs`` each (learning rate ``refine_lr[0]``, then ``refine_lr[1]`` from the middle of
    the phase). At the first step of refinement phases 2..M a *global exploration* prunes
    ``explore_fraction`` of every layer's active weights by magnitude and grows as many with the
    ``grow`` criterion. Inside refinement phase i the epoch with the best ``monitor`` value becomes
    ``ticket_dir/ticket_<i-1>/`` (SavedModel + ``.keras`` + ``metadata.json``, written atomically).

    The learning rate is set at every epoch from the epoch index (restored by BackupAndRestore), and
    the mask jumps are in-graph at steps derived from ``optimizer.iterations``, so a resumed run
    follows the same plan. The optimizer must have a constant (float) learning rate: FreeTickets
    owns it (``control_learning_rate=False`` leaves it alone).

    Args:
        ticket_dir: folder for the tickets; a non-empty folder is refused unless ``overwrite``.
        num_tickets: M >= 1.
        exploration_epochs: t_ex >= 0.
        refine_epochs: t_re >= 1.
        explore_fraction: q in (0, 1], the global exploration's drop fraction (paper: 0.8).
        monitor: the epoch log to select tickets by (``val_accuracy``; needs validation data).
        mode: "auto" (min for losses, else max), "min" or "max".
        exploration_lr, refine_lr, refine_lr_switch: the learning-rate plan.
        overwrite: replace existing tickets in ``ticket_dir``.
        **dst_kwargs: `DynamicSparsity` arguments (update_every, drop_fraction, decay, grow, ...);
            FreeTickets' defaults are drop_fraction=0.5 annealed (cosine) to 0.005 over the run.
    """

    def __init__(
        self,
        ticket_dir,
        num_tickets=3,
        exploration_epochs=None,
        refine_epochs=None,
        explore_fraction=0.8,
        monitor="val_accuracy",
        mode="auto",
        exploration_lr=0.1,
        refine_lr=(0.01, 0.001),
        refine_lr_switch=0.5,
        control_learning_rate=True,
        overwrite=False,
        **dst_kwargs,
    ):
        dst_kwargs.setdefault("drop_fraction", 0.5)
        dst_kwargs.setdefault("final_drop_fraction", 0.005)
        super().__init__(**dst_kwargs)
        if not isinstance(ticket_dir, (str, os.PathLike)):
            raise TypeError(f"ticket_dir must be a path; got {ticket_dir!r}.")
        if exploration_epochs is None or refine_epochs is None:
            raise ValueError(
                "exploration_epochs and refine_epochs are required (e.g. exploration_epochs=150, "
                f"refine_epochs=100 on CIFAR); got {exploration_epochs!r}, {refine_epochs!r}."
            )
        self.plan = schedules.edst_plan(exploration_epochs, refine_epochs, num_tickets)
        self.ticket_dir = os.fspath(ticket_dir)
        self.num_tickets = num_tickets
        self.exploration_epochs = exploration_epochs
        self.refine_epochs = refine_epochs
        self.explore_fraction = _check_fraction("explore_fraction", explore_fraction)
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(f"monitor={monitor!r} must be the name of an epoch log entry.")
        self.monitor = monitor
        self.mode = _monitor_mode(monitor, mode)
        lrs = tuple(refine_lr) if isinstance(refine_lr, (list, tuple)) else None
        if not lrs or len(lrs) != 2 or not all(
            isinstance(v, numbers.Real) and v > 0 for v in lrs
        ):
            raise ValueError(f"refine_lr={refine_lr!r} must be two positive learning rates.")
        if not isinstance(exploration_lr, numbers.Real) or exploration_lr <= 0:
            raise ValueError(f"exploration_lr={exploration_lr!r} must be a positive number.")
        self.exploration_lr = float(exploration_lr)
        self.refine_lr = lrs
        self.refine_lr_switch = _check_fraction("refine_lr_switch", refine_lr_switch)
        self.control_learning_rate = bool(control_learning_rate)
        self.overwrite = bool(overwrite)
        self.tickets = []  # paths written by this callback, in ticket order
        self._jump_steps = ()
        self._best = None

    @property
    def total_epochs(self):
        return schedules.plan_epochs(self.plan)

    def on_train_begin(self, logs=None):
        epochs = (self.params or {}).get("epochs")
        if epochs is not None and epochs < self.total_epochs:
            raise ValueError(
                f"fit(epochs={epochs}) does not cover the FreeTickets plan: exploration_epochs="
                f"{self.exploration_epochs} + num_tickets={self.num_tickets} x refine_epochs="
                f"{self.refine_epochs} = {self.total_epochs} epochs."
            )
        if self.control_learning_rate:
            optimizer = _base_optimizer(self.model.optimizer)
            if isinstance(optimizer._learning_rate,  # pylint: disable=protected-access
                          keras.optimizers.schedules.LearningRateSchedule):
                raise ValueError(
                    "FreeTickets sets the learning rate itself; compile with a float learning "
                    "rate (or pass control_learning_rate=False)."
                )
        super().on_train_begin(logs)
        self._jump_steps = ()
        self._best = None

    def _steps_per_epoch(self):
        steps = (self.params or {}).get("steps")
        if not steps:
            raise ValueError(
                "FreeTickets needs the number of steps per epoch: use a dataset of known length "
                "or pass steps_per_epoch to fit()."
            )
        return int(steps)

    def _resolve_end_step(self, epoch):
        if self.end_step is not None:
            return self.end_step
        steps = self._steps_per_epoch()
        origin = int(self._optimizer.iterations.numpy()) - epoch * steps
        return origin + self.total_epochs * steps

    def on_epoch_begin(self, epoch, logs=None):
        if self._resolved_end_step is None and self._hook is not None:
            # First epoch of this fit, before the train step is traced: fix the jump steps.
            steps = self._steps_per_epoch()
            origin = int(self._optimizer.iterations.numpy()) - epoch * steps
            self._jump_steps = tuple(
                origin + e * steps + 1 for e in schedules.global_exploration_epochs(self.plan)
            )
            if epoch == 0 and _is_chief(self.model):
                from ft_keras import tickets  # pylint: disable=import-outside-toplevel

                tickets.prepare_ticket_dir(self.ticket_dir, overwrite=self.overwrite)
        super().on_epoch_begin(epoch, logs)
        if epoch >= self.total_epochs:
            self.model.stop_training = True
            return
        if self.control_learning_rate:
            lr = schedules.edst_learning_rate(
                self.plan, epoch, self.exploration_lr, self.refine_lr, self.refine_lr_switch
            )
            self._optimizer.learning_rate = lr
        phase = schedules.phase_at(self.plan, epoch)
        if phase.kind == "refinement" and (self._best is None or
                                           self._best.index != phase.index - 1):
            self._best = _BestSnapshot(self.ticket_dir, phase.index - 1, self.monitor, self.mode)
            if epoch > phase.start_epoch:  # resumed inside the phase
                self._best.restore(len(self.model.get_weights()))
        if epoch in schedules.global_exploration_epochs(self.plan):
            logging.info("epoch %d: global exploration (q = %.2f) at step %d", epoch,
                         self.explore_fraction, self._jump_steps[phase.index - 2])

    def _is_jump(self, step):
        return tf.reduce_any(tf.equal(step, tf.constant(self._jump_steps, tf.int64)))

    def _is_update_step(self, step):
        regular = super()._is_update_step(step)
        return tf.logical_or(regular, self._is_jump(step)) if self._jump_steps else regular

    def _drop_fraction_at(self, step):
        regular = super()._drop_fraction_at(step)
        if not self._jump_steps:
            return regular
        return tf.where(self._is_jump(step), tf.constant(self.explore_fraction, tf.float64),
                        regular)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        phase = schedules.phase_at(self.plan, epoch)
        if phase is None or phase.kind != "refinement":
            return
        value = _monitored(logs, self.monitor)
        chief = _is_chief(self.model)
        step = int(self._optimizer.iterations.numpy())
        self._best.offer(self.model, value, {"phase": phase.index, "epoch": epoch, "step": step},
                         persist=chief)
        if epoch == phase.end_epoch - 1 and chief:
            self.tickets.append(
                self._best.write_ticket(
                    self.model,
                    method="edst",
                    extra={"seed": self.seed, "explore_fraction": self.explore_fraction,
                           "num_tickets": self.num_tickets},
                    overwrite=True,
                )
            )


class TicketCheckpoint(keras.callbacks.Callback):
    """Writes the best epoch of a fit (by ``monitor``) as ``ticket_dir/ticket_<index>/``.

    Used for DST Ensemble members (`train_dst_ensemble`): each independent run contributes its
    best-validation checkpoint as one ticket. Written once, at the end of training (atomically),
    by the chief worker only.
    """

    def __init__(self, ticket_dir, index, monitor="val_accuracy", mode="auto",
                 method="dst_ensemble", metadata=None, overwrite=False):
        super().__init__()
        self.ticket_dir = os.fspath(ticket_dir)
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or index < 0:
            raise ValueError(f"index={index!r} must be an integer >= 0.")
        self.index = int(index)
        self.monitor = monitor
        self.mode = _monitor_mode(monitor, mode)
        self.method = method
        self.metadata = dict(metadata or {})
        self.overwrite = overwrite
        self.path = None
        self._best = None

    def on_train_begin(self, logs=None):
        self._best = _BestSnapshot(self.ticket_dir, self.index, self.monitor, self.mode)

    def on_epoch_begin(self, epoch, logs=None):
        if epoch > 0 and self._best.weights is None:
            self._best.restore(len(self.model.get_weights()))

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        self._best.offer(self.model, _monitored(logs, self.monitor),
                         {"epoch": epoch, "step": step}, persist=_is_chief(self.model))

    def on_train_end(self, logs=None):
        if _is_chief(self.model) and self._best.weights is not None:
            self.path = self._best.write_ticket(self.model, self.method, self.metadata,
                                                overwrite=self.overwrite)

