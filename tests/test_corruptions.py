"""Tests of `ft_keras.corruptions`: generated corruption benchmarks (CIFAR-10-C style)."""

import re

import numpy as np
import pytest
import tensorflow as tf

from ft_keras.harness import corruptions as C
from ft_keras.harness import data
from tests.conftest import skip_without_fashion_mnist

REQUIRED = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "motion_blur",
    "gaussian_blur",
    "contrast",
    "brightness",
    "pixelate",
    "jpeg_compression",
    "elastic_transform",
)


def _synthetic_rgb(n=48, size=32, seed=0):
    """Smooth colour gradients with a rectangle and a disc of random colours, values 30..220."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1.0)
    images = np.empty((n, size, size, 3), np.float64)
    for i in range(n):
        a, b, c = rng.uniform(-1, 1, (3, 3))
        img = 0.5 + 0.25 * (a * yy[..., None] + b * xx[..., None] + 0.3 * c)
        y0, x0 = rng.integers(2, size // 2, 2)
        h, w = rng.integers(4, size // 2, 2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 1, 3)
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        disc = (np.arange(size)[:, None] - cy) ** 2 + (np.arange(size)[None, :] - cx) ** 2
        img[disc < rng.uniform(9, 40)] = rng.uniform(0, 1, 3)
        images[i] = img
    return np.rint(30 + 190 * np.clip(images, 0, 1)).astype(np.uint8)


# The image sets the corruption tests run on: synthetic RGB images (always) and the first 200
# Fashion-MNIST test images (real data: those cases are marked and skip without the data set).
WHICH = ["rgb", pytest.param("fmnist", marks=pytest.mark.real_data)]


@pytest.fixture(scope="module")
def fmnist():
    skip_without_fashion_mnist()
    x, _ = data.load_numpy("fashion_mnist", "test[:200]")
    assert x.shape == (200, 28, 28, 1) and x.dtype == np.uint8
    return x


@pytest.fixture(scope="module")
def rgb():
    return _synthetic_rgb()


@pytest.fixture(scope="module")
def corrupted(request):
    """Lazily computed ``{(set, name, severity): corrupted images}`` (seed 0); a set is loaded
    only when a test asks for it."""
    cache = {}

    def get(which, name, severity):
        key = (which, name, severity)
        if key not in cache:
            cache[key] = C.corrupt(request.getfixturevalue(which), name, severity, seed=0)
        return cache[key]

    return get


def _mad(a, b):
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_names_and_parameters():
    assert len(C.CORRUPTIONS) >= 12 and len(set(C.CORRUPTIONS)) == len(C.CORRUPTIONS)
    for name in REQUIRED:
        assert name in C.CORRUPTIONS
    assert "fog" in C.CORRUPTIONS or "saturate" in C.CORRUPTIONS
    assert set(C.RANDOM_CORRUPTIONS) <= set(C.CORRUPTIONS)
    assert set(C.SEVERITY_PARAMS) == set(C.CORRUPTIONS)
    assert C.SEVERITIES == (1, 2, 3, 4, 5)
    for params in C.SEVERITY_PARAMS.values():
        assert len(params) == 5


def test_docstring_table_matches_parameters():
    rows = {}
    for line in C.__doc__.splitlines():
        match = re.match(r"^(\w+)\s{2,}.*?\s((?:\s+[\d.]+){5})\s*$", line)
        if match and match.group(1) in C.CORRUPTIONS:
            rows[match.group(1)] = tuple(float(v) for v in match.group(2).split())
    assert set(rows) == set(C.CORRUPTIONS)
    for name, params in C.SEVERITY_PARAMS.items():
        np.testing.assert_allclose(rows[name], params, err_msg=name)


@pytest.mark.parametrize("which", WHICH)
@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_shape_change_and_severity_monotone(corrupted, request, which, name):
    clean = request.getfixturevalue(which)
    distances = []
    for severity in C.SEVERITIES:
        out = corrupted(which, name, severity)
        assert out.shape == clean.shape and out.dtype == np.uint8
        distances.append(_mad(out, clean))
    assert distances[0] > 0.5, (name, distances)  # severity 1 visibly changes the images
    assert all(np.diff(distances) > 0), (name, distances)


@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_deterministic_and_seeded(rgb, name):
    x = rgb
    first = C.corrupt(x, name, 3, seed=7)
    np.testing.assert_array_equal(first, C.corrupt(x, name, 3, seed=7))
    other = C.corrupt(x, name, 3, seed=8)
    if name in C.RANDOM_CORRUPTIONS:
        assert np.any(first != other)
    else:
        np.testing.assert_array_equal(first, other)


@pytest.mark.parametrize("name", C.RANDOM_CORRUPTIONS)
def test_per_image_randomness(rgb, name):
    x = rgb[:40]
    full = C.corrupt(x, name, 4, seed=3)
    # An image's draws do not depend on the images after it ...
    np.testing.assert_array_equal(C.corrupt(x[:15], name, 4, seed=3), full[:15])
    # ... and two copies of one image get different draws.
    twins = C.corrupt(np.repeat(x[:1], 2, axis=0), name, 4, seed=3)
    assert np.any(twins[0] != twins[1])


@pytest.mark.parametrize("shape", [(3, 17, 23, 3), (2, 5, 7, 1), (2, 1, 1, 3), (0, 28, 28, 1)])
def test_other_sizes(shape):
    images = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    for name in C.CORRUPTIONS:
        for severity in (1, 5):
            out = C.corrupt(images, name, severity)
            assert out.shape == shape and out.dtype == np.uint8, name


def test_input_not_modified_and_tensor_accepted(rgb):
    x = rgb[:8].copy()
    for name in C.CORRUPTIONS:
        C.corrupt(x, name, 5)
    np.testing.assert_array_equal(x, rgb[:8])
    np.testing.assert_array_equal(
        C.corrupt(tf.constant(x), "fog", 2), C.corrupt(x, "fog", 2)
    )


@pytest.mark.parametrize("which", WHICH)
def test_brightness_raises_mean(corrupted, request, which):
    clean = request.getfixturevalue(which)
    means = [clean.mean()] + [corrupted(which, "brightness", s).mean() for s in C.SEVERITIES]
    assert all(np.diff(means) > 0), means


def test_brightness_offset_is_exact(corrupted, rgb):
    # No clipping on the synthetic images (values <= 220) at severity 1: the offset is exact.
    offset = C.SEVERITY_PARAMS["brightness"][0] * 255
    np.testing.assert_allclose(
        corrupted("rgb", "brightness", 1).astype(float) - rgb, offset, atol=0.51
    )


@pytest.mark.parametrize("which", WHICH)
def test_contrast_shrinks_std(corrupted, request, which):
    clean_f = request.getfixturevalue(which).astype(np.float64)
    for severity, factor in zip(C.SEVERITIES, C.SEVERITY_PARAMS["contrast"]):
        out = corrupted(which, "contrast", severity).astype(np.float64)
        np.testing.assert_allclose(
            out.mean(axis=(1, 2, 3)), clean_f.mean(axis=(1, 2, 3)), atol=0.5
        )
        np.testing.assert_allclose(
            out.std(axis=(1, 2, 3)), factor * clean_f.std(axis=(1, 2, 3)), atol=0.5
        )


@pytest.mark.parametrize("which", WHICH)
def test_pixelate_constant_within_blocks(corrupted, request, which):
    clean = request.getfixturevalue(which).astype(np.float64)
    _, h, w, _ = clean.shape
    for severity, block in zip(C.SEVERITIES, C.SEVERITY_PARAMS["pixelate"]):
        out = corrupted(which, "pixelate", severity)
        for y0 in range(0, h, block):  # the last row/column of blocks may be partial
            for x0 in range(0, w, block):
                tile = out[:, y0 : y0 + block, x0 : x0 + block]
                assert np.all(tile == tile[:, :1, :1]), (block, y0, x0)
                expected = clean[:, y0 : y0 + block, x0 : x0 + block].mean(axis=(1, 2))
                np.testing.assert_allclose(tile[:, 0, 0], expected, atol=0.5 + 1e-4)


@pytest.mark.parametrize("name", ["gaussian_blur", "defocus_blur", "motion_blur"])
@pytest.mark.parametrize("channels", [1, 3])
def test_blur_of_constant_image_is_constant(name, channels):
    values = np.array([0, 1, 77, 128, 254, 255], np.uint8)
    images = np.broadcast_to(values[:, None, None, None], (6, 20, 24, channels)).copy()
    for severity in C.SEVERITIES:
        np.testing.assert_array_equal(C.corrupt(images, name, severity), images)


def test_gaussian_blur_matches_direct_convolution(rgb):
    x = rgb[:4].astype(np.float64) / 255.0
    sigma = C.SEVERITY_PARAMS["gaussian_blur"][2]
    radius = int(np.ceil(3 * sigma))
    t = np.arange(-radius, radius + 1)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    kernel = np.outer(g, g) / np.outer(g, g).sum()
    padded = np.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="symmetric")
    expected = np.zeros_like(x)
    for i in range(2 * radius + 1):
        for j in range(2 * radius + 1):
            expected += kernel[i, j] * padded[:, i : i + 32, j : j + 32]
    out = C.corrupt(rgb[:4], "gaussian_blur", 3)
    assert np.abs(out.astype(np.float64) - np.rint(expected * 255)).max() <= 1


def test_impulse_noise_fraction(corrupted, rgb):
    assert rgb.min() >= 30 and rgb.max() <= 220  # no value is 0 or 255 before
    fractions = []
    for severity, p in zip(C.SEVERITIES, C.SEVERITY_PARAMS["impulse_noise"]):
        out = corrupted("rgb", "impulse_noise", severity)
        changed = out != rgb
        assert np.all(np.isin(out[changed], (0, 255)))
        salt, pepper = np.mean(out == 255), np.mean(out == 0)
        assert abs(salt + pepper - p) < 0.15 * p + 0.002, (severity, salt + pepper, p)
        assert salt > 0 and pepper > 0
        fractions.append(salt + pepper)
    assert all(np.diff(fractions) > 0), fractions


def test_gaussian_noise_std():
    grey = np.full((50, 32, 32, 1), 128, np.uint8)
    for severity, sigma in zip(C.SEVERITIES, C.SEVERITY_PARAMS["gaussian_noise"]):
        residual = (C.corrupt(grey, "gaussian_noise", severity).astype(float) - 128) / 255
        assert abs(residual.mean()) < 0.01
        assert abs(residual.std() - sigma) < 0.05 * sigma


def test_shot_noise_keeps_black_and_is_unbiased():
    images = np.zeros((20, 16, 16, 1), np.uint8)
    images[:, 8:] = 100
    out = C.corrupt(images, "shot_noise", 5).astype(np.float64)
    assert np.all(out[:, :8] == 0)
    assert abs(out[:, 8:].mean() - 100) < 2.0


@pytest.mark.real_data
def test_fog_brightens(corrupted, fmnist):
    means = [fmnist.mean()] + [corrupted("fmnist", "fog", s).mean() for s in C.SEVERITIES]
    assert all(np.diff(means) > 0), means


@pytest.mark.parametrize("which", WHICH)
def test_jpeg_error_grows_as_quality_drops(corrupted, request, which):
    clean = request.getfixturevalue(which)
    errors = [_mad(corrupted(which, "jpeg_compression", s), clean) for s in C.SEVERITIES]
    assert errors[0] > 0 and all(np.diff(errors) > 0), (which, errors)


def test_jpeg_matches_a_direct_round_trip(corrupted, rgb):
    quality = C.SEVERITY_PARAMS["jpeg_compression"][3]
    direct = tf.io.decode_jpeg(tf.io.encode_jpeg(rgb[5], quality=quality), channels=3)
    np.testing.assert_array_equal(corrupted("rgb", "jpeg_compression", 4)[5], direct.numpy())


def test_errors(rgb):
    x = rgb[:4]
    with pytest.raises(ValueError, match=r"name='blurry'.*gaussian_noise.*elastic_transform"):
        C.corrupt(x, "blurry", 1)
    with pytest.raises(TypeError, match="name must be one of"):
        C.corrupt(x, None, 1)
    for bad in (0, 6, -1):
        with pytest.raises(ValueError, match=rf"severity={bad} is not allowed.*\[1, 5\]"):
            C.corrupt(x, "contrast", bad)
    # A wrong type is a TypeError (it was a ValueError before the argument checks were unified).
    for bad in (2.0, "3", True, None):
        with pytest.raises(TypeError, match="severity must be an int"):
            C.corrupt(x, "contrast", bad)
    with pytest.raises(TypeError, match="images"):
        C.corrupt(x.astype(np.float32), "contrast", 1)
    with pytest.raises(TypeError, match="images"):
        C.corrupt(x.tolist(), "contrast", 1)
    with pytest.raises(ValueError, match="images"):
        C.corrupt(x[..., 0], "contrast", 1)
    with pytest.raises(ValueError, match="images"):
        C.corrupt(np.zeros((2, 8, 8, 2), np.uint8), "contrast", 1)
    with pytest.raises(ValueError, match="seed=-1"):
        C.corrupt(x, "contrast", 1, seed=-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        C.corrupt(x, "contrast", 1, seed=1.5)
    assert C.corrupt(x, "contrast", np.int64(2)).shape == x.shape
    np.testing.assert_array_equal(
        C.corrupt(x, "Fog", 2, seed=np.int32(3)), C.corrupt(x, "fog", 2, seed=3)
    )


def test_suite(rgb):
    x = rgb[:10]
    items = list(C.suite(x))
    assert [(n, s) for n, s, _ in items] == [
        (n, s) for n in C.CORRUPTIONS for s in C.SEVERITIES
    ]
    for name, severity, out in items:
        np.testing.assert_array_equal(out, C.corrupt(x, name, severity))
    some = list(C.suite(x, severities=(2, 5), names=("fog", "pixelate"), seed=4))
    expected = [("fog", 2), ("fog", 5), ("pixelate", 2), ("pixelate", 5)]
    assert [(n, s) for n, s, _ in some] == expected
    np.testing.assert_array_equal(some[1][2], C.corrupt(x, "fog", 5, seed=4))
    # Arguments are checked when suite() is called, not when iteration starts.
    with pytest.raises(ValueError, match=r"names\[0\]='nope'.*gaussian_noise"):
        C.suite(x, names=("nope",))
    with pytest.raises(ValueError, match=r"severities\[1\]=9"):
        C.suite(x, severities=(1, 9))
    with pytest.raises(TypeError, match="names must be a sequence"):
        C.suite(x, names="fog")
    with pytest.raises(TypeError, match="severities must be a sequence"):
        C.suite(x, severities=3)
    with pytest.raises(TypeError, match="images"):
        C.suite(x.astype(np.int32))


def _collect(ds):
    images, labels = [], []
    for image, label in ds:
        images.append(image.numpy())
        labels.append(label.numpy())
    return np.stack(images), np.array(labels)


@pytest.mark.real_data
@pytest.mark.parametrize("name", ["gaussian_noise", "jpeg_compression", "contrast"])
def test_corrupt_dataset(fmnist, name):
    x = fmnist[:150]
    y = np.arange(150, dtype=np.int64) % 10
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    out = C.corrupt_dataset(ds, name, 3, seed=5, batch_size=64)
    assert int(out.cardinality()) == 150
    assert out.element_spec == ds.element_spec
    images, labels = _collect(out)
    np.testing.assert_array_equal(labels, y)
    assert images.shape == x.shape and images.dtype == np.uint8
    np.testing.assert_array_equal(images[:64], C.corrupt(x[:64], name, 3, seed=5))
    if name not in C.RANDOM_CORRUPTIONS:
        np.testing.assert_array_equal(images, C.corrupt(x, name, 3, seed=5))
    # Same again (deterministic), and one batch covering everything equals corrupt().
    np.testing.assert_array_equal(_collect(out)[0], images)
    whole, _ = _collect(C.corrupt_dataset(ds, name, 3, seed=5, batch_size=1000))
    np.testing.assert_array_equal(whole, C.corrupt(x, name, 3, seed=5))


@pytest.mark.real_data
def test_corrupt_dataset_batched_and_image_only(fmnist):
    x = fmnist[:100]
    y = np.zeros(100, np.int64)
    batched = tf.data.Dataset.from_tensor_slices((x, y)).batch(40)
    out = C.corrupt_dataset(batched, "fog", 2, seed=1)
    assert int(out.cardinality()) == 3
    parts = [image.numpy() for image, _ in out]
    assert [p.shape[0] for p in parts] == [40, 40, 20]
    np.testing.assert_array_equal(parts[0], C.corrupt(x[:40], "fog", 2, seed=1))
    only = C.corrupt_dataset(tf.data.Dataset.from_tensor_slices(x), "pixelate", 4)
    np.testing.assert_array_equal(
        np.stack([image.numpy() for image in only]), C.corrupt(x, "pixelate", 4)
    )


def test_corrupt_dataset_errors(rgb):
    ds = tf.data.Dataset.from_tensor_slices((rgb[:4], np.zeros(4, np.int64)))
    with pytest.raises(TypeError, match="ds"):
        C.corrupt_dataset(rgb[:4], "fog", 1)
    with pytest.raises(ValueError, match="fog"):
        C.corrupt_dataset(ds, "haze", 1)
    with pytest.raises(ValueError, match="severity"):
        C.corrupt_dataset(ds, "fog", 0)
    with pytest.raises(ValueError, match="batch_size=0"):
        C.corrupt_dataset(ds, "fog", 1, batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        C.corrupt_dataset(ds, "fog", 1, batch_size=8.0)
    floats = ds.map(lambda image, label: (tf.cast(image, tf.float32), label))
    with pytest.raises(TypeError, match="images"):
        C.corrupt_dataset(floats, "fog", 1)
    flat = ds.map(lambda image, label: (tf.reshape(image, [-1]), label))
    with pytest.raises(ValueError, match="images"):
        C.corrupt_dataset(flat, "fog", 1)


if __name__ == "__main__":  # bazel test / python tests/test_corruptions.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
