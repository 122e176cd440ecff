"""ft_keras.serving_storage: the compact encodings of kernels, checked value by value."""

import numpy as np
import pytest

from ft_keras import serving_storage

RNG = np.random.default_rng(7)


@pytest.mark.parametrize("density, encoding", [(0.02, "rows"), (0.5, "bitmask"), (1.0, "full")])
def test_pack_kernel_chooses_the_smallest_encoding_and_round_trips(density, encoding):
    kernel = RNG.normal(size=(10, 400)).astype(np.float32)
    mask = RNG.random(kernel.shape) < density
    packed = serving_storage.pack_kernel(kernel, mask if density < 1 else None)
    assert packed.encoding == encoding
    assert packed.nnz == (int(mask.sum()) if density < 1 else kernel.size)
    np.testing.assert_array_equal(packed.dense(), np.where(mask, kernel, 0) if density < 1
                                  else kernel)
    np.testing.assert_array_equal(packed.positions(),
                                  np.flatnonzero(mask) if density < 1 else np.arange(4000))
    full_bytes = 4 * kernel.size
    assert packed.nbytes <= full_bytes
    if encoding == "bitmask":  # values + one bit per position
        assert packed.nbytes == 4 * packed.nnz + kernel.size // 8
    if encoding == "rows":  # values + a uint16 column per value + an int32 pointer per row
        assert packed.nbytes == 6 * packed.nnz + 4 * (kernel.shape[0] + 1)


def test_plain_kernels_are_packed_by_their_zeros():
    kernel = np.zeros((8, 300), np.float32)
    kernel[3, 7], kernel[5, 299] = 1.5, -0.0  # -0.0 counts as zero and comes back as +0.0
    kernel[6, 0] = -2.0
    packed = serving_storage.pack_kernel(kernel)
    assert packed.nnz == 2 and packed.encoding in ("rows", "bitmask")
    dense = packed.dense()
    np.testing.assert_array_equal(dense, np.where(kernel != 0, kernel, 0))
    assert not np.signbit(dense[5, 299])
