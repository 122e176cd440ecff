"""Serving SavedModels for tickets and ensembles: compact sparse storage, sparse kernels, fusion.

`export_models` writes one or several Keras models (a ticket, or an ensemble's members) as a
SavedModel that TF Serving runs unchanged (stock TensorFlow ops only). Its ``serving_default``
signature takes ``inputs`` (float32, ``(None,) + input_shape``) and returns what the caller's
``head`` makes of the stacked member logits (`ft_keras.tickets` and `ft_keras.Ensemble` document
their outputs).

**Storage.** A masked kernel is stored as its active values (float32) plus their positions,
in whichever of two encodings is smaller: a packed bitmask (1 bit per kernel position) or
compressed rows (an int32 row pointer per kernel row and a uint16 column index per active
weight; int32 when a row has more than 65,536 columns). A kernel dense enough that neither
saves bytes is stored whole, as are biases and other weights. All of it goes into four
variables (`_Storage`). What the kernels need at serving time (dense kernels, or the indices of
sparse ones) is rebuilt from them once, when the SavedModel is loaded (``tf.saved_model.load``
or TF Serving), into an in-memory cache: a TensorList held by a resource variable and filled by
a resource initializer (`_Cache`); nothing of it is written to disk, and reading it copies
nothing. An M-member ensemble at density d thus stores about ``M * d * 4 + M / 8`` bytes per
dense-kernel position (bitmask), against 4 for one dense model.

**Kernels.** Each masked Dense layer is computed by one of three kernels:

- ``"dense"``: ``x @ W`` with W rebuilt dense in the cache (masks baked in);
- ``"csr"``: TensorFlow's CSR sparse matrix product (``SparseMatrixMatMul``); the CSR matrix is
  built at every call from indices cached at load time (``SparseTensorToCSRSparseMatrix``, about
  3.6 ns per active weight): a CSR matrix cannot be kept between calls in a SavedModel that
  ``tf.saved_model.load`` accepts (its shape inference needs handle data that only the
  building op gives, and the loader re-infers every function);
- ``"coo"``: ``tf.sparse.sparse_dense_matmul`` on the same cached indices (no build step; the
  fastest for one example at a time, slow for large batches).

``sparse_kernels="auto"`` (the default) chooses per layer *and per request*: a cost model of
the three kernels (`KERNEL_COST_US`, fitted by ``bench/serving.py --calibrate`` on this
project's 2-core CPU; see docs/benchmarks.md, "Serving") gives, for the layer's shape and
number of active weights, the batch sizes at which each kernel is the fastest, and the serving
graph switches on the request's batch size. Small layers stay dense at every batch size.
A masked Conv2D can be computed as im2col patches (``tf.image.extract_patches``) times a sparse
matrix; "auto" weighs it with the same model plus the cost of the patches (`CONV_PATCH_US`)
and, on this CPU, keeps convolutions dense (the patches path won only for a wide 3x3 conv,
256 -> 256 channels at density 0.02 and batch 1, by 0.82x, and lost by 1.6x to 7x in the other
calibration rows). Conv1D, Conv3D and
depthwise convolutions are always dense (stored compactly). ``"dense"``, ``"csr"`` and
``"coo"`` force one kernel for every masked Dense and Conv2D layer.

**Members.** Each member's products are separate ops, so that the runtime runs members in
parallel (on 2 cores that beats one big product). Members that are the same chain of layers (the
tickets of one run always are) can also be evaluated together: ``fuse="always"`` computes each
Dense position of all members as one product (kernels side by side for the shared input, one
batched product after); ``fuse="auto"`` does so from the batch size `FUSE_MIN_BATCH` (None:
fusion never paid on this CPU, see the calibration). Members that are not chains (residual
connections) are evaluated by their own Keras layers with the kernels read from the cache.

**Requests.** The serving function refuses a request whose shape is not ``(batch,) +
input_shape`` (an InvalidArgumentError whose message names the signature and the expected
shape) or that holds NaN or Inf (the message lists the first offending rows). A request of
another dtype is refused by TensorFlow before the graph runs. An empty batch returns empty
outputs.

Example:

>>> head = lambda member_logits: {"logits": member_logits[0]}
>>> export_models([sparse_model], "/tmp/sm/1", head)                 # doctest: +SKIP
'/tmp/sm/1'
>>> [(r.layer, r.kernels) for r in kernel_plan([sparse_model])]       # doctest: +SKIP
[('fc1', 'dense'), ('fc2', 'coo<2<=dense<8<=csr'), ('logits', 'dense')]
"""

import dataclasses
import os
import uuid

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.eager import context
from tensorflow.python.ops import gen_resource_variable_ops
from tensorflow.python.ops import list_ops
from tensorflow.python.ops.linalg.sparse import sparse_csr_matrix_ops
from tensorflow.python.trackable import resource as tf_resource

from ft_keras import _checks
from ft_keras import layers as masked_layer_lib
from ft_keras import sparsify as sparsify_lib

SERVING_SIGNATURE = "serving_default"
SERVING_INPUT = "inputs"
SPARSE_KERNELS = ("auto", "dense", "csr", "coo")
STORAGE_MODES = ("compact", "dense")
FUSE_MODES = ("auto", "never", "always")

# Microseconds for one Dense layer y = x @ W called through a serving function (x: `batch`
# rows of n_in; W: n_in x n_out with `nnz` active weights), fitted by
# `bench/serving.py --calibrate` on this project's 2-core CPU (TF 2.21; 92 points, shapes
# 256x256 to 4096x4096, densities 0.01 to 0.3, batch 1 to 256, min of alternating rounds; COO
# fitted on batch <= `COO_MAX_BATCH`, the only batches where it ever won; median relative
# error 12-18%; the rule picks the fastest kernel, or one within 10% of it, at 83 of the 92
# points, and otherwise mostly stays dense; data and fit in docs/serving_calibration.json):
#   dense: c[0] + c[1] * n_in * n_out + c[2] * n_in * n_out * batch
#   csr:   c[0] + c[1] * nnz + c[2] * nnz * batch + c[3] * (n_in + n_out) * batch
#   coo:   c[0] + c[1] * nnz + c[2] * nnz * batch
# The constant terms hold the call's own overhead (~0.25 ms); only their differences matter.
KERNEL_COST_US = {
    "dense": (268.0, 1.58e-4, 8.71e-6),
    "csr": (357.0, 6.87e-3, 4.38e-5, 1.70e-3),
    "coo": (242.0, 2.47e-3, 3.81e-4),
}
# COO is considered up to this batch size only (its cost per row grows with the batch).
COO_MAX_BATCH = 8
# A sparse kernel is used only where the model predicts it at least this much faster.
SPARSE_MARGIN = 0.8
# Smallest batch from which one product for all members (kernels side by side or batched)
# beats one product per member, for dense kernels; None: never. Measured by
# `bench/serving.py --calibrate`: never on this 2-core CPU, where the members' products run in
# parallel (M = 3 LeNet-300-100 and MLP-1024 ensembles, batch 1 to 1,024: fused / per member
# 0.80 to 1.47, below 0.95 only at one batch size).
FUSE_MIN_BATCH = None
# Microseconds per patch value (batch * output positions * kernel_h * kernel_w * in_channels)
# of the im2col patches a Conv2D computed by a sparse product needs, from the same
# calibration's convolution rows (about 0.8e-3 to 3e-3; dense convolutions never pay it).
CONV_PATCH_US = 2.0e-3
# Batch sizes above which the cost model is not trusted (not measured): the kernel chosen for
# this batch size is used for all larger batches.
_MAX_MODELLED_BATCH = 4096

_UINT16_LIMIT = 1 << 16


# --------------------------------------------------------------------------------------------
# Argument checks and model shapes.


def model_input_shape(model, argument="model"):
    """The input shape of a single-input model without the batch axis, e.g. ``(28, 28, 1)``.

    Raises:
        ValueError: the model has several inputs, or no known input (an unbuilt or subclassed
            model never called on a `keras.Input`).
    """
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ValueError(
            f"{argument}={model.name!r} has no known input shape; build it from a keras.Input "
            "(Sequential with keras.Input, or a Functional model)."
        )
    if len(inputs) != 1:
        raise ValueError(
            f"{argument}={model.name!r} has {len(inputs)} inputs; only single-input models are "
            "supported."
        )
    return tuple(inputs[0].shape[1:])


def model_output_shape(model, argument="model"):
    """The output shape of a single-output model without the batch axis, e.g. ``(10,)``."""
    outputs = getattr(model, "outputs", None)
    if not outputs:
        raise ValueError(
            f"{argument}={model.name!r} has no known output shape; build it from a keras.Input."
        )
    if len(outputs) != 1:
        raise ValueError(
            f"{argument}={model.name!r} has {len(outputs)} outputs; only single-output models "
            "(one logits tensor) are supported."
        )
    return tuple(outputs[0].shape[1:])


def check_finite_weights(model, argument="model"):
    """Raises ValueError if a weight of ``model`` holds NaN or Inf, naming layer and variable.

    A ticket or an export is never written from such a model (a diverged run): it would serve
    NaN, or confident nonsense.
    """
    _checks.check_model(argument, model)
    for layer in sparsify_lib.walk_layers(model):
        for variable in layer.weights:
            value = np.asarray(keras.ops.convert_to_numpy(variable))
            if value.dtype.kind != "f":
                continue
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            if bad:
                raise ValueError(
                    f"{argument}={model.name!r}: layer {layer.name!r}, variable "
                    f"{variable.path!r} holds {bad} non-finite value(s) (NaN or Inf) out of "
                    f"{value.size}; refusing to write it (did training diverge?)."
                )
    return model


def check_fuse(fuse):
    """``fuse`` as one of `FUSE_MODES` (True means "auto", False "never")."""
    if isinstance(fuse, (bool, np.bool_)):
        return "auto" if fuse else "never"
    return _checks.check_choice("fuse", fuse, FUSE_MODES)


# --------------------------------------------------------------------------------------------
# Compact storage of one kernel (numpy side).


@dataclasses.dataclass
class PackedKernel:
    """One kernel in compact form (see the module doc, "Storage").

    The kernel is seen as a matrix of ``rows = prod(shape[:-1])`` by ``cols = shape[-1]``;
    ``values`` lists its active entries in row-major order.

    Attributes:
        shape: the kernel shape.
        encoding: "full" (``values`` is the whole kernel), "bitmask" (``bits``: one bit per
            position, little-endian within a byte) or "rows" (``row_ptr`` and ``cols``).
        values: float32 active values (all values for "full").
        bits, row_ptr, col_index: the positions, per encoding (None otherwise).
        nnz: number of active weights.
    """

    shape: tuple
    encoding: str
    values: np.ndarray
    nnz: int
    bits: np.ndarray = None
    row_ptr: np.ndarray = None
    col_index: np.ndarray = None

    @property
    def size(self):
        return int(np.prod(self.shape))

    @property
    def rows(self):
        return self.size // self.shape[-1]

    @property
    def cols(self):
        return self.shape[-1]

    @property
    def nbytes(self):
        """Bytes of the stored arrays."""
        return sum(
            int(a.nbytes)
            for a in (self.values, self.bits, self.row_ptr, self.col_index)
            if a is not None
        )

    def dense(self):
        """The kernel as a dense float32 array (zeros off-mask)."""
        if self.encoding == "full":
            return self.values.reshape(self.shape)
        flat = np.zeros(self.size, np.float32)
        flat[self.positions()] = self.values
        return flat.reshape(self.shape)

    def positions(self):
        """Flat (row-major) positions of the active weights, ascending."""
        if self.encoding == "full":
            return np.arange(self.size)
        if self.encoding == "bitmask":
            mask = np.unpackbits(self.bits, count=self.size, bitorder="little").astype(bool)
            return np.flatnonzero(mask)
        rows = np.repeat(np.arange(self.rows, dtype=np.int64), np.diff(self.row_ptr))
        return rows * self.cols + self.col_index.astype(np.int64)


def pack_kernel(kernel, mask=None):
    """The smallest compact form of ``kernel`` restricted to ``mask`` (None: all active).

    Args:
        kernel: float array (any shape with at least one axis).
        mask: bool array of the kernel's shape, or None.

    Returns:
        A `PackedKernel`; ``packed.dense()`` equals ``where(mask, kernel, 0)`` exactly.
    """
    kernel = np.asarray(kernel, np.float32)
    shape = tuple(int(d) for d in kernel.shape)
    if mask is None:
        return PackedKernel(shape, "full", kernel.reshape(-1).copy(), kernel.size)
    mask = np.asarray(mask, bool).reshape(shape)
    flat_mask = mask.reshape(-1)
    values = kernel.reshape(-1)[flat_mask].copy()
    nnz = int(values.size)
    size = int(kernel.size)
    cols = shape[-1]
    rows = size // cols
    col_bytes = 2 if cols <= _UINT16_LIMIT else 4
    sizes = {
        "full": 4 * size,
        "bitmask": 4 * nnz + (size + 7) // 8,
        "rows": 4 * nnz + col_bytes * nnz + 4 * (rows + 1),
    }
    encoding = min(("bitmask", "rows", "full"), key=lambda name: sizes[name])
    if encoding == "full":
        full = np.where(mask, kernel, np.zeros_like(kernel)).reshape(-1)
        return PackedKernel(shape, "full", full, size)
    if encoding == "bitmask":
        bits = np.packbits(flat_mask, bitorder="little")
        return PackedKernel(shape, "bitmask", values, nnz, bits=bits)
    mask2d = flat_mask.reshape(rows, cols)
    row_ptr = np.concatenate([[0], np.cumsum(mask2d.sum(axis=1))]).astype(np.int32)
    col_index = np.nonzero(mask2d)[1].astype(np.uint16 if col_bytes == 2 else np.int32)
    return PackedKernel(shape, "rows", values, nnz, row_ptr=row_ptr, col_index=col_index)


# --------------------------------------------------------------------------------------------
# The storage inside the SavedModel, and what is rebuilt from it at load time.


@dataclasses.dataclass
class _Segment:
    """Where one array lives in the stored variables (offsets resolved by `_Storage.finish`)."""

    group: str  # "bitmask", "rows" or "full"
    shape: tuple
    nnz: int
    index: int  # position in its group
    base: int = 0  # start in the group's dense space ("bitmask", "rows") or in `values`


class _Storage:
    """Packs the arrays of an export into four variables and decodes them in the graph.

    ``values`` (float32) holds the active values of the bitmask-encoded kernels, then those of
    the row-encoded kernels, then every array stored whole (biases, unmasked kernels, other
    weights); ``bits`` (uint8) one bitmask over all bitmask-encoded kernels end to end;
    ``row_ptr`` (int32) and ``col_index`` (uint16, or int32 when a kernel has more than 65,536
    columns) the compressed rows of all row-encoded kernels end to end. Decoding (at load time
    only) scatters the values into one dense buffer per group and slices it.
    """

    def __init__(self):
        self.segments = []
        self._packed = []  # (segment, PackedKernel)
        self.finished = False
        self.variables = {}
        self._row_tables = None

    def add(self, array, mask=None):
        """Registers a float array (with its mask, for a masked kernel); returns its segment."""
        if self.finished:
            raise RuntimeError("storage is finished")
        packed = pack_kernel(array, mask)
        group = packed.encoding
        segment = _Segment(group, packed.shape, packed.nnz, len(self.segments))
        self.segments.append(segment)
        self._packed.append((segment, packed))
        return segment

    def finish(self, module):
        """Resolves offsets and creates the variables on ``module``; returns the bytes stored."""
        values = {"bitmask": [], "rows": [], "full": []}
        masks, row_ptrs, col_indexes = [], [], []
        row_tables = []  # (rows, cols, base) per row-encoded kernel
        dense_size = {"bitmask": 0, "rows": 0}
        for segment, packed in self._packed:
            values[segment.group].append(packed.values)
            if segment.group == "full":
                continue
            segment.base = dense_size[segment.group]
            dense_size[segment.group] += packed.size
            if segment.group == "bitmask":
                masks.append(np.unpackbits(packed.bits, count=packed.size, bitorder="little"))
            else:
                row_ptrs.append(np.diff(packed.row_ptr))
                col_indexes.append(packed.col_index.astype(np.int64))
                row_tables.append((packed.rows, packed.cols, segment.base))
        offset = 0
        for group in ("bitmask", "rows"):
            offset += sum(v.size for v in values[group])
        for segment, packed in self._packed:
            if segment.group == "full":
                segment.base = offset
                offset += packed.size
        self.dense_size = dense_size
        arrays = {"values": np.concatenate(
            [v for group in ("bitmask", "rows", "full") for v in values[group]]
            or [np.zeros(0, np.float32)]).astype(np.float32)}
        if masks:
            arrays["bits"] = np.packbits(np.concatenate(masks), bitorder="little")
        if row_ptrs:
            counts = np.concatenate(row_ptrs)
            arrays["row_ptr"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
            cols = np.concatenate(col_indexes)
            wide = any(c > _UINT16_LIMIT for _, c, _ in row_tables)
            arrays["col_index"] = cols.astype(np.int32 if wide else np.uint16)
            self._row_tables = row_tables
        self.nbytes = sum(int(a.nbytes) for a in arrays.values())
        for name, array in arrays.items():
            variable = tf.Variable(array, trainable=False, name=name)
            self.variables[name] = variable
            setattr(module, f"stored_{name}", variable)
        self.finished = True
        self._packed = [(segment, None) for segment, _ in self._packed]
        return self.nbytes

    def decode(self):
        """Graph code: the dense buffers of the two groups (built once per initializer)."""
        decoded = {"values": self.variables["values"]}
        n_bitmask = sum(s.nnz for s in self.segments if s.group == "bitmask")
        n_rows = sum(s.nnz for s in self.segments if s.group == "rows")
        values = decoded["values"]
        if "bits" in self.variables:
            shifts = tf.constant(np.arange(8, dtype=np.uint8))
            bits = tf.bitwise.right_shift(tf.expand_dims(self.variables["bits"], -1), shifts)
            mask = tf.reshape(tf.bitwise.bitwise_and(bits, 1), [-1])[: self.dense_size["bitmask"]]
            positions = tf.where(tf.cast(mask, tf.bool))
            decoded["bitmask"] = tf.scatter_nd(
                positions, values[:n_bitmask], [self.dense_size["bitmask"]]
            )
        if "row_ptr" in self.variables:
            rows_per_kernel = np.array([r for r, _, _ in self._row_tables], np.int64)
            cols_per_kernel = np.array([c for _, c, _ in self._row_tables], np.int64)
            first_row = np.concatenate([[0], np.cumsum(rows_per_kernel)[:-1]])
            # Start of global row r in the dense space: base + (r - first_row) * cols.
            offset = np.array([b for _, _, b in self._row_tables], np.int64) - first_row * (
                cols_per_kernel)
            kernel_of_row = tf.repeat(tf.range(len(rows_per_kernel), dtype=tf.int64),
                                      tf.constant(rows_per_kernel))
            row = tf.range(int(rows_per_kernel.sum()), dtype=tf.int64)
            row_start = tf.gather(tf.constant(offset), kernel_of_row) + row * tf.gather(
                tf.constant(cols_per_kernel), kernel_of_row)
            row_ptr = self.variables["row_ptr"]
            starts = tf.repeat(row_start, row_ptr[1:] - row_ptr[:-1])
            positions = starts + tf.cast(self.variables["col_index"], tf.int64)
            decoded["rows"] = tf.scatter_nd(
                tf.expand_dims(positions, 1), values[n_bitmask:n_bitmask + n_rows],
                [self.dense_size["rows"]],
            )
        # One split per group gives every segment's flat array.
        parts = {}
        for group in ("bitmask", "rows", "full"):
            segments = sorted((s for s in self.segments if s.group == group),
                              key=lambda s: s.base)
            if not segments:
                continue
            sizes = [int(np.prod(s.shape)) for s in segments]
            if group == "full":
                start = segments[0].base
                source = values[start:start + sum(sizes)]
            else:
                source = decoded[group]
            pieces = tf.split(source, sizes) if len(sizes) > 1 else [source]
            for segment, piece in zip(segments, pieces):
                parts[segment.index] = piece
        decoded["parts"] = parts
        return decoded

    @staticmethod
    def tensor(segment, decoded):
        """Graph code: the dense array of ``segment`` (float32, its shape)."""
        return tf.reshape(decoded["parts"][segment.index], segment.shape)


class _Cache(tf_resource.TrackableResource):
    """Tensors rebuilt from the stored variables when the SavedModel is loaded.

    A TensorList held by a resource variable; TF Serving and ``tf.saved_model.load`` run
    `_initialize` after restoring the variables. Nothing of it is written to disk. Reading an
    element returns the tensor without copying it.
    """

    def __init__(self, storage, dtype):
        self._storage = storage
        self._dtype = dtype
        self._builders = []
        self._name = f"ft_keras_cache_{uuid.uuid4().hex}"
        super().__init__()

    def add(self, build):
        """Registers ``build(decoded)`` (returns a tensor); returns its index in the list."""
        self._builders.append(build)
        return len(self._builders) - 1

    def __len__(self):
        return len(self._builders)

    def _create_resource(self):
        # In-process (eager) caches are anonymous and freed with the module; in the SavedModel
        # the name is fixed, so that a TF Serving session finds the same variable at every run
        # (two loads of one SavedModel in one Python process share it: same contents).
        shared = context.anonymous_name() if tf.executing_eagerly() else self._name
        return gen_resource_variable_ops.var_handle_op(
            dtype=tf.variant, shape=[], shared_name=shared
        )

    def _initialize(self):
        decoded = self._storage.decode()
        tensor_list = list_ops.empty_tensor_list(element_shape=None, element_dtype=self._dtype)
        for build in self._builders:
            tensor_list = list_ops.tensor_list_push_back(tensor_list, build(decoded))
        return gen_resource_variable_ops.assign_variable_op(self.resource_handle, tensor_list)

    def get(self, index, shape):
        """Graph code: element ``index`` (static ``shape``, None for unknown dimensions)."""
        tensor_list = gen_resource_variable_ops.read_variable_op(self.resource_handle, tf.variant)
        element_shape = [-1 if d is None else int(d) for d in shape]
        return list_ops.tensor_list_get_item(
            tensor_list, index, element_dtype=self._dtype, element_shape=element_shape
        )


# --------------------------------------------------------------------------------------------
# Kernel choice.


def kernel_costs(n_in, n_out, nnz, batch):
    """Predicted microseconds of each kernel for one Dense layer (see `KERNEL_COST_US`)."""
    d, c, o = KERNEL_COST_US["dense"], KERNEL_COST_US["csr"], KERNEL_COST_US["coo"]
    size = float(n_in) * float(n_out)
    return {
        "dense": d[0] + d[1] * size + d[2] * size * batch,
        "csr": c[0] + c[1] * nnz + c[2] * nnz * batch + c[3] * (n_in + n_out) * batch,
        "coo": o[0] + o[1] * nnz + o[2] * nnz * batch,
    }


def _best_kernel(n_in, n_out, nnz, batch):
    costs = kernel_costs(n_in, n_out, nnz, batch)
    candidates = ("csr", "coo") if batch <= COO_MAX_BATCH else ("csr",)
    sparse = min(candidates, key=lambda k: costs[k])
    return sparse if costs[sparse] <= SPARSE_MARGIN * costs["dense"] else "dense"


def kernel_schedule(n_in, n_out, nnz, sparse_kernels="auto"):
    """The kernels a Dense layer uses, by batch size: a list of ``(min_batch, kernel)``.

    The first entry has ``min_batch`` 1; each kernel serves the batch sizes from its
    ``min_batch`` up to the next entry's. For "auto" the entries come from the cost model
    (`kernel_costs`, batch sizes 1 to 4,096; larger batches use the kernel chosen for 4,096).

    Example:

    >>> kernel_schedule(784, 300, 47040)
    [(1, 'dense')]
    """
    mode = _checks.check_choice("sparse_kernels", sparse_kernels, SPARSE_KERNELS)
    if mode != "auto":
        return [(1, mode)]
    schedule = []
    for batch in range(1, _MAX_MODELLED_BATCH + 1):
        kernel = _best_kernel(n_in, n_out, nnz, batch)
        if not schedule or schedule[-1][1] != kernel:
            schedule.append((batch, kernel))
    return schedule


# --------------------------------------------------------------------------------------------
# What each member computes: chains of layers, Dense and Conv2D steps.


@dataclasses.dataclass
class LayerPlan:
    """One Dense position (or masked Conv2D) of an export, as `kernel_plan` reports it.

    Attributes:
        layer: the layer name (members' names joined with "+" when they differ).
        members: how many members this step covers (the members of an aligned ensemble; 1
            for a single model or a member that is not aligned).
        shape: (n_in, n_out) of one member's kernel (for a Conv2D: kh * kw * in_channels, out).
        nnz: active weights of all the members covered.
        storage: the encoding of each member's kernel ("full", "bitmask", "rows").
        kernels: the kernel by batch size, e.g. "dense" or "coo<2<=dense<8<=csr" (COO for
            batch 1, dense from 2, CSR from 8); "fused": one product for all members.
    """

    layer: str
    members: int
    shape: tuple
    nnz: int
    storage: tuple
    kernels: str


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


def _is_sparse_conv2d(layer):
    """A masked Conv2D that `_ConvStep` can compute as im2col patches + a sparse product."""
    return (
        _is_masked(layer)
        and _plain_class(layer) is keras.layers.Conv2D
        and getattr(layer, "groups", 1) == 1
        and getattr(layer, "data_format", "channels_last") == "channels_last"
        and str(getattr(layer, "padding", "")).lower() in ("valid", "same")
        and not getattr(layer, "lora_enabled", False)
        and not getattr(layer, "quantization_mode", None)
        and _is_float32(layer)
    )


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
    """What must be equal for layers of different members to be fused."""
    config = dict(layer.get_config())
    config.pop("name", None)
    config.pop("trainable", None)
    return (_plain_class(layer).__name__, repr(sorted(config.items())))


def _fusable(chains):
    if any(chain is None for chain in chains) or len(chains) < 2:
        return False
    if len({len(chain) for chain in chains}) != 1:
        return False
    for layers in zip(*chains):
        if len({_layer_signature(layer) for layer in layers}) != 1:
            return False
    return True


class _ServingModule(tf.Module):
    """What a serving SavedModel tracks: the stored variables and the load-time caches."""

    def __init__(self):
        super().__init__(name="ft_keras_serving")
        self.storage = _Storage()
        self.float_cache = _Cache(self.storage, tf.float32)
        self.index_cache = _Cache(self.storage, tf.int64)
        self.other_variables = []
        self.opaque_models = []

    def cached(self, array, mask=None):
        """Stores ``array`` (masked kernel or plain array); returns (segment, cache index)."""
        segment = self.storage.add(array, mask)
        index = self.float_cache.add(lambda decoded: _Storage.tensor(segment, decoded))
        return segment, index

    def layer_state(self, layer):
        """Cache entries for every float weight of ``layer``: [(variable, index, shape)].

        The mask of a masked layer is folded into its kernel's storage; weights that are not
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
            segment, index = self.cached(value, mask)
            state.append((variable, index, segment.shape))
        return state

    def track_other(self, model, mapped):
        """Tracks the weights of ``model`` that are neither mapped to the cache nor masks."""
        skip = {id(v) for v in mapped} | {id(v) for v in self.other_variables}
        skip |= {
            id(layer.kernel_mask)
            for layer in sparsify_lib.walk_layers(model)
            if _is_masked(layer)
        }
        for variable in model.weights:
            if id(variable) not in skip:
                self.other_variables.append(variable)
                skip.add(id(variable))

    def finish(self):
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


class _DenseStep:
    """A Dense layer of M >= 1 members (one position of aligned chains).

    Maps the members' inputs (one shared tensor, or a list of M tensors) to a list of M
    outputs. Strategies, switched on the batch size by ``schedule``: "dense" (one product per
    member; on a 2-core CPU the M products run in parallel), "fused" (one product for all
    members: kernels side by side for a shared input, a batch of kernels otherwise), "csr" and
    "coo" (one sparse product per member).
    """

    def __init__(self, module, layers, shared_input, sparse_kernels, fuse):
        self.module = module
        self.layers = list(layers)
        self.members = len(self.layers)
        self.shared_input = shared_input
        first = self.layers[0]
        self.segments = []
        for layer in self.layers:
            if _is_masked(layer):
                kernel = keras.ops.convert_to_numpy(layer.masked_kernel)
                mask = keras.ops.convert_to_numpy(layer.kernel_mask)
            else:
                kernel, mask = keras.ops.convert_to_numpy(layer.kernel), None
            self.segments.append(module.storage.add(kernel, mask))
        self.n_in, self.n_out = (int(d) for d in self.segments[0].shape)
        self.activation = first.activation
        self.nnz = sum(segment.nnz for segment in self.segments)
        masked = any(_is_masked(layer) for layer in self.layers)
        self.schedule = _step_schedule(self.n_in, self.n_out, self.nnz // self.members,
                                       masked and self.nnz > 0, sparse_kernels,
                                       fuse if self.members > 1 else "never")
        strategies = {strategy for _, strategy in self.schedule}
        cache = module.float_cache
        self.dense_index = self.fused_index = self.sparse_index = None
        if "dense" in strategies:
            self.dense_index = [
                cache.add(lambda d, s=segment: _Storage.tensor(s, d)) for segment in self.segments
            ]
        if "fused" in strategies:
            self.fused_index = cache.add(self._build_fused)
        if strategies & {"csr", "coo"}:
            self.sparse_index = []
            for segment in self.segments:
                self.sparse_index.append((
                    module.index_cache.add(lambda d, s=segment: _transposed_coo(s, d)[0]),
                    cache.add(lambda d, s=segment: _transposed_coo(s, d)[1]),
                ))
        self.bias_index = None
        if first.use_bias:
            biases = np.stack([keras.ops.convert_to_numpy(layer.bias) for layer in self.layers])
            segment = module.storage.add(biases)
            self.bias_index = cache.add(lambda d: _Storage.tensor(segment, d))

    def _build_fused(self, decoded):
        kernels = [_Storage.tensor(segment, decoded) for segment in self.segments]
        if self.shared_input:
            return tf.concat(kernels, axis=1)
        return tf.stack(kernels)

    # -- serving-time graph
    def _sparse_product(self, x2d, member, kernel):
        return _sparse_product(self.module, self.sparse_index[member], x2d, self.n_in,
                               self.n_out, kernel)

    def _products(self, xs2d, strategy, bias):
        """M outputs (rows, n_out) before activation, from M inputs (rows, n_in)."""
        get = self.module.float_cache.get
        if strategy == "fused":
            if self.shared_input:
                w = get(self.fused_index, (self.n_in, self.members * self.n_out))
                y = tf.matmul(xs2d[0], w)
                if bias is not None:
                    y = y + tf.reshape(bias, [-1])
                if self.activation is not None:
                    y = self.activation(y)
                return tf.split(y, self.members, axis=1)
            w = get(self.fused_index, (self.members, self.n_in, self.n_out))
            y = tf.matmul(tf.stack(xs2d), w)
            if bias is not None:
                y = y + tf.expand_dims(bias, 1)
            if self.activation is not None:
                y = self.activation(y)
            return tf.unstack(y, num=self.members)
        outputs = []
        biases = tf.unstack(bias, num=self.members) if bias is not None else None
        for m, x2d in enumerate(xs2d):
            if strategy == "dense":
                y = tf.matmul(x2d, get(self.dense_index[m], (self.n_in, self.n_out)))
            else:
                y = self._sparse_product(x2d, m, strategy)
            if bias is not None:
                y = y + biases[m]
            if self.activation is not None:
                y = self.activation(y)
            outputs.append(y)
        return outputs

    def __call__(self, xs):
        """``xs``: one tensor (shared input) or a list of M; returns a list of M tensors."""
        if self.shared_input:
            xs = [xs]
        lead = tf.shape(xs[0])[:-1]
        xs2d = [tf.reshape(x, [-1, self.n_in]) for x in xs]
        if self.shared_input:
            xs2d = xs2d * self.members
        bias = None
        if self.bias_index is not None:
            bias = self.module.float_cache.get(self.bias_index, (self.members, self.n_out))
        if len(self.schedule) == 1:
            ys = self._products(xs2d, self.schedule[0][1], bias)
        else:
            rows = tf.shape(xs2d[0])[0]
            branches = [
                (rows >= start, (lambda s=strategy: self._products(xs2d, s, bias)))
                for start, strategy in reversed(self.schedule[1:])
            ]
            first = self.schedule[0][1]
            ys = tf.case(branches, default=lambda: self._products(xs2d, first, bias),
                         exclusive=False)
        shape = tf.concat([lead, [self.n_out]], 0)
        return [tf.reshape(y, shape) for y in ys]

    def plan(self):
        names = "+".join(dict.fromkeys(layer.name for layer in self.layers))
        text = "".join(
            (f"<{start}<=" if i else "") + strategy
            for i, (start, strategy) in enumerate(self.schedule)
        )
        return LayerPlan(
            layer=names,
            members=self.members,
            shape=(self.n_in, self.n_out),
            nnz=self.nnz,
            storage=tuple(segment.group for segment in self.segments),
            kernels=text,
        )


def _transposed_coo(segment, decoded):
    """Graph code: int64 indices [nnz, 2] and values of W^T (row-major), for sparse products.

    Entries are the nonzeros of the rebuilt kernel (an active weight that is exactly 0 adds
    nothing to a product, so leaving it out changes no output).
    """
    transposed = tf.transpose(_Storage.tensor(segment, decoded))
    where = tf.where(tf.not_equal(transposed, 0.0))
    return where, tf.gather_nd(transposed, where)


def _step_schedule(n_in, n_out, nnz, masked, sparse_kernels, fuse):
    """``[(min_batch, strategy)]`` of a Dense position (see `_DenseStep`)."""
    mode = _checks.check_choice("sparse_kernels", sparse_kernels, SPARSE_KERNELS)
    if masked and mode in ("csr", "coo"):
        return [(1, mode)]
    if fuse == "always":
        return [(1, "fused")]
    schedule = []
    for batch in range(1, _MAX_MODELLED_BATCH + 1):
        kernel = "dense"
        if masked and mode == "auto":
            kernel = _best_kernel(n_in, n_out, nnz, batch)
        if kernel == "dense" and fuse == "auto" and FUSE_MIN_BATCH is not None and (
                batch >= FUSE_MIN_BATCH):
            kernel = "fused"
        if not schedule or schedule[-1][1] != kernel:
            schedule.append((batch, kernel))
    return schedule


def _sparse_product(module, sparse_index, x2d, n_in, n_out, kernel):
    """Graph code: x2d (rows, n_in) @ W with W^T cached sparse (indices, values)."""
    index_i, value_i = sparse_index
    indices = module.index_cache.get(index_i, [None, 2])
    values = module.float_cache.get(value_i, [None])
    dense_shape = tf.constant([n_out, n_in], tf.int64)
    if kernel == "csr":
        matrix = sparse_csr_matrix_ops.sparse_tensor_to_csr_sparse_matrix(
            indices, values, dense_shape
        )
        return sparse_csr_matrix_ops.sparse_matrix_mat_mul(
            matrix, x2d, transpose_b=True, transpose_output=True
        )
    product = tf.sparse.sparse_dense_matmul(
        tf.SparseTensor(indices, values, dense_shape), x2d, adjoint_b=True
    )
    return tf.transpose(product)


class _ConvStep:
    """A masked Conv2D of one member: the dense convolution, or im2col patches + a sparse
    product (``schedule`` by batch size, as for Dense layers; see `conv_schedule`)."""

    def __init__(self, module, layer, sparse_kernels):
        self.module = module
        self.layer = layer
        kernel = keras.ops.convert_to_numpy(layer.masked_kernel)
        mask = keras.ops.convert_to_numpy(layer.kernel_mask)
        self.segment = module.storage.add(kernel, mask)
        self.kernel_shape = tuple(int(d) for d in kernel.shape)
        kh, kw, c_in, self.n_out = self.kernel_shape
        self.n_in = kh * kw * c_in
        self.nnz = self.segment.nnz
        out_shape = tuple(layer.output.shape[1:3])
        self.positions = int(np.prod(out_shape)) if None not in out_shape else None
        self.schedule = conv_schedule(self.n_in, self.n_out, self.nnz, self.positions,
                                      sparse_kernels)
        strategies = {strategy for _, strategy in self.schedule}
        cache = module.float_cache
        self.dense_index = None
        if "dense" in strategies:
            self.dense_index = cache.add(lambda d: _Storage.tensor(self.segment, d))
        self.sparse_index = None
        if strategies & {"csr", "coo"}:
            flat = _Segment(self.segment.group, (self.n_in, self.n_out), self.nnz,
                            self.segment.index, self.segment.base)
            self.sparse_index = (module.index_cache.add(lambda d: _transposed_coo(flat, d)[0]),
                                 cache.add(lambda d: _transposed_coo(flat, d)[1]))
        self.bias_index = None
        if layer.use_bias:
            bias = module.storage.add(keras.ops.convert_to_numpy(layer.bias))
            self.bias_index = cache.add(lambda d: _Storage.tensor(bias, d))

    def _apply(self, x, strategy):
        layer = self.layer
        if strategy == "dense":
            kernel = self.module.float_cache.get(self.dense_index, self.kernel_shape)
            return keras.ops.conv(x, kernel, strides=layer.strides, padding=layer.padding,
                                  data_format="channels_last",
                                  dilation_rate=layer.dilation_rate)
        kh, kw = self.kernel_shape[:2]
        patches = tf.image.extract_patches(
            x, sizes=[1, kh, kw, 1], strides=[1, *layer.strides, 1],
            rates=[1, *layer.dilation_rate, 1], padding=layer.padding.upper())
        lead = tf.shape(patches)[:3]
        y = _sparse_product(self.module, self.sparse_index, tf.reshape(patches, [-1, self.n_in]),
                            self.n_in, self.n_out, strategy)
        return tf.reshape(y, tf.concat([lead, [self.n_out]], 0))

    def __call__(self, x):
        if len(self.schedule) == 1:
            y = self._apply(x, self.schedule[0][1])
        else:
            batch = tf.shape(x)[0]
            branches = [(batch >= start, (lambda s=strategy: self._apply(x, s)))
                        for start, strategy in reversed(self.schedule[1:])]
            first = self.schedule[0][1]
            y = tf.case(branches, default=lambda: self._apply(x, first), exclusive=False)
        if self.bias_index is not None:
            y = y + self.module.float_cache.get(self.bias_index, (self.n_out,))
        if self.layer.activation is not None:
            y = self.layer.activation(y)
        return y

    def plan(self):
        text = "".join((f"<{start}<=" if i else "") + strategy
                       for i, (start, strategy) in enumerate(self.schedule))
        return LayerPlan(layer=self.layer.name, members=1, shape=(self.n_in, self.n_out),
                         nnz=self.nnz, storage=(self.segment.group,), kernels=text)


class _PlanGroup:
    """The `LayerPlan` of one position computed by a step per member (Conv2D)."""

    def __init__(self, steps):
        self.steps = steps

    def plan(self):
        plans = [step.plan() for step in self.steps]
        first = plans[0]
        return LayerPlan(
            layer="+".join(dict.fromkeys(p.layer for p in plans)),
            members=len(plans),
            shape=first.shape,
            nnz=sum(p.nnz for p in plans),
            storage=tuple(p.storage[0] for p in plans),
            kernels=first.kernels if len({p.kernels for p in plans}) == 1
            else " / ".join(p.kernels for p in plans),
        )


def conv_schedule(n_in, n_out, nnz, positions, sparse_kernels="auto"):
    """``[(min_batch, kernel)]`` of a masked Conv2D with ``positions`` output positions per
    example, as a product of (batch * positions) patches of n_in values with an n_in x n_out
    kernel: the Dense cost model plus the patches' extraction (`CONV_PATCH_US`)."""
    mode = _checks.check_choice("sparse_kernels", sparse_kernels, SPARSE_KERNELS)
    if mode != "auto":
        return [(1, mode)]
    if positions is None:
        return [(1, "dense")]
    schedule = []
    for batch in range(1, _MAX_MODELLED_BATCH + 1):
        rows = batch * positions
        costs = kernel_costs(n_in, n_out, nnz, rows)
        candidates = ("csr", "coo") if rows <= COO_MAX_BATCH else ("csr",)
        sparse = min(candidates, key=lambda k: costs[k])
        patches = CONV_PATCH_US * rows * n_in
        kernel = sparse if costs[sparse] + patches <= SPARSE_MARGIN * costs["dense"] else "dense"
        if not schedule or schedule[-1][1] != kernel:
            schedule.append((batch, kernel))
    return schedule


class _KerasStep:
    """A layer (or a whole model) evaluated by Keras, its float weights read from the cache."""

    def __init__(self, module, layer):
        self.layer = layer
        self.module = module
        self.state = []
        targets = sparsify_lib.walk_layers(layer) if isinstance(layer, keras.Model) else [layer]
        for target in targets:
            self.state.extend(module.layer_state(target))
        if isinstance(layer, keras.Model):
            module.track_other(layer, [variable for variable, _, _ in self.state])

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


def _is_opaque(model):
    return any(
        isinstance(layer, keras.layers.TFSMLayer) for layer in sparsify_lib.walk_layers(model)
    )


def _program(module, models, sparse_kernels, fuse):
    """A callable x -> list of member logits for ``models`` (distinct objects), and its Dense
    steps. Aligned chains are evaluated position by position (Dense positions fusable);
    other members one by one."""
    chains = [None if _is_opaque(model) else _chain(model) for model in models]
    if len(models) > 1 and _fusable(chains):
        groups = [list(chains)]
    else:
        groups = [[chain if chain is not None else [model]] for model, chain in zip(models, chains)]
    programs = []
    dense_steps = []
    for group in groups:
        steps = []
        shared = True
        for layers in zip(*group):
            if isinstance(layers[0], keras.Model) and _is_opaque(layers[0]):
                steps.append(("keras", [_OpaqueStep(module, layers[0])]))
                shared = False
            elif all(_is_plain_dense(layer) for layer in layers):
                step = _DenseStep(module, layers, shared, sparse_kernels, fuse)
                dense_steps.append(step)
                steps.append(("dense", step))
                shared = False
            elif all(_is_sparse_conv2d(layer) for layer in layers):
                convs = [_ConvStep(module, layer, sparse_kernels) for layer in layers]
                dense_steps.append(_PlanGroup(convs))
                steps.append(("keras", convs))
                shared = False
            elif not any(layer.weights for layer in layers) and not any(
                    isinstance(layer, keras.Model) for layer in layers):
                steps.append(("weightless", _KerasStep(module, layers[0])))
            else:
                steps.append(("keras", [_KerasStep(module, layer) for layer in layers]))
                shared = False
        programs.append((len(group), steps))

    def run(x):
        outputs = []
        for members, steps in programs:
            state = x  # a shared tensor until the first layer with weights, then a list
            shared = True
            for kind, step in steps:
                if kind == "dense":
                    state = step(state)
                    shared = False
                elif kind == "weightless":
                    state = step(state) if shared else [step(s) for s in state]
                else:
                    state = ([member(state) for member in step] if shared
                             else [member(s) for member, s in zip(step, state)])
                    shared = False
            outputs.extend([state] * members if shared else state)
        return outputs

    return run, dense_steps


def _request_checks(inputs, input_shape):
    """Asserts that ``inputs`` is (batch,) + input_shape and finite; returns it.

    The shape is checked twice: an Assert whose message names the signature (Grappler may fold
    its rank test away, using the signature's static rank) and `tf.ensure_shape`, which it
    keeps ("... is not compatible with expected shape [?, ...]").
    """
    rank = len(input_shape) + 1
    shape = tf.shape(inputs)
    padded = tf.concat([shape, tf.zeros([rank], tf.int32)], axis=0)[:rank]
    known = [i + 1 for i, dim in enumerate(input_shape) if dim is not None]  # None: any size
    shape_ok = tf.logical_and(
        tf.equal(tf.size(shape), rank),
        tf.reduce_all(tf.equal(tf.gather(padded, known),
                               tf.constant([input_shape[i - 1] for i in known], tf.int32))),
    )
    expected = (None,) + tuple(input_shape)
    check_shape = tf.debugging.Assert(
        shape_ok,
        [
            f"{SERVING_SIGNATURE} expects {SERVING_INPUT}: float32 of shape {expected} (a batch "
            "of examples); got shape",
            shape,
        ],
        name="check_request_shape",
    )
    with tf.control_dependencies([check_shape]):
        inputs = tf.ensure_shape(inputs, expected, name="check_request_rank")
        flat = tf.reshape(inputs, [shape[0], -1])
        finite_rows = tf.reduce_all(tf.math.is_finite(flat), axis=1)
        bad_rows = tf.where(tf.logical_not(finite_rows))[:10, 0]
        check_finite = tf.debugging.Assert(
            tf.reduce_all(finite_rows),
            [
                f"{SERVING_SIGNATURE}: {SERVING_INPUT} holds NaN or Inf; requests must be "
                "finite. Offending rows (first 10):",
                bad_rows,
            ],
            name="check_request_finite",
        )
    with tf.control_dependencies([check_finite]):
        return tf.identity(inputs)


def build_serving(models, head, *, sparse_kernels="auto", fuse="auto", argument="models"):
    """The tf.Module and the `tf.function` of a serving SavedModel for ``models``.

    Args:
        models: a non-empty list of built single-input Keras models that output logits and
            share their input shape (not checked again here; `export_models` checks them).
        head: a callable mapping stacked member logits (M, B, ..., K) (float32) to the dict of
            outputs.
        sparse_kernels: "auto", "dense", "csr" or "coo" (see the module doc).
        fuse: "auto" (from `FUSE_MIN_BATCH` on), "always" or "never" (True / False accepted).
        argument: how to name ``models`` in errors.

    Returns:
        ``(module, serve, plan)``: the module to save, the serving `tf.function` (input
        signature ``inputs``), and the `LayerPlan` rows of its Dense and Conv2D positions.
        In process, call `initialize` on the module before calling ``serve``.
    """
    sparse_kernels = _checks.check_choice("sparse_kernels", sparse_kernels, SPARSE_KERNELS)
    fuse = check_fuse(fuse)
    models = list(models)
    input_shape = model_input_shape(models[0], f"{argument}[0]")
    module = _ServingModule()
    # The same model object appearing twice is evaluated once and stored once.
    unique = list({id(m): m for m in models}.values())
    run, dense_steps = _program(module, unique, sparse_kernels, fuse)
    order = [next(i for i, u in enumerate(unique) if u is m) for m in models]
    plan = [step.plan() for step in dense_steps]

    def member_logits(x):
        logits = [tf.cast(y, tf.float32) for y in run(x)]
        return tf.stack([logits[i] for i in order])

    module.finish()
    spec = tf.TensorSpec((None,) + tuple(input_shape), tf.float32, name=SERVING_INPUT)

    @tf.function(input_signature=[spec], autograph=False)
    def serve(inputs):
        inputs = _request_checks(inputs, input_shape)
        return head(member_logits(inputs))

    return module, serve, plan


def initialize(module):
    """Fills the caches of an in-process module (a loaded SavedModel fills its own)."""
    for name in ("float_cache", "index_cache"):
        cache = getattr(module, name, None)
        if cache is not None:
            cache._initialize()  # pylint: disable=protected-access
    return module


def kernel_plan(models, *, sparse_kernels="auto", fuse="auto"):
    """The `LayerPlan` of every Dense layer that `export_models` would write for ``models``."""
    models = _check_models(models)
    _, _, plan = build_serving(
        models, lambda logits: {"logits": logits}, sparse_kernels=sparse_kernels, fuse=fuse
    )
    return plan


def _check_models(models, argument="models"):
    if isinstance(models, keras.Model):
        models = [models]
    if not isinstance(models, (list, tuple)) or not models:
        raise TypeError(f"{argument} must be a keras.Model or a non-empty list of them; got "
                        f"{type(models).__name__}.")
    for i, model in enumerate(models):
        _checks.check_model(f"{argument}[{i}]", model)
        model_input_shape(model, f"{argument}[{i}]")
    return list(models)


def write_saved_model(module, serve, path):
    """Saves ``module`` with ``serve`` as the ``serving_default`` signature at ``path``."""
    tf.saved_model.save(
        module, path, signatures={SERVING_SIGNATURE: serve.get_concrete_function()}
    )
    return path


def _legacy_export(models, head, path):
    """Today's layout before compact storage: stripped members, dense kernels, one by one."""
    plains = {}
    for model in models:
        if id(model) not in plains:
            try:
                plains[id(model)] = sparsify_lib.strip(model) if any(
                    _is_masked(layer) for layer in sparsify_lib.walk_layers(model)
                ) else model
            except TypeError:
                plains[id(model)] = model
    input_shape = model_input_shape(models[0])
    spec = tf.TensorSpec((None,) + tuple(input_shape), tf.float32, name=SERVING_INPUT)

    @tf.function(input_signature=[spec], autograph=False)
    def serve(inputs):
        inputs = _request_checks(inputs, input_shape)
        logits = tf.stack(
            [tf.cast(plains[id(m)](inputs, training=False), tf.float32) for m in models]
        )
        return head(logits)

    archive = keras.export.ExportArchive()
    for plain in plains.values():
        archive.track(plain)
    archive.add_endpoint(name=SERVING_SIGNATURE, fn=serve, input_signature=[spec])
    archive.write_out(path, verbose=False)
    return path


def export_models(models, path, head, *, sparse_kernels="auto", fuse="auto", storage="compact"):
    """Writes a serving SavedModel of ``models`` at ``path`` (not atomic: see the callers).

    Args:
        models: a keras.Model or a non-empty list of them (single input, logits output, equal
            input shapes); repeats allowed.
        path: the SavedModel folder to write (must not hold a SavedModel already).
        head: callable mapping stacked member logits (M, B, ..., K) to the outputs dict.
        sparse_kernels: "auto", "dense", "csr" or "coo".
        fuse: "auto", "always" or "never" (True / False accepted).
        storage: "compact" (default) or "dense": the layout before compact storage (members
            stripped, full kernels written by Keras' ExportArchive, no fusion, no sparse
            kernels).

    Returns:
        ``path``.

    Raises:
        ValueError: a weight is NaN or Inf (naming layer and variable), or a bad argument.
    """
    models = _check_models(models)
    storage = _checks.check_choice("storage", storage, STORAGE_MODES)
    sparse_kernels = _checks.check_choice("sparse_kernels", sparse_kernels, SPARSE_KERNELS)
    fuse = check_fuse(fuse)
    path = _checks.check_path("path", path)
    for i, model in enumerate(models):
        check_finite_weights(model, f"models[{i}]")
    if storage == "dense":
        return _legacy_export(models, head, path)
    module, serve, _ = build_serving(models, head, sparse_kernels=sparse_kernels, fuse=fuse)
    return write_saved_model(module, serve, path)


def saved_model_bytes(path):
    """Total bytes of the files under a SavedModel folder."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(folder, name))
    return total

