"""ft_keras.atomic_files: atomic folders and files, recovery of interrupted writes, the lock."""

import os
import subprocess
import sys

import pytest

from ft_keras import atomic_files


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write(text):
    def write(folder):
        with open(os.path.join(folder, "f.txt"), "w", encoding="utf-8") as handle:
            handle.write(text)
    return write


def _read(folder):
    with open(os.path.join(folder, "f.txt"), encoding="utf-8") as handle:
        return handle.read()


def test_atomic_folder_writes_and_overwrites(tmp_path):
    target = str(tmp_path / "t")
    assert atomic_files.atomic_folder(target, _write("one")) == target
    assert _read(target) == "one"
    with pytest.raises(ValueError, match="already exists .*overwrite=True"):
        atomic_files.atomic_folder(target, _write("two"))
    atomic_files.atomic_folder(target, _write("two"), overwrite=True)
    assert _read(target) == "two" and sorted(os.listdir(tmp_path)) == ["t"]


def test_a_failed_write_leaves_the_old_folder_and_no_leftover(tmp_path):
    target = str(tmp_path / "t")
    atomic_files.atomic_folder(target, _write("one"))

    def broken(folder):
        _write("half")(folder)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_files.atomic_folder(target, broken, overwrite=True)
    assert _read(target) == "one" and sorted(os.listdir(tmp_path)) == ["t"]


@pytest.mark.parametrize("prefix", [atomic_files.READY_PREFIX, atomic_files.TRASH_PREFIX])
def test_recovery_puts_the_only_complete_copy_in_place(tmp_path, prefix):
    pid = _dead_pid()
    leftover = tmp_path / f"{prefix}t-{pid}-abc"
    leftover.mkdir()
    _write("kept")(str(leftover))
    stale_tmp = tmp_path / f"{atomic_files.TMP_PREFIX}t-{pid}-def"
    stale_tmp.mkdir()
    assert atomic_files.interrupted_writes(str(tmp_path), "t") == [leftover.name]
    restored, removed = atomic_files.recover_interrupted_writes(str(tmp_path), "t")
    assert restored == leftover.name and removed == [stale_tmp.name]
    assert _read(str(tmp_path / "t")) == "kept" and sorted(os.listdir(tmp_path)) == ["t"]


def test_recovery_leaves_live_writers_alone(tmp_path):
    live = tmp_path / f"{atomic_files.TMP_PREFIX}t-{os.getpid()}-abc"
    live.mkdir()
    assert atomic_files.recover_interrupted_writes(str(tmp_path), "t") == (None, [])
    assert live.is_dir()


def test_write_file_atomically_replaces_whole_files(tmp_path):
    path = str(tmp_path / "state.json")
    atomic_files.write_file_atomically(path, b"first")
    atomic_files.write_file_atomically(path, b"second")
    with open(path, "rb") as handle:
        assert handle.read() == b"second"
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_second_process_is_refused_the_lock(tmp_path):
    folder = str(tmp_path)
    atomic_files.lock_ticket_dir(folder, {"run": "first"})
    try:
        code = ("import sys; from ft_keras import atomic_files\n"
                "try:\n    atomic_files.lock_ticket_dir(sys.argv[1], {})\n"
                "except ValueError as e:\n    print(e); sys.exit(3)\n")
        out = subprocess.run([sys.executable, "-c", code, folder], capture_output=True,
                             text=True, timeout=120, check=False,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
        assert out.returncode == 3, out.stderr[-2000:]
        assert str(os.getpid()) in out.stdout
    finally:
        atomic_files.unlock_ticket_dir(folder)
    assert not os.path.exists(os.path.join(folder, atomic_files.LOCK_FILE))
