"""Baseline for bench/step_overhead.py: tfmot's `prune_low_magnitude` vs its dense twin on tf_keras.

Times, in ONE process running tf_keras (Keras 2, ``TF_USE_LEGACY_KERAS=1``), two variants of the
same architecture in alternating rounds (dense, pruned, dense, pruned, ...):

* ``dense``:  the plain tf_keras model;
* ``pruned``: ``tfmot.sparsity.keras.prune_low_magnitude(model,
  pruning_schedule=ConstantSparsity(0.9, begin_step=0, frequency=100))`` (every Dense / Conv2D
  layer wrapped, 90% of each kernel pruned by magnitude, masks recomputed every 100 steps forever)
  trained with the ``tfmot.sparsity.keras.UpdatePruningStep()`` callback.

The models, data and protocol are those of step_overhead.py: ``mlp`` (784-1024-1024-10) and
``lenet5`` on Fashion-MNIST, batch 128, SGD(0.01, momentum=0.9),
SparseCategoricalCrossentropy(from_logits=True), ``jit_compile=False``, ``steps_per_execution``
1 and 32. Each round is one ``model.fit(x_slice, y_slice, batch_size=128, epochs=1,
shuffle=False)``: one untimed first execution (``steps_per_execution`` steps) and then exactly
``--steps`` timed steps; min and median over ``--rounds`` rounds after one warm-up fit per variant.
tfmot's pruning step is a per-layer variable incremented inside the train step, so, like
ft_keras's ``optimizer.iterations``, it counts steps (not executions) and keeps counting across
fits: a 200-step window holds 2 mask updates at frequency 100 (column ``mask updates``).

The core ft_keras package never imports tf_keras or tfmot, and this script keeps them out of any
process that runs Keras 3: launched without ``TF_USE_LEGACY_KERAS=1`` it (optionally) prepares the
data with ``ft_keras.data`` and re-runs itself in a child process with that variable set. Without
tf_keras / tensorflow-model-optimization it reports ``status: not_installed`` (install them with
``pip install ft_keras[bench]``).

How to run (from the repository root); bench/step_overhead.py runs it and merges the rows:

    python bench/tfmot_baseline.py --output_json=/tmp/tfmot.json
    python bench/tfmot_baseline.py --quick --output_json=-     # smoke run, JSON on stdout
"""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_tables  # noqa: E402  pylint: disable=wrong-import-position

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("mlp", "lenet5")
VARIANTS = ("dense", "pruned")
REQUIRED = ("tf_keras", "tensorflow_model_optimization")
LEGACY_ENV = "TF_USE_LEGACY_KERAS"

FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(MODELS), f"Models to time, from {list(MODELS)}.")
flags.DEFINE_list("spe", ["1", "32"], "steps_per_execution values to time.")
flags.DEFINE_integer("steps", 200, "Optimizer steps per timed fit (one round of one variant).")
flags.DEFINE_integer("rounds", 5, "Timed rounds per variant and setting (min and median).")
flags.DEFINE_integer(
    "warmup_steps", 32, "Steps of the untimed warm-up fit of each variant and setting.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("sparsity", 0.9, "ConstantSparsity target_sparsity (every pruned layer).")
flags.DEFINE_integer("frequency", 100, "ConstantSparsity frequency (steps between mask updates).")
flags.DEFINE_integer("seed", 0, "Seed of the weights.")
flags.DEFINE_string(
    "data", "",
    "An .npz with `x` (uint8, N x 28 x 28 x 1) and `y` (int, N) holding at least "
    "(max(steps + max spe, warmup_steps)) * batch_size examples, as step_overhead.py writes it. "
    "Empty: load Fashion-MNIST with ft_keras.data (in the launcher process, not the tf_keras one).")
flags.DEFINE_string("output_json", "-", "Where to write the report ('-': stdout).")
flags.DEFINE_bool(
    "quick", False,
    "Smoke run: steps=100, rounds=2, warmup_steps=32, unless those flags are given explicitly.")

QUICK = {"steps": 100, "rounds": 2, "warmup_steps": 32}


# ---------------------------------------------------------------------------------- set-up
def _settings():
    models = [m.strip() for m in FLAGS.models if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise app.UsageError(f"--models: unknown or empty {unknown}; choose from {list(MODELS)}.")
    try:
        spes = bench_tables.parse_positive_ints(FLAGS.spe, "spe")
    except ValueError as exc:
        raise app.UsageError(str(exc)) from None
    for name in ("steps", "rounds", "warmup_steps", "batch_size", "frequency"):
        if FLAGS[name].value <= 0:
            raise app.UsageError(f"--{name} must be positive; got {FLAGS[name].value}.")
    if not 0.0 <= FLAGS.sparsity < 1.0:
        raise app.UsageError(f"--sparsity must be in [0, 1); got {FLAGS.sparsity}.")
    return [(m, s) for m in models for s in spes]


def missing_packages():
    """The required packages that are not importable (checked without importing them)."""
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def examples_needed(settings):
    return max(FLAGS.steps + max(s for _, s in settings), FLAGS.warmup_steps) * FLAGS.batch_size


def _write(report):
    text = json.dumps(report, indent=1) + "\n"
    if FLAGS.output_json == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = os.path.abspath(FLAGS.output_json)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    logging.info("wrote %s", path)


# -------------------------------------------------------------------------------- launcher
def _launch(argv, settings):
    """Runs this script again with TF_USE_LEGACY_KERAS=1, after writing the data if needed."""
    args = list(argv[1:])
    with tempfile.TemporaryDirectory(prefix="ftk_tfmot_") as tmp:
        if not FLAGS.data:
            try:
                import ft_keras  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
            except ImportError:
                sys.path.insert(0, _REPO)
            images, labels = bench_tables.fashion_mnist_slice(examples_needed(settings))
            path = os.path.join(tmp, "data.npz")
            np.savez(path, x=images, y=labels)
            args.append(f"--data={path}")
        env = dict(os.environ, **{LEGACY_ENV: "1"})
        command = [sys.executable, os.path.abspath(__file__)] + args
        logging.info("running %s with %s=1", shlex.join(command), LEGACY_ENV)
        return subprocess.run(command, env=env, check=False).returncode


# ------------------------------------------------------------------------- tf_keras worker
def _worker(settings):
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import tensorflow_model_optimization as tfmot  # pylint: disable=import-outside-toplevel
    import tf_keras  # pylint: disable=import-outside-toplevel

    keras2 = tf.keras
    if not keras2.__name__.startswith("tf_keras"):
        raise RuntimeError(
            f"tf.keras is {keras2.__name__}, not tf_keras, although {LEGACY_ENV}=1: this "
            "baseline must run on Keras 2.")

    with np.load(FLAGS.data) as data:
        x_all = data["x"].astype(np.float32) / 255.0
        y_all = data["y"].astype(np.int64)
    needed = examples_needed(settings)
    if len(x_all) < needed:
        raise app.UsageError(
            f"--data={FLAGS.data} holds {len(x_all)} examples; {needed} are needed.")

    def build(name):
        keras2.utils.set_random_seed(FLAGS.seed)
        layers = keras2.layers
        inputs = keras2.Input(shape=(28, 28, 1), name="inputs")
        if name == "mlp":
            x = layers.Flatten(name="flatten")(inputs)
            x = layers.Dense(1024, activation="relu", name="fc1")(x)
            x = layers.Dense(1024, activation="relu", name="fc2")(x)
        else:
            x = layers.Conv2D(6, 5, padding="same", activation="relu", name="conv1")(inputs)
            x = layers.MaxPooling2D(2, name="pool1")(x)
            x = layers.Conv2D(16, 5, padding="valid", activation="relu", name="conv2")(x)
            x = layers.MaxPooling2D(2, name="pool2")(x)
            x = layers.Flatten(name="flatten")(x)
            x = layers.Dense(120, activation="relu", name="fc1")(x)
            x = layers.Dense(84, activation="relu", name="fc2")(x)
        outputs = layers.Dense(10, name="logits")(x)
        return keras2.Model(inputs, outputs, name=name)

    def compile_(model, spe):
        model.compile(
            optimizer=keras2.optimizers.SGD(0.01, momentum=0.9),
            loss=keras2.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
            steps_per_execution=spe,
        )
        return model

    def variants(name, spe):
        schedule = tfmot.sparsity.keras.ConstantSparsity(
            FLAGS.sparsity, begin_step=0, frequency=FLAGS.frequency)
        pruned = tfmot.sparsity.keras.prune_low_magnitude(build(name), pruning_schedule=schedule)
        return {"dense": compile_(build(name), spe), "pruned": compile_(pruned, spe)}

    class Clock(keras2.callbacks.Callback):
        """Timestamps the start of a fit and the end of every execution."""

        def __init__(self):
            super().__init__()
            self.begin = None
            self.ends = []

        def on_train_begin(self, logs=None):
            self.begin = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    def wrappers(model):
        return [layer for layer in model.layers if hasattr(layer, "pruning_step")]

    def pruning_step(model):
        found = wrappers(model)
        return int(keras2.backend.get_value(found[0].pruning_step)) if found else None

    def timed_fit(model, variant, x, y, spe):
        steps = int(x.shape[0]) // FLAGS.batch_size
        clock = Clock()
        callbacks = ([tfmot.sparsity.keras.UpdatePruningStep()] if variant == "pruned" else [])
        before = int(model.optimizer.iterations.numpy())
        step_before = pruning_step(model)
        t0 = time.perf_counter()
        model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, verbose=0, shuffle=False,
                  callbacks=callbacks + [clock])
        wall = time.perf_counter() - t0
        ran = int(model.optimizer.iterations.numpy()) - before
        if ran != steps:
            raise RuntimeError(f"{variant}: fit ran {ran} steps, expected {steps}.")
        first = min(spe, steps)
        timed = steps - first
        expected_executions = 1 + -(-timed // spe)
        if len(clock.ends) != expected_executions:
            raise RuntimeError(f"{variant}: saw {len(clock.ends)} executions, expected "
                               f"{expected_executions} (steps_per_execution={spe}).")
        result = {
            "fit_wall_s": wall,
            "first_execution_s": clock.ends[0] - clock.begin,
            "timed_steps": timed,
            "ms_per_step": 1e3 * (clock.ends[-1] - clock.ends[0]) / timed if timed else None,
        }
        if variant == "pruned":
            step_after = pruning_step(model)
            if step_before is None or step_before < 0:
                step_before = 0  # UpdatePruningStep starts a fresh model's counter at 0
            result["pruning_step_before"] = step_before
            result["pruning_step_after"] = step_after
            # Steps (1-based, the counter's convention) of the timed window; tfmot updates the
            # masks at the steps whose counter is a multiple of `frequency`.
            result["mask_updates_timed"] = bench_tables.multiples_in(
                step_before + first + 1, step_after, FLAGS.frequency)
        return result

    def achieved_sparsity(model):
        zeros = total = 0
        for layer in wrappers(model):
            if getattr(layer.layer, "kernel", None) is None:
                continue  # wrapped but without a kernel (Flatten, pooling)
            kernel = keras2.backend.get_value(layer.layer.kernel)
            zeros += int(np.count_nonzero(kernel == 0))
            total += kernel.size
        return zeros / total if total else None

    rows = []
    for name, spe in settings:
        label = f"tfmot {name} spe={spe}"
        started = time.perf_counter()
        models = variants(name, spe)
        n_warm = FLAGS.warmup_steps * FLAGS.batch_size
        n_round = (spe + FLAGS.steps) * FLAGS.batch_size
        x_warm, y_warm = tf.constant(x_all[:n_warm]), tf.constant(y_all[:n_warm])
        x_round, y_round = tf.constant(x_all[:n_round]), tf.constant(y_all[:n_round])
        warmup = {v: timed_fit(models[v], v, x_warm, y_warm, spe) for v in VARIANTS}
        meter = bench_tables.CpuMeter()
        rounds = {v: [] for v in VARIANTS}
        for r in range(FLAGS.rounds):
            for variant in VARIANTS:  # alternate: dense, pruned, dense, pruned, ...
                rounds[variant].append(timed_fit(models[variant], variant, x_round, y_round, spe))
            logging.info("%s: round %d/%d ms/step dense %.2f pruned %.2f", label, r + 1,
                         FLAGS.rounds, *[rounds[v][-1]["ms_per_step"] or float("nan")
                                         for v in VARIANTS])
        summary = {v: bench_tables.summary([x["ms_per_step"] for x in rounds[v]])
                   for v in VARIANTS}
        updates = [x["mask_updates_timed"] for x in rounds["pruned"]]
        row = {
            "model": name,
            "jit_compile": False,
            "steps_per_execution": spe,
            "steps_per_round": FLAGS.steps,
            "timed_steps_per_round": rounds["dense"][0]["timed_steps"],
            "mask_updates_per_timed_round": min(updates) if updates else 0,
            "ms_per_step": summary,
            "ratio_pruned_dense": {
                k: bench_tables.ratio(summary["pruned"][k], summary["dense"][k])
                for k in ("min", "median")},
            "achieved_sparsity": achieved_sparsity(models["pruned"]),
            "other_processes_cores": meter.others_cores(),
            "warmup": warmup,
            "rounds": rounds,
            "wall_s": time.perf_counter() - started,
        }
        logging.info("%s: min ms/step dense %.2f pruned %.2f -> pruned/dense %.3f "
                     "(sparsity %.3f, %d updates per window) in %.0f s", label,
                     summary["dense"]["min"], summary["pruned"]["min"],
                     row["ratio_pruned_dense"]["min"], row["achieved_sparsity"],
                     row["mask_updates_per_timed_round"], row["wall_s"])
        rows.append(row)
        del models
        keras2.backend.clear_session()
    return {
        "status": "ok",
        "versions": {
            "tensorflow": tf.__version__,
            "tf_keras": tf_keras.__version__,
            "tensorflow_model_optimization": tfmot.__version__,
        },
        "rows": rows,
    }


# ------------------------------------------------------------------------------------ main
def main(argv):
    bench_tables.apply_quick(FLAGS, QUICK)
    settings = _settings()
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    missing = missing_packages()
    if missing:
        logging.error("%s not installed: pip install ft_keras[bench] (or pip install tf_keras "
                      "tensorflow-model-optimization).", ", ".join(missing))
        _write({"status": "not_installed", "missing": missing,
                "reason": bench_tables.NOT_INSTALLED})
        return 1
    if os.environ.get(LEGACY_ENV) != "1":
        return _launch(sys.argv, settings)
    if not FLAGS.data:
        raise app.UsageError(f"--data is required when {LEGACY_ENV}=1 (the launcher sets it).")
    started = time.perf_counter()
    meter = bench_tables.CpuMeter()
    report = _worker(settings)
    report["command"] = "python " + shlex.join(
        [os.path.relpath(os.path.abspath(__file__), os.getcwd())]
        + [a for a in sys.argv[1:] if not a.startswith("--data=")])
    report["config"] = {
        "settings": [{"model": m, "steps_per_execution": s} for m, s in settings],
        "steps": FLAGS.steps,
        "rounds": FLAGS.rounds,
        "warmup_steps": FLAGS.warmup_steps,
        "batch_size": FLAGS.batch_size,
        "pruning_schedule": f"ConstantSparsity({FLAGS.sparsity}, begin_step=0, "
                            f"frequency={FLAGS.frequency})",
        "optimizer": "SGD(0.01, momentum=0.9)",
        "jit_compile": False,
        "seed": FLAGS.seed,
        "quick": FLAGS.quick,
    }
    report["total_wall_s"] = time.perf_counter() - started
    report["other_processes_cores"] = meter.others_cores()
    _write(report)
    return 0


if __name__ == "__main__":
    app.run(main)
