"""ft_keras: FreeTickets for Keras 3.

Dynamic sparse training inside ``model.fit`` (masked layers, SET / RigL / SNFS prune-and-grow,
ERK / ER / uniform layer densities) and the tools to build FreeTickets ensembles from it. The
method is described in docs/method.md.

>>> import ft_keras as ftk
>>> sparse = ftk.sparsify(model, sparsity=0.9, distribution="erk")
>>> sparse.fit(..., callbacks=[ftk.DynamicSparsity(update_every=100, grow="gradient")])
"""

import importlib
import warnings

from ft_keras import channels
from ft_keras import corruptions
from ft_keras import data
from ft_keras import densities
from ft_keras import distribute
from ft_keras import ensemble
from ft_keras import evaluation
from ft_keras import export
from ft_keras import flops
from ft_keras import free_tickets
from ft_keras import keras_metrics
from ft_keras import layers
from ft_keras import masks
from ft_keras import metrics
from ft_keras import models
from ft_keras import recipes
from ft_keras import schedules
from ft_keras import tickets
from ft_keras import training
from ft_keras.densities import layer_densities
from ft_keras.ensemble import Ensemble
from ft_keras.ensemble import ensemble_outputs
from ft_keras.free_tickets import FreeTickets
from ft_keras.free_tickets import TicketCheckpoint
from ft_keras.recipes import RecipeResult
from ft_keras.recipes import train_checkpoint_ensemble
from ft_keras.recipes import train_deep_ensemble
from ft_keras.recipes import train_dense
from ft_keras.recipes import train_dst_ensemble
from ft_keras.recipes import train_edst
from ft_keras.recipes import train_pf_ensemble
from ft_keras.recipes import train_static_sparse_ensemble
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


# Keras's model.fit cannot run under MultiWorkerMirroredStrategy; see ft_keras/_keras_compat.py.
distribute.install_multiworker_fix()

# Module names that moved (0.2.0): old name -> new module. Importing the old name warns.
_MOVED_MODULES = {
    "callbacks": "ft_keras.callbacks",
    "topology": "ft_keras.topology",
    "distributions": "ft_keras.distributions",
}


def __getattr__(name):
    if name in _MOVED_MODULES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = importlib.import_module(_MOVED_MODULES[name])
        warnings.warn(
            f"ft_keras.{name} is deprecated: {module.__doc__.splitlines()[0]}",
            DeprecationWarning, stacklevel=2)
        return module
    raise AttributeError(f"module 'ft_keras' has no attribute {name!r}")


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
    "write_ticket",
]
