"""`sparsify`, `strip` and `compact`: a Keras model to a masked (sparse) one and back.

``sparsify`` clones a Sequential or Functional model (nested models included), replacing every
Dense / Conv1D / Conv2D / Conv3D / DepthwiseConv2D layer by its masked twin from
`ft_keras.layers`, copies all weights, draws random masks with exact per-layer counts from the
chosen density distribution, and zeroes the kernels off-mask. Layers that cannot be masked stay
dense and are listed by `sparsity_report`. ``strip`` does the reverse: a plain Keras model whose
kernels hold the sparse weights (zeros off-mask), with identical predictions. ``compact`` is
``strip`` plus the physical removal of every output unit / channel whose contribution is provably
zero (after channel-level DST, `ft_keras.DynamicSparsity` with ``channel_sparsity``): a narrower
dense model with the same predictions.

Example:

>>> model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(300, activation="relu"),
...                           keras.layers.Dense(10)])
>>> sparse = sparsify(model, sparsity=0.9, distribution="erk", seed=0)
>>> print(sparsity_report(sparse))          # doctest: +SKIP
>>> plain = strip(sparse)                  # a plain keras.Sequential again
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from ft_keras import _checks
from ft_keras import _keras_compat
from ft_keras import channels as channels_lib
from ft_keras import densities as densities_lib
from ft_keras import layers as masked_layers
from ft_keras import masks

# Salt for the initial masks' RNG key (training-time draws use steps >= 1).
_INITIAL_MASK_STEP = -1


def _check_model(model, argument="model"):
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{argument} must be a keras.Model (Sequential or Functional); got "
            f"{type(model).__name__}."
        )
    if not _keras_compat.is_graph_model(model):
        raise TypeError(
            f"{argument}={model.name!r} is a subclassed keras.Model; sparsify and strip need a "
            "Sequential or Functional model (build it with keras.Sequential or keras.Model(inputs, "
            "outputs))."
        )


def walk_layers(model):
    """Yields the leaf layers of a model in order, entering nested models; each layer once."""
    seen = set()

    def walk(container):
        for layer in container.layers:
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if isinstance(layer, keras.Model) and hasattr(layer, "layers"):
                yield from walk(layer)
            else:
                yield layer

    yield from walk(model)


def masked_layers_of(model):
    """The masked layers of a model, in `walk_layers` order (their index keys the RNG)."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model; got {type(model).__name__}.")
    return [layer for layer in walk_layers(model) if masked_layers.is_masked(layer)]


def _kernel_shape(layer):
    return tuple(int(d) for d in masked_layers.kernel_of(layer).shape)


def sparsify(model, sparsity=0.9, distribution="erk", keep_dense=(), seed=0, erk_power_scale=1.0):
    """Returns a new model whose prunable layers are masked at the given overall sparsity.

    Args:
        model: a built Sequential or Functional `keras.Model` (nested models are entered).
        sparsity: overall sparsity S in [0, 1) over all prunable kernels (``keep_dense`` layers
            count as dense).
        distribution: "erk" (default), "er" or "uniform"; see `ft_keras.layer_densities`.
        keep_dense: name(s) of prunable layers to keep dense (not masked).
        seed: int; initial masks are drawn from a stateless RNG keyed by (seed, layer index).
        erk_power_scale: exponent applied to ERK's raw densities.

    Returns:
        A new, uncompiled `keras.Model` with the same architecture and weights, in which each
        masked layer holds a ``kernel_mask`` with exactly ``round(density * size)`` ones and a
        kernel that is exactly zero off-mask. Layers whose density comes out at 1.0 (ERK's cap, or
        ``keep_dense``) stay plain layers.

    Raises:
        TypeError: ``model`` is not a Sequential/Functional model, or an argument has a bad type.
        ValueError: sparsity outside [0, 1), unknown distribution, ``keep_dense`` naming no
            prunable layer, or a model with no prunable layer.
    """
    _check_model(model)
    sparsity = _checks.check_real("sparsity", sparsity, low=0.0, high=1.0, high_open=True)
    keep = _checks.check_names("keep_dense", keep_dense)
    seed = _checks.check_seed("seed", seed)
    if not model.built:
        raise ValueError(
            f"model={model.name!r} is not built; call it on data or give it an Input first."
        )
    if any(masked_layers.is_masked(layer) for layer in walk_layers(model)):
        raise ValueError(f"model={model.name!r} is already sparsified; strip() it first.")

    prunable = [layer for layer in walk_layers(model) if masked_layers.is_prunable(layer)]
    if not prunable:
        raise ValueError(
            f"model={model.name!r} has no prunable layer; sparsify masks the kernels of "
            f"{sorted(cls.__name__ for cls in masked_layers.MASKED_CLASSES)} layers."
        )
    names = [layer.name for layer in prunable]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"model={model.name!r} has several prunable layers named {duplicates}; give them "
            "unique names so densities and keep_dense can refer to them."
        )
    unknown = [name for name in keep if name not in names]
    if unknown:
        raise ValueError(
            f"keep_dense={list(keep)!r} names no prunable layer: {unknown}. Prunable layers: "
            f"{names}."
        )
    shapes = {layer.name: _kernel_shape(layer) for layer in prunable}
    layer_density = densities_lib.layer_densities(
        shapes,
        sparsity,
        distribution=distribution,
        keep_dense=keep,
        erk_power_scale=erk_power_scale,
    )
    counts = densities_lib.active_counts(shapes, layer_density)
    to_mask = {
        name for name in names if counts[name] < int(np.prod(shapes[name]))
    }

    originals = {}

    def clone_layer(layer):
        if layer.name in to_mask and masked_layers.is_prunable(layer):
            new = masked_layers.MASKED_CLASSES[type(layer)].from_config(layer.get_config())
        else:
            new = layer.__class__.from_config(layer.get_config())
        originals[id(new)] = layer
        return new

    clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)

    masked_index = 0
    for new in walk_layers(clone):
        old = originals.get(id(new))
        if old is None:
            continue
        if masked_layers.is_masked(new):
            weights = old.get_weights()
            new.set_weights(weights + [np.ones(_kernel_shape(new), bool)])
            mask = _random_mask_in_graph(
                shapes[new.name],
                counts[new.name],
                masks.rng_seed(seed, _INITIAL_MASK_STEP, masked_index),
            )
            new.set_mask(mask)
            masked_index += 1
        elif old.weights:
            new.set_weights(old.get_weights())
    return clone


@tf.function(autograph=False, reduce_retracing=False)
def _random_mask_graph(shape, num_active, seed):
    return masks.random_mask(shape, num_active, seed)


def _random_mask_in_graph(shape, num_active, seed):
    """`masks.random_mask` as a graph: TF frees its full-size temporaries as soon as they
    are used, where eager code keeps them all alive until it returns (a lower peak memory for
    big kernels)."""
    return _random_mask_graph(tuple(int(d) for d in shape), int(num_active), seed)


def strip(model):
    """Returns a plain Keras model (no masks) with the sparse model's weights and predictions.

    Each masked layer becomes its Keras parent class with the same config; its kernel holds the
    sparse weights (exactly zero off-mask). Non-masked layers are copied.
    """
    _check_model(model)
    return _strip(model)[0]


def _strip(model):
    """`strip` of a checked model: ``(plain clone, the clone's layers in walk order)``."""
    originals = {}

    def clone_layer(layer):
        cls = masked_layers.PLAIN_CLASSES.get(type(layer), type(layer))
        new = cls.from_config(layer.get_config())
        originals[id(new)] = layer
        return new

    clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    layers = list(walk_layers(clone))
    for new in layers:
        old = originals.get(id(new))
        if old is None or not old.weights:
            continue
        if masked_layers.is_masked(old):
            mask = keras.ops.convert_to_numpy(old.kernel_mask)
            kernel = keras.ops.convert_to_numpy(old.masked_kernel)
            kernel = np.where(mask, kernel, np.zeros_like(kernel))
            values = [
                kernel if w is old.masked_kernel else keras.ops.convert_to_numpy(w)
                for w in old.weights
                if w is not old.kernel_mask
            ]
            new.set_weights(values)
        else:
            new.set_weights(old.get_weights())
    return clone, layers


def _baked_kernels(layers):
    """``{id(layer): numpy kernel}`` of every layer of ``layers`` (a model's `walk_layers`)
    with a kernel, masks applied."""
    kernels = {}
    for layer in layers:
        if masked_layers.is_masked(layer):
            mask = keras.ops.convert_to_numpy(layer.kernel_mask)
            kernel = keras.ops.convert_to_numpy(layer.masked_kernel)
            kernels[id(layer)] = np.where(mask, kernel, np.zeros_like(kernel))
        elif getattr(layer, "kernel", None) is not None and hasattr(layer.kernel, "shape"):
            kernels[id(layer)] = keras.ops.convert_to_numpy(layer.kernel)
    return kernels


def compact(model):
    """Returns a plain Keras model with every removable output unit / channel removed.

    Like `strip` (no masked layers, masks baked in), and then, for every layer whose channels
    can be removed (`ft_keras.channels`: Dense / Conv1D / Conv2D / Conv3D producers whose output
    reaches kernels only through channel-preserving layers), the channels whose contribution is
    provably zero are sliced out: a channel whose kernel slice, bias and following
    BatchNormalizations' beta and moving mean are zero (with activations that map 0 to 0 on
    the way), or whose rows in every consumer's kernel are zero. The producer gets fewer
    units / filters, the BatchNormalizations lose the channel's parameters and statistics, and
    the consumers lose the matching input rows. At least one channel of each layer is kept.
    Predictions are those of ``model`` up to float rounding (the sums have fewer zero terms).

    Left as they are (zero channels kept, documented in docs/method.md, section 11): producers
    that are not channel-prunable (e.g. a model output, or feeding Add / Concatenate) and
    DepthwiseConv2D producers (an output channel cannot be removed alone: its input channel
    feeds all ``depth_multiplier`` outputs). A model with nothing removable comes back as an
    equivalent plain model.

    Args:
        model: a Sequential or Functional `keras.Model`, masked or plain (e.g. a trained
            ticket, or a model loaded from a ``.keras`` file).

    Raises:
        TypeError: ``model`` is not a Sequential / Functional model.
    """
    _check_model(model)
    plain, layers = _strip(model)
    return _slice_out(plain, _removable_channels(plain, layers))


def compact_aligned(models):
    """`compact` of each model, removing only the channels removable in all of them.

    Members of equal architecture (the tickets of one run) keep equal widths, so that serving can
    evaluate them together (`ft_keras.serving_graph`); a layer that is not in every model, or
    whose width differs, is compacted per model as `compact` does.

    Args:
        models: a non-empty list of Sequential or Functional `keras.Model`s.
    """
    for i, model in enumerate(models):
        _check_model(model, f"models[{i}]")
    return _compact_aligned(models)


def _compact_aligned(models):
    """`compact_aligned` of checked models (Sequential or Functional, not checked again)."""
    stripped = [_strip(model) for model in models]
    plains = [plain for plain, _ in stripped]
    removables = [_removable_channels(plain, layers) for plain, layers in stripped]
    for name in set(removables[0]).intersection(*removables[1:]):
        shapes = {removable[name][1].shape for removable in removables}
        if len(shapes) == 1:
            joint = np.logical_and.reduce([removable[name][1] for removable in removables])
            for removable in removables:
                removable[name] = (removable[name][0], joint.copy())
    return [_slice_out(plain, removable) for plain, removable in zip(plains, removables)]


def _removable_channels(plain, layers):
    """{producer name: (`ChannelGroup`, bool [C]: removable)} of a plain (stripped) model whose
    `walk_layers` are ``layers``."""
    groups, _ = channels_lib.analyse(plain)
    kernels = _baked_kernels(layers)
    removables = {}
    for group in groups:
        if isinstance(group.producer, keras.layers.DepthwiseConv2D):
            continue
        removables[group.producer.name] = (group,
                                           channels_lib.removable_channels(group, kernels))
    return removables


def _slice_out(plain, removables):
    """``plain`` with the removable channels of ``removables`` sliced out (a new model)."""
    out_keep, in_keep, norm_keep = {}, {}, {}
    for group, removable in removables.values():
        if not removable.any():
            continue
        if removable.all():
            removable = removable.copy()
            removable[0] = False
        kept = np.flatnonzero(~removable)
        out_keep[id(group.producer)] = kept
        for norm in group.norms:
            norm_keep[id(norm)] = kept
        for consumer in group.consumers:
            in_keep[id(consumer.layer)] = np.concatenate(
                [p * group.num_channels + kept for p in range(consumer.tile)])
    if not out_keep:
        return plain
    originals = {}

    def clone_layer(layer):
        config = layer.get_config()
        if id(layer) in out_keep:
            key = "units" if isinstance(layer, keras.layers.Dense) else "filters"
            config[key] = int(len(out_keep[id(layer)]))
        new = layer.__class__.from_config(config)
        originals[id(new)] = layer
        return new

    compacted = keras.models.clone_model(plain, clone_function=clone_layer, recursive=True)
    for new in walk_layers(compacted):
        old = originals.get(id(new))
        if old is None or not old.weights:
            continue
        values = []
        for weight in old.weights:
            value = keras.ops.convert_to_numpy(weight)
            if id(old) in norm_keep:
                value = value[norm_keep[id(old)]]
            if weight.name == "kernel" and id(old) in in_keep:
                value = np.take(value, in_keep[id(old)], axis=-2)
            if id(old) in out_keep and weight.name in ("kernel", "bias"):
                value = np.take(value, out_keep[id(old)], axis=-1)
            values.append(value)
        new.set_weights(values)
    return compacted


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """One row of a `SparsityReport`."""

    name: str
    kind: str
    shape: tuple
    size: int
    active: int
    status: str  # "masked", "dense (not masked)", "unsupported (stays dense)"
    channels: tuple = None  # (kept, total) output channels of a channel-prunable layer

    @property
    def channel_text(self):
        return "" if self.channels is None else f"{self.channels[0]}/{self.channels[1]}"

    @property
    def density(self):
        return self.active / self.size if self.size else 1.0


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    """Per-layer kernel sizes and active counts of a model, and the totals.

    ``total_size`` / ``total_active`` cover every kernel listed (masked, kept dense and
    unsupported); ``masked_size`` / ``masked_active`` only the masked ones; ``num_params`` and
    ``num_active_params`` count every trainable weight (biases etc. always active).
    """

    layers: tuple
    num_params: int
    num_active_params: int

    @property
    def masked(self):
        return tuple(row for row in self.layers if row.status == "masked")

    @property
    def unsupported(self):
        return tuple(row for row in self.layers if row.status.startswith("unsupported"))

    @property
    def total_size(self):
        return sum(row.size for row in self.layers)

    @property
    def total_active(self):
        return sum(row.active for row in self.layers)

    @property
    def density(self):
        return self.total_active / self.total_size if self.total_size else 1.0

    @property
    def sparsity(self):
        return 1.0 - self.density

    def as_dict(self):
        return {
            "layers": [dict(dataclasses.asdict(row), density=row.density) for row in self.layers],
            "total_size": self.total_size,
            "total_active": self.total_active,
            "density": self.density,
            "num_params": self.num_params,
            "num_active_params": self.num_active_params,
        }

    def __str__(self):
        head = (f"{'layer':<24} {'kind':<22} {'shape':<20} {'active':>10} {'size':>10} "
                f"{'density':>8} {'channels':>11}")
        lines = [head, "-" * len(head)]
        for row in self.layers:
            lines.append(
                f"{row.name:<24.24} {row.kind:<22.22} {str(row.shape):<20.20} {row.active:>10,d} "
                f"{row.size:>10,d} {row.density:>8.4f} {row.channel_text:>11}"
                + ("" if row.status == "masked" else f"  {row.status}")
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'kernels total':<67} {self.total_active:>10,d} {self.total_size:>10,d} "
            f"{self.density:>8.4f}"
        )
        lines.append(
            f"all parameters: {self.num_active_params:,d} active of {self.num_params:,d}"
        )
        return "\n".join(lines)


def sparsity_report(model):
    """Per-layer shape, active count and density of every kernel, and the totals.

    Masked layers report their mask's count; prunable layers that were kept dense and layers that
    ft_keras cannot mask (e.g. Conv2DTranspose, Embedding) are listed as dense with their status.
    Layers whose output channels can be removed (`ft_keras.channels`) also report their kept
    channels ``(kept, total)``: the channels `compact` would not remove.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a keras.Model; got {type(model).__name__}.")
    return _sparsity_report(model, list(walk_layers(model)))


def _sparsity_report(model, layers):
    """`sparsity_report` of a checked model whose `walk_layers` are ``layers``."""
    kept_channels = {}
    if _keras_compat.is_graph_model(model):
        groups, _ = channels_lib.analyse(model)
        kernels = _baked_kernels(layers)
        for group in groups:
            removable = channels_lib.removable_channels(group, kernels)
            kept_channels[id(group.producer)] = (int(np.sum(~removable)), group.num_channels)
    rows = []
    num_params = 0
    num_active = 0
    for layer in layers:
        for weight in layer.trainable_weights:
            num_params += int(np.prod(weight.shape))
        if masked_layers.is_masked(layer):
            size = layer.kernel_size_total
            active = layer.num_active
            status = "masked"
        elif masked_layers.is_prunable(layer) or masked_layers.has_kernel(layer):
            kernel = [w for w in layer.weights if w.name.endswith(("kernel", "embeddings"))][0]
            size = int(np.prod(kernel.shape))
            active = size
            status = (
                "dense (not masked)"
                if masked_layers.is_prunable(layer)
                else "unsupported (stays dense)"
            )
        else:
            for weight in layer.trainable_weights:
                num_active += int(np.prod(weight.shape))
            continue
        others = sum(
            int(np.prod(w.shape))
            for w in layer.trainable_weights
            if not w.name.endswith(("kernel", "embeddings"))
        )
        num_active += active + others
        shape = tuple(int(d) for d in (
            layer.masked_kernel.shape if masked_layers.is_masked(layer) else kernel.shape
        ))
        rows.append(LayerSparsity(layer.name, type(layer).__name__, shape, size, active, status,
                                  kept_channels.get(id(layer))))
    return SparsityReport(tuple(rows), num_params, num_active)


def kernel_densities(model):
    """``{layer name: density}`` of the masked layers (a convenience over `sparsity_report`)."""
    return {row.name: row.density for row in sparsity_report(model).masked}

