"""One EDST training process for the fault-injection tests (tests/test_fault_injection.py).

    python tests/edst_worker.py OUT_DIR ORDER KILL_AT [PLAN]

Trains a small sparse MLP on synthetic data with ``ft_keras.FreeTickets`` and
``keras.callbacks.BackupAndRestore`` (``ORDER``: "backup_first" or "tickets_first"), writes its
tickets to ``OUT_DIR/tickets`` and exports the ensemble to ``OUT_DIR/export``. ``PLAN`` is
"standard" (3 tickets: 1 exploration epoch, 2 refinement epochs each; 7 epochs) or "tiny"
(2 tickets: 1 exploration epoch, 1 refinement epoch each; 3 epochs). ``KILL_AT`` makes the
process kill itself with SIGKILL (as ``kill -9`` would) at one point:

* ``none``: run to the end;
* ``ticket_write``: while ticket 1 is being written, once its files are in the temporary folder
  and before the folder is renamed into place;
* ``between_phases``: at the start of the first epoch of refinement phase 3 (ticket 1 written,
  the epoch before saved by BackupAndRestore);
* ``export``: while the ensemble export is being written, before its folder is renamed;
* ``next``: at the first *boundary* not listed in the file named by the environment variable
  ``FT_KERAS_KILL_LOG`` (the label is appended to the file first). Boundaries: every rename,
  replace or removal of a file or folder under ``OUT_DIR/tickets`` or ``OUT_DIR/backup``
  (before it), every ``BackupAndRestore`` save (before it), and the points between the
  callbacks at ``on_epoch_begin``, ``on_test_end`` and ``on_epoch_end``. A label names the
  boundary, the epoch and the occurrence, so running ``next`` again and again (each process
  resuming the last one's state) kills once at every boundary of the run, in order.

A run whose tickets are all written (a finished run killed during the export) skips training.
Deterministic (fixed seeds, no shuffling, op determinism), so a resumed run can be compared
bit for bit with an uninterrupted one.
"""

import os
import re
import shutil
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import ft_keras as ftk  # noqa: E402

PLANS = {  # num_tickets, exploration_epochs, refine_epochs
    "standard": (3, 1, 2),
    "tiny": (2, 1, 1),
}


def _kill():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_before_rename(folder_prefix):
    """Wraps tickets.atomic_folder: the write completes into the temporary folder, then the
    process dies before the rename (for destinations whose name starts with the prefix)."""
    original = ftk.tickets.atomic_folder

    def atomic_folder(destination, write, *args, **kwargs):
        if os.path.basename(os.path.normpath(destination)).startswith(folder_prefix):
            def write_then_die(tmp):
                write(tmp)
                _kill()
            return original(destination, write_then_die, *args, **kwargs)
        return original(destination, write, *args, **kwargs)

    ftk.tickets.atomic_folder = atomic_folder


class _KillAtEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            _kill()


class _Boundaries:
    """Kills the process at the first boundary whose label is not in the log file."""

    def __init__(self, log_path, watched):
        self.log_path = log_path
        self.watched = [os.path.abspath(p) + os.sep for p in watched]
        self.epoch = None
        self.seen = {}
        with open(log_path, "a+", encoding="utf-8") as handle:
            handle.seek(0)
            self.done = set(handle.read().split())

    def reach(self, what):
        base = f"{what}@{self.epoch}"
        count = self.seen[base] = self.seen.get(base, 0) + 1
        label = f"{base}#{count}"
        if label in self.done:
            return
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(label + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        _kill()

    def _short(self, path):
        path = os.path.abspath(str(path))
        for root in self.watched:
            if path.startswith(root):
                name = path[len(root):]
                name = re.sub(r"-\d+-[0-9a-f]{8}", "", name)  # writer pid and random part
                return os.path.basename(root[:-1]) + "/" + re.sub(r"\.tmp-\d+$", ".tmp", name)
        return None

    def wrap_filesystem(self):
        for module, name in ((os, "replace"), (os, "rename"), (os, "remove"),
                             (shutil, "rmtree")):
            original = getattr(module, name)

            def wrapped(*args, _original=original, _name=name, **kwargs):
                short = self._short(args[0])
                if short is not None:
                    self.reach(f"{_name}:{short}")
                return _original(*args, **kwargs)

            setattr(module, name, wrapped)
        save = keras.callbacks.BackupAndRestore._save_model  # pylint: disable=protected-access

        def save_model(callback):
            self.reach("backup_save")
            return save(callback)

        keras.callbacks.BackupAndRestore._save_model = save_model  # pylint: disable=W0212

    def callback(self, position):
        boundaries = self

        class Between(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                if position == 0:
                    boundaries.epoch = epoch
                boundaries.reach(f"on_epoch_begin:{position}")

            def on_test_end(self, logs=None):
                boundaries.reach(f"on_test_end:{position}")

            def on_epoch_end(self, epoch, logs=None):
                boundaries.reach(f"on_epoch_end:{position}")

        return Between()


def _data():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)).astype("float32")
    labels = rng.integers(0, 4, 512)
    x = centers[labels] + rng.normal(scale=1.5, size=(512, 16)).astype("float32")
    return (x[:384], labels[:384]), (x[384:], labels[384:])


def _model():
    keras.utils.set_random_seed(0)
    base = keras.Sequential([keras.Input((16,)), keras.layers.Dense(64, activation="relu"),
                             keras.layers.Dense(4)])
    model = ftk.sparsify(base, 0.8, seed=0)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)
    return model


def main(out_dir, order, kill_at, plan="standard"):
    tf.config.experimental.enable_op_determinism()
    num_tickets, exploration_epochs, refine_epochs = PLANS[plan]
    ticket_dir = os.path.join(out_dir, "tickets")
    backup_dir = os.path.join(out_dir, "backup")
    done = os.path.isdir(ticket_dir) and len(
        ftk.list_tickets(ticket_dir, allow_empty=True)) == num_tickets
    boundaries = None
    if kill_at == "ticket_write":
        _kill_before_rename("ticket_1")
    elif kill_at == "export":
        _kill_before_rename("1")
    elif kill_at == "next":
        boundaries = _Boundaries(os.environ["FT_KERAS_KILL_LOG"], [ticket_dir, backup_dir])
        boundaries.wrap_filesystem()
    if not done:
        (x, y), validation = _data()
        tickets = ftk.FreeTickets(ticket_dir, num_tickets=num_tickets,
                                  exploration_epochs=exploration_epochs,
                                  refine_epochs=refine_epochs, update_every=6,
                                  exploration_lr=0.05, refine_lr=(0.02, 0.005))
        backup = keras.callbacks.BackupAndRestore(backup_dir)
        callbacks = [backup, tickets] if order == "backup_first" else [tickets, backup]
        if kill_at == "between_phases":
            callbacks.append(_KillAtEpoch(5))  # phases: [0], [1, 2], [3, 4], [5, 6]
        if boundaries is not None:
            callbacks = [boundaries.callback(0), callbacks[0], boundaries.callback(1),
                         callbacks[1], boundaries.callback(2)]
        epochs = exploration_epochs + num_tickets * refine_epochs
        _model().fit(x, y, batch_size=32 if plan == "standard" else 128, epochs=epochs,
                     validation_data=validation, shuffle=False, verbose=0, callbacks=callbacks)
    ensemble = ftk.Ensemble.from_directory(ticket_dir, combine="probs")
    ensemble.export(os.path.join(out_dir, "export"), version=1, overwrite=True)
    print("finished", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
