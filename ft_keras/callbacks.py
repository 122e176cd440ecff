"""Deprecated alias module (0.2.0): the callbacks moved to `ft_keras.training`
(`DynamicSparsity`, `StaticSparsity`) and `ft_keras.free_tickets` (`FreeTickets`,
`TicketCheckpoint`). The public names ``ft_keras.DynamicSparsity`` etc. are unchanged."""

import warnings

from ft_keras.free_tickets import FreeTickets  # noqa: F401
from ft_keras.free_tickets import TicketCheckpoint  # noqa: F401
from ft_keras.masks import GROW_MODES  # noqa: F401
from ft_keras.masks import PRUNE_MODES  # noqa: F401
from ft_keras.training import DynamicSparsity  # noqa: F401
from ft_keras.training import StaticSparsity  # noqa: F401

warnings.warn(
    "ft_keras.callbacks is deprecated: import DynamicSparsity / StaticSparsity from "
    "ft_keras.training and FreeTickets / TicketCheckpoint from ft_keras.free_tickets (or use "
    "ft_keras.DynamicSparsity etc.).", DeprecationWarning, stacklevel=2)
