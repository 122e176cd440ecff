"""The optimizer hook of sparse training and the in-graph state it reads and writes.

`Engine` holds the state of sparse training for one (model, optimizer) pair; `OptimizerHook`
replaces the optimizer's ``update_step`` while a sparsity callback (`ft_keras.training`) trains
the model, and emits the conditional mask update (`ft_keras._graph_updates`) once per step;
`split_train_step` is the train step under XLA on one replica. How the pieces fit together is
described in `ft_keras.training`'s module docstring and docs/method.md, section 3.
"""

import dataclasses
import numbers

import keras
import tensorflow as tf

from ft_keras import _graph_updates as graph_updates
from ft_keras import _keras_compat
from ft_keras import channels as channels_lib
from ft_keras import masks
from ft_keras import sparsify as sparsify_lib



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
class GraphConfig:
    """Everything the traced train step depends on besides variables (the reuse key)."""

    updates: bool  # False: fixed masks (no conditional update in the graph)
    grow: str
    optimizer_state: str
    static_shapes: bool  # XLA: whole-kernel passes with static shapes
    momentum: tuple  # SNFS: ("sgd", beta) / ("adam", b1, b2, eps) / ("sgd_ema", b1) / ()
    random_grown: bool = False  # grown weights drawn at random (grown_weight_scale > 0)
    split: bool = False  # XLA: ordinary steps compiled, update steps not (`split_train_step`)
    # channel-level DST: (allocation, the protected count of each group...); () = off
    channels: tuple = ()
    schedule: tuple = ()  # the drop schedule's `graph_signature` (() with fixed masks)


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
    kernel: object  # the producer's kernel variable
    producer: object  # the producer's `_MaskedKernel`; None when it is not masked
    depthwise: bool
    protect: int  # the channels of this layer that are never removed
    consumers: list  # [(`_MaskedKernel`, tile)]: masked consumers (their mask follows)
    followers: list  # `_Follower`s: zeroed at removal; trainable ones gradient-masked


def momentum_kind(optimizer):
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


#: The one attribute of the optimizer that holds its `Engine`.
ENGINE_ATTRIBUTE = "_ftk_engine"


class Engine:
    """All the state of sparse training for one (model, optimizer) pair, in one object.

    Lifetime: `Engine.of` creates it at a sparsity callback's first use of the pair and keeps it
    in one attribute of the optimizer (`ENGINE_ATTRIBUTE`), so that every sparsity callback that
    trains the model with this optimizer shares it; it lives as long as the optimizer, and is
    replaced (keeping ``buffers``) when the optimizer trains another set of masked layers. It
    owns:

    * the variables the train step reads and writes: the numbers of the drop schedule
      (`ft_keras.schedules.DropSchedule.numbers`, one variable each, shared by the schedules of
      one `graph_signature`), EDST's global explorations, the random seed and the grown-weight
      scale, the per-layer statistics of the latest update (``kernels``) and, with
      channel-level DST, the channel schedule;
    * ``buffers``: the variables it added to the optimizer (SNFS's dense-gradient moments, the
      channel survival vectors), by (kernel path, name), so BackupAndRestore saves them;
    * ``hook``: the `OptimizerHook` installed while a fit runs (None between fits), and
      ``pending``: the gradients of the step being traced, collected by the hook until the last
      masked kernel's arrives (keyed by graph and device; emptied when the hook is removed);
    * ``train_functions``: the train functions traced with the hook, each with what it depends on
      (`SparseTraining` reuses one in a later fit instead of tracing again).
    """

    def __init__(self, model, optimizer, layers, buffers=None):
        self.optimizer = optimizer
        self.buffers = {} if buffers is None else buffers
        self.hook = None
        self.pending = {}
        self.train_functions = []
        self.channel_groups = ()
        self.channel_schedule_int = self.channel_schedule_float = None
        self.drop_schedule = None  # the `DropSchedule` the train step evaluates
        self._schedule_variables = {}  # graph signature -> {number name: variable}
        self.layer_ids = tuple(id(layer) for layer in layers)
        strategy = model.distribute_strategy
        with strategy.scope():
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            # EDST's global explorations: [first step, period, count] and their drop fraction.
            self._explorations = tf.Variable(tf.zeros([3], tf.int64), trainable=False,
                                             name="ftk_explorations")
            self._exploration_fraction = tf.Variable(tf.zeros([], tf.float64), trainable=False,
                                                     name="ftk_exploration_fraction")
            self._seed = tf.Variable(tf.zeros([], tf.int64), trainable=False, name="ftk_seed")
            self._grown_scale = tf.Variable(tf.zeros([], tf.float64), trainable=False,
                                            name="ftk_grown_weight_scale")
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
        # Set while `split_train_step` traces one of its two step functions: "plain" (masks
        # fixed at this step) or "update" (the mask update runs, unconditionally).
        self.trace_mode = None

    @staticmethod
    def attached_to(optimizer):
        """The engine kept on ``optimizer``, or None."""
        return optimizer.__dict__.get(ENGINE_ATTRIBUTE)

    @classmethod
    def of(cls, model, optimizer):
        """The engine of ``model`` trained by ``optimizer`` (created at first use)."""
        layers = sparsify_lib.masked_layers_of(model)
        engine = cls.attached_to(optimizer)
        if engine is None or engine.layer_ids != tuple(id(layer) for layer in layers):
            engine = cls(model, optimizer, layers,
                         buffers=engine.buffers if engine is not None else None)
            optimizer.__dict__[ENGINE_ATTRIBUTE] = engine
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
        cache = self.buffers
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

    def write_schedule(self, schedule=None, end_step=None, explorations=(1, 1, 0, 0.0), seed=0,
                       grown_scale=0.0):
        """Sets what the next traced or reused train step reads: ``schedule`` (a
        `ft_keras.schedules.DropSchedule`, or None for fixed masks) with ``end_step`` in place
        of its own (None: no end), ``explorations`` ``(first_step, period, count, fraction)``,
        the seed of random growth and the grown-weight scale."""
        if schedule is not None:
            key = schedule.graph_signature()
            numbers = dict(schedule.numbers(), end_step=-1 if end_step is None else end_step)
            variables = self._schedule_variables.get(key)
            if variables is None:
                with self._strategy.scope():
                    variables = {
                        name: tf.Variable(tf.zeros([], dtype), trainable=False,
                                          name=f"ftk_schedule_{name}")
                        for name, dtype in key[1:]}
                self._schedule_variables[key] = variables
            for name, value in numbers.items():
                variables[name].assign(tf.constant(value, variables[name].dtype))
            self.drop_schedule = schedule
        self._explorations.assign(tf.constant(explorations[:3], tf.int64))
        self._exploration_fraction.assign(tf.constant(explorations[3], tf.float64))
        self._seed.assign(tf.constant(seed, tf.int64))
        self._grown_scale.assign(tf.constant(grown_scale, tf.float64))

    def add_channel_state(self, groups, min_keep):
        """The state of channel-level DST: a survival vector per group, kept with the
        optimizer's variables (so BackupAndRestore saves and restores it), and the schedule."""
        cache = self.buffers
        by_layer = {id(kernel.layer): kernel for kernel in self.kernels}
        states = []
        with self._strategy.scope():
            if self.channel_schedule_int is None:
                self.channel_schedule_int = tf.Variable(
                    tf.zeros([2], tf.int64), trainable=False, name="ftk_channel_schedule_int")
                self.channel_schedule_float = tf.Variable(
                    tf.zeros([1], tf.float64), trainable=False, name="ftk_channel_schedule_float")
            for group in groups:
                producer = by_layer.get(id(group.producer))
                kernel = channels_lib.kernel_of(group.producer)
                key = (kernel.path, "ftk_channels")
                if key not in cache:
                    cache[key] = self.optimizer.add_variable(
                        (group.num_channels,), initializer="ones", dtype="float32",
                        name="ftk_channels")
                consumers, followers = [], []
                if producer is None:  # a plain producer: its kernel's columns follow
                    followers.append(self._follower(kernel, -1, 1))
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
                    group=group, alive=cache[key], kernel=kernel, producer=producer,
                    depthwise=isinstance(group.producer, keras.layers.DepthwiseConv2D),
                    protect=channels_lib.protected_count(min_keep, group.num_channels),
                    consumers=consumers, followers=followers))
        self.channel_groups = states

    def _follower(self, variable, axis, tile):
        slots = []
        if variable.trainable:
            slots = _keras_compat.optimizer_slots(self.optimizer, variable)
        return _Follower(variable, axis, tile, slots)

    def install_hook(self, config_fn, trainable_keys):
        """Installs a new `OptimizerHook` on the optimizer (see there for the arguments)."""
        self.remove_hook()
        self.hook = OptimizerHook(self, config_fn, trainable_keys)
        _keras_compat.install_update_step(self.optimizer, self.hook)
        return self.hook

    def remove_hook(self, hook=None):
        """Gives the optimizer its own ``update_step`` back and forgets the pending gradients
        (with ``hook``: only if that is the installed hook)."""
        if hook is not None and hook is not self.hook:
            return
        if self.hook is not None:
            _keras_compat.remove_update_step(self.optimizer, self.hook)
        self.hook = None
        self.pending.clear()

    def find_train_function(self, key):
        """The train function stashed under ``key`` (`stash_train_function`), or None."""
        for stashed_key, function in self.train_functions:
            if len(stashed_key) == len(key) and all(
                    a is b or (isinstance(a, (GraphConfig, bool, int, tuple)) and a == b)
                    for a, b in zip(stashed_key, key)):
                return function
        return None

    def stash_train_function(self, key, function):
        """Keeps ``function`` for a later fit whose train step depends on the same ``key``: the
        graph configuration, the layers' active counts and the compile call."""
        self.train_functions[:] = [entry for entry in self.train_functions
                                   if entry[1] is not function]
        self.train_functions.append((key, function))

    def write_channel_schedule(self, start_step, last_step, sparsity):
        self.channel_schedule_int.assign(tf.constant([start_step, last_step], tf.int64))
        self.channel_schedule_float.assign(tf.constant([sparsity], tf.float64))

    # ---------------------------------------------------------------------- in the graph
    def _schedule_values(self):
        variables = self._schedule_variables[self.drop_schedule.graph_signature()]
        return {name: tf.convert_to_tensor(variable) for name, variable in variables.items()}

    def is_update_step(self, step):
        """Whether a mask update happens at ``step`` (int64 scalar tensor counted from 1)."""
        regular = self.drop_schedule.is_update_step_in_graph(step, self._schedule_values())
        return tf.logical_or(regular, self._is_exploration(step))

    def _is_exploration(self, step):
        first, period, count = tf.unstack(tf.convert_to_tensor(self._explorations))
        since = step - first
        period = tf.maximum(period, 1)
        return tf.logical_and(
            tf.logical_and(since >= 0, tf.equal(since % period, 0)),
            since // period < count,
        )

    def drop_fraction_at(self, step):
        """The drop fraction at ``step``, a float64 scalar tensor (float64: exact ceil(p n))."""
        regular = tf.cast(
            self.drop_schedule.drop_fraction_in_graph(step, self._schedule_values()), tf.float64)
        return tf.where(self._is_exploration(step),
                        tf.convert_to_tensor(self._exploration_fraction), regular)

    def seed(self):
        return tf.convert_to_tensor(self._seed)

    def grown_scale(self):
        return tf.cast(tf.convert_to_tensor(self._grown_scale), tf.float32)


class OptimizerHook:
    """Replaces ``update_step`` of one optimizer instance while training runs.

    Made and installed by `Engine.install_hook`. ``config_fn()`` gives the `GraphConfig` (read
    at the first trace); ``trainable_keys`` are the optimizer keys of the model's trainable
    variables.
    """

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
            for state in engine.channel_groups for follower in state.followers
            if follower.variable.trainable}

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
                    return graph_updates.follower_apply(
                        self.original, *self.followers[key], gradient, variable, learning_rate)
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
            graph_updates.accumulate_momentum(config.momentum, kernel, gradient)
        if self.engine.trace_mode == "plain":
            self._masked_apply(config, gradient, variable, learning_rate, mask)
            return None
        # The mask update comes first, and it needs every masked layer's gradient: the updates
        # of the masked kernels wait for the last of them (one conditional per step and
        # replica for all layers; per-layer conditionals cost a function call each at every
        # step without XLA).
        key = (id(tf.compat.v1.get_default_graph()), variable.device)
        pending = self.engine.pending.setdefault(key, [])
        pending.append((kernel, variable, mask, gradient, learning_rate))
        if len(pending) < self.expected:
            return None
        items = self.engine.pending.pop(key)
        step = tf.cast(self.optimizer.iterations, tf.int64) + 1
        if self.engine.trace_mode == "update":
            effective = graph_updates.update_all_layers(config, self.engine, items, step)
        elif config.static_shapes and not config.random_grown:
            effective = graph_updates.update_with_writes_outside(config, self.engine, items, step)
        else:
            effective = graph_updates.update_with_writes_inside(config, self.engine, items, step)
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


def split_train_step(model, engine):
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


def make_split_train_function(model, engine):
    """Makes ``model.train_function`` around `split_train_step`; returns that step."""
    split_step = split_train_step(model, engine)
    _keras_compat.make_train_function_around(model, split_step)
    return split_step


def can_split(model):
    """Whether `split_train_step` applies: a traced train function on one replica.

    Several replicas keep the update inside the compiled step (a synchronising optimizer
    update inside a conditional of the replica function is not supported by every strategy).
    """
    return (not model.run_eagerly
            and model.distribute_strategy.num_replicas_in_sync == 1)
