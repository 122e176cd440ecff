"""Every use of private TensorFlow API in ft_keras, in one place (private).

The serving SavedModels (``ft_keras/serving_storage.py``, ``ft_keras/serving_graph.py``) need a
few TensorFlow internals that no public API offers. They are all here, each behind a small
function that names the internal, so that the day TensorFlow changes one of them exactly one
function breaks, and ``tests/test_tf_compat.py`` (one canary test per internal) says which. The
supported range is :data:`SUPPORTED_TF`.

Internals used (``tensorflow.python...``):

1. ``trackable.resource.TrackableResource``: the base class of a resource that a SavedModel
   tracks and re-creates and initialises when it is loaded (``tf.saved_model.load`` or TF
   Serving). The load-time cache of a serving SavedModel is one (`TrackableResource`). If it
   changes, exports fail to save or a loaded export serves from an empty cache.
2. ``eager.context.anonymous_name()``: the shared name that makes an in-process resource
   variable private to its handle (`anonymous_name`: every handle created with it is its own
   variable). If that changes, in-process serving functions of two exports share one cache.
3. ``ops.gen_resource_variable_ops``: ``var_handle_op`` / ``assign_variable_op`` /
   ``read_variable_op`` on a variable of dtype ``variant`` (`variant_variable`,
   `assign_variant`, `read_variant`): the cache is a TensorList held by such a variable, which
   ``tf.Variable`` cannot hold.
4. ``ops.list_ops``: ``empty_tensor_list``, ``tensor_list_push_back`` and
   ``tensor_list_get_item`` (`tensor_list`, `tensor_list_get`): a list of tensors of different
   shapes in one variant, read without a copy.
5. ``ops.linalg.sparse.sparse_csr_matrix_ops``: ``sparse_tensor_to_csr_sparse_matrix`` and
   ``sparse_matrix_mat_mul`` (`csr_matmul`): the opt-in CSR kernel
   (``sparse_kernels="csr"``). Only this kernel breaks if they change.
"""

import re

import tensorflow as tf
from tensorflow.python.eager import context
from tensorflow.python.ops import gen_resource_variable_ops
from tensorflow.python.ops import list_ops
from tensorflow.python.ops.linalg.sparse import sparse_csr_matrix_ops
from tensorflow.python.trackable import resource as tf_resource

# TensorFlow versions (major, minor) this module is tested with: low <= version < high.
SUPPORTED_TF = ((2, 16), (2, 22))

# 1. The base class of load-time resources.
TrackableResource = tf_resource.TrackableResource


def tf_version(text=None):
    """``(major, minor)`` of ``text`` (default: the installed TensorFlow's version)."""
    text = tf.__version__ if text is None else text
    match = re.match(r"(\d+)\.(\d+)", text)
    if match is None:
        raise ValueError(f"text={text!r} is not a TensorFlow version (major.minor...).")
    return int(match.group(1)), int(match.group(2))


def anonymous_name():
    """2. The shared name with which every new resource handle is its own variable."""
    return context.anonymous_name()


def variant_variable(shared_name):
    """3. The handle of a scalar resource variable of dtype ``variant`` named ``shared_name``."""
    return gen_resource_variable_ops.var_handle_op(
        dtype=tf.variant, shape=[], shared_name=shared_name
    )


def assign_variant(handle, value):
    """3. Assigns the variant tensor ``value`` to the variable behind ``handle``."""
    return gen_resource_variable_ops.assign_variable_op(handle, value)


def read_variant(handle):
    """3. The variant tensor held by the variable behind ``handle``."""
    return gen_resource_variable_ops.read_variable_op(handle, tf.variant)


def tensor_list(tensors, dtype):
    """4. A TensorList (a variant tensor) holding ``tensors`` (of ``dtype``, any shapes)."""
    handle = list_ops.empty_tensor_list(element_shape=None, element_dtype=dtype)
    for tensor in tensors:
        handle = list_ops.tensor_list_push_back(handle, tensor)
    return handle


def tensor_list_get(handle, index, dtype, element_shape):
    """4. Element ``index`` of a TensorList; ``element_shape`` with -1 for unknown sizes."""
    return list_ops.tensor_list_get_item(
        handle, index, element_dtype=dtype, element_shape=element_shape
    )


def csr_matmul(indices, values, dense_shape, x2d):
    """5. ``x2d @ A^T`` for the sparse matrix ``A`` (int64 ``indices`` [nnz, 2] in row-major
    order, ``values``, ``dense_shape`` [n_out, n_in]): builds A as a CSR matrix and multiplies.
    """
    matrix = sparse_csr_matrix_ops.sparse_tensor_to_csr_sparse_matrix(
        indices, values, dense_shape
    )
    return sparse_csr_matrix_ops.sparse_matrix_mat_mul(
        matrix, x2d, transpose_b=True, transpose_output=True
    )
