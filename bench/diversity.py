"""Diversity benchmark: what steers the diversity of EDST tickets, and does it pay?

Sweeps, one factor at a time around a base setting, what controls how different the M tickets of
one EDST run (``ftk.FreeTickets``, via ``ft_keras.recipes.train_edst``) come out, and reports, per
setting and model (mean and spread over seeds), the tickets' pairwise disagreement and KL
diversity, the ensemble's and the mean ticket's test accuracy, NLL, ECE, the ensemble's gain over
its best ticket and the training FLOPs relative to one dense model, next to two references:

* the single dense model (``train_dense``, cosine learning rate);
* the DST Ensemble at the same training FLOPs as the EDST run (``train_dst_ensemble``): M
  independent DST runs, each with 1/M of the EDST run's epochs (cosine learning rate, the base
  setting's DST updates).

The factors (named settings; see `SETTINGS`; ``a+b`` combines two):

* optimizer state: ``optimizer_state="masked"`` (base) vs ``"dense"`` (``opt_dense``);
* the global exploration's drop fraction q: 0.8 (base), 0.9, 0.95, 1.0 (``q0.9`` ...);
* the regular drop fraction: constant 0.5 (base) vs cosine-annealed 0.5 -> 0.005
  (``cosine_drop``, FreeTickets' default);
* the refinement length: ``refine_short`` / ``refine_long`` (half / double the base's epochs);
* the value grown weights start from: 0 (base, RigL) vs N(0, (0.5 * rms of the kept weights)^2)
  (``grown_0.5``, SET-style);
* the learning rate of the first epoch after each global exploration: the phase's own (base) vs
  0.05 or 0.1 (``jump_lr0.05``, ``jump_lr0.1``).

Every setting runs with the same seeds, so for a seed the EDST runs of two settings start from the
same weights, masks and data order: the differences to the base are reported paired by seed.
With ``--followup=K`` (default 2), after the first model of ``--models`` is done, the K settings
of its sweep with the best rank sum of ensemble accuracy and NLL are also run on the later models.

Outputs (``--output_dir``; default ``docs/`` in full mode, a folder under the system temp dir with
``--quick``):

* ``diversity.json``: every run's numbers, the plan, the settings, the commands and the machine;
  written after every finished run. A run whose record is there (with the same configuration) is
  not trained again, so rerunning an interrupted command resumes it (``--restart`` starts over);
* the tables, written into ``--markdown`` (default ``<output_dir>/results.md``) between
  ``<!-- diversity:begin -->`` and ``<!-- diversity:end -->``; text outside the markers is kept;
* ``diversity_accuracy_vs_disagreement.png``.

How to run (from the repository root; ``../shared/data``, or ``$FT_KERAS_SHARED_DATA``, is added
to the data search path when it exists):

    python bench/diversity.py --quick               # a few minutes on 2 CPU cores, writes to /tmp
    python bench/diversity.py                       # the full sweep
    python bench/diversity.py --models=lenet_300_100 --settings=base,opt_dense --seeds=0,1
    python bench/diversity.py --render_only=docs/diversity.json   # markdown + plot again
"""

import dataclasses
import datetime
import json
import os
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

try:
    import ft_keras as ftk  # noqa: E402
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ft_keras as ftk  # noqa: E402
from ft_keras.harness import evaluation  # noqa: E402
from ft_keras.harness import metrics as metrics_lib  # noqa: E402
from ft_keras.harness import recipes  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_tables  # noqa: E402  pylint: disable=wrong-import-position

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = bench_tables.shared_data_dir(_REPO)
OUTPUT_NAME = "diversity"
REGION = "diversity"  # the page's generated region: <!-- diversity:begin --> ... :end -->
# The hand-written page that explains the generated one (relative to the page, in docs/).
NOTES = "reading_benchmarks.md#edst-ticket-diversity-benchmark"
DATASET = "fashion_mnist"

MODELS = {"lenet_300_100": "LeNet-300-100 (MLP)", "lenet5": "LeNet-5 (CNN)"}

# The base EDST setting (the one of issue #13's side-by-side table) and what each named setting
# changes. "refine_scale" multiplies the model's base refinement epochs.
BASE = {"optimizer_state": "masked", "explore_fraction": 0.8, "decay": "constant",
        "refine_scale": 1.0, "grown_weight_scale": 0.0, "jump_lr": None}
SETTINGS = {
    # name: (factor, overrides of BASE)
    "base": ("base", {}),
    "opt_dense": ("optimizer state", {"optimizer_state": "dense"}),
    "q0.9": ("global exploration q", {"explore_fraction": 0.9}),
    "q0.95": ("global exploration q", {"explore_fraction": 0.95}),
    "q1.0": ("global exploration q", {"explore_fraction": 1.0}),
    "cosine_drop": ("regular drop fraction", {"decay": "cosine"}),
    "refine_short": ("refinement length", {"refine_scale": 0.5}),
    "refine_long": ("refinement length", {"refine_scale": 2.0}),
    # Not in "all": the longest refinement at <= 1x the dense run's FLOPs on the MLP (12 + 3 x 28
    # epochs, 0.97x); 1.7x on LeNet-5.
    "refine_x3.5": ("refinement length", {"refine_scale": 3.5}),
    "grown_0.5": ("grown weights' start", {"grown_weight_scale": 0.5}),
    "jump_lr0.05": ("learning rate after a jump", {"jump_lr": 0.05}),
    "jump_lr0.1": ("learning rate after a jump", {"jump_lr": 0.1}),
}
ALWAYS = ("base", "opt_dense")  # run on every model; never picked as a follow-up
EXTRA = ("refine_x3.5",)  # given by name only: not in "all", never picked as a follow-up
SWEEP = tuple(n for n in SETTINGS if n not in EXTRA)  # what "all" runs
FREE_TICKETS_ONLY = ("jump_lr", "jump_lr_epochs")  # FreeTickets' arguments, not DynamicSparsity's
DEFAULT_SETTINGS = ["lenet_300_100:all", "lenet5:base", "lenet5:opt_dense"]

# Per model: epochs of the dense run, EDST's base exploration and refinement epochs.
DEFAULTS = {
    "dense_epochs": {"lenet_300_100": 20, "lenet5": 12},
    "exploration_epochs": {"lenet_300_100": 12, "lenet5": 6},
    "refine_epochs": {"lenet_300_100": 8, "lenet5": 4},
}
QUICK = {
    "seeds": ["0"],
    "train_examples": 3000,
    "test_examples": 1000,
    "dense_epochs": ["3"],
    "exploration_epochs": ["3"],
    "refine_epochs": ["2"],
    "update_every": 5,
    "settings": ["lenet_300_100:base", "lenet_300_100:opt_dense", "lenet_300_100:q1.0",
                 "lenet5:base", "lenet5:opt_dense"],
    "followup": 1,
}

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "Smoke run (a few minutes on 2 cores): 1 seed, 3,000 training "
                  "examples, a few epochs, 3 settings on the MLP and 2 + 1 on LeNet-5; output "
                  "under the temp dir unless --output_dir is given.")
flags.DEFINE_list("models", list(MODELS), f"Models, in run order, from {list(MODELS)}.")
flags.DEFINE_list("settings", DEFAULT_SETTINGS,
                  "EDST settings: NAME (every model) or MODEL:NAME entries; NAME is one of "
                  f"{list(SETTINGS)}, 'all' (all but {list(EXTRA)}), or names joined by '+' "
                  "(combined).")
flags.DEFINE_integer("followup", 2, "After the first model, also run its K best settings "
                     "(rank sum of ensemble accuracy and NLL) on the later models.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; member m of seed s uses 100 * s + m (EDST: "
                  "100 * s).")
flags.DEFINE_list("dense_epochs", None, "Epochs of the dense run: N or MODEL:N entries (default "
                  f"{DEFAULTS['dense_epochs']}).")
flags.DEFINE_list("exploration_epochs", None, "EDST base exploration epochs: N or MODEL:N "
                  f"(default {DEFAULTS['exploration_epochs']}).")
flags.DEFINE_list("refine_epochs", None, "EDST base epochs per refinement phase: N or MODEL:N "
                  f"(default {DEFAULTS['refine_epochs']}).")
flags.DEFINE_integer("num_members", 3, "Tickets M of EDST, members of the DST Ensemble.")
flags.DEFINE_float("sparsity", 0.8, "Sparsity S (ERK).")
flags.DEFINE_integer("update_every", 100, "Optimizer steps between regular mask updates.")
flags.DEFINE_float("drop_fraction", 0.5, "Regular drop fraction (constant in the base; cosine "
                   "settings anneal it to 0.005).")
flags.DEFINE_float("exploration_lr", 0.1, "EDST exploration learning rate.")
flags.DEFINE_list("refine_lr", ["0.01", "0.001"], "EDST refinement learning rates (two halves).")
flags.DEFINE_integer("jump_lr_epochs", 1, "Epochs the jump_lr settings last after each jump.")
flags.DEFINE_float("learning_rate", 0.05, "Peak of the cosine learning rate of the dense run and "
                   "of every DST Ensemble member.")
flags.DEFINE_float("weight_decay", 5e-4, "Decoupled weight decay of SGD (Keras's weight_decay: "
                   "w <- w - lr * wd * w each step).")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer("steps_per_execution", 32, "Keras steps_per_execution.")
flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA (slower for LeNet-5 on "
                  "CPU).")
flags.DEFINE_float("validation_fraction", 0.1, "Fraction at the end of the training split held "
                   "out to select every ticket.")
flags.DEFINE_integer("train_examples", 0, "Use the first N training examples (0: all).")
flags.DEFINE_integer("test_examples", 0, "Use the first N test examples (0: all).")
flags.DEFINE_string("output_dir", None, "Where diversity.json and the plot go (default: docs/, "
                    "or <tmp>/ft_keras_diversity_quick with --quick).")
flags.DEFINE_string("markdown", None, "The markdown file whose diversity region is written "
                    "(default: <output_dir>/results.md).")
flags.DEFINE_bool("restart", False, "Ignore the runs already in the output JSON.")
flags.DEFINE_string("work_dir", None, "Where tickets go while a run is evaluated (default: a new "
                    "temporary folder, deleted at the end).")
flags.DEFINE_string("data_dir", None, "Data folder searched first.")
flags.DEFINE_bool("plots", True, "Write the PNG plot.")
flags.DEFINE_string("render_only", None, "Train nothing: re-render the markdown and the plot of "
                    "an existing diversity JSON.")
flags.DEFINE_integer("keras_verbose", 0, "Keras fit verbosity (0, 1 or 2).")

for _name in ("num_members", "batch_size", "steps_per_execution", "update_every"):
    flags.register_validator(_name, lambda v: v >= 1, f"--{_name} must be an integer >= 1.")
for _name in ("train_examples", "test_examples", "followup", "jump_lr_epochs"):
    flags.register_validator(_name, lambda v: v >= 0, f"--{_name} must be an integer >= 0.")
flags.register_validator("sparsity", lambda v: 0.0 < v < 1.0, "--sparsity must be in (0, 1).")
flags.register_validator("validation_fraction", lambda v: 0.0 < v < 1.0,
                         "--validation_fraction must be in (0, 1): tickets are selected on it.")
flags.register_validator("drop_fraction", lambda v: 0.005 <= v <= 1.0,
                         "--drop_fraction must be in [0.005, 1].")
for _name in ("exploration_lr", "learning_rate"):
    flags.register_validator(_name, lambda v: v > 0, f"--{_name} must be > 0.")
flags.register_validator("weight_decay", lambda v: v >= 0, "--weight_decay must be >= 0.")
flags.register_validator("momentum", lambda v: 0 <= v < 1, "--momentum must be in [0, 1).")
flags.register_validator("keras_verbose", lambda v: v in (0, 1, 2),
                         "--keras_verbose must be 0, 1 or 2.")


# ------------------------------------------------------------------------------- settings
def _usage(flag, message):
    return app.UsageError(f"--{flag}: {message}")


def resolve_setting(name):
    """``(factor, overrides)`` of a setting name (``a+b`` combines one-factor settings)."""
    parts = name.split("+")
    unknown = [p for p in parts if p not in SETTINGS]
    if unknown:
        raise _usage("settings", f"unknown setting {unknown[0]!r} in {name!r}; choose from "
                     f"{list(SETTINGS)}, 'all', or names joined by '+'.")
    if len(parts) == 1:
        return SETTINGS[name]
    overrides = {}
    for part in parts:
        for key, value in SETTINGS[part][1].items():
            if key in overrides:
                raise _usage("settings", f"{name!r} sets {key} twice.")
            overrides[key] = value
    return "combined", overrides


def _per_model(flag, values, models, defaults):
    """``{model: int}`` from ``N`` / ``MODEL:N`` entries over ``defaults``."""
    out = {m: defaults[m] for m in models}
    if values is None:
        return out
    everyone, named = None, {}
    for entry in (v.strip() for v in values if v.strip()):
        model, _, number = entry.rpartition(":")
        try:
            count = int(number)
        except ValueError:
            raise _usage(flag, f"{entry!r} is not N or MODEL:N with an integer N.") from None
        minimum = 0 if flag == "exploration_epochs" else 1
        if count < minimum:
            raise _usage(flag, f"{entry!r}: must be >= {minimum}.")
        if not model:
            everyone = count
        elif model not in MODELS:
            raise _usage(flag, f"{entry!r} names an unknown model; choose from {list(MODELS)}.")
        else:
            named[model] = count
    for model in models:
        out[model] = named.get(model, everyone if everyone is not None else out[model])
    return out


def _parse_settings(values, models):
    """``{model: [setting names]}`` in the given order, ``base`` and ``opt_dense`` first."""
    plan = {m: [] for m in models}
    for entry in (v.strip() for v in values if v.strip()):
        model, _, name = entry.rpartition(":")
        if model and model not in MODELS:
            raise _usage("settings", f"{entry!r} names an unknown model; choose from "
                         f"{list(MODELS)}.")
        names = list(SWEEP) if name == "all" else [name]
        for n in names:
            resolve_setting(n)
        for target in ([model] if model else models):
            if target in plan:
                plan[target] += [n for n in names if n not in plan[target]]
    for model, names in plan.items():
        if not names:
            raise _usage("settings", f"no setting for {model}; give e.g. {model}:base.")
        plan[model] = [n for n in ALWAYS if n in names] + [n for n in names if n not in ALWAYS]
    return plan


def _parse_seeds(values):
    try:
        return bench_tables.parse_seeds(values)
    except ValueError as error:
        raise app.UsageError(str(error)) from None


@dataclasses.dataclass
class Config:
    """Everything a run depends on, resolved from the flags (and --quick)."""

    quick: bool
    models: list
    plan: dict  # model -> setting names given on the command line
    followup: int
    seeds: list
    dense_epochs: dict
    exploration_epochs: dict
    refine_epochs: dict
    num_members: int
    sparsity: float
    update_every: int
    drop_fraction: float
    exploration_lr: float
    refine_lr: tuple
    jump_lr_epochs: int
    learning_rate: float
    weight_decay: float
    momentum: float
    batch_size: int
    steps_per_execution: int
    jit_compile: bool
    validation_fraction: float
    train_examples: int
    test_examples: int

    def as_dict(self):
        return dataclasses.asdict(self)


def _flag(name):
    """A flag's value; with --quick, the QUICK value unless the flag was given."""
    if FLAGS.quick and name in QUICK and not FLAGS[name].present:
        return QUICK[name]
    return FLAGS[name].value


def resolve_config():
    """The `Config` of the flags; raises app.UsageError naming the flag on bad values."""
    models = [m.strip() for m in FLAGS.models if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if not models or unknown or len(set(models)) != len(models):
        raise _usage("models", f"{FLAGS.models}: give distinct models from {list(MODELS)}.")
    try:
        refine_lr = tuple(float(v) for v in FLAGS.refine_lr)
    except ValueError:
        raise _usage("refine_lr", f"takes two numbers, e.g. 0.01,0.001; got {FLAGS.refine_lr}.")
    if len(refine_lr) != 2 or min(refine_lr) <= 0:
        raise _usage("refine_lr", f"takes two positive numbers; got {FLAGS.refine_lr}.")
    if FLAGS.num_members < 2:
        raise _usage("num_members", f"{FLAGS.num_members}: diversity needs at least 2 tickets.")
    refine = _per_model("refine_epochs", _flag("refine_epochs"), models,
                        DEFAULTS["refine_epochs"])
    return Config(
        quick=FLAGS.quick,
        models=models,
        plan=_parse_settings(_flag("settings"), models),
        followup=_flag("followup"),
        seeds=_parse_seeds(_flag("seeds")),
        dense_epochs=_per_model("dense_epochs", _flag("dense_epochs"), models,
                                DEFAULTS["dense_epochs"]),
        exploration_epochs=_per_model("exploration_epochs", _flag("exploration_epochs"), models,
                                      DEFAULTS["exploration_epochs"]),
        refine_epochs=refine,
        num_members=FLAGS.num_members,
        sparsity=FLAGS.sparsity,
        update_every=_flag("update_every"),
        drop_fraction=FLAGS.drop_fraction,
        exploration_lr=FLAGS.exploration_lr,
        refine_lr=refine_lr,
        jump_lr_epochs=FLAGS.jump_lr_epochs,
        learning_rate=FLAGS.learning_rate,
        weight_decay=FLAGS.weight_decay,
        momentum=FLAGS.momentum,
        batch_size=FLAGS.batch_size,
        steps_per_execution=FLAGS.steps_per_execution,
        jit_compile=FLAGS.jit_compile,
        validation_fraction=FLAGS.validation_fraction,
        train_examples=_flag("train_examples"),
        test_examples=_flag("test_examples"),
    )


# ----------------------------------------------------------------------------------- runs
def edst_spec(config, model, setting):
    """The full description of one EDST setting on ``model`` (what its record stores)."""
    factor, overrides = resolve_setting(setting)
    knobs = dict(BASE, **overrides)
    refine = max(1, int(round(config.refine_epochs[model] * knobs.pop("refine_scale"))))
    exploration = config.exploration_epochs[model]
    # Every setting's budget must split into M equal DST Ensemble members.
    total = exploration + config.num_members * refine
    return {
        "kind": "edst", "setting": setting, "factor": factor, "overrides": overrides,
        "exploration_epochs": exploration, "refine_epochs": refine, "epochs": total,
        "explore_fraction": knobs.pop("explore_fraction"),
        "dst_kwargs": dict(update_every=config.update_every,
                           drop_fraction=config.drop_fraction, final_drop_fraction=0.005,
                           grow="gradient", decay=knobs.pop("decay"),
                           optimizer_state=knobs.pop("optimizer_state"),
                           grown_weight_scale=knobs.pop("grown_weight_scale"),
                           jump_lr=knobs.pop("jump_lr"),
                           jump_lr_epochs=config.jump_lr_epochs),
    }


def dst_epochs_for(config, epochs):
    """Epochs of each DST Ensemble member at the FLOPs of an EDST run of ``epochs`` epochs."""
    return max(1, int(round(epochs / config.num_members)))


def run_specs(config, model, settings):
    """The ordered runs of ``model``: dense, then the EDST settings, each new epoch budget
    followed by its DST Ensemble."""
    specs = [{"kind": "dense", "name": "dense", "epochs": config.dense_epochs[model]}]
    budgets = set()
    for setting in settings:
        spec = edst_spec(config, model, setting)
        spec["name"] = f"edst:{setting}"
        specs.append(spec)
        member_epochs = dst_epochs_for(config, spec["epochs"])
        if member_epochs not in budgets:
            budgets.add(member_epochs)
            specs.append({"kind": "dst_ensemble", "name": f"dst_ensemble:{member_epochs}ep",
                          "member_epochs": member_epochs,
                          "epochs": member_epochs * config.num_members,
                          "dst_kwargs": {k: v for k, v in edst_spec(
                              config, model, "base")["dst_kwargs"].items()
                                         if k not in FREE_TICKETS_ONLY}})
    # The optimizer-state comparison and the base's reference first.
    order = {"dense": 0, "edst:base": 1, "edst:opt_dense": 2}
    first_dst = next(s["name"] for s in specs if s["kind"] == "dst_ensemble")
    order[first_dst] = 3
    return sorted(specs, key=lambda s: order.get(s["name"], 4))


def _run_config(config, model, spec):
    """What a record must match to be reused: the spec and every global knob of the run."""
    shared = {k: v for k, v in config.as_dict().items()
              if k not in ("quick", "models", "plan", "followup", "seeds", "dense_epochs",
                           "exploration_epochs", "refine_epochs")}
    shared["dense_epochs"] = config.dense_epochs[model]  # the FLOPs reference
    return json.loads(json.dumps({"spec": {k: v for k, v in spec.items() if k != "name"},
                                  "shared": shared}))


# ----------------------------------------------------------------------------------- data
def load_data(config, data_dir):
    """Fashion-MNIST split for the runs (`bench_tables.Data`), with its evaluation sets."""
    data = bench_tables.Data(DATASET, config.batch_size, config.validation_fraction,
                             train_examples=config.train_examples,
                             test_examples=config.test_examples, data_dir=data_dir, usage=_usage)
    data.eval = evaluation.make_data(data.test_images, data.test_labels)
    return data


# ------------------------------------------------------------------------------- training
def member_seed(seed, member=0):
    return 100 * seed + member


def train(config, data, model, seed, spec, ticket_dir):
    """Trains one run with its recipe; returns the `RecipeResult`."""
    def build():
        return ftk.models.get(model, input_shape=data.input_shape, num_classes=data.num_classes)

    compile_kwargs = dict(momentum=config.momentum, weight_decay=config.weight_decay or None,
                          steps_per_execution=config.steps_per_execution,
                          jit_compile=config.jit_compile)
    common = dict(validation_data=data.validation(), ticket_dir=ticket_dir,
                  seed=member_seed(seed), monitor="val_accuracy", batch_size=config.batch_size,
                  overwrite=True, fit_kwargs=dict(verbose=FLAGS.keras_verbose))
    sparse = dict(sparsity=config.sparsity, distribution="erk")
    if spec["kind"] in ("dense", "dst_ensemble"):
        epochs = spec["epochs"] if spec["kind"] == "dense" else spec["member_epochs"]
        cosine = recipes.make_compile_fn("sgd", config.learning_rate, "cosine",
                                         decay_steps=epochs * data.steps_per_epoch,
                                         **compile_kwargs)
        if spec["kind"] == "dense":
            return recipes.train_dense(build, data.train, epochs=epochs, compile_fn=cosine,
                                       **common)
        return recipes.train_dst_ensemble(build, config.num_members, data.train, epochs=epochs,
                                          compile_fn=cosine, dst_kwargs=spec["dst_kwargs"],
                                          **sparse, **common)
    return recipes.train_edst(
        build, config.num_members, data.train, exploration_epochs=spec["exploration_epochs"],
        refine_epochs=spec["refine_epochs"], exploration_lr=config.exploration_lr,
        refine_lr=config.refine_lr, explore_fraction=spec["explore_fraction"],
        dst_kwargs=spec["dst_kwargs"],
        compile_fn=recipes.make_compile_fn("sgd", config.exploration_lr, **compile_kwargs),
        **sparse, **common)


TEST_KEYS = ("test/accuracy", "test/nll", "test/ece", "test/brier", "test/disagreement",
             "test/kl_diversity", "test/mutual_information", "test/accuracy_member_mean",
             "test/nll_member_mean", "test/ece_member_mean")


def evaluate_run(config, data, model, result):
    """The record's numbers of one trained run (tickets read back from disk)."""
    members = [ftk.read_ticket(path) for path in result.tickets]
    reference = ftk.training_cost.training_macs(
        members[0][0], config.dense_epochs[model] * data.steps_per_epoch, config.batch_size,
        sparse=False)
    ev = evaluation.evaluate([m for m, _ in members], data.eval,
                             training_macs=result.training_macs, dense_training_macs=reference)
    values = ev.metrics
    count = len(members)
    out = {k: values[k] for k in TEST_KEYS if k in values}
    for key in ("cost/training_macs", "cost/dense_training_macs", "cost/training_macs_relative",
                "cost/inference_macs_relative", "cost/active_params"):
        out[key] = values[key]
    member_accuracy = [values[f"test/accuracy_member_{i}"] for i in range(count)]
    out["member_accuracy"] = member_accuracy
    out["member_nll"] = [values[f"test/nll_member_{i}"] for i in range(count)]
    out["ensemble_minus_best_member_accuracy"] = values["test/accuracy"] - max(member_accuracy)
    if count >= 2:
        out["pairwise_disagreement"] = {
            f"{i}-{j}": metrics_lib.disagreement(ev.member_probs[[i, j]])
            for i in range(count) for j in range(i + 1, count)}
        out["pairwise_kl_diversity"] = {
            f"{i}-{j}": metrics_lib.kl_diversity(ev.member_probs[[i, j]])
            for i in range(count) for j in range(i + 1, count)}
    meta = [m for _, m in members]
    info = {"ticket_epochs": [m.get("epoch") for m in meta],
            "best_val_accuracy": [m.get("monitor_value") for m in meta],
            "member_seeds": list(result.member_seeds)}
    return out, info


# --------------------------------------------------------------------------------- records
def record_key(record):
    return record["model"], record["run"], record["seed"]


class Store:
    """The JSON report, written after every finished run; reuses matching records."""

    def __init__(self, path, restart):
        self.path = path
        self.report = None
        if os.path.exists(path) and not restart:
            try:
                with open(path, encoding="utf-8") as handle:
                    self.report = json.load(handle)
            except (OSError, ValueError) as error:
                raise _usage("output_dir", f"cannot read {path!r} to resume ({error}); pass "
                             "--restart to start over.") from None
            if self.report.get("output_name") != OUTPUT_NAME:
                raise _usage("output_dir", f"{path!r} is not a diversity report; pass --restart "
                             "to overwrite it.")
        self.records = list(self.report["records"]) if self.report else []
        self.invocations = list(self.report.get("invocations", [])) if self.report else []
        self.followups = dict(self.report.get("followups", {})) if self.report else {}

    def find(self, model, run, seed, run_config):
        for record in self.records:
            if record_key(record) == (model, run, seed):
                if record["config"] != run_config:
                    raise _usage("restart", f"{self.path} holds {model} {run} seed {seed} "
                                 "trained with another configuration; rerun with the flags of "
                                 "that run, pass --restart, or choose another --output_dir.")
                return record
        return None

    def add(self, record):
        self.records.append(record)


# ---------------------------------------------------------------------------- aggregation
SUMMARY_KEYS = TEST_KEYS + ("ensemble_minus_best_member_accuracy", "cost/training_macs_relative",
                            "cost/inference_macs_relative", "wall_time_s")


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    array = np.asarray(values, np.float64)
    return {"mean": float(array.mean()),
            "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0, "n": len(array)}


def _value(record, key):
    return record["metrics"].get(key, record.get(key))


def _rows(records, model, run):
    return {r["seed"]: r for r in records if r["model"] == model and r["run"] == run}


def summarize(records, model, run):
    rows = list(_rows(records, model, run).values())
    return {k: _stats([_value(r, k) for r in rows]) for k in SUMMARY_KEYS}


def paired(records, model, run, reference, key):
    """``value(run) - value(reference)`` per common seed: stats and how many are > 0."""
    ours, theirs = _rows(records, model, run), _rows(records, model, reference)
    seeds = sorted(set(ours) & set(theirs))
    diffs = [_value(ours[s], key) - _value(theirs[s], key) for s in seeds]
    stats = _stats(diffs)
    if stats:
        stats["positive"] = int(sum(d > 0 for d in diffs))
        stats["negative"] = int(sum(d < 0 for d in diffs))
        stats["per_seed"] = dict(zip(seeds, diffs))
    return stats


def beats_dense(records, model, run):
    """Seeds where the run beats the dense model of the same seed in accuracy AND NLL."""
    ours, dense = _rows(records, model, run), _rows(records, model, "dense")
    seeds = sorted(set(ours) & set(dense))
    wins = [s for s in seeds
            if _value(ours[s], "test/accuracy") > _value(dense[s], "test/accuracy")
            and _value(ours[s], "test/nll") < _value(dense[s], "test/nll")]
    return {"wins": len(wins), "seeds": len(seeds)}


def rank_settings(records, model, settings):
    """``settings`` ordered by the rank sum of mean ensemble accuracy (high) and NLL (low)."""
    stats = {s: summarize(records, model, f"edst:{s}") for s in settings}
    stats = {s: v for s, v in stats.items() if v["test/accuracy"]}
    by_acc = sorted(stats, key=lambda s: -stats[s]["test/accuracy"]["mean"])
    by_nll = sorted(stats, key=lambda s: stats[s]["test/nll"]["mean"])
    return sorted(stats, key=lambda s: (by_acc.index(s) + by_nll.index(s),
                                        -stats[s]["test/accuracy"]["mean"]))


def build_summary(records, plan_runs):
    """Per model: stats of every run, paired differences and the goal check."""
    out = {}
    for model, specs in plan_runs.items():
        runs = {}
        for spec in specs:
            name = spec["name"]
            if not _rows(records, model, name):
                continue
            entry = {"kind": spec["kind"], "epochs": spec["epochs"],
                     "stats": summarize(records, model, name)}
            if spec["kind"] == "edst":
                entry["setting"] = spec["setting"]
                entry["factor"] = spec["factor"]
                entry["refine_epochs"] = spec["refine_epochs"]
                entry["dst_reference"] = f"dst_ensemble:{dst_epochs_for_spec(spec)}ep"
                entry["vs_base"] = {k: paired(records, model, name, "edst:base", k)
                                    for k in ("test/disagreement", "test/kl_diversity",
                                              "test/accuracy", "test/accuracy_member_mean",
                                              "test/nll", "test/ece",
                                              "ensemble_minus_best_member_accuracy")}
            if spec["kind"] != "dense":
                entry["vs_dense"] = {k: paired(records, model, name, "dense", k)
                                     for k in ("test/accuracy", "test/nll", "test/ece")}
                entry["beats_dense"] = beats_dense(records, model, name)
            runs[name] = entry
        out[model] = runs
    return out


def dst_epochs_for_spec(spec):
    return spec["dst_member_epochs"]


# --------------------------------------------------------------------------------- markdown
def _cell(stat, fmt="{:.2f}", scale=1.0, signed=False):
    if stat is None:
        return "-"
    fmt_signed = fmt.replace("{:", "{:+") if signed else fmt
    text = fmt_signed.format(stat["mean"] * scale)
    spread = fmt.format(stat["std"] * scale)
    if stat["n"] > 1 and spread.strip("0.,") != "":  # no "± 0.000" where the seeds agree
        text += " ± " + spread
    return text


def _delta(stat, fmt, scale, good="up"):
    """A paired difference: mean ± std (k/n seeds better)."""
    if stat is None:
        return "-"
    better = stat["positive"] if good == "up" else stat["negative"]
    return f"{_cell(stat, fmt, scale, signed=True)} ({better}/{stat['n']})"


SETTING_LABELS = {
    "base": "base (masked state, q 0.8, drop 0.5 constant, grown at 0, jump at refine_lr[0])",
    "opt_dense": "optimizer_state = dense",
    "q0.9": "q = 0.9", "q0.95": "q = 0.95", "q1.0": "q = 1.0",
    "cosine_drop": "drop 0.5 cosine -> 0.005",
    "refine_short": "refinement x 0.5", "refine_long": "refinement x 2",
    "refine_x3.5": "refinement x 3.5",
    "grown_0.5": "grown at N(0, (0.5 rms)^2)",
    "jump_lr0.05": "lr 0.05 after jump", "jump_lr0.1": "lr 0.1 after jump",
}


def _setting_label(setting):
    return " + ".join(SETTING_LABELS.get(p, p) for p in setting.split("+")) if (
        setting != "base") else "base"


def _main_columns(stats, single=False):
    return [
        _cell(stats["test/disagreement"], "{:.2f}", 100.0),
        _cell(stats["test/kl_diversity"], "{:.4f}"),
        _cell(stats["test/accuracy"], "{:.2f}", 100.0),
        _cell(stats["test/accuracy_member_mean"], "{:.2f}", 100.0),
        _cell(stats["test/nll"], "{:.4f}"),
        _cell(stats["test/ece"], "{:.4f}"),
        "-" if single else _cell(stats["ensemble_minus_best_member_accuracy"], "{:.2f}", 100.0,
                                 signed=True),
        _cell(stats["cost/training_macs_relative"], "{:.3f}"),
    ]


MAIN_HEADER = ("Disagr. (%) | KL div. | Ens. acc. (%) | Mean ticket acc. (%) | NLL | ECE | "
               "Ens. - best ticket (pts) | Train FLOPs (x dense)")


def _settings_lines(report):
    c, data = report["config"], report["data"]
    pairs = [
        ("data", f"Fashion-MNIST: {data['train_examples']:,d} training, "
                 f"{data['validation_examples']:,d} validation (fraction "
                 f"{c['validation_fraction']}), {data['test_examples']:,d} test examples"),
        ("optimizer", f"SGD momentum {c['momentum']}, decoupled weight decay "
                      f"{c['weight_decay']}"),
        ("batch size", c["batch_size"]),
        ("steps_per_execution", c["steps_per_execution"]),
        ("XLA", "on" if c["jit_compile"] else "off"),
        ("sparsity S (ERK)", c["sparsity"]),
        ("members M", c["num_members"]),
        ("EDST base learning rates", f"exploration {c['exploration_lr']}, refinement "
                                     f"{c['refine_lr'][0]} then {c['refine_lr'][1]}"),
        ("update_every", c["update_every"]),
        ("drop fraction", c["drop_fraction"]),
        ("jump_lr epochs", c["jump_lr_epochs"]),
    ]
    for model in c["models"]:
        edst = next(s for s in report["plan_runs"][model] if s["name"] == "edst:base")
        pairs.append((f"{MODELS[model]} epochs",
                      f"dense {c['dense_epochs'][model]} (cosine from lr {c['learning_rate']}); "
                      f"EDST base {edst['exploration_epochs']} + {c['num_members']} x "
                      f"{edst['refine_epochs']}; DST Ensemble {c['num_members']} x "
                      f"{edst['epochs'] // c['num_members']}"))
    pairs.append(("seeds", c["seeds"]))
    for model, follow in report.get("followups", {}).items():
        pairs.append((f"{MODELS[model]} follow-up settings",
                      f"{', '.join(c['plan'][model])} + the best of the {MODELS[follow['from']]} "
                      f"sweep: {', '.join(follow['chosen']) or 'none'}"))
    return bench_tables.settings_lines(pairs)


def _invocations_text(invocations):
    """How the JSON was filled when it took more than one invocation (each resumes the last)."""
    if len(invocations) < 2:
        return ""
    if len({i["command"] for i in invocations}) == 1:
        return f" (run in {len(invocations)} invocations of that command, each resuming the last)"
    parts = [f"`{i['command']}` ({i['wall_s'] / 60:.0f} min"
             + ("" if i.get("complete") else ", interrupted") + ")" for i in invocations]
    return (f"; it ran as {len(invocations)} invocations, each resuming the JSON of the one "
            f"before and training only the runs missing from it: " + ", then ".join(parts))


def markdown_region(report):
    """The generated part (between the markers)."""
    mode = "quick (smoke) mode" if report["config"]["quick"] else "full mode"
    lines = []
    for model, runs in report["summary"].items():
        if not runs:
            continue
        lines += ["", f"### {MODELS[model]}"]
        base, dense = runs.get("edst:base"), runs.get("dense")
        opt = runs.get("edst:opt_dense")
        if base and opt:
            vs = opt["vs_base"]
            lines += ["", "**Optimizer state** (`optimizer_state`, EDST base setting otherwise):",
                      "", f"| optimizer_state | {MAIN_HEADER} |", "|---" * 9 + "|",
                      f"| masked | " + " | ".join(_main_columns(base["stats"])) + " |",
                      f"| dense | " + " | ".join(_main_columns(opt["stats"])) + " |",
                      "| dense - masked (paired) | "
                      + " | ".join([
                          _delta(vs["test/disagreement"], "{:.2f}", 100.0),
                          _delta(vs["test/kl_diversity"], "{:.4f}", 1.0),
                          _delta(vs["test/accuracy"], "{:.2f}", 100.0),
                          _delta(vs["test/accuracy_member_mean"], "{:.2f}", 100.0),
                          _delta(vs["test/nll"], "{:.4f}", 1.0, good="down"),
                          _delta(vs["test/ece"], "{:.4f}", 1.0, good="down"),
                          _delta(vs["ensemble_minus_best_member_accuracy"], "{:.2f}", 100.0),
                          "-"]) + " |"]
        lines += ["", "**All settings** (references first):", "",
                  f"| Run | Epochs | {MAIN_HEADER} | Acc. - dense (pts) | NLL - dense "
                  "| beats dense in acc. and NLL (seeds) |",
                  "|---" * 13 + "|"]
        for name, entry in runs.items():
            stats = entry["stats"]
            if entry["kind"] == "dense":
                label = "Dense (single model)"
                tail = ["-", "-", "-"]
            else:
                if entry["kind"] == "dst_ensemble":
                    label = (f"DST Ensemble, {report['config']['num_members']} x "
                             f"{entry['epochs'] // report['config']['num_members']} epochs")
                else:
                    label = f"EDST: {_setting_label(entry['setting'])}"
                vd = entry["vs_dense"]
                tail = [_delta(vd["test/accuracy"], "{:.2f}", 100.0),
                        _delta(vd["test/nll"], "{:.4f}", 1.0, good="down"),
                        f"{entry['beats_dense']['wins']}/{entry['beats_dense']['seeds']}"]
            lines.append(f"| {label} | {entry['epochs']} | "
                         + " | ".join(_main_columns(stats, entry["kind"] == "dense") + tail)
                         + " |")
        edst = [(n, e) for n, e in runs.items() if e["kind"] == "edst" and n != "edst:base"]
        if base and edst:
            lines += ["", "**Change from the base EDST setting** (paired by seed):", "",
                      "| Setting | Factor | Disagr. (pts) | KL div. | Ens. acc. (pts) "
                      "| Mean ticket acc. (pts) | NLL | Ens. - best ticket (pts) "
                      "| DST Ensemble at the same FLOPs: acc. (%) / NLL |",
                      "|---" * 9 + "|"]
            for name, entry in edst:
                vs = entry["vs_base"]
                reference = runs.get(entry["dst_reference"])
                ref = "-" if not reference else (
                    f"{_cell(reference['stats']['test/accuracy'], '{:.2f}', 100.0)} / "
                    f"{_cell(reference['stats']['test/nll'], '{:.4f}')}")
                lines.append(
                    f"| {_setting_label(entry['setting'])} | {entry['factor']} | "
                    + " | ".join([
                        _delta(vs["test/disagreement"], "{:.2f}", 100.0),
                        _delta(vs["test/kl_diversity"], "{:.4f}", 1.0),
                        _delta(vs["test/accuracy"], "{:.2f}", 100.0),
                        _delta(vs["test/accuracy_member_mean"], "{:.2f}", 100.0),
                        _delta(vs["test/nll"], "{:.4f}", 1.0, good="down"),
                        _delta(vs["ensemble_minus_best_member_accuracy"], "{:.2f}", 100.0),
                        ref]) + " |")
        winners = [(n, e) for n, e in runs.items() if e["kind"] == "edst"
                   and e["stats"]["cost/training_macs_relative"]["mean"] <= 1.0 + 1e-9
                   and dense and e["stats"]["test/accuracy"]["mean"]
                   > dense["stats"]["test/accuracy"]["mean"]
                   and e["stats"]["test/nll"]["mean"] < dense["stats"]["test/nll"]["mean"]]
        lines += ["", "Goal (EDST beats the dense model in mean accuracy and mean NLL at <= 1x its "
                  "training FLOPs): " + (
                      ", ".join(f"{_setting_label(e['setting'])} ({e['beats_dense']['wins']}/"
                                f"{e['beats_dense']['seeds']} seeds)" for _, e in winners)
                      if winners else "no setting.")]
    if report.get("plots"):
        lines += ["", "Plot:", ""] + [f"![{p}]({p})" for p in report["plots"]]
    lines += ["", f"Raw per-seed numbers (per-ticket accuracies, pairwise disagreement, ticket "
              f"epochs): `{OUTPUT_NAME}.json`."]
    return bench_tables.markdown_region(
        "bench/diversity.py", report["command"],
        bench_tables.run_line(report["date_utc"], report["machine"], report["timing"]),
        _settings_lines(report), lines, NOTES,
        heading="## EDST ticket diversity: what steers it (`bench/diversity.py`)",
        intro=f"{mode.capitalize()}. ",
        command_note=_invocations_text(report.get("invocations", [])))


def write_markdown(path, report):
    """Writes the region into ``path`` (appended when the file has no markers), keeping the
    text outside the markers."""
    bench_tables.write_region(path, REGION, markdown_region(report),
                              "# EDST ticket diversity\n\n{region}\n")


# ------------------------------------------------------------------------------------ plot
def write_plot(report, output_dir):
    """Ensemble accuracy against disagreement (mean ± std), one panel per model."""
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
        from matplotlib import ticker  # pylint: disable=import-outside-toplevel
    except ImportError:
        logging.warning("matplotlib is not installed: no plot.")
        return []
    models = [m for m, runs in report["summary"].items() if runs]
    if not models:
        return []
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        runs = report["summary"][model]
        for name, entry in runs.items():
            stats = entry["stats"]
            y = stats["test/accuracy"]
            if entry["kind"] == "dense":
                ax.axhline(100 * y["mean"], color="black", linestyle="--", linewidth=1,
                           label="dense (single model)")
                continue
            x = stats["test/disagreement"]
            dst = entry["kind"] == "dst_ensemble"
            ax.errorbar(100 * x["mean"], 100 * y["mean"], xerr=100 * x["std"],
                        yerr=100 * y["std"], fmt="s" if dst else "o", capsize=2,
                        color="tab:orange" if dst else (
                            "tab:red" if name == "edst:base" else "tab:blue"))
            members = report["config"]["num_members"]
            ax.annotate(f"DST {members}x{entry['epochs'] // members}ep" if dst
                        else entry["setting"],
                        (100 * x["mean"], 100 * y["mean"]), fontsize=6,
                        textcoords="offset points", xytext=(4, 3))
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.xaxis.set_major_locator(ticker.FixedLocator([1, 2, 3, 4, 5, 7, 10, 20, 50, 100]))
        ax.set(xlabel="pairwise disagreement of the members (%, log scale)",
               ylabel="ensemble test accuracy (%)", title=MODELS[model])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = os.path.join(output_dir, f"{OUTPUT_NAME}_accuracy_vs_disagreement.png")
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return [path]


# ---------------------------------------------------------------------------------- running
class Runner(bench_tables.Runner):
    """Plans, trains (or reuses) and evaluates every run; writes the report as it goes."""

    def __init__(self, config, data, store, work_dir, meter, machine, command, start):
        super().__init__(work_dir, start=start)
        self.config, self.data, self.store = config, data, store
        self.meter, self.machine = meter, machine
        self.command, self.start = command, start
        self.plan_runs = {}
        self.trained_s = 0.0

    def settings_for(self, model):
        names = list(self.config.plan[model])
        follow = self.store.followups.get(model)
        if follow:
            names += [n for n in follow["chosen"] if n not in names]
        return names

    def _choose_followups(self, model):
        first = self.config.models[0]
        if model == first or not self.config.followup or model in self.store.followups:
            return
        candidates = [s for s in self.settings_for(first) if s in SWEEP
                      and s not in ALWAYS and s not in self.config.plan[model]]
        ranked = rank_settings(self.store.records, first, candidates)
        chosen = ranked[:self.config.followup]
        self.store.followups[model] = {"from": first, "chosen": chosen, "ranking": ranked,
                                       "rule": "rank sum of mean ensemble accuracy (high) and "
                                               "mean NLL (low) on the first model"}
        logging.info("%s: follow-up settings from %s: %s (ranking %s)", model, first, chosen,
                     ranked)

    def run(self):
        for model in self.config.models:
            self._choose_followups(model)
            specs = run_specs(self.config, model, self.settings_for(model))
            for spec in specs:
                if spec["kind"] == "edst":
                    spec["dst_member_epochs"] = dst_epochs_for(self.config, spec["epochs"])
            self.plan_runs[model] = specs
            self.progress.total_epochs = sum(len(self.config.seeds) * s["epochs"]
                                             for m in self.plan_runs.values() for s in m)
            for spec in specs:
                for seed in self.config.seeds:
                    self._one(model, spec, seed)
        return self.report(complete=True)

    def _one(self, model, spec, seed):
        run_config = _run_config(self.config, model, spec)
        if self.store.find(model, spec["name"], seed, run_config) is not None:
            self.progress.advance(spec["epochs"])
            logging.info("[%s, seed %d] %s: in the JSON already, skipped", model, seed,
                         spec["name"])
            return
        folder = self.folder(model, seed, spec["name"])
        started = time.time()
        result = self.train(model, seed, spec["name"], spec["epochs"],
                            lambda f: train(self.config, self.data, model, seed, spec, f), folder)
        metrics, info = evaluate_run(self.config, self.data, model, result)
        shutil.rmtree(folder, ignore_errors=True)
        record = {"model": model, "run": spec["name"], "kind": spec["kind"], "seed": seed,
                  "config": run_config, "epochs": spec["epochs"],
                  "wall_time_s": float(result.wall_time_s),
                  "run_time_s": time.time() - started, "metrics": metrics, **info}
        self.store.add(record)
        self.trained_s += record["wall_time_s"]
        logging.info("[%s, seed %d] %s: accuracy %.4f (tickets %s), NLL %.4f, disagreement %s, "
                     "training %.3fx dense, %.0f s", model, seed, spec["name"],
                     metrics["test/accuracy"],
                     " ".join(f"{a:.4f}" for a in metrics["member_accuracy"]),
                     metrics["test/nll"], f"{metrics.get('test/disagreement', float('nan')):.4f}",
                     metrics["cost/training_macs_relative"], record["run_time_s"])
        self.write(self.report(complete=False))
        self.release()

    def report(self, complete):
        records = self.store.records
        plan_runs = {m: [dict(s) for s in specs] for m, specs in self.plan_runs.items()}
        now = time.time() - self.start
        invocations = self.store.invocations + [{
            "command": self.command,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "wall_s": now, "training_s": self.trained_s,
            "other_processes_cores": self.meter.others_cores(), "complete": complete}]
        total = sum(i["wall_s"] for i in invocations)
        others = [(i["other_processes_cores"], i["wall_s"]) for i in invocations
                  if i["other_processes_cores"] is not None]
        return {
            "output_name": OUTPUT_NAME,
            "complete": complete,
            "command": self.command,
            "invocations": invocations,
            "date_utc": invocations[-1]["date_utc"],
            "machine": self.machine,
            "timing": {"total_s": total,
                       "training_s": sum(r["wall_time_s"] for r in records),
                       "other_processes_cores": (sum(c * w for c, w in others)
                                                 / max(sum(w for _, w in others), 1e-9))
                       if others else None},
            "config": self.config.as_dict(),
            "base": BASE,
            "setting_definitions": {k: {"factor": f, "overrides": o}
                                    for k, (f, o) in SETTINGS.items()},
            "followups": self.store.followups,
            "data": {"train_examples": self.data.num_train,
                     "validation_examples": self.data.num_validation,
                     "steps_per_epoch": self.data.steps_per_epoch,
                     "test_examples": int(len(self.data.eval.test_labels))},
            "plan_runs": plan_runs,
            "summary": build_summary(records, plan_runs),
            "records": records,
            "plots": [],
            "notes": [
                "Costs are multiply-accumulates (FLOPs = 2 x MACs); ratios are the same in FLOPs.",
                "Ensembles average the members' softmax probabilities.",
                "Metric keys follow ft_keras.evaluation; ensemble_minus_best_member_accuracy = "
                "test/accuracy - max_i test/accuracy_member_i.",
            ],
        }

    def write(self, report):
        bench_tables.write_text(self.store.path, dump_report(report))


def dump_report(report):
    """The report as JSON text: indented, except that each record is one line."""
    head = json.dumps({k: v for k, v in report.items() if k != "records"}, indent=1)
    records = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in report["records"])
    return head[:-2] + ',\n "records": [\n' + records + "\n ]\n}"


def render(report, output_dir, markdown_path, plots):
    paths = write_plot(report, output_dir) if plots else []
    report["plots"] = [os.path.basename(p) for p in paths]
    write_markdown(markdown_path, report)
    return report


def render_only(json_path):
    report = bench_tables.read_report(
        json_path, _usage,
        lambda r: None if r.get("output_name") == OUTPUT_NAME else "is not a diversity report.")
    output_dir = FLAGS.output_dir or os.path.dirname(os.path.abspath(json_path))
    os.makedirs(output_dir, exist_ok=True)
    markdown = FLAGS.markdown or os.path.join(output_dir, "results.md")
    render(report, output_dir, markdown, FLAGS.plots)
    logging.info("re-rendered %s from %s", markdown, json_path)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.render_only:
        render_only(FLAGS.render_only)
        return
    start = time.time()
    meter = bench_tables.CpuMeter()
    tf.get_logger().setLevel("ERROR")
    logging.get_absl_handler().addFilter(bench_tables.OwnInfoOnly(__file__))
    if FLAGS.data_dir is None:
        bench_tables.add_data_dir(SHARED_DATA, ftk.data.DATA_DIR_ENV)
    config = resolve_config()
    output_dir = bench_tables.output_dir(FLAGS.output_dir, FLAGS.quick,
                                         "ft_keras_diversity_quick", _REPO)
    markdown = FLAGS.markdown or os.path.join(output_dir, "results.md")
    data = load_data(config, FLAGS.data_dir)
    os.makedirs(output_dir, exist_ok=True)
    store = Store(os.path.join(output_dir, OUTPUT_NAME + ".json"), FLAGS.restart)
    logging.info("config: %s", json.dumps(config.as_dict()))
    logging.info("outputs: %s, %s; %d runs in the JSON already", store.path, markdown,
                 len(store.records))
    with bench_tables.work_folder(FLAGS.work_dir, "ft_keras_diversity_") as work_dir:
        runner = Runner(config, data, store, work_dir, meter,
                        bench_tables.recipe_machine_info(_REPO),
                        bench_tables.script_command(sys.argv, _REPO), start)
        report = runner.run()
    report = render(report, output_dir, markdown, FLAGS.plots)
    runner.write(report)
    logging.info("done in %.1f min: %s, %s", (time.time() - start) / 60, store.path, markdown)


if __name__ == "__main__":
    app.run(main)
