"""End-to-end runs of examples/train.py and examples/evaluate.py in subprocesses.

Tiny settings (1,024 Fashion-MNIST training images, LeNet-300-100, one epoch per phase, M = 2)
for the EDST, DST, PF and checkpoint ensembles: the ticket layout, train_summary.json, metrics.json /
metrics.md / plots of the evaluation, and the scripts' refusal of bad flag combinations.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ft_keras as ftk
from tests.conftest import REPO_ROOT, SHARED_DATA, script_env

pytestmark = [pytest.mark.slow, pytest.mark.real_data]

TRAIN = os.path.join(REPO_ROOT, "examples", "train.py")
EVALUATE = os.path.join(REPO_ROOT, "examples", "evaluate.py")
METHODS = ("edst", "dst_ensemble", "pf_ensemble", "checkpoint_ensemble")
NUM_MEMBERS = 2
SPARSITY = 0.8
TRAIN_FLAGS = [
    "--dataset=fashion_mnist", "--model=lenet_300_100", "--train_examples=1024",
    f"--num_members={NUM_MEMBERS}", f"--sparsity={SPARSITY}", "--update_every=4",
    "--batch_size=128", "--epochs=1", "--exploration_epochs=1", "--refine_epochs=1",
    "--pf_dense_epochs=1", "--pf_finetune_epochs=1", "--keras_verbose=2", "--seed=3",
]
EVAL_FLAGS = [
    "--corruptions=gaussian_noise,contrast", "--severities=1,3", "--corruption_examples=200",
    "--test_examples=500",
]
CORRUPTED = ("gaussian_noise/1", "gaussian_noise/3", "contrast/1", "contrast/3")
PLOTS = ("reliability_diagram.png", "accuracy_vs_num_tickets.png",
         "accuracy_vs_training_flops.png")


def _start(script, args):
    return subprocess.Popen([sys.executable, script] + list(args), cwd=REPO_ROOT,
                            env=script_env(data_path=True),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process, timeout=240):
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def _check(results):
    for name, (code, output) in results.items():
        assert code == 0, f"{name} exited with {code}:\n{output[-4000:]}"


def _available(name):
    try:
        ftk.data.load_numpy(name, "test[:1]",
                            data_dir=SHARED_DATA if os.path.isdir(SHARED_DATA) else None)
    except FileNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trains the three methods, then evaluates them (each stage's runs side by side)."""
    if not _available("fashion_mnist"):
        pytest.skip("Fashion-MNIST is not available: install the Debian package "
                    "dataset-fashion-mnist or set FT_KERAS_DATA_DIR to a folder with its IDX files")
    root = tmp_path_factory.mktemp("examples")
    out = {m: str(root / m) for m in METHODS}
    processes = {m: _start(TRAIN, [f"--method={m}", f"--output_dir={out[m]}"] + TRAIN_FLAGS)
                 for m in METHODS}
    _check({f"train.py --method={m}": _finish(p) for m, p in processes.items()})
    eval_args = {
        # edst: everything explicit; dst: the data set comes from the train summary;
        # pf: from the tickets' metadata, and no train summary at all.
        "edst": ["--dataset=fashion_mnist", f"--train_summary={out['edst']}/train_summary.json"],
        "dst_ensemble": [f"--train_summary={out['dst_ensemble']}/train_summary.json"],
        "pf_ensemble": [],
        "checkpoint_ensemble": [
            f"--train_summary={out['checkpoint_ensemble']}/train_summary.json"],
    }
    processes = {
        m: _start(EVALUATE, [f"--ticket_dir={out[m]}/tickets", f"--output_dir={out[m]}/eval"]
                  + EVAL_FLAGS + eval_args[m])
        for m in METHODS
    }
    _check({f"evaluate.py ({m})": _finish(p) for m, p in processes.items()})
    return out


def _summary(runs, method):
    with open(os.path.join(runs[method], "train_summary.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _metrics(runs, method):
    with open(os.path.join(runs[method], "eval", "metrics.json"), encoding="utf-8") as handle:
        return json.load(handle)


@pytest.mark.parametrize("method", METHODS)
def test_ticket_layout(runs, method):
    ticket_dir = os.path.join(runs[method], "tickets")
    assert sorted(os.listdir(ticket_dir)) == [f"ticket_{i}" for i in range(NUM_MEMBERS)]
    for i in range(NUM_MEMBERS):
        ticket = os.path.join(ticket_dir, f"ticket_{i}")
        assert os.path.isfile(os.path.join(ticket, "model.keras"))
        assert os.path.isfile(os.path.join(ticket, "saved_model", "1", "saved_model.pb"))
        meta = ftk.tickets.read_metadata(ticket)
        assert meta["index"] == i and meta["method"] == method
        assert meta["density"] == pytest.approx(1 - SPARSITY, abs=1e-3)
    assert os.listdir(os.path.join(runs[method], "tensorboard"))
    if method == "pf_ensemble":  # the dense parent is kept, outside the ensemble's tickets
        assert ftk.list_tickets(os.path.join(runs[method], "pf_dense")) == [
            os.path.join(runs[method], "pf_dense", "ticket_0")]


@pytest.mark.parametrize("method", METHODS)
def test_train_summary(runs, method):
    summary = _summary(runs, method)
    assert summary["method"] == method and summary["dataset"] == "fashion_mnist"
    assert summary["num_members"] == NUM_MEMBERS == len(summary["members"])
    assert summary["train_examples"] == 922 and summary["validation_examples"] == 102
    assert summary["steps_per_epoch"] == 922 // 128
    assert summary["wall_time_s"] > 0
    assert len(summary["best_val_accuracy"]) == NUM_MEMBERS
    assert all(0.0 <= v <= 1.0 for v in summary["best_val_accuracy"])
    members = summary["members"]
    assert [m["index"] for m in members] == list(range(NUM_MEMBERS))
    for member in members:
        assert member["ticket"] == f"tickets/ticket_{member['index']}"
        assert 0 < member["num_active_params"] < member["num_params"]
        assert member["forward_macs"] == pytest.approx(0.2 * 266_200, rel=0.01)
    assert summary["active_params"] == sum(m["num_active_params"] for m in members)
    cumulative = [m["cumulative_training_macs"] for m in members]
    assert cumulative == sorted(cumulative) and cumulative[-1] == summary["training_macs"]
    assert summary["training_flops"] == 2 * summary["training_macs"]
    reference = summary["dense_reference"]
    assert reference["forward_macs"] == 266_200
    assert summary["training_macs_relative_to_dense"] == pytest.approx(
        summary["training_macs"] / reference["training_macs"])
    assert summary["inference_macs_relative_to_dense"] == pytest.approx(0.4, rel=0.01)


def test_training_macs_follow_the_training_cost_formulas(runs):
    spe, batch = 922 // 128, 128
    edst, dst, pf, checkpoints = (_summary(runs, m) for m in METHODS)
    model, _ = ftk.read_ticket(os.path.join(runs["edst"], "tickets", "ticket_0"))
    assert edst["training_macs"] == ftk.training_cost.training_macs(
        model, (1 + NUM_MEMBERS) * spe, batch, grow="gradient",
        update_steps=ftk.training_cost.edst_update_steps(1, 1, NUM_MEMBERS, spe, 4))
    assert edst["dense_reference"]["epochs"] == 1 + NUM_MEMBERS
    model, _ = ftk.read_ticket(os.path.join(runs["dst_ensemble"], "tickets", "ticket_0"))
    assert dst["training_macs"] == NUM_MEMBERS * ftk.training_cost.training_macs(
        model, spe, batch, grow="gradient",
        update_steps=ftk.training_cost.dst_update_steps(spe, 4))
    # PF: one dense run, then fixed-mask sparse steps (3 x sparse forward per example).
    sparse_forward = pf["members"][0]["forward_macs"]
    assert pf["training_macs"] == 3 * 266_200 * batch * spe + NUM_MEMBERS * (
        3 * sparse_forward * batch * spe)
    assert edst["training_macs_relative_to_dense"] < 1.0 < pf["training_macs_relative_to_dense"]
    # The checkpoint ensemble: one DST run as long as EDST's, regular updates only.
    model, _ = ftk.read_ticket(os.path.join(runs["checkpoint_ensemble"], "tickets", "ticket_0"))
    steps = (1 + NUM_MEMBERS) * spe
    updates = ftk.training_cost.dst_update_steps(steps, 4)
    assert checkpoints["training_macs"] == ftk.training_cost.training_macs(
        model, steps, batch, grow="gradient", update_steps=updates)
    assert [m["cumulative_training_macs"] for m in checkpoints["members"]] == (
        ftk.training_cost.training_macs(model, steps, batch, grow="gradient",
                                        update_steps=updates,
                                        at=[(1 + i) * spe for i in range(1, NUM_MEMBERS + 1)]))
    assert [m["epoch"] for m in checkpoints["members"]] == [1, 2]  # one epoch per window


def test_pf_members_share_the_global_magnitude_mask(runs):
    parent, _ = ftk.read_ticket(os.path.join(runs["pf_ensemble"], "pf_dense", "ticket_0"))
    dense = {layer.name: np.abs(layer.get_weights()[0]) for layer in parent.layers
             if layer.get_weights()}
    members = [ftk.read_ticket(p)[0]
               for p in ftk.list_tickets(os.path.join(runs["pf_ensemble"], "tickets"))]
    masks = [{layer.name: np.asarray(layer.kernel_mask) for layer in ftk.masked_layers(m)}
             for m in members]
    assert sorted(masks[0]) == sorted(dense)  # every prunable layer is masked
    for name in dense:
        np.testing.assert_array_equal(masks[0][name], masks[1][name])
    total = sum(w.size for w in dense.values())
    assert sum(int(m.sum()) for m in masks[0].values()) == round((1 - SPARSITY) * total)
    kept = np.concatenate([dense[n][masks[0][n]] for n in dense])
    pruned = np.concatenate([dense[n][~masks[0][n]] for n in dense])
    assert kept.min() >= pruned.max()  # one global magnitude threshold
    # Fine-tuned with their own seeds and data order: the members differ.
    assert any(not np.array_equal(a, b)
               for a, b in zip(members[0].get_weights(), members[1].get_weights()))


@pytest.mark.parametrize("method", METHODS)
def test_metrics(runs, method):
    metrics = _metrics(runs, method)
    fractions = ["test/accuracy", "test/disagreement", "corrupt/mean/accuracy"]
    fractions += [f"test/accuracy_member_{i}" for i in range(NUM_MEMBERS)]
    fractions += [f"test/accuracy_first_{k}" for k in range(1, NUM_MEMBERS + 1)]
    fractions += [f"corrupt/{c}/accuracy" for c in CORRUPTED]
    fractions += [f"corrupt/mean/{s}/accuracy" for s in (1, 3)]
    eces = ["test/ece", "corrupt/mean/ece"] + [f"corrupt/{c}/ece" for c in CORRUPTED]
    positive = ["test/nll", "test/brier", "corrupt/mean/nll"]
    positive += [f"test/nll_member_{i}" for i in range(NUM_MEMBERS)]
    positive += [f"corrupt/{c}/nll" for c in CORRUPTED]
    for key in fractions + eces:
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    for key in positive:
        assert 0.0 < metrics[key] < 50.0, (key, metrics[key])
    assert metrics["test/kl_diversity"] >= 0.0
    assert metrics["info/num_members"] == NUM_MEMBERS and metrics["info/combine"] == "probs"
    assert metrics["info/test_examples"] == 500 and metrics["info/corruption_examples"] == 200
    assert metrics["info/method"] == method and metrics["info/dataset"] == "fashion_mnist"
    # The ensemble of all members is the test ensemble; the first member alone is member 0.
    assert metrics[f"test/accuracy_first_{NUM_MEMBERS}"] == metrics["test/accuracy"]
    assert metrics["test/accuracy_first_1"] == metrics["test/accuracy_member_0"]
    assert metrics["cost/inference_macs"] == pytest.approx(2 * 0.2 * 266_200, rel=0.01)
    assert metrics["cost/inference_macs_relative"] == pytest.approx(0.4, rel=0.01)
    if method != "pf_ensemble":  # evaluated with its train summary
        summary = _summary(runs, method)
        assert metrics["cost/training_macs"] == summary["training_macs"]
        assert metrics["cost/training_macs_relative"] == pytest.approx(
            summary["training_macs_relative_to_dense"])
    else:
        assert "cost/training_macs" not in metrics
    if _available("mnist"):
        for score in ("max_prob", "entropy", "mutual_information"):
            for stat in ("auroc", "aupr_in", "aupr_out", "fpr95"):
                key = f"ood/mnist/{stat}_{score}"
                assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
        assert metrics["info/ood_dataset"] == "mnist"
    else:  # the default OoD set is skipped, with a warning
        assert metrics["info/ood_dataset"] == "none"
        assert not any(key.startswith("ood/") for key in metrics)
    with open(os.path.join(runs[method], "eval", "metrics.md"), encoding="utf-8") as handle:
        text = handle.read()
    assert "## Test set" in text and "## Corrupted test sets" in text and "| contrast |" in text


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="matplotlib is not installed")
@pytest.mark.parametrize("method", METHODS)
def test_plots(runs, method):
    expected = PLOTS if method != "pf_ensemble" else PLOTS[:2]  # FLOPs need a train summary
    for name in expected:
        with open(os.path.join(runs[method], "eval", name), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n", name


def test_bad_flags_exit_with_a_clear_message(runs, tmp_path):
    code, output = _finish(_start(TRAIN, [
        "--method=edst", "--strategy=mirrored", "--steps_per_execution=4",
        f"--output_dir={tmp_path / 'mirrored'}"]))
    assert code != 0
    assert "--steps_per_execution must be 1 with --strategy=mirrored" in output
    assert not os.path.exists(tmp_path / "mirrored")
    # A second run into the same output_dir would mix tickets: refused without --overwrite.
    code, output = _finish(_start(TRAIN, [
        "--method=edst", f"--output_dir={runs['edst']}"] + TRAIN_FLAGS))
    assert code != 0 and "pass --overwrite" in output
    assert len(ftk.list_tickets(os.path.join(runs["edst"], "tickets"))) == NUM_MEMBERS



@pytest.mark.parametrize("allocation, kept", [("global", None), ("layerwise", (150, 50))])
def test_edst_with_channel_sparsity(tmp_path, allocation, kept):
    """--channel_sparsity: the tickets of one run share their removed units, and compacted
    tickets are narrower than LeNet-300-100 by the asked fraction of its hidden units (layerwise:
    of each layer's)."""
    if not _available("fashion_mnist"):
        pytest.skip("Fashion-MNIST is not available: install the Debian package "
                    "dataset-fashion-mnist or set FT_KERAS_DATA_DIR to a folder with its IDX files")
    out = str(tmp_path / "edst_channels")
    code, output = _finish(_start(TRAIN, ["--method=edst", f"--output_dir={out}",
                                          "--channel_sparsity=0.5",
                                          f"--channel_allocation={allocation}"] + TRAIN_FLAGS))
    assert code == 0, output[-4000:]
    widths = []
    for path in ftk.list_tickets(os.path.join(out, "tickets")):
        small = ftk.compact(ftk.read_ticket(path)[0])
        widths.append((small.get_layer("fc1").units, small.get_layer("fc2").units))
    assert len(widths) == NUM_MEMBERS and len(set(widths)) == 1
    assert sum(widths[0]) == 400 - round(0.5 * 400)  # fc1 + fc2: 300 + 100 hidden units
    if kept:
        assert widths[0] == kept

if __name__ == "__main__":  # bazel test / python tests/test_examples.py
    import sys

    sys.exit(pytest.main([__file__, "-q"]))
