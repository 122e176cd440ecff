"""The pure logic of the benchmark reports (bench/bench_tables.py): merged rows, ratios, memory
accounting and markdown. Nothing here runs or times a benchmark."""

import importlib.util
import logging
import os
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).absolute().parent.parent / "bench" / "bench_tables.py"
_SPEC = importlib.util.spec_from_file_location("bench_tables_under_test", _PATH)
bt = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bt)

MIB = 1 << 20


def _ms(dense, other, other_key):
    return {"dense": {"min": dense, "median": dense + 1.0},
            other_key: {"min": other, "median": other + 2.0}}


def _ours(model, xla, spe, dense, dst):
    return {"model": model, "jit_compile": xla, "steps_per_execution": spe,
            "ms_per_step": _ms(dense, dst, "dst")}


def _theirs(model, spe, dense, pruned, updates=2):
    return {"model": model, "steps_per_execution": spe, "mask_updates_per_timed_round": updates,
            "ms_per_step": _ms(dense, pruned, "pruned")}


def test_summary_and_ratio():
    assert bt.summary([3.0, None, 1.0, 2.0]) == {"min": 1.0, "median": 2.0}
    assert bt.summary([None]) == {"min": None, "median": None}
    assert bt.ratio(3.0, 2.0) == 1.5
    assert bt.ratio(None, 2.0) is None and bt.ratio(1.0, 0) is None


def test_flag_parsers_name_the_flag():
    assert bt.parse_bool(" On ", "xla") is True and bt.parse_bool("0", "xla") is False
    with pytest.raises(ValueError, match="--xla"):
        bt.parse_bool("maybe", "xla")
    assert bt.parse_positive_ints(["1", " 32"], "spe") == [1, 32]
    for bad in (["0"], ["x"], ["-3"]):
        with pytest.raises(ValueError, match="--spe"):
            bt.parse_positive_ints(bad, "spe")


@pytest.mark.parametrize("first, last, every, expected", [
    (101, 300, 100, 2), (33, 232, 100, 2), (1, 99, 100, 0), (100, 100, 100, 1),
    (5, 4, 100, 0), (1, 10, 1, 10),
])
def test_multiples_in(first, last, every, expected):
    assert bt.multiples_in(first, last, every) == expected


def test_multiples_in_rejects_bad_period():
    with pytest.raises(ValueError):
        bt.multiples_in(1, 10, 0)


def test_comparison_rows_merge_by_model_and_spe():
    ours = [_ours("mlp", False, 1, 10.0, 10.5), _ours("mlp", True, 1, 8.0, 9.0),
            _ours("mlp", False, 32, 8.0, 8.2)]
    theirs = {"status": "ok", "rows": [_theirs("mlp", 32, 7.0, 8.4), _theirs("mlp", 1, 9.0, 11.0),
                                       _theirs("lenet5", 1, 6.0, 6.3)]}
    rows = bt.comparison_rows(ours, theirs)
    # XLA rows are left out; ours come first in their order, tfmot-only settings after.
    assert [(r["model"], r["steps_per_execution"]) for r in rows] == [
        ("mlp", 1), ("mlp", 32), ("lenet5", 1)]
    first = rows[0]
    assert first["ftk_ratio"] == pytest.approx(1.05)
    assert first["ftk_ratio_median"] == pytest.approx(12.5 / 11.0)
    assert first["tfmot_ratio"] == pytest.approx(11.0 / 9.0)
    assert first["ftk_dst_over_tfmot_pruned"] == pytest.approx(10.5 / 11.0)
    assert first["tfmot_mask_updates"] == 2 and first["note"] is None
    assert rows[1]["tfmot_ratio"] == pytest.approx(1.2)
    assert rows[2]["ftk_ratio"] is None and rows[2]["tfmot_ratio"] == pytest.approx(1.05)


def test_comparison_rows_without_tfmot_say_how_to_install():
    ours = [_ours("mlp", False, 1, 10.0, 10.5)]
    for report in (None, {"status": "not_installed"}):
        rows = bt.comparison_rows(ours, report)
        assert len(rows) == 1
        assert rows[0]["tfmot_ratio"] is None
    assert rows[0]["note"] == bt.NOT_INSTALLED
    text = "\n".join(bt.comparison_markdown(rows, {"mlp": "MLP"}, 100))
    assert bt.NOT_INSTALLED in text and "| MLP | off | 1 |" in text
    failed = bt.comparison_rows(ours, {"status": "failed", "reason": "exit code 1"})
    assert failed[0]["note"] == "not measured: exit code 1"


def test_comparison_markdown_has_one_line_per_row():
    rows = bt.comparison_rows([_ours("mlp", False, 1, 10.0, 10.5)],
                              {"status": "ok", "rows": [_theirs("mlp", 1, 9.0, 11.0)]})
    lines = bt.comparison_markdown(rows, {}, 100)
    assert len(lines) == 2 + len(rows)
    assert "1.050" in lines[-1] and "1.222" in lines[-1]
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def _child(build, before, peak, sizes=(), variables=(80, 80), **extra):
    child = {"rss_after_import": 500 * MIB, "rss_after_build": build * MIB,
             "peak_before_training": before * MIB, "training_peak": peak * MIB,
             "lifetime_peak": max(before, peak) * MIB,
             "variables_bytes": {"model": variables[0] * MIB, "optimizer": variables[1] * MIB},
             "masked_layers": [{"size": s} for s in sizes]}
    child.update(extra)
    return child


def test_memory_rows_ratios_to_dense():
    children = {
        "dense": _child(800, 800, 1000),
        "dst": _child(900, 1400, 1200),
        "static": {"error": "exit code 1: boom"},
    }
    rows = {r["variant"]: r for r in bt.memory_rows(children)}
    assert rows["dense"]["peak_ratio"] == 1.0
    assert rows["dst"]["peak_ratio"] == pytest.approx(1.4)
    assert rows["dst"]["training_peak_ratio"] == pytest.approx(1.2)
    assert rows["dst"]["increment_ratio"] == pytest.approx(300 / 200)
    assert rows["dst"]["meets_target"] is False
    assert rows["dst"]["extra_over_dense"] == 400 * MIB
    assert rows["static"] == {"variant": "static", "error": "exit code 1: boom"}
    text = "\n".join(bt.memory_markdown({"default": list(rows.values())}))
    assert "1.400 ✗" in text and "failed: exit code 1" in text


def test_memory_accounting_static_and_dst():
    sizes = (4 * MIB, 16 * MIB)
    dense = _child(800, 800, 1000)
    static = _child(900, 1300, 1100, sizes=sizes, variables=(100, 80),
                    mask_draw_alone={"increment": 400 * MIB})
    rows = bt.memory_accounting(dense, static, "static")
    by = {(phase, name.split(":")[0]): (exp, meas) for phase, name, exp, meas in rows}
    assert by[("persistent", "kernel_mask")] == (20 * MIB, None)
    assert by[("persistent", "total (model + optimizer variables)")] == (20 * MIB, 20 * MIB)
    assert by[("before training", "total (peak RSS up to the compiled model)")] == (
        500 * MIB, 500 * MIB)
    # training: persistent + the largest transient (re-zeroing: 2 x 4 B x the largest layer)
    assert by[("training", "total (persistent + the largest transient)")] == (
        20 * MIB + 128 * MIB, 100 * MIB)
    dst = dict(static, update_alone={"increment": 300 * MIB})
    names = [name for _, name, _, _ in bt.memory_accounting(dense, dst, "dst")]
    assert any(name.startswith("mask update") for name in names)
    total = bt.memory_accounting(dense, dst, "dst")[-1]
    assert total[2] == 20 * MIB + 300 * MIB
    lines = bt.accounting_markdown(rows, "static")
    assert len(lines) == 2 + len(rows) and "**total" in "\n".join(lines)


def test_memory_accounting_momentum_buffers_and_errors():
    dense = _child(800, 800, 1000)
    child = _child(900, 1300, 1100, sizes=(MIB,))
    rows = bt.memory_accounting(dense, child, "dst_momentum", adam_like=True)
    persistent_total = [r for r in rows if r[0] == "persistent" and r[1].startswith("total")][0]
    assert persistent_total[2] == MIB + 8 * MIB  # mask + ftk_grad_m + ftk_grad_v
    with pytest.raises(ValueError, match="variant"):
        bt.memory_accounting(dense, child, "dense")
    with pytest.raises(ValueError, match="no masked layer"):
        bt.memory_accounting(dense, _child(900, 900, 900), "static")


def test_alone_markdown_skips_children_without_measurements():
    children = {
        "dense": _child(800, 800, 1000),
        "dst": _child(900, 1300, 1100, sizes=(16,), mask_draw_alone={
            "layer": "fc2", "size": 16_777_216, "increment": 400 * MIB},
            update_alone={"increment": 300 * MIB}, update_alone_xla=None),
    }
    lines = bt.alone_markdown(children)
    assert len(lines) == 3
    assert "fc2 (16,777,216)" in lines[-1] and "400.0" in lines[-1] and "300.0" in lines[-1]


class _Flag:
    def __init__(self, value, present):
        self.value, self.present = value, present


class _Flags:
    """The slice of absl's FlagValues that apply_quick uses."""

    def __init__(self, quick, **flags):
        object.__setattr__(self, "_flags", {"quick": _Flag(quick, True), **flags})

    def __getitem__(self, name):
        return self._flags[name]

    def __getattr__(self, name):
        return self._flags[name].value

    def __setattr__(self, name, value):
        self._flags[name].value = value


def test_apply_quick_sets_only_flags_not_given():
    values = _Flags(True, steps=_Flag(500, False), rounds=_Flag(7, True))
    bt.apply_quick(values, {"steps": 20, "rounds": 2})
    assert (values.steps, values.rounds) == (20, 7)
    untouched = _Flags(False, steps=_Flag(500, False))
    bt.apply_quick(untouched, {"steps": 20})
    assert untouched.steps == 500


def test_host_info_reads_this_checkout():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    info = bt.host_info(repo)
    assert info["cpu_count"] >= 1 and 1 <= info["cpus_usable"] <= info["cpu_count"]
    if os.path.isdir(os.path.join(repo, ".git")):
        assert len(info["git_commit"].split()[0]) == 40
    assert bt.host_info("/nonexistent-repo")["git_commit"] is None


def test_replace_region_replaces_only_the_marked_text(tmp_path):
    path = tmp_path / "benchmarks.md"
    path.write_text("# Title\n\nintro\n<!-- serving:begin -->\nold\ntable\n<!-- serving:end -->\n"
                    "## After\nkept\n")
    out = bt.replace_region(str(path), "serving", "\nnew table\n")
    assert out == path.read_text()
    assert out == ("# Title\n\nintro\n<!-- serving:begin -->\nnew table\n<!-- serving:end -->\n"
                   "## After\nkept\n")
    # Idempotent, and no temporary file is left.
    assert bt.replace_region(str(path), "serving", "new table") == out
    assert sorted(os.listdir(tmp_path)) == ["benchmarks.md"]


def test_replace_region_appends_a_missing_region(tmp_path):
    path = tmp_path / "b.md"
    path.write_text("# Title\n")
    bt.replace_region(str(path), "serving", "rows")
    assert path.read_text() == "# Title\n\n<!-- serving:begin -->\nrows\n<!-- serving:end -->\n"
    fresh = tmp_path / "new.md"
    bt.replace_region(str(fresh), "x-1", "a")
    assert fresh.read_text() == "<!-- x-1:begin -->\na\n<!-- x-1:end -->\n"


@pytest.mark.parametrize("content", [
    "<!-- serving:begin -->\nno end\n",
    "<!-- serving:end -->\n<!-- serving:begin -->\n",
    "<!-- serving:begin -->a<!-- serving:end --><!-- serving:begin -->b<!-- serving:end -->",
])
def test_replace_region_refuses_malformed_files(tmp_path, content):
    path = tmp_path / "b.md"
    path.write_text(content)
    with pytest.raises(ValueError, match="region 'serving' is malformed"):
        bt.replace_region(str(path), "serving", "x")
    assert path.read_text() == content


def test_region_markers_check_the_name():
    assert bt.region_markers("serving") == ("<!-- serving:begin -->", "<!-- serving:end -->")
    for bad in ("", "a b", "x-->"):
        with pytest.raises(ValueError, match="region name"):
            bt.region_markers(bad)


if __name__ == "__main__":  # bazel test / python tests/test_bench_tables.py
    sys.exit(pytest.main([__file__, "-q"]))


def test_write_keeping_regions_keeps_other_scripts_sections(tmp_path):
    path = tmp_path / "b.md"
    path.write_text("# old\n\nold body\n\n<!-- serving:begin -->\nS1\n<!-- serving:end -->\n"
                    "tail\n<!-- x:begin -->\nX\n<!-- x:end -->\n")
    content = bt.write_keeping_regions(str(path), "# new\n\nnew body\n")
    assert content == path.read_text()
    assert content.startswith("# new\n\nnew body\n")
    assert "old body" not in content and "tail" not in content
    assert "<!-- serving:begin -->\nS1\n<!-- serving:end -->" in content
    assert "<!-- x:begin -->\nX\n<!-- x:end -->" in content
    # a region the new text holds itself is not duplicated
    content = bt.write_keeping_regions(
        str(path), "# newer\n<!-- x:begin -->\nX2\n<!-- x:end -->\n")
    assert content.count("<!-- x:begin -->") == 1 and "X2" in content and "S1" in content


def test_parse_seeds():
    assert bt.parse_seeds(["0", " 2", "", "1"]) == [0, 2, 1]
    for bad, words in ((["a"], "takes integers"), (["1", "1"], "distinct"), (["-1"], ">= 0"),
                       ([""], "distinct")):
        with pytest.raises(ValueError, match=f"--seeds: .*{words}"):
            bt.parse_seeds(bad)


def test_add_data_dir_appends_an_existing_folder_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FTK_TEST_PATH", "/first")
    bt.add_data_dir(str(tmp_path), "FTK_TEST_PATH")
    bt.add_data_dir(str(tmp_path), "FTK_TEST_PATH")
    bt.add_data_dir(str(tmp_path / "missing"), "FTK_TEST_PATH")
    assert os.environ["FTK_TEST_PATH"] == os.pathsep.join(["/first", str(tmp_path)])


def test_shared_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("FT_KERAS_SHARED_DATA", raising=False)
    assert bt.shared_data_dir("/a/repo") == os.path.abspath("/a/shared/data")
    monkeypatch.setenv("FT_KERAS_SHARED_DATA", str(tmp_path))
    assert bt.shared_data_dir("/a/repo") == str(tmp_path)


def test_write_text_ends_with_one_newline_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out" / "a.md"
    bt.write_text(str(path), "x")
    bt.write_text(str(tmp_path / "b.md"), "y\n")
    assert path.read_text() == "x\n" and (tmp_path / "b.md").read_text() == "y\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.md", "b.md", "out"]


def test_own_info_only_filter():
    keep = bt.OwnInfoOnly("/x/bench/reproduce.py")

    def record(level, path):
        return logging.LogRecord("n", level, path, 1, "m", None, None)

    assert keep.filter(record(logging.INFO, "/y/bench/reproduce.py"))
    assert keep.filter(record(logging.INFO, "/y/bench/bench_tables.py"))  # its Runner's lines
    assert not keep.filter(record(logging.INFO, "/y/bench/diversity.py"))
    assert not keep.filter(record(logging.INFO, "/y/tensorflow/saver.py"))
    assert keep.filter(record(logging.WARNING, "/y/tensorflow/saver.py"))


# -------------------------------------------------------------------- recipe benchmark runs
def test_script_command_and_output_dir():
    repo = "/r/ft_keras"
    assert (bt.script_command(["/r/ft_keras/bench/reproduce.py", "--seeds=0,1", "--x=a b"], repo)
            == "python bench/reproduce.py --seeds=0,1 '--x=a b'")
    assert bt.script_command(["bench/diversity.py"], repo) == "python bench/diversity.py"
    assert bt.output_dir("/out", True, "quick_name", repo) == "/out"
    assert bt.output_dir(None, True, "quick_name", repo).endswith(os.sep + "quick_name")
    assert bt.output_dir("", False, "quick_name", repo) == "/r/ft_keras/docs"


def test_work_folder_is_kept_only_when_given_or_asked(tmp_path):
    with bt.work_folder(None, "ftk_test_") as folder:
        assert os.path.isdir(folder) and os.path.basename(folder).startswith("ftk_test_")
    assert not os.path.exists(folder)
    with bt.work_folder(None, "ftk_test_", keep=True) as kept:
        pass
    assert os.path.isdir(kept)
    os.rmdir(kept)
    given = str(tmp_path / "work" / "here")
    with pytest.raises(RuntimeError):
        with bt.work_folder(given, "ftk_test_") as folder:
            assert folder == given and os.path.isdir(given)
            raise RuntimeError("a run failed")
    assert os.path.isdir(given)  # a --work_dir is never deleted


def test_runner_trains_in_its_folder_and_counts_epochs():
    runner = bt.Runner("/work", total_epochs=10, start=0.0)
    folder = runner.folder("lenet5", 2, "edst:q=0.8", "tickets")
    assert folder == os.path.join("/work", "lenet5", "seed_2", "edst_q=0.8", "tickets")
    seen = []
    assert runner.train("lenet5", 2, "EDST", 4, lambda f: seen.append(f) or "result",
                        folder) == "result"
    assert seen == [folder] and runner.progress.done_epochs == 4


# ------------------------------------------------------------------- recipe benchmark pages
_MACHINE = {"cpus_usable": 2, "cpu_model": "CPU X", "tensorflow": "2.21", "keras": "3.15",
            "ft_keras": "0.2", "git_commit": "0123456789abcdef"}


def test_run_line_says_where_when_and_how_long():
    timing = {"total_s": 600.0, "training_s": 300.0, "other_processes_cores": 0.05}
    line = bt.run_line("2026-01-01", _MACHINE, timing)
    assert line == ("Run on 2026-01-01 (UTC), 2 usable CPU cores (CPU X); TensorFlow 2.21, Keras "
                    "3.15, ft_keras 0.2, commit `0123456789ab`. Total wall time 10.0 min "
                    "(training 5.0 min).")
    busy = bt.run_line("d", dict(_MACHINE, gpus=[]), dict(timing, other_processes_cores=0.5))
    assert ", no GPU;" in busy and "kept 0.50 cores busy" in busy
    assert ", GPUs ['A100'];" in bt.run_line("d", dict(_MACHINE, gpus=["A100"]), timing)


def test_markdown_region_and_write_region_keep_the_hand_text(tmp_path):
    region = bt.markdown_region("bench/x.py", "python bench/x.py", "Run on d.",
                                bt.settings_lines([("seeds", [0, 1]), ("batch size", 32)]),
                                ["", "| a |"], "notes.md#x", heading="## X", intro="Quick. ",
                                command_note=" (twice)")
    assert region.splitlines() == [
        "<!-- Generated by bench/x.py; edits between these markers are overwritten. -->", "",
        "## X", "", "Quick. Command: `python bench/x.py` (twice).", "", "Run on d.", "",
        "Settings:", "", "- seeds: [0, 1]", "- batch size: 32", "",
        "How the numbers are taken and what the columns mean: [notes.md#x](notes.md#x).", "",
        "| a |"]
    page = tmp_path / "page.md"
    bt.write_region(str(page), "x", "first", "# Title\n\n{region}\n\nTail.\n")
    assert page.read_text() == "# Title\n\n<!-- x:begin -->\nfirst\n<!-- x:end -->\n\nTail.\n"
    page.write_text(page.read_text() + "\nBy hand.\n")
    bt.write_region(str(page), "x", "second", "unused {region}")
    assert page.read_text() == ("# Title\n\n<!-- x:begin -->\nsecond\n<!-- x:end -->\n\nTail.\n"
                                "\nBy hand.\n")


def test_read_report_refuses_unreadable_and_unfit_reports(tmp_path):
    def usage(flag, message):
        return ValueError(f"--{flag}: {message}")

    path = tmp_path / "r.json"
    path.write_text('{"complete": true}')
    assert bt.read_report(str(path), usage, lambda r: None) == {"complete": True}
    with pytest.raises(ValueError, match="--render_only: .* is from an unfinished run"):
        bt.read_report(str(path), usage, lambda r: "is from an unfinished run.")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="--render_only: cannot read"):
        bt.read_report(str(path), usage, lambda r: None)
    with pytest.raises(ValueError, match="cannot read"):
        bt.read_report(str(tmp_path / "missing.json"), usage, lambda r: None)


def test_progress_counts_planned_epochs():
    progress = bt.Progress(total_epochs=40, start=100.0)
    progress.advance(10)
    assert progress.done_epochs == 10
    assert progress.line(now=130.0) == ("30 s elapsed, 25% of the planned epochs, ~90 s left "
                                        "(epoch-count estimate)")
    assert "~nan s left" in bt.Progress(start=0.0).line(now=5.0)
