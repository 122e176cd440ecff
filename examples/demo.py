"""`make demo`: dynamic sparse training (RigL) of LeNet-300-100 on Fashion-MNIST next to its dense twin.

Trains the same architecture twice on the full Fashion-MNIST training set (60,000 images):
dense, and 90% sparse with ERK layer densities and RigL prune-and-grow (`ft_keras.DynamicSparsity`),
then prints the per-layer sparsity of the sparse model and both test accuracies.

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


def _dataset(split, shuffle):
    ds = ftk.data.normalize(ftk.data.load("fashion_mnist", split, data_dir=FLAGS.data_dir))
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
        loss, accuracy = model.evaluate(test, verbose=0)
        results[name] = (accuracy, loss, seconds, ftk.sparsity_report(model))

    report = results["sparse"][3]
    print("\nSparse model (ERK, RigL) after training:")
    print(report)
    print(
        f"\n{'model':<28} {'test accuracy':>13} {'test loss':>10} {'train time':>11} "
        f"{'active kernel weights':>22}"
    )
    for name, (accuracy, loss, seconds, rep) in results.items():
        label = "dense" if name == "dense" else (
            f"sparse {FLAGS.sparsity:.0%} ({FLAGS.distribution}, {FLAGS.grow})"
        )
        print(
            f"{label:<28} {accuracy:>13.2%} {loss:>10.4f} {seconds:>10.1f}s "
            f"{rep.total_active:>12,d} / {rep.total_size:,d}"
        )


if __name__ == "__main__":
    app.run(main)
