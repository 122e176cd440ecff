"""Channel topology: which layers' output channels can be removed, and what follows each one.

Pure graph analysis of a Sequential or Functional Keras model (no training state). A *producer*
is a Dense, Conv1D/2D/3D or DepthwiseConv2D layer (masked or plain, ``channels_last``); its
output channel ``c`` is the last axis of its output (DepthwiseConv2D: input channel ``i`` and
multiplier ``m`` flattened to ``c = i * depth_multiplier + m``). It forms a `ChannelGroup` when
its output reaches the rest of the model only through *channel-preserving* layers

* BatchNormalization (last axis), elementwise activations (Activation, ReLU, LeakyReLU, ELU,
  PReLU; not softmax), Dropout / SpatialDropout / GaussianDropout, max and average pooling
  (global ones too) and Flatten (``channels_last``: flattened index = position * C + channel),

and ends in *consumers*: Dense or Conv1D/2D/3D layers (masked or plain) whose kernel rows
(axis -2) follow the producer's channels, tiled over the positions a Flatten merged. A producer
is not a group (its channels stay as they are) when its output is a model output, feeds an Add,
Concatenate, Multiply, a nested model or any other layer, when a layer on the way is shared
(called more than once), when a layer uses ``channels_first``, when it is a grouped
convolution or its activation mixes channels (softmax). Nested models are analysed on their own
(their outputs count as model outputs). Layers registered with
`ft_keras.layers.register_maskable` are neither producers nor consumers: the maskable contract
does not say how their kernel maps to their output channels.

``zero_safe`` says whether a zero channel stays exactly zero all the way: the producer's
activation and every activation on the path map 0 to 0 (checked numerically); the producer's
bias and the BatchNormalizations' beta and moving mean of the channel must be zero too, which
`ft_keras.DynamicSparsity` (``channel_sparsity``) keeps and `ft_keras.compact` checks. See
docs/method.md, section 11.
"""

import dataclasses
import math

import keras
import numpy as np
import tensorflow as tf

from ft_keras import layers as masked_layers

_PRODUCERS = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
              keras.layers.DepthwiseConv2D)
_CONSUMERS = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_ACTIVATIONS = (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU,
                keras.layers.ELU, keras.layers.PReLU)
_DROPOUTS = (keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
             keras.layers.SpatialDropout3D, keras.layers.GaussianDropout)
_POOLING = (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D,
            keras.layers.AveragePooling1D, keras.layers.AveragePooling2D,
            keras.layers.AveragePooling3D, keras.layers.GlobalMaxPooling1D,
            keras.layers.GlobalMaxPooling2D, keras.layers.GlobalMaxPooling3D,
            keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
            keras.layers.GlobalAveragePooling3D)
_MIXING_ACTIVATIONS = ("softmax", "log_softmax")


@dataclasses.dataclass
class Consumer:
    """A layer whose kernel rows (axis -2) follow a group's channels: row ``p * C + c``."""

    layer: keras.layers.Layer
    tile: int  # positions merged by a Flatten (1 without one)


@dataclasses.dataclass
class ChannelGroup:
    """A producer whose output channels can be removed, and the layers that follow them."""

    producer: keras.layers.Layer
    num_channels: int
    norms: list  # BatchNormalization layers on the way (their parameters follow the channels)
    consumers: list  # `Consumer`s
    zero_safe: bool  # every activation from the producer to the consumers maps 0 to 0

    @property
    def name(self):
        return self.producer.name


def _is_kind(layer, kinds):
    """Whether ``layer`` is (a masked twin of) one of the Keras classes ``kinds``, exactly."""
    cls = masked_layers.PLAIN_CLASSES.get(type(layer), type(layer))
    return cls in kinds


def _channels_last(layer):
    return getattr(layer, "data_format", "channels_last") in (None, "channels_last")


#: The kernel variable of a producer or consumer (masked or plain).
kernel_of = masked_layers.kernel_of


def num_channels(layer):
    """Output channels of a producer (DepthwiseConv2D: input channels x depth multiplier)."""
    shape = tuple(int(d) for d in kernel_of(layer).shape)
    if _is_kind(layer, (keras.layers.DepthwiseConv2D,)):
        return shape[-2] * shape[-1]
    return shape[-1]


def channel_axis_kernel(kernel, depthwise):
    """``kernel`` (numpy) reshaped to ``(positions, channels)`` along the output channels."""
    kernel = np.asarray(kernel)
    if depthwise:  # (..., in, multiplier): channel i * multiplier + m
        return kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1])
    return kernel.reshape(-1, kernel.shape[-1])


def _activation_keeps_zero(function):
    zero = keras.ops.zeros((1, 2), "float32")
    return bool(np.all(keras.ops.convert_to_numpy(function(zero)) == 0))


def _layer_keeps_zero(layer, shape):
    zero = keras.ops.zeros((1,) + tuple(1 if d is None else int(d) for d in shape[1:]), "float32")
    return bool(np.all(keras.ops.convert_to_numpy(layer(zero)) == 0))


def _graph(model):
    """``(nodes, outputs)`` of a Functional model or a built Sequential's inner graph."""
    functional = model
    if isinstance(model, keras.Sequential):
        functional = getattr(model, "_functional", None)
        if functional is None:
            return [], []
    nodes = [node for depth in sorted(functional._nodes_by_depth, reverse=True)
             for node in functional._nodes_by_depth[depth]]
    return nodes, list(functional.outputs)


def _graph_models(model):
    """``model`` and every nested model in it, each once."""
    models = [model]
    for layer in model.layers:
        if isinstance(layer, keras.Model) and hasattr(layer, "layers"):
            for inner in _graph_models(layer):
                if all(inner is not m for m in models):
                    models.append(inner)
    return models


def analyse(model):
    """``(groups, reasons)``: the `ChannelGroup`s of ``model`` and, for every other producer,
    why its channels cannot be removed (``{layer name: reason}``)."""
    groups, reasons = [], {}
    for graph_model in _graph_models(model):
        nodes, outputs = _graph(graph_model)
        found, why = _analyse_graph(nodes, outputs)
        groups += found
        reasons.update(why)
    return groups, reasons


def _analyse_graph(nodes, outputs):
    consumers_of = {}  # id(tensor) -> [node]
    calls = {}  # id(layer) -> how many nodes of this graph call it
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for tensor in node.input_tensors:
            consumers_of.setdefault(id(tensor), []).append(node)
    output_ids = {id(t) for t in outputs}
    groups, reasons = [], {}
    for node in nodes:
        layer = node.operation
        if not _is_kind(layer, _PRODUCERS) or layer.name in reasons:
            continue
        if any(g.producer is layer for g in groups):
            continue
        result = _follow(layer, node, consumers_of, output_ids, calls)
        if isinstance(result, str):
            reasons[layer.name] = result
        else:
            groups.append(result)
    return groups, reasons


def _follow(producer, node, consumers_of, output_ids, calls):
    """The `ChannelGroup` of ``producer`` or a string saying why there is none."""
    if calls.get(id(producer), 0) != 1:
        return "it is called more than once (shared layer)"
    if not _channels_last(producer):
        return "it uses data_format='channels_first'"
    if getattr(producer, "groups", 1) != 1:
        return f"it is a grouped convolution (groups={producer.groups})"
    activation = getattr(producer, "activation", None) or (lambda x: x)
    if getattr(activation, "__name__", "") in _MIXING_ACTIVATIONS:
        return f"its activation ({activation.__name__}) mixes channels"
    channels = num_channels(producer)
    zero_safe = _activation_keeps_zero(activation)
    norms, consumers = [], []
    # (tensor, tile, flattened): tile = positions merged by a Flatten so far
    todo = [(node.outputs[0], 1, False)]
    while todo:
        tensor, tile, flat = todo.pop()
        if id(tensor) in output_ids:
            return "its output reaches a model output"
        for next_node in consumers_of.get(id(tensor), []):
            layer = next_node.operation
            name = f"{layer.name} ({type(layer).__name__})"
            if calls.get(id(layer), 0) != 1 or len(next_node.input_tensors) != 1:
                return f"its output feeds {name}, which has several inputs or calls"
            if not _channels_last(layer):
                return f"its output feeds {name}, which uses data_format='channels_first'"
            out = next_node.outputs[0] if len(next_node.outputs) == 1 else None
            if _is_kind(layer, _CONSUMERS):
                rows = int(kernel_of(layer).shape[-2])
                if rows != tile * channels:
                    return (f"its output feeds {name} with {rows} input rows, not "
                            f"{tile} x {channels}")
                consumers.append(Consumer(layer, tile))
            elif out is None:
                return f"its output feeds {name}, which has several outputs"
            elif isinstance(layer, keras.layers.BatchNormalization):
                axis = layer.axis if isinstance(layer.axis, int) else None
                if flat or axis not in (-1, len(tensor.shape) - 1):
                    return f"its output feeds {name}, which does not normalise the channel axis"
                norms.append(layer)
                todo.append((out, tile, flat))
            elif isinstance(layer, _ACTIVATIONS):
                function = getattr(layer, "activation", None)
                if getattr(function, "__name__", "") in _MIXING_ACTIVATIONS:
                    return f"its output feeds {name}, which mixes channels"
                zero_safe = zero_safe and _layer_keeps_zero(layer, tensor.shape)
                todo.append((out, tile, flat))
            elif isinstance(layer, _DROPOUTS):
                todo.append((out, tile, flat))
            elif isinstance(layer, _POOLING):
                if flat:
                    return f"its output feeds {name} after a Flatten"
                todo.append((out, tile, flat))
            elif isinstance(layer, keras.layers.Flatten):
                positions = int(np.prod([int(d) for d in tensor.shape[1:-1]] or [1]))
                if flat and positions != 1:
                    return f"its output feeds {name} after a Flatten"
                todo.append((out, tile * positions, True))
            else:
                return f"its output feeds {name}, which does not preserve channels"
    if not consumers:
        return "its output reaches no layer with a kernel"
    return ChannelGroup(producer, channels, norms, consumers, zero_safe)


def removable_channels(group, kernels):
    """Channels of ``group`` whose contribution is provably zero, as a bool vector.

    A channel is removable when (a) the path is ``zero_safe`` and the producer's kernel slice,
    its bias and every BatchNormalization's beta and moving mean of the channel are zero, or
    (b) every consumer's kernel rows of the channel are zero (its output is multiplied by zero
    wherever it goes). ``kernels`` maps ``id(layer)`` to the numpy kernel to use (masks baked
    in); other weights are read from the layers.
    """
    producer = group.producer
    depthwise = _is_kind(producer, (keras.layers.DepthwiseConv2D,))
    values = channel_axis_kernel(kernels[id(producer)], depthwise)
    zero = np.all(values == 0, axis=0) if group.zero_safe else np.zeros(values.shape[1], bool)
    for layer, names in [(producer, ("bias",))] + [(n, ("beta", "moving_mean"))
                                                   for n in group.norms]:
        for weight in layer.weights:
            if weight.name in names:
                zero &= keras.ops.convert_to_numpy(weight) == 0
    unused = np.ones(group.num_channels, bool)
    for consumer in group.consumers:
        kernel = np.asarray(kernels[id(consumer.layer)])
        rows = np.moveaxis(kernel, -2, 0).reshape(consumer.tile, group.num_channels, -1)
        unused &= np.all(rows == 0, axis=(0, 2))
    return zero | unused


# ------------------------------------------------------------------ the channel schedule
# How `DynamicSparsity(channel_allocation=...)` spreads the removed channels over the layers.
ALLOCATIONS = ("global", "layerwise")


def target_removed(step, start_step, last_step, sparsity, total):
    """Channels removed in total by ``step``: ``floor(s(t) * total + 0.5)`` with the cubic ramp
    ``s(t) = sparsity * (1 - (1 - progress)^3)``, progress ``(t - start) / (last - start)``
    clipped to [0, 1] (so the last channel step removes ``floor(sparsity * total + 0.5)``).

    Python numbers give a Python int; a tensor ``step`` (with tensor or Python parameters) gives
    an int32 tensor computed in float64 with the same operations.
    """
    if tf.is_tensor(step):
        t = tf.cast(step, tf.float64)
        start = tf.cast(start_step, tf.float64)
        span = tf.maximum(tf.cast(last_step, tf.float64) - start, 1.0)
        progress = tf.clip_by_value((t - start) / span, 0.0, 1.0)
        rest = 1.0 - progress
        fraction = tf.cast(sparsity, tf.float64) * (1.0 - rest * rest * rest)
        return tf.cast(tf.floor(fraction * float(total) + 0.5), tf.int32)
    span = max(float(last_step) - float(start_step), 1.0)
    progress = min(max((float(step) - float(start_step)) / span, 0.0), 1.0)
    rest = 1.0 - progress
    fraction = float(sparsity) * (1.0 - rest * rest * rest)
    return int(math.floor(fraction * float(total) + 0.5))


def protected_count(min_keep, channels):
    """Channels of a layer that are never removed: ``ceil(min_keep * channels)``, at least 1."""
    return max(1, int(math.ceil(float(min_keep) * channels - 1e-9)))


def channel_scores(kernel, depthwise=False):
    """Mean ``|w|`` over each output channel's kernel entries (zeros included), float32 [C]."""
    magnitude = tf.abs(tf.cast(kernel, tf.float32))
    if depthwise:
        shape = kernel.shape
        magnitude = tf.reshape(magnitude, [-1, int(shape[-2]) * int(shape[-1])])
    else:
        magnitude = tf.reshape(magnitude, [-1, int(kernel.shape[-1])])
    return tf.reduce_mean(magnitude, axis=0)


def remove_channels(scores, alive, protect, num_removed):
    """The channel step: the surviving channels after removing the lowest-scoring ones.

    Per layer the ``protect[l]`` best surviving channels (ties: lower index) are kept; among the
    other surviving channels of all layers, the ``num_removed`` lowest-scoring ones are removed
    (ties: lower global index first; clipped to the candidates there are).

    Args:
        scores: list of float32 [C_l] tensors (`channel_scores`).
        alive: list of bool [C_l] tensors, the surviving channels.
        protect: list of Python ints.
        num_removed: int scalar (tensor or Python), how many to remove now.

    Returns:
        A list of bool [C_l] tensors.
    """
    candidates, sizes = [], []
    for score, live, keep in zip(scores, alive, protect):
        order = tf.argsort(tf.where(live, score, -np.inf), direction="DESCENDING", stable=True)
        best = tf.math.invert_permutation(order) < keep
        candidates.append(tf.logical_and(live, tf.logical_not(best)))
        sizes.append(int(score.shape[0]))
    candidates = tf.concat(candidates, 0)
    flat_scores = tf.concat(scores, 0)
    order = tf.argsort(tf.where(candidates, flat_scores, np.inf), stable=True)
    k = tf.minimum(tf.cast(num_removed, tf.int32),
                   tf.reduce_sum(tf.cast(candidates, tf.int32)))
    removed = tf.logical_and(candidates, tf.math.invert_permutation(order) < tf.maximum(k, 0))
    removed = tf.split(removed, sizes)
    return [tf.logical_and(live, tf.logical_not(r)) for live, r in zip(alive, removed)]
