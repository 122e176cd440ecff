"""Sparse training inside ``model.fit``: one base for fixed masks and for changing ones.

`SparseTraining` is the shared base; `StaticSparsity` keeps the masks fixed and
`DynamicSparsity` runs dynamic sparse training (SET / RigL / SNFS); `ft_keras.FreeTickets`
(``ft_keras/free_tickets.py``) extends `DynamicSparsity` with EDST's phase plan. The method is
described in docs/method.md.

Where the work happens. At ``on_train_begin`` the callback installs a hook on the optimizer's
``update_step`` (Keras 3 calls it once per variable, inside the compiled train step, with the
gradient already all-reduced across replicas; see ``ft_keras/_keras_compat.py``). Once it has
the gradients of all masked kernels of a step, the hook

1. decides, with one ``tf.cond`` on the step (`ft_keras.schedules`; the clock is
   ``optimizer.iterations``), whether a mask update is due, and if so prunes the
   ``ceil(p_t * n)`` smallest-magnitude active weights of every masked layer (the weights the
   step starts from) and grows as many positions chosen by the *dense* gradient of this step
   (RigL), by stateless random numbers (SET) or by a dense-gradient momentum buffer (SNFS);
2. runs the optimizer's own update of each masked kernel, confined to its mask (at an update
   step: to the kept positions, so dropped and grown weights are zero after the step), in one
   of two documented ways (``optimizer_state``):

   * ``"masked"``: the gradient is masked (``tf.where(mask, g, 0)``) before the update, so the
     weights *and* the optimizer's per-weight state (momentum, Adam moments, ...) stay exactly
     zero off-mask, and the state of dropped and grown positions is reset to zero at every mask
     update (RigL's behaviour);
   * ``"dense"``: the update sees the dense gradient, so the optimizer state is dense and never
     reset (a regrown weight starts moving at once with the momentum its position gathered),
     and the weights are masked right after the update (the official FreeTickets code's
     behaviour).

With ``channel_sparsity`` > 0 (`DynamicSparsity`) the same conditional first removes whole
output channels and confines every touched layer's mask to its surviving channels
(docs/method.md, section 11); with 0 none of that code is traced.

Without XLA the conditional writes masks, weights and state itself (ordinary steps pay for the
predicate only). Under XLA, a variable written anywhere in a compiled step is copied at every
step, so on one replica the conditional moves outside XLA (ordinary steps compiled with the
masks fixed, update steps uncompiled); on several replicas it stays inside and returns the new
masks only, the resets being elementwise ops that XLA fuses with the optimizer's update. See
docs/method.md, section 3.

Code: this module holds the callbacks; ``ft_keras/_optimizer_hook.py`` the hook, the state it
owns and the XLA split step; ``ft_keras/_graph_updates.py`` the in-graph mask and channel
updates.

So the update is exact at its step whatever ``steps_per_execution`` is, costs no extra backward
pass and no extra all-reduce, runs identically on every replica, and follows
``optimizer.iterations`` across ``BackupAndRestore`` resumes. The schedule's numbers (update
period, end step, drop fractions, seed, EDST's global explorations) are read from variables,
so a second ``fit`` with a sparsity callback of the same kind reuses the traced train function
instead of tracing a new one. At ``on_train_end`` the hook is removed and the model's next
plain ``fit`` gets Keras's own train function. Training a sparsified model *without* one of
these callbacks trains its zeros too: use `StaticSparsity` for fixed-mask fine-tuning.

Non-finite values stop training with ``FloatingPointError`` naming the step, before anything
is written from them: a non-finite loss (checked after every execution of the train
function), non-finite weights seen by a mask update (counted in-graph, read with the update's
statistics: after every batch with ``log_dir``, else at the epoch end) and non-finite weights
at the end of every epoch. (Weights can turn NaN while the loss stays finite: a NaN input
poisons a kernel row, and ReLU maps the NaN activations it causes to 0.) No per-step pass over
the weights is added.

Example:

>>> sparse = ftk.sparsify(model, sparsity=0.9)
>>> sparse.compile(keras.optimizers.SGD(0.01, momentum=0.9),
...                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
>>> sparse.fit(x, y, epochs=3, callbacks=[ftk.DynamicSparsity(update_every=100)])
"""

import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from ft_keras import _checks
from ft_keras import _keras_compat
from ft_keras import _optimizer_hook as optimizer_hook
from ft_keras import channels as channels_lib
from ft_keras import distribute
from ft_keras import masks
from ft_keras import schedules
from ft_keras import sparsify as sparsify_lib

#: How the optimizer's per-weight state relates to the mask (see the module docstring).
OPTIMIZER_STATES = ("masked", "dense")
#: Declare the per-weight state of an optimizer class ft_keras does not know.
register_optimizer_slots = _keras_compat.register_optimizer_slots


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


def _is_chief(model):
    """True on the worker that writes results (every single-worker strategy is its own chief)."""
    return distribute.is_chief(model.distribute_strategy)


class SparseTraining(keras.callbacks.Callback):
    """The base of ft_keras's sparsity callbacks: keeps a sparsified model sparse in ``fit``.

    It installs the optimizer hook (module docstring), re-establishes the invariants before
    training (zeros off-mask in kernels and, with ``optimizer_state="masked"``, in optimizer
    state), reuses the traced train function across fits, stops on non-finite values, and logs
    per-layer statistics of the mask updates (absl logging, TensorBoard with ``log_dir``).
    Subclasses say whether masks change (`updates_masks`) and write the schedule
    (`_write_schedule`); use `StaticSparsity` or `DynamicSparsity`.

    Args:
        optimizer_state: "masked" (optimizer state zero off-mask, reset at dropped and grown
            positions) or "dense" (state fed by the dense gradient, never reset; weights
            masked after each update). See the module docstring.
        log_dir: if given, TensorBoard scalars are written to ``log_dir/sparsity`` (chief only).
        verbose: log a line per mask update seen (absl logging).
    """

    #: Whether this callback changes masks (subclasses set it).
    updates_masks = False
    grow = "gradient"
    grown_weight_scale = 0.0

    def __init__(self, optimizer_state="masked", log_dir=None, verbose=0):
        super().__init__()
        self.optimizer_state = _checks.check_choice("optimizer_state", optimizer_state,
                                                    OPTIMIZER_STATES)
        self.log_dir = _checks.check_path("log_dir", log_dir, allow_none=True)
        self.verbose = int(verbose) if isinstance(verbose, (bool, np.bool_)) else (
            _checks.check_int("verbose", verbose, minimum=0))
        self.updates = []
        self._engine = None
        self._hook = None
        self._momentum = None
        self._writer = None
        self._last_seen_step = 0
        self._static_shapes = False
        self._split = False
        self._split_step = None  # the split step made by the last fit under XLA (tests)
        self._configured = False
        self._optimizer = None

    # ------------------------------------------------------------------------ set-up
    def set_model(self, model):
        super().set_model(model)
        if not sparsify_lib.masked_layers_of(model):
            raise ValueError(
                f"{type(self).__name__} was given model={model.name!r}, which has no masked "
                "layer: either it was not sparsified (ft_keras.sparsify(model, sparsity=...)), "
                "or it was sparsified at sparsity 0.0 or with every prunable layer kept dense "
                "(keep_dense, ERK's cap), which masks nothing. Sparsify with sparsity > 0, or "
                "train the dense model without a sparsity callback."
            )
        if getattr(model, "optimizer", None) is not None:
            # Before any callback's on_train_begin: variables added to the optimizer here (the
            # SNFS buffers) exist when BackupAndRestore restores a checkpoint that holds them.
            self._prepare(model)

    def _prepare(self, model):
        """Finds the optimizer and the engine, and creates what this callback's mode needs."""
        optimizer = _keras_compat.base_optimizer(model.optimizer)
        self._momentum = None
        if self.updates_masks and self.grow == "momentum":
            self._momentum = optimizer_hook.momentum_kind(optimizer)
            if self._momentum is None:
                raise ValueError(
                    f"grow='momentum' needs an optimizer with momentum (SGD with momentum > 0, "
                    f"Adam-like with beta_1 > 0); {type(optimizer).__name__} has none. Use "
                    "grow='gradient' or 'random', or give the optimizer momentum."
                )
        self._optimizer = optimizer
        self._engine = optimizer_hook.Engine.of(model, optimizer)
        self._engine.find_slots(self.optimizer_state)
        if self._momentum:
            self._engine.add_momentum_buffers(self._momentum)

    @property
    def _kernels(self):
        return self._engine.kernels if self._engine is not None else []

    def _graph_config(self):
        momentum = ()
        if self.updates_masks and self.grow == "momentum":
            momentum = self._momentum
        return optimizer_hook.GraphConfig(
            self.updates_masks, self.grow, self.optimizer_state, bool(self._static_shapes),
            momentum, self.updates_masks and self.grown_weight_scale > 0, bool(self._split),
            self._channel_config(), self._schedule_signature())

    def _schedule_signature(self):
        """``GraphConfig.schedule``: () with fixed masks."""
        return ()

    def _channel_config(self):
        """``GraphConfig.channels``: () unless channel-level DST runs (`DynamicSparsity`)."""
        return ()

    def on_train_begin(self, logs=None):
        model = self.model
        if getattr(model, "optimizer", None) is None:
            raise ValueError(f"model={model.name!r} is not compiled; compile it with an optimizer "
                             "before fit().")
        distribute.check_steps_per_execution(model)
        optimizer = _keras_compat.base_optimizer(model.optimizer)
        if (self._optimizer is not optimizer or self._engine is None
                or self._engine is not optimizer_hook.Engine.attached_to(optimizer)):
            self._prepare(model)
        else:
            self._engine = optimizer_hook.Engine.of(model, optimizer)  # refreshes the active counts
        self._configured = False
        self._sanitize()
        # Under XLA the update steps run uncompiled where they can (`split_train_step`) and
        # work on compacted positions, as without XLA; where they cannot, the update is
        # compiled with the other steps and needs static shapes.
        jit_compile = bool(getattr(model, "jit_compile", False))
        self._split = jit_compile and self.updates_masks and optimizer_hook.can_split(model)
        self._static_shapes = jit_compile and not self._split
        trainable = {_keras_compat.variable_key(optimizer, v) for v in model.trainable_variables}
        self._hook = self._engine.install_hook(self._graph_config, trainable)
        self._use_train_function(model)
        self._last_seen_step = int(optimizer.iterations.numpy())
        if self.log_dir and self._writer is None and _is_chief(model):
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "sparsity"))

    def _use_train_function(self, model):
        """Reuses a train function traced by an earlier fit for the same configuration."""
        function = self._engine.find_train_function(self._stash_key(self._graph_config(), model))
        if function is not None:
            model.train_function = function
            return
        # fit() made its train function before calling us; make one that sees the hook.
        if self._split:
            self._split_step = optimizer_hook.make_split_train_function(model, self._engine)
        else:
            model.make_train_function(force=True)

    def _stash_key(self, config, model):
        """What a traced train function depends on besides the engine's variables: the graph
        configuration, the layers' active counts (static in the graph) and the compile call."""
        counts = tuple(kernel.num_active for kernel in self._engine.kernels)
        return (config, counts) + _keras_compat.compile_token(model)

    def on_epoch_begin(self, epoch, logs=None):
        if self._configured or self._engine is None:
            return
        # First epoch of this fit: every callback's on_train_begin has run (BackupAndRestore
        # restored `iterations` and the initial epoch), no step has run yet.
        self._configured = True
        self._write_schedule(epoch)
        self._log_configuration()

    def _write_schedule(self, epoch):
        """Writes this fit's schedule into the engine (`Engine.write_schedule`)."""
        del epoch
        self._engine.write_schedule()

    def _log_configuration(self):
        logging.info("%s: %d masked layers, masks fixed (optimizer_state=%s)",
                     type(self).__name__, len(self._kernels), self.optimizer_state)

    def on_train_end(self, logs=None):
        self._collect()
        if self._hook is not None:
            model = self.model
            if self._hook.config is not None and model.train_function is not None:  # traced
                self._engine.stash_train_function(self._stash_key(self._hook.config, model),
                                                  model.train_function)
            self._engine.remove_hook(self._hook)
            self._hook = None
            model.train_function = None
        if self._writer is not None:
            self._writer.flush()

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            step = int(self._optimizer.iterations.numpy())
            raise FloatingPointError(
                f"{type(self).__name__}: the training loss became non-finite ({float(loss)}) at "
                f"or before step {step} (batch {batch} of this epoch). Training stopped: lower "
                "the learning rate, check the inputs for NaN/Inf, or clip gradients."
            )
        if self._writer is not None:
            self._collect()

    def on_epoch_end(self, epoch, logs=None):
        self._check_finite_weights(epoch)
        self._collect()

    def _check_finite_weights(self, epoch):
        for variable in self.model.weights:
            if keras.backend.is_float_dtype(variable.dtype):
                if not bool(tf.reduce_all(tf.math.is_finite(variable.value))):
                    step = int(self._optimizer.iterations.numpy())
                    raise FloatingPointError(
                        f"{type(self).__name__}: weight {variable.path!r} holds NaN or Inf at "
                        f"the end of epoch {epoch} (step {step}). Training stopped before "
                        "anything is written from it: lower the learning rate, check the "
                        "inputs for NaN/Inf, or clip gradients."
                    )

    @property
    def trace_count(self):
        """How many times the current fit traced the train step with the hook (0 outside fit).

        Python runs the hook only while TensorFlow traces the train step, so this counts traces;
        it is 1 for a first fit and 0 for a later fit that reuses the traced function.
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
            variables = [kernel.kernel]
            if self.optimizer_state == "masked":
                variables += kernel.slots
            for variable in variables:
                value = tf.convert_to_tensor(variable.value)
                if bool(_nonzero_off_mask(mask, value)):
                    variable.assign(masks.zero_off_mask(mask, value))

    # ------------------------------------------------------------------------- logging
    def _collect(self):
        """Reads the per-layer statistics of the latest update; logs it once."""
        if not self._kernels:
            return
        stats = np.stack([_read(k.stats) for k in self._kernels])
        step = int(stats[:, 0].max())
        if step <= self._last_seen_step:
            return
        self._last_seen_step = step
        for kernel, row in zip(self._kernels, stats):
            if row[4] > 0:
                raise FloatingPointError(
                    f"{type(self).__name__}: layer {kernel.layer.name} holds {int(row[4])} NaN "
                    f"or Inf weights after the mask update of step {int(row[0])}. Training "
                    "stopped before anything is written from it: lower the learning rate, check "
                    "the inputs for NaN/Inf, or clip gradients."
                )
        record = {"step": step, "drop_fraction": float(stats[0, 3]), "layers": {}}
        for kernel, row in zip(self._kernels, stats):
            record["layers"][kernel.layer.name] = {
                "density": float(row[2]) / kernel.size,
                "mask_churn": float(row[1]) / (2.0 * kernel.num_active),
            }
        if getattr(self, "_channel_groups", ()):
            record["channels"] = {state.group.name: int(np.sum(_read(state.alive) > 0.5))
                                  for state in self._engine.channel_groups}
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


#: `DynamicSparsity`'s schedule arguments and their defaults (``schedule=`` replaces them).
_SCHEDULE_DEFAULTS = {"update_every": 100, "drop_fraction": 0.3, "decay": "cosine",
                      "end_step": None, "start_step": 0, "final_drop_fraction": 0.0}


class StaticSparsity(SparseTraining):
    """Trains a sparsified model with its masks fixed (no prune-and-grow).

    Keeps the invariants of `DynamicSparsity` (zeros off-mask in the weights, and in optimizer
    state with ``optimizer_state="masked"``) without ever changing a mask: for static sparse
    baselines and for fine-tuning a pruned network (PF Ensemble).

    Args:
        log_dir, optimizer_state, verbose: as in `SparseTraining`.
    """

    updates_masks = False

    def __init__(self, log_dir=None, optimizer_state="masked", verbose=0):
        super().__init__(optimizer_state=optimizer_state, log_dir=log_dir, verbose=verbose)


class DynamicSparsity(SparseTraining):
    """Dynamic sparse training (SET / RigL / SNFS) of a sparsified model inside ``model.fit``.

    Every ``update_every`` optimizer steps, in every masked layer: prune the ``ceil(p_t * n)``
    active weights of smallest magnitude and grow as many new ones (docs/method.md). Grown
    weights start at 0; each layer keeps its active count; the optimizer state follows
    ``optimizer_state``.

    Args:
        update_every: optimizer steps between mask updates (dT). RigL uses 100; FreeTickets 1000 at
            batch 128 on CIFAR. ``update_every``, ``drop_fraction``, ``decay``, ``end_step``,
            ``start_step`` and ``final_drop_fraction`` make the drop schedule (`schedule`).
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
        optimizer_state: "masked" (default: optimizer state zero off-mask and reset at dropped
            and grown positions, as RigL) or "dense" (state fed by the dense gradient and never
            reset, weights masked after each update, as the official FreeTickets code).
            "masked" is the default because it keeps every off-mask number exactly zero, which
            the sparse export and RigL assume; the side-by-side comparison of the two
            (bench/diversity.py: ticket diversity and ensemble quality) is in docs/results.md.
        grown_weight_scale: 0 (default): grown weights start at exactly 0 (RigL). s > 0: they
            start at random values drawn from N(0, (s * sqrt(2 / (fan_in + fan_out)))^2), i.e.
            s times the scale of a Glorot-initialised kernel (SET-style; stateless RNG,
            identical on every replica) - a knob for ticket diversity, which departs from the
            zero-start invariant on purpose.
        channel_sparsity: s_f in [0, 1): the fraction of the prunable layers' output units /
            channels (all prunable layers together; `ft_keras.channels`) removed by
            ``channel_end_step``, gradually (cubic ramp) at the regular mask updates, by a
            global threshold on each channel's mean |w|; the active-weight budget regrows in
            the surviving channels (docs/method.md, section 11). 0.0: off (the training
            graph holds no channel code). `ft_keras.compact` then slices the removed channels
            out.
        channel_allocation: how the removed channels are spread over the prunable layers:
            "global" (default: one threshold across all of them, so weak layers lose more)
            or "layerwise" (every layer removes the fraction ``channel_sparsity`` of its own
            channels, by the same cubic ramp, lowest mean |w| first: for models whose cost
            sits in layers a global threshold leaves whole, such as LeNet-5's convolutions).
        channel_end_step: the step by which ``channel_sparsity`` is reached: the last regular
            update at or before it removes the last channels. None: the schedule's end step.
        channel_min_keep: in [0, 1]; ``ceil(channel_min_keep * C)`` (at least 1) channels of
            every prunable layer are never removed.
        schedule: None, or a `ft_keras.schedules.DropSchedule` (`ConstantDrop`, `CosineDrop` or
            a user subclass: see `DropSchedule` for the contract) used instead of the six
            schedule arguments above, which must then keep their defaults. Its ``end_step``
            None means the end of each fit, as for ``end_step``.

    Attributes:
        schedule: the `ft_keras.schedules.DropSchedule`, evaluated inside the train step
            (``end_step`` None: the end of each fit, which the schedule itself does not store).
        update_every, drop_fraction, decay, end_step, start_step, final_drop_fraction: the
            schedule's (read-only; ``decay`` None and ``final_drop_fraction`` 0.0 for a
            schedule that has none).
        updates: what the callback observed of each mask update (step, drop fraction,
            per-layer churn and density; with ``channel_sparsity`` the surviving channels of
            each prunable layer under ``"channels"``).
    """

    updates_masks = True
    update_every = property(lambda self: self.schedule.update_every)
    drop_fraction = property(lambda self: self.schedule.drop_fraction)
    decay = property(lambda self: self.schedule.decay)
    end_step = property(lambda self: self.schedule.end_step)
    start_step = property(lambda self: self.schedule.start_step)
    final_drop_fraction = property(
        lambda self: float(getattr(self.schedule, "final_drop_fraction", 0.0)))

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
        optimizer_state="masked",
        grown_weight_scale=0.0,
        channel_sparsity=0.0,
        channel_end_step=None,
        channel_min_keep=0.05,
        schedule=None,
        channel_allocation="global",
    ):
        super().__init__(optimizer_state=optimizer_state, log_dir=log_dir, verbose=verbose)
        self.grown_weight_scale = _checks.check_real("grown_weight_scale", grown_weight_scale,
                                                     low=0.0)
        self.channel_sparsity = _checks.check_real("channel_sparsity", channel_sparsity, low=0.0,
                                                   high=1.0, high_open=True)
        self.channel_end_step = _checks.check_positive_int("channel_end_step", channel_end_step,
                                                           allow_none=True)
        self.channel_min_keep = _checks.check_real("channel_min_keep", channel_min_keep,
                                                   low=0.0, high=1.0)
        self.channel_allocation = _checks.check_choice("channel_allocation", channel_allocation,
                                                       channels_lib.ALLOCATIONS)
        self._channel_end_override = None
        self._channel_groups = ()  # the prunable `ft_keras.channels.ChannelGroup`s
        if schedule is None:
            schedule = schedules.make_drop_schedule(
                decay, update_every=update_every, drop_fraction=drop_fraction, end_step=end_step,
                start_step=start_step, final_drop_fraction=final_drop_fraction)
        else:
            if not isinstance(schedule, schedules.DropSchedule):
                raise TypeError(
                    "schedule must be None or an ft_keras.schedules.DropSchedule (ConstantDrop, "
                    f"CosineDrop or a subclass); got {schedule!r} ({type(schedule).__name__}).")
            given = dict(update_every=update_every, drop_fraction=drop_fraction, decay=decay,
                         end_step=end_step, start_step=start_step,
                         final_drop_fraction=final_drop_fraction)
            for name, default in _SCHEDULE_DEFAULTS.items():
                if given[name] != default:
                    raise ValueError(
                        f"{name}={given[name]!r} together with schedule={schedule!r}: the "
                        f"schedule sets it. Pass it to the schedule, or leave {name} at its "
                        f"default ({default!r}).")
        self.schedule = schedule
        self.prune = _checks.check_choice("prune", prune, masks.PRUNE_MODES)
        self.grow = _checks.check_choice("grow", grow, masks.GROW_MODES)
        self.seed = _checks.check_seed("seed", seed)
        self._global_explorations = None  # (first_step, period, count, fraction)
        self._end_step_override = None
        self._resolved_end_step = None

    def set_global_explorations(self, first_step, period, count, fraction):
        """Adds large mask updates ("global explorations") to the schedule of the next fit.

        At steps ``first_step + i * period`` for ``i`` in ``[0, count)`` the masks are updated
        with drop fraction ``fraction`` instead of the regular one (EDST's jump between
        refinement phases; `ft_keras.FreeTickets` uses this). Call it before the fit's first
        epoch begins (e.g. from a callback's ``on_epoch_begin`` placed before this one, or from
        a subclass's ``on_epoch_begin`` before calling the base's); ``count=0`` removes them.
        """
        first_step = _checks.check_int("first_step", first_step, minimum=1)
        period = _checks.check_positive_int("period", period)
        count = _checks.check_int("count", count, minimum=0)
        fraction = _checks.check_fraction("fraction", fraction)
        self._global_explorations = (first_step, period, count, fraction)

    def set_end_step(self, end_step):
        """Fixes the end step of the next fit's schedule (instead of the end of that fit).

        For callbacks that know the length of their plan (`ft_keras.FreeTickets`); call it
        before the fit's first epoch begins. An explicit ``end_step`` argument wins.
        """
        self._end_step_override = _checks.check_positive_int("end_step", end_step)

    def set_channel_end_step(self, channel_end_step):
        """Fixes ``channel_end_step`` of the next fit (an explicit argument wins); for callbacks
        that know their plan (`ft_keras.FreeTickets`: the end of the exploration phase)."""
        self._channel_end_override = _checks.check_positive_int("channel_end_step",
                                                                channel_end_step)

    # ------------------------------------------------------------ channel-level DST
    def _prepare(self, model):
        super()._prepare(model)
        if self.channel_sparsity == 0:
            return
        groups, reasons = channels_lib.analyse(model)
        masked = {id(kernel.layer) for kernel in self._engine.kernels}
        prunable = []
        for group in groups:
            if (id(group.producer) not in masked
                    and isinstance(group.producer, keras.layers.DepthwiseConv2D)):
                reasons[group.name] = "it is a DepthwiseConv2D that is not masked"
            elif not group.zero_safe:
                reasons[group.name] = "an activation on its path maps 0 to a nonzero value"
            else:
                prunable.append(group)
        if not prunable:
            raise ValueError(
                f"channel_sparsity={self.channel_sparsity} needs a masked layer whose output "
                f"channels can be removed; model={model.name!r} has none: {reasons}. See "
                "ft_keras.channels for the supported topologies, or pass channel_sparsity=0.")
        # The target must be reachable: of all prunable channels together ("global"), of each
        # layer's own ("layerwise").
        sets = ([prunable] if self.channel_allocation == "global"
                else [[group] for group in prunable])
        for groups_ in sets:
            total = sum(group.num_channels for group in groups_)
            target = channels_lib.target_removed(1, 0, 1, self.channel_sparsity, total)
            removable = sum(group.num_channels - channels_lib.protected_count(
                self.channel_min_keep, group.num_channels) for group in groups_)
            if target > removable:
                raise ValueError(
                    f"channel_sparsity={self.channel_sparsity} (channel_allocation="
                    f"{self.channel_allocation!r}) removes {target} of the {total} prunable "
                    f"channels of {[(g.name, g.num_channels) for g in groups_]}, but "
                    f"channel_min_keep={self.channel_min_keep} leaves only {removable} "
                    "removable. Lower channel_sparsity or channel_min_keep.")
        self._channel_groups = tuple(prunable)
        self._engine.add_channel_state(prunable, self.channel_min_keep)
        logging.info("%s: channel-level DST over %s; not prunable: %s", type(self).__name__,
                     [(g.name, g.num_channels) for g in prunable], reasons)

    def _channel_config(self):
        if self.channel_sparsity == 0:
            return ()
        return (self.channel_allocation,) + tuple(
            state.protect for state in self._engine.channel_groups)

    def _last_channel_step(self, end):
        """The last regular update step at or before the channel end step."""
        channel_end = self.channel_end_step or self._channel_end_override or end
        if channel_end is None:
            raise ValueError(
                f"channel_sparsity={self.channel_sparsity} with channel_end_step=None needs the "
                "schedule's end step, which this fit does not know: pass channel_end_step or "
                "end_step.")
        last = channel_end - channel_end % self.update_every
        if end is not None:
            while last >= end:
                last -= self.update_every
        if last <= self.start_step:
            raise ValueError(
                f"channel_end_step={channel_end}: the schedule (update_every="
                f"{self.update_every}, start_step={self.start_step}, end_step={end}) has no "
                f"mask update in ({self.start_step}, {channel_end}], so no channel can be "
                "removed. Use a later channel_end_step or a smaller update_every.")
        return last

    def on_train_begin(self, logs=None):
        if (self.channel_sparsity > 0 and getattr(self.model, "jit_compile", False)
                and not optimizer_hook.can_split(self.model)):
            raise ValueError(
                f"channel_sparsity={self.channel_sparsity} is not supported with "
                "jit_compile=True on several replicas (or with run_eagerly): the channel step "
                "runs in the uncompiled update step, which exists on one replica only. Compile "
                "without jit_compile or train on one replica.")
        super().on_train_begin(logs)

    def _resolve_end_step(self, epoch):
        """The end step of this fit: explicit, or the step where the fit's last epoch ends.

        Called at the first ``on_epoch_begin``, after every callback's ``on_train_begin`` (so
        after ``BackupAndRestore`` restored ``iterations`` and the initial epoch).
        """
        if self.end_step is not None:
            return self.end_step
        if self._end_step_override is not None:
            return self._end_step_override
        epochs = (self.params or {}).get("epochs")
        steps = (self.params or {}).get("steps")
        if epochs and steps:
            start = int(self._optimizer.iterations.numpy())
            return start + (int(epochs) - int(epoch)) * int(steps)
        if self.schedule.needs_end_step:
            what = (f"the {self.decay} decay" if self.decay
                    else f"the schedule {type(self.schedule).__name__}")
            raise ValueError(
                f"end_step=None: {what} needs the number of training steps, but fit() does not "
                "know it (a dataset of unknown length without steps_per_epoch). Pass "
                "end_step=..., steps_per_epoch=... to fit(), or decay='constant'."
            )
        return None

    def _schedule_signature(self):
        return self.schedule.graph_signature()

    def _write_schedule(self, epoch):
        end = self._resolve_end_step(epoch)
        self._resolved_end_step = end
        self._engine.write_schedule(self.schedule, end_step=end,
                                    explorations=self._global_explorations or (1, 1, 0, 0.0),
                                    seed=self.seed, grown_scale=self.grown_weight_scale)
        if self.channel_sparsity > 0:
            self._engine.write_channel_schedule(self.start_step, self._last_channel_step(end),
                                                self.channel_sparsity)

    def _log_configuration(self):
        logging.info(
            "%s: %d masked layers, update_every=%d, drop_fraction=%.3g (%s), grow=%s, "
            "end_step=%s, optimizer_state=%s",
            type(self).__name__,
            len(self._kernels),
            self.update_every,
            self.drop_fraction,
            self.decay or type(self.schedule).__name__,
            self.grow,
            self._resolved_end_step,
            self.optimizer_state,
        )
