"""Offline data files of the research harness: MNIST / Fashion-MNIST IDX files and CIFAR-10
(JPEG folders or archives, or the Python pickles), decoded to numpy arrays, with an on-disk cache
of decoded CIFAR-10 images. `ft_keras.harness.data` finds the files and builds the datasets.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import pickle
import re
import tarfile
import tempfile
import warnings
import zlib
from typing import Callable

import numpy as np
import tensorflow as tf

from ft_keras import _checks

_LOG = logging.getLogger(__name__)

#: Environment variable naming the directory of the decoded-image cache.
CACHE_DIR_ENV = "FT_KERAS_CACHE_DIR"

#: Seed of the fixed permutation applied to local CIFAR-10 splits.
CIFAR_PERMUTATION_SEED = 0

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

SPLITS = ("train", "test")

IDX_PREFIX = {"train": "train", "test": "t10k"}

CIFAR_ARCHIVES = ("cifar10-jpeg.tar.gz", "cifar10-jpeg.tgz", "cifar10-jpeg.tar")

CIFAR_PICKLE_DIR = "cifar-10-batches-py"

CIFAR_PICKLE_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Bumped whenever the decoding changes, so stale .npz caches are not reused.
_CACHE_FORMAT = "ft_keras-cifar10-v1-jpeg-islow"


# --------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzip(path: str) -> bytes:
    """Returns the bytes of ``path``, decompressed when it starts with the gzip magic."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: corrupt gzip data ({err})") from err


def _parse_idx(raw: bytes, path: str) -> np.ndarray:
    """Parses IDX bytes: 2 zero bytes, a type code, the rank, big-endian uint32 dims, data."""
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (the first two bytes must be zero)"
        )
    if raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{raw[2]:02x}")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares zero dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(
            f"{path}: truncated IDX header ({len(raw)} bytes, expected {header_len})"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header_len
    if found != expected:
        raise ValueError(
            f"{path}: IDX header declares shape {dims} ({expected} data bytes) but the file "
            f"holds {found} data bytes after its {header_len}-byte header"
        )
    array = np.frombuffer(raw, dtype, offset=header_len).reshape(dims)
    if dtype.itemsize > 1:
        array = array.astype(dtype.newbyteorder("="))
    return array


@functools.lru_cache(maxsize=32)
def _read_idx_cached(path: str, size: int, mtime_ns: int) -> np.ndarray:
    del size, mtime_ns  # Only part of the cache key.
    array = _parse_idx(_read_maybe_gzip(path), path)
    array.flags.writeable = False
    return array


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (gzipped or not) into a read-only numpy array.

    The result is cached in-process, keyed by the resolved path, size and modification time.

    Args:
        path: Path of the file, e.g. ``".../train-images-idx3-ubyte.gz"``.

    Returns:
        The array, shaped as the header says (``(N, 28, 28)`` for MNIST images).

    Raises:
        TypeError: If ``path`` is not a path.
        ValueError: If the header is invalid or the data size does not match it; the message
            names the file.
    """
    resolved = os.path.realpath(_checks.check_path("path", path))
    stat = os.stat(resolved)
    return _read_idx_cached(resolved, stat.st_size, stat.st_mtime_ns)


def load_idx_pair(
    images_path: str, labels_path: str, shape: tuple[int, ...], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reads and validates an IDX image file and its label file."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != shape[:2]:
        raise ValueError(
            f"{images_path}: expected uint8 images of shape (N, {shape[0]}, {shape[1]}), "
            f"found {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(
            f"{labels_path}: expected a 1-D uint8 label file, found {labels.dtype} {labels.shape}"
        )
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{labels_path}: holds {labels.shape[0]} labels but {images_path} holds "
            f"{images.shape[0]} images"
        )
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"{labels_path}: label {int(labels.max())} >= {num_classes} classes")
    return images.reshape(images.shape + (1,)), labels.astype(np.int64)


def _find_idx_file(directory: str, stem: str) -> str | None:
    # The original distribution also used e.g. 'train-images.idx3-ubyte'.
    dotted = stem.replace("-idx", ".idx")
    for base in (stem, dotted):
        for suffix in (".gz", ""):
            candidate = os.path.join(directory, base + suffix)
            if os.path.isfile(candidate):
                return candidate
    return None


def probe_idx(directory: str, split: str) -> tuple[tuple[str, str] | None, str]:
    prefix = IDX_PREFIX[split]
    found, missing = [], []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        path = _find_idx_file(directory, stem)
        if path is None:
            missing.append(f"{stem}[.gz]")
        found.append(path)
    if missing:
        return None, "no " + " / ".join(missing)
    return (found[0], found[1]), ""


# --------------------------------------------------------------------------------------------
# CIFAR-10 local sources
# --------------------------------------------------------------------------------------------


def _natural_key(text: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def probe_cifar(directory: str, split: str) -> tuple[tuple[str, str] | None, str]:
    """Returns ``((kind, path), "")`` for the CIFAR-10 source in ``directory``, or a reason."""
    split_dir = os.path.join(directory, split)
    if all(os.path.isdir(os.path.join(split_dir, c)) for c in CIFAR10_CLASSES):
        return ("folder", split_dir), ""
    for archive in CIFAR_ARCHIVES:
        path = os.path.join(directory, archive)
        if os.path.isfile(path):
            return ("archive", path), ""
    for batches in (os.path.join(directory, CIFAR_PICKLE_DIR), directory):
        if all(os.path.isfile(os.path.join(batches, f)) for f in CIFAR_PICKLE_FILES[split]):
            return ("pickle", batches), ""
    return None, (
        f"no {split}/<class>/ folders, no {CIFAR_ARCHIVES[0]}, no {CIFAR_PICKLE_DIR}/"
    )


def _decode_images(blobs: list[bytes], names: list[str], origin: str) -> np.ndarray:
    """Decodes JPEG/PNG bytes into a ``(N, 32, 32, 3)`` uint8 array, in parallel with tf.data."""
    if not blobs:
        return np.zeros((0, 32, 32, 3), np.uint8)

    def decode(blob, name):
        image = tf.cond(
            tf.io.is_jpeg(blob),
            # INTEGER_ACCURATE is libjpeg's default (islow); TF's own default is less exact.
            lambda: tf.io.decode_jpeg(blob, channels=3, dct_method="INTEGER_ACCURATE"),
            lambda: tf.io.decode_png(blob, channels=3),
        )
        shape = tf.shape(image)
        check = tf.debugging.Assert(
            tf.reduce_all(tf.equal(shape, [32, 32, 3])),
            ["image is not 32x32 RGB:", name, shape],
        )
        with tf.control_dependencies([check]):
            image = tf.identity(image)
        return tf.ensure_shape(image, (32, 32, 3))

    ds = tf.data.Dataset.from_tensor_slices((blobs, names))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(2048)
    try:
        return np.concatenate([batch.numpy() for batch in ds])
    except tf.errors.OpError as err:
        raise ValueError(f"{origin}: cannot decode CIFAR-10 images: {err.message}") from err


def _read_cifar_folder(split_dir: str) -> tuple[list[bytes], list[str], list[int]]:
    extra = sorted(
        d
        for d in os.listdir(split_dir)
        if os.path.isdir(os.path.join(split_dir, d)) and d not in CIFAR10_CLASSES
    )
    if extra:
        raise ValueError(
            f"{split_dir}: unexpected class folders {extra}; expected {list(CIFAR10_CLASSES)}"
        )
    blobs, names, labels = [], [], []
    for label, cls in enumerate(CIFAR10_CLASSES):
        cls_dir = os.path.join(split_dir, cls)
        for fname in sorted(filter(_is_image_name, os.listdir(cls_dir)), key=_natural_key):
            path = os.path.join(cls_dir, fname)
            with open(path, "rb") as f:
                blobs.append(f.read())
            names.append(path)
            labels.append(label)
    return blobs, names, labels


def _read_cifar_archive(path: str, split: str) -> tuple[list[bytes], list[str], list[int]]:
    by_class: dict[str, list[tuple[str, bytes]]] = {c: [] for c in CIFAR10_CLASSES}
    prefixes = set()
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                parts = member.name.strip("/").split("/")
                if not member.isfile() or len(parts) < 3 or not _is_image_name(parts[-1]):
                    continue
                if parts[-3] not in SPLITS or parts[-2] not in by_class:
                    continue
                prefixes.add("/".join(parts[:-3]))
                if parts[-3] == split:
                    data = archive.extractfile(member).read()
                    by_class[parts[-2]].append((parts[-1], data))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: cannot read the CIFAR-10 archive ({err})") from err
    if len(prefixes) > 1:
        raise ValueError(f"{path}: several CIFAR-10 trees in one archive: {sorted(prefixes)}")
    empty = [c for c, items in by_class.items() if not items]
    if empty:
        raise ValueError(f"{path}: no {split}/<class>/ images for classes {empty}")
    blobs, names, labels = [], [], []
    for label, cls in enumerate(CIFAR10_CLASSES):
        for fname, data in sorted(by_class[cls], key=lambda item: _natural_key(item[0])):
            blobs.append(data)
            names.append(f"{path}:{split}/{cls}/{fname}")
            labels.append(label)
    return blobs, names, labels


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds plain containers and numpy arrays (no arbitrary code)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # Used by protocol-2 pickles of bytes.
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_pickle(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for fname in CIFAR_PICKLE_FILES[split]:
        path = os.path.join(directory, fname)
        try:
            with open(path, "rb") as f:
                batch = _NumpyOnlyUnpickler(f, encoding="bytes").load()
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            batch_labels = np.asarray(batch[b"labels"], dtype=np.int64)
            data = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as err:
            raise ValueError(f"{path}: not a CIFAR-10 python batch ({err})") from err
        if data.shape[0] != batch_labels.shape[0]:
            raise ValueError(f"{path}: {data.shape[0]} images but {batch_labels.shape[0]} labels")
        images.append(data)
        labels.append(batch_labels)
    return np.concatenate(images), np.concatenate(labels)


def _cache_dir() -> str:
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return os.path.expanduser(configured)
    return os.path.join(os.path.expanduser("~"), ".cache", "ft_keras")


def source_stamp(kind: str, path: str) -> str:
    """Describes the source's content cheaply: path, sizes and modification times."""
    if kind != "folder":
        stat = os.stat(path)
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for fname in sorted(files):
            stat = os.stat(os.path.join(root, fname))
            rel = os.path.relpath(os.path.join(root, fname), path)
            digest.update(f"{rel}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _valid_arrays(images: np.ndarray, labels: np.ndarray) -> bool:
    return (
        images.dtype == np.uint8
        and images.ndim == 4
        and images.shape[1:] == (32, 32, 3)
        and labels.dtype == np.int64
        and labels.shape == images.shape[:1]
    )


def _with_npz_cache(
    key: str, split: str, compute: Callable[[], tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``compute()``, cached as an ``.npz`` file named after ``key``."""
    cache_dir = _cache_dir()
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    path = os.path.join(cache_dir, f"cifar10-{split}-{digest}.npz")
    if os.path.isfile(path):
        try:
            with np.load(path, allow_pickle=False) as npz:
                images, labels = npz["images"], npz["labels"]
            if _valid_arrays(images, labels):
                return images, labels
            warnings.warn(f"ft_keras: ignoring malformed cache file {path}", stacklevel=3)
        except (OSError, ValueError, KeyError, zlib.error) as err:
            warnings.warn(f"ft_keras: ignoring unreadable cache file {path}: {err}", stacklevel=3)
    images, labels = compute()
    tmp = None
    try:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-cifar10-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, labels=labels)
        os.replace(tmp, path)  # Atomic: readers never see a half-written file.
        tmp = None
    except OSError as err:
        warnings.warn(f"ft_keras: cannot write the cache file {path}: {err}", stacklevel=3)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return images, labels


@functools.lru_cache(maxsize=8)
def load_cifar_cached(
    kind: str, path: str, split: str, stamp: str
) -> tuple[np.ndarray, np.ndarray]:
    """Loads one local CIFAR-10 split in source order (class by class)."""
    if kind == "pickle":
        images, labels = _read_cifar_pickle(path, split)
    else:

        def decode() -> tuple[np.ndarray, np.ndarray]:
            _LOG.info("Decoding CIFAR-10 %s images from %s (done once, then cached)", split, path)
            if kind == "folder":
                blobs, names, label_list = _read_cifar_folder(path)
            else:
                blobs, names, label_list = _read_cifar_archive(path, split)
            return _decode_images(blobs, names, path), np.asarray(label_list, np.int64)

        key = "\n".join((_CACHE_FORMAT, kind, path, split, stamp))
        images, labels = _with_npz_cache(key, split, decode)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


@functools.lru_cache(maxsize=8)
def cifar_permutation(num_examples: int) -> np.ndarray:
    perm = np.random.default_rng(CIFAR_PERMUTATION_SEED).permutation(num_examples)
    perm.flags.writeable = False
    return perm
