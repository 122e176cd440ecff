"""Reference Keras 3 architectures for examples, tests and benchmarks.

Every model takes float32 images already scaled to [0, 1] and outputs LOGITS
(no softmax), so compile with a ``from_logits=True`` loss:

Example:
    >>> import keras
    >>> from ft_keras.harness import models
    >>> model = models.get("lenet_300_100")
    >>> model.compile(
    ...     optimizer="sgd",
    ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ... )

Layer names are stable (``fc1``, ``conv1``, ``logits``, ...) so sparsity
configurations can refer to them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import keras
from keras import layers

from ft_keras import _checks

__all__ = [
    "lenet_300_100",
    "mlp",
    "lenet5",
    "small_cnn",
    "resnet",
    "wide_resnet",
    "get",
    "available",
]


def _positive_int(value, arg: str) -> int:
    """Returns ``value`` as an int >= 1 (TypeError for a non-int, ValueError for a bad value)."""
    return _checks.check_positive_int(arg, value)


def _input_shape(value, arg: str = "input_shape") -> tuple[int, ...]:
    """Validates an input shape (a non-empty tuple of positive ints)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            f"{arg} must be a tuple of positive ints such as (28, 28, 1); got {value!r} "
            f"({type(value).__name__})."
        )
    dims = tuple(value)
    if not dims:
        raise ValueError(
            f"{arg}={value!r} is not allowed; it must be a non-empty tuple of positive ints "
            "such as (28, 28, 1)."
        )
    return tuple(_checks.check_positive_int(f"{arg}[{i}]", d) for i, d in enumerate(dims))


def _image_shape(value) -> tuple[int, int, int]:
    """Validates an (height, width, channels) image shape."""
    dims = _input_shape(value)
    if len(dims) != 3:
        raise ValueError(
            f"input_shape must be (height, width, channels) for a convolutional model; "
            f"got {value!r}"
        )
    return dims


def lenet_300_100(
    input_shape: Iterable[int] = (28, 28, 1),
    num_classes: int = 10,
    name: str = "lenet_300_100",
) -> keras.Model:
    """Builds LeNet-300-100: Flatten, Dense 300 relu, Dense 100 relu, Dense logits.

    With the default 28x28x1 input the dense kernels hold
    784*300 + 300*100 + 100*10 = 266,200 weights (266,610 parameters with biases).

    Args:
        input_shape: Shape of one input example, without the batch dimension.
        num_classes: Number of output logits.
        name: Model name.

    Returns:
        An uncompiled ``keras.Model`` with layers ``fc1``, ``fc2``, ``logits``.
    """
    return mlp(hidden=(300, 100), input_shape=input_shape, num_classes=num_classes, name=name)


def mlp(
    hidden: Iterable[int] = (1024, 1024),
    input_shape: Iterable[int] = (28, 28, 1),
    num_classes: int = 10,
    name: str = "mlp",
) -> keras.Model:
    """Builds a multilayer perceptron with relu hidden layers and a logits layer.

    Args:
        hidden: Widths of the hidden Dense layers (may be empty).
        input_shape: Shape of one input example; it is flattened first.
        num_classes: Number of output logits.
        name: Model name.

    Returns:
        An uncompiled ``keras.Model`` with layers ``fc1`` ... ``fcK`` and ``logits``.

    Raises:
        TypeError: If a width, ``num_classes`` or a dimension of ``input_shape`` is not an int.
        ValueError: If a width, ``num_classes`` or ``input_shape`` is invalid.
    """
    if _checks.is_int(hidden):
        hidden = (hidden,)
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Iterable):
        raise TypeError(
            f"hidden must be a sequence of layer widths such as (300, 100); got {hidden!r} "
            f"({type(hidden).__name__})."
        )
    widths = [_positive_int(w, f"hidden[{i}]") for i, w in enumerate(hidden)]
    shape = _input_shape(input_shape)
    num_classes = _positive_int(num_classes, "num_classes")

    inputs = keras.Input(shape=shape, name="inputs")
    x = layers.Flatten(name="flatten")(inputs)
    for i, width in enumerate(widths, start=1):
        x = layers.Dense(width, activation="relu", name=f"fc{i}")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def lenet5(
    input_shape: Iterable[int] = (28, 28, 1),
    num_classes: int = 10,
    name: str = "lenet5",
) -> keras.Model:
    """Builds a classic LeNet-5 style CNN.

    Conv2D 6 5x5 same relu, MaxPool 2, Conv2D 16 5x5 valid relu, MaxPool 2,
    Flatten, Dense 120 relu, Dense 84 relu, Dense logits.

    Args:
        input_shape: (height, width, channels); at least 12x12 spatially.
        num_classes: Number of output logits.
        name: Model name.

    Returns:
        An uncompiled ``keras.Model`` with layers ``conv1``, ``conv2``, ``fc1``,
        ``fc2``, ``logits``.
    """
    shape = _image_shape(input_shape)
    if min(shape[:2]) < 12:
        raise ValueError(f"input_shape must be at least 12x12 for lenet5; got {input_shape!r}")
    num_classes = _positive_int(num_classes, "num_classes")

    inputs = keras.Input(shape=shape, name="inputs")
    x = layers.Conv2D(6, 5, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(16, 5, padding="valid", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(120, activation="relu", name="fc1")(x)
    x = layers.Dense(84, activation="relu", name="fc2")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def small_cnn(
    input_shape: Iterable[int] = (28, 28, 1),
    num_classes: int = 10,
    width: int = 32,
    name: str = "small_cnn",
) -> keras.Model:
    """Builds a small, CPU-friendly CNN.

    Two blocks of (Conv2D 3x3 same relu, MaxPool 2) with ``width`` and
    ``2 * width`` filters, then Flatten, Dense 128 relu, Dense logits.

    Args:
        input_shape: (height, width, channels); at least 4x4 spatially.
        num_classes: Number of output logits.
        width: Filters of the first conv layer (the second has twice as many).
        name: Model name.

    Returns:
        An uncompiled ``keras.Model`` with layers ``conv1``, ``conv2``, ``fc1``,
        ``logits``.
    """
    shape = _image_shape(input_shape)
    if min(shape[:2]) < 4:
        raise ValueError(
            f"input_shape must be at least 4x4 for small_cnn; got {input_shape!r}"
        )
    num_classes = _positive_int(num_classes, "num_classes")
    width = _positive_int(width, "width")

    inputs = keras.Input(shape=shape, name="inputs")
    x = layers.Conv2D(width, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(2 * width, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, activation="relu", name="fc1")(x)
    outputs = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def _conv3x3(filters: int, strides: int, name: str) -> layers.Conv2D:
    return layers.Conv2D(
        filters,
        3,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=name,
    )


def _conv1x1(filters: int, strides: int, name: str) -> layers.Conv2D:
    return layers.Conv2D(
        filters,
        1,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=name,
    )


def _bn(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)


def resnet(
    depth: int = 20,
    width: int = 16,
    input_shape: Iterable[int] = (32, 32, 3),
    num_classes: int = 10,
    name: str | None = None,
) -> keras.Model:
    """Builds a CIFAR-style ResNet (He et al. 2016) with basic blocks.

    ``depth = 6n + 2``: a 3x3 stem conv, three stages of ``n`` basic blocks with
    ``width``, ``2 * width`` and ``4 * width`` filters (strides 1, 2, 2), global
    average pooling and a Dense logits layer. Each block is
    conv3x3-BN-relu-conv3x3-BN plus a shortcut (identity, or a 1x1 conv + BN
    projection when the shape changes), followed by relu. Convolutions have no
    bias (BatchNorm follows each one).

    Args:
        depth: Total depth; must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...).
        width: Filters of the first stage.
        input_shape: (height, width, channels).
        num_classes: Number of output logits.
        name: Model name; defaults to ``f"resnet{depth}"``.

    Returns:
        An uncompiled ``keras.Model``.

    Raises:
        TypeError: If ``depth`` or another integer argument is not an int.
        ValueError: If ``depth`` is not 6n + 2, or another argument is invalid.
    """
    depth = _checks.check_int("depth", depth)
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"depth={depth!r} is not allowed; it must be 6n + 2 with n >= 1 (e.g. 20, 32, 44, "
            "56, 110)."
        )
    n = (depth - 2) // 6
    width = _positive_int(width, "width")
    shape = _image_shape(input_shape)
    num_classes = _positive_int(num_classes, "num_classes")

    inputs = keras.Input(shape=shape, name="inputs")
    x = _conv3x3(width, 1, "stem_conv")(inputs)
    x = _bn("stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    channels = width
    for stage, filters in enumerate((width, 2 * width, 4 * width), start=1):
        for block in range(1, n + 1):
            strides = 2 if (stage > 1 and block == 1) else 1
            prefix = f"stage{stage}_block{block}"
            shortcut = x
            y = _conv3x3(filters, strides, f"{prefix}_conv1")(x)
            y = _bn(f"{prefix}_bn1")(y)
            y = layers.ReLU(name=f"{prefix}_relu1")(y)
            y = _conv3x3(filters, 1, f"{prefix}_conv2")(y)
            y = _bn(f"{prefix}_bn2")(y)
            if strides != 1 or channels != filters:
                shortcut = _conv1x1(filters, strides, f"{prefix}_proj")(x)
                shortcut = _bn(f"{prefix}_proj_bn")(shortcut)
            x = layers.Add(name=f"{prefix}_add")([y, shortcut])
            x = layers.ReLU(name=f"{prefix}_out")(x)
            channels = filters
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, kernel_initializer="he_normal", name="logits")(x)
    return keras.Model(inputs, outputs, name=name or f"resnet{depth}")


def wide_resnet(
    depth: int = 28,
    width_multiplier: int = 10,
    input_shape: Iterable[int] = (32, 32, 3),
    num_classes: int = 10,
    dropout_rate: float = 0.0,
    base_width: int = 16,
    name: str | None = None,
) -> keras.Model:
    """Builds a Wide ResNet WRN-depth-k (Zagoruyko & Komodakis 2016).

    ``depth = 6n + 4``: a 3x3 stem conv with ``base_width`` filters, three stages
    of ``n`` pre-activation basic blocks (BN-relu-conv3x3-BN-relu-[dropout]-conv3x3)
    with ``base_width * k``, ``2 * base_width * k`` and ``4 * base_width * k``
    filters (strides 1, 2, 2), then BN-relu, global average pooling and a Dense
    logits layer. Shortcuts are identity, or a 1x1 conv on the pre-activated
    input when the shape changes. All convolutions use ``use_bias=False``.

    Args:
        depth: Total depth; must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...).
        width_multiplier: Widening factor ``k``.
        input_shape: (height, width, channels).
        num_classes: Number of output logits.
        dropout_rate: Dropout between the two convs of each block, in [0, 1).
        base_width: Filters of the stem (16 in the paper); small values make
            cheap test models.
        name: Model name; defaults to ``f"wrn{depth}_{width_multiplier}"``.

    Returns:
        An uncompiled ``keras.Model``.

    Raises:
        TypeError: If ``depth`` or another argument has the wrong type.
        ValueError: If ``depth`` is not 6n + 4, or another argument is invalid.
    """
    depth = _checks.check_int("depth", depth)
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(
            f"depth={depth!r} is not allowed; it must be 6n + 4 with n >= 1 (e.g. 10, 16, 22, "
            "28, 40)."
        )
    n = (depth - 4) // 6
    k = _positive_int(width_multiplier, "width_multiplier")
    base = _positive_int(base_width, "base_width")
    shape = _image_shape(input_shape)
    num_classes = _positive_int(num_classes, "num_classes")
    dropout_rate = _checks.check_real("dropout_rate", dropout_rate, low=0.0, high=1.0,
                                      high_open=True)

    inputs = keras.Input(shape=shape, name="inputs")
    x = _conv3x3(base, 1, "stem_conv")(inputs)
    channels = base
    for stage, filters in enumerate((base * k, 2 * base * k, 4 * base * k), start=1):
        for block in range(1, n + 1):
            strides = 2 if (stage > 1 and block == 1) else 1
            prefix = f"stage{stage}_block{block}"
            pre = _bn(f"{prefix}_bn1")(x)
            pre = layers.ReLU(name=f"{prefix}_relu1")(pre)
            y = _conv3x3(filters, strides, f"{prefix}_conv1")(pre)
            y = _bn(f"{prefix}_bn2")(y)
            y = layers.ReLU(name=f"{prefix}_relu2")(y)
            if dropout_rate > 0:
                y = layers.Dropout(dropout_rate, name=f"{prefix}_dropout")(y)
            y = _conv3x3(filters, 1, f"{prefix}_conv2")(y)
            if strides != 1 or channels != filters:
                shortcut = _conv1x1(filters, strides, f"{prefix}_proj")(pre)
            else:
                shortcut = x
            x = layers.Add(name=f"{prefix}_add")([y, shortcut])
            channels = filters
    x = _bn("final_bn")(x)
    x = layers.ReLU(name="final_relu")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, kernel_initializer="he_normal", name="logits")(x)
    return keras.Model(inputs, outputs, name=name or f"wrn{depth}_{width_multiplier}")


# name -> (builder, arguments fixed by the name)
_REGISTRY: dict[str, tuple[Callable[..., keras.Model], dict]] = {
    "lenet_300_100": (lenet_300_100, {}),
    "mlp": (mlp, {}),
    "lenet5": (lenet5, {}),
    "small_cnn": (small_cnn, {}),
    "resnet": (resnet, {}),
    "resnet20": (resnet, {"depth": 20}),
    "resnet32": (resnet, {"depth": 32}),
    "resnet56": (resnet, {"depth": 56}),
    "wide_resnet": (wide_resnet, {}),
    "wrn16_8": (wide_resnet, {"depth": 16, "width_multiplier": 8}),
    "wrn28_10": (wide_resnet, {"depth": 28, "width_multiplier": 10}),
}


def available() -> tuple[str, ...]:
    """Returns the model names accepted by :func:`get`, sorted."""
    return tuple(sorted(_REGISTRY))


def get(name: str, /, **kwargs) -> keras.Model:
    """Builds a registered model by name.

    Names (case-insensitive, ``-`` treated as ``_``): ``lenet_300_100``, ``mlp``,
    ``lenet5``, ``small_cnn``, ``resnet`` (generic), ``resnet20``, ``resnet32``,
    ``resnet56``, ``wide_resnet`` (generic), ``wrn16_8``, ``wrn28_10``.

    Args:
        name: Registered model name.
        **kwargs: Passed to the builder (e.g. ``num_classes``, ``input_shape``,
            ``width``, or ``name`` for the model name). Arguments fixed by the
            name (``depth`` for ``resnet20``) cannot be overridden; use the
            generic name instead.

    Returns:
        An uncompiled ``keras.Model``.

    Raises:
        TypeError: If ``name`` is not a str.
        ValueError: If ``name`` is unknown or ``kwargs`` conflict with the name.
    """
    if not isinstance(name, str):
        raise TypeError(
            f"name must be a model name (str), one of {available()}; got {name!r} "
            f"({type(name).__name__})."
        )
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(
            f"name={name!r} is not supported; allowed values are {available()} (any case, "
            "'-' for '_')."
        )
    builder, fixed = _REGISTRY[key]
    conflicts = {k: kwargs[k] for k in fixed if k in kwargs and kwargs[k] != fixed[k]}
    if conflicts:
        raise ValueError(
            f"model {key!r} fixes {fixed!r}; got conflicting {conflicts!r}. Use the "
            f"generic name ({builder.__name__!r}) to choose these freely"
        )
    return builder(**{**kwargs, **fixed})
