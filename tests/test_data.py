"""Tests of ft_keras.data against the real data sets and tiny hand-made files."""

import io
import os
import pickle
import re
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from ft_keras.harness import data
from ft_keras.harness import data_files
from tests.conftest import idx_bytes as _idx_bytes
from tests.conftest import write_bytes as _write
from tests.conftest import write_tiny_idx as _write_tiny_idx
from tests.conftest import SHARED_DATA
from tests.conftest import needs_cifar10
from tests.conftest import needs_fashion_mnist
from tests.conftest import needs_mnist

# Real data: MNIST and CIFAR-10 from the shared data folder ($FT_KERAS_SHARED_DATA or
# <repo>/../shared/data), Fashion-MNIST from the system package; each test skips when its data set
# is missing (see tests/conftest.py).
REAL_TFDS_CHECK = data._tfds_builder_if_prepared  # pylint: disable=protected-access


@pytest.fixture(scope="session")
def session_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ft_keras_cache"))


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch, session_cache_dir):
    """Local files only (a developer's prepared tfds data would change the order) and a
    per-session decoded-image cache instead of ~/.cache."""
    monkeypatch.setattr(data, "_tfds_builder_if_prepared", lambda name, data_dir: (None, []))
    monkeypatch.setenv(data.CACHE_DIR_ENV, session_cache_dir)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


def test_info():
    assert data.INFO["mnist"]["shape"] == (28, 28, 1)
    assert data.INFO["fashion_mnist"]["shape"] == (28, 28, 1)
    assert data.INFO["cifar10"]["shape"] == (32, 32, 3)
    assert all(info["num_classes"] == 10 for info in data.INFO.values())
    assert data.INFO["cifar10"]["class_names"] == (
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    )
    assert set(data.DATASET_NAMES) == {"fashion_mnist", "mnist", "cifar10"}


@pytest.mark.parametrize("name", ["svhn", "", "mnist2"])
def test_unknown_name(name):
    with pytest.raises(ValueError, match=f"name={name!r} is not supported") as info:
        data.load(name)
    for allowed in ("fashion_mnist", "mnist", "cifar10"):
        assert allowed in str(info.value)
    with pytest.raises(ValueError, match="name="):
        data.load_numpy(name)


@pytest.mark.parametrize("name", [None, 3, b"mnist"])
def test_name_of_wrong_type(name):
    # A TypeError since the argument checks were unified (it was a ValueError).
    with pytest.raises(TypeError, match="name must be one of"):
        data.load(name)


def test_name_is_case_insensitive(tmp_path):
    _write_tiny_idx(tmp_path, "t10k", n=3, gz=True)
    _, labels = data.load_numpy("MNIST", "test", data_dir=tmp_path)
    assert labels.tolist() == [0, 1, 2]


def test_missing_data_dir_is_refused(tmp_path, monkeypatch):
    missing = tmp_path / "no_such_folder"
    # Even when another source has the data (here: $FT_KERAS_DATA_DIR), a data_dir that does not
    # exist is a mistake, not a reason to fall back.
    _write_tiny_idx(tmp_path, "t10k", n=3, gz=True)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    for load in (data.load, data.load_numpy):
        with pytest.raises(ValueError, match=re.escape(f"data_dir='{missing}' does not exist")):
            load("mnist", "test", data_dir=str(missing))
    a_file = tmp_path / "t10k-images-idx3-ubyte.gz"
    with pytest.raises(ValueError, match="is a file, not a folder"):
        data.load("mnist", "test", data_dir=a_file)
    with pytest.raises(TypeError, match="data_dir must be a path"):
        data.load("mnist", "test", data_dir=3)
    assert data.load_numpy("mnist", "test")[1].tolist() == [0, 1, 2]


@pytest.mark.parametrize("split", ["train[50:10]", "test[:0]", "train[100%:]", "train[5:5]",
                                   "test[:10]+train[-1:-2]", "test[99999:]"])
def test_empty_split_is_refused(split, monkeypatch):
    def no_source(*args):
        raise AssertionError("no source may be searched for an empty split")

    monkeypatch.setattr(data, "_find_local", no_source)
    for load in (data.load, data.load_numpy):
        with pytest.raises(ValueError, match=rf"split='{re.escape(split)}' selects no examples"):
            load("mnist", split)


def test_empty_split_of_small_local_files_is_refused(tmp_path):
    _write_tiny_idx(tmp_path, "t10k", n=3, gz=True)
    with pytest.raises(ValueError, match=r"'test\[5:\]' is empty for the 3 examples"):
        data.load_numpy("mnist", "test[5:]", data_dir=tmp_path)
    assert data.load_numpy("mnist", "test[2:]", data_dir=tmp_path)[1].tolist() == [2]


def test_bool_arguments_are_checked():
    with pytest.raises(TypeError, match="as_supervised must be True or False"):
        data.load("mnist", "test", as_supervised="yes")
    with pytest.raises(TypeError, match="shuffle_files must be True or False"):
        data.load("mnist", "test", shuffle_files=1)


@pytest.mark.parametrize(
    "split, n, expected",
    [
        ("train", 60000, [slice(0, 60000)]),
        ("train[:1000]", 60000, [slice(0, 1000)]),
        ("train[1000:2000]", 60000, [slice(1000, 2000)]),
        ("train[:10%]", 60000, [slice(0, 6000)]),
        ("test[50%:]", 10000, [slice(5000, 10000)]),
        ("train[-100:]", 60000, [slice(59900, 60000)]),
        ("train[-10%:]", 10000, [slice(9000, 10000)]),
        ("train[12.5%:25%]", 10000, [slice(1250, 2500)]),
        ("test[:99999]", 10000, [slice(0, 10000)]),
        ("test[500:100]", 10000, [slice(500, 500)]),
        ("train[:1%] + test[2:4]", 1000, [slice(0, 10), slice(2, 4)]),
    ],
)
def test_parse_split(split, n, expected):
    parts = data.parse_split(split)
    assert [p.indices(n) for p in parts] == expected


@pytest.mark.parametrize(
    "split",
    ["validation", "", "train[", "train[]", "train[:]", "train[1:2:3]", "train[a:b]",
     "train[10:50%]", "train[:150%]", "train[1.5:]", "train+", "TRAIN"],
)
def test_bad_split(split):
    with pytest.raises(ValueError, match=re.escape(f"split={split!r} is not allowed")):
        data.parse_split(split)
    with pytest.raises(ValueError, match=re.escape(f"split={split!r} is not allowed")):
        data.load("mnist", split)


@pytest.mark.parametrize("split", [3, None, ["train"]])
def test_split_of_wrong_type(split):
    # A TypeError since the argument checks were unified (it was a ValueError).
    with pytest.raises(TypeError, match="split must be a str"):
        data.parse_split(split)
    with pytest.raises(TypeError, match="split must be a str"):
        data.load_numpy("mnist", split)


# ---------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------


@needs_fashion_mnist
def test_fashion_mnist_train():
    ds = data.load("fashion_mnist")
    assert ds.element_spec == (
        tf.TensorSpec((28, 28, 1), tf.uint8),
        tf.TensorSpec((), tf.int64),
    )
    assert int(ds.cardinality()) == 60000
    labels = [int(y) for _, y in ds.take(10)]
    assert labels == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    images, labels = data.load_numpy("fashion_mnist", "train")
    assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [6000] * 10


@needs_fashion_mnist
def test_fashion_mnist_test_counts_and_dict_elements():
    images, labels = data.load_numpy("fashion_mnist", "test")
    assert images.shape == (10000, 28, 28, 1)
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10
    ds = data.load("fashion_mnist", "test[:5]", as_supervised=False)
    assert int(ds.cardinality()) == 5
    first = next(iter(ds))
    assert set(first) == {"image", "label"}
    np.testing.assert_array_equal(first["image"].numpy(), images[0])


@needs_mnist
def test_mnist_facts():
    images, labels = data.load_numpy("mnist", "test", data_dir=SHARED_DATA)
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974,
                                            1009]
    _, train_labels = data.load_numpy("mnist", "train[:10]", data_dir=SHARED_DATA)
    assert train_labels.tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    ds = data.load("mnist", "test", data_dir=SHARED_DATA)
    assert int(ds.cardinality()) == 10000
    assert ds.element_spec[0].shape == (28, 28, 1)


@needs_mnist
def test_mnist_slicing():
    kwargs = {"data_dir": SHARED_DATA}
    images, labels = data.load_numpy("mnist", "train", **kwargs)
    head_x, head_y = data.load_numpy("mnist", "train[:100]", **kwargs)
    np.testing.assert_array_equal(head_x, images[:100])
    np.testing.assert_array_equal(head_y, labels[:100])
    mid_x, _ = data.load_numpy("mnist", "train[1000:2000]", **kwargs)
    np.testing.assert_array_equal(mid_x, images[1000:2000])
    assert len(data.load_numpy("mnist", "train[:10%]", **kwargs)[1]) == 6000
    test_y = data.load_numpy("mnist", "test", **kwargs)[1]
    half_y = data.load_numpy("mnist", "test[50%:]", **kwargs)[1]
    np.testing.assert_array_equal(half_y, test_y[5000:])
    both_y = data.load_numpy("mnist", "train[:10]+test[-5:]", **kwargs)[1]
    np.testing.assert_array_equal(both_y, np.concatenate([labels[:10], test_y[-5:]]))
    ds = data.load("mnist", "test[50%:]", **kwargs)
    assert int(ds.cardinality()) == 5000
    ds_head = data.load("mnist", "train[:100]", **kwargs)
    assert int(ds_head.cardinality()) == 100
    np.testing.assert_array_equal(np.stack([y for _, y in ds_head.as_numpy_iterator()]),
                                  labels[:100])


@needs_mnist
def test_load_numpy_returns_writable_copies():
    images, labels = data.load_numpy("mnist", "test", data_dir=SHARED_DATA)
    images[0] = 0
    labels[0] = 9
    again_x, again_y = data.load_numpy("mnist", "test", data_dir=SHARED_DATA)
    assert again_y[0] == 7 and again_x[0].any()


@needs_mnist
def test_env_var_and_direct_root(monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, SHARED_DATA)
    assert data.load_numpy("mnist", "train[:3]")[1].tolist() == [5, 0, 4]
    monkeypatch.delenv(data.DATA_DIR_ENV)
    # A root that holds the IDX files itself.
    direct = os.path.join(SHARED_DATA, "mnist")
    assert data.load_numpy("mnist", "train[:3]", data_dir=direct)[1].tolist() == [5, 0, 4]


@needs_cifar10
def test_cifar10_test_split():
    images, labels = data.load_numpy("cifar10", "test", data_dir=SHARED_DATA)
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10
    # The fixed permutation mixes the class-grouped files.
    assert len(set(labels[:100].tolist())) == 10
    assert not np.all(np.diff(labels[:100]) >= 0)
    # Slices are taken after the permutation.
    head_x, head_y = data.load_numpy("cifar10", "test[:100]", data_dir=SHARED_DATA)
    np.testing.assert_array_equal(head_x, images[:100])
    np.testing.assert_array_equal(head_y, labels[:100])
    ds = data.load("cifar10", "test[90%:]", data_dir=SHARED_DATA)
    assert int(ds.cardinality()) == 1000
    assert ds.element_spec == (
        tf.TensorSpec((32, 32, 3), tf.uint8),
        tf.TensorSpec((), tf.int64),
    )
    y_tail = np.stack([y for _, y in ds.as_numpy_iterator()])
    np.testing.assert_array_equal(y_tail, labels[9000:])


@needs_cifar10
@pytest.mark.slow
def test_cifar10_train_statistics():
    images, labels = data.load_numpy("cifar10", "train", data_dir=SHARED_DATA)
    assert images.shape == (50000, 32, 32, 3)
    assert np.bincount(labels).tolist() == [5000] * 10
    assert len(set(labels[:1000].tolist())) == 10
    mean = images.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(mean, [125.3, 122.9, 113.9], atol=0.2)


# ---------------------------------------------------------------------------------------------
# IDX parsing with hand-made files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_tiny(tmp_path, gz):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = _write(tmp_path / ("a.idx" + (".gz" if gz else "")), _idx_bytes(array), gz)
    out = data.read_idx(path)
    np.testing.assert_array_equal(out, array)
    assert out.dtype == np.uint8 and not out.flags.writeable
    assert data.read_idx(path) is out  # In-process cache.
    wide = np.array([[1, -2], [300, 70000]], dtype=">i4")
    path = _write(tmp_path / "b.idx", _idx_bytes(wide, 0x0C))
    np.testing.assert_array_equal(data.read_idx(path), wide.astype(np.int32))
    with pytest.raises(TypeError, match="path must be a path"):
        data.read_idx(3)


@pytest.mark.parametrize("gz", [False, True])
def test_load_tiny_idx_dataset(tmp_path, gz):
    folder = tmp_path / "mnist"
    folder.mkdir()
    images, labels = _write_tiny_idx(folder, "t10k", n=3, gz=gz)
    x, y = data.load_numpy("mnist", "test", data_dir=tmp_path)
    np.testing.assert_array_equal(x[..., 0], images)
    assert y.tolist() == labels.tolist() and y.dtype == np.int64
    ds = data.load("mnist", "test[1:]", data_dir=str(tmp_path))
    assert int(ds.cardinality()) == 2
    assert [int(v) for _, v in ds] == [1, 2]


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x01\x00\x08\x01" + (3).to_bytes(4, "big") + b"abc", "magic"),
        (b"\x00\x00\x42\x01" + (3).to_bytes(4, "big") + b"abc", "type code"),
        (b"\x00\x00\x08\x03\x00", "truncated"),
        (b"\x00\x00", "not an IDX"),
        (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc", "data bytes"),
    ],
)
def test_corrupt_idx_names_file(tmp_path, payload, message):
    path = _write(tmp_path / "t10k-labels-idx1-ubyte", payload)
    with pytest.raises(ValueError, match=message) as info:
        data.read_idx(path)
    assert "t10k-labels-idx1-ubyte" in str(info.value)


def test_corrupt_dataset_files_name_file(tmp_path):
    _write_tiny_idx(tmp_path, "t10k", n=3, gz=True)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    _write(bad, b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + b"\x00\x01\x02", gz=True)
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        data.load("mnist", "test", data_dir=tmp_path)
    # A valid header whose count disagrees with the images file.
    _write(bad, _idx_bytes(np.zeros(2, np.uint8)), gz=True)
    with pytest.raises(ValueError, match="2 labels"):
        data.load("mnist", "test", data_dir=tmp_path)
    # Broken gzip stream.
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        data.load("mnist", "test", data_dir=tmp_path)
    # Wrong image size (with valid labels again).
    _write(bad, _idx_bytes(np.zeros(3, np.uint8)), gz=True)
    _write(tmp_path / "t10k-images-idx3-ubyte.gz", _idx_bytes(np.zeros((3, 8, 8), np.uint8)),
           gz=True)
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        data.load("mnist", "test", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Local CIFAR-10 formats with hand-made files
# ---------------------------------------------------------------------------------------------


def _tiny_cifar_images(split, per_class=2):
    out = {}
    for label, cls in enumerate(data.CIFAR10_CLASSES):
        for i in range(per_class):
            value = label * 12 + i + (120 if split == "test" else 0)
            out[(cls, i)] = np.full((32, 32, 3), value, np.uint8)
    return out


def _expected_order(num):
    return np.random.default_rng(0).permutation(num)


def test_cifar_archive_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / "cache"))
    archive = tmp_path / "root" / "cifar10" / "cifar10-jpeg.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("test", "train"):
            # Reverse order: the loader must sort by class then by natural file name.
            for (cls, i), image in sorted(_tiny_cifar_images(split).items(), reverse=True):
                payload = tf.io.encode_png(image).numpy()
                info = tarfile.TarInfo(f"cifar10/{split}/{cls}/{i}.png")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    images, labels = data.load_numpy("cifar10", "test", data_dir=tmp_path / "root")
    source_labels = np.repeat(np.arange(10), 2)
    source_values = source_labels * 12 + np.tile([0, 1], 10) + 120
    order = _expected_order(20)
    np.testing.assert_array_equal(labels, source_labels[order])
    np.testing.assert_array_equal(images[:, 0, 0, 0], source_values[order])
    cached = sorted(os.listdir(tmp_path / "cache"))
    assert len(cached) == 1 and cached[0].startswith("cifar10-test-")
    assert cached[0].endswith(".npz")

    # Second process (simulated): in-process cache cleared, decoding disabled -> .npz is used.
    data_files.load_cifar_cached.cache_clear()

    def no_decode(*args):
        raise AssertionError("decoded again instead of using the .npz cache")

    monkeypatch.setattr(data_files, "_decode_images", no_decode)
    again, _ = data.load_numpy("cifar10", "test", data_dir=tmp_path / "root")
    np.testing.assert_array_equal(again, images)

    # A changed source (new mtime) is a new cache key.
    stat = os.stat(archive)
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded again"):
        data.load_numpy("cifar10", "test", data_dir=tmp_path / "root")


def test_cifar_folder_layout_jpeg(tmp_path, monkeypatch):
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / "cache"))
    root = tmp_path / "cifar-10"
    expected = []
    for split in ("train", "test"):
        for (cls, i), image in _tiny_cifar_images(split, per_class=3).items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            # Names 2, 10, 100 check the natural sort (not '10' < '100' < '2').
            name = f"{[2, 10, 100][i]}.jpg"
            (folder / name).write_bytes(tf.io.encode_jpeg(image, quality=100).numpy())
            if split == "train":
                expected.append(int(image[0, 0, 0]))
    images, labels = data.load_numpy("cifar10", "train", data_dir=tmp_path)
    order = _expected_order(30)
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 3)[order])
    np.testing.assert_allclose(images[:, 16, 16, 0], np.array(expected)[order], atol=2)
    head, head_labels = data.load_numpy("cifar10", "train[:10%]", data_dir=tmp_path)
    np.testing.assert_array_equal(head, images[:3])
    np.testing.assert_array_equal(head_labels, labels[:3])


def test_cifar_pickle_batches(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    chw = rng.integers(0, 256, size=(4, 3, 32, 32), dtype=np.uint8)
    batch = {b"data": chw.reshape(4, -1), b"labels": [3, 1, 4, 1], b"batch_label": b"x"}
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    images, labels = data.load_numpy("cifar10", "test", data_dir=tmp_path)
    order = _expected_order(4)
    np.testing.assert_array_equal(labels, np.array([3, 1, 4, 1])[order])
    np.testing.assert_array_equal(images, chw.transpose(0, 2, 3, 1)[order])
    # Pickles that would run code are refused.
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": os.system, b"labels": []}, f)
    data_files.load_cifar_cached.cache_clear()
    with pytest.raises(ValueError, match="test_batch"):
        data.load_numpy("cifar10", "test", data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------
# Missing data and the tfds path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist", "cifar10"])
def test_not_found_lists_places(tmp_path, monkeypatch, name):
    empty = tmp_path / "empty"
    empty.mkdir()
    system = tmp_path / "no_system"
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", str(system))
    monkeypatch.setattr(
        data,
        "_tfds_builder_if_prepared",
        lambda n, d: (None, [f"tfds (default data dir): /fake/tfds/{n}/1.0.0 is not prepared"]),
    )
    with pytest.raises(FileNotFoundError) as info:
        data.load(name, "test", data_dir=str(empty))
    message = str(info.value)
    assert f"/fake/tfds/{name}/1.0.0" in message
    for folder in data.INFO[name]["folders"]:
        assert os.path.join(str(empty), folder) in message
        assert os.path.join(str(system), folder) in message
    assert f"{empty} (data_dir argument)" in message
    assert "FT_KERAS_DATA_DIR" in message and "data_dir" in message
    if name == "fashion_mnist":
        assert "dataset-fashion-mnist" in message


def test_not_found_env_dirs_listed(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, os.pathsep.join([str(tmp_path / "a"), "",
                                                          str(tmp_path / "b")]))
    monkeypatch.setattr(data, "SYSTEM_DATA_DIR", str(tmp_path / "sys"))
    with pytest.raises(FileNotFoundError) as info:
        data.load_numpy("mnist", "train")
    message = str(info.value)
    assert os.path.join(str(tmp_path / "a"), "mnist") in message
    assert os.path.join(str(tmp_path / "b"), "mnist") in message
    assert "$FT_KERAS_DATA_DIR" in message


class _FakeBuilder:
    data_path = "/fake/tfds/mnist/3.0.1"

    def __init__(self):
        self.calls = []

    def is_prepared(self):
        return True

    def as_dataset(self, split, batch_size=None, as_supervised=False, shuffle_files=False):
        self.calls.append(dict(split=split, batch_size=batch_size,
                               as_supervised=as_supervised, shuffle_files=shuffle_files))
        images = tf.fill((4, 28, 28, 1), tf.constant(7, tf.uint8))
        labels = tf.constant([3, 3, 3, 3], tf.int64)
        if batch_size == -1:
            return images, labels
        return tf.data.Dataset.from_tensor_slices((images, labels))


def test_tfds_path_used_when_prepared(monkeypatch):
    builder = _FakeBuilder()
    monkeypatch.setattr(data, "_tfds_builder_if_prepared", lambda name, data_dir: (builder, []))
    ds = data.load("mnist", "train[:4]", shuffle_files=True)
    assert [int(y) for _, y in ds] == [3, 3, 3, 3]
    assert builder.calls[-1] == dict(split="train[:4]", batch_size=None, as_supervised=True,
                                     shuffle_files=True)
    images, labels = data.load_numpy("mnist", "test")
    assert images.shape == (4, 28, 28, 1) and labels.dtype == np.int64
    assert builder.calls[-1]["batch_size"] == -1
    # The split is still validated before reaching tfds.
    with pytest.raises(ValueError, match="split='validation'"):
        data.load("mnist", "validation")


@needs_mnist
def test_fallback_to_local_when_tfds_unavailable(monkeypatch):
    monkeypatch.setattr(data, "_tfds_builder_if_prepared", REAL_TFDS_CHECK)
    tfds = pytest.importorskip("tensorflow_datasets")

    def broken_builder(*args, **kwargs):
        raise RuntimeError("offline: no network")

    monkeypatch.setattr(tfds, "builder", broken_builder)
    builder, tried = data._tfds_builder_if_prepared("mnist", SHARED_DATA)
    assert builder is None
    assert any("offline: no network" in t for t in tried)
    _, labels = data.load_numpy("mnist", "train[:4]", data_dir=SHARED_DATA)
    assert labels.tolist() == [5, 0, 4, 1]


@needs_mnist
def test_real_tfds_check_not_prepared_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_tfds_builder_if_prepared", REAL_TFDS_CHECK)
    tfds = pytest.importorskip("tensorflow_datasets")
    real_builder = tfds.builder
    default_dir = tmp_path / "tfds_default"

    def offline_builder(name, data_dir=None, **kwargs):
        # Redirect tfds's default data dir so a developer's prepared data does not interfere.
        return real_builder(name, data_dir=data_dir or str(default_dir), **kwargs)

    monkeypatch.setattr(tfds, "builder", offline_builder)
    monkeypatch.setenv("TFDS_DATA_DIR", str(default_dir))
    (default_dir / "mnist").mkdir(parents=True)  # exists, but holds no prepared data
    builder, tried = data._tfds_builder_if_prepared("mnist", SHARED_DATA)
    assert builder is None
    assert any(SHARED_DATA in t and "not prepared" in t for t in tried)
    assert any(str(default_dir) in t and "not prepared" in t for t in tried)
    ds = data.load("mnist", "train[:4]", data_dir=SHARED_DATA)
    assert [int(y) for _, y in ds] == [5, 0, 4, 1]


def test_tfds_probe_skipped_when_no_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "_tfds_builder_if_prepared", REAL_TFDS_CHECK)
    tfds = pytest.importorskip("tensorflow_datasets")

    def no_call(*args, **kwargs):
        raise AssertionError("tfds.builder must not be called when no folder exists")

    monkeypatch.setattr(tfds, "builder", no_call)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "none"))
    builder, tried = data._tfds_builder_if_prepared("mnist", str(tmp_path))
    assert builder is None
    assert sum("does not exist" in t for t in tried) == 2


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def test_normalize_and_preprocess():
    images = np.array([[[[0]], [[255]]], [[[51]], [[102]]]], np.uint8)  # (2, 2, 1, 1)
    labels = np.array([1, 2], np.int64)
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    out = data.normalize(ds)
    assert int(out.cardinality()) == 2
    assert out.element_spec[0].dtype == tf.float32
    x = np.stack([a for a, _ in out.as_numpy_iterator()])
    np.testing.assert_allclose(x, images / 255.0, rtol=1e-6)
    assert x.min() == 0.0 and x.max() == 1.0
    half = data.normalize(ds, dtype="float16")
    assert half.element_spec[0].dtype == tf.float16
    as_dict = data.normalize(tf.data.Dataset.from_tensor_slices({"image": images,
                                                                 "label": labels}))
    assert as_dict.element_spec["image"].dtype == tf.float32
    assert as_dict.element_spec["label"].dtype == tf.int64
    image, label = data.preprocess(tf.constant(images[1]), tf.constant(2, tf.int64))
    np.testing.assert_allclose(image.numpy(), images[1] / 255.0, rtol=1e-6)
    assert int(label) == 2
    with pytest.raises(ValueError, match="dtype='int32' is not allowed"):
        data.normalize(ds, dtype="int32")
    with pytest.raises(ValueError, match="dtype='no-such-dtype' is not allowed"):
        data.scale_image(images, dtype="no-such-dtype")
    with pytest.raises(TypeError, match="ds must be a tf.data.Dataset"):
        data.normalize(images)


if __name__ == "__main__":  # bazel test / python tests/test_data.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
