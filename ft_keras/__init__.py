"""ft_keras: FreeTickets for Keras 3.

Dynamic sparse training inside ``model.fit`` (masked layers, SET / RigL / SNFS prune-and-grow,
ERK / ER / uniform layer densities) and the tools to build FreeTickets ensembles from it.

>>> import ft_keras as ftk
>>> sparse = ftk.sparsify(model, sparsity=0.9, distribution="erk")
>>> sparse.fit(..., callbacks=[ftk.DynamicSparsity(update_every=100, grow="gradient")])
"""

from ft_keras import corruptions
from ft_keras import data
from ft_keras import distribute
from ft_keras import distributions
from ft_keras import ensemble
from ft_keras import flops
from ft_keras import layers
from ft_keras import metrics
from ft_keras import models
from ft_keras import recipes
from ft_keras import schedules
from ft_keras import tickets
from ft_keras import topology
from ft_keras.callbacks import DynamicSparsity
from ft_keras.callbacks import FreeTickets
from ft_keras.callbacks import StaticSparsity
from ft_keras.callbacks import TicketCheckpoint
from ft_keras.distributions import layer_densities
from ft_keras.ensemble import Ensemble
from ft_keras.ensemble import ensemble_outputs
from ft_keras.recipes import train_dst_ensemble
from ft_keras.sparsify import masked_layers_of as masked_layers
from ft_keras.sparsify import sparsify
from ft_keras.sparsify import sparsity_report
from ft_keras.sparsify import strip
from ft_keras.tickets import list_tickets
from ft_keras.tickets import prepare_ticket_dir
from ft_keras.tickets import read_ticket
from ft_keras.tickets import write_ticket
from ft_keras.version import __version__

# Keras's model.fit cannot run under MultiWorkerMirroredStrategy; see ft_keras/distribute.py.
distribute.install_multiworker_fix()

__all__ = [
    "DynamicSparsity",
    "Ensemble",
    "FreeTickets",
    "StaticSparsity",
    "TicketCheckpoint",
    "__version__",
    "corruptions",
    "data",
    "distribute",
    "distributions",
    "ensemble",
    "ensemble_outputs",
    "flops",
    "layer_densities",
    "layers",
    "list_tickets",
    "masked_layers",
    "metrics",
    "models",
    "prepare_ticket_dir",
    "read_ticket",
    "recipes",
    "schedules",
    "sparsify",
    "sparsity_report",
    "strip",
    "tickets",
    "topology",
    "train_dst_ensemble",
    "write_ticket",
]
