"""Trains a FreeTickets ensemble (or a baseline) and writes its members as tickets.

Every method writes its members to ``<output_dir>/tickets/ticket_<i>/`` (the layout of
`ft_keras.write_ticket`, so ``ftk.Ensemble.from_directory`` and ``examples/evaluate.py`` load them
all the same way), ``<output_dir>/train_summary.json`` (members, best validation accuracy, wall
time, training cost in multiply-accumulates, active parameters) and TensorBoard logs under
``<output_dir>/tensorboard/``.

Methods (each one recipe of ``ft_keras.recipes``; the methods are described in docs/method.md):

* ``dense``: one dense model; its best-validation epoch is the only ticket (``train_dense``).
* ``deep_ensemble``: ``num_members`` dense models, seeds ``seed + m`` (``train_deep_ensemble``).
* ``dst_ensemble``: ``num_members`` independent DST runs (``train_dst_ensemble``).
* ``edst``: ONE sparse run with ``ftk.FreeTickets``: ``exploration_epochs`` at
  ``learning_rate``, then ``num_members`` refinement phases of ``refine_epochs`` (``refine_lr``),
  the best-validation epoch of each phase is a ticket (``train_edst``).
* ``static_sparse_ensemble``: ``num_members`` sparse models with random fixed masks
  (``ftk.StaticSparsity``), seeds ``seed + m`` (``train_static_sparse_ensemble``).
* ``pf_ensemble``: one dense model trained for ``pf_dense_epochs``; its best-validation state
  (kept in ``<output_dir>/pf_dense/ticket_0``) is pruned by global magnitude to ``sparsity`` and
  fine-tuned ``num_members`` times with the mask fixed, at ``pf_finetune_lr``, each member with its
  own seed and data order (``train_pf_ensemble``).
* ``checkpoint_ensemble``: ONE DST run with EDST's epochs and learning rates but no global
  exploration; the best-validation epoch inside each of EDST's refinement windows is a ticket
  (``train_checkpoint_ensemble``).

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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import ft_keras as ftk  # noqa: E402

METHODS = ftk.recipes.METHODS
SPARSE_METHODS = ftk.recipes.SPARSE_METHODS
PLAN_METHODS = ("edst", "checkpoint_ensemble")  # one run with EDST's phase plan
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3}

FLAGS = flags.FLAGS
flags.DEFINE_enum("method", "edst", METHODS, "What to train (see the module doc).")
flags.DEFINE_enum("dataset", "fashion_mnist", list(ftk.data.DATASET_NAMES), "Data set.")
flags.DEFINE_string("model", "lenet_300_100",
                    f"Architecture, a name of ftk.models.get: {', '.join(ftk.models.available())}.")
flags.DEFINE_float("sparsity", 0.8, "Sparsity S of the sparse methods (ignored by dense and "
                   "deep_ensemble).")
flags.DEFINE_enum("distribution", "erk", ["erk", "er", "uniform"],
                  "Initial layer densities (dst_ensemble, edst, static_sparse_ensemble, "
                  "checkpoint_ensemble; pf_ensemble prunes by global magnitude instead).")
flags.DEFINE_list("keep_dense", [], "Prunable layers to keep dense, e.g. conv1.")
flags.DEFINE_enum("grow", "gradient", ["gradient", "random", "momentum"],
                  "DST growth: gradient (RigL), random (SET), momentum (SNFS).")
flags.DEFINE_integer("update_every", 100, "Optimizer steps between DST mask updates.")
flags.DEFINE_float("drop_fraction", 0.5,
                   "Initial DST drop fraction, cosine-annealed to 0.005 (FreeTickets).")
flags.DEFINE_float("channel_sparsity", 0.0,
                   "Channel-level DST (dst_ensemble, edst, checkpoint_ensemble): the fraction of "
                   "the prunable layers' units / channels removed during training (EDST: by the "
                   "end of exploration); 0: unstructured only. Served tickets are compacted.")
flags.DEFINE_enum("channel_allocation", "global", ["global", "layerwise"],
                  "How --channel_sparsity is spread over the layers: one global threshold, or the "
                  "same fraction of every layer (convolution-heavy models such as lenet5).")
flags.DEFINE_float("explore_fraction", 0.8, "EDST: global exploration drop fraction q.")
flags.DEFINE_integer("num_members", 3, "Members M of the ensemble (EDST: tickets; "
                     "checkpoint_ensemble: snapshots).")
flags.DEFINE_integer("epochs", 20, "Epochs per member (dense, deep_ensemble, dst_ensemble, "
                     "static_sparse_ensemble).")
flags.DEFINE_integer("exploration_epochs", 8, "EDST and checkpoint_ensemble: epochs of the "
                     "exploration phase.")
flags.DEFINE_integer("refine_epochs", 4, "EDST and checkpoint_ensemble: epochs of each "
                     "refinement phase.")
flags.DEFINE_list("refine_lr", ["0.01", "0.001"],
                  "EDST and checkpoint_ensemble: learning rates of the first and second half of a "
                  "refinement phase.")
flags.DEFINE_integer("pf_dense_epochs", 20, "pf_ensemble: epochs of the dense model.")
flags.DEFINE_integer("pf_finetune_epochs", 5, "pf_ensemble: fine-tuning epochs per member.")
flags.DEFINE_float("pf_finetune_lr", 0.001, "pf_ensemble: constant fine-tuning learning rate.")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adam"], "sgd (momentum 0.9) or adam.")
flags.DEFINE_float("learning_rate", None,
                   "Peak learning rate (EDST and checkpoint_ensemble: the exploration learning "
                   "rate). Default: 0.05 for sgd, 0.001 for adam.")
flags.DEFINE_enum("lr_schedule", "cosine", ["cosine", "step", "constant"],
                  "Learning-rate schedule of the runs that are not EDST, checkpoint_ensemble or PF "
                  "fine-tuning: cosine "
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
                  "docs/distributed.md, 'Several machines').")
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

    def build(self):
        """A new dense --model for this data set."""
        return ftk.models.get(FLAGS.model, input_shape=self.input_shape,
                              num_classes=self.num_classes)


# ------------------------------------------------------------------------------- training
def _learning_rate():
    return FLAGS.learning_rate or DEFAULT_LR[FLAGS.optimizer]


def _compile_fn(learning_rate, schedule="constant", epochs=None, data=None):
    """A recipe's compile_fn: --optimizer at ``learning_rate`` (decayed over ``epochs``)."""
    return ftk.recipes.make_compile_fn(
        FLAGS.optimizer, learning_rate, schedule,
        decay_steps=None if schedule == "constant" else epochs * data.steps_per_epoch,
        weight_decay=FLAGS.weight_decay or None, steps_per_execution=FLAGS.steps_per_execution,
        jit_compile=FLAGS.jit_compile)


def train(method, strategy, data, ticket_dir):
    """Runs the recipe of ``method``; returns its `ftk.recipes.RecipeResult`."""
    tensorboard = os.path.join(FLAGS.output_dir, "tensorboard")
    common = dict(
        validation_data=data.validation(), ticket_dir=ticket_dir, seed=FLAGS.seed,
        monitor=data.monitor, batch_size=FLAGS.batch_size, strategy=strategy, overwrite=True,
        callbacks=lambda name: [keras.callbacks.TensorBoard(os.path.join(tensorboard, name))],
        fit_kwargs=dict(verbose=FLAGS.keras_verbose),
    )
    metadata = {"dataset": FLAGS.dataset, "model": FLAGS.model}
    sparse = dict(sparsity=FLAGS.sparsity, keep_dense=tuple(FLAGS.keep_dense))
    dst = dict(update_every=FLAGS.update_every, drop_fraction=FLAGS.drop_fraction,
               final_drop_fraction=0.005, grow=FLAGS.grow)
    if FLAGS.channel_sparsity:
        dst["channel_sparsity"] = FLAGS.channel_sparsity
        dst["channel_allocation"] = FLAGS.channel_allocation
    epochs_lr = _compile_fn(_learning_rate(), FLAGS.lr_schedule, FLAGS.epochs, data)
    recipes = ftk.recipes
    if method == "dense":
        return recipes.train_dense(data.build, data.train, epochs=FLAGS.epochs,
                                   compile_fn=epochs_lr, metadata=metadata, **common)
    if method == "deep_ensemble":
        return recipes.train_deep_ensemble(data.build, FLAGS.num_members, data.train,
                                           epochs=FLAGS.epochs, compile_fn=epochs_lr,
                                           metadata=metadata, **common)
    if method == "dst_ensemble":
        # One pipeline for all members (it reshuffles every epoch, so each member sees its own
        # orders), as this script has always trained the DST Ensemble.
        return recipes.train_dst_ensemble(data.build, FLAGS.num_members, data.train(FLAGS.seed),
                                          epochs=FLAGS.epochs, distribution=FLAGS.distribution,
                                          compile_fn=epochs_lr, dst_kwargs=dst,
                                          metadata=metadata, **sparse, **common)
    if method == "static_sparse_ensemble":
        return recipes.train_static_sparse_ensemble(
            data.build, FLAGS.num_members, data.train, epochs=FLAGS.epochs,
            distribution=FLAGS.distribution, compile_fn=epochs_lr, metadata=metadata, **sparse,
            **common)
    plan = dict(exploration_epochs=FLAGS.exploration_epochs, refine_epochs=FLAGS.refine_epochs,
                exploration_lr=float(_learning_rate()),
                refine_lr=tuple(float(v) for v in FLAGS.refine_lr),
                distribution=FLAGS.distribution, compile_fn=_compile_fn(_learning_rate()))
    if method == "edst":
        dst["log_dir"] = os.path.join(tensorboard, "edst")  # masks' TensorBoard summaries
        return recipes.train_edst(data.build, FLAGS.num_members, data.train,
                                  explore_fraction=FLAGS.explore_fraction, dst_kwargs=dst,
                                  metadata=metadata, **plan, **sparse, **common)
    if method == "checkpoint_ensemble":
        return recipes.train_checkpoint_ensemble(data.build, FLAGS.num_members, data.train,
                                                 dst_kwargs=dst, metadata=metadata, **plan,
                                                 **sparse, **common)
    return recipes.train_pf_ensemble(
        data.build, FLAGS.num_members, data.train, dense_epochs=FLAGS.pf_dense_epochs,
        finetune_epochs=FLAGS.pf_finetune_epochs,
        compile_fn=_compile_fn(_learning_rate(), FLAGS.lr_schedule, FLAGS.pf_dense_epochs, data),
        finetune_compile_fn=_compile_fn(FLAGS.pf_finetune_lr),
        dense_dir=os.path.join(FLAGS.output_dir, "pf_dense"), metadata=metadata, **sparse,
        **common)


# ---------------------------------------------------------------------------------- summary
def _summary(data, method, result):
    """train_summary.json: the recipe's result and what the tickets' metadata say."""
    paths = ftk.list_tickets(result.ticket_dir)
    if len(paths) != result.num_members:
        raise RuntimeError(f"expected {result.num_members} tickets in {result.ticket_dir}, found "
                           f"{len(paths)}.")
    members = []
    for path, cumulative in zip(paths, result.cumulative_training_macs):
        meta = ftk.tickets.read_metadata(path)
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
    dense_forward = ftk.flops.forward_macs(data.build(), dense=True)
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
        "wall_time_s": result.wall_time_s,
        "member_wall_time_s": list(result.fit_wall_time_s),
        "train_examples": data.num_train,
        "validation_examples": data.num_validation,
        "steps_per_epoch": data.steps_per_epoch,
        "batch_size": result.batch_size,
        "cost_unit": "multiply-accumulates, MACs (FLOPs = 2 x MACs); training MACs count every "
                     "step at the full batch size, inference MACs are per example",
        "training_macs": result.training_macs,
        "training_flops": ftk.flops.macs_to_flops(result.training_macs),
        "dense_reference": {
            "description": "one dense model trained as long as one member's run",
            "epochs": result.reference_steps // data.steps_per_epoch,
            "training_macs": result.dense_training_macs,
            "forward_macs": int(dense_forward),
        },
        "training_macs_relative_to_dense": result.training_macs_relative,
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
        fixed = ftk.distribute.install_multiworker_fix()  # see ft_keras/distribute.py
        logging.info("MultiWorkerMirroredStrategy: worker %s, chief=%s, Keras fit fix %s",
                     strategy.cluster_resolver.task_id, ftk.distribute.is_chief(strategy),
                     "on" if fixed else "off")
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
    result = train(method, strategy, data, ticket_dir)
    if not chief:
        logging.info("training done on this worker; the chief writes the tickets and summary")
        return
    summary = _summary(data, method, result)
    path = os.path.join(FLAGS.output_dir, "train_summary.json")
    _write_json(summary, path)
    logging.info("%s: %d tickets in %s, best val accuracy %s, %.1f s, training %.3g MACs "
                 "(%.2fx one dense run), summary %s", method, summary["num_members"], ticket_dir,
                 [round(v, 4) for v in summary["best_val_accuracy"] if v is not None],
                 summary["wall_time_s"], summary["training_macs"],
                 summary["training_macs_relative_to_dense"], path)


if __name__ == "__main__":
    app.run(main)
