"""Trains a FreeTickets ensemble (or a baseline) and writes its members as tickets.

Every method writes its members to ``<output_dir>/tickets/ticket_<i>/`` (the layout of
`ft_keras.write_ticket`, so ``ftk.Ensemble.from_directory`` and ``examples/evaluate.py`` load them
all the same way), ``<output_dir>/train_summary.json`` (members, best validation accuracy, wall
time, training cost in multiply-accumulates, active parameters) and TensorBoard logs under
``<output_dir>/tensorboard/``.

Methods (SPEC.md sections 4-6):

* ``dense``: one dense model; its best-validation epoch is the only ticket.
* ``deep_ensemble``: ``num_members`` dense models, seeds ``seed + m``.
* ``dst_ensemble``: ``num_members`` independent DST runs (``ftk.train_dst_ensemble``).
* ``edst``: ONE sparse run with ``ftk.FreeTickets``: ``exploration_epochs`` at
  ``learning_rate``, then ``num_members`` refinement phases of ``refine_epochs`` (``refine_lr``),
  the best-validation epoch of each phase is a ticket.
* ``static_sparse_ensemble``: ``num_members`` sparse models with random fixed masks
  (``ftk.StaticSparsity``), seeds ``seed + m``.
* ``pf_ensemble``: one dense model trained for ``pf_dense_epochs``; its best-validation state
  (kept in ``<output_dir>/pf_dense/ticket_0``) is pruned by global magnitude to ``sparsity`` and
  fine-tuned ``num_members`` times with the mask fixed, at ``pf_finetune_lr``, each member with its
  own seed and data order.

The last ``validation_fraction`` of the training split is held out to select tickets (with 0 the
training accuracy selects them). Training cost follows ``ft_keras.flops`` (MACs; FLOPs = 2 x MACs)
and counts every step at the full batch size (training batches drop the remainder).

    python examples/train.py --method=edst --output_dir=/tmp/ftk/edst
    python examples/train.py --method=dst_ensemble --num_members=3 --epochs=20 \\
        --output_dir=/tmp/ftk/dst
    python examples/train.py --method=pf_ensemble --pf_dense_epochs=20 --pf_finetune_epochs=5 \\
        --output_dir=/tmp/ftk/pf
    python examples/train.py --method=dense --dataset=cifar10 --model=resnet20 \\
        --strategy=mirrored --output_dir=/tmp/ftk/dense_c10
    python examples/evaluate.py --ticket_dir=/tmp/ftk/edst/tickets \\
        --train_summary=/tmp/ftk/edst/train_summary.json --output_dir=/tmp/ftk/edst/eval
"""

import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import ft_keras as ftk  # noqa: E402
from ft_keras.sparsify import walk_layers  # noqa: E402

METHODS = ("dense", "deep_ensemble", "dst_ensemble", "edst", "static_sparse_ensemble",
           "pf_ensemble")
SPARSE_METHODS = ("dst_ensemble", "edst", "static_sparse_ensemble", "pf_ensemble")
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3}

FLAGS = flags.FLAGS
flags.DEFINE_enum("method", "edst", METHODS, "What to train (see the module doc).")
flags.DEFINE_enum("dataset", "fashion_mnist", list(ftk.data.DATASET_NAMES), "Data set.")
flags.DEFINE_string("model", "lenet_300_100",
                    f"Architecture, a name of ftk.models.get: {', '.join(ftk.models.available())}.")
flags.DEFINE_float("sparsity", 0.8, "Sparsity S of the sparse methods (ignored by dense and "
                   "deep_ensemble).")
flags.DEFINE_enum("distribution", "erk", ["erk", "er", "uniform"],
                  "Initial layer densities (dst_ensemble, edst, static_sparse_ensemble; "
                  "pf_ensemble prunes by global magnitude instead).")
flags.DEFINE_list("keep_dense", [], "Prunable layers to keep dense, e.g. conv1.")
flags.DEFINE_enum("grow", "gradient", ["gradient", "random", "momentum"],
                  "DST growth: gradient (RigL), random (SET), momentum (SNFS).")
flags.DEFINE_integer("update_every", 100, "Optimizer steps between DST mask updates.")
flags.DEFINE_float("drop_fraction", 0.5,
                   "Initial DST drop fraction, cosine-annealed to 0.005 (FreeTickets).")
flags.DEFINE_float("explore_fraction", 0.8, "EDST: global exploration drop fraction q.")
flags.DEFINE_integer("num_members", 3, "Members M of the ensemble (EDST: tickets).")
flags.DEFINE_integer("epochs", 20, "Epochs per member (dense, deep_ensemble, dst_ensemble, "
                     "static_sparse_ensemble).")
flags.DEFINE_integer("exploration_epochs", 8, "EDST: epochs of the exploration phase.")
flags.DEFINE_integer("refine_epochs", 4, "EDST: epochs of each refinement phase.")
flags.DEFINE_list("refine_lr", ["0.01", "0.001"],
                  "EDST: learning rates of the first and second half of a refinement phase.")
flags.DEFINE_integer("pf_dense_epochs", 20, "pf_ensemble: epochs of the dense model.")
flags.DEFINE_integer("pf_finetune_epochs", 5, "pf_ensemble: fine-tuning epochs per member.")
flags.DEFINE_float("pf_finetune_lr", 0.001, "pf_ensemble: constant fine-tuning learning rate.")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adam"], "sgd (momentum 0.9) or adam.")
flags.DEFINE_float("learning_rate", None,
                   "Peak learning rate (EDST: the exploration learning rate). Default: 0.05 for "
                   "sgd, 0.001 for adam.")
flags.DEFINE_enum("lr_schedule", "cosine", ["cosine", "step", "constant"],
                  "Learning-rate schedule of the runs that are not EDST or PF fine-tuning: cosine "
                  "decay to 0, step (divided by 10 at 50% and 75% of training, the paper's) or "
                  "constant.")
flags.DEFINE_float("weight_decay", 0.0, "Decoupled weight decay of the optimizer (0: none).")
flags.DEFINE_integer("seed", 0, "Base seed: member m uses seed + m (weights, masks, data order).")
flags.DEFINE_string("output_dir", None,
                    "Where tickets, train_summary.json and TensorBoard logs go.")
flags.DEFINE_bool("overwrite", False, "Replace the tickets of an earlier run in output_dir.")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multiworker"],
                  "tf.distribute strategy: default (one device), mirrored (all local GPUs) or "
                  "multiworker (MultiWorkerMirroredStrategy; set TF_CONFIG on every host, see "
                  "the README's 'Training on several machines').")
flags.DEFINE_integer("steps_per_execution", 1,
                     "Keras steps_per_execution; must be 1 with --strategy=mirrored or multiworker.")
flags.DEFINE_float("validation_fraction", 0.1,
                   "Fraction at the end of the training split held out to select tickets.")
flags.DEFINE_integer("train_examples", 0,
                     "Use only the first N examples of the training split (0: all).")
flags.DEFINE_string("data_dir", None, "Where to look for the data (see ft_keras.data.load).")
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
flags.DEFINE_integer("keras_verbose", 1, "Keras fit verbosity: 0 silent, 1 progress bar, "
                     "2 one line per epoch.")
flags.mark_flag_as_required("output_dir")

flags.register_validator("sparsity", lambda v: 0.0 <= v < 1.0, "--sparsity must be in [0, 1).")
flags.register_validator("validation_fraction", lambda v: 0.0 <= v < 1.0,
                         "--validation_fraction must be in [0, 1).")
flags.register_validator("drop_fraction", lambda v: 0.005 <= v <= 1.0,
                         "--drop_fraction must be in [0.005, 1] (it is annealed to 0.005).")
flags.register_validator("explore_fraction", lambda v: 0.0 < v <= 1.0,
                         "--explore_fraction must be in (0, 1].")
for _name in ("num_members", "epochs", "refine_epochs", "pf_dense_epochs",
              "pf_finetune_epochs", "batch_size", "update_every", "steps_per_execution"):
    flags.register_validator(_name, lambda v: v >= 1, f"--{_name} must be an integer >= 1.")
flags.register_validator("exploration_epochs", lambda v: v >= 0,
                         "--exploration_epochs must be an integer >= 0.")
flags.register_validator("train_examples", lambda v: v >= 0,
                         "--train_examples must be >= 0 (0: the whole training split).")
flags.register_validator("learning_rate", lambda v: v is None or v > 0,
                         "--learning_rate must be > 0.")
flags.register_validator("pf_finetune_lr", lambda v: v > 0, "--pf_finetune_lr must be > 0.")
flags.register_validator("weight_decay", lambda v: v >= 0, "--weight_decay must be >= 0.")


def _refine_lr_ok(values):
    try:
        return len(values) == 2 and all(float(v) > 0 for v in values)
    except ValueError:
        return False


flags.register_validator("refine_lr", _refine_lr_ok,
                         "--refine_lr must be two positive numbers, e.g. 0.01,0.001.")
flags.register_validator("model", lambda v: v.strip().lower().replace("-", "_") in
                         ftk.models.available(),
                         f"--model must be one of {', '.join(ftk.models.available())}.")


@flags.multi_flags_validator(
    ["strategy", "steps_per_execution"],
    message="--steps_per_execution must be 1 with --strategy=mirrored or multiworker: stock Keras 3 "
    "fails under "
    "a tf.distribute strategy with steps_per_execution > 1 (even for a dense model). Pass "
    "--steps_per_execution=1, or use --strategy=default.",
)
def _check_strategy(values):
    return values["strategy"] == "default" or values["steps_per_execution"] == 1


# ------------------------------------------------------------------------------------- data
class Data:
    """Training and validation pipelines, and their sizes."""

    def __init__(self):
        info = ftk.data.INFO[FLAGS.dataset]
        self.input_shape = tuple(info["shape"])
        self.num_classes = int(info["num_classes"])
        split = f"train[:{FLAGS.train_examples}]" if FLAGS.train_examples else "train"
        full = ftk.data.load(FLAGS.dataset, split, data_dir=FLAGS.data_dir)
        total = int(full.cardinality())
        if total <= 0:
            raise app.UsageError(f"could not count the examples of {FLAGS.dataset}[{split}].")
        self.num_validation = int(round(FLAGS.validation_fraction * total))
        self.num_train = total - self.num_validation
        if self.num_train < FLAGS.batch_size:
            raise app.UsageError(
                f"{self.num_train} training examples (after holding out {self.num_validation} "
                f"for validation) do not fill one batch of --batch_size={FLAGS.batch_size}."
            )
        if FLAGS.validation_fraction > 0 and self.num_validation == 0:
            raise app.UsageError(
                f"--validation_fraction={FLAGS.validation_fraction} of {total} examples holds "
                "out no example; raise it or pass --validation_fraction=0."
            )
        self._train = full.take(self.num_train).cache()
        self._validation = full.skip(self.num_train).cache() if self.num_validation else None
        self.steps_per_epoch = self.num_train // FLAGS.batch_size  # the remainder is dropped
        self.monitor = "val_accuracy" if self._validation is not None else "accuracy"
        logging.info("%s: %d training and %d validation examples, %d steps per epoch",
                     FLAGS.dataset, self.num_train, self.num_validation, self.steps_per_epoch)

    def train(self, seed):
        """Training batches, shuffled with ``seed`` (a new order every epoch)."""
        ds = self._train.shuffle(self.num_train, seed=seed, reshuffle_each_iteration=True)
        ds = ftk.data.normalize(ds).batch(FLAGS.batch_size, drop_remainder=True)
        return ds.prefetch(tf.data.AUTOTUNE)

    def validation(self):
        if self._validation is None:
            return None
        return ftk.data.normalize(self._validation).batch(FLAGS.batch_size).prefetch(
            tf.data.AUTOTUNE)


# ------------------------------------------------------------------------------- training
def _learning_rate():
    return FLAGS.learning_rate or DEFAULT_LR[FLAGS.optimizer]


def _schedule(peak, steps):
    if FLAGS.lr_schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(peak, decay_steps=max(steps, 1))
    if FLAGS.lr_schedule == "step":
        boundaries = [max(steps // 2, 1), max((3 * steps) // 4, 2)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(
            boundaries, [peak, peak / 10.0, peak / 100.0])
    return peak


def _optimizer(learning_rate):
    decay = FLAGS.weight_decay or None
    if FLAGS.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, weight_decay=decay)
    return keras.optimizers.Adam(learning_rate, weight_decay=decay)


def _compile(model, learning_rate):
    model.compile(
        optimizer=_optimizer(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=FLAGS.steps_per_execution,
        jit_compile=FLAGS.jit_compile,
    )
    return model


def _build(data):
    return ftk.models.get(FLAGS.model, input_shape=data.input_shape,
                          num_classes=data.num_classes)


def _sparsify(model, seed, distribution=None):
    return ftk.sparsify(model, FLAGS.sparsity, distribution=distribution or FLAGS.distribution,
                        keep_dense=tuple(FLAGS.keep_dense), seed=seed)


def _tensorboard(name):
    return keras.callbacks.TensorBoard(os.path.join(FLAGS.output_dir, "tensorboard", name))


class _PerModelTensorBoard(keras.callbacks.TensorBoard):
    """TensorBoard that gives every new model it is attached to a folder ``<prefix><k>``
    (for `ftk.train_dst_ensemble`, which passes the same callbacks to every member's fit)."""

    def __init__(self, root, prefix):
        super().__init__(root)
        self._root, self._prefix = root, prefix
        self._last_model, self._count = None, 0

    def set_model(self, model):
        if model is not self._last_model:
            self.log_dir = os.path.join(self._root, f"{self._prefix}{self._count}")
            self._last_model = model
            self._count += 1
        super().set_model(model)


def _metadata(member, seed, **extra):
    return dict(member=member, seed=seed, num_members=FLAGS.num_members, dataset=FLAGS.dataset,
                model=FLAGS.model, **extra)


def _fit(model, data, seed, epochs, callbacks, name):
    logging.info("training %s for %d epochs", name, epochs)
    start = time.time()
    model.fit(data.train(seed), epochs=epochs, validation_data=data.validation(),
              callbacks=callbacks + [_tensorboard(name)], verbose=FLAGS.keras_verbose,
              shuffle=False)  # the data set is shuffled already
    return time.time() - start


def _train_independent(strategy, data, ticket_dir, method, sparse):
    """dense, deep_ensemble and static_sparse_ensemble: independent runs, one ticket each."""
    members = 1 if method == "dense" else FLAGS.num_members
    steps = FLAGS.epochs * data.steps_per_epoch
    times = []
    for member in range(members):
        seed = FLAGS.seed + member
        keras.utils.set_random_seed(seed)
        with strategy.scope():
            model = _build(data)
            callbacks = []
            if sparse:
                model = _sparsify(model, seed)
                callbacks.append(ftk.StaticSparsity())
            _compile(model, _schedule(_learning_rate(), steps))
        callbacks.append(ftk.TicketCheckpoint(
            ticket_dir, member, monitor=data.monitor, method=method, overwrite=True,
            metadata=_metadata(member, seed, sparsity=FLAGS.sparsity if sparse else 0.0)))
        times.append(_fit(model, data, seed, FLAGS.epochs, callbacks, f"member_{member}"))
    return times


def _train_dst_ensemble(strategy, data, ticket_dir):
    steps = FLAGS.epochs * data.steps_per_epoch
    start = time.time()
    with strategy.scope():
        ftk.train_dst_ensemble(
            lambda: _build(data),
            FLAGS.num_members,
            data.train(FLAGS.seed),
            validation_data=data.validation(),
            epochs=FLAGS.epochs,
            ticket_dir=ticket_dir,
            sparsity=FLAGS.sparsity,
            distribution=FLAGS.distribution,
            keep_dense=tuple(FLAGS.keep_dense),
            compile_fn=lambda model: _compile(model, _schedule(_learning_rate(), steps)),
            seed=FLAGS.seed,
            monitor=data.monitor,
            overwrite=True,
            dst_kwargs=dict(update_every=FLAGS.update_every, drop_fraction=FLAGS.drop_fraction,
                            final_drop_fraction=0.005, grow=FLAGS.grow),
            fit_kwargs=dict(verbose=FLAGS.keras_verbose, shuffle=False),
            callbacks=[_PerModelTensorBoard(os.path.join(FLAGS.output_dir, "tensorboard"),
                                            "member_")],
        )
    return [time.time() - start]


def _train_edst(strategy, data, ticket_dir):
    keras.utils.set_random_seed(FLAGS.seed)
    with strategy.scope():
        model = _sparsify(_build(data), FLAGS.seed)
        _compile(model, float(_learning_rate()))  # FreeTickets sets the rate every epoch
    tickets = ftk.FreeTickets(
        ticket_dir,
        num_tickets=FLAGS.num_members,
        exploration_epochs=FLAGS.exploration_epochs,
        refine_epochs=FLAGS.refine_epochs,
        explore_fraction=FLAGS.explore_fraction,
        monitor=data.monitor,
        exploration_lr=float(_learning_rate()),
        refine_lr=tuple(float(v) for v in FLAGS.refine_lr),
        overwrite=True,
        update_every=FLAGS.update_every,
        drop_fraction=FLAGS.drop_fraction,
        grow=FLAGS.grow,
        seed=FLAGS.seed,
        log_dir=os.path.join(FLAGS.output_dir, "tensorboard", "edst"),
    )
    return [_fit(model, data, FLAGS.seed, tickets.total_epochs, [tickets], "edst")], model


def global_magnitude_masks(kernels, num_active):
    """Masks keeping the ``num_active`` largest-magnitude weights over all ``kernels`` together.

    Args:
        kernels: ``{name: numpy kernel}``.
        num_active: how many weights stay, over all kernels (ties: the earlier position wins).

    Returns:
        ``{name: bool mask}`` with exactly ``num_active`` ones in total.
    """
    names = list(kernels)
    flat = np.concatenate([np.abs(kernels[n]).ravel() for n in names])
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:num_active]] = True
    masks, offset = {}, 0
    for name in names:
        size = kernels[name].size
        masks[name] = keep[offset:offset + size].reshape(kernels[name].shape)
        offset += size
    return masks


def prune_global_magnitude(dense, sparsity, keep_dense=(), seed=0):
    """A sparse copy of ``dense`` pruned by global magnitude to ``sparsity`` (SPEC.md section 6).

    ``sparsity`` is over all prunable kernels, ``keep_dense`` layers counting as dense (as in
    `ftk.sparsify`). The copy comes from ``ftk.sparsify(..., distribution="uniform")`` so that
    every prunable layer outside ``keep_dense`` is masked; its kernels are then reset to the
    dense ones and masked with the global-magnitude masks.
    """
    prunable = {layer.name: layer for layer in walk_layers(dense) if ftk.layers.is_prunable(layer)}
    sparse = ftk.sparsify(dense, sparsity, distribution="uniform", keep_dense=keep_dense,
                          seed=seed)
    targets = ftk.masked_layers(sparse)
    kernels = {layer.name: np.asarray(prunable[layer.name].kernel.numpy()) for layer in targets}
    total = sum(int(np.prod(layer.kernel.shape)) for layer in prunable.values())
    kept_dense = total - sum(k.size for k in kernels.values())
    num_active = int(round((1.0 - sparsity) * total)) - kept_dense
    if num_active < 0:
        raise app.UsageError(
            f"--sparsity={sparsity} cannot be reached with --keep_dense={list(keep_dense)}: the "
            f"dense layers alone hold {kept_dense} of {total} prunable weights.")
    masks = global_magnitude_masks(kernels, num_active)
    for layer in targets:
        layer.masked_kernel.assign(kernels[layer.name])
        layer.set_mask(masks[layer.name])
    return sparse


def _train_pf_ensemble(strategy, data, ticket_dir):
    keras.utils.set_random_seed(FLAGS.seed)
    dense_steps = FLAGS.pf_dense_epochs * data.steps_per_epoch
    with strategy.scope():
        dense = _compile(_build(data), _schedule(_learning_rate(), dense_steps))
    dense_dir = os.path.join(FLAGS.output_dir, "pf_dense")
    ftk.prepare_ticket_dir(dense_dir, overwrite=True)
    checkpoint = ftk.TicketCheckpoint(dense_dir, 0, monitor=data.monitor, method="pf_dense",
                                      overwrite=True, metadata=_metadata(0, FLAGS.seed))
    times = [_fit(dense, data, FLAGS.seed, FLAGS.pf_dense_epochs, [checkpoint], "pf_dense")]
    best, _ = ftk.read_ticket(checkpoint.path)  # the best-validation dense state
    pruned = None
    for member in range(FLAGS.num_members):
        seed = FLAGS.seed + 1 + member
        keras.utils.set_random_seed(seed)
        with strategy.scope():
            model = prune_global_magnitude(best, FLAGS.sparsity, tuple(FLAGS.keep_dense), seed)
            _compile(model, FLAGS.pf_finetune_lr)
        if pruned is None:
            pruned = model
        callbacks = [
            ftk.StaticSparsity(),
            ftk.TicketCheckpoint(ticket_dir, member, monitor=data.monitor, method="pf_ensemble",
                                 overwrite=True,
                                 metadata=_metadata(member, seed, sparsity=FLAGS.sparsity)),
        ]
        times.append(_fit(model, data, seed, FLAGS.pf_finetune_epochs, callbacks,
                          f"member_{member}"))
    return times, pruned


# ---------------------------------------------------------------------------------- costs
def _sparse_step_macs(model, batch_size, steps):
    """Training MACs of fixed-mask sparse steps: 3 x sparse forward x examples (ft_keras.flops)."""
    return 3 * ftk.flops.forward_macs(model) * batch_size * steps


def _training_costs(data, method, dense_ref, sparse_ref):
    """Training MACs of each member's part of the run, in member order (cumulated by caller)."""
    flops, batch, spe = ftk.flops, FLAGS.batch_size, data.steps_per_epoch
    members = 1 if method == "dense" else FLAGS.num_members
    steps = FLAGS.epochs * spe
    if method in ("dense", "deep_ensemble"):
        return [flops.training_macs_dense(dense_ref, steps, batch)] * members
    if method == "dst_ensemble":
        return [flops.training_macs_dst(sparse_ref, steps, batch, FLAGS.update_every,
                                        grow=FLAGS.grow)] * members
    if method == "static_sparse_ensemble":
        return [_sparse_step_macs(sparse_ref, batch, steps)] * members
    if method == "edst":
        # Ticket i exists once refinement phase i ends; the run's update steps up to then count.
        full_end = (FLAGS.exploration_epochs + members * FLAGS.refine_epochs) * spe
        cumulative = [
            flops.training_macs_edst(sparse_ref, FLAGS.exploration_epochs, FLAGS.refine_epochs, i,
                                     spe, batch, FLAGS.update_every, end_step=full_end,
                                     grow=FLAGS.grow)
            for i in range(1, members + 1)
        ]
        return [cumulative[0]] + [b - a for a, b in zip(cumulative, cumulative[1:])]
    # pf_ensemble: the dense run is paid before the first member.
    finetune = _sparse_step_macs(sparse_ref, batch, FLAGS.pf_finetune_epochs * spe)
    dense = flops.training_macs_dense(dense_ref, FLAGS.pf_dense_epochs * spe, batch)
    return [dense + finetune] + [finetune] * (members - 1)


def _reference_epochs(method):
    """Epochs of the dense run that costs are compared with: as long as one member's run."""
    if method == "edst":
        return FLAGS.exploration_epochs + FLAGS.num_members * FLAGS.refine_epochs
    if method == "pf_ensemble":
        return FLAGS.pf_dense_epochs
    return FLAGS.epochs


def _summary(data, method, ticket_dir, times, dense_ref, sparse_ref):
    paths = ftk.list_tickets(ticket_dir)
    costs = _training_costs(data, method, dense_ref, sparse_ref)
    if len(costs) != len(paths):
        raise RuntimeError(f"expected {len(costs)} tickets in {ticket_dir}, found {len(paths)}.")
    dense_forward = ftk.flops.forward_macs(dense_ref, dense=True)
    reference_epochs = _reference_epochs(method)
    reference = ftk.flops.training_macs_dense(dense_ref, reference_epochs * data.steps_per_epoch,
                                              FLAGS.batch_size)
    members, cumulative = [], 0
    for path, cost in zip(paths, costs):
        meta = ftk.tickets.read_metadata(path)
        cumulative += cost
        forward_flops = meta.get("forward_flops")
        members.append({
            "index": meta["index"],
            "ticket": os.path.relpath(path, FLAGS.output_dir),
            "seed": meta.get("seed"),
            "epoch": meta.get("epoch"),
            "phase": meta.get("phase"),
            "best_val_accuracy": meta.get("monitor_value"),
            "monitor": meta.get("monitor"),
            "density": meta.get("density"),
            "num_params": meta.get("num_params"),
            "num_active_params": meta.get("num_active_params"),
            "forward_macs": None if forward_flops is None else forward_flops // 2,
            "cumulative_training_macs": cumulative,
        })
    training = int(sum(costs))
    inference = sum(m["forward_macs"] or 0 for m in members)
    return {
        "method": method,
        "dataset": FLAGS.dataset,
        "model": FLAGS.model,
        "num_members": len(members),
        "sparsity": FLAGS.sparsity if method in SPARSE_METHODS else 0.0,
        "monitor": data.monitor,
        "members": members,
        "best_val_accuracy": [m["best_val_accuracy"] for m in members],
        "wall_time_s": float(sum(times)),
        "member_wall_time_s": [float(t) for t in times],
        "train_examples": data.num_train,
        "validation_examples": data.num_validation,
        "steps_per_epoch": data.steps_per_epoch,
        "batch_size": FLAGS.batch_size,
        "cost_unit": "multiply-accumulates, MACs (FLOPs = 2 x MACs); training MACs count every "
                     "step at the full batch size, inference MACs are per example",
        "training_macs": training,
        "training_flops": ftk.flops.macs_to_flops(training),
        "dense_reference": {
            "description": "one dense model trained as long as one member's run",
            "epochs": reference_epochs,
            "training_macs": int(reference),
            "forward_macs": int(dense_forward),
        },
        "training_macs_relative_to_dense": ftk.flops.relative_cost(training, reference),
        "inference_macs": int(inference),
        "inference_macs_relative_to_dense": ftk.flops.relative_cost(inference, dense_forward),
        "active_params": int(sum(m["num_active_params"] or 0 for m in members)),
        "active_params_per_member": [m["num_active_params"] for m in members],
        "flags": {name: FLAGS[name].value for name in _FLAG_NAMES},
        "versions": {"ft_keras": ftk.__version__, "tensorflow": tf.__version__,
                     "keras": keras.__version__, "python": platform.python_version()},
    }


_FLAG_NAMES = ("method", "dataset", "model", "sparsity", "distribution", "keep_dense", "grow",
               "update_every", "drop_fraction", "explore_fraction", "num_members", "epochs",
               "exploration_epochs", "refine_epochs", "refine_lr", "pf_dense_epochs",
               "pf_finetune_epochs", "pf_finetune_lr", "batch_size", "optimizer",
               "learning_rate", "lr_schedule", "weight_decay", "seed", "strategy",
               "steps_per_execution", "validation_fraction", "train_examples", "jit_compile")


def _strategy():
    """The tf.distribute strategy of --strategy (create it before any other TF work)."""
    if FLAGS.strategy == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    elif FLAGS.strategy == "multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        logging.info("MultiWorkerMirroredStrategy: worker %s, chief=%s, Keras fit fix %s",
                     strategy.cluster_resolver.task_id, ftk.distribute.is_chief(strategy),
                     "on" if ftk.distribute.multiworker_fix_installed() else "off")
    else:
        return tf.distribute.get_strategy()
    logging.info("%s over %d replicas", type(strategy).__name__, strategy.num_replicas_in_sync)
    return strategy


def _write_json(value, path):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    method = FLAGS.method
    if method == "pf_ensemble" and FLAGS.strategy == "multiworker":
        raise app.UsageError("--method=pf_ensemble does not support --strategy=multiworker (its "
                             "members start from the dense ticket that only the chief writes).")
    if method in SPARSE_METHODS and FLAGS.sparsity <= 0.0:
        raise app.UsageError(f"--method={method} needs --sparsity in (0, 1).")
    tf.get_logger().setLevel("WARNING")  # SavedModel writing is chatty at INFO
    strategy = _strategy()
    chief = ftk.distribute.is_chief(strategy)
    if not chief:
        # Only the chief writes tickets, summaries and TensorBoard files; the other workers
        # train in lockstep and send their own files to a throw-away folder.
        FLAGS.output_dir = ftk.distribute.worker_log_dir(FLAGS.output_dir, strategy)
        logging.info("not the chief: results are written by the chief; this worker writes "
                     "to %s", FLAGS.output_dir)
    ticket_dir = os.path.join(FLAGS.output_dir, "tickets")
    try:
        ftk.prepare_ticket_dir(ticket_dir, overwrite=FLAGS.overwrite)
    except ValueError:
        raise app.UsageError(f"{ticket_dir} already holds tickets: pass --overwrite to replace "
                             "them, or choose another --output_dir.") from None
    data = Data()

    trained = None
    if method in ("dense", "deep_ensemble", "static_sparse_ensemble"):
        times = _train_independent(strategy, data, ticket_dir, method,
                                   sparse=method == "static_sparse_ensemble")
    elif method == "dst_ensemble":
        times = _train_dst_ensemble(strategy, data, ticket_dir)
    elif method == "edst":
        times, trained = _train_edst(strategy, data, ticket_dir)
    else:
        times, trained = _train_pf_ensemble(strategy, data, ticket_dir)

    if not chief:
        logging.info("training done on this worker; the chief writes the tickets and summary")
        return

    # Cost models: the architecture dense, and its sparse version (active counts per layer do not
    # depend on the seed, nor change during training).
    dense_ref = _build(data)
    sparse_ref = trained if trained is not None else (
        _sparsify(dense_ref, FLAGS.seed) if method in SPARSE_METHODS else dense_ref)
    summary = _summary(data, method, ticket_dir, times, dense_ref, sparse_ref)
    path = os.path.join(FLAGS.output_dir, "train_summary.json")
    _write_json(summary, path)
    logging.info("%s: %d tickets in %s, best val accuracy %s, %.1f s, training %.3g MACs "
                 "(%.2fx one dense run), summary %s", method, summary["num_members"], ticket_dir,
                 [round(v, 4) for v in summary["best_val_accuracy"] if v is not None],
                 summary["wall_time_s"], summary["training_macs"],
                 summary["training_macs_relative_to_dense"], path)


if __name__ == "__main__":
    app.run(main)
