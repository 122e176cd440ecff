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
import numbers
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

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

    def __init__(self, callback, optimizer, kernels):
        self.callback = callback
        self.optimizer = optimizer
        self.original = optimizer.update_step
        self.by_key = {optimizer._var_key(k.kernel): k for k in kernels}  # pylint: disable=W0212

    def install(self):
        self.optimizer.update_step = self

    def uninstall(self):
        if self.optimizer.__dict__.get("update_step") is self:
            del self.optimizer.__dict__["update_step"]

    def __call__(self, gradient, variable, learning_rate):
        kernel = self.by_key.get(self.optimizer._var_key(variable))  # pylint: disable=W0212
        if kernel is None:
            return self.original(gradient, variable, learning_rate)
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        mask = tf.convert_to_tensor(kernel.mask.value)
        callback = self.callback
        if callback.grow == "momentum":
            callback._accumulate_momentum(kernel, gradient)  # pylint: disable=protected-access
        self.original(topology.zero_off_mask(mask, gradient), variable, learning_rate)
        if callback._never_updates:  # pylint: disable=protected-access
            return None
        step = tf.cast(self.optimizer.iterations, tf.int64) + 1
        do_update, fraction = callback._schedule(step)  # pylint: disable=protected-access

        def update():
            callback._update_layer(kernel, variable, mask, gradient, step, fraction)  # pylint: disable=W0212
            return tf.constant(True)

        tf.cond(do_update, update, lambda: tf.constant(False))
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
        self._resolved_end_step = None
        self._sanitize()
        self._hook = _OptimizerHook(self, self._optimizer, self._kernels)
        self._hook.install()
        # fit() made its train function before calling us; make one that sees the hook.
        model.make_train_function(force=True)
        self._last_seen_step = int(self._optimizer.iterations.numpy())
        if self.log_dir and self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "sparsity"))

    def on_epoch_begin(self, epoch, logs=None):
        if self._resolved_end_step is not None or self._hook is None:
            return
        self._resolved_end_step = self._resolve_end_step(epoch)
        if self._resolved_end_step is None:
            self._resolved_end_step = -1  # no end (constant decay, unknown length)
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

    def _sanitize(self):
        """Re-establishes the invariants before training: zeros off-mask in kernels and slots."""
        for kernel in self._kernels:
            mask = tf.convert_to_tensor(kernel.mask.value)
            for variable in [kernel.kernel] + kernel.slots:
                value = tf.convert_to_tensor(variable.value)
                variable.assign(topology.zero_off_mask(mask, value))

    # ------------------------------------------------------------ in the graph
    def _schedule(self, step):
        """``(do_update, drop_fraction)`` at ``step`` as scalar tensors (step counts from 1)."""
        end_step = self._end_step_or_none()
        do_update = schedules.is_update_step(step, self.update_every, end_step, self.start_step)
        fraction = schedules.drop_fraction(
            step, self.drop_fraction, self.decay, end_step, self.final_drop_fraction
        )
        return do_update, tf.cast(fraction, tf.float64)

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

    def _grow_scores(self, kernel, gradient, step):
        if self.grow == "gradient":
            return tf.abs(tf.cast(gradient, tf.float32))
        if self.grow == "random":
            seed = topology.rng_seed(self.seed, step, kernel.index)
            return topology.random_scores(tuple(kernel.kernel.shape), seed)
        m = tf.convert_to_tensor(kernel.grad_m.value)
        if self._momentum[0] == "adam":
            v = tf.convert_to_tensor(kernel.grad_v.value)
            return tf.abs(m) / (tf.sqrt(v) + self._momentum[3])
        return tf.abs(m)

    def _update_layer(self, kernel, variable, mask, gradient, step, fraction):
        """Prune and grow one layer; reset weights and optimizer state where the mask changed."""
        weights = tf.convert_to_tensor(variable)
        scores = self._grow_scores(kernel, gradient, step)
        new_mask, keep = topology.update_mask(mask, weights, scores, fraction, kernel.num_active)
        variable.assign(topology.zero_off_mask(keep, weights))
        for slot in kernel.slots:
            value = tf.convert_to_tensor(slot.value)
            slot.value.assign(topology.zero_off_mask(keep, value))
        kernel.mask.value.assign(new_mask)
        kernel.stats.assign(
            tf.stack(
                [
                    tf.cast(step, tf.float32),
                    tf.cast(topology.changed_positions(mask, new_mask), tf.float32),
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
