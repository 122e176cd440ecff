"""One worker of the two-process ``MultiWorkerMirroredStrategy`` tests (tests/test_distribute.py).

Run by the test with ``TF_CONFIG`` set; not a test itself. Usage::

    python tests/multiworker_worker.py dst <out_dir>
    python tests/multiworker_worker.py freetickets <out_dir>

``dst`` trains one small sparse MLP per grow mode (random, gradient, momentum) with
``DynamicSparsity`` and saves every masked layer's mask and kernel, plus every weight, to
``<out_dir>/worker_<task>.npz``. ``freetickets`` runs a short EDST with ``FreeTickets`` whose
ticket and TensorBoard folders are ``<out_dir>/worker_<task>/{tickets,logs}``: only the chief
may write there. Both finish by writing ``<out_dir>/worker_<task>.done``.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)

import keras  # noqa: E402

import ft_keras as ftk  # noqa: E402

# What ft_keras/distribute.py tells multi-worker users to do before the first fit (a no-op with
# FT_KERAS_MULTIWORKER_FIX=0, which test_stock_keras_still_needs_the_fix sets).
ftk.distribute.install_multiworker_fix()

GLOBAL_BATCH = 32
NUM_EXAMPLES = 512


def _data(seed=0):
    """The same small classification problem on every worker (seeded)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(NUM_EXAMPLES, 20)).astype("float32")
    w = rng.normal(size=(20, 4)).astype("float32")
    y = np.argmax(x @ w + 0.5 * rng.normal(size=(NUM_EXAMPLES, 4)), axis=1).astype("int64")
    return x, y


def _dataset(x, y):
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH, drop_remainder=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def _model(seed, sparsity=0.8):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((20,), name="inputs")
    h = keras.layers.Dense(32, activation="relu", name="fc1")(inputs)
    h = keras.layers.Dense(32, activation="relu", name="fc2")(h)
    outputs = keras.layers.Dense(4, name="logits")(h)
    dense = keras.Model(inputs, outputs)
    sparse = ftk.sparsify(dense, sparsity=sparsity, distribution="erk", seed=seed)
    sparse.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return sparse


def _state(model, prefix):
    out = {}
    for layer in ftk.masked_layers(model):
        out[f"{prefix}/{layer.name}/mask"] = np.asarray(layer.kernel_mask.numpy())
        out[f"{prefix}/{layer.name}/kernel"] = np.asarray(layer.kernel.numpy())
    for index, weight in enumerate(model.weights):
        out[f"{prefix}/weight_{index}"] = np.asarray(weight.numpy())
    return out


# (name, grow, optimizer_state) of the DST runs.
RUNS = (("random", "random", "masked"), ("gradient", "gradient", "masked"),
        ("momentum", "momentum", "masked"), ("dense_state", "gradient", "dense"))


def run_dst(strategy, out_dir, task):
    x, y = _data()
    arrays = {}
    for name, grow, optimizer_state in RUNS:
        with strategy.scope():
            model = _model(seed=3)
        before = _state(model, "before_" + name)
        model.fit(
            _dataset(x, y),
            epochs=2,
            verbose=0,
            callbacks=[ftk.DynamicSparsity(update_every=4, drop_fraction=0.5, grow=grow, seed=7,
                                           optimizer_state=optimizer_state)],
        )
        arrays.update({k: v for k, v in before.items() if k.endswith("/mask")})
        arrays.update(_state(model, name))
        arrays[f"{name}/iterations"] = np.asarray(model.optimizer.iterations.numpy())
    np.savez(os.path.join(out_dir, f"worker_{task}.npz"), **arrays)


def run_freetickets(strategy, out_dir, task):
    x, y = _data()
    mine = os.path.join(out_dir, f"worker_{task}")
    with strategy.scope():
        model = _model(seed=5)
    callback = ftk.FreeTickets(
        os.path.join(mine, "tickets"),
        num_tickets=3,
        exploration_epochs=1,
        refine_epochs=1,
        monitor="val_accuracy",
        update_every=4,
        drop_fraction=0.5,
        log_dir=os.path.join(mine, "logs"),
    )
    model.fit(
        _dataset(x[:384], y[:384]),
        validation_data=_dataset(x[384:], y[384:]),
        epochs=callback.total_epochs,
        verbose=0,
        callbacks=[callback],
    )
    np.savez(os.path.join(out_dir, f"worker_{task}.npz"), **_state(model, "final"))


def main(argv):
    mode, out_dir = argv[1], argv[2]
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    if strategy.num_replicas_in_sync != 2:
        raise SystemExit(f"expected 2 replicas in sync, got {strategy.num_replicas_in_sync}")
    {"dst": run_dst, "freetickets": run_freetickets}[mode](strategy, out_dir, task)
    with open(os.path.join(out_dir, f"worker_{task}.done"), "w") as f:
        f.write(json.dumps({"chief": ftk.distribute.is_chief(strategy)}))


if __name__ == "__main__":
    main(sys.argv)
