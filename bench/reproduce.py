"""Reproduction benchmark: FreeTickets (EDST / DST Ensembles) against dense and sparse baselines.

Trains and evaluates, for every model of the configuration and every seed, each method with its
recipe in ``ft_keras.recipes`` (the methods are described in docs/method.md):

* ``dense``: one dense model (it is member 0 of the deep ensemble of the same seed when both are
  run, so it is trained once);
* ``deep_ensemble``: M dense models with independent seeds (``train_deep_ensemble``);
* ``dst_ensemble``: M independent dynamic-sparse-training runs at sparsity S (ERK, RigL gradient
  growth, magnitude pruning, drop fraction 0.5 cosine-annealed to 0.005), ``train_dst_ensemble``;
* ``edst``: ONE sparse run with ``ftk.FreeTickets`` (exploration, then M refinement phases with a
  global exploration jump q before phases 2..M), ``train_edst``; the epochs follow the paper's
  ratio t_ex : t_re : dense = 150 : 100 : 250 (CIFAR), i.e. ``round(0.6 E) + M * round(0.4 E)``
  epochs where E is the dense run's epochs;
* ``static_sparse_ensemble``: M sparse models with fixed random ERK masks
  (``train_static_sparse_ensemble``);
* ``checkpoint_ensemble``: M snapshots of ONE DST run, taken in the windows where EDST takes its
  tickets: EDST's run without its global explorations (same epochs, learning rates and regular
  updates), ``train_checkpoint_ensemble``. The baseline for EDST's claim that its tickets are more
  diverse than checkpoints of one run.

Every member's ticket is its best-validation epoch (a held-out part of the training split);
EDST's tickets (and the checkpoint ensemble's snapshots) are the best epoch of each refinement
window. Every ensemble is evaluated by ``ft_keras.evaluation.evaluate`` (mean of the members'
softmax probabilities, the paper's evaluation), whose keys the JSON keeps: ``test/accuracy``,
``test/nll``, ``test/ece`` (15 bins), ``test/brier``, ``test/disagreement`` and
``test/kl_diversity`` between members, ``ood/<set>/auroc_max_prob`` and
``ood/<set>/auroc_entropy`` against MNIST test images, ``corrupt/mean/accuracy`` (also ``nll``,
``ece``, and per severity ``corrupt/mean/<s>/accuracy``) over ``ft_keras.corruptions`` (every type
at 5 severities) on a fixed subset of the test set, ``cost/training_macs_relative`` (one dense run
of E epochs; ``ft_keras.flops``, theoretical sparse multiply-accumulates),
``cost/inference_macs_relative``, ``cost/active_params`` summed over members; and the training
wall time.

Outputs, in ``--output_dir`` (default ``docs/`` in full mode, a folder under the system temp dir
with ``--quick``, so that a quick run never overwrites the committed results):

* ``<name>.json``: every per-seed number, the settings, the command, machine information and
  timing (written after every (model, seed), so a cut-off run keeps what it finished);
* ``<name>.md``: the tables, written between ``<!-- results:begin -->`` and
  ``<!-- results:end -->``; text outside those markers (a hand-written discussion) is kept;
* ``<name>_accuracy_vs_training_flops.png``, ``<name>_reliability.png``,
  ``<name>_corruption_severity.png``.

``<name>`` is ``results`` for ``--config=fashion_mnist`` and ``results_cifar10`` for
``--config=cifar10``. Tickets go to ``--work_dir`` (default: a fresh temporary folder, deleted at
the end unless ``--keep_tickets``). When the configuration's default OoD set (MNIST) is not found,
the run goes on without OoD detection and says so in the JSON and the markdown (``--ood_dataset``
asks for it explicitly: then a missing set is an error; ``--ood_dataset=none`` skips it).

How to run (from the repository root; ``../shared/data``, or ``$FT_KERAS_SHARED_DATA``, is added
to the data search path when it exists):

    python bench/reproduce.py --quick            # smoke run, writes to /tmp
    python bench/reproduce.py                    # full Fashion-MNIST run
    python bench/reproduce.py --models=lenet_300_100 --methods=dense,edst --seeds=0,1,2
    python bench/reproduce.py --epochs=lenet_300_100:30,lenet5:15 --output_dir=/tmp/ftk_repro
    python bench/reproduce.py --config=cifar10 --quick      # CIFAR-10 (JPEG q75), ResNet-8
    python bench/reproduce.py --config=cifar10              # meant for a GPU
    python bench/reproduce.py --render_only=docs/results.json   # markdown + plots again
"""

import dataclasses
import datetime
import json
import os
import re
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
from ft_keras.harness import recipes  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_tables  # noqa: E402  pylint: disable=wrong-import-position

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The project's data beside the repository (MNIST, CIFAR-10); FT_KERAS_SHARED_DATA overrides it.
SHARED_DATA = bench_tables.shared_data_dir(_REPO)

METHODS = ("dense", "deep_ensemble", "dst_ensemble", "edst", "static_sparse_ensemble",
           "checkpoint_ensemble")
ENSEMBLE_METHODS = METHODS[1:]
SPARSE_METHODS = ("dst_ensemble", "edst", "static_sparse_ensemble", "checkpoint_ensemble")
PLAN_METHODS = ("edst", "checkpoint_ensemble")  # one run with EDST's phase plan
LABELS = {
    "dense": "Dense (single model)",
    "deep_ensemble": "Deep Ensemble",
    "dst_ensemble": "DST Ensemble",
    "edst": "EDST Ensemble",
    "static_sparse_ensemble": "Static sparse ensemble",
    "checkpoint_ensemble": "Checkpoint ensemble (one DST run)",
}
MODELS = {
    "lenet_300_100": ("LeNet-300-100 (MLP)", "lenet_300_100", {}),
    "lenet5": ("LeNet-5 (CNN)", "lenet5", {}),
    "small_cnn": ("small CNN (width 32)", "small_cnn", {}),
    "resnet8": ("ResNet-8 (width 16)", "resnet", {"depth": 8, "width": 16}),
    "resnet20": ("ResNet-20 (width 16)", "resnet20", {}),
}
NUM_BINS = evaluation.NUM_BINS
SEVERITIES = (1, 2, 3, 4, 5)
EDST_EXPLORATION_RATIO = 0.6  # 150 / 250 epochs in the paper's CIFAR setting
EDST_REFINE_RATIO = 0.4  # 100 / 250
# The key scheme of the records (ft_keras/harness/evaluation.py), as reports name it; reports
# without it are upgraded on reading (`upgrade_report`).
METRIC_KEYS = "ft_keras.evaluation"
REGION = "results"  # the page's generated region: <!-- results:begin --> ... <!-- results:end -->
# The hand-written page that explains the generated one (relative to the page, in docs/).
NOTES = "reading_benchmarks.md#reproduction-benchmark"

# Per configuration: data sets, default models, epochs of one dense run per model, and the rest.
CONFIGS = {
    "fashion_mnist": {
        "dataset": "fashion_mnist",
        "ood_dataset": "mnist",
        "output_name": "results",
        "models": ["lenet_300_100", "lenet5"],
        "epochs": {"lenet_300_100": 20, "lenet5": 12, "small_cnn": 10},
        "seeds": [0, 1, 2],
        "train_examples": 0,
        "test_examples": 0,
        "corruption_examples": 1000,
        "update_every": 100,
        "weight_decay": 0.0,
        "augment": False,
    },
    "cifar10": {
        "dataset": "cifar10",
        "ood_dataset": None,  # no SVHN / CIFAR-100 offline; shapes of the MNISTs differ
        "output_name": "results_cifar10",
        "models": ["resnet8"],
        "epochs": {"resnet8": 30, "resnet20": 30},
        "seeds": [0, 1, 2],
        "train_examples": 0,
        "test_examples": 0,
        "corruption_examples": 1000,
        "update_every": 100,
        "weight_decay": 5e-4,
        "augment": True,
    },
}
# What --quick changes (flags given explicitly still win).
QUICK = {
    "fashion_mnist": {
        "seeds": [0, 1],
        "train_examples": 12000,
        "epochs": {"lenet_300_100": 5, "lenet5": 4, "small_cnn": 4},
        "corruption_examples": 500,
        "update_every": 25,
    },
    "cifar10": {
        "seeds": [0],
        "train_examples": 3000,
        "test_examples": 1000,
        "epochs": {"resnet8": 2, "resnet20": 2},
        "corruption_examples": 200,
        "update_every": 10,
    },
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("config", "fashion_mnist", list(CONFIGS),
                  "fashion_mnist (LeNet-300-100 and LeNet-5, OoD = MNIST) or cifar10 (CIFAR-10 "
                  "JPEG q75, small ResNet, no OoD set).")
flags.DEFINE_string("ood_dataset", None,
                    "OoD data set, or 'none' (default: the config's, mnist for fashion_mnist, "
                    "skipped with a warning when not found; given explicitly, a missing set is "
                    "an error).")
flags.DEFINE_bool("quick", False, "Smoke run: fewer seeds, examples and "
                  "epochs (see QUICK); output under the temp dir unless --output_dir is given.")
flags.DEFINE_list("models", None, f"Models, from {sorted(MODELS)} (default: the config's).")
flags.DEFINE_list("methods", list(METHODS), f"Methods, from {list(METHODS)}.")
flags.DEFINE_list("seeds", None, "Seeds (integers); member m of seed s uses 100 * s + m.")
flags.DEFINE_list("epochs", None,
                  "Epochs of one dense run (and of every independent member): one integer for "
                  "every model, and/or model:epochs entries, e.g. lenet_300_100:20,lenet5:12.")
flags.DEFINE_integer("exploration_epochs", None,
                     "EDST (and checkpoint ensemble) exploration epochs (default: "
                     "round(0.6 * epochs)).")
flags.DEFINE_integer("refine_epochs", None,
                     "EDST (and checkpoint ensemble) epochs per refinement phase (default: "
                     "round(0.4 * epochs), >= 1).")
flags.DEFINE_integer("num_members", 3, "Members M of every ensemble (EDST: tickets; checkpoint "
                     "ensemble: snapshots).")
flags.DEFINE_float("sparsity", 0.8, "Sparsity S of the sparse methods.")
flags.DEFINE_integer("update_every", None, "Optimizer steps between DST mask updates "
                     "(default: 100; 25 with --quick).")
flags.DEFINE_float("drop_fraction", 0.5, "Initial DST drop fraction (cosine-annealed to 0.005).")
flags.DEFINE_float("explore_fraction", 0.8, "EDST global exploration drop fraction q.")
flags.DEFINE_float("learning_rate", 0.05,
                   "SGD (momentum 0.9) peak learning rate: cosine-decayed for the independent "
                   "runs, the exploration rate of EDST and the checkpoint ensemble.")
flags.DEFINE_list("refine_lr", ["0.01", "0.001"], "Refinement learning rates (two halves) of EDST "
                  "and the checkpoint ensemble.")
flags.DEFINE_float("weight_decay", None, "Decoupled weight decay (default: 0 for fashion_mnist, "
                   "5e-4 for cifar10).")
flags.DEFINE_integer("batch_size", 128, "Training batch size.")
flags.DEFINE_integer("steps_per_execution", 32, "Keras steps_per_execution.")
flags.DEFINE_float("validation_fraction", 0.1,
                   "Fraction at the end of the training examples held out to select tickets.")
flags.DEFINE_integer("train_examples", None,
                     "Use the first N training examples (0: all; default: the config's).")
flags.DEFINE_integer("test_examples", None, "Use the first N test examples (0: all).")
flags.DEFINE_integer("corruption_examples", None,
                     "Size of the fixed random test subset that is corrupted (0: all).")
flags.DEFINE_list("corruptions", list(ftk.corruptions.CORRUPTIONS),
                  "Corruptions (ft_keras.corruptions.CORRUPTIONS), or 'none'.")
flags.DEFINE_integer("corruption_seed", 0, "Seed of the random corruptions.")
flags.DEFINE_string("output_dir", None,
                    "Where the JSON, markdown and plots go (default: docs/, or "
                    "<tmp>/ft_keras_reproduce_quick with --quick).")
flags.DEFINE_string("output_name", None,
                    "Base name of the outputs (default: results, or results_cifar10).")
flags.DEFINE_string("work_dir", None, "Where tickets go (default: a new temporary folder).")
flags.DEFINE_bool("keep_tickets", False, "Keep the tickets in --work_dir after the run.")
flags.DEFINE_string("data_dir", None,
                    "Data folder searched first (default: ft_keras.data's search path, plus "
                    "../shared/data when it exists).")
flags.DEFINE_bool("plots", True, "Write the PNG plots.")
flags.DEFINE_string("render_only", None,
                    "Train nothing: re-render the markdown and plots of an existing results "
                    "JSON (into --output_dir, default: the JSON's folder).")
flags.DEFINE_integer("keras_verbose", 0, "Keras fit verbosity (0, 1 or 2).")

for _name in ("num_members", "batch_size", "steps_per_execution"):
    flags.register_validator(_name, lambda v: v >= 1, f"--{_name} must be an integer >= 1.")
for _name in ("train_examples", "test_examples", "corruption_examples", "exploration_epochs"):
    flags.register_validator(_name, lambda v: v is None or v >= 0,
                             f"--{_name} must be an integer >= 0.")
for _name in ("update_every", "refine_epochs"):
    flags.register_validator(_name, lambda v: v is None or v >= 1,
                             f"--{_name} must be an integer >= 1.")
flags.register_validator("sparsity", lambda v: 0.0 < v < 1.0, "--sparsity must be in (0, 1).")
flags.register_validator("validation_fraction", lambda v: 0.0 < v < 1.0,
                         "--validation_fraction must be in (0, 1): tickets are selected on it.")
flags.register_validator("drop_fraction", lambda v: 0.005 <= v <= 1.0,
                         "--drop_fraction must be in [0.005, 1].")
flags.register_validator("explore_fraction", lambda v: 0.0 < v <= 1.0,
                         "--explore_fraction must be in (0, 1].")
flags.register_validator("learning_rate", lambda v: v > 0, "--learning_rate must be > 0.")
flags.register_validator("weight_decay", lambda v: v is None or v >= 0,
                         "--weight_decay must be >= 0.")
flags.register_validator("keras_verbose", lambda v: v in (0, 1, 2),
                         "--keras_verbose must be 0, 1 or 2.")
flags.register_validator("corruption_seed", lambda v: v >= 0, "--corruption_seed must be >= 0.")


# ------------------------------------------------------------------------------- settings
@dataclasses.dataclass
class Settings:
    """Everything a run depends on, resolved from the config, --quick and the flags."""

    config: str
    quick: bool
    dataset: str
    ood_dataset: object
    models: list
    methods: list
    seeds: list
    epochs: dict
    edst_epochs: dict  # model -> (exploration_epochs, refine_epochs)
    num_members: int
    sparsity: float
    update_every: int
    drop_fraction: float
    explore_fraction: float
    learning_rate: float
    refine_lr: tuple
    weight_decay: float
    batch_size: int
    steps_per_execution: int
    validation_fraction: float
    train_examples: int
    test_examples: int
    corruption_examples: int
    corruptions: list
    corruption_seed: int
    augment: bool
    data_dir: object

    def as_dict(self):
        return dataclasses.asdict(self)


def _usage(flag, message):
    return app.UsageError(f"--{flag}: {message}")


def _parse_names(flag, values, allowed):
    names = [v.strip() for v in values if v.strip()]
    if not names:
        raise _usage(flag, f"give at least one of {list(allowed)}.")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise _usage(flag, f"unknown {unknown}; choose from {list(allowed)}.")
    if len(set(names)) != len(names):
        raise _usage(flag, f"{names} lists a name twice.")
    return names


def _parse_seeds(values):
    try:
        return bench_tables.parse_seeds(values)
    except ValueError as error:
        raise app.UsageError(str(error)) from None


def _parse_epochs(values, models, defaults):
    """Epochs per model from ``--epochs`` entries (``N`` for all, ``model:N`` for one)."""
    epochs = {m: defaults[m] for m in models}
    if values is None:
        return epochs
    everyone, named = None, {}
    for entry in (v.strip() for v in values):
        name, _, number = entry.rpartition(":")
        try:
            count = int(number)
        except ValueError:
            raise _usage("epochs", f"{entry!r} is not N or model:N with an integer N.") from None
        if count < 1:
            raise _usage("epochs", f"{entry!r}: epochs must be >= 1.")
        if not name:
            everyone = count
        elif name not in MODELS:
            raise _usage("epochs", f"{entry!r} names an unknown model; choose from "
                         f"{sorted(MODELS)}.")
        else:
            named[name] = count
    for model in models:
        epochs[model] = named.get(model, everyone if everyone is not None else epochs[model])
    return epochs


def _edst_epochs(epochs):
    """(exploration, refinement) epochs of EDST for a dense budget of ``epochs`` epochs."""
    exploration = FLAGS.exploration_epochs
    refine = FLAGS.refine_epochs
    if exploration is None:
        exploration = int(round(EDST_EXPLORATION_RATIO * epochs))
    if refine is None:
        refine = max(1, int(round(EDST_REFINE_RATIO * epochs)))
    return exploration, refine


def _pick(name, config, quick):
    """A flag's value if given, else the quick override, else the config default."""
    if FLAGS[name].value is not None:
        return FLAGS[name].value
    if quick is not None and name in quick:
        return quick[name]
    return config[name]


def resolve_settings():
    """Settings from the flags; raises app.UsageError naming the flag on bad values."""
    config = CONFIGS[FLAGS.config]
    quick = QUICK[FLAGS.config] if FLAGS.quick else None
    dataset_models = [m for m in MODELS if m in config["epochs"]]
    models = _parse_names("models", FLAGS.models or config["models"], dataset_models)
    methods = _parse_names("methods", FLAGS.methods, METHODS)
    seeds = _parse_seeds(FLAGS.seeds) if FLAGS.seeds else list(_pick("seeds", config, quick))
    default_epochs = dict(config["epochs"], **(quick or {}).get("epochs", {}))
    epochs = _parse_epochs(FLAGS.epochs, models, default_epochs)
    try:
        refine_lr = tuple(float(v) for v in FLAGS.refine_lr)
    except ValueError:
        raise _usage("refine_lr", f"takes two numbers, e.g. 0.01,0.001; got {FLAGS.refine_lr}.")
    if len(refine_lr) != 2 or min(refine_lr) <= 0:
        raise _usage("refine_lr", f"takes two positive numbers; got {FLAGS.refine_lr}.")
    corruptions = [c.strip() for c in FLAGS.corruptions if c.strip()]
    if corruptions == ["none"]:
        corruptions = []
    else:
        _parse_names("corruptions", corruptions, ftk.corruptions.CORRUPTIONS)
    if "edst" in methods and FLAGS.num_members < 1:
        raise _usage("num_members", "EDST needs at least one ticket.")
    if FLAGS.num_members < 2 and any(m in methods for m in ENSEMBLE_METHODS):
        logging.warning("--num_members=1: the ensembles have one member (no diversity metrics).")
    weight_decay = FLAGS.weight_decay if FLAGS.weight_decay is not None else config[
        "weight_decay"]
    ood = config["ood_dataset"] if FLAGS.ood_dataset is None else FLAGS.ood_dataset.strip()
    if ood == "none":
        ood = None
    elif ood is not None:
        if ood not in ftk.data.DATASET_NAMES:
            raise _usage("ood_dataset", f"{ood!r} is not a data set; choose 'none' or one of "
                         f"{list(ftk.data.DATASET_NAMES)}.")
        if ftk.data.INFO[ood]["shape"] != ftk.data.INFO[config["dataset"]]["shape"]:
            raise _usage("ood_dataset", f"{ood} images have shape {ftk.data.INFO[ood]['shape']}"
                         f", {config['dataset']}'s {ftk.data.INFO[config['dataset']]['shape']}.")
    return Settings(
        config=FLAGS.config,
        quick=FLAGS.quick,
        dataset=config["dataset"],
        ood_dataset=ood,
        models=models,
        methods=methods,
        seeds=seeds,
        epochs=epochs,
        edst_epochs={m: _edst_epochs(e) for m, e in epochs.items()},
        num_members=FLAGS.num_members,
        sparsity=FLAGS.sparsity,
        update_every=_pick("update_every", config, quick),
        drop_fraction=FLAGS.drop_fraction,
        explore_fraction=FLAGS.explore_fraction,
        learning_rate=FLAGS.learning_rate,
        refine_lr=refine_lr,
        weight_decay=weight_decay,
        batch_size=FLAGS.batch_size,
        steps_per_execution=FLAGS.steps_per_execution,
        validation_fraction=FLAGS.validation_fraction,
        train_examples=_pick("train_examples", config, quick),
        test_examples=_pick("test_examples", config, quick),
        corruption_examples=_pick("corruption_examples", config, quick),
        corruptions=corruptions,
        corruption_seed=FLAGS.corruption_seed,
        augment=config["augment"],
        data_dir=FLAGS.data_dir,
    )


# ----------------------------------------------------------------------------------- data
def _augment(image, label):
    """CIFAR-style augmentation: random horizontal flip, 4-pixel reflect pad and random crop."""
    shape = tf.shape(image)
    image = tf.image.random_flip_left_right(image)
    image = tf.pad(image, [[4, 4], [4, 4], [0, 0]], mode="REFLECT")
    return tf.image.random_crop(image, shape), label


def load_data(settings, ood_required):
    """The split of ``settings.dataset`` (`bench_tables.Data`) and its evaluation sets
    (`ft_keras.evaluation.make_data`: the test set, the OoD set, the corrupted sets); sets
    ``ood_name`` (None when the OoD set is skipped) and ``ood_skipped`` (why) on it."""
    data = bench_tables.Data(settings.dataset, settings.batch_size, settings.validation_fraction,
                             train_examples=settings.train_examples,
                             test_examples=settings.test_examples, data_dir=settings.data_dir,
                             augment=_augment if settings.augment else None, usage=_usage)
    data.ood_name, data.ood_skipped = settings.ood_dataset, None
    ood = {}
    if data.ood_name:
        try:
            ood[data.ood_name], _ = ftk.data.load_numpy(
                data.ood_name, f"test[:{len(data.test_labels)}]", data_dir=settings.data_dir)
        except FileNotFoundError as error:
            if ood_required:
                raise app.UsageError(f"--ood_dataset={data.ood_name}: {error}") from None
            data.ood_skipped = (f"{data.ood_name} not found: set FT_KERAS_DATA_DIR or place it "
                                f"at {os.path.join(SHARED_DATA, data.ood_name)}")
            logging.warning("no OoD detection: %s (pass --ood_dataset=none to silence this).",
                            data.ood_skipped)
            data.ood_name = None
    start = time.time()
    data.eval = evaluation.make_data(
        data.test_images, data.test_labels, ood=ood, corruptions=settings.corruptions,
        severities=SEVERITIES, corruption_examples=settings.corruption_examples,
        corruption_seed=settings.corruption_seed)
    logging.info("%s: %d training, %d validation, %d test examples (%d steps per epoch); "
                 "OoD %s: %s examples; %d corrupted sets of %d examples (%.1f s)",
                 settings.dataset, data.num_train, data.num_validation, len(data.test_labels),
                 data.steps_per_epoch, data.ood_name,
                 len(ood[data.ood_name]) if data.ood_name else None,
                 data.eval.num_corrupted_sets, len(data.eval.corruption_subset),
                 time.time() - start)
    return data


# ------------------------------------------------------------------------------- training
def member_seed(seed, member):
    """Seed of member ``member`` of repetition ``seed`` (repetitions never share a member)."""
    return 100 * seed + member


def build_fn(model_name, data):
    _, registry_name, kwargs = MODELS[model_name]
    return lambda: ftk.models.get(registry_name, input_shape=data.input_shape,
                                  num_classes=data.num_classes, **kwargs)


def train_method(settings, data, model_name, seed, method, ticket_dir):
    """Runs ``method``'s recipe for one (model, seed); returns its `RecipeResult`."""
    epochs = settings.epochs[model_name]
    compile_kwargs = dict(weight_decay=settings.weight_decay or None,
                          steps_per_execution=settings.steps_per_execution)
    common = dict(
        validation_data=data.validation(), ticket_dir=ticket_dir, seed=member_seed(seed, 0),
        monitor="val_accuracy", batch_size=settings.batch_size, overwrite=True,
        fit_kwargs=dict(verbose=FLAGS.keras_verbose), metadata={"model": model_name},
    )
    cosine = recipes.make_compile_fn("sgd", settings.learning_rate, "cosine",
                                     decay_steps=epochs * data.steps_per_epoch, **compile_kwargs)
    sparse = dict(sparsity=settings.sparsity, distribution="erk")
    dst = dict(update_every=settings.update_every, drop_fraction=settings.drop_fraction,
               final_drop_fraction=0.005, grow="gradient")
    build = build_fn(model_name, data)
    if method == "dense":
        return recipes.train_dense(build, data.train, epochs=epochs, compile_fn=cosine, **common)
    if method == "deep_ensemble":
        return recipes.train_deep_ensemble(build, settings.num_members, data.train,
                                           epochs=epochs, compile_fn=cosine, **common)
    if method == "dst_ensemble":
        # One pipeline for all members (it reshuffles every epoch, so each member sees its own
        # orders), as the committed results were trained.
        return recipes.train_dst_ensemble(build, settings.num_members,
                                          data.train(member_seed(seed, 0)), epochs=epochs,
                                          compile_fn=cosine, dst_kwargs=dst, **sparse, **common)
    if method == "static_sparse_ensemble":
        return recipes.train_static_sparse_ensemble(build, settings.num_members, data.train,
                                                    epochs=epochs, compile_fn=cosine, **sparse,
                                                    **common)
    exploration, refine = settings.edst_epochs[model_name]
    plan = dict(exploration_epochs=exploration, refine_epochs=refine,
                exploration_lr=float(settings.learning_rate), refine_lr=settings.refine_lr,
                compile_fn=recipes.make_compile_fn("sgd", settings.learning_rate,
                                                   **compile_kwargs))
    if method == "edst":
        common.pop("metadata")  # FreeTickets writes its own
        return recipes.train_edst(build, settings.num_members, data.train,
                                  explore_fraction=settings.explore_fraction, dst_kwargs=dst,
                                  **plan, **sparse, **common)
    return recipes.train_checkpoint_ensemble(build, settings.num_members, data.train,
                                             dst_kwargs=dst, **plan, **sparse, **common)


def method_epochs(settings, method, model_name):
    """Training epochs of a method's whole run (all members)."""
    epochs = settings.epochs[model_name]
    if method == "dense":
        return epochs
    if method in PLAN_METHODS:
        exploration, refine = settings.edst_epochs[model_name]
        return exploration + settings.num_members * refine
    return settings.num_members * epochs


# -------------------------------------------------------------------------------- machine
# ---------------------------------------------------------------------------------- running
class Runner(bench_tables.Runner):
    """Trains and evaluates every (model, seed, method); collects per-seed records."""

    def __init__(self, settings, data, work_dir, on_progress=None):
        self.settings = settings
        self.data = data
        self.on_progress = on_progress
        self.records = []
        super().__init__(work_dir, sum(
            method_epochs(settings, m, model) for model in settings.models
            for m in self._trained_methods()) * len(settings.seeds))

    def _trained_methods(self):
        methods = list(self.settings.methods)
        if "dense" in methods and "deep_ensemble" in methods:
            methods.remove("dense")  # member 0 of the deep ensemble
        return methods

    def run(self):
        for model_name in self.settings.models:
            for seed in self.settings.seeds:
                self._run_group(model_name, seed)
                if self.on_progress:
                    self.on_progress(self.records)
        return self.records

    def _train(self, model_name, seed, method):
        """Trains one method; returns its `RecipeResult`."""
        return self.train(
            model_name, seed, LABELS[method], method_epochs(self.settings, method, model_name),
            lambda folder: train_method(self.settings, self.data, model_name, seed, method,
                                        folder),
            self.folder(model_name, seed, method, "tickets"))

    def _run_group(self, model_name, seed):
        trained = {}  # method -> (ticket paths, wall times, training MACs)
        for method in self._trained_methods():
            result = self._train(model_name, seed, method)
            trained[method] = (result.tickets, result.fit_wall_time_s, result.training_macs)
            if method == "deep_ensemble" and "dense" in self.settings.methods:
                trained["dense"] = (result.tickets[:1], result.fit_wall_time_s[:1],
                                    result.member_training_macs[0])
        outputs = {}  # ticket path -> (model, metadata, evaluation.Predictions)
        for method in self.settings.methods:
            paths, times, training = trained[method]
            if len(paths) != (1 if method == "dense" else self.settings.num_members):
                raise RuntimeError(f"{method}: expected tickets, got {paths}.")
            for path in paths:
                if path not in outputs:
                    model, metadata = ftk.read_ticket(path)
                    outputs[path] = (model, metadata, evaluation.predict(model, self.data.eval))
            members = [outputs[path] for path in paths]
            reference = ftk.training_cost.training_macs(
                members[0][0], self.settings.epochs[model_name] * self.data.steps_per_epoch,
                self.settings.batch_size, sparse=False)
            result = evaluation.evaluate([m[2] for m in members], self.data.eval,
                                         training_macs=training, dense_training_macs=reference)
            metadata = [m[1] for m in members]
            reliability = result.reliability
            record = {"model": model_name, "seed": seed, "method": method,
                      "num_members": len(members),
                      "member_seeds": [m.get("seed") for m in metadata],
                      "best_val_accuracy": [m.get("monitor_value") for m in metadata],
                      "ticket_epochs": [m.get("epoch") for m in metadata],
                      "member_density": [m.get("density") for m in metadata],
                      "train_epochs": method_epochs(self.settings, method, model_name),
                      "wall_time_s": float(sum(times)),
                      "member_wall_time_s": [float(t) for t in times],
                      "metrics": {k: v for k, v in result.metrics.items()
                                  if not k.startswith("info/")},
                      "reliability": {
                          "counts": reliability["counts"].tolist(),
                          "accuracy": [None if np.isnan(v) else float(v)
                                       for v in reliability["accuracy"]],
                          "confidence": [None if np.isnan(v) else float(v)
                                         for v in reliability["confidence"]]}}
            self.records.append(record)
            metrics = record["metrics"]
            logging.info("[%s, seed %d] %s: accuracy %.4f, NLL %.4f, ECE %.4f, training %.2fx, "
                         "inference %.2fx", model_name, seed, method, metrics["test/accuracy"],
                         metrics["test/nll"], metrics["test/ece"],
                         metrics["cost/training_macs_relative"],
                         metrics["cost/inference_macs_relative"])
        del outputs
        self.release()


# ---------------------------------------------------------------------------- aggregation
# Keys of ft_keras.evaluation ("{ood}": the OoD set's name), plus the record's wall time.
COLUMNS = (
    # key, header, format, scale
    ("test/accuracy", "Acc. (%)", "{:.2f}", 100.0),
    ("test/nll", "NLL", "{:.4f}", 1.0),
    ("test/ece", "ECE", "{:.4f}", 1.0),
    ("test/brier", "Brier", "{:.4f}", 1.0),
    ("test/disagreement", "Disagr.", "{:.4f}", 1.0),
    ("ood/{ood}/auroc_max_prob", "OoD AUROC (max-p)", "{:.4f}", 1.0),
    ("ood/{ood}/auroc_entropy", "OoD AUROC (entropy)", "{:.4f}", 1.0),
    ("corrupt/mean/accuracy", "Corr. acc. (%)", "{:.2f}", 100.0),
    ("corrupt/mean/nll", "Corr. NLL", "{:.4f}", 1.0),
    ("cost/training_macs_relative", "Train FLOPs (x dense)", "{:.3f}", 1.0),
    ("cost/inference_macs_relative", "Infer. FLOPs (x dense)", "{:.3f}", 1.0),
    ("cost/active_params", "Active params", "{:,.0f}", 1.0),
    ("wall_time_s", "Train time (s)", "{:.0f}", 1.0),
)
SUMMARY_KEYS = tuple(c[0] for c in COLUMNS) + (
    "test/accuracy_member_mean", "test/kl_diversity", "corrupt/mean/ece",
    "cost/active_params_relative") + tuple(f"corrupt/mean/{s}/accuracy" for s in SEVERITIES)

# Summary keys of reports written before the evaluation module's key scheme (docs/results*.json
# of earlier runs), for --render_only.
_OLD_SUMMARY_KEYS = dict(
    {"accuracy": "test/accuracy", "nll": "test/nll", "ece": "test/ece", "brier": "test/brier",
     "disagreement": "test/disagreement", "ood_auroc_maxprob": "ood/{ood}/auroc_max_prob",
     "ood_auroc_entropy": "ood/{ood}/auroc_entropy", "corrupt_accuracy": "corrupt/mean/accuracy",
     "corrupt_nll": "corrupt/mean/nll", "corrupt_ece": "corrupt/mean/ece",
     "training_macs_relative": "cost/training_macs_relative",
     "inference_macs_relative": "cost/inference_macs_relative",
     "active_params": "cost/active_params", "active_params_relative":
     "cost/active_params_relative", "member_accuracy_mean": "test/accuracy_member_mean",
     "kl_diversity": "test/kl_diversity", "wall_time_s": "wall_time_s"})


def metric_key(template, ood):
    """``template`` with the OoD set's name filled in (None for an OoD key without OoD set)."""
    if "{ood}" in template:
        return template.format(ood=ood) if ood else None
    return template


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    array = np.asarray(values, np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "n": len(array)}


def _record_value(record, key):
    return record["metrics"].get(key, record.get(key))


def aggregate(records, settings):
    """{model: {method: {key: {mean, std, n}}}} over seeds, keys of `SUMMARY_KEYS`."""
    keys = [k for k in (metric_key(t, settings.ood_dataset) for t in SUMMARY_KEYS) if k]
    out = {}
    for model in settings.models:
        out[model] = {}
        for method in settings.methods:
            rows = [r for r in records if r["model"] == model and r["method"] == method]
            if rows:
                out[model][method] = {k: _stats([_record_value(r, k) for r in rows])
                                      for k in keys}
    return out


def upgrade_report(report):
    """A report of an earlier version (flat record keys) in the current key scheme, in place."""
    if report.get("metric_keys") == METRIC_KEYS:
        return report
    ood = report["settings"].get("ood_dataset")
    for methods in report["summary"].values():
        for name, stats in methods.items():
            new = {}
            for old_key, value in stats.items():
                if old_key == "corrupt_accuracy_by_severity":
                    for severity, stat in value.items():
                        new[f"corrupt/mean/{severity}/accuracy"] = stat
                elif old_key in _OLD_SUMMARY_KEYS:
                    key = metric_key(_OLD_SUMMARY_KEYS[old_key], ood)
                    if key:
                        new[key] = value
            methods[name] = new
    report["metric_keys"] = METRIC_KEYS
    return report


def _cell(stat, fmt, scale):
    if stat is None:
        return "-"
    text = fmt.format(stat["mean"] * scale)
    if stat["n"] > 1 and stat["std"] > 0:  # no "± 0" where every seed agrees exactly
        text += " ± " + fmt.format(stat["std"] * scale)
    return text


# --------------------------------------------------------------------------------- markdown
def _settings_lines(report):
    s, data = report["settings"], report["data"]
    pairs = []
    for model in s["models"]:
        exploration, refine = s["edst_epochs"][model]
        pairs.append((f"{MODELS[model][0]} epochs",
                      f"{s['epochs'][model]} per dense / DST / static run; EDST {exploration} + "
                      f"{s['num_members']} x {refine}"))
    pairs += [
        ("learning rate", f"{s['learning_rate']} (EDST refinement: {s['refine_lr'][0]} then "
                          f"{s['refine_lr'][1]})"),
        ("data", f"{s['dataset']}: {data['train_examples']:,d} training, "
                 f"{data['validation_examples']:,d} validation (fraction "
                 f"{s['validation_fraction']}), {data['test_examples']:,d} test examples"),
        ("OoD set", (f"{s['ood_dataset']} test ({data['ood_examples']:,d} images)"
                     if s["ood_dataset"] else "none")
         + (f" ({data['ood_skipped']})" if data.get("ood_skipped") else "")),
        ("members M", s["num_members"]),
        ("sparsity S (ERK)", s["sparsity"]),
        ("update_every", s["update_every"]),
        ("drop fraction", s["drop_fraction"]),
        ("EDST explore fraction q", s["explore_fraction"]),
        ("batch size", s["batch_size"]),
        ("weight decay", s["weight_decay"]),
        ("steps_per_execution", s["steps_per_execution"]),
        ("augmentation", "flip + crop" if s["augment"] else "none"),
        ("seeds", s["seeds"]),
        ("corruptions", f"{', '.join(s['corruptions']) or 'none'} x severities 1-5 on "
                        f"{data['corrupted_examples']:,d} test images, seed "
                        f"{s['corruption_seed']}"),
    ]
    return bench_tables.settings_lines(pairs)


def markdown_region(report):
    """The generated part of the markdown file (between the markers)."""
    s = report["settings"]
    mode = "quick (smoke) mode" if s["quick"] else "full mode"
    lines = []
    ood = s.get("ood_dataset")
    second = [("test/accuracy_member_mean", "{:.2f}", 100.0), ("test/kl_diversity", "{:.4f}", 1.0),
              ("corrupt/mean/ece", "{:.4f}", 1.0)] + [
                  (f"corrupt/mean/{v}/accuracy", "{:.2f}", 100.0) for v in SEVERITIES]
    for model, methods in report["summary"].items():
        lines += ["", f"### {MODELS[model][0]}", "",
                  "| Method | " + " | ".join(c[1] for c in COLUMNS) + " |",
                  "|---|" + "---|" * len(COLUMNS)]
        for method, stats in methods.items():
            lines.append(f"| {LABELS[method]} | " + " | ".join(
                _cell(stats.get(metric_key(key, ood)), fmt, scale)
                for key, _, fmt, scale in COLUMNS) + " |")
        lines += ["", "| Method | mean member acc. (%) | KL diversity | Corr. ECE | "
                  + " | ".join(f"Corr. acc. sev. {v} (%)" for v in SEVERITIES) + " |",
                  "|---|---|---|---|" + "---|" * len(SEVERITIES)]
        for method, stats in methods.items():
            lines.append(f"| {LABELS[method]} | " + " | ".join(
                _cell(stats.get(key), fmt, scale) for key, fmt, scale in second) + " |")
    if report.get("plots"):
        lines += ["", "Plots:", ""]
        for path in report["plots"]:
            name = os.path.basename(path)
            lines.append(f"![{name}]({name})")
    lines += ["", f"Raw per-seed numbers: `{report['output_name']}.json`."]
    return bench_tables.markdown_region(
        "bench/reproduce.py", report["command"],
        bench_tables.run_line(report["date_utc"], report["machine"], report["timing"]),
        _settings_lines(report), lines, NOTES, intro=f"Configuration `{s['config']}`, {mode}. ")


DEFAULT_DISCUSSION = """
## Discussion

(Not written yet: compare the numbers above with the paper's claims.)
"""


def write_markdown(path, report):
    """Writes the generated region into ``path``, keeping any text outside the markers."""
    title = ("# Reproduction: FreeTickets on " + report["settings"]["dataset"]
             + (" (quick mode)" if report["settings"]["quick"] else ""))
    bench_tables.write_region(path, REGION, markdown_region(report),
                              f"{title}\n\n{{region}}\n{DEFAULT_DISCUSSION}")


# ------------------------------------------------------------------------------------ plots
COLORS = {"dense": "black", "deep_ensemble": "tab:blue", "dst_ensemble": "tab:orange",
          "edst": "tab:red", "static_sparse_ensemble": "tab:green",
          "checkpoint_ensemble": "tab:purple"}


def _pyplot():
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel

        matplotlib.use("Agg")
        from matplotlib import pyplot  # pylint: disable=import-outside-toplevel
    except ImportError:
        logging.warning("matplotlib is not installed: no plots.")
        return None
    return pyplot


def _save(fig, plt, path):
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_accuracy_vs_flops(plt, report, path):
    """Test accuracy (mean ± std over seeds) against training FLOPs, one panel per model."""
    from matplotlib import ticker  # pylint: disable=import-outside-toplevel

    models = list(report["summary"])
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method, stats in report["summary"][model].items():
            x, y = stats["cost/training_macs_relative"], stats["test/accuracy"]
            ax.errorbar(x["mean"], 100 * y["mean"], yerr=100 * y["std"], fmt="o", capsize=3,
                        color=COLORS[method], label=LABELS[method])
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.FixedLocator([0.1, 0.25, 0.5, 1, 2, 3, 5]))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set(xlabel="training FLOPs (x one dense run)", ylabel="test accuracy (%)",
               title=MODELS[model][0])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, plt, path)


def _pooled_reliability(records, model, method):
    rows = [r["reliability"] for r in records if r["model"] == model and r["method"] == method]
    counts = np.sum([r["counts"] for r in rows], axis=0).astype(np.float64)

    def pooled(key):
        values = np.array([[np.nan if v is None else v for v in r[key]] for r in rows])
        weights = np.array([r["counts"] for r in rows], np.float64)
        with np.errstate(invalid="ignore"):
            return np.nansum(values * weights, axis=0) / counts

    return counts, pooled("accuracy"), pooled("confidence")


def best_ensemble(summary_model, among=ENSEMBLE_METHODS):
    """The method of ``among`` with the lowest mean test NLL (None if none was run)."""
    candidates = [m for m in summary_model if m in among]
    if not candidates:
        return None
    return min(candidates, key=lambda m: summary_model[m]["test/nll"]["mean"])


def plot_reliability(plt, report, path):
    """Reliability diagram (test set, seeds pooled): dense, the deep ensemble and the sparse
    ensemble with the best NLL."""
    models = [m for m in report["summary"] if "dense" in report["summary"][m]]
    if not models:
        return None
    fig, axes = plt.subplots(2, len(models), figsize=(4.5 * len(models), 5.5), squeeze=False,
                             sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    edges = np.linspace(0, 1, NUM_BINS + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    for column, model in enumerate(models):
        ax, ax_count = axes[0][column], axes[1][column]
        summary = report["summary"][model]
        methods = ["dense"] + [m for m in ["deep_ensemble", best_ensemble(summary,
                                                                         SPARSE_METHODS)]
                               if m in summary]
        ax.plot([0, 1], [0, 1], "k:", linewidth=1, label="perfect calibration")
        bar = width / len(methods)
        for index, method in enumerate(methods):
            offset = (index - (len(methods) - 1) / 2) * bar
            counts, accuracy, confidence = _pooled_reliability(report["records"], model, method)
            filled = counts > 0
            ax.plot(confidence[filled], accuracy[filled], "o-", markersize=4,
                    color=COLORS[method],
                    label=f"{LABELS[method]} (ECE {summary[method]['test/ece']['mean']:.4f})")
            ax_count.bar(centres + offset, counts / counts.sum(), width=bar,
                         color=COLORS[method])
        ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy in bin",
               title=f"{MODELS[model][0]}, seeds pooled")
        ax.legend(fontsize=8, loc="upper left")
        ax_count.set(xlabel="confidence (max probability), 15 bins", ylabel="fraction")
    return _save(fig, plt, path)


def plot_corruption(plt, report, path):
    models = [m for m in report["summary"]
              if any(s.get("corrupt/mean/accuracy") for s in report["summary"][m].values())]
    if not models:
        return None
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method, stats in report["summary"][model].items():
            xs = [0] + list(SEVERITIES)
            ys = [stats["test/accuracy"]["mean"]] + [
                stats[f"corrupt/mean/{s}/accuracy"]["mean"] for s in SEVERITIES]
            ax.plot(xs, [100 * y for y in ys], "o-", color=COLORS[method], label=LABELS[method],
                    markersize=4)
        ax.set(xlabel="corruption severity (0: clean test set)", ylabel="accuracy (%)",
               title=f"{MODELS[model][0]}: mean over corruption types")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, plt, path)


def write_plots(report, output_dir):
    plt = _pyplot()
    if plt is None:
        return []
    base = os.path.join(output_dir, report["output_name"])
    paths = [plot_accuracy_vs_flops(plt, report, base + "_accuracy_vs_training_flops.png"),
             plot_reliability(plt, report, base + "_reliability.png"),
             plot_corruption(plt, report, base + "_corruption_severity.png")]
    return [p for p in paths if p]


# -------------------------------------------------------------------------------------- main
def _write_json(path, value):
    bench_tables.write_text(path, json.dumps(value, indent=1, sort_keys=False))


def build_report(settings, data, records, command, start, meter, machine, output_name,
                 complete, training_s, plots=()):
    sets = data.eval
    return {
        "output_name": output_name,
        "metric_keys": METRIC_KEYS,
        "complete": complete,
        "command": command,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "timing": {"total_s": time.time() - start, "training_s": training_s,
                   "other_processes_cores": meter.others_cores()},
        "settings": settings.as_dict(),
        "data": {"train_examples": data.num_train, "validation_examples": data.num_validation,
                 "steps_per_epoch": data.steps_per_epoch,
                 "test_examples": int(len(sets.test_labels)),
                 "ood_examples": int(len(sets.ood[data.ood_name])) if data.ood_name else None,
                 "ood_skipped": data.ood_skipped,
                 "corrupted_examples": int(len(sets.corruption_subset)) if sets.corruptions
                 else 0,
                 "corrupted_sets": sets.num_corrupted_sets},
        "summary": aggregate(records, settings),
        "records": records,
        "plots": [os.path.basename(p) for p in plots],
        "notes": [
            "Costs are multiply-accumulates (FLOPs = 2 x MACs); ratios are the same in FLOPs.",
            "The dense single model is member 0 of the deep ensemble of the same seed.",
            "Ensemble prediction: mean of member softmax probabilities.",
            "Metric keys: ft_keras.evaluation's scheme (see its module doc).",
        ],
    }


def render_only(json_path):
    """Re-writes the markdown and the plots of a finished run from its JSON."""
    report = bench_tables.read_report(
        json_path, _usage,
        lambda r: None if r.get("complete") else "is from an unfinished run.")
    upgrade_report(report)
    output_dir = FLAGS.output_dir or os.path.dirname(os.path.abspath(json_path))
    os.makedirs(output_dir, exist_ok=True)
    plots = write_plots(report, output_dir) if FLAGS.plots else []
    report["plots"] = [os.path.basename(p) for p in plots]
    md_path = os.path.join(output_dir, report["output_name"] + ".md")
    write_markdown(md_path, report)
    logging.info("re-rendered %s and %d plots from %s", md_path, len(plots), json_path)


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
    settings = resolve_settings()
    output_dir = bench_tables.output_dir(FLAGS.output_dir, FLAGS.quick,
                                         "ft_keras_reproduce_quick", _REPO)
    output_name = FLAGS.output_name or CONFIGS[FLAGS.config]["output_name"]
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", output_name):
        raise _usage("output_name", f"{output_name!r} must be a plain file name stem.")
    os.makedirs(output_dir, exist_ok=True)
    command = bench_tables.script_command(sys.argv, _REPO)
    machine = bench_tables.recipe_machine_info(_REPO)
    logging.info("settings: %s", json.dumps(settings.as_dict()))
    logging.info("outputs: %s/%s.{json,md}", output_dir, output_name)
    data = load_data(settings, ood_required=FLAGS.ood_dataset is not None)
    settings = dataclasses.replace(settings, ood_dataset=data.ood_name)
    json_path = os.path.join(output_dir, output_name + ".json")

    def checkpoint(records):
        report = build_report(settings, data, records, command, start, meter, machine,
                              output_name, complete=False, training_s=None)
        _write_json(json_path, report)

    with bench_tables.work_folder(FLAGS.work_dir, "ft_keras_reproduce_",
                                  keep=FLAGS.keep_tickets) as work_dir:
        logging.info("tickets under %s", work_dir)
        records = Runner(settings, data, work_dir, on_progress=checkpoint).run()
    training_s = sum(r["wall_time_s"] for r in records
                     if not (r["method"] == "dense" and "deep_ensemble" in settings.methods))
    report = build_report(settings, data, records, command, start, meter, machine, output_name,
                          complete=True, training_s=training_s)
    plots = write_plots(report, output_dir) if FLAGS.plots else []
    report["plots"] = [os.path.basename(p) for p in plots]
    report["timing"]["total_s"] = time.time() - start
    _write_json(json_path, report)
    md_path = os.path.join(output_dir, output_name + ".md")
    write_markdown(md_path, report)
    logging.info("done in %.1f min: %s, %s and %d plots", report["timing"]["total_s"] / 60,
                 json_path, md_path, len(plots))
    for model, methods in report["summary"].items():
        for method, stats in methods.items():
            logging.info("%-14s %-24s accuracy %s  NLL %s  ECE %s  training %s x dense", model,
                         method, _cell(stats["test/accuracy"], "{:.4f}", 1.0),
                         _cell(stats["test/nll"], "{:.4f}", 1.0),
                         _cell(stats["test/ece"], "{:.4f}", 1.0),
                         _cell(stats["cost/training_macs_relative"], "{:.3f}", 1.0))


if __name__ == "__main__":
    app.run(main)
