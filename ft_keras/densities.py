"""Per-layer density allocation for sparse training.

Pure functions over kernel shapes: no Keras or TensorFlow is imported here, so
the allocation can be computed, tested and inspected without building a model.

Given an overall sparsity ``S`` (overall density ``d = 1 - S``) and the kernel
shape of every sparsified layer, :func:`layer_densities` returns a density per
layer such that ``sum_l density_l * N_l == d * sum_l N_l`` (``N_l`` is the
number of weights of layer ``l``), for every distribution:

* ``"uniform"``: every layer that is not kept dense gets the same density.
* ``"er"`` (Erdos-Renyi): density proportional to
  ``(n_in + n_out) / (n_in * n_out)`` with ``n_in, n_out`` the last two dims.
* ``"erk"`` (Erdos-Renyi-Kernel, default): density proportional to
  ``sum(shape) / prod(shape)``, optionally raised to ``erk_power_scale``.

When the proportional rule would give a layer a density above 1, the layer(s)
with the largest raw score are made dense, their weights are moved to the
fixed side of the budget, and the scale factor is solved again; this repeats
until every density is at most 1.

Example:
    >>> shapes = {"fc1": (784, 300), "fc2": (300, 100), "fc3": (100, 10)}
    >>> dens = layer_densities(shapes, sparsity=0.9, distribution="erk")
    >>> [round(v, 4) for v in dens.values()]
    [0.0796, 0.2302, 1.0]
    >>> round(total_density(shapes, dens), 6)
    0.1
    >>> active_counts(shapes, dens)
    {'fc1': 18714, 'fc2': 6906, 'fc3': 1000}
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import numpy as np

from ft_keras import _checks

__all__ = [
    "SUPPORTED_DISTRIBUTIONS",
    "layer_densities",
    "active_counts",
    "total_density",
]

SUPPORTED_DISTRIBUTIONS = ("uniform", "er", "erk")

# Relative slack used when comparing the keep_dense weights against the budget.
_BUDGET_RTOL = 1e-12


def _check_shapes(shapes) -> dict[str, tuple[int, ...]]:
    """Validates ``shapes`` and returns an ordered dict of int tuples."""
    if not isinstance(shapes, Mapping):
        raise TypeError(
            f"shapes must be a mapping from layer name to kernel shape; "
            f"got {type(shapes).__name__}: {shapes!r}"
        )
    if len(shapes) == 0:
        raise ValueError("shapes must name at least one layer; got an empty mapping")
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        if not isinstance(name, str):
            raise TypeError(
                f"shapes keys must be layer names (str); got {type(name).__name__}: {name!r}"
            )
        try:
            dims = tuple(shape)
        except TypeError:
            raise TypeError(
                f"shapes[{name!r}] must be a tuple of ints; got {shape!r}"
            ) from None
        if len(dims) < 2:
            raise ValueError(
                f"shapes[{name!r}] must have at least 2 dims (a kernel shape such as "
                f"(n_in, n_out) or (h, w, c_in, c_out)); got {shape!r}"
            )
        for dim in dims:
            if not isinstance(dim, numbers.Integral) or isinstance(dim, (bool, np.bool_)):
                raise TypeError(
                    f"shapes[{name!r}] must contain only ints; got {shape!r}"
                )
        if any(int(dim) <= 0 for dim in dims):
            raise ValueError(
                f"shapes[{name!r}] has a non-positive dimension: {shape!r}; every "
                f"dimension must be a positive integer"
            )
        out[name] = tuple(int(dim) for dim in dims)
    return out


def _check_sparsity(sparsity) -> float:
    """Validates ``sparsity`` and returns it as a float in [0, 1)."""
    return _checks.check_real("sparsity", sparsity, low=0.0, high=1.0, high_open=True)


def _check_distribution(distribution) -> str:
    """Validates ``distribution`` and returns its lower-case name."""
    return _checks.check_choice("distribution", distribution, SUPPORTED_DISTRIBUTIONS)


def _check_keep_dense(keep_dense, shapes: Mapping[str, tuple[int, ...]]) -> set[str]:
    """Validates ``keep_dense`` (a name or an iterable of names) against ``shapes``."""
    names = _checks.check_names("keep_dense", keep_dense)
    unknown = [name for name in names if name not in shapes]
    if unknown:
        raise ValueError(
            f"keep_dense={list(names)!r} names layer(s) not in shapes: {unknown!r}; known "
            f"layers: {list(shapes)!r}"
        )
    return set(names)


def _check_power(erk_power_scale) -> float:
    """Validates ``erk_power_scale`` and returns it as a float > 0."""
    return _checks.check_real("erk_power_scale", erk_power_scale, low=0.0, low_open=True)


def _raw_score(shape: tuple[int, ...], distribution: str, power: float) -> float:
    """Returns the unnormalised density score of one layer."""
    if distribution == "uniform":
        return 1.0
    if distribution == "er":
        n_in, n_out = shape[-2], shape[-1]
        return (n_in + n_out) / (n_in * n_out)
    # erk
    return (sum(shape) / math.prod(shape)) ** power


def layer_densities(
    shapes: Mapping[str, Iterable[int]],
    sparsity: float,
    distribution: str = "erk",
    keep_dense: str | Iterable[str] = (),
    erk_power_scale: float = 1.0,
) -> dict[str, float]:
    """Allocates a density to every layer so that the overall density is ``1 - sparsity``.

    For each non-fixed layer ``l`` with raw score ``raw_l`` and ``N_l`` weights,
    ``density_l = eps * raw_l`` where ``eps`` solves
    ``sum_{free} eps * raw_l * N_l = d * N_total - sum_{fixed} N_l``. Layers in
    ``keep_dense`` start on the fixed side at density 1.0. While some
    ``eps * raw_l > 1``, the free layer(s) with the largest ``raw_l`` are made
    dense, moved to the fixed side, and ``eps`` is solved again.

    Args:
        shapes: Ordered mapping from layer name to kernel shape: Dense
            ``(n_in, n_out)``, Conv1D ``(k, c_in, c_out)``, Conv2D
            ``(h, w, c_in, c_out)``, Conv3D ``(d, h, w, c_in, c_out)``,
            DepthwiseConv2D ``(h, w, c_in, multiplier)``.
        sparsity: Overall fraction of zero weights over all layers, in [0, 1).
        distribution: One of ``"uniform"``, ``"er"``, ``"erk"`` (any case).
        keep_dense: A layer name or an iterable of layer names kept at density 1.0.
        erk_power_scale: Exponent applied to the ERK raw score (``raw ** power``);
            only used by ``"erk"``, but always validated. Values below 1 flatten
            the allocation towards uniform.

    Returns:
        A dict with the keys of ``shapes`` in the same order, mapping each layer to
        its density in (0, 1].

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``sparsity`` is outside [0, 1), ``distribution`` is unknown,
            ``keep_dense`` names an unknown layer, ``shapes`` is empty or has a
            non-positive dimension, ``erk_power_scale <= 0``, or the
            ``keep_dense`` layers alone (nearly) exhaust the weight budget.
    """
    checked = _check_shapes(shapes)
    s = _check_sparsity(sparsity)
    dist = _check_distribution(distribution)
    fixed = _check_keep_dense(keep_dense, checked)
    power = _check_power(erk_power_scale)

    density = 1.0 - s
    numel = {name: math.prod(shape) for name, shape in checked.items()}
    n_total = sum(numel.values())
    budget = density * n_total

    fixed_count = sum(numel[name] for name in fixed)
    free = [name for name in checked if name not in fixed]
    if free:
        # The free layers need a strictly positive share of the budget.
        too_many = fixed_count >= budget * (1.0 - _BUDGET_RTOL)
    else:
        too_many = fixed_count > budget * (1.0 + _BUDGET_RTOL)
    if too_many:
        min_density = fixed_count / n_total
        raise ValueError(
            f"keep_dense layers {sorted(fixed)!r} hold {fixed_count} weights, which "
            f"{'leaves nothing for the other layers of' if free else 'exceeds'} the "
            f"budget of {budget:.6g} weights at sparsity={sparsity!r} "
            f"(N_total={n_total}); with these layers dense the minimum achievable "
            f"overall density is {min_density:.6g}, so sparsity must be "
            f"{'below' if free else 'at most'} {1.0 - min_density:.6g}"
        )

    raw = {name: _raw_score(checked[name], dist, power) for name in free}
    dense = set(fixed)
    eps = 0.0
    while free:
        remaining = budget - sum(numel[name] for name in dense)
        weighted = math.fsum(raw[name] * numel[name] for name in free)
        eps = remaining / weighted
        max_raw = max(raw[name] for name in free)
        if eps * max_raw <= 1.0:
            break
        capped = [name for name in free if raw[name] == max_raw]
        dense.update(capped)
        free = [name for name in free if name not in dense]

    result: dict[str, float] = {}
    for name in checked:
        if name in dense:
            result[name] = 1.0
        else:
            result[name] = min(1.0, eps * raw[name])
    return result


def total_density(
    shapes: Mapping[str, Iterable[int]], densities: Mapping[str, float]
) -> float:
    """Returns the overall density ``sum_l density_l * N_l / sum_l N_l``.

    Args:
        shapes: Mapping from layer name to kernel shape.
        densities: Mapping from the same layer names to densities in [0, 1].

    Returns:
        The weight-count-weighted mean density.

    Raises:
        ValueError: If the layer names differ or a density is outside [0, 1].
    """
    checked = _check_shapes(shapes)
    dens = _check_densities(densities, checked)
    numel = {name: math.prod(shape) for name, shape in checked.items()}
    return math.fsum(dens[name] * numel[name] for name in checked) / sum(numel.values())


def _check_densities(densities, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, float]:
    """Validates ``densities`` against the (already validated) ``shapes``."""
    if not isinstance(densities, Mapping):
        raise TypeError(
            f"densities must be a mapping from layer name to density; got "
            f"{type(densities).__name__}: {densities!r}"
        )
    if set(densities) != set(shapes):
        missing = [name for name in shapes if name not in densities]
        extra = [name for name in densities if name not in shapes]
        raise ValueError(
            f"densities must have the same layer names as shapes; missing: {missing!r}, "
            f"unknown: {extra!r}"
        )
    out: dict[str, float] = {}
    for name in shapes:
        value = densities[name]
        if not _checks.is_real(value):
            raise TypeError(
                f"densities[{name!r}] must be a real number in [0, 1]; got {value!r}"
            )
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"densities[{name!r}] must be in [0, 1]; got {value!r}")
        out[name] = float(value)
    return out


def active_counts(
    shapes: Mapping[str, Iterable[int]], densities: Mapping[str, float]
) -> dict[str, int]:
    """Returns the number of active (non-zero) weights per layer.

    Each count is ``round(density * numel)``, raised to 1 when the density is
    positive (so no layer is left with zero connections) and capped at ``numel``.

    Args:
        shapes: Mapping from layer name to kernel shape.
        densities: Mapping from the same layer names to densities in [0, 1],
            e.g. the output of :func:`layer_densities`.

    Returns:
        A dict with the keys of ``shapes`` in the same order, mapping each layer to
        its number of active weights.

    Raises:
        ValueError: If the layer names differ or a density is outside [0, 1].
    """
    checked = _check_shapes(shapes)
    dens = _check_densities(densities, checked)
    counts: dict[str, int] = {}
    for name, shape in checked.items():
        numel = math.prod(shape)
        count = min(numel, int(round(dens[name] * numel)))
        if dens[name] > 0.0:
            count = max(count, 1)
        counts[name] = count
    return counts
