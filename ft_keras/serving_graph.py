"""How a serving SavedModel evaluates its members: layer by layer, separately or grouped.

`build_program` turns the members (Keras models) into a function from a request tensor to the
list of member logits; every weight is read from the load-time cache of
`ft_keras.serving_storage` (nothing else of the members is saved).

**Chains.** A member whose layers form a chain (each layer feeds the next: a Sequential model,
or a Functional model of that shape) is evaluated layer by layer. Members that are the same
chain of layers up to names and weight values (the tickets of one run, or compacted members of
equal widths) are *aligned*: each position is evaluated for all members together.

**Grouping** (``group_members``) evaluates a position of aligned members as one op:

- ``"convolutions"`` (the default): convolutions (Conv1D / 2D / 3D, channels last, "valid" or
  "same" padding) run as one ordinary convolution with the members' filters side by side: on
  the shared request, the members' kernels concatenated; after that, a block-diagonal kernel
  (member m's kernel maps its own input channels to its own output channels, zeros elsewhere).
  The block-diagonal kernel costs M times the multiply-adds of a grouped convolution, but a
  grouped convolution is no ordinary op on CPU: Keras compiles it with XLA, and TensorFlow's
  fused CPU convolution refuses groups (docs/benchmarks.md, "Serving", has the measurement).
  The members' channels then stay side by side on the last axis through layers that act on
  each channel alone (pooling, activations, dropout, padding, cropping) until a layer that
  needs them apart (Flatten, a Dense layer). Dense layers run as one product per member.
- ``"all"``: convolutions as above, and Dense layers as one op too: a layer whose input is the
  request (shared by all members) multiplies it once by the members' kernels side by side
  (``n_in x M * n_out``); later layers are one batched product over the members' stacked
  kernels (``M x n_in x n_out``).
- ``"none"``: one op per member and layer.

bench/serving.py measures the three (docs/benchmarks.md, "Serving", says why the default is
what it is).

**Dense kernels.** A Dense position is computed by one of these kernels (`LayerPlan.kernels`):
``"grouped"`` (above), ``"dense"`` (one product ``x @ W`` per member, the kernel rebuilt dense at
load with the zeros of masked or compacted kernels), or the opt-in sparse kernels
(``sparse_kernels="csr"`` / ``"coo"``), which take precedence for a kernel that holds zeros:
one sparse product per member, TensorFlow's CSR product (the CSR matrix is built at every call
from indices cached at load: a CSR matrix cannot be kept between calls in a SavedModel) or
``tf.sparse.sparse_dense_matmul``. Kernels without zeros stay dense.

**Other layers.** Any other layer without weights (Flatten, Reshape...) runs once on all
members' rows at once when members are grouped; a layer with weights that is neither of the
above (depthwise convolutions, batch normalisation, convolutions not grouped) runs as
its own Keras layer, once per member, its weights read from the cache. A member that is not a
chain is evaluated whole by Keras; a member wrapping a loaded SavedModel
(`keras.layers.TFSMLayer`) is called as it is.

**Inside checks.** Each Dense and grouped convolution step reports the sum over each example of
its pre-activations, and each other step with weights the sum of its outputs; the serving
function refuses the rows where one of them is not finite (``ft_keras.export``, "Requests").
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from ft_keras import _checks
from ft_keras import _tf_compat
from ft_keras import layers as masked_layer_lib
from ft_keras import serving_storage
from ft_keras import sparsify as sparsify_lib

SPARSE_KERNELS = ("dense", "csr", "coo")
GROUP_MODES = ("convolutions", "all", "none")

# States between steps: ("shared", x) before the first layer with weights; ("grouped", y)
# with the members on a leading axis; ("channels", y) with the members' channels side by side
# on the last axis (after grouped convolution steps); ("list", [y_1, ..., y_M]).
_SHARED, _GROUPED, _CHANNELS, _LIST = "shared", "grouped", "channels", "list"

# Layers without weights that act on each channel alone (channels last): they run on the
# members' channels side by side as they are.
_PER_CHANNEL = (
    keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D,
    keras.layers.AveragePooling1D, keras.layers.AveragePooling2D, keras.layers.AveragePooling3D,
    keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D, keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D, keras.layers.GlobalAveragePooling3D,
    keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU,
    keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D, keras.layers.GaussianNoise, keras.layers.GaussianDropout,
    keras.layers.AlphaDropout, keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D,
    keras.layers.ZeroPadding3D, keras.layers.Cropping1D, keras.layers.Cropping2D,
    keras.layers.Cropping3D,
)
_CHANNEL_MIXING_ACTIVATIONS = ("softmax", "log_softmax")


@dataclasses.dataclass
class LayerPlan:
    """One Dense (or grouped convolution) position of an export, as
    `ft_keras.export.kernel_plan` reports it.

    Attributes:
        layer: the layer name (members' names joined with "+" when they differ).
        members: how many members this step covers (the members of an aligned ensemble; 1
            for a single model or a member that is not aligned).
        shape: (n_in, n_out) of one member's kernel (a convolution's n_in is its kernel's
            height * width * input channels).
        nnz: nonzero (or, for masked kernels, active) weights of all the members covered.
        storage: the encoding of each member's kernel ("full", "bitmask", "rows").
        kernels: "grouped", "dense", "csr" or "coo" (see the module doc).
    """

    layer: str
    members: int
    shape: tuple
    nnz: int
    storage: tuple
    kernels: str


# --------------------------------------------------------------------------------------------
# Which layers and members the graph computes itself.


def _is_masked(layer):
    return masked_layer_lib.is_masked(layer)


def _plain_class(layer):
    return masked_layer_lib.PLAIN_CLASSES.get(type(layer), type(layer))


def _is_float32(layer):
    return getattr(layer, "compute_dtype", "float32") == "float32" and getattr(
        layer, "variable_dtype", "float32"
    ) == "float32"


def _is_plain_dense(layer):
    """A Dense layer (masked or not) that `_DenseStep` computes exactly like Keras."""
    return (
        _plain_class(layer) is keras.layers.Dense
        and not getattr(layer, "lora_enabled", False)
        and not getattr(layer, "quantization_mode", None)
        and _is_float32(layer)
    )


def _is_groupable_conv(layer):
    """A convolution (masked or not) that `_ConvStep` computes exactly like Keras, members'
    filters side by side."""
    activation = getattr(getattr(layer, "activation", None), "__name__", "")
    return (
        _plain_class(layer) in (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
        and getattr(layer, "groups", 1) == 1
        and getattr(layer, "data_format", "channels_last") == "channels_last"
        and str(getattr(layer, "padding", "")).lower() in ("valid", "same")
        and activation not in _CHANNEL_MIXING_ACTIVATIONS
        and not getattr(layer, "lora_enabled", False)
        and not getattr(layer, "quantization_mode", None)
        and _is_float32(layer)
    )


def _is_per_channel(layer):
    """A layer without weights that acts on each channel alone (channels last)."""
    if not isinstance(layer, _PER_CHANNEL):
        return False
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return False
    activation = getattr(getattr(layer, "activation", None), "__name__", "")
    return activation not in _CHANNEL_MIXING_ACTIVATIONS


def _chain(model):
    """The layers of ``model`` if it is a chain (each layer feeds the next), else None."""
    if not isinstance(model, keras.Model) or not getattr(model, "inputs", None):
        return None
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if not layers or any(isinstance(layer, keras.Model) for layer in layers):
        return None
    try:
        previous = model.inputs[0]
        for layer in layers:
            if layer.input is not previous:
                return None
            previous = layer.output
        if previous is not model.outputs[0]:
            return None
    except (AttributeError, ValueError, IndexError):  # a layer called several times
        return None
    return layers


def _layer_signature(layer):
    """What must be equal for layers of different members to be evaluated together."""
    config = dict(layer.get_config())
    config.pop("name", None)
    config.pop("trainable", None)
    mask = id(layer.kernel_mask) if _is_masked(layer) else None
    shapes = tuple(tuple(w.shape) for w in layer.weights if id(w) != mask)
    return (_plain_class(layer).__name__, repr(sorted(config.items())), shapes)


def _aligned(chains):
    """Whether the chains are the same layers up to names and weight values."""
    if len(chains) < 2 or any(chain is None for chain in chains):
        return False
    if len({len(chain) for chain in chains}) != 1:
        return False
    return all(len({_layer_signature(layer) for layer in layers}) == 1
               for layers in zip(*chains))


def is_opaque(model):
    """Whether ``model`` wraps a loaded SavedModel (`keras.layers.TFSMLayer`): served as it is."""
    return _is_opaque(sparsify_lib.walk_layers(model))


def _is_opaque(layers):
    """`is_opaque` of the model whose `ft_keras.sparsify.walk_layers` are ``layers``."""
    return any(isinstance(layer, keras.layers.TFSMLayer) for layer in layers)


# --------------------------------------------------------------------------------------------
# The module that a serving SavedModel saves.


class ServingModule(tf.Module):
    """What a serving SavedModel tracks: the stored variables and the load-time caches."""

    def __init__(self):
        super().__init__(name="ft_keras_serving")
        self.storage = serving_storage.Storage()
        self.float_cache = serving_storage.Cache(self.storage, tf.float32)
        self.index_cache = serving_storage.Cache(self.storage, tf.int64)
        self.other_variables = []
        self.opaque_models = []

    def cached(self, array, mask=None, kernel=True):
        """Stores ``array``; returns (segment, index of its dense tensor in the cache)."""
        segment = self.storage.add(array, mask, kernel)
        index = self.float_cache.add(lambda decoded: serving_storage.Storage.tensor(segment,
                                                                                    decoded))
        return segment, index

    def layer_state(self, layer):
        """Cache entries for every float weight of ``layer``: [(variable, index, shape)].

        The mask of a masked layer is folded into its kernel's storage; other weights of rank
        2 or more (kernels) are stored compactly where they hold zeros; weights that are not
        floating point (e.g. random-seed state) are tracked as they are.
        """
        state = []
        mask_id = id(layer.kernel_mask) if _is_masked(layer) else None
        kernel_id = id(layer.masked_kernel) if _is_masked(layer) else None
        for variable in layer.weights:
            if id(variable) == mask_id:
                continue
            value = np.asarray(keras.ops.convert_to_numpy(variable))
            if value.dtype.kind != "f":
                self.other_variables.append(variable)
                continue
            mask = None
            if id(variable) == kernel_id:
                mask = keras.ops.convert_to_numpy(layer.kernel_mask)
            segment, index = self.cached(value, mask, kernel=value.ndim >= 2)
            state.append((variable, index, segment.shape))
        return state

    def track_other(self, model, layers, mapped):
        """Tracks the weights of ``model`` (whose `ft_keras.sparsify.walk_layers` are
        ``layers``) that are neither mapped to the cache nor masks."""
        skip = {id(v) for v in mapped} | {id(v) for v in self.other_variables}
        skip |= {id(layer.kernel_mask) for layer in layers if _is_masked(layer)}
        for variable in model.weights:
            if id(variable) not in skip:
                self.other_variables.append(variable)
                skip.add(id(variable))

    def finish(self):
        """Creates the stored variables and drops what the export does not use."""
        stored = self.storage.finish(self)
        if not len(self.index_cache):
            del self.index_cache
        if not self.other_variables:
            del self.other_variables
        if not self.opaque_models:
            del self.opaque_models
        for name in ("float_cache", "index_cache"):
            cache = getattr(self, name, None)
            if cache is not None:
                with tf.init_scope():
                    cache.resource_handle  # pylint: disable=pointless-statement
        return stored

    def initialize(self):
        """Fills the caches in process (a loaded SavedModel fills its own)."""
        for name in ("float_cache", "index_cache"):
            cache = getattr(self, name, None)
            if cache is not None:
                cache._initialize()  # pylint: disable=protected-access
        return self


# --------------------------------------------------------------------------------------------
# States and the per-example checks.


def _members_of(state, members):
    """The state as a list of M tensors."""
    kind, value = state
    if kind == _SHARED:
        return [value] * members
    if kind == _GROUPED:
        return tf.unstack(value, num=members)
    if kind == _CHANNELS:
        return tf.split(value, members, axis=-1)
    return list(value)


def _as_grouped(state, members):
    """The state as one tensor (M, B, ...)."""
    kind, value = state
    if kind == _GROUPED:
        return value
    if kind == _CHANNELS:
        # (B, ..., M * C) -> (B, ..., M, C) -> (M, B, ..., C)
        channels = value.shape[-1] // members
        inner = [d if d is not None else tf.shape(value)[i] for i, d in
                 enumerate(value.shape[:-1])]
        rank = value.shape.rank
        split = tf.reshape(value, inner + [members, channels])
        return tf.transpose(split, [rank - 1] + list(range(rank - 1)) + [rank])
    return tf.stack(_members_of(state, members))


def _as_channels(state, members):
    """The state as one tensor (B, ..., M * C)."""
    kind, value = state
    if kind == _CHANNELS:
        return value
    return tf.concat(_members_of(state, members), axis=-1)


def _example_sums(tensor, batch_axis):
    """Graph code: the sum of ``tensor`` over every axis but ``batch_axis`` (one per example)."""
    rank = tensor.shape.rank
    return tf.reduce_sum(tensor, axis=[a for a in range(rank) if a != batch_axis])


def _merge_members(x):
    """(M, B, ...) -> (M * B, ...), keeping the static sizes of the other axes."""
    inner = [d if d is not None else tf.shape(x)[i + 2] for i, d in enumerate(x.shape[2:])]
    return tf.reshape(x, [-1] + inner)


def _split_members(y, members):
    """(M * B, ...) -> (M, B, ...)."""
    inner = [d if d is not None else tf.shape(y)[i + 1] for i, d in enumerate(y.shape[1:])]
    return tf.reshape(y, [members, -1] + inner)


# --------------------------------------------------------------------------------------------
# Steps: each maps a state to (state, per-example check sums or None).


def _store_kernels(module, layers):
    """Stores the kernel of each layer (masked: positions from the mask; plain: from the
    nonzero values); returns their segments."""
    segments = []
    for layer in layers:
        if _is_masked(layer):
            kernel = keras.ops.convert_to_numpy(layer.masked_kernel)
            mask = keras.ops.convert_to_numpy(layer.kernel_mask)
        else:
            kernel, mask = keras.ops.convert_to_numpy(layer.kernel), None
        segments.append(module.storage.add(kernel, mask))
    return segments


class _DenseStep:
    """A Dense layer of M >= 1 members (one position of aligned chains, or one member)."""

    def __init__(self, module, layers, input_kind, sparse_kernels, grouped):
        self.module = module
        self.layers = list(layers)
        self.members = len(self.layers)
        self.shared_input = input_kind == _SHARED
        first = self.layers[0]
        self.segments = _store_kernels(module, self.layers)
        self.n_in, self.n_out = (int(d) for d in self.segments[0].shape)
        self.activation = first.activation
        self.nnz = sum(segment.nnz for segment in self.segments)
        has_zeros = self.nnz < self.members * self.n_in * self.n_out
        if sparse_kernels != "dense" and has_zeros:
            self.kernel = sparse_kernels
        elif grouped and self.members > 1:
            self.kernel = "grouped"
        else:
            self.kernel = "dense"
        self.output_kind = _GROUPED if self.kernel == "grouped" else _LIST
        cache = module.float_cache
        tensor = serving_storage.Storage.tensor
        if self.kernel == "grouped":
            self.kernel_index = cache.add(self._build_grouped)
        elif self.kernel == "dense":
            self.kernel_index = [cache.add(lambda d, s=segment: tensor(s, d))
                                 for segment in self.segments]
        else:
            self.kernel_index = [
                (module.index_cache.add(lambda d, s=segment: _transposed_coo(s, d)[0]),
                 cache.add(lambda d, s=segment: _transposed_coo(s, d)[1]))
                for segment in self.segments
            ]
        self.bias_index = None
        if first.use_bias:
            biases = [keras.ops.convert_to_numpy(layer.bias) for layer in self.layers]
            if self.kernel == "grouped":
                grouped = np.concatenate(biases) if self.shared_input else np.stack(biases)[
                    :, None, :]
                segment = module.storage.add(grouped, kernel=False)
                self.bias_index = cache.add(lambda d: tensor(segment, d))
                self.bias_shape = segment.shape
            else:
                segments = [module.storage.add(b, kernel=False) for b in biases]
                self.bias_index = [cache.add(lambda d, s=seg: tensor(s, d)) for seg in segments]
                self.bias_shape = (self.n_out,)

    def _build_grouped(self, decoded):
        kernels = [serving_storage.Storage.tensor(s, decoded) for s in self.segments]
        return tf.concat(kernels, axis=1) if self.shared_input else tf.stack(kernels)

    def _finish(self, pre, batch_axis):
        """Activation of the pre-activations ``pre``, and their per-example sums."""
        check = _example_sums(pre, batch_axis)
        return (pre if self.activation is None else self.activation(pre)), check

    def __call__(self, state):
        get = self.module.float_cache.get
        if self.kernel == "grouped":
            bias = None if self.bias_index is None else get(self.bias_index, self.bias_shape)
            return self._grouped(state, get, bias)
        outputs, checks = [], []
        for m, x in enumerate(_members_of(state, self.members)):
            flat = x.shape.rank == 2  # else a Dense on (batch, ..., n_in): rows flattened
            x2d = x if flat else tf.reshape(x, [-1, self.n_in])
            if self.kernel == "dense":
                y = tf.matmul(x2d, get(self.kernel_index[m], (self.n_in, self.n_out)))
            else:
                y = _sparse_product(self.module, self.kernel_index[m], x2d, self.n_in,
                                    self.n_out, self.kernel)
            if self.bias_index is not None:  # BiasAdd: Grappler fuses it into the MatMul
                y = tf.nn.bias_add(y, get(self.bias_index[m], self.bias_shape))
            if not flat:
                y = tf.reshape(y, tf.concat([tf.shape(x)[:-1], [self.n_out]], 0))
            y, check = self._finish(y, 0)
            outputs.append(y)
            checks.append(check)
        return (_LIST, outputs), tf.add_n(checks)

    def _grouped(self, state, get, bias):
        kind, x = state
        members, n_in, n_out = self.members, self.n_in, self.n_out
        if kind == _SHARED:
            flat = x.shape.rank == 2
            w = get(self.kernel_index, (n_in, members * n_out))
            y = tf.matmul(x if flat else tf.reshape(x, [-1, n_in]), w)
            if bias is not None:
                y = tf.nn.bias_add(y, bias)
            if flat:  # (B, M * n_out) -> (M, B, n_out)
                y, check = self._finish(y, 0)
                y = tf.transpose(tf.reshape(y, [-1, members, n_out]), [1, 0, 2])
                return (_GROUPED, y), check
            lead = tf.shape(x)[:-1]
            y, check = self._finish(tf.reshape(y, [lead[0], -1, members * n_out]), 0)
            # (B, rows, M * n_out) -> (M, B, ..., n_out)
            y = tf.transpose(tf.reshape(y, [-1, members, n_out]), [1, 0, 2])
            return (_GROUPED, tf.reshape(y, tf.concat([[members], lead, [n_out]], 0))), check
        x = _as_grouped(state, members)
        flat = x.shape.rank == 3
        w = get(self.kernel_index, (members, n_in, n_out))
        y = tf.matmul(x if flat else tf.reshape(x, [members, -1, n_in]), w)
        if bias is not None:
            y = y + bias
        if not flat:
            y = tf.reshape(y, tf.concat([[members], tf.shape(x)[1:-1], [n_out]], 0))
        y, check = self._finish(y, 1)
        return (_GROUPED, y), check

    def plan(self):
        return LayerPlan(
            layer="+".join(dict.fromkeys(layer.name for layer in self.layers)),
            members=self.members,
            shape=(self.n_in, self.n_out),
            nnz=self.nnz,
            storage=tuple(segment.group for segment in self.segments),
            kernels=self.kernel,
        )


def _transposed_coo(segment, decoded):
    """Graph code: int64 indices [nnz, 2] and values of W^T (row-major), for sparse products.

    Entries are the nonzeros of the rebuilt kernel (an active weight that is exactly 0 adds
    nothing to a product, so leaving it out changes no output).
    """
    transposed = tf.transpose(serving_storage.Storage.tensor(segment, decoded))
    where = tf.where(tf.not_equal(transposed, 0.0))
    return where, tf.gather_nd(transposed, where)


def _sparse_product(module, sparse_index, x2d, n_in, n_out, kernel):
    """Graph code: x2d (rows, n_in) @ W with W^T cached sparse (indices, values)."""
    index_i, value_i = sparse_index
    indices = module.index_cache.get(index_i, [None, 2])
    values = module.float_cache.get(value_i, [None])
    dense_shape = tf.constant([n_out, n_in], tf.int64)
    if kernel == "csr":
        return _tf_compat.csr_matmul(indices, values, dense_shape, x2d)
    product = tf.sparse.sparse_dense_matmul(
        tf.SparseTensor(indices, values, dense_shape), x2d, adjoint_b=True
    )
    return tf.transpose(product)


class _WeightlessStep:
    """A layer without weights, run once on the shared input or on all members' rows."""

    def __init__(self, layer, members, input_kind):
        self.layer = layer
        self.members = members
        self.output_kind = input_kind
        if input_kind == _CHANNELS and not _is_per_channel(layer):
            self.output_kind = _GROUPED

    def __call__(self, state):
        kind, x = state
        if kind in (_SHARED, _CHANNELS) and self.output_kind == kind:
            return (kind, self.layer(x, training=False)), None
        if kind == _LIST:
            return (kind, [self.layer(v, training=False) for v in x]), None
        y = self.layer(_merge_members(_as_grouped(state, self.members)), training=False)
        return (_GROUPED, _split_members(y, self.members)), None


class _ConvStep:
    """A convolution of M >= 2 aligned members as one convolution: the members' filters side
    by side; on the shared input the kernels concatenated, on the members' channels side by
    side a block-diagonal kernel. Its output is in the "channels" state."""

    output_kind = _CHANNELS

    def __init__(self, module, layers, input_kind):
        self.module = module
        self.layers = list(layers)
        self.members = len(self.layers)
        first = self.layers[0]
        self.segments = _store_kernels(module, self.layers)
        shape = self.segments[0].shape
        members = self.members
        if input_kind != _SHARED:
            # One ordinary convolution whose kernel holds member m's kernel at input channels
            # [m * C_in, (m + 1) * C_in) x output channels [m * C_out, (m + 1) * C_out), zeros
            # elsewhere (rebuilt at load: the zeros are not stored).
            self.kernel_shape = tuple(shape[:-2]) + (members * shape[-2], members * shape[-1])
            pad = [[0, 0]] * (len(shape) - 2)

            def build(d):
                blocks = [tf.pad(serving_storage.Storage.tensor(s, d),
                                 pad + [[m * shape[-2], (members - 1 - m) * shape[-2]], [0, 0]])
                          for m, s in enumerate(self.segments)]
                return tf.concat(blocks, axis=-1)
        else:
            self.kernel_shape = tuple(shape[:-1]) + (members * shape[-1],)

            def build(d):
                return tf.concat([serving_storage.Storage.tensor(s, d) for s in self.segments],
                                 axis=-1)
        self.nnz = sum(segment.nnz for segment in self.segments)
        self.kernel_index = module.float_cache.add(build)
        self.bias_index = None
        if first.use_bias:
            biases = np.concatenate([keras.ops.convert_to_numpy(layer.bias)
                                     for layer in self.layers])
            segment = module.storage.add(biases, kernel=False)
            self.bias_index = module.float_cache.add(
                lambda d: serving_storage.Storage.tensor(segment, d))
        self.layer = first

    def __call__(self, state):
        x = state[1] if state[0] == _SHARED else _as_channels(state, self.members)
        get = self.module.float_cache.get
        layer = self.layer
        y = keras.ops.conv(x, get(self.kernel_index, self.kernel_shape), strides=layer.strides,
                           padding=layer.padding, data_format="channels_last",
                           dilation_rate=layer.dilation_rate)
        if self.bias_index is not None:
            y = tf.nn.bias_add(y, get(self.bias_index, (self.kernel_shape[-1],)))
        check = _example_sums(y, 0)
        if layer.activation is not None:
            y = layer.activation(y)
        return (_CHANNELS, y), check

    def plan(self):
        kh_kw_in = int(np.prod(self.segments[0].shape[:-1]))
        return LayerPlan(
            layer="+".join(dict.fromkeys(layer.name for layer in self.layers)),
            members=self.members,
            shape=(kh_kw_in, int(self.segments[0].shape[-1])),
            nnz=self.nnz,
            storage=tuple(segment.group for segment in self.segments),
            kernels="grouped",
        )


class _KerasStep:
    """A layer (or a whole model) of one member run by Keras, its float weights read from the
    cache."""

    def __init__(self, module, layer):
        self.layer = layer
        self.module = module
        self.state = []
        is_model = isinstance(layer, keras.Model)
        targets = list(sparsify_lib.walk_layers(layer)) if is_model else [layer]
        for target in targets:
            self.state.extend(module.layer_state(target))
        if is_model:
            module.track_other(layer, targets, [variable for variable, _, _ in self.state])

    def __call__(self, x):
        if not self.state:
            return self.layer(x, training=False)
        mapping = [
            (variable, self.module.float_cache.get(index, shape))
            for variable, index, shape in self.state
        ]
        with keras.StatelessScope(state_mapping=mapping):
            return self.layer(x, training=False)


class _OpaqueStep:
    """A model wrapping a loaded SavedModel (`keras.layers.TFSMLayer`), called as it is.

    Its variables and resources belong to the loaded SavedModel: the export tracks the whole
    model (its weights are written as they are, not compactly).
    """

    def __init__(self, module, model):
        self.model = model
        module.opaque_models.append(model)

    def __call__(self, x):
        return self.model(x, training=False)


class _PerMemberStep:
    """One position run by each member's own step (Keras layers, whole models)."""

    output_kind = _LIST

    def __init__(self, steps):
        self.steps = steps

    def __call__(self, state):
        outputs = [step(x) for step, x in zip(self.steps, _members_of(state, len(self.steps)))]
        checks = [_example_sums(tf.cast(y, tf.float32), 0) for y in outputs]
        return (_LIST, outputs), tf.add_n(checks)


# --------------------------------------------------------------------------------------------
# The program.


def _steps(module, layers_by_position, members, sparse_kernels, group_members, opaque):
    """The steps of one group of aligned members (or of one member), and their Dense steps.

    ``group_members`` is one of GROUP_MODES; ``opaque``: the group is one opaque model
    (`is_opaque`), its only position.
    """
    steps, dense_steps = [], []
    kind = _SHARED
    for layers in layers_by_position:
        if opaque:
            step = _PerMemberStep([_OpaqueStep(module, layers[0])])
        elif all(_is_plain_dense(layer) for layer in layers):
            step = _DenseStep(module, layers, kind, sparse_kernels, group_members == "all")
            dense_steps.append(step)
        elif (group_members != "none" and members > 1
              and all(map(_is_groupable_conv, layers))):
            step = _ConvStep(module, layers, kind)
            dense_steps.append(step)
        elif not any(layer.weights for layer in layers) and not any(
                isinstance(layer, keras.Model) for layer in layers):
            step = _WeightlessStep(layers[0], members, kind)
        else:
            step = _PerMemberStep([_KerasStep(module, layer) for layer in layers])
        steps.append(step)
        kind = step.output_kind
    return steps, dense_steps


def build_program(module, models, *, sparse_kernels="dense", group_members="convolutions"):
    """A graph function for ``models`` (distinct objects) and the `LayerPlan` of its Dense steps.

    Args:
        module: the `ServingModule` that stores the weights.
        models: the members (built single-input Keras models).
        sparse_kernels: "dense", "csr" or "coo" (see the module doc).
        group_members: which positions of aligned members run as one op: "convolutions",
            "all" or "none" (see the module doc).

    Returns:
        ``(run, plan)``: ``run(x)`` returns ``(logits, check)``, the list of member logits
        (float32) and the per-example sums whose finiteness the serving function checks.
    """
    sparse_kernels = _checks.check_choice("sparse_kernels", sparse_kernels, SPARSE_KERNELS)
    group_members = _checks.check_choice("group_members", group_members, GROUP_MODES)
    return _build_program(module, models, sparse_kernels, group_members,
                          [is_opaque(model) for model in models])


def _build_program(module, models, sparse_kernels, group_members, opaque):
    """`build_program` of checked arguments; ``opaque``: `is_opaque` of each model."""
    chains = [None if flag else _chain(model) for model, flag in zip(models, opaque)]
    if _aligned(chains):
        groups = [(len(models), list(zip(*chains)), False)]
    else:
        groups = [(1, [(layer,) for layer in chain] if chain is not None else [(model,)], flag)
                  for model, chain, flag in zip(models, chains, opaque)]
    programs, plan = [], []
    for members, positions, group_opaque in groups:
        steps, dense_steps = _steps(module, positions, members, sparse_kernels, group_members,
                                    group_opaque)
        programs.append((members, steps))
        plan.extend(step.plan() for step in dense_steps)

    def run(x):
        logits, checks = [], []
        for members, steps in programs:
            state = (_SHARED, x)
            for step in steps:
                state, check = step(state)
                if check is not None:
                    checks.append(check)
            outputs = [tf.cast(y, tf.float32) for y in _members_of(state, members)]
            checks.extend(_example_sums(y, 0) for y in outputs)
            logits.extend(outputs)
        return logits, tf.add_n(checks)

    return run, plan
