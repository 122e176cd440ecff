"""Cost model: forward, training and ensemble-inference cost of dense and sparse models.

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

Training cost (RigL, Evci et al. 2020, section 4 / appendix H; docs/method.md). With ``f_s``
the sparse and ``f_d`` the dense forward MACs per example, ``B`` the batch size and ``T`` the
number of optimizer steps:

- dense training: ``3 * f_d * B * T`` (forward, backward to the activations, backward to the
  weights, each about one forward);
- sparse step: ``3 * f_s * B``;
- ``grow="gradient"`` (RigL): a mask-update step computes the *dense* weight gradient, so it
  costs ``(2 * f_s + f_d) * B``: each update step adds ``(f_d - f_s) * B``;
- ``grow="momentum"`` (SNFS): the dense gradient is needed at every step (its moving average
  drives growth), so every step costs ``(2 * f_s + f_d) * B``;
- ``grow="random"`` (SET): no dense gradient, ``3 * f_s * B`` at every step.

The prune/grow selection itself (sorting magnitudes) is not counted. Active counts per layer are
constant during DST (the update rule keeps each layer's count; docs/method.md), so ``f_s`` is the
same at every step; pass the sparsified model.

The recipes of `ft_keras.recipes` report their cost with these functions:

- dense model and deep ensemble: `training_macs_dense`, `training_macs_deep_ensemble`;
- DST Ensemble: M x `training_macs_dst`;
- static sparse ensemble (masks fixed, never a dense gradient): `training_macs_static_sparse`,
  ``3 * f_s * B * T`` per member;
- EDST: `training_macs_edst` (``cumulative=True``: the cost spent when each ticket is complete);
- checkpoint ensemble (snapshots of one DST run at EDST's ticket epochs):
  `training_macs_checkpoint_ensemble`, i.e. one `training_macs_dst` run of EDST's length;
- PF ensemble (a dense run, pruned, then M fixed-mask fine-tunings): `training_macs_pf_ensemble`.

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
from ft_keras import schedules
from ft_keras.masks import GROW_MODES
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


def _check_int(argument, value, minimum):
    return _checks.check_int(argument, value, minimum=minimum)


def _check_model(model, argument="model"):
    """A built keras.Model (kept for `ft_keras.tickets`, which imports it; prefer
    ``_checks.check_model``)."""
    return _checks.check_model(argument, model)


def _check_grow(grow):
    return _checks.check_choice("grow", grow, GROW_MODES)


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
    _check_model(model)
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
    return sum(e.sparse for e in _entries(model, dense))


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


# ------------------------------------------------------------------------------ training
def dst_update_steps(steps, update_every, end_step=None, start_step=0):
    """The mask-update steps of a `ft_keras.DynamicSparsity` run of ``steps`` optimizer steps.

    Steps count from 1. Updates happen at multiples of ``update_every`` in
    ``(start_step, end_step)``, ``end_step`` exclusive. ``end_step=None`` means the end of
    training, as in the callback (``end_step = steps``), so the last step never updates: 10 steps
    with ``update_every=5`` update at step 5 only; ``end_step=11`` gives ``[5, 10]``.
    """
    steps = _check_int("steps", steps, 0)
    update_every = _check_int("update_every", update_every, 1)
    if end_step is not None:
        end_step = _check_int("end_step", end_step, 1)
    start_step = _check_int("start_step", start_step, 0)
    if end_step is not None and start_step >= end_step:
        raise ValueError(f"start_step={start_step} must be smaller than end_step={end_step}: with "
                         "start_step >= end_step the masks never change.")
    return schedules.update_steps(
        steps, update_every, steps if end_step is None else end_step, start_step
    )


def edst_update_steps(exploration_epochs, refine_epochs, num_tickets, steps_per_epoch,
                      update_every, end_step=None, start_step=0):
    """The mask-update steps of a `ft_keras.FreeTickets` (EDST) run, in increasing order.

    The regular DST updates over the whole plan (`dst_update_steps` with
    ``steps = plan epochs * steps_per_epoch``) plus one global exploration at the first step of
    each refinement phase after the first (step ``epoch * steps_per_epoch + 1``); a step that is
    both counts once.
    """
    plan = schedules.edst_plan(exploration_epochs, refine_epochs, num_tickets)
    steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch, 1)
    total = schedules.plan_epochs(plan) * steps_per_epoch
    regular = dst_update_steps(total, update_every, end_step, start_step)
    jumps = [e * steps_per_epoch + 1 for e in schedules.global_exploration_epochs(plan)]
    return sorted(set(regular) | set(jumps))


def _sparse_step_macs(model, batch_size, grow):
    """(MACs of one sparse training step, extra MACs of a mask-update step) for ``grow``."""
    f_s = forward_macs(model)
    f_d = forward_macs(model, dense=True)
    if grow == "momentum":
        return (2 * f_s + f_d) * batch_size, 0
    return 3 * f_s * batch_size, (f_d - f_s) * batch_size if grow == "gradient" else 0


def _sparse_training(model, boundaries, batch_size, updates, grow):
    """Training MACs of one sparse run spent by each step in ``boundaries`` (cumulative)."""
    step, extra = _sparse_step_macs(model, batch_size, grow)
    return [step * end + extra * sum(1 for u in updates if u <= end) for end in boundaries]


def training_macs_dense(model, steps, batch_size):
    """Training MACs of dense training: ``3 * f_d * batch_size * steps``.

    Masks are ignored: the cost of the model's architecture trained dense.

    Args:
        model: a built `keras.Model` (dense or sparsified).
        steps: optimizer steps, >= 0.
        batch_size: examples per step, >= 1.
    """
    steps = _check_int("steps", steps, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    return 3 * forward_macs(model, dense=True) * batch_size * steps


def training_macs_static_sparse(model, steps, batch_size):
    """Training MACs of sparse training with fixed masks (`ft_keras.StaticSparsity`).

    ``3 * f_s * batch_size * steps``: the masks never change, so no step needs the dense
    gradient. Used for the static sparse ensemble and the PF ensemble's fine-tuning.

    Args:
        model: the sparsified model (its masks give ``f_s``).
        steps: optimizer steps, >= 0.
        batch_size: examples per step, >= 1.
    """
    _check_model(model)
    steps = _check_int("steps", steps, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    return 3 * forward_macs(model) * batch_size * steps


def training_macs_dst(model, steps, batch_size, update_every, end_step=None, grow="gradient",
                      start_step=0):
    """Training MACs of one dynamic-sparse-training run (`ft_keras.DynamicSparsity`).

    ``3 * f_s * B * T``, plus ``(f_d - f_s) * B`` at each update step of `dst_update_steps` for
    ``grow="gradient"``; ``(2 * f_s + f_d) * B * T`` for ``grow="momentum"`` (dense gradient at
    every step); ``3 * f_s * B * T`` for ``grow="random"`` (see the module doc).

    Args:
        model: the sparsified model (its masks give ``f_s``).
        steps: optimizer steps T, >= 0.
        batch_size: examples per step B, >= 1.
        update_every, end_step, start_step: the callback's schedule (``end_step`` exclusive;
            None: the end of training).
        grow: "gradient", "random" or "momentum".

    Returns:
        An int: total multiply-accumulates of the run.
    """
    _check_model(model)
    batch_size = _check_int("batch_size", batch_size, 1)
    grow = _check_grow(grow)
    updates = dst_update_steps(steps, update_every, end_step, start_step)
    return _sparse_training(model, [steps], batch_size, updates, grow)[0]


def _ticket_boundaries(exploration_epochs, refine_epochs, num_tickets, steps_per_epoch):
    """The last step of each refinement phase of the EDST plan (where ticket i is complete)."""
    plan = schedules.edst_plan(exploration_epochs, refine_epochs, num_tickets)
    steps_per_epoch = _check_int("steps_per_epoch", steps_per_epoch, 1)
    return [p.end_epoch * steps_per_epoch for p in plan if p.kind == "refinement"]


def training_macs_edst(model, exploration_epochs, refine_epochs, num_tickets, steps_per_epoch,
                       batch_size, update_every, end_step=None, grow="gradient", start_step=0,
                       cumulative=False):
    """Training MACs of one EDST run (`ft_keras.FreeTickets`) that yields ``num_tickets`` tickets.

    One DST run over ``(exploration_epochs + num_tickets * refine_epochs) * steps_per_epoch``
    steps whose update steps are `edst_update_steps` (regular updates plus the global
    explorations); the formula is `training_macs_dst`'s.

    Args:
        model: the sparsified model.
        exploration_epochs, refine_epochs, num_tickets: the plan (`ft_keras.schedules.edst_plan`).
        steps_per_epoch: optimizer steps per epoch, >= 1.
        batch_size, update_every, end_step, grow, start_step: as in `training_macs_dst`.
        cumulative: if True, return a list: the MACs spent when ticket i is complete (at the
            end of refinement phase i, update steps up to it included); the last item is the
            whole run's cost, and ``list[k - 1]`` the cost of an ensemble of the first k tickets.

    Returns:
        An int (or a list of ``num_tickets`` ints with ``cumulative=True``).
    """
    _check_model(model)
    batch_size = _check_int("batch_size", batch_size, 1)
    grow = _check_grow(grow)
    cumulative = _checks.check_bool("cumulative", cumulative)
    boundaries = _ticket_boundaries(exploration_epochs, refine_epochs, num_tickets,
                                    steps_per_epoch)
    updates = edst_update_steps(exploration_epochs, refine_epochs, num_tickets, steps_per_epoch,
                                update_every, end_step, start_step)
    costs = _sparse_training(model, boundaries, batch_size, updates, grow)
    return costs if cumulative else costs[-1]


def training_macs_checkpoint_ensemble(model, exploration_epochs, refine_epochs, num_snapshots,
                                      steps_per_epoch, batch_size, update_every, end_step=None,
                                      grow="gradient", start_step=0, cumulative=False):
    """Training MACs of a checkpoint ensemble: snapshots of ONE DST run at EDST's ticket epochs.

    The run is as long as the EDST run of the same plan
    (``exploration_epochs + num_snapshots * refine_epochs`` epochs) but has only the regular
    DST updates (`dst_update_steps`), no global exploration; the formula is `training_macs_dst`'s.

    Args:
        model: the sparsified model.
        exploration_epochs, refine_epochs, num_snapshots: the EDST plan whose ticket windows the
            snapshots follow.
        steps_per_epoch, batch_size, update_every, end_step, grow, start_step: as in
            `training_macs_edst`.
        cumulative: if True, a list: the MACs spent when snapshot i is taken (end of window i).

    Returns:
        An int (or a list of ``num_snapshots`` ints with ``cumulative=True``).
    """
    _check_model(model)
    batch_size = _check_int("batch_size", batch_size, 1)
    grow = _check_grow(grow)
    cumulative = _checks.check_bool("cumulative", cumulative)
    num_snapshots = _check_int("num_snapshots", num_snapshots, 1)
    boundaries = _ticket_boundaries(exploration_epochs, refine_epochs, num_snapshots,
                                    steps_per_epoch)
    updates = dst_update_steps(boundaries[-1], update_every, end_step, start_step)
    costs = _sparse_training(model, boundaries, batch_size, updates, grow)
    return costs if cumulative else costs[-1]


def training_macs_deep_ensemble(model, num_members, steps, batch_size):
    """Training MACs of a deep ensemble: ``num_members`` dense runs of ``steps`` steps each."""
    num_members = _check_int("num_members", num_members, 1)
    return num_members * training_macs_dense(model, steps, batch_size)


def training_macs_pf_ensemble(model, num_members, dense_steps, finetune_steps, batch_size,
                              cumulative=False):
    """Training MACs of a prune-and-fine-tune (PF) ensemble.

    One dense run of ``dense_steps`` (``3 * f_d * B`` per step), then ``num_members`` fine-tuning
    runs of ``finetune_steps`` with the pruned mask fixed (``3 * f_s * B`` per step,
    `training_macs_static_sparse`).

    Args:
        model: the pruned (sparsified) model: ``f_s`` from its masks, ``f_d`` with them ignored.
        num_members: M >= 1.
        dense_steps, finetune_steps: optimizer steps of the dense run and of each fine-tuning.
        batch_size: examples per step.
        cumulative: if True, a list: the MACs spent when member i is complete (the dense run is
            paid before the first member).

    Returns:
        An int (or a list of ``num_members`` ints with ``cumulative=True``).
    """
    num_members = _check_int("num_members", num_members, 1)
    cumulative = _checks.check_bool("cumulative", cumulative)
    dense = training_macs_dense(model, dense_steps, batch_size)
    finetune = training_macs_static_sparse(model, finetune_steps, batch_size)
    costs = [dense + (i + 1) * finetune for i in range(num_members)]
    return costs if cumulative else costs[-1]


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
