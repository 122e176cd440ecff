"""Serving cost of FreeTickets ensembles: SavedModel size and latency, as TF Serving runs them.

For each architecture (LeNet-300-100, LeNet-5, an MLP 784-1024-1024-10) it writes these
SavedModels with ft_keras's public API and times them side by side in this process:

  dense      one dense model of full width (``ft_keras.tickets.write_ticket``);
  keras      the same model exported by Keras (``model.export``): the reference without
             ft_keras's request checks;
  separate   an M = 3 ensemble of plain Keras members at 1/3 of the width (what channel-level
             sparsity and ``ftk.compact`` give), ``Ensemble.export(group_members="none")``: one
             op per member and layer;
  conv       the same ensemble, ``Ensemble.export()`` (``group_members="convolutions"``, the
             default): convolutions as one op for all members, Dense layers per member;
  grouped    the same ensemble, ``Ensemble.export(group_members="all")``: one op per layer for
             all members;
  sparse     an M = 3 ensemble of full-width members with unstructured masks at sparsity
             ``--sparsity`` (``ftk.sparsify``), ``Ensemble.export()``, for reference.

A second table times the opt-in sparse kernels: one ticket of a wide MLP
(``--kernel_models``) at ``--kernel_sparsity``, written with ``sparse_kernels="dense"``,
``"csr"`` and ``"coo"``.

Members are freshly initialised (untrained): size and latency depend on shapes and densities,
not on weight values. Every SavedModel is loaded and timed as bench/latency.py describes
(``serving_default`` as TF Serving calls it; ``--rounds`` interleaved rounds of ``--seconds``
per variant; p50 and paired ratio to the dense model as medians over rounds). Sizes are the
bytes of the files of each SavedModel folder.

Another process may use the CPU at the same time: each row records how many cores other
processes kept busy while it ran (``bench_tables.CpuMeter``).

How to run (from the repository root):

    python bench/serving.py                  # the full run
    python bench/serving.py --quick          # a smoke run (fewer rounds, shorter)
    python bench/serving.py --render_only=docs/serving.json   # rewrite the markdown only
"""

import datetime
import gc
import json
import os
import shlex
import shutil
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
import latency as timing  # noqa: E402  pylint: disable=wrong-import-position


def _lenet5(widths, name):
    """LeNet-5 (`ftk.models.lenet5`) with the given (conv1, conv2, fc1, fc2) widths."""
    conv1, conv2, fc1, fc2 = widths
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(conv1, 5, padding="same", activation="relu", name="conv1"),
        keras.layers.MaxPooling2D(2, name="pool1"),
        keras.layers.Conv2D(conv2, 5, padding="valid", activation="relu", name="conv2"),
        keras.layers.MaxPooling2D(2, name="pool2"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(fc1, activation="relu", name="fc1"),
        keras.layers.Dense(fc2, activation="relu", name="fc2"),
        keras.layers.Dense(10, name="logits"),
    ], name=name)


def _mlp(widths, name):
    return ftk.models.mlp(hidden=widths, name=name)


# key: (label, builder(widths, name), full widths)
MODELS = {
    "lenet_300_100": ("LeNet-300-100", _mlp, (300, 100)),
    "lenet5": ("LeNet-5", _lenet5, (6, 16, 120, 84)),
    "mlp_1024": ("MLP 784-1024-1024-10", _mlp, (1024, 1024)),
    "mlp_4096": ("MLP 784-4096-4096-10", _mlp, (4096, 4096)),
}
VARIANTS = ("dense", "keras", "separate", "conv", "grouped", "sparse")
VARIANT_NAMES = {
    "dense": "one dense model (ticket SavedModel)",
    "keras": "one dense model (Keras model.export)",
    "separate": "M=3 at 1/3 width, group_members=\"none\"",
    "conv": "M=3 at 1/3 width, \"convolutions\" (default)",
    "grouped": "M=3 at 1/3 width, \"all\"",
    "sparse": "M=3 unstructured at full width",
}
GROUPING = {"separate": "none", "conv": "convolutions", "grouped": "all"}
KERNELS = ("dense", "csr", "coo")
# Targets of the issue: ensemble / dense p50 at batch 64 (marked on the default, "conv").
TARGETS = {"lenet_300_100": 1.0, "lenet5": 1.0, "mlp_1024": 0.5}
TARGET_BATCH = 64

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Smoke run: 3 rounds of 0.05 s, batches 1 and 64 for the "
                  "sparse-kernel table.")
flags.DEFINE_list("models", ["lenet_300_100", "lenet5", "mlp_1024"],
                  f"Architectures of the ensemble table, from {list(MODELS)}.")
flags.DEFINE_list("kernel_models", ["mlp_4096"],
                  f"Architectures of the sparse-kernel table, from {list(MODELS)} (empty: none).")
flags.DEFINE_list("batches", ["1", "64", "256"], "Request batch sizes.")
flags.DEFINE_list("kernel_batches", ["1", "64", "256"], "Batch sizes of the sparse-kernel table.")
flags.DEFINE_integer("members", 3, "Ensemble size M.")
flags.DEFINE_float("sparsity", 0.8, "Sparsity of the unstructured members.")
flags.DEFINE_float("kernel_sparsity", 0.98, "Sparsity of the sparse-kernel table's ticket.")
flags.DEFINE_integer("rounds", 15, "Interleaved rounds per batch size.")
flags.DEFINE_float("seconds", 0.2, "Seconds of calls per variant and round (>= 3 calls).")
flags.DEFINE_string("output_json", "docs/serving.json", "Where to write the raw results.")
flags.DEFINE_string("output_md", "docs/benchmarks.md",
                    "Markdown file whose 'serving' region receives the tables.")
flags.DEFINE_integer("seed", 0, "Seed for weights and masks.")
flags.DEFINE_string("note", "", "A line printed above the tables (e.g. that the machine was busy).")
flags.DEFINE_string("render_only", None,
                    "Rewrite the markdown from this JSON report (no measurement).")


def _plan_rows(members, **kwargs):
    return [{"layer": r.layer, "members": r.members, "shape": list(r.shape), "nnz": r.nnz,
             "storage": list(r.storage), "kernels": r.kernels}
            for r in ftk.export.kernel_plan(members, **kwargs)]


def _ticket(model, folder, **kwargs):
    return os.path.join(ftk.tickets.write_ticket(model, folder, 0, **kwargs), "saved_model", "1")


# ------------------------------------------------------------------------ ensemble rows
def _build(key, fraction, seed, name):
    _, builder, widths = MODELS[key]
    keras.utils.set_random_seed(seed)
    return builder(tuple(max(1, round(w * fraction)) for w in widths), name)


def _ensemble_row(key, batches, workdir):
    label, _, widths = MODELS[key]
    meter = bench_tables.CpuMeter()
    m = FLAGS.members
    dense = _build(key, 1.0, FLAGS.seed, "dense")
    narrow = [_build(key, 1.0 / m, FLAGS.seed + 1 + i, f"member{i}") for i in range(m)]
    unstructured = [ftk.sparsify(_build(key, 1.0, FLAGS.seed + 10 + i, f"sparse{i}"),
                                 sparsity=FLAGS.sparsity, seed=FLAGS.seed + i) for i in range(m)]
    started = time.perf_counter()
    paths = {"dense": _ticket(dense, os.path.join(workdir, "dense")),
             "keras": os.path.join(workdir, "keras")}
    dense.export(paths["keras"], verbose=False)
    for name, grouping in GROUPING.items():
        paths[name] = ftk.Ensemble(narrow, combine="probs").export(
            os.path.join(workdir, name), group_members=grouping)
    paths["sparse"] = ftk.Ensemble(unstructured, combine="probs").export(
        os.path.join(workdir, "sparse"))
    export_seconds = time.perf_counter() - started
    fns = {name: timing.signature(path) for name, path in paths.items()}
    rng = np.random.default_rng(FLAGS.seed)
    shape = tuple(ftk.export.model_input_shape(dense))
    x_check = tf.constant(rng.random((16,) + shape, dtype=np.float32))
    reference = fns["separate"](x_check)["probabilities"].numpy()
    gap = max(float(np.max(np.abs(fns[name](x_check)["probabilities"].numpy() - reference)))
              for name in ("conv", "grouped"))
    latency = {}
    for batch in batches:
        x = tf.constant(rng.random((batch,) + shape, dtype=np.float32))
        latency[str(batch)] = timing.interleaved(fns, x, FLAGS.rounds, FLAGS.seconds, "dense")
        logging.info("%s batch %d: %s", key, batch,
                     {n: round(v["ratio"], 3) for n, v in latency[str(batch)].items()})
    sizes = {name: ftk.export.saved_model_bytes(path) for name, path in paths.items()}
    row = {
        "model": key,
        "label": label,
        "widths": list(widths),
        "member_widths": [max(1, round(w / m)) for w in widths],
        "members": m,
        "sparsity": FLAGS.sparsity,
        "sizes_bytes": sizes,
        "size_ratios": {n: bench_tables.ratio(sizes[n], sizes["dense"]) for n in sizes},
        "latency_ms": latency,
        "plan_grouped": _plan_rows(narrow, group_members="all"),
        "plan_sparse": _plan_rows(unstructured),
        "max_abs_gap_grouped_vs_separate_probabilities": gap,
        "export_seconds": export_seconds,
        "other_processes_cores": meter.others_cores(),
    }
    del fns, dense, narrow, unstructured
    gc.collect()
    return row


def _kernel_row(key, batches, workdir):
    label = MODELS[key][0]
    meter = bench_tables.CpuMeter()
    model = ftk.sparsify(_build(key, 1.0, FLAGS.seed, "ticket"), sparsity=FLAGS.kernel_sparsity,
                         seed=FLAGS.seed)
    paths = {k: _ticket(model, os.path.join(workdir, k), sparse_kernels=k) for k in KERNELS}
    fns = {name: timing.signature(path) for name, path in paths.items()}
    rng = np.random.default_rng(FLAGS.seed)
    shape = tuple(ftk.export.model_input_shape(model))
    latency = {}
    for batch in batches:
        x = tf.constant(rng.random((batch,) + shape, dtype=np.float32))
        latency[str(batch)] = timing.interleaved(fns, x, FLAGS.rounds, FLAGS.seconds, "dense")
    row = {
        "model": key,
        "label": label,
        "sparsity": FLAGS.kernel_sparsity,
        "density": ftk.sparsity_report(model).density,
        "latency_ms": latency,
        "plan": _plan_rows([model]),
        "other_processes_cores": meter.others_cores(),
    }
    del fns, model
    gc.collect()
    return row


# ----------------------------------------------------------------------------- markdown
def _f(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mb(value):
    return "n/a" if value is None else f"{value / 1e6:.2f}"


def _markdown(report):
    batches = report["batches"]
    lines = [
        "Generated by `bench/serving.py` (raw numbers and per-round times in `serving.json`). "
        "Command:",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"Machine: {report['host']['cpus_usable']} usable CPU cores, "
        f"{report['host']['cpu_model']}, TensorFlow {report['versions']['tensorflow']}, Keras "
        f"{report['versions']['keras']}; started {report['started']}, commit "
        f"`{report['host']['git_commit']}`, run time {report['seconds'] / 60:.1f} min; "
        f"{report['rounds']} interleaved rounds of {report['seconds_per_round']} s per batch "
        "size.",
    ]
    if report.get("note"):
        lines += ["", f"**Note:** {report['note']}"]
    lines += [
        "",
        f"### M = {report['members']} ensembles against one dense model",
        "",
        "p50 ms per request (median over rounds) and, in brackets, the median paired ratio to "
        "the dense model. Targets (ensemble / dense at batch "
        f"{TARGET_BATCH}, marked on the default): " + ", ".join(f"{MODELS[k][0]} <= {v}" for k, v in TARGETS.items())
        + ".",
        "",
        "| model | batch | " + " | ".join(VARIANT_NAMES[v] for v in VARIANTS)
        + " | cores used by others |",
        "|---|---:|" + "---:|" * len(VARIANTS) + "---:|",
    ]
    for r in report["rows"]:
        for batch in batches:
            lat = r["latency_ms"][str(batch)]
            cells = []
            for v in VARIANTS:
                text = f"{_f(lat[v]['p50_ms'], 3)} ({_f(lat[v]['ratio'])})"
                target = TARGETS.get(r["model"])
                if v == "conv" and batch == TARGET_BATCH and target is not None:
                    text += " ✓" if lat[v]["ratio"] <= target else " ✗"
                cells.append(text)
            lines.append(f"| {r['label']} | {batch} | " + " | ".join(cells)
                         + f" | {_f(r['other_processes_cores'])} |")
    lines += ["", "Size on disk (MB, ratio to the dense model's ticket SavedModel):", "",
              "| model | member widths | " + " | ".join(VARIANTS) + " |",
              "|---|---|" + "---:|" * len(VARIANTS)]
    for r in report["rows"]:
        s, q = r["sizes_bytes"], r["size_ratios"]
        lines.append(f"| {r['label']} | {r['member_widths']} | "
                     + " | ".join(f"{_mb(s[v])} ({_f(q[v])})" for v in VARIANTS) + " |")
    lines += ["", "Largest difference of `probabilities` between the grouped variants and "
              "separate: " + ", ".join(
                  f"{r['label']} {r['max_abs_gap_grouped_vs_separate_probabilities']:.1e}"
                  for r in report["rows"]) + "."]
    if report.get("kernel_rows"):
        lines += ["", "### Opt-in sparse kernels (`sparse_kernels=`), one ticket", "",
                  "p50 ms per request (median paired ratio to `sparse_kernels=\"dense\"`).", "",
                  "| model | sparsity | batch | dense | csr | coo | cores used by others |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in report["kernel_rows"]:
            for batch in report["kernel_batches"]:
                lat = r["latency_ms"][str(batch)]
                cells = " | ".join(f"{_f(lat[k]['p50_ms'], 3)} ({_f(lat[k]['ratio'])})"
                                   for k in KERNELS)
                lines.append(f"| {r['label']} | {r['sparsity']:.2f} | {batch} | {cells} "
                             f"| {_f(r['other_processes_cores'])} |")
    return "\n".join(lines) + "\n"


def _command():
    return shlex.join(["python", "bench/serving.py"] + sys.argv[1:])


def _positive_ints(values, flag):
    try:
        return bench_tables.parse_positive_ints(values, flag)
    except ValueError as error:
        raise app.UsageError(str(error)) from None


def _known(values, flag):
    keys = [m.strip() for m in values if m.strip()]
    unknown = [m for m in keys if m not in MODELS]
    if unknown:
        raise app.UsageError(f"--{flag}: unknown {unknown}; choose from {list(MODELS)}.")
    return keys


def _rows(keys, make, batches):
    rows = []
    for key in keys:
        workdir = tempfile.mkdtemp(prefix="ftk-serving-")
        try:
            rows.append(make(key, batches, workdir))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print(f"{key}: ratios to dense by batch "
              + "; ".join(f"{b}: " + ", ".join(f"{n} {v['ratio']:.2f}" for n, v in lat.items())
                          for b, lat in rows[-1]["latency_ms"].items()), flush=True)
    return rows


def main(argv):
    del argv
    if FLAGS.render_only:
        with open(FLAGS.render_only, encoding="utf-8") as f:
            report = json.load(f)
        bench_tables.replace_region(FLAGS.output_md, "serving", _markdown(report))
        print(f"rewrote the 'serving' region of {FLAGS.output_md} from {FLAGS.render_only}")
        return
    bench_tables.apply_quick(FLAGS, {"rounds": 3, "seconds": 0.05,
                                     "kernel_batches": ["1", "64"]})
    models = _known(FLAGS.models, "models")
    kernel_models = _known(FLAGS.kernel_models, "kernel_models")
    batches = _positive_ints(FLAGS.batches, "batches")
    kernel_batches = _positive_ints(FLAGS.kernel_batches, "kernel_batches")
    started = time.perf_counter()
    report = {
        "command": _command(),
        "note": FLAGS.note,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": bench_tables.host_info(_REPO),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "numpy": np.__version__, "ft_keras": ftk.__version__},
        "members": FLAGS.members,
        "batches": batches,
        "kernel_batches": kernel_batches,
        "rounds": FLAGS.rounds,
        "seconds_per_round": FLAGS.seconds,
    }
    report["rows"] = _rows(models, _ensemble_row, batches)
    report["kernel_rows"] = _rows(kernel_models, _kernel_row, kernel_batches)
    report["seconds"] = time.perf_counter() - started
    bench_tables.write_text(FLAGS.output_json, json.dumps(
        report, indent=1, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)) + "\n")
    if FLAGS.output_md:
        bench_tables.replace_region(FLAGS.output_md, "serving", _markdown(report))
    print(f"wrote {FLAGS.output_json} and the 'serving' region of {FLAGS.output_md} "
          f"({report['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    app.run(main)
