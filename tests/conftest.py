"""Test set-up: quiet TF logs, two logical CPU devices (for MirroredStrategy tests), data fixtures.

Real data. Fashion-MNIST comes from the usual `ft_keras.data` sources (the Debian package
``dataset-fashion-mnist``, ``$FT_KERAS_DATA_DIR`` or a prepared tensorflow-datasets copy). MNIST
and CIFAR-10 come from the shared data folder `SHARED_DATA`: ``$FT_KERAS_SHARED_DATA`` when set,
else ``<repo>/../shared/data``, holding ``mnist/`` (the four IDX files) and
``cifar10/cifar10-jpeg.tar.gz``. A test that needs a data set that is missing skips with a reason
that says how to provide it; it never errors. To run the suite as a fresh clone would, point the
variable at an empty folder: ``FT_KERAS_SHARED_DATA=/tmp/empty make test``.

Tests that read real data carry the ``real_data`` marker (``-m "not real_data"`` runs the
synthetic-data tier only); tests that use a real-data fixture (`REAL_DATA_FIXTURES`) get it
automatically.
"""

import functools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gzip  # noqa: E402

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
#: Environment variable that overrides the shared data folder (MNIST, CIFAR-10).
SHARED_DATA_ENV = "FT_KERAS_SHARED_DATA"
SHARED_DATA = os.path.abspath(
    os.environ.get(SHARED_DATA_ENV) or os.path.join(REPO_ROOT, "..", "shared", "data")
)
MNIST_DIR = os.path.join(SHARED_DATA, "mnist")


def script_env(data_path=False):
    """The environment for running a repository script in a subprocess: the checkout on
    PYTHONPATH, quiet TensorFlow, a headless matplotlib; with ``data_path`` the shared data
    folder (when present) first on ``FT_KERAS_DATA_DIR``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    if data_path and os.path.isdir(SHARED_DATA):
        env["FT_KERAS_DATA_DIR"] = os.pathsep.join(
            [SHARED_DATA] + [p for p in [env.get("FT_KERAS_DATA_DIR")] if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["MPLBACKEND"] = "Agg"
    return env
CIFAR10_ARCHIVE = os.path.join(SHARED_DATA, "cifar10", "cifar10-jpeg.tar.gz")

_SHARED_HINT = (
    f"put it under {SHARED_DATA} or set {SHARED_DATA_ENV} to a folder that holds mnist/ "
    "(train-/t10k-{images-idx3,labels-idx1}-ubyte[.gz]) and cifar10/cifar10-jpeg.tar.gz"
)
FASHION_MNIST_HINT = (
    "install the Debian package dataset-fashion-mnist (`make data` does it as root), or set "
    "FT_KERAS_DATA_DIR to a folder holding fashion_mnist/ with the four IDX files"
)


def has_mnist():
    """True when the MNIST IDX files are in the shared data folder."""
    return os.path.isfile(os.path.join(MNIST_DIR, "t10k-labels-idx1-ubyte.gz")) or os.path.isfile(
        os.path.join(MNIST_DIR, "t10k-labels-idx1-ubyte")
    )


def has_cifar10():
    """True when the CIFAR-10 JPEG archive is in the shared data folder."""
    return os.path.isfile(CIFAR10_ARCHIVE)


@functools.lru_cache(maxsize=None)
def has_fashion_mnist():
    """True when `ft_keras.data` can find Fashion-MNIST (system package, env var or tfds)."""
    from ft_keras.harness import data  # pylint: disable=import-outside-toplevel

    try:
        data.load_numpy("fashion_mnist", "test[:1]")
    except FileNotFoundError:
        return False
    return True


def _marks(*marks):
    """A decorator applying several pytest marks."""

    def decorate(test):
        for mark in reversed(marks):
            test = mark(test)
        return test

    return decorate


#: ``@needs_mnist`` / ``@needs_cifar10`` / ``@needs_fashion_mnist``: mark a test ``real_data``
#: and skip it (with a reason that says how to provide the data) when the data set is missing.
needs_mnist = _marks(
    pytest.mark.real_data,
    pytest.mark.skipif(not has_mnist(), reason=f"MNIST not found at {MNIST_DIR}: {_SHARED_HINT}."),
)
needs_cifar10 = _marks(
    pytest.mark.real_data,
    pytest.mark.skipif(
        not has_cifar10(), reason=f"CIFAR-10 not found at {CIFAR10_ARCHIVE}: {_SHARED_HINT}."
    ),
)

needs_fashion_mnist = _marks(
    pytest.mark.real_data,
    pytest.mark.skipif(
        not has_fashion_mnist(), reason=f"Fashion-MNIST not found: {FASHION_MNIST_HINT}."
    ),
)

#: Fixtures that load real data: a test that uses one is marked ``real_data`` automatically.
REAL_DATA_FIXTURES = ("fashion_mnist_small",)


def pytest_collection_modifyitems(config, items):
    del config
    for item in items:
        if any(name in REAL_DATA_FIXTURES for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_data)


def skip_without_fashion_mnist():
    """Skips the calling test (or fixture) when Fashion-MNIST cannot be found."""
    if not has_fashion_mnist():
        pytest.skip(f"Fashion-MNIST not found: {FASHION_MNIST_HINT}.")


@pytest.fixture(scope="session")
def fashion_mnist_small():
    """2,048 training and 512 test images of real Fashion-MNIST, floats in [0, 1], (N, 28, 28, 1).

    Skips the test when Fashion-MNIST is not installed.
    """
    from ft_keras.harness import data  # pylint: disable=import-outside-toplevel

    skip_without_fashion_mnist()
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


# LeNet-300-100: 784*300 + 300*100 + 100*10 MACs per example dense; 90% uniform sparsity keeps
# round(0.1 * n) of each kernel: 23,520 + 3,000 + 100 (tests/test_flops.py,
# tests/test_training_cost.py).
LENET_DENSE = 784 * 300 + 300 * 100 + 100 * 10
LENET_SPARSE = 23_520 + 3_000 + 100


@pytest.fixture(scope="module")
def lenet():
    import ft_keras as ftk  # pylint: disable=import-outside-toplevel

    return ftk.models.lenet_300_100()


@pytest.fixture(scope="module")
def lenet_sparse(lenet):  # pylint: disable=redefined-outer-name
    import ft_keras as ftk  # pylint: disable=import-outside-toplevel

    return ftk.sparsify(lenet, 0.9, distribution="uniform", seed=0)


def idx_bytes(array, type_code=0x08):
    """The bytes of an IDX file holding ``array`` (tests write data files by hand)."""
    array = np.asarray(array)
    header = bytes([0, 0, type_code, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_bytes(path, payload, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(payload)
    return str(path)


def write_tiny_idx(directory, prefix="t10k", n=3, gz=True):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    suffix = ".gz" if gz else ""
    write_bytes(directory / f"{prefix}-images-idx3-ubyte{suffix}", idx_bytes(images), gz)
    write_bytes(directory / f"{prefix}-labels-idx1-ubyte{suffix}", idx_bytes(labels), gz)
    return images, labels
