"""Compact storage of a serving SavedModel's weights, and the tensors rebuilt from it at load.

**Storage.** A kernel that holds exact zeros (a masked kernel, where the mask gives the
positions, or a plain kernel, e.g. of a compacted model, where the zero values do) is stored as
its active values (float32) plus their positions, in whichever of two encodings is smaller: a
packed bitmask (1 bit per kernel position) or compressed rows (an int32 row pointer per kernel
row and a uint16 column index per active weight; int32 when a row has more than 65,536
columns). A kernel dense enough that neither saves bytes is stored whole, as are biases and
other weights. All of it goes into four variables (`Storage`). An M-member ensemble at density
d thus stores about ``M * d * 4 + M / 8`` bytes per dense-kernel position (bitmask), against 4
for one dense model.

**Load-time cache.** What the serving graph reads (dense kernels, kernels of several members
side by side, the indices of sparse kernels) is rebuilt from the stored variables once, when
the SavedModel is loaded (``tf.saved_model.load`` or TF Serving), into an in-memory cache: a
TensorList held by a resource variable and filled by a resource initializer (`Cache`); nothing
of it is written to disk, and reading it copies nothing.
"""

import dataclasses
import uuid

import numpy as np
import tensorflow as tf

from ft_keras import _tf_compat

_UINT16_LIMIT = 1 << 16




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
    """The smallest compact form of ``kernel`` restricted to ``mask``.

    Args:
        kernel: float array (any shape with at least one axis).
        mask: bool array of the kernel's shape, or None: the nonzero values of ``kernel`` are
            the active ones (a plain kernel that holds exact zeros is stored compactly too).

    Returns:
        A `PackedKernel`; ``packed.dense()`` equals ``where(mask, kernel, 0)`` exactly (for
        ``mask=None``: ``kernel``, with any -0.0 stored as 0.0).
    """
    kernel = np.asarray(kernel, np.float32)
    shape = tuple(int(d) for d in kernel.shape)
    if mask is None:
        mask = kernel != 0
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


def pack_whole(array):
    """``array`` stored whole (a bias or another weight that is not a kernel)."""
    array = np.asarray(array, np.float32)
    shape = tuple(int(d) for d in array.shape)
    return PackedKernel(shape, "full", array.reshape(-1).copy(), int(array.size))


# --------------------------------------------------------------------------------------------
# The storage inside the SavedModel, and what is rebuilt from it at load time.


@dataclasses.dataclass
class Segment:
    """Where one array lives in the stored variables (offsets resolved by `Storage.finish`)."""

    group: str  # "bitmask", "rows" or "full"
    shape: tuple
    nnz: int
    index: int  # position in its group
    base: int = 0  # start in the group's dense space ("bitmask", "rows") or in `values`


class Storage:
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

    def add(self, array, mask=None, kernel=True):
        """Registers a float array; returns its segment.

        A kernel (``kernel=True``) is packed by `pack_kernel` (positions from ``mask``, or from
        its nonzero values); any other array is stored whole.
        """
        if self.finished:
            raise RuntimeError("storage is finished")
        packed = pack_kernel(array, mask) if kernel else pack_whole(array)
        group = packed.encoding
        segment = Segment(group, packed.shape, packed.nnz, len(self.segments))
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


class Cache(_tf_compat.TrackableResource):
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
        self._read = None  # (graph, the list read in it)
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
        shared = _tf_compat.anonymous_name() if tf.executing_eagerly() else self._name
        return _tf_compat.variant_variable(shared)

    def _initialize(self):
        decoded = self._storage.decode()
        tensors = [build(decoded) for build in self._builders]
        return _tf_compat.assign_variant(self.resource_handle,
                                         _tf_compat.tensor_list(tensors, self._dtype))

    def get(self, index, shape):
        """Graph code: element ``index`` (static ``shape``, None for unknown dimensions).

        The list is read once per graph being built, and every element taken from that read.
        """
        graph = tf.compat.v1.get_default_graph()
        if self._read is None or self._read[0] is not graph:
            self._read = (graph, _tf_compat.read_variant(self.resource_handle))
        element_shape = [-1 if d is None else int(d) for d in shape]
        return _tf_compat.tensor_list_get(self._read[1], index, self._dtype, element_shape)
