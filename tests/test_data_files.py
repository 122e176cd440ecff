"""ft_keras.harness.data_files: the offline file readers, on hand-made files."""

import numpy as np
import pytest

from ft_keras.harness import data_files
from tests.conftest import idx_bytes as _idx_bytes
from tests.conftest import write_bytes as _write
from tests.conftest import write_tiny_idx as _write_tiny_idx


def test_probe_and_load_an_idx_pair(tmp_path):
    _write_tiny_idx(tmp_path, prefix="train", n=4, gz=False)
    found, reason = data_files.probe_idx(str(tmp_path), "train")
    assert found is not None, reason
    images, labels = data_files.load_idx_pair(*found, (28, 28, 1), 10)
    assert images.shape[:3] == (4, 28, 28) and labels.tolist() == [0, 1, 2, 3]
    missing, reason = data_files.probe_idx(str(tmp_path), "test")
    assert missing is None and "t10k-images-idx3-ubyte[.gz]" in reason


def test_idx_images_of_the_wrong_shape_are_refused(tmp_path):
    images = _write(tmp_path / "i.idx", _idx_bytes(np.zeros((2, 5, 5), np.uint8)))
    labels = _write(tmp_path / "l.idx", _idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(ValueError, match=r"i\.idx: expected uint8 images of shape \(N, 28, 28\)"):
        data_files.load_idx_pair(images, labels, (28, 28, 1), 10)


def test_the_cifar_permutation_is_fixed_and_read_only():
    perm = data_files.cifar_permutation(50)
    np.testing.assert_array_equal(perm, data_files.cifar_permutation(50))
    assert sorted(perm.tolist()) == list(range(50)) and not perm.flags.writeable
