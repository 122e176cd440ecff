"""Smoke test of bench/channels.py on a tiny configuration, in a subprocess.

LeNet-300-100 on 640 Fashion-MNIST training images, one dense epoch, one seed, one channel
sparsity (0.5), two short timing rounds at batches 1 and 64. Checks the JSON (keys, the exact
numbers of the dense reference, the compacted widths against the asked channel fraction, the
served MACs against the widths), that a rerun resumes from the JSON without training, that a
rerun with other settings is refused, that re-rendering keeps the hand-written verdict, and that
a bad flag value is refused with a message naming the flag.
"""

import json
import os
import subprocess
import sys

import pytest

import ft_keras as ftk
from tests.conftest import REPO_ROOT, script_env

SCRIPT = os.path.join(REPO_ROOT, "bench", "channels.py")
CHANNEL_SPARSITY = 0.5
METHODS = ("dense", "edst", "edst_c0.5", "dst_ensemble")
FLAGS = ["--models=lenet_300_100", "--seeds=0", "--train_examples=640", "--test_examples=300",
         "--epochs=1", "--update_every=2", f"--channel_sparsities={CHANNEL_SPARSITY}",
         "--rounds=2", "--seconds=0.02", "--batches=1,64", "--plots=false"]
HIDDEN = 300 + 100  # LeNet-300-100's prunable units (the logits are the output)
DENSE_MACS = 784 * 300 + 300 * 100 + 100 * 10


def _run(args, timeout=300):
    process = subprocess.run([sys.executable, SCRIPT] + list(args), cwd=REPO_ROOT,
                             env=script_env(), capture_output=True, text=True, timeout=timeout,
                             check=False)
    return process.returncode, process.stdout + process.stderr


def _read(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    try:
        ftk.data.load_numpy("fashion_mnist", "test[:1]")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST not found: install the Debian package dataset-fashion-mnist "
                    "or set FT_KERAS_DATA_DIR to a folder with its IDX files")
    root = tmp_path_factory.mktemp("channels")
    args = FLAGS + [f"--output_dir={root / 'out'}", f"--work_dir={root / 'work'}"]
    code, output = _run(args)
    assert code == 0, output[-4000:]
    report = _read(root / "out" / "results_channels.json")
    return report, {r["method"]: r for r in report["records"]}, root, args


@pytest.mark.slow
@pytest.mark.real_data
def test_report_keys_and_dense_reference(run):
    report, records, _, _ = run
    assert report["complete"] is True
    for key in ("command", "date_utc", "machine", "timing", "settings", "summary", "records",
                "targets"):
        assert key in report, key
    assert report["settings"]["methods"] == list(METHODS)
    assert sorted(records) == sorted(METHODS) and len(report["records"]) == len(METHODS)
    for method, record in records.items():
        metrics = record["metrics"]
        assert 0.0 <= metrics["test/accuracy"] <= 1.0 and metrics["test/nll"] > 0
        assert 0.0 <= metrics["test/ece"] <= 1.0
        assert record["num_members"] == (1 if method == "dense" else 3)
        assert sorted(record["latency_ms"]) == ["1", "64"]
        for batch in ("1", "64"):
            cell = record["latency_ms"][batch]
            assert sorted(cell) == (["dense"] if method == "dense" else ["dense", "ensemble"])
            assert len(cell["dense"]["round_p50_ms"]) == 2
            assert cell["dense"]["ratio"] == 1.0  # the baseline against itself
        if method != "dense":
            assert 0.0 <= metrics["test/disagreement"] <= 1.0
    dense = records["dense"]
    assert dense["metrics"]["cost/inference_macs_relative"] == 1.0
    assert dense["metrics"]["cost/training_macs_relative"] == 1.0
    assert dense["served_macs"] == DENSE_MACS and dense["served_macs_relative"] == 1.0
    assert dense["size_ratio"] == 1.0
    assert dense["sizes_bytes"]["ensemble"] == dense["sizes_bytes"]["dense"]
    # Every ensemble is timed and sized against the same dense SavedModel of its seed.
    assert len({r["sizes_bytes"]["dense"] for r in report["records"]}) == 1
    stats = report["summary"]["lenet_300_100"]["dense"]
    assert stats["latency_ratio/64"] == {"mean": 1.0, "std": 0.0, "n": 1}


@pytest.mark.slow
@pytest.mark.real_data
def test_channel_widths_and_served_macs(run):
    _, records, _, _ = run
    full = {"fc1": 300, "fc2": 100, "logits": 10}
    for method in ("dense", "edst", "dst_ensemble"):  # unstructured: nothing to slice out
        assert records[method]["full_widths"] == full
        assert all(w == full for w in records[method]["member_widths"]), method
    assert records["edst"]["served_macs"] == 3 * DENSE_MACS
    channels = records["edst_c0.5"]
    assert channels["channel_sparsity"] == CHANNEL_SPARSITY
    widths = channels["member_widths"]
    assert len(widths) == 3 and all(w == widths[0] for w in widths)  # one run: shared widths
    fc1, fc2 = widths[0]["fc1"], widths[0]["fc2"]
    assert fc1 + fc2 == HIDDEN - round(CHANNEL_SPARSITY * HIDDEN)
    assert widths[0]["logits"] == 10
    assert channels["served_macs"] == 3 * (784 * fc1 + fc1 * fc2 + fc2 * 10)
    assert channels["served_macs_relative"] == channels["served_macs"] / DENSE_MACS
    assert channels["size_ratio"] < records["edst"]["size_ratio"]


@pytest.mark.slow
@pytest.mark.real_data
def test_rerun_resumes_and_other_settings_are_refused(run):
    report, _, root, args = run
    code, output = _run(args)
    assert code == 0, output[-4000:]
    again = _read(root / "out" / "results_channels.json")
    assert again["records"] == report["records"]  # nothing trained or timed again
    code, output = _run(args + ["--update_every=3"])
    assert code != 0
    assert "--restart" in output and "another configuration" in output


@pytest.mark.slow
@pytest.mark.real_data
def test_render_keeps_the_verdict(run):
    _, _, root, _ = run
    page = root / "out" / "results_channels.md"
    text = page.read_text(encoding="utf-8")
    assert "<!-- channels:begin -->" in text and "<!-- channels:end -->" in text
    assert "| edst_c0.5 |" in text and "LeNet-300-100: edst_c0.5: latency" in text
    assert "- LeNet-300-100: EDST " in text and "x its training FLOPs." in text
    page.write_text(text.replace("(Not written yet.)", "A hand-written verdict."),
                    encoding="utf-8")
    code, output = _run([f"--render_only={root / 'out' / 'results_channels.json'}",
                         "--plots=false"])
    assert code == 0, output[-4000:]
    text = page.read_text(encoding="utf-8")
    assert "A hand-written verdict." in text and "| edst_c0.5 |" in text


@pytest.mark.parametrize("flag, message", [
    ("--channel_sparsities=0.5,1.5", "--channel_sparsities: '1.5' is not in (0, 1)"),
    ("--models=lenet_300_100,resnet", "--models: got"),
    ("--methods=edst,deep_ensemble", "--methods: got"),
])
def test_bad_flags_are_refused(tmp_path, flag, message):
    code, output = _run([flag, f"--output_dir={tmp_path}"], timeout=120)
    assert code != 0 and message in output, output[-2000:]


def test_mean_std_and_its_cell():
    sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
    import bench_tables  # pylint: disable=import-outside-toplevel

    assert bench_tables.mean_std([None]) is None
    assert bench_tables.mean_std([0.5, None]) == {"mean": 0.5, "std": 0.0, "n": 1}
    stat = bench_tables.mean_std([1.0, 2.0, 4.0])
    assert stat["n"] == 3 and stat["mean"] == pytest.approx(7 / 3)
    assert stat["std"] == pytest.approx(((16 + 1 + 25) / 9 / 2) ** 0.5)  # sample std, n - 1
    assert bench_tables.mean_std_cell(stat, "{:.2f}", 10.0) == "23.33 ± 15.28"
    assert bench_tables.mean_std_cell({"mean": 0.5, "std": 0.0, "n": 3}, "{:.1f}") == "0.5"
    assert bench_tables.mean_std_cell(None, "{:.1f}") == "-"
