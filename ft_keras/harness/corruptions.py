"""Common image corruptions at five severities, for robustness evaluation (CIFAR-10-C style).

No CIFAR-10-C (or any other corrupted benchmark) is available offline, so this module generates
corrupted test sets itself: noise, blur, photometric, digital and geometric corruptions, each at
severities 1 (mild) to 5 (strong). All implementations are written from scratch with numpy (and
TensorFlow's JPEG codec); the severity parameters are this project's own choice and are *not*
those of the published CIFAR-10-C / ImageNet-C benchmarks, so accuracies on these sets are
comparable with each other, not with numbers reported on CIFAR-10-C.

Images are ``uint8`` arrays of shape ``(N, H, W, C)`` with ``C`` in ``{1, 3}`` (Fashion-MNIST
``28x28x1`` and CIFAR-10 ``32x32x3``; any ``H, W >= 1`` works). Internally the pixels are
scaled to floats in ``[0, 1]``; the result is rounded back to ``uint8`` (clipped to
``[0, 255]``). Every corruption acts on grey images too: there are no colour-only corruptions
(haze is grey, brightness is added to every channel alike).

Severity parameters (intensities on the ``[0, 1]`` scale, lengths in pixels; the spatial
parameters are tuned for 28-32 pixel images and are not rescaled for larger ones):

=================== ================================== ===== ===== ===== ===== =====
name                parameter                            1     2     3     4     5
=================== ================================== ===== ===== ===== ===== =====
gaussian_noise      noise std sigma                     0.04  0.07  0.10  0.14  0.19
shot_noise          photons at full intensity lam        120    60    30    15     8
impulse_noise       fraction p of values set to 0/255   0.01  0.03  0.05  0.08  0.12
defocus_blur        disk radius (px)                     1.0   1.5   2.0   2.5   3.0
motion_blur         line length (px)                     2.0   3.0   4.5   6.0   8.0
gaussian_blur       Gaussian std (px)                    0.5   0.8   1.1   1.4   1.8
contrast            contrast factor c                   0.65  0.50  0.35  0.22  0.12
brightness          offset added b                      0.08  0.16  0.24  0.32  0.40
fog                 haze strength a                     0.15  0.25  0.35  0.45  0.60
pixelate            block size (px)                        2     3     4     5     6
jpeg_compression    JPEG quality                          70    50    32    20    10
elastic_transform   RMS displacement (px)               0.50  0.80  1.10  1.50  2.00
=================== ================================== ===== ===== ===== ===== =====

What each corruption does, with ``x`` the clean image in ``[0, 1]`` and ``s`` the parameter:

* ``gaussian_noise``: ``x + s * z``, ``z`` standard normal per value.
* ``shot_noise``: ``Poisson(lam * x) / lam`` per value (photon counting noise; black stays black).
* ``impulse_noise``: salt and pepper: each value independently becomes 1 (probability ``p/2``)
  or 0 (probability ``p/2``).
* ``defocus_blur``: convolution with an anti-aliased disk (weight ``clip(r + 0.5 - d, 0, 1)`` at
  distance ``d`` from the centre), normalised to sum 1.
* ``motion_blur``: convolution with an anti-aliased line segment centred on the pixel, of the
  given length, at a random angle in ``[0, pi)`` per image (bilinear splatting of points along
  the segment).
* ``gaussian_blur``: separable convolution with a sampled Gaussian (radius ``ceil(3 sigma)``).
* ``contrast``: ``m + c * (x - m)``, ``m`` the image's mean over all pixels and channels.
* ``brightness``: ``x + b``.
* ``fog``: grey haze ``x + alpha * (1 - x)`` with ``alpha = a * (0.4 + 0.6 * H)``, where ``H`` is
  a random smooth field in ``[0, 1]`` per image (three octaves of Gaussian random fields with
  correlation lengths ``max(H, W) / 2``, ``/ 4``, ``/ 8`` and weights 1, 1/2, 1/4, min-max
  scaled).
* ``pixelate``: every aligned ``k x k`` block (starting at the top-left corner; the last
  row/column of blocks may be smaller) is replaced by its mean.
* ``jpeg_compression``: a JPEG round trip (``tf.io.encode_jpeg`` / ``tf.io.decode_jpeg``, one
  image at a time) at the given quality.
* ``elastic_transform``: resampling (bilinear, mirrored at the borders) along a random smooth
  displacement field per image: a Gaussian random field with correlation length 4 pixels, one
  per axis, scaled to the given root-mean-square displacement.

Outside the image, the convolutions mirror the image (``numpy.pad(..., mode="symmetric")``).

Randomness: ``gaussian_noise``, ``shot_noise``, ``impulse_noise``, ``motion_blur``, ``fog`` and
``elastic_transform`` are random (`RANDOM_CORRUPTIONS`); the others are deterministic functions
of the image. The random draws of a call come from ``numpy.random.default_rng`` seeded with
``SeedSequence(seed, spawn_key=(crc32(name), batch_index))`` (``batch_index`` is 0 in
`corrupt`). Consequences:

* the output is a deterministic function of ``(images, name, severity, seed)``;
* the draws do not depend on the severity, so for one seed the five severities scale the *same*
  noise / angles / fields and the strength grows monotonically image by image;
* every image's draws are one contiguous block of the stream, so the corruption of an image does
  not depend on the images after it: ``corrupt(x[:k], ...) == corrupt(x, ...)[:k]``.

`corrupt_dataset` corrupts a ``tf.data.Dataset`` in batches; batch ``b`` uses
``batch_index=b``, so its output depends on ``batch_size`` for the random corruptions (the
first batch equals `corrupt` of the first ``batch_size`` images).

Example:
    >>> from ft_keras.harness import corruptions, data
    >>> x, y = data.load_numpy("fashion_mnist", "test")
    >>> x_fog = corruptions.corrupt(x, "fog", severity=3, seed=0)
    >>> for name, severity, x_c in corruptions.suite(x):          # 12 x 5 corrupted copies
    ...     pass
    >>> ds = corruptions.corrupt_dataset(data.load("fashion_mnist", "test"), "shot_noise", 2)
"""

from __future__ import annotations

import math
import zlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from ft_keras import _checks

CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "motion_blur",
    "gaussian_blur",
    "contrast",
    "brightness",
    "fog",
    "pixelate",
    "jpeg_compression",
    "elastic_transform",
)
"""Names of the corruptions, in the order `suite` yields them."""

RANDOM_CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "motion_blur",
    "fog",
    "elastic_transform",
)
"""The corruptions whose output depends on ``seed``."""

SEVERITIES = (1, 2, 3, 4, 5)
"""Valid severities."""

SEVERITY_PARAMS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.07, 0.10, 0.14, 0.19),
    "shot_noise": (120, 60, 30, 15, 8),
    "impulse_noise": (0.01, 0.03, 0.05, 0.08, 0.12),
    "defocus_blur": (1.0, 1.5, 2.0, 2.5, 3.0),
    "motion_blur": (2.0, 3.0, 4.5, 6.0, 8.0),
    "gaussian_blur": (0.5, 0.8, 1.1, 1.4, 1.8),
    "contrast": (0.65, 0.50, 0.35, 0.22, 0.12),
    "brightness": (0.08, 0.16, 0.24, 0.32, 0.40),
    "fog": (0.15, 0.25, 0.35, 0.45, 0.60),
    "pixelate": (2, 3, 4, 5, 6),
    "jpeg_compression": (70, 50, 32, 20, 10),
    "elastic_transform": (0.50, 0.80, 1.10, 1.50, 2.00),
}
"""The parameter of each corruption at severities 1..5 (see the module docstring's table)."""

_ELASTIC_LENGTH = 4.0  # correlation length (px) of the elastic displacement field
_FOG_OCTAVES = ((2.0, 1.0), (4.0, 0.5), (8.0, 0.25))  # (divisor of max(H, W), weight)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_name(name: Any, argument: str = "name") -> str:
    return _checks.check_choice(argument, name, CORRUPTIONS)


def _check_severity(severity: Any, argument: str = "severity") -> int:
    return _checks.check_int(argument, severity, minimum=1, maximum=5)


def _check_seed(seed: Any) -> int:
    # numpy's SeedSequence takes non-negative ints only.
    return _checks.check_int("seed", seed, minimum=0)


def _check_images(images: Any) -> np.ndarray:
    if isinstance(images, tf.Tensor):
        images = images.numpy()
    if not isinstance(images, np.ndarray):
        raise TypeError(
            f"images must be a numpy array of dtype uint8, got {type(images).__name__}."
        )
    if images.dtype != np.uint8:
        raise TypeError(f"images must have dtype uint8, got images.dtype={images.dtype}.")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            "images must have shape (N, H, W, C) with C in {1, 3}, got "
            f"images.shape={images.shape}."
        )
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise ValueError(f"images must have H, W >= 1, got images.shape={images.shape}.")
    return images


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _rng(seed: int, name: str, batch_index: int) -> np.random.Generator:
    key = (zlib.crc32(name.encode("utf-8")), int(batch_index))
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def _to_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) * np.float32(1.0 / 255.0)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * np.float32(255.0)), 0.0, 255.0).astype(np.uint8)


def _pad(x: np.ndarray, ry: int, rx: int) -> np.ndarray:
    """Mirrors ``x`` (N, H, W, C) by ``ry`` rows and ``rx`` columns on each side."""
    return np.pad(x, ((0, 0), (ry, ry), (rx, rx), (0, 0)), mode="symmetric")


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Filters ``x`` (N, H, W, C) with a centred odd-sized kernel, by shift-and-add.

    Args:
        x: Float images.
        kernel: ``(KH, KW)`` shared by all images, or ``(N, KH, KW)``, one kernel per image.
            The kernels used here are point-symmetric, so correlation equals convolution.

    Returns:
        The filtered images, same shape as ``x``.
    """
    _, h, w, _ = x.shape
    kh, kw = kernel.shape[-2:]
    padded = _pad(x, kh // 2, kw // 2)
    out = np.zeros_like(x)
    per_image = kernel.ndim == 3
    for i in range(kh):
        for j in range(kw):
            weight = kernel[..., i, j]
            if not np.any(weight):
                continue
            patch = padded[:, i : i + h, j : j + w, :]
            if per_image:
                out += weight.astype(np.float32)[:, None, None, None] * patch
            else:
                out += np.float32(weight) * patch
    return out


def _gaussian_kernel_1d(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    return (g / g.sum()).astype(np.float32)


def _disk_kernel(radius: float) -> np.ndarray:
    r = int(math.ceil(radius))
    t = np.arange(-r, r + 1, dtype=np.float64)
    dist = np.hypot(t[:, None], t[None, :])
    k = np.clip(radius + 0.5 - dist, 0.0, 1.0)
    return (k / k.sum()).astype(np.float32)


def _line_kernels(angles: np.ndarray, length: float) -> np.ndarray:
    """One anti-aliased, centred line-segment kernel per angle: ``(N, K, K)``, each summing to 1."""
    n = angles.shape[0]
    half = int(math.ceil(length / 2.0)) + 1
    size = 2 * half + 1
    t = np.linspace(-length / 2.0, length / 2.0, int(math.ceil(4.0 * length)) + 1)
    ys = half + t[None, :] * np.sin(angles)[:, None]  # (N, M), rows grow downwards
    xs = half + t[None, :] * np.cos(angles)[:, None]
    y0 = np.floor(ys)
    x0 = np.floor(xs)
    fy = ys - y0
    fx = xs - x0
    y0 = y0.astype(np.int64)
    x0 = x0.astype(np.int64)
    base = np.arange(n, dtype=np.int64)[:, None] * size * size
    flat_k = np.zeros(n * size * size, dtype=np.float64)
    for dy, dx, weight in (
        (0, 0, (1 - fy) * (1 - fx)),
        (0, 1, (1 - fy) * fx),
        (1, 0, fy * (1 - fx)),
        (1, 1, fy * fx),
    ):
        index = base + (y0 + dy) * size + (x0 + dx)
        flat_k += np.bincount(index.ravel(), weights=weight.ravel(), minlength=flat_k.size)
    kernels = flat_k.reshape(n, size, size)
    kernels /= kernels.sum(axis=(1, 2), keepdims=True)
    return kernels.astype(np.float32)


def _rbf_matrix(size: int, length: float) -> tuple[np.ndarray, int]:
    """Gaussian interpolation weights ``(size, nodes)`` from nodes spaced ``length`` apart."""
    nodes = int(math.ceil((size - 1 + 2.0 * length) / length)) + 1
    centres = np.linspace(-length, size - 1 + length, nodes)
    pos = np.arange(size, dtype=np.float64)[:, None]
    return np.exp(-0.5 * ((pos - centres[None, :]) / length) ** 2), nodes


def _random_fields(
    rng: np.random.Generator, n: int, h: int, w: int, lengths: Sequence[float], k: int
) -> list[np.ndarray]:
    """Smooth Gaussian random fields: one ``(N, H, W, k)`` array per correlation length.

    All the normal draws of one image are one contiguous block of the stream (drawn as a single
    ``(N, D)`` array), so an image's fields do not depend on the images after it.
    """
    mats = [(_rbf_matrix(h, ell), _rbf_matrix(w, ell)) for ell in lengths]
    sizes = [ny * nx * k for (_, ny), (_, nx) in mats]
    z = rng.standard_normal((n, sum(sizes)))
    fields = []
    start = 0
    for ((ry, ny), (rx, nx)), size in zip(mats, sizes):
        coarse = z[:, start : start + size].reshape(n, ny, nx, k).transpose(0, 3, 1, 2)
        start += size
        fine = np.matmul(np.matmul(ry, coarse), rx.T)  # (N, k, H, W)
        fields.append(fine.transpose(0, 2, 3, 1).astype(np.float32))
    return fields


def _reflect(coord: np.ndarray, size: int) -> np.ndarray:
    """Mirrors continuous coordinates into ``[0, size - 1]``."""
    if size == 1:
        return np.zeros_like(coord)
    period = 2.0 * (size - 1)
    coord = np.mod(coord, period)
    return np.where(coord > size - 1, period - coord, coord)


def _bilinear_sample(x: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Samples ``x`` (N, H, W, C) at float coordinates ``ys, xs`` (N, H, W), mirrored borders."""
    n, h, w, _ = x.shape
    ys = _reflect(ys, h)
    xs = _reflect(xs, w)
    y0 = np.clip(np.floor(ys).astype(np.int64), 0, h - 1)
    x0 = np.clip(np.floor(xs).astype(np.int64), 0, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    fy = (ys - y0).astype(np.float32)[..., None]
    fx = (xs - x0).astype(np.float32)[..., None]
    idx = np.arange(n)[:, None, None]
    top = x[idx, y0, x0] * (1 - fx) + x[idx, y0, x1] * fx
    bottom = x[idx, y1, x0] * (1 - fx) + x[idx, y1, x1] * fx
    return top * (1 - fy) + bottom * fy


# --------------------------------------------------------------------------------------------
# The corruptions: (float images in [0, 1], parameter, rng) -> float images
# --------------------------------------------------------------------------------------------


def _gaussian_noise(x, sigma, rng):
    return x + np.float32(sigma) * rng.standard_normal(x.shape, dtype=np.float32)


def _shot_noise(x, lam, rng):
    return (rng.poisson(x * np.float32(lam)) / lam).astype(np.float32)


def _impulse_noise(x, p, rng):
    u = rng.random(x.shape, dtype=np.float32)
    out = np.where(u < p / 2.0, np.float32(1.0), x)
    return np.where((u >= p / 2.0) & (u < p), np.float32(0.0), out)


def _defocus_blur(x, radius, rng):
    del rng
    return _convolve(x, _disk_kernel(radius))


def _motion_blur(x, length, rng):
    angles = rng.uniform(0.0, math.pi, size=x.shape[0])
    return _convolve(x, _line_kernels(angles, length))


def _gaussian_blur(x, sigma, rng):
    del rng
    g = _gaussian_kernel_1d(sigma)
    return _convolve(_convolve(x, g[None, :]), g[:, None])


def _contrast(x, c, rng):
    del rng
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return mean + np.float32(c) * (x - mean)


def _brightness(x, b, rng):
    del rng
    return x + np.float32(b)


def _fog(x, a, rng):
    n, h, w, _ = x.shape
    longest = float(max(h, w))
    lengths = [max(1.0, longest / div) for div, _ in _FOG_OCTAVES]
    fields = _random_fields(rng, n, h, w, lengths, 1)
    haze = sum(weight * f for (_, weight), f in zip(_FOG_OCTAVES, fields))
    lo = haze.min(axis=(1, 2, 3), keepdims=True)
    hi = haze.max(axis=(1, 2, 3), keepdims=True)
    haze = (haze - lo) / np.maximum(hi - lo, 1e-12)
    alpha = (a * (0.4 + 0.6 * haze)).astype(np.float32)
    return x + alpha * (1.0 - x)


def _pixelate(x, block, rng):
    del rng
    block = int(block)
    n, h, w, c = x.shape
    hb = -(-h // block)
    wb = -(-w // block)
    padded = np.zeros((n, hb * block, wb * block, c), np.float32)
    padded[:, :h, :w] = x
    counts = np.zeros((hb * block, wb * block), np.float32)
    counts[:h, :w] = 1.0
    sums = padded.reshape(n, hb, block, wb, block, c).sum(axis=(2, 4))
    counts = counts.reshape(hb, block, wb, block).sum(axis=(1, 3))
    means = sums / counts[None, :, :, None]
    return np.repeat(np.repeat(means, block, axis=1), block, axis=2)[:, :h, :w]


def _elastic_transform(x, rms, rng):
    n, h, w, _ = x.shape
    (field,) = _random_fields(rng, n, h, w, [_ELASTIC_LENGTH], 2)
    field *= rms / np.sqrt(np.mean(field**2, axis=(1, 2, 3), keepdims=True) + 1e-12)
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return _bilinear_sample(x, ys[None] + field[..., 0], xs[None] + field[..., 1])


_FLOAT_FNS: dict[str, Callable[[np.ndarray, float, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "motion_blur": _motion_blur,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "brightness": _brightness,
    "fog": _fog,
    "pixelate": _pixelate,
    "elastic_transform": _elastic_transform,
}


def _jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip of each image (uint8 in, uint8 out)."""
    channels = images.shape[-1]
    fmt = "grayscale" if channels == 1 else "rgb"
    out = np.empty_like(images)
    for i in range(images.shape[0]):  # the codec takes one image at a time
        encoded = tf.io.encode_jpeg(images[i], format=fmt, quality=int(quality))
        out[i] = tf.io.decode_jpeg(encoded, channels=channels).numpy()
    return out


def _corrupt(images: np.ndarray, name: str, severity: int, seed: int, batch_index: int):
    if images.shape[0] == 0:
        return images.copy()
    param = SEVERITY_PARAMS[name][severity - 1]
    if name == "jpeg_compression":
        return _jpeg(images, int(param))
    rng = _rng(seed, name, batch_index)
    return _to_uint8(_FLOAT_FNS[name](_to_float(images), param, rng))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupts a batch of images.

    Args:
        images: ``uint8`` array ``(N, H, W, C)``, ``C`` in ``{1, 3}`` (a ``tf.Tensor`` is
            converted). It is not modified.
        name: One of `CORRUPTIONS` (any case).
        severity: Integer 1 (mild) to 5 (strong); see `SEVERITY_PARAMS`.
        seed: Non-negative integer seeding the random corruptions (`RANDOM_CORRUPTIONS`); the
            same ``(images, name, severity, seed)`` always gives the same output.

    Returns:
        A new ``uint8`` array of the same shape.

    Raises:
        ValueError: If ``name`` is unknown (the message lists the names; names are
            case-insensitive), ``severity`` is not in 1..5, ``seed`` is negative, or ``images``
            does not have shape ``(N, H, W, 1|3)``.
        TypeError: If ``name`` is not a str, ``severity`` or ``seed`` is not an int (numpy ints
            are accepted), or ``images`` is not a ``uint8`` array.
    """
    name = _check_name(name)
    severity = _check_severity(severity)
    seed = _check_seed(seed)
    images = _check_images(images)
    return _corrupt(images, name, severity, seed, 0)


def suite(
    images: np.ndarray,
    severities: Sequence[int] = SEVERITIES,
    names: Sequence[str] = CORRUPTIONS,
    seed: int = 0,
) -> Iterator[tuple[str, int, np.ndarray]]:
    """Iterates over corrupted copies of ``images``: every name at every severity.

    The arguments are checked when `suite` is called, before the first copy is made; each copy
    is computed only when the iterator reaches it, so at most one copy is alive at a time when
    the caller does not keep them.

    Args:
        images: ``uint8`` array ``(N, H, W, C)``, ``C`` in ``{1, 3}``.
        severities: Severities to generate, each in 1..5.
        names: Corruption names, each in `CORRUPTIONS`.
        seed: Seed passed to `corrupt`.

    Returns:
        An iterator of ``(name, severity, corrupted_images)``, names in the outer loop.

    Raises:
        ValueError: As `corrupt`, for any of the names or severities (the message names the
            entry, e.g. ``severities[1]=9``).
        TypeError: As `corrupt`; also if ``names`` or ``severities`` is a bare string /
            integer instead of a sequence.
    """
    for argument, value, example in (("names", names, "('fog', 'pixelate')"),
                                     ("severities", severities, "(1, 3, 5)")):
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise TypeError(
                f"{argument} must be a sequence such as {example}; got {value!r} "
                f"({type(value).__name__})."
            )
    names = [_check_name(n, f"names[{i}]") for i, n in enumerate(names)]
    severities = [_check_severity(s, f"severities[{i}]") for i, s in enumerate(severities)]
    seed = _check_seed(seed)
    images = _check_images(images)

    def generate():
        for name in names:
            for severity in severities:
                yield name, severity, _corrupt(images, name, severity, seed, 0)

    return generate()


def corrupt_dataset(
    ds: tf.data.Dataset, name: str, severity: int, seed: int = 0, batch_size: int = 1024
) -> tf.data.Dataset:
    """Corrupts the images of a ``tf.data.Dataset`` lazily, in numpy batches.

    The images are grouped into batches of ``batch_size`` (an input whose images are already
    batched, rank 4, keeps its batches), each batch is corrupted by `corrupt`'s code inside
    ``tf.numpy_function`` (batch ``b`` uses the random stream ``(seed, name, b)``, see the
    module docstring), and the batches are split again. Nothing is materialised; the labels
    (and any further tuple components) pass through untouched, in the same order.

    Args:
        ds: Dataset whose elements are ``uint8`` images ``(H, W, C)`` (or batches
            ``(B, H, W, C)``), ``C`` in ``{1, 3}``, either alone or as the first component of a
            tuple such as ``(image, label)``.
        name: One of `CORRUPTIONS`.
        severity: Integer in 1..5.
        seed: Non-negative integer seed.
        batch_size: Images per numpy batch (ignored for already batched input). For the random
            corruptions the output depends on it; the first batch equals `corrupt` of the first
            ``batch_size`` images.

    Returns:
        A dataset with the same element structure, element spec and cardinality (when the
        input's cardinality is known).

    Raises:
        ValueError: For an unknown name, a severity outside 1..5, a negative seed, a
            non-positive ``batch_size`` or images whose shape is not ``(H, W, 1|3)``.
        TypeError: If an argument has the wrong type (as `corrupt`; ``batch_size`` not an int),
            ``ds`` is not a dataset or its images are not ``uint8``.
    """
    name = _check_name(name)
    severity = _check_severity(severity)
    seed = _check_seed(seed)
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    if not isinstance(ds, tf.data.Dataset):
        raise TypeError(f"ds must be a tf.data.Dataset, got {type(ds).__name__}.")
    spec = ds.element_spec
    is_tuple = isinstance(spec, tuple)
    image_spec = spec[0] if is_tuple and spec else spec
    if not isinstance(image_spec, tf.TensorSpec):
        raise TypeError(
            "ds must yield images or tuples whose first component is the images, got "
            f"element_spec={spec!r}."
        )
    if image_spec.dtype != tf.uint8:
        raise TypeError(f"images in ds must have dtype uint8, got {image_spec.dtype.name}.")
    shape = image_spec.shape
    if shape.rank not in (3, 4) or shape[-1] not in (1, 3):
        raise ValueError(
            "images in ds must have shape (H, W, C) or (B, H, W, C) with C in {1, 3}, got "
            f"{shape}."
        )
    batched = shape.rank == 4
    cardinality = int(ds.cardinality())

    def apply(batch_index, images):
        return _corrupt(_check_images(images), name, severity, seed, int(batch_index))

    def fn(batch_index, element):
        images = element[0] if is_tuple else element
        out = tf.numpy_function(apply, [batch_index, images], tf.uint8, stateful=False)
        out.set_shape(images.shape)
        return (out, *element[1:]) if is_tuple else out

    work = ds if batched else ds.batch(batch_size)
    work = work.enumerate().map(
        fn,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if not batched:
        work = work.unbatch()
        if cardinality >= 0:
            work = work.apply(tf.data.experimental.assert_cardinality(cardinality))
    return work
