"""Tests for ft_keras.distribute: the multi-worker fix, chief helpers, steps_per_execution check.

The two-process tests start two real ``MultiWorkerMirroredStrategy`` workers on localhost
(tests/multiworker_worker.py, free ports, ``TF_CONFIG``), bounded in time; both processes are
killed on any failure.
"""

import contextlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import ft_keras as ftk
from ft_keras import distribute

WORKER = pathlib.Path(__file__).with_name("multiworker_worker.py")
REPO_ROOT = WORKER.parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
TIMEOUT_S = 150


# ----------------------------------------------------------------------------- unit tests
@pytest.mark.parametrize(
    "version, expected",
    [("3.15.1", True), ("3.0.0", True), ("3.10.0rc1", True), ("3.16.0", False),
     ("4.0", False), ("2.15.0", False)],
)
def test_fix_applies_to_affected_versions_only(version, expected):
    assert distribute.multiworker_fix_applies(version) is expected


def test_import_does_not_patch_keras():
    code = (
        "import ft_keras\n"
        "from keras.src.backend.tensorflow import trainer\n"
        "from ft_keras import distribute\n"
        "assert not distribute.multiworker_fix_installed()\n"
        "assert not hasattr(trainer.TensorFlowTrainer._maybe_symbolic_build, 'ftk_original')\n"
        "assert not hasattr(trainer.reduce_per_replica, 'ftk_original')\n"
        "print('stock')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "stock"


def test_fix_installs_and_can_be_removed():
    from keras.src.backend.tensorflow import trainer  # pylint: disable=import-outside-toplevel

    stock_build = trainer.TensorFlowTrainer._maybe_symbolic_build
    stock_reduce = trainer.reduce_per_replica
    was_installed = distribute.multiworker_fix_installed()
    if was_installed:  # an earlier test installed it
        stock_build, stock_reduce = stock_build.ftk_original, stock_reduce.ftk_original
    try:
        assert distribute.install_multiworker_fix()
        assert distribute.multiworker_fix_installed()
        assert trainer.TensorFlowTrainer._maybe_symbolic_build.ftk_original is stock_build
        assert trainer.reduce_per_replica.ftk_original is stock_reduce
        assert distribute.install_multiworker_fix()  # idempotent: wraps once
        assert trainer.reduce_per_replica.ftk_original is stock_reduce
        assert distribute.remove_multiworker_fix()
        assert trainer.reduce_per_replica is stock_reduce
        assert trainer.TensorFlowTrainer._maybe_symbolic_build is stock_build
        assert not distribute.remove_multiworker_fix()
    finally:
        if was_installed:
            distribute.install_multiworker_fix()
        else:
            distribute.remove_multiworker_fix()


def test_env_var_turns_the_fix_off(monkeypatch):
    monkeypatch.setenv(distribute.ENV_VAR, "0")
    try:
        distribute.remove_multiworker_fix()
        assert not distribute.install_multiworker_fix()
        assert not distribute.multiworker_fix_installed()
        assert distribute.install_multiworker_fix(force=True)
    finally:
        monkeypatch.delenv(distribute.ENV_VAR)
        distribute.remove_multiworker_fix()


@pytest.fixture
def fix_installed():
    """The multi-worker fix in place for one test (then back to how it was)."""
    was_installed = distribute.multiworker_fix_installed()
    assert distribute.install_multiworker_fix(force=True)
    yield
    if not was_installed:
        distribute.remove_multiworker_fix()


def test_patched_reduce_is_the_original_off_multi_worker(two_cpus, fix_installed):
    from keras.src.backend.tensorflow import trainer  # pylint: disable=import-outside-toplevel

    values = two_cpus.run(lambda: {"loss": tf.cast(
        tf.distribute.get_replica_context().replica_id_in_sync_group, tf.float32) + 1.0})
    for reduction in ("auto", "mean", "sum", "first"):
        got = trainer.reduce_per_replica(values, two_cpus, reduction)
        want = trainer.reduce_per_replica.ftk_original(values, two_cpus, reduction)
        assert float(got["loss"]) == float(want["loss"])
    assert float(trainer.reduce_per_replica(values, two_cpus, "mean")["loss"]) == 1.5


def test_is_multi_worker_is_false_for_one_process_strategies(two_cpus):
    assert not distribute.is_multi_worker(two_cpus)
    assert not distribute.is_multi_worker(tf.distribute.get_strategy())


def test_is_chief_and_worker_log_dir_on_one_worker(tmp_path, two_cpus):
    assert distribute.is_chief()
    assert distribute.is_chief(two_cpus)
    assert distribute.worker_log_dir(tmp_path / "logs", two_cpus) == str(tmp_path / "logs")
    with pytest.raises(TypeError, match="strategy"):
        distribute.is_chief("mirrored")
    with pytest.raises(ValueError, match="log_dir"):
        distribute.worker_log_dir("")


def _tiny_sparse(steps_per_execution):
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(3, name="fc")(keras.layers.Dense(8, name="hidden")(inputs))
    model = ftk.sparsify(keras.Model(inputs, outputs), sparsity=0.5, distribution="uniform")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse",
                  steps_per_execution=steps_per_execution)
    return model


def test_steps_per_execution_above_one_under_a_cpu_strategy_is_a_clear_error(two_cpus):
    with two_cpus.scope():
        model = _tiny_sparse(steps_per_execution=4)
    x, y = np.ones((16, 6), "float32"), np.zeros((16, 3), "float32")
    with pytest.raises(ValueError, match=r"steps_per_execution=4 under MirroredStrategy"):
        model.fit(x, y, batch_size=4, verbose=0, callbacks=[ftk.DynamicSparsity(update_every=2)])


def test_steps_per_execution_above_one_on_one_device_is_allowed():
    model = _tiny_sparse(steps_per_execution=4)
    distribute.check_steps_per_execution(model)  # no error
    x, y = np.ones((16, 6), "float32"), np.zeros((16, 3), "float32")
    model.fit(x, y, batch_size=4, verbose=0, callbacks=[ftk.DynamicSparsity(update_every=2)])
    assert int(model.optimizer.iterations.numpy()) == 4


# ------------------------------------------------------------------------ two real workers
def _free_ports(count):
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("localhost", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _kill(process):
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _run_workers(mode, out_dir, extra_env=None, command=None):
    """Runs both workers to completion; returns [(returncode, log text)] in task order.

    Each worker runs ``tests/multiworker_worker.py <mode> <out_dir>``, or ``command`` if given.
    """
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    processes, logs = [], []
    try:
        for task in range(2):
            env = dict(os.environ)
            env.update(extra_env or {})
            env["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": task}})
            env["CUDA_VISIBLE_DEVICES"] = ""
            if SHARED_DATA.is_dir():
                env["FT_KERAS_DATA_DIR"] = str(SHARED_DATA)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
            log = open(out_dir / f"log_{task}.txt", "w+")  # pylint: disable=consider-using-with
            logs.append(log)
            processes.append(subprocess.Popen(  # pylint: disable=consider-using-with
                command or [sys.executable, str(WORKER), mode, str(out_dir)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=str(REPO_ROOT)))
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in processes):
            if time.monotonic() > deadline:
                raise AssertionError(f"the workers did not finish within {TIMEOUT_S} s")
            if any(p.poll() not in (None, 0) for p in processes):
                time.sleep(5)  # give the other worker a moment to fail on its own, then stop it
                break
            time.sleep(0.2)
    finally:
        for process in processes:
            _kill(process)
        texts = []
        for log in logs:
            log.seek(0)
            texts.append(log.read())
            log.close()
    return [(p.returncode, text) for p, text in zip(processes, texts)]


def _assert_ok(results):
    for task, (code, text) in enumerate(results):
        assert code == 0, f"worker {task} exited with {code}:\n{text[-4000:]}"


@pytest.mark.slow
def test_two_workers_train_dst_bit_identically(tmp_path):
    _assert_ok(_run_workers("dst", tmp_path))
    chief, other = np.load(tmp_path / "worker_0.npz"), np.load(tmp_path / "worker_1.npz")
    assert sorted(chief.files) == sorted(other.files)
    for key in chief.files:
        np.testing.assert_array_equal(chief[key], other[key], err_msg=key)
    for grow in ("random", "gradient", "momentum", "dense_state"):
        assert int(chief[f"{grow}/iterations"]) == 2 * (512 // 32)
        changed = 0
        for layer in ("fc1", "fc2", "logits"):
            mask = chief[f"{grow}/{layer}/mask"]
            kernel = chief[f"{grow}/{layer}/kernel"]
            before = chief[f"before_{grow}/{layer}/mask"]
            assert mask.sum() == before.sum(), (grow, layer)  # exact counts kept
            assert np.all(kernel[~mask] == 0.0), (grow, layer)  # zeros off-mask
            changed += int((mask != before).sum())
        assert changed > 0, f"{grow}: no mask update happened"
    assert json.loads((tmp_path / "worker_0.done").read_text()) == {"chief": True}
    assert json.loads((tmp_path / "worker_1.done").read_text()) == {"chief": False}


@pytest.mark.slow
def test_two_workers_freetickets_chief_writes_exactly_num_tickets(tmp_path):
    _assert_ok(_run_workers("freetickets", tmp_path))
    chief, other = np.load(tmp_path / "worker_0.npz"), np.load(tmp_path / "worker_1.npz")
    for key in chief.files:
        np.testing.assert_array_equal(chief[key], other[key], err_msg=key)
    tickets_dir = tmp_path / "worker_0" / "tickets"
    assert sorted(os.listdir(tickets_dir)) == ["ticket_0", "ticket_1", "ticket_2"]
    tickets = ftk.list_tickets(tickets_dir)
    assert len(tickets) == 3
    masks = []
    for index, path in enumerate(tickets):
        model, metadata = ftk.read_ticket(path)
        assert (metadata["index"], metadata["method"]) == (index, "edst")
        masks.append(np.concatenate([(np.asarray(w) != 0).ravel() for w in model.weights
                                     if len(w.shape) == 2]))
    assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])
    assert list((tmp_path / "worker_0" / "logs").rglob("events.out.tfevents*"))
    assert not (tmp_path / "worker_1").exists(), sorted(
        str(p) for p in (tmp_path / "worker_1").rglob("*"))


@pytest.mark.slow
def test_train_script_with_two_workers_writes_results_once(tmp_path):
    output_dir = tmp_path / "run"
    command = [
        sys.executable, str(REPO_ROOT / "examples" / "train.py"), "--strategy=multiworker",
        f"--output_dir={output_dir}", "--method=edst", "--dataset=fashion_mnist",
        "--model=lenet_300_100", "--train_examples=1024", "--num_members=2",
        "--exploration_epochs=1", "--refine_epochs=1", "--update_every=4", "--keras_verbose=0",
    ]
    results = _run_workers("train", tmp_path, command=command)
    if any("fashion_mnist" in text and "not found" in text.lower() for _, text in results):
        pytest.skip("Fashion-MNIST is not available offline here")
    _assert_ok(results)
    assert sorted(os.listdir(output_dir)) == ["tensorboard", "tickets", "train_summary.json"]
    assert sorted(os.listdir(output_dir / "tickets")) == ["ticket_0", "ticket_1"]
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["flags"]["strategy"] == "multiworker" and summary["num_members"] == 2
    assert "the chief writes the tickets" in results[1][1]


@pytest.mark.slow
def test_stock_keras_still_needs_the_fix(tmp_path):
    """If this fails, the installed Keras fit works multi-worker: narrow AFFECTED_KERAS_VERSIONS."""
    if not distribute.multiworker_fix_applies():
        pytest.skip(f"Keras {keras.version()} is outside the fixed range")
    results = _run_workers("dst", tmp_path, extra_env={distribute.ENV_VAR: "0"})
    assert any(code != 0 for code, _ in results)
    assert "PerReplica" in results[0][1] + results[1][1]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
