"""Test set-up: quiet TF logs, two logical CPU devices (for MirroredStrategy tests), data fixtures."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPUs let tests run tf.distribute.MirroredStrategy on one machine. This must happen
# before TensorFlow initialises its devices, i.e. before any test touches a tensor.
_CPUS = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _CPUS[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
except RuntimeError:  # devices already initialised (e.g. imported by a plugin): keep going
    pass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.abspath(os.path.join(REPO_ROOT, "..", "shared", "data"))


@pytest.fixture(scope="session")
def fashion_mnist_small():
    """2,048 training and 512 test images of real Fashion-MNIST, floats in [0, 1], (N, 28, 28, 1)."""
    from ft_keras import data  # pylint: disable=import-outside-toplevel

    x_train, y_train = data.load_numpy("fashion_mnist", "train[:2048]")
    x_test, y_test = data.load_numpy("fashion_mnist", "test[:512]")
    return (
        (x_train.astype("float32") / 255.0, y_train.astype("int64")),
        (x_test.astype("float32") / 255.0, y_test.astype("int64")),
    )


@pytest.fixture(scope="session")
def two_cpus():
    """A MirroredStrategy over the two logical CPUs (one per session: TF's collective ops keep
    per-strategy bookkeeping that clashes when several strategies run models of other sizes)."""
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("two logical CPU devices are not available in this process")
    return tf.distribute.MirroredStrategy([d.name for d in devices[:2]])


def masked_state(model):
    """{layer name: (mask, kernel)} as numpy arrays."""
    import ft_keras as ftk  # pylint: disable=import-outside-toplevel

    return {
        layer.name: (
            np.array(layer.kernel_mask.numpy()),
            np.array(layer.masked_kernel.numpy()),
        )
        for layer in ftk.masked_layers(model)
    }
