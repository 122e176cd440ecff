"""Deprecated alias of `ft_keras.masks` (renamed in 0.2.0); importing it warns."""

import warnings

from ft_keras.masks import *  # noqa: F401,F403  pylint: disable=wildcard-import,unused-wildcard-import

warnings.warn("ft_keras.topology is deprecated: use ft_keras.masks (same functions).",
              DeprecationWarning, stacklevel=2)
