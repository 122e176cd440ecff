"""Training recipes: every method of the FreeTickets comparison as one library function.

Each recipe builds its models with ``build_fn``, trains them with ``model.fit``, writes its
members as tickets (``ticket_dir/ticket_<i>/``, the layout of `ft_keras.write_ticket`, so that
`ft_keras.Ensemble.from_directory` loads the members of any method the same way) and returns a
`RecipeResult`: the ticket paths, the wall time and the training cost in multiply-accumulates
(FLOPs = 2 x MACs), computed for every fit from the sparsity callback it ran with
(`ft_keras.training_cost.fit_macs`). The methods are described in docs/method.md.

==============================  ======================  ===========================================
recipe                          ``method`` (metadata)   members
==============================  ======================  ===========================================
`train_dense`                   ``dense``               one dense model
`train_deep_ensemble`           ``deep_ensemble``       M dense models, seeds ``seed + m``
`train_dst_ensemble`            ``dst_ensemble``        M independent DST runs, seeds ``seed + m``
`train_edst`                    ``edst``                M tickets of ONE sparse run (FreeTickets)
`train_static_sparse_ensemble`  ``static_sparse_...``   M sparse models, fixed random masks
`train_pf_ensemble`             ``pf_ensemble``         one dense run pruned by global magnitude,
                                                        M fine-tunings with that mask fixed
`train_checkpoint_ensemble`     ``checkpoint_ensemble`` M snapshots of ONE DST run, taken in the
                                                        windows where EDST takes its tickets
==============================  ======================  ===========================================

Arguments with the same name mean the same in every recipe:

* ``build_fn``: a callable returning a new dense Keras model with logits output. It is called
  after ``keras.utils.set_random_seed(member seed)``, inside ``strategy.scope()``.
* ``num_members``: M >= 1 (EDST: the number of tickets).
* ``train_data``: a ``tf.data.Dataset`` of ``(x, y)`` batches, an ``(x, y)`` tuple of arrays, or
  a callable ``train_data(seed)`` returning either; the callable form gives every fit its own
  data order (it is called with the member's seed).
* ``validation_data``: passed to ``fit``; needed when ``monitor`` is a ``val_*`` log.
* ``ticket_dir``: where the tickets go; a folder that holds tickets is refused unless
  ``overwrite``.
* ``compile_fn``: ``compile_fn(model)`` compiles each (sparsified) model; default
  `default_compile`; `make_compile_fn` builds the usual ones (both from
  `ft_keras.harness.compiling`, also named here).
* ``seed``: the base seed; member m of the independent recipes uses ``seed + m`` for its
  weights, masks, growth and data order.
* ``monitor``: the epoch log whose best epoch becomes each member's ticket (``"val_accuracy"``);
  None (not for EDST): the state after the last epoch.
* ``batch_size``: examples per step, for the training cost (every step is costed at the full
  batch); also ``fit``'s batch size for array inputs. None: the dataset's static batch dimension,
  or ``fit_kwargs["batch_size"]`` / 32 for arrays.
* ``strategy``: the ``tf.distribute`` strategy whose scope models are built and compiled in
  (None: the current one). Tickets are written by the chief only.
* ``callbacks``: extra callbacks for every fit, or a callable ``callbacks(name)`` returning a
  list for the fit called ``name`` (``"member_<m>"``, ``"edst"``, ``"checkpoint_ensemble"``,
  ``"pf_dense"``), e.g. one TensorBoard folder per fit.
* ``fit_kwargs``: more ``fit`` arguments (``verbose``, ``steps_per_epoch``, ...).
* ``metadata``: extra keys stored in every ticket's ``metadata.json``.

Example:

>>> result = ftk.recipes.train_dst_ensemble(
...     lambda: ftk.models.lenet_300_100(), 3, (x_train, y_train), validation_data=(x_val, y_val),
...     epochs=10, ticket_dir="/tmp/dst_tickets", sparsity=0.8, batch_size=128)
>>> result.tickets, result.training_macs_relative                     # doctest: +SKIP
>>> ensemble = ftk.Ensemble.from_directory(result.ticket_dir)
"""

import dataclasses
import itertools
import numbers
import os
import shutil
import tempfile
import time
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from ft_keras import _checks
from ft_keras import distribute
from ft_keras import flops
from ft_keras import layers as layers_lib
from ft_keras import schedules
from ft_keras import tickets
from ft_keras.sparsify import masked_layers_of
from ft_keras.sparsify import sparsify
from ft_keras.sparsify import walk_layers
# The sparsity callbacks and ticket writers (public as ftk.DynamicSparsity, ...).
from ft_keras.free_tickets import FreeTickets
from ft_keras.free_tickets import TicketCheckpoint
from ft_keras.training import DynamicSparsity
from ft_keras.training import SparseTraining
from ft_keras.training import StaticSparsity
from ft_keras.harness import training_cost
# How the recipes compile their models (ft_keras.harness.compiling), part of this module's API.
from ft_keras.harness.compiling import LR_SCHEDULES  # noqa: F401
from ft_keras.harness.compiling import OPTIMIZERS  # noqa: F401
from ft_keras.harness.compiling import default_compile
from ft_keras.harness.compiling import learning_rate_schedule  # noqa: F401
from ft_keras.harness.compiling import make_compile_fn  # noqa: F401

METHODS = ("dense", "deep_ensemble", "dst_ensemble", "edst", "static_sparse_ensemble",
           "pf_ensemble", "checkpoint_ensemble")
"""The ``method`` names the recipes write into their tickets' metadata."""

SPARSE_METHODS = ("dst_ensemble", "edst", "static_sparse_ensemble", "pf_ensemble",
                  "checkpoint_ensemble")
"""The methods whose members are sparse."""

DISTRIBUTIONS = ("erk", "er", "uniform")

# FreeTickets' defaults for the regular DST updates of a run that yields tickets: drop fraction
# 0.5, cosine-annealed to 0.005 over the run (the checkpoint ensemble uses the same).
_EDST_DST_DEFAULTS = {"drop_fraction": 0.5, "final_drop_fraction": 0.005}


# ------------------------------------------------------------------------------------ result
@dataclasses.dataclass(frozen=True)
class RecipeResult:
    """What a recipe returns.

    Attributes:
        method: the recipe's method name (`METHODS`).
        ticket_dir: the folder of the tickets.
        tickets: the ticket folders, in member order.
        member_seeds: the seed of each member (EDST and the checkpoint ensemble: the run's seed).
        wall_time_s: wall time of all fits (validation and ticket writing included).
        fit_wall_time_s: wall time of each fit, in order (PF: the dense run first).
        member_training_macs: training MACs attributed to each member, in order: the members of
            independent recipes their own run; EDST and the checkpoint ensemble the steps of the
            one run up to the end of the member's window; PF the dense run to member 0. The sum
            is the method's cost; the cumulative sum the cost of its first k members.
        batch_size: examples per step used for the cost.
        steps: optimizer steps of all fits.
        reference_steps: the steps of ONE member's run (EDST and the checkpoint ensemble: the
            whole run; PF: the dense run).
        dense_training_macs: one dense model of this architecture trained for
            ``reference_steps`` steps: the reference of `training_macs_relative`.
        extra: method-specific paths and values (PF: ``dense_ticket``).
    """

    method: str
    ticket_dir: str
    tickets: tuple
    member_seeds: tuple
    wall_time_s: float
    fit_wall_time_s: tuple
    member_training_macs: tuple
    batch_size: int
    steps: int
    reference_steps: int
    dense_training_macs: int
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def num_members(self):
        return len(self.tickets)

    @property
    def training_macs(self):
        """Training MACs of the whole method (all members)."""
        return int(sum(self.member_training_macs))

    @property
    def cumulative_training_macs(self):
        """Training MACs of the first k members, for k = 1..M."""
        return tuple(int(v) for v in itertools.accumulate(self.member_training_macs))

    @property
    def training_macs_relative(self):
        """`training_macs` over `dense_training_macs` (one dense run as long as one member's)."""
        return flops.relative_cost(self.training_macs, self.dense_training_macs)

    def as_dict(self):
        """A JSON-friendly dict of the fields and the derived costs."""
        out = dataclasses.asdict(self)
        out.update(tickets=list(self.tickets), member_seeds=list(self.member_seeds),
                   fit_wall_time_s=list(self.fit_wall_time_s),
                   member_training_macs=list(self.member_training_macs),
                   training_macs=self.training_macs,
                   cumulative_training_macs=list(self.cumulative_training_macs),
                   training_macs_relative=self.training_macs_relative)
        return out


# ------------------------------------------------------------------------- global magnitude
def global_magnitude_masks(kernels, num_active):
    """Masks keeping the ``num_active`` largest-magnitude weights over all ``kernels`` together.

    Args:
        kernels: ``{name: numpy kernel}``.
        num_active: how many weights stay, over all kernels (ties: the earlier position wins,
            in the order of ``kernels``).

    Returns:
        ``{name: bool mask}`` with exactly ``num_active`` ones in total.
    """
    if not isinstance(kernels, dict) or not kernels:
        raise TypeError(f"kernels must be a non-empty dict of name -> array; got "
                        f"{type(kernels).__name__}.")
    names = list(kernels)
    arrays = {n: np.asarray(kernels[n]) for n in names}
    total = sum(a.size for a in arrays.values())
    num_active = _checks.check_int("num_active", num_active, minimum=0, maximum=total)
    flat = np.concatenate([np.abs(arrays[n]).ravel() for n in names])
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:num_active]] = True
    masks, offset = {}, 0
    for name in names:
        size = arrays[name].size
        masks[name] = keep[offset:offset + size].reshape(arrays[name].shape)
        offset += size
    return masks


def prune_global_magnitude(model, sparsity, keep_dense=(), seed=0):
    """A sparse copy of ``model`` pruned by global magnitude to ``sparsity``.

    ``sparsity`` is over all prunable kernels, ``keep_dense`` layers counting as dense (as in
    `ft_keras.sparsify`). The copy comes from ``ft_keras.sparsify(..., distribution="uniform")``
    so that every prunable layer outside ``keep_dense`` is masked; its kernels are then reset to
    ``model``'s and masked with one magnitude threshold over all of them (`global_magnitude_masks`).

    Raises:
        ValueError: ``sparsity`` cannot be reached because the ``keep_dense`` layers alone hold
            more than ``1 - sparsity`` of the prunable weights.
    """
    _checks.check_model("model", model)
    sparsity = _checks.check_real("sparsity", sparsity, low=0.0, high=1.0, high_open=True)
    keep_dense = _checks.check_names("keep_dense", keep_dense)
    prunable = {layer.name: layer for layer in walk_layers(model)
                if layers_lib.is_prunable(layer)}
    sparse = sparsify(model, sparsity, distribution="uniform", keep_dense=keep_dense,
                                   seed=seed)
    targets = masked_layers_of(sparse)
    kernels = {layer.name: np.asarray(prunable[layer.name].kernel.numpy()) for layer in targets}
    total = sum(int(np.prod(layer.kernel.shape)) for layer in prunable.values())
    kept_dense = total - sum(k.size for k in kernels.values())
    num_active = int(round((1.0 - sparsity) * total)) - kept_dense
    if num_active < 0:
        raise ValueError(
            f"sparsity={sparsity!r} cannot be reached with keep_dense={list(keep_dense)}: the "
            f"dense layers alone hold {kept_dense} of {total} prunable weights.")
    masks = global_magnitude_masks(kernels, num_active) if kernels else {}
    for layer in targets:
        layer.masked_kernel.assign(kernels[layer.name])
        layer.set_mask(masks[layer.name])
    return sparse


# ----------------------------------------------------------------------------------- helpers
def _check_sparse(sparsity, distribution, keep_dense):
    sparsity = _checks.check_real("sparsity", sparsity, low=0.0, high=1.0, low_open=True,
                                  high_open=True)
    distribution = _checks.check_choice("distribution", distribution, DISTRIBUTIONS)
    return sparsity, distribution, _checks.check_names("keep_dense", keep_dense)


_TRAIN_DATA_TYPES = ("train_data must be a tf.data.Dataset of (x, y) batches, an (x, y) tuple of "
                     "arrays, or a callable seed -> either")


# Ticket metadata keys that the recipes (and write_ticket) set themselves.
_RESERVED_METADATA = tickets.COMPUTED_KEYS + (
    "member", "seed", "num_members", "sparsity", "phase", "method", "epoch", "step", "monitor",
    "monitor_value")
# FreeTickets arguments that train_edst sets from its own arguments.
_EDST_ARGUMENTS = ("ticket_dir", "num_tickets", "exploration_epochs", "refine_epochs",
                   "explore_fraction", "monitor", "exploration_lr", "refine_lr", "overwrite",
                   "metadata")


# The arguments every recipe takes, with the meaning the module doc gives them.
_SHARED_ARGUMENTS = ("build_fn", "num_members", "train_data", "validation_data", "ticket_dir",
                     "compile_fn", "seed", "monitor", "batch_size", "strategy", "callbacks",
                     "fit_kwargs", "metadata", "overwrite")


class _Fit(NamedTuple):
    """What one fit of a recipe ran: its optimizer steps, examples per step, and its training
    MACs (`training_cost.fit_macs`) at the epochs asked for (or at its end)."""

    steps: int
    batch: int
    macs: list


class _Common:
    """The arguments every recipe shares (`_SHARED_ARGUMENTS`), checked once, and the fit /
    ticket plumbing built on them."""

    def __init__(self, method, arguments):
        """``arguments``: the recipe's arguments by name (its ``locals()`` on entry); a recipe
        without ``num_members`` trains one model."""
        options = {name: arguments.get(name) for name in _SHARED_ARGUMENTS}
        options["num_members"] = arguments.get("num_members", 1)
        self._check(method, **options)

    def _check(self, method, build_fn, num_members, train_data, validation_data, ticket_dir,
               compile_fn, seed, monitor, batch_size, strategy, callbacks, fit_kwargs, metadata,
               overwrite):
        self.method = method
        if isinstance(build_fn, keras.Model):  # a model is callable, but on inputs
            raise TypeError(f"build_fn must be a callable returning a keras.Model (e.g. a function "
                            f"that builds it); got the model {build_fn.name!r} itself.")
        self.build_fn = _checks.check_callable("build_fn", build_fn,
                                               "a callable returning a keras.Model")
        self.num_members = _checks.check_positive_int("num_members", num_members)
        if train_data is None:
            raise ValueError("train_data=None: give a tf.data.Dataset of (x, y) batches, an "
                             "(x, y) tuple of arrays, or a callable seed -> either.")
        if not (callable(train_data) or isinstance(train_data, tf.data.Dataset) or (
                isinstance(train_data, (tuple, list)) and len(train_data) == 2)):
            raise TypeError(_TRAIN_DATA_TYPES + f"; got {type(train_data).__name__}.")
        self.train_data = train_data
        if isinstance(validation_data, (tuple, list)) and len(validation_data) not in (2, 3):
            raise ValueError(f"validation_data must be (x, y) or (x, y, sample_weight); got a "
                             f"{type(validation_data).__name__} of {len(validation_data)} items.")
        if isinstance(validation_data, (str, bytes, numbers.Number, dict, np.ndarray)):
            raise TypeError(f"validation_data must be an (x, y) tuple, a tf.data.Dataset or None; "
                            f"got {type(validation_data).__name__}.")
        self.validation_data = validation_data
        self.ticket_dir = _checks.check_path("ticket_dir", ticket_dir)
        self.compile_fn = _checks.check_callable("compile_fn", compile_fn,
                                                 "a callable that compiles a model")
        self.seed = _checks.check_seed("seed", seed)
        self.monitor = None if monitor is None else _checks.check_str("monitor", monitor)
        if self.monitor is not None and self.monitor.startswith("val_") and (
                validation_data is None):
            raise ValueError(
                f"validation_data=None: each member's ticket is its best epoch by "
                f"monitor={monitor!r}, which needs validation data (or pass monitor='accuracy', "
                "or None for the last epoch).")
        self.batch_size = _checks.check_positive_int("batch_size", batch_size, allow_none=True)
        if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
            raise TypeError(f"strategy must be a tf.distribute.Strategy or None; got "
                            f"{type(strategy).__name__}.")
        self.strategy = strategy or tf.distribute.get_strategy()
        if distribute.is_multi_worker(self.strategy):
            distribute.install_multiworker_fix()  # Keras's fit needs it there (distribute doc)
        if not callable(callbacks):
            callbacks = list(callbacks or ())
            for callback in callbacks:
                if not isinstance(callback, keras.callbacks.Callback):
                    raise TypeError(f"callbacks must hold keras.callbacks.Callback objects (or be "
                                    f"a callable name -> list); got {type(callback).__name__}.")
        self.callbacks = callbacks
        if fit_kwargs is not None and not isinstance(fit_kwargs, dict):
            raise TypeError(f"fit_kwargs must be a dict or None; got {type(fit_kwargs).__name__}.")
        self.fit_kwargs = dict(fit_kwargs or {})
        for key in ("x", "y", "epochs", "validation_data", "callbacks"):
            if key in self.fit_kwargs:
                raise ValueError(f"fit_kwargs sets {key!r}, which the recipe sets itself.")
        self.metadata = _checks.check_metadata("metadata", metadata,
                                               reserved=_RESERVED_METADATA)
        self.overwrite = _checks.check_bool("overwrite", overwrite)
        self.chief = distribute.is_chief(self.strategy)
        self.fit_seconds = []
        self.steps = 0

    def prepare(self):
        tickets.prepare_ticket_dir(self.ticket_dir, overwrite=self.overwrite)

    def build(self, member_seed, sparse=None):
        """A new model from ``build_fn`` (sparsified with ``sparse = (S, distribution,
        keep_dense)``), compiled, inside the strategy's scope."""
        keras.utils.set_random_seed(member_seed)
        with self.strategy.scope():
            model = self.build_fn()
            if not isinstance(model, keras.Model):
                raise TypeError(f"build_fn returned {type(model).__name__}; expected a "
                                "keras.Model.")
            if sparse is not None:
                sparsity, distribution, keep_dense = sparse
                model = sparsify(model, sparsity, distribution=distribution,
                                              keep_dense=keep_dense, seed=member_seed)
            self.compile_fn(model)
        return model

    def member_metadata(self, member, member_seed, **extra):
        return dict(self.metadata, member=member, seed=member_seed, num_members=self.num_members,
                    **extra)

    def callbacks_for(self, name):
        if callable(self.callbacks):
            return list(self.callbacks(name) or ())
        return list(self.callbacks)

    def _input(self, data_seed):
        data = self.train_data
        if callable(data) and not isinstance(data, tf.data.Dataset):
            data = data(data_seed)
        kwargs = dict(self.fit_kwargs)
        if isinstance(data, (tuple, list)) and len(data) == 2:
            given = kwargs.pop("batch_size", None)
            if self.batch_size and given and given != self.batch_size:
                raise ValueError(f"batch_size={self.batch_size} and fit_kwargs['batch_size']="
                                 f"{given} differ.")
            batch = self.batch_size or given or 32
            kwargs["batch_size"] = batch
            kwargs["y"] = data[1]
            return data[0], kwargs, batch
        if isinstance(data, tf.data.Dataset):
            kwargs.setdefault("shuffle", False)  # a dataset brings its own order
            return data, kwargs, self.batch_size or _dataset_batch_size(data)
        raise TypeError(_TRAIN_DATA_TYPES + f"; got {type(data).__name__} from the callable.")

    def fit(self, model, data_seed, epochs, callbacks, name, cost_at_epochs=None):
        """Fits ``model`` with ``callbacks`` (at most one `SparseTraining` callback among them)
        and costs the fit from what it ran (`training_cost.fit_macs`).

        Returns:
            A `_Fit`; its ``macs`` holds the cost spent by the end of each epoch count in
            ``cost_at_epochs`` (default: the whole fit).
        """
        x, kwargs, batch = self._input(data_seed)
        before = int(model.optimizer.iterations.numpy())
        logging.info("%s: fit %s for %d epochs", self.method, name, epochs)
        start = time.time()
        model.fit(x, epochs=epochs, validation_data=self.validation_data,
                  callbacks=list(callbacks) + self.callbacks_for(name), **kwargs)
        self.fit_seconds.append(time.time() - start)
        steps = int(model.optimizer.iterations.numpy()) - before
        self.steps += steps
        sparsity = [c for c in callbacks if isinstance(c, SparseTraining)]
        sparsity = sparsity[0] if sparsity else None
        if cost_at_epochs is None:
            return _Fit(steps, batch, [training_cost.fit_macs(model, sparsity, steps, batch)])
        if steps % epochs:
            raise RuntimeError(f"{steps} optimizer steps in {epochs} epochs: the epochs were not "
                               "all of the same length, so the fit cannot be costed per epoch.")
        per_epoch = steps // epochs
        macs = training_cost.fit_macs(model, sparsity, steps, batch, steps_per_epoch=per_epoch,
                                      at=[e * per_epoch for e in cost_at_epochs])
        return _Fit(steps, batch, macs)

    def checkpoint(self, ticket_dir, index, method, metadata):
        """A TicketCheckpoint for one member (None when ``monitor`` is None)."""
        if self.monitor is None:
            return None
        return TicketCheckpoint(ticket_dir, index, monitor=self.monitor, method=method,
                                metadata=metadata, overwrite=True)

    def ticket(self, model, checkpoint, ticket_dir, index, method, metadata, epochs, steps):
        """The member's ticket path, after its fit (written here when ``monitor`` is None)."""
        path = os.path.join(ticket_dir, f"ticket_{index}")
        if not self.chief:
            return path  # the chief writes it
        if checkpoint is not None:
            if checkpoint.path is None:
                raise RuntimeError(f"member {index} wrote no ticket (no {self.monitor!r} value "
                                   "seen).")
            return checkpoint.path
        meta = dict(metadata, method=method, epoch=epochs - 1, step=steps)
        return tickets.write_ticket(model, ticket_dir, index, meta, overwrite=True)

    def result(self, paths, member_seeds, member_macs, batch, reference_steps, model, **extra):
        return RecipeResult(
            method=self.method,
            ticket_dir=self.ticket_dir,
            tickets=tuple(paths),
            member_seeds=tuple(int(s) for s in member_seeds),
            wall_time_s=float(sum(self.fit_seconds)),
            fit_wall_time_s=tuple(float(s) for s in self.fit_seconds),
            member_training_macs=tuple(int(m) for m in member_macs),
            batch_size=int(batch),
            steps=int(self.steps),
            reference_steps=int(reference_steps),
            dense_training_macs=int(training_cost.training_macs(
                model, reference_steps, batch, sparse=False)),
            extra=extra,
        )


def _dataset_batch_size(data):
    """The batch size of a dataset of batches: its static batch dimension, else the size of its
    first batch (reading it once)."""
    first = tf.nest.flatten(data.element_spec)[0]
    if first.shape.rank and first.shape[0] is not None:
        return int(first.shape[0])
    for batch in data.take(1):
        size = int(tf.shape(tf.nest.flatten(batch)[0])[0])
        logging.info("batch size %d read from the first training batch (pass batch_size= to "
                     "skip this)", size)
        return size
    raise ValueError("the training dataset is empty.")


def _independent(common, epochs, sparse=None, dst_kwargs=None):
    """Independent members (dense, deep, DST and static sparse ensembles), one ticket each.

    ``sparse``: None (dense) or (S, distribution, keep_dense); ``dst_kwargs``: None (masks fixed)
    or the `DynamicSparsity` arguments.
    """
    epochs = _checks.check_positive_int("epochs", epochs)
    common.prepare()
    paths, seeds, costs = [], [], []
    reference = batch = first = None
    for member in range(common.num_members):
        member_seed = common.seed + member
        model = common.build(member_seed, sparse)
        extra = {} if sparse is None else {"sparsity": sparse[0]}
        metadata = common.member_metadata(member, member_seed, **extra)
        checkpoint = common.checkpoint(common.ticket_dir, member, common.method, metadata)
        callbacks = []
        if sparse is not None:
            callbacks.append(DynamicSparsity(seed=member_seed, **dst_kwargs)
                             if dst_kwargs is not None else StaticSparsity())
        callbacks += [c for c in (checkpoint,) if c is not None]
        run = common.fit(model, member_seed, epochs, callbacks, f"member_{member}")
        batch = run.batch
        paths.append(common.ticket(model, checkpoint, common.ticket_dir, member, common.method,
                                   metadata, epochs, run.steps))
        seeds.append(member_seed)
        costs.append(run.macs[0])
        if reference is None:
            reference, first = run.steps, model
        logging.info("%s: member %d/%d (seed %d) done in %.1f s", common.method, member + 1,
                     common.num_members, member_seed, common.fit_seconds[-1])
    return common.result(paths, seeds, costs, batch, reference, first)


# ----------------------------------------------------------------------------------- recipes
def train_dense(build_fn, train_data, *, validation_data, epochs, ticket_dir,
                compile_fn=default_compile, seed=0, monitor="val_accuracy", batch_size=None,
                strategy=None, callbacks=(), fit_kwargs=None, metadata=None, overwrite=False):
    """One dense model; its best epoch by ``monitor`` is ``ticket_dir/ticket_0``.

    Args: see the module doc; ``epochs``: training epochs.

    Returns:
        A `RecipeResult` (``method="dense"``).
    """
    common = _Common("dense", locals())
    return _independent(common, epochs)


def train_deep_ensemble(build_fn, num_members, train_data, *, validation_data, epochs,
                        ticket_dir, compile_fn=default_compile, seed=0, monitor="val_accuracy",
                        batch_size=None, strategy=None, callbacks=(), fit_kwargs=None,
                        metadata=None, overwrite=False):
    """A deep ensemble: ``num_members`` dense models, member m with seed ``seed + m``.

    Member 0 is the model `train_dense` trains with the same arguments.

    Returns:
        A `RecipeResult` (``method="deep_ensemble"``).
    """
    common = _Common("deep_ensemble", locals())
    return _independent(common, epochs)


def train_dst_ensemble(build_fn, num_members, train_data, *, validation_data, epochs, ticket_dir,
                       sparsity=0.8, distribution="erk", keep_dense=(),
                       compile_fn=default_compile, seed=0, monitor="val_accuracy",
                       dst_kwargs=None, batch_size=None, strategy=None, callbacks=(),
                       fit_kwargs=None, metadata=None, overwrite=False):
    """A DST Ensemble: ``num_members`` independent dynamic-sparse-training runs.

    Member m uses seed ``seed + m`` for its initial weights, its initial masks (`sparsify`), its
    random growth (`DynamicSparsity`) and its data order; its best epoch by ``monitor`` becomes
    ``ticket_dir/ticket_<m>/``.

    Args:
        sparsity, distribution, keep_dense: see `ft_keras.sparsify`.
        dst_kwargs: `DynamicSparsity` arguments (its ``seed`` is set per member).
        (the others: see the module doc)

    Returns:
        A `RecipeResult` (``method="dst_ensemble"``); each member is charged its own run.
    """
    common = _Common("dst_ensemble", locals())
    sparse = _check_sparse(sparsity, distribution, keep_dense)
    dst_kwargs = _dst_kwargs(dst_kwargs)
    DynamicSparsity(**dst_kwargs)  # refuses bad arguments before anything is built
    return _independent(common, epochs, sparse, dst_kwargs)


def train_static_sparse_ensemble(build_fn, num_members, train_data, *, validation_data, epochs,
                                 ticket_dir, sparsity=0.8, distribution="erk", keep_dense=(),
                                 compile_fn=default_compile, seed=0, monitor="val_accuracy",
                                 batch_size=None, strategy=None, callbacks=(), fit_kwargs=None,
                                 metadata=None, overwrite=False):
    """``num_members`` sparse models whose random masks stay fixed (`StaticSparsity`).

    Member m draws its weights and masks with seed ``seed + m``.

    Returns:
        A `RecipeResult` (``method="static_sparse_ensemble"``); each member is charged its
        own run.
    """
    common = _Common("static_sparse_ensemble", locals())
    return _independent(common, epochs, _check_sparse(sparsity, distribution, keep_dense))


def _dst_kwargs(dst_kwargs, defaults=None):
    if dst_kwargs is not None and not isinstance(dst_kwargs, dict):
        raise TypeError(f"dst_kwargs must be a dict or None; got {type(dst_kwargs).__name__}.")
    out = dict(defaults or {})
    out.update(dst_kwargs or {})
    out.pop("seed", None)
    return out


def _check_plan(exploration_epochs, refine_epochs, num_members):
    exploration_epochs = _checks.check_int("exploration_epochs", exploration_epochs, minimum=0)
    refine_epochs = _checks.check_positive_int("refine_epochs", refine_epochs)
    return schedules.edst_plan(exploration_epochs, refine_epochs, num_members)


def _check_learning_rates(exploration_lr, refine_lr, allow_none=False):
    exploration_lr = _checks.check_real("exploration_lr", exploration_lr, low=0.0, low_open=True,
                                        allow_none=allow_none)
    if isinstance(refine_lr, (str, bytes)) or not hasattr(refine_lr, "__len__") or len(
            refine_lr) != 2:
        raise TypeError(f"refine_lr must be two learning rates, e.g. (0.01, 0.001); got "
                        f"{refine_lr!r}.")
    refine_lr = tuple(_checks.check_real(f"refine_lr[{i}]", v, low=0.0, low_open=True)
                      for i, v in enumerate(refine_lr))
    return exploration_lr, refine_lr


def train_edst(build_fn, num_members, train_data, *, validation_data, exploration_epochs,
               refine_epochs, ticket_dir, sparsity=0.8, distribution="erk", keep_dense=(),
               compile_fn=default_compile, seed=0, monitor="val_accuracy", exploration_lr=0.1,
               refine_lr=(0.01, 0.001), explore_fraction=0.8, dst_kwargs=None, batch_size=None,
               strategy=None, callbacks=(), fit_kwargs=None, metadata=None, overwrite=False):
    """An EDST Ensemble: ``num_members`` tickets from ONE sparse run (`ft_keras.FreeTickets`).

    ``exploration_epochs`` of DST at ``exploration_lr``, then ``num_members`` refinement phases
    of ``refine_epochs`` (``refine_lr[0]``, then ``refine_lr[1]`` from the middle of the phase),
    with a global exploration (drop fraction ``explore_fraction``) before phases 2..M; the best
    epoch of refinement phase i by ``monitor`` is ``ticket_dir/ticket_<i-1>/``. ``compile_fn``
    must compile with a constant (float) learning rate: FreeTickets sets it every epoch.

    Args:
        dst_kwargs: more `FreeTickets` / `DynamicSparsity` arguments (``update_every``,
            ``grow``, ``log_dir``, ...); FreeTickets' defaults otherwise.
        (the others: see the module doc; ``monitor`` may not be None)

    Returns:
        A `RecipeResult` (``method="edst"``); ticket i is charged the steps of its refinement
        phase (ticket 0 also the exploration).
    """
    common = _Common("edst", locals())
    if common.monitor is None:
        raise ValueError("monitor=None: EDST's tickets are the best epoch of each refinement "
                         "phase; give the epoch log to select them by (e.g. 'val_accuracy').")
    sparse = _check_sparse(sparsity, distribution, keep_dense)
    plan = _check_plan(exploration_epochs, refine_epochs, common.num_members)
    exploration_lr, refine_lr = _check_learning_rates(exploration_lr, refine_lr)
    explore_fraction = _checks.check_fraction("explore_fraction", explore_fraction)
    dst_kwargs = _dst_kwargs(dst_kwargs)
    clash = sorted(set(dst_kwargs) & set(_EDST_ARGUMENTS))
    if clash:
        raise ValueError(f"dst_kwargs sets {clash}, which train_edst sets from its own arguments "
                         "(num_members, exploration_epochs, refine_epochs, ...).")
    free_tickets = FreeTickets(  # before anything is written or built: checks dst_kwargs
        common.ticket_dir, num_tickets=common.num_members, exploration_epochs=exploration_epochs,
        refine_epochs=refine_epochs, explore_fraction=explore_fraction, monitor=common.monitor,
        exploration_lr=exploration_lr, refine_lr=refine_lr, overwrite=True, seed=common.seed,
        metadata=dict(common.metadata, sparsity=sparse[0]), **dst_kwargs)
    common.prepare()
    model = common.build(common.seed, sparse)
    windows = [p.end_epoch for p in plan if p.kind == "refinement"]
    run = common.fit(model, common.seed, schedules.plan_epochs(plan), [free_tickets], "edst",
                     cost_at_epochs=windows)
    paths = list(free_tickets.tickets) if common.chief else [
        os.path.join(common.ticket_dir, f"ticket_{i}") for i in range(common.num_members)]
    if len(paths) != common.num_members:
        raise RuntimeError(f"EDST wrote {len(paths)} tickets, expected {common.num_members}.")
    return common.result(paths, [common.seed] * common.num_members, _marginal(run.macs),
                         run.batch, run.steps, model)


def _marginal(cumulative):
    return [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])]


class _WindowCheckpoint(keras.callbacks.Callback):
    """Runs a `TicketCheckpoint` over the epochs ``[start, end)`` of a longer fit, as if that
    window were a fit of its own: the window's best epoch (by the checkpoint's monitor) is written
    after its last epoch. With ``checkpoint=None`` the state after the window's last epoch is
    written (``write(model, epoch)``)."""

    def __init__(self, checkpoint, start, end, write=None):
        super().__init__()
        self.checkpoint = checkpoint
        self.start, self.end = start, end
        self.write = write
        self.path = None
        self._open = False

    def set_model(self, model):
        super().set_model(model)
        if self.checkpoint is not None:
            self.checkpoint.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        if self.checkpoint is not None:
            self.checkpoint.set_params(params)

    def on_epoch_begin(self, epoch, logs=None):
        if not self.start <= epoch < self.end or self.checkpoint is None:
            return
        if not self._open:  # the window begins (or a resumed fit starts inside it)
            self.checkpoint.on_train_begin()
            self._open = True
        self.checkpoint.on_epoch_begin(epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        if not self.start <= epoch < self.end:
            return
        if self.checkpoint is not None:
            self.checkpoint.on_epoch_end(epoch, logs)
            if epoch == self.end - 1:
                self.checkpoint.on_train_end(logs)
                self.path = self.checkpoint.path
                self._open = False
        elif epoch == self.end - 1:
            self.path = self.write(self.model, epoch)


def train_checkpoint_ensemble(build_fn, num_members, train_data, *, validation_data,
                              exploration_epochs, refine_epochs, ticket_dir, sparsity=0.8,
                              distribution="erk", keep_dense=(), compile_fn=default_compile,
                              seed=0, monitor="val_accuracy", exploration_lr=0.1,
                              refine_lr=(0.01, 0.001), dst_kwargs=None, batch_size=None,
                              strategy=None, callbacks=(), fit_kwargs=None, metadata=None,
                              overwrite=False):
    """A checkpoint ensemble: ``num_members`` snapshots of ONE DST run, the baseline that EDST's
    ticket diversity is measured against.

    The run is EDST's (`train_edst` with the same arguments) without the global explorations:
    the same sparse start (seed ``seed``), the same epoch plan, the same learning rates
    (``exploration_lr``, then ``refine_lr`` in every refinement window; ``exploration_lr=None``
    keeps the compiled optimizer's learning rate, e.g. a cosine schedule), the same regular DST
    updates (`DynamicSparsity` with FreeTickets' drop fraction 0.5 annealed to 0.005 unless
    ``dst_kwargs`` says otherwise). Snapshot i is the best epoch by ``monitor`` inside the window
    of EDST's refinement phase i (``monitor=None``: the window's last epoch).

    Returns:
        A `RecipeResult` (``method="checkpoint_ensemble"``); snapshot i is charged the steps of
        its window.
    """
    common = _Common("checkpoint_ensemble", locals())
    sparse = _check_sparse(sparsity, distribution, keep_dense)
    plan = _check_plan(exploration_epochs, refine_epochs, common.num_members)
    exploration_lr, refine_lr = _check_learning_rates(exploration_lr, refine_lr, allow_none=True)
    dynamic = DynamicSparsity(seed=common.seed, **_dst_kwargs(dst_kwargs, _EDST_DST_DEFAULTS))
    common.prepare()
    model = common.build(common.seed, sparse)
    callbacks = [dynamic]
    if exploration_lr is not None:
        callbacks.append(keras.callbacks.LearningRateScheduler(
            lambda epoch, _: schedules.edst_learning_rate(plan, epoch, exploration_lr,
                                                          refine_lr)))
    windows = []
    for phase in (p for p in plan if p.kind == "refinement"):
        index = phase.index - 1
        meta = common.member_metadata(index, common.seed, sparsity=sparse[0],
                                      phase=phase.index)
        checkpoint = common.checkpoint(common.ticket_dir, index, common.method, meta)

        def write(snapshot, epoch, index=index, meta=meta):
            if not common.chief:
                return None
            step = int(snapshot.optimizer.iterations.numpy())
            return tickets.write_ticket(snapshot, common.ticket_dir, index,
                                        dict(meta, method=common.method, epoch=epoch, step=step),
                                        overwrite=True)

        windows.append(_WindowCheckpoint(checkpoint, phase.start_epoch, phase.end_epoch, write))
    run = common.fit(model, common.seed, schedules.plan_epochs(plan), callbacks + windows,
                     "checkpoint_ensemble", cost_at_epochs=[w.end for w in windows])
    paths = []
    for index, window in enumerate(windows):
        if common.chief and window.path is None:
            raise RuntimeError(f"snapshot {index} was not written (no {common.monitor!r} value "
                               "seen in its window).")
        paths.append(window.path or os.path.join(common.ticket_dir, f"ticket_{index}"))
    return common.result(paths, [common.seed] * common.num_members, _marginal(run.macs),
                         run.batch, run.steps, model)


def train_pf_ensemble(build_fn, num_members, train_data, *, validation_data, dense_epochs,
                      finetune_epochs, ticket_dir, sparsity=0.8, keep_dense=(),
                      compile_fn=default_compile, finetune_compile_fn=None, seed=0,
                      monitor="val_accuracy", dense_dir=None, batch_size=None, strategy=None,
                      callbacks=(), fit_kwargs=None, metadata=None, overwrite=False):
    """A prune-and-fine-tune (PF) ensemble.

    One dense model (seed ``seed``) is trained for ``dense_epochs``; its best epoch by
    ``monitor`` (kept as ``dense_dir/ticket_0`` when ``dense_dir`` is given, else in a temporary
    folder) is pruned by global magnitude to ``sparsity`` (`prune_global_magnitude`) and
    fine-tuned ``num_members`` times for ``finetune_epochs`` with the mask fixed
    (`StaticSparsity`), member m with seed ``seed + 1 + m`` (its data order). All members share
    the mask; their best epochs are the tickets.

    Args:
        compile_fn: compiles the dense model.
        finetune_compile_fn: compiles each pruned member (default: ``compile_fn``).
        dense_dir: where the dense model's ticket is kept (None: not kept).
        (the others: see the module doc)

    Returns:
        A `RecipeResult` (``method="pf_ensemble"``, ``extra["dense_ticket"]``); the dense run is
        charged to member 0.

    Raises:
        ValueError: under a multi-worker strategy (the members start from the dense ticket that
            only the chief writes).
    """
    common = _Common("pf_ensemble", locals())
    if distribute.is_multi_worker(common.strategy):
        raise ValueError("train_pf_ensemble does not support a multi-worker strategy: its "
                         "members start from the dense ticket that only the chief writes.")
    sparsity = _checks.check_real("sparsity", sparsity, low=0.0, high=1.0, low_open=True,
                                  high_open=True)
    keep_dense = _checks.check_names("keep_dense", keep_dense)
    dense_epochs = _checks.check_positive_int("dense_epochs", dense_epochs)
    finetune_epochs = _checks.check_positive_int("finetune_epochs", finetune_epochs)
    finetune_compile_fn = _checks.check_callable(
        "finetune_compile_fn", finetune_compile_fn or common.compile_fn,
        "a callable that compiles a model")
    dense_dir = _checks.check_path("dense_dir", dense_dir, allow_none=True)
    common.prepare()
    keep = dense_dir is not None
    parent_dir = dense_dir if keep else tempfile.mkdtemp(prefix="ftk_pf_dense_")
    try:
        tickets.prepare_ticket_dir(parent_dir, overwrite=True)
        dense = common.build(common.seed)
        metadata = common.member_metadata(0, common.seed)
        checkpoint = common.checkpoint(parent_dir, 0, "pf_dense", metadata)
        dense_run = common.fit(dense, common.seed, dense_epochs,
                               [c for c in (checkpoint,) if c is not None], "pf_dense")
        parent = common.ticket(dense, checkpoint, parent_dir, 0, "pf_dense", metadata,
                               dense_epochs, dense_run.steps)
        best, _ = tickets.read_ticket(parent)  # the selected dense state
        paths, seeds, finetune = [], [], []
        pruned = None
        for member in range(common.num_members):
            member_seed = common.seed + 1 + member
            keras.utils.set_random_seed(member_seed)
            with common.strategy.scope():
                model = prune_global_magnitude(best, sparsity, keep_dense, member_seed)
                finetune_compile_fn(model)
            if pruned is None:
                pruned = model
            meta = common.member_metadata(member, member_seed, sparsity=sparsity)
            member_checkpoint = common.checkpoint(common.ticket_dir, member, common.method, meta)
            run = common.fit(
                model, member_seed, finetune_epochs,
                [StaticSparsity()] + [c for c in (member_checkpoint,) if c is not None],
                f"member_{member}")
            paths.append(common.ticket(model, member_checkpoint, common.ticket_dir, member,
                                       common.method, meta, finetune_epochs, run.steps))
            seeds.append(member_seed)
            finetune.append(run.macs[0])
        costs = [dense_run.macs[0] + finetune[0]] + finetune[1:]
        return common.result(paths, seeds, costs, run.batch, dense_run.steps, pruned,
                             dense_ticket=parent if keep else None)
    finally:
        if not keep:
            shutil.rmtree(parent_dir, ignore_errors=True)


RECIPES = {
    "dense": train_dense,
    "deep_ensemble": train_deep_ensemble,
    "dst_ensemble": train_dst_ensemble,
    "edst": train_edst,
    "static_sparse_ensemble": train_static_sparse_ensemble,
    "pf_ensemble": train_pf_ensemble,
    "checkpoint_ensemble": train_checkpoint_ensemble,
}
"""The recipe of each method name."""
