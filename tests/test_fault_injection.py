"""Crash safety with real processes: EDST runs killed with SIGKILL at several points, resumed by
running the same command again, end with exactly the tickets and export of an uninterrupted run.

Systematically: a run records the state its folders are in at *every* boundary of every epoch
(each rename, replace or removal under the ticket and backup folders, each BackupAndRestore
save, and the points between the callbacks at on_epoch_begin / on_test_end / on_epoch_end; a
SIGKILL there leaves exactly that state on disk), and every distinct state is resumed and must
give the uninterrupted run's tickets; in both callback orders, through the exploration and the
refinement phases. A few of those boundaries are also hit with a real SIGKILL.

Each case runs tests/edst_worker.py twice in a fresh process (killed, then resumed) and compares
with one uninterrupted reference run: ticket folders, metadata (epoch, step, monitored value),
weights and masks bit for bit, the exported ensemble's outputs, and no leftovers of interrupted
writes. Both callback orders are covered: [BackupAndRestore, FreeTickets] (BackupAndRestore saves
an epoch before FreeTickets has written the epoch's ticket) and [FreeTickets, BackupAndRestore].
"""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import ft_keras as ftk

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "edst_worker.py")
TIMEOUT = 240


def _run(out_dir, order, kill_at, plan="standard"):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    process = subprocess.Popen([sys.executable, WORKER, str(out_dir), order, kill_at, plan],
                               cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:  # always clean up the process group
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, output


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    code, output = _run(out, "backup_first", "none")
    assert code == 0 and "finished" in output, output[-3000:]
    return out


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_reference")
    code, output = _run(out, "tickets_first", "none", "tiny")
    assert code == 0 and "finished" in output, output[-3000:]
    return out


def _leftovers(folder):
    found = []
    for root, dirs, files in os.walk(folder):
        found += [os.path.join(root, n) for n in dirs + files
                  if n.startswith((".tmp-", ".ready-", ".trash-", ".progress-"))]
    return found


def _same_tickets(want_dir, got_dir, count):
    want, got = ftk.list_tickets(str(want_dir)), ftk.list_tickets(str(got_dir))
    names = [f"ticket_{i}" for i in range(count)]
    assert [os.path.basename(p) for p in want] == names
    assert [os.path.basename(p) for p in got] == names, got_dir
    for a, b in zip(want, got):
        (model_a, meta_a), (model_b, meta_b) = ftk.read_ticket(a), ftk.read_ticket(b)
        for key in ("epoch", "step", "phase", "monitor_value"):
            assert meta_a[key] == meta_b[key], (b, key)
        for wa, wb in zip(model_a.get_weights(), model_b.get_weights()):
            np.testing.assert_array_equal(wa, wb)


def _serve(export_dir, x):
    loaded = tf.saved_model.load(os.path.join(str(export_dir), "1"))
    return loaded.signatures["serving_default"](inputs=tf.constant(x))["probabilities"].numpy()


def _assert_same_run(want, got):
    _same_tickets(want / "tickets", got / "tickets", 3)
    x = np.random.default_rng(1).normal(size=(16, 16)).astype("float32")
    np.testing.assert_array_equal(_serve(want / "export", x), _serve(got / "export", x))
    assert _leftovers(got) == []


@pytest.mark.parametrize("order, kill_at", [
    ("backup_first", "ticket_write"),
    ("tickets_first", "ticket_write"),
    ("backup_first", "between_phases"),
    ("tickets_first", "between_phases"),
    ("backup_first", "export"),
])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(reference, tmp_path, order, kill_at):
    code, output = _run(tmp_path, order, kill_at)
    assert code == -signal.SIGKILL, f"expected SIGKILL, got {code}: {output[-3000:]}"
    assert "finished" not in output
    if kill_at == "ticket_write":
        assert not os.path.exists(tmp_path / "tickets" / "ticket_1")
        assert _leftovers(tmp_path / "tickets")  # the temporary folder of the interrupted write
    if kill_at == "export":
        assert not os.path.exists(tmp_path / "export" / "1")
    code, output = _run(tmp_path, order, "none")
    assert code == 0 and "finished" in output, output[-3000:]
    _assert_same_run(reference, tmp_path)


@pytest.mark.parametrize("order", ["backup_first", "tickets_first"])
def test_a_kill_at_every_boundary_resumes_to_the_uninterrupted_run(tmp_path, order):
    code, output = _run(tmp_path, order, "snapshots", "tiny")
    assert code == 0 and "finished" in output, output[-3000:]
    snapshots = sorted(os.listdir(tmp_path / "snapshots"))
    labels = [name.split("__", 1)[1] for name in snapshots]
    # Every kind of boundary, in the exploration epoch (0) and both refinement phases (1, 2).
    for epoch in (0, 1, 2):
        at = [label for label in labels if f"@{epoch}#" in label]
        assert any(label.startswith("replace=tickets_.ft_keras-run.json") for label in at), at
        assert any(label.startswith("on_epoch_end=") for label in at), at
        if epoch:
            index = epoch - 1
            for needed in (f"replace=tickets_.progress-{index}.npz.tmp",
                           f"rename=tickets_.tmp-ticket_{index}",
                           f"rename=tickets_.ready-ticket_{index}",
                           f"remove=tickets_.progress-{index}.npz"):
                assert any(label.startswith(needed) for label in at), (needed, at)
    code, output = _run(tmp_path, order, "resume_all", "tiny")
    assert code == 0 and "finished" in output, output[-3000:]
    assert [line for line in output.splitlines() if line.startswith("refused")] == []
    assert [line.split()[1] for line in output.splitlines()
            if line.startswith("resumed ")] == snapshots
    for name in snapshots:
        resumed = tmp_path / "resumed" / name
        _same_tickets(tmp_path / "tickets", resumed / "tickets", 2)
        assert _leftovers(resumed / "tickets") == []


@pytest.mark.parametrize("order, label", [
    # Issue 20: after the phase's ticket is written, before BackupAndRestore saves the epoch.
    ("tickets_first", "on_epoch_end:1@1#1"),
    # A ticket folder complete (".ready-") but not yet renamed into place.
    ("backup_first", "rename:tickets/.ready-ticket_1@2#1"),
])
def test_real_kill_at_a_boundary(tiny_reference, tmp_path, order, label):
    code, output = _run(tmp_path, order, f"at:{label}", "tiny")
    assert code == -signal.SIGKILL, f"expected SIGKILL, got {code}: {output[-3000:]}"
    code, output = _run(tmp_path, order, "none", "tiny")
    assert code == 0 and "finished" in output, output[-3000:]
    _same_tickets(tiny_reference / "tickets", tmp_path / "tickets", 2)
    assert _leftovers(tmp_path / "tickets") == []
