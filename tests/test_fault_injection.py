"""Crash safety with real processes: EDST runs killed with SIGKILL at several points, resumed by
running the same command again, end with exactly the tickets and export of an uninterrupted run.

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


def _run(out_dir, order, kill_at):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    process = subprocess.Popen([sys.executable, WORKER, str(out_dir), order, kill_at],
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


def _leftovers(folder):
    found = []
    for root, dirs, files in os.walk(folder):
        found += [os.path.join(root, n) for n in dirs + files
                  if n.startswith((".tmp-", ".trash-", ".progress-"))]
    return found


def _serve(export_dir, x):
    loaded = tf.saved_model.load(os.path.join(str(export_dir), "1"))
    return loaded.signatures["serving_default"](inputs=tf.constant(x))["probabilities"].numpy()


def _assert_same_run(want, got):
    want_tickets = ftk.list_tickets(str(want / "tickets"))
    got_tickets = ftk.list_tickets(str(got / "tickets"))
    assert [os.path.basename(p) for p in got_tickets] == ["ticket_0", "ticket_1", "ticket_2"]
    assert [os.path.basename(p) for p in want_tickets] == ["ticket_0", "ticket_1", "ticket_2"]
    for a, b in zip(want_tickets, got_tickets):
        (model_a, meta_a), (model_b, meta_b) = ftk.read_ticket(a), ftk.read_ticket(b)
        for key in ("epoch", "step", "phase", "monitor_value"):
            assert meta_a[key] == meta_b[key], (b, key)
        for wa, wb in zip(model_a.get_weights(), model_b.get_weights()):
            np.testing.assert_array_equal(wa, wb)
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
