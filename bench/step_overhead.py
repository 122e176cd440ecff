"""Step-time overhead of dynamic sparse training (`ft_keras.DynamicSparsity`) vs dense training.

Measures, on real Fashion-MNIST at batch 128 (sections 1 and 2 in this process, 3 and 4 in
subprocesses):

1. Training throughput (ms per optimizer step) of three variants of the same architecture,
   trained side by side in alternating rounds (dense, static, DST, dense, static, DST, ...):

   * ``dense``:  the plain Keras model, no callback;
   * ``static``: ``ftk.sparsify(model, 0.9, distribution="erk", seed=0)`` trained with
     ``ftk.StaticSparsity()`` (gradient masking only, masks never change);
   * ``dst``:    the same sparsified model trained with
     ``ftk.DynamicSparsity(update_every=100, drop_fraction=0.3, grow="gradient")`` (RigL), with
     ``end_step`` far beyond the run so that every multiple of 100 is an update step.

   All use SGD(0.01, momentum=0.9) and SparseCategoricalCrossentropy(from_logits=True), for
   ``ftk.models.mlp(hidden=(1024, 1024))`` and ``ftk.models.lenet5()``, with ``jit_compile``
   False / True and ``steps_per_execution`` 1 / 32. Each round is one
   ``model.fit(x_slice, y_slice, batch_size=128, epochs=1, shuffle=False)`` over a fixed slice:
   one untimed first execution (``steps_per_execution`` steps, holding the tracing / XLA
   compilation that the sparsity callbacks redo at every fit) and then exactly ``--steps`` timed
   steps, so that every timed window of DST holds ``steps / update_every`` mask updates (the clock
   is ``optimizer.iterations``, which keeps counting across fits). Min and median over
   ``--rounds`` rounds are reported, after one warm-up fit per variant, plus a breakdown: gradient
   masking (static - dense), the per-step ``tf.cond`` of DST, and the extra time of the steps that
   hold a mask update (from per-execution timestamps).

2. Wall time of one mask update (magnitude prune + gradient grow) on a 1024x1024 kernel at
   density 0.1, in ``tf.function`` with and without XLA: the function DynamicSparsity runs there
   (``ftk.masks.update_mask_sparse`` without XLA where it exists, ``update_mask`` with XLA: the
   path of ``jit_compile=True`` training on several replicas).

3. The tfmot baseline (``bench/tfmot_baseline.py``, run as a subprocess with
   ``TF_USE_LEGACY_KERAS=1``: this process never imports tf_keras or tfmot): tfmot's
   ``prune_low_magnitude`` (``ConstantSparsity(0.9, begin_step=0, frequency=100)``) against its
   tf_keras dense twin, same models, data and protocol, XLA off, side by side in alternating rounds
   in that one process. Its rows are merged with section 1's XLA-off rows into ONE table
   (ft_keras DST / ft_keras dense next to tfmot pruned / tf_keras dense). Without tf_keras /
   tensorflow-model-optimization the table says "not measured: pip install ft_keras[bench]".

4. Peak memory (``bench/peak_memory.py``, one fresh subprocess per variant): max RSS of training
   ``mlp(hidden=(4096, 4096))`` dense vs static mask vs DST (RigL, update_every=100) for
   ``--memory_steps`` steps, under TensorFlow's default CPU allocator and the system allocator,
   with the ratio sparse / dense (target <= 1.3) and an accounting of the extra bytes.

Results go to ``--output_json`` (raw times, machine info) and ``--output_md`` (tables).

How to run (from the repository root):

    python bench/step_overhead.py            # the full default run
    make bench                               # the same, in the project's virtualenv
    pip install -e '.[bench]'                # tf_keras + tensorflow-model-optimization (section 3)
    python bench/step_overhead.py --quick --output_json=/tmp/b.json --output_md=/tmp/b.md
                                             # smoke run of every section
    python bench/step_overhead.py --models=mlp --xla=false --spe=32 --rounds=7
    python bench/step_overhead.py --skip_xla_cnn   # leave out LeNet-5 with XLA (slow on CPU)
    python bench/step_overhead.py --notfmot --nomemory   # sections 1 and 2 only
"""

import datetime
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

try:
    import ft_keras as ftk  # noqa: E402
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ft_keras as ftk  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _BENCH)
import bench_tables  # noqa: E402  pylint: disable=wrong-import-position

MODELS = {
    "mlp": ("MLP 784-1024-1024-10", lambda: ftk.models.mlp(hidden=(1024, 1024))),
    "lenet5": ("LeNet-5", lambda: ftk.models.lenet5()),
}
VARIANTS = ("dense", "static", "dst")
# end_step given to DynamicSparsity: far beyond the benchmark, so that every multiple of
# update_every is an update step. (With end_step=None the schedule ends at the last step of each
# fit, exclusive, and a fit of 200 steps would update only at its 100th step.)
DST_END_STEP = 10_000_000

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mlp", "lenet5"], f"Models to time, from {sorted(MODELS)}.")
flags.DEFINE_integer("steps", 200, "Optimizer steps per timed fit (one round of one variant).")
flags.DEFINE_integer("rounds", 5, "Timed rounds per variant and setting (min and median).")
flags.DEFINE_integer(
    "warmup_steps", 32, "Steps of the untimed warm-up fit of each variant and setting.")
flags.DEFINE_list("xla", ["false", "true"], "jit_compile values to time (false, true).")
flags.DEFINE_list("spe", ["1", "32"], "steps_per_execution values to time.")
flags.DEFINE_bool("skip_xla_cnn", False, "Skip LeNet-5 with jit_compile=True (slow on CPU).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("sparsity", 0.9, "Overall sparsity of the sparsified models (ERK).")
flags.DEFINE_integer("update_every", 100, "DynamicSparsity update_every.")
flags.DEFINE_float("drop_fraction", 0.3, "DynamicSparsity drop_fraction.")
flags.DEFINE_integer("update_reps", 20, "Timed repetitions of the mask-update micro-benchmark.")
flags.DEFINE_integer("update_size", 1024, "The micro-benchmark's kernel is update_size^2.")
flags.DEFINE_float("update_density", 0.1, "Density of the micro-benchmark's mask.")
flags.DEFINE_bool(
    "tfmot", True,
    "Run the tfmot baseline (bench/tfmot_baseline.py) for the XLA-off settings; needs tf_keras "
    "and tensorflow-model-optimization (pip install ft_keras[bench]).")
flags.DEFINE_bool("memory", True, "Run the peak-memory benchmark (bench/peak_memory.py).")
flags.DEFINE_integer("memory_steps", 150, "Training steps of each peak-memory process.")
flags.DEFINE_integer("memory_update_every", 100, "DynamicSparsity update_every of the memory run.")
flags.DEFINE_list("memory_variants", ["dense", "static", "dst"],
                  "Variants of the memory run (see bench/peak_memory.py --variants).")
flags.DEFINE_list("memory_allocators", ["default", "system"],
                  "Allocators of the memory run (see bench/peak_memory.py --allocators).")
flags.DEFINE_list("memory_hidden", ["4096", "4096"], "Hidden widths of the memory run's MLP.")
flags.DEFINE_bool(
    "quick", False,
    "Smoke run: steps=100, rounds=2, warmup_steps=32, xla=false, update_reps=5, "
    "memory_steps=20, memory_update_every=10, unless those flags are given explicitly.")
flags.DEFINE_string("output_json", "docs/benchmarks.json", "Where to write the raw results.")
flags.DEFINE_string("render_only", None,
                    "Rewrite --output_md from this JSON of an earlier run (no timing).")
flags.DEFINE_string("output_md", "docs/benchmarks.md", "Where to write the markdown report.")
flags.DEFINE_integer("seed", 0, "Seed for weights and masks.")

QUICK = {"steps": 100, "rounds": 2, "warmup_steps": 32, "xla": ["false"], "update_reps": 5,
         "memory_steps": 20, "memory_update_every": 10}
# The hand-written page that explains the generated one (relative to docs/benchmarks.md).
NOTES = "reading_benchmarks.md"
TARGET_RATIO = 1.03  # issue #6: DST <= 1.03x its dense twin
# Cores' worth of CPU used by other processes above which a row is flagged as disturbed.
CONTENTION_WARNING = 0.2


# ---------------------------------------------------------------------------------- helpers
def _parse_bool(text):
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise app.UsageError(f"--xla takes true/false values; got {text!r}.")


def _settings():
    """The (model, jit_compile, steps_per_execution) combinations to time, in order."""
    models = [m.strip() for m in FLAGS.models if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise app.UsageError(f"--models: unknown {unknown}; choose from {sorted(MODELS)}.")
    xlas = [_parse_bool(x) for x in FLAGS.xla]
    try:
        spes = [int(s) for s in FLAGS.spe]
    except ValueError:
        raise app.UsageError(f"--spe takes integers; got {FLAGS.spe}.") from None
    if any(s <= 0 for s in spes):
        raise app.UsageError(f"--spe values must be positive; got {spes}.")
    out = []
    for model in models:
        for xla in xlas:
            if model == "lenet5" and xla and FLAGS.skip_xla_cnn:
                continue
            for spe in spes:
                out.append((model, xla, spe))
    return out


def _machine_info():
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **bench_tables.host_info(_REPO),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "ft_keras": ftk.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
    }


def _load_data(num_examples):
    images, labels = bench_tables.fashion_mnist_slice(num_examples)
    return images.astype(np.float32) / 255.0, labels


def _compile(model, xla, spe):
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=xla,
        steps_per_execution=spe,
    )
    return model


def _build_variants(model_name, xla, spe):
    """Dense model and two sparsified twins (same weights, same masks), compiled."""
    keras.utils.set_random_seed(FLAGS.seed)
    dense = MODELS[model_name][1]()
    static = ftk.sparsify(dense, FLAGS.sparsity, distribution="erk", seed=FLAGS.seed)
    dst = ftk.sparsify(dense, FLAGS.sparsity, distribution="erk", seed=FLAGS.seed)
    return {name: _compile(m, xla, spe) for name, m in
            (("dense", dense), ("static", static), ("dst", dst))}


def _sparsity_callback(variant):
    if variant == "dense":
        return []
    if variant == "static":
        return [ftk.StaticSparsity()]
    return [
        ftk.DynamicSparsity(
            update_every=FLAGS.update_every,
            drop_fraction=FLAGS.drop_fraction,
            grow="gradient",
            end_step=DST_END_STEP,
        )
    ]


class _ExecutionClock(keras.callbacks.Callback):
    """Timestamps the phases of a fit and the end of every execution (spe steps).

    One instance goes first in the callback list (``head``) and one last: the difference
    between their ``on_train_begin`` / ``on_train_end`` times is what the callbacks in between
    (the sparsity callback) spend there.
    """

    def __init__(self, head=False):
        super().__init__()
        self.head = head
        self.begin = None
        self.end = None
        self.ends = []

    def on_train_begin(self, logs=None):
        self.begin = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if not self.head:
            self.ends.append(time.perf_counter())

    def on_train_end(self, logs=None):
        self.end = time.perf_counter()


def _update_steps_in(first, last, update_every):
    """Update steps t (1-based optimizer steps) with first <= t <= last."""
    return [t for t in range(first, last + 1) if t % update_every == 0 and t < DST_END_STEP]


def _update_step_spike(ends, start_iteration, steps, spe):
    """Extra time of the timed executions that hold an update step (a multiple of update_every).

    Execution j >= 1 runs n_j steps in d_j seconds. The baseline per-step time is the median of
    d_j / n_j over the executions without an update step; the spike is the mean over the
    executions with one of d_j - n_j * baseline. For DST this is the in-training cost of one mask
    update; dense and static have no updates, so theirs shows the noise of this estimate.
    """
    first = min(spe, steps)
    plain, spiky = [], []
    for j in range(1, len(ends)):
        lo = first + (j - 1) * spe + 1  # 1-based steps of this fit
        hi = min(first + j * spe, steps)
        n = hi - lo + 1
        if n <= 0:
            continue
        has_update = any((start_iteration + t) % FLAGS.update_every == 0 for t in range(lo, hi + 1))
        (spiky if has_update else plain).append((ends[j] - ends[j - 1], n))
    if not plain or not spiky:
        return {"update_step_spike_ms": None}
    baseline = statistics.median(d / n for d, n in plain)
    return {
        "update_step_spike_ms": 1e3 * statistics.mean(d - n * baseline for d, n in spiky),
        "median_step_ms_without_update": 1e3 * baseline,
    }


def _timed_fit(model, variant, x, y, spe):
    """One fit over (x, y); returns the round's measurements."""
    steps = int(x.shape[0]) // FLAGS.batch_size
    start_iteration = int(model.optimizer.iterations.numpy())
    head, clock = _ExecutionClock(head=True), _ExecutionClock()
    sparsity = _sparsity_callback(variant)
    callbacks = [head] + sparsity + [clock]
    gc.disable()  # as timeit does: no collector pauses inside the measured fit
    try:
        t0 = time.perf_counter()
        model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, verbose=0, shuffle=False,
                  callbacks=callbacks)
        t1 = time.perf_counter()
    finally:
        gc.enable()
    wall = t1 - t0
    end_iteration = int(model.optimizer.iterations.numpy())
    if end_iteration - start_iteration != steps:
        raise RuntimeError(
            f"{variant}: fit ran {end_iteration - start_iteration} steps, expected {steps}.")
    first_execution_steps = min(spe, steps)
    timed_steps = steps - first_execution_steps
    result = {
        "start_step": start_iteration,
        "fit_wall_s": wall,
        "first_execution_s": clock.ends[0] - clock.begin,
        "executions": len(clock.ends),
        "timed_steps": timed_steps,
        "ms_per_step": (
            1e3 * (clock.ends[-1] - clock.ends[0]) / timed_steps if timed_steps > 0 else None
        ),
        "fit_ms_per_step": 1e3 * wall / steps,
        # Where a fit's wall time goes besides the steps (seconds).
        "fit_phases_s": {
            "before_train_begin": head.begin - t0,
            "callbacks_train_begin": clock.begin - head.begin,
            "first_execution": clock.ends[0] - clock.begin,
            "timed_executions": clock.ends[-1] - clock.ends[0],
            "last_execution_to_train_end": head.end - clock.ends[-1],
            "callbacks_train_end": clock.end - head.end,
            "after_train_end": t1 - clock.end,
        },
    }
    # The first execution minus its steps at the steady rate: tracing / compilation of this fit.
    if result["ms_per_step"] is not None:
        result["first_execution_overhead_s"] = (
            result["first_execution_s"] - first_execution_steps * result["ms_per_step"] / 1e3)
    result.update(_update_step_spike(clock.ends, start_iteration, steps, spe))
    if variant == "dst":
        # Mask updates inside the timed window: steps first_execution_steps+1 .. steps of this fit.
        expected = _update_steps_in(start_iteration + first_execution_steps + 1, end_iteration,
                                    FLAGS.update_every)
        seen = sparsity[0].updates  # public: what the callback observed of its updates
        last_seen = int(seen[-1]["step"]) if seen else 0
        all_updates = _update_steps_in(start_iteration + 1, end_iteration, FLAGS.update_every)
        result["mask_updates_timed"] = len(expected)
        result["mask_update_steps"] = expected
        result["last_update_step_seen"] = last_seen
        if all_updates and last_seen != all_updates[-1]:
            logging.warning("DST: expected the last mask update at step %d, the callback saw %d",
                            all_updates[-1], last_seen)
            result["update_check"] = "MISMATCH"
        else:
            result["update_check"] = "ok"
    return result


def _summary(values):
    values = [v for v in values if v is not None]
    if not values:
        return {"min": None, "median": None}
    return {"min": min(values), "median": statistics.median(values)}


def _diff(a, b):
    return None if a is None or b is None else a - b


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _bench_setting(model_name, xla, spe, x_all, y_all):
    steps = FLAGS.steps
    models = _build_variants(model_name, xla, spe)
    n_warm = FLAGS.warmup_steps * FLAGS.batch_size
    # Each fit runs one untimed first execution (spe steps: tracing, compilation) and then exactly
    # --steps timed steps, so that the timed window always holds steps / update_every updates.
    n_round = (spe + steps) * FLAGS.batch_size
    # Tensors (not numpy arrays): fit() then does not copy the slice into a new tensor per call.
    x_warm, y_warm = tf.constant(x_all[:n_warm]), tf.constant(y_all[:n_warm])
    x_round, y_round = tf.constant(x_all[:n_round]), tf.constant(y_all[:n_round])
    label = f"{model_name} xla={xla} spe={spe}"

    warmup = {}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        warmup[variant] = _timed_fit(models[variant], variant, x_warm, y_warm, spe)
        logging.info("%s: warm-up %-6s %.1f s", label, variant, time.perf_counter() - t0)

    meter = bench_tables.CpuMeter()
    rounds = {v: [] for v in VARIANTS}
    for r in range(FLAGS.rounds):
        for variant in VARIANTS:  # alternate: dense, static, dst, dense, static, dst, ...
            rounds[variant].append(_timed_fit(models[variant], variant, x_round, y_round, spe))
        logging.info(
            "%s: round %d/%d ms/step dense %.2f static %.2f dst %.2f",
            label, r + 1, FLAGS.rounds,
            *[rounds[v][-1]["ms_per_step"] or float("nan") for v in VARIANTS],
        )

    summary = {v: _summary([x["ms_per_step"] for x in rounds[v]]) for v in VARIANTS}
    fit_summary = {v: _summary([x["fit_ms_per_step"] for x in rounds[v]]) for v in VARIANTS}
    first_exec = {v: _summary([x["first_execution_s"] for x in rounds[v]]) for v in VARIANTS}
    first_overhead = {
        v: _summary([x.get("first_execution_overhead_s") for x in rounds[v]]) for v in VARIANTS}
    spikes = {v: _summary([x["update_step_spike_ms"] for x in rounds[v]]) for v in VARIANTS}
    plain_step = {
        v: _summary([x.get("median_step_ms_without_update") for x in rounds[v]]) for v in VARIANTS}
    breakdown = {
        # static - dense: the optimizer hook's gradient masking (and the masked-layer variables).
        "gradient_masking_ms_per_step": _diff(summary["static"]["min"], summary["dense"]["min"]),
        # DST steps without an update vs static steps: the per-step tf.cond / schedule.
        "dst_plain_step_overhead_ms": _diff(plain_step["dst"]["median"],
                                            plain_step["static"]["median"]),
        # The extra time of a step with a mask update (median over rounds); dense = noise control.
        "update_spike_ms": spikes["dst"]["median"],
        "control_spike_ms_dense": spikes["dense"]["median"],
        "update_amortised_ms_per_step": (
            None if spikes["dst"]["median"] is None
            else spikes["dst"]["median"] / FLAGS.update_every),
    }
    updates = [x["mask_updates_timed"] for x in rounds["dst"]]
    others = meter.others_cores()
    if others is not None and others > CONTENTION_WARNING:
        logging.warning("%s: other processes kept %.2f cores busy during the timed rounds; "
                        "these numbers are contaminated.", label, others)
    result = {
        "model": model_name,
        "other_processes_cores": others,
        "jit_compile": xla,
        "steps_per_execution": spe,
        "steps_per_round": steps,
        "timed_steps_per_round": rounds["dense"][0]["timed_steps"],
        "mask_updates_per_timed_round": min(updates) if updates else 0,
        "ms_per_step": summary,
        "ratio_dst_dense": {k: _ratio(summary["dst"][k], summary["dense"][k])
                            for k in ("min", "median")},
        "ratio_static_dense": {k: _ratio(summary["static"][k], summary["dense"][k])
                               for k in ("min", "median")},
        "update_step_spike_ms": spikes,
        "median_step_ms_without_update": plain_step,
        "breakdown": breakdown,
        "first_execution_overhead_s": first_overhead,
        "fit_wall_ms_per_step": fit_summary,
        "first_execution_s": first_exec,
        "update_checks": sorted({x["update_check"] for x in rounds["dst"]}),
        "warmup": warmup,
        "rounds": rounds,
        "sparsity_report": ftk.sparsity_report(models["dst"]).as_dict(),
    }
    logging.info(
        "%s: min ms/step dense %.2f static %.2f dst %.2f -> dst/dense %.3f static/dense %.3f",
        label, summary["dense"]["min"], summary["static"]["min"], summary["dst"]["min"],
        result["ratio_dst_dense"]["min"], result["ratio_static_dense"]["min"],
    )
    return result


# ------------------------------------------------------------------- mask-update benchmark
def _bench_mask_update():
    n = FLAGS.update_size
    shape = (n, n)
    size = n * n
    num_active = int(round(FLAGS.update_density * size))
    mask = ftk.masks.random_mask(shape, num_active, ftk.masks.rng_seed(FLAGS.seed, -1, 0))
    rng = np.random.default_rng(FLAGS.seed)
    weights = tf.where(mask, tf.constant(rng.normal(size=shape).astype(np.float32)), 0.0)
    scores = tf.abs(tf.constant(rng.normal(size=shape).astype(np.float32)))
    fraction = FLAGS.drop_fraction
    results = []
    # The function DynamicSparsity runs at each setting: without XLA the compacted
    # `update_mask_sparse` where this ft_keras has it, with XLA the static-shape `update_mask`.
    sparse_path = hasattr(ftk.masks, "update_mask_compacted")

    def update_static(m, w, s):
        return ftk.masks.update_mask(m, w, s, fraction, num_active)

    def update_sparse(m, w, s):
        return tuple(ftk.masks.update_mask_compacted(m, w, s, fraction, num_active)[:2])

    for xla in (False, True):
        if sparse_path and not xla:
            function, name = update_sparse, "update_mask_compacted"
        else:
            function, name = update_static, "update_mask"
        fn = tf.function(function, jit_compile=xla)
        t0 = time.perf_counter()
        new_mask, _ = fn(mask, weights, scores)
        first = time.perf_counter() - t0
        active = int(ftk.masks.count_active(new_mask))
        if active != num_active:
            raise RuntimeError(f"update_mask changed the active count: {active} != {num_active}")
        for _ in range(2):
            fn(mask, weights, scores)
        times = []
        for _ in range(FLAGS.update_reps):
            t0 = time.perf_counter()
            new_mask, keep = fn(mask, weights, scores)
            _ = (new_mask.numpy(), keep.numpy())  # the results exist (eager is synchronous)
            times.append(time.perf_counter() - t0)
        ms = _summary([1e3 * t for t in times])
        entry = {
            "jit_compile": xla,
            "function": f"ftk.masks.{name}",
            "shape": list(shape),
            "size": size,
            "num_active": num_active,
            "drop_fraction": fraction,
            "first_call_s": first,
            "ms": ms,
            "ms_per_1m_weights": {k: v * 1e6 / size for k, v in ms.items()},
            "raw_ms": [1e3 * t for t in times],
        }
        logging.info("mask update %dx%d xla=%s: min %.2f ms, median %.2f ms (first call %.2f s)",
                     n, n, xla, ms["min"], ms["median"], first)
        results.append(entry)
    return results


def _mlp_masked_positions():
    keras.utils.set_random_seed(FLAGS.seed)
    sparse = ftk.sparsify(MODELS["mlp"][1](), FLAGS.sparsity, distribution="erk", seed=FLAGS.seed)
    report = ftk.sparsity_report(sparse)
    return sum(row.size for row in report.masked)


def _relate_update_to_mlp(updates, settings_results, mlp_positions):
    """Cost of one MLP-sized mask update relative to 100 dense MLP steps (same XLA flag)."""
    for entry in updates:
        dense = {
            r["steps_per_execution"]: r["ms_per_step"]["dense"]["min"]
            for r in settings_results
            if r["model"] == "mlp" and r["jit_compile"] == entry["jit_compile"]
        }
        per_1m = entry["ms_per_1m_weights"]["min"]
        entry["mlp_masked_positions"] = mlp_positions
        entry["est_ms_per_mlp_update"] = per_1m * mlp_positions / 1e6
        entry["fraction_of_100_dense_mlp_steps"] = {
            str(spe): (per_1m / (100.0 * ms)) for spe, ms in sorted(dense.items())
        }
        entry["mlp_update_fraction_of_100_dense_mlp_steps"] = {
            str(spe): (entry["est_ms_per_mlp_update"] / (100.0 * ms))
            for spe, ms in sorted(dense.items())
        }


# ------------------------------------------------------------- subprocess benchmarks (3, 4)
def _script(name):
    return os.path.join(_BENCH, name)


def _tail(text, lines=5):
    return "\n".join((text or "").strip().splitlines()[-lines:])


def _run_tfmot(settings, x_all, y_all):
    """Section 3: bench/tfmot_baseline.py in a TF_USE_LEGACY_KERAS=1 subprocess; its report."""
    if not FLAGS.tfmot:
        return {"status": "skipped", "reason": "not measured: --notfmot"}
    ours = [(m, spe) for m, xla, spe in settings if not xla]
    if not ours:
        return {"status": "skipped", "reason": "not measured: no XLA-off setting in this run"}
    import importlib.util  # pylint: disable=import-outside-toplevel
    missing = [name for name in ("tf_keras", "tensorflow_model_optimization")
               if importlib.util.find_spec(name) is None]
    if missing:
        logging.warning("tfmot baseline not measured: %s not installed (pip install "
                        "ft_keras[bench]).", ", ".join(missing))
        return {"status": "not_installed", "missing": missing,
                "reason": bench_tables.NOT_INSTALLED}
    models = list(dict.fromkeys(m for m, _ in ours))
    spes = list(dict.fromkeys(spe for _, spe in ours))
    needed = max(FLAGS.steps + max(spes), FLAGS.warmup_steps) * FLAGS.batch_size
    with tempfile.TemporaryDirectory(prefix="ftk_bench_") as tmp:
        data = os.path.join(tmp, "data.npz")
        # The same examples as ours, back to uint8 (exact: x = u / 255 in float32).
        np.savez(data, x=np.rint(x_all[:needed] * 255.0).astype(np.uint8), y=y_all[:needed])
        out = os.path.join(tmp, "tfmot.json")
        command = [
            sys.executable, _script("tfmot_baseline.py"),
            f"--models={','.join(models)}", f"--spe={','.join(str(s) for s in spes)}",
            f"--steps={FLAGS.steps}", f"--rounds={FLAGS.rounds}",
            f"--warmup_steps={FLAGS.warmup_steps}", f"--batch_size={FLAGS.batch_size}",
            f"--sparsity={FLAGS.sparsity}", f"--frequency={FLAGS.update_every}",
            f"--seed={FLAGS.seed}", f"--data={data}", f"--output_json={out}",
        ]
        report = _run_child("tfmot baseline", command, out, ("tfmot_baseline.py", "] tfmot "),
                            env=dict(os.environ, TF_USE_LEGACY_KERAS="1"))
    if report.get("status") == "failed":
        return report
    logging.info("tfmot baseline done in %.0f s", report["wall_s"])
    return report


def _run_child(what, command, out, marker, env=None, partial_ok=False):
    """Runs a benchmark script that writes its JSON report to ``out``; returns the report.

    Echoes the child's log lines that contain both parts of ``marker``. A child that writes no
    report, or (unless ``partial_ok``) exits non-zero, gives ``{"status": "failed", ...}``; with
    ``partial_ok`` a report from a non-zero exit is kept as "partly failed".
    """
    logging.info("%s: %s", what, shlex.join(command))
    t0 = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    for line in (proc.stderr or "").splitlines():
        if marker[0] in line and marker[1] in line:
            logging.info("  %s", line.split("] ", 1)[-1])
    if not os.path.exists(out) or (proc.returncode != 0 and not partial_ok):
        logging.error("%s failed (exit %d):\n%s", what, proc.returncode, _tail(proc.stderr))
        return {"status": "failed",
                "reason": f"failed (exit code {proc.returncode}; see the log)",
                "stderr_tail": _tail(proc.stderr, 20)}
    with open(out, encoding="utf-8") as f:
        report = json.load(f)
    if partial_ok:
        report["status"] = "ok" if proc.returncode == 0 else "partly failed"
    report["wall_s"] = time.perf_counter() - t0
    return report


def _run_memory():
    """Section 4: bench/peak_memory.py (one child process per variant and allocator)."""
    if not FLAGS.memory:
        return {"status": "skipped", "reason": "not measured: --nomemory"}
    with tempfile.TemporaryDirectory(prefix="ftk_bench_") as tmp:
        out = os.path.join(tmp, "memory.json")
        command = [
            sys.executable, _script("peak_memory.py"),
            f"--steps={FLAGS.memory_steps}", f"--update_every={FLAGS.memory_update_every}",
            f"--variants={','.join(FLAGS.memory_variants)}",
            f"--allocators={','.join(FLAGS.memory_allocators)}",
            f"--hidden={','.join(FLAGS.memory_hidden)}",
            f"--sparsity={FLAGS.sparsity}", f"--drop_fraction={FLAGS.drop_fraction}",
            f"--batch_size={FLAGS.batch_size}", f"--seed={FLAGS.seed}", f"--output_json={out}",
        ]
        report = _run_child("peak memory", command, out, ("peak_memory.py", "] memory "),
                            partial_ok=True)
    if report.get("status") == "failed":
        return report
    logging.info("peak memory done in %.0f s", report["wall_s"])
    return report


# ------------------------------------------------------------------------------- reporting
def _f(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def _settings(pairs):
    """A markdown list of ``(name, value)`` settings (values from the run's configuration)."""
    return [f"- {name}: `{value}`" for name, value in pairs]


def _pct(value):
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _setting_cells(r):
    return (f"| {MODELS[r['model']][0]} | {'on' if r['jit_compile'] else 'off'} "
            f"| {r['steps_per_execution']} ")


def _first_fit_tracing(row, variant):
    """The warm-up fit's first execution minus its steps at the rounds' steady rate (s)."""
    warm = row["warmup"][variant]
    rate = row["ms_per_step"][variant]["min"]
    if rate is None:
        return None
    steps = min(row["steps_per_execution"], warm["timed_steps"] + row["steps_per_execution"])
    return warm["first_execution_s"] - steps * rate / 1e3


def _markdown(report):
    m = report["machine"]
    cfg = report["config"]
    every = cfg["update_every"]
    lines = [
        "# Benchmarks: step-time overhead of dynamic sparse training",
        "",
        "Generated by `bench/step_overhead.py` (rerun the command below to refresh it; raw "
        "numbers, medians and per-round times are in `benchmarks.json` next to this file). "
        f"How the numbers are taken and what each column means: [{NOTES}]({NOTES}).",
        "",
        f"**Target:** ratio DST/dense <= {TARGET_RATIO:.2f}.",
        "",
        "Command:",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"Machine: {m['cpus_usable']} usable CPU cores ({m['cpu_count']} reported)"
        + (f", {m['cpu_model']}" if m["cpu_model"] else "")
        + (f", GPUs: {', '.join(m['gpus'])}" if m["gpus"] else ", no GPU")
        + f". TensorFlow {m['tensorflow']}, Keras {m['keras']}, NumPy {m['numpy']}, "
        f"Python {m['python']}, ft_keras {m['ft_keras']}. Started (UTC): {m['date_utc']}."
        + (f" Commit: `{m['git_commit']}`." if m["git_commit"] else "")
        + (f" **HEAD moved to `{m['git_commit_at_end']}` during the run** (ft_keras modules "
           "were imported at the start)." if m.get("git_commit_at_end") else "")
        + f" Run time: {report['total_wall_s'] / 60:.1f} min.",
        "",
    ]
    if not m["gpus"]:
        lines += ["**GPU: not measured** (no GPU was visible to this run; the same command on a "
                  "GPU machine adds GPU rows).", ""]
    busy = [r for r in report["step_time"]
            if (r.get("other_processes_cores") or 0.0) > CONTENTION_WARNING]
    if busy:
        lines += [
            "**Warning:** other processes used the CPU during "
            + ", ".join(f"{r['model']} xla={r['jit_compile']} spe={r['steps_per_execution']} "
                        f"({r['other_processes_cores']:.2f} cores)" for r in busy)
            + "; those rows are less reliable.",
            "",
        ]
    lines += [
        "## 1. Training step time: dense vs static mask vs DST",
        "",
        f"Settings ([how to read]({NOTES}#1-training-step-time)):",
        "",
    ] + _settings([
        ("data", "Fashion-MNIST train split, scaled to [0, 1]"),
        ("batch size", cfg["batch_size"]),
        ("optimizer", "SGD(0.01, momentum=0.9)"),
        ("sparse models", f"ftk.sparsify(model, {cfg['sparsity']}, distribution=\"erk\", "
                          f"seed={cfg['seed']})"),
        ("DST", f"ftk.DynamicSparsity(update_every={every}, "
                f"drop_fraction={cfg['drop_fraction']}, grow=\"gradient\", "
                f"end_step={cfg['dst_end_step']})"),
        ("rounds", cfg["rounds"]),
        ("timed steps per round", cfg["steps"]),
        ("mask updates per timed round of DST", cfg["steps"] // every),
    ]) + [
        "",
        "| model | XLA | steps_per_execution | dense ms/step | static-mask ms/step | DST ms/step "
        "| ratio DST/dense | ratio static/dense | DST/dense of medians | updates |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["step_time"]:
        s = r["ms_per_step"]
        ratio = r["ratio_dst_dense"]["min"]
        mark = "" if ratio is None or ratio <= TARGET_RATIO else " ✗"
        check = "" if r["update_checks"] == ["ok"] else " (check failed)"
        lines.append(
            _setting_cells(r)
            + f"| {_f(s['dense']['min'])} | {_f(s['static']['min'])} | {_f(s['dst']['min'])} "
            f"| {_f(ratio, 3)}{mark} | {_f(r['ratio_static_dense']['min'], 3)} "
            f"| {_f(r['ratio_dst_dense']['median'], 3)} "
            f"| {r['mask_updates_per_timed_round']}{check} |"
        )
    ratios = [r["ratio_dst_dense"]["min"] for r in report["step_time"]
              if r["ratio_dst_dense"]["min"] is not None]
    meeting = sum(1 for x in ratios if x <= TARGET_RATIO)
    lines += [
        "",
        f"✗ = above the {TARGET_RATIO:.2f} target. {meeting} of {len(ratios)} rows meet it"
        + (f"; DST/dense ranges from {min(ratios):.3f} to {max(ratios):.3f}." if ratios else "."),
        "",
        "### Where the sparse step's time goes",
        "",
        f"Columns: [how to read]({NOTES}#where-the-sparse-steps-time-goes); *amortised* = "
        f"update spike / {every}.",
        "",
        "| model | XLA | steps_per_execution | masking ms/step | DST plain step ms "
        "| update spike ms | dense control ms | amortised ms/step "
        "| tracing, first fit: dense / static / DST s | later fits: dense / static / DST s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in report["step_time"]:
        b = r["breakdown"]
        fo = r["first_execution_overhead_s"]
        first = [_first_fit_tracing(r, v) for v in VARIANTS]
        lines.append(
            _setting_cells(r)
            + f"| {_f(b['gradient_masking_ms_per_step'])} "
            f"| {_f(b['dst_plain_step_overhead_ms'])} | {_f(b['update_spike_ms'], 1)} "
            f"| {_f(b['control_spike_ms_dense'], 1)} | {_f(b['update_amortised_ms_per_step'])} "
            f"| {' / '.join(_f(v) for v in first)} "
            f"| {' / '.join(_f(fo[v]['median']) for v in VARIANTS)} |"
        )
    lines += [
        "",
        "## 2. One mask update, alone",
        "",
        f"Settings ([how to read]({NOTES}#2-one-mask-update-alone)):",
        "",
    ] + _settings([
        ("kernel", f"{cfg['update_size']}x{cfg['update_size']}, density "
                   f"{cfg['update_density']}, random normal weights, |normal| scores"),
        ("drop fraction", cfg["drop_fraction"]),
        ("timed calls after warm-up", cfg["update_reps"]),
        ("dense MLP steps the last column compares with", every),
    ]) + [
        "",
        "| jit_compile | function | ms per update (min) | median | ms per 1M weights "
        f"| est. ms per MLP update | est. MLP update / {every} dense MLP steps |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for u in report["mask_update"]:
        frac = u.get("mlp_update_fraction_of_100_dense_mlp_steps") or {}
        frac_text = ", ".join(f"spe={k}: {_pct(v)}" for k, v in frac.items()) or "n/a (no MLP row)"
        lines.append(
            f"| {'on' if u['jit_compile'] else 'off'} "
            f"| `{u.get('function', 'ftk.masks.update_mask').rsplit('.', 1)[-1]}` "
            f"| {_f(u['ms']['min'])} "
            f"| {_f(u['ms']['median'])} | {_f(u['ms_per_1m_weights']['min'])} "
            f"| {_f(u.get('est_ms_per_mlp_update'))} | {frac_text} |"
        )
    if report["mask_update"] and "mlp_masked_positions" in report["mask_update"][0]:
        lines += ["", f"MLP masked kernel positions: "
                  f"{report['mask_update'][0]['mlp_masked_positions']:,}."]
    lines += _tfmot_section(report)
    lines += _memory_section(report)
    lines += [
        "",
        f"How to read these tables: [{NOTES}]({NOTES}).",
        "",
    ]
    return "\n".join(lines) + "\n"


def _tfmot_section(report):
    cfg = report["config"]
    tfmot = report["tfmot"]
    versions = tfmot.get("versions") or {}
    tcfg = tfmot.get("config") or {}
    lines = [
        "",
        "## 3. Against tfmot: prune_low_magnitude on tf_keras",
        "",
        f"Settings ([how to read]({NOTES}#3-against-tfmot)):",
        "",
    ] + _settings([
        ("tfmot", f"prune_low_magnitude(model, pruning_schedule=ConstantSparsity("
                  f"{cfg['sparsity']}, begin_step=0, frequency={cfg['update_every']})) with "
                  "UpdatePruningStep(), by bench/tfmot_baseline.py (TF_USE_LEGACY_KERAS=1)"),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or "-"),
        ("rounds", tcfg.get("rounds", cfg["rounds"])),
        ("timed steps per round", tcfg.get("steps", cfg["steps"])),
        ("XLA", "off"),
    ]) + [
        "",
    ]
    labels = {k: v[0] for k, v in MODELS.items()}
    lines += bench_tables.comparison_markdown(report["comparison"], labels, cfg["update_every"])
    rows = [r for r in report["comparison"]
            if r["ftk_ratio"] is not None and r["tfmot_ratio"] is not None]
    if rows:
        lines += [
            "",
            "Overhead over each framework's own dense model: ft_keras DST "
            + ", ".join(f"{100 * (r['ftk_ratio'] - 1):+.1f}%" for r in rows)
            + "; tfmot " + ", ".join(f"{100 * (r['tfmot_ratio'] - 1):+.1f}%" for r in rows)
            + " (rows in table order).",
        ]
    busy = [r for r in tfmot.get("rows", [])
            if (r.get("other_processes_cores") or 0.0) > CONTENTION_WARNING]
    if busy:
        lines += ["", "**Warning:** other processes used the CPU during the tfmot rows "
                  + ", ".join(f"{r['model']} spe={r['steps_per_execution']} "
                              f"({r['other_processes_cores']:.2f} cores)" for r in busy) + "."]
    return lines


def _memory_section(report):
    memory = report["peak_memory"]
    lines = ["", "## 4. Peak memory: dense vs static mask vs DST", ""]
    if memory.get("status") not in ("ok", "partly failed"):
        return lines + [memory.get("reason", "not measured"), ""]
    cfg = memory["config"]
    target = cfg["target_ratio"]
    lines += [f"Settings ([how to read]({NOTES}#4-peak-memory)):", ""] + _settings([
        ("model", cfg["model"]),
        ("batch size", cfg["batch_size"]),
        ("optimizer", "SGD(0.01, momentum=0.9)"),
        ("steps", cfg["steps"]),
        ("examples", cfg["examples"]),
        ("static", f"sparsify {cfg['sparsity']} ERK + StaticSparsity"),
        ("dst", f"DynamicSparsity(update_every={cfg['update_every']}, "
                f"drop_fraction={cfg['drop_fraction']}, grow=\"gradient\")"),
        ("target peak / dense", target),
    ]) + [""]
    lines += bench_tables.memory_markdown(memory["rows"], target)
    children = memory.get("children", {})
    acc_allocator = "system" if memory["accounting"].get("system") else "default"
    accounting = memory["accounting"].get(acc_allocator) or {}
    if accounting:
        lines += [
            "",
            f"### Where the extra bytes go ({acc_allocator} allocator)",
            "",
            f"Columns: [how to read]({NOTES}#where-the-extra-bytes-go).",
            "",
        ]
        for variant, rows in accounting.items():
            lines += bench_tables.accounting_markdown(rows, variant) + [""]
        lines += ["The two big selections alone, on the largest layer "
                  f"([how to read]({NOTES}#the-two-big-selections-alone)):", ""]
        lines += bench_tables.alone_markdown(children.get(acc_allocator, {}))
    note = _xla_note(children)
    if note:
        lines += ["", note.strip()]
    lines += ["", f"How to reduce the extra memory: "
              f"[{NOTES}]({NOTES}#how-to-reduce-the-extra-memory).", ""]
    return lines


def _xla_note(children):
    """A sentence on what XLA-compiling the selections did to their transients, from the data."""
    for by_variant in (children.get("system") or {}, children.get("default") or {}):
        for child in by_variant.values():
            parts = []
            for what, key, plain, compiled in (
                    ("the initial-mask draw", "mask_draw_alone", "called eagerly",
                     "XLA-compiled"),
                    ("one mask update", "update_alone", "on the path of training without XLA",
                     "on the static-shape path of jit_compile=True training on several "
                     "replicas")):
                eager = (child.get(key) or {}).get("increment")
                xla = (child.get(key + "_xla") or {}).get("increment")
                if eager is None or xla is None:
                    continue
                parts.append(f"{what} takes {eager / 2**20:.0f} MiB {plain} and "
                             f"{xla / 2**20:.0f} MiB {compiled}")
            if parts:
                return " Measured alone (last table), " + "; ".join(parts) + "."
    return ""


def _path(path):
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if FLAGS.render_only:
        with open(_path(FLAGS.render_only), encoding="utf-8") as f:
            report = json.load(f)
        report["config"]["target_ratio"] = TARGET_RATIO
        bench_tables.write_keeping_regions(_path(FLAGS.output_md), _markdown(report))
        logging.info("rewrote %s from %s", FLAGS.output_md, FLAGS.render_only)
        return
    bench_tables.apply_quick(FLAGS, QUICK)
    settings = _settings()
    if FLAGS.steps <= 0 or FLAGS.rounds <= 0 or FLAGS.warmup_steps <= 0:
        raise app.UsageError("--steps, --rounds and --warmup_steps must be positive.")
    if FLAGS.steps % FLAGS.update_every:
        logging.warning(
            "--steps=%d is not a multiple of update_every=%d: timed windows will not all hold "
            "the same number of mask updates.", FLAGS.steps, FLAGS.update_every)
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], os.getcwd())] + sys.argv[1:])
    logging.info("%s", command)
    logging.info("settings: %s", settings)
    started = time.perf_counter()
    meter = bench_tables.CpuMeter()
    machine = _machine_info()

    max_spe = max(s[2] for s in settings) if settings else 1
    x_all, y_all = _load_data(max(FLAGS.steps + max_spe, FLAGS.warmup_steps) * FLAGS.batch_size)
    logging.info("data: %s float32 in [%.1f, %.1f]", x_all.shape, x_all.min(), x_all.max())

    step_time = []
    for model_name, xla, spe in settings:
        t0 = time.perf_counter()
        step_time.append(_bench_setting(model_name, xla, spe, x_all, y_all))
        logging.info("%s xla=%s spe=%s done in %.0f s", model_name, xla, spe,
                     time.perf_counter() - t0)

    updates = _bench_mask_update()
    _relate_update_to_mlp(updates, step_time, _mlp_masked_positions())
    tfmot = _run_tfmot(settings, x_all, y_all)
    memory = _run_memory()

    report = {
        "command": command,
        "machine": machine,
        "config": {
            "models": [s[0] for s in settings],
            "settings": [{"model": a, "jit_compile": b, "steps_per_execution": c}
                         for a, b, c in settings],
            "steps": FLAGS.steps,
            "rounds": FLAGS.rounds,
            "warmup_steps": FLAGS.warmup_steps,
            "batch_size": FLAGS.batch_size,
            "sparsity": FLAGS.sparsity,
            "distribution": "erk",
            "update_every": FLAGS.update_every,
            "drop_fraction": FLAGS.drop_fraction,
            "grow": "gradient",
            "dst_end_step": DST_END_STEP,
            "optimizer": "SGD(0.01, momentum=0.9)",
            "update_size": FLAGS.update_size,
            "update_density": FLAGS.update_density,
            "update_reps": FLAGS.update_reps,
            "seed": FLAGS.seed,
            "quick": FLAGS.quick,
            "target_ratio": TARGET_RATIO,
        },
        "step_time": step_time,
        "mask_update": updates,
        "tfmot": tfmot,
        "comparison": bench_tables.comparison_rows(step_time, tfmot),
        "peak_memory": memory,
        "total_wall_s": time.perf_counter() - started,
        "other_processes_cores": meter.others_cores(),
    }
    end_commit = _machine_info()["git_commit"]
    if end_commit != machine["git_commit"]:
        logging.warning("the repository changed during the run: %s -> %s",
                        machine["git_commit"], end_commit)
        report["machine"]["git_commit_at_end"] = end_commit
    path = _path(FLAGS.output_json)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(report, indent=1) + "\n")
    logging.info("wrote %s", path)
    # The markdown keeps the sections other scripts own (e.g. bench/serving.py's).
    bench_tables.write_keeping_regions(_path(FLAGS.output_md), _markdown(report))
    logging.info("wrote %s", _path(FLAGS.output_md))
    logging.info("total %.0f s", report["total_wall_s"])


if __name__ == "__main__":
    app.run(main)
