"""`make demo`: LeNet-300-100 on Fashion-MNIST: dense, DST (RigL) and an EDST Ensemble (FreeTickets).

1. Trains the same architecture on the full Fashion-MNIST training set (60,000 images): dense,
   and 90% sparse with ERK layer densities and RigL prune-and-grow (`ft_keras.DynamicSparsity`).
2. Trains an EDST Ensemble (`ft_keras.FreeTickets`: M = 3 tickets at 80% sparsity from ONE sparse
   run) on 54,000 images, selecting each ticket on the other 6,000, and exports the ensemble as a
   TF Serving SavedModel (checked by loading it back and calling its signature).
3. Prints the per-layer sparsity, then test accuracy and NLL of every model, single tickets and the
   ensemble (mean of the tickets' softmax probabilities).

    python examples/demo.py                       # the defaults below
    python examples/demo.py --epochs=5 --sparsity=0.95 --grow=random --tensorboard_dir=/tmp/ftk_demo

TensorBoard summaries (losses, per-layer density, mask churn, drop fraction) go to --tensorboard_dir.
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import ft_keras as ftk  # noqa: E402

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
flags.DEFINE_string("output_dir", "out/demo", "Where tickets and the TF Serving export go.")


def _dataset(split, shuffle):
    ds = ftk.data.normalize(ftk.data.load("fashion_mnist", split, data_dir=FLAGS.data_dir))
    return _batched(ds, shuffle)


def _batched(ds, shuffle):
    if shuffle:
        ds = ds.shuffle(60_000, seed=FLAGS.seed, reshuffle_each_iteration=True)
    return ds.batch(FLAGS.batch_size).prefetch(4)


def _compile(model, steps):
    schedule = keras.optimizers.schedules.CosineDecay(FLAGS.learning_rate, decay_steps=steps)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=FLAGS.steps_per_execution,
        jit_compile=False,
    )
    return model


def _callbacks(name, extra=()):
    callbacks = list(extra)
    if FLAGS.tensorboard_dir:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(FLAGS.tensorboard_dir, name)))
    return callbacks


def main(argv):
    del argv
    tf.get_logger().setLevel("WARNING")  # SavedModel writing is chatty at INFO
    keras.utils.set_random_seed(FLAGS.seed)
    train = _dataset("train", shuffle=True)
    test = _dataset("test", shuffle=False)
    steps = FLAGS.epochs * int(train.cardinality())

    results = {}
    for name in ("dense", "sparse"):
        keras.utils.set_random_seed(FLAGS.seed)
        model = ftk.models.lenet_300_100()
        extra = []
        if name == "sparse":
            model = ftk.sparsify(
                model, FLAGS.sparsity, distribution=FLAGS.distribution, seed=FLAGS.seed
            )
            extra.append(
                ftk.DynamicSparsity(
                    update_every=FLAGS.update_every,
                    drop_fraction=FLAGS.drop_fraction,
                    decay="cosine",
                    grow=FLAGS.grow,
                    seed=FLAGS.seed,
                    log_dir=os.path.join(FLAGS.tensorboard_dir, name) if FLAGS.tensorboard_dir else None,
                )
            )
        _compile(model, steps)
        logging.info("training %s LeNet-300-100 for %d epochs", name, FLAGS.epochs)
        start = time.time()
        model.fit(train, epochs=FLAGS.epochs, callbacks=_callbacks(name, extra), verbose=2)
        seconds = time.time() - start
        loss, accuracy = model.evaluate(test, verbose=0)  # loss = NLL (cross-entropy)
        results[name] = (accuracy, loss, seconds, ftk.sparsity_report(model))

    rows = [
        ("dense", results["dense"]),
        (f"DST {FLAGS.sparsity:.0%} ({FLAGS.distribution}, {FLAGS.grow})", results["sparse"]),
    ]
    if FLAGS.edst:
        rows += _edst(test)

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


def _nll_and_accuracy(probs, labels):
    picked = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return float((probs.argmax(-1) == labels).mean()), float(-np.log(picked).mean())


def _edst(test):
    """Trains the EDST Ensemble, exports it, and returns table rows for tickets and ensemble."""
    full = ftk.data.load("fashion_mnist", "train", data_dir=FLAGS.data_dir)
    train = _batched(ftk.data.normalize(full.take(54_000)), shuffle=True)
    val = _batched(ftk.data.normalize(full.skip(54_000)), shuffle=False)
    keras.utils.set_random_seed(FLAGS.seed + 1)
    model = ftk.sparsify(ftk.models.lenet_300_100(), FLAGS.edst_sparsity, seed=FLAGS.seed + 1)
    model.compile(
        optimizer=keras.optimizers.SGD(FLAGS.exploration_lr, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        steps_per_execution=FLAGS.steps_per_execution,
        jit_compile=False,
    )
    ticket_dir = os.path.join(FLAGS.output_dir, "tickets")
    free_tickets = ftk.FreeTickets(
        ticket_dir,
        num_tickets=FLAGS.num_tickets,
        exploration_epochs=FLAGS.exploration_epochs,
        refine_epochs=FLAGS.refine_epochs,
        exploration_lr=FLAGS.exploration_lr,
        update_every=FLAGS.update_every,
        grow=FLAGS.grow,
        seed=FLAGS.seed + 1,
        overwrite=True,
        log_dir=os.path.join(FLAGS.tensorboard_dir, "edst") if FLAGS.tensorboard_dir else None,
    )
    epochs = free_tickets.total_epochs
    logging.info("training an EDST Ensemble: %d tickets, %d epochs in one run",
                 FLAGS.num_tickets, epochs)
    start = time.time()
    model.fit(train, epochs=epochs, validation_data=val, verbose=2,
              callbacks=_callbacks("edst", [free_tickets]))
    seconds = time.time() - start

    ensemble = ftk.Ensemble.from_directory(ticket_dir, combine="probs")
    labels = np.concatenate([y.numpy() for _, y in test])
    images = np.concatenate([x.numpy() for x, _ in test])
    member_probs = [
        tf.nn.softmax(member.predict(images, verbose=0)).numpy() for member in ensemble.members
    ]
    rows = []
    for i, (member, probs) in enumerate(zip(ensemble.members, member_probs)):
        accuracy, nll = _nll_and_accuracy(probs, labels)
        rows.append((f"EDST ticket {i + 1} ({FLAGS.edst_sparsity:.0%} sparse)",
                     (accuracy, nll, None, ftk.sparsity_report(member))))
    ens_probs = ensemble.predict(images, verbose=0)
    accuracy, nll = _nll_and_accuracy(ens_probs, labels)
    rows.append((f"EDST Ensemble (M={FLAGS.num_tickets}, mean probs)",
                 (accuracy, nll, seconds, [ftk.sparsity_report(m) for m in ensemble.members])))

    export_dir = os.path.join(FLAGS.output_dir, "serving", "freetickets")
    path = ensemble.export(export_dir, version=1, overwrite=True)
    serving = tf.saved_model.load(path).signatures["serving_default"]
    served = serving(inputs=tf.constant(images[:256]))["probabilities"].numpy()
    gap = float(np.abs(served - ens_probs[:256]).max())
    print(f"\nTF Serving export: {os.path.abspath(export_dir)} (version 1); signature "
          f"'serving_default' reloaded, max |served - in-process| = {gap:.2e}")
    print(f"  tensorflow_model_server --model_name=freetickets "
          f"--model_base_path={os.path.abspath(export_dir)} --rest_api_port=8501")
    return rows


if __name__ == "__main__":
    app.run(main)
