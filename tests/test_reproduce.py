"""Smoke test of bench/reproduce.py on a tiny configuration, in a subprocess.

LeNet-300-100 on 640 Fashion-MNIST training images, one epoch, one seed; the deep ensemble (whose
member 0 is also the dense single model), the static sparse ensemble and the checkpoint ensemble;
two corruptions on 100 test images. Checks the JSON and markdown outputs (keys, plausible values,
exact costs and parameter counts against the tickets on disk), that re-rendering keeps
hand-written text outside the generated region, that the committed results re-render to the
committed tables, and that a bad flag value is refused with a message naming the flag.

MNIST (the OoD set) is optional: without it the run goes on without OoD detection and says so.
Run with ``FT_KERAS_SHARED_DATA=<empty folder> FT_KERAS_DATA_DIR=/nonexistent`` to check that
path on a machine that has MNIST.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ft_keras as ftk
from tests.conftest import REPO_ROOT, SHARED_DATA, script_env

SCRIPT = os.path.join(REPO_ROOT, "bench", "reproduce.py")
METHODS = ("dense", "deep_ensemble", "static_sparse_ensemble", "checkpoint_ensemble")
NUM_MEMBERS = 3
SPARSITY = 0.8
LENET_300_100_KERNEL = 784 * 300 + 300 * 100 + 100 * 10
LENET_300_100_BIASES = 300 + 100 + 10
PLOTS = ("accuracy_vs_training_flops", "reliability", "corruption_severity")


def _run(args, timeout=180, env=None):
    process = subprocess.run([sys.executable, SCRIPT] + list(args), cwd=REPO_ROOT,
                             env=dict(script_env(), **(env or {})), capture_output=True, text=True,
                             timeout=timeout, check=False)
    return process.returncode, process.stdout + process.stderr


def _available(name):
    try:
        ftk.data.load_numpy(name, "test[:1]",
                            data_dir=SHARED_DATA if os.path.isdir(SHARED_DATA) else None)
    except FileNotFoundError:
        return False
    return True


def _needs_fashion_mnist():
    if not _available("fashion_mnist"):
        pytest.skip("Fashion-MNIST not found: install the Debian package dataset-fashion-mnist "
                    "or set FT_KERAS_DATA_DIR to a folder with its IDX files")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    _needs_fashion_mnist()
    root = tmp_path_factory.mktemp("reproduce")
    output_dir, work_dir = root / "out", root / "work"
    code, output = _run([
        "--models=lenet_300_100", f"--methods={','.join(METHODS)}", "--seeds=0",
        "--train_examples=640", "--epochs=1", "--update_every=2", f"--sparsity={SPARSITY}",
        f"--num_members={NUM_MEMBERS}", "--corruptions=gaussian_noise,contrast",
        "--corruption_examples=100", "--test_examples=300", f"--output_dir={output_dir}",
        f"--work_dir={work_dir}", "--keep_tickets",
    ])
    assert code == 0, output[-4000:]
    with open(output_dir / "results.json", encoding="utf-8") as handle:
        report = json.load(handle)
    records = {r["method"]: r for r in report["records"]}
    return report, records, output_dir, work_dir


@pytest.mark.slow
@pytest.mark.real_data
def test_report_keys_and_values(run):
    report, records, _, _ = run
    assert report["complete"] is True
    for key in ("command", "date_utc", "machine", "timing", "settings", "data", "summary",
                "records", "plots"):
        assert key in report, key
    assert "bench/reproduce.py" in report["command"]
    assert report["machine"]["cpus_usable"] >= 1
    assert report["timing"]["total_s"] > 0 and report["timing"]["training_s"] > 0
    assert sorted(records) == sorted(METHODS) and len(report["records"]) == len(METHODS)
    assert report["data"]["train_examples"] + report["data"]["validation_examples"] == 640
    assert report["data"]["corrupted_sets"] == 2 * 5
    assert report["metric_keys"] == "ft_keras.evaluation"
    mnist = _available("mnist")
    assert report["settings"]["ood_dataset"] == ("mnist" if mnist else None)
    for method, record in records.items():
        metrics = record["metrics"]
        for key in ("test/accuracy", "test/ece", "corrupt/mean/accuracy", "corrupt/mean/ece"):
            assert 0.0 <= metrics[key] <= 1.0, (method, key, metrics[key])
        assert metrics["test/accuracy"] > 0.2, (method, metrics["test/accuracy"])  # chance: 0.1
        assert metrics["test/nll"] > 0 and metrics["corrupt/mean/nll"] > 0
        assert 0.0 <= metrics["test/brier"] <= 2.0
        if mnist:
            assert 0.0 <= metrics["ood/mnist/auroc_max_prob"] <= 1.0
            assert 0.0 <= metrics["ood/mnist/auroc_entropy"] <= 1.0
        else:
            assert not any(key.startswith("ood/") for key in metrics)
        for severity in range(1, 6):
            assert 0.0 <= metrics[f"corrupt/mean/{severity}/accuracy"] <= 1.0
            for name in ("gaussian_noise", "contrast"):
                assert 0.0 <= metrics[f"corrupt/{name}/{severity}/accuracy"] <= 1.0
        assert record["wall_time_s"] > 0
        stats = report["summary"]["lenet_300_100"][method]
        assert stats["test/accuracy"]["n"] == 1
        assert stats["test/accuracy"]["mean"] == metrics["test/accuracy"]
    if not mnist:
        assert report["data"]["ood_skipped"].startswith("mnist not found: set FT_KERAS_DATA_DIR")
    assert "test/disagreement" not in records["dense"]["metrics"]
    for method in METHODS[1:]:
        assert 0.0 <= records[method]["metrics"]["test/disagreement"] <= 1.0
        assert records[method]["num_members"] == NUM_MEMBERS


@pytest.mark.slow
@pytest.mark.real_data
def test_dense_is_member_zero_of_the_deep_ensemble(run):
    _, records, _, _ = run
    dense, deep = records["dense"], records["deep_ensemble"]
    assert dense["member_seeds"] == deep["member_seeds"][:1]
    assert dense["metrics"]["test/accuracy"] == deep["metrics"]["test/accuracy_member_0"]
    assert deep["member_seeds"] == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.real_data
def test_costs_are_exact(run):
    _, records, _, work_dir = run
    cost = {method: record["metrics"] for method, record in records.items()}
    assert cost["dense"]["cost/training_macs_relative"] == 1.0
    assert cost["dense"]["cost/inference_macs_relative"] == 1.0
    assert cost["deep_ensemble"]["cost/training_macs_relative"] == 3.0
    assert cost["deep_ensemble"]["cost/inference_macs_relative"] == 3.0
    assert cost["deep_ensemble"]["cost/inference_macs"] == 3 * LENET_300_100_KERNEL
    assert cost["deep_ensemble"]["cost/active_params"] == 3 * (
        LENET_300_100_KERNEL + LENET_300_100_BIASES)
    static = cost["static_sparse_ensemble"]
    # Fixed masks: training = 3 x sparse forward per example and step, for every member.
    assert static["cost/training_macs_relative"] == pytest.approx(
        static["cost/inference_macs_relative"], rel=1e-12)
    # One DST run of EDST's length (1 exploration + 3 x 1 refinement epochs of 4 steps), regular
    # RigL updates every 2 steps; the reference is one dense run of 1 epoch.
    model, _ = ftk.read_ticket(os.path.join(work_dir, "lenet_300_100", "seed_0",
                                            "checkpoint_ensemble", "tickets", "ticket_0"))
    steps = (1 + NUM_MEMBERS) * 4
    checkpoints = ftk.training_cost.training_macs(
        model, steps, 128, grow="gradient",
        update_steps=ftk.training_cost.dst_update_steps(steps, 2))
    assert cost["checkpoint_ensemble"]["cost/training_macs"] == checkpoints
    assert cost["checkpoint_ensemble"]["cost/dense_training_macs"] == 3 * 266_200 * 128 * 4


@pytest.mark.slow
@pytest.mark.real_data
def test_checkpoint_ensemble_snapshots_the_refinement_windows(run):
    _, records, _, _ = run
    record = records["checkpoint_ensemble"]
    assert record["ticket_epochs"] == [1, 2, 3]  # windows [1, 2), [2, 3), [3, 4)
    assert record["member_seeds"] == [0, 0, 0] and record["train_epochs"] == 4
    assert len(record["member_wall_time_s"]) == 1  # one run


@pytest.mark.slow
@pytest.mark.real_data
def test_sparse_active_params_are_the_masks(run):
    _, records, _, work_dir = run
    static = records["static_sparse_ensemble"]
    tickets = ftk.list_tickets(
        os.path.join(work_dir, "lenet_300_100", "seed_0", "static_sparse_ensemble", "tickets"))
    assert len(tickets) == NUM_MEMBERS
    active, kernel_active = [], []
    for path in tickets:
        model, _ = ftk.read_ticket(path)
        masks = [layer.kernel_mask.numpy() for layer in ftk.masked_layers(model)]
        assert masks, "the static members must hold masked layers"
        off = sum(int(mask.size - np.sum(mask)) for mask in masks)
        # ERK may keep a small layer (here the logits) dense: it is then not masked at all.
        total = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        active.append(total - off)
        kernel_active.append(LENET_300_100_KERNEL - off)
    metrics = static["metrics"]
    assert [metrics[f"cost/active_params_member_{i}"] for i in range(NUM_MEMBERS)] == active
    assert metrics["cost/active_params"] == sum(active)
    assert metrics["cost/inference_macs"] == sum(kernel_active)  # one MAC per active weight
    assert len(set(kernel_active)) == 1  # ERK counts depend on the shapes only
    assert kernel_active[0] == pytest.approx((1 - SPARSITY) * LENET_300_100_KERNEL, abs=3)


@pytest.mark.slow
@pytest.mark.real_data
def test_markdown_and_plots(run):
    report, _, output_dir, _ = run
    with open(output_dir / "results.md", encoding="utf-8") as handle:
        text = handle.read()
    assert "<!-- results:begin -->" in text and "<!-- results:end -->" in text
    for label in ("Dense (single model)", "Deep Ensemble", "Static sparse ensemble",
                  "Checkpoint ensemble (one DST run)"):
        assert f"| {label} |" in text
    assert "bench/reproduce.py" in text and "Total wall time" in text
    assert "| 3.000 | 3.000 |" in text  # deep ensemble: training and inference cost
    assert report["plots"] == [f"results_{name}.png" for name in PLOTS]
    for name in report["plots"]:
        path = output_dir / name
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) < 150_000


@pytest.mark.slow
@pytest.mark.real_data
def test_render_only_keeps_the_hand_written_text(run):
    _, _, output_dir, _ = run
    md_path = output_dir / "results.md"
    with open(md_path, encoding="utf-8") as handle:
        text = handle.read()
    start, end = text.index("<!-- results:begin -->"), text.index("<!-- results:end -->")
    edited = ("# My title\n\nHand-written intro.\n\n" + text[start:end].replace(
        "Deep Ensemble", "STALE") + text[end:] + "\n## My claims\n\nKept.\n")
    with open(md_path, "w", encoding="utf-8") as handle:
        handle.write(edited)
    code, output = _run([f"--render_only={output_dir / 'results.json'}", "--plots=false"])
    assert code == 0, output[-4000:]
    with open(md_path, encoding="utf-8") as handle:
        text = handle.read()
    assert text.startswith("# My title\n\nHand-written intro.")
    assert text.rstrip().endswith("## My claims\n\nKept.")
    assert "STALE" not in text and "| Deep Ensemble |" in text


def _region(path):
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    return text[text.index("<!-- results:begin -->"):text.index("<!-- results:end -->")]


@pytest.mark.parametrize("name", ["results", "results_cifar10"])
def test_committed_results_render_to_the_committed_tables(tmp_path, name):
    # Reports written before the evaluation module's key scheme are upgraded on reading; the
    # tables must come out as committed.
    code, output = _run([f"--render_only={os.path.join(REPO_ROOT, 'docs', name + '.json')}",
                         f"--output_dir={tmp_path}"], timeout=120)
    assert code == 0, output[-4000:]
    assert _region(tmp_path / f"{name}.md") == _region(os.path.join(REPO_ROOT, "docs",
                                                                    name + ".md"))


def test_bad_flag_values_name_the_flag(tmp_path):
    code, output = _run(["--methods=dense,bogus", f"--output_dir={tmp_path}"], timeout=120)
    assert code != 0
    assert "--methods" in output and "bogus" in output
    assert not os.listdir(tmp_path)
    code, output = _run(["--ood_dataset=cifar10", f"--output_dir={tmp_path}"], timeout=120)
    assert code != 0 and "--ood_dataset" in output and "shape" in output


@pytest.mark.real_data
def test_a_missing_ood_set_asked_for_is_an_error(tmp_path):
    _needs_fashion_mnist()
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"FT_KERAS_SHARED_DATA": str(empty), "FT_KERAS_DATA_DIR": str(empty)}
    code, output = _run(["--ood_dataset=mnist", "--models=lenet_300_100", "--methods=dense",
                         "--train_examples=640", f"--output_dir={tmp_path / 'out'}"],
                        timeout=120, env=env)
    assert code != 0 and "--ood_dataset=mnist" in output
    assert not os.path.exists(tmp_path / "out" / "results.json")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
