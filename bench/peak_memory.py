"""Peak memory (max RSS) of dense vs static-mask vs dynamic sparse training, one process each.

Each variant trains ``ftk.models.mlp(hidden=(4096, 4096))`` (784-4096-4096-10, ~20M weights) on a
fixed slice of Fashion-MNIST, batch 128, SGD(0.01, momentum=0.9), for ``--steps`` steps in a FRESH
child process, so that nothing one variant allocated is counted for another:

* ``dense``:  the plain model;
* ``static``: ``ftk.sparsify(model, 0.9, distribution="erk")`` with ``ftk.StaticSparsity()``;
* ``dst``:    the same with ``ftk.DynamicSparsity(update_every=100, drop_fraction=0.3,
  grow="gradient")`` (RigL; ``end_step`` far beyond the run, so that the updates at steps 100 and
  200 happen);
* optional: ``dst_random`` (grow="random", SET) and ``dst_momentum`` (grow="momentum", SNFS).

Inside the child (Linux ``/proc/self/status``): VmRSS right after importing TensorFlow / Keras /
ft_keras, VmRSS after building (and sparsifying) and compiling the model and the data (the
*baseline*), VmHWM at that point (*peak before training*: includes ``sparsify``, which holds the
dense model and its sparse copy at once); then the high-water mark is reset (``echo 5 >
/proc/self/clear_refs``) and VmHWM after ``fit`` is the *training peak*. Without the reset (old
kernels) the training peak is the whole process's ``getrusage(RUSAGE_SELF).ru_maxrss``. The
DST children then also measure one mask update of their largest layer alone (the public mask
algebra the callback's update runs, in a ``tf.function``) as a high-water increment over the RSS
before it, and
all sparse children the initial mask draw of that layer as ``sparsify`` does it (both also
XLA-compiled, for comparison); these run under the system allocator only, where RSS follows the
live tensors.

The parent compares each variant with ``dense`` (peak ratio; target <= 1.3) and accounts for the
extra bytes from the masked kernels' shapes (`bench_tables.memory_accounting`).

How to run (from the repository root); bench/step_overhead.py runs it and merges the table:

    python bench/peak_memory.py --output_json=/tmp/memory.json
    python bench/peak_memory.py --quick --output_json=-               # smoke run (20 steps)
    python bench/peak_memory.py --variants=dense,static,dst,dst_random,dst_momentum
"""

import gc
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_tables  # noqa: E402  pylint: disable=wrong-import-position

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("dense", "static", "dst", "dst_random", "dst_momentum")
GROW = {"dst": "gradient", "dst_random": "random", "dst_momentum": "momentum"}
DST_END_STEP = 10_000_000  # every multiple of update_every inside the run is an update step

FLAGS = flags.FLAGS
flags.DEFINE_list("variants", ["dense", "static", "dst"],
                  f"Variants to measure, each in its own process, from {list(VARIANTS)}.")
flags.DEFINE_list(
    "allocators", ["default", "system"],
    "TensorFlow CPU allocators to measure under, from {default, system}. default: what users "
    "get (with oneDNN on, TF pools large blocks and never returns them, so RSS is the pool's "
    "high-water mark); system: TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1 (freed tensors go back to the "
    "OS, so RSS follows live tensors and the byte accounting can be checked).")
flags.DEFINE_list("hidden", ["4096", "4096"], "Hidden widths of the MLP.")
flags.DEFINE_integer("steps", 150, "Training steps per child.")
flags.DEFINE_integer("update_every", 100, "DynamicSparsity update_every.")
flags.DEFINE_float("drop_fraction", 0.3, "DynamicSparsity drop_fraction.")
flags.DEFINE_float("sparsity", 0.9, "Overall sparsity (ERK).")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("examples", 2048, "Fashion-MNIST training examples cycled through.")
flags.DEFINE_integer("seed", 0, "Seed of weights and masks.")
flags.DEFINE_string("output_json", "-", "Where to write the report ('-': stdout).")
flags.DEFINE_bool(
    "quick", False,
    "Smoke run: steps=20, update_every=10, unless those flags are given explicitly.")
flags.DEFINE_string("child", "", "Internal: measure this one variant in this process.")
flags.DEFINE_string("child_output", "", "Internal: where the child writes its JSON.")

QUICK = {"steps": 20, "update_every": 10}
ALLOCATORS = {"default": {}, "system": {"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "1"}}


# ------------------------------------------------------------------------------ /proc reads
def _status_bytes(field):
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in bytes, or None."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _reset_peak():
    """Resets VmHWM to the current RSS (Linux >= 4.0); False if the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _ru_maxrss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


# ------------------------------------------------------------------------------------ flags
def _check_flags():
    variants = [v.strip() for v in FLAGS.variants if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise app.UsageError(f"--variants: unknown or empty {unknown}; choose from "
                             f"{list(VARIANTS)}.")
    if FLAGS.child and FLAGS.child not in VARIANTS:
        raise app.UsageError(f"--child={FLAGS.child!r}; choose from {list(VARIANTS)}.")
    allocators = [a.strip() for a in FLAGS.allocators if a.strip()]
    unknown = [a for a in allocators if a not in ALLOCATORS]
    if unknown or not allocators:
        raise app.UsageError(f"--allocators: unknown or empty {unknown}; choose from "
                             f"{list(ALLOCATORS)}.")
    try:
        hidden = bench_tables.parse_positive_ints(FLAGS.hidden, "hidden")
    except ValueError as exc:
        raise app.UsageError(str(exc)) from None
    for name in ("steps", "update_every", "batch_size", "examples"):
        if FLAGS[name].value <= 0:
            raise app.UsageError(f"--{name} must be positive; got {FLAGS[name].value}.")
    if not 0.0 < FLAGS.drop_fraction <= 1.0:
        raise app.UsageError(f"--drop_fraction must be in (0, 1]; got {FLAGS.drop_fraction}.")
    if not 0.0 <= FLAGS.sparsity < 1.0:
        raise app.UsageError(f"--sparsity must be in [0, 1); got {FLAGS.sparsity}.")
    if FLAGS.examples < FLAGS.batch_size:
        raise app.UsageError(f"--examples={FLAGS.examples} must be >= --batch_size.")
    return variants, hidden, allocators


# ------------------------------------------------------------------------------------ child
def _child(variant, hidden):
    """Trains one variant and returns its measurements (bytes, seconds)."""
    out = {"variant": variant, "rss_start": _status_bytes("VmRSS")}
    import keras  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    try:
        import ft_keras as ftk  # pylint: disable=import-outside-toplevel
    except ImportError:
        sys.path.insert(0, _REPO)
        import ft_keras as ftk  # pylint: disable=import-outside-toplevel
    out["rss_after_import"] = _status_bytes("VmRSS")

    images, y = bench_tables.fashion_mnist_slice(FLAGS.examples)
    x = images.astype(np.float32) / 255.0
    del images
    keras.utils.set_random_seed(FLAGS.seed)
    model = ftk.models.mlp(hidden=tuple(hidden))
    if variant != "dense":
        sparse = ftk.sparsify(model, FLAGS.sparsity, distribution="erk", seed=FLAGS.seed)
        del model
        model = sparse
    gc.collect()
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    data = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(
        FLAGS.batch_size, drop_remainder=True)
    if variant == "dense":
        callbacks = []
    elif variant == "static":
        callbacks = [ftk.StaticSparsity()]
    else:
        callbacks = [ftk.DynamicSparsity(
            update_every=FLAGS.update_every, drop_fraction=FLAGS.drop_fraction,
            grow=GROW[variant], end_step=DST_END_STEP, seed=FLAGS.seed)]
    gc.collect()
    out["rss_after_build"] = _status_bytes("VmRSS")
    out["peak_before_training"] = _status_bytes("VmHWM")
    out["peak_reset"] = _reset_peak()

    t0 = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=FLAGS.steps, verbose=0, callbacks=callbacks)
    out["train_wall_s"] = time.perf_counter() - t0
    out["rss_after_training"] = _status_bytes("VmRSS")
    out["ru_maxrss"] = _ru_maxrss_bytes()
    if out["peak_reset"]:
        out["training_peak"] = _status_bytes("VmHWM")
        out["lifetime_peak"] = max(out["peak_before_training"] or 0, out["training_peak"] or 0)
    else:  # no reset: the whole process's peak stands for both
        out["training_peak"] = out["ru_maxrss"]
        out["lifetime_peak"] = out["ru_maxrss"]

    def nbytes(variables):
        return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables))

    out["variables_bytes"] = {
        "model": nbytes(model.variables),
        "optimizer": nbytes(model.optimizer.variables),
    }
    masked = ftk.masked_layers(model) if variant != "dense" else []
    out["masked_layers"] = [
        {"name": layer.name, "shape": [int(d) for d in layer.masked_kernel.shape],
         "size": layer.kernel_size_total, "num_active": layer.num_active}
        for layer in masked
    ]
    out["allocator_env"] = {k: os.environ.get(k) for k in ALLOCATORS["system"]}
    if variant in GROW:
        seen = [u["step"] for u in callbacks[0].updates]
        out["last_mask_update_step"] = max(seen) if seen else None
    # The selections alone: only where RSS follows live tensors (under the default allocator a
    # pool already grown by training serves them, and the increments mean nothing).
    if masked and all(os.environ.get(k) == v for k, v in ALLOCATORS["system"].items()):
        t0 = time.perf_counter()
        if variant in GROW:
            out["update_alone"] = _update_alone(tf, ftk, masked, xla=False)
            out["update_alone_xla"] = _update_alone(tf, ftk, masked, xla=True)
        out["mask_draw_alone"] = _mask_draw_alone(tf, ftk, masked, xla=False)
        out["mask_draw_alone_xla"] = _mask_draw_alone(tf, ftk, masked, xla=True)
        out["alone_wall_s"] = time.perf_counter() - t0
    return out


def _alone(fn):
    """``(result, high-water increment in bytes over the RSS before)`` of one call of ``fn``."""
    gc.collect()
    before = _status_bytes("VmRSS")
    if before is None or not _reset_peak():
        return fn(), None
    result = fn()
    peak = _status_bytes("VmHWM")
    return result, None if peak is None else peak - before


def _mask_draw_alone(tf, ftk, masked, xla):
    """High-water increment of drawing the largest layer's initial mask.

    ``xla=False``: eagerly, as ``sparsify`` does; ``xla=True``: the same function compiled with
    XLA (fused elementwise passes), to show what compiling the selection would save.
    """
    layer = max(masked, key=lambda l: l.kernel_size_total)
    shape = tuple(int(d) for d in layer.masked_kernel.shape)
    seed = ftk.masks.rng_seed(FLAGS.seed + 1, -1, 0)
    num_active = layer.num_active
    if xla:
        draw = tf.function(lambda: ftk.masks.random_mask(shape, num_active, seed),
                           jit_compile=True)
        draw()  # compile outside the measured window
    else:
        ftk.masks.random_mask((8, 8), 4, seed)  # load the ops' kernels outside the window

        def draw():
            return ftk.masks.random_mask(shape, num_active, seed)
    result, increment = _alone(lambda: int(ftk.masks.count_active(draw())))
    if result != num_active:
        raise RuntimeError(f"random_mask drew {result} positions, not {num_active}")
    return {"layer": layer.name, "size": layer.kernel_size_total, "increment": increment}


def _update_alone(tf, ftk, masked, xla):
    """High-water increment of one mask update of the largest masked layer, run alone.

    Measured from outside the callback, with the public mask algebra its per-layer update runs
    (docs/method.md): the selection (`ftk.masks.update_mask_compacted`, the path of training
    without XLA; with ``xla=True`` `ftk.masks.update_mask`, the static-shape path, compiled),
    then the resets of the kernel and of one optimizer slot of its size
    (`ftk.masks.zero_off_mask`) and the new mask written, in a ``tf.function`` after training.
    A random normal tensor stands in for the step's gradient; the drop fraction is
    ``--drop_fraction``.
    """
    layer = max(masked, key=lambda item: item.kernel_size_total)
    variable = layer.masked_kernel
    num_active = layer.num_active
    gradient = tf.random.normal(tuple(variable.shape), seed=FLAGS.seed)
    slot = tf.Variable(tf.zeros(tuple(variable.shape), variable.dtype))  # a momentum slot
    fraction = tf.constant(FLAGS.drop_fraction, tf.float64)

    @tf.function(jit_compile=xla)
    def update(g):
        mask = tf.convert_to_tensor(layer.kernel_mask.value)
        weights = tf.convert_to_tensor(variable.value)
        if xla:
            new_mask, keep = ftk.masks.update_mask(mask, weights, tf.abs(g), fraction,
                                                   num_active)
        else:
            new_mask, keep = ftk.masks.update_mask_compacted(mask, weights, g, fraction,
                                                             num_active)[:2]
        variable.assign(ftk.masks.zero_off_mask(keep, weights))
        slot.assign(ftk.masks.zero_off_mask(keep, tf.convert_to_tensor(slot)))
        layer.kernel_mask.assign(new_mask)
        return ftk.masks.count_active(new_mask)

    try:
        update.get_concrete_function(gradient)  # trace outside the measured window
        active, increment = _alone(lambda: int(update(gradient)))
    except Exception as exc:  # pylint: disable=broad-except
        logging.warning("update alone (xla=%s) failed: %s", xla, exc)
        return {"layer": layer.name, "size": layer.kernel_size_total, "increment": None,
                "error": f"{type(exc).__name__}: {exc}"[:300]}
    if active != num_active:
        raise RuntimeError(f"update changed the active count: {active} != {num_active}")
    return {"layer": layer.name, "size": layer.kernel_size_total, "increment": increment}


# ----------------------------------------------------------------------------------- parent
def run_children(variants, allocators, argv):
    """One child process per (allocator, variant); {allocator: {variant: report or error}}."""
    results = {}
    passthrough = [a for a in argv[1:] if not a.startswith(("--output_json", "--child"))]
    with tempfile.TemporaryDirectory(prefix="ftk_memory_") as tmp:
        for allocator in allocators:
            env = dict(os.environ)
            for key in ALLOCATORS["system"]:
                env.pop(key, None)
            env.update(ALLOCATORS[allocator])
            results[allocator] = {}
            for variant in variants:
                path = os.path.join(tmp, f"{allocator}_{variant}.json")
                command = [sys.executable, os.path.abspath(__file__), f"--child={variant}",
                           f"--child_output={path}"] + passthrough
                logging.info("memory (%s allocator): %s", allocator, shlex.join(command))
                t0 = time.perf_counter()
                proc = subprocess.run(command, capture_output=True, text=True, check=False,
                                      env=env)
                if proc.returncode != 0 or not os.path.exists(path):
                    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
                    logging.error("memory child %s/%s failed (exit %d):\n%s", allocator,
                                  variant, proc.returncode, "\n".join(tail))
                    results[allocator][variant] = {
                        "error": f"exit code {proc.returncode}: "
                                 + (tail[-1] if tail else "no output")}
                    continue
                with open(path, encoding="utf-8") as f:
                    child = json.load(f)
                child["child_wall_s"] = time.perf_counter() - t0
                results[allocator][variant] = child
                logging.info(
                    "memory %s/%s: baseline %.0f MiB, peak before training %.0f MiB, training "
                    "peak %.0f MiB (%.0f s, %.0f s training)", allocator, variant,
                    child["rss_after_build"] / bench_tables.MIB,
                    child["peak_before_training"] / bench_tables.MIB,
                    child["training_peak"] / bench_tables.MIB, child["child_wall_s"],
                    child["train_wall_s"])
    return results


def build_report(children, hidden):
    """The parent's report: children, rows with ratios to dense, accounting per allocator."""
    rows, accounting = {}, {}
    for allocator, by_variant in children.items():
        rows[allocator] = bench_tables.memory_rows(by_variant)
        dense = by_variant.get("dense") or {}
        accounting[allocator] = {}
        if dense.get("error") or not dense:
            continue
        for variant, child in by_variant.items():
            if variant == "dense" or child.get("error"):
                continue
            accounting[allocator][variant] = bench_tables.memory_accounting(dense, child, variant)
    return {
        "config": {
            "model": f"MLP 784-{'-'.join(str(h) for h in hidden)}-10",
            "allocators": list(children),
            "allocator_env": ALLOCATORS,
            "steps": FLAGS.steps,
            "update_every": FLAGS.update_every,
            "drop_fraction": FLAGS.drop_fraction,
            "sparsity": FLAGS.sparsity,
            "distribution": "erk",
            "batch_size": FLAGS.batch_size,
            "examples": FLAGS.examples,
            "optimizer": "SGD(0.01, momentum=0.9)",
            "dst_end_step": DST_END_STEP,
            "quick": FLAGS.quick,
            "target_ratio": bench_tables.MEMORY_TARGET_RATIO,
        },
        "children": children,
        "rows": rows,
        "accounting": accounting,
    }


def _write(report, path):
    text = json.dumps(report, indent=1) + "\n"
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    logging.info("wrote %s", path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    bench_tables.apply_quick(FLAGS, QUICK)
    variants, hidden, allocators = _check_flags()
    if FLAGS.child:
        if not FLAGS.child_output:
            raise app.UsageError("--child needs --child_output.")
        _write(_child(FLAGS.child, hidden), FLAGS.child_output)
        return 0
    if "dense" not in variants:
        logging.warning("--variants has no 'dense': no ratios can be computed.")
    started = time.perf_counter()
    report = build_report(run_children(variants, allocators, sys.argv), hidden)
    report["command"] = "python " + shlex.join(
        [os.path.relpath(os.path.abspath(__file__), os.getcwd())] + sys.argv[1:])
    report["total_wall_s"] = time.perf_counter() - started
    for line in bench_tables.memory_markdown(report["rows"]):
        logging.info("%s", line)
    for allocator, by_variant in report["children"].items():
        logging.info("%s allocator:", allocator)
        for line in bench_tables.alone_markdown(by_variant):
            logging.info("%s", line)
        for variant, rows_ in report["accounting"][allocator].items():
            for line in bench_tables.accounting_markdown(rows_, variant):
                logging.info("%s", line)
    _write(report, FLAGS.output_json)
    failed = [f"{a}/{v}" for a, by in report["children"].items() for v, c in by.items()
              if "error" in c]
    return 1 if failed else 0


if __name__ == "__main__":
    app.run(main)
