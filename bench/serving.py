"""Serving cost of FreeTickets ensembles: SavedModel size and latency, as TF Serving runs them.

For each model (LeNet-300-100, an MLP 784-4096-4096-10, LeNet-5) and sparsity (0.8, 0.9, 0.95)
it writes four SavedModels and measures them side by side in this process:

  (a) one dense model of the architecture, exported by ft_keras (`ft_keras.tickets.write_ticket`
      of the plain model: its weights stored as they are);
  (b) one ticket: ``write_ticket`` of one sparse member (compact storage,
      ``sparse_kernels="auto"``);
  (c) the M = 3 ensemble exported the old way: ``Ensemble.export(storage="dense")`` (members
      stripped, full kernels, evaluated one after the other);
  (d) the M = 3 ensemble exported by ft_keras: ``Ensemble.export()`` (compact storage, kernels
      chosen per layer and batch size, fusion where the cost model says it pays).

Members are ``ftk.sparsify(model, sparsity, seed=s)`` (ERK densities) of freshly initialised
models: untrained, randomly sparsified. Size and latency depend on shapes and masks' densities,
not on the values of the weights. Each SavedModel is loaded with ``tf.saved_model.load`` and
called through its ``serving_default`` signature, as TF Serving calls it. For every batch size
the four variants are timed in alternating rounds (a, b, c, d, then b, c, d, a, ...); a round
calls one variant for ``--seconds`` (at least 3 calls); p50 and p99 are taken over the calls of a
round and the report keeps the min over rounds. Many short rounds (20 of 0.15 s) let every
variant meet the quiet moments of a shared machine: with 5 rounds of 0.3 s, other developers'
jobs inflated every round of the 2-thread dense products, which made the ensembles look
relatively faster than they are. Ratios are to (a). Sizes are the bytes of the
files of each SavedModel folder; the size of a Keras ``model.export()`` of the dense model is
reported too (Keras writes every variable twice).

``--calibrate`` also measures the kernels that ``ft_keras.export`` chooses from (one Dense layer
as dense / CSR / COO product at several shapes, densities and batch sizes), a convolution as
im2col patches + CSR product against the dense convolution, and one product for all members
("fused") against one per member; it fits the cost model whose constants
``ft_keras/export.py`` holds (``KERNEL_COST_US``, ``FUSE_MIN_BATCH``) and writes the data and the
fit to ``--calibration_json``.

Another developer may use the CPU at the same time: each row records how many cores other
processes kept busy while it ran (``bench_tables.CpuMeter``); the min over alternating rounds is
what resists that best.

How to run (from the repository root):

    python bench/serving.py                  # the full run (~10 minutes on 2 CPU cores)
    python bench/serving.py --calibrate      # the same, plus the kernel calibration (~4 min more)
    python bench/serving.py --quick --output_json=/tmp/s.json --output_md=/tmp/s.md   # smoke
"""

import datetime
import gc
import json
import os
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
from ft_keras import export as export_lib  # noqa: E402
from ft_keras import tickets as tickets_lib  # noqa: E402
from tensorflow.python.ops.linalg.sparse import sparse_csr_matrix_ops  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _BENCH)
import bench_tables  # noqa: E402  pylint: disable=wrong-import-position

MODELS = {
    "lenet_300_100": ("LeNet-300-100", lambda: ftk.models.lenet_300_100()),
    "mlp_4096": ("MLP 784-4096-4096-10", lambda: ftk.models.mlp(hidden=(4096, 4096))),
    "lenet5": ("LeNet-5", lambda: ftk.models.lenet5()),
}
VARIANTS = ("a", "b", "c", "d")
VARIANT_NAMES = {
    "a": "(a) one dense model",
    "b": "(b) one ticket",
    "c": "(c) M=3 ensemble, old export (dense kernels)",
    "d": "(d) M=3 ensemble, ft_keras export",
}
TARGET_SIZE_RATIO = 1.0  # size of (d) / (a) at sparsity >= 0.8
TARGET_LATENCY = ("mlp_4096", 0.95, 64)  # latency of (d) <= (a) there

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Smoke run: LeNet-300-100 at 0.9, batch 1 and 64, 2 rounds.")
flags.DEFINE_list("models", list(MODELS), f"Models, from {list(MODELS)}.")
flags.DEFINE_list("sparsities", ["0.8", "0.9", "0.95"], "Sparsities of the members.")
flags.DEFINE_list("batches", ["1", "64", "256"], "Request batch sizes.")
flags.DEFINE_integer("members", 3, "Ensemble size M.")
flags.DEFINE_integer("rounds", 20, "Alternating rounds per batch size (min over rounds).")
flags.DEFINE_float("seconds", 0.15, "Seconds of calls per variant and round (>= 3 calls).")
flags.DEFINE_bool("calibrate", False, "Also run the kernel calibration and fit the cost model.")
flags.DEFINE_integer("calibration_rounds", 6, "Alternating rounds of each calibration point.")
flags.DEFINE_float("calibration_seconds", 0.05, "Seconds per kernel and calibration round.")
flags.DEFINE_string("output_json", "docs/serving.json", "Where to write the raw results.")
flags.DEFINE_string("calibration_json", "docs/serving_calibration.json",
                    "Where --calibrate writes its data and fit; without --calibrate, the "
                    "report shows the calibration found there (if any).")
flags.DEFINE_string("output_md", "docs/benchmarks.md",
                    "Markdown file whose 'serving' region receives the tables.")
flags.DEFINE_integer("seed", 0, "Seed for weights and masks.")
flags.DEFINE_string("render_only", None,
                    "Rewrite the markdown from this JSON report (no measurement).")


# ------------------------------------------------------------------------------- timing
def _block(outputs):
    for value in tf.nest.flatten(outputs):
        value.numpy()


def _calls(fn, x, seconds, min_calls=3):
    """Per-call wall times (s) of ``fn(x)`` for about ``seconds`` (at least ``min_calls``)."""
    times = []
    end = time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < end:
        start = time.perf_counter()
        _block(fn(x))
        times.append(time.perf_counter() - start)
    return times


def _alternate(fns, x, rounds, seconds):
    """{name: {"p50_ms", "p99_ms", "mean_ms", "calls", "rounds"}}: mins over alternating rounds."""
    names = list(fns)
    min_calls = {}
    for name in names:  # warm-up: tracing, first-call allocations
        _block(fns[name](x))
        start = time.perf_counter()
        _block(fns[name](x))
        # A variant slower than a round's budget is called once per round.
        min_calls[name] = 1 if time.perf_counter() - start > seconds else 3
    per_round = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times = np.array(_calls(fns[name], x, seconds, min_calls[name])) * 1e3
            per_round[name].append({
                "p50": float(np.percentile(times, 50)),
                "p99": float(np.percentile(times, 99)),
                "mean": float(times.mean()),
                "calls": int(times.size),
            })
    out = {}
    for name, stats in per_round.items():
        out[name] = {
            "p50_ms": min(s["p50"] for s in stats),
            "p99_ms": min(s["p99"] for s in stats),
            "mean_ms": min(s["mean"] for s in stats),
            "calls": sum(s["calls"] for s in stats),
            "rounds": stats,
        }
    return out


# ------------------------------------------------------------------------ serving rows
def _members(build, sparsity, count, seed):
    out = []
    for m in range(count):
        keras.utils.set_random_seed(seed + 1000 * (m + 1))
        out.append(ftk.sparsify(build(), sparsity=sparsity, seed=seed + m))
    return out


def _serving_row(key, sparsity, batches, workdir):
    label, build = MODELS[key]
    meter = bench_tables.CpuMeter()
    keras.utils.set_random_seed(FLAGS.seed)
    dense = build()
    members = _members(build, sparsity, FLAGS.members, FLAGS.seed)
    ensemble = ftk.Ensemble(members, combine="probs")
    paths = {}
    started = time.perf_counter()
    paths["a"] = os.path.join(tickets_lib.write_ticket(dense, os.path.join(workdir, "a"), 0),
                              "saved_model", "1")
    paths["b"] = os.path.join(tickets_lib.write_ticket(members[0], os.path.join(workdir, "b"), 0),
                              "saved_model", "1")
    paths["c"] = ensemble.export(os.path.join(workdir, "c"), storage="dense")
    paths["d"] = ensemble.export(os.path.join(workdir, "d"))
    keras_export = os.path.join(workdir, "a_keras")
    dense.export(keras_export, verbose=False)
    export_seconds = time.perf_counter() - started
    sizes = {name: export_lib.saved_model_bytes(path) for name, path in paths.items()}
    sizes["a_keras_export"] = export_lib.saved_model_bytes(keras_export)
    plan = [
        {"layer": r.layer, "members": r.members, "shape": list(r.shape), "nnz": r.nnz,
         "storage": list(r.storage), "kernels": r.kernels}
        for r in export_lib.kernel_plan(members)
    ]
    signatures = {
        name: tf.saved_model.load(path).signatures[export_lib.SERVING_SIGNATURE]
        for name, path in paths.items()
    }
    rng = np.random.default_rng(FLAGS.seed)
    shape = tuple(export_lib.model_input_shape(dense))
    # The two ensemble exports compute the same function: check it on one batch.
    x_check = tf.constant(rng.random((16,) + shape, dtype=np.float32))
    gap = float(np.max(np.abs(
        signatures["c"](inputs=x_check)["probabilities"].numpy()
        - signatures["d"](inputs=x_check)["probabilities"].numpy())))
    latency = {}
    for batch in batches:
        x = tf.constant(rng.random((batch,) + shape, dtype=np.float32))
        fns = {name: (lambda inputs, s=sig: s(inputs=inputs)) for name, sig in signatures.items()}
        latency[str(batch)] = _alternate(fns, x, FLAGS.rounds, FLAGS.seconds)
        logging.info("%s %.2f batch %d: %s", key, sparsity, batch, {
            n: round(v["p50_ms"], 3) for n, v in latency[str(batch)].items()})
    report = ftk.sparsity_report(members[0])
    row = {
        "model": key,
        "label": label,
        "sparsity": sparsity,
        "member_density": report.density,
        "members": FLAGS.members,
        "sizes_bytes": sizes,
        "size_ratios": {name: bench_tables.ratio(sizes[name], sizes["a"]) for name in VARIANTS},
        "size_ratio_d_to_keras_export": bench_tables.ratio(sizes["d"], sizes["a_keras_export"]),
        "latency_ms": latency,
        "p50_ratios": {b: {n: bench_tables.ratio(v["p50_ms"], lat["a"]["p50_ms"])
                           for n, v in lat.items()} for b, lat in latency.items()},
        "p99_ratios": {b: {n: bench_tables.ratio(v["p99_ms"], lat["a"]["p99_ms"])
                           for n, v in lat.items()} for b, lat in latency.items()},
        "plan_d": plan,
        "max_abs_gap_c_vs_d_probabilities": gap,
        "export_seconds": export_seconds,
        "other_processes_cores": meter.others_cores(),
    }
    del signatures, ensemble, members, dense
    gc.collect()
    return row


# ---------------------------------------------------------------------------- calibration
def _dense_layer_model(n_in, n_out, density, seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((n_in,)), keras.layers.Dense(n_out, use_bias=False)])
    return ftk.sparsify(model, sparsity=1.0 - density, distribution="uniform", seed=seed)


def _serve_fn(models, sparse_kernels, fuse):
    module, serve, _ = export_lib.build_serving(
        models, lambda logits: {"y": logits}, sparse_kernels=sparse_kernels, fuse=fuse)
    export_lib.initialize(module)
    return lambda x, s=serve, m=module: s(x)


CAL_SHAPES = [(256, 256), (784, 300), (1024, 1024), (784, 4096), (4096, 1024), (4096, 4096)]
CAL_DENSITIES = [0.01, 0.03, 0.1, 0.3]
CAL_MAX_NNZ = 2_000_000  # larger layers are skipped (seconds per call for the slow kernels)
CAL_BATCHES = [1, 8, 64, 256]
CONV_CASES = [  # (height, kernel, in, out, density, padding)
    (14, 5, 6, 16, 0.1, "VALID"),    # LeNet-5's conv2 at sparsity 0.9
    (32, 3, 64, 64, 0.05, "SAME"),
    (16, 3, 256, 256, 0.02, "SAME"),
]
FUSE_BATCHES = [1, 16, 64, 128, 256, 512, 1024]


def _calibrate_dense_layers(rng, shapes, densities, batches):
    points = []
    for n_in, n_out in shapes:
        for density in densities:
            if density * n_in * n_out > CAL_MAX_NNZ:
                continue
            model = _dense_layer_model(n_in, n_out, density, FLAGS.seed)
            nnz = int(ftk.masked_layers(model)[0].num_active)
            fns = {k: _serve_fn([model], k, "never") for k in ("dense", "csr", "coo")}
            for batch in batches:
                x = tf.constant(rng.random((batch, n_in), dtype=np.float32))
                res = _alternate(fns, x, FLAGS.calibration_rounds, FLAGS.calibration_seconds)
                for kernel, stats in res.items():
                    points.append({"n_in": n_in, "n_out": n_out, "nnz": nnz, "batch": batch,
                                   "kernel": kernel, "us": stats["mean_ms"] * 1e3})
                logging.info("calibration %dx%d d=%.2f b=%d: %s", n_in, n_out, density, batch,
                             {k: round(v["mean_ms"], 3) for k, v in res.items()})
            del fns, model
            gc.collect()
    return points


def _features(kernel, p):
    size = float(p["n_in"]) * p["n_out"]
    b = float(p["batch"])
    if kernel == "dense":
        return [1.0, size, size * b]
    if kernel == "csr":
        return [1.0, p["nnz"], p["nnz"] * b, (p["n_in"] + p["n_out"]) * b]
    return [1.0, p["nnz"], p["nnz"] * b]


def _fit_nonnegative(x, y):
    """Least squares of relative error, coefficients >= 0 (best of all supports)."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    weighted = x / y[:, None]
    target = np.ones_like(y)
    best = None
    k = x.shape[1]
    for mask in range(1, 1 << k):
        cols = [j for j in range(k) if mask >> j & 1]
        coef, *_ = np.linalg.lstsq(weighted[:, cols], target, rcond=None)
        if np.any(coef < 0):
            continue
        full = np.zeros(k)
        full[cols] = coef
        err = float(np.sum((weighted @ full - target) ** 2))
        if best is None or err < best[0]:
            best = (err, full)
    coef = best[1]
    rel = np.abs(x @ coef / y - 1.0)
    return coef.tolist(), {"median_rel_error": float(np.median(rel)),
                           "p90_rel_error": float(np.percentile(rel, 90))}


def _by_point(points):
    """{(n_in, n_out, nnz, batch): {kernel: us}}."""
    out = {}
    for p in points:
        out.setdefault((p["n_in"], p["n_out"], p["nnz"], p["batch"]), {})[p["kernel"]] = p["us"]
    return out


def _fit(points):
    fits = {}
    for kernel in ("dense", "csr", "coo"):
        # COO only ever wins at small batches, where its cost is close to linear.
        rows = [p for p in points if p["kernel"] == kernel
                and (kernel != "coo" or p["batch"] <= export_lib.COO_MAX_BATCH)]
        coef, quality = _fit_nonnegative([_features(kernel, p) for p in rows],
                                         [p["us"] for p in rows])
        fits[kernel] = {"coefficients": coef, **quality}
    # How often the fitted rule picks the measured fastest kernel (or one within 10% of it).
    by_point = _by_point(points)
    saved = dict(export_lib.KERNEL_COST_US)
    try:
        export_lib.KERNEL_COST_US.update({k: tuple(v["coefficients"]) for k, v in fits.items()})
        good = 0
        for (n_in, n_out, nnz, batch), measured in by_point.items():
            # pylint: disable-next=protected-access
            choice = export_lib._best_kernel(n_in, n_out, nnz, batch)
            good += measured[choice] <= 1.1 * min(measured.values())
    finally:
        export_lib.KERNEL_COST_US.clear()
        export_lib.KERNEL_COST_US.update(saved)
    fits["rule_within_10pct_of_fastest"] = f"{good}/{len(by_point)}"
    return fits


def _conv_case(rng, height, k, c_in, c_out, density, padding, batches):
    """Dense convolution vs im2col patches + CSR product (the path a sparse conv would take)."""
    size = k * k * c_in
    mask = rng.random((k, k, c_in, c_out)) < density
    kernel = np.where(mask, rng.normal(size=mask.shape), 0).astype(np.float32)
    transposed = kernel.reshape(size, c_out).T
    w = tf.Variable(kernel)
    idx = tf.Variable(np.argwhere(transposed != 0).astype(np.int64))
    val = tf.Variable(transposed[transposed != 0])
    spec = tf.TensorSpec([None, height, height, c_in], tf.float32)

    @tf.function(input_signature=[spec])
    def dense(x):
        return tf.nn.conv2d(x, w, 1, padding)

    @tf.function(input_signature=[spec])
    def csr(x):
        patches = tf.image.extract_patches(x, [1, k, k, 1], [1, 1, 1, 1], [1, 1, 1, 1], padding)
        shape = tf.shape(patches)
        matrix = sparse_csr_matrix_ops.sparse_tensor_to_csr_sparse_matrix(
            idx, val, tf.constant([c_out, size], tf.int64))
        y = sparse_csr_matrix_ops.sparse_matrix_mat_mul(
            matrix, tf.reshape(patches, [-1, size]), transpose_b=True, transpose_output=True)
        return tf.reshape(y, tf.concat([shape[:3], [c_out]], 0))

    rows = []
    x0 = tf.constant(rng.random((2, height, height, c_in), dtype=np.float32))
    gap = float(np.max(np.abs(dense(x0).numpy() - csr(x0).numpy())))
    for batch in batches:
        x = tf.constant(rng.random((batch, height, height, c_in), dtype=np.float32))
        res = _alternate({"dense": dense, "csr": csr}, x, FLAGS.calibration_rounds,
                         FLAGS.calibration_seconds)
        rows.append({"height": height, "kernel": k, "in": c_in, "out": c_out,
                     "density": density, "padding": padding, "batch": batch,
                     "dense_ms": res["dense"]["mean_ms"], "csr_ms": res["csr"]["mean_ms"],
                     "ratio": res["csr"]["mean_ms"] / res["dense"]["mean_ms"], "max_gap": gap})
    return rows


def _calibrate_fusion(rng, batches):
    rows = []
    for key in ("lenet_300_100", "mlp_1024"):
        build = (MODELS["lenet_300_100"][1] if key == "lenet_300_100"
                 else (lambda: ftk.models.mlp(hidden=(1024, 1024))))
        members = _members(build, 0.9, FLAGS.members, FLAGS.seed)
        fns = {"per_member": _serve_fn(members, "dense", "never"),
               "fused": _serve_fn(members, "dense", "always")}
        for batch in batches:
            x = tf.constant(rng.random((batch, 28, 28, 1), dtype=np.float32))
            res = _alternate(fns, x, FLAGS.calibration_rounds, FLAGS.calibration_seconds)
            rows.append({"model": key, "batch": batch,
                         "per_member_ms": res["per_member"]["mean_ms"],
                         "fused_ms": res["fused"]["mean_ms"],
                         "ratio": res["fused"]["mean_ms"] / res["per_member"]["mean_ms"]})
            logging.info("fusion %s batch %d: %s", key, batch, rows[-1])
    return rows


def _fuse_min_batch(rows):
    """Smallest batch from which fusing wins (ratio <= 0.95) for every model at every larger
    measured batch; None if there is none."""
    batches = sorted({r["batch"] for r in rows})
    for i, batch in enumerate(batches):
        later = [r for r in rows if r["batch"] in batches[i:]]
        if later and all(r["ratio"] <= 0.95 for r in later):
            return batch
    return None


def _calibrate():
    rng = np.random.default_rng(FLAGS.seed)
    meter = bench_tables.CpuMeter()
    started = time.perf_counter()
    shapes = CAL_SHAPES if not FLAGS.quick else [(784, 300), (1024, 1024)]
    densities = CAL_DENSITIES if not FLAGS.quick else [0.03, 0.3]
    batches = CAL_BATCHES if not FLAGS.quick else [1, 64]
    points = _calibrate_dense_layers(rng, shapes, densities, batches)
    conv = []
    for case in (CONV_CASES if not FLAGS.quick else CONV_CASES[:1]):
        conv.extend(_conv_case(rng, *case, batches=[1, 64]))
    fusion = _calibrate_fusion(rng, FUSE_BATCHES if not FLAGS.quick else [1, 256])
    result = {
        "command": _command(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": bench_tables.host_info(_REPO)["git_commit"],
        "points": points,
        "fit": _fit(points),
        "conv": conv,
        "fusion": fusion,
        "fuse_min_batch": _fuse_min_batch(fusion),
        "seconds": time.perf_counter() - started,
        "other_processes_cores": meter.others_cores(),
    }
    return result


# ------------------------------------------------------------------------------ markdown
def _mb(value):
    return "n/a" if value is None else f"{value / 1e6:.2f}"


def _f(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def _markdown(report):
    rows = report["rows"]
    batches = report["batches"]
    lines = [
        "## Serving: SavedModel size and latency (one dense model, a ticket, M = 3 ensembles)",
        "",
        "Generated by `bench/serving.py` (raw numbers, per-round times and kernel plans in "
        "`serving.json`). Command:",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"Machine: {report['host']['cpus_usable']} usable CPU cores, "
        f"{report['host']['cpu_model']}, TensorFlow {report['versions']['tensorflow']}, Keras "
        f"{report['versions']['keras']}; started {report['started']}, commit "
        f"`{report['host']['git_commit']}`, run time {report['seconds'] / 60:.1f} min.",
        "",
        "(a) one dense model exported by ft_keras; (b) one ticket (`write_ticket` of one "
        "member); (c) the M = 3 ensemble exported the old way "
        "(`Ensemble.export(storage=\"dense\")`: stripped members, full kernels, one after the "
        "other); (d) the M = 3 ensemble exported by ft_keras (`Ensemble.export()`: compact "
        "storage, kernels chosen per layer and batch size). Members are untrained, randomly "
        "sparsified models (`ftk.sparsify`, ERK): size and latency depend on shapes and "
        "densities, not on weight values. Every SavedModel is loaded with "
        "`tf.saved_model.load` and called through `serving_default`; the four are timed in "
        f"alternating rounds ({report['rounds']} rounds of {report['seconds_per_round']} s "
        "each), p50 / p99 over the calls of a round, min over rounds; ratios are to (a). "
        "*Keras export* is the size of `model.export()` of the dense model (Keras writes every "
        "variable twice). *cores used by others*: CPU taken by other processes during the row.",
        "",
        f"**Targets:** size (d)/(a) <= {TARGET_SIZE_RATIO:.1f} at every sparsity >= 0.8; "
        "p50 latency (d)/(a) <= 1.0 for the MLP 784-4096-4096-10 at sparsity 0.95, batch 64.",
        "",
        "### Summary",
        "",
    ] + _summary(report) + [
        "",
        "### Size on disk",
        "",
        "| model | sparsity | (a) MB | Keras export MB | (b) MB | (c) MB | (d) MB "
        "| **(d)/(a)** | (c)/(a) | (b)/(a) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r["sizes_bytes"]
        ratio_d = r["size_ratios"]["d"]
        mark = "" if ratio_d is None or ratio_d <= TARGET_SIZE_RATIO else " ✗"
        lines.append(
            f"| {r['label']} | {r['sparsity']:.2f} | {_mb(s['a'])} | {_mb(s['a_keras_export'])} "
            f"| {_mb(s['b'])} | {_mb(s['c'])} | {_mb(s['d'])} | **{_f(ratio_d)}**{mark} "
            f"| {_f(r['size_ratios']['c'])} | {_f(r['size_ratios']['b'])} |")
    lines += [
        "",
        "### Latency (ms per request, p50 / p99) and p50 ratio to (a)",
        "",
        "| model | sparsity | batch | (a) | (b) | (c) | (d) | (b)/(a) | (c)/(a) | **(d)/(a)** "
        "| cores used by others |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for batch in batches:
            lat = r["latency_ms"][str(batch)]
            ratios = r["p50_ratios"][str(batch)]
            cells = " | ".join(
                f"{_f(lat[n]['p50_ms'])} / {_f(lat[n]['p99_ms'])}" for n in VARIANTS)
            target = (r["model"], r["sparsity"], batch) == TARGET_LATENCY
            mark = " ✗" if target and ratios["d"] > 1.0 else (" ✓" if target else "")
            lines.append(
                f"| {r['label']} | {r['sparsity']:.2f} | {batch} | {cells} | {_f(ratios['b'])} "
                f"| {_f(ratios['c'])} | **{_f(ratios['d'])}**{mark} "
                f"| {_f(r['other_processes_cores'])} |")
    lines += ["", "### Kernels chosen for (d)", "",
              "Per Dense position of the ensemble (`ft_keras.export.kernel_plan`): storage of "
              "each member's kernel and the kernel used by batch size (`dense<64<=csr`: dense "
              "below 64 rows, CSR from 64).", "",
              "| model | sparsity | layer | kernel shape | active weights (M members) "
              "| storage | kernels |", "|---|---:|---|---|---:|---|---|"]
    for r in rows:
        for p in r["plan_d"]:
            lines.append(f"| {r['label']} | {r['sparsity']:.2f} | {p['layer']} "
                         f"| {p['shape'][0]}x{p['shape'][1]} | {p['nnz']:,} "
                         f"| {', '.join(sorted(set(p['storage'])))} | {p['kernels']} |")
    cal = report.get("calibration")
    if cal:
        lines += _calibration_markdown(cal)
    return "\n".join(lines) + "\n"


def _summary(report):
    rows = report["rows"]
    lines = []
    if not rows:
        return lines
    worst = max(rows, key=lambda r: r["size_ratios"]["d"])
    old = [r["size_ratios"]["c"] for r in rows]
    lines.append(
        f"- **Size:** (d)/(a) is at most {worst['size_ratios']['d']:.2f} ({worst['label']} at "
        f"sparsity {worst['sparsity']:.2f}); the old export (c) was "
        f"{min(old):.1f}-{max(old):.1f}x (a).")
    for label in dict.fromkeys(r["label"] for r in rows):
        mine = [r for r in rows if r["label"] == label]
        d = [r["p50_ratios"][str(b)]["d"] for r in mine for b in report["batches"]]
        c = [r["p50_ratios"][str(b)]["c"] for r in mine for b in report["batches"]]
        b = [r["p50_ratios"][str(x)]["b"] for r in mine for x in report["batches"]]
        lines.append(
            f"- **{label}:** p50 (d)/(a) {min(d):.2f}-{max(d):.2f} (old export (c): "
            f"{min(c):.2f}-{max(c):.2f}); one ticket (b)/(a) {min(b):.2f}-{max(b):.2f}.")
    for r in rows:
        if (r["model"], r["sparsity"]) == TARGET_LATENCY[:2]:
            ratio = r["p50_ratios"][str(TARGET_LATENCY[2])]["d"]
            verdict = "met" if ratio <= 1.0 else "not met"
            lines.append(
                f"- **Latency target** ({r['label']}, sparsity {r['sparsity']:.2f}, batch "
                f"{TARGET_LATENCY[2]}): (d)/(a) = {ratio:.2f}, {verdict}; one ticket there: "
                f"{r['p50_ratios'][str(TARGET_LATENCY[2])]['b']:.2f}.")
    return lines


def _calibration_markdown(cal):
    source = ""
    if cal.get("command"):
        source = (f"From `{cal['command']}` (started {cal.get('started')}, commit "
                  f"`{cal.get('git_commit')}`; cores used by others "
                  f"{_f(cal.get('other_processes_cores'))}). ")
    lines = ["", "### Calibration of the kernel choice (`--calibrate`)", "",
             source + "One masked Dense layer (uniform density) served as a dense, CSR "
             "(`SparseMatrixMatMul`, CSR built per call from cached indices) or COO "
             "(`sparse_dense_matmul`) product; mean µs per call, min over alternating rounds. "
             "Fitted cost model (µs) that `ft_keras/export.py` holds as `KERNEL_COST_US` (COO "
             "fitted and used on batches <= `COO_MAX_BATCH` only):", ""]
    fit = cal["fit"]
    lines.append("| kernel | coefficients | median rel. error | p90 rel. error |")
    lines.append("|---|---|---:|---:|")
    for kernel in ("dense", "csr", "coo"):
        coef = ", ".join(f"{c:.3g}" for c in fit[kernel]["coefficients"])
        lines.append(f"| {kernel} | {coef} | {_f(fit[kernel]['median_rel_error'])} "
                     f"| {_f(fit[kernel]['p90_rel_error'])} |")
    lines += ["", f"The fitted rule picks the measured fastest kernel (or one within 10% of it) "
                  f"at {fit['rule_within_10pct_of_fastest']} of the calibration points.", "",
              "| n_in x n_out | active | batch | dense µs | CSR µs | COO µs | fastest |",
              "|---|---:|---:|---:|---:|---:|---|"]
    by_point = _by_point(cal["points"])
    for (n_in, n_out, nnz, batch), m in sorted(by_point.items()):
        fastest = min(m, key=m.get)
        lines.append(f"| {n_in}x{n_out} | {nnz:,} | {batch} | {m['dense']:.0f} | {m['csr']:.0f} "
                     f"| {m['coo']:.0f} | {fastest} |")
    lines += ["", "Convolution as im2col patches + CSR product against the dense convolution "
                  "(ms per call; ratio = CSR / dense):", "",
              "| input | kernel | channels | density | batch | dense ms | patches+CSR ms | ratio |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for c in cal["conv"]:
        lines.append(f"| {c['height']}x{c['height']} | {c['kernel']}x{c['kernel']} "
                     f"| {c['in']}->{c['out']} | {c['density']:.2f} | {c['batch']} "
                     f"| {c['dense_ms']:.3f} | {c['csr_ms']:.3f} | {c['ratio']:.2f} |")
    lines += ["", "One product for all M = 3 members (kernels side by side / batched) against one "
                  "product per member (dense kernels, sparsity 0.9; ms per call):", "",
              "| model | batch | per member ms | fused ms | fused / per member |",
              "|---|---:|---:|---:|---:|"]
    for f in cal["fusion"]:
        lines.append(f"| {f['model']} | {f['batch']} | {f['per_member_ms']:.3f} "
                     f"| {f['fused_ms']:.3f} | {f['ratio']:.2f} |")
    lines += ["", f"Fusion wins from batch {cal['fuse_min_batch']} on (`FUSE_MIN_BATCH`)."
              if cal["fuse_min_batch"] else
              "Fusion never wins at every larger batch (`FUSE_MIN_BATCH = None`)."]
    return lines


def _command():
    args = [a for a in sys.argv[1:]]
    return " ".join(["python bench/serving.py"] + args)


def main(argv):
    del argv
    if FLAGS.render_only:
        with open(FLAGS.render_only, encoding="utf-8") as f:
            report = json.load(f)
        bench_tables.replace_region(FLAGS.output_md, "serving", _markdown(report))
        print(f"rewrote the 'serving' region of {FLAGS.output_md} from {FLAGS.render_only}")
        return
    bench_tables.apply_quick(FLAGS, {"models": ["lenet_300_100"], "sparsities": ["0.9"],
                                     "batches": ["1", "64"], "rounds": 2, "seconds": 0.05,
                                     "calibration_rounds": 1, "calibration_seconds": 0.02})
    models = [m.strip() for m in FLAGS.models if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise app.UsageError(f"--models: unknown {unknown}; choose from {list(MODELS)}.")
    try:
        sparsities = [float(s) for s in FLAGS.sparsities]
    except ValueError:
        raise app.UsageError(f"--sparsities takes numbers; got {FLAGS.sparsities}.") from None
    try:
        batches = bench_tables.parse_positive_ints(FLAGS.batches, "batches")
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    started = time.perf_counter()
    report = {
        "command": _command(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": bench_tables.host_info(_REPO),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "numpy": np.__version__, "ft_keras": ftk.__version__},
        "batches": batches,
        "rounds": FLAGS.rounds,
        "seconds_per_round": FLAGS.seconds,
        "kernel_cost_us": export_lib.KERNEL_COST_US,
        "fuse_min_batch": export_lib.FUSE_MIN_BATCH,
        "rows": [],
    }
    if FLAGS.calibrate:
        report["calibration"] = _calibrate()
        _write_json(FLAGS.calibration_json, report["calibration"])
    elif FLAGS.calibration_json and os.path.exists(FLAGS.calibration_json):
        with open(FLAGS.calibration_json, encoding="utf-8") as f:
            report["calibration"] = json.load(f)
        report["calibration_from"] = FLAGS.calibration_json
    for key in models:
        for sparsity in sparsities:
            workdir = tempfile.mkdtemp(prefix="ftk-serving-")
            try:
                report["rows"].append(_serving_row(key, sparsity, batches, workdir))
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            print(f"{key} sparsity {sparsity}: sizes (d)/(a) "
                  f"{report['rows'][-1]['size_ratios']['d']:.3f}; p50 (d)/(a) by batch "
                  + ", ".join(f"{b}: {report['rows'][-1]['p50_ratios'][str(b)]['d']:.2f}"
                              for b in batches), flush=True)
    report["seconds"] = time.perf_counter() - started
    _write_json(FLAGS.output_json, report)
    if FLAGS.output_md:
        bench_tables.replace_region(FLAGS.output_md, "serving", _markdown(report))
    print(f"wrote {FLAGS.output_json} and the 'serving' region of {FLAGS.output_md} "
          f"({report['seconds'] / 60:.1f} min)")


def _write_json(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1,
                  default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))
        f.write("\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    app.run(main)
