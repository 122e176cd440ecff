"""Canary tests: one per private TensorFlow internal that ft_keras/_tf_compat.py uses.

Each test fails the day TensorFlow changes the internal it names (see the module docstring of
ft_keras/_tf_compat.py for the list and what each is used for).
"""

import ast
import os

import numpy as np
import pytest
import tensorflow as tf

from ft_keras import _tf_compat as compat


PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ft_keras")


def test_private_tensorflow_api_is_imported_in_one_module_only():
    importers = set()
    for name in sorted(os.listdir(PACKAGE)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(PACKAGE, name), encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(m.startswith("tensorflow.python") for m in modules):
                importers.add(name)
    assert importers == {"_tf_compat.py"}


def test_tensorflow_version_is_supported():
    low, high = compat.SUPPORTED_TF
    assert low <= compat.tf_version() < high
    assert compat.tf_version("2.21.0") == (2, 21)
    assert compat.tf_version("2.22.0rc1") == (2, 22)
    with pytest.raises(ValueError, match="text='nightly' is not a TensorFlow version"):
        compat.tf_version("nightly")


class _Filled(compat.TrackableResource):
    """A variant variable holding a TensorList of two tensors, filled by its initializer."""

    def __init__(self, shared_name):
        self._shared_name = shared_name
        super().__init__()

    def _create_resource(self):
        name = compat.anonymous_name() if tf.executing_eagerly() else self._shared_name
        return compat.variant_variable(name)

    def _initialize(self):
        tensors = [tf.constant([1.0, 2.0, 3.0]), tf.constant([[4.0], [5.0]])]
        return compat.assign_variant(self.resource_handle, compat.tensor_list(tensors,
                                                                              tf.float32))

    def get(self, index, shape):
        return compat.tensor_list_get(compat.read_variant(self.resource_handle), index,
                                      tf.float32, shape)


class _Module(tf.Module):
    def __init__(self):
        super().__init__()
        self.cache = _Filled("ft_keras_tf_compat_canary")

    @tf.function(input_signature=[], autograph=False)
    def second(self):
        return self.cache.get(1, [-1, 1])


def test_1_trackable_resource_is_recreated_and_initialised_at_load(tmp_path):
    """1, 3, 4: a SavedModel re-creates the resource and runs its initializer when loaded."""
    path = str(tmp_path / "sm")
    module = _Module()
    tf.saved_model.save(module, path, signatures={"second": module.second})
    loaded = tf.saved_model.load(path)
    np.testing.assert_array_equal(loaded.second().numpy(), [[4.0], [5.0]])
    assert not any("tensor_list" in name.lower() for name, _ in
                   tf.train.list_variables(os.path.join(path, "variables", "variables")))


def test_2_anonymous_name_makes_each_handle_its_own_variable():
    first = compat.variant_variable(compat.anonymous_name())
    second = compat.variant_variable(compat.anonymous_name())
    compat.assign_variant(first, compat.tensor_list([tf.constant([1.0])], tf.float32))
    compat.assign_variant(second, compat.tensor_list([tf.constant([2.0])], tf.float32))
    for handle, want in ((first, 1.0), (second, 2.0)):
        value = compat.tensor_list_get(compat.read_variant(handle), 0, tf.float32, [1])
        assert value.numpy().tolist() == [want]


def test_3_4_variant_variable_holds_a_tensor_list():
    cache = _Filled("unused")
    cache._initialize()  # pylint: disable=protected-access
    np.testing.assert_array_equal(cache.get(0, [3]).numpy(), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(cache.get(1, [-1, 1]).numpy(), [[4.0], [5.0]])


def test_5_csr_matmul_multiplies_by_the_transposed_sparse_matrix():
    a = np.array([[0.0, 2.0, 0.0], [1.0, 0.0, -3.0]], np.float32)  # (n_out, n_in)
    indices = np.argwhere(a != 0).astype(np.int64)
    values = a[a != 0]
    x = np.array([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]], np.float32)  # (rows, n_in)
    got = compat.csr_matmul(tf.constant(indices), tf.constant(values),
                            tf.constant([2, 3], tf.int64), tf.constant(x)).numpy()
    np.testing.assert_array_equal(got, [[4.0, -8.0], [0.0, 3.5]])


if __name__ == "__main__":  # bazel test / python tests/test_tf_compat.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
