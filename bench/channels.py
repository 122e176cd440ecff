"""Evidence for channel-level tickets: dense vs EDST vs channel-level EDST vs DST Ensemble.

For every model (LeNet-300-100, LeNet-5, the wide MLP 784-1024-1024-10 built by
``ftk.models.mlp``) and seed it trains on Fashion-MNIST, with the recipes of
``ft_keras.recipes`` (the methods of docs/method.md):

* ``dense``: one dense model of E epochs (``train_dense``), the reference of every ratio;
* ``edst``: an EDST Ensemble with unstructured masks at sparsity S (``train_edst``, the
  epochs of bench/reproduce.py: ``round(0.6 E) + M * round(0.4 E)``);
* ``edst_c<c>``: the same run with channel-level DST, ``dst_kwargs={"channel_sparsity": c}``
  for every c of ``--channel_sparsities`` (the units / channels are removed by the end of
  exploration, so the M tickets share their widths and serve compacted);
* ``dst_ensemble``: M independent unstructured DST runs of E epochs (``train_dst_ensemble``).

Each (model, method, seed) cell is evaluated with ``ft_keras.evaluation`` on the test set
(mean of the members' probabilities): accuracy, NLL, ECE, disagreement, training and
inference multiply-accumulates relative to the dense model (theoretical sparse counts), and
``served_macs_relative``: the dense MACs (``ftk.flops.forward_macs(..., dense=True)``) of the
members after ``ftk.compact``, summed, over the dense model's, i.e. what the served graph
computes. The ensemble is then exported with ``Ensemble.export`` (which compacts the members)
and its SavedModel, loaded with ``tf.saved_model.load``, is timed against the dense model's
ticket SavedModel of the same seed at every batch size of ``--batches`` (bench/latency.py:
interleaved rounds, median of the paired per-round p50 ratios); ``size_ratio`` is its bytes on
disk over the dense SavedModel's.

The JSON (``<output_dir>/results_channels.json``) is written after every finished cell;
rerunning the same command resumes: cells already in the JSON are not trained again
(``--restart`` starts over). Tickets and SavedModels stay in ``--work_dir`` (outside the
repository) until the run is complete, so that a resumed run times its cells against the same
dense SavedModel (a seed whose dense SavedModel is gone trains its dense model again).
The markdown (``results_channels.md``) gets its ``channels`` region rewritten; text outside the
markers (the verdict) is kept. The plot ``results_channels_tradeoff.png``: accuracy against the
p50 latency ratio at batch 64 and against the served MACs, one column per model.

How to run (from the repository root):

    python bench/channels.py --quick             # smoke run, writes under the temp dir
    python bench/channels.py                     # the full run into docs/
    python bench/channels.py --render_only=docs/results_channels.json
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_tables  # noqa: E402  pylint: disable=wrong-import-position
import latency as timing  # noqa: E402  pylint: disable=wrong-import-position

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT_NAME = "results_channels"
REGION = "channels"
# The hand-written explanation of the columns, on the page itself (outside the region).
NOTES = "results_channels.md#how-the-numbers-are-taken"
# key: (label, builder(input_shape, num_classes), epochs of one dense run)
MODELS = {
    "lenet_300_100": ("LeNet-300-100", lambda **kw: ftk.models.lenet_300_100(**kw), 20),
    "lenet5": ("LeNet-5", lambda **kw: ftk.models.lenet5(**kw), 12),
    "mlp_1024": ("MLP 784-1024-1024-10",
                 lambda **kw: ftk.models.mlp(hidden=(1024, 1024), name="mlp_1024", **kw), 20),
}
# How each model's channel budget is spread over its layers (`DynamicSparsity`'s
# ``channel_allocation``): one global threshold where the first layer dominates the cost, the
# same fraction of every layer where the convolutions do (a global threshold on mean |w| removes
# LeNet-5's fc units first, leaving the convolutions, 86% of its MACs, nearly whole).
ALLOCATION = {"lenet_300_100": "global", "lenet5": "layerwise", "mlp_1024": "global"}
# Targets of issue 18: p50 of the M = 3 channel-level EDST ensemble / one dense model, batch 64.
TARGETS = {"lenet_300_100": 1.0, "lenet5": 1.0, "mlp_1024": 0.5}
TARGET_BATCH = 64
ACCURACY_GAP_PT = 0.3  # channel-level EDST within this many points of unstructured EDST
METRICS = ("test/accuracy", "test/nll", "test/ece", "test/disagreement",
           "cost/training_macs_relative", "cost/inference_macs_relative")
QUICK = {"seeds": ["0"], "channel_sparsities": ["0.5"], "train_examples": 3000,
         "test_examples": 2000, "epochs": 2, "update_every": 5, "rounds": 3, "seconds": 0.05}

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Smoke run: one seed, one channel sparsity, 3000 training "
                  "examples, 2 dense epochs, 3 short timing rounds; output under the temp dir "
                  "unless --output_dir is given.")
flags.DEFINE_list("models", list(MODELS), f"Models, from {list(MODELS)}.")
flags.DEFINE_list("methods", ["dense", "edst", "edst_channels", "dst_ensemble"],
                  "Methods: dense, edst, edst_channels (one per --channel_sparsities), "
                  "dst_ensemble. dense is always run: it is the reference.")
flags.DEFINE_list("channel_sparsities", ["0.3", "0.5", "0.7", "0.8"],
                  "channel_sparsity values of the channel-level EDST runs, each in (0, 1).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; member m of seed s uses 100 * s + m.")
flags.DEFINE_integer("epochs", None, "Epochs of one dense run for every model (default: "
                     + ", ".join(f"{k} {v[2]}" for k, v in MODELS.items()) + ").")
flags.DEFINE_integer("num_members", 3, "Members M of every ensemble.")
flags.DEFINE_float("sparsity", 0.8, "Weight sparsity S of the sparse methods.")
flags.DEFINE_integer("update_every", 100, "Optimizer steps between DST mask updates.")
flags.DEFINE_float("learning_rate", 0.05, "SGD (momentum 0.9) peak learning rate (cosine for the "
                   "independent runs, EDST's exploration rate).")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer("steps_per_execution", 32, "Keras steps_per_execution.")
flags.DEFINE_integer("train_examples", 0, "Use the first N training examples (0: all).")
flags.DEFINE_integer("test_examples", 0, "Use the first N test examples (0: all).")
flags.DEFINE_list("batches", ["1", "64", "256"], "Request batch sizes of the latency table.")
flags.DEFINE_integer("rounds", 15, "Interleaved timing rounds per batch size.")
flags.DEFINE_float("seconds", 0.2, "Seconds of calls per variant and round (>= 3 calls).")
flags.DEFINE_string("output_dir", None, "Where the JSON, markdown and plot go (default: docs/, "
                    "or <tmp>/ft_keras_channels_quick with --quick).")
flags.DEFINE_string("work_dir", None, "Tickets and SavedModels (default: a folder under "
                    "<tmp>/ft_keras_channels_work named after --output_dir, deleted when the run "
                    "is complete).")
flags.DEFINE_bool("restart", False, "Ignore an existing JSON in --output_dir.")
flags.DEFINE_bool("plots", True, "Write the PNG plot.")
flags.DEFINE_string("render_only", None, "Train nothing: rewrite the markdown and the plot of "
                    "this JSON (into its folder).")

for _name in ("num_members", "update_every", "batch_size", "steps_per_execution", "rounds"):
    flags.register_validator(_name, lambda v: v >= 1, f"--{_name} must be an integer >= 1.")
for _name in ("train_examples", "test_examples"):
    flags.register_validator(_name, lambda v: v >= 0, f"--{_name} must be an integer >= 0.")
flags.register_validator("epochs", lambda v: v is None or v >= 1, "--epochs must be >= 1.")
flags.register_validator("sparsity", lambda v: 0.0 < v < 1.0, "--sparsity must be in (0, 1).")
flags.register_validator("learning_rate", lambda v: v > 0, "--learning_rate must be > 0.")
flags.register_validator("seconds", lambda v: v > 0, "--seconds must be > 0.")


def _usage(flag, message):
    return app.UsageError(f"--{flag}: {message}")


# ------------------------------------------------------------------------------- settings
def method_name(channel_sparsity):
    """The method key of channel-level EDST at ``channel_sparsity`` (e.g. ``edst_c0.5``)."""
    return f"edst_c{channel_sparsity:g}"


def _channel_sparsities(values):
    out = []
    for text in (v.strip() for v in values if v.strip()):
        try:
            value = float(text)
        except ValueError:
            raise _usage("channel_sparsities", f"{text!r} is not a number.") from None
        if not 0.0 < value < 1.0:
            raise _usage("channel_sparsities", f"{text!r} is not in (0, 1).")
        out.append(value)
    if len(set(out)) != len(out):
        raise _usage("channel_sparsities", f"{values} lists a value twice.")
    return out


def _names(flag, values, allowed):
    names = [v.strip() for v in values if v.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise _usage(flag, f"got {values}; choose from {list(allowed)}.")
    return names


def resolve_settings():
    """The run's settings (a dict kept in the JSON) from the flags and --quick."""
    bench_tables.apply_quick(FLAGS, QUICK)
    models = _names("models", FLAGS.models, MODELS)
    methods = _names("methods", FLAGS.methods, ("dense", "edst", "edst_channels",
                                                 "dst_ensemble"))
    try:
        seeds = bench_tables.parse_seeds(FLAGS.seeds)
        batches = bench_tables.parse_positive_ints(FLAGS.batches, "batches")
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    sparsities = _channel_sparsities(FLAGS.channel_sparsities)
    cells = ["dense"] + [m for m in ("edst",) if m in methods]
    if "edst_channels" in methods:
        cells += [method_name(c) for c in sparsities]
    cells += [m for m in ("dst_ensemble",) if m in methods]
    epochs = {m: FLAGS.epochs or MODELS[m][2] for m in models}
    return {
        "quick": FLAGS.quick, "dataset": "fashion_mnist", "models": models, "methods": cells,
        "channel_sparsities": sparsities, "seeds": seeds, "epochs": epochs,
        "edst_epochs": {m: [int(round(0.6 * e)), max(1, int(round(0.4 * e)))]
                        for m, e in epochs.items()},
        "num_members": FLAGS.num_members, "sparsity": FLAGS.sparsity,
        "update_every": FLAGS.update_every, "drop_fraction": 0.5, "explore_fraction": 0.8,
        "learning_rate": FLAGS.learning_rate, "refine_lr": [0.01, 0.001],
        "batch_size": FLAGS.batch_size, "steps_per_execution": FLAGS.steps_per_execution,
        "validation_fraction": 0.1,
        "train_examples": FLAGS.train_examples, "test_examples": FLAGS.test_examples,
        "batches": batches, "rounds": FLAGS.rounds, "seconds_per_round": FLAGS.seconds,
        "channel_allocation": {m: ALLOCATION[m] for m in models},
    }


def cell_config(settings, model):
    """What a cell's numbers depend on besides its (model, method, seed): a resumed run only
    reuses cells trained with the same."""
    keys = ("dataset", "num_members", "sparsity", "update_every", "drop_fraction",
            "explore_fraction", "learning_rate", "refine_lr", "batch_size",
            "steps_per_execution", "validation_fraction", "train_examples", "test_examples",
            "batches", "rounds", "seconds_per_round")
    config = dict({k: settings[k] for k in keys}, epochs=settings["epochs"][model],
                  edst_epochs=settings["edst_epochs"][model])
    if ALLOCATION[model] != "global":
        config["channel_allocation"] = ALLOCATION[model]
    return config


# ------------------------------------------------------------------------------- training
def _train(settings, data, model, method, seed, ticket_dir):
    """Runs ``method``'s recipe for (model, seed); returns its `RecipeResult`."""
    s = settings
    epochs = s["epochs"][model]
    build = lambda: MODELS[model][1](input_shape=data.input_shape,  # noqa: E731
                                     num_classes=data.num_classes)
    common = dict(validation_data=data.validation(), ticket_dir=ticket_dir, seed=100 * seed,
                  monitor="val_accuracy", batch_size=s["batch_size"], overwrite=True,
                  fit_kwargs=dict(verbose=0))
    steps = dict(steps_per_execution=s["steps_per_execution"])
    cosine = ftk.recipes.make_compile_fn("sgd", s["learning_rate"], "cosine",
                                         decay_steps=epochs * data.steps_per_epoch, **steps)
    dst = dict(update_every=s["update_every"], drop_fraction=s["drop_fraction"],
               final_drop_fraction=0.005, grow="gradient")
    if method == "dense":
        return ftk.train_dense(build, data.train, epochs=epochs, compile_fn=cosine, **common)
    if method == "dst_ensemble":
        return ftk.train_dst_ensemble(build, s["num_members"], data.train(100 * seed),
                                      epochs=epochs, compile_fn=cosine, dst_kwargs=dst,
                                      sparsity=s["sparsity"], **common)
    if method != "edst":
        dst["channel_sparsity"] = float(method[len("edst_c"):])
        if ALLOCATION[model] != "global":
            dst["channel_allocation"] = ALLOCATION[model]
    exploration, refine = s["edst_epochs"][model]
    return ftk.train_edst(
        build, s["num_members"], data.train, exploration_epochs=exploration,
        refine_epochs=refine, exploration_lr=s["learning_rate"], refine_lr=tuple(s["refine_lr"]),
        explore_fraction=s["explore_fraction"], sparsity=s["sparsity"], dst_kwargs=dst,
        compile_fn=ftk.recipes.make_compile_fn("sgd", s["learning_rate"], **steps), **common)


def method_epochs(settings, method, model):
    """Training epochs of a method's whole run (all members)."""
    if method == "dense":
        return settings["epochs"][model]
    if method == "dst_ensemble":
        return settings["num_members"] * settings["epochs"][model]
    exploration, refine = settings["edst_epochs"][model]
    return exploration + settings["num_members"] * refine


def widths(model):
    """{layer name: units / filters} of the counted (Dense / Conv) layers of ``model``."""
    out = {}
    for layer in model.layers:
        for attribute in ("units", "filters"):
            if isinstance(getattr(layer, attribute, None), int):
                out[layer.name] = getattr(layer, attribute)
    return out


def _saved_model(ticket):
    return os.path.join(ticket, "saved_model", "1")


def _latency(settings, dense_path, path, shape, seed):
    """{batch: {"dense": ..., "ensemble": ...}} of `latency.interleaved` (the dense model alone
    when ``path`` is None)."""
    fns = {"dense": timing.signature(dense_path)}
    if path is not None:
        fns["ensemble"] = timing.signature(path)
    rng = np.random.default_rng(seed)
    out = {}
    for batch in settings["batches"]:
        x = tf.constant(rng.random((batch,) + tuple(shape), dtype=np.float32))
        out[str(batch)] = timing.interleaved(fns, x, settings["rounds"],
                                             settings["seconds_per_round"], "dense")
    return out


def run_cell(settings, data, model, method, seed, work_dir):
    """Trains, evaluates, exports and times one (model, method, seed); returns its record."""
    meter = bench_tables.CpuMeter()
    folder = os.path.join(work_dir, model, f"seed_{seed}")
    result = _train(settings, data, model, method, seed, os.path.join(folder, method, "tickets"))
    tickets = [ftk.read_ticket(path) for path in result.tickets]
    members = [model for model, _ in tickets]
    dense_path = _saved_model(os.path.join(folder, "dense", "tickets", "ticket_0"))
    reference = ftk.training_cost.training_macs(
        members[0], settings["epochs"][model] * data.steps_per_epoch, settings["batch_size"],
        sparse=False)
    evaluation = ftk.evaluation.evaluate(members, data.eval, training_macs=result.training_macs,
                                         dense_training_macs=reference)
    metrics = {k: v for k, v in evaluation.metrics.items() if not k.startswith("info/")}
    compacted = [ftk.compact(m) for m in members]
    dense_macs = ftk.flops.forward_macs(members[0], dense=True)
    served_macs = sum(ftk.flops.forward_macs(m, dense=True) for m in compacted)
    if method == "dense":
        path = None
    else:
        path = ftk.Ensemble(members, combine="probs").export(
            os.path.join(folder, method, "served"), overwrite=True)
    sizes = {"dense": ftk.export.saved_model_bytes(dense_path),
             "ensemble": ftk.export.saved_model_bytes(path or dense_path)}
    shape = ftk.export.model_input_shape(members[0])
    record = {
        "model": model, "method": method, "seed": seed,
        "config": cell_config(settings, model),
        "channel_sparsity": None if not method.startswith("edst_c") else float(method[6:]),
        "num_members": len(members),
        "ticket_epochs": [metadata.get("epoch") for _, metadata in tickets],
        "member_widths": [widths(m) for m in compacted],
        "full_widths": widths(members[0]),
        "metrics": metrics,
        "served_macs": int(served_macs),
        "served_macs_relative": served_macs / dense_macs,
        "sizes_bytes": sizes,
        "size_ratio": sizes["ensemble"] / sizes["dense"],
        "latency_ms": _latency(settings, dense_path, path, shape, seed),
        "wall_time_s": float(sum(result.fit_wall_time_s)),
        "other_processes_cores": meter.others_cores(),
    }
    del tickets, members, compacted
    keras.backend.clear_session()
    gc.collect()
    return record


def latency_ratio(record, batch):
    """The ensemble's p50 / the dense model's at ``batch`` (1.0 for the dense record)."""
    cell = record["latency_ms"][str(batch)]
    return cell["ensemble"]["ratio"] if "ensemble" in cell else cell["dense"]["ratio"]


# ---------------------------------------------------------------------------------- store
class Store:
    """The JSON report, written after every finished cell; a rerun reuses its cells."""

    def __init__(self, path, restart):
        self.path = path
        self.records = []
        if os.path.exists(path) and not restart:
            try:
                with open(path, encoding="utf-8") as handle:
                    report = json.load(handle)
            except (OSError, ValueError) as error:
                raise _usage("output_dir", f"cannot read {path!r} to resume ({error}); pass "
                             "--restart to start over.") from None
            if report.get("output_name") != OUTPUT_NAME:
                raise _usage("output_dir", f"{path!r} is not a {OUTPUT_NAME} report; pass "
                             "--restart to overwrite it.")
            self.records = list(report["records"])

    def find(self, model, method, seed, config):
        for record in self.records:
            if (record["model"], record["method"], record["seed"]) == (model, method, seed):
                if record["config"] != config:
                    raise _usage("restart", f"{self.path} holds {model} {method} seed {seed} "
                                 "from another configuration; rerun with that run's flags, pass "
                                 "--restart, or choose another --output_dir.")
                return record
        return None

    def replace(self, record):
        key = (record["model"], record["method"], record["seed"])
        self.records = [r for r in self.records
                        if (r["model"], r["method"], r["seed"]) != key] + [record]


# ---------------------------------------------------------------------------- aggregation
def summarize(records, settings):
    """{model: {method: {key: summary}}}: mean, std and n over seeds (`bench_tables.summary`)."""
    out = {}
    models = [m for m in MODELS if m in settings["models"] or any(r["model"] == m
                                                                  for r in records)]
    methods = list(settings["methods"])
    methods += [m for m in dict.fromkeys(r["method"] for r in records) if m not in methods]
    for model in models:
        out[model] = {}
        for method in methods:
            rows = [r for r in records if r["model"] == model and r["method"] == method]
            if not rows:
                continue
            values = {key: [r["metrics"].get(key) for r in rows] for key in METRICS}
            values["served_macs_relative"] = [r["served_macs_relative"] for r in rows]
            values["size_ratio"] = [r["size_ratio"] for r in rows]
            for batch in settings["batches"]:
                values[f"latency_ratio/{batch}"] = [latency_ratio(r, batch) for r in rows]
                values[f"dense_p50_ms/{batch}"] = [
                    r["latency_ms"][str(batch)]["dense"]["p50_ms"] for r in rows]
            out[model][method] = {
                key: bench_tables.mean_std(vals) for key, vals in values.items()}
            out[model][method]["member_widths"] = rows[0]["member_widths"][0]
    return out


def verdict_lines(summary):
    """Per model: unstructured EDST against the dense model (accuracy at its training FLOPs),
    and which channel sparsities meet the latency target and the accuracy target."""
    lines = []
    for model, methods in summary.items():
        if "edst" not in methods or TARGET_BATCH not in _batches(methods):
            continue
        edst = methods["edst"]["test/accuracy"]["mean"]
        over_dense = 100 * (edst - methods["dense"]["test/accuracy"]["mean"])
        training = methods["edst"]["cost/training_macs_relative"]["mean"]
        lines.append(f"- {MODELS[model][0]}: EDST {over_dense:+.2f} pt vs dense at "
                     f"{training:.2f}x its training FLOPs.")
        target = TARGETS[model]
        checks = []
        for method, stats in methods.items():
            if not method.startswith("edst_c"):
                continue
            gap = 100 * (stats["test/accuracy"]["mean"] - edst)
            ratio = stats[f"latency_ratio/{TARGET_BATCH}"]["mean"]
            near = gap >= -ACCURACY_GAP_PT - 1e-9  # -0.3 pt itself meets the target
            both = ratio <= target and near
            fast = "meets" if ratio <= target else "misses"
            close = "meets" if near else "misses"
            checks.append(f"{method}: latency {ratio:.2f}x ({fast} <= {target}x), accuracy "
                          f"{gap:+.2f} pt vs EDST ({close} >= -{ACCURACY_GAP_PT} pt)"
                          + (" - both" if both else ""))
        if checks:
            lines.append(f"- {MODELS[model][0]}: " + "; ".join(checks) + ".")
    return lines


def _batches(methods):
    first = next(iter(methods.values()))
    return [int(k.split("/")[1]) for k in first if k.startswith("latency_ratio/")]


# ----------------------------------------------------------------------------- markdown
def _cell(stats, fmt="{:.3f}", scale=1.0):
    return bench_tables.mean_std_cell(stats, fmt, scale)


def markdown_region(report):
    s = report["settings"]
    mode = "QUICK SMOKE RUN (not evidence)" if s["quick"] else "full run"
    if not report.get("complete", True):
        mode += " (INCOMPLETE: interrupted; rerunning the command resumes it)"
    body = []
    for model, methods in report["summary"].items():
        batches = _batches(methods)
        seeds = sorted({r["seed"] for r in report["records"] if r["model"] == model})
        body += ["", f"### {MODELS[model][0]}", "", f"Seeds: {seeds} (means ± standard "
                 "deviations over the seeds each method has).", "",
                 "| Method | Acc. (%) | NLL | ECE | Disagr. | Train FLOPs (x dense) | Infer. "
                 "FLOPs, sparse (x dense) | Served MACs, compacted (x dense) | member widths "
                 "| Size (x dense) | " + " | ".join(f"p50 batch {b} (x dense)" for b in batches)
                 + " |", "|---|" + "---|" * (9 + len(batches))]
        for method, st in methods.items():
            cells = [_cell(st["test/accuracy"], "{:.2f}", 100.0), _cell(st["test/nll"], "{:.4f}"),
                     _cell(st["test/ece"], "{:.4f}"), _cell(st["test/disagreement"], "{:.4f}"),
                     _cell(st["cost/training_macs_relative"]),
                     _cell(st["cost/inference_macs_relative"]), _cell(st["served_macs_relative"]),
                     ", ".join(str(w) for w in st["member_widths"].values()),
                     _cell(st["size_ratio"], "{:.2f}")]
            for b in batches:
                text = _cell(st[f"latency_ratio/{b}"], "{:.2f}")
                if b == TARGET_BATCH and method.startswith("edst_c"):
                    text += " ✓" if st[f"latency_ratio/{b}"]["mean"] <= TARGETS[model] else " ✗"
                cells.append(text)
            body.append(f"| {method} | " + " | ".join(cells) + " |")
        body += ["", "Dense p50 (ms): " + ", ".join(
            f"batch {b} {_cell(methods['dense'][f'dense_p50_ms/{b}'])}" for b in batches) + "."]
    lines = verdict_lines(report["summary"])
    if lines:
        body += ["", "Checks, on means over seeds (targets: p50 at batch "
                 f"{TARGET_BATCH} <= " + ", ".join(
                     f"{MODELS[k][0]} {v}x" for k, v in TARGETS.items())
                 + f" one dense model's; accuracy within {ACCURACY_GAP_PT} pt of unstructured "
                 "EDST):", ""] + lines
    if report.get("plots"):
        body += ["", *[f"![{p}]({p})" for p in report["plots"]]]
    body += ["", f"Raw per-seed numbers: `{OUTPUT_NAME}.json`."]
    settings = [f"- {k}: {s.get(k)}" for k in (
        "models", "methods", "seeds", "epochs", "edst_epochs", "channel_allocation",
        "num_members", "sparsity", "update_every", "train_examples", "test_examples", "batches",
        "rounds", "seconds_per_round")]
    return bench_tables.markdown_region(
        "bench/channels.py", report["command"],
        bench_tables.run_line(report["date_utc"], report["machine"], report["timing"]),
        settings, body, NOTES, intro=f"Fashion-MNIST, {mode}. ")


NEW_PAGE = """# Channel-level tickets: accuracy against serving cost

{region}

## How the numbers are taken

See the module doc of bench/channels.py (and docs/results_channels.md in the repository).

## Verdict

(Not written yet.)
"""


# ------------------------------------------------------------------------------------ plot
def write_plot(report, output_dir):
    """Accuracy against the p50 ratio at batch 64 (top) and the served MACs (bottom)."""
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        logging.warning("matplotlib is not installed: no plot.")
        return None
    summary = report["summary"]
    fig, axes = plt.subplots(2, len(summary), figsize=(5 * len(summary), 7), squeeze=False)
    for column, (model, methods) in enumerate(summary.items()):
        for row, (key, label) in enumerate(((f"latency_ratio/{TARGET_BATCH}",
                                             f"p50 latency at batch {TARGET_BATCH} (x one dense "
                                             "model)"),
                                            ("served_macs_relative",
                                             "served MACs, compacted (x one dense model)"))):
            ax = axes[row][column]
            for method, st in methods.items():
                if st.get(key) is None:
                    continue
                acc = st["test/accuracy"]
                ax.errorbar(st[key]["mean"], 100 * acc["mean"], xerr=st[key]["std"],
                            yerr=100 * acc["std"], fmt="o", capsize=3, label=method)
            if row == 0:
                ax.axvline(TARGETS[model], color="grey", linestyle=":", label="target")
            ax.set(xlabel=label, ylabel="test accuracy (%)", title=MODELS[model][0])
            ax.grid(alpha=0.3)
        axes[0][column].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(output_dir, f"{OUTPUT_NAME}_tradeoff.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------- report
def build_report(settings, records, command, start, meter, complete):
    return {
        "output_name": OUTPUT_NAME, "complete": complete, "command": command,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": bench_tables.recipe_machine_info(_REPO),
        "timing": {"total_s": time.time() - start,
                   "training_s": sum(r["wall_time_s"] for r in records
                                     if r["model"] in settings["models"]),
                   "other_processes_cores": meter.others_cores()},
        "settings": settings, "summary": summarize(records, settings), "records": records,
        "targets": {"latency_batch": TARGET_BATCH, "latency_ratio": TARGETS,
                    "accuracy_gap_pt": ACCURACY_GAP_PT},
        "plots": [],
    }


def render(report, output_dir):
    plots = [write_plot(report, output_dir)] if FLAGS.plots else []
    report["plots"] = [os.path.basename(p) for p in plots if p]
    bench_tables.write_region(os.path.join(output_dir, OUTPUT_NAME + ".md"), REGION,
                              markdown_region(report), NEW_PAGE)


def _write_json(path, report):
    bench_tables.write_text(path, json.dumps(report, indent=1) + "\n")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.render_only:
        report = bench_tables.read_report(
            FLAGS.render_only, _usage,
            lambda r: None if r.get("output_name") == OUTPUT_NAME else "is not a channels report.")
        render(report, os.path.dirname(os.path.abspath(FLAGS.render_only)))
        return
    start, meter = time.time(), bench_tables.CpuMeter()
    tf.get_logger().setLevel("ERROR")
    logging.get_absl_handler().addFilter(bench_tables.OwnInfoOnly(__file__))
    settings = resolve_settings()
    output_dir = bench_tables.output_dir(FLAGS.output_dir, FLAGS.quick,
                                         "ft_keras_channels_quick", _REPO)
    # Not `bench_tables.work_folder`: a resumed run must find the same folder (its dense
    # SavedModels), so the default is named after the output folder, not drawn at random.
    work_dir = FLAGS.work_dir or os.path.join(
        tempfile.gettempdir(), "ft_keras_channels_work",
        os.path.abspath(output_dir).strip(os.sep).replace(os.sep, "_"))
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, OUTPUT_NAME + ".json")
    store = Store(json_path, FLAGS.restart)
    command = bench_tables.script_command(sys.argv, _REPO)
    data = bench_tables.Data("fashion_mnist", settings["batch_size"],
                             settings["validation_fraction"],
                             train_examples=settings["train_examples"],
                             test_examples=settings["test_examples"], usage=_usage)
    data.eval = ftk.evaluation.make_data(data.test_images, data.test_labels)
    cells = [(model, method, seed) for model in settings["models"] for seed in settings["seeds"]
             for method in settings["methods"]]
    progress = bench_tables.Progress(sum(method_epochs(settings, m, model)
                                         for model, m, _ in cells))
    missing = {(model, method, seed) for model, method, seed in cells
               if store.find(model, method, seed, cell_config(settings, model)) is None}
    for model, method, seed in cells:
        dense_ticket = os.path.join(work_dir, model, f"seed_{seed}", "dense", "tickets",
                                    "ticket_0")
        fresh = (model, method, seed) in missing
        if method == "dense" and not os.path.isdir(dense_ticket):
            # The missing cells of this seed are timed against its SavedModel: train it again.
            fresh = fresh or any(c[0] == model and c[2] == seed for c in missing)
        if fresh:
            record = run_cell(settings, data, model, method, seed, work_dir)
            store.replace(record)
            _write_json(json_path, build_report(settings, store.records, command, start, meter,
                                                complete=False))
            logging.info("%s %s seed %d: accuracy %.4f, p50 x dense at batch %d %.2f; %s", model,
                         method, seed, record["metrics"]["test/accuracy"], TARGET_BATCH,
                         latency_ratio(record, TARGET_BATCH) if TARGET_BATCH in
                         settings["batches"] else float("nan"),
                         progress.advance(method_epochs(settings, method, model)))
        else:
            progress.advance(method_epochs(settings, method, model))
    # Records of the models of earlier runs into the same JSON (--models=...) stay in it.
    report = build_report(settings, store.records, command, start, meter, complete=True)
    render(report, output_dir)
    _write_json(json_path, report)
    if not FLAGS.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    logging.info("done in %.1f min: %s", report["timing"]["total_s"] / 60, json_path)
    print("\n".join(verdict_lines(report["summary"])), flush=True)


if __name__ == "__main__":
    app.run(main)
