"""ft_keras: FreeTickets for Keras 3.

Dynamic sparse training inside ``model.fit`` (masked layers, SET / RigL / SNFS prune-and-grow,
ERK / ER / uniform layer densities) and the tools to build FreeTickets ensembles from it.

>>> import ft_keras as ftk
>>> sparse = ftk.sparsify(model, sparsity=0.9, distribution="erk")
>>> sparse.fit(..., callbacks=[ftk.DynamicSparsity(update_every=100, grow="gradient")])
"""

from ft_keras import data
from ft_keras import distributions
from ft_keras import layers
from ft_keras import models
from ft_keras import schedules
from ft_keras import topology
from ft_keras.callbacks import DynamicSparsity
from ft_keras.callbacks import StaticSparsity
from ft_keras.distributions import layer_densities
from ft_keras.sparsify import masked_layers_of as masked_layers
from ft_keras.sparsify import sparsify
from ft_keras.sparsify import sparsity_report
from ft_keras.sparsify import strip
from ft_keras.version import __version__

__all__ = [
    "DynamicSparsity",
    "StaticSparsity",
    "__version__",
    "data",
    "distributions",
    "layer_densities",
    "layers",
    "masked_layers",
    "models",
    "schedules",
    "sparsify",
    "sparsity_report",
    "strip",
    "topology",
]
