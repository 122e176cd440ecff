"""Image classification data sets as `tf.data` pipelines: Fashion-MNIST, MNIST and CIFAR-10.

Every data set is read from the first source that has it:

1. **tensorflow-datasets** (tfds), when the data set is already *prepared* in ``data_dir`` or in
   tfds's default data dir (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). This module never
   asks tfds to download anything; run ``tfds.builder(name).download_and_prepare()`` yourself on
   a machine that is online, and later loads will use it.
2. **Local files**, searched in ``data_dir``, then in each directory of ``$FT_KERAS_DATA_DIR``
   (``os.pathsep`` separated), then in the system path ``/usr/share/datasets`` (the Debian
   package ``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist``). In each of
   these roots the files are looked for in a sub-folder named after the data set
   (``fashion_mnist`` or ``fashion-mnist``, ``mnist``, ``cifar10`` or ``cifar-10``) and then in
   the root itself.

Local formats:

* MNIST and Fashion-MNIST: the IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each
  gzipped (``.gz``) or not.
* CIFAR-10, in this order of preference: a folder layout ``train/<class>/*.jpg`` and
  ``test/<class>/*.jpg`` (PNG is accepted too); the archive ``cifar10-jpeg.tar.gz`` holding that
  layout, possibly below one top-level folder (read directly, never extracted); the python
  pickle batches ``cifar-10-batches-py/``. Decoded images are cached as ``.npz`` files in
  ``$FT_KERAS_CACHE_DIR`` (default ``~/.cache/ft_keras``), so that only the first load decodes
  the JPEGs.

Order of the examples: IDX files are returned in file order. Local CIFAR-10 sources group the
files by class, so the examples of a local CIFAR-10 split are returned in the fixed pseudo-random
permutation ``numpy.random.default_rng(0).permutation(n)`` of the source order (class folders in
alphabetical order, files in natural name order; batch order for the pickle format). The
permutation is applied *before* slicing, so ``"train[:1000]"`` holds all classes. The tfds path
keeps tfds's own order.

Splits are ``"train"`` or ``"test"`` with the tfds slice syntax: ``"train[:1000]"``,
``"train[1000:2000]"``, ``"train[:10%]"``, ``"test[50%:]"``, ``"train[-100:]"``, and parts
joined with ``+`` such as ``"train[:10%]+test"``. Percent boundaries are rounded to the closest
example, like tfds does. A split with a part that selects no example (``"train[50:10]"``,
``"test[:0]"``) is refused with a ``ValueError``, as is an explicit ``data_dir`` that does not
exist (it is never silently skipped in favour of another source).

Example:
    >>> from ft_keras.harness import data
    >>> ds = data.load("fashion_mnist", "train[:10%]")     # (uint8 image, int64 label)
    >>> ds = data.normalize(ds).shuffle(6000).batch(128)   # float32 images in [0, 1]
    >>> x_test, y_test = data.load_numpy("mnist", "test", data_dir="/path/to/data")
    >>> data.INFO["cifar10"]["class_names"][0]
    'airplane'
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from ft_keras import _checks
from ft_keras.harness import data_files
# Part of this module's interface.
from ft_keras.harness.data_files import CACHE_DIR_ENV  # noqa: F401
from ft_keras.harness.data_files import CIFAR10_CLASSES
from ft_keras.harness.data_files import CIFAR_PERMUTATION_SEED  # noqa: F401
from ft_keras.harness.data_files import read_idx  # noqa: F401

__all__ = [
    "CIFAR10_CLASSES",
    "DATASET_NAMES",
    "INFO",
    "SplitPart",
    "load",
    "load_numpy",
    "normalize",
    "parse_split",
    "preprocess",
    "read_idx",
    "scale_image",
]

_LOG = logging.getLogger(__name__)

#: Root of system-wide data sets (Debian's ``dataset-*`` packages install below it).
SYSTEM_DATA_DIR = "/usr/share/datasets"
#: Environment variable with extra local data roots (``os.pathsep`` separated).
DATA_DIR_ENV = "FT_KERAS_DATA_DIR"

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Per-data-set facts: image ``shape``, ``num_classes``, ``class_names``, ``num_examples`` per
#: split and the local ``folders`` names searched in every data root.
INFO: dict[str, dict[str, Any]] = {
    "fashion_mnist": {
        "shape": (28, 28, 1),
        "num_classes": 10,
        "class_names": FASHION_MNIST_CLASSES,
        "num_examples": {"train": 60000, "test": 10000},
        "folders": ("fashion_mnist", "fashion-mnist"),
    },
    "mnist": {
        "shape": (28, 28, 1),
        "num_classes": 10,
        "class_names": tuple(str(i) for i in range(10)),
        "num_examples": {"train": 60000, "test": 10000},
        "folders": ("mnist",),
    },
    "cifar10": {
        "shape": (32, 32, 3),
        "num_classes": 10,
        "class_names": CIFAR10_CLASSES,
        "num_examples": {"train": 50000, "test": 10000},
        "folders": ("cifar10", "cifar-10"),
    },
}
DATASET_NAMES = tuple(INFO)



# --------------------------------------------------------------------------------------------
# Argument checks and split parsing
# --------------------------------------------------------------------------------------------


def _check_name(name: Any) -> str:
    return _checks.check_choice("name", name, DATASET_NAMES)


def _check_data_dir(data_dir: Any) -> str | None:
    """An explicit ``data_dir`` must exist (a URL such as ``gs://...`` goes to tfds unchecked)."""
    path = _checks.check_path("data_dir", data_dir, allow_none=True)
    if path is None or "://" in path:
        return path
    return _checks.check_existing_dir("data_dir", path)


def _part_text(part: "SplitPart") -> str:
    if part.start is None and part.stop is None:
        return part.split
    unit = "%" if part.percent else ""

    def bound(value):
        if value is None:
            return ""
        if part.percent and float(value).is_integer():
            value = int(value)
        return f"{value}{unit}"

    return f"{part.split}[{bound(part.start)}:{bound(part.stop)}]"


def _check_not_empty(
    name: str, split: str, parts: tuple["SplitPart", ...], sizes: dict[str, int]
) -> None:
    """Refuses a split with a part that selects no example of a ``sizes[part.split]``-example
    split (e.g. ``"train[50:10]"``)."""
    for part in parts:
        num_examples = sizes[part.split]
        selected = part.indices(num_examples)
        if selected.stop <= selected.start:
            raise ValueError(
                f"split={split!r} selects no examples: {_part_text(part)!r} is empty for the "
                f"{num_examples} examples of {name!r} {part.split!r}. Give a slice whose start "
                "comes before its stop, e.g. 'train[10:50]' or 'train[:10%]'."
            )


class SplitPart(NamedTuple):
    """One ``+``-separated part of a split string, e.g. ``train[:10%]``.

    Attributes:
        split: ``"train"`` or ``"test"``.
        start: Start boundary or None (from the beginning).
        stop: Stop boundary or None (to the end).
        percent: Whether the boundaries are percentages (else example counts).
    """

    split: str
    start: float | int | None
    stop: float | int | None
    percent: bool

    def indices(self, num_examples: int) -> slice:
        """Resolves the part to a ``slice`` with non-negative bounds for ``num_examples``.

        Percent boundaries are rounded to the closest example (like tfds); negative boundaries
        count from the end, and out-of-range boundaries are clipped, as in Python slicing.

        Args:
            num_examples: Number of examples in the whole split.

        Returns:
            The ``slice(start, stop)`` of the selected examples.
        """
        bounds = []
        for value in (self.start, self.stop):
            if value is not None and self.percent:
                value = int(round(value * num_examples / 100.0))
            bounds.append(value)
        start, stop, _ = slice(*bounds).indices(num_examples)
        return slice(start, max(start, stop))


_PART_RE = re.compile(r"^(?P<split>\w+)(?:\[(?P<start>[^:\[\]]*):(?P<stop>[^:\[\]]*)\])?$")
_BOUND_RE = re.compile(r"^(?P<value>-?\d+(?:\.\d+)?)(?P<percent>%)?$")


def parse_split(split: Any) -> tuple[SplitPart, ...]:
    """Parses a split string in the tfds slice syntax.

    Args:
        split: For example ``"train"``, ``"test[:1000]"``, ``"train[10%:20%]"``,
            ``"train[-500:]"`` or ``"train[:50%]+test"``.

    Returns:
        The parts of the split, in order.

    Raises:
        TypeError: If ``split`` is not a str.
        ValueError: If ``split`` is not a valid split string; the message names ``split``.
    """

    allowed = (
        "'train' or 'test', optionally sliced like 'train[:1000]', 'train[1000:2000]', "
        "'train[:10%]' or 'test[50%:]', with parts joined by '+'"
    )

    def fail(reason: str) -> ValueError:
        return ValueError(f"split={split!r} is not allowed: {reason}. It must be {allowed}.")

    if not isinstance(split, str):
        raise TypeError(f"split must be a str: {allowed}; got {split!r} ({type(split).__name__}).")
    parts = []
    for text in split.split("+"):
        text = text.strip()
        match = _PART_RE.match(text)
        if not match:
            raise fail(f"cannot parse {text!r}")
        name = match["split"]
        if name not in data_files.SPLITS:
            raise fail(f"unknown split name {name!r}")
        if match["start"] is None:  # No brackets.
            parts.append(SplitPart(name, None, None, False))
            continue
        bounds: list[Any] = []
        units = set()
        for raw in (match["start"].strip(), match["stop"].strip()):
            if not raw:
                bounds.append(None)
                continue
            bound = _BOUND_RE.match(raw)
            if not bound:
                raise fail(f"bad slice boundary {raw!r}")
            is_percent = bool(bound["percent"])
            units.add(is_percent)
            if is_percent:
                value = float(bound["value"])
                if not -100.0 <= value <= 100.0:
                    raise fail(f"percentage {raw!r} outside [-100%, 100%]")
                bounds.append(value)
            else:
                if "." in bound["value"]:
                    raise fail(f"example index {raw!r} is not an integer")
                bounds.append(int(bound["value"]))
        if not units:
            raise fail("empty slice '[:]'")
        if len(units) > 1:
            raise fail("mixes percentages and example counts in one slice")
        parts.append(SplitPart(name, bounds[0], bounds[1], units.pop()))
    return tuple(parts)


# --------------------------------------------------------------------------------------------
# Source resolution
# --------------------------------------------------------------------------------------------


class _LocalSource(NamedTuple):
    kind: str  # "idx", "folder", "archive" or "pickle"
    paths: tuple[str, ...]


def _local_roots(data_dir: str | os.PathLike | None) -> list[tuple[str, str]]:
    roots = []
    if data_dir is not None:
        roots.append((os.fspath(data_dir), "data_dir argument"))
    for path in os.environ.get(DATA_DIR_ENV, "").split(os.pathsep):
        if path:
            roots.append((path, f"${DATA_DIR_ENV}"))
    roots.append((SYSTEM_DATA_DIR, "system path"))
    return roots


def _find_local(
    name: str, split: str, data_dir: str | os.PathLike | None, tried: list[str]
) -> _LocalSource | None:
    """Returns the first local source of ``name``/``split``; appends each miss to ``tried``."""
    seen = set()
    for root, origin in _local_roots(data_dir):
        candidates = [os.path.join(root, f) for f in INFO[name]["folders"]] + [root]
        for directory in candidates:
            key = os.path.normpath(os.path.abspath(directory))
            if key in seen:
                continue
            seen.add(key)
            if not os.path.isdir(directory):
                tried.append(f"{directory} ({origin}): no such directory")
                continue
            if name == "cifar10":
                found, reason = data_files.probe_cifar(directory, split)
                if found:
                    return _LocalSource(found[0], (found[1],))
            else:
                found, reason = data_files.probe_idx(directory, split)
                if found:
                    return _LocalSource("idx", found)
            tried.append(f"{directory} ({origin}): {reason}")
    return None


def _read_local(
    name: str, split: str, source: _LocalSource
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Returns ``(images, labels, order)`` for the whole split, as read-only arrays.

    ``order`` is None when the source order is the documented order, else the permutation of
    the source order that gives it (local CIFAR-10).
    """
    if source.kind == "idx":
        info = INFO[name]
        images, labels = data_files.load_idx_pair(*source.paths, info["shape"], info["num_classes"])
        return images, labels, None
    path = os.path.realpath(source.paths[0])
    images, labels = data_files.load_cifar_cached(
        source.kind, path, split, data_files.source_stamp(source.kind, path)
    )
    return images, labels, data_files.cifar_permutation(len(labels))


def _tfds_builder_if_prepared(
    name: str, data_dir: str | os.PathLike | None
) -> tuple[Any, list[str]]:
    """Returns ``(builder, tried)``: a tfds builder whose data is prepared, else ``None``.

    ``data_dir`` is checked first, then tfds's default data dir. Nothing is downloaded; any
    error (tfds missing, unknown version, unreadable dir) counts as "not available".
    """
    tried: list[str] = []
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except Exception as err:  # pylint: disable=broad-except
        tried.append(f"tensorflow-datasets: cannot import it ({err})")
        return None, tried
    dirs = ([os.fspath(data_dir)] if data_dir is not None else []) + [None]
    for directory in dirs:
        label = directory if directory is not None else "default data dir"
        root = directory
        if root is None:
            root = os.environ.get("TFDS_DATA_DIR") or os.path.join(
                os.path.expanduser("~"), "tensorflow_datasets"
            )
        if "://" not in str(root) and not os.path.isdir(os.path.join(root, name)):
            # Nothing prepared there: skip tfds (its probe only logs warnings about it).
            tried.append(f"tfds ({label}): {os.path.join(root, name)} does not exist")
            continue
        try:
            builder = tfds.builder(name, data_dir=directory)
            where = os.fspath(builder.data_path)
            if hasattr(builder, "is_prepared"):
                prepared = builder.is_prepared()
            else:
                prepared = tf.io.gfile.exists(os.path.join(where, "dataset_info.json"))
        except Exception as err:  # pylint: disable=broad-except
            tried.append(f"tfds ({label}): unavailable ({type(err).__name__}: {err})")
            continue
        if prepared:
            return builder, tried
        tried.append(f"tfds ({label}): {where} is not prepared")
    return None, tried


def _not_found(name: str, split: str, tried: list[str]) -> FileNotFoundError:
    lines = "\n".join(f"  - {t}" for t in tried)
    folders = " or ".join(INFO[name]["folders"])
    if name == "cifar10":
        files = "train/<class>/*.jpg + test/<class>/*.jpg, cifar10-jpeg.tar.gz or " + (
            f"{data_files.CIFAR_PICKLE_DIR}/"
        )
    else:
        files = "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"
    hint = (
        f"Put {files} in <dir>/{folders} (or in <dir> itself) and pass data_dir=<dir> or set "
        f"{DATA_DIR_ENV}=<dir>"
    )
    if name == "fashion_mnist":
        hint += ", or install the Debian package dataset-fashion-mnist (apt-get install -y "
        hint += f"dataset-fashion-mnist, which fills {SYSTEM_DATA_DIR}/fashion-mnist)"
    hint += f", or prepare it with tensorflow-datasets while online (tfds.load({name!r}))."
    return FileNotFoundError(
        f"Cannot find the {name!r} data set (split {split!r}). Looked in:\n{lines}\n{hint}"
    )


def _local_numpy(
    name: str, split: str, parts: tuple[SplitPart, ...], data_dir: Any, tried: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for part in parts:
        source = _find_local(name, part.split, data_dir, tried)
        if source is None:
            raise _not_found(name, part.split, tried)
        _LOG.debug("ft_keras.data: %s/%s from %s", name, part.split, source)
        split_images, split_labels, order = _read_local(name, part.split, source)
        # Local files may hold fewer examples than the published split (INFO).
        _check_not_empty(name, split, (part,), {part.split: len(split_labels)})
        selection = part.indices(len(split_labels))
        if order is not None:
            selection = order[selection]  # Permute first, then slice.
        images.append(split_images[selection])
        labels.append(split_labels[selection])
    if len(parts) == 1:
        return images[0], labels[0]
    return np.concatenate(images), np.concatenate(labels)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_numpy(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Loads a data set split as numpy arrays, from the same sources as `load`.

    Args:
        name: ``"fashion_mnist"``, ``"mnist"`` or ``"cifar10"``.
        split: ``"train"`` or ``"test"``, optionally sliced (see `parse_split`).
        data_dir: Optional directory searched first (tfds data dir and local files root); it
            must exist (a ``gs://``-style URL is passed to tfds unchecked).

    Returns:
        ``(images, labels)``: writable ``uint8`` images of shape ``(N, 28, 28, 1)`` (MNISTs) or
        ``(N, 32, 32, 3)`` (CIFAR-10) and ``int64`` labels of shape ``(N,)``.

    Raises:
        TypeError: If an argument has the wrong type (``name`` or ``split`` not a str,
            ``data_dir`` not a path).
        ValueError: If ``name`` or ``split`` is invalid, the split selects no examples (e.g.
            ``"train[50:10]"``), an explicit ``data_dir`` does not exist, or a local file is
            malformed.
        FileNotFoundError: If no source has the data; the message lists every place tried.
    """
    name = _check_name(name)
    parts = parse_split(split)
    data_dir = _check_data_dir(data_dir)
    _check_not_empty(name, split, parts, INFO[name]["num_examples"])
    builder, tried = _tfds_builder_if_prepared(name, data_dir)
    if builder is not None:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

        ds = builder.as_dataset(split=split, batch_size=-1, as_supervised=True)
        images, labels = tfds.as_numpy(ds)
        return np.asarray(images, np.uint8), np.asarray(labels, np.int64)
    images, labels = _local_numpy(name, split, parts, data_dir, tried)
    return np.require(images, requirements="W"), np.require(labels, requirements="W")


def load(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    as_supervised: bool = True,
    shuffle_files: bool = False,
) -> tf.data.Dataset:
    """Loads a data set split as a `tf.data.Dataset` with known cardinality.

    Uses tensorflow-datasets when the data set is prepared in ``data_dir`` or in tfds's default
    data dir (never downloading), else local files (see the module docstring for where they are
    searched and in which order local examples come).

    Args:
        name: ``"fashion_mnist"``, ``"mnist"`` or ``"cifar10"``.
        split: ``"train"`` or ``"test"``, optionally sliced like ``"train[:1000]"``,
            ``"train[:10%]"`` or ``"test[50%:]"`` (see `parse_split`).
        data_dir: Optional directory searched first (tfds data dir and local files root); it
            must exist (a ``gs://``-style URL is passed to tfds unchecked).
        as_supervised: If True, elements are ``(image, label)`` tuples, else
            ``{"image": image, "label": label}`` dicts (tfds may add more keys).
        shuffle_files: Passed to tfds (shuffles the order of its shard files). Local data has a
            fixed order and ignores it; shuffle the dataset yourself for training.

    Returns:
        A dataset of ``uint8`` images shaped ``(28, 28, 1)`` (MNISTs) or ``(32, 32, 3)``
        (CIFAR-10) and scalar ``int64`` labels; ``ds.cardinality()`` is the number of examples.

    Raises:
        TypeError: If an argument has the wrong type (``name`` or ``split`` not a str,
            ``data_dir`` not a path).
        ValueError: If ``name`` or ``split`` is invalid, the split selects no examples (e.g.
            ``"train[50:10]"``), an explicit ``data_dir`` does not exist, or a local file is
            malformed.
        FileNotFoundError: If no source has the data; the message lists every place tried.
    """
    name = _check_name(name)
    parts = parse_split(split)
    data_dir = _check_data_dir(data_dir)
    _check_not_empty(name, split, parts, INFO[name]["num_examples"])
    as_supervised = _checks.check_bool("as_supervised", as_supervised)
    shuffle_files = _checks.check_bool("shuffle_files", shuffle_files)
    builder, tried = _tfds_builder_if_prepared(name, data_dir)
    if builder is not None:
        _LOG.info("ft_keras.data: %s[%s] from tensorflow-datasets", name, split)
        return builder.as_dataset(
            split=split, as_supervised=as_supervised, shuffle_files=shuffle_files
        )
    images, labels = _local_numpy(name, split, parts, data_dir, tried)
    if as_supervised:
        return tf.data.Dataset.from_tensor_slices((images, labels))
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})


def scale_image(image: tf.Tensor, dtype: str | tf.DType = "float32") -> tf.Tensor:
    """Casts a ``uint8`` image (values 0..255) to floats in ``[0, 1]``.

    Args:
        image: Image tensor with values in ``[0, 255]``.
        dtype: A floating dtype, e.g. ``"float32"``, ``"float16"`` or ``"bfloat16"``.

    Returns:
        ``image / 255`` as ``dtype``.

    Raises:
        ValueError: If ``dtype`` is not a floating dtype.
    """
    allowed = "a floating dtype such as 'float32', 'float16' or 'bfloat16'"
    try:
        tf_dtype = tf.as_dtype(dtype)
    except TypeError as err:
        raise ValueError(f"dtype={dtype!r} is not allowed ({err}); it must be {allowed}.") from err
    if not tf_dtype.is_floating:
        raise ValueError(f"dtype={dtype!r} is not allowed; it must be {allowed}.")
    return tf.math.divide(tf.cast(image, tf_dtype), tf.constant(255.0, tf_dtype))


def preprocess(
    image: tf.Tensor, label: tf.Tensor, dtype: str | tf.DType = "float32"
) -> tuple[tf.Tensor, tf.Tensor]:
    """Maps an ``(image, label)`` pair to ``(image in [0, 1] as dtype, label)``.

    Suited to ``ds.map(preprocess)``.

    Args:
        image: ``uint8`` image tensor.
        label: Label tensor, returned unchanged.
        dtype: Floating dtype of the returned image.

    Returns:
        The scaled image and the label.
    """
    return scale_image(image, dtype), label


def normalize(ds: tf.data.Dataset, dtype: str | tf.DType = "float32") -> tf.data.Dataset:
    """Scales the images of a dataset to floats in ``[0, 1]``; cardinality is kept.

    Args:
        ds: Dataset of ``(image, label, ...)`` tuples, ``{"image": ...}`` dicts or bare images.
        dtype: Floating dtype of the images, e.g. ``"float32"``.

    Returns:
        The mapped dataset.

    Raises:
        TypeError: If ``ds`` is not a ``tf.data.Dataset``.
        ValueError: If ``dtype`` is not a floating dtype.
    """
    if not isinstance(ds, tf.data.Dataset):
        raise TypeError(f"ds must be a tf.data.Dataset; got {type(ds).__name__}.")
    scale_image(tf.zeros((), tf.uint8), dtype)  # Validate dtype eagerly.

    def scale(*element):
        if len(element) > 1:
            return (scale_image(element[0], dtype),) + element[1:]
        (item,) = element
        if isinstance(item, dict):
            return {**item, "image": scale_image(item["image"], dtype)}
        return scale_image(item, dtype)

    return ds.map(scale, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
