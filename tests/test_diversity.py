"""Smoke test of bench/diversity.py on a tiny configuration, in a subprocess.

LeNet-300-100 and LeNet-5 on 640 Fashion-MNIST training images, seeds 0 and 1, EDST of 0 + 3 x 1
epochs: on the MLP the base setting, ``opt_dense`` and ``q0.9``; on LeNet-5 the base and the one
follow-up setting picked from the MLP (``q0.9``, the only candidate). Checks the JSON (keys, the
exact set of runs, disagreement in [0, 1] and equal to the mean of the pairwise values, paired
differences equal to the per-seed records, the FLOPs reference), the markdown region, that
re-rendering keeps hand-written text outside the markers, that rerunning the command resumes
(trains nothing) while a changed configuration is refused, and that bad flags are refused with
a message naming the flag. The committed docs/diversity.json must re-render to the committed
region of docs/results.md.
"""

import json
import os
import subprocess
import sys

import pytest

import ft_keras as ftk
from tests.conftest import REPO_ROOT, SHARED_DATA, script_env

SCRIPT = os.path.join(REPO_ROOT, "bench", "diversity.py")
SEEDS = (0, 1)
TINY = ["--models=lenet_300_100,lenet5",
        "--settings=base,lenet_300_100:opt_dense,lenet_300_100:q0.9", "--followup=1",
        "--seeds=0,1", "--train_examples=640", "--test_examples=300", "--dense_epochs=1",
        "--exploration_epochs=0", "--refine_epochs=1", "--update_every=2"]
MLP_RUNS = ("dense", "edst:base", "edst:opt_dense", "dst_ensemble:1ep", "edst:q0.9")
LENET5_RUNS = ("dense", "edst:base", "dst_ensemble:1ep", "edst:q0.9")


def _run(args, timeout=420):
    process = subprocess.run([sys.executable, SCRIPT] + list(args), cwd=REPO_ROOT,
                             env=script_env(),
                             capture_output=True, text=True, timeout=timeout, check=False)
    return process.returncode, process.stdout + process.stderr


def _needs_fashion_mnist():
    try:
        ftk.data.load_numpy("fashion_mnist", "test[:1]",
                            data_dir=SHARED_DATA if os.path.isdir(SHARED_DATA) else None)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST not found: install the Debian package dataset-fashion-mnist "
                    "or set FT_KERAS_DATA_DIR to a folder with its IDX files")


def _load(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    _needs_fashion_mnist()
    output_dir = tmp_path_factory.mktemp("diversity")
    markdown = output_dir / "page.md"
    with open(markdown, "w", encoding="utf-8") as handle:
        handle.write("# Hand title\n\nHand intro.\n")
    args = TINY + [f"--output_dir={output_dir}", f"--markdown={markdown}"]
    code, output = _run(args)
    assert code == 0, output[-4000:]
    return _load(output_dir / "diversity.json"), output_dir, markdown, args


@pytest.mark.slow
@pytest.mark.real_data
def test_report_keys_and_runs(run):
    report, _, _, _ = run
    for key in ("output_name", "complete", "command", "invocations", "date_utc", "machine",
                "timing", "config", "base", "setting_definitions", "followups", "data",
                "plan_runs", "summary", "records", "plots"):
        assert key in report, key
    assert report["complete"] is True and report["output_name"] == "diversity"
    assert report["command"].startswith("python bench/diversity.py --models=")
    assert len(report["invocations"]) == 1
    assert report["data"]["train_examples"] + report["data"]["validation_examples"] == 640
    assert report["data"]["test_examples"] == 300
    keys = sorted((r["model"], r["run"], r["seed"]) for r in report["records"])
    expected = sorted([("lenet_300_100", run_, s) for run_ in MLP_RUNS for s in SEEDS]
                      + [("lenet5", run_, s) for run_ in LENET5_RUNS for s in SEEDS])
    assert keys == expected
    assert report["followups"]["lenet5"]["chosen"] == ["q0.9"]
    assert report["followups"]["lenet5"]["from"] == "lenet_300_100"
    assert report["plots"] == ["diversity_accuracy_vs_disagreement.png"]


@pytest.mark.slow
@pytest.mark.real_data
def test_diversity_values(run):
    report, _, _, _ = run
    for record in report["records"]:
        metrics = record["metrics"]
        assert 0.0 <= metrics["test/accuracy"] <= 1.0
        if record["kind"] == "dense":
            assert "test/disagreement" not in metrics and len(metrics["member_accuracy"]) == 1
            assert metrics["cost/training_macs_relative"] == 1.0
            continue
        assert 0.0 <= metrics["test/disagreement"] <= 1.0, record["run"]
        assert metrics["test/kl_diversity"] >= 0.0
        pairs = metrics["pairwise_disagreement"]
        assert sorted(pairs) == ["0-1", "0-2", "1-2"]
        assert all(0.0 <= v <= 1.0 for v in pairs.values())
        assert metrics["test/disagreement"] == pytest.approx(sum(pairs.values()) / 3, abs=1e-12)
        assert metrics["ensemble_minus_best_member_accuracy"] == pytest.approx(
            metrics["test/accuracy"] - max(metrics["member_accuracy"]), abs=1e-12)
        assert record["ticket_epochs"] == ([0, 1, 2] if record["kind"] == "edst"
                                           else [0, 0, 0])


@pytest.mark.slow
@pytest.mark.real_data
def test_flops_reference_and_pairing(run):
    report, _, _, _ = run
    records = {(r["model"], r["run"], r["seed"]): r for r in report["records"]}
    for model in ("lenet_300_100", "lenet5"):
        for seed in SEEDS:
            dense = records[(model, "dense", seed)]["metrics"]
            for name in ("edst:base", "dst_ensemble:1ep"):
                metrics = records[(model, name, seed)]["metrics"]
                # The reference of every run is the dense model's one run of --dense_epochs.
                assert metrics["cost/dense_training_macs"] == dense["cost/training_macs"]
        # EDST (0 + 3 x 1 epochs of 4 steps) and the DST Ensemble (3 x 1 epoch) train the same
        # sparse steps; they differ in their mask updates (every 2 steps; EDST: and 2 jumps).
        sparse = ftk.sparsify(ftk.models.get(model, input_shape=(28, 28, 1), num_classes=10),
                              0.8, seed=0)
        cost = ftk.training_cost
        edst = cost.training_macs(sparse, 12, 128, grow="gradient",
                                  update_steps=cost.edst_update_steps(0, 1, 3, 4, 2, end_step=12))
        dst = 3 * cost.training_macs(sparse, 4, 128, grow="gradient",
                                     update_steps=cost.dst_update_steps(4, 2, end_step=4))
        for seed in SEEDS:
            assert records[(model, "edst:base", seed)]["metrics"]["cost/training_macs"] == edst
            assert records[(model, "dst_ensemble:1ep", seed)]["metrics"][
                "cost/training_macs"] == dst
        assert report["summary"][model]["edst:base"]["dst_reference"] == "dst_ensemble:1ep"
    vs = report["summary"]["lenet_300_100"]["edst:opt_dense"]["vs_base"]["test/accuracy"]
    diffs = [records[("lenet_300_100", "edst:opt_dense", s)]["metrics"]["test/accuracy"]
             - records[("lenet_300_100", "edst:base", s)]["metrics"]["test/accuracy"]
             for s in SEEDS]
    assert [vs["per_seed"][str(s)] for s in SEEDS] == diffs
    assert vs["n"] == 2 and vs["positive"] == sum(d > 0 for d in diffs)
    for s in SEEDS:  # every setting of a seed starts from the same seed
        assert records[("lenet_300_100", "edst:opt_dense", s)]["member_seeds"] == [100 * s] * 3


@pytest.mark.slow
@pytest.mark.real_data
def test_markdown_region_and_hand_text(run):
    report, output_dir, markdown, _ = run
    with open(markdown, encoding="utf-8") as handle:
        text = handle.read()
    assert text.startswith("# Hand title\n\nHand intro.\n")
    assert "<!-- diversity:begin -->" in text and "<!-- diversity:end -->" in text
    for row in ("| masked |", "| dense |", "| dense - masked (paired) |",
                "| Dense (single model) |", "| DST Ensemble, 3 x 1 epochs |", "| EDST: base |",
                "| EDST: q = 0.9 |", "### LeNet-300-100 (MLP)", "### LeNet-5 (CNN)"):
        assert row in text, row
    assert report["command"] in text
    start = text.index("<!-- diversity:begin -->")
    end = text.index("<!-- diversity:end -->")
    edited = (text[:start] + text[start:end].replace("| EDST: base |", "| STALE |")
              + text[end:] + "\n## Verdict\n\nKept by hand.\n")
    with open(markdown, "w", encoding="utf-8") as handle:
        handle.write(edited)
    code, output = _run([f"--render_only={output_dir / 'diversity.json'}",
                         f"--markdown={markdown}", "--plots=false"], timeout=120)
    assert code == 0, output[-4000:]
    with open(markdown, encoding="utf-8") as handle:
        text = handle.read()
    assert text.startswith("# Hand title\n\nHand intro.\n")
    assert text.rstrip().endswith("## Verdict\n\nKept by hand.")
    assert "STALE" not in text and "| EDST: base |" in text
    assert text.count("<!-- diversity:begin -->") == 1


@pytest.mark.slow
@pytest.mark.real_data
def test_rerun_resumes_and_a_changed_configuration_is_refused(run):
    report, output_dir, _, args = run
    code, output = _run(args)
    assert code == 0, output[-4000:]
    assert "training " not in output and "in the JSON already, skipped" in output
    again = _load(output_dir / "diversity.json")
    assert len(again["invocations"]) == 2
    assert again["records"] == report["records"]
    code, output = _run([a for a in args if not a.startswith("--update_every")]
                        + ["--update_every=3"])
    assert code != 0 and "--restart" in output and "another configuration" in output
    assert _load(output_dir / "diversity.json")["records"] == report["records"]


def _region(path):
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    return text[text.index("<!-- diversity:begin -->"):text.index("<!-- diversity:end -->")]


def test_committed_results_render_to_the_committed_region(tmp_path):
    markdown = tmp_path / "results.md"
    code, output = _run([f"--render_only={os.path.join(REPO_ROOT, 'docs', 'diversity.json')}",
                         f"--output_dir={tmp_path}", f"--markdown={markdown}"], timeout=120)
    assert code == 0, output[-4000:]
    assert _region(markdown) == _region(os.path.join(REPO_ROOT, "docs", "results.md"))


@pytest.mark.parametrize("flag, value", [
    ("settings", "bogus"),
    ("settings", "q0.9+q1.0"),  # sets explore_fraction twice
    ("models", "lenet_300_100,vgg"),
    ("seeds", "0,x"),
    ("refine_epochs", "lenet5:0"),
])
def test_bad_flags_are_refused_naming_the_flag(tmp_path, flag, value):
    code, output = _run([f"--{flag}={value}", f"--output_dir={tmp_path}"], timeout=120)
    assert code != 0
    assert f"--{flag}" in output, output[-2000:]
    assert not os.listdir(tmp_path)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
