"""Evaluates an ensemble of tickets: accuracy, calibration, diversity, OoD, corruptions and cost.

Loads ``ftk.Ensemble.from_directory(--ticket_dir)`` (the tickets ``examples/train.py`` or the
library's callbacks wrote), runs the library's evaluation suite (``evaluation.evaluate``: every
member predicted once per data set) and writes to ``--output_dir``:

* ``metrics.json``: the suite's flat dict, keys in its uncertainty-baselines style scheme (see
  ``ft_keras/harness/evaluation.py``): ``test/accuracy``, ``test/nll``, ``test/ece`` (15 bins),
  ``test/brier``, ``test/disagreement``, ``test/kl_diversity``, ``test/accuracy_member_<i>``,
  ``test/nll_member_<i>``, ensembles of the first k tickets ``test/accuracy_first_<k>``;
  out-of-distribution detection ``ood/<name>/auroc_max_prob``, ``ood/<name>/aupr_in_entropy``,
  ... (scores ``max_prob``, ``entropy`` and, with two or more members, ``mutual_information``);
  corrupted test sets ``corrupt/<corruption>/<severity>/accuracy`` (also ``nll``, ``ece``,
  ``brier``), ``corrupt/mean/<severity>/accuracy`` and ``corrupt/mean/accuracy``; cost
  ``cost/inference_macs`` (+ ``_relative`` to one dense model), ``cost/active_params`` and, with
  ``--train_summary``, ``cost/training_macs`` and ``cost/training_macs_relative``; ``info/*``
  entries describe the evaluation.
* ``metrics.md``: the same as tables.
* PNG plots when matplotlib is installed: ``reliability_diagram.png``,
  ``accuracy_vs_num_tickets.png`` and, with ``--train_summary``,
  ``accuracy_vs_training_flops.png``.

The ensemble's prediction is the mean of the members' softmax probabilities (``--combine=probs``,
the paper's evaluation) or the softmax of their mean logits (``--combine=logits``). Costs are
multiply-accumulates (MACs; FLOPs = 2 x MACs), see ``ft_keras.flops``. The corruptions are this
project's own (``ft_keras.corruptions``), not CIFAR-10-C's.

    python examples/evaluate.py --ticket_dir=/tmp/ftk/edst/tickets \\
        --train_summary=/tmp/ftk/edst/train_summary.json --output_dir=/tmp/ftk/edst/eval
    python examples/evaluate.py --ticket_dir=/tmp/ftk/dst/tickets --dataset=fashion_mnist \\
        --corruptions=gaussian_noise,contrast --severities=1,3,5 --corruption_examples=2000 \\
        --output_dir=/tmp/ftk/dst/eval
"""

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402

import ft_keras as ftk  # noqa: E402
from ft_keras.harness import evaluation  # noqa: E402

DEFAULT_OOD = {"fashion_mnist": "mnist", "mnist": "fashion_mnist", "cifar10": "none"}
NUM_BINS = evaluation.NUM_BINS
OOD_SCORES = (("max_prob", "max probability"), ("entropy", "predictive entropy"),
              ("mutual_information", "mutual information"))

FLAGS = flags.FLAGS
flags.DEFINE_string("ticket_dir", None, "Folder of ticket_<i>/ folders.")
flags.DEFINE_string("output_dir", None, "Where metrics.json, metrics.md and the plots go.")
flags.DEFINE_enum("dataset", None, list(ftk.data.DATASET_NAMES),
                  "In-distribution data set (default: from --train_summary or the tickets).")
flags.DEFINE_string("ood_dataset", None,
                    "OoD data set, or 'none' to skip (default: mnist for fashion_mnist, "
                    "fashion_mnist for mnist, none for cifar10).")
flags.DEFINE_list("corruptions", list(ftk.corruptions.CORRUPTIONS),
                  "Corruptions to evaluate (ft_keras.corruptions.CORRUPTIONS), or 'none'.")
flags.DEFINE_list("severities", ["1", "2", "3", "4", "5"], "Corruption severities, each in 1..5.")
flags.DEFINE_integer("corruption_examples", 0,
                     "Corrupt a fixed random subset of N test examples (0: all of them).")
flags.DEFINE_integer("corruption_seed", 0, "Seed of the random corruptions.")
flags.DEFINE_enum("combine", "probs", list(ftk.ensemble.COMBINE_MODES),
                  "probs: mean of member probabilities; logits: softmax of mean logits.")
flags.DEFINE_integer("test_examples", 0, "Use the first N test examples (0: all).")
flags.DEFINE_integer("ood_examples", 0, "Use the first N OoD test examples (0: as many as the "
                     "in-distribution test examples).")
flags.DEFINE_integer("batch_size", 1000, "Prediction batch size.")
flags.DEFINE_string("data_dir", None, "Where to look for the data (see ft_keras.data.load).")
flags.DEFINE_string("train_summary", None,
                    "train_summary.json of the run (adds training FLOPs and their plot).")
flags.DEFINE_bool("plots", True, "Write PNG plots (needs matplotlib).")
flags.mark_flags_as_required(["ticket_dir", "output_dir"])

for _name in ("corruption_examples", "test_examples", "ood_examples", "corruption_seed"):
    flags.register_validator(_name, lambda v: v >= 0, f"--{_name} must be >= 0.")
flags.register_validator("batch_size", lambda v: v >= 1, "--batch_size must be >= 1.")
flags.register_validator(
    "ood_dataset", lambda v: v is None or v in ("none",) + ftk.data.DATASET_NAMES,
    f"--ood_dataset must be 'none' or one of {', '.join(ftk.data.DATASET_NAMES)}.")
flags.register_validator(
    "corruptions",
    lambda v: v == ["none"] or (bool(v) and all(c in ftk.corruptions.CORRUPTIONS for c in v)),
    f"--corruptions must be 'none' or names from {', '.join(ftk.corruptions.CORRUPTIONS)}.")
flags.register_validator(
    "severities", lambda v: bool(v) and all(s in ("1", "2", "3", "4", "5") for s in v),
    "--severities must be a list of integers in 1..5, e.g. 1,3,5.")


# ---------------------------------------------------------------------------------- output
def write_markdown(path, metrics, num_members, names, severities, summary):
    info = {k[5:]: v for k, v in metrics.items() if k.startswith("info/")}
    lines = [f"# Evaluation of `{info['ticket_dir']}`", ""]
    lines.append(", ".join(f"{key}: {info[key]}" for key in (
        "method", "dataset", "num_members", "combine", "test_examples") if key in info))
    lines += ["", "## Test set", "", "| metric | ensemble | "
              + " | ".join(f"member {i}" for i in range(num_members)) + " |",
              "|---|---|" + "---|" * num_members]
    for stat in ("accuracy", "nll", "ece", "brier"):
        members = " | ".join(f"{metrics[f'test/{stat}_member_{i}']:.4f}"
                             for i in range(num_members))
        lines.append(f"| {stat} | {metrics[f'test/{stat}']:.4f} | {members} |")
    for stat in ("disagreement", "kl_diversity", "predictive_entropy", "mutual_information"):
        if f"test/{stat}" in metrics:
            lines.append(f"| {stat} | {metrics[f'test/{stat}']:.4f} |" + " |" * num_members)
    cumulative = _cumulative_training(summary, num_members)
    lines += ["", "## Ensembles of the first k tickets", "",
              "| k | accuracy | NLL | ECE |" + (" training MACs (x one dense run) |"
                                              if cumulative else ""),
              "|---|---|---|---|" + ("---|" if cumulative else "")]
    for k in range(1, num_members + 1):
        row = (f"| {k} | {metrics[f'test/accuracy_first_{k}']:.4f} | "
               f"{metrics[f'test/nll_first_{k}']:.4f} | {metrics[f'test/ece_first_{k}']:.4f} |")
        if cumulative:
            row += f" {cumulative[0][k - 1]:.3g} ({cumulative[1][k - 1]:.2f}x) |"
        lines.append(row)
    ood = info.get("ood_dataset")
    if ood and ood != "none":
        lines += ["", f"## Out-of-distribution detection: {info['dataset']} vs {ood}", "",
                  "| score | AUROC | AUPR (in) | AUPR (out) | FPR@95 |", "|---|---|---|---|---|"]
        for score, label in OOD_SCORES:
            if f"ood/{ood}/auroc_{score}" in metrics:
                lines.append("| " + label + " | " + " | ".join(
                    f"{metrics[f'ood/{ood}/{stat}_{score}']:.4f}"
                    for stat in ("auroc", "aupr_in", "aupr_out", "fpr95")) + " |")
    if names:
        lines += ["", f"## Corrupted test sets ({info.get('corruption_examples')} examples; "
                  "accuracy)", "", "| corruption | " + " | ".join(
                      f"severity {s}" for s in severities) + " |",
                  "|---|" + "---|" * len(severities)]
        for name in names + ["mean"]:
            lines.append(f"| {name} | " + " | ".join(
                f"{metrics[f'corrupt/{name}/{s}/accuracy']:.4f}" for s in severities) + " |")
        lines += ["", f"Mean over all corrupted sets: accuracy "
                  f"{metrics['corrupt/mean/accuracy']:.4f}, NLL {metrics['corrupt/mean/nll']:.4f}, "
                  f"ECE {metrics['corrupt/mean/ece']:.4f}, Brier "
                  f"{metrics['corrupt/mean/brier']:.4f}."]
    lines += ["", "## Cost (multiply-accumulates; FLOPs = 2 x MACs)", "", "| quantity | value |",
              "|---|---|"]
    for key, value in metrics.items():
        if key.startswith("cost/"):
            text = f"{value:.4f}" if isinstance(value, float) else f"{value:,d}"
            lines.append(f"| {key[5:]} | {text} |")
    _write_text(path, "\n".join(lines))


def _write_text(path, text):
    """Writes ``text`` (plus a final newline) to ``path`` through a temporary file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    os.replace(tmp, path)


def _cumulative_training(summary, num_members):
    """(cumulative training MACs, relative to one dense run) of the first k members, or None."""
    if not summary or len(summary.get("members", ())) != num_members:
        return None
    macs = [m.get("cumulative_training_macs") for m in summary["members"]]
    if any(m is None for m in macs):
        return None
    reference = summary["dense_reference"]["training_macs"]
    return macs, [m / reference for m in macs]


def write_plots(output_dir, result, metrics, summary):
    """Writes the PNG plots; returns their paths ([] without matplotlib)."""
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        logging.warning("matplotlib is not installed: no plots (pip install matplotlib).")
        return []
    paths = []
    num_members = result.member_probs.shape[0]
    title = f"{metrics.get('info/method', 'ensemble')} ({num_members} tickets)"

    data = result.reliability
    edges = data["edges"]
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(5, 6.5), sharex=True,
                                       gridspec_kw={"height_ratios": (3, 1)})
    filled = data["counts"] > 0
    accuracy, confidence = data["accuracy"][filled], data["confidence"][filled]
    ax.bar(centres[filled], accuracy, width=width, edgecolor="black", label="accuracy")
    ax.bar(centres[filled], np.abs(confidence - accuracy), bottom=np.minimum(accuracy, confidence),
           width=width, facecolor="none", edgecolor="tab:red", hatch="//",
           label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy",
           title=f"{title}: ECE {data['ece']:.4f} ({NUM_BINS} bins)")
    ax.legend(loc="upper left")
    ax_count.bar(centres, data["counts"] / data["counts"].sum(), width=width, color="grey",
                 edgecolor="black")
    ax_count.set(xlabel="confidence (max probability)", ylabel="fraction")
    paths.append(_save(fig, plt, os.path.join(output_dir, "reliability_diagram.png")))

    ks = np.arange(1, num_members + 1)
    fig, (ax_acc, ax_nll) = plt.subplots(1, 2, figsize=(10, 4))
    ax_acc.plot(ks, [metrics[f"test/accuracy_first_{k}"] for k in ks], "o-", label="ensemble")
    ax_acc.plot(ks, [metrics[f"test/accuracy_member_{k - 1}"] for k in ks], "x", color="grey",
                label="ticket k alone")
    ax_acc.set(xlabel="number of tickets k (first k)", ylabel="test accuracy", xticks=ks)
    ax_acc.legend()
    ax_nll.plot(ks, [metrics[f"test/nll_first_{k}"] for k in ks], "o-", label="ensemble")
    ax_nll.plot(ks, [metrics[f"test/nll_member_{k - 1}"] for k in ks], "x", color="grey",
                label="ticket k alone")
    ax_nll.set(xlabel="number of tickets k (first k)", ylabel="test NLL", xticks=ks)
    ax_nll.legend()
    fig.suptitle(title)
    paths.append(_save(fig, plt, os.path.join(output_dir, "accuracy_vs_num_tickets.png")))

    cumulative = _cumulative_training(summary, num_members)
    if cumulative:
        fig, ax = plt.subplots(figsize=(6, 4))
        accuracies = [metrics[f"test/accuracy_first_{k}"] for k in ks]
        ax.plot(cumulative[1], accuracies, "o-")
        for k, x, y in zip(ks, cumulative[1], accuracies):
            ax.annotate(f"k={k}", (x, y), textcoords="offset points", xytext=(4, -10))
        ax.set(xlabel="training FLOPs (x one dense model's run)",
               ylabel="test accuracy of the first k tickets", title=title)
        paths.append(_save(fig, plt, os.path.join(output_dir, "accuracy_vs_training_flops.png")))
    elif summary:
        logging.warning("train summary does not match the %d tickets: no FLOPs plot.",
                        num_members)
    return paths


def _save(fig, plt, path):
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------ main
def _load(name, split, limit):
    split = f"{split}[:{limit}]" if limit else split
    return ftk.data.load_numpy(name, split, data_dir=FLAGS.data_dir)


def _resolve_dataset(summary, metadata):
    if FLAGS.dataset:
        return FLAGS.dataset
    if summary and summary.get("dataset"):
        return summary["dataset"]
    names = {meta.get("dataset") for meta in metadata} - {None}
    if len(names) == 1:
        return names.pop()
    raise app.UsageError("cannot tell which data set the tickets were trained on: pass "
                         f"--dataset (one of {', '.join(ftk.data.DATASET_NAMES)}) or "
                         "--train_summary.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.time()
    summary = None
    if FLAGS.train_summary:
        with open(FLAGS.train_summary, encoding="utf-8") as handle:
            summary = json.load(handle)
    try:
        ensemble = ftk.Ensemble.from_directory(FLAGS.ticket_dir, combine=FLAGS.combine)
    except ValueError as error:
        raise app.UsageError(f"--ticket_dir: {error}") from None
    metadata = ensemble.metadata
    num_members = ensemble.num_members
    dataset = _resolve_dataset(summary, metadata)
    shape = tuple(ftk.data.INFO[dataset]["shape"])
    if tuple(ensemble.member_input_shape) != shape:
        raise app.UsageError(f"the tickets take inputs of shape {ensemble.member_input_shape}, "
                             f"but {dataset} images have shape {shape}: check --dataset.")
    ood = FLAGS.ood_dataset or DEFAULT_OOD[dataset]
    if ood != "none" and tuple(ftk.data.INFO[ood]["shape"]) != shape:
        raise app.UsageError(f"--ood_dataset={ood} images have shape "
                             f"{ftk.data.INFO[ood]['shape']}, the tickets take {shape}.")
    names = [] if FLAGS.corruptions == ["none"] else list(FLAGS.corruptions)
    severities = sorted({int(s) for s in FLAGS.severities})
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    methods = {meta.get("method") for meta in metadata}
    method = summary["method"] if summary else "/".join(sorted(str(m) for m in methods))

    images, labels = _load(dataset, "test", FLAGS.test_examples)
    logging.info("%d tickets (%s), %d %s test examples", num_members, method, len(labels),
                 dataset)
    ood_sets = {}
    if ood != "none":
        try:
            ood_sets[ood], _ = _load(ood, "test", FLAGS.ood_examples or len(labels))
        except FileNotFoundError as error:
            if FLAGS.ood_dataset:  # asked for explicitly
                raise app.UsageError(f"--ood_dataset={ood}: {error}") from None
            logging.warning("skipping OoD detection: the default OoD set %s is not available "
                            "(%s). Pass --ood_dataset=none to silence this.", ood,
                            str(error).splitlines()[0])
            ood = "none"
    data = evaluation.make_data(
        images, labels, ood=ood_sets, corruptions=names, severities=severities,
        corruption_examples=FLAGS.corruption_examples, corruption_seed=FLAGS.corruption_seed,
        keep_corrupted=False)  # generated once, one set at a time
    result = evaluation.evaluate(
        ensemble, data, combine=FLAGS.combine, num_bins=NUM_BINS, batch_size=FLAGS.batch_size,
        training_macs=summary["training_macs"] if summary else None,
        dense_training_macs=summary["dense_reference"]["training_macs"] if summary else None)
    metrics = dict(result.metrics)
    metrics.update({
        "info/ticket_dir": os.path.abspath(FLAGS.ticket_dir),
        "info/method": method,
        "info/dataset": dataset,
        "info/ood_dataset": ood,
        "info/eval_time_s": time.time() - start,
    })
    metrics = dict(sorted(metrics.items()))
    plots = write_plots(FLAGS.output_dir, result, metrics, summary) if FLAGS.plots else []
    json_path = os.path.join(FLAGS.output_dir, "metrics.json")
    _write_text(json_path, json.dumps(metrics, indent=2))
    write_markdown(os.path.join(FLAGS.output_dir, "metrics.md"), metrics, num_members, names,
                   severities, summary)
    logging.info("test accuracy %.4f, NLL %.4f, ECE %.4f; wrote %s, metrics.md and %d plots",
                 metrics["test/accuracy"], metrics["test/nll"], metrics["test/ece"], json_path,
                 len(plots))


if __name__ == "__main__":
    app.run(main)
