"""Masked Keras 3 layers: Dense and convolution layers whose kernel carries a binary mask.

Each masked layer is the Keras layer it extends plus one non-trainable boolean variable,
``kernel_mask``, with the kernel's shape. The kernel is *stored* sparse: off-mask entries are
exactly zero, so ``call`` is the parent's unchanged forward pass (no multiply by the mask) and the
gradient Keras computes for the kernel is the dense gradient that RigL needs. What keeps the zeros
at zero during training is `ft_keras.DynamicSparsity` (or `StaticSparsity`), which masks the
gradient inside the optimizer step and resets optimizer state at changed positions.

Masked layers serialize like their parents (``get_config``) and save the mask with the weights,
so ``model.save("m.keras")`` / ``keras.models.load_model`` round-trips masks and weights bit-exactly.
You rarely build them by hand: `ft_keras.sparsify` turns a model's layers into these.

Example:

>>> layer = MaskedDense(4)
>>> layer.build((None, 3))
>>> layer.set_mask(np.eye(3, 4, dtype=bool))
>>> int(layer.num_active)
3
"""

import keras
import numpy as np

from ft_keras import _checks
from ft_keras import _keras_compat
from ft_keras import masks


class MaskedKernelMixin:
    """Adds ``kernel_mask`` to a Keras layer that has a ``kernel``.

    Mixed into the left of a Keras layer class. The mask is boolean (one byte per weight),
    non-trainable, created in ``build`` under the current distribution strategy.
    """

    def build(self, input_shape):
        super().build(input_shape)
        self.kernel_mask = self.add_weight(
            name="kernel_mask",
            shape=tuple(self.masked_kernel.shape),
            initializer="ones",
            trainable=False,
            dtype="bool",
        )

    #: Name of the attribute that holds the kernel variable; None: Keras's Dense / Conv
    #: convention (``_kernel`` behind the ``kernel`` property). Set it in a user's masked
    #: layer whose kernel has another name (see `register_maskable`).
    kernel_attribute = None

    @property
    def masked_kernel(self):
        """The kernel variable that the mask applies to."""
        if self.kernel_attribute is not None:
            return getattr(self, self.kernel_attribute)
        return _keras_compat.kernel_variable(self)

    @property
    def num_active(self):
        """Number of active (on-mask) kernel weights, as a Python int."""
        return int(np.count_nonzero(keras.ops.convert_to_numpy(self.kernel_mask)))

    @property
    def kernel_size_total(self):
        """Number of kernel positions (active or not)."""
        return int(np.prod(self.masked_kernel.shape))

    def apply_mask(self):
        """Sets the off-mask kernel entries to exactly +0.0."""
        kernel = self.masked_kernel
        kernel.assign(masks.zero_off_mask(self.kernel_mask.value, kernel.value))

    def set_mask(self, mask):
        """Replaces the mask (bool array of the kernel's shape) and zeroes the kernel off it."""
        mask = np.asarray(keras.ops.convert_to_numpy(mask))
        if tuple(mask.shape) != tuple(self.masked_kernel.shape):
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}; layer '{self.name}' needs the kernel's shape "
                f"{tuple(self.masked_kernel.shape)}."
            )
        self.kernel_mask.assign(mask.astype(bool))
        self.apply_mask()

    def _parent_saves_every_variable(self):
        """True when the parent uses Layer's default saving (all variables, mask included)."""
        parent = super(MaskedKernelMixin, self).save_own_variables
        return getattr(parent, "__func__", None) is keras.layers.Layer.save_own_variables

    def save_own_variables(self, store):
        super().save_own_variables(store)
        if self.built and not self._parent_saves_every_variable():
            store[str(len(store.keys()))] = self.kernel_mask

    def load_own_variables(self, store):
        if self._parent_saves_every_variable():
            super().load_own_variables(store)
        else:
            keys = sorted(store.keys(), key=int)
            mask_key = keys[-1] if keys else "0"
            super().load_own_variables(_DropKey(store, mask_key))
            self.kernel_mask.assign(np.asarray(store[mask_key]).astype(bool))
        self.apply_mask()

    def _check_load_own_variables(self, store):
        # For parents with their own saving, the store seen here lacks the mask (see load).
        own = _keras_compat.own_variables(self)
        expected = len(own) if self._parent_saves_every_variable() else len(own) - 1
        if len(store.keys()) != expected:
            found = len(store.keys()) + len(own) - expected
            raise ValueError(
                f"Layer '{self.name}' expected {len(own)} variables (kernel_mask included) but "
                f"the file lists {found}: {[v.name for v in own]}."
            )


class _DropKey:
    """A read-only view of a weights store without one key (the mask's)."""

    def __init__(self, store, dropped):
        self._store = store
        self._dropped = dropped

    def keys(self):
        return [k for k in self._store.keys() if k != self._dropped]

    def __len__(self):
        return len(self.keys())

    def __getitem__(self, key):
        if key == self._dropped:
            raise KeyError(key)
        return self._store[key]

    def __contains__(self, key):
        return key != self._dropped and key in self._store


def _masked(base, doc, package="ft_keras", kernel_attribute=None):
    """Creates and registers the masked subclass of a Keras layer class."""
    attributes = {"__doc__": doc, "__module__": __name__}
    if kernel_attribute is not None:
        attributes["kernel_attribute"] = kernel_attribute
    cls = type(f"Masked{base.__name__}", (MaskedKernelMixin, base), attributes)
    return keras.saving.register_keras_serializable(package=package)(cls)


MaskedDense = _masked(
    keras.layers.Dense, "`keras.layers.Dense` with a boolean `kernel_mask` (see module doc)."
)
MaskedConv1D = _masked(
    keras.layers.Conv1D, "`keras.layers.Conv1D` with a boolean `kernel_mask` (see module doc)."
)
MaskedConv2D = _masked(
    keras.layers.Conv2D, "`keras.layers.Conv2D` with a boolean `kernel_mask` (see module doc)."
)
MaskedConv3D = _masked(
    keras.layers.Conv3D, "`keras.layers.Conv3D` with a boolean `kernel_mask` (see module doc)."
)
MaskedDepthwiseConv2D = _masked(
    keras.layers.DepthwiseConv2D,
    "`keras.layers.DepthwiseConv2D` with a boolean `kernel_mask` (see module doc).",
)

# Exact layer class -> masked class: the registry `sparsify` reads. Subclasses of these are not
# converted (their `call` may differ) and stay dense, unless registered themselves.
MASKED_CLASSES = {
    keras.layers.Dense: MaskedDense,
    keras.layers.Conv1D: MaskedConv1D,
    keras.layers.Conv2D: MaskedConv2D,
    keras.layers.Conv3D: MaskedConv3D,
    keras.layers.DepthwiseConv2D: MaskedDepthwiseConv2D,
}
PLAIN_CLASSES = {masked: plain for plain, masked in MASKED_CLASSES.items()}
_BUILT_IN = frozenset(cls.__name__ for cls in MASKED_CLASSES.values())


def register_maskable(layer_class, masked_class=None, kernel_attribute="kernel"):
    """Makes a user's kernel layer class maskable by `ft_keras.sparsify` and DST.

    The contract a maskable layer meets (tested in tests/test_layers.py):

    1. ``build`` creates the kernel as one trainable variable, reachable as the attribute
       ``kernel_attribute`` (default ``"kernel"``), with the shape the mask gets;
    2. ``call`` uses that variable as stored, so that a zero entry contributes nothing (multiply,
       matmul, convolution; not ``kernel + 1``); the gradient Keras computes for it is then the
       dense gradient that RigL growth needs;
    3. ``get_config`` / ``from_config`` rebuild the layer (``sparsify`` clones it that way);
    4. the class is registered for Keras serialization if models holding it are saved.

    Sparsity densities (ERK) read the kernel's shape: the last two axes are taken as
    (fan-in, fan-out), as for Keras's own layers.

    Example:

    >>> @keras.saving.register_keras_serializable(package="my_project")
    ... class Bilinear(keras.layers.Layer):       # y = x @ kernel (a 2D kernel named "kernel")
    ...     ...
    >>> MaskedBilinear = ftk.layers.register_maskable(Bilinear)
    >>> sparse = ftk.sparsify(model_with_bilinear, sparsity=0.9)   # Bilinear layers masked

    Args:
        layer_class: a subclass of ``keras.layers.Layer``; only instances of exactly this class
            are converted.
        masked_class: the masked twin, a subclass of both `MaskedKernelMixin` (first) and
            ``layer_class``; None creates ``Masked<ClassName>`` (registered for Keras
            serialization under the package "ft_keras_user").
        kernel_attribute: the name of the kernel variable's attribute (used when
            ``masked_class`` is None).

    Returns:
        The masked class.
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(
            f"layer_class must be a subclass of keras.layers.Layer; got {layer_class!r}."
        )
    if issubclass(layer_class, MaskedKernelMixin):
        raise ValueError(f"layer_class={layer_class.__name__} is already a masked layer class.")
    if masked_class is None:
        kernel_attribute = _checks.check_str("kernel_attribute", kernel_attribute)
        masked_class = _masked(
            layer_class,
            f"`{layer_class.__name__}` with a boolean `kernel_mask` (see ft_keras.layers).",
            package="ft_keras_user",
            kernel_attribute=kernel_attribute,
        )
    elif not (isinstance(masked_class, type) and issubclass(masked_class, MaskedKernelMixin)
              and issubclass(masked_class, layer_class)):
        raise TypeError(
            f"masked_class must subclass both MaskedKernelMixin and {layer_class.__name__}; "
            f"got {masked_class!r}."
        )
    registered = MASKED_CLASSES.get(layer_class)
    if registered is not None and registered is not masked_class:
        if registered.__module__ == __name__ and registered.__name__ in _BUILT_IN:
            raise ValueError(
                f"layer_class={layer_class.__name__} is maskable already (as "
                f"{registered.__name__}); ft_keras's own masked layers cannot be replaced."
            )
        del PLAIN_CLASSES[registered]
    MASKED_CLASSES[layer_class] = masked_class
    PLAIN_CLASSES[masked_class] = layer_class
    return masked_class


def is_masked(layer):
    """True if ``layer`` is one of ft_keras's masked layers."""
    return isinstance(layer, MaskedKernelMixin)


def is_prunable(layer):
    """True if ``layer``'s exact class has a masked counterpart."""
    return type(layer) in MASKED_CLASSES


def kernel_of(layer):
    """The kernel variable of a masked or maskable layer."""
    if is_masked(layer):
        return layer.masked_kernel
    attribute = MASKED_CLASSES[type(layer)].kernel_attribute
    return getattr(layer, attribute) if attribute else _keras_compat.kernel_variable(layer)


def has_kernel(layer):
    """True for layers that own a kernel-like weight (reported when they cannot be masked)."""
    return any(w.name.endswith(("kernel", "embeddings")) for w in layer.weights)
