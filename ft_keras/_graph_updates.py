"""The in-graph mask update of one training step: prune and grow, channel removal, resets.

Functions traced into the train step by the optimizer hook (`ft_keras._optimizer_hook`); what
they compute is described in `ft_keras.training` and docs/method.md. ``config`` is the hook's
`ft_keras._optimizer_hook.GraphConfig`, ``engine`` its `ft_keras._optimizer_hook.Engine`, and
``items`` the ``(kernel, variable, mask, gradient, learning_rate)`` of every masked kernel of the
step.
"""

import tensorflow as tf

from ft_keras import channels as channels_lib
from ft_keras import masks


def update_all_layers(config, engine, items, step):
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


def follower_apply(original, state, follower, gradient, variable, learning_rate):
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
    scores = [channels_lib.channel_scores(tf.convert_to_tensor(state.kernel), state.depthwise)
              for state in groups]
    protect = [state.protect for state in groups]

    def due(live, size):  # channels of `size` (removed so far: size - live) due at `step`
        removed = size - tf.add_n([masks.count_active(v) for v in live])
        target = channels_lib.target_removed(step, ints[0], ints[1], sparsity, size)
        return tf.where(step <= ints[1], target - removed, 0)

    if config.channels[0] == "global":
        alive = channels_lib.remove_channels(scores, alive, protect, due(alive, total))
    else:  # "layerwise": every group its own ramp and threshold
        alive = [channels_lib.remove_channels([score], [live], [keep],
                                              due([live], state.group.num_channels))[0]
                 for state, score, live, keep in zip(groups, scores, alive, protect)]
    regions = {}
    for state, live in zip(groups, alive):
        state.alive.value.assign(tf.cast(live, tf.float32))
        for follower in state.followers:
            where = _along(live, tuple(follower.variable.shape), follower.axis, follower.tile)
            for variable in [follower.variable] + (
                    follower.slots if config.optimizer_state == "masked" else []):
                value = tf.convert_to_tensor(variable.value)
                variable.value.assign(tf.where(where, value, tf.zeros([], value.dtype)))
        if state.producer is not None:  # a plain producer's kernel is a follower
            shape = tuple(state.kernel.shape)
            out = (tf.reshape(live, shape[-2:]) if state.depthwise else live)
            out = tf.broadcast_to(out, shape)
            index = state.producer.index
            regions[index] = (out if index not in regions
                              else tf.logical_and(regions[index], out))
        for kernel, tile in state.consumers:
            shape = tuple(kernel.kernel.shape)
            rows = tf.broadcast_to(_along(live, shape, -2, tile), shape)
            index = kernel.index
            regions[index] = (rows if index not in regions
                              else tf.logical_and(regions[index], rows))
    return regions


def update_with_writes_inside(config, engine, items, step):
    """The mask update inside a ``tf.cond`` that writes the variables itself (without XLA).

    Only the predicate runs at ordinary steps. Returns `update_all_layers`'s masks at an
    update step, the current masks otherwise.
    """
    return tf.cond(engine.is_update_step(step),
                   lambda: update_all_layers(config, engine, items, step),
                   lambda: tuple(mask for _, _, mask, _, _ in items))


def update_with_writes_outside(config, engine, items, step):
    """The mask update for XLA: the conditional computes masks only, the writes are outside.

    XLA compiles a conditional that writes variables by passing every written buffer through
    both branches, which costs a copy of each kernel and optimizer slot at *every* step. Here
    the conditional returns two bool tensors per layer (the new mask and the kept positions; at
    ordinary steps the current mask twice) and the statistics; the resets are elementwise
    ``where``s before the optimizer's update, which XLA fuses with that update. Ordinary steps
    pay for the bool masks only. Returns the per-layer masks of `update_with_writes_inside`.
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


def accumulate_momentum(kind, kernel, gradient):
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
