"""ft_keras: FreeTickets for Keras 3.

Dynamic sparse training inside ``model.fit`` (masked layers, SET / RigL / SNFS prune-and-grow,
ERK / ER / uniform layer densities) and the tools to build FreeTickets ensembles from it. The
method is described in docs/method.md.

>>> import ft_keras as ftk
>>> sparse = ftk.sparsify(model, sparsity=0.9, distribution="erk")
>>> sparse.fit(..., callbacks=[ftk.DynamicSparsity(update_every=100, grow="gradient")])
"""

import importlib

from ft_keras import channels
from ft_keras import densities
from ft_keras import distribute
from ft_keras import ensemble
from ft_keras import export
from ft_keras import flops
from ft_keras import free_tickets
from ft_keras import layers
from ft_keras import masks
from ft_keras import schedules
from ft_keras import tickets
from ft_keras import training
from ft_keras.densities import layer_densities
from ft_keras.ensemble import Ensemble
from ft_keras.ensemble import ensemble_outputs
from ft_keras.free_tickets import FreeTickets
from ft_keras.free_tickets import TicketCheckpoint
from ft_keras.sparsify import compact
from ft_keras.sparsify import masked_layers_of as masked_layers
from ft_keras.sparsify import sparsify
from ft_keras.sparsify import sparsity_report
from ft_keras.sparsify import strip
from ft_keras.tickets import list_tickets
from ft_keras.tickets import prepare_ticket_dir
from ft_keras.tickets import read_ticket
from ft_keras.tickets import scan_tickets
from ft_keras.tickets import write_ticket
from ft_keras.training import DynamicSparsity
from ft_keras.training import SparseTraining
from ft_keras.training import StaticSparsity
from ft_keras.version import __version__

# The research harness (ft_keras/harness/) is loaded on first use, so that importing the core
# does not import it: the modules by their short names, and the recipes' public names.
_HARNESS_MODULES = ("corruptions", "data", "evaluation", "keras_metrics", "metrics", "models",
                    "recipes", "training_cost")
_RECIPE_NAMES = ("RecipeResult", "train_checkpoint_ensemble", "train_deep_ensemble",
                 "train_dense", "train_dst_ensemble", "train_edst", "train_pf_ensemble",
                 "train_static_sparse_ensemble")


def __getattr__(name):
    if name in _HARNESS_MODULES:
        value = importlib.import_module(f"ft_keras.harness.{name}")
    elif name in _RECIPE_NAMES:
        value = getattr(importlib.import_module("ft_keras.harness.recipes"), name)
    else:
        raise AttributeError(f"module 'ft_keras' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_HARNESS_MODULES) | set(_RECIPE_NAMES))


__all__ = [
    "DynamicSparsity",
    "Ensemble",
    "RecipeResult",
    "FreeTickets",
    "SparseTraining",
    "StaticSparsity",
    "TicketCheckpoint",
    "__version__",
    "channels",
    "compact",
    "corruptions",
    "data",
    "densities",
    "distribute",
    "ensemble",
    "ensemble_outputs",
    "evaluation",
    "export",
    "flops",
    "free_tickets",
    "keras_metrics",
    "layer_densities",
    "layers",
    "list_tickets",
    "masked_layers",
    "masks",
    "metrics",
    "models",
    "prepare_ticket_dir",
    "read_ticket",
    "recipes",
    "schedules",
    "sparsify",
    "scan_tickets",
    "sparsity_report",
    "strip",
    "tickets",
    "train_checkpoint_ensemble",
    "train_deep_ensemble",
    "train_dense",
    "train_dst_ensemble",
    "train_edst",
    "train_pf_ensemble",
    "train_static_sparse_ensemble",
    "training",
    "training_cost",
    "write_ticket",
]
