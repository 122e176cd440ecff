"""Helpers shared by the benchmark scripts: summaries, ratios, merged table rows, memory
accounting, the markdown of the tfmot and peak-memory sections, a CPU-contention meter, and the
scripts' common plumbing (atomic writes, the shared data folder, seeds, a log filter, the data
split of the recipe benchmarks, the loop that runs them (`Runner`), the run header of their
reports, ``--render_only``).

No TensorFlow, Keras or absl import at load time, so that the scripts' launchers stay light and
``tests/test_bench_tables.py`` can check the logic in milliseconds (`Data`, `Runner` and
`recipe_machine_info` import TensorFlow, Keras or ft_keras when they are used). Nothing here
times a model.
"""

import contextlib
import gc
import json
import logging
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import tempfile
import time

# What the comparison table says when tf_keras / tensorflow-model-optimization are missing.
NOT_INSTALLED = "not measured: pip install ft_keras[bench]"
# Target of the peak-memory comparison: peak RSS of sparse training / dense training.
MEMORY_TARGET_RATIO = 1.3
MIB = float(1 << 20)


# ------------------------------------------------------------------------------- flags, host
def apply_quick(flag_values, quick):
    """With ``--quick``, sets each flag in ``quick`` ({name: value}) not given on the command line."""
    if not flag_values.quick:
        return
    for name, value in quick.items():
        if not flag_values[name].present:
            setattr(flag_values, name, value)


def host_info(repo):
    """CPU model, core counts, platform and the git commit of ``repo`` (marked if dirty)."""
    cpu_model = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    commit = None
    try:
        commit = subprocess.run(
            ["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        if dirty:
            commit += " (with uncommitted changes)"
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git_commit": commit,
    }


# ------------------------------------------------------------------------- CPU contention
class CpuMeter:
    """CPU time used by *other* processes while a block runs (from /proc/stat minus our own).

    The benchmarks share the machine; this tells how much of it was taken by others. Our own
    time includes finished child processes that we waited for (``os.times``).
    """

    def __init__(self):
        self._start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat", encoding="utf-8") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = sum(fields[:3]) + sum(fields[5:8])  # user nice system irq softirq steal
        ours = sum(os.times()[:4])
        return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), ours

    def others_cores(self):
        """Average number of cores kept busy by other processes since construction."""
        end = self._read()
        if self._start is None or end is None or end[0] <= self._start[0]:
            return None
        busy = end[1] - self._start[1]
        ours = end[2] - self._start[2]
        return max(0.0, (busy - ours) / (end[0] - self._start[0]))


# ------------------------------------------------------------------------- marked regions
def region_markers(name):
    """The two HTML comments that delimit the region ``name`` in a markdown file."""
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"region name must be letters, digits, '-' or '_'; got {name!r}.")
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


_REGION_RE = re.compile(r"<!-- ([A-Za-z0-9_-]+):begin -->.*?<!-- \1:end -->\n?", re.S)


def write_keeping_regions(path, text):
    """Writes ``text`` to ``path`` (via a temporary file and a rename), keeping the marked
    regions of the old file that ``text`` does not hold (regions other scripts own, e.g. the
    Serving section of docs/benchmarks.md): they are appended at the end. Returns the content.
    """
    try:
        with open(path, encoding="utf-8") as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    kept = [match.group(0).rstrip("\n") for match in _REGION_RE.finditer(old)
            if region_markers(match.group(1))[0] not in text]
    content = text.rstrip("\n") + "\n"
    for block in kept:
        content += "\n" + block + "\n"
    _write_atomically(path, content)
    return content


def replace_region(path, name, text):
    """Puts ``text`` between the markers of region ``name`` in the file at ``path``.

    The markers stay; what was between them is replaced. A file without the region gets it
    appended at the end (a missing file is created). The file is written to a temporary file
    and renamed. Returns the new content.

    Raises:
        ValueError: the file has the begin marker without the end marker (or the reverse,
            or either twice), or a bad region name.
    """
    begin, end = region_markers(name)
    try:
        with open(path, encoding="utf-8") as f:
            content = f.read()
    except FileNotFoundError:
        content = ""
    body = text.strip("\n")
    counts = (content.count(begin), content.count(end))
    if counts == (0, 0):
        block = f"{begin}\n{body}\n{end}\n"
        content = content.rstrip("\n") + ("\n\n" if content.strip() else "") + block
    elif counts == (1, 1) and content.index(begin) < content.index(end):
        head = content[: content.index(begin) + len(begin)]
        tail = content[content.index(end):]
        content = f"{head}\n{body}\n{tail}"
    else:
        raise ValueError(
            f"{path}: region {name!r} is malformed ({counts[0]} begin and {counts[1]} end "
            "markers, or end before begin); fix the file by hand."
        )
    _write_atomically(path, content)
    return content


def write_text(path, text):
    """Writes ``text`` (ending in a newline) to ``path`` atomically (temporary file, rename)."""
    _write_atomically(path, text if text.endswith("\n") else text + "\n")


def shared_data_dir(repo):
    """The project's data folder beside the repository (MNIST, CIFAR-10), or
    ``$FT_KERAS_SHARED_DATA`` when set."""
    return os.environ.get("FT_KERAS_SHARED_DATA") or os.path.abspath(
        os.path.join(repo, "..", "shared", "data"))


def add_data_dir(folder, env_name):
    """Appends ``folder`` (if it exists) to the search path in ``$env_name``, once."""
    if not os.path.isdir(folder):
        return
    paths = [p for p in os.environ.get(env_name, "").split(os.pathsep) if p]
    if folder not in paths:
        os.environ[env_name] = os.pathsep.join(paths + [folder])


def parse_seeds(values, flag="seeds"):
    """A list flag of distinct integers >= 0; ValueError naming the flag otherwise."""
    try:
        seeds = [int(v) for v in values if str(v).strip()]
    except ValueError:
        raise ValueError(f"--{flag}: takes integers, e.g. 0,1,2; got {values}.") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--{flag}: must be distinct integers >= 0; got {values}.")
    return seeds


class OwnInfoOnly(logging.Filter):
    """A logging filter that lets through the INFO lines of one script (and of this module,
    whose `Runner` it may use) and everyone's warnings (TensorFlow's SavedModel writer and the
    callbacks log a lot at INFO)."""

    def __init__(self, script):
        super().__init__()
        self.scripts = (os.path.basename(script), os.path.basename(__file__))

    def filter(self, record):
        return (record.levelno >= logging.WARNING
                or os.path.basename(record.pathname) in self.scripts)


def _write_atomically(path, content):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(content)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ statistics
def summary(values):
    """``{"min", "median"}`` of the non-None values (both None when there are none)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"min": None, "median": None}
    return {"min": min(values), "median": statistics.median(values)}


def mean_std(values):
    """``{"mean", "std", "n"}`` of the non-None values (sample std, 0.0 for one value), or None
    when there are none: the per-seed summary of the recipe benchmarks."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def mean_std_cell(stat, fmt, scale=1.0):
    """A table cell of `mean_std`: ``mean ± std`` formatted with ``fmt`` after multiplying by
    ``scale`` (no "± 0" where every seed agrees exactly), "-" for None."""
    if stat is None:
        return "-"
    text = fmt.format(stat["mean"] * scale)
    if stat["n"] > 1 and stat["std"] > 0:
        text += " ± " + fmt.format(stat["std"] * scale)
    return text


def ratio(numerator, denominator):
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def parse_bool(text, flag):
    """A flag's true/false word as a bool; ValueError naming the flag otherwise."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"--{flag} takes true/false values; got {text!r}.")


def parse_positive_ints(values, flag):
    """A list flag of positive integers; ValueError naming the flag otherwise."""
    out = []
    for value in values:
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ValueError(f"--{flag} takes positive integers; got {value!r}.") from None
        if number <= 0:
            raise ValueError(f"--{flag} takes positive integers; got {value!r}.")
        out.append(number)
    return out


def multiples_in(first, last, every):
    """How many multiples of ``every`` lie in ``[first, last]`` (integers; 0 if last < first)."""
    if every <= 0:
        raise ValueError(f"every must be positive; got {every}.")
    if last < first:
        return 0
    return last // every - (first - 1) // every


# ------------------------------------------------------------------ ft_keras vs tfmot table
def comparison_rows(step_time, tfmot):
    """Rows of the side-by-side table: ft_keras (DST, dense) and tfmot (pruned, tf_keras dense).

    Args:
        step_time: ``step_overhead.py``'s ``step_time`` rows (keys ``model``, ``jit_compile``,
            ``steps_per_execution``, ``ms_per_step`` with ``dense`` / ``dst`` summaries).
        tfmot: ``tfmot_baseline.py``'s report (``status`` "ok" and ``rows`` with ``model``,
            ``steps_per_execution``, ``ms_per_step`` with ``dense`` / ``pruned`` summaries), or
            None / a report with another status (not installed, failed).

    Returns:
        One dict per (model, steps_per_execution), for XLA off only (tfmot runs without XLA), in
        the order of ``step_time`` followed by tfmot-only settings. Every ms and ratio is the min
        over rounds (``*_median`` from the medians); missing measurements are None and ``note``
        says why the tfmot cells are empty.
    """
    tfmot = tfmot or {"status": "not_run"}
    ok = tfmot.get("status") == "ok"
    theirs = {}
    if ok:
        for row in tfmot.get("rows", []):
            theirs[(row["model"], int(row["steps_per_execution"]))] = row
    ours = {}
    for row in step_time or []:
        if row.get("jit_compile"):
            continue
        ours[(row["model"], int(row["steps_per_execution"]))] = row
    keys = list(ours) + [k for k in theirs if k not in ours]
    if ok:
        note = None
    elif tfmot.get("status") == "not_installed":
        note = NOT_INSTALLED
    else:
        note = "not measured: " + str(tfmot.get("reason") or tfmot.get("status"))
    rows = []
    for model, spe in keys:
        our = ours.get((model, spe), {}).get("ms_per_step", {})
        their = theirs.get((model, spe), {})
        their_ms = their.get("ms_per_step", {})
        dense = our.get("dense", {})
        dst = our.get("dst", {})
        tfk_dense = their_ms.get("dense", {})
        pruned = their_ms.get("pruned", {})
        rows.append({
            "model": model,
            "jit_compile": False,
            "steps_per_execution": spe,
            "ftk_dense_ms": dense.get("min"),
            "ftk_dst_ms": dst.get("min"),
            "ftk_ratio": ratio(dst.get("min"), dense.get("min")),
            "ftk_ratio_median": ratio(dst.get("median"), dense.get("median")),
            "tf_keras_dense_ms": tfk_dense.get("min"),
            "tfmot_pruned_ms": pruned.get("min"),
            "tfmot_ratio": ratio(pruned.get("min"), tfk_dense.get("min")),
            "tfmot_ratio_median": ratio(pruned.get("median"), tfk_dense.get("median")),
            "tfmot_mask_updates": their.get("mask_updates_per_timed_round"),
            # Across processes (measured at different times): a rough comparison only.
            "ftk_dst_over_tfmot_pruned": ratio(dst.get("min"), pruned.get("min")),
            "note": note if not ok else (None if their else "not measured in this run"),
        })
    return rows


def _f(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}"


def comparison_markdown(rows, labels, update_every):
    """Markdown lines of the ONE table that puts ft_keras and tfmot side by side.

    ``labels`` maps model keys to display names (unknown keys are shown as they are).
    """
    lines = [
        "| model | XLA | steps_per_execution | ft_keras dense ms/step | ft_keras DST ms/step "
        "| **ft_keras DST / dense** | tf_keras dense ms/step | tfmot pruned ms/step "
        "| **tfmot pruned / tf_keras dense** | updates (tfmot) | ft_keras DST / tfmot pruned |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        head = (f"| {labels.get(r['model'], r['model'])} | off | {r['steps_per_execution']} "
                f"| {_f(r['ftk_dense_ms'])} | {_f(r['ftk_dst_ms'])} | {_f(r['ftk_ratio'], 3)} ")
        if r["tfmot_pruned_ms"] is None:
            lines.append(head + f"| {r['note'] or 'n/a'} | | | | |")
            continue
        updates = r["tfmot_mask_updates"]
        lines.append(
            head
            + f"| {_f(r['tf_keras_dense_ms'])} | {_f(r['tfmot_pruned_ms'])} "
            f"| {_f(r['tfmot_ratio'], 3)} | {'n/a' if updates is None else updates} "
            f"| {_f(r['ftk_dst_over_tfmot_pruned'], 3)} |"
        )
    del update_every  # in the caption, not the table
    return lines


# -------------------------------------------------------------------------- peak memory
def _sum_bytes(report):
    return sum((report.get("variables_bytes") or {}).values()) if report else None


def _diff(a, b):
    return None if a is None or b is None else a - b


def memory_accounting(dense, child, variant, float_bytes=4, adam_like=False):
    """Expected vs measured extra bytes of one sparse variant over the dense child.

    Args:
        dense, child: the two children's reports (``masked_layers`` with ``size``,
            ``variables_bytes``, ``peak_before_training``, ``training_peak``, and, where
            measured, ``mask_draw_alone`` / ``update_alone`` with ``increment``).
        variant: "static", "dst" (grow="gradient"), "dst_random" or "dst_momentum".
        float_bytes: bytes per kernel element (4 for float32).
        adam_like: the optimizer is Adam-like (grow="momentum" keeps two buffers then).

    Returns:
        Rows ``(phase, component, expected bytes, measured bytes)``; None where a number is not
        defined. The *total* row of each phase compares the expectation with the measured
        difference of the two processes: persistent = variables (exact), before training =
        peak RSS up to the end of model building (``sparsify`` included), training = peak RSS
        during ``fit``. Transient parts of one phase are taken as not overlapping (the largest
        one counts), which is what a step that handles one layer at a time needs.
    """
    known = ("static", "dst", "dst_random", "dst_momentum")
    if variant not in known:
        raise ValueError(f"variant={variant!r}; choose from {known}.")
    sizes = [int(layer["size"]) for layer in child.get("masked_layers", [])]
    if not sizes:
        raise ValueError(f"the {variant} child reports no masked layer.")
    total, largest = sum(sizes), max(sizes)
    rows = []

    persistent = [("kernel_mask: 1 byte (bool) per kernel position of the masked layers",
                   total)]
    if variant == "dst_momentum":
        persistent.append(("ftk_grad_m: dense-gradient momentum, one float per position",
                           float_bytes * total))
        if adam_like:
            persistent.append(("ftk_grad_v: second moment (Adam-like optimizers)",
                               float_bytes * total))
    for name, size in persistent:
        rows.append(("persistent", name, size, None))
    persistent_total = sum(size for _, size in persistent)
    rows.append(("persistent", "total (model + optimizer variables)", persistent_total,
                 _diff(_sum_bytes(child), _sum_bytes(dense))))

    model_bytes = (child.get("variables_bytes") or {}).get("model")
    draw = (child.get("mask_draw_alone") or {}).get("increment")
    rows.append(("before training", "sparsify: the sparse copy of the model (the dense model is "
                 "alive until sparsify returns)", model_bytes, None))
    rows.append(("before training", "sparsify: drawing the largest layer's initial mask "
                 "(random_mask called eagerly, measured alone; sparsify runs it as a graph)", draw, None))
    rows.append(("before training", "total (peak RSS up to the compiled model)",
                 None if model_bytes is None or draw is None else model_bytes + draw,
                 _diff(child.get("peak_before_training"), dense.get("peak_before_training"))))

    transients = [
        ("on_train_begin: kernel and momentum re-zeroed off-mask, eagerly (largest layer: "
         "2 reads + 2 tf.where)", 2 * float_bytes * largest),
        ("masked gradient tf.where(mask, g, 0) of the largest layer, every step",
         float_bytes * largest),
    ]
    if variant != "static":
        update = (child.get("update_alone") or {}).get("increment")
        transients.append(("mask update of the largest layer (scores, radix selection, resets; "
                           "measured alone)", update))
    for name, size in persistent:
        rows.append(("training", name, size, None))
    for name, size in transients:
        rows.append(("training", name, size, None))
    known_transients = [size for _, size in transients if size is not None]
    rows.append(("training", "total (persistent + the largest transient)",
                 persistent_total + max(known_transients) if known_transients else None,
                 _diff(child.get("training_peak"), dense.get("training_peak"))))
    return rows


def memory_rows(children, target=MEMORY_TARGET_RATIO):
    """Per-variant rows of the peak-memory table, with ratios to the dense child.

    ``children`` maps variant -> the child's report (``rss_after_build``,
    ``peak_before_training``, ``training_peak``, ``lifetime_peak``; bytes). A child that
    failed has ``error`` and no numbers.
    """
    dense = children.get("dense") or {}
    rows = []
    for variant, child in children.items():
        if child.get("error"):
            rows.append({"variant": variant, "error": child["error"]})
            continue
        base = child.get("rss_after_build")
        peak = child.get("training_peak")
        increment = None if base is None or peak is None else peak - base
        dense_increment = None
        if dense.get("rss_after_build") is not None and dense.get("training_peak") is not None:
            dense_increment = dense["training_peak"] - dense["rss_after_build"]
        lifetime_ratio = ratio(child.get("lifetime_peak"), dense.get("lifetime_peak"))
        rows.append({
            "variant": variant,
            "rss_after_import": child.get("rss_after_import"),
            "rss_after_build": base,
            "peak_before_training": child.get("peak_before_training"),
            "training_peak": peak,
            "lifetime_peak": child.get("lifetime_peak"),
            "training_increment": increment,
            "peak_ratio": lifetime_ratio,
            "training_peak_ratio": ratio(peak, dense.get("training_peak")),
            "increment_ratio": ratio(increment, dense_increment),
            "meets_target": None if lifetime_ratio is None else lifetime_ratio <= target,
            "extra_over_dense": (
                None if child.get("lifetime_peak") is None or dense.get("lifetime_peak") is None
                else child["lifetime_peak"] - dense["lifetime_peak"]),
        })
    return rows


def _mib(value, digits=1):
    return "n/a" if value is None else f"{value / MIB:.{digits}f}"


def memory_markdown(rows_by_allocator, target=MEMORY_TARGET_RATIO):
    """Markdown lines of ONE peak-memory table: a line per (allocator, variant).

    ``rows_by_allocator`` maps an allocator name to `memory_rows` output.
    """
    lines = [
        "| allocator | variant | RSS after import MiB | RSS after build MiB "
        "| peak before training MiB | training peak MiB | training increment MiB "
        "| **peak / dense** | training peak / dense | increment / dense |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for allocator, rows in rows_by_allocator.items():
        for r in rows:
            if r.get("error"):
                lines.append(f"| {allocator} | {r['variant']} | failed: {r['error']} "
                             "| | | | | | | |")
                continue
            mark = "" if r["meets_target"] in (None, True) else " ✗"
            lines.append(
                f"| {allocator} | {r['variant']} | {_mib(r['rss_after_import'])} "
                f"| {_mib(r['rss_after_build'])} | {_mib(r['peak_before_training'])} "
                f"| {_mib(r['training_peak'])} | {_mib(r['training_increment'])} "
                f"| {_f(r['peak_ratio'], 3)}{mark} | {_f(r['training_peak_ratio'], 3)} "
                f"| {_f(r['increment_ratio'], 3)} |"
            )
    del target
    return lines


def alone_markdown(children):
    """Lines of the table of the two big selections measured alone (eager/graph vs XLA).

    ``children`` maps variant -> child report (one allocator); variants without the
    measurements are skipped.
    """
    lines = [
        "| variant | largest layer (positions) "
        "| initial mask draw, random_mask called eagerly MiB | same, XLA-compiled MiB "
        "| mask update, as in training (graph) MiB | same, XLA-compiled MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant, child in children.items():
        draw = child.get("mask_draw_alone")
        if child.get("error") or not draw:
            continue

        def cell(key):
            entry = child.get(key)
            return "" if entry is None else _mib(entry.get("increment"))

        lines.append(
            f"| {variant} | {draw['layer']} ({draw['size']:,}) | {cell('mask_draw_alone')} "
            f"| {cell('mask_draw_alone_xla')} | {cell('update_alone')} "
            f"| {cell('update_alone_xla')} |")
    return lines


def accounting_markdown(rows, variant):
    """Lines of one variant's accounting table (rows from `memory_accounting`)."""
    lines = [
        f"| {variant}: phase | component | expected MiB | measured MiB (vs dense) |",
        "|---|---|---:|---:|",
    ]
    for phase, name, expected, measured in rows:
        bold = name.startswith("total")
        name = f"**{name}**" if bold else name
        lines.append(f"| {phase} | {name} | {_mib(expected, 1)} "
                     f"| {_mib(measured, 1) if measured is not None else ''} |")
    return lines


# ------------------------------------------------------------------- timing and memory data
def fashion_mnist_slice(num_examples, data_dir=None):
    """The first ``num_examples`` Fashion-MNIST training images (uint8) and labels (int64),
    wrapping around past the end: the fixed slice the timing and memory benchmarks train on (its
    content does not matter, only that every run sees the same)."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    import ft_keras as ftk  # pylint: disable=import-outside-toplevel

    images, labels = ftk.data.load_numpy("fashion_mnist", "train", data_dir=data_dir)
    index = np.arange(num_examples) % len(images)
    return images[index], labels[index].astype(np.int64)


# ------------------------------------------------------------------------ recipe benchmarks
class Data:
    """One data set of `ft_keras.data` split for the recipe benchmarks (bench/diversity.py,
    bench/reproduce.py): the first ``train_examples`` training examples (None: all), of which
    the last ``validation_fraction`` validate, and the first ``test_examples`` test examples
    (``test_images``, ``test_labels``: the scripts build their evaluation sets from them).

    Args:
        dataset: a name of `ft_keras.data.INFO`.
        batch_size: examples per training batch (the last incomplete batch is dropped).
        validation_fraction: the share of the training examples held out for validation.
        train_examples, test_examples: how many examples to read (None: the whole split).
        data_dir: where the data set is (None: `ft_keras.data`'s default).
        augment: None, or a function ``(image, label) -> (image, label)`` mapped over the
            training examples before batching.
        usage: ``usage(flag, message)`` returns the exception to raise for a bad flag
            (``--train_examples``, ``--data_dir``).
    """

    def __init__(self, dataset, batch_size, validation_fraction, *, train_examples=None,
                 test_examples=None, data_dir=None, augment=None, usage=ValueError):
        import ft_keras as ftk  # pylint: disable=import-outside-toplevel
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        self._ftk, self._tf = ftk, tf
        self.dataset, self.batch_size, self.augment = dataset, batch_size, augment
        self._data_dir, self._usage = data_dir, usage
        info = ftk.data.INFO[dataset]
        self.input_shape, self.num_classes = tuple(info["shape"]), int(info["num_classes"])
        images, labels = self.load(dataset, _split("train", train_examples))
        num_validation = int(round(validation_fraction * len(labels)))
        self.num_train = len(labels) - num_validation
        self.num_validation = num_validation
        if num_validation < 1 or self.num_train < batch_size:
            raise usage("train_examples", f"{len(labels)} examples give {self.num_train} "
                        f"training and {num_validation} validation examples; need at least one "
                        f"batch (--batch_size={batch_size}) and one validation example.")
        self.steps_per_epoch = self.num_train // batch_size
        self._train = tf.data.Dataset.from_tensor_slices(
            (images[:self.num_train], labels[:self.num_train]))
        self._validation = tf.data.Dataset.from_tensor_slices(
            (images[self.num_train:], labels[self.num_train:]))
        self.test_images, self.test_labels = self.load(dataset, _split("test", test_examples))

    def load(self, name, split):
        """``(images, labels)`` of a split of a data set; a missing data set is a usage error."""
        try:
            return self._ftk.data.load_numpy(name, split, data_dir=self._data_dir)
        except FileNotFoundError as error:
            raise self._usage("data_dir", str(error)) from None

    def train(self, seed):
        """Training batches of float images in [0, 1], reshuffled every epoch from ``seed``."""
        tf = self._tf
        ds = self._train.shuffle(self.num_train, seed=seed, reshuffle_each_iteration=True)
        if self.augment is not None:
            ds = ds.map(self.augment, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(self.batch_size, drop_remainder=True)
        return self._ftk.data.normalize(ds).prefetch(tf.data.AUTOTUNE)

    def validation(self):
        """Validation batches (at least 500 examples each) of float images in [0, 1]."""
        ds = self._validation.batch(max(self.batch_size, 500))
        return self._ftk.data.normalize(ds).prefetch(self._tf.data.AUTOTUNE)


def _split(name, examples):
    return f"{name}[:{examples}]" if examples else name


class Progress:
    """Planned and finished epochs of a recipe benchmark, for its progress log lines (one
    count for bench/reproduce.py and bench/diversity.py)."""

    def __init__(self, total_epochs=0, start=None):
        self.total_epochs = total_epochs
        self.done_epochs = 0
        self.start = time.time() if start is None else start

    def advance(self, epochs):
        """Counts ``epochs`` more as done; returns `line`."""
        self.done_epochs += epochs
        return self.line()

    def line(self, now=None):
        """``"<elapsed> s elapsed, <share>% of the planned epochs, ~<eta> s left"``."""
        elapsed = (time.time() if now is None else now) - self.start
        done = self.done_epochs / max(self.total_epochs, 1)
        eta = elapsed / done - elapsed if done > 0 else float("nan")
        return (f"{elapsed:.0f} s elapsed, {100 * done:.0f}% of the planned epochs, ~{eta:.0f} s "
                "left (epoch-count estimate)")


# -------------------------------------------------------------------- recipe benchmark runs
def recipe_machine_info(repo):
    """The ``machine`` of a recipe benchmark's report: `host_info` of ``repo``, the GPUs and
    the versions of TensorFlow, Keras, numpy and ft_keras."""
    # pylint: disable=import-outside-toplevel
    import keras
    import numpy as np
    import tensorflow as tf

    import ft_keras

    return {**host_info(repo), "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
            "ft_keras": ft_keras.__version__}


def script_command(argv, repo):
    """How a benchmark was started: ``python <script> <arguments>``, the script's path relative
    to ``repo`` when it was given as an absolute path."""
    script = os.path.relpath(argv[0], repo) if os.path.isabs(argv[0]) else argv[0]
    return "python " + shlex.join([script] + list(argv[1:]))


def output_dir(flag_value, quick, quick_name, repo):
    """Where a benchmark writes its report: ``--output_dir`` if given, else a temporary folder
    named ``quick_name`` for a ``--quick`` run, else the repository's docs/."""
    if flag_value:
        return flag_value
    if quick:
        return os.path.join(tempfile.gettempdir(), quick_name)
    return os.path.join(repo, "docs")


@contextlib.contextmanager
def work_folder(flag_value, prefix, keep=False):
    """The folder the tickets of a run go to: ``--work_dir`` (created if missing; kept), or a new
    temporary folder named with ``prefix``, deleted at the end unless ``keep``."""
    folder = flag_value or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(folder, exist_ok=True)
    try:
        yield folder
    finally:
        if not flag_value and not keep:
            shutil.rmtree(folder, ignore_errors=True)


class Runner:
    """What the recipe benchmarks (bench/reproduce.py, bench/diversity.py) do around each run
    they train: its folder under the work folder, the log lines before and after with the
    planned-epochs count (`Progress`), and freeing what Keras holds once it is recorded. Each
    script subclasses it with what it runs and records."""

    def __init__(self, work_dir, total_epochs=0, start=None):
        self.work_dir = work_dir
        self.progress = Progress(total_epochs, start)

    def folder(self, model, seed, name, *more):
        """``work_dir/<model>/seed_<seed>/<name>[/<more>...]`` (a ``:`` in ``name`` as ``_``)."""
        return os.path.join(self.work_dir, model, f"seed_{seed}", name.replace(":", "_"), *more)

    def train(self, model, seed, name, epochs, train, folder):
        """``train(folder)``, the training of run ``name`` of ``model`` and ``seed`` for
        ``epochs`` epochs, logged before and after; returns its result."""
        from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

        absl_logging.info("[%s, seed %d] training %s (%d epochs)", model, seed, name, epochs)
        started = time.time()
        result = train(folder)
        absl_logging.info("[%s, seed %d] %s trained in %.1f s; %s", model, seed, name,
                          time.time() - started, self.progress.advance(epochs))
        return result

    @staticmethod
    def release():
        """Frees what Keras holds of the runs so far (between runs)."""
        import keras  # pylint: disable=import-outside-toplevel

        keras.backend.clear_session()
        gc.collect()


# ------------------------------------------------------------------- recipe benchmark pages
def settings_lines(pairs):
    """A markdown list of ``(name, value)`` settings, values as the run's configuration has them."""
    return [f"- {name}: {value}" for name, value in pairs]


def run_line(date_utc, machine, timing):
    """Where, when and how long a benchmark ran (from its report's machine and timing)."""
    others = timing.get("other_processes_cores")
    gpus = machine.get("gpus")
    return (f"Run on {date_utc} (UTC), {machine['cpus_usable']} usable CPU cores"
            + (f" ({machine['cpu_model']})" if machine.get("cpu_model") else "")
            + ("" if "gpus" not in machine else f", GPUs {gpus}" if gpus else ", no GPU")
            + f"; TensorFlow {machine['tensorflow']}, Keras {machine['keras']}, ft_keras "
            f"{machine['ft_keras']}, commit `{(machine.get('git_commit') or 'unknown')[:12]}`. "
            f"Total wall time {timing['total_s'] / 60:.1f} min (training "
            f"{timing['training_s'] / 60:.1f} min)"
            + (f"; other processes kept {others:.2f} cores busy on average, so wall times are "
               "upper bounds" if others is not None and others > 0.1 else "") + ".")


def markdown_region(script, command, run, settings, body, notes, heading=None, intro="",
                    command_note=""):
    """The generated region of a recipe benchmark's page, without its markers: an optional
    ``heading``, ``intro`` and the command (with ``command_note`` after it), `run_line`, the
    settings (`settings_lines`), a link to the hand-written explanation ``notes`` and the
    ``body`` lines (tables, plots)."""
    lines = [f"<!-- Generated by {script}; edits between these markers are overwritten. -->", ""]
    if heading:
        lines += [heading, ""]
    lines += [f"{intro}Command: `{command}`{command_note}.", "", run, "", "Settings:", ""]
    lines += list(settings) + [
        "", f"How the numbers are taken and what the columns mean: [{notes}]({notes})."]
    return "\n".join(lines + list(body))


def write_region(path, name, region, new_page):
    """Puts ``region`` between the markers of region ``name`` of the page at ``path``, keeping
    the hand-written text around them; a missing page is created as ``new_page`` with
    ``{region}`` standing for the marked region."""
    if os.path.exists(path):
        return replace_region(path, name, region)
    begin, end = region_markers(name)
    write_text(path, new_page.replace("{region}", f"{begin}\n{region.strip(chr(10))}\n{end}"))
    return None


def read_report(json_path, usage, check):
    """The report of a finished run read back for ``--render_only``.

    Args:
        json_path: the report's JSON.
        usage: ``usage(flag, message)`` returns the exception to raise.
        check: ``check(report)`` returns why the report cannot be rendered, or None.
    """
    try:
        with open(json_path, encoding="utf-8") as handle:
            report = json.load(handle)
    except (OSError, ValueError) as error:
        raise usage("render_only", f"cannot read {json_path!r}: {error}") from None
    problem = check(report)
    if problem:
        raise usage("render_only", f"{json_path!r} {problem}")
    return report
