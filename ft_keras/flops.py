"""Cost model: forward and ensemble-inference cost of dense and sparse models.

Convention: every function here counts **multiply-accumulates (MACs)**, one multiply plus one add,
per example unless its name or docstring says otherwise. Papers often quote FLOPs; for the layers
counted here FLOPs = 2 x MACs (`FLOPS_PER_MAC`, `macs_to_flops`). Ratios (`relative_cost`) are
the same under either convention. Hand anchor: LeNet-300-100 on 28x28 inputs costs
784*300 + 300*100 + 100*10 = 266,200 MACs per example dense.

What is counted (the forward cost of a sparse network is the sum over layers of density_l times
the layer's dense cost; see docs/method.md):

- ``Dense``: ``n_in * n_out`` per position; an input with more than two axes, ``(batch, d_1, ...,
  d_k, n_in)``, applies the kernel at ``d_1 * ... * d_k`` positions.
- ``Conv1D`` / ``Conv2D`` / ``Conv3D``: ``prod(output spatial dims) * prod(kernel dims) *
  c_in / groups * c_out``, i.e. output positions times the kernel's size. Padding, strides,
  dilation and ``data_format`` enter through the output shape; multiplies with zero padding
  ("same", "causal") are counted, as is usual.
- ``DepthwiseConv1D`` / ``DepthwiseConv2D``: ``prod(output spatial dims) * prod(kernel dims) *
  c_in * depth_multiplier``, again output positions times the kernel's size.
- Masked layers (`ft_keras.layers`): the same number of positions times the number of *active*
  kernel weights, i.e. the dense count times the mask's density ``active / size``. This is exact
  in integers: LeNet-300-100 at 90% uniform sparsity costs 23,520 + 3,000 + 100 = 26,620 MACs.
- Everything else counts 0: biases, activations, normalisation, pooling, element-wise ops and
  reshapes are small next to the kernels; layers with a kernel that ft_keras does not mask
  (``Conv2DTranspose``, ``SeparableConv2D``, ``Embedding``, ``EinsumDense``, recurrent and
  attention layers) are also 0 and are listed in `FlopsReport.uncounted`.

This is the *theoretical* cost of sparse arithmetic used by the RigL and FreeTickets papers. The
masked layers of this library store zeros and run the dense kernels, so wall-clock time does not
shrink with density.

Shapes come from the model's graph: every call of a layer in a Functional or Sequential model
(nested models included, and a nested model called twice counts twice) is counted with the
shapes of that call. For subclassed models, which have no graph, each layer is counted once with
the input shape it was built with. Non-batch dimensions must be known (build the model with
concrete input shapes).

The training cost of the recipes (``3 x`` forward per step, the dense gradient of RigL's update
steps) builds on these counts in `ft_keras.training_cost`.

Example:

>>> model = ft_keras.models.lenet_300_100()
>>> forward_macs(model)
266200
>>> sparse = ft_keras.sparsify(model, 0.9, distribution="uniform")
>>> forward_macs(sparse), forward_macs(sparse, dense=True)
(26620, 266200)
>>> print(flops_report(sparse))                                  # doctest: +SKIP
"""

import collections
import dataclasses

import keras
import numpy as np

from ft_keras import _checks
from ft_keras import _keras_compat
from ft_keras import layers as masked_layers
from ft_keras.sparsify import walk_layers

FLOPS_PER_MAC = 2
"""FLOPs per multiply-accumulate (one multiply and one add)."""

_DENSE_TYPES = (keras.layers.Dense,)
_CONV_TYPES = (
    keras.layers.Conv1D,
    keras.layers.Conv2D,
    keras.layers.Conv3D,
    keras.layers.DepthwiseConv1D,
    keras.layers.DepthwiseConv2D,
)


# ------------------------------------------------------------------------------ validation


def _check_density(density):
    return _checks.check_real("density", density, low=0.0, high=1.0, allow_none=True)


# ------------------------------------------------------------------------------ one layer
def is_counted(layer):
    """True for the layer types whose MACs are counted (Dense, convolutions, depthwise)."""
    return isinstance(layer, _DENSE_TYPES + _CONV_TYPES)


def _kernel_size_and_active(layer):
    """(kernel size, active weights) of a counted layer; active = size for unmasked layers."""
    if masked_layers.is_masked(layer):
        return layer.kernel_size_total, layer.num_active
    size = int(np.prod(layer.kernel.shape))
    return size, size


def _known(shape, layer, what):
    dims = tuple(shape)
    if any(d is None for d in dims[1:]):
        raise ValueError(
            f"layer {layer.name!r} has {what} shape {dims} with unknown non-batch dimensions; "
            "the cost needs concrete shapes (build the model with a fixed input shape)."
        )
    return tuple(int(d) for d in dims[1:])


def _positions(layer, input_shape, output_shape=None):
    """How many times one call applies the whole kernel, per example."""
    if isinstance(layer, _DENSE_TYPES):
        return int(np.prod(_known(input_shape, layer, "input")[:-1], dtype=np.int64))
    if output_shape is None:
        output_shape = layer.compute_output_shape(tuple(input_shape))
    out = _known(output_shape, layer, "output")
    spatial = out[:-1] if getattr(layer, "data_format", "channels_last") == "channels_last" else (
        out[1:]
    )
    return int(np.prod(spatial, dtype=np.int64))


def _built_input_shape(layer):
    nodes = getattr(layer, "_inbound_nodes", None) or []
    for node in nodes:
        if node.input_tensors:
            return tuple(node.input_tensors[0].shape), tuple(node.output_tensors[0].shape)
    shapes = getattr(layer, "_build_shapes_dict", None) or {}
    shape = shapes.get("input_shape")
    if shape is None and len(shapes) == 1:
        shape = next(iter(shapes.values()))
    if shape is None:
        raise ValueError(
            f"layer {layer.name!r} has no known input shape; build it (call it on data or an "
            "Input) or pass input_shape."
        )
    return tuple(shape), None


def _call_macs(layer, input_shape, output_shape=None, density=None):
    """(dense MACs, sparse MACs) of one call of a counted layer, per example."""
    positions = _positions(layer, input_shape, output_shape)
    size, active = _kernel_size_and_active(layer)
    dense = positions * size
    if density is not None:
        return dense, int(round(dense * density))
    return dense, positions * active


def layer_forward_macs(layer, density=None, input_shape=None):
    """Forward MACs per example of one call of a built layer.

    Args:
        layer: a built Keras layer. Dense, Conv1D/2D/3D and DepthwiseConv1D/2D (masked or not)
            are counted; any other layer gives 0 (see the module doc).
        density: optional density in [0, 1] to cost the layer at (the result is
            ``round(dense MACs * density)``). None: a masked layer uses its mask's density
            ``active / size`` (exactly ``positions * active``), a plain layer is dense.
        input_shape: optional input shape with a batch axis, e.g. ``(None, 8, 8, 3)``. None: the
            shape of the layer's first call in a graph, or the shape it was built with.

    Returns:
        An int: multiply-accumulates per example.

    Raises:
        TypeError: ``layer`` is not a Keras layer or ``density`` is not a number.
        ValueError: ``density`` outside [0, 1], an unbuilt layer or unknown shapes.
    """
    if not isinstance(layer, keras.layers.Layer) or isinstance(layer, keras.Model):
        raise TypeError(
            f"layer must be a keras.layers.Layer (not a model: use forward_macs); got "
            f"{type(layer).__name__}."
        )
    density = _check_density(density)
    if not is_counted(layer):
        return 0
    if not layer.built:
        raise ValueError(f"layer {layer.name!r} is not built; build it or call it on data first.")
    output_shape = None
    if input_shape is None:
        input_shape, output_shape = _built_input_shape(layer)
    return _call_macs(layer, tuple(input_shape), output_shape, density)[1]


# ------------------------------------------------------------------------------ a model
def _graph_of(model):
    """The Functional graph of a model: itself, a Sequential's inner graph, or None."""
    return _keras_compat.layer_graph(model)


@dataclasses.dataclass
class _Entry:
    layer: object
    path: str
    calls: int = 0
    dense: int = 0
    sparse: int = 0


def _collect(model, dense, entries, prefix):
    """Adds every counted layer call of ``model`` to ``entries`` (keyed by layer id)."""

    def add(layer, input_shape, output_shape):
        d, s = _call_macs(layer, input_shape, output_shape)
        entry = entries.setdefault(id(layer), _Entry(layer, prefix + layer.name))
        entry.calls += 1
        entry.dense += d
        entry.sparse += d if dense else s

    graph = _graph_of(model)
    if graph is None:  # subclassed: no graph, each tracked layer once with its build shape
        for layer in model.layers:
            if isinstance(layer, keras.Model):
                _collect(layer, dense, entries, prefix + layer.name + "/")
            elif is_counted(layer):
                add(layer, *_built_input_shape(layer))
            else:
                entries.setdefault(id(layer), _Entry(layer, prefix + layer.name))
        return
    by_depth = _keras_compat.nodes_by_depth(graph)
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            op = node.operation
            if isinstance(op, keras.Model):
                _collect(op, dense, entries, prefix + op.name + "/")
            elif isinstance(op, keras.layers.Layer) and not isinstance(op, keras.layers.InputLayer):
                if is_counted(op) and node.input_tensors:
                    out = node.output_tensors[0].shape if node.output_tensors else None
                    add(op, tuple(node.input_tensors[0].shape), out)
                else:
                    entries.setdefault(id(op), _Entry(op, prefix + op.name))


def _entries(model, dense):
    """Per-layer totals of a model, in `walk_layers` order (layers outside it last)."""
    _checks.check_model("model", model)
    dense = _checks.check_bool("dense", dense)
    entries = collections.OrderedDict()
    _collect(model, dense, entries, "")
    order = {id(layer): i for i, layer in enumerate(walk_layers(model))}
    return sorted(entries.values(), key=lambda e: order.get(id(e.layer), len(order)))


def _keys(entries):
    """Row keys: layer names, or nested paths where two different layers share a name."""
    names = [e.layer.name for e in entries]
    return [e.layer.name if names.count(e.layer.name) == 1 else e.path for e in entries]


def forward_macs_by_layer(model, dense=False):
    """Forward MACs per example of every counted layer, in graph order.

    Args:
        model: a built `keras.Model` (Sequential, Functional, nested models, or subclassed).
        dense: if True, masks are ignored and the sparse column equals the dense one.

    Returns:
        ``OrderedDict`` ``{layer name: (dense_macs, sparse_macs)}`` over the Dense / convolution
        layers, summed over all calls of a layer. A layer of a nested model whose name clashes
        with another layer's is keyed by its path, e.g. ``"inner/conv"``.

    Raises:
        TypeError: ``model`` is not a `keras.Model`.
        ValueError: the model is not built or a shape is unknown.
    """
    entries = [e for e in _entries(model, dense) if is_counted(e.layer)]
    return collections.OrderedDict(
        (key, (e.dense, e.sparse)) for key, e in zip(_keys(entries), entries)
    )


def forward_macs(model, dense=False):
    """Forward multiply-accumulates per example of a model.

    Args:
        model: a built `keras.Model`.
        dense: if True, the cost of the same architecture with every kernel dense; otherwise
            masked layers count their active weights only.

    Returns:
        An int: MACs per example (FLOPs are twice this).
    """
    _checks.check_model("model", model)
    return _forward_macs(model, _checks.check_bool("dense", dense))


def _forward_macs(model, dense):
    """`forward_macs` of a checked, built model (a sum: no layer order needed)."""
    entries = {}
    _collect(model, dense, entries, "")
    return sum(e.sparse for e in entries.values())


def macs_to_flops(macs):
    """FLOPs of a MAC count (``FLOPS_PER_MAC * macs``)."""
    return FLOPS_PER_MAC * _checks.check_int("macs", macs, minimum=0)


# ------------------------------------------------------------------------------ report
@dataclasses.dataclass(frozen=True)
class LayerMacs:
    """One row of a `FlopsReport`: forward MACs per example of one layer (all its calls)."""

    name: str
    kind: str
    calls: int
    dense_macs: int
    sparse_macs: int

    @property
    def density(self):
        """Sparse over dense MACs (the mask's density for a masked layer)."""
        return self.sparse_macs / self.dense_macs if self.dense_macs else 1.0


@dataclasses.dataclass(frozen=True)
class FlopsReport:
    """Per-layer and total forward MACs per example of a model (see `flops_report`).

    Attributes:
        model_name: the model's name.
        layers: tuple of `LayerMacs`, in graph order.
        uncounted: names of layers that own a kernel-like weight but are not counted (0 MACs).
    """

    model_name: str
    layers: tuple
    uncounted: tuple

    @property
    def dense_macs(self):
        """Forward MACs per example with every kernel dense."""
        return sum(row.dense_macs for row in self.layers)

    @property
    def sparse_macs(self):
        """Forward MACs per example with the masks applied."""
        return sum(row.sparse_macs for row in self.layers)

    @property
    def relative(self):
        """Sparse over dense forward cost."""
        return relative_cost(self.sparse_macs, self.dense_macs) if self.dense_macs else 1.0

    def as_dict(self):
        """A JSON-friendly dict of the rows and totals."""
        return {
            "model": self.model_name,
            "unit": "MACs per example (FLOPs = 2 x MACs)",
            "layers": [dict(dataclasses.asdict(row), density=row.density) for row in self.layers],
            "dense_macs": self.dense_macs,
            "sparse_macs": self.sparse_macs,
            "relative": self.relative,
            "uncounted": list(self.uncounted),
        }

    def __str__(self):
        head = (
            f"{'layer':<28} {'kind':<22} {'calls':>5} {'dense MACs':>14} {'sparse MACs':>14} "
            f"{'density':>8}"
        )
        lines = [f"forward cost of {self.model_name!r}, multiply-adds per example", head,
                 "-" * len(head)]
        for row in self.layers:
            lines.append(
                f"{row.name:<28.28} {row.kind:<22.22} {row.calls:>5d} {row.dense_macs:>14,d} "
                f"{row.sparse_macs:>14,d} {row.density:>8.4f}"
            )
        lines.append("-" * len(head))
        lines.append(
            f"{'total':<57} {self.dense_macs:>14,d} {self.sparse_macs:>14,d} "
            f"{self.relative:>8.4f}"
        )
        lines.append(
            f"forward FLOPs (2 x MACs): dense {macs_to_flops(self.dense_macs):,d}, "
            f"sparse {macs_to_flops(self.sparse_macs):,d}"
        )
        if self.uncounted:
            lines.append(f"not counted (0 MACs): {', '.join(self.uncounted)}")
        return "\n".join(lines)


def flops_report(model):
    """Per-layer and total forward MACs per example, dense and sparse, of a model.

    Args:
        model: a built `keras.Model`.

    Returns:
        A `FlopsReport`; ``print`` it for a table, ``as_dict()`` for JSON.
    """
    entries = _entries(model, dense=False)
    keys = _keys(entries)
    rows = tuple(
        LayerMacs(key, type(e.layer).__name__, e.calls, e.dense, e.sparse)
        for key, e in zip(keys, entries)
        if is_counted(e.layer)
    )
    uncounted = tuple(
        key for key, e in zip(keys, entries)
        if not is_counted(e.layer) and masked_layers.has_kernel(e.layer)
    )
    return FlopsReport(model.name, rows, uncounted)


# ------------------------------------------------------------------------------ ensembles
def inference_macs_ensemble(members_or_macs):
    """Forward MACs per example of an ensemble: the sum over its members.

    Args:
        members_or_macs: an `ft_keras.Ensemble`, or an iterable whose items are built Keras
            models (costed with `forward_macs`, masks applied) or non-negative numbers
            (MACs already counted). A member listed twice counts twice.

    Returns:
        The sum (an int when every item is an int or a model).
    """
    members = getattr(members_or_macs, "members", members_or_macs)
    if isinstance(members, (str, bytes, keras.Model)) or not hasattr(members, "__iter__"):
        raise TypeError(
            "members_or_macs must be an Ensemble or an iterable of models / MAC counts; got "
            f"{type(members_or_macs).__name__}."
        )
    total = 0
    count = 0
    for i, item in enumerate(members):
        count += 1
        if isinstance(item, keras.Model):
            total += forward_macs(item)
        elif _checks.is_real(item):
            if item < 0:
                raise ValueError(f"members_or_macs[{i}]={item!r} must be >= 0.")
            total += item
        else:
            raise TypeError(
                f"members_or_macs[{i}] must be a keras.Model or a number; got "
                f"{type(item).__name__}."
            )
    if not count:
        raise ValueError("members_or_macs is empty; an ensemble needs at least one member.")
    return total


def relative_cost(x, dense_reference):
    """``x / dense_reference`` as a float, e.g. a run's training MACs over one dense run's."""
    x = _checks.check_real("x", x, low=0.0)
    dense_reference = _checks.check_real("dense_reference", dense_reference, low=0.0,
                                         low_open=True)
    return x / dense_reference
