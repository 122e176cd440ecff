"""Deprecated alias of `ft_keras.densities` (renamed in 0.2.0); importing it warns."""

import warnings

from ft_keras.densities import SUPPORTED_DISTRIBUTIONS  # noqa: F401
from ft_keras.densities import active_counts  # noqa: F401
from ft_keras.densities import layer_densities  # noqa: F401
from ft_keras.densities import total_density  # noqa: F401

warnings.warn("ft_keras.distributions is deprecated: use ft_keras.densities (same functions).",
              DeprecationWarning, stacklevel=2)
