"""Smoke test of bench/reproduce.py on a tiny configuration, in a subprocess.

LeNet-300-100 on 640 Fashion-MNIST training images, one epoch, one seed; the deep ensemble (whose
member 0 is also the dense single model) and the static sparse ensemble; two corruptions on 100
test images. Checks the JSON and markdown outputs (keys, plausible values, exact costs and
parameter counts against the tickets on disk), that re-rendering keeps hand-written text outside
the generated region, and that a bad flag value is refused with a message naming the flag.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ft_keras as ftk

pytestmark = pytest.mark.slow

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.abspath(os.path.join(REPO_ROOT, "..", "shared", "data"))
SCRIPT = os.path.join(REPO_ROOT, "bench", "reproduce.py")
METHODS = ("dense", "deep_ensemble", "static_sparse_ensemble")
NUM_MEMBERS = 3
SPARSITY = 0.8
LENET_300_100_KERNEL = 784 * 300 + 300 * 100 + 100 * 10
LENET_300_100_BIASES = 300 + 100 + 10
PLOTS = ("accuracy_vs_training_flops", "reliability", "corruption_severity")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["MPLBACKEND"] = "Agg"
    return env


def _run(args, timeout=180):
    process = subprocess.run([sys.executable, SCRIPT] + list(args), cwd=REPO_ROOT, env=_env(),
                             capture_output=True, text=True, timeout=timeout, check=False)
    return process.returncode, process.stdout + process.stderr


def _mnist_available():
    try:
        ftk.data.load_numpy("mnist", "test[:1]",
                            data_dir=SHARED_DATA if os.path.isdir(SHARED_DATA) else None)
    except FileNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def run(tmp_path_factory):
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
    for method, record in records.items():
        for key in ("accuracy", "ece", "corrupt_accuracy", "corrupt_ece"):
            assert 0.0 <= record[key] <= 1.0, (method, key, record[key])
        assert record["accuracy"] > 0.2, (method, record["accuracy"])  # far above chance (0.1)
        assert record["nll"] > 0 and record["corrupt_nll"] > 0
        assert 0.0 <= record["brier"] <= 2.0
        if _mnist_available():
            assert 0.0 <= record["ood_auroc_maxprob"] <= 1.0
            assert 0.0 <= record["ood_auroc_entropy"] <= 1.0
        assert set(record["corrupt_accuracy_by_severity"]) == {"1", "2", "3", "4", "5"}
        assert record["wall_time_s"] > 0
        stats = report["summary"]["lenet_300_100"][method]
        assert stats["accuracy"]["n"] == 1 and stats["accuracy"]["mean"] == record["accuracy"]
    assert records["dense"]["disagreement"] is None
    for method in ("deep_ensemble", "static_sparse_ensemble"):
        assert 0.0 <= records[method]["disagreement"] <= 1.0
        assert records[method]["num_members"] == NUM_MEMBERS


def test_dense_is_member_zero_of_the_deep_ensemble(run):
    _, records, _, _ = run
    dense, deep = records["dense"], records["deep_ensemble"]
    assert dense["member_seeds"] == deep["member_seeds"][:1]
    assert dense["accuracy"] == pytest.approx(deep["member_accuracy"][0])
    assert deep["member_seeds"] == [0, 1, 2]


def test_costs_are_exact(run):
    _, records, _, _ = run
    assert records["dense"]["training_macs_relative"] == 1.0
    assert records["dense"]["inference_macs_relative"] == 1.0
    assert records["deep_ensemble"]["training_macs_relative"] == 3.0
    assert records["deep_ensemble"]["inference_macs_relative"] == 3.0
    assert records["deep_ensemble"]["inference_macs"] == 3 * LENET_300_100_KERNEL
    assert records["deep_ensemble"]["active_params"] == 3 * (
        LENET_300_100_KERNEL + LENET_300_100_BIASES)
    static = records["static_sparse_ensemble"]
    # Fixed masks: training = 3 x sparse forward per example and step, for every member.
    assert static["training_macs_relative"] == pytest.approx(
        static["inference_macs_relative"], rel=1e-12)


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
    assert static["active_params_per_member"] == active
    assert static["active_params"] == sum(active)
    assert static["inference_macs"] == sum(kernel_active)  # one MAC per active weight (MLP)
    assert len(set(kernel_active)) == 1  # ERK counts depend on the shapes only
    assert kernel_active[0] == pytest.approx((1 - SPARSITY) * LENET_300_100_KERNEL, abs=3)


def test_markdown_and_plots(run):
    report, _, output_dir, _ = run
    with open(output_dir / "results.md", encoding="utf-8") as handle:
        text = handle.read()
    assert "<!-- results:begin -->" in text and "<!-- results:end -->" in text
    for label in ("Dense (single model)", "Deep Ensemble", "Static sparse ensemble"):
        assert f"| {label} |" in text
    assert "bench/reproduce.py" in text and "Total wall time" in text
    assert "| 3.000 | 3.000 |" in text  # deep ensemble: training and inference cost
    assert report["plots"] == [f"results_{name}.png" for name in PLOTS]
    for name in report["plots"]:
        path = output_dir / name
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) < 150_000


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


def test_bad_flag_values_name_the_flag(tmp_path):
    code, output = _run(["--methods=dense,bogus", f"--output_dir={tmp_path}"], timeout=120)
    assert code != 0
    assert "--methods" in output and "bogus" in output
    assert not os.listdir(tmp_path)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
