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
(`_channel_step`, docs/method.md, section 11); with 0 none of that code is traced.

Without XLA the conditional writes masks, weights and state itself (ordinary steps pay for the
predicate only). Under XLA, a variable written anywhere in a compiled step is copied at every
step, so on one replica the conditional moves outside XLA (`_split_train_step`: ordinary steps
compiled with the masks fixed, update steps uncompiled); on several replicas it stays inside and
returns the new masks only, the resets being elementwise ops that XLA fuses with the optimizer's
update (`_update_with_writes_outside`). See docs/method.md, section 3.

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

import dataclasses
import numbers
import os

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from ft_keras import _checks
from ft_keras import _keras_compat
from ft_keras import channels as channels_lib
from ft_keras import distribute
from ft_keras import masks
from ft_keras import schedules
from ft_keras import sparsify as sparsify_lib

#: How the optimizer's per-weight state relates to the mask (see the module docstring).
OPTIMIZER_STATES = ("masked", "dense")
#: Declare the per-weight state of an optimizer class ft_keras does not know.
register_optimizer_slots = _keras_compat.register_optimizer_slots

# Layout of the schedule variables the compiled step reads.
_I_EVERY, _I_START, _I_END, _I_JUMP_FIRST, _I_JUMP_PERIOD, _I_JUMP_COUNT, _I_SEED = range(7)
_F_INITIAL, _F_FINAL, _F_COSINE, _F_JUMP, _F_GROWN_SCALE = range(5)
_NUM_INT, _NUM_FLOAT = 7, 5


@dataclasses.dataclass
class _MaskedKernel:
    """What the optimizer hook needs to know about one masked layer."""

    layer: keras.layers.Layer
    index: int  # position among the model's masked layers: keys the RNG
    num_active: int
    size: int
    slots: list  # optimizer per-weight state variables (keras Variables) of this kernel
    stats: object  # tf.Variable [last update step, flipped, nnz, drop fraction, non-finite]
    grad_m: object = None  # dense-gradient first moment (grow="momentum")
    grad_v: object = None  # dense-gradient second moment (Adam-like optimizers)

    @property
    def mask(self):
        return self.layer.kernel_mask

    @property
    def kernel(self):
        return self.layer.masked_kernel


@dataclasses.dataclass(frozen=True)
class _GraphConfig:
    """Everything the traced train step depends on besides variables (the reuse key)."""

    updates: bool  # False: fixed masks (no conditional update in the graph)
    grow: str
    optimizer_state: str
    static_shapes: bool  # XLA: whole-kernel passes with static shapes
    momentum: tuple  # SNFS: ("sgd", beta) / ("adam", b1, b2, eps) / ("sgd_ema", b1) / ()
    random_grown: bool = False  # grown weights drawn at random (grown_weight_scale > 0)
    split: bool = False  # XLA: ordinary steps compiled, update steps not (`_split_train_step`)
    channels: tuple = ()  # channel-level DST: the protected count of each group; () = off


@dataclasses.dataclass
class _Follower:
    """A variable whose slices along ``axis`` follow a channel group's channels (tiled)."""

    variable: object  # keras Variable: a bias, a BN beta / moving mean, a plain consumer kernel
    axis: int
    tile: int
    slots: list  # optimizer per-weight state (trainable followers, "masked" mode)


@dataclasses.dataclass
class _ChannelGroupState:
    """One channel group (`ft_keras.channels.ChannelGroup`) during channel-level DST."""

    group: object
    alive: object  # keras Variable, float32 [C]: 1.0 = the channel survives
    producer: object  # the producer's `_MaskedKernel`
    depthwise: bool
    protect: int  # the channels of this layer that are never removed
    consumers: list  # [(`_MaskedKernel`, tile)]: masked consumers (their mask follows)
    followers: list  # `_Follower`s: zeroed at removal; trainable ones gradient-masked


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


class _Engine:
    """The in-graph state of sparse training for one (model, optimizer) pair.

    Kept on the optimizer object, so that every sparsity callback that trains the model with this
    optimizer reads and writes the same variables: the schedule (int64 and float64 vectors), the
    per-layer statistics of the latest update, and the dense-gradient buffers of SNFS growth.
    """

    def __init__(self, model, optimizer, layers):
        self.optimizer = optimizer
        self.layer_ids = tuple(id(layer) for layer in layers)
        strategy = model.distribute_strategy
        with strategy.scope():
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            self.schedule_int = tf.Variable(tf.zeros([_NUM_INT], tf.int64), trainable=False,
                                            name="ftk_schedule_int")
            self.schedule_float = tf.Variable(tf.zeros([_NUM_FLOAT], tf.float64),
                                              trainable=False, name="ftk_schedule_float")
            self.kernels = [
                _MaskedKernel(
                    layer=layer,
                    index=index,
                    num_active=layer.num_active,
                    size=layer.kernel_size_total,
                    slots=[],
                    stats=tf.Variable(tf.zeros([5], tf.float32), trainable=False,
                                      name=f"ftk_stats_{index}"),
                )
                for index, layer in enumerate(layers)
            ]
        self._strategy = strategy
        self._slots_found = False
        # Set while `_split_train_step` traces one of its two step functions: "plain" (masks
        # fixed at this step) or "update" (the mask update runs, unconditionally).
        self.trace_mode = None

    @classmethod
    def of(cls, model, optimizer):
        """The engine of ``model`` trained by ``optimizer`` (created at first use)."""
        layers = sparsify_lib.masked_layers_of(model)
        engine = optimizer.__dict__.get("_ftk_engine")
        if engine is None or engine.layer_ids != tuple(id(layer) for layer in layers):
            engine = cls(model, optimizer, layers)
            optimizer.__dict__["_ftk_engine"] = engine
        for kernel in engine.kernels:  # masks may have been replaced (set_mask) since
            kernel.num_active = kernel.layer.num_active
        return engine

    def find_slots(self, optimizer_state):
        """Looks up the optimizer's per-weight state of each kernel ("masked" mode needs it)."""
        if self._slots_found or optimizer_state != "masked":
            return
        for kernel in self.kernels:
            kernel.slots = _keras_compat.optimizer_slots(self.optimizer, kernel.kernel)
        self._slots_found = True

    def add_momentum_buffers(self, kind):
        """Dense-gradient moving averages for SNFS, kept with the optimizer's variables."""
        cache = self.optimizer.__dict__.setdefault("_ftk_buffers", {})
        with self._strategy.scope():
            for kernel in self.kernels:
                names = ["ftk_grad_m"] + (["ftk_grad_v"] if kind[0] == "adam" else [])
                buffers = []
                for name in names:
                    key = (kernel.kernel.path, name)
                    if key not in cache:
                        cache[key] = self.optimizer.add_variable_from_reference(
                            kernel.kernel, name=name)
                    buffers.append(cache[key])
                kernel.grad_m = buffers[0]
                kernel.grad_v = buffers[1] if len(buffers) > 1 else None

    def write_schedule(self, ints, floats):
        self.schedule_int.assign(tf.constant(ints, tf.int64))
        self.schedule_float.assign(tf.constant(floats, tf.float64))

    def add_channel_state(self, groups, min_keep):
        """The state of channel-level DST: a survival vector per group, kept with the
        optimizer's variables (so BackupAndRestore saves and restores it), and the schedule."""
        cache = self.optimizer.__dict__.setdefault("_ftk_buffers", {})
        by_layer = {id(kernel.layer): kernel for kernel in self.kernels}
        states = []
        with self._strategy.scope():
            if getattr(self, "channel_schedule_int", None) is None:
                self.channel_schedule_int = tf.Variable(
                    tf.zeros([2], tf.int64), trainable=False, name="ftk_channel_schedule_int")
                self.channel_schedule_float = tf.Variable(
                    tf.zeros([1], tf.float64), trainable=False, name="ftk_channel_schedule_float")
            for group in groups:
                producer = by_layer[id(group.producer)]
                key = (producer.kernel.path, "ftk_channels")
                if key not in cache:
                    cache[key] = self.optimizer.add_variable(
                        (group.num_channels,), initializer="ones", dtype="float32",
                        name="ftk_channels")
                consumers, followers = [], []
                for weight in group.producer.weights:
                    if weight.name == "bias":
                        followers.append(self._follower(weight, -1, 1))
                for norm in group.norms:
                    for weight in norm.weights:
                        if weight.name in ("beta", "moving_mean"):
                            followers.append(self._follower(weight, -1, 1))
                for consumer in group.consumers:
                    if id(consumer.layer) in by_layer:
                        consumers.append((by_layer[id(consumer.layer)], consumer.tile))
                    else:
                        followers.append(self._follower(
                            channels_lib.kernel_of(consumer.layer), -2, consumer.tile))
                states.append(_ChannelGroupState(
                    group=group, alive=cache[key], producer=producer,
                    depthwise=isinstance(group.producer, keras.layers.DepthwiseConv2D),
                    protect=channels_lib.protected_count(min_keep, group.num_channels),
                    consumers=consumers, followers=followers))
        self.channel_groups = states

    def _follower(self, variable, axis, tile):
        slots = []
        if variable.trainable:
            slots = _keras_compat.optimizer_slots(self.optimizer, variable)
        return _Follower(variable, axis, tile, slots)

    def write_channel_schedule(self, start_step, last_step, sparsity):
        self.channel_schedule_int.assign(tf.constant([start_step, last_step], tf.int64))
        self.channel_schedule_float.assign(tf.constant([sparsity], tf.float64))

    # ---------------------------------------------------------------------- in the graph
    def is_update_step(self, step):
        """Whether a mask update happens at ``step`` (int64 scalar tensor counted from 1)."""
        ints = tf.convert_to_tensor(self.schedule_int)
        regular = schedules.is_update_step(step, ints[_I_EVERY], ints[_I_END], ints[_I_START])
        return tf.logical_or(regular, self._is_jump(step, ints))

    @staticmethod
    def _is_jump(step, ints):
        since = step - ints[_I_JUMP_FIRST]
        period = tf.maximum(ints[_I_JUMP_PERIOD], 1)
        return tf.logical_and(
            tf.logical_and(since >= 0, tf.equal(since % period, 0)),
            since // period < ints[_I_JUMP_COUNT],
        )

    def drop_fraction_at(self, step):
        """The drop fraction at ``step``, a float64 scalar tensor (float64: exact ceil(p n))."""
        ints = tf.convert_to_tensor(self.schedule_int)
        floats = tf.convert_to_tensor(self.schedule_float)
        cosine = schedules.drop_fraction(step, floats[_F_INITIAL], "cosine", ints[_I_END],
                                         floats[_F_FINAL])
        use_cosine = tf.logical_and(floats[_F_COSINE] > 0.5, ints[_I_END] > 0)
        regular = tf.where(use_cosine, cosine, floats[_F_INITIAL])
        return tf.where(self._is_jump(step, ints), floats[_F_JUMP], regular)

    def seed(self):
        return tf.convert_to_tensor(self.schedule_int)[_I_SEED]

    def grown_scale(self):
        return tf.cast(tf.convert_to_tensor(self.schedule_float)[_F_GROWN_SCALE], tf.float32)


class _OptimizerHook:
    """Replaces ``update_step`` of one optimizer instance while training runs."""

    def __init__(self, engine, config_fn, trainable_keys):
        self.engine = engine
        self._config_fn = config_fn
        self.config = None  # fixed at the first trace
        optimizer = engine.optimizer
        self.optimizer = optimizer
        self.original = _keras_compat.original_update_step(optimizer)
        self.by_key = {_keras_compat.variable_key(optimizer, k.kernel): k for k in engine.kernels}
        self.calls = 0  # Python calls = masked kernels x times the train step was traced
        # Masked kernels the optimizer updates (trainable ones); the last of them in a step
        # emits the step's conditional update of all of them.
        self.expected = len(trainable_keys & set(self.by_key))
        # Channel-level DST: variables that follow channels (their gradient is masked).
        self.followers = {
            _keras_compat.variable_key(optimizer, follower.variable): (state, follower)
            for state in getattr(engine, "channel_groups", ()) for follower in state.followers
            if follower.variable.trainable}
        self.pending = {}  # (graph, device) -> [(kernel, variable, mask, gradient)] of this step

    def install(self):
        _keras_compat.install_update_step(self.optimizer, self)

    def uninstall(self):
        _keras_compat.remove_update_step(self.optimizer, self)

    def _apply(self, gradient, variable, learning_rate):
        """The optimizer's update of a masked kernel.

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
        slot = optimizer.momentums[_keras_compat.variable_index(optimizer, variable)]
        return tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle,
            accum=slot.value.handle,
            lr=lr,
            grad=gradient,
            momentum=tf.cast(optimizer.momentum, tf.float32),
            use_nesterov=bool(optimizer.nesterov),
        )

    def __call__(self, gradient, variable, learning_rate):
        key = _keras_compat.variable_key(self.optimizer, variable)
        kernel = self.by_key.get(key)
        if kernel is None:
            if self.followers and key in self.followers:
                if self.config is None:
                    self.config = self._config_fn()
                if self.config.channels:
                    return _follower_apply(self.original, *self.followers[key], gradient,
                                           variable, learning_rate)
            return self.original(gradient, variable, learning_rate)
        self.calls += 1
        if self.config is None:
            self.config = self._config_fn()
        config = self.config
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        mask = tf.convert_to_tensor(kernel.mask.value)
        if not config.updates:
            self._masked_apply(config, gradient, variable, learning_rate, mask)
            return None
        if config.grow == "momentum":
            _accumulate_momentum(config.momentum, kernel, gradient)
        if self.engine.trace_mode == "plain":
            self._masked_apply(config, gradient, variable, learning_rate, mask)
            return None
        # The mask update comes first, and it needs every masked layer's gradient: the updates
        # of the masked kernels wait for the last of them (one conditional per step and
        # replica for all layers; per-layer conditionals cost a function call each at every
        # step without XLA).
        key = (id(tf.compat.v1.get_default_graph()), variable.device)
        pending = self.pending.setdefault(key, [])
        pending.append((kernel, variable, mask, gradient, learning_rate))
        if len(pending) < self.expected:
            return None
        items = self.pending.pop(key)
        step = tf.cast(self.optimizer.iterations, tf.int64) + 1
        if self.engine.trace_mode == "update":
            effective = _update_all_layers(config, self.engine, items, step)
        elif config.static_shapes and not config.random_grown:
            effective = _update_with_writes_outside(config, self.engine, items, step)
        else:
            effective = _update_with_writes_inside(config, self.engine, items, step)
        for (_, variable_, _, gradient_, learning_rate_), mask_ in zip(items, effective):
            self._masked_apply(config, gradient_, variable_, learning_rate_, mask_)
        return None

    def _masked_apply(self, config, gradient, variable, learning_rate, mask):
        """The optimizer's update of a kernel that keeps it zero outside ``mask``."""
        if config.optimizer_state == "masked":
            self._apply(masks.zero_off_mask(mask, gradient), variable, learning_rate)
        else:
            self._apply(gradient, variable, learning_rate)
            variable.assign(masks.zero_off_mask(mask, tf.convert_to_tensor(variable)))


def _update_all_layers(config, engine, items, step):
    """The mask update of every masked layer at ``step``; writes the variables itself.

    Returns, per layer, the mask this step's optimizer update keeps the kernel inside: the kept
    positions (dropped and grown positions stay at zero through it; see `_update_layer`).
    """
    fraction = engine.drop_fraction_at(step)
    if config.channels:
        regions = _channel_step(config, engine, step)
        return tuple(
            _update_layer(config, engine, kernel, variable, mask, gradient, step, fraction)
            if kernel.index not in regions else
            _update_layer_in_region(config, engine, kernel, variable, mask, gradient, step,
                                    fraction, regions[kernel.index])
            for kernel, variable, mask, gradient, _ in items
        )
    return tuple(
        _update_layer(config, engine, kernel, variable, mask, gradient, step, fraction)
        for kernel, variable, mask, gradient, _ in items
    )


def _along(alive, shape, axis, tile=1):
    """A bool [C] channel vector broadcastable to ``shape`` along ``axis`` (tiled ``tile``
    times: Flatten's index ``p * C + c``)."""
    if tile > 1:
        alive = tf.tile(alive, [tile])
    rank = len(shape)
    return tf.reshape(alive, [-1] + [1] * (rank - 1 - axis % rank))


def _follower_apply(original, state, follower, gradient, variable, learning_rate):
    """The optimizer's update of a variable that follows channels: dead channels' slices get a
    zero gradient and are zero after the update."""
    if isinstance(gradient, tf.IndexedSlices):
        gradient = tf.convert_to_tensor(gradient)
    live = _along(tf.convert_to_tensor(state.alive.value) > 0.5, tuple(variable.shape),
                  follower.axis, follower.tile)
    original(tf.where(live, gradient, tf.zeros([], gradient.dtype)), variable, learning_rate)
    value = tf.convert_to_tensor(variable)
    variable.assign(tf.where(live, value, tf.zeros([], value.dtype)))


def _channel_step(config, engine, step):
    """Removes the channels due at ``step`` (none after the schedule's last channel step) and
    zeroes what follows them; returns ``{kernel index: allowed region}`` of every masked kernel
    that a group touches (surviving output channels x surviving input rows)."""
    groups = engine.channel_groups
    ints = tf.convert_to_tensor(engine.channel_schedule_int)
    sparsity = tf.convert_to_tensor(engine.channel_schedule_float)[0]
    total = sum(state.group.num_channels for state in groups)
    alive = [tf.convert_to_tensor(state.alive.value) > 0.5 for state in groups]
    scores = [channels_lib.channel_scores(tf.convert_to_tensor(state.producer.kernel),
                                          state.depthwise) for state in groups]
    removed = total - tf.add_n([masks.count_active(live) for live in alive])
    due = tf.where(step <= ints[1],
                   channels_lib.target_removed(step, ints[0], ints[1], sparsity, total) - removed,
                   0)
    alive = channels_lib.remove_channels(scores, alive, [state.protect for state in groups], due)
    regions = {}
    for state, live in zip(groups, alive):
        state.alive.value.assign(tf.cast(live, tf.float32))
        for follower in state.followers:
            where = _along(live, tuple(follower.variable.shape), follower.axis, follower.tile)
            for variable in [follower.variable] + (
                    follower.slots if config.optimizer_state == "masked" else []):
                value = tf.convert_to_tensor(variable.value)
                variable.value.assign(tf.where(where, value, tf.zeros([], value.dtype)))
        shape = tuple(state.producer.kernel.shape)
        out = (tf.reshape(live, shape[-2:]) if state.depthwise else live)
        out = tf.broadcast_to(out, shape)
        index = state.producer.index
        regions[index] = out if index not in regions else tf.logical_and(regions[index], out)
        for kernel, tile in state.consumers:
            shape = tuple(kernel.kernel.shape)
            rows = tf.broadcast_to(_along(live, shape, -2, tile), shape)
            index = kernel.index
            regions[index] = (rows if index not in regions
                              else tf.logical_and(regions[index], rows))
    return regions


def _update_with_writes_inside(config, engine, items, step):
    """The mask update inside a ``tf.cond`` that writes the variables itself (without XLA).

    Only the predicate runs at ordinary steps. Returns `_update_all_layers`'s masks at an
    update step, the current masks otherwise.
    """
    return tf.cond(engine.is_update_step(step),
                   lambda: _update_all_layers(config, engine, items, step),
                   lambda: tuple(mask for _, _, mask, _, _ in items))


def _update_with_writes_outside(config, engine, items, step):
    """The mask update for XLA: the conditional computes masks only, the writes are outside.

    XLA compiles a conditional that writes variables by passing every written buffer through
    both branches, which costs a copy of each kernel and optimizer slot at *every* step. Here
    the conditional returns two bool tensors per layer (the new mask and the kept positions; at
    ordinary steps the current mask twice) and the statistics; the resets are elementwise
    ``where``s before the optimizer's update, which XLA fuses with that update. Ordinary steps
    pay for the bool masks only. Returns the per-layer masks of `_update_with_writes_inside`.
    """
    def compute():
        fraction = engine.drop_fraction_at(step)
        outputs = []
        for kernel, variable, mask, gradient, _ in items:
            weights = tf.convert_to_tensor(variable)
            scores = _grow_scores(config, engine, kernel, gradient, step)
            new_mask, keep = masks.update_mask(mask, weights, scores, fraction,
                                               kernel.num_active)
            outputs += [new_mask, keep, _stats(step, masks.changed_positions(mask, new_mask),
                                               masks.count_active(new_mask), fraction,
                                               _count_nonfinite(weights))]
        return tuple(outputs)

    def keep_all():
        outputs = []
        for kernel, _, mask, _, _ in items:
            outputs += [mask, mask, tf.convert_to_tensor(kernel.stats)]
        return tuple(outputs)

    outputs = tf.cond(engine.is_update_step(step), compute, keep_all)
    effective = []
    for i, (kernel, variable, _, _, _) in enumerate(items):
        new_mask, keep, stats = outputs[3 * i:3 * i + 3]
        variable.assign(masks.zero_off_mask(keep, tf.convert_to_tensor(variable)))
        if config.optimizer_state == "masked":
            for slot in kernel.slots:
                slot.value.assign(masks.zero_off_mask(keep, tf.convert_to_tensor(slot.value)))
        kernel.mask.value.assign(new_mask)
        kernel.stats.assign(stats)
        effective.append(keep)
    return effective


def _split_train_step(model, engine):
    """The train step under XLA: ordinary steps compiled by XLA, update steps not.

    XLA treats a variable written anywhere in a compiled step as written at every step (a
    conditional passes it through both branches), so an update inside the compiled step costs
    a copy of every mask at every step. Here the choice is made outside XLA, by one ``tf.cond``
    on the step in the (uncompiled) train function: it calls either the XLA-compiled step with
    the masks fixed, or an uncompiled step that runs the mask update as it runs without XLA (on
    compacted positions). Ordinary steps pay for the predicate and a function call; update
    steps run without XLA. Same step, same results as the other paths (tested).
    """
    original = model.train_step

    def traced_as(mode):
        def step(data):
            engine.trace_mode = mode
            try:
                return original(data)
            finally:
                engine.trace_mode = None
        return step

    plain = tf.function(traced_as("plain"), jit_compile=True, reduce_retracing=True)
    update = tf.function(traced_as("update"), reduce_retracing=True)

    def train_step(data):
        step = tf.cast(engine.optimizer.iterations, tf.int64) + 1
        return tf.cond(engine.is_update_step(step), lambda: update(data), lambda: plain(data))

    train_step.plain, train_step.update = plain, update  # for inspection (tests)
    return train_step


def _make_split_train_function(model, engine):
    """Makes ``model.train_function`` around `_split_train_step`; returns that step."""
    split_step = _split_train_step(model, engine)
    _keras_compat.make_train_function_around(model, split_step)
    return split_step


def _can_split(model):
    """Whether `_split_train_step` applies: a traced train function on one replica.

    Several replicas keep the update inside the compiled step (a synchronising optimizer
    update inside a conditional of the replica function is not supported by every strategy).
    """
    return (not model.run_eagerly
            and model.distribute_strategy.num_replicas_in_sync == 1)


def _stats(step, flipped, num_active, fraction, num_nonfinite):
    """A layer's update statistics: [step, flipped positions, nnz, drop fraction, non-finite].

    ``num_nonfinite`` counts the weights the update read that were NaN or Inf (the loss can
    stay finite while weights are not: ReLU maps NaN to 0); the callback checks it when it reads
    the statistics.
    """
    return tf.stack([tf.cast(v, tf.float32)
                     for v in (step, flipped, num_active, fraction, num_nonfinite)])


def _count_nonfinite(weights):
    return tf.reduce_sum(tf.cast(tf.logical_not(tf.math.is_finite(weights)), tf.int32))


def glorot_std(shape):
    """sqrt(2 / (fan_in + fan_out)) of a kernel shape, as Keras counts fans (a convolution's
    receptive field multiplies both): the scale of a Glorot-initialised kernel. A fixed
    reference for random grown weights (a reference taken from the kept weights would grow at
    every update, as magnitude pruning keeps the largest ones)."""
    if len(shape) < 2:
        fan_in = fan_out = max(int(shape[0]) if shape else 1, 1)
    else:
        receptive = 1
        for dim in shape[:-2]:
            receptive *= int(dim)
        fan_in, fan_out = receptive * int(shape[-2]), receptive * int(shape[-1])
    return (2.0 / (fan_in + fan_out)) ** 0.5


def _accumulate_momentum(kind, kernel, gradient):
    g = tf.cast(gradient, tf.float32)
    m = kernel.grad_m.value
    if kind[0] == "sgd":
        m.assign(kind[1] * m + g)
    else:
        m.assign(kind[1] * m + (1.0 - kind[1]) * g)
    if kind[0] == "adam":
        v = kernel.grad_v.value
        v.assign(kind[2] * v + (1.0 - kind[2]) * tf.square(g))


def _grow_scores(config, engine, kernel, gradient, step, signed=False):
    """Growth scores; with ``signed`` the caller ranks by magnitude and the abs is skipped."""
    absolute = (lambda x: x) if signed else tf.abs
    if config.grow == "gradient":
        return absolute(tf.cast(gradient, tf.float32))
    if config.grow == "random":
        seed = masks.rng_seed(engine.seed(), step, kernel.index)
        return masks.random_scores(tuple(kernel.kernel.shape), seed)
    m = tf.convert_to_tensor(kernel.grad_m.value)
    if config.momentum[0] == "adam":
        v = tf.convert_to_tensor(kernel.grad_v.value)
        return absolute(m) / (tf.sqrt(v) + config.momentum[3])
    return absolute(m)


def _update_layer(config, engine, kernel, variable, mask, gradient, step, fraction):
    """Prune and grow one layer; reset weights (and masked optimizer state) where it changed.

    Runs before this step's optimizer update: prunes by the magnitude of the weights the step
    starts from, grows by this step's gradient. Returns the mask the step's update is confined
    to (the kept positions: grown weights start at zero after the step).
    """
    weights = tf.convert_to_tensor(variable)
    scores = _grow_scores(config, engine, kernel, gradient, step,
                          signed=not config.static_shapes)
    if config.static_shapes:  # XLA: whole-kernel passes with static shapes
        new_mask, keep = masks.update_mask(mask, weights, scores, fraction, kernel.num_active)
        flipped = masks.changed_positions(mask, new_mask)
        nonfinite = _count_nonfinite(weights)
    else:  # the selections work on compacted positions (dynamic shapes)
        update = masks.update_mask_compacted(mask, weights, scores, fraction, kernel.num_active)
        new_mask, keep, grown = update.new_mask, update.keep, update.grown
        regrown = tf.reduce_sum(tf.cast(tf.gather(tf.reshape(mask, [-1]), grown), tf.int32))
        flipped = 2 * (tf.size(grown, out_type=tf.int32) - regrown)
        nonfinite = update.num_nonfinite
    return _write_layer_update(config, engine, kernel, variable, weights, new_mask, keep, step,
                               _stats(step, flipped, kernel.num_active, fraction, nonfinite))


def _update_layer_in_region(config, engine, kernel, variable, mask, gradient, step, fraction,
                            allowed):
    """`_update_layer` of channel-level DST: the layer's mask stays inside ``allowed`` (see
    `masks.update_mask_in_region`); static shapes, dynamic counts."""
    weights = tf.convert_to_tensor(variable)
    scores = _grow_scores(config, engine, kernel, gradient, step, signed=True)
    new_mask, keep, count = masks.update_mask_in_region(mask, weights, scores, fraction,
                                                        kernel.num_active, allowed)
    stats = _stats(step, masks.changed_positions(mask, new_mask), count, fraction,
                   _count_nonfinite(weights))
    return _write_layer_update(config, engine, kernel, variable, weights, new_mask, keep, step,
                               stats)


def _write_layer_update(config, engine, kernel, variable, weights, new_mask, keep, step, stats):
    """Writes one layer's mask update: weights (and masked optimizer state) reset outside
    ``keep``, grown weights drawn with ``grown_weight_scale``, the mask and the statistics.
    Returns the mask the step's optimizer update is confined to."""
    # Resets by a dense `where`, not a scatter into the variables: a scatter op switches a TF
    # resource variable to copy-on-read for good, which then costs a copy of the kernel at
    # every read (docs/benchmarks.md).
    kept = masks.zero_off_mask(keep, weights)
    if config.random_grown:  # SET-style: grown weights ~ N(0, (scale * Glorot std)^2)
        std = engine.grown_scale() * glorot_std(tuple(kernel.kernel.shape))
        seed = masks.rng_seed(engine.seed(), -step, kernel.index)  # -step: apart from growth
        noise = tf.random.stateless_normal(tf.shape(weights), seed, dtype=tf.float32) * std
        grown_positions = tf.logical_and(new_mask, tf.logical_not(keep))
        kept = tf.where(grown_positions, tf.cast(noise, weights.dtype), kept)
    variable.assign(kept)
    if config.optimizer_state == "masked":
        for slot in kernel.slots:
            value = tf.convert_to_tensor(slot.value)
            slot.value.assign(masks.zero_off_mask(keep, value))
    kernel.mask.value.assign(new_mask)
    kernel.stats.assign(stats)
    if config.random_grown:  # the grown weights' random start stays through this step
        return new_mask
    return keep


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
    Subclasses say whether masks change (`updates_masks`) and fill in the schedule
    (`_schedule_values`); use `StaticSparsity` or `DynamicSparsity`.

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
        self._split_step = None  # the step `_make_split_train_function` made last (tests)
        self._configured = False
        self._optimizer = None

    # ------------------------------------------------------------------------ set-up
    def set_model(self, model):
        super().set_model(model)
        if not sparsify_lib.masked_layers_of(model):
            raise ValueError(
                f"{type(self).__name__} was given model={model.name!r}, which has no masked "
                "layer. Sparsify the model first: ft_keras.sparsify(model, sparsity=...)."
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
            self._momentum = _momentum_kind(optimizer)
            if self._momentum is None:
                raise ValueError(
                    f"grow='momentum' needs an optimizer with momentum (SGD with momentum > 0, "
                    f"Adam-like with beta_1 > 0); {type(optimizer).__name__} has none. Use "
                    "grow='gradient' or 'random', or give the optimizer momentum."
                )
        self._optimizer = optimizer
        self._engine = _Engine.of(model, optimizer)
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
        return _GraphConfig(self.updates_masks, self.grow, self.optimizer_state,
                            bool(self._static_shapes), momentum,
                            self.updates_masks and self.grown_weight_scale > 0,
                            bool(self._split), self._channel_config())

    def _channel_config(self):
        """`_GraphConfig.channels`: () unless channel-level DST runs (`DynamicSparsity`)."""
        return ()

    def on_train_begin(self, logs=None):
        model = self.model
        if getattr(model, "optimizer", None) is None:
            raise ValueError(f"model={model.name!r} is not compiled; compile it with an optimizer "
                             "before fit().")
        distribute.check_steps_per_execution(model)
        optimizer = _keras_compat.base_optimizer(model.optimizer)
        if (self._optimizer is not optimizer or self._engine is None
                or self._engine is not optimizer.__dict__.get("_ftk_engine")):
            self._prepare(model)
        else:
            self._engine = _Engine.of(model, optimizer)  # refreshes the active counts
        self._configured = False
        self._sanitize()
        # Under XLA the update steps run uncompiled where they can (`_split_train_step`) and
        # work on compacted positions, as without XLA; where they cannot, the update is
        # compiled with the other steps and needs static shapes.
        jit_compile = bool(getattr(model, "jit_compile", False))
        self._split = jit_compile and self.updates_masks and _can_split(model)
        self._static_shapes = jit_compile and not self._split
        trainable = {_keras_compat.variable_key(optimizer, v) for v in model.trainable_variables}
        self._hook = _OptimizerHook(self._engine, self._graph_config, trainable)
        self._hook.install()
        self._use_train_function(model)
        self._last_seen_step = int(optimizer.iterations.numpy())
        if self.log_dir and self._writer is None and _is_chief(model):
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "sparsity"))

    def _use_train_function(self, model):
        """Reuses a train function traced by an earlier fit for the same configuration."""
        key = self._stash_key(self._graph_config(), model)
        for stashed_key, function in model.__dict__.get("_ftk_train_functions", ()):
            if len(stashed_key) == len(key) and all(
                    a is b or (isinstance(a, (_GraphConfig, bool, int, tuple)) and a == b)
                    for a, b in zip(stashed_key, key)):
                model.train_function = function
                return
        # fit() made its train function before calling us; make one that sees the hook.
        if self._split:
            self._split_step = _make_split_train_function(model, self._engine)
        else:
            model.make_train_function(force=True)

    def _stash_key(self, config, model):
        """What a traced train function depends on: the graph configuration, the engine (its
        variables), the layers' active counts (static in the graph) and the compile call."""
        counts = tuple(kernel.num_active for kernel in self._engine.kernels)
        return (config, self._engine, counts) + _keras_compat.compile_token(model)

    def _stash_train_function(self, model):
        if self._hook.config is None or model.train_function is None:
            return  # never traced (e.g. no step ran)
        key = self._stash_key(self._hook.config, model)
        stash = model.__dict__.setdefault("_ftk_train_functions", [])
        stash[:] = [entry for entry in stash if entry[1] is not model.train_function]
        stash.append((key, model.train_function))

    def on_epoch_begin(self, epoch, logs=None):
        if self._configured or self._engine is None:
            return
        # First epoch of this fit: every callback's on_train_begin has run (BackupAndRestore
        # restored `iterations` and the initial epoch), no step has run yet.
        self._configured = True
        ints, floats = self._schedule_values(epoch)
        self._engine.write_schedule(ints, floats)
        self._log_configuration()

    def _schedule_values(self, epoch):
        """``(ints, floats)`` for the schedule variables (layout: _I_* and _F_* above)."""
        del epoch
        return [1, 0, -1, 0, 1, 0, 0], [0.0, 0.0, 0.0, 0.0, 0.0]

    def _log_configuration(self):
        logging.info("%s: %d masked layers, masks fixed (optimizer_state=%s)",
                     type(self).__name__, len(self._kernels), self.optimizer_state)

    def on_train_end(self, logs=None):
        self._collect()
        if self._hook is not None:
            self._hook.uninstall()
            self._stash_train_function(self.model)
            self._hook = None
            self.model.train_function = None
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
        channel_end_step: the step by which ``channel_sparsity`` is reached: the last regular
            update at or before it removes the last channels. None: the schedule's end step.
        channel_min_keep: in [0, 1]; ``ceil(channel_min_keep * C)`` (at least 1) channels of
            every prunable layer are never removed.

    Attributes:
        schedule: the `ft_keras.schedules.DropSchedule` (``end_step`` None until a fit fills it).
        updates: what the callback observed of each mask update (step, drop fraction,
            per-layer churn and density; with ``channel_sparsity`` the surviving channels of
            each prunable layer under ``"channels"``).
    """

    updates_masks = True

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
        self._channel_end_override = None
        self._channel_groups = ()  # the prunable `ft_keras.channels.ChannelGroup`s
        self.schedule = schedules.make_drop_schedule(
            decay, update_every=update_every, drop_fraction=drop_fraction, end_step=end_step,
            start_step=start_step, final_drop_fraction=final_drop_fraction)
        self.update_every = self.schedule.update_every
        self.drop_fraction = self.schedule.drop_fraction
        self.decay = self.schedule.decay
        self.end_step = self.schedule.end_step
        self.start_step = self.schedule.start_step
        self.final_drop_fraction = float(getattr(self.schedule, "final_drop_fraction", 0.0))
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
            if id(group.producer) not in masked:
                reasons[group.name] = "it is not masked"
            elif not group.zero_safe:
                reasons[group.name] = "an activation on its path maps 0 to a nonzero value"
            else:
                prunable.append(group)
        if not prunable:
            raise ValueError(
                f"channel_sparsity={self.channel_sparsity} needs a masked layer whose output "
                f"channels can be removed; model={model.name!r} has none: {reasons}. See "
                "ft_keras.channels for the supported topologies, or pass channel_sparsity=0.")
        total = sum(group.num_channels for group in prunable)
        target = channels_lib.target_removed(1, 0, 1, self.channel_sparsity, total)
        removable = sum(group.num_channels - channels_lib.protected_count(
            self.channel_min_keep, group.num_channels) for group in prunable)
        if target > removable:
            raise ValueError(
                f"channel_sparsity={self.channel_sparsity} removes {target} of the {total} "
                f"prunable channels, but channel_min_keep={self.channel_min_keep} leaves only "
                f"{removable} removable ({[(g.name, g.num_channels) for g in prunable]}). "
                "Lower channel_sparsity or channel_min_keep.")
        self._channel_groups = tuple(prunable)
        self._engine.add_channel_state(prunable, self.channel_min_keep)
        logging.info("%s: channel-level DST over %s; not prunable: %s", type(self).__name__,
                     [(g.name, g.num_channels) for g in prunable], reasons)

    def _channel_config(self):
        if self.channel_sparsity == 0:
            return ()
        return tuple(state.protect for state in self._engine.channel_groups)

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
                and not _can_split(self.model)):
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
        if self.decay == "cosine":
            raise ValueError(
                "end_step=None: the cosine decay needs the number of training steps, but fit() "
                "does not know it (a dataset of unknown length without steps_per_epoch). Pass "
                "end_step=..., steps_per_epoch=... to fit(), or decay='constant'."
            )
        return None

    def _schedule_values(self, epoch):
        end = self._resolve_end_step(epoch)
        self._resolved_end_step = end
        jumps = self._global_explorations or (1, 1, 0, 0.0)
        ints = [self.update_every, self.start_step, -1 if end is None else end,
                jumps[0], jumps[1], jumps[2], self.seed]
        floats = [self.drop_fraction, self.final_drop_fraction,
                  1.0 if self.decay == "cosine" else 0.0, jumps[3], self.grown_weight_scale]
        if self.channel_sparsity > 0:
            self._engine.write_channel_schedule(self.start_step, self._last_channel_step(end),
                                                self.channel_sparsity)
        return ints, floats

    def _end_step_or_none(self):
        return self._resolved_end_step

    def _log_configuration(self):
        logging.info(
            "%s: %d masked layers, update_every=%d, drop_fraction=%.3g (%s), grow=%s, "
            "end_step=%s, optimizer_state=%s",
            type(self).__name__,
            len(self._kernels),
            self.update_every,
            self.drop_fraction,
            self.decay,
            self.grow,
            self._resolved_end_step,
            self.optimizer_state,
        )
