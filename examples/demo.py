"""`make demo`: LeNet-300-100 on Fashion-MNIST: dense, DST (RigL) and an EDST Ensemble (FreeTickets).

1. Trains the same architecture on the full Fashion-MNIST training set (60,000 images): dense,
   and 90% sparse with ERK layer densities and RigL prune-and-grow (`ft_keras.DynamicSparsity`),
   with the library's recipes (`ft_keras.recipes.train_dense`, `train_dst_ensemble` with one
   member); the last epoch of each is written as a ticket under --output_dir.
2. Trains an EDST Ensemble (`ft_keras.recipes.train_edst`, i.e. `ft_keras.FreeTickets`: M = 3
   tickets at 80% sparsity from ONE sparse run) on 54,000 images, selecting each ticket on the
   other 6,000, and exports the ensemble as a TF Serving SavedModel (checked by loading it back and
   calling its signature).
3. Prints the per-layer sparsity, then test accuracy and NLL (`ft_keras.evaluation.evaluate`) of
   every model, single tickets and the ensemble (mean of the tickets' softmax probabilities).

    python examples/demo.py                       # the defaults below
    python examples/demo.py --epochs=5 --sparsity=0.95 --grow=random --tensorboard_dir=/tmp/ftk_demo

TensorBoard summaries (losses, per-layer density, mask churn, drop fraction) go to --tensorboard_dir.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import ft_keras as ftk  # noqa: E402
from ft_keras.harness import evaluation  # noqa: E402
from ft_keras.harness import recipes  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("epochs", 20, "Training epochs for each model.")
flags.DEFINE_float("sparsity", 0.9, "Overall sparsity of the prunable kernels.")
flags.DEFINE_enum("distribution", "erk", ["erk", "er", "uniform"], "Layer densities.")
flags.DEFINE_enum("grow", "gradient", ["gradient", "random", "momentum"], "Growth criterion.")
flags.DEFINE_integer("update_every", 100, "Optimizer steps between mask updates.")
flags.DEFINE_float("drop_fraction", 0.3, "Initial drop fraction (cosine-annealed to 0).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate (Adam, cosine decay).")
flags.DEFINE_integer("steps_per_execution", 32, "Keras steps_per_execution (mask updates stay "
                     "exact at every setting).")
flags.DEFINE_integer("seed", 0, "Seed for weights, masks and shuffling.")
flags.DEFINE_string("tensorboard_dir", None, "TensorBoard log dir (default: none).")
flags.DEFINE_string("data_dir", None, "Where to look for the data (see ft_keras.data.load).")
flags.DEFINE_bool("edst", True, "Also train and export the EDST Ensemble.")
flags.DEFINE_integer("num_tickets", 3, "EDST: number of tickets M.")
flags.DEFINE_float("edst_sparsity", 0.8, "EDST: sparsity S.")
flags.DEFINE_integer("exploration_epochs", 8, "EDST: exploration phase epochs.")
flags.DEFINE_integer("refine_epochs", 4, "EDST: epochs of each refinement phase.")
flags.DEFINE_float("exploration_lr", 0.05, "EDST: exploration learning rate (SGD, momentum 0.9).")
flags.DEFINE_string("output_dir", "out/demo", "Where the tickets (dense/, dst/, tickets/) and the "
                    "TF Serving export go.")


def _images(split):
    """Fashion-MNIST training images in [0, 1]: "all" 60,000, "train" the first 54,000,
    "validation" the last 6,000."""
    images = ftk.data.normalize(ftk.data.load("fashion_mnist", "train", data_dir=FLAGS.data_dir))
    return {"all": images, "train": images.take(54_000),
            "validation": images.skip(54_000)}[split]


def _batches(split, shuffle=True):
    """Batches of ``_images(split)``, reshuffled every epoch."""
    images = _images(split)
    if shuffle:
        images = images.shuffle(60_000, seed=FLAGS.seed, reshuffle_each_iteration=True)
    return images.batch(FLAGS.batch_size).prefetch(4)


def _callbacks(name):
    if not FLAGS.tensorboard_dir:
        return []
    return [keras.callbacks.TensorBoard(os.path.join(FLAGS.tensorboard_dir, name))]


def _log_dir(name):
    return os.path.join(FLAGS.tensorboard_dir, name) if FLAGS.tensorboard_dir else None


def main(argv):
    del argv
    tf.get_logger().setLevel("WARNING")  # SavedModel writing is chatty at INFO
    test_images, test_labels = ftk.data.load_numpy("fashion_mnist", "test",
                                                   data_dir=FLAGS.data_dir)
    test = evaluation.make_data(test_images, test_labels)
    # One data order per data set, made once (under the global seed), as in docs/results.md.
    keras.utils.set_random_seed(FLAGS.seed)
    train_all, train = _batches("all"), _batches("train")
    steps = FLAGS.epochs * -(-60_000 // FLAGS.batch_size)
    common = dict(
        validation_data=None, epochs=FLAGS.epochs, seed=FLAGS.seed, monitor=None,
        batch_size=FLAGS.batch_size, overwrite=True, callbacks=_callbacks,
        fit_kwargs=dict(verbose=2),
        compile_fn=recipes.make_compile_fn(
            "adam", FLAGS.learning_rate, "cosine", decay_steps=steps,
            steps_per_execution=FLAGS.steps_per_execution, jit_compile=False),
    )
    logging.info("training dense and %.0f%% sparse LeNet-300-100 for %d epochs", 100 *
                 FLAGS.sparsity, FLAGS.epochs)
    runs = {
        "dense": recipes.train_dense(
            ftk.models.lenet_300_100, lambda _: train_all,
            ticket_dir=os.path.join(FLAGS.output_dir, "dense"), **common),
        "sparse": recipes.train_dst_ensemble(
            ftk.models.lenet_300_100, 1, lambda _: train_all, sparsity=FLAGS.sparsity,
            distribution=FLAGS.distribution, ticket_dir=os.path.join(FLAGS.output_dir, "dst"),
            dst_kwargs=dict(update_every=FLAGS.update_every, drop_fraction=FLAGS.drop_fraction,
                            decay="cosine", grow=FLAGS.grow, log_dir=_log_dir("sparse")),
            **common),
    }
    results = {}
    for name, run in runs.items():
        model, _ = ftk.read_ticket(run.tickets[0])
        metrics = evaluation.evaluate([model], test).metrics
        results[name] = (metrics["test/accuracy"], metrics["test/nll"], run.wall_time_s,
                         ftk.sparsity_report(model))

    rows = [
        ("dense", results["dense"]),
        (f"DST {FLAGS.sparsity:.0%} ({FLAGS.distribution}, {FLAGS.grow})", results["sparse"]),
    ]
    if FLAGS.edst:
        rows += _edst(train, test)

    print("\nDST model (ERK, RigL) after training:")
    print(results["sparse"][3])
    print(f"\n{'model':<34} {'test acc':>9} {'test NLL':>9} {'train time':>11} "
          f"{'active kernel weights':>24}")
    for label, (accuracy, nll, seconds, rep) in rows:
        time_text = f"{seconds:>10.1f}s" if seconds is not None else f"{'':>11}"
        if isinstance(rep, list):  # an ensemble: what inference touches, all members
            active = f"{len(rep)} x {rep[0].total_active:,d}"
        else:
            active = f"{rep.total_active:,d}"
        print(f"{label:<34} {accuracy:>9.2%} {nll:>9.4f} {time_text} "
              f"{active:>12} / {rep[0].total_size if isinstance(rep, list) else rep.total_size:,d}")


def _edst(train, test):
    """Trains the EDST Ensemble, exports it, and returns table rows for tickets and ensemble."""
    ticket_dir = os.path.join(FLAGS.output_dir, "tickets")
    logging.info("training an EDST Ensemble: %d tickets, %d epochs in one run",
                 FLAGS.num_tickets, FLAGS.exploration_epochs + FLAGS.num_tickets *
                 FLAGS.refine_epochs)
    run = recipes.train_edst(
        ftk.models.lenet_300_100, FLAGS.num_tickets, train,
        validation_data=_batches("validation", shuffle=False), ticket_dir=ticket_dir,
        exploration_epochs=FLAGS.exploration_epochs, refine_epochs=FLAGS.refine_epochs,
        sparsity=FLAGS.edst_sparsity, seed=FLAGS.seed + 1, exploration_lr=FLAGS.exploration_lr,
        batch_size=FLAGS.batch_size, overwrite=True, callbacks=_callbacks,
        fit_kwargs=dict(verbose=2),
        dst_kwargs=dict(update_every=FLAGS.update_every, grow=FLAGS.grow,
                        log_dir=_log_dir("edst")),
        compile_fn=recipes.make_compile_fn("sgd", FLAGS.exploration_lr, momentum=0.9,
                                           steps_per_execution=FLAGS.steps_per_execution,
                                           jit_compile=False))

    ensemble = ftk.Ensemble.from_directory(ticket_dir, combine="probs")
    metrics = evaluation.evaluate(ensemble, test).metrics
    reports = [ftk.sparsity_report(m) for m in ensemble.members]
    rows = []
    for i, report in enumerate(reports):
        rows.append((f"EDST ticket {i + 1} ({FLAGS.edst_sparsity:.0%} sparse)",
                     (metrics[f"test/accuracy_member_{i}"], metrics[f"test/nll_member_{i}"],
                      None, report)))
    rows.append((f"EDST Ensemble (M={FLAGS.num_tickets}, mean probs)",
                 (metrics["test/accuracy"], metrics["test/nll"], run.wall_time_s, reports)))

    export_dir = os.path.join(FLAGS.output_dir, "serving", "freetickets")
    path = ensemble.export(export_dir, version=1, overwrite=True)
    serving = tf.saved_model.load(path).signatures["serving_default"]
    images = test.test_images[:256].astype(np.float32) / 255.0
    served = serving(inputs=tf.constant(images))["probabilities"].numpy()
    gap = float(np.abs(served - ensemble.predict(images, verbose=0)).max())
    print(f"\nTF Serving export: {os.path.abspath(export_dir)} (version 1); signature "
          f"'serving_default' reloaded, max |served - in-process| = {gap:.2e}")
    print(f"  tensorflow_model_server --model_name=freetickets "
          f"--model_base_path={os.path.abspath(export_dir)} --rest_api_port=8501")
    return rows


if __name__ == "__main__":
    app.run(main)
